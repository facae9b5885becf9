"""Fixed-point requantization exactly as the TFLite / TFLM int8 reference kernels do it.

Every function mirrors a routine of TFLite's `kernels/internal/common.h` and
`quantization_util.cc` (double rounding, the default build of LiteRT and TFLM),
vectorized with numpy int64 arithmetic that reproduces the int32 results bit
for bit.  `docs/patch_stage_op.md` ("Int8 arithmetic") cites these names.

Example:

>>> import numpy as np
>>> m, s = quantize_multiplier(0.0123)
>>> int(multiply_by_quantized_multiplier(np.array([1000]), m, s)[0])
12
"""

from __future__ import annotations

import math

import numpy as np

INT32_MIN = -(2**31)
INT32_MAX = 2**31 - 1
INT8_MIN = -128
INT8_MAX = 127


def quantize_multiplier(real_multiplier: float) -> tuple:
    """`QuantizeMultiplier`: a double as (int32 significand in [2^30, 2^31), shift)."""
    if real_multiplier == 0.0:
        return 0, 0
    significand, shift = math.frexp(real_multiplier)
    q_fixed = _round_half_away(significand * (1 << 31))
    if q_fixed == (1 << 31):
        q_fixed //= 2
        shift += 1
    if shift < -31:
        shift = 0
        q_fixed = 0
    return int(q_fixed), int(shift)


def quantize_multiplier_smaller_than_one_exp(real_multiplier: float) -> tuple:
    """`QuantizeMultiplierSmallerThanOneExp`: like `quantize_multiplier`, shift <= 0."""
    if not 0.0 < real_multiplier < 1.0:
        raise ValueError(f"multiplier {real_multiplier!r} must lie in (0, 1)")
    return quantize_multiplier(real_multiplier)


def _round_half_away(x: float) -> int:
    """`TfLiteRound` / `std::round` on a double."""
    return int(math.floor(x + 0.5)) if x >= 0 else -int(math.floor(-x + 0.5))


def round_float32_half_away(x) -> int:
    """`std::round` of a float32 value (the activation-range helpers round floats)."""
    return _round_half_away(float(np.float32(x)))


def _wrap_int32(x: np.ndarray) -> np.ndarray:
    return ((x.astype(np.int64) + 2**31) % 2**32) - 2**31


