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

// Tile `index` of `parts` over `size`: [floor(i*size/parts), floor((i+1)*size/parts)).
void TileBounds(int32_t size, int32_t parts, int32_t index, int32_t* lo, int32_t* hi);

// Output tile `index` (row-major over the grid).
KpRegion StageTile(const KpStage& stage, int32_t index);

// Region of every stage tensor (0 .. L) needed for output `tile`.
void PatchRegions(const KpStage& stage, const KpRegion& tile, KpRegion* regions);

// Plans the patch arena: fills tensors[t].arena_offset / arena_size,
// layers[l].save_offset / save_bytes (in-place layers, docs "In place") and
// stage->arena_bytes.  Uses stage->regions as working memory.  Fails (naming
// 'tensor_shape') if the arena does not fit in 2^31 - 1 bytes.
KpStatus PlanPatchArena(KpStage* stage, bool in_place, const KpReporter& reporter);

}  // namespace keras_patch

#endif  // KERAS_PATCH_TFLM_OPS_PATCH_GEOMETRY_H_
