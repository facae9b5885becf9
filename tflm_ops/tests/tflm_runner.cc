/* Copyright 2026 The keras-patch Authors. Licensed under the Apache License 2.0.

Host end-to-end check of the TFLM adapter: runs a .tflite in TFLM's
MicroInterpreter -- a whole patched model (KP_PATCH_STAGE plus the builtin
ops of MobileNet-style networks) or its unpatched original -- on the inputs
read from a file (one or more input tensors back to back), and writes the
outputs (output 0 of each run, back to back).

  tflm_runner MODEL INPUT_BIN OUTPUT_BIN [ARENA_BYTES]

It prints the arena as TFLM's allocator sees it after AllocateTensors:
  arena_head_bytes N   the planned, non-persistent part (activations and
                       scratch buffers, the patch arena included) -- what
                       keras_patch.profile() predicts as the peak
  arena_tail_bytes N   the persistent part (TfLiteEvalTensors, op data, ...)
  arena_used_bytes N   MicroInterpreter::arena_used_bytes() = head + tail
(the same numbers as RecordingMicroAllocator's "Arena allocation head/tail",
without the recorder's own bytes in the arena).

How to register the op next to the builtins a model needs:

  tflite::MicroMutableOpResolver<N> resolver;
  resolver.AddConv2D(); resolver.AddDepthwiseConv2D(); ...
  keras_patch::AddKerasPatchOps(resolver);

Built by `make -C tflm_ops tflm-runner TFLM_DIR=...`; driven by
tests/test_tflm_ops.py::test_tflm_adapter_end_to_end.
==============================================================================*/
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <vector>

#include <new>

#include "keras_patch_ops.h"
#include "tensorflow/lite/micro/arena_allocator/single_arena_buffer_allocator.h"
#include "tensorflow/lite/micro/memory_helpers.h"
#include "tensorflow/lite/micro/micro_arena_constants.h"
#include "tensorflow/lite/micro/memory_planner/greedy_memory_planner.h"
#include "tensorflow/lite/micro/micro_allocator.h"
#include "tensorflow/lite/micro/micro_interpreter.h"
#include "tensorflow/lite/micro/micro_log.h"
#include "tensorflow/lite/schema/schema_generated.h"

namespace {

bool ReadFile(const char* path, std::vector<unsigned char>* out) {
  FILE* f = fopen(path, "rb");
  if (f == nullptr) return false;
  unsigned char buf[65536];
  size_t n;
  while ((n = fread(buf, 1, sizeof(buf), f)) > 0) out->insert(out->end(), buf, buf + n);
  fclose(f);
  return true;
}

// The builtin ops of MobileNet-style int8 models (what patchify leaves
// outside the stage), plus KP_PATCH_STAGE.
using Resolver = tflite::MicroMutableOpResolver<20>;

TfLiteStatus AddOps(Resolver& r) {
  TF_LITE_ENSURE_STATUS(keras_patch::AddKerasPatchOps(r));
  TF_LITE_ENSURE_STATUS(r.AddConv2D());
  TF_LITE_ENSURE_STATUS(r.AddDepthwiseConv2D());
  TF_LITE_ENSURE_STATUS(r.AddAdd());
  TF_LITE_ENSURE_STATUS(r.AddPad());
  TF_LITE_ENSURE_STATUS(r.AddPadV2());
  TF_LITE_ENSURE_STATUS(r.AddMean());
  TF_LITE_ENSURE_STATUS(r.AddAveragePool2D());
  TF_LITE_ENSURE_STATUS(r.AddMaxPool2D());
  TF_LITE_ENSURE_STATUS(r.AddFullyConnected());
  TF_LITE_ENSURE_STATUS(r.AddReshape());
  TF_LITE_ENSURE_STATUS(r.AddQuantize());
  TF_LITE_ENSURE_STATUS(r.AddDequantize());
  TF_LITE_ENSURE_STATUS(r.AddSoftmax());
  TF_LITE_ENSURE_STATUS(r.AddRelu());
  TF_LITE_ENSURE_STATUS(r.AddRelu6());
  TF_LITE_ENSURE_STATUS(r.AddMul());
  TF_LITE_ENSURE_STATUS(r.AddConcatenation());
  return kTfLiteOk;
}

}  // namespace

