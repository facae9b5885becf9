"""A Python replica of TFLite Micro's tensor-arena memory planning.

TFLM splits its tensor arena into a *head* (non-persistent, planned: every
activation tensor and every kernel scratch buffer, laid out by the
`GreedyMemoryPlanner`) and a *tail* (persistent: interpreter structs, op
data, variable tensors).  This module predicts the head byte for byte:

1. `model_buffers()` lists the buffers TFLM hands to its planner, in the order
   it adds them and with the lifetimes its `AllocationInfoBuilder` marks
   (`micro_allocation_info.cc`): every tensor of every subgraph that has no
   constant data, is not a variable and is not empty, then every scratch
   buffer kernels requested with `RequestScratchBufferInArena`, in request
   order.
2. `plan_greedy()` replays `GreedyMemoryPlanner` (`greedy_memory_planner.cc`):
   sizes rounded up to 16 bytes (`CreatePlan` in `micro_allocator.cc`),
   buffers placed largest first (stable bubble sort over the buffers in
   reverse insertion order, so among equal sizes the last added goes first),
   each into the first gap of the offset-ordered list of buffers alive at the
   same time.
3. `builtin_scratch_bytes()` knows which scratch buffers TFLM's *reference*
   kernels (what the `tflite_micro` wheel is built with) request in Prepare.

After `AllocateTensors()` the head holds exactly the plan (the scratch
request list and the planner's own work arrays are temporary head
allocations released before `ReserveNonPersistentOverlayMemory` sets the
head to `GetMaximumMemorySize()`), so `arena_head_bytes()` equals the
"Arena allocation head" line of `RecordingMicroAllocator::PrintAllocations`.
TFLM does not alias RESHAPE/SQUEEZE outputs onto their inputs in the plan
(the reshape kernel only skips its copy when the pointers already match),
so neither does this module.

Lifetimes use op indices: a buffer with `first_op=i, last_op=j` is alive while
ops `i..j` run; graph inputs start at `-1` ("before the first op") and a
tensor TFLM never sees created keeps its "unset" marker, `-2`.  (With control
flow ops the numbers are TFLM's allocation scopes shifted by one, which count
the ops of called subgraphs too.)

Example:

>>> from keras_patch.arena.memory_planner import PlannedBuffer, plan_greedy
>>> plan = plan_greedy([
...     PlannedBuffer(size=100, first_op=0, last_op=1, name="a"),
...     PlannedBuffer(size=50, first_op=2, last_op=3, name="b"),
...     PlannedBuffer(size=20, first_op=1, last_op=2, name="c"),
... ], alignment=1)
>>> plan.offsets, plan.head_bytes
([0, 0, 100], 120)
>>> from keras_patch.graph.tflite_model import TFLiteModel  # doctest: +SKIP
>>> arena_head_bytes(TFLiteModel.from_bytes("model.tflite"))  # doctest: +SKIP
83200
"""

from __future__ import annotations

import dataclasses
import struct
from dataclasses import dataclass
from typing import Mapping, Optional, Sequence, Tuple, Union

import numpy as np
from ai_edge_litert import schema_py_generated as schema

from keras_patch.errors import UnsupportedModelError
from keras_patch.graph.tflite_model import (
    TFLiteModel,
    decode_name,
    int_list,
    operator_type_name,
)

#: `MicroArenaBufferAlignment()` (micro_arena_constants.h).
BUFFER_ALIGNMENT = 16

#: `AllocationInfoBuilder`'s kUninitializedLifetime, shifted to op indices.
NEVER_SET = -2

#: Name of the metadata entry holding offline-planned offsets.
OFFLINE_MEMORY_ALLOCATION = "OfflineMemoryAllocation"
_ONLINE_PLANNED = -1  # kOnlinePlannedBuffer
#: kCompressionMetadataString (compression.h).
COMPRESSION_METADATA = "COMPRESSION_METADATA"

# TfLiteTypeSizeOf (memory_helpers.cc) for the types ConvertTensorType knows.
_TYPE_SIZES = {
    schema.TensorType.FLOAT16: 2,
    schema.TensorType.BFLOAT16: 2,
    schema.TensorType.FLOAT32: 4,
    schema.TensorType.FLOAT64: 8,
    schema.TensorType.INT16: 2,
    schema.TensorType.INT32: 4,
    schema.TensorType.UINT32: 4,
    schema.TensorType.UINT8: 1,
    schema.TensorType.UINT16: 2,
    schema.TensorType.INT8: 1,
    schema.TensorType.INT64: 8,
    schema.TensorType.UINT64: 8,
    schema.TensorType.BOOL: 1,
    schema.TensorType.RESOURCE: 4,
    schema.TensorType.COMPLEX64: 8,
    schema.TensorType.COMPLEX128: 16,
    schema.TensorType.INT4: 1,  # one byte per element once unpacked
}

