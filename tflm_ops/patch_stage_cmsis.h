/* Copyright 2026 The keras-patch Authors. Licensed under the Apache License 2.0.

CMSIS-NN fast path of the KP_PATCH_STAGE core (docs/patch_stage_op.md,
"Scratch buffers", buffer #1).  Compiled in every build; without -DCMSIS_NN
the context size is 0 and no layer is taken by this path, so the portable
kernels run everything.

With -DCMSIS_NN, CONV_2D, DEPTHWISE_CONV_2D and ADD of each patch call
arm_convolve_wrapper_s8 / arm_depthwise_conv_wrapper_s8 /
arm_elementwise_add_s8.  Per call, the layer's input is passed as a
row-major block whose origin is a pixel of the full tensor; the border
padding of the patch is expressed with CMSIS-NN's (top, left) padding plus
the block's height/width (taps past them are padding, which is exactly the
part of the kernel window outside the full tensor).  When the stored input
cannot be addressed that way (tensor 0 read in place from a column tile, a
hull wider on the left than this layer needs, a 1x1 stride-1 conv whose
stored input is wider than its output), the layer runs one output row per
call and copies that row's input rows (the needed columns) to the staging
area of the context buffer.  An output region that is not
contiguous (the op output of a tile narrower than the tensor) is written
one row per call.  A CMSIS-NN call that returns an error leaves the layer
to the portable kernel.
==============================================================================*/
#ifndef KERAS_PATCH_TFLM_OPS_PATCH_STAGE_CMSIS_H_
#define KERAS_PATCH_TFLM_OPS_PATCH_STAGE_CMSIS_H_

#include "patch_stage_types.h"

namespace keras_patch {

// True when the core was built with -DCMSIS_NN.
bool KpCmsisEnabled();

// Prepare: sets stage->context_bytes and stage->staging_offset (both 0
// without CMSIS_NN).  Uses stage->regions as working memory.  Fails (naming
// 'tensor_shape') if the context does not fit in 2^31 - 1 bytes.
KpStatus KpCmsisPlanContext(KpStage* stage, const KpReporter& reporter);

// Eval of layer `l` of the current patch (stage->regions filled).  Returns
// true when CMSIS-NN computed region(l + 1); false: run the portable kernel.
bool KpCmsisEvalLayer(const KpStage& stage, int32_t l, const int8_t* input, int8_t* output,
                      uint8_t* arena, uint8_t* context, const void* const* op_inputs);

}  // namespace keras_patch

#endif  // KERAS_PATCH_TFLM_OPS_PATCH_STAGE_CMSIS_H_
