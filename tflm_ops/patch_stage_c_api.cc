/* Copyright 2026 The keras-patch Authors. Licensed under the Apache License 2.0.
==============================================================================*/
#include "patch_stage_c_api.h"

#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>

#include "int8_arith.h"
#include "patch_geometry.h"
#include "patch_stage_cmsis.h"
#include "patch_stage_core.h"

namespace {

using keras_patch::KpReporter;
using keras_patch::KpStage;
using keras_patch::KpStatus;

struct ErrorBuffer {
  char* data;
  size_t size;
  bool written;
};

void Report(void* context, const char* format, ...) {
  ErrorBuffer* err = static_cast<ErrorBuffer*>(context);
  if (err->written || err->data == NULL || err->size == 0) return;  // keep the first
  va_list args;
  va_start(args, format);
  vsnprintf(err->data, err->size, format, args);
  va_end(args);
  err->written = true;
}

struct Inputs {
  const kp_const_tensor* tensors;
  int32_t count;
};

KpStatus GetConst(void* context, int32_t index, keras_patch::KpConstTensor* out) {
  const Inputs* inputs = static_cast<const Inputs*>(context);
  if (inputs->tensors == NULL || index < 1 || index >= inputs->count) return keras_patch::kKpError;
  const kp_const_tensor& t = inputs->tensors[index];
  out->type = t.type;
  out->num_dims = t.num_dims;
  for (int i = 0; i < 4; ++i) out->dims[i] = t.dims[i];
  out->num_scales = t.num_scales;
  out->scales = t.scales;
  return keras_patch::kKpOk;
}

}  // namespace

