/* Copyright 2026 The keras-patch Authors. Licensed under the Apache License 2.0.

CMSIS-NN fast path of the KP_PATCH_STAGE core (docs/patch_stage_op.md,
"Scratch buffers", buffer #1).  Compiled in every build; when it is off
(KP_CMSIS_NN == 0) the context size is 0 and no layer is taken by this path,
so the portable kernels run everything.

When it is on (KP_CMSIS_NN, decided below):
  * -DKP_NO_CMSIS_NN: off, always (the switch to turn it off; in an Arduino
    build e.g. `arduino-cli compile --build-property
    compiler.cpp.extra_flags=-DKP_NO_CMSIS_NN`, see docs/tflm_integration.md).
  * -DCMSIS_NN (TFLM's OPTIMIZED_KERNEL_DIR=cmsis_nn builds, tflm_ops/firmware):
    on, with CMSIS-NN's Include/ on the include path ("arm_nnfunctions.h").
  * otherwise on an Arm M-profile core (__ARM_ARCH_PROFILE == 'M') whose
    include path has CMSIS-NN (detected with __has_include): the TFLM Arduino
    library's layout (Chirale_TensorFlowLite, Arduino_TensorFlowLite:
    "third_party/cmsis_nn/Include/arm_nnfunctions.h" under its src/, which
    also compiles CMSIS-NN's sources), or <arm_nnfunctions.h> itself.
    Host builds (the Python extension, the unit tests) are never M-profile,
    so they stay portable whatever their include path holds.

When on, CONV_2D, DEPTHWISE_CONV_2D and ADD of each patch call
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

// KP_CMSIS_NN: 1 when the CMSIS-NN fast path is compiled in, else 0;
// KP_CMSIS_NN_HEADER: the arm_nnfunctions.h it includes.
#if defined(KP_NO_CMSIS_NN)
#define KP_CMSIS_NN 0
#elif defined(CMSIS_NN)
#define KP_CMSIS_NN 1
#define KP_CMSIS_NN_HEADER "arm_nnfunctions.h"
#elif defined(__ARM_ARCH_PROFILE) && (__ARM_ARCH_PROFILE == 'M') && defined(__has_include)
#if __has_include("third_party/cmsis_nn/Include/arm_nnfunctions.h")
#define KP_CMSIS_NN 1
#define KP_CMSIS_NN_HEADER "third_party/cmsis_nn/Include/arm_nnfunctions.h"
#elif __has_include(<arm_nnfunctions.h>)
#define KP_CMSIS_NN 1
#define KP_CMSIS_NN_HEADER <arm_nnfunctions.h>
#else
#define KP_CMSIS_NN 0
#endif
#else
#define KP_CMSIS_NN 0
#endif

namespace keras_patch {

// True when the core was built with the CMSIS-NN fast path (KP_CMSIS_NN).
bool KpCmsisEnabled();

// Prepare: sets stage->context_bytes and stage->staging_offset (both 0
// without the fast path).  Uses stage->regions as working memory.  Fails (naming
// 'tensor_shape') if the context does not fit in 2^31 - 1 bytes.
KpStatus KpCmsisPlanContext(KpStage* stage, const KpReporter& reporter);

// Eval of layer `l` of the current patch (stage->regions filled).  Returns
// true when CMSIS-NN computed region(l + 1); false: run the portable kernel.
bool KpCmsisEvalLayer(const KpStage& stage, int32_t l, const int8_t* input, int8_t* output,
                      uint8_t* arena, uint8_t* context, const void* const* op_inputs);

}  // namespace keras_patch

#endif  // KERAS_PATCH_TFLM_OPS_PATCH_STAGE_CMSIS_H_