_POINTER_BYTES = 8  # sizeof(int8_t*) in the 64-bit wheel (ADD_N)
_CONTROL_FLOW_OPS = {"IF", "WHILE", "CALL_ONCE"}

#: Ops whose reference kernels request scratch in a way not modelled here.
_UNMODELLED_SCRATCH_OPS = {
    "UNIDIRECTIONAL_SEQUENCE_LSTM",
    "TFLite_Detection_PostProcess",
    "SignalRfft",
}

ScratchKey = Union[int, Tuple[int, int]]
ScratchBytes = Mapping[ScratchKey, Sequence[int]]


@dataclass
class PlannedBuffer:
    """One buffer of the arena head.

    Attributes:
        size: bytes requested (before the 16-byte rounding TFLM applies).
        first_op: first op (time step) during which the buffer is alive.
        last_op: last op (time step) during which the buffer is alive.
        name: tensor name, or `scratch:op<i>:<k>` for scratch buffers.
        offline_offset: fixed offset from an `OfflineMemoryAllocation`
            metadata entry, `None` for buffers the planner places.
        offset: the offset chosen by `plan_greedy` (set on `ArenaPlan.buffers`).
    """

    size: int
    first_op: int
    last_op: int
    name: str = ""
    offline_offset: Optional[int] = None
    offset: Optional[int] = None


@dataclass
class ArenaPlan:
    """Result of `plan_greedy`.

    Attributes:
        offsets: offset of each input buffer, in input order.
        head_bytes: `GreedyMemoryPlanner::GetMaximumMemorySize()`: the largest
            `offset + aligned size`, i.e. the arena head.
        buffers: copies of the input buffers with `offset` filled in.
    """

    offsets: list
    head_bytes: int
    buffers: list = dataclasses.field(default_factory=list)


def align_up(size: int, alignment: int = BUFFER_ALIGNMENT) -> int:
    """`AlignSizeUp`: `size` rounded up to a multiple of `alignment`."""
    return (int(size) + alignment - 1) // alignment * alignment


