"""Choosing a patch schedule (split and grid) for an int8 `.tflite`.

A schedule is where the patch stage ends (`split`, the op index of its last
op) and how its output is tiled (`grid`). `candidate_splits` lists the ops
at which a stage can end: single-entry/single-exit points reached from the
model input through ops KP_PATCH_STAGE supports. `evaluate_schedules`
patches the model for each (split, grid) and profiles it; `best_schedule`
picks the lowest predicted patched arena head (ties: lower MAC overhead).

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
from typing import Callable, Iterable, List, Optional, Sequence

from keras_patch.errors import KerasPatchError, UnsupportedModelError
from keras_patch.graph import rules
from keras_patch.graph.patchify import default_entry_tensor, normalize_grid, patchify
from keras_patch.graph.tflite_model import ModelSource, TFLiteModel, read_model_bytes

logger = logging.getLogger(__name__)

#: TFLite op names a patch stage may contain (docs/patch_stage_op.md, "Stage tensors and layers").
STAGE_OP_NAMES = frozenset(rules.SUPPORTED_STAGE_OPS)


@dataclass(frozen=True)
class ScheduleResult:
    """The predicted memory and compute of one (split, grid) schedule."""

    split: int  # op index of the stage's last op
    split_name: str  # that op's output tensor name
    grid: tuple
    stage_output_shape: tuple  # (h, w, c)
    layer_by_layer_peak_bytes: int
    patched_peak_bytes: int
    patched_peak_bytes_without_input: int
    patched_peak_op: str  # where the patched network's arena head is reached
    rest_peak_bytes: int  # largest live set of an op outside the stage: the floor of any grid
    mac_overhead: float  # whole-network patched MACs / layer-by-layer MACs
    receptive_field: tuple
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
        if run_entry == entry and len(shape) == 4 and min(shape[1], shape[2]) >= min_output_size:
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
    """
    from keras_patch.arena.profiler import profile

    data = read_model_bytes(tflite_bytes)
    model = TFLiteModel.from_bytes(data)
    grids = [normalize_grid(g) for g in grids]
    splits = candidate_splits(data) if splits is None else list(splits)
    work = []
    for split in splits:
        h, w, c = model.tensor(model.op_outputs(split)[0]).shape[1:]
        work.extend((split, (h, w, c), g) for g in grids if g[0] <= h and g[1] <= w)
    results = []
    for split, out_shape, grid in (progress or (lambda x: x))(work):
        try:
            prof = profile(patchify(data, split, grid))
        except UnsupportedModelError as e:
            logger.debug("schedule split=%d grid=%s skipped: %s", split, grid, e)
            continue
        s = prof.summary
        (stage,) = prof.stages
        rest = [r.patched_live_bytes for r in prof.rows if r.stage is None]
        results.append(ScheduleResult(
            split=split,
            split_name=model.tensor(model.op_outputs(split)[0]).name,
            grid=grid,
            stage_output_shape=out_shape,
            layer_by_layer_peak_bytes=s["layer_by_layer_peak_bytes"],
            patched_peak_bytes=s["patched_peak_bytes"],
            patched_peak_bytes_without_input=s["patched_peak_bytes_without_input"],
            patched_peak_op=s["patched_peak_op"],
            rest_peak_bytes=max(rest, default=0),
            mac_overhead=s["mac_overhead"],
            receptive_field=stage.receptive_field,
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
) -> ScheduleResult:
    """The schedule with the lowest patched arena head (ties: lower MAC overhead).

    Raises:
        KerasPatchError: no split x grid can be patched.
    """
    results = evaluate_schedules(tflite_bytes, grids, splits, progress)
    if not results:
        raise KerasPatchError("No split of this model can be run patch by patch with the given grids.")
    return min(results, key=schedule_rank)
