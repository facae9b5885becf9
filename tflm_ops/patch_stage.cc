/* Copyright 2026 The keras-patch Authors. Licensed under the Apache License 2.0.

TFLM adapter of KP_PATCH_STAGE: glue between TFLM's kernel API and the
portable core (patch_stage_core.h), which does all parsing, validation,
planning and arithmetic.

  Init     keeps a pointer to the custom options (they live in the model).
  Prepare  parses and validates them (options versions 1..3; version 3 adds
           the MEAN layer), checks the op's tensors, builds the
           stage in persistent memory and requests the scratch buffers
           KpStageBuffers lists (patch_geometry.h, docs/patch_stage_op.md
           "Scratch buffers": the patch arena and, when the core is built
           with -DCMSIS_NN, the CMSIS-NN context).
  Eval     fetches the tensor pointers and runs the core; allocates nothing.
==============================================================================*/
#include <stdarg.h>

#include "keras_patch_ops.h"
#include "patch_geometry.h"
#include "patch_stage_cmsis.h"
#include "patch_stage_core.h"
#include "tensorflow/lite/c/common.h"
#include "tensorflow/lite/kernels/kernel_util.h"
#include "tensorflow/lite/micro/kernels/kernel_util.h"
#include "tensorflow/lite/micro/micro_context.h"
#include "tensorflow/lite/micro/micro_log.h"

