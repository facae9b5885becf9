/* Copyright 2026 The keras-patch Authors. Licensed under the Apache License 2.0.

KP_PATCH_STAGE Prepare: options parsing, validation (the same checks, in the
same order, as keras_patch/stage/options.py validate_options and
executor.py prepare_stage) and the precomputed stage.
==============================================================================*/
#include "patch_stage_core.h"

#include <float.h>
#include <math.h>

#include "int8_arith.h"
#include "patch_geometry.h"
#include "patch_stage_cmsis.h"

namespace keras_patch {
namespace {

// Reports "KP_PATCH_STAGE options: key '<key>': <message>" and fails.
#define KP_FAIL_KEY(k, fmt, ...)                                                        \
  do {                                                                                  \
    reporter.report(reporter.context, "KP_PATCH_STAGE options: key '%s': " fmt,         \
                    kKpOptionKeys[k].name, ##__VA_ARGS__);                              \
    return kKpError;                                                                    \
  } while (0)

const char* OpName(int64_t op) {
  switch (op) {
    case kKpOpAdd: return "ADD";
    case kKpOpAveragePool2D: return "AVERAGE_POOL_2D";
    case kKpOpConv2D: return "CONV_2D";
    case kKpOpDepthwiseConv2D: return "DEPTHWISE_CONV_2D";
    case kKpOpMaxPool2D: return "MAX_POOL_2D";
    case kKpOpRelu: return "RELU";
    case kKpOpRelu6: return "RELU6";
    case kKpOpPad: return "PAD";
    case kKpOpMean: return "MEAN";
    default: return "unknown op";
  }
}

bool IsWeighted(int64_t op) { return op == kKpOpConv2D || op == kKpOpDepthwiseConv2D; }
bool IsWindowed(int64_t op) {
  return IsWeighted(op) || op == kKpOpMaxPool2D || op == kKpOpAveragePool2D;
}

// Option values as int64 (validation sees exactly what the bytes say).
int64_t V(const KpOptionsView& v, KpOptionKeyIndex key, int64_t index) {
  return flexbuffer::IntAt(v.vectors[key], static_cast<uint32_t>(index));
}
int64_t Shape(const KpOptionsView& v, int64_t t, int axis) { return V(v, kKeyTensorShape, 3 * t + axis); }
int64_t Param(const KpOptionsView& v, int64_t l, int i) {
  return V(v, kKeyLayerParams, kKpLayerParamsWidth * l + i);
}

// Scale t as float32 (float64 vectors are rounded as numpy.float32 does;
// out-of-range values become +-inf, NaN stays NaN).
float Scale(const KpOptionsView& v, int64_t t) {
  const double d = flexbuffer::FloatAt(v.vectors[kKeyTensorScale], static_cast<uint32_t>(t));
  if (d != d) return NAN;
  if (d > FLT_MAX) return INFINITY;
  if (d < -FLT_MAX) return -INFINITY;
  return static_cast<float>(d);
}

// Clamped to int for printing.
int I(int64_t x) {
  return x > INT32_MAX ? INT32_MAX : (x < INT32_MIN ? INT32_MIN : static_cast<int>(x));
}

inline size_t Align8(size_t n) { return (n + 7) / 8 * 8; }

}  // namespace

KpStatus KpParseOptions(const uint8_t* data, size_t size, const KpReporter& reporter,
                        KpOptionsView* view) {
  flexbuffer::Map map;
  if (!flexbuffer::GetRootMap(data, size, &map)) {
    reporter.report(reporter.context,
                    "KP_PATCH_STAGE options are not a readable FlexBuffer map (%d bytes).",
                    I(static_cast<int64_t>(size)));
    return kKpError;
  }
  // Scalars first, in the order of options.py decode_options.
  const KpOptionKeyIndex scalars[2] = {kKeyVersion, kKeyNumLayers};
  int64_t values[2] = {0, 0};
  for (int i = 0; i < 2; ++i) {
    const KpOptionKeyIndex k = scalars[i];
    flexbuffer::Ref ref;
    if (flexbuffer::Find(map, kKpOptionKeys[k].name, &ref) != flexbuffer::kOk) {
      reporter.report(reporter.context, "KP_PATCH_STAGE options: missing key '%s'.",
                      kKpOptionKeys[k].name);
      return kKpError;
    }
    if (flexbuffer::ReadInt(ref, &values[i]) != flexbuffer::kOk) {
      reporter.report(reporter.context, "KP_PATCH_STAGE options: key '%s' must be an int.",
                      kKpOptionKeys[k].name);
      return kKpError;
    }
    if (k == kKeyVersion &&
        (values[i] < kKpMinOptionsVersion || values[i] > kKpOptionsVersion)) {
      reporter.report(reporter.context,
                      "KP_PATCH_STAGE options: key 'version' is %d; this kernel reads versions "
                      "%d..%d.",
                      I(values[i]), static_cast<int>(kKpMinOptionsVersion),
                      static_cast<int>(kKpOptionsVersion));
      return kKpError;
    }
    if (k == kKeyNumLayers && (values[i] < 1 || values[i] > kKpMaxLayers)) {
      reporter.report(reporter.context,
                      "KP_PATCH_STAGE options: key 'num_layers' is %d, allowed 1..%d.",
                      I(values[i]), static_cast<int>(kKpMaxLayers));
      return kKpError;
    }
  }
  view->version = static_cast<int32_t>(values[0]);
  view->num_layers = static_cast<int32_t>(values[1]);
  view->in_place = 0;
  if (view->version >= 2) {  // 'in_place' exists from version 2 on
    flexbuffer::Ref ref;
    int64_t in_place = 0;
    if (flexbuffer::Find(map, kKpOptionKeys[kKeyInPlace].name, &ref) != flexbuffer::kOk) {
      reporter.report(reporter.context, "KP_PATCH_STAGE options: missing key 'in_place'.");
      return kKpError;
    }
    if (flexbuffer::ReadInt(ref, &in_place) != flexbuffer::kOk) {
      reporter.report(reporter.context, "KP_PATCH_STAGE options: key 'in_place' must be an int.");
      return kKpError;
    }
    if (in_place != 0 && in_place != 1) {
      reporter.report(reporter.context,
                      "KP_PATCH_STAGE options: key 'in_place' is %d; allowed 0 or 1.",
                      I(in_place));
      return kKpError;
    }
    view->in_place = static_cast<int32_t>(in_place);
  }
  const int64_t L = view->num_layers;
  const struct {
    KpOptionKeyIndex key;
    int64_t length;
  } vectors[] = {
      {kKeyGrid, 2},
      {kKeyTensorShape, 3 * (L + 1)},
      {kKeyTensorScale, L + 1},
      {kKeyTensorZeroPoint, L + 1},
      {kKeyLayerOp, L},
      {kKeyLayerInputs, 2 * L},
      {kKeyLayerParams, kKpLayerParamsWidth * L},
      {kKeyLayerActivation, L},
      {kKeyLayerWeights, 2 * L},
  };
  for (size_t i = 0; i < sizeof(vectors) / sizeof(vectors[0]); ++i) {
    const KpOptionKeyIndex k = vectors[i].key;
    const bool is_float = k == kKeyTensorScale;
    flexbuffer::Ref ref;
    if (flexbuffer::Find(map, kKpOptionKeys[k].name, &ref) != flexbuffer::kOk) {
      reporter.report(reporter.context, "KP_PATCH_STAGE options: missing key '%s'.",
                      kKpOptionKeys[k].name);
      return kKpError;
    }
    flexbuffer::TypedVector* vec = &view->vectors[k];
    if (flexbuffer::ReadTypedVector(ref, is_float, vec) != flexbuffer::kOk) {
      reporter.report(reporter.context,
                      "KP_PATCH_STAGE options: key '%s' must be a typed %s vector.",
                      kKpOptionKeys[k].name, is_float ? "float" : "int");
      return kKpError;
    }
    if (vec->length != vectors[i].length) {
      reporter.report(reporter.context,
                      "KP_PATCH_STAGE options: key '%s' has %d elements, expected %d.",
                      kKpOptionKeys[k].name, I(vec->length), I(vectors[i].length));
      return kKpError;
    }
  }
  // Unused slots (the scalars) stay empty.
  view->vectors[kKeyVersion].length = 0;
  view->vectors[kKeyNumLayers].length = 0;
  view->vectors[kKeyInPlace].length = 0;
  return kKpOk;
}

KpStatus KpValidateOptions(const KpOptionsView& v, int32_t num_op_inputs,
                           const KpReporter& reporter) {
  const int64_t L = v.num_layers;
  for (int64_t t = 0; t <= L; ++t) {
    const int64_t h = Shape(v, t, 0), w = Shape(v, t, 1), c = Shape(v, t, 2);
    if (h < 1 || h > kKpMaxDim || w < 1 || w > kKpMaxDim || c < 1 || c > kKpMaxDim) {
      KP_FAIL_KEY(kKeyTensorShape,
                  "tensor %d has shape (%d, %d, %d); every dimension must be in 1..65536.", I(t),
                  I(h), I(w), I(c));
    }
    if (h * w * c > INT32_MAX) {
      KP_FAIL_KEY(kKeyTensorShape,
                  "tensor %d has shape (%d, %d, %d); at most 2^31 - 1 elements are supported.",
                  I(t), I(h), I(w), I(c));
    }
  }
  const int64_t gh = V(v, kKeyGrid, 0), gw = V(v, kKeyGrid, 1);
  // The tiled tensor: the output, or a final MEAN's input (by the last
  // layer's op code alone, before any layer is checked).
  const bool ends_with_mean = V(v, kKeyLayerOp, L - 1) == kKpOpMean;
  const int64_t tiled = ends_with_mean ? L - 1 : L;
  if (gh < 1 || gh > kKpMaxGrid || gw < 1 || gw > kKpMaxGrid) {
    KP_FAIL_KEY(kKeyGrid, "(%d, %d) must be two ints in 1..64.", I(gh), I(gw));
  }
  if (gh > Shape(v, tiled, 0) || gw > Shape(v, tiled, 1)) {
    KP_FAIL_KEY(kKeyGrid, "grid %dx%d is larger than %s %dx%d.", I(gh), I(gw),
                ends_with_mean ? "the MEAN's input" : "the stage output", I(Shape(v, tiled, 0)),
                I(Shape(v, tiled, 1)));
  }
  for (int64_t t = 0; t <= L; ++t) {
    const float s = Scale(v, t);
    if (!(s > 0.0f && s <= FLT_MAX)) {
      KP_FAIL_KEY(kKeyTensorScale, "tensor %d has a scale that is not positive and finite.",
                  I(t));
    }
    const int64_t zp = V(v, kKeyTensorZeroPoint, t);
    if (zp < -128 || zp > 127) {
      KP_FAIL_KEY(kKeyTensorZeroPoint, "tensor %d has zero point %d; int8 needs -128..127.",
                  I(t), I(zp));
    }
  }
  for (int64_t l = 0; l < L; ++l) {
    const int64_t op = V(v, kKeyLayerOp, l);
    if (op != kKpOpAdd && op != kKpOpAveragePool2D && op != kKpOpConv2D &&
        op != kKpOpDepthwiseConv2D && op != kKpOpMaxPool2D && op != kKpOpRelu &&
        op != kKpOpRelu6 && op != kKpOpPad && op != kKpOpMean) {
      KP_FAIL_KEY(kKeyLayerOp,
                  "layer %d has op code %d; supported: [0, 1, 3, 4, 17, 19, 21, 34, 40].", I(l),
                  I(op));
    }
    const char* name = OpName(op);
    if (op == kKpOpMean) {
      if (v.version < kKpMeanSinceVersion) {
        KP_FAIL_KEY(kKeyLayerOp, "layer %d (%s) needs options version %d; the file is version %d.",
                    I(l), name, static_cast<int>(kKpMeanSinceVersion), static_cast<int>(v.version));
      }
      if (l != L - 1) {
        KP_FAIL_KEY(kKeyLayerOp, "layer %d (%s): a MEAN must be the last layer of a stage.", I(l),
                    name);
      }
    }
    const int64_t a = V(v, kKeyLayerInputs, 2 * l), b = V(v, kKeyLayerInputs, 2 * l + 1);
    if (a < 0 || a > l) {
      KP_FAIL_KEY(kKeyLayerInputs, "layer %d (%s) reads tensor %d; it may read tensors 0..%d.",
                  I(l), name, I(a), I(l));
    }
    if (op == kKpOpAdd) {
      if (b < 0 || b > l) {
        KP_FAIL_KEY(kKeyLayerInputs,
                    "layer %d (%s) reads second tensor %d; it may read tensors 0..%d.", I(l),
                    name, I(b), I(l));
      }
    } else if (b != -1) {
      KP_FAIL_KEY(kKeyLayerInputs,
                  "layer %d (%s) takes one input; the second entry must be -1, got %d.", I(l),
                  name, I(b));
    }
    const int64_t act = V(v, kKeyLayerActivation, l);
    if (act < 0 || act > 3) {
      KP_FAIL_KEY(kKeyLayerActivation, "layer %d (%s) has activation %d; supported 0..3.", I(l),
                  name, I(act));
    }
    const int64_t kh = Param(v, l, 0), kw = Param(v, l, 1), sh = Param(v, l, 2),
                  sw = Param(v, l, 3), dh = Param(v, l, 4), dw = Param(v, l, 5),
                  pt = Param(v, l, 6), pl = Param(v, l, 7);
    const int64_t ksd[6] = {kh, kw, sh, sw, dh, dw};
    bool params_ok = pt >= 0 && pl >= 0;
    for (int i = 0; i < 6; ++i) {
      // A MEAN's kernel is its whole input (checked below), not bounded by 64.
      params_ok = params_ok && ksd[i] >= 1 && (ksd[i] <= 64 || (op == kKpOpMean && i < 2));
    }
    if (!params_ok) {
      KP_FAIL_KEY(kKeyLayerParams,
                  "layer %d (%s) has kernel (%d, %d), stride (%d, %d), dilation (%d, %d), pad "
                  "(%d, %d); kernel/stride/dilation must be 1..64, pad >= 0.",
                  I(l), name, I(kh), I(kw), I(sh), I(sw), I(dh), I(dw), I(pt), I(pl));
    }
    const int64_t in_h = Shape(v, a, 0), in_w = Shape(v, a, 1), in_c = Shape(v, a, 2);
    const int64_t out_h = Shape(v, l + 1, 0), out_w = Shape(v, l + 1, 1),
                  out_c = Shape(v, l + 1, 2);
    const int64_t fw = V(v, kKeyLayerWeights, 2 * l), fb = V(v, kKeyLayerWeights, 2 * l + 1);
    if (IsWeighted(op)) {
      if (fw < 1 || (num_op_inputs >= 0 && fw >= num_op_inputs)) {
        KP_FAIL_KEY(kKeyLayerWeights, "layer %d (%s) needs a filter input index >= 1, got %d.",
                    I(l), name, I(fw));
      }
      if (fb != -1 && (fb < 1 || (num_op_inputs >= 0 && fb >= num_op_inputs))) {
        KP_FAIL_KEY(kKeyLayerWeights,
                    "layer %d (%s) has bias input index %d; use -1 or a valid op input.", I(l),
                    name, I(fb));
      }
      // Each op input used once: compare with every earlier weight index.
      const int64_t mine[2] = {fw, fb};
      for (int i = 0; i < 2; ++i) {
        if (mine[i] == -1) continue;
        bool reused = i == 1 && fb == fw;
        for (int64_t e = 0; e < 2 * l && !reused; ++e) reused = V(v, kKeyLayerWeights, e) == mine[i];
        if (reused) {
          KP_FAIL_KEY(kKeyLayerWeights,
                      "layer %d (%s) reuses op input %d, already used by another layer.", I(l),
                      name, I(mine[i]));
        }
      }
    } else if (fw != -1 || fb != -1) {
      KP_FAIL_KEY(kKeyLayerWeights, "layer %d (%s) has no weights; expected (-1, -1), got (%d, %d).",
                  I(l), name, I(fw), I(fb));
    }
    if (IsWindowed(op)) {
      if ((op == kKpOpMaxPool2D || op == kKpOpAveragePool2D) && (dh != 1 || dw != 1)) {
        KP_FAIL_KEY(kKeyLayerParams, "layer %d (%s): pooling has no dilation, got (%d, %d).",
                    I(l), name, I(dh), I(dw));
      }
      const int64_t axis[2][6] = {{in_h, out_h, kh, sh, dh, pt}, {in_w, out_w, kw, sw, dw, pl}};
      for (int ax = 0; ax < 2; ++ax) {
        const int64_t i = axis[ax][0], o = axis[ax][1], k = axis[ax][2], s = axis[ax][3],
                      d = axis[ax][4], p = axis[ax][5];
        const int64_t effective = (k - 1) * d + 1;
        if (p > effective - 1 || (o - 1) * s - p > i - 1) {
          KP_FAIL_KEY(kKeyLayerParams,
                      "layer %d (%s): %s in %d, out %d, kernel %d, stride %d, dilation %d, pad "
                      "%d leave an output without input.",
                      I(l), name, ax == 0 ? "height" : "width", I(i), I(o), I(k), I(s), I(d),
                      I(p));
        }
      }
      if (op == kKpOpDepthwiseConv2D && out_c % in_c != 0) {
        KP_FAIL_KEY(kKeyTensorShape,
                    "layer %d (%s): output channels %d are not a multiple of input channels %d.",
                    I(l), name, I(out_c), I(in_c));
      }
      if ((op == kKpOpMaxPool2D || op == kKpOpAveragePool2D) && out_c != in_c) {
        KP_FAIL_KEY(kKeyTensorShape, "layer %d (%s): pooling keeps channels, got %d -> %d.",
                    I(l), name, I(in_c), I(out_c));
      }
    } else if (op == kKpOpMean) {
      if (kh != in_h || kw != in_w || sh != 1 || sw != 1 || dh != 1 || dw != 1 || pt != 0 ||
          pl != 0) {
        KP_FAIL_KEY(kKeyLayerParams,
                    "layer %d (%s): a MEAN averages its whole %dx%d input: parameters must be "
                    "[%d, %d, 1, 1, 1, 1, 0, 0].",
                    I(l), name, I(in_h), I(in_w), I(in_h), I(in_w));
      }
      if (act != 0) {
        KP_FAIL_KEY(kKeyLayerActivation, "layer %d (%s): MEAN carries no fused activation.", I(l),
                    name);
      }
      if (out_h != 1 || out_w != 1 || out_c != in_c) {
        KP_FAIL_KEY(kKeyTensorShape, "layer %d (%s): the mean of %dx%dx%d is 1x1x%d, got %dx%dx%d.",
                    I(l), name, I(in_h), I(in_w), I(in_c), I(in_c), I(out_h), I(out_w), I(out_c));
      }
      if (in_h * in_w > kKpMaxMeanPixels) {
        KP_FAIL_KEY(kKeyTensorShape,
                    "layer %d (%s) averages %dx%d pixels; at most 2^22 are supported.", I(l), name,
                    I(in_h), I(in_w));
      }
    } else if (op == kKpOpPad) {
      if (kh != 1 || kw != 1 || sh != 1 || sw != 1 || dh != 1 || dw != 1) {
        KP_FAIL_KEY(kKeyLayerParams, "layer %d (%s): PAD needs kernel, stride and dilation 1.",
                    I(l), name);
      }
      if (!(out_h - in_h >= pt && out_w - in_w >= pl && out_c == in_c)) {
        KP_FAIL_KEY(kKeyTensorShape,
                    "layer %d (%s): %dx%dx%d padded by top %d, left %d cannot give %dx%dx%d.",
                    I(l), name, I(in_h), I(in_w), I(in_c), I(pt), I(pl), I(out_h), I(out_w),
                    I(out_c));
      }
    } else {  // ADD, RELU, RELU6: elementwise
      if (kh != 1 || kw != 1 || sh != 1 || sw != 1 || dh != 1 || dw != 1 || pt != 0 || pl != 0) {
        KP_FAIL_KEY(kKeyLayerParams,
                    "layer %d (%s): elementwise ops need kernel/stride/dilation 1 and pad 0.",
                    I(l), name);
      }
      const int64_t inputs[2] = {a, op == kKpOpAdd ? b : a};
      for (int i = 0; i < 2; ++i) {
        const int64_t t = inputs[i];
        if (Shape(v, t, 0) != out_h || Shape(v, t, 1) != out_w || Shape(v, t, 2) != out_c) {
          KP_FAIL_KEY(kKeyTensorShape,
                      "layer %d (%s): input tensor %d (%dx%dx%d) must have the output shape "
                      "%dx%dx%d.",
                      I(l), name, I(t), I(Shape(v, t, 0)), I(Shape(v, t, 1)), I(Shape(v, t, 2)),
                      I(out_h), I(out_w), I(out_c));
        }
      }
      if ((op == kKpOpRelu || op == kKpOpRelu6) && act != 0) {
        KP_FAIL_KEY(kKeyLayerActivation, "layer %d (%s): RELU/RELU6 carry no fused activation.",
                    I(l), name);
      }
    }
  }
  for (int64_t t = 0; t < L; ++t) {
    bool consumed = false;
    for (int64_t e = 0; e < 2 * L && !consumed; ++e) consumed = V(v, kKeyLayerInputs, e) == t;
    if (!consumed) {
      KP_FAIL_KEY(kKeyLayerInputs,
                  "tensor %d is never read; only the last tensor may leave the stage.", I(t));
    }
  }
  if (v.in_place != 0 && L == 1) {
    const int64_t op = V(v, kKeyLayerOp, 0);
    const int64_t in_h = Shape(v, 0, 0), in_w = Shape(v, 0, 1), in_c = Shape(v, 0, 2);
    const int64_t out_h = Shape(v, 1, 0), out_w = Shape(v, 1, 1), out_c = Shape(v, 1, 2);
    if (op != kKpOpDepthwiseConv2D || out_c != in_c || gh != 1 || gw != 1 ||
        out_h * out_w > in_h * in_w) {
      KP_FAIL_KEY(kKeyInPlace,
                  "a one-layer in-place stage must be one DEPTHWISE_CONV_2D with depth "
                  "multiplier 1, grid 1x1 and no more output than input pixels; got %s "
                  "%dx%dx%d -> %dx%dx%d, grid %dx%d.",
                  OpName(op), I(in_h), I(in_w), I(in_c), I(out_h), I(out_w), I(out_c), I(gh),
                  I(gw));
    }
  }
  return kKpOk;
}

size_t KpPersistentBytes(const KpOptionsView& v) {
  const int64_t L = v.num_layers;
  size_t channels = 0;
  for (int64_t l = 0; l < L; ++l) {
    if (IsWeighted(V(v, kKeyLayerOp, l))) {
      const int64_t c = Shape(v, l + 1, 2);
      channels += static_cast<size_t>(c < 0 ? 0 : (c > kKpMaxDim ? kKpMaxDim : c));
    }
  }
  return Align8(sizeof(KpStage)) + Align8(sizeof(KpTensor) * static_cast<size_t>(L + 1)) +
         Align8(sizeof(KpLayer) * static_cast<size_t>(L)) + 2 * Align8(sizeof(int32_t) * channels) +
         Align8(sizeof(KpRegion) * static_cast<size_t>(L + 1));
}

void KpActivationRange(int32_t activation, float scale, int32_t zero_point, int32_t* act_min,
                       int32_t* act_max) {
  // zero_point + round(f / scale) in float32; +-inf and huge values are
  // clamped (they end up outside [-128, 127] either way).
  struct Q {
    static int32_t Quantize(float f, float scale, int32_t zero_point) {
      float r = arith::RoundHalfAway(f / scale);
      if (r > 1e6f) r = 1e6f;
      if (r < -1e6f) r = -1e6f;
      return zero_point + static_cast<int32_t>(r);
    }
  };
  int32_t lo = -128, hi = 127;
  if (activation == kKpActRelu) {
    lo = Q::Quantize(0.0f, scale, zero_point);
  } else if (activation == kKpActRelu6) {
    lo = Q::Quantize(0.0f, scale, zero_point);
    hi = Q::Quantize(6.0f, scale, zero_point);
  } else if (activation == kKpActReluN1To1) {
    lo = Q::Quantize(-1.0f, scale, zero_point);
    hi = Q::Quantize(1.0f, scale, zero_point);
  }
  *act_min = lo > -128 ? lo : -128;
  *act_max = hi < 127 ? hi : 127;
}

namespace {

// Requantization multiplier for Eval's MultiplyByQuantizedMultiplier: the
// spec's QuantizeMultiplier; shifts above 30 would overflow TFLite's left
// shift, so they are rejected.
KpStatus Multiplier(double real, int64_t layer, const char* name, const KpReporter& reporter,
                    int32_t* multiplier, int32_t* shift) {
  int s = 0;
  arith::QuantizeMultiplier(real, multiplier, &s);
  if (s > 30) {
    KP_FAIL_KEY(kKeyTensorScale,
                "layer %d (%s): requantization multiplier too large (shift %d > 30).", I(layer),
                name, s);
  }
  *shift = s;
  return kKpOk;
}

// TFLM's int8 MEAN over the n = H * W pixels of `in` (QuantizedMeanOrSum,
// compute_sum = false): M, shift = QuantizeMultiplier(s_in / s_out);
// k = min(floor(log2(n)), 32, 31 + shift); M' = (M << k) / n, shift' =
// shift - k.  Like every requantization, shift' > 30 is rejected (TFLite's
// left shift would overflow); shift' >= -31 by construction.
KpStatus MeanMultiplier(const KpTensor& in, const KpTensor& out, int64_t layer, const char* name,
                        const KpReporter& reporter, int32_t* multiplier, int32_t* shift) {
  int32_t m = 0;
  int s = 0;
  arith::QuantizeMultiplier(static_cast<double>(in.scale) / static_cast<double>(out.scale), &m,
                            &s);
  const int64_t n = static_cast<int64_t>(in.h) * in.w;
  int k = 0;
  while ((static_cast<int64_t>(2) << k) <= n) ++k;  // floor(log2(n))
  if (k > 32) k = 32;
  if (k > 31 + s) k = 31 + s;
  const int32_t folded = static_cast<int32_t>((static_cast<int64_t>(m) << k) / n);
  const int folded_shift = s - k;
  if (folded_shift > 30) {
    KP_FAIL_KEY(kKeyTensorScale,
                "layer %d (%s): requantization multiplier too large (shift %d > 30).", I(layer),
                name, folded_shift);
  }
  *multiplier = folded;
  *shift = folded_shift;
  return kKpOk;
}

// QuantizeMultiplierSmallerThanOneExp: `real` in (0, 1), shift <= 0.
KpStatus MultiplierBelowOne(double real, int64_t layer, const char* name,
                            const KpReporter& reporter, int32_t* multiplier, int32_t* shift) {
  int s = 0;
  if (real > 0.0 && real < 1.0) arith::QuantizeMultiplier(real, multiplier, &s);
  if (!(real > 0.0 && real < 1.0) || s > 0) {
    KP_FAIL_KEY(kKeyTensorScale,
                "layer %d (%s): the scales give an ADD multiplier outside (0, 1).", I(layer),
                name);
  }
  *shift = s;
  return kKpOk;
}

KpStatus PrepareWeights(int64_t l, KpGetConstTensor get_const,
                        void* context, KpStage* stage, int32_t* next_channel,
                        const KpReporter& reporter) {
  KpLayer& layer = stage->layers[l];
  const char* name = OpName(layer.op);
  const KpTensor& in = stage->tensors[layer.in_a];
  const KpTensor& out = stage->tensors[l + 1];
  KpConstTensor filter;
  filter.type = kKpTypeOther;
  filter.num_dims = 0;
  filter.num_scales = 0;
  filter.scales = NULL;
  if (get_const == NULL || get_const(context, layer.filter_input, &filter) != kKpOk ||
      filter.type != kKpTypeInt8) {
    KP_FAIL_KEY(kKeyLayerWeights, "layer %d (%s): op input %d must be an int8 filter.", I(l),
                name, static_cast<int>(layer.filter_input));
  }
  const bool conv = layer.op == kKpOpConv2D;
  const int32_t expected[4] = {conv ? out.c : 1, layer.kernel_h, layer.kernel_w,
                               conv ? in.c : out.c};
  bool shape_ok = filter.num_dims == 4;
  for (int i = 0; i < 4 && shape_ok; ++i) shape_ok = filter.dims[i] == expected[i];
  if (!shape_ok) {
    KP_FAIL_KEY(kKeyLayerWeights,
                "layer %d (%s): filter (op input %d) must have shape (%d, %d, %d, %d).", I(l),
                name, static_cast<int>(layer.filter_input), expected[0], expected[1],
                expected[2], expected[3]);
  }
  if ((filter.num_scales != 1 && filter.num_scales != out.c) || filter.scales == NULL) {
    KP_FAIL_KEY(kKeyLayerWeights, "layer %d (%s): filter has %d scales for %d channels.", I(l),
                name, static_cast<int>(filter.num_scales), static_cast<int>(out.c));
  }
  for (int32_t c = 0; c < out.c; ++c) {
    const float fs = filter.scales[filter.num_scales == 1 ? 0 : c];
    if (!(fs >= 0.0f && fs <= FLT_MAX)) {
      KP_FAIL_KEY(kKeyLayerWeights, "layer %d (%s): filter scales must be finite and >= 0.",
                  I(l), name);
    }
  }
  if (layer.bias_input >= 0) {
    KpConstTensor bias;
    bias.type = kKpTypeOther;
    bias.num_dims = 0;
    if (get_const(context, layer.bias_input, &bias) != kKpOk || bias.type != kKpTypeInt32 ||
        bias.num_dims != 1 || bias.dims[0] != out.c) {
      KP_FAIL_KEY(kKeyLayerWeights,
                  "layer %d (%s): bias (op input %d) must be int32 of shape (%d,).", I(l), name,
                  static_cast<int>(layer.bias_input), static_cast<int>(out.c));
    }
    // The bias callback may reuse the filter's memory: read scales again.
    if (get_const(context, layer.filter_input, &filter) != kKpOk || filter.scales == NULL) {
      KP_FAIL_KEY(kKeyLayerWeights, "layer %d (%s): op input %d must be an int8 filter.", I(l),
                  name, static_cast<int>(layer.filter_input));
    }
  }
  layer.channel_offset = *next_channel;
  *next_channel += out.c;
  for (int32_t c = 0; c < out.c; ++c) {
    const float fs = filter.scales[filter.num_scales == 1 ? 0 : c];
    const double real =
        static_cast<double>(in.scale) * static_cast<double>(fs) / static_cast<double>(out.scale);
    if (Multiplier(real, l, name, reporter, &stage->channel_multiplier[layer.channel_offset + c],
                   &stage->channel_shift[layer.channel_offset + c]) != kKpOk) {
      return kKpError;
    }
  }
  return kKpOk;
}

}  // namespace

KpStatus KpPrepareStage(const KpOptionsView& v, int32_t num_op_inputs, KpGetConstTensor get_const,
                        void* get_const_context, void* buffer, size_t bytes,
                        const KpReporter& reporter, KpStage** out_stage) {
  if (KpValidateOptions(v, num_op_inputs, reporter) != kKpOk) return kKpError;
  const size_t needed = KpPersistentBytes(v);
  if (buffer == NULL || bytes < needed || (reinterpret_cast<uintptr_t>(buffer) & 7) != 0) {
    reporter.report(reporter.context,
                    "KP_PATCH_STAGE: persistent buffer must be 8-byte aligned and hold %d bytes.",
                    I(static_cast<int64_t>(needed)));
    return kKpError;
  }
  const int32_t L = v.num_layers;
  uint8_t* p = static_cast<uint8_t*>(buffer);
  KpStage* stage = reinterpret_cast<KpStage*>(p);
  p += Align8(sizeof(KpStage));
  stage->tensors = reinterpret_cast<KpTensor*>(p);
  p += Align8(sizeof(KpTensor) * (L + 1));
  stage->layers = reinterpret_cast<KpLayer*>(p);
  p += Align8(sizeof(KpLayer) * L);
  int32_t channels = 0;
  for (int32_t l = 0; l < L; ++l) {
    if (IsWeighted(V(v, kKeyLayerOp, l))) channels += static_cast<int32_t>(Shape(v, l + 1, 2));
  }
  stage->num_channel_params = channels;
  stage->channel_multiplier = reinterpret_cast<int32_t*>(p);
  p += Align8(sizeof(int32_t) * channels);
  stage->channel_shift = reinterpret_cast<int32_t*>(p);
  p += Align8(sizeof(int32_t) * channels);
  stage->regions = reinterpret_cast<KpRegion*>(p);
  stage->num_layers = L;
  stage->grid_h = static_cast<int32_t>(V(v, kKeyGrid, 0));
  stage->grid_w = static_cast<int32_t>(V(v, kKeyGrid, 1));
  stage->num_op_inputs = num_op_inputs;
  stage->arena_bytes = 0;
  stage->context_bytes = 0;
  stage->staging_offset = 0;
  for (int32_t t = 0; t <= L; ++t) {
    KpTensor& tensor = stage->tensors[t];
    tensor.h = static_cast<int32_t>(Shape(v, t, 0));
    tensor.w = static_cast<int32_t>(Shape(v, t, 1));
    tensor.c = static_cast<int32_t>(Shape(v, t, 2));
    tensor.zero_point = static_cast<int32_t>(V(v, kKeyTensorZeroPoint, t));
    tensor.scale = Scale(v, t);
    tensor.first_use = t > 0 ? t - 1 : 0;
    tensor.last_use = t - 1;  // raised below by the readers
    tensor.arena_offset = -1;
    tensor.arena_size = 0;
  }
  int32_t next_channel = 0;
  for (int32_t l = 0; l < L; ++l) {
    KpLayer& layer = stage->layers[l];
    layer.op = static_cast<int32_t>(V(v, kKeyLayerOp, l));
    layer.in_a = static_cast<int32_t>(V(v, kKeyLayerInputs, 2 * l));
    layer.in_b = static_cast<int32_t>(V(v, kKeyLayerInputs, 2 * l + 1));
    layer.kernel_h = static_cast<int32_t>(Param(v, l, 0));
    layer.kernel_w = static_cast<int32_t>(Param(v, l, 1));
    layer.stride_h = static_cast<int32_t>(Param(v, l, 2));
    layer.stride_w = static_cast<int32_t>(Param(v, l, 3));
    layer.dilation_h = static_cast<int32_t>(Param(v, l, 4));
    layer.dilation_w = static_cast<int32_t>(Param(v, l, 5));
    layer.pad_top = static_cast<int32_t>(Param(v, l, 6));
    layer.pad_left = static_cast<int32_t>(Param(v, l, 7));
    layer.activation = static_cast<int32_t>(V(v, kKeyLayerActivation, l));
    layer.filter_input = static_cast<int32_t>(V(v, kKeyLayerWeights, 2 * l));
    layer.bias_input = static_cast<int32_t>(V(v, kKeyLayerWeights, 2 * l + 1));
    layer.channel_offset = -1;
    layer.save_offset = -1;
    layer.save_bytes = 0;
    for (int i = 0; i < 3; ++i) layer.multiplier[i] = layer.shift[i] = 0;
    if (stage->tensors[layer.in_a].last_use < l) stage->tensors[layer.in_a].last_use = l;
    if (layer.in_b >= 0 && stage->tensors[layer.in_b].last_use < l) {
      stage->tensors[layer.in_b].last_use = l;
    }
  }
  for (int32_t l = 0; l < L; ++l) {
    KpLayer& layer = stage->layers[l];
    const char* name = OpName(layer.op);
    const KpTensor& in = stage->tensors[layer.in_a];
    const KpTensor& out = stage->tensors[l + 1];
    KpActivationRange(layer.activation, out.scale, out.zero_point, &layer.act_min,
                      &layer.act_max);
    if (layer.act_min > layer.act_max) {
      KP_FAIL_KEY(kKeyLayerActivation, "layer %d (%s) has an empty activation range (%d, %d).",
                  static_cast<int>(l), name, static_cast<int>(layer.act_min),
                  static_cast<int>(layer.act_max));
    }
    if (IsWeighted(layer.op)) {
      if (PrepareWeights(l, get_const, get_const_context, stage, &next_channel, reporter) !=
          kKpOk) {
        return kKpError;
      }
    } else if (layer.op == kKpOpAdd) {
      const float s1 = in.scale, s2 = stage->tensors[layer.in_b].scale, so = out.scale;
      const double twice_max = static_cast<double>(2.0f * (s1 > s2 ? s1 : s2));
      const double real1 = static_cast<double>(s1) / twice_max;
      const double real2 = static_cast<double>(s2) / twice_max;
      const double real_out = twice_max / static_cast<double>(static_cast<float>(1 << 20) * so);
      if (MultiplierBelowOne(real1, l, name, reporter, &layer.multiplier[0], &layer.shift[0]) ||
          MultiplierBelowOne(real2, l, name, reporter, &layer.multiplier[1], &layer.shift[1]) ||
          MultiplierBelowOne(real_out, l, name, reporter, &layer.multiplier[2],
                             &layer.shift[2])) {
        return kKpError;
      }
    } else if (layer.op == kKpOpRelu || layer.op == kKpOpRelu6) {
      const double real = static_cast<double>(in.scale) / static_cast<double>(out.scale);
      if (Multiplier(real, l, name, reporter, &layer.multiplier[0], &layer.shift[0]) != kKpOk) {
        return kKpError;
      }
      KpActivationRange(layer.op == kKpOpRelu ? kKpActRelu : kKpActRelu6, out.scale,
                        out.zero_point, &layer.act_min, &layer.act_max);
    } else if (layer.op == kKpOpMean) {
      if (MeanMultiplier(in, out, l, name, reporter, &layer.multiplier[0], &layer.shift[0]) !=
          kKpOk) {
        return kKpError;
      }
    } else if (in.scale != out.scale || in.zero_point != out.zero_point) {
      // MAX_POOL_2D, AVERAGE_POOL_2D, PAD
      KP_FAIL_KEY(kKeyTensorScale, "layer %d (%s) must keep its input's scale and zero point.",
                  static_cast<int>(l), name);
    }
  }
  if (PlanPatchArena(stage, v.in_place != 0, reporter) != kKpOk) return kKpError;
  if (KpCmsisPlanContext(stage, reporter) != kKpOk) return kKpError;
  *out_stage = stage;
  return kKpOk;
}

KpStatus KpCheckStageIo(const KpStage& stage, bool is_output, int32_t type, int32_t num_dims,
                        const int32_t* dims, float scale, int32_t zero_point,
                        const KpReporter& reporter) {
  const int32_t t = is_output ? stage.num_layers : 0;
  const KpTensor& tensor = stage.tensors[t];
  const char* what = is_output ? "output" : "input";
  // A final MEAN's output may also be [1, C] (TFLite's MEAN without keep_dims).
  const bool flat = is_output && EndsWithMean(stage) && num_dims == 2 && dims != NULL &&
                    dims[0] == 1 && dims[1] == tensor.c;
  if (type != kKpTypeInt8 ||
      (!flat && (num_dims != 4 || dims == NULL || dims[0] != 1 || dims[1] != tensor.h ||
                 dims[2] != tensor.w || dims[3] != tensor.c))) {
    KP_FAIL_KEY(kKeyTensorShape, "the op %s must be int8 of shape [1, %d, %d, %d]%s (stage tensor %d).",
                what, static_cast<int>(tensor.h), static_cast<int>(tensor.w),
                static_cast<int>(tensor.c), is_output && EndsWithMean(stage) ? " or [1, C]" : "",
                static_cast<int>(t));
  }
  if (scale != tensor.scale) {
    KP_FAIL_KEY(kKeyTensorScale, "the op %s's scale differs from stage tensor %d's.", what,
                static_cast<int>(t));
  }
  if (zero_point != tensor.zero_point) {
    KP_FAIL_KEY(kKeyTensorZeroPoint, "the op %s has zero point %d, stage tensor %d has %d.",
                what, static_cast<int>(zero_point), static_cast<int>(t),
                static_cast<int>(tensor.zero_point));
  }
  return kKpOk;
}

}  // namespace keras_patch
