/* Copyright 2026 The keras-patch Authors. Licensed under the Apache License 2.0.

Host end-to-end check of the TFLM adapter: runs a .tflite whose operators are
KP_PATCH_STAGE ops (e.g. a patched model cut to its stage) in TFLM's
MicroInterpreter with keras_patch::AddKerasPatchOps, on int8 inputs read from
a file, and writes the int8 outputs.

  tflm_runner MODEL INPUT_BIN OUTPUT_BIN [ARENA_BYTES]

Built by `make -C tflm_ops tflm-runner TFLM_DIR=...`; driven by
tests/test_tflm_ops.py::test_tflm_adapter_end_to_end.
==============================================================================*/
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <vector>

#include "keras_patch_ops.h"
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
  const size_t arena_size = argc > 4 ? static_cast<size_t>(atol(argv[4])) : (1 << 20);
  // 16-byte aligned arena.
  std::vector<unsigned long long> arena_storage(arena_size / 8 + 2);
  uint8_t* arena = reinterpret_cast<uint8_t*>(&arena_storage[0]);

  const tflite::Model* model = tflite::GetModel(&model_bytes[0]);
  tflite::MicroMutableOpResolver<1> resolver;
  if (keras_patch::AddKerasPatchOps(resolver) != kTfLiteOk) return 3;
  tflite::MicroInterpreter interpreter(model, resolver, arena, arena_size);
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
  printf("arena_used_bytes %d\n", static_cast<int>(interpreter.arena_used_bytes()));
  return 0;
}
