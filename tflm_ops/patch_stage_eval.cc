/* Copyright 2026 The keras-patch Authors. Licensed under the Apache License 2.0.

KP_PATCH_STAGE Eval: for each output tile, every layer computes only the
region of its output the tile needs (docs/patch_stage_op.md, "Patch
geometry"), with TFLite's int8 reference arithmetic.  Intermediates live in
the patch arena at their planned offsets; nothing is allocated.
==============================================================================*/
#include <string.h>

#include "int8_arith.h"
#include "patch_geometry.h"
#include "patch_stage_cmsis.h"
#include "patch_stage_core.h"

namespace keras_patch {
namespace {

// Pixels of a region of a full stage tensor: pixel (y, x) channel k is at
// data[(y - y0) * row_stride + (x - x0) * c + k].
struct ConstPlane {
  const int8_t* data;
  int32_t y0, x0, row_stride, c;
  const int8_t* At(int32_t y, int32_t x) const { return data + (y - y0) * row_stride + (x - x0) * c; }
};
struct Plane {
  int8_t* data;
  int32_t y0, x0, row_stride, c;
  int8_t* At(int32_t y, int32_t x) const { return data + (y - y0) * row_stride + (x - x0) * c; }
};

inline int32_t Clamp(int32_t v, int32_t lo, int32_t hi) { return v < lo ? lo : (v > hi ? hi : v); }

void Conv(const KpStage& s, const KpLayer& layer, const ConstPlane& in, const KpTensor& in_t,
          const KpRegion& r, const Plane& out, const int8_t* filter, const int32_t* bias,
          int32_t in_zp, int32_t out_zp) {
  const int32_t in_c = in_t.c, out_c = out.c;
  const int32_t* mult = s.channel_multiplier + layer.channel_offset;
  const int32_t* shift = s.channel_shift + layer.channel_offset;
  for (int32_t oy = r.y0; oy < r.y1; ++oy) {
    const int32_t iy0 = oy * layer.stride_h - layer.pad_top;
    for (int32_t ox = r.x0; ox < r.x1; ++ox) {
      const int32_t ix0 = ox * layer.stride_w - layer.pad_left;
      int8_t* dst = out.At(oy, ox);
      for (int32_t oc = 0; oc < out_c; ++oc) {
        int32_t acc = 0;
        for (int32_t ky = 0; ky < layer.kernel_h; ++ky) {
          const int32_t iy = iy0 + ky * layer.dilation_h;
          if (iy < 0 || iy >= in_t.h) continue;
          for (int32_t kx = 0; kx < layer.kernel_w; ++kx) {
            const int32_t ix = ix0 + kx * layer.dilation_w;
            if (ix < 0 || ix >= in_t.w) continue;
            const int8_t* x = in.At(iy, ix);
            const int8_t* f = filter + ((oc * layer.kernel_h + ky) * layer.kernel_w + kx) * in_c;
            for (int32_t ic = 0; ic < in_c; ++ic) acc += f[ic] * (x[ic] - in_zp);
          }
        }
        if (bias != NULL) acc += bias[oc];
        acc = arith::MultiplyByQuantizedMultiplier(acc, mult[oc], shift[oc]) + out_zp;
        dst[oc] = static_cast<int8_t>(Clamp(acc, layer.act_min, layer.act_max));
      }
    }
  }
}

void DepthwiseConv(const KpStage& s, const KpLayer& layer, const ConstPlane& in,
                   const KpTensor& in_t, const KpRegion& r, const Plane& out,
                   const int8_t* filter, const int32_t* bias, int32_t in_zp, int32_t out_zp) {
  const int32_t in_c = in_t.c, out_c = out.c, depth_multiplier = out_c / in_c;
  const int32_t* mult = s.channel_multiplier + layer.channel_offset;
  const int32_t* shift = s.channel_shift + layer.channel_offset;
  for (int32_t oy = r.y0; oy < r.y1; ++oy) {
    const int32_t iy0 = oy * layer.stride_h - layer.pad_top;
    for (int32_t ox = r.x0; ox < r.x1; ++ox) {
      const int32_t ix0 = ox * layer.stride_w - layer.pad_left;
      int8_t* dst = out.At(oy, ox);
      for (int32_t ic = 0; ic < in_c; ++ic) {
        for (int32_t m = 0; m < depth_multiplier; ++m) {
          const int32_t oc = ic * depth_multiplier + m;
          int32_t acc = 0;
          for (int32_t ky = 0; ky < layer.kernel_h; ++ky) {
            const int32_t iy = iy0 + ky * layer.dilation_h;
            if (iy < 0 || iy >= in_t.h) continue;
            for (int32_t kx = 0; kx < layer.kernel_w; ++kx) {
              const int32_t ix = ix0 + kx * layer.dilation_w;
              if (ix < 0 || ix >= in_t.w) continue;
              const int32_t x = in.At(iy, ix)[ic];
              const int32_t f = filter[(ky * layer.kernel_w + kx) * out_c + oc];
              acc += f * (x - in_zp);
            }
          }
          if (bias != NULL) acc += bias[oc];
          acc = arith::MultiplyByQuantizedMultiplier(acc, mult[oc], shift[oc]) + out_zp;
          dst[oc] = static_cast<int8_t>(Clamp(acc, layer.act_min, layer.act_max));
        }
      }
    }
  }
}

// DEPTHWISE_CONV_2D in place (docs "In place"): depth multiplier 1; one
// channel at a time, plane c of the input region `in_r` is copied to `save`
// (row-major, in_r's width) and output channel c of every pixel of `r` is
// computed from it.  Writes only channel c after saving it, so `out` may
// share memory with `in` (pixel i of both at the same byte offset i * C + c).
void DepthwiseConvInPlace(const KpStage& s, const KpLayer& layer, const ConstPlane& in,
                          const KpTensor& in_t, const KpRegion& in_r, const KpRegion& r,
                          const Plane& out, const int8_t* filter, const int32_t* bias,
                          int32_t in_zp, int32_t out_zp, int8_t* save) {
  const int32_t channels = out.c;
  const int32_t* mult = s.channel_multiplier + layer.channel_offset;
  const int32_t* shift = s.channel_shift + layer.channel_offset;
  const int32_t save_w = in_r.x1 - in_r.x0;
  for (int32_t c = 0; c < channels; ++c) {
    for (int32_t y = in_r.y0; y < in_r.y1; ++y) {
      int8_t* dst = save + (y - in_r.y0) * save_w;
      for (int32_t x = in_r.x0; x < in_r.x1; ++x) dst[x - in_r.x0] = in.At(y, x)[c];
    }
    for (int32_t oy = r.y0; oy < r.y1; ++oy) {
      const int32_t iy0 = oy * layer.stride_h - layer.pad_top;
      for (int32_t ox = r.x0; ox < r.x1; ++ox) {
        const int32_t ix0 = ox * layer.stride_w - layer.pad_left;
        int32_t acc = 0;
        for (int32_t ky = 0; ky < layer.kernel_h; ++ky) {
          const int32_t iy = iy0 + ky * layer.dilation_h;
          if (iy < 0 || iy >= in_t.h) continue;
          const int8_t* row = save + (iy - in_r.y0) * save_w - in_r.x0;
          for (int32_t kx = 0; kx < layer.kernel_w; ++kx) {
            const int32_t ix = ix0 + kx * layer.dilation_w;
            if (ix < 0 || ix >= in_t.w) continue;
            const int32_t f = filter[(ky * layer.kernel_w + kx) * channels + c];
            acc += f * (static_cast<int32_t>(row[ix]) - in_zp);
          }
        }
        if (bias != NULL) acc += bias[c];
        acc = arith::MultiplyByQuantizedMultiplier(acc, mult[c], shift[c]) + out_zp;
        out.At(oy, ox)[c] = static_cast<int8_t>(Clamp(acc, layer.act_min, layer.act_max));
      }
    }
  }
}

void Pool(const KpLayer& layer, const ConstPlane& in, const KpTensor& in_t, const KpRegion& r,
          const Plane& out) {
  const bool is_max = layer.op == kKpOpMaxPool2D;
  for (int32_t oy = r.y0; oy < r.y1; ++oy) {
    const int32_t iy0 = oy * layer.stride_h - layer.pad_top;
    const int32_t ky0 = iy0 < 0 ? -iy0 : 0;
    const int32_t ky1 = layer.kernel_h < in_t.h - iy0 ? layer.kernel_h : in_t.h - iy0;
    for (int32_t ox = r.x0; ox < r.x1; ++ox) {
      const int32_t ix0 = ox * layer.stride_w - layer.pad_left;
      const int32_t kx0 = ix0 < 0 ? -ix0 : 0;
      const int32_t kx1 = layer.kernel_w < in_t.w - ix0 ? layer.kernel_w : in_t.w - ix0;
      int8_t* dst = out.At(oy, ox);
      for (int32_t ch = 0; ch < out.c; ++ch) {
        int32_t acc = is_max ? -128 : 0;
        int32_t count = 0;
        for (int32_t ky = ky0; ky < ky1; ++ky) {
          for (int32_t kx = kx0; kx < kx1; ++kx) {
            const int32_t x = in.At(iy0 + ky, ix0 + kx)[ch];
            if (is_max) {
              acc = x > acc ? x : acc;
            } else {
              acc += x;
            }
            ++count;
          }
        }
        if (!is_max && count > 0) {
          acc = acc > 0 ? (acc + count / 2) / count : (acc - count / 2) / count;
        }
        dst[ch] = static_cast<int8_t>(Clamp(acc, layer.act_min, layer.act_max));
      }
    }
  }
}

void Pad(const KpLayer& layer, const ConstPlane& in, const KpTensor& in_t, const KpRegion& r,
         const Plane& out, int32_t out_zp) {
  for (int32_t oy = r.y0; oy < r.y1; ++oy) {
    const int32_t iy = oy - layer.pad_top;
    for (int32_t ox = r.x0; ox < r.x1; ++ox) {
      const int32_t ix = ox - layer.pad_left;
      int8_t* dst = out.At(oy, ox);
      if (iy >= 0 && iy < in_t.h && ix >= 0 && ix < in_t.w) {
        memcpy(dst, in.At(iy, ix), static_cast<size_t>(out.c));
      } else {
        memset(dst, static_cast<int8_t>(out_zp), static_cast<size_t>(out.c));
      }
    }
  }
}

void Add(const KpLayer& layer, const ConstPlane& a, const ConstPlane& b, const KpRegion& r,
         const Plane& out, int32_t zp_a, int32_t zp_b, int32_t zp_out) {
  for (int32_t y = r.y0; y < r.y1; ++y) {
    for (int32_t x = r.x0; x < r.x1; ++x) {
      const int8_t* pa = a.At(y, x);
      const int8_t* pb = b.At(y, x);
      int8_t* dst = out.At(y, x);
      for (int32_t ch = 0; ch < out.c; ++ch) {
        const int32_t sa = (pa[ch] - zp_a) * (1 << 20);
        const int32_t sb = (pb[ch] - zp_b) * (1 << 20);
        const int32_t scaled_a = arith::MultiplyByQuantizedMultiplierSmallerThanOneExp(
            sa, layer.multiplier[0], layer.shift[0]);
        const int32_t scaled_b = arith::MultiplyByQuantizedMultiplierSmallerThanOneExp(
            sb, layer.multiplier[1], layer.shift[1]);
        const int32_t raw = arith::MultiplyByQuantizedMultiplierSmallerThanOneExp(
                                scaled_a + scaled_b, layer.multiplier[2], layer.shift[2]) +
                            zp_out;
        dst[ch] = static_cast<int8_t>(Clamp(raw, layer.act_min, layer.act_max));
      }
    }
  }
}

void Relu(const KpLayer& layer, const ConstPlane& in, const KpRegion& r, const Plane& out,
          int32_t in_zp, int32_t out_zp) {
  for (int32_t y = r.y0; y < r.y1; ++y) {
    for (int32_t x = r.x0; x < r.x1; ++x) {
      const int8_t* src = in.At(y, x);
      int8_t* dst = out.At(y, x);
      for (int32_t ch = 0; ch < out.c; ++ch) {
        const int32_t v = out_zp + arith::MultiplyByQuantizedMultiplier(
                                       src[ch] - in_zp, layer.multiplier[0], layer.shift[0]);
        dst[ch] = static_cast<int8_t>(Clamp(v, layer.act_min, layer.act_max));
      }
    }
  }
}

// A final MEAN (docs "Global average pool"): adds the tile's pixels of its
// input (raw int8 values) to the per-channel int32 sums.
void MeanAccumulate(const ConstPlane& in, const KpRegion& tile, int32_t* sums) {
  for (int32_t y = tile.y0; y < tile.y1; ++y) {
    for (int32_t x = tile.x0; x < tile.x1; ++x) {
      const int8_t* src = in.At(y, x);
      for (int32_t ch = 0; ch < in.c; ++ch) sums[ch] += src[ch];
    }
  }
}

// After the last tile: TFLM's int8 MEAN requantization of the sums
// (QuantizedMeanOrSum; layer.multiplier[0] / shift[0] have 1 / n folded in).
void MeanOutput(const KpLayer& layer, const int32_t* sums, int32_t n, int32_t channels,
                int32_t in_zp, int32_t out_zp, int8_t* output) {
  for (int32_t ch = 0; ch < channels; ++ch) {
    const int32_t v = arith::MultiplyByQuantizedMultiplier(sums[ch] - in_zp * n,
                                                           layer.multiplier[0], layer.shift[0]) +
                      out_zp;
    output[ch] = static_cast<int8_t>(Clamp(v, -128, 127));
  }
}

// Where stage tensor t's pixels of this patch are.
Plane TensorPlane(const KpStage& s, int32_t t, int8_t* input_or_output, uint8_t* arena) {
  const KpTensor& tensor = s.tensors[t];
  Plane p;
  p.c = tensor.c;
  if (t == 0 || t == s.num_layers) {
    p.data = input_or_output;
    p.y0 = p.x0 = 0;
    p.row_stride = tensor.w * tensor.c;
    return p;
  }
  const KpRegion& r = s.regions[t];
  p.y0 = r.y0;
  p.x0 = r.x0;
  p.row_stride = (r.x1 - r.x0) * tensor.c;
  p.data = RegionEmpty(r) ? NULL : reinterpret_cast<int8_t*>(arena + tensor.arena_offset);
  return p;
}

ConstPlane AsConst(const Plane& p) {
  ConstPlane c = {p.data, p.y0, p.x0, p.row_stride, p.c};
  return c;
}

}  // namespace

KpStatus KpEvalStage(KpStage* stage, const int8_t* input, int8_t* output,
                     const void* const* op_inputs, uint8_t* arena, const KpReporter& reporter) {
  return KpEvalStage(stage, input, output, op_inputs, arena, NULL, reporter);
}

KpStatus KpEvalStage(KpStage* stage, const int8_t* input, int8_t* output,
                     const void* const* op_inputs, uint8_t* arena, uint8_t* context,
                     const KpReporter& reporter) {
  KpStage& s = *stage;
  if (input == NULL || output == NULL || (s.arena_bytes > 0 && arena == NULL) ||
      (s.context_bytes > 0 && context == NULL)) {
    reporter.report(reporter.context,
                    "KP_PATCH_STAGE Eval: missing input, output, arena or CMSIS-NN context.");
    return kKpError;
  }
  {
    // Input and output may share memory only as docs "In place" allows: a
    // one-layer in-place stage with output == input (an offline plan that
    // overlaps them otherwise would give wrong bits: refuse it).
    const KpTensor& in_t = s.tensors[0];
    const KpTensor& out_t = s.tensors[s.num_layers];
    const uintptr_t in0 = reinterpret_cast<uintptr_t>(input);
    const uintptr_t out0 = reinterpret_cast<uintptr_t>(output);
    const uintptr_t in1 = in0 + static_cast<uintptr_t>(in_t.h) * in_t.w * in_t.c;
    const uintptr_t out1 = out0 + static_cast<uintptr_t>(out_t.h) * out_t.w * out_t.c;
    const bool in_place = s.num_layers == 1 && s.layers[0].save_offset >= 0;
    if (in0 < out1 && out0 < in1 && !(in_place && in0 == out0)) {
      reporter.report(reporter.context,
                      "KP_PATCH_STAGE Eval: the output overlaps the input; only a one-layer "
                      "in-place stage may share its input's memory, at the same address.");
      return kKpError;
    }
  }
  const bool mean = EndsWithMean(s);
  const int32_t tiled = TiledTensor(s);  // layers 0 .. tiled-1 run per tile
  if (mean && (reinterpret_cast<uintptr_t>(arena) & 3u) != 0) {
    reporter.report(reporter.context,
                    "KP_PATCH_STAGE Eval: the patch arena must be 4-byte aligned (MEAN sums).");
    return kKpError;
  }
  int32_t* sums = mean ? reinterpret_cast<int32_t*>(arena) : NULL;
  if (mean) memset(sums, 0, static_cast<size_t>(s.tensors[s.num_layers].c) * sizeof(int32_t));
  for (int32_t l = 0; l < s.num_layers; ++l) {
    const KpLayer& layer = s.layers[l];
    if ((layer.op == kKpOpConv2D || layer.op == kKpOpDepthwiseConv2D) &&
        (op_inputs == NULL || op_inputs[layer.filter_input] == NULL ||
         (layer.bias_input >= 0 && op_inputs[layer.bias_input] == NULL))) {
      reporter.report(reporter.context, "KP_PATCH_STAGE Eval: layer %d has no weight data.",
                      static_cast<int>(l));
      return kKpError;
    }
  }
  const int32_t num_tiles = s.grid_h * s.grid_w;
  for (int32_t tile = 0; tile < num_tiles; ++tile) {
    const KpRegion tile_region = StageTile(s, tile);
    PatchRegions(s, tile_region, s.regions);
    for (int32_t l = 0; l < tiled; ++l) {
      const KpRegion& r = s.regions[l + 1];
      if (RegionEmpty(r)) continue;
      const KpLayer& layer = s.layers[l];
#if KP_CMSIS_NN
      // CONV_2D, DEPTHWISE_CONV_2D and ADD through CMSIS-NN (patch_stage_cmsis.h);
      // false: this layer of this patch runs the portable kernel below.  In-place
      // layers always run the portable kernel (CMSIS-NN needs separate buffers).
      if (layer.save_offset < 0 &&
          KpCmsisEvalLayer(s, l, input, output, arena, context, op_inputs)) {
        continue;
      }
#endif
      const KpTensor& in_t = s.tensors[layer.in_a];
      const KpTensor& out_t = s.tensors[l + 1];
      int8_t* io = const_cast<int8_t*>(input);  // tensor 0 is only read
      const ConstPlane in = AsConst(TensorPlane(s, layer.in_a, io, arena));
      const Plane out = TensorPlane(s, l + 1, output, arena);
      switch (layer.op) {
        case kKpOpConv2D:
        case kKpOpDepthwiseConv2D: {
          const int8_t* filter = static_cast<const int8_t*>(op_inputs[layer.filter_input]);
          const int32_t* bias = layer.bias_input >= 0
                                    ? static_cast<const int32_t*>(op_inputs[layer.bias_input])
                                    : NULL;
          if (layer.op == kKpOpConv2D) {
            Conv(s, layer, in, in_t, r, out, filter, bias, in_t.zero_point, out_t.zero_point);
          } else if (layer.save_offset >= 0) {
            DepthwiseConvInPlace(s, layer, in, in_t, s.regions[layer.in_a], r, out, filter, bias,
                                 in_t.zero_point, out_t.zero_point,
                                 reinterpret_cast<int8_t*>(arena + layer.save_offset));
          } else {
            DepthwiseConv(s, layer, in, in_t, r, out, filter, bias, in_t.zero_point,
                          out_t.zero_point);
          }
          break;
        }
        case kKpOpMaxPool2D:
        case kKpOpAveragePool2D:
          Pool(layer, in, in_t, r, out);
          break;
        case kKpOpPad:
          Pad(layer, in, in_t, r, out, out_t.zero_point);
          break;
        case kKpOpAdd: {
          const ConstPlane b = AsConst(TensorPlane(s, layer.in_b, io, arena));
          Add(layer, in, b, r, out, in_t.zero_point, s.tensors[layer.in_b].zero_point,
              out_t.zero_point);
          break;
        }
        default:  // kKpOpRelu, kKpOpRelu6 (Prepare accepted no other op)
          Relu(layer, in, r, out, in_t.zero_point, out_t.zero_point);
          break;
      }
    }
    if (mean) {  // the tile of tensor `tiled` (tensor 0 itself in a one-layer stage)
      int8_t* io = const_cast<int8_t*>(input);  // tensor 0 is only read
      MeanAccumulate(AsConst(TensorPlane(s, tiled, io, arena)), tile_region, sums);
    }
  }
  if (mean) {
    const KpTensor& in_t = s.tensors[tiled];
    MeanOutput(s.layers[s.num_layers - 1], sums, in_t.h * in_t.w, s.tensors[s.num_layers].c,
               in_t.zero_point, s.tensors[s.num_layers].zero_point, output);
  }
  return kKpOk;
}

}  // namespace keras_patch
