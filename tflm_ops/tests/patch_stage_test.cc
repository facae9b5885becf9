/* Copyright 2026 The keras-patch Authors. Licensed under the Apache License 2.0.

Unit tests of the portable KP_PATCH_STAGE core.  Plain C++ runner; the last
line is "N passed, M failed" and the exit status is nonzero on failure.
  make -C tflm_ops test        make -C tflm_ops sanitize
==============================================================================*/
#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <string.h>

#include <string>
#include <vector>

#include "../int8_arith.h"
#include "../patch_geometry.h"
#include "../patch_stage_core.h"
#include "flexbuffer_builder.h"
#include "golden_stage.h"

using namespace keras_patch;  // NOLINT
using kp_test::MapBuilder;

namespace {

int g_passed = 0, g_failed = 0, g_checks_failed = 0;

#define CHECK(cond)                                                        \
  do {                                                                     \
    if (!(cond)) {                                                         \
      printf("  %s:%d: CHECK failed: %s\n", __FILE__, __LINE__, #cond);    \
      ++g_checks_failed;                                                   \
    }                                                                      \
  } while (0)
#define CHECK_EQ(a, b)                                                                   \
  do {                                                                                   \
    const long long va = static_cast<long long>(a), vb = static_cast<long long>(b);     \
    if (va != vb) {                                                                      \
      printf("  %s:%d: CHECK_EQ failed: %s = %lld, %s = %lld\n", __FILE__, __LINE__, #a, \
             va, #b, vb);                                                                \
      ++g_checks_failed;                                                                 \
    }                                                                                    \
  } while (0)

typedef void (*TestFn)();
void Run(const char* name, TestFn fn) {
  const int before = g_checks_failed;
  fn();
  if (g_checks_failed == before) {
    ++g_passed;
  } else {
    ++g_failed;
    printf("FAILED %s\n", name);
  }
}

// ------------------------------------------------------------ error capture

struct Messages {
  std::string all;
  int count;
};
void Capture(void* context, const char* format, ...) {
  Messages* m = static_cast<Messages*>(context);
  char buf[512];
  va_list args;
  va_start(args, format);
  vsnprintf(buf, sizeof(buf), format, args);
  va_end(args);
  m->all += buf;
  m->all += "\n";
  ++m->count;
}

// ------------------------------------------------------------ test options

// The stage of tests/test_op_spec.py _good_options().
struct Options {
  std::vector<int64_t> grid, shape, zp, op, inputs, params, act, weights;
  std::vector<float> scale;
  int64_t version, num_layers, in_place;
  Options() {
    version = 2;
    in_place = 0;
    num_layers = 5;
    grid = {2, 2};
    shape = {9, 9, 3, 4, 4, 8, 4, 4, 8, 4, 4, 8, 5, 5, 8, 2, 2, 8};
    scale = {0.02f, 0.05f, 0.04f, 0.06f, 0.06f, 0.06f};
    zp = {-1, -128, -5, 3, 3, 3};
    op = {3, 4, 0, 34, 17};
    inputs = {0, -1, 1, -1, 1, 2, 3, -1, 4, -1};
    params = {3, 3, 2, 2, 1, 1, 0, 0,  // conv
              3, 3, 1, 1, 1, 1, 1, 1,  // depthwise
              1, 1, 1, 1, 1, 1, 0, 0,  // add
              1, 1, 1, 1, 1, 1, 1, 0,  // pad top 1
              2, 2, 2, 2, 1, 1, 0, 0};  // max pool
    act = {3, 1, 0, 0, 0};
    weights = {1, 2, 3, 4, -1, -1, -1, -1, -1, -1};
  }
  MapBuilder Builder() const {
    MapBuilder b;
    b.Int("version", version);
    if (version >= 2) b.Int("in_place", in_place);
    b.Ints("grid", grid);
    b.Int("num_layers", num_layers);
    b.Ints("tensor_shape", shape);
    b.Floats("tensor_scale", scale);
    b.Ints("tensor_zero_point", zp);
    b.Ints("layer_op", op);
    b.Ints("layer_inputs", inputs);
    b.Ints("layer_params", params);
    b.Ints("layer_activation", act);
    b.Ints("layer_weights", weights);
    return b;
  }
};

// Parse + validate; returns the messages ("" when accepted).
std::string Validate(const std::vector<uint8_t>& bytes, int32_t num_op_inputs = 5) {
  Messages m = {"", 0};
  const KpReporter r = {Capture, &m};
  KpOptionsView view;
  const uint8_t* data = bytes.empty() ? NULL : &bytes[0];
  if (KpParseOptions(data, bytes.size(), r, &view) == kKpOk &&
      KpValidateOptions(view, num_op_inputs, r) == kKpOk) {
    CHECK_EQ(m.count, 0);
    return "";
  }
  CHECK_EQ(m.count, 1);  // exactly one message per failure
  return m.all;
}

bool Names(const std::string& message, const char* key) {
  const std::string quoted = std::string("'") + key + "'";
  const bool ok = message.find(quoted) != std::string::npos;
  if (!ok) printf("  message does not name %s: %s\n", quoted.c_str(), message.c_str());
  return ok;
}

// ------------------------------------------------------------ flexbuffers

void TestFlexbufferReadsBuilderOutput() {
  MapBuilder b;
  b.Int("a", -5);
  b.IndirectInt("b", 123456);
  b.Ints("c", {1, -2, 3});
  b.Floats("d", {0.5f, -1.25f});
  b.Int8s("e", {-1, 7});
  b.String("s");
  const std::vector<uint8_t> buf = b.Finish();
  flexbuffer::Map map;
  CHECK(flexbuffer::GetRootMap(&buf[0], buf.size(), &map));
  CHECK_EQ(map.length, 6);
  flexbuffer::Ref ref;
  int64_t v = 0;
  CHECK(flexbuffer::Find(map, "a", &ref) == flexbuffer::kOk);
  CHECK(flexbuffer::ReadInt(ref, &v) == flexbuffer::kOk);
  CHECK_EQ(v, -5);
  CHECK(flexbuffer::Find(map, "b", &ref) == flexbuffer::kOk);
  CHECK(flexbuffer::ReadInt(ref, &v) == flexbuffer::kOk);
  CHECK_EQ(v, 123456);
  flexbuffer::TypedVector vec;
  CHECK(flexbuffer::Find(map, "c", &ref) == flexbuffer::kOk);
  CHECK(flexbuffer::ReadTypedVector(ref, false, &vec) == flexbuffer::kOk);
  CHECK_EQ(vec.length, 3);
  CHECK_EQ(flexbuffer::IntAt(vec, 1), -2);
  CHECK(flexbuffer::ReadTypedVector(ref, true, &vec) == flexbuffer::kWrongType);
  CHECK(flexbuffer::ReadInt(ref, &v) == flexbuffer::kWrongType);
  CHECK(flexbuffer::Find(map, "d", &ref) == flexbuffer::kOk);
  CHECK(flexbuffer::ReadTypedVector(ref, true, &vec) == flexbuffer::kOk);
  CHECK(flexbuffer::FloatAt(vec, 1) == -1.25);
  CHECK(flexbuffer::Find(map, "e", &ref) == flexbuffer::kOk);
  CHECK(flexbuffer::ReadTypedVector(ref, false, &vec) == flexbuffer::kOk);
  CHECK_EQ(vec.width, 1);
  CHECK_EQ(flexbuffer::IntAt(vec, 0), -1);
  CHECK_EQ(flexbuffer::IntAt(vec, 1), 7);
  CHECK(flexbuffer::Find(map, "s", &ref) == flexbuffer::kOk);
  CHECK(flexbuffer::ReadInt(ref, &v) == flexbuffer::kWrongType);
  CHECK(flexbuffer::Find(map, "zz", &ref) == flexbuffer::kNotFound);
  CHECK(flexbuffer::Find(map, "", &ref) == flexbuffer::kNotFound);
  CHECK(flexbuffer::Find(map, "ab", &ref) == flexbuffer::kNotFound);  // prefix of nothing
}

void TestFlexbufferReadsPythonEncoderOutput() {
  flexbuffer::Map map;
  CHECK(flexbuffer::GetRootMap(kGoldenOptions, sizeof(kGoldenOptions), &map));
  CHECK_EQ(map.length, kKpNumOptionKeys - 1);  // version 1: every key but 'in_place'
  flexbuffer::Ref ref;
  int64_t v = 0;
  CHECK(flexbuffer::Find(map, "num_layers", &ref) == flexbuffer::kOk);
  CHECK(flexbuffer::ReadInt(ref, &v) == flexbuffer::kOk);
  CHECK_EQ(v, 8);
  flexbuffer::TypedVector vec;
  CHECK(flexbuffer::Find(map, "tensor_scale", &ref) == flexbuffer::kOk);
  CHECK(flexbuffer::ReadTypedVector(ref, true, &vec) == flexbuffer::kOk);
  CHECK_EQ(vec.length, 9);
  CHECK(static_cast<float>(flexbuffer::FloatAt(vec, 0)) == 0.05f);
}

void TestFlexbufferRejectsEveryTruncationAndGarbage() {
  // No prefix of a valid buffer is a readable options map (ASan/UBSan builds
  // check that nothing is read out of bounds on the way).
  for (size_t n = 0; n < sizeof(kGoldenOptions); ++n) {
    std::vector<uint8_t> cut(kGoldenOptions, kGoldenOptions + n);
    CHECK(!Validate(cut).empty());
  }
  const uint8_t garbage[][6] = {{0, 0, 0, 0, 0, 0},
                                {0xff, 0xff, 0xff, 0xff, 0x24, 0x01},
                                {0x7f, 0, 0, 0, 0x24, 0x04},
                                {1, 2, 3, 4, 0x24, 0x08}};
  for (size_t i = 0; i < 4; ++i) {
    std::vector<uint8_t> g(garbage[i], garbage[i] + 6);
    CHECK(!Validate(g).empty());
  }
  CHECK(!Validate(std::vector<uint8_t>()).empty());
}

// ------------------------------------------------------------ options errors

void TestGoodOptionsValidate() {
  CHECK(Validate(Options().Builder().Finish()).empty());
  // Unknown keys are ignored; scalars may be indirect; int vectors any width.
  MapBuilder b = Options().Builder();
  b.Int("zz_future", 1);
  b.String("aa_future");
  b.IndirectInt("version", 1);
  b.Int8s("grid", {2, 2});
  CHECK(Validate(b.Finish()).empty());
}

void TestMissingWrongTypeAndLengthNameTheKey() {
  for (int k = 0; k < kKpNumOptionKeys; ++k) {
    const char* key = kKpOptionKeys[k].name;
    MapBuilder missing = Options().Builder();
    missing.Remove(key);
    CHECK(Names(Validate(missing.Finish()), key));
    MapBuilder wrong = Options().Builder();
    wrong.String(key);
    CHECK(Names(Validate(wrong.Finish()), key));
    if (strcmp(kKpOptionKeys[k].length, "scalar") != 0) {
      MapBuilder longer = Options().Builder();
      if (strcmp(key, "tensor_scale") == 0) {
        longer.Floats(key, std::vector<float>(7, 0.1f));
      } else {
        longer.Ints(key, std::vector<int64_t>(99, 1));
      }
      CHECK(Names(Validate(longer.Finish()), key));
      MapBuilder other_type = Options().Builder();
      if (strcmp(key, "tensor_scale") == 0) {
        other_type.Ints(key, std::vector<int64_t>(6, 1));
      } else {
        other_type.Floats(key, std::vector<float>(2, 1.0f));
      }
      CHECK(Names(Validate(other_type.Finish()), key));
    } else {
      MapBuilder vec = Options().Builder();
      vec.Ints(key, std::vector<int64_t>(1, 1));
      CHECK(Names(Validate(vec.Finish()), key));
    }
  }
}

struct Case {
  const char* key;
  Options options;
};

void TestInconsistentOptionsNameTheKey() {
  std::vector<Case> cases;
  Options o;
  o = Options(); o.version = 4; cases.push_back({"version", o});
  o = Options(); o.version = 0; cases.push_back({"version", o});
  o = Options(); o.num_layers = 0; cases.push_back({"num_layers", o});
  o = Options(); o.num_layers = 257; cases.push_back({"num_layers", o});
  o = Options(); o.grid = {3, 2}; cases.push_back({"grid", o});
  o = Options(); o.grid = {0, 1}; cases.push_back({"grid", o});
  o = Options(); o.grid = {65, 1}; cases.push_back({"grid", o});
  o = Options(); o.zp[5] = 300; cases.push_back({"tensor_zero_point", o});
  o = Options(); o.scale[2] = 0.0f; cases.push_back({"tensor_scale", o});
  o = Options(); o.scale[2] = -1.0f; cases.push_back({"tensor_scale", o});
  o = Options(); o.scale[2] = 1.0f / 0.0f; cases.push_back({"tensor_scale", o});
  o = Options(); o.scale[2] = 0.0f / 0.0f; cases.push_back({"tensor_scale", o});
  o = Options(); o.shape[17] = 0; cases.push_back({"tensor_shape", o});
  o = Options(); o.shape[0] = 65537; cases.push_back({"tensor_shape", o});
  o = Options(); o.shape[0] = 65536; o.shape[1] = 65536; cases.push_back({"tensor_shape", o});
  o = Options(); o.shape[3] = 9; cases.push_back({"layer_params", o});     // conv out 9 rows
  o = Options(); o.shape[14] = 7; o.shape[17] = 7; cases.push_back({"tensor_shape", o});  // pad
  o = Options(); o.op[0] = 99; cases.push_back({"layer_op", o});
  o = Options(); o.op[0] = 2; cases.push_back({"layer_op", o});
  o = Options(); o.inputs[0] = 1; cases.push_back({"layer_inputs", o});  // reads own output
  o = Options(); o.inputs[5] = 7; cases.push_back({"layer_inputs", o});
  o = Options(); o.inputs[1] = 0; cases.push_back({"layer_inputs", o});  // 2nd input, 1-input op
  o = Options(); o.act[0] = 7; cases.push_back({"layer_activation", o});
  o = Options(); o.act[0] = -1; cases.push_back({"layer_activation", o});
  o = Options(); o.params[0] = 0; cases.push_back({"layer_params", o});
  o = Options(); o.params[2] = 65; cases.push_back({"layer_params", o});
  o = Options(); o.params[6] = -1; cases.push_back({"layer_params", o});
  o = Options(); o.params[6] = 3; cases.push_back({"layer_params", o});  // pad >= kernel
  o = Options(); o.params[32 + 4] = 2; o.params[32 + 5] = 2; cases.push_back({"layer_params", o});
  o = Options(); o.params[24] = 3; o.params[25] = 3; cases.push_back({"layer_params", o});  // PAD kernel
  o = Options(); o.params[16 + 6] = 1; cases.push_back({"layer_params", o});  // ADD pad
  o = Options(); o.weights[0] = -1; cases.push_back({"layer_weights", o});
  o = Options(); o.weights[0] = 5; cases.push_back({"layer_weights", o});    // >= num inputs
  o = Options(); o.weights[1] = 0; cases.push_back({"layer_weights", o});
  o = Options(); o.weights[2] = 1; cases.push_back({"layer_weights", o});    // shared filter
  o = Options(); o.weights[3] = 3; cases.push_back({"layer_weights", o});    // bias == filter
  o = Options(); o.weights[4] = 5; cases.push_back({"layer_weights", o});    // ADD weights
  o = Options(); o.shape[8] = 12; cases.push_back({"tensor_shape", o});      // dw 12 % 8
  o = Options(); o.shape[17] = 4; cases.push_back({"tensor_shape", o});       // pool channels
  o = Options(); o.shape[6] = 9; cases.push_back({"layer_params", o});        // dw rows
  o = Options(); o.op[2] = 19; o.inputs[5] = -1; o.act[2] = 1;
  cases.push_back({"layer_activation", o});                                   // RELU + act
  // Tensor 1 never read: two RELUs both reading tensor 0.
  o = Options(); o.num_layers = 2; o.grid = {1, 1}; o.shape = {4, 4, 1, 4, 4, 1, 4, 4, 1};
  o.scale = {0.1f, 0.1f, 0.1f}; o.zp = {0, 0, 0}; o.op = {19, 19}; o.inputs = {0, -1, 0, -1};
  o.params = {1, 1, 1, 1, 1, 1, 0, 0, 1, 1, 1, 1, 1, 1, 0, 0}; o.act = {0, 0};
  o.weights = {-1, -1, -1, -1};
  cases.push_back({"layer_inputs", o});
  o.inputs = {0, -1, 1, -1};
  CHECK(Validate(o.Builder().Finish()).empty());  // the same stage, chained, is fine
  for (size_t i = 0; i < cases.size(); ++i) {
    const std::string message = Validate(cases[i].options.Builder().Finish());
    CHECK(Names(message, cases[i].key));
    if (message.find(cases[i].key) == std::string::npos) printf("  (case %d)\n", static_cast<int>(i));
  }
}

// ------------------------------------------------------------ arithmetic

void TestArithmeticKnownValues() {
  using namespace arith;  // NOLINT
  CHECK_EQ(SaturatingRoundingDoublingHighMul(INT32_MIN, INT32_MIN), INT32_MAX);
  CHECK_EQ(SaturatingRoundingDoublingHighMul(1 << 30, 1 << 30), 1 << 29);
  CHECK_EQ(SaturatingRoundingDoublingHighMul(-3, 1 << 30), -1);  // nudge, then truncation
  CHECK_EQ(SaturatingRoundingDoublingHighMul(3, 1 << 30), 2);    // 1.5 -> 2
  CHECK_EQ(RoundingDivideByPOT(3, 1), 2);
  CHECK_EQ(RoundingDivideByPOT(-3, 1), -2);
  CHECK_EQ(RoundingDivideByPOT(5, 2), 1);
  CHECK_EQ(RoundingDivideByPOT(-5, 2), -1);
  CHECK_EQ(RoundingDivideByPOT(-6, 2), -2);
  CHECK_EQ(RoundingDivideByPOT(INT32_MIN, 31), -1);
  CHECK_EQ(RoundingDivideByPOT(7, 0), 7);
  int32_t m = 0;
  int s = 0;
  QuantizeMultiplier(0.5, &m, &s);
  CHECK_EQ(m, 1 << 30);
  CHECK_EQ(s, 0);
  QuantizeMultiplier(1.0, &m, &s);
  CHECK_EQ(m, 1 << 30);
  CHECK_EQ(s, 1);
  QuantizeMultiplier(0.0, &m, &s);
  CHECK_EQ(m, 0);
  CHECK_EQ(s, 0);
  QuantizeMultiplier(0.0123, &m, &s);  // keras_patch.stage.quantization doctest
  CHECK_EQ(m, 1690499128);
  CHECK_EQ(s, -6);
  CHECK_EQ(MultiplyByQuantizedMultiplier(1000, m, s), 12);
  QuantizeMultiplier(0.99999999999, &m, &s);  // rounds up to 2^31: halved, shift + 1
  CHECK_EQ(m, 1 << 30);
  CHECK_EQ(s, 1);
  QuantizeMultiplier(1e-12, &m, &s);  // shift < -31: zero
  CHECK_EQ(m, 0);
  CHECK_EQ(s, 0);
  QuantizeMultiplier(3.0, &m, &s);
  CHECK_EQ(MultiplyByQuantizedMultiplier(-7, m, s), -21);
  CHECK_EQ(MultiplyByQuantizedMultiplier(INT32_MAX, 1 << 30, 1), -1);  // wraps
  // x * 2^shift wraps like int32 arithmetic before the high multiply.
  CHECK_EQ(MultiplyByQuantizedMultiplier(1 << 30, 1 << 30, 2), 0);
  CHECK_EQ(MultiplyByQuantizedMultiplierSmallerThanOneExp(1 << 20, 1 << 30, -2), 1 << 17);
  CHECK_EQ(WrapToInt32(static_cast<int64_t>(1) << 31), INT32_MIN);
  CHECK_EQ(WrapToInt32(-1), -1);
  int32_t lo = 0, hi = 0;
  KpActivationRange(kKpActRelu6, 0.05f, -10, &lo, &hi);
  CHECK_EQ(lo, -10);
  CHECK_EQ(hi, 110);
  KpActivationRange(kKpActReluN1To1, 0.5f, 0, &lo, &hi);
  CHECK_EQ(lo, -2);
  CHECK_EQ(hi, 2);
  KpActivationRange(kKpActRelu6, 1e-45f, 0, &lo, &hi);  // 6 / scale = inf
  CHECK_EQ(lo, 0);
  CHECK_EQ(hi, 127);
  KpActivationRange(kKpActNone, 0.1f, 5, &lo, &hi);
  CHECK_EQ(lo, -128);
  CHECK_EQ(hi, 127);
}

// ------------------------------------------------------------ golden stage

struct Consts {
  KpConstTensor t[4];
  bool break_filter_type, break_bias_shape, bad_scale;
};
KpStatus GetConst(void* context, int32_t index, KpConstTensor* out) {
  Consts* c = static_cast<Consts*>(context);
  if (index < 1 || index > 3) return kKpError;
  *out = c->t[index];
  return kKpOk;
}
Consts GoldenConsts() {
  Consts c;
  memset(&c, 0, sizeof(c));
  c.t[1].type = kKpTypeInt8;
  c.t[1].num_dims = 4;
  c.t[1].dims[0] = 4, c.t[1].dims[1] = 3, c.t[1].dims[2] = 3, c.t[1].dims[3] = 3;
  c.t[1].num_scales = 4;
  c.t[1].scales = kGoldenFilter0Scales;
  c.t[2].type = kKpTypeInt32;
  c.t[2].num_dims = 1;
  c.t[2].dims[0] = 4;
  c.t[3].type = kKpTypeInt8;
  c.t[3].num_dims = 4;
  c.t[3].dims[0] = 1, c.t[3].dims[1] = 3, c.t[3].dims[2] = 2, c.t[3].dims[3] = 8;
  c.t[3].num_scales = 1;
  c.t[3].scales = kGoldenFilter1Scales;
  return c;
}

// Prepares the golden stage into `buffer`; returns messages ("" on success).
std::string PrepareGolden(Consts* consts, std::vector<uint64_t>* buffer, KpStage** stage) {
  Messages m = {"", 0};
  const KpReporter r = {Capture, &m};
  KpOptionsView view;
  if (KpParseOptions(kGoldenOptions, sizeof(kGoldenOptions), r, &view) != kKpOk) return m.all;
  buffer->assign(KpPersistentBytes(view) / 8 + 1, 0);
  if (KpPrepareStage(view, 4, GetConst, consts, &(*buffer)[0], buffer->size() * 8, r, stage) !=
      kKpOk) {
    CHECK_EQ(m.count, 1);
    return m.all;
  }
  CHECK_EQ(m.count, 0);
  return "";
}

void TestGoldenStageMatchesReferenceExecutor() {
  Consts consts = GoldenConsts();
  std::vector<uint64_t> buffer;
  KpStage* stage = NULL;
  CHECK(PrepareGolden(&consts, &buffer, &stage).empty());
  if (stage == NULL) return;
  CHECK_EQ(stage->arena_bytes, kGoldenArenaBytes);
#if !defined(CMSIS_NN)
  CHECK_EQ(stage->context_bytes, 0u);  // the portable build requests no CMSIS-NN context
#endif
  for (int32_t t = 0; t <= stage->num_layers; ++t) {
    CHECK_EQ(stage->tensors[t].arena_offset, kGoldenArenaOffsets[t]);
    CHECK_EQ(stage->tensors[t].arena_size, kGoldenArenaSizes[t]);
  }
  const void* inputs[4] = {NULL, kGoldenFilter0, kGoldenBias0, kGoldenFilter1};
  std::vector<uint8_t> arena(stage->arena_bytes, 0xAA);  // garbage: Eval must not rely on zeros
  int8_t output[sizeof(kGoldenOutput)];
  memset(output, 0x55, sizeof(output));
  Messages m = {"", 0};
  const KpReporter r = {Capture, &m};
  CHECK(KpEvalStage(stage, kGoldenInput, output, inputs, &arena[0], r) == kKpOk);
  CHECK(memcmp(output, kGoldenOutput, sizeof(output)) == 0);
  // A second Eval (state carried over in the arena) gives the same bits.
  CHECK(KpEvalStage(stage, kGoldenInput, output, inputs, &arena[0], r) == kKpOk);
  CHECK(memcmp(output, kGoldenOutput, sizeof(output)) == 0);
  // Missing arena / weights are errors, not crashes.
  CHECK(KpEvalStage(stage, kGoldenInput, output, inputs, NULL, r) == kKpError);
  const void* no_weights[4] = {NULL, NULL, kGoldenBias0, kGoldenFilter1};
  CHECK(KpEvalStage(stage, kGoldenInput, output, no_weights, &arena[0], r) == kKpError);
  CHECK_EQ(m.count, 2);
}

void TestPrepareChecksWeightsAndScales() {
  std::vector<uint64_t> buffer;
  KpStage* stage = NULL;
  Consts c = GoldenConsts();
  c.t[1].type = kKpTypeInt32;
  CHECK(Names(PrepareGolden(&c, &buffer, &stage), "layer_weights"));
  c = GoldenConsts();
  c.t[1].dims[3] = 4;
  CHECK(Names(PrepareGolden(&c, &buffer, &stage), "layer_weights"));
  c = GoldenConsts();
  c.t[1].num_scales = 2;
  CHECK(Names(PrepareGolden(&c, &buffer, &stage), "layer_weights"));
  c = GoldenConsts();
  c.t[2].dims[0] = 5;
  CHECK(Names(PrepareGolden(&c, &buffer, &stage), "layer_weights"));
  c = GoldenConsts();
  c.t[2].type = kKpTypeInt8;
  CHECK(Names(PrepareGolden(&c, &buffer, &stage), "layer_weights"));
  static const float kNegative[1] = {-0.5f};
  c = GoldenConsts();
  c.t[3].scales = kNegative;
  CHECK(Names(PrepareGolden(&c, &buffer, &stage), "layer_weights"));
  static const float kHuge[1] = {1e30f};  // multiplier >= 2^31: shift > 30
  c = GoldenConsts();
  c.t[3].scales = kHuge;
  CHECK(Names(PrepareGolden(&c, &buffer, &stage), "tensor_scale"));
  // A too-small persistent buffer is an error.
  Messages m = {"", 0};
  const KpReporter r = {Capture, &m};
  KpOptionsView view;
  CHECK(KpParseOptions(kGoldenOptions, sizeof(kGoldenOptions), r, &view) == kKpOk);
  c = GoldenConsts();
  std::vector<uint64_t> small(4, 0);
  CHECK(KpPrepareStage(view, 4, GetConst, &c, &small[0], 32, r, &stage) == kKpError);
  CHECK_EQ(m.count, 1);
}

void TestPoolMustKeepScale() {
  Options o;
  o.scale[4] = 0.07f;  // PAD output scale differs from its input's
  std::vector<uint8_t> bytes = o.Builder().Finish();
  Messages m = {"", 0};
  const KpReporter r = {Capture, &m};
  KpOptionsView view;
  CHECK(KpParseOptions(&bytes[0], bytes.size(), r, &view) == kKpOk);
  std::vector<uint64_t> buffer(KpPersistentBytes(view) / 8 + 1);
  KpStage* stage = NULL;
  static const float kScales[8] = {0.01f, 0.01f, 0.01f, 0.01f, 0.01f, 0.01f, 0.01f, 0.01f};
  struct Weights {
    static KpStatus Get(void* ctx, int32_t index, KpConstTensor* out) {
      memset(out, 0, sizeof(*out));
      const float* scales = static_cast<const float*>(ctx);
      if (index == 1 || index == 3) {
        out->type = kKpTypeInt8;
        out->num_dims = 4;
        out->dims[0] = index == 1 ? 8 : 1, out->dims[1] = 3, out->dims[2] = 3;
        out->dims[3] = index == 1 ? 3 : 8;
      } else {
        out->type = kKpTypeInt32;
        out->num_dims = 1;
        out->dims[0] = 8;
      }
      out->num_scales = 8;
      out->scales = scales;
      return kKpOk;
    }
  };
  CHECK(KpPrepareStage(view, 5, Weights::Get, const_cast<float*>(kScales), &buffer[0],
                       buffer.size() * 8, r, &stage) == kKpError);
  CHECK(Names(m.all, "tensor_scale"));
  // With the scale restored the same stage prepares.
  o.scale[4] = 0.06f;
  bytes = o.Builder().Finish();
  m.all.clear();
  m.count = 0;
  CHECK(KpParseOptions(&bytes[0], bytes.size(), r, &view) == kKpOk);
  CHECK(KpPrepareStage(view, 5, Weights::Get, const_cast<float*>(kScales), &buffer[0],
                       buffer.size() * 8, r, &stage) == kKpOk);
  CHECK_EQ(m.count, 0);
}

void TestCheckIo() {
  Consts consts = GoldenConsts();
  std::vector<uint64_t> buffer;
  KpStage* stage = NULL;
  CHECK(PrepareGolden(&consts, &buffer, &stage).empty());
  if (stage == NULL) return;
  Messages m = {"", 0};
  const KpReporter r = {Capture, &m};
  const int32_t in_dims[4] = {1, 7, 6, 3}, out_dims[4] = {1, 5, 5, 8}, bad[4] = {1, 7, 6, 4};
  CHECK(KpCheckStageIo(*stage, false, kKpTypeInt8, 4, in_dims, 0.05f, -3, r) == kKpOk);
  CHECK(KpCheckStageIo(*stage, true, kKpTypeInt8, 4, out_dims, 0.03f, 10, r) == kKpOk);
  CHECK_EQ(m.count, 0);
  CHECK(KpCheckStageIo(*stage, false, kKpTypeInt8, 4, bad, 0.05f, -3, r) == kKpError);
  CHECK(Names(m.all, "tensor_shape"));
  CHECK(KpCheckStageIo(*stage, false, kKpTypeInt32, 4, in_dims, 0.05f, -3, r) == kKpError);
  CHECK(KpCheckStageIo(*stage, false, kKpTypeInt8, 3, in_dims, 0.05f, -3, r) == kKpError);
  CHECK(KpCheckStageIo(*stage, false, kKpTypeInt8, 4, in_dims, 0.06f, -3, r) == kKpError);
  CHECK(Names(m.all, "tensor_scale"));
  CHECK(KpCheckStageIo(*stage, true, kKpTypeInt8, 4, out_dims, 0.03f, 11, r) == kKpError);
  CHECK(Names(m.all, "tensor_zero_point"));
}

void TestTileBounds() {
  int32_t lo = 0, hi = 0;
  TileBounds(10, 3, 0, &lo, &hi);
  CHECK_EQ(lo, 0);
  CHECK_EQ(hi, 3);
  TileBounds(10, 3, 2, &lo, &hi);
  CHECK_EQ(lo, 6);
  CHECK_EQ(hi, 10);
  TileBounds(65536, 64, 63, &lo, &hi);
  CHECK_EQ(lo, 64512);
  CHECK_EQ(hi, 65536);
}

}  // namespace

// Writes fuzz seeds: options bytes followed by the 8-byte tail the fuzz
// target reads (see fuzz/fuzz_options.cc).
// ------------------------------------------------------------ in place

// A stage of DEPTHWISE_CONV_2D / 1x1 CONV_2D layers with deterministic
// pseudo-random weights, prepared with in_place 0 or 1.
struct InPlaceStage {
  std::vector<int8_t> filters[4];
  std::vector<int32_t> biases[4];
  std::vector<float> scales[4];
  KpConstTensor t[9];
  std::vector<uint64_t> buffer;
  KpStage* stage;
};
uint32_t g_lcg = 12345u;
int32_t Rand(int32_t lo, int32_t hi) {
  g_lcg = g_lcg * 1664525u + 1013904223u;
  return lo + static_cast<int32_t>((g_lcg >> 8) % static_cast<uint32_t>(hi - lo + 1));
}
KpStatus InPlaceGetConst(void* context, int32_t index, KpConstTensor* out) {
  InPlaceStage* s = static_cast<InPlaceStage*>(context);
  if (index < 1 || index > 8) return kKpError;
  *out = s->t[index];
  return kKpOk;
}
// layers: op codes (3 = 1x1 conv c -> channels[l+1], 4 = depthwise kxk stride s pad p).
std::string PrepareInPlace(const Options& o, InPlaceStage* s) {
  for (int64_t l = 0; l < o.num_layers; ++l) {
    if (o.op[l] != kKpOpConv2D && o.op[l] != kKpOpDepthwiseConv2D) continue;  // no weights
    const int32_t c_in = static_cast<int32_t>(o.shape[3 * o.inputs[2 * l] + 2]);
    const int32_t c_out = static_cast<int32_t>(o.shape[3 * (l + 1) + 2]);
    const bool conv = o.op[l] == kKpOpConv2D;
    const int32_t kh = static_cast<int32_t>(o.params[8 * l]), kw = static_cast<int32_t>(o.params[8 * l + 1]);
    const size_t n = static_cast<size_t>(conv ? c_out * kh * kw * c_in : kh * kw * c_out);
    s->filters[l].resize(n);
    for (size_t i = 0; i < n; ++i) s->filters[l][i] = static_cast<int8_t>(Rand(-127, 127));
    s->biases[l].resize(c_out);
    s->scales[l].resize(c_out);
    for (int32_t c = 0; c < c_out; ++c) {
      s->biases[l][c] = Rand(-2000, 2000);
      s->scales[l][c] = 0.002f + 0.0001f * Rand(0, 100);
    }
    KpConstTensor& f = s->t[2 * l + 1];
    KpConstTensor& b = s->t[2 * l + 2];
    memset(&f, 0, sizeof(f));
    memset(&b, 0, sizeof(b));
    f.type = kKpTypeInt8;
    f.num_dims = 4;
    f.dims[0] = conv ? c_out : 1, f.dims[1] = kh, f.dims[2] = kw, f.dims[3] = conv ? c_in : c_out;
    f.num_scales = c_out;
    f.scales = &s->scales[l][0];
    b.type = kKpTypeInt32;
    b.num_dims = 1;
    b.dims[0] = c_out;
  }
  const std::vector<uint8_t> bytes = o.Builder().Finish();
  Messages m = {"", 0};
  const KpReporter r = {Capture, &m};
  KpOptionsView view;
  s->stage = NULL;
  if (KpParseOptions(&bytes[0], bytes.size(), r, &view) != kKpOk) return m.all;
  s->buffer.assign(KpPersistentBytes(view) / 8 + 1, 0);
  if (KpPrepareStage(view, static_cast<int32_t>(2 * o.num_layers + 1), InPlaceGetConst, s,
                     &s->buffer[0], s->buffer.size() * 8, r, &s->stage) != kKpOk) {
    return m.all;
  }
  return "";
}
KpStatus EvalInPlace(InPlaceStage* s, const int8_t* in, int8_t* out) {
  const void* inputs[9] = {NULL};
  for (int l = 0; l < 4; ++l) {
    if (!s->filters[l].empty()) {
      inputs[2 * l + 1] = &s->filters[l][0];
      inputs[2 * l + 2] = &s->biases[l][0];
    }
  }
  std::vector<uint8_t> arena(s->stage->arena_bytes + 1, 0xAA);  // garbage, never read as data
  Messages m = {"", 0};
  const KpReporter r = {Capture, &m};
  return KpEvalStage(s->stage, in, out, inputs, &arena[0], r);
}

// One-layer depthwise stage: h x w x c input, k x k kernel, stride, pad, dilation.
Options OneLayerDepthwise(int64_t h, int64_t w, int64_t c, int64_t k, int64_t stride, int64_t dil,
                          int64_t pad, int64_t in_place) {
  Options o;
  o.in_place = in_place;
  o.num_layers = 1;
  o.grid = {1, 1};
  const int64_t eff = (k - 1) * dil + 1;
  const int64_t oh = (h + 2 * pad - eff) / stride + 1, ow = (w + 2 * pad - eff) / stride + 1;
  o.shape = {h, w, c, oh, ow, c};
  o.scale = {0.05f, 0.07f};
  o.zp = {3, -4};
  o.op = {kKpOpDepthwiseConv2D};
  o.inputs = {0, -1};
  o.params = {k, k, stride, stride, dil, dil, pad, pad};
  o.act = {3};
  o.weights = {1, 2};
  return o;
}

void TestOneLayerInPlaceAliasedEqualsSeparateBuffers() {
  const int64_t cases[][7] = {
      // h, w, c, k, stride, dilation, pad
      {7, 9, 5, 3, 1, 1, 1}, {8, 8, 3, 3, 2, 1, 1}, {9, 7, 4, 5, 2, 1, 2},
      {6, 11, 2, 3, 1, 2, 2}, {5, 5, 1, 1, 1, 1, 0}, {13, 6, 7, 3, 2, 2, 0}};
  for (size_t i = 0; i < sizeof(cases) / sizeof(cases[0]); ++i) {
    const int64_t* k = cases[i];
    InPlaceStage plain, in_place;
    g_lcg = 99u + static_cast<uint32_t>(i);
    CHECK(PrepareInPlace(OneLayerDepthwise(k[0], k[1], k[2], k[3], k[4], k[5], k[6], 0), &plain).empty());
    g_lcg = 99u + static_cast<uint32_t>(i);
    CHECK(PrepareInPlace(OneLayerDepthwise(k[0], k[1], k[2], k[3], k[4], k[5], k[6], 1), &in_place).empty());
    if (plain.stage == NULL || in_place.stage == NULL) return;
    CHECK_EQ(plain.stage->arena_bytes, 0u);
    // The arena is one plane of the input region the output reads, 4-aligned.
    CHECK(in_place.stage->arena_bytes > 0u);
    CHECK(in_place.stage->arena_bytes <= static_cast<uint32_t>((k[0] * k[1] + 3) / 4 * 4));
    CHECK_EQ(in_place.stage->layers[0].save_offset, 0);
    const KpTensor& out_t = in_place.stage->tensors[1];
    const size_t in_bytes = static_cast<size_t>(k[0] * k[1] * k[2]);
    const size_t out_bytes = static_cast<size_t>(out_t.h) * out_t.w * out_t.c;
    std::vector<int8_t> input(in_bytes), want(out_bytes), shared(in_bytes), separate(out_bytes);
    for (size_t j = 0; j < in_bytes; ++j) input[j] = static_cast<int8_t>(Rand(-128, 127));
    CHECK(EvalInPlace(&plain, &input[0], &want[0]) == kKpOk);
    CHECK(EvalInPlace(&in_place, &input[0], &separate[0]) == kKpOk);
    CHECK(memcmp(&separate[0], &want[0], out_bytes) == 0);
    memcpy(&shared[0], &input[0], in_bytes);
    CHECK(EvalInPlace(&in_place, &shared[0], &shared[0]) == kKpOk);  // output over input
    CHECK(memcmp(&shared[0], &want[0], out_bytes) == 0);
    // Overlapping at another address, or sharing memory without in_place: refused.
    std::vector<int8_t> big(in_bytes + 1);
    CHECK(EvalInPlace(&in_place, &big[0], &big[1]) == kKpError);
    CHECK(EvalInPlace(&plain, &shared[0], &shared[0]) == kKpError);
  }
}

void TestOneLayerInPlaceRules() {
  // Grid 2x1, depth multiplier 2, a CONV_2D: refused naming 'in_place'.
  Options grid = OneLayerDepthwise(8, 8, 3, 3, 1, 1, 1, 1);
  grid.grid = {2, 1};
  CHECK(Names(Validate(grid.Builder().Finish(), 3), "in_place"));
  Options mult = OneLayerDepthwise(8, 8, 3, 3, 1, 1, 1, 1);
  mult.shape[5] = 6;
  CHECK(Names(Validate(mult.Builder().Finish(), 3), "in_place"));
  Options more = OneLayerDepthwise(4, 4, 3, 3, 1, 1, 2, 1);  // 6x6 output from 4x4
  CHECK(Names(Validate(more.Builder().Finish(), 3), "in_place"));
  Options bad = OneLayerDepthwise(8, 8, 3, 3, 1, 1, 1, 2);
  CHECK(Names(Validate(bad.Builder().Finish(), 3), "in_place"));
  Options v1 = OneLayerDepthwise(8, 8, 3, 3, 1, 1, 1, 1);
  v1.version = 1;  // no 'in_place' key in version 1: not in place
  CHECK(Validate(v1.Builder().Finish(), 3).empty());
  Options v3 = OneLayerDepthwise(8, 8, 3, 3, 1, 1, 1, 1);
  v3.version = 3;  // version 3 reads 'in_place' as version 2 does
  CHECK(Validate(v3.Builder().Finish(), 3).empty());
  v3.in_place = 2;
  CHECK(Names(Validate(v3.Builder().Finish(), 3), "in_place"));
  Options v4 = OneLayerDepthwise(8, 8, 3, 3, 1, 1, 1, 1);
  v4.version = 4;
  CHECK(Names(Validate(v4.Builder().Finish(), 3), "version"));
}

// conv 1x1 (c -> e), depthwise 3x3 (e), conv 1x1 (e -> c2): the depthwise
// writes over the expanded tensor when that lowers the patch arena.
Options InvertedResidual(int64_t h, int64_t w, int64_t c, int64_t e, int64_t stride, int64_t grid,
                         int64_t in_place) {
  Options o;
  o.in_place = in_place;
  o.num_layers = 3;
  o.grid = {grid, grid};
  const int64_t oh = (h - 1) / stride + 1, ow = (w - 1) / stride + 1;
  o.shape = {h, w, c, h, w, e, oh, ow, e, oh, ow, c + 1};
  o.scale = {0.05f, 0.04f, 0.06f, 0.08f};
  o.zp = {1, -7, 5, 0};
  o.op = {kKpOpConv2D, kKpOpDepthwiseConv2D, kKpOpConv2D};
  o.inputs = {0, -1, 1, -1, 2, -1};
  const int64_t pad = stride == 1 ? 1 : ((oh - 1) * stride + 3 - h) / 2;
  o.params = {1, 1, 1, 1, 1, 1, 0, 0, 3, 3, stride, stride, 1, 1, pad, pad, 1, 1, 1, 1, 1, 1, 0, 0};
  o.act = {3, 3, 0};
  o.weights = {1, 2, 3, 4, 5, 6};
  return o;
}

void TestMultiLayerInPlaceLowersArenaSameBits() {
  const int64_t cases[][6] = {{12, 12, 4, 24, 1, 2}, {15, 11, 3, 18, 2, 3}, {9, 9, 2, 12, 1, 1}};
  for (size_t i = 0; i < sizeof(cases) / sizeof(cases[0]); ++i) {
    const int64_t* k = cases[i];
    InPlaceStage plain, in_place;
    g_lcg = 7u + static_cast<uint32_t>(i);
    CHECK(PrepareInPlace(InvertedResidual(k[0], k[1], k[2], k[3], k[4], k[5], 0), &plain).empty());
    g_lcg = 7u + static_cast<uint32_t>(i);
    CHECK(PrepareInPlace(InvertedResidual(k[0], k[1], k[2], k[3], k[4], k[5], 1), &in_place).empty());
    if (plain.stage == NULL || in_place.stage == NULL) return;
    CHECK(in_place.stage->arena_bytes < plain.stage->arena_bytes);
    CHECK(in_place.stage->layers[1].save_offset >= 0);
    CHECK_EQ(in_place.stage->tensors[2].arena_offset, in_place.stage->tensors[1].arena_offset);
    CHECK_EQ(plain.stage->layers[1].save_offset, -1);
    const KpTensor& out_t = plain.stage->tensors[3];
    const size_t in_bytes = static_cast<size_t>(k[0] * k[1] * k[2]);
    const size_t out_bytes = static_cast<size_t>(out_t.h) * out_t.w * out_t.c;
    std::vector<int8_t> input(in_bytes), want(out_bytes), got(out_bytes);
    for (size_t j = 0; j < in_bytes; ++j) input[j] = static_cast<int8_t>(Rand(-128, 127));
    CHECK(EvalInPlace(&plain, &input[0], &want[0]) == kKpOk);
    CHECK(EvalInPlace(&in_place, &input[0], &got[0]) == kKpOk);
    CHECK(memcmp(&got[0], &want[0], out_bytes) == 0);
  }
}


// ------------------------------------------------------------ MEAN

// conv 3x3 pad 1 (h x w x c -> h x w x e), then MEAN (-> 1 x 1 x e); options
// version 3, grid over the conv's output.
Options ConvMean(int64_t h, int64_t w, int64_t c, int64_t e, int64_t gh, int64_t gw) {
  Options o;
  o.version = 3;
  o.num_layers = 2;
  o.grid = {gh, gw};
  o.shape = {h, w, c, h, w, e, 1, 1, e};
  o.scale = {0.05f, 0.04f, 0.013f};
  o.zp = {1, -7, 4};
  o.op = {kKpOpConv2D, kKpOpMean};
  o.inputs = {0, -1, 1, -1};
  o.params = {3, 3, 1, 1, 1, 1, 1, 1, h, w, 1, 1, 1, 1, 0, 0};
  o.act = {0, 0};
  o.weights = {1, 2, -1, -1};
  return o;
}

// One-layer MEAN over h x w x c (reads the op input directly).
Options OneLayerMean(int64_t h, int64_t w, int64_t c, float s_in, float s_out, int64_t zp_in,
                     int64_t zp_out, int64_t gh, int64_t gw) {
  Options o;
  o.version = 3;
  o.num_layers = 1;
  o.grid = {gh, gw};
  o.shape = {h, w, c, 1, 1, c};
  o.scale = {s_in, s_out};
  o.zp = {zp_in, zp_out};
  o.op = {kKpOpMean};
  o.inputs = {0, -1};
  o.params = {h, w, 1, 1, 1, 1, 0, 0};
  o.act = {0};
  o.weights = {-1, -1};
  return o;
}

// TFLM's int8 MEAN of a whole h x w x c tensor, written out independently of
// the core (int64 arithmetic, gemmlowp's rounding spelled out): the test's
// reference.
int64_t RefRoundingHighMul(int64_t a, int64_t b) {
  if (a == INT32_MIN && b == INT32_MIN) return INT32_MAX;
  const int64_t ab = a * b;
  const int64_t v = ab + (ab >= 0 ? (int64_t(1) << 30) : 1 - (int64_t(1) << 30));
  return v >= 0 ? v / (int64_t(1) << 31) : -((-v) / (int64_t(1) << 31));
}
int64_t RefRoundingShift(int64_t x, int e) {
  const int64_t floor_div = x >= 0 ? x >> e : -((-x + (int64_t(1) << e) - 1) >> e);
  const int64_t remainder = x - floor_div * (int64_t(1) << e);
  const int64_t threshold = ((int64_t(1) << e) - 1) / 2 + (x < 0 ? 1 : 0);
  return floor_div + (remainder > threshold ? 1 : 0);
}
std::vector<int8_t> RefMean(const std::vector<int8_t>& x, int32_t h, int32_t w, int32_t c,
                            float s_in, float s_out, int32_t zp_in, int32_t zp_out) {
  // QuantizeMultiplier by frexp, as the spec writes it.
  int e = 0;
  const double q = frexp(static_cast<double>(s_in) / static_cast<double>(s_out), &e);
  int64_t m = static_cast<int64_t>(q * 2147483648.0 + 0.5);  // q > 0: half away from zero
  if (m == (int64_t(1) << 31)) {
    m /= 2;
    ++e;
  }
  if (e < -31) e = 0, m = 0;
  const int64_t n = static_cast<int64_t>(h) * w;
  int k = 0;
  while ((int64_t(1) << (k + 1)) <= n) ++k;
  k = k < 32 ? k : 32;
  k = k < 31 + e ? k : 31 + e;
  const int64_t m2 = (m << k) / n;
  const int shift = e - k;
  std::vector<int8_t> y(c);
  for (int32_t ch = 0; ch < c; ++ch) {
    int64_t sum = 0;
    for (int64_t p = 0; p < n; ++p) sum += x[p * c + ch];
    const int64_t acc = (sum - zp_in * n) * (int64_t(1) << (shift > 0 ? shift : 0));
    int64_t v = RefRoundingShift(RefRoundingHighMul(acc, m2), shift > 0 ? 0 : -shift) + zp_out;
    y[ch] = static_cast<int8_t>(v < -128 ? -128 : (v > 127 ? 127 : v));
  }
  return y;
}

// Prepare for a stage without weights (MEAN alone).
std::string PrepareNoWeights(const Options& o, std::vector<uint64_t>* buffer, KpStage** stage) {
  const std::vector<uint8_t> bytes = o.Builder().Finish();
  Messages m = {"", 0};
  const KpReporter r = {Capture, &m};
  KpOptionsView view;
  *stage = NULL;
  if (KpParseOptions(&bytes[0], bytes.size(), r, &view) != kKpOk) return m.all;
  buffer->assign(KpPersistentBytes(view) / 8 + 1, 0);
  if (KpPrepareStage(view, 1, NULL, NULL, &(*buffer)[0], buffer->size() * 8, r, stage) != kKpOk) {
    return m.all;
  }
  return "";
}

void TestMeanOptionsNameTheKey() {
  CHECK(Validate(ConvMean(8, 8, 3, 4, 3, 2).Builder().Finish(), 3).empty());
  // The grid tiles the MEAN's input (8x8), not its 1x1 output.
  CHECK(Validate(ConvMean(8, 8, 3, 4, 8, 8).Builder().Finish(), 3).empty());
  std::vector<Case> cases;
  Options o;
  o = ConvMean(8, 8, 3, 4, 3, 2); o.version = 2; cases.push_back({"layer_op", o});
  o = ConvMean(8, 8, 3, 4, 3, 2); o.version = 1; cases.push_back({"layer_op", o});
  o = ConvMean(8, 8, 3, 4, 9, 1); cases.push_back({"grid", o});    // > the MEAN's input
  o = ConvMean(8, 8, 3, 4, 1, 9); cases.push_back({"grid", o});
  o = ConvMean(8, 8, 3, 4, 3, 2); o.params[8] = 7; cases.push_back({"layer_params", o});
  o = ConvMean(8, 8, 3, 4, 3, 2); o.params[9] = 9; cases.push_back({"layer_params", o});
  o = ConvMean(8, 8, 3, 4, 3, 2); o.params[10] = 2; cases.push_back({"layer_params", o});
  o = ConvMean(8, 8, 3, 4, 3, 2); o.params[13] = 2; cases.push_back({"layer_params", o});
  o = ConvMean(8, 8, 3, 4, 3, 2); o.params[14] = 1; cases.push_back({"layer_params", o});
  o = ConvMean(8, 8, 3, 4, 3, 2); o.act[1] = 1; cases.push_back({"layer_activation", o});
  o = ConvMean(8, 8, 3, 4, 3, 2); o.shape[8] = 5; cases.push_back({"tensor_shape", o});
  o = ConvMean(8, 8, 3, 4, 3, 2); o.shape[6] = 2; cases.push_back({"tensor_shape", o});
  o = ConvMean(8, 8, 3, 4, 3, 2); o.shape[7] = 2; cases.push_back({"tensor_shape", o});
  o = ConvMean(8, 8, 3, 4, 3, 2); o.weights[2] = 3; cases.push_back({"layer_weights", o});
  o = ConvMean(8, 8, 3, 4, 3, 2); o.inputs[3] = 0; cases.push_back({"layer_inputs", o});
  // Order: version before position, parameters before activation before shape.
  o = ConvMean(8, 8, 3, 4, 3, 2); o.params[8] = 7; o.act[1] = 1; o.shape[8] = 5;
  cases.push_back({"layer_params", o});
  o = ConvMean(8, 8, 3, 4, 3, 2); o.act[1] = 1; o.shape[8] = 5;
  cases.push_back({"layer_activation", o});
  // A MEAN that is not the last layer: MEAN then RELU (grid over the 1x1 output).
  o = OneLayerMean(4, 4, 2, 0.1f, 0.1f, 0, 0, 1, 1);
  o.num_layers = 2; o.shape = {4, 4, 2, 1, 1, 2, 1, 1, 2}; o.scale = {0.1f, 0.1f, 0.1f};
  o.zp = {0, 0, 0}; o.op = {kKpOpMean, kKpOpRelu}; o.inputs = {0, -1, 1, -1};
  o.params = {4, 4, 1, 1, 1, 1, 0, 0, 1, 1, 1, 1, 1, 1, 0, 0}; o.act = {0, 0};
  o.weights = {-1, -1, -1, -1};
  cases.push_back({"layer_op", o});
  o.version = 2; o.params[0] = 3;  // version is checked first, then the position
  cases.push_back({"layer_op", o});
  // The MEAN's kernel is its whole input, beyond other ops' 64, up to 2^22 pixels.
  o = OneLayerMean(65, 4, 2, 0.1f, 0.1f, 0, 0, 1, 1);
  CHECK(Validate(o.Builder().Finish(), 1).empty());
  o = OneLayerMean(2048, 2048, 1, 0.1f, 0.1f, 0, 0, 1, 1);
  CHECK(Validate(o.Builder().Finish(), 1).empty());
  o = OneLayerMean(4096, 1025, 1, 0.1f, 0.1f, 0, 0, 1, 1); cases.push_back({"tensor_shape", o});
  o = OneLayerMean(4096, 1025, 1, 0.1f, 0.1f, 0, 0, 1, 1); o.act = {1};
  cases.push_back({"layer_activation", o});  // activation before the 2^22 bound
  o = OneLayerMean(65, 4, 2, 0.1f, 0.1f, 0, 0, 1, 1); o.params[2] = 65;  // stride: 1..64 first
  cases.push_back({"layer_params", o});
  o = OneLayerMean(65, 4, 2, 0.1f, 0.1f, 0, 0, 1, 1); o.params[0] = 0; cases.push_back({"layer_params", o});
  // One-layer in-place needs a DEPTHWISE_CONV_2D.
  o = OneLayerMean(4, 4, 2, 0.1f, 0.1f, 0, 0, 1, 1); o.in_place = 1;
  cases.push_back({"in_place", o});
  o = OneLayerMean(4, 4, 2, 0.1f, 0.1f, 0, 0, 1, 1);
  CHECK(Validate(o.Builder().Finish(), 1).empty());
  for (size_t i = 0; i < cases.size(); ++i) {
    const std::string message = Validate(cases[i].options.Builder().Finish(), 3);
    CHECK(Names(message, cases[i].key));
    if (message.find(cases[i].key) == std::string::npos) printf("  (MEAN case %d)\n", static_cast<int>(i));
  }
  // A layer_op message for a MEAN in version 2 says why.
  o = ConvMean(8, 8, 3, 4, 3, 2);
  o.version = 2;
  CHECK(Validate(o.Builder().Finish(), 3).find("version 3") != std::string::npos);
}

void TestMeanShiftLimit() {
  // s_in / s_out = 2^33: QuantizeMultiplier's shift 34; k = floor(log2(n))
  // brings it to 34 - k, accepted from n = 16 on (shift 30).
  const float s_in = 8589934592.0f, s_out = 1.0f;
  std::vector<uint64_t> buffer;
  KpStage* stage = NULL;
  CHECK(Names(PrepareNoWeights(OneLayerMean(2, 2, 3, s_in, s_out, 0, 0, 1, 1), &buffer, &stage),
              "tensor_scale"));
  CHECK(Names(PrepareNoWeights(OneLayerMean(3, 5, 3, s_in, s_out, 0, 0, 1, 1), &buffer, &stage),
              "tensor_scale"));
  CHECK(PrepareNoWeights(OneLayerMean(4, 4, 3, s_in, s_out, 0, 0, 1, 1), &buffer, &stage).empty());
  if (stage != NULL) {
    CHECK_EQ(stage->layers[0].shift[0], 30);
    CHECK_EQ(stage->layers[0].multiplier[0], 1 << 30);  // (2^30 << 4) / 16
  }
  // The spec's example: 0.5 / 0.5 over 25 pixels.
  CHECK(PrepareNoWeights(OneLayerMean(5, 5, 2, 0.5f, 0.5f, 3, -2, 1, 1), &buffer, &stage).empty());
  if (stage != NULL) {
    CHECK_EQ(stage->layers[0].multiplier[0], 687194767);
    CHECK_EQ(stage->layers[0].shift[0], -3);
  }
}

void TestMeanHandChecked() {
  // 5x5x2, s_in = s_out = 0.5, zp_in 3, zp_out -2: y = mean - 3 - 2 with
  // TFLM's double rounding.  Channel 0: 24 x 10 and one 22 (sum 262):
  // SRDHM(187, 687194767) = 60, RDBP(60, 3) = 8 (7.5 rounds up; the exact
  // mean 7.48 would give 7), y = 6.  Channel 1: 25 x -40 (sum -1000):
  // (-1075) / 25 = -43, y = -45.
  for (int grid = 0; grid < 3; ++grid) {
    const int64_t gh = grid == 0 ? 1 : (grid == 1 ? 3 : 5), gw = grid == 0 ? 1 : 2;
    std::vector<uint64_t> buffer;
    KpStage* stage = NULL;
    CHECK(PrepareNoWeights(OneLayerMean(5, 5, 2, 0.5f, 0.5f, 3, -2, gh, gw), &buffer, &stage)
              .empty());
    if (stage == NULL) return;
    CHECK_EQ(stage->arena_bytes, 8u);  // the sums alone: align4(4 * 2)
    std::vector<int8_t> x(50);
    for (int p = 0; p < 25; ++p) {
      x[2 * p] = 10;
      x[2 * p + 1] = -40;
    }
    x[2 * 17] = 22;
    std::vector<uint8_t> arena(stage->arena_bytes, 0xAA);  // garbage: sums start at 0
    int8_t y[2] = {0, 0};
    Messages m = {"", 0};
    const KpReporter r = {Capture, &m};
    CHECK(KpEvalStage(stage, &x[0], y, NULL, &arena[0], r) == kKpOk);
    CHECK_EQ(y[0], 6);
    CHECK_EQ(y[1], -45);
    const std::vector<int8_t> ref = RefMean(x, 5, 5, 2, 0.5f, 0.5f, 3, -2);
    CHECK_EQ(ref[0], 6);
    CHECK_EQ(ref[1], -45);
    CHECK(KpEvalStage(stage, &x[0], y, NULL, &arena[0], r) == kKpOk);  // again: same bits
    CHECK_EQ(y[0], 6);
    CHECK_EQ(y[1], -45);
    // A misaligned arena is an error, not a misaligned int32 access.
    std::vector<uint8_t> big(stage->arena_bytes + 4);
    CHECK(KpEvalStage(stage, &x[0], y, NULL, &big[1], r) == kKpError);
    CHECK_EQ(m.count, 1);
  }
  // Saturation at both ends and a scale ratio that is not 1.
  std::vector<uint64_t> buffer;
  KpStage* stage = NULL;
  CHECK(PrepareNoWeights(OneLayerMean(3, 7, 3, 0.2f, 0.01f, -5, 9, 2, 3), &buffer, &stage).empty());
  if (stage == NULL) return;
  std::vector<int8_t> x(63);
  for (int p = 0; p < 21; ++p) {
    x[3 * p] = 127;
    x[3 * p + 1] = -128;
    x[3 * p + 2] = static_cast<int8_t>(p - 10);
  }
  std::vector<uint8_t> arena(stage->arena_bytes, 0xAA);
  int8_t y[3];
  Messages m = {"", 0};
  const KpReporter r = {Capture, &m};
  CHECK(KpEvalStage(stage, &x[0], y, NULL, &arena[0], r) == kKpOk);
  const std::vector<int8_t> ref = RefMean(x, 3, 7, 3, 0.2f, 0.01f, -5, 9);
  CHECK_EQ(y[0], 127);
  CHECK_EQ(y[1], -128);
  CHECK_EQ(y[2], ref[2]);
  CHECK_EQ(ref[2], 9 + 5 * 20);  // mean -0 of the raw values, minus zp -5, times 20
}

void TestMeanLargestInput() {
  // 2^22 pixels, zero point -128: the sums minus zp * n reach 255 * 2^22,
  // within int32 (UBSan builds check), patch by patch in 64x64 tiles.
  std::vector<uint64_t> buffer;
  KpStage* stage = NULL;
  CHECK(PrepareNoWeights(OneLayerMean(2048, 2048, 1, 0.02f, 0.03f, -128, 5, 64, 64), &buffer, &stage)
            .empty());
  if (stage == NULL) return;
  std::vector<int8_t> x(2048 * 2048);
  for (size_t i = 0; i < x.size(); ++i) x[i] = static_cast<int8_t>(i % 7 == 0 ? -128 : 127);
  std::vector<uint8_t> arena(stage->arena_bytes);
  int8_t y = 0;
  Messages m = {"", 0};
  const KpReporter r = {Capture, &m};
  CHECK(KpEvalStage(stage, &x[0], &y, NULL, &arena[0], r) == kKpOk);
  const std::vector<int8_t> ref = RefMean(x, 2048, 2048, 1, 0.02f, 0.03f, -128, 5);
  CHECK_EQ(y, ref[0]);
  CHECK_EQ(y, 127);  // (6/7 * 255) * 2/3 + 5 saturates
  for (size_t i = 0; i < x.size(); ++i) x[i] = static_cast<int8_t>(-128 + (i % 61));
  CHECK(KpEvalStage(stage, &x[0], &y, NULL, &arena[0], r) == kKpOk);
  const std::vector<int8_t> ref2 = RefMean(x, 2048, 2048, 1, 0.02f, 0.03f, -128, 5);
  CHECK_EQ(y, ref2[0]);
  CHECK(y > 5 && y < 127);
}

void TestMeanGeometryAndArena() {
  InPlaceStage s;
  g_lcg = 31u;
  CHECK(PrepareInPlace(ConvMean(8, 8, 3, 4, 3, 2), &s).empty());
  if (s.stage == NULL) return;
  const KpStage& st = *s.stage;
  // Tiles of tensor 1 (8x8): rows [0,2) [2,5) [5,8), columns [0,4) [4,8).
  const KpRegion tile = StageTile(st, 3);
  CHECK_EQ(tile.y0, 2);
  CHECK_EQ(tile.y1, 5);
  CHECK_EQ(tile.x0, 4);
  CHECK_EQ(tile.x1, 8);
  KpRegion regions[3];
  PatchRegions(st, tile, regions);
  CHECK(RegionEmpty(regions[2]));  // the MEAN's output has no region
  CHECK_EQ(regions[1].y0, 2);
  CHECK_EQ(regions[1].x1, 8);
  CHECK_EQ(regions[0].y0, 1);
  CHECK_EQ(regions[0].y1, 6);
  CHECK_EQ(regions[0].x0, 3);
  CHECK_EQ(regions[0].x1, 8);
  // Sums: align4(4 * 4) = 16 bytes at 0; tensor 1 (largest tile 3x4 x 4
  // channels = 48 bytes) after them.
  CHECK_EQ(st.tensors[1].arena_offset, 16);
  CHECK_EQ(st.tensors[1].arena_size, 48);
  CHECK_EQ(st.arena_bytes, 64u);
  CHECK_EQ(MeanSumsBytes(st), 16u);
  CHECK_EQ(TiledTensor(st), 1);
  // 5 output channels: align4(20) = 20 bytes of sums.
  InPlaceStage odd;
  CHECK(PrepareInPlace(ConvMean(7, 5, 2, 5, 2, 2), &odd).empty());
  if (odd.stage == NULL) return;
  CHECK_EQ(odd.stage->tensors[1].arena_offset, 20);
  CHECK_EQ(odd.stage->tensors[1].arena_size, 4 * 3 * 5);  // tile rows [3, 7) x columns [2, 5)
  CHECK_EQ(odd.stage->arena_bytes, 20u + 60u);
}

// conv -> MEAN patch by patch equals the full conv tensor (the conv alone as
// a stage, grid 1x1) averaged by the test's own MEAN, for several grids.
void TestMeanMatchesFullTensor() {
  const int64_t cases[][6] = {{8, 8, 3, 4, 3, 2}, {9, 6, 2, 7, 4, 5}, {5, 11, 3, 3, 1, 1},
                              {12, 12, 4, 6, 12, 12}};
  for (size_t i = 0; i < sizeof(cases) / sizeof(cases[0]); ++i) {
    const int64_t* k = cases[i];
    Options mean = ConvMean(k[0], k[1], k[2], k[3], k[4], k[5]);
    Options conv = mean;  // the conv alone, its output the op's
    conv.version = 1;
    conv.num_layers = 1;
    conv.grid = {1, 1};
    conv.shape.resize(6);
    conv.scale.resize(2);
    conv.zp.resize(2);
    conv.op.resize(1);
    conv.inputs.resize(2);
    conv.params.resize(8);
    conv.act.resize(1);
    conv.weights.resize(2);
    InPlaceStage a, b;
    g_lcg = 500u + static_cast<uint32_t>(i);
    CHECK(PrepareInPlace(mean, &a).empty());
    g_lcg = 500u + static_cast<uint32_t>(i);
    CHECK(PrepareInPlace(conv, &b).empty());
    if (a.stage == NULL || b.stage == NULL) return;
    const size_t in_bytes = static_cast<size_t>(k[0] * k[1] * k[2]);
    const size_t full_bytes = static_cast<size_t>(k[0] * k[1] * k[3]);
    std::vector<int8_t> input(in_bytes), full(full_bytes), got(static_cast<size_t>(k[3]));
    for (size_t j = 0; j < in_bytes; ++j) input[j] = static_cast<int8_t>(Rand(-128, 127));
    CHECK(EvalInPlace(&b, &input[0], &full[0]) == kKpOk);
    CHECK(EvalInPlace(&a, &input[0], &got[0]) == kKpOk);
    const std::vector<int8_t> want =
        RefMean(full, static_cast<int32_t>(k[0]), static_cast<int32_t>(k[1]),
                static_cast<int32_t>(k[3]), mean.scale[1], mean.scale[2],
                static_cast<int32_t>(mean.zp[1]), static_cast<int32_t>(mean.zp[2]));
    CHECK(memcmp(&got[0], &want[0], got.size()) == 0);
    // Not trivially constant: some channel differs from the output zero point.
    bool varied = false;
    for (size_t c = 0; c < got.size(); ++c) varied = varied || got[c] != mean.zp[2];
    CHECK(varied);
  }
}

// conv 1x1 -> depthwise 3x3 -> MEAN with in_place: the depthwise writes over
// tensor 1 (tensor 2 is an intermediate now), after the sums; same bits.
void TestMeanInPlaceSameBits() {
  Options o = InvertedResidual(12, 12, 4, 24, 1, 3, 0);
  o.version = 3;
  o.op[2] = kKpOpMean;
  o.shape[9] = 1, o.shape[10] = 1, o.shape[11] = 24;
  o.params[16] = 12, o.params[17] = 12;
  o.act[2] = 0;
  o.weights[4] = -1, o.weights[5] = -1;
  Options p = o;
  p.in_place = 1;
  InPlaceStage plain, in_place;
  g_lcg = 77u;
  CHECK(PrepareInPlace(o, &plain).empty());
  g_lcg = 77u;
  CHECK(PrepareInPlace(p, &in_place).empty());
  if (plain.stage == NULL || in_place.stage == NULL) return;
  const int32_t sums = 4 * 24;
  CHECK(in_place.stage->arena_bytes < plain.stage->arena_bytes);
  CHECK(in_place.stage->layers[1].save_offset >= sums);
  CHECK_EQ(in_place.stage->tensors[2].arena_offset, in_place.stage->tensors[1].arena_offset);
  CHECK(plain.stage->tensors[1].arena_offset >= sums);
  CHECK(plain.stage->tensors[2].arena_offset >= sums);
  std::vector<int8_t> input(12 * 12 * 4), want(24), got(24);
  for (size_t j = 0; j < input.size(); ++j) input[j] = static_cast<int8_t>(Rand(-128, 127));
  CHECK(EvalInPlace(&plain, &input[0], &want[0]) == kKpOk);
  CHECK(EvalInPlace(&in_place, &input[0], &got[0]) == kKpOk);
  CHECK(memcmp(&got[0], &want[0], 24) == 0);
}

void TestMeanCheckIo() {
  std::vector<uint64_t> buffer;
  KpStage* stage = NULL;
  CHECK(PrepareNoWeights(OneLayerMean(5, 5, 2, 0.5f, 0.5f, 3, -2, 1, 1), &buffer, &stage).empty());
  if (stage == NULL) return;
  Messages m = {"", 0};
  const KpReporter r = {Capture, &m};
  const int32_t flat[4] = {1, 2, 0, 0}, nhwc[4] = {1, 1, 1, 2}, bad[4] = {2, 2, 0, 0};
  CHECK(KpCheckStageIo(*stage, true, kKpTypeInt8, 2, flat, 0.5f, -2, r) == kKpOk);
  CHECK(KpCheckStageIo(*stage, true, kKpTypeInt8, 4, nhwc, 0.5f, -2, r) == kKpOk);
  CHECK_EQ(m.count, 0);
  CHECK(KpCheckStageIo(*stage, true, kKpTypeInt8, 2, bad, 0.5f, -2, r) == kKpError);
  CHECK(KpCheckStageIo(*stage, true, kKpTypeInt8, 1, flat + 1, 0.5f, -2, r) == kKpError);
  CHECK(KpCheckStageIo(*stage, true, kKpTypeInt32, 2, flat, 0.5f, -2, r) == kKpError);
  CHECK(KpCheckStageIo(*stage, false, kKpTypeInt8, 2, flat, 0.5f, 3, r) == kKpError);  // input
  CHECK_EQ(m.count, 4);
  CHECK(Names(m.all, "tensor_shape"));
  // Without a MEAN a [1, C] output is refused.
  std::vector<uint64_t> buffer2;
  KpStage* relu = NULL;
  Options o = OneLayerMean(1, 1, 2, 0.5f, 0.5f, 3, -2, 1, 1);
  o.op = {kKpOpRelu};
  o.params = {1, 1, 1, 1, 1, 1, 0, 0};
  o.shape = {1, 1, 2, 1, 1, 2};
  CHECK(PrepareNoWeights(o, &buffer2, &relu).empty());
  if (relu == NULL) return;
  m.count = 0;
  CHECK(KpCheckStageIo(*relu, true, kKpTypeInt8, 2, flat, 0.5f, -2, r) == kKpError);
  CHECK(KpCheckStageIo(*relu, true, kKpTypeInt8, 4, nhwc, 0.5f, -2, r) == kKpOk);
  CHECK_EQ(m.count, 1);
}

int WriteSeeds(const char* dir) {
  std::vector<std::vector<uint8_t> > seeds;
  seeds.push_back(std::vector<uint8_t>(kGoldenOptions, kGoldenOptions + sizeof(kGoldenOptions)));
  seeds.push_back(Options().Builder().Finish());
  Options relu;
  relu.op[2] = 19;
  relu.inputs[5] = -1;
  relu.inputs[4] = 2;
  seeds.push_back(relu.Builder().Finish());
  seeds.push_back(ConvMean(8, 8, 3, 4, 3, 2).Builder().Finish());
  seeds.push_back(OneLayerMean(5, 7, 3, 0.2f, 0.01f, -5, 9, 2, 3).Builder().Finish());
  for (size_t i = 0; i < seeds.size(); ++i) {
    char path[512];
    snprintf(path, sizeof(path), "%s/seed_%d", dir, static_cast<int>(i));
    FILE* f = fopen(path, "wb");
    if (f == NULL) return 1;
    fwrite(&seeds[i][0], 1, seeds[i].size(), f);
    const uint8_t tail[8] = {0, 0, 0, 0, 0, 0, 0, 0};
    fwrite(tail, 1, sizeof(tail), f);
    fclose(f);
  }
  printf("wrote %d seeds to %s\n", static_cast<int>(seeds.size()), dir);
  return 0;
}

// KpStageBuffers: the scratch buffers Prepare requests, in request order
// (docs "Scratch buffers"): the patch arena if P > 0, then the CMSIS-NN
// context if the build has the fast path and Q > 0.
void TestStageBuffers() {
  KpStage stage;
  memset(&stage, 0, sizeof(stage));
  KpStageBuffer buffers[kKpMaxStageBuffers];
  const uint32_t sizes[3] = {0, 4, 1536};
  for (int p = 0; p < 3; ++p) {
    for (int q = 0; q < 3; ++q) {
      for (int cmsis = 0; cmsis < 2; ++cmsis) {
        stage.arena_bytes = sizes[p];
        stage.context_bytes = sizes[q] + 8u * static_cast<uint32_t>(q > 0);
        memset(buffers, 0xAB, sizeof(buffers));
        const int32_t n = KpStageBuffers(stage, cmsis != 0, buffers);
        int32_t want = 0;
        if (stage.arena_bytes > 0) {
          CHECK_EQ(buffers[want].kind, kKpBufferPatchArena);
          CHECK_EQ(buffers[want].bytes, stage.arena_bytes);
          ++want;
        }
        if (cmsis && stage.context_bytes > 0) {
          CHECK_EQ(buffers[want].kind, kKpBufferCmsisContext);
          CHECK_EQ(buffers[want].bytes, stage.context_bytes);
          ++want;
        }
        CHECK_EQ(n, want);
        CHECK(n <= kKpMaxStageBuffers);
      }
    }
  }
  // The golden stage: its patch arena, and nothing else in the portable build.
  Consts consts = GoldenConsts();
  std::vector<uint64_t> buffer;
  KpStage* golden = NULL;
  CHECK(PrepareGolden(&consts, &buffer, &golden).empty());
  if (golden == NULL) return;
  const int32_t n = KpStageBuffers(*golden, false, buffers);
  CHECK_EQ(n, 1);
  CHECK_EQ(buffers[0].kind, kKpBufferPatchArena);
  CHECK_EQ(buffers[0].bytes, kGoldenArenaBytes);
}

int main(int argc, char** argv) {
  if (argc == 3 && strcmp(argv[1], "--write-seeds") == 0) return WriteSeeds(argv[2]);
  Run("FlexbufferReadsBuilderOutput", TestFlexbufferReadsBuilderOutput);
  Run("FlexbufferReadsPythonEncoderOutput", TestFlexbufferReadsPythonEncoderOutput);
  Run("FlexbufferRejectsEveryTruncationAndGarbage", TestFlexbufferRejectsEveryTruncationAndGarbage);
  Run("GoodOptionsValidate", TestGoodOptionsValidate);
  Run("MissingWrongTypeAndLengthNameTheKey", TestMissingWrongTypeAndLengthNameTheKey);
  Run("InconsistentOptionsNameTheKey", TestInconsistentOptionsNameTheKey);
  Run("ArithmeticKnownValues", TestArithmeticKnownValues);
  Run("GoldenStageMatchesReferenceExecutor", TestGoldenStageMatchesReferenceExecutor);
  Run("PrepareChecksWeightsAndScales", TestPrepareChecksWeightsAndScales);
  Run("PoolMustKeepScale", TestPoolMustKeepScale);
  Run("CheckIo", TestCheckIo);
  Run("TileBounds", TestTileBounds);
  Run("OneLayerInPlaceAliasedEqualsSeparateBuffers", TestOneLayerInPlaceAliasedEqualsSeparateBuffers);
  Run("OneLayerInPlaceRules", TestOneLayerInPlaceRules);
  Run("MultiLayerInPlaceLowersArenaSameBits", TestMultiLayerInPlaceLowersArenaSameBits);
  Run("MeanOptionsNameTheKey", TestMeanOptionsNameTheKey);
  Run("MeanShiftLimit", TestMeanShiftLimit);
  Run("MeanHandChecked", TestMeanHandChecked);
  Run("MeanLargestInput", TestMeanLargestInput);
  Run("MeanGeometryAndArena", TestMeanGeometryAndArena);
  Run("MeanMatchesFullTensor", TestMeanMatchesFullTensor);
  Run("MeanInPlaceSameBits", TestMeanInPlaceSameBits);
  Run("MeanCheckIo", TestMeanCheckIo);
  Run("StageBuffers", TestStageBuffers);
  printf("%d passed, %d failed\n", g_passed, g_failed);
  return g_failed == 0 ? 0 : 1;
}