# --------------------------------------------------------------------------
# GreedyMemoryPlanner
# --------------------------------------------------------------------------
def plan_greedy(
    buffers: Sequence[PlannedBuffer], alignment: int = BUFFER_ALIGNMENT, placed_copies: bool = True
) -> ArenaPlan:
    """Lays out `buffers` exactly as TFLM's `GreedyMemoryPlanner` does.

    Sizes are first rounded up to `alignment` (TFLM's `CreatePlan` rounds to
    16 before `AddBuffer`; pass `alignment=1` to replay the bare planner).
    Offline-planned buffers keep their offset and are placed first; the
    others are placed largest first, ties going to the buffer added last,
    each at the lowest offset where it fits between the buffers that are
    alive during an overlapping time range (scanned in offset order).

    Args:
        buffers: the buffers in the order TFLM adds them to the planner.
        alignment: size rounding; offsets are then multiples of it.
        placed_copies: fill `ArenaPlan.buffers` (False leaves it empty: a
            planner asking only for the head saves the copies).

    Returns:
        An `ArenaPlan`.

    Example:

    >>> plan_greedy([PlannedBuffer(10, 0, 1), PlannedBuffer(20, 2, 3)]).offsets
    [0, 0]
    """
    count = len(buffers)
    sizes = [align_up(b.size, alignment) for b in buffers]
    firsts = [int(b.first_op) for b in buffers]
    lasts = [int(b.last_op) for b in buffers]
    offline = [
        _ONLINE_PLANNED if b.offline_offset is None else int(b.offline_offset)
        for b in buffers
    ]
    if count == 0:
        return ArenaPlan(offsets=[], head_bytes=0, buffers=[])

    # Offline buffers from the front in insertion order, online ones from the
    # back in reverse insertion order, then a stable descending sort of the
    # online part (ReverseSortInPlace).
    offsets = [-1] * count
    head_ids = []
    tail_ids = []
    for i in range(count):
        if offline[i] == _ONLINE_PLANNED:
            tail_ids.append(i)
        else:
            head_ids.append(i)
            offsets[i] = offline[i]
    tail_ids.reverse()
    tail_ids.sort(key=lambda i: -sizes[i])  # Python's sort is stable
    order = head_ids + tail_ids

    # Offset-ordered singly linked list: entries[k] = [offset, buffer, next].
    entries = []
    first = order[0]
    if offline[first] == _ONLINE_PLANNED:
        offsets[first] = 0
    entries.append([offsets[first], first, -1])
    first_entry = 0

    def overlaps(entry, first_used, last_used):
        b = entry[1]
        return not (firsts[b] > last_used or first_used > lasts[b])

    def next_active(prior, first_used, last_used):
        k = first_entry if prior is None else entries[prior][2]
        while k != -1:
            if overlaps(entries[k], first_used, last_used):
                return k
            k = entries[k][2]
        return None

    for buffer_id in order[1:]:
        size = sizes[buffer_id]
        if offline[buffer_id] == _ONLINE_PLANNED:
            candidate = 0
            prior = None
            while True:
                nxt = next_active(prior, firsts[buffer_id], lasts[buffer_id])
                if prior is not None:
                    end = entries[prior][0] + sizes[entries[prior][1]]
                    candidate = max(candidate, end)
                if nxt is None:
                    break
                if entries[nxt][0] - candidate >= size:
                    break
                prior = nxt
        else:
            candidate = offline[buffer_id]
        offsets[buffer_id] = candidate

        new_index = len(entries)
        entries.append([candidate, buffer_id, -1])
        if entries[first_entry][0] > candidate:
            entries[new_index][2] = first_entry
            first_entry = new_index
        else:
            current = first_entry
            while True:
                nxt = entries[current][2]
                if nxt == -1:
                    entries[current][2] = new_index
                    break
                if entries[nxt][0] > candidate:
                    entries[new_index][2] = nxt
                    entries[current][2] = new_index
                    break
                current = nxt

    head = max(entry[0] + sizes[entry[1]] for entry in entries)
    placed = [dataclasses.replace(b, offset=o) for b, o in zip(buffers, offsets)] if placed_copies else []
    return ArenaPlan(offsets=offsets, head_bytes=int(head), buffers=placed)


