"""Reference executor of KP_PATCH_STAGE: the semantics the C++ kernel must match.

`prepare_stage` does what the kernel's Prepare does (validate the options
against the weight tensors, compute requantization multipliers and
activation ranges, plan the patch arena); `run_stage` does what Eval does:
for each output tile, compute every layer on its region only, keeping just
that patch's intermediates, and write the tile into the output (or, for a
stage ending with a MEAN, add the tile of the MEAN's input to the int32 sums
that become the output after the last tile).

Example:

>>> import numpy as np
>>> from keras_patch.stage import options as o
>>> opts = o.StageOptions(grid=(2, 2), tensor_shapes=[(6, 6, 1), (6, 6, 1)],
...     tensor_scales=[0.1, 0.1], tensor_zero_points=[0, 0],
...     layers=[o.LayerOptions(op=o.OP_MAX_POOL_2D, inputs=(0, -1), kernel=(3, 3), pad=(1, 1))])
>>> stage = prepare_stage(opts, [None])
>>> x = np.arange(36, dtype=np.int8).reshape(1, 6, 6, 1)
>>> int(run_stage(stage, x)[0, 0, 0, 0])
7
"""

from __future__ import annotations

import enum
import warnings
from dataclasses import dataclass, field
from typing import List, Optional, Sequence, Union

import numpy as np

from keras_patch.errors import InvalidOptionsError
from keras_patch.stage import geometry, int8_ops
from keras_patch.stage import options as o
from keras_patch.stage import quantization as q


@dataclass(frozen=True)
class ConstantTensor:
    """A constant input of the custom op: data and its per-channel scales."""

    data: np.ndarray
    scales: np.ndarray = field(default_factory=lambda: np.zeros(0, np.float32))


@dataclass
class PreparedLayer:
    options: o.LayerOptions
    window: int8_ops.WindowParams
    filters: Optional[np.ndarray] = None
    bias: Optional[np.ndarray] = None
    multiplier: Optional[np.ndarray] = None
    shift: Optional[np.ndarray] = None
    add_params: Optional[dict] = None


@dataclass
class PreparedStage:
    options: o.StageOptions
    layers: List[PreparedLayer]
    arena: geometry.PatchArenaPlan


def _fail(key: str, message: str):
    raise InvalidOptionsError(f"KP_PATCH_STAGE options: key '{key}': {message}")


def prepare_stage(options: o.StageOptions, op_inputs: Sequence[Optional[ConstantTensor]]) -> PreparedStage:
    """Validates `options` against the op's constant inputs and precomputes requantization.

    `op_inputs[0]` stands for the stage input (ignored); `op_inputs[i]` for
    i >= 1 are the constant filter/bias tensors the options refer to.
    """
    o.validate_options(options, num_op_inputs=len(op_inputs))
    prepared = []
    shapes = options.tensor_shapes
    scales = options.tensor_scales
    zps = options.tensor_zero_points
    for l, layer in enumerate(options.layers):
        a = layer.inputs[0]
        out_t = l + 1
        act = q.activation_range(layer.activation, scales[out_t], zps[out_t])
        if act[0] > act[1]:
            _fail("layer_activation", f"layer {l} ({layer.op_name}) has an empty activation range {act}.")
        window = int8_ops.WindowParams(layer.kernel, layer.stride, layer.dilation, layer.pad, act)
        item = PreparedLayer(options=layer, window=window)
        if layer.op in o.WEIGHTED_OPS:
            in_c = shapes[a][2]
            out_c = shapes[out_t][2]
            kh, kw = layer.kernel
            filt = op_inputs[layer.weights[0]]
            if filt is None or filt.data.dtype != np.int8:
                _fail("layer_weights", f"layer {l} ({layer.op_name}): op input {layer.weights[0]} must be an int8 filter.")
            expected = (out_c, kh, kw, in_c) if layer.op == o.OP_CONV_2D else (1, kh, kw, out_c)
            if tuple(filt.data.shape) != expected:
                _fail("layer_weights", f"layer {l} ({layer.op_name}): filter shape {tuple(filt.data.shape)}, expected {expected}.")
            if len(filt.scales) not in (1, out_c):
                _fail("layer_weights", f"layer {l} ({layer.op_name}): filter has {len(filt.scales)} scales for {out_c} channels.")
            filter_scales = np.broadcast_to(np.asarray(filt.scales, np.float32), (out_c,))
            if not np.all((filter_scales >= 0) & np.isfinite(filter_scales)):
                _fail("layer_weights", f"layer {l} ({layer.op_name}): filter scales must be finite and >= 0.")
            if layer.weights[1] >= 0:
                bias = op_inputs[layer.weights[1]]
                if bias is None or bias.data.dtype != np.int32 or tuple(bias.data.shape) != (out_c,):
                    _fail("layer_weights", f"layer {l} ({layer.op_name}): bias (op input {layer.weights[1]}) must be int32 of shape ({out_c},).")
                bias_data = bias.data.astype(np.int64)
            else:
                bias_data = np.zeros(out_c, np.int64)
            item.filters = filt.data
            item.bias = bias_data
            item.multiplier, item.shift = q.per_channel_multipliers(scales[a], filter_scales, scales[out_t])
            _check_shift(l, layer, item.shift)
        elif layer.op == o.OP_ADD:
            try:
                item.add_params = q.add_params(scales[a], scales[layer.inputs[1]], scales[out_t])
            except ValueError:
                item.add_params = None
            if item.add_params is None or any(
                item.add_params[k] > 0 for k in ("input1_shift", "input2_shift", "output_shift")
            ):
                _fail("tensor_scale", f"layer {l} ({layer.op_name}): the scales give an ADD multiplier outside (0, 1).")
        elif layer.op in (o.OP_RELU, o.OP_RELU6):
            m, s = q.quantize_multiplier(float(np.float32(scales[a])) / float(np.float32(scales[out_t])))
            item.multiplier, item.shift = m, s
            _check_shift(l, layer, [s])
            relu_act = q.ACT_RELU if layer.op == o.OP_RELU else q.ACT_RELU6
            item.window = int8_ops.WindowParams(
                layer.kernel, layer.stride, layer.dilation, layer.pad,
                q.activation_range(relu_act, scales[out_t], zps[out_t]),
            )
        elif layer.op == o.OP_MEAN:
            in_h, in_w, _ = shapes[a]
            item.multiplier, item.shift = q.mean_multiplier(scales[a], scales[out_t], in_h * in_w)
            _check_shift(l, layer, [item.shift])
        elif layer.op in (o.OP_MAX_POOL_2D, o.OP_AVERAGE_POOL_2D, o.OP_PAD):
            if scales[a] != scales[out_t] or zps[a] != zps[out_t]:
                _fail("tensor_scale", f"layer {l} ({layer.op_name}) must keep its input's scale and zero point.")
        prepared.append(item)
    arena = geometry.plan_patch_arena(options)
    if arena.total_bytes > o.MAX_TENSOR_ELEMENTS:
        _fail("tensor_shape", f"the patch arena needs {arena.total_bytes} bytes, more than 2^31 - 1.")
    return PreparedStage(options=options, layers=prepared, arena=arena)