extern "C" {

int kp_stage_persistent_bytes(const uint8_t* options, size_t options_size, int32_t num_op_inputs,
                              size_t* bytes, char* err, size_t err_size) {
  ErrorBuffer e = {err, err_size, false};
  const KpReporter reporter = {Report, &e};
  keras_patch::KpOptionsView view;
  if (keras_patch::KpParseOptions(options, options_size, reporter, &view) != keras_patch::kKpOk ||
      keras_patch::KpValidateOptions(view, num_op_inputs, reporter) != keras_patch::kKpOk) {
    return 1;
  }
  *bytes = keras_patch::KpPersistentBytes(view);
  return 0;
}

int kp_stage_prepare(const uint8_t* options, size_t options_size, const kp_const_tensor* inputs,
                     int32_t num_op_inputs, void* buffer, size_t buffer_size,
                     uint32_t* arena_bytes, char* err, size_t err_size) {
  ErrorBuffer e = {err, err_size, false};
  const KpReporter reporter = {Report, &e};
  keras_patch::KpOptionsView view;
  if (keras_patch::KpParseOptions(options, options_size, reporter, &view) != keras_patch::kKpOk) {
    return 1;
  }
  Inputs context = {inputs, num_op_inputs};
  KpStage* stage = NULL;
  if (keras_patch::KpPrepareStage(view, num_op_inputs, GetConst, &context, buffer, buffer_size,
                                  reporter, &stage) != keras_patch::kKpOk) {
    return 1;
  }
  *arena_bytes = stage->arena_bytes;
  return 0;
}

int kp_stage_check_io(const void* buffer, int is_output, int32_t type, int32_t num_dims,
                      const int32_t* dims, float scale, int32_t zero_point, char* err,
                      size_t err_size) {
  ErrorBuffer e = {err, err_size, false};
  const KpReporter reporter = {Report, &e};
  return keras_patch::KpCheckStageIo(*static_cast<const KpStage*>(buffer), is_output != 0, type,
                                     num_dims, dims, scale, zero_point, reporter) ==
                 keras_patch::kKpOk
             ? 0
             : 1;
}

int kp_stage_eval_ctx(void* buffer, const int8_t* input, int8_t* output,
                      const kp_const_tensor* inputs, int32_t num_op_inputs, void* arena,
                      size_t arena_size, void* context, size_t context_size, char* err,
                      size_t err_size) {
  ErrorBuffer e = {err, err_size, false};
  const KpReporter reporter = {Report, &e};
  KpStage* stage = static_cast<KpStage*>(buffer);
  if (arena_size < stage->arena_bytes || num_op_inputs != stage->num_op_inputs ||
      num_op_inputs > 1024) {
    Report(&e, "KP_PATCH_STAGE Eval: arena of %d bytes (needs %d) or %d op inputs (prepared %d).",
           static_cast<int>(arena_size), static_cast<int>(stage->arena_bytes),
           static_cast<int>(num_op_inputs), static_cast<int>(stage->num_op_inputs));
    return 1;
  }
  if (context_size < stage->context_bytes ||
      (reinterpret_cast<uintptr_t>(context) & 3u) != 0) {
    Report(&e, "KP_PATCH_STAGE Eval: CMSIS-NN context of %d bytes (needs %d, 4-byte aligned).",
           static_cast<int>(context_size), static_cast<int>(stage->context_bytes));
    return 1;
  }
  const void* data[1024];
  for (int32_t i = 0; i < num_op_inputs; ++i) data[i] = inputs != NULL ? inputs[i].data : NULL;
  return keras_patch::KpEvalStage(stage, input, output, data, static_cast<uint8_t*>(arena),
                                  static_cast<uint8_t*>(context), reporter) == keras_patch::kKpOk
             ? 0
             : 1;
}

int kp_stage_eval(void* buffer, const int8_t* input, int8_t* output, const kp_const_tensor* inputs,
                  int32_t num_op_inputs, void* arena, size_t arena_size, char* err,
                  size_t err_size) {
  return kp_stage_eval_ctx(buffer, input, output, inputs, num_op_inputs, arena, arena_size, NULL,
                           0, err, err_size);
}

int kp_stage_buffers(const void* buffer, int cmsis_nn, int32_t* kinds, uint32_t* bytes,
                     int32_t capacity, int32_t* count) {
  if (buffer == NULL || kinds == NULL || bytes == NULL || count == NULL ||
      capacity < keras_patch::kKpMaxStageBuffers) {
    return 1;
  }
  keras_patch::KpStageBuffer buffers[keras_patch::kKpMaxStageBuffers];
  const int32_t n =
      keras_patch::KpStageBuffers(*static_cast<const KpStage*>(buffer), cmsis_nn != 0, buffers);
  for (int32_t i = 0; i < n; ++i) {
    kinds[i] = buffers[i].kind;
    bytes[i] = buffers[i].bytes;
  }
  *count = n;
  return 0;
}

int kp_stage_context_bytes(const void* buffer, uint32_t* context_bytes) {
  if (buffer == NULL || context_bytes == NULL) return 1;
  *context_bytes = static_cast<const KpStage*>(buffer)->context_bytes;
  return 0;
}

int kp_cmsis_nn_enabled(void) { return keras_patch::KpCmsisEnabled() ? 1 : 0; }

int kp_stage_arena_plan(const void* buffer, int32_t* offsets, int32_t* sizes,
                        int32_t num_tensors) {
  const KpStage* stage = static_cast<const KpStage*>(buffer);
  if (num_tensors != stage->num_layers + 1) return 1;
  for (int32_t t = 0; t < num_tensors; ++t) {
    offsets[t] = stage->tensors[t].arena_offset;
    sizes[t] = stage->tensors[t].arena_size;
  }
  return 0;
}

int kp_stage_save_plan(const void* buffer, int32_t* offsets, int32_t* sizes, int32_t num_layers) {
  const KpStage* stage = static_cast<const KpStage*>(buffer);
  if (num_layers != stage->num_layers) return 1;
  for (int32_t l = 0; l < num_layers; ++l) {
    offsets[l] = stage->layers[l].save_offset;
    sizes[l] = stage->layers[l].save_bytes;
  }
  return 0;
}

int kp_stage_accumulator_bytes(const void* buffer, uint32_t* bytes) {
  if (buffer == NULL || bytes == NULL) return 1;
  *bytes = keras_patch::MeanSumsBytes(*static_cast<const KpStage*>(buffer));
  return 0;
}

int kp_num_option_keys(void) { return keras_patch::kKpNumOptionKeys; }

const char* kp_option_key(int index, int field) {
  if (index < 0 || index >= keras_patch::kKpNumOptionKeys) return NULL;
  const keras_patch::KpOptionKey& key = keras_patch::kKpOptionKeys[index];
  return field == 0 ? key.name : (field == 1 ? key.type : (field == 2 ? key.length : NULL));
}

void kp_quantize_multiplier(double m, int32_t* multiplier, int32_t* shift) {
  int s = 0;
  keras_patch::arith::QuantizeMultiplier(m, multiplier, &s);
  *shift = s;
}

int32_t kp_multiply_by_quantized_multiplier(int32_t x, int32_t multiplier, int32_t shift) {
  return keras_patch::arith::MultiplyByQuantizedMultiplier(x, multiplier, shift);
}

}  // extern "C"
