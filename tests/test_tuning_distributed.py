"""keras-tuner's distributed mode with the budget-checked tuner: a chief and two workers on 127.0.0.1.

The processes run tests/distributed_search.py: 5 seeded random trials, of
which the 48 px ones are over the 8 KiB SRAM budget (never trained) and the
32 px ones are trained for one epoch. About 1.5 minutes on 2 cores, 20 s of
which is keras-tuner's chief polling for the last worker to finish.
"""

import collections
import math
import os
import socket
import subprocess
import sys
import time

import pytest

import distributed_search as search

HERE = os.path.dirname(os.path.abspath(__file__))
WORKERS = ("tuner0", "tuner1")
TIMEOUT_S = 300


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(tuner_id: str, port: int) -> dict:
    env = {k: v for k, v in os.environ.items() if "proxy" not in k.lower()}  # gRPC honours *_proxy
    env.update(KERASTUNER_TUNER_ID=tuner_id, KERASTUNER_ORACLE_IP="127.0.0.1", KERASTUNER_ORACLE_PORT=str(port),
               NO_PROXY="127.0.0.1,localhost", no_proxy="127.0.0.1,localhost", TF_CPP_MIN_LOG_LEVEL="3",
               TF_NUM_INTRAOP_THREADS="1", TF_NUM_INTEROP_THREADS="1", OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join(p for p in (HERE, os.path.dirname(HERE), env.get("PYTHONPATH")) if p))
    return env


def _tail(path: str, lines: int = 40) -> str:
    with open(path, errors="replace") as f:
        return "".join(f.readlines()[-lines:])


def _run_search(directory: str, logs: str) -> None:
    """Starts the chief and the workers, waits for all of them; kills every one on any failure or timeout."""
    port = _free_port()
    procs = {}
    try:
        for tuner_id in ("chief", *WORKERS):
            log = open(os.path.join(logs, f"{tuner_id}.log"), "w")
            procs[tuner_id] = subprocess.Popen(
                [sys.executable, os.path.join(HERE, "distributed_search.py"), directory, str(len(WORKERS))],
                env=_env(tuner_id, port), stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
            log.close()
        deadline = time.monotonic() + TIMEOUT_S
        while any(p.poll() is None for p in procs.values()):
            failed = {t: p.returncode for t, p in procs.items() if p.returncode not in (None, 0)}
            if failed or time.monotonic() > deadline:
                what = f"exited with {failed}" if failed else f"still running after {TIMEOUT_S} s"
                logs_text = "\n".join(f"--- {t}.log\n{_tail(os.path.join(logs, t + '.log'))}" for t in procs)
                pytest.fail(f"distributed search: {what}\n{logs_text}")
            time.sleep(0.5)
        for tuner_id, p in procs.items():
            assert p.returncode == 0, f"{tuner_id} exited with {p.returncode}:\n" \
                                      f"{_tail(os.path.join(logs, tuner_id + '.log'))}"
    finally:
        for p in procs.values():
            if p.poll() is None:
                p.kill()
            p.wait(timeout=30)


@pytest.mark.slow
def test_chief_and_two_workers_run_every_trial_once(tmp_path):
    directory = str(tmp_path / "search")
    logs = str(tmp_path)
    os.makedirs(directory)
    _run_search(directory, logs)

    events = collections.defaultdict(list)  # (event, trial id) -> tuner ids
    with open(os.path.join(directory, "events.txt")) as f:
        for line in f:
            event, tuner_id, trial_id = line.split()
            events[event, trial_id].append(tuner_id)

    # The oracle as the chief left it, reloaded from the directory (no KERASTUNER_* here: not distributed).
    assert "KERASTUNER_ORACLE_IP" not in os.environ
    tuner = search.make_tuner(directory, overwrite=False, progress=False)
    tuner.reload()
    oracle = tuner.oracle
    trial_ids = sorted(oracle.trials)
    assert trial_ids == [str(i) for i in range(search.MAX_TRIALS)]
    assert sorted(oracle.end_order) == trial_ids  # each ended exactly once ...
    assert all(oracle._run_times[t] == 1 for t in trial_ids)  # ... and never retried
    assert not oracle.ongoing_trials

    results = {r.trial_id: r for r in tuner.results()}
    trained = [t for t in trial_ids if results[t].status == "trained"]
    over = [t for t in trial_ids if results[t].status == "over budget"]
    assert sorted(trained + over) == trial_ids, {t: (r.status, r.message) for t, r in results.items()}
    # Seeded: the 48 px trials are over budget and the 32 px ones fit (tests/distributed_search.py).
    assert over == [t for t in trial_ids if oracle.trials[t].hyperparameters.get("resolution") == 48]
    assert trained and over

    # Every trial was started once, by one of the workers, and each worker started at least one: the
    # workers wait for each other before searching, and the first trial takes seconds (keras-tuner
    # itself does not promise that every worker gets a trial).
    for t in trial_ids:
        assert len(events["begin", t]) == 1, (t, events["begin", t])
    assert {events["begin", t][0] for t in trial_ids} == set(WORKERS)
    # Trained trials were fit exactly once, over-budget ones never.
    for t in trained:
        assert events["fit", t] == events["begin", t], (t, events["fit", t])
    for t in over:
        assert events["fit", t] == [], (t, events["fit", t])

    # The chief recorded the budget metrics the workers sent over gRPC, for both kinds of trial.
    for t in trained:
        r = results[t]
        assert 0 < r.peak_sram_bytes <= search.SRAM_BUDGET
        assert r.metrics["feasible"] == 1.0 and r.flash_bytes > 0
        assert 0.0 <= r.objective <= 1.0 and not math.isnan(r.objective)
    for t in over:
        r = results[t]
        assert r.peak_sram_bytes > search.SRAM_BUDGET
        assert r.metrics["feasible"] == 0.0 and r.flash_bytes > 0 and r.metrics["macs"] > 0
        # keras-tuner's Trial protobuf drops trial.message; results() rebuilds it from the metrics.
        assert r.objective is None and r.message.startswith("over budget, not trained: peak SRAM"), r.message
    table = tuner.results_table()
    assert f"{search.MAX_TRIALS} trials: {len(trained)} trained, {len(over)} over budget" in table
    assert tuner.best_result().trial_id in trained
