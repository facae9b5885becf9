/* Copyright 2026 The keras-patch Authors. Licensed under the Apache License 2.0.

Constants and plain data of the KP_PATCH_STAGE portable core
(docs/patch_stage_op.md is the specification).
==============================================================================*/
#ifndef KERAS_PATCH_TFLM_OPS_PATCH_STAGE_TYPES_H_
#define KERAS_PATCH_TFLM_OPS_PATCH_STAGE_TYPES_H_

#include <stddef.h>
#include <stdint.h>

namespace keras_patch {

enum KpStatus { kKpOk = 0, kKpError = 1 };

// printf-like error sink.  Formats use only %d and %s (TFLM's MicroPrintf
// subset); every options error message names its key as 'key'.
typedef void (*KpReportFn)(void* context, const char* format, ...);
struct KpReporter {
  KpReportFn report;
  void* context;
};

// Newest options version read; versions 1 (no 'in_place') and 2 (no MEAN
// layer) are read too.
static const int32_t kKpOptionsVersion = 3;
// The first version with a MEAN layer (docs "Global average pool").
static const int32_t kKpMeanSinceVersion = 3;
// Most pixels (H * W) a MEAN layer averages: its int32 sums cannot overflow.
static const int32_t kKpMaxMeanPixels = 1 << 22;
static const int32_t kKpMinOptionsVersion = 1;
static const int32_t kKpMaxLayers = 256;
static const int32_t kKpMaxGrid = 64;
static const int32_t kKpMaxDim = 65536;
static const int32_t kKpLayerParamsWidth = 8;

// Layer op codes: TFLite BuiltinOperator values.
enum KpLayerOp {
  kKpOpAdd = 0,
  kKpOpAveragePool2D = 1,
  kKpOpConv2D = 3,
  kKpOpDepthwiseConv2D = 4,
  kKpOpMaxPool2D = 17,
  kKpOpRelu = 19,
  kKpOpRelu6 = 21,
  kKpOpPad = 34,
  kKpOpMean = 40,  // options version 3, only as the last layer
};

// Fused activations: TFLite ActivationFunctionType values.
enum KpActivation {
  kKpActNone = 0,
  kKpActRelu = 1,
  kKpActReluN1To1 = 2,
  kKpActRelu6 = 3,
};

// The options keys, in the order of the spec's table.  Key names, types and
// lengths are written exactly as in docs/patch_stage_op.md and
// keras_patch.stage.options.OPTION_KEYS (tests/test_kernel_keys.py checks
// the three agree).  The parser looks keys up through this table.
enum KpOptionKeyIndex {
  kKeyVersion = 0,
  kKeyGrid,
  kKeyNumLayers,
  kKeyTensorShape,
  kKeyTensorScale,
  kKeyTensorZeroPoint,
  kKeyLayerOp,
  kKeyLayerInputs,
  kKeyLayerParams,
  kKeyLayerActivation,
  kKeyLayerWeights,
  kKeyInPlace,
  kKpNumOptionKeys
};
struct KpOptionKey {
  const char* name;
  const char* type;
  const char* length;
};
// KP_OPTION_KEYS_BEGIN
static const KpOptionKey kKpOptionKeys[kKpNumOptionKeys] = {
    {"version", "int", "scalar"},
    {"grid", "int vector", "2"},
    {"num_layers", "int", "scalar"},
    {"tensor_shape", "int vector", "3 * (L + 1)"},
    {"tensor_scale", "float vector", "L + 1"},
    {"tensor_zero_point", "int vector", "L + 1"},
    {"layer_op", "int vector", "L"},
    {"layer_inputs", "int vector", "2 * L"},
    {"layer_params", "int vector", "8 * L"},
    {"layer_activation", "int vector", "L"},
    {"layer_weights", "int vector", "2 * L"},
    {"in_place", "int", "scalar"},
};
// KP_OPTION_KEYS_END

// Half-open region [y0, y1) x [x0, x1) of a full stage tensor.
struct KpRegion {
  int32_t y0, y1, x0, x1;
};

// One stage tensor.
struct KpTensor {
  int32_t h, w, c;
  int32_t zero_point;
  float scale;
  int32_t first_use;     // producer layer (0 for tensor 0)
  int32_t last_use;      // last layer reading it (producer if none)
  int32_t arena_offset;  // byte offset in the patch arena; -1: not there
  int32_t arena_size;    // bytes reserved (max over patches, 4-aligned)
};

// One layer, with everything Eval needs precomputed.
struct KpLayer {
  int32_t op;
  int32_t in_a, in_b;  // stage tensors read (in_b = -1 unless ADD)
  int32_t kernel_h, kernel_w, stride_h, stride_w, dilation_h, dilation_w;
  int32_t pad_top, pad_left;
  int32_t activation;
  int32_t filter_input, bias_input;  // op input indices, -1 for none
  int32_t act_min, act_max;
  // RELU/RELU6: [0]; ADD: input 1, input 2, output; MEAN: [0] with the
  // 1 / (H * W) folded in (TFLM's QuantizedMeanOrSum: M', shift').
  int32_t multiplier[3];
  int32_t shift[3];
  int32_t channel_offset;  // CONV/DEPTHWISE: first entry in the per-channel arrays
  // DEPTHWISE_CONV_2D run in place (docs "In place"): offset of its one-plane
  // save buffer in the patch arena, -1 otherwise; save_bytes: that buffer's size.
  int32_t save_offset;
  int32_t save_bytes;
};

// A prepared stage: lives in one caller-provided persistent buffer.  When
// the last layer is a MEAN (layers[num_layers - 1].op == kKpOpMean), grid
// tiles tensor num_layers - 1 and the patch arena starts with the MEAN's
// int32 sums (align4(4 * C_L) bytes at offset 0; docs "Scratch buffers").
struct KpStage {
  int32_t num_layers;
  int32_t grid_h, grid_w;
  int32_t num_op_inputs;
  int32_t num_channel_params;
  uint32_t arena_bytes;        // patch arena P (scratch buffer #0)
  uint32_t context_bytes;      // CMSIS-NN context Q (scratch buffer #1; 0 without CMSIS_NN)
  uint32_t staging_offset;     // start of the staging area inside the context buffer
  KpTensor* tensors;           // num_layers + 1
  KpLayer* layers;             // num_layers
  int32_t* channel_multiplier;  // num_channel_params
  int32_t* channel_shift;       // num_channel_params
  KpRegion* regions;           // num_layers + 1, Eval's per-patch working set
};

// docs/patch_stage_op.md ("Persistent data") gives the persistent-memory
// formula with these sizes; keep them in sync.
static_assert(sizeof(KpTensor) == 36, "KpTensor layout is documented");
static_assert(sizeof(KpLayer) == 100, "KpLayer layout is documented");
static_assert(sizeof(KpRegion) == 16, "KpRegion layout is documented");
static_assert(sizeof(KpStage) == 32 + 5 * sizeof(void*), "KpStage layout is documented");

// Description of one constant op input (filter or bias) for Prepare.
enum KpTensorType { kKpTypeOther = 0, kKpTypeInt8 = 1, kKpTypeInt32 = 2 };
struct KpConstTensor {
  int32_t type;      // KpTensorType
  int32_t num_dims;  // dims[] holds the first min(num_dims, 4)
  int32_t dims[4];
  int32_t num_scales;    // quantization scales (filters: 1 or C_out)
  const float* scales;   // valid until the next callback call
};
// Fills *out for op input `index` (1 .. num_op_inputs - 1).
typedef KpStatus (*KpGetConstTensor)(void* context, int32_t index, KpConstTensor* out);

}  // namespace keras_patch

#endif  // KERAS_PATCH_TFLM_OPS_PATCH_STAGE_TYPES_H_