def saturating_rounding_doubling_high_mul(a: np.ndarray, b) -> np.ndarray:
    """gemmlowp `SaturatingRoundingDoublingHighMul` on int32 values held in int64."""
    a = np.asarray(a, np.int64)
    b = np.asarray(b, np.int64)
    overflow = (a == INT32_MIN) & (b == INT32_MIN)
    ab = a * b
    nudge = np.where(ab >= 0, np.int64(1 << 30), np.int64(1 - (1 << 30)))
    total = ab + nudge
    # C++ integer division truncates toward zero.
    high = np.where(total >= 0, total // (1 << 31), -((-total) // (1 << 31)))
    return np.where(overflow, np.int64(INT32_MAX), high)


def rounding_divide_by_pot(x: np.ndarray, exponent) -> np.ndarray:
    """gemmlowp `RoundingDivideByPOT` (exponent >= 0, scalar or per element)."""
    x = np.asarray(x, np.int64)
    exponent = np.asarray(exponent, np.int64)
    mask = (np.int64(1) << exponent) - 1
    remainder = x & mask
    threshold = (mask >> 1) + (x < 0)
    return (x >> exponent) + (remainder > threshold)


def multiply_by_quantized_multiplier(x: np.ndarray, multiplier, shift) -> np.ndarray:
    """`MultiplyByQuantizedMultiplier` (int32 x, per-element or scalar multiplier/shift)."""
    shift = np.asarray(shift, np.int64)
    left_shift = np.maximum(shift, 0)
    right_shift = np.maximum(-shift, 0)
    shifted = _wrap_int32(np.asarray(x, np.int64) * (np.int64(1) << left_shift))
    return rounding_divide_by_pot(
        saturating_rounding_doubling_high_mul(shifted, multiplier), right_shift
    )


def multiply_by_quantized_multiplier_smaller_than_one_exp(
    x: np.ndarray, multiplier, left_shift
) -> np.ndarray:
    """`MultiplyByQuantizedMultiplierSmallerThanOneExp` (left_shift <= 0)."""
    return rounding_divide_by_pot(
        saturating_rounding_doubling_high_mul(x, multiplier), -np.asarray(left_shift, np.int64)
    )


def mean_multiplier(input_scale: float, output_scale: float, num_pixels: int) -> tuple:
    """TFLM's int8 MEAN requantization with the `1 / num_pixels` folded in (`QuantizedMeanOrSum`).

    `M, shift = QuantizeMultiplier(double(s_in) / double(s_out))`;
    `k = min(floor(log2(n)), 32, 31 + shift)`; returns
    `(int32((int64(M) << k) / n), shift - k)`.

    >>> mean_multiplier(0.5, 0.5, 25)
    (687194767, -3)
    """
    multiplier, shift = quantize_multiplier(float(np.float32(input_scale)) / float(np.float32(output_scale)))
    k = min(int(num_pixels).bit_length() - 1, 32, 31 + shift)
    return int((multiplier << k) // num_pixels), shift - k  # both >= 0: C's division truncates the same


def per_channel_multipliers(input_scale: float, filter_scales, output_scale: float) -> tuple:
    """Conv/depthwise requantization as `PopulateConvolutionQuantizationParams`.

    effective_scale[c] = double(input_scale) * double(filter_scale[c]) / double(output_scale)
    with every scale a float32.
    """
    multipliers, shifts = [], []
    in_s = float(np.float32(input_scale))
    out_s = float(np.float32(output_scale))
    for fs in np.asarray(filter_scales, np.float32):
        m, s = quantize_multiplier(in_s * float(fs) / out_s)
        multipliers.append(m)
        shifts.append(s)
    return np.array(multipliers, np.int64), np.array(shifts, np.int64)


def activation_range(activation: int, output_scale: float, output_zero_point: int) -> tuple:
    """`CalculateActivationRangeQuantized` for int8 (TFLite ActivationFunctionType codes)."""
    scale = np.float32(output_scale)

    def quantize(value: float) -> int:
        # float32 division; +-inf (tiny scales) is clamped, as the C++ kernel
        # does: the result lies outside [-128, 127] either way.
        with np.errstate(over="ignore", divide="ignore"):
            ratio = float(np.float32(value) / scale)
        ratio = min(max(ratio, -1e6), 1e6)
        return int(output_zero_point) + round_float32_half_away(ratio)

    if activation == ACT_NONE:
        return INT8_MIN, INT8_MAX
    if activation == ACT_RELU:
        return max(INT8_MIN, quantize(0.0)), INT8_MAX
    if activation == ACT_RELU6:
        return max(INT8_MIN, quantize(0.0)), min(INT8_MAX, quantize(6.0))
    if activation == ACT_RELU_N1_TO_1:
        return max(INT8_MIN, quantize(-1.0)), min(INT8_MAX, quantize(1.0))
    raise ValueError(f"unsupported fused activation {activation}")


# TFLite ActivationFunctionType values.
ACT_NONE = 0
ACT_RELU = 1
ACT_RELU_N1_TO_1 = 2
ACT_RELU6 = 3
SUPPORTED_ACTIVATIONS = (ACT_NONE, ACT_RELU, ACT_RELU_N1_TO_1, ACT_RELU6)

# `AddOpData::left_shift` for int8 inputs.
ADD_LEFT_SHIFT = 20


def add_params(scale1: float, scale2: float, output_scale: float) -> dict:
    """Requantization of int8 ADD as in TFLite's `add.cc` Prepare."""
    s1 = np.float32(scale1)
    s2 = np.float32(scale2)
    so = np.float32(output_scale)
    twice_max_input_scale = float(np.float32(2) * max(s1, s2))
    real_input1 = float(s1) / twice_max_input_scale
    real_input2 = float(s2) / twice_max_input_scale
    real_output = twice_max_input_scale / float(np.float32((1 << ADD_LEFT_SHIFT) * so))
    m1, sh1 = quantize_multiplier_smaller_than_one_exp(real_input1)
    m2, sh2 = quantize_multiplier_smaller_than_one_exp(real_input2)
    mo, sho = quantize_multiplier_smaller_than_one_exp(real_output)
    return dict(
        input1_multiplier=m1, input1_shift=sh1,
        input2_multiplier=m2, input2_shift=sh2,
        output_multiplier=mo, output_shift=sho,
    )
