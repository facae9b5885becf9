/* Copyright 2026 The keras-patch Authors. Licensed under the Apache License 2.0.

tests/tflm_runner.cc as Cortex-M4F firmware for QEMU's mps2-an386 board:
TFLM's MicroInterpreter with AddKerasPatchOps and the builtin ops of
MobileNet-style CNNs, linked with a TFLM library built for Cortex-M4 (with
TFLM's CMSIS-NN kernels when built with OPTIMIZED_KERNEL_DIR=cmsis_nn; then
build this with -DCMSIS_NN too, so that KP_PATCH_STAGE takes its CMSIS-NN
path). Files and arguments come through semihosting:

  qemu-system-arm -M mps2-an386 -nographic -monitor none -icount shift=0 \
    -semihosting-config enable=on,target=native,arg=tflm_runner_m4,arg=MODEL,arg=INPUT_BIN,arg=OUTPUT_BIN \
    -kernel tflm_runner_m4.elf

It reads, writes and prints what tests/tflm_runner.cc does (the `input` /
`output` lines, OUTPUT_BIN, `arena_head_bytes`, `arena_tail_bytes`,
`arena_used_bytes`), plus `kernel cmsis_nn` or `kernel portable` (the
KP_PATCH_STAGE build: the `kernel` argument of keras_patch.profile that
predicts its arena head) and `instructions N`: the instructions of the last
Invoke (the board's 25 MHz timer ticks every 40 instructions under
-icount shift=0). QEMU's exit status is main's return value.

The model, the input runs and the arena live in the board's 16 MiB PSRAM at
0x21000000 (model <= 6 MiB, input runs <= 1 MiB, arena 9 MiB); code, data
and stack in the 4 MiB code memory and SRAM of firmware/mps2_an386.ld.

Built by `make -C tflm_ops tflm-runner-m4 TFLM_DIR=... TFLM_M4_LIB=...
[CMSIS_NN_DIR=...]`; docs/tflm_integration.md, "Several stages, by hand".
==============================================================================*/
#include <stdint.h>
#include <stdio.h>
#include <string.h>

#include <new>

#include "keras_patch_ops.h"
#include "tests/tflm_runner_common.h"
#include "patch_stage_cmsis.h"
#include "tensorflow/lite/micro/arena_allocator/single_arena_buffer_allocator.h"
#include "tensorflow/lite/micro/memory_helpers.h"
#include "tensorflow/lite/micro/memory_planner/greedy_memory_planner.h"
#include "tensorflow/lite/micro/micro_allocator.h"
#include "tensorflow/lite/micro/micro_arena_constants.h"
#include "tensorflow/lite/micro/micro_interpreter.h"
#include "tensorflow/lite/micro/micro_mutable_op_resolver.h"
#include "tensorflow/lite/schema/schema_generated.h"

namespace {

using keras_patch_runner::CreateAllocator;
using keras_patch_runner::PrintArenaReport;
using keras_patch_runner::PrintTensor;

uint8_t* const kModel = reinterpret_cast<uint8_t*>(0x21000000u);
constexpr long kModelCapacity = 6l << 20;
uint8_t* const kInput = reinterpret_cast<uint8_t*>(0x21600000u);
constexpr long kInputCapacity = 1l << 20;
uint8_t* const kArena = reinterpret_cast<uint8_t*>(0x21700000u);
constexpr size_t kArenaCapacity = 9u << 20;

// CMSDK APB timer 0: CTRL, VALUE, RELOAD (counts down at 25 MHz in QEMU).
volatile uint32_t* const kTimer0 = reinterpret_cast<volatile uint32_t*>(0x40000000u);

// Semihosting SYS_GET_CMDLINE: the arg=... strings of -semihosting-config, space-separated.
int GetCommandLine(char* buffer, int size) {
  struct {
    char* buffer;
    int size;
  } block = {buffer, size};
  register int r0 __asm__("r0") = 0x15;
  register void* r1 __asm__("r1") = &block;
  __asm__ volatile("bkpt 0xAB" : "+r"(r0) : "r"(r1) : "memory");
  return r0;
}

long ReadFile(const char* path, uint8_t* dst, long capacity) {
  FILE* f = fopen(path, "rb");
  if (f == nullptr) return -1;
  long total = 0;
  size_t n;
  while (total < capacity && (n = fread(dst + total, 1, 4096, f)) > 0) total += static_cast<long>(n);
  const bool more = fgetc(f) != EOF;
  fclose(f);
  return more ? -2 : total;
}

// The builtin ops of MobileNet-style int8 CNNs (each Add* pulls in one kernel
// of the TFLM library), plus KP_PATCH_STAGE.
constexpr unsigned int kNumBuiltinOps = 12;
using Resolver = tflite::MicroMutableOpResolver<kNumBuiltinOps + 1>;

TfLiteStatus AddOps(Resolver& r) {
  TF_LITE_ENSURE_STATUS(keras_patch::AddKerasPatchOps(r));
  TF_LITE_ENSURE_STATUS(r.AddAdd());
  TF_LITE_ENSURE_STATUS(r.AddAveragePool2D());
  TF_LITE_ENSURE_STATUS(r.AddConv2D());
  TF_LITE_ENSURE_STATUS(r.AddDepthwiseConv2D());
  TF_LITE_ENSURE_STATUS(r.AddDequantize());
  TF_LITE_ENSURE_STATUS(r.AddFullyConnected());
  TF_LITE_ENSURE_STATUS(r.AddMaxPool2D());
  TF_LITE_ENSURE_STATUS(r.AddMean());
  TF_LITE_ENSURE_STATUS(r.AddPad());
  TF_LITE_ENSURE_STATUS(r.AddQuantize());
  TF_LITE_ENSURE_STATUS(r.AddReshape());
  TF_LITE_ENSURE_STATUS(r.AddSoftmax());
  return kTfLiteOk;
}

// Static storage without static destructors (-nostartfiles: no __dso_handle).
alignas(Resolver) uint8_t g_resolver[sizeof(Resolver)];
alignas(tflite::MicroInterpreter) uint8_t g_interpreter[sizeof(tflite::MicroInterpreter)];

}  // namespace