# --------------------------------------------------------------------------
# AllocationInfoBuilder
# --------------------------------------------------------------------------
def model_buffers(
    model: TFLiteModel, scratch_bytes: Optional[ScratchBytes] = None
) -> list:
    """The buffers TFLM plans for `model`, in the order it adds them.

    Replays `AllocationInfoBuilder` (micro_allocation_info.cc): graph inputs
    are created at `-1`; each op creates its outputs and uses its inputs
    (optional inputs `-1` are skipped) at its own index; graph outputs live
    until the last op; a tensor produced but never consumed lives for its
    producer only.  Constant tensors (a buffer with data), variable tensors
    (persistent, in the tail) and zero-byte tensors are not planned.
    Scratch buffers follow all tensors, alive during their op only.

    Args:
        model: the model.
        scratch_bytes: op index -> byte sizes of the scratch buffers that op
            requests, in request order.  Ops of other subgraphs are keyed by
            `(subgraph, op)`.  Use `merged_scratch_bytes()` to add the
            buffers of built-in kernels.

    Returns:
        A list of `PlannedBuffer`.

    Raises:
        UnsupportedModelError: a tensor type TFLM cannot size, or a
            non-empty intermediate tensor (TFLM refuses those).

    Example:

    >>> bufs = model_buffers(model, {3: [64]})  # doctest: +SKIP
    >>> bufs[-1]  # doctest: +SKIP
    PlannedBuffer(size=64, first_op=3, last_op=3, name='scratch:op3:0', ...)
    """
    fb = model.model
    subgraphs = fb.subgraphs
    buffers_fb = fb.buffers or []
    requests = _scratch_requests(model, scratch_bytes or {})
    offline = _offline_offsets(model)

    # AllocationInfo per tensor: [bytes, first, last, needs_allocating, offline, name]
    infos = []
    sg_offsets = []
    offline_index = 0
    for sg_index, sg in enumerate(subgraphs):
        sg_offsets.append(len(infos))
        tensors = sg.tensors or []
        for t_index, t in enumerate(tensors):
            nbytes = _tensor_bytes(t, sg_index, t_index)
            has_data = _has_data(buffers_fb, t.buffer)
            needs = (not has_data) and (not t.isVariable) and nbytes != 0
            off = _ONLINE_PLANNED
            if offline is not None:
                off = offline[offline_index]
                offline_index += 1
                if t.isVariable and off != _ONLINE_PLANNED:
                    needs = True
            infos.append([nbytes, -1, -1, needs, off, decode_name(t.name)])
        for op_index, op in enumerate(sg.operators or []):
            for n in int_list(op.intermediates):
                size = _tensor_bytes(tensors[n], sg_index, n)
                if size != 0:
                    raise UnsupportedModelError(
                        f"Subgraph {sg_index} op {op_index} has a non-empty intermediate "
                        f"tensor {n} ({size} bytes); TFLM does not support that."
                    )
    scratch = [[size, -1, -1, True, _ONLINE_PLANNED, name] for (_, _, size, name) in requests]

    scope = [0]

    def first_created(info, count):
        if info[1] == -1:
            info[1] = count

    def last_used(info, count):
        info[2] = count

    def mark(sg_index):
        sg = subgraphs[sg_index]
        base = sg_offsets[sg_index]
        for t in int_list(sg.inputs):
            first_created(infos[base + t], scope[0])
            last_used(infos[base + t], scope[0])
        for op_index, op in enumerate(sg.operators or []):
            scope[0] += 1
            for t in int_list(op.outputs):
                first_created(infos[base + t], scope[0])
            start = scope[0]
            for called in _called_subgraphs(model, op):
                scope[0] += 1
                mark(called)
            for t in int_list(op.inputs):
                if t >= 0:
                    last_used(infos[base + t], scope[0])
            for t in int_list(op.outputs):
                last_used(infos[base + t], scope[0])
            for k, (r_sg, r_op, _, _) in enumerate(requests):
                if r_sg == sg_index and r_op == op_index:
                    first_created(scratch[k], start)
                    last_used(scratch[k], scope[0])
        for t in int_list(sg.outputs):
            first_created(infos[base + t], scope[0])
            last_used(infos[base + t], scope[0])

    mark(0)

    result = []
    for nbytes, first, last, needs, off, name in infos + scratch:
        if not needs:
            continue
        result.append(
            PlannedBuffer(
                size=int(nbytes),
                first_op=first - 1,
                last_op=last - 1,
                name=name,
                offline_offset=None if off == _ONLINE_PLANNED else int(off),
            )
        )
    return result


def arena_head_bytes(
    model: TFLiteModel, scratch_bytes: Optional[ScratchBytes] = None
) -> int:
    """Predicted TFLM arena head ("Arena allocation head") of `model`.

    Args:
        model: the model.
        scratch_bytes: scratch requests of custom ops (op index -> sizes);
            an entry for a built-in op replaces the built-in estimate.

    Returns:
        The planned head in bytes.

    Raises:
        NotImplementedError: an op requests scratch whose size this module
            cannot determine and `scratch_bytes` has no entry for it.

    Example:

    >>> arena_head_bytes(model)  # doctest: +SKIP
    2720
    """
    merged = merged_scratch_bytes(model, scratch_bytes)
    return plan_greedy(model_buffers(model, merged)).head_bytes


def merged_scratch_bytes(
    model: TFLiteModel, scratch_bytes: Optional[ScratchBytes] = None
) -> dict:
    """Built-in kernels' scratch requests, with `scratch_bytes` entries
    replacing them op by op (keys normalised to `(subgraph, op)`)."""
    custom = {_key(k): [int(s) for s in v] for k, v in (scratch_bytes or {}).items()}
    merged = {
        _key(k): v for k, v in builtin_scratch_bytes(model, skip=set(custom)).items()
    }
    merged.update(custom)
    return merged


