"""The arena passes in order: what `patchify`, `export_tflite`, `PatchPlan.apply` and the CLI run.

After the patch stages are in place, `optimize_arena` runs, each where its
switch in `ArenaOptions` is on:

1. `int8_input.drop_input_quantize`: a float input read by one QUANTIZE
   becomes an int8 input with the same scale and zero point;
2. `fold_pad.fold_pad`: a PAD before a convolution becomes SAME padding, or
   a one-layer KP_PATCH_STAGE that reads the padding implicitly;
3. `in_place.set_stages_in_place`: patch arenas whose depthwise layers can
   write over their input do;
4. `in_place.make_depthwise_in_place`: a builtin depthwise convolution
   that holds the arena head becomes a one-layer in-place KP_PATCH_STAGE
   (its output at its input's address; needs the offline plan). Those that
   do not hold the head stay builtin (CMSIS-NN runs them faster);
5. `offline_plan.attach_offline_plan`: the model carries TFLM's
   `OfflineMemoryAllocation`, which realises the in-place pairs and beats
   the greedy layout where it can.

Every pass keeps the outputs bit for bit; `ArenaReport` says what each one
changed and the arena head after it.

Example:

>>> from keras_patch.graph.passes.pipeline import ArenaOptions, optimize_arena
>>> from keras_patch.graph.tflite_model import TFLiteModel
>>> model = TFLiteModel.from_bytes("model.tflite")  # doctest: +SKIP
>>> report = optimize_arena(model, ArenaOptions(kernel="cmsis_nn"))  # doctest: +SKIP
>>> print(report.table())  # doctest: +SKIP
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import List, Optional, Union

from keras_patch.graph.tflite_model import TFLiteModel

logger = logging.getLogger(__name__)

KERNELS = ("portable", "cmsis_nn")


@dataclass(frozen=True)
class ArenaOptions:
    """Which arena passes run (all by default).

    Attributes:
        int8_input: drop a leading QUANTIZE (the model then takes int8 input).
        fold_pad: fold PAD ops into the convolutions they feed.
        in_place: in-place depthwise convolutions (in patch arenas and, with
            `offline_plan`, as one-layer stages over their input).
        offline_plan: attach TFLM's offline memory plan where it beats the
            greedy layout.
        kernel: the KP_PATCH_STAGE kernel the plan is made for ("portable" or
            "cmsis_nn"; their scratch buffers differ).
    """

    int8_input: bool = True
    fold_pad: bool = True
    in_place: bool = True
    offline_plan: bool = True
    kernel: str = "portable"

    def __post_init__(self):
        if self.kernel not in KERNELS:
            raise ValueError(f"ArenaOptions: kernel must be one of {KERNELS}, got {self.kernel!r}.")

    @classmethod
    def resolve(cls, arena: Union[bool, "ArenaOptions", None]) -> "ArenaOptions":
        """`True`/None: all passes; `False`: none; an `ArenaOptions` as given."""
        if isinstance(arena, ArenaOptions):
            return arena
        if arena is None or arena is True:
            return cls()
        if arena is False:
            return cls(int8_input=False, fold_pad=False, in_place=False, offline_plan=False)
        raise TypeError(f"arena must be True, False or an ArenaOptions, got {type(arena).__name__}.")

    @property
    def any(self) -> bool:
        return self.int8_input or self.fold_pad or self.in_place or self.offline_plan


@dataclass
class ArenaStep:
    """One pass: what it changed and TFLM's arena head after it."""

    name: str
    changes: List[str]
    head_bytes: int


@dataclass
class ArenaReport:
    """What `optimize_arena` did, pass by pass (`steps[0]` is the model it was given)."""

    steps: List[ArenaStep] = field(default_factory=list)
    lower_bound_bytes: Optional[int] = None

    @property
    def head_bytes(self) -> int:
        return self.steps[-1].head_bytes if self.steps else 0

    def table(self) -> str:
        """One line per pass: the head after it, the bytes it saved and what it changed."""
        lines = [f"{'arena pass':<22} {'head (B)':>10} {'saved (B)':>10}  changes"]
        previous = None
        for step in self.steps:
            saved = "" if previous is None else f"{previous - step.head_bytes:,}"
            what = "; ".join(step.changes[:3]) + (f"; +{len(step.changes) - 3} more" if len(step.changes) > 3 else "")
            lines.append(f"{step.name:<22} {step.head_bytes:>10,} {saved:>10}  {what}")
            previous = step.head_bytes
        if self.lower_bound_bytes is not None:
            lines.append(f"{'live-tensor bound':<22} {self.lower_bound_bytes:>10,}")
        return "\n".join(lines)

    def to_dict(self) -> dict:
        return {"steps": [{"name": s.name, "changes": list(s.changes), "head_bytes": s.head_bytes}
                          for s in self.steps],
                "lower_bound_bytes": self.lower_bound_bytes}


