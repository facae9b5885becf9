"""Int8 operators of a patch stage, computed on a region of their output.

Each function computes the output pixels `out_region` of one layer from an
array `x` that holds the input pixels `x_region` of the layer's *full* input
feature map (height/width `in_hw`).  Taps that fall outside the full feature
map are padding, exactly as in TFLite's reference kernels; taps inside it
must lie inside `x_region` (the geometry guarantees it, and it is checked).
With `x_region` = the whole input and `out_region` = the whole output, these
are ordinary layer-by-layer kernels.

The arithmetic is TFLite's `reference_integer_ops` (per-channel conv and
depthwise conv, int8 add, pooling, pad) as written in
`docs/patch_stage_op.md`.

Example:

>>> import numpy as np
>>> x = np.zeros((4, 4, 1), np.int8)
>>> window_view(x, (0, 4, 0, 4), (4, 4), (0, 2, 0, 2), (3, 3), (2, 2), (1, 1), (1, 1), 0).shape
(2, 2, 3, 3, 1)
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from keras_patch.stage import quantization as q

Region = tuple  # (y0, y1, x0, x1), half-open, in full-feature-map coordinates


def region_shape(region: Region) -> tuple:
    y0, y1, x0, x1 = region
    return max(0, y1 - y0), max(0, x1 - x0)


def window_view(
    x: np.ndarray,
    x_region: Region,
    in_hw: tuple,
    out_region: Region,
    kernel: tuple,
    stride: tuple,
    dilation: tuple,
    pad: tuple,
    fill: int,
) -> np.ndarray:
    """Input windows (oh, ow, kh, kw, C) of the output pixels in `out_region`.

    Taps outside the full input (`in_hw`) read `fill`; taps inside it must be
    covered by `x_region`.
    """
    oy0, oy1, ox0, ox1 = out_region
    oh, ow = oy1 - oy0, ox1 - ox0
    (kh, kw), (sh, sw), (dh, dw), (pt, pl) = kernel, stride, dilation, pad
    # Rows/cols of the full input touched by the windows (before clipping).
    ny0 = oy0 * sh - pt
    ny1 = (oy1 - 1) * sh - pt + (kh - 1) * dh + 1
    nx0 = ox0 * sw - pl
    nx1 = (ox1 - 1) * sw - pl + (kw - 1) * dw + 1
    channels = x.shape[-1]
    buf = np.full((ny1 - ny0, nx1 - nx0, channels), fill, dtype=np.int32)
    # In-bounds part of the touched span, which x must cover.
    cy0, cy1 = max(ny0, 0), min(ny1, in_hw[0])
    cx0, cx1 = max(nx0, 0), min(nx1, in_hw[1])
    if cy0 < cy1 and cx0 < cx1:
        ry0, ry1, rx0, rx1 = x_region
        if not (ry0 <= cy0 and cy1 <= ry1 and rx0 <= cx0 and cx1 <= rx1):
            raise AssertionError(
                f"input region {x_region} does not cover the taps {(cy0, cy1, cx0, cx1)}"
            )
        buf[cy0 - ny0 : cy1 - ny0, cx0 - nx0 : cx1 - nx0] = x[
            cy0 - ry0 : cy1 - ry0, cx0 - rx0 : cx1 - rx0
        ]
    s0, s1, s2 = buf.strides
    return np.lib.stride_tricks.as_strided(
        buf,
        shape=(oh, ow, kh, kw, channels),
        strides=(s0 * sh, s1 * sw, s0 * dh, s1 * dw, s2),
        writeable=False,
    )


def in_bounds_counts(in_hw: tuple, out_region: Region, kernel: tuple, stride: tuple, pad: tuple) -> np.ndarray:
    """Number of in-bounds taps of each output pixel (average pooling's divisor)."""
    oy0, oy1, ox0, ox1 = out_region

    def counts(o0, o1, k, s, p, size):
        start = np.arange(o0, o1) * s - p
        return np.minimum(start + k, size) - np.maximum(start, 0)

    rows = counts(oy0, oy1, kernel[0], stride[0], pad[0], in_hw[0])
    cols = counts(ox0, ox1, kernel[1], stride[1], pad[1], in_hw[1])
    return rows[:, None] * cols[None, :]


@dataclass(frozen=True)
class WindowParams:
    kernel: tuple
    stride: tuple
    dilation: tuple
    pad: tuple  # (top, left)
    activation: tuple  # (act_min, act_max) int8 clamp


def _requantize(acc: np.ndarray, multiplier, shift, zero_point: int, act: tuple) -> np.ndarray:
    out = q.multiply_by_quantized_multiplier(acc, multiplier, shift) + zero_point
    return np.clip(out, act[0], act[1]).astype(np.int8)


def conv2d(x, x_region, in_hw, out_region, p: WindowParams, filters, bias, in_zp, out_zp, multiplier, shift):
    """`reference_integer_ops::ConvPerChannel`; filters (O, kh, kw, I) int8, bias (O,) int32."""
    windows = window_view(x, x_region, in_hw, out_region, p.kernel, p.stride, p.dilation, p.pad, in_zp)
    oh, ow = windows.shape[:2]
    patches = windows.reshape(oh * ow, -1).astype(np.float64) - in_zp  # offset domain, exact
    w = filters.reshape(filters.shape[0], -1).astype(np.float64)
    acc = np.rint(patches @ w.T).astype(np.int64) + bias.astype(np.int64)
    return _requantize(acc, multiplier, shift, out_zp, p.activation).reshape(oh, ow, -1)


def depthwise_conv2d(x, x_region, in_hw, out_region, p: WindowParams, filters, bias, in_zp, out_zp, multiplier, shift):
    """`reference_integer_ops::DepthwiseConvPerChannel`; filters (1, kh, kw, C*M)."""
    windows = window_view(x, x_region, in_hw, out_region, p.kernel, p.stride, p.dilation, p.pad, in_zp)
    oh, ow, kh, kw, channels = windows.shape
    out_channels = filters.shape[-1]
    multiplier_m = out_channels // channels
    taps = windows.reshape(oh * ow, kh * kw, channels).astype(np.float64) - in_zp
    w = filters.reshape(kh * kw, channels, multiplier_m).astype(np.float64)
    acc = np.rint(np.einsum("ptc,tcm->pcm", taps, w)).astype(np.int64).reshape(oh * ow, out_channels)
    acc = acc + bias.astype(np.int64)
    return _requantize(acc, multiplier, shift, out_zp, p.activation).reshape(oh, ow, out_channels)


def max_pool2d(x, x_region, in_hw, out_region, p: WindowParams):
    """`reference_integer_ops::MaxPool` (out-of-bounds taps are skipped)."""
    windows = window_view(x, x_region, in_hw, out_region, p.kernel, p.stride, (1, 1), p.pad, -129)
    out = windows.max(axis=(2, 3))
    return np.clip(out, p.activation[0], p.activation[1]).astype(np.int8)


def average_pool2d(x, x_region, in_hw, out_region, p: WindowParams):
    """`reference_integer_ops::AveragePool`: sum of in-bounds taps, rounded division."""
    windows = window_view(x, x_region, in_hw, out_region, p.kernel, p.stride, (1, 1), p.pad, 0)
    acc = windows.sum(axis=(2, 3), dtype=np.int64)
    count = in_bounds_counts(in_hw, out_region, p.kernel, p.stride, p.pad)[:, :, None].astype(np.int64)
    half = count // 2
    # C++ division truncates toward zero.
    pos = (acc + half) // count
    neg = -((-(acc - half)) // count)
    out = np.where(acc > 0, pos, neg)
    return np.clip(out, p.activation[0], p.activation[1]).astype(np.int8)


def pad(x, x_region, in_hw, out_region, p: WindowParams, out_zp):
    """TFLite PAD on int8: pixels outside the input read the output zero point."""
    windows = window_view(x, x_region, in_hw, out_region, (1, 1), (1, 1), (1, 1), p.pad, out_zp)
    return windows[:, :, 0, 0, :].astype(np.int8)


def add(x1, r1, x2, r2, out_region, params: dict, zps: tuple, act: tuple):
    """`reference_integer_ops::AddElementwise` (same shapes, no broadcasting)."""
    a = _crop(x1, r1, out_region).astype(np.int64) - zps[0]
    b = _crop(x2, r2, out_region).astype(np.int64) - zps[1]
    shifted_a = a * (1 << q.ADD_LEFT_SHIFT)
    shifted_b = b * (1 << q.ADD_LEFT_SHIFT)
    scaled_a = q.multiply_by_quantized_multiplier_smaller_than_one_exp(
        shifted_a, params["input1_multiplier"], params["input1_shift"]
    )
    scaled_b = q.multiply_by_quantized_multiplier_smaller_than_one_exp(
        shifted_b, params["input2_multiplier"], params["input2_shift"]
    )
    raw = q.multiply_by_quantized_multiplier_smaller_than_one_exp(
        scaled_a + scaled_b, params["output_multiplier"], params["output_shift"]
    ) + zps[2]
    return np.clip(raw, act[0], act[1]).astype(np.int8)


def relu(x, x_region, out_region, in_zp, out_zp, multiplier, shift, act):
    """TFLite int8 RELU / RELU6 (`QuantizedReluX`): requantize, then clamp."""
    v = _crop(x, x_region, out_region).astype(np.int64) - in_zp
    out = q.multiply_by_quantized_multiplier(v, multiplier, shift) + out_zp
    return np.clip(out, act[0], act[1]).astype(np.int8)


def mean(sums: np.ndarray, num_pixels: int, in_zp: int, out_zp: int, multiplier: int, shift: int) -> np.ndarray:
    """TFLM's int8 MEAN from the per-channel sums of raw int8 values over `num_pixels` pixels
    (`multiplier`, `shift`: `quantization.mean_multiplier`)."""
    acc = np.asarray(sums, np.int64) - in_zp * num_pixels
    y = q.multiply_by_quantized_multiplier(acc, multiplier, shift) + out_zp
    return np.clip(y, q.INT8_MIN, q.INT8_MAX).astype(np.int8)


def _crop(x, x_region, region):
    ry0, _, rx0, _ = x_region
    y0, y1, x0, x1 = region
    if not (x_region[0] <= y0 and y1 <= x_region[1] and x_region[2] <= x0 and x1 <= x_region[3]):
        raise AssertionError(f"input region {x_region} does not cover {region}")
    return x[y0 - ry0 : y1 - ry0, x0 - rx0 : x1 - rx0]
