"""keras-tuner tuners that respect SRAM and flash budgets before training anything.

`BudgetMixin` goes in front of any keras-tuner `Tuner` class. Before a trial
trains, it builds the trial's model, converts it to int8 with its patch
stage and measures peak SRAM, flash and MACs (`measure_model`, seconds). A
trial over budget never reaches `fit`: `run_trial` records its numbers with
`oracle.update_trial` (`feasible` = 0) and raises keras-tuner's
`FailedTrialError`, the public route keras-tuner's own `max_model_size`
check takes. Trained trials report the same numbers next to
their accuracy, so `results_table()` and `plot_pareto()` can show them.

`PatchRandomSearch`, `PatchBayesianOptimization` and `PatchHyperband` are the
mixin on keras-tuner's three tuners; the distributed mode
(`KERASTUNER_TUNER_ID`, `KERASTUNER_ORACLE_IP`, `KERASTUNER_ORACLE_PORT`)
works as for any keras-tuner tuner.

Example:

>>> import numpy as np
>>> from keras_patch.datasets import person_dataset
>>> from keras_patch.tuning import PatchHyperModel, PatchRandomSearch, PatchSearchSpace
>>> space = PatchSearchSpace(resolutions=(32,), widths=(0.25,), num_stages=3, patch_stages=(1, 2), grids=(2,))
>>> x, y = person_dataset(64, image_size=32)
>>> tuner = PatchRandomSearch(PatchHyperModel(space), max_trials=2, sram_bytes=256 * 1024,
...                           flash_bytes=1024 * 1024, directory="/tmp/kp_doctest", overwrite=True,
...                           progress=False)
>>> tuner.search(x, y, validation_data=(x, y), epochs=1, verbose=0)
>>> len(tuner.results())
2
"""

from __future__ import annotations

import logging
import math
import warnings
from typing import List, Optional

import keras
import keras_tuner
from keras_tuner.src.engine import tuner_utils

from keras_patch.errors import KerasPatchError
from keras_patch.tuning.budget import BUDGET_METRICS, BudgetReport, measure_model
from keras_patch.tuning.results import (
    STATUS_FAILED,
    STATUS_OVER_BUDGET,
    STATUS_RUNNING,
    STATUS_TRAINED,
    TrialResult,
    format_results_table,
    plot_pareto,
)

logger = logging.getLogger(__name__)

# An over-budget trial reports a NaN objective (nothing was trained); keras-tuner's metric
# history then asks numpy for the best of all-NaN values, wherever the oracle runs (on the
# chief in distributed mode). That warning says nothing to the user.
warnings.filterwarnings("ignore", message="All-NaN (slice|axis) encountered", category=RuntimeWarning,
                        module=r"keras_tuner\.")