# --------------------------------------------------------------------------
# Scratch buffers of the reference kernels
# --------------------------------------------------------------------------
def builtin_scratch_bytes(model: TFLiteModel, skip=()) -> dict:
    """Scratch buffers TFLM's reference kernels request in Prepare.

    The `tflite_micro` wheel is built with the reference kernels
    (tensorflow/lite/micro/kernels/*.cc).  Of the ops in int8 CNNs only these
    request scratch:

    - CONV_2D, DEPTHWISE_CONV_2D, FULLY_CONNECTED: one buffer of the
      filter's element count, only for INT4 filters (unpacking).
    - MEAN, SUM (reduce_common.cc): int8/int16 input: `4 * output elements`
      (accumulator), then `4 * input rank` and `4 * number of axes`; other
      types only the last two.
    - REDUCE_MAX, REDUCE_MIN, REDUCE_ALL: `4 * input rank`, `4 * axes`.
    - MIRROR_PAD: `4 * input rank` twice.
    - ADD_N (float32/int8 output): `8 * number of inputs` (pointers).
    - TRANSPOSE_CONV: int8 `4 * output elements`, int16 `8 * output
      elements` (+ `8 * bias elements` for an int16 bias).
    - SVDF: int8 `4 * batch * filters` and `4 * batch * units`; float
      `4 * batch * filters`.

    ADD, PAD, SOFTMAX, RESHAPE, AVERAGE_POOL_2D, MAX_POOL_2D, QUANTIZE,
    DEQUANTIZE, MUL, CONCATENATION, HARD_SWISH, LOGISTIC and every other
    reference kernel request none.  Custom ops other than
    `TFLite_Detection_PostProcess` are assumed to request none (pass their
    requests to `arena_head_bytes`).

    Args:
        model: the model.
        skip: op indices (or `(subgraph, op)` pairs) not to compute.

    Returns:
        op index -> list of byte sizes in request order, only for ops with
        scratch; ops of subgraphs other than 0 are keyed `(subgraph, op)`.

    Raises:
        NotImplementedError: an op requests scratch whose size is not
            modelled (e.g. UNIDIRECTIONAL_SEQUENCE_LSTM), or the model is
            TFLM-compressed (decompression scratch is not modelled).
    """
    skip = {_key(k) for k in skip}
    fb = model.model
    if any(decode_name(m.name) == COMPRESSION_METADATA for m in fb.metadata or []):
        raise NotImplementedError(
            "The model has TFLM compression metadata; the decompression scratch "
            "buffers of compressed tensors are not modelled."
        )
    result = {}
    for sg_index, sg in enumerate(fb.subgraphs):
        tensors = sg.tensors or []
        for op_index, op in enumerate(sg.operators or []):
            if (sg_index, op_index) in skip:
                continue
            op_type = operator_type_name(fb, op)
            ins = int_list(op.inputs)
            outs = int_list(op.outputs)
            sizes = _op_scratch(op_type, op, tensors, ins, outs)
            if sizes is None:
                raise NotImplementedError(
                    f"Subgraph {sg_index} op {op_index} ({op_type}) requests TFLM scratch "
                    f"buffers whose size keras-patch does not model; pass them as "
                    f"scratch_bytes={{{op_index}: [...]}}."
                )
            if sizes:
                result[op_index if sg_index == 0 else (sg_index, op_index)] = sizes
    return result


def _op_scratch(op_type, op, tensors, ins, outs) -> Optional[list]:
    def tensor(i):
        return tensors[i] if i is not None and 0 <= i < len(tensors) else None

    def shape(t):
        return [int(d) for d in int_list(t.shape)]

    def elements(t):
        return int(np.prod(shape(t), dtype=np.int64))

    def ttype(i):
        t = tensor(i)
        return None if t is None else t.type

    def arg(lst, n):
        return lst[n] if len(lst) > n else None

    i8 = schema.TensorType.INT8
    i16 = schema.TensorType.INT16
    i4 = schema.TensorType.INT4
    f32 = schema.TensorType.FLOAT32

    if op_type in _UNMODELLED_SCRATCH_OPS:
        return None
    if op_type in ("CONV_2D", "DEPTHWISE_CONV_2D", "FULLY_CONNECTED"):
        weights = tensor(arg(ins, 1))
        if weights is not None and weights.type == i4:
            return [elements(weights)]
        return []
    if op_type in ("MEAN", "SUM"):
        inp, axis, out = tensor(arg(ins, 0)), tensor(arg(ins, 1)), tensor(arg(outs, 0))
        sizes = []
        if inp.type in (i8, i16):
            sizes.append(4 * elements(out))
        sizes += [4 * len(shape(inp)), 4 * elements(axis)]
        return sizes
    if op_type in ("REDUCE_MAX", "REDUCE_MIN", "REDUCE_ALL"):
        inp, axis = tensor(arg(ins, 0)), tensor(arg(ins, 1))
        return [4 * len(shape(inp)), 4 * elements(axis)]
    if op_type == "MIRROR_PAD":
        rank = len(shape(tensor(arg(ins, 0))))
        return [4 * rank, 4 * rank]
    if op_type == "ADD_N":
        if ttype(arg(outs, 0)) in (f32, i8):
            return [_POINTER_BYTES * len(ins)]
        return []
    if op_type == "TRANSPOSE_CONV":
        # inputs: output_shape, weights, input, [bias]
        inp, out, bias = ttype(arg(ins, 2)), tensor(arg(outs, 0)), tensor(arg(ins, 3))
        if inp == i8:
            return [4 * elements(out)]
        if inp == i16:
            sizes = [8 * elements(out)]
            if bias is not None and bias.type == i16:
                sizes.append(8 * elements(bias))
            return sizes
        return []
    if op_type == "SVDF":
        inp, w_feature = tensor(arg(ins, 0)), tensor(arg(ins, 1))
        rank = op.builtinOptions.rank if op.builtinOptions is not None else 1
        batch = shape(inp)[0]
        filters = shape(w_feature)[0]
        units = filters // max(int(rank), 1)
        if inp.type == i8:
            return [4 * batch * filters, 4 * batch * units]
        return [4 * batch * filters]
    return []


