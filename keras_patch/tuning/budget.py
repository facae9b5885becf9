"""What a candidate model costs on the device, measured before any training.

`measure_model` converts a Keras model (untrained is fine: memory and flash do
not depend on the weights' values) to int8 with its `PatchStage`s as
KP_PATCH_STAGE ops, and reads:

* peak SRAM: `keras_patch.profile`'s patched arena head (activations and the
  patch buffers, as TFLM's planner lays them out), the number MCUNetV2 calls
  peak memory;
* flash: the int8 `.tflite` plus the code estimate `keras-patch
  export-arduino` uses (TFLM runtime + one kernel per builtin op + the
  KP_PATCH_STAGE kernel);
* MACs, patched MACs and the recompute overhead;
* never worse: patch stages that raise the arena head above running the
  model layer by layer make the report over budget (a sampled schedule can
  do that; `allow_worse=True` accepts it);
* with `planner=True`: the model (without `PatchStage`s) is measured with
  the stages `keras_patch.plan` chooses for it under `sram_bytes` and
  `max_mac_overhead` (`report.plan`) instead of stages of its own;
* with `board=`: the whole tensor arena the Arduino sketch needs
  (`keras_patch.arduino.arena.estimate_arena`: the head above + the TFLM tail
  measured with the tflite-micro wheel + the stage's persistent data + a
  margin), checked against what the board leaves for it, as
  `keras-patch export-arduino` does.

Example:

>>> from keras_patch.tuning.architecture import ArchSpec, StageSpec, build_model
>>> from keras_patch.tuning.budget import measure_model
>>> spec = ArchSpec(resolution=32, width=0.25, patch_stages=1, grid=(2, 2),
...                 stages=(StageSpec(16, 1, 1, expand=1), StageSpec(24, 1, 2)))
>>> report = measure_model(build_model(spec), sram_bytes=1024)
>>> report.fits, report.peak_sram_bytes > 1024
(False, True)
>>> report.reason.startswith("peak SRAM")
True
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Dict, Optional

import numpy as np

from keras_patch.errors import KerasPatchError

if TYPE_CHECKING:
    from keras_patch.planner.plan import PatchPlan

# The metric names a budget-aware tuner reports for every trial.
BUDGET_METRICS = ("peak_sram_bytes", "arena_bytes", "flash_bytes", "model_bytes", "macs", "patched_macs",
                  "mac_overhead", "feasible", "layer_by_layer_sram_bytes", "patch_stages")


@dataclass
class BudgetReport:
    """A model's device costs and whether they fit the budgets.

    Attributes:
        peak_sram_bytes: patched arena head (`profile(...).patched_peak_bytes`).
        layer_by_layer_sram_bytes: the same without patching.
        model_bytes: size of the int8 `.tflite`.
        flash_bytes: `model_bytes` plus the TFLM code estimate.
        macs: multiply-accumulates, layer by layer.
        patched_macs: the same with patch-by-patch recomputation.
        sram_budget_bytes / flash_budget_bytes: the budgets (None: unlimited).
        arena_bytes: the Arduino sketch's whole tensor arena (measured with `board=` only).
        board: the board key the arena and flash were checked against, if any.
        board_arena_budget_bytes / board_flash_budget_bytes: what that board
            leaves for the arena and for model + code.
        seconds: time the measurement took.
        patch_stages: number of KP_PATCH_STAGE ops in the measured model.
        allow_worse: accept patch stages that raise the head above
            `layer_by_layer_sram_bytes` (otherwise that is a problem).
        plan: with `measure_model(..., planner=True)`, the `PatchPlan` the
            numbers are for (apply it to the trained model's `.tflite`, or
            plan that again: it depends on the architecture only).
    """

    peak_sram_bytes: int
    layer_by_layer_sram_bytes: int
    model_bytes: int
    flash_bytes: int
    macs: int
    patched_macs: int
    sram_budget_bytes: Optional[int] = None
    flash_budget_bytes: Optional[int] = None
    arena_bytes: Optional[int] = None
    board: Optional[str] = None
    board_arena_budget_bytes: Optional[int] = None
    board_flash_budget_bytes: Optional[int] = None
    seconds: float = 0.0
    tflite: bytes = field(default=b"", repr=False)
    patch_stages: int = 0
    allow_worse: bool = False
    plan: Optional[PatchPlan] = field(default=None, repr=False)

    @property
    def mac_overhead(self) -> float:
        """Extra MACs of patch-by-patch inference as a fraction of `macs` (0.04 = 4 %)."""
        return self.patched_macs / self.macs - 1.0 if self.macs else 0.0

    @property
    def problems(self) -> list:
        found = []
        if not self.allow_worse and 0 < self.layer_by_layer_sram_bytes < self.peak_sram_bytes:
            found.append(f"patch stages raise peak SRAM to {self.peak_sram_bytes:,} B, above the "
                         f"{self.layer_by_layer_sram_bytes:,} B layer by layer (let the planner choose them: "
                         "PatchSearchSpace(schedule='planner'))")
        if self.sram_budget_bytes is not None and self.peak_sram_bytes > self.sram_budget_bytes:
            found.append(f"peak SRAM {self.peak_sram_bytes:,} B > budget {self.sram_budget_bytes:,} B")
        if self.flash_budget_bytes is not None and self.flash_bytes > self.flash_budget_bytes:
            found.append(f"flash {self.flash_bytes:,} B (model {self.model_bytes:,} B + code) > budget "
                         f"{self.flash_budget_bytes:,} B")
        if self.board_arena_budget_bytes is not None and self.arena_bytes > self.board_arena_budget_bytes:
            found.append(f"tensor arena {self.arena_bytes:,} B > the {self.board_arena_budget_bytes:,} B "
                         f"the {self.board} leaves for it")
        if self.board_flash_budget_bytes is not None and self.flash_bytes > self.board_flash_budget_bytes:
            found.append(f"flash {self.flash_bytes:,} B > the {self.board_flash_budget_bytes:,} B "
                         f"the {self.board} leaves for model + code")
        return found

    @property
    def fits(self) -> bool:
        return not self.problems

    @property
    def reason(self) -> str:
        """Why the model is over budget ("" when it fits)."""
        return "; ".join(self.problems)

    def metrics(self) -> Dict[str, float]:
        """The `BUDGET_METRICS` as floats, for a keras-tuner trial (`arena_bytes` only when measured)."""
        extra = {} if self.arena_bytes is None else {"arena_bytes": float(self.arena_bytes)}
        return {
            **extra,
            "peak_sram_bytes": float(self.peak_sram_bytes),
            "flash_bytes": float(self.flash_bytes),
            "model_bytes": float(self.model_bytes),
            "macs": float(self.macs),
            "patched_macs": float(self.patched_macs),
            "mac_overhead": float(self.mac_overhead),
            "feasible": float(self.fits),
            "layer_by_layer_sram_bytes": float(self.layer_by_layer_sram_bytes),
            "patch_stages": float(self.patch_stages),
        }

    @classmethod
    def from_metrics(cls, metrics: Dict[str, float], sram_bytes: Optional[int] = None,
                     flash_bytes: Optional[int] = None, board: Optional[str] = None) -> "BudgetReport":
        """Rebuilds a report from `metrics()` (e.g. a keras-tuner trial's) and the budgets.

        Raises:
            KeyError: a metric `metrics()` always holds is missing.
        """
        limits = {}
        if board is not None and "arena_bytes" in metrics:
            limits = _board_limits(board, int(metrics["arena_bytes"]))
        return cls(peak_sram_bytes=int(metrics["peak_sram_bytes"]),
                   layer_by_layer_sram_bytes=int(metrics.get("layer_by_layer_sram_bytes", 0)),
                   patch_stages=int(metrics.get("patch_stages", 0)),
                   model_bytes=int(metrics["model_bytes"]), flash_bytes=int(metrics["flash_bytes"]),
                   macs=int(metrics["macs"]), patched_macs=int(metrics["patched_macs"]),
                   sram_budget_bytes=sram_bytes, flash_budget_bytes=flash_bytes, **limits)

    def to_dict(self) -> dict:
        d = asdict(self)
        d.pop("tflite")
        d["plan"] = None if self.plan is None else json.loads(self.plan.to_json())
        d.update(mac_overhead=self.mac_overhead, fits=self.fits, reason=self.reason)
        return d


def _board_limits(board: str, arena_bytes: int) -> dict:
    """The `BudgetReport` fields of a board check: the arena and what `board` leaves for arena and flash."""
    from keras_patch.arduino.boards import get_board

    spec = get_board(board)
    return dict(arena_bytes=arena_bytes, board=spec.key, board_arena_budget_bytes=spec.arena_budget_bytes,
                board_flash_budget_bytes=spec.model_flash_budget_bytes)


def measure_model(
    model,
    sram_bytes: Optional[int] = None,
    flash_bytes: Optional[int] = None,
    kernel: str = "portable",
    representative_dataset=None,
    board: Optional[str] = None,
    planner: bool = False,
    max_mac_overhead: float = 1.10,
    allow_worse: bool = False,
) -> BudgetReport:
    """Converts `model` to int8 (patched) and measures peak SRAM, flash and MACs.

    Args:
        model: a Keras model, possibly with `PatchStage` layers; untrained is fine.
        sram_bytes: peak-SRAM budget, or None.
        flash_bytes: flash budget (model + code estimate), or None.
        kernel: how the KP_PATCH_STAGE kernel is built ("portable" or "cmsis_nn"),
            see `keras_patch.profile`.
        representative_dataset: calibration data; 2 random samples by default.
        board: a `keras-patch export-arduino` board key (e.g. "nano33ble"):
            also estimate the sketch's whole tensor arena and check it and the
            flash against what the board leaves after its core.
        planner: measure the model with the patch stages `keras_patch.plan`
            chooses (the fewest MACs among plans whose head fits `sram_bytes`,
            or the lowest head when none fits or no budget is given), within
            `max_mac_overhead`; `model` must have no `PatchStage` of its own.
        max_mac_overhead: the planner's whole-network MAC overhead cap
            (patched / layer-by-layer MACs, >= 1).
        allow_worse: do not count stages that raise the head above layer by
            layer as a problem.

    Returns:
        A `BudgetReport`; `report.tflite` holds the converted (patched) model
        and, with `planner=True`, `report.plan` the plan.

    Raises:
        KerasPatchError: `planner=True` on a model with `PatchStage`s, or a
            `max_mac_overhead` below 1.
    """
    from keras_patch.arduino.resolver import resolver_calls
    from keras_patch.arduino.sketch import flash_estimate
    from keras_patch.keras.export import export_tflite, patch_stages
    from keras_patch.arena.profiler import profile

    start = time.perf_counter()
    if planner and patch_stages(model):
        raise KerasPatchError("measure_model(planner=True): the model has PatchStage layers "
                              f"({', '.join(s.name for s in patch_stages(model))}); the planner chooses the stages "
                              "of a model without them.")
    if representative_dataset is None:
        shape = tuple(int(d) for d in model.inputs[0].shape[1:])
        representative_dataset = np.random.default_rng(0).random((2, *shape), dtype=np.float32)
    # The report says when stages are worse; with the planner, its plan runs the arena passes.
    tflite = export_tflite(model, representative_dataset, allow_worse=True, arena=not planner)
    chosen = None
    if planner:
        chosen = planned(tflite, sram_bytes, max_mac_overhead, kernel)
        if chosen is not None:
            tflite = chosen.apply(tflite)
    prof = profile(tflite, kernel=kernel)
    flash = flash_estimate(len(tflite), resolver_calls(tflite))
    board_limits = {}
    if board is not None:
        from keras_patch.arduino.arena import estimate_arena

        board_limits = _board_limits(board, estimate_arena(tflite).total_bytes)
    return BudgetReport(
        peak_sram_bytes=prof.patched_peak_bytes,
        # With the planner, layer by layer means with the plan's arena passes (its own figure).
        layer_by_layer_sram_bytes=(chosen.layer_by_layer_peak_bytes if chosen is not None
                                   else prof.layer_by_layer_peak_bytes),
        model_bytes=len(tflite),
        flash_bytes=flash.total_bytes,
        macs=prof.macs,
        patched_macs=prof.patched_macs,
        sram_budget_bytes=sram_bytes,
        flash_budget_bytes=flash_bytes,
        seconds=time.perf_counter() - start,
        tflite=tflite,
        # the planned (or PatchStage) stages, not the arena passes' one-layer stages
        patch_stages=len(chosen.stages) if chosen is not None else len(patch_stages(model)),
        allow_worse=allow_worse,
        plan=chosen,
        **board_limits,
    )


def planned(tflite: bytes, sram_bytes: Optional[int], max_mac_overhead: float,
            kernel: str = "portable") -> Optional[PatchPlan]:
    """The `PatchPlan` a planner-scheduled trial is measured with, or None.

    The lowest-head plan within `max_mac_overhead`; when that fits
    `sram_bytes`, the plan with the fewest MACs among those that fit. None
    for a model without a run a patch stage can take (it runs layer by layer).
    """
    from keras_patch.errors import PlanError
    from keras_patch.planner.search import plan

    if not max_mac_overhead >= 1.0:
        raise KerasPatchError(f"max_mac_overhead must be 1 or more (patched / layer-by-layer MACs), "
                              f"got {max_mac_overhead!r}.")
    try:
        lowest = plan(tflite, max_mac_overhead=max_mac_overhead, kernel=kernel)
    except PlanError:
        lowest = None  # no patchable run: layer by layer
    if lowest is None or sram_bytes is None or lowest.peak_bytes > sram_bytes:
        return lowest
    return plan(tflite, max_mac_overhead=max_mac_overhead, sram_bytes=sram_bytes, kernel=kernel)
