/* Copyright 2026 The keras-patch Authors. Licensed under the Apache License 2.0.

Host end-to-end check of the TFLM adapter: runs a .tflite in TFLM's
MicroInterpreter -- a whole patched model (KP_PATCH_STAGE plus any builtin
op of this TFLM) or its unpatched original -- on the inputs read from a file,
and writes every output of every run.

  tflm_runner MODEL INPUT_BIN OUTPUT_BIN [ARENA_BYTES]

INPUT_BIN holds one or more runs back to back; a run is the model's input
tensors 0, 1, ... back to back, each as raw tensor bytes. OUTPUT_BIN gets,
for each run in turn, the output tensors 0, 1, ... back to back, raw bytes.
Before the runs it prints one line per input and output tensor,

  input I TYPE DIMS BYTES       e.g.  input 0 INT8 1x96x96x3 27648
  output I TYPE DIMS BYTES      e.g.  output 1 FLOAT32 1x10 40

(TYPE as TfLiteTypeGetName spells it, DIMS joined by "x", BYTES per run),
which is how a reader splits OUTPUT_BIN (tests/test_tflm_ops.py's
_read_runner_outputs). After the runs:
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
tests/test_tflm_ops.py (test_tflm_adapter_end_to_end, test_tflm_patched_mobilenet_v2,
test_tflm_runner_transpose_resize_two_outputs).
==============================================================================*/
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <vector>

#include <new>

#include "keras_patch_ops.h"
#include "tests/tflm_runner_common.h"
#include "tensorflow/lite/micro/arena_allocator/single_arena_buffer_allocator.h"
#include "tensorflow/lite/micro/memory_helpers.h"
#include "tensorflow/lite/micro/micro_arena_constants.h"
#include "tensorflow/lite/micro/memory_planner/greedy_memory_planner.h"
#include "tensorflow/lite/micro/micro_allocator.h"
#include "tensorflow/lite/micro/micro_interpreter.h"
#include "tensorflow/lite/micro/micro_log.h"
#include "tensorflow/lite/schema/schema_generated.h"