int main(int argc, char** argv) {
  if (argc < 4) {
    fprintf(stderr, "usage: %s MODEL INPUT_BIN OUTPUT_BIN [ARENA_BYTES]\n", argv[0]);
    return 2;
  }
  std::vector<unsigned char> model_bytes, input;
  if (!ReadFile(argv[1], &model_bytes) || !ReadFile(argv[2], &input)) {
    fprintf(stderr, "cannot read inputs\n");
    return 2;
  }
  const size_t arena_size = argc > 4 ? static_cast<size_t>(atol(argv[4])) : (16 << 20);
  // The arena (aligned to 16 bytes below, as MicroAllocator::Create does).
  std::vector<unsigned long long> arena_storage(arena_size / 8 + 2);
  uint8_t* arena = reinterpret_cast<uint8_t*>(&arena_storage[0]);

  // The model's flatbuffer, 8-byte aligned.
  std::vector<unsigned long long> model_storage(model_bytes.size() / 8 + 2);
  memcpy(&model_storage[0], &model_bytes[0], model_bytes.size());
  const tflite::Model* model = tflite::GetModel(&model_storage[0]);
  static Resolver resolver;
  if (AddOps(resolver) != kTfLiteOk) return 3;
  // What MicroAllocator::Create(arena, size) does, keeping a handle on the
  // arena allocator to read the head and tail sizes.
  uint8_t* aligned_arena = tflite::AlignPointerUp(arena, tflite::MicroArenaBufferAlignment());
  tflite::SingleArenaBufferAllocator* memory = tflite::SingleArenaBufferAllocator::Create(
      aligned_arena, arena_size - static_cast<size_t>(aligned_arena - arena));
  uint8_t* planner_buffer = memory->AllocatePersistentBuffer(
      sizeof(tflite::GreedyMemoryPlanner), alignof(tflite::GreedyMemoryPlanner));
  if (planner_buffer == nullptr) return 4;
  tflite::MicroMemoryPlanner* planner = new (planner_buffer) tflite::GreedyMemoryPlanner();
  tflite::MicroAllocator* allocator = tflite::MicroAllocator::Create(memory, planner);
  tflite::MicroInterpreter interpreter(model, resolver, allocator);
  if (interpreter.AllocateTensors() != kTfLiteOk) {
    fprintf(stderr, "AllocateTensors failed\n");
    return 4;
  }
  TfLiteTensor* in = interpreter.input(0);
  if (in->bytes == 0 || input.size() % in->bytes != 0) {
    fprintf(stderr, "input file has %d bytes, the model input %d\n", static_cast<int>(input.size()),
            static_cast<int>(in->bytes));
    return 5;
  }
  FILE* out = fopen(argv[3], "wb");
  if (out == nullptr) return 2;
  for (size_t offset = 0; offset < input.size(); offset += in->bytes) {
    memcpy(in->data.raw, &input[offset], in->bytes);
    if (interpreter.Invoke() != kTfLiteOk) {
      fprintf(stderr, "Invoke failed\n");
      fclose(out);
      return 6;
    }
    TfLiteTensor* result = interpreter.output(0);
    fwrite(result->data.raw, 1, result->bytes, out);
  }
  fclose(out);
  printf("arena_head_bytes %d\n", static_cast<int>(memory->GetNonPersistentUsedBytes()));
  printf("arena_tail_bytes %d\n", static_cast<int>(memory->GetPersistentUsedBytes()));
  printf("arena_used_bytes %d\n", static_cast<int>(interpreter.arena_used_bytes()));
  return 0;
}
