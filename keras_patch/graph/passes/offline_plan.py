"""The offline-plan pass: the model carries TFLM's `OfflineMemoryAllocation` plan, checked.

`attach_offline_plan` plans the arena head of a model with
`keras_patch.arena.offline_plan.plan_offline` (tensors and the scratch
buffers the kernels request, the in-place aliases of
`keras_patch.arena.aliases`) and writes the tensor offsets into the model's
`OfflineMemoryAllocation` metadata when they beat TFLM's greedy plan (or
realise an alias, which only an offline plan can).

`check_offline_plan` refuses a plan TFLM would trust blindly although it is
wrong. TFLM's `AllocationInfoBuilder::GetOfflinePlannedOffsets`
(micro_allocation_info.cc) only checks the offset count: it ignores the
version and subgraph fields, and `CommitPlan` (micro_allocator.cc) points
each tensor at `head + offset` without checking alignment or overlap
(`GreedyMemoryPlanner::DoAnyBuffersOverlap` exists but is never called when
allocating). Every other buffer is then placed online around the offline
ones. So the check refuses: a metadata entry that is not version 1,
subgraph 0, one offset per tensor (or more than one entry); an offset below
-1 or not a multiple of 16 (TFLM's own planner keeps every buffer 16-byte
aligned, `MicroArenaBufferAlignment`; kernels count on it); an offset on a
constant or variable tensor (TFLM would move a variable into the
non-persistent head); two tensors alive at the same op whose bytes overlap,
unless they are an in-place pair (`in_place_aliases`) at the same offset;
and, after replaying TFLM's planner (`memory_planner.plan_greedy`), any
online buffer that overlaps a live one.

Example:

>>> from keras_patch.graph.tflite_model import TFLiteModel  # doctest: +SKIP
>>> model = TFLiteModel.from_bytes("model.tflite")  # doctest: +SKIP
>>> plan = attach_offline_plan(model)  # doctest: +SKIP
>>> check_offline_plan(model) == (plan.head_bytes if plan else None)  # doctest: +SKIP
True
"""

from __future__ import annotations

import struct
from typing import Dict, List, Optional, Sequence

import numpy as np

from keras_patch.arena import memory_planner
from keras_patch.arena.aliases import in_place_aliases
from keras_patch.arena.memory_planner import BUFFER_ALIGNMENT, OFFLINE_MEMORY_ALLOCATION, PlannedBuffer
from keras_patch.arena.offline_metadata import (
    OFFLINE_PLAN_VERSION,
    ONLINE_PLANNED,
    remove_offline_offsets,
    write_offline_offsets,
)
from keras_patch.arena.offline_plan import OfflinePlan, plan_offline
from keras_patch.errors import OfflinePlanError
from keras_patch.graph.tflite_model import TFLiteModel, decode_name


def _stage_scratch(model: TFLiteModel, kernel: str) -> dict:
    from keras_patch.arena.profiler import stage_scratch_bytes

    return stage_scratch_bytes(model, kernel)


def planned_tensors(model: TFLiteModel) -> List[int]:
    """Global indices (all subgraphs in order) of the tensors TFLM plans, in `model_buffers` order.

    As `AllocationInfoBuilder`: no constant data, not a variable, not empty.
    """
    fb = model.model
    result, base = [], 0
    for sg_index, sg in enumerate(fb.subgraphs):
        for t_index, t in enumerate(sg.tensors or []):
            nbytes = memory_planner._tensor_bytes(t, sg_index, t_index)
            if not memory_planner._has_data(fb.buffers or [], t.buffer) and not t.isVariable and nbytes:
                result.append(base + t_index)
        base += len(sg.tensors or [])
    return result


def plan_buffers(model: TFLiteModel, kernel: str = "portable") -> List[PlannedBuffer]:
    """The buffers TFLM plans for `model`: tensors, then builtin and KP_PATCH_STAGE scratch."""
    scratch = memory_planner.merged_scratch_bytes(model, _stage_scratch(model, kernel))
    return memory_planner.model_buffers(model, scratch)


def alias_buffers(model: TFLiteModel, tensors: Sequence[int]) -> Dict[int, int]:
    """`in_place_aliases` (tensor indices of subgraph 0) as buffer indices."""
    position = {t: i for i, t in enumerate(tensors)}
    return {
        position[out]: position[inp]
        for out, inp in in_place_aliases(model).items()
        if out in position and inp in position
    }


