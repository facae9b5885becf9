"""The inverse of `patchify`: KP_PATCH_STAGE ops back into ordinary builtin ops.

The options of a KP_PATCH_STAGE op describe its layers completely (shapes,
quantization, parameters; the weights are the op's inputs), so the
layer-by-layer model can be rebuilt from a patched one.  keras-patch uses it
to measure what stock TFLM would plan for the same network and to check that
the options lose nothing (`run_tflite(unpatchify(m)) == run_tflite(m)`).

Example:

>>> from keras_patch.graph.unpatchify import unpatchify
>>> plain = unpatchify(open("patched.tflite", "rb").read())  # doctest: +SKIP
"""

from __future__ import annotations

import dataclasses
from typing import Optional, Sequence

import numpy as np
from ai_edge_litert import schema_py_generated as schema

from keras_patch.errors import UnsupportedModelError
from keras_patch.stage import options as o
from keras_patch.graph.patchify import _same_padding, find_stages, stage_options
from keras_patch.graph.tflite_model import ModelSource, TFLiteModel, read_model_bytes

# Builtin op versions TFLite uses for int8 per-channel kernels.
_OP_VERSIONS = {
    o.OP_CONV_2D: 3,
    o.OP_DEPTHWISE_CONV_2D: 3,
    o.OP_ADD: 2,
    o.OP_MAX_POOL_2D: 2,
    o.OP_AVERAGE_POOL_2D: 2,
    o.OP_PAD: 2,
    o.OP_RELU: 2,
    o.OP_RELU6: 2,
    o.OP_MEAN: 2,
}


