"""Graph pass: no PAD op materializes a padded copy in front of a convolution.

PyTorch exports (and Keras models with explicit `ZeroPadding2D`) put
`PAD -> CONV_2D(VALID)` where TF would write one `CONV_2D(SAME)`.  In TFLM the
PAD output, a padded copy of its input, is a tensor of its own in the arena.
`fold_pad` removes it, like Vela's `replace_pad_by_hw_pad`:

* **SAME**: where the conv with SAME padding on the PAD's input reads
  exactly what the VALID conv reads on the padded tensor (same output size,
  top/left padding equal to TF's SAME split
  `total = max((out - 1) * stride + (k - 1) * dilation + 1 - in, 0)`,
  top = total // 2; rows and columns below/right of the last window are
  never read), the conv becomes SAME and reads the PAD's input.  TFLite's
  int8 PAD pads with the zero point and an int8 convolution skips padding
  taps, which is the same as adding `(zero point - zero point) * w = 0`:
  the bits do not change.
* **stage** (`fallback=True`): otherwise the conv becomes a one-layer
  KP_PATCH_STAGE op (grid 1x1) with explicit `pad=(top, left)`; bottom and
  right padding follow from the output size.  Its layer reads the PAD's
  input in place (tensor 0 of the stage), so its patch arena is empty
  (`keras_patch.stage.geometry.plan_patch_arena`): the portable kernel needs
  no scratch, the CMSIS-NN kernel the conv's own im2col buffer.

A PAD is folded only when every reader of its output is a CONV_2D or
DEPTHWISE_CONV_2D with VALID padding and each of them can be folded; PADV2
only when its constant equals the zero point.

Example:

>>> import numpy as np, keras
>>> from keras_patch.keras.export import convert_int8
>>> from keras_patch.graph.tflite_model import TFLiteModel
>>> net = keras.Sequential([keras.Input((10, 10, 2)), keras.layers.ZeroPadding2D(((1, 1), (1, 1))),
...                         keras.layers.Conv2D(4, 3, strides=2), keras.layers.Conv2D(3, 1)])
>>> model = TFLiteModel.from_bytes(convert_int8(net, np.random.default_rng(0).random((4, 10, 10, 2), np.float32)))
>>> [model.op_type(i) for i in range(model.num_ops)]  # PyTorch-style padding: not SAME, the converter keeps it
['PAD', 'CONV_2D', 'CONV_2D']
>>> [(f.paddings, f.how, f.bytes_saved, f.stage_scratch_bytes) for f in fold_pad(model)]
[(((1, 1), (1, 1)), 'stage', 288, 0)]
>>> [model.op_type(i) for i in range(model.num_ops)]
['KP_PATCH_STAGE', 'CONV_2D']
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import List, Optional, Tuple

import numpy as np
from ai_edge_litert import schema_py_generated as schema

from keras_patch.errors import InvalidOptionsError, UnsupportedModelError
from keras_patch.graph.patchify import (
    StagePlan,
    _same_padding,
    build_stage_options,
    rewrite_stages,
)
from keras_patch.graph.tflite_model import TFLiteModel
from keras_patch.stage import geometry
from keras_patch.stage.executor import ConstantTensor, prepare_stage

__all__ = ["FoldedPad", "fold_pad", "pad_fold_failure"]

_CONVS = ("CONV_2D", "DEPTHWISE_CONV_2D")


@dataclass(frozen=True)
class FoldedPad:
    """One PAD op that no longer runs."""

    pad_op: str  # label of the PAD op in the model before the pass
    paddings: Tuple[Tuple[int, int], Tuple[int, int]]  # ((top, bottom), (left, right))
    how: str  # "same": its convs became SAME; "stage": a one-layer KP_PATCH_STAGE with explicit pads
    convs: Tuple[str, ...]  # labels of the convolutions that read it
    bytes_saved: int  # the padded tensor's bytes, no longer in the arena
    stage_scratch_bytes: int  # scratch of the new stage op(s) (portable kernel); 0 for "same"


def _paddings(model: TFLiteModel, pad_op: int) -> Optional[np.ndarray]:
    inputs = model.op_inputs(pad_op)
    if len(inputs) < 2 or inputs[1] < 0 or not model.is_constant(inputs[1]):
        return None
    paddings = model.constant(inputs[1])
    if paddings.shape != (4, 2):
        return None
    return paddings.astype(np.int64)


def pad_fold_failure(model: TFLiteModel, pad_op: int) -> Optional[str]:
    """Why the PAD/PADV2 op at `pad_op` cannot be folded at all (None: its convs decide).

    Checks the PAD itself: int8, same scale and zero point in and out,
    constant non-negative paddings on height and width only, a PADV2 constant
    equal to the zero point, an output that is no graph output and that only
    VALID CONV_2D / DEPTHWISE_CONV_2D ops read (as their input 0).
    """
    label = model.op_label(pad_op)
    if model.op_type(pad_op) not in ("PAD", "PADV2"):
        return f"{label} is not a PAD."
    x, y = model.op_inputs(pad_op)[0], model.op_outputs(pad_op)[0]
    xi, yi = model.tensor(x), model.tensor(y)
    if xi.dtype != np.int8 or yi.dtype != np.int8 or len(xi.shape) != 4:
        return f"{label}: only 4-D int8 activations are folded."
    if xi.scale.size != 1 or yi.scale.size != 1 or xi.zero_point.size != 1 or yi.zero_point.size != 1 \
            or np.float32(xi.scale[0]) != np.float32(yi.scale[0]) or xi.zero_point[0] != yi.zero_point[0]:
        return f"{label}: input and output quantization differ."
    paddings = _paddings(model, pad_op)
    if paddings is None:
        return f"{label}: paddings must be a constant 4x2 tensor."
    if paddings[0].any() or paddings[3].any() or (paddings < 0).any():
        return f"{label}: only non-negative height/width padding is folded, got {paddings.tolist()}."
    if model.op_type(pad_op) == "PADV2":
        inputs = model.op_inputs(pad_op)
        if len(inputs) > 2 and inputs[2] >= 0:
            if not model.is_constant(inputs[2]):
                return f"{label}: its pad value is not a constant."
            value = model.constant(inputs[2]).reshape(-1)
            if value.size != 1 or int(value[0]) != int(yi.zero_point[0]):
                return f"{label}: pads with {value.tolist()}, not the zero point {int(yi.zero_point[0])}."
    if y in model.outputs:
        return f"{label}: its output is a graph output."
    readers = model.consumers().get(y, [])
    if not readers:
        return f"{label}: nothing reads its output."
    for op in readers:
        if model.op_type(op) not in _CONVS:
            return f"{label}: {model.op_label(op)} reads it; only CONV_2D / DEPTHWISE_CONV_2D readers are folded."
        if model.op_inputs(op)[0] != y or y in model.op_inputs(op)[1:]:
            return f"{label}: {model.op_label(op)} reads it as a weight."
        if model.operator(op).builtinOptions.padding != schema.Padding.VALID:
            return f"{label}: {model.op_label(op)} has SAME padding."
    return None


def _conv_geometry(model: TFLiteModel, conv: int, in_hw: tuple) -> list:
    """Per axis (in, out, kernel, stride, dilation) of `conv` on an input of `in_hw`."""
    opts = model.operator(conv).builtinOptions
    filt = model.tensor(model.op_inputs(conv)[1]).shape
    out = model.tensor(model.op_outputs(conv)[0]).shape
    return [(in_hw[0], out[1], filt[1], int(opts.strideH), int(opts.dilationHFactor)),
            (in_hw[1], out[2], filt[2], int(opts.strideW), int(opts.dilationWFactor))]


def _is_same(axes: list, before: tuple) -> bool:
    """SAME on the unpadded input reads what VALID reads on the padded one, on both axes."""
    for (i, o, k, s, d), top in zip(axes, before):
        if o != -(-i // s) or top != _same_padding(i, o, k, s, d):
            return False
    return True


def _stage_fits(axes: list, before: tuple) -> bool:
    """The stage kernel's rule: every output reads at least one input pixel (`validate_options`)."""
    for (i, o, k, s, d), p in zip(axes, before):
        if p > (k - 1) * d or (o - 1) * s - p > i - 1:
            return False
    return True


