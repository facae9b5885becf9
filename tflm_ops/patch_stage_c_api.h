/* Copyright 2026 The keras-patch Authors. Licensed under the Apache License 2.0.

C ABI of the portable KP_PATCH_STAGE core, for the host (Python ctypes,
keras_patch/runtime/cpp_executor.py) and for tests.  Every function returns 0 on
success; on failure it returns 1 and writes one NUL-terminated message (it
names the options key at fault) into err[0 .. err_size-1].
==============================================================================*/
#ifndef KERAS_PATCH_TFLM_OPS_PATCH_STAGE_C_API_H_
#define KERAS_PATCH_TFLM_OPS_PATCH_STAGE_C_API_H_

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

/* One op input (index >= 1): a filter or bias tensor. */
typedef struct {
  int32_t type; /* 1: int8, 2: int32, 0: other */
  int32_t num_dims;
  int32_t dims[4];
  int32_t num_scales;
  const float* scales;
  const void* data;
} kp_const_tensor;

/* Bytes of persistent memory kp_stage_prepare needs for these options. */
int kp_stage_persistent_bytes(const uint8_t* options, size_t options_size,
                              int32_t num_op_inputs, size_t* bytes, char* err,
                              size_t err_size);

/* Parses, validates and prepares the stage in `buffer` (8-byte aligned,
   kp_stage_persistent_bytes long); sets *arena_bytes to the patch arena P.
   With a final MEAN layer, kp_stage_eval needs the arena 4-byte aligned.
   inputs[i] describes op input i (inputs[0] is not read). */
int kp_stage_prepare(const uint8_t* options, size_t options_size,
                     const kp_const_tensor* inputs, int32_t num_op_inputs,
                     void* buffer, size_t buffer_size, uint32_t* arena_bytes,
                     char* err, size_t err_size);

/* Bytes of the CMSIS-NN context buffer (kp_stage_buffers kind 1) the prepared
   stage needs: 0 unless the core was built with -DCMSIS_NN. */
int kp_stage_context_bytes(const void* buffer, uint32_t* context_bytes);

/* The scratch buffers the kernel requests in Prepare, in request order
   (KpStageBuffers, docs/patch_stage_op.md "Scratch buffers"): kinds[i]
   (0: patch arena, 1: CMSIS-NN context) and bytes[i] for i < *count, for the
   prepared stage; cmsis_nn != 0: the list of a build with the CMSIS-NN fast
   path (the context is 0 bytes, so not listed, unless kp_cmsis_nn_enabled()).
   `capacity` >= 2. */
int kp_stage_buffers(const void* buffer, int cmsis_nn, int32_t* kinds, uint32_t* bytes,
                     int32_t capacity, int32_t* count);

/* 1 when the core was built with -DCMSIS_NN (the CMSIS-NN fast path). */
int kp_cmsis_nn_enabled(void);

/* Checks the op's input (is_output 0) or output tensor against the stage. */
int kp_stage_check_io(const void* buffer, int is_output, int32_t type,
                      int32_t num_dims, const int32_t* dims, float scale,
                      int32_t zero_point, char* err, size_t err_size);

/* Runs one sample; inputs[i].data are read for the filters and biases.
   `input` and `output` may be the same pointer for a one-layer in-place
   stage (docs/patch_stage_op.md "In place"); otherwise they must not overlap. */
int kp_stage_eval(void* buffer, const int8_t* input, int8_t* output,
                  const kp_const_tensor* inputs, int32_t num_op_inputs,
                  void* arena, size_t arena_size, char* err, size_t err_size);

/* kp_stage_eval with the CMSIS-NN context buffer (4-byte aligned,
   kp_stage_context_bytes long; may be NULL when that is 0). kp_stage_eval is
   this with no context buffer. */
int kp_stage_eval_ctx(void* buffer, const int8_t* input, int8_t* output,
                      const kp_const_tensor* inputs, int32_t num_op_inputs,
                      void* arena, size_t arena_size, void* context,
                      size_t context_size, char* err, size_t err_size);

/* The patch-arena plan: offsets[t] / sizes[t] for t = 0 .. num_tensors-1. */
int kp_stage_arena_plan(const void* buffer, int32_t* offsets, int32_t* sizes,
                        int32_t num_tensors);

/* The in-place save buffers (docs/patch_stage_op.md "In place"): offsets[l]
   (-1: layer l does not run in place) and sizes[l] for l = 0 .. num_layers-1. */
int kp_stage_save_plan(const void* buffer, int32_t* offsets, int32_t* sizes, int32_t num_layers);

/* Bytes of a final MEAN's int32 sums at offset 0 of the patch arena
   (docs/patch_stage_op.md "Scratch buffers", step 5); 0 without a MEAN. */
int kp_stage_accumulator_bytes(const void* buffer, uint32_t* bytes);

/* The option keys the core reads: field 0 name, 1 type, 2 length. */
int kp_num_option_keys(void);
const char* kp_option_key(int index, int field);

/* Arithmetic helpers, exposed for tests. */
void kp_quantize_multiplier(double m, int32_t* multiplier, int32_t* shift);
int32_t kp_multiply_by_quantized_multiplier(int32_t x, int32_t multiplier,
                                            int32_t shift);

#ifdef __cplusplus
}  /* extern "C" */
#endif

#endif  /* KERAS_PATCH_TFLM_OPS_PATCH_STAGE_C_API_H_ */