def _check_shift(l: int, layer: o.LayerOptions, shifts) -> None:
    """TFLite's MultiplyByQuantizedMultiplier shifts left by at most 30 bits."""
    if max(int(s) for s in shifts) > 30:
        _fail("tensor_scale", f"layer {l} ({layer.op_name}): requantization multiplier too large (shift > 30).")


def _run_layer(stage: PreparedStage, l: int, values: dict, regions: list) -> np.ndarray:
    layer = stage.layers[l]
    opts = stage.options
    lo = layer.options
    a = lo.inputs[0]
    out_t = l + 1
    in_hw = opts.tensor_shapes[a][:2]
    zps = opts.tensor_zero_points
    out_region = regions[out_t]
    # A PAD output region can lie entirely in the padding: then nothing is read.
    x, x_region = values.get(a, (np.zeros((0, 0, opts.tensor_shapes[a][2]), np.int8), (0, 0, 0, 0)))
    if lo.op == o.OP_CONV_2D:
        return int8_ops.conv2d(x, x_region, in_hw, out_region, layer.window, layer.filters, layer.bias,
                               zps[a], zps[out_t], layer.multiplier, layer.shift)
    if lo.op == o.OP_DEPTHWISE_CONV_2D:
        return int8_ops.depthwise_conv2d(x, x_region, in_hw, out_region, layer.window, layer.filters,
                                         layer.bias, zps[a], zps[out_t], layer.multiplier, layer.shift)
    if lo.op == o.OP_MAX_POOL_2D:
        return int8_ops.max_pool2d(x, x_region, in_hw, out_region, layer.window)
    if lo.op == o.OP_AVERAGE_POOL_2D:
        return int8_ops.average_pool2d(x, x_region, in_hw, out_region, layer.window)
    if lo.op == o.OP_PAD:
        return int8_ops.pad(x, x_region, in_hw, out_region, layer.window, zps[out_t])
    if lo.op == o.OP_ADD:
        b = lo.inputs[1]
        x2, r2 = values[b]
        return int8_ops.add(x, x_region, x2, r2, out_region, layer.add_params,
                            (zps[a], zps[b], zps[out_t]), layer.window.activation)
    if lo.op in (o.OP_RELU, o.OP_RELU6):
        return int8_ops.relu(x, x_region, out_region, zps[a], zps[out_t], layer.multiplier,
                             layer.shift, layer.window.activation)
    raise AssertionError(f"unhandled op {lo.op}")