def _stage_plan(model: TFLiteModel, conv: int, entry: int, before: tuple) -> StagePlan:
    """The one-layer, 1x1-grid KP_PATCH_STAGE of `conv` (already reading `entry`) with pad `before`."""
    exit_tensor = model.op_outputs(conv)[0]
    options, op_inputs = build_stage_options(model, [conv], entry, exit_tensor, (1, 1))
    layers = [dataclasses.replace(options.layers[0], pad=tuple(int(p) for p in before))]
    options = dataclasses.replace(options, layers=layers)
    constants = [None] + [ConstantTensor(model.constant(t), model.tensor(t).scale) for t in op_inputs[1:]]
    prepare_stage(options, constants)
    return StagePlan([conv], entry, exit_tensor, options, op_inputs)


def fold_pad(model: TFLiteModel, fallback: bool = True) -> List[FoldedPad]:
    """Folds every foldable PAD in front of a convolution (in place); see the module docstring.

    Args:
        model: the int8 model, rewritten in place.
        fallback: fold PADs that are not SAME padding into one-layer
            KP_PATCH_STAGE ops; False leaves them.

    Returns:
        One `FoldedPad` per PAD removed, in model order.
    """
    plans: List[StagePlan] = []
    folded: List[FoldedPad] = []
    removed = []
    for pad_op in range(model.num_ops):
        if model.op_type(pad_op) not in ("PAD", "PADV2") or pad_fold_failure(model, pad_op) is not None:
            continue
        x, y = model.op_inputs(pad_op)[0], model.op_outputs(pad_op)[0]
        paddings = _paddings(model, pad_op)
        before = (int(paddings[1, 0]), int(paddings[2, 0]))
        in_hw = model.tensor(x).shape[1:3]
        readers = model.consumers()[y]
        kinds = {}
        for conv in readers:
            axes = _conv_geometry(model, conv, in_hw)
            if _is_same(axes, before):
                kinds[conv] = "same"
            elif fallback and _stage_fits(axes, before) and model.op_outputs(conv)[0] not in model.outputs:
                kinds[conv] = "stage"
            else:
                break
        if len(kinds) != len(readers):
            continue
        new_plans = []
        try:
            for conv in readers:
                if kinds[conv] == "stage":
                    operator = model.operator(conv)
                    saved = operator.inputs.copy()
                    operator.inputs[0] = x
                    try:
                        new_plans.append(_stage_plan(model, conv, x, before))
                    finally:
                        operator.inputs = saved
        except (UnsupportedModelError, InvalidOptionsError):
            continue
        labels = tuple(model.op_label(c) for c in readers)
        for conv in readers:
            operator = model.operator(conv)
            operator.inputs = np.array(operator.inputs, np.int32)
            operator.inputs[0] = x
            if kinds[conv] == "same":
                operator.builtinOptions.padding = schema.Padding.SAME
        plans.extend(new_plans)
        removed.append(model.operator(pad_op))
        scratch = sum(b.bytes for p in new_plans for b in geometry.stage_buffers(p.options))
        folded.append(FoldedPad(
            pad_op=model.op_label(pad_op),
            paddings=((int(paddings[1, 0]), int(paddings[1, 1])), (int(paddings[2, 0]), int(paddings[2, 1]))),
            how="stage" if new_plans else "same",
            convs=labels,
            bytes_saved=model.tensor(y).num_bytes,
            stage_scratch_bytes=scratch,
        ))
    if not folded:
        return folded
    if plans:
        rewrite_stages(model, plans)
    model.subgraph.operators = [op for op in model.subgraph.operators if not any(op is r for r in removed)]
    model.remove_unused()
    return folded