def _needs_alias(model: TFLiteModel, tensor: int) -> bool:
    """Whether the op writing `tensor` is an in-place KP_PATCH_STAGE (its kernel writes over its input)."""
    from keras_patch.stage import options as o

    for op in range(model.num_ops):
        if tensor in model.op_outputs(op):
            return model.op_type(op) == o.CUSTOM_CODE
    return False


def attach_offline_plan(model: TFLiteModel, kernel: str = "portable", time_limit_s: float = 2.0) -> Optional[OfflinePlan]:
    """Writes an offline memory plan into `model` when it beats TFLM's greedy plan.

    A plan the model already carries is removed first. The buffers are the
    tensors TFLM plans and the scratch buffers of the built-in kernels and
    of the KP_PATCH_STAGE kernel built as `kernel` ("portable" or
    "cmsis_nn"); in-place aliases (`in_place_aliases`) share an offset.

    Args:
        model: the model, changed in place.
        kernel: how the KP_PATCH_STAGE kernel is built (its scratch sizes).
        time_limit_s: the planner's effort (`plan_offline`).

    Returns:
        The `OfflinePlan` written (its `head_bytes` is the arena head TFLM
        will use), or None when TFLM's greedy plan is as good and no alias
        needs an offline plan (then the model carries none). Where
        aliasing the builtin in-place ops (ADD, MUL, RESHAPE) would give a
        larger head than greedy, they are left out of the plan (in-place
        patch stages always keep theirs).

    Example:

    >>> plan = attach_offline_plan(model)  # doctest: +SKIP
    >>> plan.head_bytes <= memory_planner.arena_head_bytes(model) if plan else True  # doctest: +SKIP
    True
    """
    remove_offline_offsets(model)
    buffers = plan_buffers(model, kernel)
    tensors = planned_tensors(model)
    aliases = alias_buffers(model, tensors)
    plan = plan_offline(buffers, aliases, time_limit_s=time_limit_s, offline_indices=range(len(tensors)))
    greedy = memory_planner.plan_greedy(buffers, placed_copies=False).head_bytes
    if aliases and plan.head_bytes > greedy:
        # Sharing memory cost more than it saved (an aliased pair is one block of the larger size):
        # keep only the aliases a kernel needs (in-place patch stages), the builtin ones are optional.
        required = {a: b for a, b in aliases.items() if _needs_alias(model, tensors[a])}
        plan = plan_offline(buffers, required, time_limit_s=time_limit_s, offline_indices=range(len(tensors)))
    if not plan.beats_greedy:
        return None
    total = sum(len(sg.tensors or []) for sg in model.model.subgraphs)
    offsets = [ONLINE_PLANNED] * total
    for i, t in enumerate(tensors):
        offsets[t] = plan.offsets[i]
    write_offline_offsets(model, offsets)
    return plan


def _tensor_label(model: TFLiteModel, index: int) -> str:
    fb = model.model
    base = 0
    for sg_index, sg in enumerate(fb.subgraphs):
        n = len(sg.tensors or [])
        if index < base + n:
            name = decode_name(sg.tensors[index - base].name)
            where = "" if sg_index == 0 else f" of subgraph {sg_index}"
            return f"tensor {index - base} ('{name}'){where}"
        base += n
    return f"tensor {index}"


def _ops_label(model: TFLiteModel, first: int, last: int) -> str:
    if first < 0 and last < 0:
        return "before the first op runs"
    lo, hi = max(first, 0), max(last, 0)
    labels = [model.op_label(op) for op in range(lo, min(hi, model.num_ops - 1) + 1)]
    if len(labels) > 3:
        labels = labels[:2] + ["...", labels[-1]]
    return f"during {', '.join(labels)}"


def _raw_entries(model: TFLiteModel) -> List[bytes]:
    fb = model.model
    entries = []
    for meta in fb.metadata or []:
        if decode_name(meta.name) == OFFLINE_MEMORY_ALLOCATION:
            buffers = fb.buffers or []
            if meta.buffer is None or not 0 <= meta.buffer < len(buffers):
                raise OfflinePlanError(
                    f"The {OFFLINE_MEMORY_ALLOCATION} metadata names buffer {meta.buffer}, which the model "
                    f"does not have."
                )
            data = buffers[meta.buffer].data
            entries.append(b"" if data is None else bytes(np.asarray(data, np.uint8)))
    return entries


