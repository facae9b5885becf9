/* Copyright 2026 The keras-patch Authors. Licensed under the Apache License 2.0.

Fixed-point helpers of TFLite's int8 reference kernels (double rounding, the
default build without TFLITE_SINGLE_ROUNDING), written out so the portable
core needs no TFLite headers.  Semantics: docs/patch_stage_op.md, "Int8
arithmetic"; the Python twin is keras_patch/stage/quantization.py.
==============================================================================*/
#ifndef KERAS_PATCH_TFLM_OPS_INT8_ARITH_H_
#define KERAS_PATCH_TFLM_OPS_INT8_ARITH_H_

#include <stdint.h>

namespace keras_patch {
namespace arith {

// gemmlowp SaturatingRoundingDoublingHighMul.
inline int32_t SaturatingRoundingDoublingHighMul(int32_t a, int32_t b) {
  if (a == b && a == INT32_MIN) return INT32_MAX;
  const int64_t ab = static_cast<int64_t>(a) * static_cast<int64_t>(b);
  const int64_t nudge = ab >= 0 ? (1 << 30) : (1 - (1 << 30));
  return static_cast<int32_t>((ab + nudge) / (static_cast<int64_t>(1) << 31));
}

// gemmlowp RoundingDivideByPOT, 0 <= exponent <= 31.
inline int32_t RoundingDivideByPOT(int32_t x, int exponent) {
  const int32_t mask = static_cast<int32_t>((static_cast<int64_t>(1) << exponent) - 1);
  const int32_t remainder = x & mask;
  const int32_t threshold = (mask >> 1) + (x < 0 ? 1 : 0);
  return (x >> exponent) + (remainder > threshold ? 1 : 0);
}

// Two's complement wrap of an int64 to int32 (what int32 arithmetic gives
// on every target TFLM supports), without implementation-defined casts.
inline int32_t WrapToInt32(int64_t v) {
  const uint32_t u = static_cast<uint32_t>(static_cast<uint64_t>(v));
  return u <= 0x7FFFFFFFu ? static_cast<int32_t>(u)
                          : -static_cast<int32_t>(~u) - 1;
}

// TFLite MultiplyByQuantizedMultiplier (double rounding); shift <= 30
// (Prepare rejects larger shifts), so the left shift stays in range.
inline int32_t MultiplyByQuantizedMultiplier(int32_t x, int32_t multiplier, int shift) {
  const int left_shift = shift > 0 ? shift : 0;
  const int right_shift = shift > 0 ? 0 : -shift;
  const int32_t shifted = WrapToInt32(static_cast<int64_t>(x) * (static_cast<int64_t>(1) << left_shift));
  return RoundingDivideByPOT(SaturatingRoundingDoublingHighMul(shifted, multiplier), right_shift);
}

// TFLite MultiplyByQuantizedMultiplierSmallerThanOneExp (left_shift <= 0).
inline int32_t MultiplyByQuantizedMultiplierSmallerThanOneExp(int32_t x, int32_t multiplier,
                                                              int left_shift) {
  return RoundingDivideByPOT(SaturatingRoundingDoublingHighMul(x, multiplier), -left_shift);
}

// TFLite QuantizeMultiplier (double rounding): m = q * 2^shift with
// q in [2^30, 2^31) as int32.  `m` must be finite and >= 0.
void QuantizeMultiplier(double m, int32_t* quantized, int* shift);

// std::round of a float (half away from zero), as a float.
float RoundHalfAway(float x);

}  // namespace arith
}  // namespace keras_patch

#endif  // KERAS_PATCH_TFLM_OPS_INT8_ARITH_H_
