// What tflm_runner.cc (host) and tflm_runner_m4.cc (Cortex-M4 firmware)
// share: the MicroAllocator they build (so the head and tail stay readable)
// and the lines a reader of their output splits by. Test code, linked with
// the user's own TFLM build.
#ifndef KERAS_PATCH_TFLM_OPS_TESTS_TFLM_RUNNER_COMMON_H_
#define KERAS_PATCH_TFLM_OPS_TESTS_TFLM_RUNNER_COMMON_H_

#include <stddef.h>
#include <stdint.h>
#include <stdio.h>

#include <new>

#include "tensorflow/lite/micro/arena_allocator/single_arena_buffer_allocator.h"
#include "tensorflow/lite/micro/memory_helpers.h"
#include "tensorflow/lite/micro/memory_planner/greedy_memory_planner.h"
#include "tensorflow/lite/micro/micro_allocator.h"
#include "tensorflow/lite/micro/micro_arena_constants.h"
#include "tensorflow/lite/micro/micro_interpreter.h"

namespace keras_patch_runner {

// "input 0 INT8 1x96x96x3 27648": the line a reader splits the files by.
inline void PrintTensor(const char* kind, size_t index, const TfLiteTensor* t) {
  printf("%s %d %s ", kind, static_cast<int>(index), TfLiteTypeGetName(t->type));
  for (int d = 0; t->dims != nullptr && d < t->dims->size; ++d) {
    printf(d == 0 ? "%d" : "x%d", t->dims->data[d]);
  }
  printf(" %d\n", static_cast<int>(t->bytes));
}

// What MicroAllocator::Create(arena, size) does, keeping a handle on the
// arena allocator (*memory) to read the head and tail sizes. nullptr when the
// arena cannot hold the planner.
inline tflite::MicroAllocator* CreateAllocator(uint8_t* arena, size_t arena_size,
                                               tflite::SingleArenaBufferAllocator** memory) {
  uint8_t* aligned_arena = tflite::AlignPointerUp(arena, tflite::MicroArenaBufferAlignment());
  *memory = tflite::SingleArenaBufferAllocator::Create(aligned_arena,
                                                       arena_size - static_cast<size_t>(aligned_arena - arena));
  uint8_t* planner_buffer = (*memory)->AllocatePersistentBuffer(sizeof(tflite::GreedyMemoryPlanner),
                                                                alignof(tflite::GreedyMemoryPlanner));
  if (planner_buffer == nullptr) return nullptr;
  tflite::MicroMemoryPlanner* planner = new (planner_buffer) tflite::GreedyMemoryPlanner();
  return tflite::MicroAllocator::Create(*memory, planner);
}

// The arena lines keras_patch.arena.tflm_arena and the tests read.
inline void PrintArenaReport(tflite::SingleArenaBufferAllocator* memory, tflite::MicroInterpreter& interpreter) {
  printf("arena_head_bytes %d\n", static_cast<int>(memory->GetNonPersistentUsedBytes()));
  printf("arena_tail_bytes %d\n", static_cast<int>(memory->GetPersistentUsedBytes()));
  printf("arena_used_bytes %d\n", static_cast<int>(interpreter.arena_used_bytes()));
}

}  // namespace keras_patch_runner

#endif  // KERAS_PATCH_TFLM_OPS_TESTS_TFLM_RUNNER_COMMON_H_
