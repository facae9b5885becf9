/* Copyright 2026 The keras-patch Authors. Licensed under the Apache License 2.0.
==============================================================================*/
#include "patch_geometry.h"

namespace keras_patch {
namespace {

inline int32_t Min32(int32_t a, int32_t b) { return a < b ? a : b; }
inline int32_t Max32(int32_t a, int32_t b) { return a > b ? a : b; }

// Input span [lo, hi) read by output rows [o0, o1), clipped to [0, size).
// int64: (o1 - 1) * stride can exceed int32 for hostile (validated) shapes.
void InputSpan(int32_t o0, int32_t o1, int32_t kernel, int32_t stride, int32_t dilation,
               int32_t pad, int32_t size, int32_t* lo, int32_t* hi) {
  const int64_t l = static_cast<int64_t>(o0) * stride - pad;
  const int64_t h = static_cast<int64_t>(o1 - 1) * stride - pad +
                    static_cast<int64_t>(kernel - 1) * dilation + 1;
  *lo = static_cast<int32_t>(l < 0 ? 0 : (l > size ? size : l));
  *hi = static_cast<int32_t>(h > size ? size : (h < 0 ? 0 : h));
}

KpRegion Hull(const KpRegion& a, const KpRegion& b) {
  if (RegionEmpty(a)) return RegionEmpty(b) ? kKpEmptyRegion : b;
  if (RegionEmpty(b)) return a;
  KpRegion r;
  r.y0 = Min32(a.y0, b.y0);
  r.y1 = Max32(a.y1, b.y1);
  r.x0 = Min32(a.x0, b.x0);
  r.x1 = Max32(a.x1, b.x1);
  return r;
}

inline uint64_t Align4(uint64_t n) { return (n + 3) / 4 * 4; }

}  // namespace

void TileBounds(int32_t size, int32_t parts, int32_t index, int32_t* lo, int32_t* hi) {
  *lo = static_cast<int32_t>(static_cast<int64_t>(index) * size / parts);
  *hi = static_cast<int32_t>(static_cast<int64_t>(index + 1) * size / parts);
}

KpRegion StageTile(const KpStage& stage, int32_t index) {
  const KpTensor& out = stage.tensors[stage.num_layers];
  KpRegion tile;
  TileBounds(out.h, stage.grid_h, index / stage.grid_w, &tile.y0, &tile.y1);
  TileBounds(out.w, stage.grid_w, index % stage.grid_w, &tile.x0, &tile.x1);
  return tile;
}

void PatchRegions(const KpStage& stage, const KpRegion& tile, KpRegion* regions) {
  const int32_t num_layers = stage.num_layers;
  for (int32_t t = 0; t < num_layers; ++t) regions[t] = kKpEmptyRegion;
  regions[num_layers] = tile;
  for (int32_t l = num_layers - 1; l >= 0; --l) {
    const KpRegion out = regions[l + 1];
    if (RegionEmpty(out)) continue;
    const KpLayer& layer = stage.layers[l];
    const KpTensor& in = stage.tensors[layer.in_a];
    KpRegion need;
    InputSpan(out.y0, out.y1, layer.kernel_h, layer.stride_h, layer.dilation_h, layer.pad_top,
              in.h, &need.y0, &need.y1);
    InputSpan(out.x0, out.x1, layer.kernel_w, layer.stride_w, layer.dilation_w, layer.pad_left,
              in.w, &need.x0, &need.x1);
    if (RegionEmpty(need)) continue;
    regions[layer.in_a] = Hull(regions[layer.in_a], need);
    if (layer.in_b >= 0) regions[layer.in_b] = Hull(regions[layer.in_b], need);
  }
}

KpStatus PlanPatchArena(KpStage* stage, const KpReporter& reporter) {
  const int32_t num_tensors = stage->num_layers + 1;
  KpTensor* tensors = stage->tensors;
  for (int32_t t = 0; t < num_tensors; ++t) {
    tensors[t].arena_offset = -1;
    tensors[t].arena_size = 0;
  }
  const int32_t num_tiles = stage->grid_h * stage->grid_w;
  // Largest bytes per tensor, accumulated tile by tile (an intermediate
  // tensor has at most 2^31 - 1 elements, validated in Prepare).
  for (int32_t i = 0; i < num_tiles; ++i) {
    PatchRegions(*stage, StageTile(*stage, i), stage->regions);
    for (int32_t t = 1; t < num_tensors - 1; ++t) {
      const uint64_t bytes =
          Align4(static_cast<uint64_t>(RegionArea(stage->regions[t])) * tensors[t].c);
      if (bytes > static_cast<uint64_t>(INT32_MAX)) {
        reporter.report(reporter.context,
                        "KP_PATCH_STAGE options: key 'tensor_shape': tensor %d needs more than "
                        "2^31 - 1 bytes per patch.",
                        static_cast<int>(t));
        return kKpError;
      }
      if (static_cast<int32_t>(bytes) > tensors[t].arena_size) {
        tensors[t].arena_size = static_cast<int32_t>(bytes);
      }
    }
  }
  // First fit in order of decreasing size (ties: lower index first).  The
  // order is found by selection over the unplaced tensors (L <= 256).
  uint64_t total = 0;
  for (;;) {
    int32_t next = -1;
    for (int32_t t = 1; t < num_tensors - 1; ++t) {
      if (tensors[t].arena_offset >= 0 || tensors[t].arena_size == 0) continue;
      if (next < 0 || tensors[t].arena_size > tensors[next].arena_size) next = t;
    }
    if (next < 0) break;
    KpTensor& cur = tensors[next];
    // Lowest 4-aligned offset not overlapping any placed, lifetime-overlapping
    // tensor: candidates are 0 and the ends of those tensors.
    uint64_t best = 0;
    bool found = false;
    for (int32_t c = -1; c < num_tensors; ++c) {
      uint64_t offset = 0;
      if (c >= 0) {
        const KpTensor& o = tensors[c];
        if (o.arena_offset < 0 || o.last_use < cur.first_use || cur.last_use < o.first_use) {
          continue;
        }
        offset = static_cast<uint64_t>(o.arena_offset) + o.arena_size;
      }
      if (found && offset >= best) continue;
      bool fits = true;
      for (int32_t u = 0; u < num_tensors && fits; ++u) {
        const KpTensor& o = tensors[u];
        if (o.arena_offset < 0 || o.last_use < cur.first_use || cur.last_use < o.first_use) {
          continue;
        }
        const uint64_t start = static_cast<uint64_t>(o.arena_offset);
        const uint64_t end = start + o.arena_size;
        if (offset < end && start < offset + cur.arena_size) fits = false;
      }
      if (fits) {
        best = offset;
        found = true;
      }
    }
    if (best + cur.arena_size > static_cast<uint64_t>(INT32_MAX)) {
      reporter.report(reporter.context,
                      "KP_PATCH_STAGE options: key 'tensor_shape': the patch arena exceeds "
                      "2^31 - 1 bytes.");
      return kKpError;
    }
    cur.arena_offset = static_cast<int32_t>(best);
    if (best + cur.arena_size > total) total = best + cur.arena_size;
  }
  stage->arena_bytes = static_cast<uint32_t>(total);
  return kKpOk;
}

}  // namespace keras_patch
