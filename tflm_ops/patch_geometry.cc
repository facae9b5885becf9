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
  const KpTensor& out = stage.tensors[TiledTensor(stage)];
  KpRegion tile;
  TileBounds(out.h, stage.grid_h, index / stage.grid_w, &tile.y0, &tile.y1);
  TileBounds(out.w, stage.grid_w, index % stage.grid_w, &tile.x0, &tile.x1);
  return tile;
}

void PatchRegions(const KpStage& stage, const KpRegion& tile, KpRegion* regions) {
  const int32_t num_layers = stage.num_layers;
  const int32_t tiled = TiledTensor(stage);
  for (int32_t t = 0; t <= num_layers; ++t) regions[t] = kKpEmptyRegion;
  regions[tiled] = tile;  // a final MEAN's output keeps the empty region
  for (int32_t l = tiled - 1; l >= 0; --l) {
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

namespace {

// Save-buffer state of a layer during planning (docs "In place"): -1 not in
// place, kUnplaced in place but not yet placed, >= 0 its offset.
const int32_t kUnplaced = -2;

bool InPlaceLayer(const KpStage& s, int32_t l) { return s.layers[l].save_offset != -1; }

// The tensor written over tensor u's slot (the output of its in-place last
// reader), or -1.
int32_t NextMember(const KpStage& s, int32_t u) {
  const int32_t l = s.tensors[u].last_use;
  if (l < 0 || l >= s.num_layers || !InPlaceLayer(s, l) || s.layers[l].in_a != u) return -1;
  return l + 1;
}

// One buffer of the placement: key 1 .. L-1 is the slot of the in-place
// chain that starts at (head) tensor `key`; key L + 1 + l the save buffer of
// in-place layer l.  False for keys that name no buffer.
struct Buffer {
  uint64_t size;
  int32_t first, last;
  int64_t offset;  // -1: not placed yet
};
bool GetBufferAt(const KpStage& s, int32_t key, Buffer* b) {
  const int32_t L = s.num_layers;
  if (key >= 1 && key < L) {
    if (InPlaceLayer(s, key - 1)) return false;  // not a chain head
    b->size = 0;
    b->first = s.tensors[key].first_use;
    for (int32_t u = key; u > 0 && u < L; u = NextMember(s, u)) {
      if (static_cast<uint64_t>(s.tensors[u].arena_size) > b->size) b->size = s.tensors[u].arena_size;
      b->last = s.tensors[u].last_use;
    }
    b->offset = s.tensors[key].arena_offset;  // the group's offset while placing
    return true;
  }
  const int32_t l = key - L - 1;
  if (l < 0 || l >= L || !InPlaceLayer(s, l)) return false;
  b->size = static_cast<uint64_t>(s.layers[l].save_bytes);
  b->first = b->last = l;
  b->offset = s.layers[l].save_offset >= 0 ? s.layers[l].save_offset : -1;
  return true;
}

// First fit of all buffers (decreasing size; ties: lower key).  Group
// offsets are kept in tensors[head].arena_offset.  Returns the arena size,
// or UINT64_MAX past 2^31 - 1 bytes.
uint64_t PlaceBuffers(KpStage* stage) {
  KpStage& s = *stage;
  const int32_t L = s.num_layers;
  const int32_t num_keys = 2 * L + 1;
  for (int32_t t = 0; t <= L; ++t) s.tensors[t].arena_offset = -1;
  for (int32_t l = 0; l < L; ++l) {
    if (InPlaceLayer(s, l)) s.layers[l].save_offset = kUnplaced;
  }
  uint64_t total = 0;
  for (;;) {
    int32_t next = -1;
    Buffer cur = {0, 0, 0, -1};
    for (int32_t k = 1; k < num_keys; ++k) {
      Buffer b;
      if (!GetBufferAt(s, k, &b) || b.offset >= 0 || b.size == 0) continue;
      if (next < 0 || b.size > cur.size) {
        next = k;
        cur = b;
      }
    }
    if (next < 0) break;
    uint64_t best = 0;
    bool found = false;
    for (int32_t c = 0; c < num_keys; ++c) {
      uint64_t offset = 0;
      if (c > 0) {
        Buffer o;
        if (!GetBufferAt(s, c, &o) || o.offset < 0 || o.last < cur.first || cur.last < o.first) {
          continue;
        }
        offset = static_cast<uint64_t>(o.offset) + o.size;
      }
      if (found && offset >= best) continue;
      bool fits = true;
      for (int32_t u = 1; u < num_keys && fits; ++u) {
        Buffer o;
        if (!GetBufferAt(s, u, &o) || o.offset < 0 || o.last < cur.first || cur.last < o.first) {
          continue;
        }
        const uint64_t start = static_cast<uint64_t>(o.offset);
        if (offset < start + o.size && start < offset + cur.size) fits = false;
      }
      if (fits) {
        best = offset;
        found = true;
      }
    }
    if (best + cur.size > static_cast<uint64_t>(INT32_MAX)) return UINT64_MAX;
    if (next < L) {
      s.tensors[next].arena_offset = static_cast<int32_t>(best);
    } else {
      s.layers[next - L - 1].save_offset = static_cast<int32_t>(best);
    }
    if (best + cur.size > total) total = best + cur.size;
  }
  // Members share their head's slot; tensors of size 0 are not placed.
  for (int32_t t = L - 1; t >= 1; --t) {
    int32_t head = t;
    while (head > 1 && InPlaceLayer(s, head - 1)) head = s.layers[head - 1].in_a;
    if (head != t) s.tensors[t].arena_offset = s.tensors[head].arena_offset;
  }
  for (int32_t t = 1; t < L; ++t) {
    if (s.tensors[t].arena_size == 0) s.tensors[t].arena_offset = -1;
  }
  for (int32_t l = 0; l < L; ++l) {
    if (s.layers[l].save_offset == kUnplaced) s.layers[l].save_offset = -1;
  }
  return total;
}

}  // namespace

KpStatus PlanPatchArena(KpStage* stage, bool in_place, const KpReporter& reporter) {
  const int32_t num_tensors = stage->num_layers + 1;
  const int32_t L = stage->num_layers;
  KpTensor* tensors = stage->tensors;
  for (int32_t t = 0; t < num_tensors; ++t) {
    tensors[t].arena_offset = -1;
    tensors[t].arena_size = 0;
  }
  for (int32_t l = 0; l < L; ++l) {
    stage->layers[l].save_offset = -1;
    stage->layers[l].save_bytes = 0;
  }
  const int32_t num_tiles = stage->grid_h * stage->grid_w;
  // Largest bytes per tensor, accumulated tile by tile (an intermediate
  // tensor has at most 2^31 - 1 elements, validated in Prepare), and the
  // largest plane of each layer's input (its save buffer if in place).
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
    for (int32_t l = 0; l < L; ++l) {
      // A plane has at most 2^31 - 1 elements (one channel of a valid tensor).
      const uint64_t plane = Align4(static_cast<uint64_t>(
          RegionArea(stage->regions[stage->layers[l].in_a])));
      if (plane > static_cast<uint64_t>(INT32_MAX)) continue;  // never in place
      if (static_cast<int32_t>(plane) > stage->layers[l].save_bytes) {
        stage->layers[l].save_bytes = static_cast<int32_t>(plane);
      }
    }
  }
  if (in_place && L == 1) {
    // One-layer in-place DEPTHWISE_CONV_2D: the arena is one input plane.
    stage->layers[0].save_offset = stage->layers[0].save_bytes > 0 ? 0 : -1;
    stage->arena_bytes = static_cast<uint32_t>(stage->layers[0].save_bytes);
    return kKpOk;
  }
  uint64_t total = PlaceBuffers(stage);
  bool any_candidate = false;
  if (in_place) {
    for (int32_t l = 0; l < L; ++l) {
      const KpLayer& layer = stage->layers[l];
      const KpTensor& in = tensors[layer.in_a];
      if (layer.op == kKpOpDepthwiseConv2D && layer.in_a >= 1 && l + 1 < L &&
          in.last_use == l && in.c == tensors[l + 1].c) {
        stage->layers[l].save_offset = kUnplaced;
        any_candidate = true;
      }
    }
  }
  if (any_candidate) {
    const uint64_t with = PlaceBuffers(stage);
    if (with < total) {
      total = with;
    } else {
      for (int32_t l = 0; l < L; ++l) stage->layers[l].save_offset = -1;
      total = PlaceBuffers(stage);
    }
  }
  // A final MEAN's int32 sums come first, alive for the whole op (docs
  // "Scratch buffers", step 5): every other buffer moves up by their size.
  const uint32_t sums = MeanSumsBytes(*stage);
  if (sums > 0 && total != UINT64_MAX) {
    total = total + sums > static_cast<uint64_t>(INT32_MAX) ? UINT64_MAX : total + sums;
    if (total != UINT64_MAX) {
      for (int32_t t = 1; t < L; ++t) {
        if (tensors[t].arena_offset >= 0) tensors[t].arena_offset += static_cast<int32_t>(sums);
      }
      for (int32_t l = 0; l < L; ++l) {
        if (stage->layers[l].save_offset >= 0) {
          stage->layers[l].save_offset += static_cast<int32_t>(sums);
        }
      }
    }
  }
  if (total == UINT64_MAX) {
    reporter.report(reporter.context,
                    "KP_PATCH_STAGE options: key 'tensor_shape': the patch arena exceeds "
                    "2^31 - 1 bytes.");
    return kKpError;
  }
  for (int32_t l = 0; l < L; ++l) {
    if (stage->layers[l].save_offset < 0) stage->layers[l].save_bytes = 0;
  }
  stage->arena_bytes = static_cast<uint32_t>(total);
  return kKpOk;
}

int32_t KpStageBuffers(const KpStage& stage, bool cmsis_nn, KpStageBuffer* buffers) {
  int32_t n = 0;
  if (stage.arena_bytes > 0) {
    buffers[n].kind = kKpBufferPatchArena;
    buffers[n].bytes = stage.arena_bytes;
    ++n;
  }
  if (cmsis_nn && stage.context_bytes > 0) {
    buffers[n].kind = kKpBufferCmsisContext;
    buffers[n].bytes = stage.context_bytes;
    ++n;
  }
  return n;
}

}  // namespace keras_patch