namespace {

using keras_patch_runner::CreateAllocator;
using keras_patch_runner::PrintArenaReport;
using keras_patch_runner::PrintTensor;

bool ReadFile(const char* path, std::vector<unsigned char>* out) {
  FILE* f = fopen(path, "rb");
  if (f == nullptr) return false;
  unsigned char buf[65536];
  size_t n;
  while ((n = fread(buf, 1, sizeof(buf), f)) > 0) out->insert(out->end(), buf, buf + n);
  fclose(f);
  return true;
}

// Every builtin op of the TFLM this runner is built against (each method of
// tflite::MicroMutableOpResolver that registers a BuiltinOperator: 100 at
// 90b983c2b, in the header's order), plus KP_PATCH_STAGE, so that any model
// TFLM can run runs here. tests/test_tflm_ops.py::test_runner_registers_every_builtin
// checks this list against micro_mutable_op_resolver.h (with KP_TFLM_DIR set).
constexpr unsigned int kNumBuiltinOps = 100;
using Resolver = tflite::MicroMutableOpResolver<kNumBuiltinOps + 1>;

TfLiteStatus AddOps(Resolver& r) {
  TF_LITE_ENSURE_STATUS(keras_patch::AddKerasPatchOps(r));
  TF_LITE_ENSURE_STATUS(r.AddAbs());
  TF_LITE_ENSURE_STATUS(r.AddAdd());
  TF_LITE_ENSURE_STATUS(r.AddAddN());
  TF_LITE_ENSURE_STATUS(r.AddArgMax());
  TF_LITE_ENSURE_STATUS(r.AddArgMin());
  TF_LITE_ENSURE_STATUS(r.AddAssignVariable());
  TF_LITE_ENSURE_STATUS(r.AddAveragePool2D());
  TF_LITE_ENSURE_STATUS(r.AddBatchMatMul());
  TF_LITE_ENSURE_STATUS(r.AddBatchToSpaceNd());
  TF_LITE_ENSURE_STATUS(r.AddBroadcastArgs());
  TF_LITE_ENSURE_STATUS(r.AddBroadcastTo());
  TF_LITE_ENSURE_STATUS(r.AddCallOnce());
  TF_LITE_ENSURE_STATUS(r.AddCast());
  TF_LITE_ENSURE_STATUS(r.AddCeil());
  TF_LITE_ENSURE_STATUS(r.AddConcatenation());
  TF_LITE_ENSURE_STATUS(r.AddConv2D());
  TF_LITE_ENSURE_STATUS(r.AddCos());
  TF_LITE_ENSURE_STATUS(r.AddCumSum());
  TF_LITE_ENSURE_STATUS(r.AddDepthToSpace());
  TF_LITE_ENSURE_STATUS(r.AddDepthwiseConv2D());
  TF_LITE_ENSURE_STATUS(r.AddDequantize());
  TF_LITE_ENSURE_STATUS(r.AddDiv());
  TF_LITE_ENSURE_STATUS(r.AddDynamicUpdateSlice());
  TF_LITE_ENSURE_STATUS(r.AddEmbeddingLookup());
  TF_LITE_ENSURE_STATUS(r.AddElu());
  TF_LITE_ENSURE_STATUS(r.AddEqual());
  TF_LITE_ENSURE_STATUS(r.AddExp());
  TF_LITE_ENSURE_STATUS(r.AddExpandDims());
  TF_LITE_ENSURE_STATUS(r.AddFill());
  TF_LITE_ENSURE_STATUS(r.AddFloor());
  TF_LITE_ENSURE_STATUS(r.AddFloorDiv());
  TF_LITE_ENSURE_STATUS(r.AddFloorMod());
  TF_LITE_ENSURE_STATUS(r.AddFullyConnected());
  TF_LITE_ENSURE_STATUS(r.AddGather());
  TF_LITE_ENSURE_STATUS(r.AddGatherNd());
  TF_LITE_ENSURE_STATUS(r.AddGreater());
  TF_LITE_ENSURE_STATUS(r.AddGreaterEqual());
  TF_LITE_ENSURE_STATUS(r.AddHardSwish());
  TF_LITE_ENSURE_STATUS(r.AddIf());
  TF_LITE_ENSURE_STATUS(r.AddL2Normalization());
  TF_LITE_ENSURE_STATUS(r.AddL2Pool2D());
  TF_LITE_ENSURE_STATUS(r.AddLeakyRelu());
  TF_LITE_ENSURE_STATUS(r.AddLess());
  TF_LITE_ENSURE_STATUS(r.AddLessEqual());
  TF_LITE_ENSURE_STATUS(r.AddLog());
  TF_LITE_ENSURE_STATUS(r.AddLogicalAnd());
  TF_LITE_ENSURE_STATUS(r.AddLogicalNot());
  TF_LITE_ENSURE_STATUS(r.AddLogicalOr());
  TF_LITE_ENSURE_STATUS(r.AddLogistic());
  TF_LITE_ENSURE_STATUS(r.AddLogSoftmax());
  TF_LITE_ENSURE_STATUS(r.AddMaximum());
  TF_LITE_ENSURE_STATUS(r.AddMaxPool2D());
  TF_LITE_ENSURE_STATUS(r.AddMirrorPad());
  TF_LITE_ENSURE_STATUS(r.AddMean());
  TF_LITE_ENSURE_STATUS(r.AddMinimum());
  TF_LITE_ENSURE_STATUS(r.AddMul());
  TF_LITE_ENSURE_STATUS(r.AddNeg());
  TF_LITE_ENSURE_STATUS(r.AddNotEqual());
  TF_LITE_ENSURE_STATUS(r.AddPack());
  TF_LITE_ENSURE_STATUS(r.AddPad());
  TF_LITE_ENSURE_STATUS(r.AddPadV2());
  TF_LITE_ENSURE_STATUS(r.AddPrelu());
  TF_LITE_ENSURE_STATUS(r.AddQuantize());
  TF_LITE_ENSURE_STATUS(r.AddReadVariable());
  TF_LITE_ENSURE_STATUS(r.AddReduceAll());
  TF_LITE_ENSURE_STATUS(r.AddReduceMax());
  TF_LITE_ENSURE_STATUS(r.AddReduceMin());
  TF_LITE_ENSURE_STATUS(r.AddRelu());
  TF_LITE_ENSURE_STATUS(r.AddRelu6());
  TF_LITE_ENSURE_STATUS(r.AddReshape());
  TF_LITE_ENSURE_STATUS(r.AddResizeBilinear());
  TF_LITE_ENSURE_STATUS(r.AddResizeNearestNeighbor());
  TF_LITE_ENSURE_STATUS(r.AddReverseV2());
  TF_LITE_ENSURE_STATUS(r.AddRound());
  TF_LITE_ENSURE_STATUS(r.AddRsqrt());
  TF_LITE_ENSURE_STATUS(r.AddSelectV2());
  TF_LITE_ENSURE_STATUS(r.AddShape());
  TF_LITE_ENSURE_STATUS(r.AddSin());
  TF_LITE_ENSURE_STATUS(r.AddSlice());
  TF_LITE_ENSURE_STATUS(r.AddSoftmax());
  TF_LITE_ENSURE_STATUS(r.AddSpaceToBatchNd());
  TF_LITE_ENSURE_STATUS(r.AddSpaceToDepth());
  TF_LITE_ENSURE_STATUS(r.AddSplit());
  TF_LITE_ENSURE_STATUS(r.AddSplitV());
  TF_LITE_ENSURE_STATUS(r.AddSqueeze());
  TF_LITE_ENSURE_STATUS(r.AddSqrt());
  TF_LITE_ENSURE_STATUS(r.AddSquare());
  TF_LITE_ENSURE_STATUS(r.AddSquaredDifference());
  TF_LITE_ENSURE_STATUS(r.AddStridedSlice());
  TF_LITE_ENSURE_STATUS(r.AddSub());
  TF_LITE_ENSURE_STATUS(r.AddSum());
  TF_LITE_ENSURE_STATUS(r.AddSvdf());
  TF_LITE_ENSURE_STATUS(r.AddTanh());
  TF_LITE_ENSURE_STATUS(r.AddTransposeConv());
  TF_LITE_ENSURE_STATUS(r.AddTranspose());
  TF_LITE_ENSURE_STATUS(r.AddUnpack());
  TF_LITE_ENSURE_STATUS(r.AddUnidirectionalSequenceLSTM());
  TF_LITE_ENSURE_STATUS(r.AddVarHandle());
  TF_LITE_ENSURE_STATUS(r.AddWhile());
  TF_LITE_ENSURE_STATUS(r.AddZerosLike());
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
  if (AddOps(resolver) != kTfLiteOk) {
    fprintf(stderr, "registering the ops failed (resolver capacity %d)\n", static_cast<int>(kNumBuiltinOps + 1));
    return 3;
  }
  tflite::SingleArenaBufferAllocator* memory = nullptr;
  tflite::MicroAllocator* allocator = CreateAllocator(arena, arena_size, &memory);
  if (allocator == nullptr) return 4;
  tflite::MicroInterpreter interpreter(model, resolver, allocator);
  if (interpreter.AllocateTensors() != kTfLiteOk) {
    fprintf(stderr, "AllocateTensors failed\n");
    return 4;
  }
  size_t run_bytes = 0;  // all inputs of one run
  for (size_t i = 0; i < interpreter.inputs_size(); ++i) {
    PrintTensor("input", i, interpreter.input(i));
    run_bytes += interpreter.input(i)->bytes;
  }
  for (size_t i = 0; i < interpreter.outputs_size(); ++i) {
    PrintTensor("output", i, interpreter.output(i));
  }
  if (run_bytes == 0 || input.size() % run_bytes != 0) {
    fprintf(stderr, "input file has %d bytes, not a multiple of the %d bytes of the model's %d input(s)\n",
            static_cast<int>(input.size()), static_cast<int>(run_bytes),
            static_cast<int>(interpreter.inputs_size()));
    return 5;
  }
  FILE* out = fopen(argv[3], "wb");
  if (out == nullptr) return 2;
  for (size_t offset = 0; offset < input.size();) {
    for (size_t i = 0; i < interpreter.inputs_size(); ++i) {
      TfLiteTensor* in = interpreter.input(i);
      memcpy(in->data.raw, &input[offset], in->bytes);
      offset += in->bytes;
    }
    if (interpreter.Invoke() != kTfLiteOk) {
      fprintf(stderr, "Invoke failed\n");
      fclose(out);
      return 6;
    }
    for (size_t i = 0; i < interpreter.outputs_size(); ++i) {
      const TfLiteTensor* result = interpreter.output(i);
      if (fwrite(result->data.raw, 1, result->bytes, out) != result->bytes) {
        fprintf(stderr, "cannot write %s\n", argv[3]);
        fclose(out);
        return 2;
      }
    }
  }
  if (fclose(out) != 0) return 2;
  PrintArenaReport(memory, interpreter);
  return 0;
}