def check_offline_plan(model: TFLiteModel, kernel: str = "portable") -> Optional[int]:
    """Refuses an offline memory plan that does not match the model or lets live buffers overlap.

    The checks are listed in the module docstring.

    Args:
        model: the model (not changed).
        kernel: how the KP_PATCH_STAGE kernel is built (its scratch sizes).

    Returns:
        The arena head TFLM will use under the plan (the replica's replay),
        or None when the model carries no plan.

    Raises:
        OfflinePlanError: the plan is malformed, does not match the model,
            or places two buffers alive at the same time on the same bytes;
            the message names the tensors and ops.

    Example:

    >>> check_offline_plan(model)  # doctest: +SKIP
    83200
    """
    entries = _raw_entries(model)
    if not entries:
        return None
    name = OFFLINE_MEMORY_ALLOCATION
    if len(entries) > 1:
        raise OfflinePlanError(f"The model has {len(entries)} {name} metadata entries; TFLM reads one.")
    raw = entries[0]
    total = sum(len(sg.tensors or []) for sg in model.model.subgraphs)
    if len(raw) < 12 or len(raw) % 4:
        raise OfflinePlanError(
            f"The {name} metadata is {len(raw)} bytes; it must be int32 [version, subgraph, count, offsets...]."
        )
    version, subgraph, count = struct.unpack_from("<3i", raw, 0)
    if version != OFFLINE_PLAN_VERSION:
        raise OfflinePlanError(f"The {name} metadata has version {version}; TFLM reads version {OFFLINE_PLAN_VERSION}.")
    if subgraph != 0:
        raise OfflinePlanError(f"The {name} metadata is for subgraph {subgraph}; it must start at subgraph 0.")
    if count != total or len(raw) != 12 + 4 * count:
        raise OfflinePlanError(
            f"The {name} metadata has {count} offsets ({(len(raw) - 12) // 4} stored); the model has {total} "
            f"tensors: the plan does not match this model."
        )
    offsets = list(struct.unpack_from(f"<{count}i", raw, 12))
    tensors_fb = [t for sg in model.model.subgraphs for t in (sg.tensors or [])]
    for t, (off, tensor) in enumerate(zip(offsets, tensors_fb)):
        if off == ONLINE_PLANNED:
            continue
        label = _tensor_label(model, t)
        if off < 0:
            raise OfflinePlanError(f"Offline plan: {label} has offset {off}; offsets are >= 0 or -1 (online).")
        if off % BUFFER_ALIGNMENT:
            raise OfflinePlanError(
                f"Offline plan: {label} has offset {off}, not a multiple of {BUFFER_ALIGNMENT} (TFLM's arena "
                f"alignment)."
            )
        if memory_planner._has_data(model.model.buffers or [], tensor.buffer):
            raise OfflinePlanError(f"Offline plan: {label} is a constant tensor but has offset {off}.")
        if tensor.isVariable:
            raise OfflinePlanError(
                f"Offline plan: {label} is a variable tensor but has offset {off} (it would lose its state "
                f"in the non-persistent arena)."
            )

    buffers = plan_buffers(model, kernel)
    tensors = planned_tensors(model)
    aliases = alias_buffers(model, tensors)
    pairs = {(a, b) for a, b in aliases.items()} | {(b, a) for a, b in aliases.items()}
    replay = memory_planner.plan_greedy(buffers)
    sizes = [memory_planner.align_up(b.size) for b in buffers]

    def label(i: int) -> str:
        if i < len(tensors):
            return _tensor_label(model, tensors[i])
        return f"scratch buffer '{buffers[i].name}' (online)"

    order = sorted(range(len(buffers)), key=lambda i: replay.offsets[i])
    for k, i in enumerate(order):
        oi, ei = replay.offsets[i], replay.offsets[i] + sizes[i]
        for j in order[k + 1:]:
            oj = replay.offsets[j]
            if oj >= ei:
                break
            if sizes[i] == 0 or sizes[j] == 0:
                continue
            a, b = buffers[i], buffers[j]
            first, last = max(a.first_op, b.first_op), min(a.last_op, b.last_op)
            if first > last:
                continue
            if (i, j) in pairs and oi == oj:
                continue
            what = "an in-place pair at different offsets" if (i, j) in pairs else "alive together"
            raise OfflinePlanError(
                f"Offline plan: {label(i)} at [{oi}, {ei}) and {label(j)} at [{oj}, {oj + sizes[j]}) overlap "
                f"in memory while {what} ({_ops_label(model, first, last)})."
            )
    return replay.head_bytes
