/* Copyright 2026 The keras-patch Authors. Licensed under the Apache License 2.0.

Portable core of the KP_PATCH_STAGE kernel: options parsing and validation,
requantization parameters, patch-arena planning and patch-by-patch Eval over
caller-provided buffers.  C++11, no TFLM types, no heap, no exceptions.

Use (the TFLM adapter patch_stage.cc and the C API do exactly this):

  KpOptionsView view;                        // Prepare
  KpParseOptions(data, size, reporter, &view);
  KpValidateOptions(view, num_op_inputs, reporter);
  size_t bytes = KpPersistentBytes(view);    // allocate, 8-byte aligned
  KpStage* stage;
  KpPrepareStage(view, num_op_inputs, get_const_tensor, ctx, buffer, bytes,
                 reporter, &stage);          // stage->arena_bytes = P,
                                             // stage->context_bytes = Q (CMSIS-NN)
  KpCheckStageIo(*stage, ...);               // op input 0 and output 0
  KpEvalStage(stage, input, output, op_input_data, arena, context, reporter);  // Eval

Every function returns kKpOk or reports one message (naming the options key
at fault) and returns kKpError.
==============================================================================*/
#ifndef KERAS_PATCH_TFLM_OPS_PATCH_STAGE_CORE_H_
#define KERAS_PATCH_TFLM_OPS_PATCH_STAGE_CORE_H_

#include "flexbuffer_reader.h"
#include "patch_stage_types.h"

namespace keras_patch {

// The options: a view into the options bytes (which must outlive it).
struct KpOptionsView {
  int32_t version;
  int32_t num_layers;
  int32_t in_place;  // 0 or 1 ("in_place", version 2; 0 in version 1 files)
  flexbuffer::TypedVector vectors[kKpNumOptionKeys];  // by KpOptionKeyIndex
};

// Reads the FlexBuffer map: every key present with its type and length.
KpStatus KpParseOptions(const uint8_t* data, size_t size, const KpReporter& reporter,
                        KpOptionsView* view);

// Checks shapes and parameters (keras_patch.stage.options.validate_options).
// num_op_inputs < 0: the number of op inputs is not known (not checked).
KpStatus KpValidateOptions(const KpOptionsView& view, int32_t num_op_inputs,
                           const KpReporter& reporter);

// Bytes of persistent memory KpPrepareStage needs for these (parsed) options.
size_t KpPersistentBytes(const KpOptionsView& view);

// Validates and builds the stage in `buffer` (8-byte aligned, `bytes` >=
// KpPersistentBytes(view)): requantization parameters, activation ranges and
// the patch-arena plan.  `get_const` describes op inputs 1 .. num_op_inputs-1.
KpStatus KpPrepareStage(const KpOptionsView& view, int32_t num_op_inputs,
                        KpGetConstTensor get_const, void* get_const_context, void* buffer,
                        size_t bytes, const KpReporter& reporter, KpStage** stage);

// Checks the op's input 0 (is_output = false) or output 0 against stage
// tensor 0 / L: int8, shape [1, h, w, c], scale and zero point.
KpStatus KpCheckStageIo(const KpStage& stage, bool is_output, int32_t type, int32_t num_dims,
                        const int32_t* dims, float scale, int32_t zero_point,
                        const KpReporter& reporter);

// Runs the stage on one sample.  op_inputs[i] is the data of op input i (the
// filters and biases; entry 0 is not read).  `arena` holds stage->arena_bytes
// bytes (may be NULL when that is 0).  Allocates nothing.  `output` may equal
// `input` for a one-layer in-place stage (docs "In place"); otherwise the two
// must not overlap.
KpStatus KpEvalStage(KpStage* stage, const int8_t* input, int8_t* output,
                     const void* const* op_inputs, uint8_t* arena, const KpReporter& reporter);

// The same with the CMSIS-NN context buffer (scratch buffer #1) of
// stage->context_bytes bytes, 4-byte aligned (may be NULL when that is 0,
// always the case without -DCMSIS_NN).
KpStatus KpEvalStage(KpStage* stage, const int8_t* input, int8_t* output,
                     const void* const* op_inputs, uint8_t* arena, uint8_t* context,
                     const KpReporter& reporter);

// Activation range of a fused activation (CalculateActivationRangeQuantized).
void KpActivationRange(int32_t activation, float scale, int32_t zero_point, int32_t* act_min,
                       int32_t* act_max);

}  // namespace keras_patch

#endif  // KERAS_PATCH_TFLM_OPS_PATCH_STAGE_CORE_H_
