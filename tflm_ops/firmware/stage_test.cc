/* Copyright 2026 The keras-patch Authors. Licensed under the Apache License 2.0.

Bare-metal test of the portable KP_PATCH_STAGE core on a Cortex-M4F (QEMU
mps2-an386). `stage_vectors.h`, written by keras_patch.runtime.firmware from a real
patched model, holds one stage's options, its constant op inputs, an input
and the output the Python side computed. The firmware prepares the stage,
runs Eval once (timed with the CMSDK APB timer 0, 25 MHz), compares the
output byte for byte and prints one result line:

  KP_RESULT status=ok mismatches=0 ticks=... persistent=... arena=... context=... cmsis_nn=0|1 output=...
            aliased=0|1 buffers=...

(context: the CMSIS-NN context buffer; 0 in the portable build. buffers: the
scratch buffers kp_stage_buffers lists, as the TFLM kernel's Prepare requests
them, "kind:bytes" in request order, comma-separated, "-" for none; kind 0 is
the patch arena, 1 the CMSIS-NN context. They are allocated from that list.)

It returns 0 when the output matches, 1 on a mismatch, 2 on an error.
==============================================================================*/
#include <stdint.h>
#include <stdio.h>
#include <string.h>

#include "patch_stage_c_api.h"
#include "stage_vectors.h"

namespace {

// CMSDK APB timer 0: CTRL, VALUE, RELOAD (counts down at 25 MHz in QEMU).
volatile uint32_t* const kTimer0 = reinterpret_cast<volatile uint32_t*>(0x40000000u);

void StartTimer() {
  kTimer0[2] = 0xFFFFFFFFu;
  kTimer0[1] = 0xFFFFFFFFu;
  kTimer0[0] = 1u;
}

uint32_t TimerValue() { return kTimer0[1]; }

// Everything the stage needs at run time comes from this pool, as it would
// from a TFLM tensor arena: input, output, persistent data and patch arena.
constexpr size_t kPoolBytes = 3u * 1024u * 1024u;
alignas(16) uint8_t g_pool[kPoolBytes];
size_t g_pool_used = 0;

uint8_t* Allocate(size_t bytes) {
  size_t start = (g_pool_used + 15u) & ~static_cast<size_t>(15u);
  if (start + bytes > kPoolBytes) return nullptr;
  g_pool_used = start + bytes;
  return g_pool + start;
}

}  // namespace

int main() {
  char err[256] = {0};
  size_t persistent_bytes = 0;
  if (kp_stage_persistent_bytes(kOptions, sizeof(kOptions), kNumOpInputs, &persistent_bytes, err,
                                sizeof(err)) != 0) {
    printf("KP_RESULT status=error where=persistent_bytes message=%s\n", err);
    return 2;
  }
  uint8_t* persistent = Allocate(persistent_bytes);
#if defined(KP_STAGE_ALIASED)
  // A one-layer in-place stage (docs/patch_stage_op.md "In place"): the output
  // is written over the input, as an offline memory plan that aliases them runs it.
  const int aliased = 1;
  int8_t* input = reinterpret_cast<int8_t*>(
      Allocate(sizeof(kInput) > sizeof(kExpected) ? sizeof(kInput) : sizeof(kExpected)));
  int8_t* output = input;
#else
  const int aliased = 0;
  int8_t* input = reinterpret_cast<int8_t*>(Allocate(sizeof(kInput)));
  int8_t* output = reinterpret_cast<int8_t*>(Allocate(sizeof(kExpected)));
#endif
  if (persistent == nullptr || input == nullptr || output == nullptr) {
    printf("KP_RESULT status=error where=pool message=out of memory\n");
    return 2;
  }
  uint32_t arena_bytes = 0;
  if (kp_stage_prepare(kOptions, sizeof(kOptions), kOpInputs, kNumOpInputs, persistent,
                       persistent_bytes, &arena_bytes, err, sizeof(err)) != 0) {
    printf("KP_RESULT status=error where=prepare message=%s\n", err);
    return 2;
  }
  // The scratch buffers, as the TFLM kernel's Prepare requests them (kp_stage_buffers).
  int32_t kinds[2] = {0, 0};
  uint32_t sizes[2] = {0, 0};
  int32_t num_buffers = 0;
  if (kp_stage_buffers(persistent, kp_cmsis_nn_enabled(), kinds, sizes, 2, &num_buffers) != 0) {
    printf("KP_RESULT status=error where=buffers message=kp_stage_buffers failed\n");
    return 2;
  }
  uint8_t* scratch[2] = {nullptr, nullptr};  // by kind: 0 patch arena, 1 CMSIS-NN context
  uint32_t scratch_bytes[2] = {0, 0};
  char buffers[64] = "-";  // "kind:bytes,kind:bytes" in request order, "-" for none
  size_t pos = 0;
  for (int32_t i = 0; i < num_buffers; ++i) {
    if (kinds[i] < 0 || kinds[i] > 1 || scratch[kinds[i]] != nullptr) {
      printf("KP_RESULT status=error where=buffers message=bad buffer kind %ld\n",
             static_cast<long>(kinds[i]));
      return 2;
    }
    scratch[kinds[i]] = Allocate(sizes[i]);
    scratch_bytes[kinds[i]] = sizes[i];
    if (scratch[kinds[i]] == nullptr) {
      printf("KP_RESULT status=error where=pool message=scratch buffer %ld of %lu bytes does not fit\n",
             static_cast<long>(i), static_cast<unsigned long>(sizes[i]));
      return 2;
    }
    pos += static_cast<size_t>(snprintf(buffers + pos, sizeof(buffers) - pos, "%s%ld:%lu",
                                        i > 0 ? "," : "", static_cast<long>(kinds[i]),
                                        static_cast<unsigned long>(sizes[i])));
  }
  if (scratch_bytes[0] != arena_bytes) {
    printf("KP_RESULT status=error where=buffers message=patch arena %lu != %lu\n",
           static_cast<unsigned long>(scratch_bytes[0]), static_cast<unsigned long>(arena_bytes));
    return 2;
  }
  uint8_t* arena = scratch[0];
  uint8_t* context = scratch[1];
  const uint32_t context_bytes = scratch_bytes[1];
  if (!aliased) memset(output, 0, sizeof(kExpected));
  memcpy(input, kInput, sizeof(kInput));

  StartTimer();
  const uint32_t start = TimerValue();
  const int status = kp_stage_eval_ctx(persistent, input, output, kOpInputs, kNumOpInputs, arena,
                                       arena_bytes, context, context_bytes, err, sizeof(err));
  const uint32_t ticks = start - TimerValue();
  if (status != 0) {
    printf("KP_RESULT status=error where=eval message=%s\n", err);
    return 2;
  }
  unsigned long mismatches = 0;
  long first = -1;
  for (size_t i = 0; i < sizeof(kExpected); ++i) {
    if (output[i] != kExpected[i]) {
      if (first < 0) first = static_cast<long>(i);
      ++mismatches;
    }
  }
  printf("KP_RESULT status=%s mismatches=%lu first=%ld ticks=%lu persistent=%lu arena=%lu "
         "context=%lu cmsis_nn=%d output=%lu aliased=%d buffers=%s\n",
         mismatches == 0 ? "ok" : "mismatch", mismatches, first, static_cast<unsigned long>(ticks),
         static_cast<unsigned long>(persistent_bytes), static_cast<unsigned long>(arena_bytes),
         static_cast<unsigned long>(context_bytes), kp_cmsis_nn_enabled(),
         static_cast<unsigned long>(sizeof(kExpected)), aliased, buffers);
  return mismatches == 0 ? 0 : 1;
}
