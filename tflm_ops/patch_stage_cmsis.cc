/* Copyright 2026 The keras-patch Authors. Licensed under the Apache License 2.0.

CMSIS-NN fast path of the KP_PATCH_STAGE core; see patch_stage_cmsis.h.
==============================================================================*/
#include "patch_stage_cmsis.h"

#if KP_CMSIS_NN
#include <string.h>

#include KP_CMSIS_NN_HEADER
#include "patch_geometry.h"
#endif

namespace keras_patch {

#if !KP_CMSIS_NN

bool KpCmsisEnabled() { return false; }

KpStatus KpCmsisPlanContext(KpStage* stage, const KpReporter&) {
  stage->context_bytes = 0;
  stage->staging_offset = 0;
  return kKpOk;
}

bool KpCmsisEvalLayer(const KpStage&, int32_t, const int8_t*, int8_t*, uint8_t*, uint8_t*,
                      const void* const*) {
  return false;
}

#else  // KP_CMSIS_NN

namespace {

inline int32_t Max(int32_t a, int32_t b) { return a > b ? a : b; }
inline int32_t Min(int32_t a, int32_t b) { return a < b ? a : b; }
inline uint32_t Align4(uint32_t n) { return (n + 3u) & ~3u; }

// A row-major block of a stage tensor: pixels [y0, y1) x [x0, x1), rows of
// (x1 - x0) * c bytes.
struct Block {
  int8_t* data;
  int32_t y0, y1, x0, x1, c;
  int8_t* At(int32_t y, int32_t x) const { return data + ((y - y0) * (x1 - x0) + (x - x0)) * c; }
};

// Where stage tensor t is for the current patch (tensor 0 and L: the whole
// tensor, in place; intermediates: their region in the patch arena).
Block TensorBlock(const KpStage& s, int32_t t, const int8_t* input, int8_t* output,
                  uint8_t* arena) {
  const KpTensor& tensor = s.tensors[t];
  Block b;
  b.c = tensor.c;
  if (t == 0 || t == s.num_layers) {
    b.data = t == 0 ? const_cast<int8_t*>(input) : output;  // tensor 0 is only read
    b.y0 = b.x0 = 0;
    b.y1 = tensor.h;
    b.x1 = tensor.w;
    return b;
  }
  const KpRegion& r = s.regions[t];
  b.data = arena != NULL ? reinterpret_cast<int8_t*>(arena + tensor.arena_offset) : NULL;
  b.y0 = r.y0;
  b.y1 = r.y1;
  b.x0 = r.x0;
  b.x1 = r.x1;
  return b;
}

bool IsConvLike(int32_t op) { return op == kKpOpConv2D || op == kKpOpDepthwiseConv2D; }

// CONV_2D 1x1, stride 1, dilation 1: CMSIS-NN's 1x1 fast kernel, which
// treats input and output as matrices of the same number of pixels.
bool IsFast1x1(const KpLayer& layer) {
  return layer.op == kKpOpConv2D && layer.kernel_h == 1 && layer.kernel_w == 1 &&
         layer.stride_h == 1 && layer.stride_w == 1 && layer.dilation_h == 1 &&
         layer.dilation_w == 1;
}

// Input window (clipped to the tensor) a conv-like layer reads for output region r.
KpRegion NeededWindow(const KpLayer& layer, const KpTensor& in, const KpRegion& r) {
  KpRegion w;
  w.y0 = Max(r.y0 * layer.stride_h - layer.pad_top, 0);
  w.y1 = Min((r.y1 - 1) * layer.stride_h - layer.pad_top + (layer.kernel_h - 1) * layer.dilation_h + 1,
             in.h);
  w.x0 = Max(r.x0 * layer.stride_w - layer.pad_left, 0);
  w.x1 = Min((r.x1 - 1) * layer.stride_w - layer.pad_left + (layer.kernel_w - 1) * layer.dilation_w + 1,
             in.w);
  return w;
}

// True when the stored input block [bx0, bx1) can be passed as it is: the
// left padding it implies is >= 0 and, for the 1x1 fast kernel, its width
// is the output's.
bool InPlace(const KpLayer& layer, int32_t bx0, int32_t bx1, const KpRegion& r) {
  if (layer.pad_left + bx0 - r.x0 * layer.stride_w < 0) return false;
  return !IsFast1x1(layer) || bx1 - bx0 == r.x1 - r.x0;
}

void BlockXRange(const KpStage& s, int32_t t, int32_t* x0, int32_t* x1) {
  if (t == 0) {
    *x0 = 0;
    *x1 = s.tensors[0].w;
  } else {
    *x0 = s.regions[t].x0;
    *x1 = s.regions[t].x1;
  }
}

cmsis_nn_dims Dims(int32_t n, int32_t h, int32_t w, int32_t c) {
  cmsis_nn_dims d;
  d.n = n;
  d.h = h;
  d.w = w;
  d.c = c;
  return d;
}

// One CMSIS-NN call of a conv-like layer for output rows [a, b) and columns
// [r.x0, r.x1), written at `dst` (rows of (r.x1 - r.x0) * C_out bytes).
bool ConvCall(const KpStage& s, const KpLayer& layer, const Block& in, const KpRegion& r,
              int32_t a, int32_t b, int8_t* dst, uint8_t* context, const int8_t* filter,
              const int32_t* bias, int32_t l) {
  const KpTensor& out_t = s.tensors[l + 1];
  const KpTensor& in_t = s.tensors[layer.in_a];
  const int32_t top = a * layer.stride_h - layer.pad_top;
  const int32_t start = Max(top, in.y0);
  const int32_t end = Min(in.y1, (b - 1) * layer.stride_h - layer.pad_top +
                                     (layer.kernel_h - 1) * layer.dilation_h + 1);
  const int32_t pad_w = layer.pad_left + in.x0 - r.x0 * layer.stride_w;
  if (end <= start || pad_w < 0) return false;
  const cmsis_nn_dims input_dims = Dims(1, end - start, in.x1 - in.x0, in.c);
  const cmsis_nn_dims output_dims = Dims(1, b - a, r.x1 - r.x0, out_t.c);
  const cmsis_nn_dims bias_dims = Dims(1, 1, 1, out_t.c);
  cmsis_nn_per_channel_quant_params quant;
  quant.multiplier = s.channel_multiplier + layer.channel_offset;
  quant.shift = s.channel_shift + layer.channel_offset;
  cmsis_nn_context ctx;
  ctx.buf = s.staging_offset > 0 ? context : NULL;
  ctx.size = static_cast<int32_t>(s.staging_offset);
  const int8_t* src = in.At(start, in.x0);
  arm_cmsis_nn_status status;
  if (layer.op == kKpOpConv2D) {
    cmsis_nn_conv_params p;
    p.input_offset = -in_t.zero_point;
    p.output_offset = out_t.zero_point;
    p.stride.h = layer.stride_h;
    p.stride.w = layer.stride_w;
    p.padding.h = start - top;
    p.padding.w = pad_w;
    p.dilation.h = layer.dilation_h;
    p.dilation.w = layer.dilation_w;
    p.activation.min = layer.act_min;
    p.activation.max = layer.act_max;
    const cmsis_nn_dims filter_dims = Dims(out_t.c, layer.kernel_h, layer.kernel_w, in_t.c);
    status = arm_convolve_wrapper_s8(&ctx, &p, &quant, &input_dims, src, &filter_dims, filter,
                                     &bias_dims, bias, &output_dims, dst);
  } else {
    cmsis_nn_dw_conv_params p;
    p.input_offset = -in_t.zero_point;
    p.output_offset = out_t.zero_point;
    p.ch_mult = out_t.c / in_t.c;
    p.stride.h = layer.stride_h;
    p.stride.w = layer.stride_w;
    p.padding.h = start - top;
    p.padding.w = pad_w;
    p.dilation.h = layer.dilation_h;
    p.dilation.w = layer.dilation_w;
    p.activation.min = layer.act_min;
    p.activation.max = layer.act_max;
    const cmsis_nn_dims filter_dims = Dims(1, layer.kernel_h, layer.kernel_w, out_t.c);
    status = arm_depthwise_conv_wrapper_s8(&ctx, &p, &quant, &input_dims, src, &filter_dims,
                                           filter, &bias_dims, bias, &output_dims, dst);
  }
  return status == ARM_CMSIS_NN_SUCCESS;
}

// Input rows [y0, y1) (clipped to the tensor) that output row y of a
// conv-like layer reads.
void RowWindow(const KpLayer& layer, const KpTensor& in, int32_t y, int32_t* y0, int32_t* y1) {
  *y0 = Max(y * layer.stride_h - layer.pad_top, 0);
  *y1 = Min(y * layer.stride_h - layer.pad_top + (layer.kernel_h - 1) * layer.dilation_h + 1, in.h);
}

bool ConvLayer(const KpStage& s, int32_t l, const int8_t* input, int8_t* output, uint8_t* arena,
               uint8_t* context, const void* const* op_inputs) {
  const KpLayer& layer = s.layers[l];
  const KpRegion& r = s.regions[l + 1];
  const KpTensor& in_t = s.tensors[layer.in_a];
  const Block in = TensorBlock(s, layer.in_a, input, output, arena);
  const Block out = TensorBlock(s, l + 1, input, output, arena);
  const int8_t* filter = static_cast<const int8_t*>(op_inputs[layer.filter_input]);
  const int32_t* bias =
      layer.bias_input >= 0 ? static_cast<const int32_t*>(op_inputs[layer.bias_input]) : NULL;
  if (InPlace(layer, in.x0, in.x1, r)) {
    if (out.x0 == r.x0 && out.x1 == r.x1) {  // contiguous output rows: one call
      return ConvCall(s, layer, in, r, r.y0, r.y1, out.At(r.y0, r.x0), context, filter, bias, l);
    }
    for (int32_t y = r.y0; y < r.y1; ++y) {  // the op output of a column tile: row by row
      if (!ConvCall(s, layer, in, r, y, y + 1, out.At(y, r.x0), context, filter, bias, l)) {
        return false;
      }
    }
    return true;
  }
  // One output row per call, its input rows (the needed columns only) copied
  // to the staging area planned in Prepare.
  const KpRegion w = NeededWindow(layer, in_t, r);
  if (context == NULL || w.x1 <= w.x0) return false;
  int8_t* staged = reinterpret_cast<int8_t*>(context + s.staging_offset);
  const size_t row = static_cast<size_t>((w.x1 - w.x0) * in.c);
  for (int32_t y = r.y0; y < r.y1; ++y) {
    Block band = {staged, 0, 0, w.x0, w.x1, in.c};
    RowWindow(layer, in_t, y, &band.y0, &band.y1);
    for (int32_t iy = band.y0; iy < band.y1; ++iy) {
      memcpy(staged + static_cast<size_t>(iy - band.y0) * row, in.At(iy, w.x0), row);
    }
    if (!ConvCall(s, layer, band, r, y, y + 1, out.At(y, r.x0), context, filter, bias, l)) {
      return false;
    }
  }
  return true;
}

bool AddLayer(const KpStage& s, int32_t l, const int8_t* input, int8_t* output, uint8_t* arena) {
  const KpLayer& layer = s.layers[l];
  const KpRegion& r = s.regions[l + 1];
  const Block a = TensorBlock(s, layer.in_a, input, output, arena);
  const Block b = TensorBlock(s, layer.in_b, input, output, arena);
  const Block out = TensorBlock(s, l + 1, input, output, arena);
  const bool contiguous = a.x0 == r.x0 && a.x1 == r.x1 && b.x0 == r.x0 && b.x1 == r.x1 &&
                          out.x0 == r.x0 && out.x1 == r.x1;
  const int32_t rows_per_call = contiguous ? r.y1 - r.y0 : 1;
  const int32_t block = rows_per_call * (r.x1 - r.x0) * out.c;
  for (int32_t y = r.y0; y < r.y1; y += rows_per_call) {
    const arm_cmsis_nn_status status = arm_elementwise_add_s8(
        a.At(y, r.x0), b.At(y, r.x0), -s.tensors[layer.in_a].zero_point, layer.multiplier[0],
        layer.shift[0], -s.tensors[layer.in_b].zero_point, layer.multiplier[1], layer.shift[1],
        20, out.At(y, r.x0), s.tensors[l + 1].zero_point, layer.multiplier[2], layer.shift[2],
        layer.act_min, layer.act_max, block);
    if (status != ARM_CMSIS_NN_SUCCESS) return false;
  }
  return true;
}

// CMSIS-NN's context buffer for a conv-like layer, for the whole-tensor
// geometry with the layer's own padding (every per-patch call has the same
// channels and kernel and paddings <= the layer's, so it needs no more).
int32_t LayerContextBytes(const KpStage& s, const KpLayer& layer, int32_t l) {
  const KpTensor& in_t = s.tensors[layer.in_a];
  const KpTensor& out_t = s.tensors[l + 1];
  const cmsis_nn_dims input_dims = Dims(1, in_t.h, in_t.w, in_t.c);
  const cmsis_nn_dims output_dims = Dims(1, out_t.h, out_t.w, out_t.c);
  if (layer.op == kKpOpConv2D) {
    cmsis_nn_conv_params p;
    memset(&p, 0, sizeof(p));
    p.stride.h = layer.stride_h;
    p.stride.w = layer.stride_w;
    p.padding.h = layer.pad_top;
    p.padding.w = layer.pad_left;
    p.dilation.h = layer.dilation_h;
    p.dilation.w = layer.dilation_w;
    const cmsis_nn_dims filter_dims = Dims(out_t.c, layer.kernel_h, layer.kernel_w, in_t.c);
    return arm_convolve_wrapper_s8_get_buffer_size(&p, &input_dims, &filter_dims, &output_dims);
  }
  cmsis_nn_dw_conv_params p;
  memset(&p, 0, sizeof(p));
  p.ch_mult = out_t.c / in_t.c;
  p.stride.h = layer.stride_h;
  p.stride.w = layer.stride_w;
  p.padding.h = layer.pad_top;
  p.padding.w = layer.pad_left;
  p.dilation.h = layer.dilation_h;
  p.dilation.w = layer.dilation_w;
  const cmsis_nn_dims filter_dims = Dims(1, layer.kernel_h, layer.kernel_w, out_t.c);
  return arm_depthwise_conv_wrapper_s8_get_buffer_size(&p, &input_dims, &filter_dims,
                                                       &output_dims);
}

}  // namespace

bool KpCmsisEnabled() { return true; }

KpStatus KpCmsisPlanContext(KpStage* stage, const KpReporter& reporter) {
  KpStage& s = *stage;
  int32_t cmsis_bytes = 0;
  for (int32_t l = 0; l < s.num_layers; ++l) {
    // In-place layers (save_offset >= 0) run the portable kernel: no context.
    if (IsConvLike(s.layers[l].op) && s.layers[l].save_offset < 0) {
      cmsis_bytes = Max(cmsis_bytes, LayerContextBytes(s, s.layers[l], l));
    }
  }
  // Staging: the largest band of input rows (one output row's, the region's
  // columns) copied by a conv-like layer of any patch.
  int64_t staging = 0;
  const int32_t num_tiles = s.grid_h * s.grid_w;
  for (int32_t tile = 0; tile < num_tiles; ++tile) {
    PatchRegions(s, StageTile(s, tile), s.regions);
    for (int32_t l = 0; l < s.num_layers; ++l) {
      const KpLayer& layer = s.layers[l];
      const KpRegion& r = s.regions[l + 1];
      if (!IsConvLike(layer.op) || RegionEmpty(r) || layer.save_offset >= 0) continue;
      int32_t x0, x1;
      BlockXRange(s, layer.in_a, &x0, &x1);
      if (InPlace(layer, x0, x1, r)) continue;
      const KpTensor& in_t = s.tensors[layer.in_a];
      const KpRegion w = NeededWindow(layer, in_t, r);
      for (int32_t y = r.y0; y < r.y1; ++y) {
        int32_t y0, y1;
        RowWindow(layer, in_t, y, &y0, &y1);
        const int64_t bytes = static_cast<int64_t>(y1 - y0) * (w.x1 - w.x0) * in_t.c;
        if (bytes > staging) staging = bytes;
      }
    }
  }
  const int64_t total = (static_cast<int64_t>(cmsis_bytes) + 3) / 4 * 4 + (staging + 3) / 4 * 4;
  if (cmsis_bytes < 0 || total > 0x7FFFFFFF) {
    reporter.report(reporter.context,
                    "KP_PATCH_STAGE options: key 'tensor_shape': the CMSIS-NN context buffer "
                    "exceeds 2^31 - 1 bytes.");
    return kKpError;
  }
  s.staging_offset = Align4(static_cast<uint32_t>(cmsis_bytes));
  s.context_bytes = static_cast<uint32_t>(total);
  return kKpOk;
}

bool KpCmsisEvalLayer(const KpStage& s, int32_t l, const int8_t* input, int8_t* output,
                      uint8_t* arena, uint8_t* context, const void* const* op_inputs) {
  const int32_t op = s.layers[l].op;
  if (IsConvLike(op)) return ConvLayer(s, l, input, output, arena, context, op_inputs);
  if (op == kKpOpAdd) return AddLayer(s, l, input, output, arena);
  return false;
}

#endif  // KP_CMSIS_NN

}  // namespace keras_patch