def _padding_types(in_size: int, out_size: int, kernel: int, stride: int, dilation: int, pad: int) -> set:
    """The builtin padding types that give `out_size` and `pad` along one axis (both, where they coincide)."""
    effective = (kernel - 1) * dilation + 1
    types = set()
    if out_size == -(-in_size // stride) and pad == _same_padding(in_size, out_size, kernel, stride, dilation):
        types.add(schema.Padding.SAME)
    if pad == 0 and out_size == (in_size - effective) // stride + 1:
        types.add(schema.Padding.VALID)
    return types


def _padding_type(in_shape: tuple, out_shape: tuple, layer, where: str) -> int:
    """The one padding type of a builtin op that gives the layer's output size and padding on both axes.

    Where SAME pads nothing along an axis (a 2x2 window, stride 2, on an even
    size) SAME and VALID agree there, and the other axis decides.
    """
    axes = []
    for axis, name in enumerate(("height", "width")):
        types = _padding_types(in_shape[axis], out_shape[axis], layer.kernel[axis], layer.stride[axis],
                               layer.dilation[axis], layer.pad[axis])
        if not types:
            raise UnsupportedModelError(
                f"{where}: {name} padding {layer.pad[axis]} is neither SAME nor VALID; no builtin op expresses it."
            )
        axes.append(types)
    both = axes[0] & axes[1]
    if not both:
        raise UnsupportedModelError(f"{where}: height and width use different padding types.")
    return schema.Padding.VALID if schema.Padding.VALID in both else schema.Padding.SAME


def _builtin_padding(in_shape: tuple, out_shape: tuple, layer) -> bool:
    """True when SAME or VALID gives the layer's output size and padding on both axes."""
    axes = [_padding_types(in_shape[axis], out_shape[axis], layer.kernel[axis], layer.stride[axis],
                           layer.dilation[axis], layer.pad[axis]) for axis in (0, 1)]
    return bool(axes[0] & axes[1])


def _explicit_pad(model: TFLiteModel, opts, l: int, layer, x: int, name: str) -> tuple:
    """(PAD op, padded tensor, the layer with pad 0) for a conv layer with explicit (top, left) pads.

    Bottom/right padding is what the last window needs: `(out - 1) * stride +
    (k - 1) * dilation + 1 - in - top` (at least 0), so a VALID conv on the
    padded tensor has the layer's output size.  TFLite's int8 PAD pads with
    the zero point, which the stage kernel's padding taps read too.
    """
    in_h, in_w, in_c = opts.tensor_shapes[layer.inputs[0]]
    out_h, out_w, _ = opts.tensor_shapes[l + 1]
    after = []
    for i, out, k, s, d, before in ((in_h, out_h, layer.kernel[0], layer.stride[0], layer.dilation[0], layer.pad[0]),
                                    (in_w, out_w, layer.kernel[1], layer.stride[1], layer.dilation[1], layer.pad[1])):
        after.append(max((out - 1) * s + (k - 1) * d + 1 - i - before, 0))
    paddings = np.array([[0, 0], [layer.pad[0], after[0]], [layer.pad[1], after[1]], [0, 0]])
    shape = (in_h + layer.pad[0] + after[0], in_w + layer.pad[1] + after[1], in_c)
    t = layer.inputs[0]
    padded = _int8_tensor(model, f"{name}/pad", shape, opts.tensor_scales[t], opts.tensor_zero_points[t])
    op = schema.OperatorT()
    op.opcodeIndex = model.opcode_index(o.OP_PAD, version=_OP_VERSIONS[o.OP_PAD])
    op.builtinOptionsType = schema.BuiltinOptions.PadOptions
    op.builtinOptions = schema.PadOptionsT()
    op.inputs = np.array([x, _paddings_tensor(model, f"{name}/paddings", paddings)], np.int32)
    op.outputs = np.array([padded], np.int32)
    return op, padded, dataclasses.replace(layer, pad=(0, 0))


def _int8_tensor(model: TFLiteModel, name: str, shape: tuple, scale: float, zero_point: int) -> int:
    tensor = schema.TensorT()
    tensor.shape = np.array([1, *shape], np.int32)
    tensor.type = schema.TensorType.INT8
    tensor.buffer = 0
    tensor.name = name
    tensor.quantization = schema.QuantizationParametersT()
    tensor.quantization.scale = [float(scale)]
    tensor.quantization.zeroPoint = [int(zero_point)]
    model.subgraph.tensors.append(tensor)
    return len(model.subgraph.tensors) - 1


def _paddings_tensor(model: TFLiteModel, name: str, paddings: np.ndarray) -> int:
    """A constant int32 tensor (PAD's paddings, MEAN's axes) holding `paddings`."""
    buffer = schema.BufferT()
    buffer.data = np.frombuffer(paddings.astype("<i4").tobytes(), np.uint8)
    model.model.buffers.append(buffer)
    tensor = schema.TensorT()
    tensor.shape = np.array(paddings.shape, np.int32)
    tensor.type = schema.TensorType.INT32
    tensor.buffer = len(model.model.buffers) - 1
    tensor.name = name
    model.subgraph.tensors.append(tensor)
    return len(model.subgraph.tensors) - 1


def layer_op_counts(opts: o.StageOptions) -> list:
    """How many builtin ops `unpatchify` turns each layer of a stage into.

    1, or 2 for a convolution with explicit pads (a folded PAD,
    `keras_patch.graph.passes.fold_pad`), which becomes PAD + VALID conv.

    Example:

    >>> from keras_patch.graph.patchify import find_stages, stage_options
    >>> from keras_patch.graph.tflite_model import TFLiteModel
    >>> model = TFLiteModel.from_bytes("patched.tflite")  # doctest: +SKIP
    >>> [layer_op_counts(stage_options(model, i)) for i in find_stages(model)]  # doctest: +SKIP
    """
    counts = []
    for l, layer in enumerate(opts.layers):
        in_h, in_w, _ = opts.tensor_shapes[layer.inputs[0]]
        out_h, out_w, _ = opts.tensor_shapes[l + 1]
        explicit = layer.op in (o.OP_CONV_2D, o.OP_DEPTHWISE_CONV_2D) and not _builtin_padding(
            (in_h, in_w), (out_h, out_w), layer)
        counts.append(2 if explicit else 1)
    return counts


def _builtin_ops(model: TFLiteModel, op_index: int) -> list:
    opts = stage_options(model, op_index)
    op_inputs = model.op_inputs(op_index)
    prefix = f"{model.tensor(model.op_outputs(op_index)[0]).name}/kp_layer"
    tensor_ids = [op_inputs[0]]
    for l in range(opts.num_layers - 1):
        shape = opts.tensor_shapes[l + 1]
        tensor_ids.append(_int8_tensor(model, f"{prefix}_{l}", shape, opts.tensor_scales[l + 1],
                                       opts.tensor_zero_points[l + 1]))
    tensor_ids.append(model.op_outputs(op_index)[0])
    operators = []
    for l, layer in enumerate(opts.layers):
        where = f"{model.op_label(op_index)} layer {l} ({layer.op_name})"
        op = schema.OperatorT()
        op.opcodeIndex = model.opcode_index(layer.op, version=_OP_VERSIONS[layer.op])
        in_h, in_w, _ = opts.tensor_shapes[layer.inputs[0]]
        out_h, out_w, out_c = opts.tensor_shapes[l + 1]
        inputs = [tensor_ids[layer.inputs[0]]]
        if layer.op in (o.OP_CONV_2D, o.OP_DEPTHWISE_CONV_2D) and not _builtin_padding(
                (in_h, in_w), (out_h, out_w), layer):
            # Explicit pads (a folded PAD, `keras_patch.graph.passes.fold_pad`): PAD + VALID conv.
            pad_op, padded, layer = _explicit_pad(model, opts, l, layer, inputs[0], f"{prefix}_{l}")
            operators.append(pad_op)
            inputs = [padded]
            in_h, in_w = model.tensor(padded).shape[1:3]
        if layer.op in (o.OP_CONV_2D, o.OP_DEPTHWISE_CONV_2D, o.OP_MAX_POOL_2D, o.OP_AVERAGE_POOL_2D):
            padding = _padding_type((in_h, in_w), (out_h, out_w), layer, where)
        if layer.op == o.OP_CONV_2D:
            options = schema.Conv2DOptionsT()
            op.builtinOptionsType = schema.BuiltinOptions.Conv2DOptions
        elif layer.op == o.OP_DEPTHWISE_CONV_2D:
            options = schema.DepthwiseConv2DOptionsT()
            options.depthMultiplier = out_c // opts.tensor_shapes[layer.inputs[0]][2]
            op.builtinOptionsType = schema.BuiltinOptions.DepthwiseConv2DOptions
        elif layer.op in (o.OP_MAX_POOL_2D, o.OP_AVERAGE_POOL_2D):
            options = schema.Pool2DOptionsT()
            options.filterHeight, options.filterWidth = layer.kernel
            op.builtinOptionsType = schema.BuiltinOptions.Pool2DOptions
        elif layer.op == o.OP_ADD:
            options = schema.AddOptionsT()
            options.fusedActivationFunction = layer.activation
            op.builtinOptionsType = schema.BuiltinOptions.AddOptions
            inputs.append(tensor_ids[layer.inputs[1]])
        elif layer.op == o.OP_PAD:
            options = schema.PadOptionsT()
            op.builtinOptionsType = schema.BuiltinOptions.PadOptions
            paddings = np.array([[0, 0], [layer.pad[0], out_h - in_h - layer.pad[0]],
                                 [layer.pad[1], out_w - in_w - layer.pad[1]], [0, 0]])
            inputs.append(_paddings_tensor(model, f"{prefix}_{l}/paddings", paddings))
        elif layer.op == o.OP_MEAN:  # over height and width; keep_dims where the op's output is 4-D
            options = schema.ReducerOptionsT()
            options.keepDims = len(model.tensor(tensor_ids[l + 1]).shape) == 4
            op.builtinOptionsType = schema.BuiltinOptions.ReducerOptions
            inputs.append(_paddings_tensor(model, f"{prefix}_{l}/axes", np.array([1, 2])))
        else:  # RELU, RELU6 have no options
            options = None
            op.builtinOptionsType = schema.BuiltinOptions.NONE
        if layer.op in (o.OP_CONV_2D, o.OP_DEPTHWISE_CONV_2D, o.OP_MAX_POOL_2D, o.OP_AVERAGE_POOL_2D):
            options.padding = padding
            options.strideH, options.strideW = layer.stride
            options.fusedActivationFunction = layer.activation
        if layer.op in (o.OP_CONV_2D, o.OP_DEPTHWISE_CONV_2D):
            options.dilationHFactor, options.dilationWFactor = layer.dilation
            inputs.append(op_inputs[layer.weights[0]])
            inputs.append(op_inputs[layer.weights[1]] if layer.weights[1] >= 0 else -1)
        op.builtinOptions = options
        op.inputs = np.array(inputs, np.int32)
        op.outputs = np.array([tensor_ids[l + 1]], np.int32)
        operators.append(op)
    return operators


def unpatchify(tflite_bytes: ModelSource, ops: Optional[Sequence[int]] = None) -> bytes:
    """Returns the model with every KP_PATCH_STAGE op (or those of `ops`) expanded into builtin ops.

    An offline memory plan the model carries is dropped with them: it was
    made for the patched tensors (and aliases in-place stages).
    """
    model = TFLiteModel.from_bytes(read_model_bytes(tflite_bytes))
    stages = set(find_stages(model))
    if ops is not None:
        stages &= {int(op) for op in ops}
    if not stages:
        return model.to_bytes()
    from keras_patch.arena.offline_metadata import remove_offline_offsets

    remove_offline_offsets(model)
    expanded = []
    for i, op in enumerate(model.subgraph.operators):
        expanded.extend(_builtin_ops(model, i) if i in stages else [op])
    model.subgraph.operators = expanded
    model.remove_unused()
    return model.to_bytes()