namespace keras_patch {
namespace {

constexpr int kInputTensor = 0;
constexpr int kOutputTensor = 0;

struct OpData {
  const uint8_t* options;
  size_t options_size;
  KpStage* stage;            // in persistent memory, built in Prepare
  const void** input_data;   // one pointer per op input, refreshed in Eval
  int num_inputs;
  int arena_index;           // scratch buffer of the patch arena, -1 if none
  int context_index;         // scratch buffer of the CMSIS-NN context, -1 if none
};

// Appends `text` to buffer[*pos], keeping room for the terminator.
void Append(char* buffer, size_t size, size_t* pos, const char* text) {
  while (*text != '\0' && *pos + 1 < size) buffer[(*pos)++] = *text++;
}

// The core's error sink: TFLM's log. The core's formats use only %d and %s
// (tflm_ops/README.md), so they are formatted here and handed to MicroPrintf
// as one string: no stdio, and no dependence on VMicroPrintf, which older
// TFLM trees (e.g. the Arduino library Chirale_TensorFlowLite) lack.
void Report(void* context, const char* format, ...) {
  (void)context;
  char buffer[160];
  size_t pos = 0;
  va_list args;
  va_start(args, format);
  for (const char* f = format; *f != '\0' && pos + 1 < sizeof(buffer); ++f) {
    if (f[0] == '%' && f[1] == 'd') {
      const int value = va_arg(args, int);
      char digits[12];
      int n = 0;
      unsigned int magnitude = value < 0 ? 0u - static_cast<unsigned int>(value) : static_cast<unsigned int>(value);
      do {
        digits[n++] = static_cast<char>('0' + magnitude % 10u);
        magnitude /= 10u;
      } while (magnitude != 0u);
      if (value < 0) digits[n++] = '-';
      while (n > 0 && pos + 1 < sizeof(buffer)) buffer[pos++] = digits[--n];
      ++f;
    } else if (f[0] == '%' && f[1] == 's') {
      const char* text = va_arg(args, const char*);
      Append(buffer, sizeof(buffer), &pos, text != nullptr ? text : "(null)");
      ++f;
    } else if (f[0] == '%' && f[1] == '%') {
      buffer[pos++] = '%';
      ++f;
    } else {
      buffer[pos++] = *f;
    }
  }
  va_end(args);
  buffer[pos] = '\0';
  MicroPrintf("%s", buffer);
}

KpTensorType TypeOf(TfLiteType type) {
  return type == kTfLiteInt8 ? kKpTypeInt8 : (type == kTfLiteInt32 ? kKpTypeInt32 : kKpTypeOther);
}

// Hands the core one constant op input at a time (a temp tensor, released
// before the next one is taken and at the end of Prepare).
struct ConstInputs {
  tflite::MicroContext* micro_context;
  TfLiteNode* node;
  TfLiteTensor* held;
};

void Release(ConstInputs* inputs) {
  if (inputs->held != nullptr) {
    inputs->micro_context->DeallocateTempTfLiteTensor(inputs->held);
    inputs->held = nullptr;
  }
}

KpStatus GetConst(void* context, int32_t index, KpConstTensor* out) {
  ConstInputs* inputs = static_cast<ConstInputs*>(context);
  Release(inputs);
  TfLiteTensor* tensor = inputs->micro_context->AllocateTempInputTensor(inputs->node, index);
  if (tensor == nullptr) return kKpError;
  inputs->held = tensor;
  out->type = TypeOf(tensor->type);
  out->num_dims = tensor->dims->size;
  for (int i = 0; i < 4; ++i) out->dims[i] = i < tensor->dims->size ? tensor->dims->data[i] : 0;
  out->num_scales = 0;
  out->scales = nullptr;
  if (tensor->quantization.type == kTfLiteAffineQuantization &&
      tensor->quantization.params != nullptr) {
    const TfLiteAffineQuantization* q =
        static_cast<const TfLiteAffineQuantization*>(tensor->quantization.params);
    if (q->scale != nullptr) {
      out->num_scales = q->scale->size;
      out->scales = q->scale->data;
    }
  }
  return kKpOk;
}

// Checks op input 0 / output 0 against stage tensor 0 / L (a stage ending
// with a MEAN may also have the output [1, C], TFLite's MEAN without keep_dims;
// the core decides from the dims passed here).
KpStatus CheckIo(const KpStage& stage, bool is_output, const TfLiteTensor* tensor,
                 const KpReporter& reporter) {
  int32_t dims[4] = {0, 0, 0, 0};
  for (int i = 0; i < 4 && i < tensor->dims->size; ++i) dims[i] = tensor->dims->data[i];
  return KpCheckStageIo(stage, is_output, TypeOf(tensor->type), tensor->dims->size, dims,
                        tensor->params.scale, tensor->params.zero_point, reporter);
}

void* Init(TfLiteContext* context, const char* buffer, size_t length) {
  TFLITE_DCHECK(context->AllocatePersistentBuffer != nullptr);
  OpData* data =
      static_cast<OpData*>(context->AllocatePersistentBuffer(context, sizeof(OpData)));
  if (data == nullptr) return nullptr;
  data->options = reinterpret_cast<const uint8_t*>(buffer);
  data->options_size = buffer != nullptr ? length : 0;
  data->stage = nullptr;
  data->input_data = nullptr;
  data->num_inputs = 0;
  data->arena_index = -1;
  data->context_index = -1;
  return data;
}

TfLiteStatus Prepare(TfLiteContext* context, TfLiteNode* node) {
  TF_LITE_ENSURE(context, node->user_data != nullptr);
  OpData* data = static_cast<OpData*>(node->user_data);
  const KpReporter reporter = {Report, nullptr};
  TF_LITE_ENSURE_EQ(context, tflite::NumOutputs(node), 1);
  const int num_inputs = tflite::NumInputs(node);
  TF_LITE_ENSURE(context, num_inputs >= 1);

  KpOptionsView view;
  TF_LITE_ENSURE(context,
                 KpParseOptions(data->options, data->options_size, reporter, &view) == kKpOk);
  TF_LITE_ENSURE(context, KpValidateOptions(view, num_inputs, reporter) == kKpOk);
  const size_t bytes = KpPersistentBytes(view);
  void* buffer = context->AllocatePersistentBuffer(context, bytes);
  TF_LITE_ENSURE(context, buffer != nullptr);

  tflite::MicroContext* micro_context = tflite::GetMicroContext(context);
  ConstInputs inputs = {micro_context, node, nullptr};
  const KpStatus prepared = KpPrepareStage(view, num_inputs, GetConst, &inputs, buffer, bytes,
                                           reporter, &data->stage);
  Release(&inputs);
  TF_LITE_ENSURE(context, prepared == kKpOk);

  TfLiteTensor* input = micro_context->AllocateTempInputTensor(node, kInputTensor);
  TF_LITE_ENSURE(context, input != nullptr);
  const KpStatus input_ok = CheckIo(*data->stage, false, input, reporter);
  micro_context->DeallocateTempTfLiteTensor(input);
  TF_LITE_ENSURE(context, input_ok == kKpOk);
  TfLiteTensor* output = micro_context->AllocateTempOutputTensor(node, kOutputTensor);
  TF_LITE_ENSURE(context, output != nullptr);
  const KpStatus output_ok = CheckIo(*data->stage, true, output, reporter);
  micro_context->DeallocateTempTfLiteTensor(output);
  TF_LITE_ENSURE(context, output_ok == kKpOk);

  data->num_inputs = num_inputs;
  data->input_data = static_cast<const void**>(
      context->AllocatePersistentBuffer(context, sizeof(const void*) * num_inputs));
  TF_LITE_ENSURE(context, data->input_data != nullptr);
  // The scratch buffers, in the order KpStageBuffers defines (docs "Scratch buffers").
  data->arena_index = -1;
  data->context_index = -1;
  KpStageBuffer buffers[kKpMaxStageBuffers];
  const int32_t num_buffers = KpStageBuffers(*data->stage, KpCmsisEnabled(), buffers);
  for (int32_t i = 0; i < num_buffers; ++i) {
    int* index = buffers[i].kind == kKpBufferPatchArena ? &data->arena_index : &data->context_index;
    TF_LITE_ENSURE_STATUS(context->RequestScratchBufferInArena(context, buffers[i].bytes, index));
  }
  return kTfLiteOk;
}

TfLiteStatus Eval(TfLiteContext* context, TfLiteNode* node) {
  TFLITE_DCHECK(node->user_data != nullptr);
  OpData* data = static_cast<OpData*>(node->user_data);
  const TfLiteEvalTensor* input = tflite::micro::GetEvalInput(context, node, kInputTensor);
  TfLiteEvalTensor* output = tflite::micro::GetEvalOutput(context, node, kOutputTensor);
  TF_LITE_ENSURE(context, input != nullptr && output != nullptr);
  data->input_data[0] = nullptr;  // the stage input is passed separately
  for (int i = 1; i < data->num_inputs; ++i) {
    const TfLiteEvalTensor* tensor = tflite::micro::GetEvalInput(context, node, i);
    data->input_data[i] = tensor != nullptr ? tensor->data.data : nullptr;
  }
  uint8_t* arena = nullptr;
  if (data->arena_index >= 0) {
    arena = static_cast<uint8_t*>(context->GetScratchBuffer(context, data->arena_index));
    TF_LITE_ENSURE(context, arena != nullptr);
  }
  uint8_t* cmsis_context = nullptr;
  if (data->context_index >= 0) {
    cmsis_context = static_cast<uint8_t*>(context->GetScratchBuffer(context, data->context_index));
    TF_LITE_ENSURE(context, cmsis_context != nullptr);
  }
  const KpReporter reporter = {Report, nullptr};
  TF_LITE_ENSURE(context, KpEvalStage(data->stage, tflite::micro::GetTensorData<int8_t>(input),
                                      tflite::micro::GetTensorData<int8_t>(output),
                                      data->input_data, arena, cmsis_context, reporter) == kKpOk);
  return kTfLiteOk;
}

}  // namespace

KpRegistration* Register_KP_PATCH_STAGE() {
  static KpRegistration registration = tflite::micro::RegisterOp(Init, Prepare, Eval);
  return &registration;
}

}  // namespace keras_patch
