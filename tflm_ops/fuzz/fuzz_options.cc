/* Copyright 2026 The keras-patch Authors. Licensed under the Apache License 2.0.

libFuzzer target: hostile KP_PATCH_STAGE options bytes (and weight shapes).

Input: options bytes, then an 8-byte tail that picks the number of op
inputs, whether the weights match the options, the filter scales and the
data seed.  For every input the core must either report exactly one error
or prepare the stage; nothing may read or write out of bounds (ASan) or hit
undefined behaviour (UBSan).  Small prepared stages are also run: the
patch-by-patch output must equal the same stage run as one tile (grid 1x1,
i.e. layer by layer; for a stage ending with a MEAN, the MEAN of the whole
input tensor), and a second Eval must give the same bits.  A stage
with `in_place` set must give the bits of the same stage without it; a
one-layer in-place stage also runs with input and output at one address.

  make -C tflm_ops fuzz FUZZ_SECONDS=60
==============================================================================*/
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <vector>

#include "patch_stage_core.h"

using namespace keras_patch;  // NOLINT

namespace {

struct Count {
  int messages;
};
void Report(void* context, const char* format, ...) {
  char buf[512];
  va_list args;
  va_start(args, format);
  vsnprintf(buf, sizeof(buf), format, args);  // formats every argument
  va_end(args);
  static_cast<Count*>(context)->messages++;
  if (strncmp(buf, "KP_PATCH_STAGE", 14) != 0) abort();
}

struct Weights {
  int32_t num_inputs;
  std::vector<KpConstTensor> tensors;
  std::vector<std::vector<int8_t> > int8_data;
  std::vector<std::vector<int32_t> > int32_data;
  std::vector<std::vector<float> > scales;
  std::vector<const void*> data;
};

KpStatus GetConst(void* context, int32_t index, KpConstTensor* out) {
  Weights* w = static_cast<Weights*>(context);
  if (index < 1 || index >= w->num_inputs) abort();  // the core checks indices first
  *out = w->tensors[index];
  return kKpOk;
}

uint32_t Next(uint32_t* state) {
  *state = *state * 1664525u + 1013904223u;
  return *state >> 8;
}

// Builds weight tensors for a validated view: matching the options unless
// `corrupt` says otherwise.
void MakeWeights(const KpOptionsView& v, int32_t num_inputs, uint8_t corrupt, uint8_t scale_pick,
                 uint32_t seed, Weights* w) {
  w->num_inputs = num_inputs;
  w->tensors.assign(num_inputs, KpConstTensor());
  w->int8_data.assign(num_inputs, std::vector<int8_t>());
  w->int32_data.assign(num_inputs, std::vector<int32_t>());
  w->scales.assign(num_inputs, std::vector<float>());
  w->data.assign(num_inputs, static_cast<const void*>(NULL));
  for (int32_t i = 0; i < num_inputs; ++i) memset(&w->tensors[i], 0, sizeof(KpConstTensor));
  const flexbuffer::TypedVector& ops = v.vectors[kKeyLayerOp];
  for (int32_t l = 0; l < v.num_layers; ++l) {
    const int64_t op = flexbuffer::IntAt(ops, l);
    if (op != kKpOpConv2D && op != kKpOpDepthwiseConv2D) continue;
    const int64_t a = flexbuffer::IntAt(v.vectors[kKeyLayerInputs], 2 * l);
    const int32_t in_c = static_cast<int32_t>(flexbuffer::IntAt(v.vectors[kKeyTensorShape], 3 * a + 2));
    const int32_t out_c = static_cast<int32_t>(flexbuffer::IntAt(v.vectors[kKeyTensorShape], 3 * (l + 1) + 2));
    const int32_t kh = static_cast<int32_t>(flexbuffer::IntAt(v.vectors[kKeyLayerParams], 8 * l));
    const int32_t kw = static_cast<int32_t>(flexbuffer::IntAt(v.vectors[kKeyLayerParams], 8 * l + 1));
    const int64_t f = flexbuffer::IntAt(v.vectors[kKeyLayerWeights], 2 * l);
    const int64_t b = flexbuffer::IntAt(v.vectors[kKeyLayerWeights], 2 * l + 1);
    KpConstTensor& ft = w->tensors[f];
    ft.type = (corrupt & 1) ? kKpTypeInt32 : kKpTypeInt8;
    ft.num_dims = (corrupt & 2) ? 3 : 4;
    ft.dims[0] = op == kKpOpConv2D ? out_c : 1;
    ft.dims[1] = kh;
    ft.dims[2] = kw;
    ft.dims[3] = (op == kKpOpConv2D ? in_c : out_c) + ((corrupt & 4) ? 1 : 0);
    const int64_t n = static_cast<int64_t>(ft.dims[0]) * kh * kw * ft.dims[3];
    std::vector<int8_t>& fd = w->int8_data[f];
    fd.resize(n < (1 << 22) ? static_cast<size_t>(n) : 0);
    for (size_t i = 0; i < fd.size(); ++i) fd[i] = static_cast<int8_t>(Next(&seed));
    w->data[f] = fd.empty() ? NULL : &fd[0];
    std::vector<float>& sc = w->scales[f];
    sc.resize((scale_pick & 1) ? 1 : out_c + ((corrupt & 8) ? 1 : 0));
    static const float kScales[8] = {0.003f, 0.0f, 1e-7f, 0.02f, 1e30f, -1.0f, 0.5f, 1e-38f};
    for (size_t i = 0; i < sc.size(); ++i) {
      // Mostly sane scales; with (scale_pick & 6) == 0 any of kScales.
      const float base = (scale_pick & 6) == 0 ? kScales[Next(&seed) % 8] : kScales[0];
      sc[i] = base * (1.0f + static_cast<float>(Next(&seed) % 100) / 100.0f);
    }
    ft.num_scales = static_cast<int32_t>(sc.size());
    ft.scales = &sc[0];
    if (b >= 1 && b < num_inputs) {
      KpConstTensor& bt = w->tensors[b];
      bt.type = (corrupt & 16) ? kKpTypeInt8 : kKpTypeInt32;
      bt.num_dims = 1;
      bt.dims[0] = out_c + ((corrupt & 32) ? 1 : 0);
      std::vector<int32_t>& bd = w->int32_data[b];
      bd.resize(out_c);
      for (size_t i = 0; i < bd.size(); ++i) bd[i] = static_cast<int32_t>(Next(&seed) % 2001) - 1000;
      w->data[b] = &bd[0];
    }
  }
}

// Work and memory the stage needs, to keep fuzz iterations fast (and int32
// accumulators far from overflow).
bool SmallEnough(const KpStage& s) {
  int64_t work = 0;
  for (int32_t l = 0; l < s.num_layers; ++l) {
    const KpLayer& layer = s.layers[l];
    const KpTensor& out = s.tensors[l + 1];
    const KpTensor& in = s.tensors[layer.in_a];
    const int64_t taps = static_cast<int64_t>(layer.kernel_h) * layer.kernel_w *
                         (layer.op == kKpOpConv2D ? in.c : 1);
    if (taps > 20000) return false;
    work += static_cast<int64_t>(out.h) * out.w * out.c * taps;
  }
  const KpTensor& in = s.tensors[0];
  const KpTensor& out = s.tensors[s.num_layers];
  return work < 3000000 && s.arena_bytes < (1u << 20) &&
         static_cast<int64_t>(in.h) * in.w * in.c < (1 << 20) &&
         static_cast<int64_t>(out.h) * out.w * out.c < (1 << 20);
}

// Points the view's grid at a separate [1, 1] (the options bytes stay as
// they are: in hostile buffers vectors may share bytes).
void SetGridOne(KpOptionsView* v) {
  static const uint8_t kOneOne[8] = {1, 0, 0, 0, 1, 0, 0, 0};
  flexbuffer::TypedVector& g = v->vectors[kKeyGrid];
  g.data = kOneOne;
  g.length = 2;
  g.width = 4;
}

// Outcome counts, printed at exit (how deep the inputs get).
long g_parsed = 0, g_validated = 0, g_prepared = 0, g_evaluated = 0, g_in_place = 0, g_mean = 0;
void PrintStats() {
  fprintf(stderr,
          "kp_fuzz: parsed %ld, validated %ld, prepared %ld, evaluated %ld (in place %ld, ending "
          "with MEAN %ld)\n",
          g_parsed, g_validated, g_prepared, g_evaluated, g_in_place, g_mean);
}

}  // namespace