class BudgetMixin:
    """Adds `sram_bytes=` / `flash_bytes=` budgets, results and a progress bar to a keras-tuner Tuner.

    Args:
        sram_bytes: peak-SRAM budget in bytes (patched arena head); None for none.
        flash_bytes: flash budget in bytes (int8 model + TFLM code estimate); None for none.
        board: an `export-arduino` board key (e.g. "nano33ble"): each trial's
            whole tensor arena (head + TFLM tail + persistent + margin) and
            flash must also fit what that board leaves after its core, so the
            best trial's sketch fits.
        kernel: KP_PATCH_STAGE build the SRAM is predicted for ("portable" or "cmsis_nn").
        progress: show a tqdm progress bar over the trials.
        max_consecutive_failed_trials: keras-tuner stops a search after this many
            failed trials in a row; over-budget trials count as failed, so the
            default here is `max_trials` (or 100).
        **kwargs: the Tuner's own arguments (`max_trials`, `objective`, `directory`, ...).
    """

    def __init__(self, hypermodel=None, *, sram_bytes: Optional[int] = None, flash_bytes: Optional[int] = None,
                 board: Optional[str] = None, kernel: str = "portable", progress: bool = True, **kwargs):
        kwargs.setdefault("objective", "val_accuracy")
        kwargs.setdefault("max_consecutive_failed_trials", kwargs.get("max_trials") or 100)
        for name, value in (("sram_bytes", sram_bytes), ("flash_bytes", flash_bytes)):
            if value is not None and (not isinstance(value, int) or value <= 0):
                raise ValueError(f"{type(self).__name__}: {name} must be a positive int (bytes) or None, got {value!r}")
        if board is not None:
            from keras_patch.arduino.boards import get_board

            get_board(board)  # an unknown board fails here, naming the known ones
        self.sram_bytes = sram_bytes
        self.flash_bytes = flash_bytes
        self.board = board
        self.kernel = kernel
        self.progress = progress
        self._bar = None
        self._counts = {STATUS_TRAINED: 0, STATUS_OVER_BUDGET: 0, STATUS_FAILED: 0}
        self._over_budget = set()
        self._messages = {}  # trial id -> why it failed, one line (keras-tuner records a traceback)
        super().__init__(hypermodel, **kwargs)

    # ------------------------------------------------------------------ budget

    def measure(self, hp) -> BudgetReport:
        """Builds the model `hp` chooses and measures it against the budgets (no training)."""
        keras.backend.clear_session()
        model = self.hypermodel.build(hp)
        return measure_model(model, self.sram_bytes, self.flash_bytes, kernel=self.kernel, board=self.board,
                             **getattr(self.hypermodel, "measure_options", dict)())

    def run_trial(self, trial, *args, **kwargs):
        """Measures the trial's model against the budgets, then trains it (keras-tuner's `run_trial`).

        Over budget, the trial's measured numbers go to the oracle
        (`oracle.update_trial`, the objective NaN as nothing was trained) and
        `keras_tuner.errors.FailedTrialError` ends it as FAILED before `fit`,
        as keras-tuner's own `max_model_size` check does. A trained trial's
        results get the same budget metrics next to its accuracy.

        Raises:
            keras_tuner.errors.FailedTrialError: the model is over budget or
                cannot be measured (converted, patched, profiled).
        """
        try:
            report = self.measure(trial.hyperparameters)
        except KerasPatchError as e:
            message = self._messages[trial.trial_id] = f"could not be measured: {e}"
            logger.warning("trial %s %s", trial.trial_id, message)
            raise keras_tuner.errors.FailedTrialError(message) from e
        if not report.fits:
            self._over_budget.add(trial.trial_id)
            # keras-tuner wants the objective in every report: NaN, as nothing was trained.
            missing = {name: math.nan for name in self._objective_names()}
            self.oracle.update_trial(trial.trial_id, {**missing, **report.metrics()})
            message = self._messages[trial.trial_id] = f"over budget, not trained: {report.reason}"
            logger.info("trial %s (%.1f s) %s", trial.trial_id, report.seconds, message)
            raise keras_tuner.errors.FailedTrialError(message)
        histories = super().run_trial(trial, *args, **kwargs)
        results = dict(tuner_utils.convert_to_metrics_dict(histories, self.oracle.objective))
        results.update(report.metrics())
        return results

    def _objective_names(self) -> List[str]:
        objective = self.oracle.objective
        names = getattr(objective, "name_to_direction", None)  # a keras_tuner MultiObjective
        return list(names) if names else [objective.name]

    # ---------------------------------------------------------------- progress

    def on_search_begin(self):
        super().on_search_begin()
        if self.progress:
            from tqdm.auto import tqdm

            total = getattr(self.oracle, "max_trials", None)
            done = len(getattr(self.oracle, "trials", {}) or {})
            self._bar = tqdm(total=total, initial=done, desc="patch search", unit="trial")

    def on_trial_end(self, trial):
        if trial.trial_id in self._messages:  # before the oracle records the trial (in super())
            trial.message = self._messages.pop(trial.trial_id)
        super().on_trial_end(trial)
        if trial.trial_id in self._over_budget:
            status = STATUS_OVER_BUDGET
        elif trial.status == keras_tuner.engine.trial.TrialStatus.COMPLETED:
            status = STATUS_TRAINED
        else:
            status = STATUS_FAILED
        self._counts[status] += 1
        if self._bar is not None:
            self._bar.set_postfix(trained=self._counts[STATUS_TRAINED],
                                  over_budget=self._counts[STATUS_OVER_BUDGET],
                                  failed=self._counts[STATUS_FAILED], refresh=False)
            self._bar.update(1)

    def on_search_end(self):
        super().on_search_end()
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    # ----------------------------------------------------------------- results

    def results(self) -> List[TrialResult]:
        """Every finished or running trial, in creation order."""
        statuses = keras_tuner.engine.trial.TrialStatus
        out = []
        for trial_id, trial in sorted(self.oracle.trials.items()):
            metrics = {}
            for name in trial.metrics.metrics:
                last_only = name in BUDGET_METRICS or trial.status != statuses.COMPLETED
                value = trial.metrics.get_last_value(name) if last_only else trial.metrics.get_best_value(name)
                if value is not None and not (isinstance(value, float) and math.isnan(value)):
                    metrics[name] = float(value)
            if trial.status == statuses.COMPLETED:
                status = STATUS_TRAINED
            elif metrics.get("feasible") == 0.0:
                status = STATUS_OVER_BUDGET
            elif trial.status == statuses.RUNNING:
                status = STATUS_RUNNING
            else:
                status = STATUS_FAILED
            objective = trial.score if status == STATUS_TRAINED else None
            architecture = ""
            if hasattr(self.hypermodel, "spec"):
                architecture = self.hypermodel.spec(trial.hyperparameters.copy()).describe()
            message = (trial.message or "").strip().splitlines()[-1] if trial.message else ""
            if status == STATUS_OVER_BUDGET and not message:
                message = self._over_budget_message(metrics)
            out.append(TrialResult(trial_id=trial_id, status=status, objective=objective, metrics=metrics,
                                   hyperparameters=dict(trial.hyperparameters.values),
                                   architecture=architecture, message=message))
        return out

    def _over_budget_message(self, metrics) -> str:
        # keras-tuner's Trial protobuf has no message, so in distributed mode the
        # worker's "over budget, not trained: ..." does not reach the chief's
        # trial.json; the same text again, from the metrics the chief did get.
        try:
            report = BudgetReport.from_metrics(metrics, self.sram_bytes, self.flash_bytes, self.board)
        except KeyError:
            return "over budget, not trained"
        return f"over budget, not trained: {report.reason}" if report.reason else "over budget, not trained"

    def results_table(self, sort_by_objective: bool = True) -> str:
        """A text table: accuracy, peak SRAM, flash, MACs and overhead of every trial.

        Trained trials come first (best objective first when
        `sort_by_objective`), then those over budget (never trained) and failed ones.
        """
        return format_results_table(self.results(), self.oracle.objective.name, self.sram_bytes,
                                    self.flash_bytes, sort_by_objective, board=self.board)

    def plot_pareto(self, path: str, title: Optional[str] = None) -> str:
        """Writes a PNG of objective vs peak SRAM, the Pareto front and the budget; returns `path`."""
        return plot_pareto(self.results(), path, objective=self.oracle.objective.name,
                           sram_budget_bytes=self.sram_bytes, title=title)

    def best_result(self) -> TrialResult:
        """The trained trial with the best objective.

        Raises:
            RuntimeError: no trial was trained (all over budget or failed).
        """
        trained = [r for r in self.results() if r.status == STATUS_TRAINED]
        if not trained:
            raise RuntimeError("No trial was trained: every trial was over budget or failed; "
                               "see results_table() for their numbers.")
        best_id = self.oracle.get_best_trials(1)[0].trial_id
        return next(r for r in trained if r.trial_id == best_id)


class PatchRandomSearch(BudgetMixin, keras_tuner.RandomSearch):
    """`keras_tuner.RandomSearch` with SRAM/flash budgets checked before training (see `BudgetMixin`)."""


class PatchBayesianOptimization(BudgetMixin, keras_tuner.BayesianOptimization):
    """`keras_tuner.BayesianOptimization` with SRAM/flash budgets checked before training (see `BudgetMixin`)."""


class PatchHyperband(BudgetMixin, keras_tuner.Hyperband):
    """`keras_tuner.Hyperband` with SRAM/flash budgets checked before training (see `BudgetMixin`)."""

