/* Copyright 2026 The keras-patch Authors. Licensed under the Apache License 2.0.
==============================================================================*/
#include "int8_arith.h"

#include <math.h>

namespace keras_patch {
namespace arith {

void QuantizeMultiplier(double m, int32_t* quantized, int* shift) {
  if (m == 0.0) {
    *quantized = 0;
    *shift = 0;
    return;
  }
  int exponent = 0;
  const double q = frexp(m, &exponent);  // q in [0.5, 1)
  int64_t q_fixed = static_cast<int64_t>(round(q * 2147483648.0));
  if (q_fixed == (static_cast<int64_t>(1) << 31)) {
    q_fixed /= 2;
    ++exponent;
  }
  if (exponent < -31) {
    exponent = 0;
    q_fixed = 0;
  }
  *quantized = static_cast<int32_t>(q_fixed);
  *shift = exponent;
}

float RoundHalfAway(float x) { return roundf(x); }

}  // namespace arith
}  // namespace keras_patch