def arena_head(model: TFLiteModel, kernel: str = "portable") -> int:
    """TFLM's arena head for `model` as it is (its offline plan, if it carries one), by the replica."""
    from keras_patch.arena import memory_planner
    from keras_patch.arena.profiler import stage_scratch_bytes

    return memory_planner.arena_head_bytes(model, stage_scratch_bytes(model, kernel))


def prepare_graph(model: TFLiteModel, options: ArenaOptions, report: Optional[ArenaReport] = None) -> ArenaReport:
    """The passes that may run before patch stages are chosen (they keep every op index but the
    removed ones stable by name): int8 input, and PAD folding into SAME padding only."""
    from keras_patch.graph.passes.fold_pad import fold_pad
    from keras_patch.graph.passes.int8_input import drop_input_quantize

    report = report if report is not None else ArenaReport()
    if not report.steps:
        report.steps.append(ArenaStep("as given", [], arena_head(model, options.kernel)))
    if options.int8_input:
        dropped = drop_input_quantize(model)
        if dropped:
            report.steps.append(ArenaStep("int8 input", [
                f"{d.input_name}: int8 (scale {d.scale:.6g}, zero point {d.zero_point})" for d in dropped],
                arena_head(model, options.kernel)))
    if options.fold_pad:
        folded = fold_pad(model, fallback=False)
        if folded:
            report.steps.append(ArenaStep("PAD -> SAME", [_pad_label(f) for f in folded],
                                          arena_head(model, options.kernel)))
    return report


def _pad_label(folded) -> str:
    return f"{folded.pad_op}: {folded.how}, {folded.bytes_saved:,} B"


def optimize_arena(model: TFLiteModel, options: Union[ArenaOptions, bool, None] = None,
                   report: Optional[ArenaReport] = None) -> ArenaReport:
    """Runs the arena passes on `model` (in place) after its patch stages are in place.

    Args:
        model: an int8 model, patched or not. A carried offline plan is
            dropped first (the passes change tensors) and planned again.
        options: `ArenaOptions`, or True/None (all passes) / False (none).
        report: the report of `prepare_graph`, continued.

    Returns:
        An `ArenaReport`: each pass that changed something, with the head after it.
    """
    from keras_patch.arena.offline_metadata import remove_offline_offsets
    from keras_patch.graph.passes.fold_pad import fold_pad
    from keras_patch.graph.passes.in_place import set_stages_in_place
    from keras_patch.graph.passes.offline_plan import attach_offline_plan

    options = ArenaOptions.resolve(options)
    report = report if report is not None else ArenaReport()
    if remove_offline_offsets(model):
        logger.info("dropped the model's offline memory plan: its tensors changed")
    if not options.any:
        return report
    report = prepare_graph(model, options, report)
    kernel = options.kernel
    if options.fold_pad:
        folded = fold_pad(model, fallback=True)
        if folded:
            report.steps.append(ArenaStep("PAD -> stage", [_pad_label(f) for f in folded],
                                          arena_head(model, kernel)))
    if options.in_place:
        changed = set_stages_in_place(model, kernel)
        if changed:
            report.steps.append(ArenaStep("in-place patch arenas", [f"stage op {op}" for op in changed],
                                          arena_head(model, kernel)))
    if options.offline_plan:
        converted = _depthwise_in_place(model, kernel) if options.in_place else []
        plan = attach_offline_plan(model, kernel)
        changes = [f"depthwise op {op} in place" for op in converted]
        if plan is not None:
            changes.append(f"offline plan ({plan.method}), live-tensor bound {plan.lower_bound:,} B")
        report.steps.append(ArenaStep("offline plan", changes, arena_head(model, kernel)))
    from keras_patch.arena.offline_plan import live_lower_bound
    from keras_patch.graph.passes.offline_plan import alias_buffers, plan_buffers, planned_tensors

    buffers = plan_buffers(model, kernel)
    aliases = alias_buffers(model, planned_tensors(model)) if options.offline_plan else None
    report.lower_bound_bytes = live_lower_bound(buffers, aliases)
    return report


