"""Which tensors may share memory: the in-place rules of the arena, written once.

TinyEngine runs a depthwise convolution over its own input and TFLM's
elementwise kernels read each element before they write it, so the output
of such an op may occupy the memory of an input that dies at that op. This
module says where that holds; the offline memory plan
(`keras_patch.arena.offline_plan`) places an aliased output at its input's
offset, the cost model (`keras_patch.arena.network`) counts the pair once,
and the plan check refuses overlaps that are not listed here.

An op's output may alias one of its inputs when the input is an activation
(not constant, not a graph output) whose last reader is this op, and:

* `ADD`, `MUL` (int8, builtin): both inputs and the output have the same
  shape (elementwise, no broadcasting): TFLM's reference and CMSIS-NN
  kernels read element `i` of both inputs before writing element `i`;
* `RESHAPE`, `SQUEEZE`, `EXPAND_DIMS`: same byte size (TFLM's kernels skip
  the copy when input and output share memory);
* `KP_PATCH_STAGE` with `in_place` set and one DEPTHWISE_CONV_2D layer
  (`docs/patch_stage_op.md`): the kernel saves one channel plane of its
  input at a time and writes that channel of the output over it.

Builtin DEPTHWISE_CONV_2D ops that could run in place are listed by
`depthwise_in_place_failure` (None = eligible); the in-place pass
(`keras_patch.graph.passes.in_place`) turns them into one-layer in-place
KP_PATCH_STAGE ops, whose patch arena is one input plane
(`depthwise_save_bytes`).

Example:

>>> from keras_patch.graph.tflite_model import TFLiteModel  # doctest: +SKIP
>>> in_place_aliases(TFLiteModel.from_bytes("model.tflite"))  # doctest: +SKIP
{57: 55, 81: 79}
"""

from __future__ import annotations

from typing import Dict, Optional

import numpy as np

from keras_patch.graph.tflite_model import TFLiteModel
from keras_patch.stage import options as o

#: Builtin elementwise ops whose TFLM kernels may write over an input of the same shape.
ELEMENTWISE_IN_PLACE_OPS = ("ADD", "MUL")
#: Builtin ops that only reinterpret their input's bytes.
RESHAPE_OPS = ("RESHAPE", "SQUEEZE", "EXPAND_DIMS")


def _last_readers(model: TFLiteModel) -> Dict[int, int]:
    last = {}
    for op in range(model.num_ops):
        for t in model.op_inputs(op):
            if t >= 0:
                last[t] = op
    return last


def _dies_at(model: TFLiteModel, t: int, op: int, last_readers: Dict[int, int]) -> bool:
    return (
        t >= 0
        and not model.is_constant(t)
        and t not in model.outputs
        and last_readers.get(t) == op
    )


def depthwise_save_bytes(in_h: int, in_w: int) -> int:
    """The patch arena of a one-layer in-place depthwise stage: one input channel plane, 4-aligned."""
    return -(-int(in_h) * int(in_w) // 4) * 4


def in_place_stage(options: o.StageOptions) -> bool:
    """Whether a KP_PATCH_STAGE op with these options writes its output over its input."""
    return (
        bool(getattr(options, "in_place", False))
        and options.num_layers == 1
        and options.layers[0].op == o.OP_DEPTHWISE_CONV_2D
    )


def op_alias(model: TFLiteModel, op: int, last_readers: Optional[Dict[int, int]] = None) -> Optional[int]:
    """The input tensor that op `op`'s output may occupy, or None (rules in the module docstring)."""
    if last_readers is None:
        last_readers = _last_readers(model)
    outs = model.op_outputs(op)
    if len(outs) != 1 or outs[0] < 0:
        return None
    out = outs[0]
    op_type = model.op_type(op)
    inputs = [t for t in model.op_inputs(op) if t >= 0]
    out_info = model.tensor(out)
    if op_type in ELEMENTWISE_IN_PLACE_OPS:
        if len(inputs) != 2 or model.tensor_type_name(out) != "INT8":
            return None
        if any(tuple(model.tensor(t).shape) != tuple(out_info.shape)
               or model.tensor_type_name(t) != "INT8" for t in inputs):
            return None
        for t in inputs:
            if _dies_at(model, t, op, last_readers):
                return t
        return None
    if op_type in RESHAPE_OPS:
        t = inputs[0] if inputs else -1
        if _dies_at(model, t, op, last_readers) and model.tensor(t).num_bytes == out_info.num_bytes:
            return t
        return None
    if op_type == o.CUSTOM_CODE:
        from keras_patch.graph.patchify import stage_options

        options = stage_options(model, op)
        t = inputs[0] if inputs else -1
        if in_place_stage(options) and _dies_at(model, t, op, last_readers):
            return t
    return None


def in_place_aliases(model: TFLiteModel) -> Dict[int, int]:
    """Output tensor -> the input tensor it may occupy, for every op that may run in place."""
    last_readers = _last_readers(model)
    aliases = {}
    for op in range(model.num_ops):
        t = op_alias(model, op, last_readers)
        if t is not None:
            aliases[model.op_outputs(op)[0]] = t
    return aliases


def depthwise_in_place_failure(model: TFLiteModel, op: int,
                               last_readers: Optional[Dict[int, int]] = None) -> Optional[str]:
    """None if builtin DEPTHWISE_CONV_2D op `op` can become a one-layer in-place stage, else why not.

    It must be patchable as a stage on its own (`graph.rules`), have depth
    multiplier 1, an input that dies at it, no more output pixels than
    input pixels, and a saved plane smaller than the tensor it saves.
    """
    from keras_patch.graph import rules

    if model.op_type(op) != "DEPTHWISE_CONV_2D":
        return f"{rules.op_label(model, op)} is not a DEPTHWISE_CONV_2D."
    reason = rules.op_rule_failure(model, op)
    if reason:
        return reason
    if last_readers is None:
        last_readers = _last_readers(model)
    t_in = model.op_inputs(op)[0]
    t_out = model.op_outputs(op)[0]
    _, ih, iw, ic = (list(model.tensor(t_in).shape) + [1] * 4)[:4]
    _, oh, ow, oc = (list(model.tensor(t_out).shape) + [1] * 4)[:4]
    label = rules.op_label(model, op)
    if oc != ic:
        return f"{label}: depth multiplier {oc // max(ic, 1)}; in place needs 1."
    if not _dies_at(model, t_in, op, last_readers):
        return f"{label}: its input {rules.layer_label(model, t_in)} is read after it (or is a graph output)."
    if oh * ow > ih * iw:
        return f"{label}: output {oh}x{ow} has more pixels than input {ih}x{iw}."
    if depthwise_save_bytes(ih, iw) >= min(int(np.prod([ih, iw, ic])), int(np.prod([oh, ow, oc]))):
        return f"{label}: saving one {ih}x{iw} plane costs as much as the tensor it saves."
    return None