int main() {
  static char cmdline[512];
  char* argv[6] = {nullptr};
  int argc = 0;
  if (GetCommandLine(cmdline, sizeof(cmdline)) != 0) {
    printf("no semihosting command line (-semihosting-config ...,arg=...)\n");
    return 2;
  }
  for (char* token = strtok(cmdline, " "); token != nullptr && argc < 6; token = strtok(nullptr, " ")) {
    argv[argc++] = token;
  }
  if (argc < 4) {
    printf("usage: tflm_runner_m4 MODEL INPUT_BIN OUTPUT_BIN [ARENA_BYTES]\n");
    return 2;
  }
  const long model_bytes = ReadFile(argv[1], kModel, kModelCapacity);
  const long input_bytes = ReadFile(argv[2], kInput, kInputCapacity);
  if (model_bytes <= 0 || input_bytes <= 0) {
    printf("cannot read %s (<= %ld bytes) or %s (<= %ld bytes)\n", argv[1], kModelCapacity, argv[2], kInputCapacity);
    return 2;
  }
  size_t arena_size = kArenaCapacity;
  if (argc > 4) {
    long requested = 0;
    if (sscanf(argv[4], "%ld", &requested) != 1 || requested <= 0 || static_cast<size_t>(requested) > kArenaCapacity) {
      printf("ARENA_BYTES must be 1..%d\n", static_cast<int>(kArenaCapacity));
      return 2;
    }
    arena_size = static_cast<size_t>(requested);
  }
  Resolver* resolver = new (g_resolver) Resolver();
  if (AddOps(*resolver) != kTfLiteOk) {
    printf("registering the ops failed\n");
    return 3;
  }
  const tflite::Model* model = tflite::GetModel(kModel);
  tflite::SingleArenaBufferAllocator* memory = nullptr;
  tflite::MicroAllocator* allocator = CreateAllocator(kArena, arena_size, &memory);
  if (allocator == nullptr) return 4;
  tflite::MicroInterpreter* interpreter = new (g_interpreter) tflite::MicroInterpreter(model, *resolver, allocator);
  if (interpreter->AllocateTensors() != kTfLiteOk) {
    printf("AllocateTensors failed\n");
    return 4;
  }
  long run_bytes = 0;
  for (size_t i = 0; i < interpreter->inputs_size(); ++i) {
    PrintTensor("input", i, interpreter->input(i));
    run_bytes += static_cast<long>(interpreter->input(i)->bytes);
  }
  for (size_t i = 0; i < interpreter->outputs_size(); ++i) {
    PrintTensor("output", i, interpreter->output(i));
  }
  if (run_bytes == 0 || input_bytes % run_bytes != 0) {
    printf("input file has %ld bytes, not a multiple of the %ld bytes of the model's input(s)\n", input_bytes,
           run_bytes);
    return 5;
  }
  FILE* out = fopen(argv[3], "wb");
  if (out == nullptr) return 2;
  uint32_t ticks = 0;
  for (long offset = 0; offset < input_bytes;) {
    for (size_t i = 0; i < interpreter->inputs_size(); ++i) {
      TfLiteTensor* in = interpreter->input(i);
      memcpy(in->data.raw, kInput + offset, in->bytes);
      offset += static_cast<long>(in->bytes);
    }
    kTimer0[2] = 0xFFFFFFFFu;
    kTimer0[1] = 0xFFFFFFFFu;
    kTimer0[0] = 1u;
    const uint32_t start = kTimer0[1];
    if (interpreter->Invoke() != kTfLiteOk) {
      printf("Invoke failed\n");
      fclose(out);
      return 6;
    }
    ticks = start - kTimer0[1];
    for (size_t i = 0; i < interpreter->outputs_size(); ++i) {
      const TfLiteTensor* result = interpreter->output(i);
      if (fwrite(result->data.raw, 1, result->bytes, out) != result->bytes) {
        printf("cannot write %s\n", argv[3]);
        fclose(out);
        return 2;
      }
    }
  }
  if (fclose(out) != 0) return 2;
  PrintArenaReport(memory, *interpreter);
  // keras_patch.profile(model, kernel=...) predicts the head of this build.
  printf("kernel %s\n", keras_patch::KpCmsisEnabled() ? "cmsis_nn" : "portable");
  printf("instructions %llu\n", static_cast<unsigned long long>(ticks) * 40ull);
  return 0;
}