class ExecutionMode(enum.Enum):
    """How `run_stage` walks a stage's tiled tensor (the output, or a final MEAN's input).

    Every mode gives the same bits; they differ in memory and MACs.
    """

    #: Patch by patch over `options.grid`, each patch computing its whole
    #: receptive field (halos recomputed); what the KP_PATCH_STAGE kernel does.
    RECOMPUTE = "recompute"
    #: The whole tiled tensor as one tile: every layer on its full output, once.
    LAYER_BY_LAYER = "layer_by_layer"


def _execution_mode(mode, patch_by_patch: Optional[bool]) -> ExecutionMode:
    if isinstance(mode, bool):  # run_stage(stage, x, False): the old positional patch_by_patch
        if patch_by_patch is not None:
            raise TypeError("run_stage() got patch_by_patch twice")
        mode, patch_by_patch = None, mode
    if patch_by_patch is not None:
        warnings.warn("run_stage(patch_by_patch=...) is deprecated: pass mode=ExecutionMode.RECOMPUTE "
                      "or ExecutionMode.LAYER_BY_LAYER", DeprecationWarning, stacklevel=3)
        implied = ExecutionMode.RECOMPUTE if patch_by_patch else ExecutionMode.LAYER_BY_LAYER
        if mode is not None and ExecutionMode(mode) != implied:
            raise ValueError(f"run_stage(): mode={ExecutionMode(mode).value!r} contradicts "
                             f"patch_by_patch={patch_by_patch!r}")
        return implied
    return ExecutionMode.RECOMPUTE if mode is None else ExecutionMode(mode)


def run_stage(stage: PreparedStage, inputs: np.ndarray,
              mode: Union[ExecutionMode, str, None] = None, *,
              patch_by_patch: Optional[bool] = None) -> np.ndarray:
    """Runs the stage on int8 `inputs` of shape (N, H, W, C) -> (N, H', W', C').

    Args:
        stage: from `prepare_stage`.
        inputs: int8, (N, H, W, C).
        mode: an `ExecutionMode` (or its value): `RECOMPUTE` (the default,
            also for None) tiles by `options.grid`, `LAYER_BY_LAYER` runs the
            whole tiled tensor as one tile.
        patch_by_patch: deprecated; `True` is `RECOMPUTE`, `False`
            `LAYER_BY_LAYER`.
    """
    mode = _execution_mode(mode, patch_by_patch)
    opts = stage.options
    inputs = np.asarray(inputs)
    expected = tuple(opts.input_shape)
    if inputs.dtype != np.int8 or inputs.ndim != 4 or tuple(inputs.shape[1:]) != expected:
        raise ValueError(
            f"KP_PATCH_STAGE input must be int8 of shape (N, {expected[0]}, {expected[1]}, {expected[2]}), "
            f"got {inputs.dtype} {inputs.shape}."
        )
    out_h, out_w, out_c = opts.output_shape
    outputs = np.empty((inputs.shape[0], out_h, out_w, out_c), np.int8)
    tiled = opts.tiled_tensor
    tiled_h, tiled_w, tiled_c = opts.tiled_shape
    if mode == ExecutionMode.RECOMPUTE:
        tile_list = geometry.tiles(opts)
    elif mode == ExecutionMode.LAYER_BY_LAYER:
        tile_list = [(0, tiled_h, 0, tiled_w)]
    else:  # pragma: no cover - every mode is handled above
        raise AssertionError(f"unhandled execution mode {mode}")
    in_h, in_w, _ = expected
    for n in range(inputs.shape[0]):
        sums = np.zeros(tiled_c, np.int64)  # a final MEAN's accumulators
        for tile in tile_list:
            regions = geometry.patch_regions(opts, tile)
            # Only this patch's intermediates are alive: region arrays keyed by tensor id.
            values = {0: (inputs[n], (0, in_h, 0, in_w))}
            for l in range(tiled):
                region = regions[l + 1]
                if geometry.is_empty(region):
                    continue
                values[l + 1] = (_run_layer(stage, l, values, regions), region)
            y0, y1, x0, x1 = tile
            data, (ry0, _, rx0, _) = values[tiled]
            data = data[y0 - ry0:y1 - ry0, x0 - rx0:x1 - rx0]
            if opts.ends_with_mean:
                sums += data.astype(np.int64).sum(axis=(0, 1))
            else:
                outputs[n, y0:y1, x0:x1] = data
        if opts.ends_with_mean:
            mean = stage.layers[-1]
            outputs[n, 0, 0] = int8_ops.mean(sums, tiled_h * tiled_w, opts.tensor_zero_points[tiled],
                                             opts.tensor_zero_points[-1], mean.multiplier, mean.shift)
    return outputs