def _scratch_requests(model: TFLiteModel, scratch_bytes: ScratchBytes) -> list:
    """[(subgraph, op, bytes, name)] in TFLM's request order."""
    by_key = {}
    for key, sizes in scratch_bytes.items():
        sg_index, op_index = _key(key)
        if not 0 <= sg_index < len(model.model.subgraphs) or not 0 <= op_index < len(
            model.model.subgraphs[sg_index].operators or []
        ):
            raise ValueError(f"scratch_bytes key {key!r} is not an op of the model.")
        by_key[(sg_index, op_index)] = [int(s) for s in sizes]
    requests = []
    for sg_index, op_index in sorted(by_key):
        for k, size in enumerate(by_key[(sg_index, op_index)]):
            if size < 0:
                raise ValueError(f"Negative scratch size {size} for op {op_index}.")
            prefix = f"scratch:op{op_index}" if sg_index == 0 else f"scratch:sg{sg_index}:op{op_index}"
            requests.append((sg_index, op_index, size, f"{prefix}:{k}"))
    return requests


# --------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------
def _key(key: ScratchKey) -> Tuple[int, int]:
    if isinstance(key, tuple):
        return int(key[0]), int(key[1])
    return 0, int(key)


def _has_data(buffers, index) -> bool:
    """`GetFlatbufferTensorBuffer() != nullptr`: the buffer has data bytes."""
    if index is None or not 0 <= int(index) < len(buffers):
        return False
    data = buffers[int(index)].data
    return data is not None and len(data) > 0


def _tensor_bytes(tensor, sg_index: int, t_index: int) -> int:
    """`TfLiteEvalTensorByteLength`: element count times type size."""
    size = _TYPE_SIZES.get(tensor.type)
    if size is None:
        name = {v: k for k, v in vars(schema.TensorType).items() if not k.startswith("_")}
        raise UnsupportedModelError(
            f"Tensor {t_index} ('{decode_name(tensor.name)}') of subgraph {sg_index} has type "
            f"{name.get(tensor.type, tensor.type)}, which TFLM cannot allocate."
        )
    elements = 1
    for d in int_list(tensor.shape):
        elements *= d
    return elements * size


def _called_subgraphs(model: TFLiteModel, op: schema.OperatorT) -> list:
    """Subgraphs a control-flow op plans inline (MarkSubgraphLifetimesIfNecessary)."""
    op_type = operator_type_name(model.model, op)
    if op_type not in _CONTROL_FLOW_OPS:
        return []
    opts = op.builtinOptions
    if op_type == "IF":
        return [opts.thenSubgraphIndex, opts.elseSubgraphIndex]
    if op_type == "WHILE":
        return [opts.condSubgraphIndex, opts.bodySubgraphIndex]
    return [opts.initSubgraphIndex]


def _offline_offsets(model: TFLiteModel) -> Optional[list]:
    """Offsets from the 'OfflineMemoryAllocation' metadata, or None."""
    fb = model.model
    result = None
    for meta in fb.metadata or []:
        if decode_name(meta.name) != OFFLINE_MEMORY_ALLOCATION:
            continue
        raw = bytes(np.asarray(fb.buffers[meta.buffer].data, np.uint8))
        count = struct.unpack_from("<I", raw, 8)[0]
        total = sum(len(sg.tensors or []) for sg in fb.subgraphs)
        if count != total:
            raise UnsupportedModelError(
                f"OfflineMemoryAllocation metadata has {count} offsets, the model has "
                f"{total} tensors."
            )
        result = list(struct.unpack_from(f"<{count}i", raw, 12))
    return result
