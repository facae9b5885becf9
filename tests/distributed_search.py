"""One process of a tiny distributed patch search, run by tests/test_tuning_distributed.py.

    KERASTUNER_TUNER_ID=chief|tuner0|tuner1 KERASTUNER_ORACLE_IP=127.0.0.1 \\
    KERASTUNER_ORACLE_PORT=PORT python tests/distributed_search.py DIRECTORY WORKERS

`make_tuner` builds the same seeded `PatchRandomSearch` in every process (the
chief serves its oracle, the workers run its trials). The space's 32 px
models peak at <= 8 KiB of SRAM and its 48 px ones above, so with
`SRAM_BUDGET` the 48 px trials are over budget and never trained.

Each worker appends to DIRECTORY/events.txt a line "begin TUNER_ID TRIAL_ID"
when it starts a trial and "fit TUNER_ID TRIAL_ID" when `HyperModel.fit` is
called, so the test can check that every trial ran once and that no
over-budget trial was trained.

Before searching, the workers wait for each other (a file per worker in
DIRECTORY, WORKERS of them): keras-tuner's chief stops serving once every
worker it has seen has been told to stop, so a worker that first connects
after that would wait for the gone chief (gRPC `wait_for_ready`, 1 hour).
"""

import os
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

PROJECT = "distributed"
MAX_TRIALS = 5
SEED = 2  # not 0: keras-tuner takes seed=0 as "no seed". Trials 0, 2, 3: 48 px (over budget); 1, 4: 32 px
SRAM_BUDGET = 8192
DATA_SIZE = 48


def space():
    from keras_patch.tuning import PatchSearchSpace

    return PatchSearchSpace(resolutions=(32, 48), widths=(0.25,), num_stages=3, patch_stages=(1, 2), grids=(2,),
                            depths=(1,), expand_ratios=(3,), kernel_sizes=(3, 5), redistribute=(False,))


def _record(directory, event, trial_id):
    line = f"{event} {os.environ.get('KERASTUNER_TUNER_ID', 'tuner0')} {trial_id}\n"
    with open(os.path.join(directory, "events.txt"), "a") as f:  # one short append: whole lines
        f.write(line)


def make_tuner(directory, record=False, **kwargs):
    """The search's tuner; with `record`, one that writes the begin / fit events."""
    from keras_tuner.src.engine.tuner_utils import TunerCallback

    from keras_patch.tuning import PatchHyperModel, PatchRandomSearch

    class RecordingHyperModel(PatchHyperModel):
        def fit(self, hp, model, *args, **fit_kwargs):
            trial = next(c.trial for c in fit_kwargs.get("callbacks", []) if isinstance(c, TunerCallback))
            _record(directory, "fit", trial.trial_id)
            return super().fit(hp, model, *args, **fit_kwargs)

    class RecordingSearch(PatchRandomSearch):
        def on_trial_begin(self, trial):
            _record(directory, "begin", trial.trial_id)
            super().on_trial_begin(trial)

    cls, hypermodel_cls = (RecordingSearch, RecordingHyperModel) if record else (PatchRandomSearch, PatchHyperModel)
    return cls(hypermodel_cls(space()), max_trials=MAX_TRIALS, seed=SEED, sram_bytes=SRAM_BUDGET,
               directory=directory, project_name=PROJECT, **kwargs)


def wait_for_workers(directory, workers, timeout=120.0):
    with open(os.path.join(directory, f"ready_{os.environ['KERASTUNER_TUNER_ID']}"), "w"):
        pass
    deadline = time.monotonic() + timeout
    while sum(name.startswith("ready_") for name in os.listdir(directory)) < workers:
        if time.monotonic() > deadline:
            raise SystemExit(f"timed out waiting for {workers} workers in {directory}")
        time.sleep(0.2)


def main(directory, workers):
    from keras_patch.datasets import person_dataset

    x, y = person_dataset(64, seed=0, image_size=DATA_SIZE)
    chief = "chief" in os.environ["KERASTUNER_TUNER_ID"]
    tuner = make_tuner(directory, record=not chief, overwrite=False, progress=not chief)
    if not chief:
        wait_for_workers(directory, workers)
    tuner.search(x[:48], y[:48], validation_data=(x[48:], y[48:]), epochs=1, batch_size=16, verbose=0)
    print(f"{os.environ['KERASTUNER_TUNER_ID']} done", flush=True)


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]))
