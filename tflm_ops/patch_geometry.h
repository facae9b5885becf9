/* Copyright 2026 The keras-patch Authors. Licensed under the Apache License 2.0.

Patch geometry of KP_PATCH_STAGE (docs/patch_stage_op.md, "Patch geometry"
and "Scratch buffers"); the Python twin is keras_patch/stage/geometry.py.
==============================================================================*/
#ifndef KERAS_PATCH_TFLM_OPS_PATCH_GEOMETRY_H_
#define KERAS_PATCH_TFLM_OPS_PATCH_GEOMETRY_H_

#include "patch_stage_types.h"

namespace keras_patch {

static const KpRegion kKpEmptyRegion = {0, 0, 0, 0};

inline bool RegionEmpty(const KpRegion& r) { return r.y0 >= r.y1 || r.x0 >= r.x1; }

inline int64_t RegionArea(const KpRegion& r) {
  return RegionEmpty(r) ? 0 : static_cast<int64_t>(r.y1 - r.y0) * (r.x1 - r.x0);
}

// Whether the stage ends with a MEAN layer (a global average pool).
inline bool EndsWithMean(const KpStage& stage) {
  return stage.num_layers >= 1 && stage.layers[stage.num_layers - 1].op == kKpOpMean;
}

// The stage tensor `grid` tiles: the output, or a final MEAN's input
// (tensor L - 1, docs "Patch geometry").
inline int32_t TiledTensor(const KpStage& stage) {
  return EndsWithMean(stage) ? stage.num_layers - 1 : stage.num_layers;
}

// Bytes of a final MEAN's int32 sums at offset 0 of the patch arena
// (align4(4 * C_L)); 0 without a MEAN.
inline uint32_t MeanSumsBytes(const KpStage& stage) {
  return EndsWithMean(stage)
             ? (4u * static_cast<uint32_t>(stage.tensors[stage.num_layers].c) + 3u) / 4u * 4u
             : 0u;
}

// Tile `index` of `parts` over `size`: [floor(i*size/parts), floor((i+1)*size/parts)).
void TileBounds(int32_t size, int32_t parts, int32_t index, int32_t* lo, int32_t* hi);

// Tile `index` (row-major over the grid) of the tiled tensor.
KpRegion StageTile(const KpStage& stage, int32_t index);

// Region of every stage tensor (0 .. L) needed for `tile` of the tiled
// tensor (a final MEAN's output gets the empty region).
void PatchRegions(const KpStage& stage, const KpRegion& tile, KpRegion* regions);

// Plans the patch arena: fills tensors[t].arena_offset / arena_size,
// layers[l].save_offset / save_bytes (in-place layers, docs "In place") and
// stage->arena_bytes.  With a final MEAN every buffer follows its sums
// (docs "Scratch buffers", step 5).  Uses stage->regions as working memory.
// Fails (naming 'tensor_shape') if the arena does not fit in 2^31 - 1 bytes.
KpStatus PlanPatchArena(KpStage* stage, bool in_place, const KpReporter& reporter);

// The scratch buffers the kernel requests in Prepare with
// RequestScratchBufferInArena (docs "Scratch buffers"), by name.
enum KpStageBufferKind {
  kKpBufferPatchArena = 0,    // "patch arena": stage->arena_bytes (P)
  kKpBufferCmsisContext = 1,  // "CMSIS-NN context": stage->context_bytes (Q)
};
static const int32_t kKpMaxStageBuffers = 2;

struct KpStageBuffer {
  int32_t kind;    // KpStageBufferKind
  uint32_t bytes;  // > 0
};

// The one definition of that list (the Python twin is
// keras_patch.stage.geometry.stage_buffers): fills buffers[0 .. n-1] in
// request order and returns n (<= kKpMaxStageBuffers): the patch arena when
// P > 0, then, when `cmsis_nn` (the core built with the CMSIS-NN fast path,
// KpCmsisEnabled()), the CMSIS-NN context when Q > 0.  `stage` is prepared
// (KpPrepareStage).
int32_t KpStageBuffers(const KpStage& stage, bool cmsis_nn, KpStageBuffer* buffers);

}  // namespace keras_patch

#endif  // KERAS_PATCH_TFLM_OPS_PATCH_GEOMETRY_H_
