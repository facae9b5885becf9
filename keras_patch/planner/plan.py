"""`PatchPlan`: the patch stages `keras_patch.plan` chose for a whole network, and what they cost.

A plan is a tuple of `PlannedStage`s (where each stage starts and ends in the
unpatched model, its grid, its MACs and patch arena) with the predicted TFLM
arena head of the network with and without the plan. `apply` patches a
`.tflite` with it, `to_json`/`from_json` store it.

Example:

>>> stage = PlannedStage(start="m/block_1_add/Add", end="m/block_3_add/Add", grid=(4, 4),
...                      first_op=10, last_op=17, macs=1_000_000, patched_macs=1_090_000,
...                      patch_arena_bytes=9216)
>>> plan = PatchPlan(stages=(stage,), kernel="portable", max_mac_overhead=1.1, sram_bytes=None,
...                  layer_by_layer_peak_bytes=311040, layer_by_layer_peak_bytes_without_input=248832,
...                  peak_bytes=96768, peak_bytes_without_input=72576, macs=10_000_000,
...                  patched_macs=10_090_000, planner_seconds=0.5, message="")
>>> plan.mac_overhead, plan.is_empty, plan.stage_requests()
(1.009, False, [('m/block_1_add/Add', 'm/block_3_add/Add', (4, 4))])
>>> PatchPlan.from_json(plan.to_json()) == plan
True
>>> stage.start_layer, stage.end_layer
('block_1_add', 'block_3_add')
"""

from __future__ import annotations

import json
from dataclasses import MISSING, asdict, dataclass, fields
from typing import List, Optional, Tuple

from keras_patch.errors import KerasPatchError
from keras_patch.graph.tflite_model import ModelSource, read_model_bytes
from keras_patch.planner.schedule import short_tensor_name

JSON_FORMAT = "keras-patch-plan"
JSON_VERSION = 2
#: Plan versions `from_dict` reads (version 1 had no `arena_passes`: none ran).
READ_VERSIONS = (1, 2)


#: The arena passes a plan may run (`ArenaOptions` switches).
ARENA_PASSES = ("int8_input", "fold_pad", "in_place", "offline_plan")


@dataclass(frozen=True)
class PlannedStage:
    """One patch stage of a `PatchPlan` (indices and names refer to the UNPATCHED model).

    Attributes:
        start: name of the tensor the stage reads (its entry).
        end: name of the tensor it writes (its exit, written by its last op).
        grid: patches as (rows, columns).
        first_op: its first op index.
        last_op: its last op index.
        macs: multiply-accumulates layer by layer.
        patched_macs: multiply-accumulates patch by patch (recomputation included).
        patch_arena_bytes: the kernel's patch-arena scratch buffer.
    """

    start: str
    end: str
    grid: Tuple[int, int]
    first_op: int
    last_op: int
    macs: int
    patched_macs: int
    patch_arena_bytes: int

    @property
    def start_layer(self) -> str:
        """Keras layer name of `start` (`short_tensor_name`); "" for the model input."""
        return short_tensor_name(self.start) if "/" in self.start else ""

    @property
    def end_layer(self) -> str:
        """Keras layer name of `end` (`short_tensor_name`)."""
        return short_tensor_name(self.end)

    @property
    def mac_overhead(self) -> float:
        """`patched_macs / macs` of this stage (1.0 without MACs)."""
        return self.patched_macs / self.macs if self.macs else 1.0

    @property
    def num_ops(self) -> int:
        return self.last_op - self.first_op + 1