extern "C" int LLVMFuzzerInitialize(int*, char***) {
  atexit(PrintStats);
  return 0;
}

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  if (size < 8) return 0;
  const uint8_t* tail = data + size - 8;
  const size_t options_size = size - 8;
  // Own copy, exactly sized, so ASan sees any read past the end.
  std::vector<uint8_t> bytes(data, data + options_size);
  const uint8_t* options = bytes.empty() ? NULL : &bytes[0];
  Count count = {0};
  const KpReporter reporter = {Report, &count};
  KpOptionsView view;
  if (KpParseOptions(options, options_size, reporter, &view) != kKpOk) {
    if (count.messages != 1) abort();
    return 0;
  }
  ++g_parsed;
  // Number of op inputs: the largest weight index + 1, or from the tail.
  int64_t max_index = 0;
  for (uint32_t i = 0; i < view.vectors[kKeyLayerWeights].length; ++i) {
    const int64_t w = flexbuffer::IntAt(view.vectors[kKeyLayerWeights], i);
    if (w > max_index && w < 4096) max_index = w;
  }
  const int32_t num_inputs = (tail[0] & 0x80) ? (tail[0] & 0x7f) : static_cast<int32_t>(max_index + 1);
  if (KpValidateOptions(view, num_inputs, reporter) != kKpOk) {
    if (count.messages != 1) abort();
    return 0;
  }
  ++g_validated;
  const size_t persistent = KpPersistentBytes(view);
  std::vector<uint64_t> buffer(persistent / 8 + 1);
  Weights weights;
  uint32_t seed = static_cast<uint32_t>(tail[3]) | (static_cast<uint32_t>(tail[4]) << 8);
  MakeWeights(view, num_inputs, (tail[1] & 0x40) ? tail[1] : 0, tail[2], seed, &weights);
  KpStage* stage = NULL;
  if (KpPrepareStage(view, num_inputs, GetConst, &weights, &buffer[0], persistent, reporter,
                     &stage) != kKpOk) {
    if (count.messages != 1) abort();
    return 0;
  }
  ++g_prepared;
  if (count.messages != 0 || !SmallEnough(*stage)) return 0;
  ++g_evaluated;
  if (stage->layers[stage->num_layers - 1].op == kKpOpMean) ++g_mean;
  const void* const* data_ptr = weights.data.empty() ? NULL : &weights.data[0];
  const KpTensor& in = stage->tensors[0];
  const KpTensor& out = stage->tensors[stage->num_layers];
  std::vector<int8_t> input(static_cast<size_t>(in.h) * in.w * in.c);
  for (size_t i = 0; i < input.size(); ++i) input[i] = static_cast<int8_t>(Next(&seed));
  const size_t out_size = static_cast<size_t>(out.h) * out.w * out.c;
  std::vector<int8_t> patched(out_size), again(out_size), whole(out_size);
  std::vector<uint8_t> arena(stage->arena_bytes + 1, 0xA5);
  if (KpEvalStage(stage, &input[0], &patched[0], data_ptr, &arena[0], reporter) != kKpOk) abort();
  if (KpEvalStage(stage, &input[0], &again[0], data_ptr, &arena[0], reporter) != kKpOk) abort();
  if (memcmp(&patched[0], &again[0], out_size) != 0) abort();
  if (view.in_place != 0) {
    ++g_in_place;
    // In place (docs "In place") computes what the stage without it computes.
    KpOptionsView plain = view;
    plain.in_place = 0;
    std::vector<uint64_t> buffer0(persistent / 8 + 1);
    KpStage* not_in_place = NULL;
    if (KpPrepareStage(plain, num_inputs, GetConst, &weights, &buffer0[0], persistent, reporter,
                       &not_in_place) != kKpOk) {
      abort();
    }
    if (not_in_place->arena_bytes < stage->arena_bytes && stage->num_layers > 1) abort();
    std::vector<uint8_t> arena0(not_in_place->arena_bytes + 1, 0x3C);
    std::vector<int8_t> want(out_size);
    if (KpEvalStage(not_in_place, &input[0], &want[0], data_ptr, &arena0[0], reporter) != kKpOk) {
      abort();
    }
    if (memcmp(&patched[0], &want[0], out_size) != 0) {
      fprintf(stderr, "in-place output differs from the stage without in_place\n");
      abort();
    }
    if (stage->num_layers == 1) {  // output written over the input
      std::vector<int8_t> shared(input.size() > out_size ? input.size() : out_size);
      memcpy(&shared[0], &input[0], input.size());
      if (KpEvalStage(stage, &shared[0], &shared[0], data_ptr, &arena[0], reporter) != kKpOk) {
        abort();
      }
      if (memcmp(&shared[0], &want[0], out_size) != 0) {
        fprintf(stderr, "aliased in-place output differs\n");
        abort();
      }
    }
  }
  // The same stage as one tile.
  SetGridOne(&view);
  std::vector<uint64_t> buffer1(persistent / 8 + 1);
  KpStage* one = NULL;
  if (KpPrepareStage(view, num_inputs, GetConst, &weights, &buffer1[0], persistent, reporter,
                     &one) != kKpOk) {
    abort();
  }
  std::vector<uint8_t> arena1(one->arena_bytes + 1, 0x5A);
  if (KpEvalStage(one, &input[0], &whole[0], data_ptr, &arena1[0], reporter) != kKpOk) abort();
  if (memcmp(&patched[0], &whole[0], out_size) != 0) {
    fprintf(stderr, "patch-by-patch output differs from layer-by-layer\n");
    abort();
  }
  return 0;
}
