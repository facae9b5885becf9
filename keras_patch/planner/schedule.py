"""Choosing a patch schedule (split and grid) for an int8 `.tflite`.

A schedule is where the patch stage ends (`split`, the op index of its last
op) and how its output is tiled (`grid`). `candidate_splits` lists the ops
at which a stage can end: single-entry/single-exit points reached from the
model input through ops KP_PATCH_STAGE supports. `evaluate_schedules`
patches the model for each (split, grid) and profiles it; `best_schedule`
picks the lowest predicted patched arena head (ties: lower MAC overhead),
costing every candidate in memory with the planner's cost model
(`keras_patch.plan` restricted to one stage from the model input).

Example:

>>> from keras_patch.planner.schedule import best_schedule
>>> best = best_schedule(open("model.tflite", "rb").read(), grids=[(4, 4)])  # doctest: +SKIP
>>> best.split_layer, best.patched_peak_bytes, best.mac_overhead  # doctest: +SKIP
('block_5_add', 94208, 1.18)
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from typing import Callable, Iterable, List, Optional, Sequence, Tuple

from keras_patch.errors import KerasPatchError, UnsupportedModelError
from keras_patch.graph import rules
from keras_patch.graph.patchify import default_entry_tensor, normalize_grid, patchify
from keras_patch.graph.tflite_model import ModelSource, TFLiteModel, read_model_bytes

logger = logging.getLogger(__name__)

#: TFLite op names a patch stage may contain (docs/patch_stage_op.md, "Stage tensors and layers").
STAGE_OP_NAMES = frozenset(rules.SUPPORTED_STAGE_OPS)


@dataclass(frozen=True)
class ScheduleResult:
    """The predicted memory and compute of one (split, grid) schedule.

    The schedule is the model with one patch stage, from the model input to
    op `split`; the figures are those of `keras_patch.profile` of it.
    """

    split: int  # op index of the stage's last op (in the unpatched model)
    split_name: str  # that op's output tensor name
    grid: Tuple[int, int]  # (rows, columns)
    stage_output_shape: Tuple[int, int, int]  # (h, w, c)
    layer_by_layer_peak_bytes: int
    patched_peak_bytes: int
    patched_peak_bytes_without_input: int
    patched_peak_op: str  # where the patched network's arena head is reached
    rest_peak_bytes: int  # largest live set of an op outside the stage: the floor of any grid
    mac_overhead: float  # whole-network patched MACs / layer-by-layer MACs
    receptive_field: Tuple[int, int]  # (h, w) input pixels behind one stage output pixel
    patch_arena_bytes: int

    @property
    def split_layer(self) -> str:
        """The Keras layer name of the split (`short_tensor_name(split_name)`), e.g. 'block_5_add'."""
        return short_tensor_name(self.split_name)


def short_tensor_name(name: str) -> str:
    """The Keras layer name inside a converter tensor name.

    >>> short_tensor_name("mobilenet_v2_0.35_144_1/block_2_add_1/Add")
    'block_2_add'
    >>> short_tensor_name("mobilenetv2_1.0_224_1/block_3_project_BN_1/batchnorm/add_1;...")
    'block_3_project_BN'
    """
    first = name.split(";")[0]
    parts = first.split("/")
    if len(parts) < 2:
        return parts[-1]
    # The converter's name scopes inside a layer ("batchnorm" in
    # "m_1/block_3_project_BN_1/batchnorm/add_1") carry no "_<n>" suffix;
    # Keras 3 layer scopes do.
    inner = [p for p in parts[1:-1] if re.search(r"_\d+$", p)]
    layer = inner[-1] if inner else parts[-2]
    return re.sub(r"_\d+$", "", layer)


def candidate_splits(tflite_bytes: ModelSource, min_output_size: int = 1) -> List[int]:
    """Op indices at which a patch stage starting at the model input can end.

    The runs of `keras_patch.graph.rules.patchable_runs` that start right
    after the model's int8 input (or its QUANTIZE): every op of the run is a
    stage op, every tensor it writes other than the last op's output is read
    only inside it; the output must also be at least `min_output_size`
    pixels high and wide.
    """
    model = TFLiteModel.from_bytes(read_model_bytes(tflite_bytes))
    entry = default_entry_tensor(model)
    producers = model.producers()
    first = 0 if entry not in producers else producers[entry] + 1
    if first >= model.num_ops:
        return []
    splits: List[int] = []
    for _, last, run_entry, out in rules.patchable_runs(model, first_ops=[first]):
        shape = model.tensor(out).shape
        if run_entry == entry and len(shape) == 4 and model.op_type(last) != "MEAN" and min(shape[1], shape[2]) >= min_output_size:
            splits.append(last)
    return splits


def evaluate_schedules(
    tflite_bytes: ModelSource,
    grids: Iterable,
    splits: Optional[Sequence[int]] = None,
    progress: Optional[Callable[[Iterable], Iterable]] = None,
) -> List[ScheduleResult]:
    """Patches and profiles the model for every split x grid that fits.

    Args:
        tflite_bytes: an unpatched int8 `.tflite`.
        grids: grids to try, e.g. `[(2, 2), (4, 4)]` or `["4x4"]`.
        splits: op indices to try; `candidate_splits` by default.
        progress: wraps the list of schedules, e.g. `tqdm.tqdm`.

    Returns:
        One `ScheduleResult` per schedule whose grid fits the stage output.

    Raises:
        UnsupportedModelError: the model already holds KP_PATCH_STAGE ops
            (a schedule is one stage of an unpatched model).
    """
    from keras_patch.arena.profiler import profile

    data = read_model_bytes(tflite_bytes)
    model = TFLiteModel.from_bytes(data)
    failure = rules.model_unpatched(model)
    if failure:
        raise UnsupportedModelError(failure)
    grids = [normalize_grid(g) for g in grids]
    splits = candidate_splits(data) if splits is None else list(splits)
    work = []
    for split in splits:
        h, w, c = (int(d) for d in model.tensor(model.op_outputs(split)[0]).shape[1:])
        work.extend((split, (h, w, c), g) for g in grids if g[0] <= h and g[1] <= w)
    results = []
    for split, out_shape, grid in (progress or (lambda x: x))(work):
        try:
            prof = profile(patchify(data, split, grid, arena=False))  # the one stage alone
        except UnsupportedModelError as e:
            logger.debug("schedule split=%d grid=%s skipped: %s", split, grid, e)
            continue
        (stage,) = prof.stages  # the input has none (checked above): the schedule's own
        rest = [r.patched_live_bytes for r in prof.rows if r.stage is None]
        results.append(ScheduleResult(
            split=split,
            split_name=model.tensor(model.op_outputs(split)[0]).name,
            grid=grid,
            stage_output_shape=out_shape,
            layer_by_layer_peak_bytes=prof.layer_by_layer_peak_bytes,
            patched_peak_bytes=prof.patched_peak_bytes,
            patched_peak_bytes_without_input=prof.patched_peak_bytes_without_input,
            patched_peak_op=prof.patched_peak_op,
            rest_peak_bytes=max(rest, default=0),
            mac_overhead=prof.mac_overhead,
            receptive_field=tuple(stage.receptive_field),
            patch_arena_bytes=stage.patch_arena_bytes,
        ))
    return results


def schedule_rank(result: ScheduleResult) -> tuple:
    """Sort key of schedules, best first: lowest patched arena head, then MAC overhead, then split."""
    return (result.patched_peak_bytes, result.mac_overhead, result.split)


def best_schedule(
    tflite_bytes: ModelSource,
    grids: Iterable,
    splits: Optional[Sequence[int]] = None,
    progress: Optional[Callable[[Iterable], Iterable]] = None,
    max_mac_overhead: Optional[float] = None,
) -> ScheduleResult:
    """The schedule with the lowest patched arena head (ties: lower MAC overhead, then the earlier split).

    The single-stage case of `keras_patch.plan`: one stage from the model
    input. Every split x grid is costed in memory by the planner's cost
    model (`single_stage_heads`: TFLM's greedy layout of the network with
    that stage, no patchify/profile round trip); only the winner is patched
    and profiled for the `ScheduleResult`. Its head may still be above
    layer by layer (this is the one-stage baseline); `keras_patch.plan`
    returns the empty plan instead.

    Args:
        tflite_bytes: an unpatched int8 `.tflite`.
        grids: grids to try, e.g. `[(2, 2), (4, 4)]` or `["4x4"]`.
        splits: op indices to try; `candidate_splits` by default.
        progress: wraps the planner's list of runs, e.g. `tqdm.tqdm`.
        max_mac_overhead: only schedules whose whole-network patched MACs are
            at most this many times the layer-by-layer MACs (None: any).

    Raises:
        KerasPatchError: no split x grid can be patched (within `max_mac_overhead`).
        UnsupportedModelError: the model is already patched (`evaluate_schedules`).
    """
    data = read_model_bytes(tflite_bytes)
    for _, split, grid in single_stage_heads(data, grids, splits, progress, max_mac_overhead):
        results = evaluate_schedules(data, [grid], [split])
        if results:
            return results[0]
    raise KerasPatchError("No split of this model can be run patch by patch with the given grids"
                          + ("." if max_mac_overhead is None else f" within MAC overhead {max_mac_overhead:g}."))


# The planner's MAC cap when a single-stage search has none.
_UNCAPPED = 1e6


def single_stage_heads(
    tflite_bytes: ModelSource,
    grids: Iterable,
    splits: Optional[Sequence[int]] = None,
    progress: Optional[Callable[[Iterable], Iterable]] = None,
    max_mac_overhead: Optional[float] = None,
) -> List[tuple]:
    """Every one-stage schedule from the model input, costed by the planner's cost model, best first.

    Returns:
        `((head, extra MACs, split), split, grid)` tuples sorted by head, then
        extra MACs, then split (`schedule_rank`'s order), for the runs of two
        or more ops ending at `splits` (default `candidate_splits`) that
        start at the model input, with each grid of `grids` that fits (and
        keeps the MAC overhead within `max_mac_overhead`). A model with no
        such run: [].
    """
    from keras_patch.errors import PlanError
    from keras_patch.planner.search import build_problem

    data = read_model_bytes(tflite_bytes)
    model = TFLiteModel.from_bytes(data)
    entry = default_entry_tensor(model)
    allowed = set(candidate_splits(data) if splits is None else splits)
    cap = _UNCAPPED if max_mac_overhead is None else max_mac_overhead
    try:
        problem = build_problem(model, cap, [normalize_grid(g) for g in grids], progress=progress)
    except PlanError as e:
        logger.debug("no single-stage schedule: %s", e)
        return []
    ranked = []
    for c in [c for front in problem.all_grids.values() for c in front]:
        if problem.runs[c.run].entry != entry or c.last_op not in allowed or not problem.prepares(c.run):
            continue
        head, _ = problem.heads((c,))
        ranked.append(((head, c.extra, c.last_op), c.last_op, tuple(c.grid)))
    return sorted(ranked)