def _depthwise_in_place(model: TFLiteModel, kernel: str) -> List[int]:
    """Turns into in-place stages the builtin depthwise ops that hold the arena head.

    All eligible ops are converted on a copy and planned offline; an op
    stays builtin (CMSIS-NN runs it faster) when its live set, run as a
    builtin, stays within that copy's head, and within its live-tensor bound
    without the model input (the A' figures: the input kept outside the
    arena); all are converted if leaving some builtin raises the head.
    """
    from keras_patch.arena import aliases
    from keras_patch.graph.passes.in_place import (make_depthwise_in_place, set_one_layer_stages_in_place,
                                                   stage_in_place_failure)
    from keras_patch.graph.passes.offline_plan import attach_offline_plan
    from keras_patch.graph.patchify import find_stages

    last_readers = aliases._last_readers(model)
    builtin = [op for op in range(model.num_ops) if model.op_type(op) == "DEPTHWISE_CONV_2D"
               and aliases.depthwise_in_place_failure(model, op, last_readers) is None]
    staged = [op for op in find_stages(model) if stage_in_place_failure(model, op, last_readers) is None]
    eligible = sorted(builtin + staged)
    if not eligible:
        return []

    def convert(target: TFLiteModel, ops) -> None:
        make_depthwise_in_place(target, [op for op in ops if op in builtin])
        set_one_layer_stages_in_place(target, [op for op in ops if op in staged])

    def head_with(ops) -> tuple:
        trial = TFLiteModel.from_bytes(model.to_bytes())
        convert(trial, ops)
        attach_offline_plan(trial, kernel)
        return arena_head(trial, kernel), trial

    head_all, trial = head_with(eligible)
    bound_without_input = _live_peak(trial, kernel, with_input=False, with_aliases=True)
    live = _live_per_op(model, kernel, with_input=True)
    live_without_input = _live_per_op(model, kernel, with_input=False)
    needed = [op for op in eligible if live[op] > head_all or live_without_input[op] > bound_without_input]
    if not needed or (len(needed) < len(eligible) and head_with(needed)[0] > head_all):
        needed = eligible if head_all < head_with([])[0] else needed
    if needed:
        convert(model, needed)
    return needed


def _live_per_op(model: TFLiteModel, kernel: str, with_input: bool, with_aliases: bool = False) -> List[int]:
    """Bytes alive (16-aligned) while each op runs; in-place pairs counted once if `with_aliases`."""
    from keras_patch.arena import memory_planner
    from keras_patch.graph.passes.offline_plan import alias_buffers, plan_buffers, planned_tensors

    buffers = plan_buffers(model, kernel)
    tensors = planned_tensors(model)
    skip = {k for k, t in enumerate(tensors) if t in model.inputs} if not with_input else set()
    shared = alias_buffers(model, tensors) if with_aliases else {}
    live = [0] * model.num_ops
    for k, b in enumerate(buffers):
        if k in skip:
            continue
        for op in range(max(b.first_op, 0), min(b.last_op, model.num_ops - 1) + 1):
            live[op] += memory_planner.align_up(b.size)
    for a, b in shared.items():
        if a in skip or b in skip:
            continue
        both = set(range(max(buffers[a].first_op, 0), buffers[a].last_op + 1)) & \
            set(range(max(buffers[b].first_op, 0), buffers[b].last_op + 1))
        for op in both:
            if op < model.num_ops:
                live[op] -= min(memory_planner.align_up(buffers[a].size), memory_planner.align_up(buffers[b].size))
    return live


def _live_peak(model: TFLiteModel, kernel: str, with_input: bool, with_aliases: bool) -> int:
    return max(_live_per_op(model, kernel, with_input, with_aliases), default=0)


def undo_arena_stages(data: bytes) -> bytes:
    """The model without the one-layer KP_PATCH_STAGE ops the arena passes add (in-place depthwise
    ops, folded PADs): they become builtin ops again (`unpatchify`), and the offline plan goes with
    them, so stages can be placed on the network (e.g. in a `.tflite` from `export_tflite`, or a
    model patched before) and the passes run again. Multi-layer stages stay, and so does a stage of
    a MEAN alone (a planned global average pool, never a pass's).
    """
    from keras_patch.graph.patchify import find_stages, stage_options
    from keras_patch.graph.unpatchify import unpatchify

    from keras_patch.stage.options import OP_MEAN

    model = TFLiteModel.from_bytes(data)
    layers = {op: stage_options(model, op).layers for op in find_stages(model)}
    single = [op for op, ops in layers.items() if len(ops) == 1 and ops[0].op != OP_MEAN]
    return unpatchify(data, single) if single else data