@dataclass(frozen=True)
class PatchPlan:
    """The stages chosen for a network and the predicted arena head with them (module docstring).

    `peak_bytes` is the predicted TFLM arena head with the plan applied,
    equal to `profile(plan.apply(model)).patched_peak_bytes`;
    `layer_by_layer_peak_bytes` that of the unpatched model. The empty
    plan (`stages == ()`) means the model is best run layer by layer;
    `message` then says why. `head_at` (`head_at_without_input`) says
    where TFLM's greedy layout reaches `peak_bytes`
    (`peak_bytes_without_input`): the buffers stacked up to the head, from
    offset 0 up, with the ops they are alive at.
    """

    stages: Tuple[PlannedStage, ...]
    kernel: str
    max_mac_overhead: float
    sram_bytes: Optional[int]
    layer_by_layer_peak_bytes: int
    layer_by_layer_peak_bytes_without_input: int
    peak_bytes: int
    peak_bytes_without_input: int
    macs: int
    patched_macs: int
    planner_seconds: float
    message: str = ""
    head_at: str = ""  # where the greedy layout reaches peak_bytes: the buffers stacked up to it
    head_at_without_input: str = ""  # the same for peak_bytes_without_input
    # The arena passes `apply` runs (`ArenaOptions` switches that are on: "int8_input", "fold_pad",
    # "in_place", "offline_plan"); the peak figures are with them.
    arena_passes: Tuple[str, ...] = ()

    def arena_options(self):
        """The `ArenaOptions` of `arena_passes` for this plan's kernel."""
        from keras_patch.graph.passes.pipeline import ArenaOptions

        return ArenaOptions(kernel=self.kernel, **{name: name in self.arena_passes for name in ARENA_PASSES})

    @property
    def mac_overhead(self) -> float:
        """Whole-network `patched_macs / macs` (1.0 for the empty plan)."""
        return self.patched_macs / self.macs if self.macs else 1.0

    @property
    def is_empty(self) -> bool:
        """True when the plan has no stage (the model runs layer by layer)."""
        return not self.stages

    def stage_requests(self) -> List[tuple]:
        """`[(start, end, grid)]`, what `keras_patch.patchify_stages` takes."""
        return [(s.start, s.end, tuple(s.grid)) for s in self.stages]

    def apply(self, tflite: ModelSource) -> bytes:
        """The unpatched `.tflite` (bytes or path) with the plan's stages as KP_PATCH_STAGE ops,
        then the plan's arena passes (`arena_passes`).

        The empty plan without arena passes returns the model's bytes unchanged.
        """
        data = read_model_bytes(tflite)
        if self.is_empty and not self.arena_passes:
            return data
        from keras_patch.graph.passes.pipeline import optimize_arena, prepare_graph, undo_arena_stages
        from keras_patch.graph.patchify import patchify_stages
        from keras_patch.graph.tflite_model import TFLiteModel

        options = self.arena_options()
        model = TFLiteModel.from_bytes(undo_arena_stages(data))
        report = prepare_graph(model, options)  # the graph the stages were planned on
        if self.is_empty:
            optimize_arena(model, options, report)
            return model.to_bytes()
        return patchify_stages(model.to_bytes(), self.stage_requests(), arena=options)

    def table(self) -> str:
        """A plain-text table: one row per stage, then the arena head, MACs and planner time."""
        lines = []
        if self.stages:
            lines.append(f"{'#':>2}  {'ops':>9}  {'start':<24} {'end':<24} {'grid':>5} {'MAC overhead':>12} "
                         f"{'patch arena':>12}")
            for k, s in enumerate(self.stages):
                lines.append(
                    f"{k:>2}  {f'{s.first_op}..{s.last_op}':>9}  {(s.start_layer or '(input)')[:24]:<24} "
                    f"{s.end_layer[:24]:<24} {f'{s.grid[0]}x{s.grid[1]}':>5} {s.mac_overhead:>12.3f} "
                    f"{s.patch_arena_bytes:>10,} B"
                )
            lines.append("")
        lines.append(
            f"arena head (A): {self.layer_by_layer_peak_bytes:,} B layer by layer -> {self.peak_bytes:,} B "
            f"with {len(self.stages)} stage{'s' if len(self.stages) != 1 else ''}"
            + (f" ({self.layer_by_layer_peak_bytes / self.peak_bytes:.2f}x lower)"
               if self.peak_bytes < self.layer_by_layer_peak_bytes else "")
        )
        lines.append(
            f"without the input (A'): {self.layer_by_layer_peak_bytes_without_input:,} B -> "
            f"{self.peak_bytes_without_input:,} B"
        )
        limit = f", SRAM limit {self.sram_bytes:,} B" if self.sram_bytes is not None else ""
        lines.append(
            f"MACs: {self.macs:,} -> {self.patched_macs:,} (overhead {self.mac_overhead:.3f}, "
            f"limit {self.max_mac_overhead:.2f}{limit}); kernel {self.kernel}; "
            f"planned in {self.planner_seconds:.2f} s"
        )
        if self.arena_passes:
            lines.append(f"arena passes (docs/arena.md): {', '.join(self.arena_passes)}")
        if self.head_at:
            lines.append(f"A: {self.head_at}")
        if self.head_at_without_input and self.head_at_without_input != self.head_at:
            lines.append(f"A': {self.head_at_without_input}")
        if self.message:
            lines.append(self.message)
        return "\n".join(lines)

    def to_dict(self) -> dict:
        """The plan as plain Python values (what `to_json` writes)."""
        data = asdict(self)
        data["stages"] = [dict(asdict(s), grid=list(s.grid)) for s in self.stages]
        data["arena_passes"] = list(self.arena_passes)
        return {"format": JSON_FORMAT, "version": JSON_VERSION, **data}

    def to_json(self, indent: Optional[int] = 2) -> str:
        """The plan as JSON text; `PatchPlan.from_json` reads it back."""
        return json.dumps(self.to_dict(), indent=indent)

    @classmethod
    def from_dict(cls, data: dict) -> "PatchPlan":
        """The plan `to_dict` wrote.

        Raises:
            KerasPatchError: not a keras-patch plan, another version, or
                missing/unknown fields (named).
        """
        if not isinstance(data, dict) or data.get("format") != JSON_FORMAT:
            raise KerasPatchError(f"Not a keras-patch plan: expected \"format\": \"{JSON_FORMAT}\".")
        if data.get("version") not in READ_VERSIONS:
            raise KerasPatchError(
                f"Plan version {data.get('version')!r}; this keras-patch reads versions "
                f"{', '.join(map(str, READ_VERSIONS))}.")
        body = {k: v for k, v in data.items() if k not in ("format", "version")}
        _check_fields(cls, body, "plan")
        stages = []
        for k, s in enumerate(body["stages"]):
            if not isinstance(s, dict):
                raise KerasPatchError(f"Plan stage {k} is not an object.")
            _check_fields(PlannedStage, s, f"plan stage {k}")
            stages.append(PlannedStage(**dict(s, grid=tuple(int(g) for g in s["grid"]))))
        passes = body.get("arena_passes", ())
        if not isinstance(passes, (list, tuple)) or any(p not in ARENA_PASSES for p in passes):
            raise KerasPatchError(f"The plan's arena_passes must be a list of {', '.join(ARENA_PASSES)}.")
        return cls(**dict(body, stages=tuple(stages), arena_passes=tuple(passes)))

    @classmethod
    def from_json(cls, text: str) -> "PatchPlan":
        """The plan `to_json` wrote (raises `KerasPatchError` on anything else)."""
        try:
            data = json.loads(text)
        except (TypeError, ValueError) as e:
            raise KerasPatchError(f"The plan is not valid JSON: {e}") from None
        return cls.from_dict(data)


def _check_fields(cls, data: dict, what: str) -> None:
    names = {f.name for f in fields(cls)}
    required = {f.name for f in fields(cls) if f.default is MISSING}
    missing = sorted(n for n in required if n not in data)
    unknown = sorted(set(data) - names)
    if missing or unknown:
        raise KerasPatchError(
            f"The {what} has " + "; ".join(
                p for p in (f"missing fields {missing}" if missing else "",
                            f"unknown fields {unknown}" if unknown else "") if p) + ".")
