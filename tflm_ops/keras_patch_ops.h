/* Copyright 2026 The keras-patch Authors. Licensed under the Apache License 2.0.

keras-patch custom operators for TensorFlow Lite Micro.

  #include "keras_patch_ops.h"

  tflite::MicroMutableOpResolver<8> resolver;
  resolver.AddConv2D();                         // the model's builtin ops...
  keras_patch::AddKerasPatchOps(resolver);      // ...and KP_PATCH_STAGE

The operator is specified in docs/patch_stage_op.md of keras-patch.
==============================================================================*/
#ifndef KERAS_PATCH_TFLM_OPS_KERAS_PATCH_OPS_H_
#define KERAS_PATCH_TFLM_OPS_KERAS_PATCH_OPS_H_

#include "tensorflow/lite/c/common.h"
#include "tensorflow/lite/micro/kernels/kernel_util.h"
#include "tensorflow/lite/micro/micro_mutable_op_resolver.h"

namespace keras_patch {

// The custom code the exporter writes into the model.
constexpr char kPatchStageCustomCode[] = "KP_PATCH_STAGE";

// The registration type of this TFLM tree: TFLMRegistration in current
// TFLM, TfLiteRegistration in older trees (such as the one the Arduino
// library Chirale_TensorFlowLite ships). Both are what
// tflite::micro::RegisterOp(init, prepare, invoke) returns, and what
// MicroMutableOpResolver::AddCustom takes a pointer to.
using KpRegistration = decltype(tflite::micro::RegisterOp(
    static_cast<void* (*)(TfLiteContext*, const char*, size_t)>(nullptr),
    static_cast<TfLiteStatus (*)(TfLiteContext*, TfLiteNode*)>(nullptr),
    static_cast<TfLiteStatus (*)(TfLiteContext*, TfLiteNode*)>(nullptr)));

// Registration of the KP_PATCH_STAGE kernel (a static object).
KpRegistration* Register_KP_PATCH_STAGE();

// Adds every keras-patch custom op to `resolver` (one slot each).
template <unsigned int tOpCount>
TfLiteStatus AddKerasPatchOps(tflite::MicroMutableOpResolver<tOpCount>& resolver) {
  return resolver.AddCustom(kPatchStageCustomCode, Register_KP_PATCH_STAGE());
}

}  // namespace keras_patch

#endif  // KERAS_PATCH_TFLM_OPS_KERAS_PATCH_OPS_H_
