"""`keras-patch export-arduino`: a ready Arduino sketch for a patched model.

`export_sketch(model, out_dir, board)` writes

    out_dir/<name>.ino     the sketch: MicroMutableOpResolver<N> with exactly
                           the model's builtin ops + keras_patch::AddKerasPatchOps,
                           a tensor arena sized by `keras_patch.arduino.arena`,
                           one inference per second on a constant test input
    out_dir/model_data.h   extern const unsigned char g_model[]; g_model_len
    out_dir/model_data.cc  the model bytes, 16-byte aligned, const (in flash)

where `<name>` is the folder's name (the Arduino IDE wants the `.ino` named
like its folder). Before writing anything it checks the board's budget
(`keras_patch.arduino.boards`): the arena against the RAM left next to the
board core, the model plus an estimate of the code against the flash left
next to the core; if either does not fit it raises `BoardBudgetError`,
naming the board, what is needed and the budget. Files are written in a
temporary folder next to `out_dir` and moved into place at the end, so an
error leaves no half-written folder.

Example:

>>> from keras_patch.arduino.sketch import export_sketch
>>> result = export_sketch("residual_patched.tflite", "ResidualPatched", "nano33ble")  # doctest: +SKIP
>>> result.arena.total_bytes, result.flash.total_bytes  # doctest: +SKIP
(32848, 237568)
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from typing import Optional

from keras_patch._version import __version__
from keras_patch.arduino.arena import ArenaEstimate, estimate_arena
from keras_patch.arduino.boards import Board, get_board
from keras_patch.arduino.library import TFLM_LIBRARY, TFLM_LIBRARY_HEADER
from keras_patch.arduino.resolver import ResolverPlan, resolver_calls
from keras_patch.errors import KerasPatchError
from keras_patch.tflite_model import ModelSource, TFLiteModel, read_model_bytes

#: Flash estimate of the code a sketch adds on top of the board core:
#: TFLM's interpreter, allocator, planner and flatbuffer parsing; each
#: builtin kernel; the KP_PATCH_STAGE kernel. Measured by hand (.text +
#: .rodata in the linker map) on a generated sketch linked with
#: --gc-sections against TFLM 90b983c2b built for Cortex-M4F with CMSIS-NN
#: (-O2): runtime 58 kB; 5 builtin kernels (CONV_2D, DEPTHWISE_CONV_2D,
#: ADD, MEAN, FULLY_CONNECTED) 90 kB with their CMSIS-NN code, i.e. 18 kB
#: each on average; KP_PATCH_STAGE 26 kB. Rounded up.
TFLM_RUNTIME_FLASH_BYTES = 64 * 1024
FLASH_PER_BUILTIN_OP_BYTES = 20 * 1024
KP_KERNEL_FLASH_BYTES = 28 * 1024

_SKETCH_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$")


class BoardBudgetError(KerasPatchError):
    """The model does not fit the board (arena or flash); the message says by how much."""


@dataclass
class FlashEstimate:
    """Flash the sketch needs on top of the board core."""

    model_bytes: int
    code_bytes: int

    @property
    def total_bytes(self) -> int:
        return self.model_bytes + self.code_bytes

    def explain(self) -> str:
        return (f"flash {self.total_bytes:,} B = model {self.model_bytes:,} B + code estimate "
                f"{self.code_bytes:,} B (TFLM runtime + kernels)")


@dataclass
class SketchResult:
    """What `export_sketch` wrote and the numbers behind it."""

    out_dir: str
    ino_path: str
    board: Board
    arena: ArenaEstimate
    flash: FlashEstimate
    resolver: ResolverPlan


def flash_estimate(model_bytes: int, plan: ResolverPlan) -> FlashEstimate:
    """Model bytes + the code estimate for the ops in `plan`."""
    code = (TFLM_RUNTIME_FLASH_BYTES + FLASH_PER_BUILTIN_OP_BYTES * len(plan.builtin_methods)
            + (KP_KERNEL_FLASH_BYTES if plan.custom_ops else 0))
    return FlashEstimate(model_bytes=model_bytes, code_bytes=code)


def check_budget(board: Board, arena: ArenaEstimate, flash: FlashEstimate) -> None:
    """Raises `BoardBudgetError` when the arena or the flash do not fit `board`."""
    problems = []
    if arena.total_bytes > board.arena_budget_bytes:
        problems.append(
            f"the tensor arena needs {arena.total_bytes:,} B but only {board.arena_budget_bytes:,} B of RAM "
            f"are left ({board.ram_bytes:,} B for the sketch minus about {board.core_ram_bytes:,} B for "
            f"the board core); try a finer grid or an earlier split"
        )
    if flash.total_bytes > board.model_flash_budget_bytes:
        problems.append(
            f"model + code need {flash.total_bytes:,} B of flash (model {flash.model_bytes:,} B, code about "
            f"{flash.code_bytes:,} B) but only {board.model_flash_budget_bytes:,} B are left "
            f"({board.flash_bytes:,} B for the sketch minus about {board.core_flash_bytes:,} B for the board core)"
        )
    if problems:
        raise BoardBudgetError(f"the model does not fit the {board.name} ({board.key}): " + "; ".join(problems) + ".")


def _c_bytes(data: bytes, per_line: int = 16) -> str:
    lines = []
    for i in range(0, len(data), per_line):
        lines.append("    " + ", ".join(f"0x{b:02x}" for b in data[i:i + per_line]) + ",")
    return "\n".join(lines)


def model_data_header() -> str:
    """Text of `model_data.h`."""
    return """// GENERATED by keras-patch export-arduino. Do not edit.
#ifndef KERAS_PATCH_MODEL_DATA_H_
#define KERAS_PATCH_MODEL_DATA_H_

// The .tflite model, 16-byte aligned, const: it stays in flash.
extern const unsigned char g_model[];
extern const unsigned int g_model_len;

#endif  // KERAS_PATCH_MODEL_DATA_H_
"""


def model_data_source(data: bytes, label: str) -> str:
    """Text of `model_data.cc` holding `data`."""
    return f"""// GENERATED by keras-patch export-arduino from {label}. Do not edit.
#include "model_data.h"

alignas(16) const unsigned char g_model[] = {{
{_c_bytes(data)}
}};
const unsigned int g_model_len = {len(data)};
"""


def sketch_source(name: str, board: Board, model: TFLiteModel, label: str, model_len: int,
                  plan: ResolverPlan, arena: ArenaEstimate) -> str:
    """Text of `<name>.ino`."""
    explain = "\n".join("//   " + line for line in arena.explain().splitlines())
    adds = [f"      resolver.{m}() != kTfLiteOk ||  // {op}"
            for m, op in zip(plan.builtin_methods, plan.builtin_ops)]
    adds.append("      keras_patch::AddKerasPatchOps(resolver) != kTfLiteOk) {  // "
                + (", ".join(plan.custom_ops) if plan.custom_ops else "none used; harmless"))
    inp = model.tensor(model.inputs[0])
    out = model.tensor(model.outputs[0])
    return f"""// {name}.ino: GENERATED by keras-patch {__version__} export-arduino for the {board.name}
// ({board.fqbn}). Model: {label}, {model_len:,} B, input {inp.shape} {model.tensor_type_name(model.inputs[0])},
// output {out.shape} {model.tensor_type_name(model.outputs[0])}.
//
// Needs the Arduino libraries KerasPatch and {TFLM_LIBRARY}.
// It runs one inference per second on a constant test input (every input
// value at the input's zero point; put your sensor data there) and prints
// the time and the first outputs on Serial (115200 baud).
//
// Arena, as derived by keras-patch (keras_patch.arduino.arena):
{explain}
// The sketch prints what TFLM really used (arena_used_bytes) after AllocateTensors.
#include <{TFLM_LIBRARY_HEADER}>
#include <KerasPatch.h>

#include <string.h>

#include "tensorflow/lite/micro/micro_interpreter.h"
#include "tensorflow/lite/micro/micro_mutable_op_resolver.h"
#include "tensorflow/lite/schema/schema_generated.h"

#include "model_data.h"

namespace {{

constexpr size_t kTensorArenaSize = {arena.total_bytes};
alignas(16) uint8_t tensor_arena[kTensorArenaSize];

// {len(plan.builtin_methods)} builtin op(s) + the keras-patch op(s) AddKerasPatchOps registers.
constexpr unsigned int kNumOps = {plan.num_slots};
tflite::MicroMutableOpResolver<kNumOps> resolver;
tflite::MicroInterpreter* interpreter = nullptr;

void Halt(const char* message) {{
  Serial.println(message);
  while (true) {{
    delay(1000);
  }}
}}

}}  // namespace

void setup() {{
  Serial.begin(115200);
  while (!Serial && millis() < 4000) {{
  }}
  Serial.println("{name}: keras-patch {__version__}, KP_PATCH_STAGE");

  const tflite::Model* model = tflite::GetModel(g_model);
  if (model->version() != TFLITE_SCHEMA_VERSION) {{
    Halt("model schema version differs from the TFLM library's");
  }}
  if (
{chr(10).join(adds)}
    Halt("could not register the model's ops (resolver full?)");
  }}

  static tflite::MicroInterpreter static_interpreter(model, resolver, tensor_arena, kTensorArenaSize);
  interpreter = &static_interpreter;
  if (interpreter->AllocateTensors() != kTfLiteOk) {{
    Halt("AllocateTensors() failed: the tensor arena is too small or an op is missing");
  }}
  Serial.print("tensor arena: used ");
  Serial.print((unsigned long)interpreter->arena_used_bytes());
  Serial.print(" of ");
  Serial.print((unsigned long)kTensorArenaSize);
  Serial.println(" bytes");
}}

void loop() {{
  TfLiteTensor* input = interpreter->input(0);
  if (input->type == kTfLiteInt8) {{
    memset(input->data.int8, input->params.zero_point, input->bytes);
  }} else {{
    memset(input->data.raw, 0, input->bytes);
  }}

  const unsigned long start = micros();
  const TfLiteStatus status = interpreter->Invoke();
  const unsigned long elapsed = micros() - start;
  if (status != kTfLiteOk) {{
    Halt("Invoke() failed");
  }}

  TfLiteTensor* output = interpreter->output(0);
  Serial.print("inference: ");
  Serial.print(elapsed);
  Serial.print(" us; output");
  const size_t count = output->type == kTfLiteInt8 ? output->bytes : 0;
  for (size_t i = 0; i < count && i < 16; ++i) {{
    Serial.print(' ');
    Serial.print((int)output->data.int8[i]);
  }}
  Serial.println();
  delay(1000);
}}
"""


def _check_sketch_name(name: str) -> None:
    if not _SKETCH_NAME_RE.match(name):
        raise KerasPatchError(
            f"--out: the folder name '{name}' is not a valid Arduino sketch name (letters, digits, "
            "'_', '-', '.', starting with a letter or digit, at most 63 characters)."
        )


def export_sketch(
    tflite_bytes: ModelSource,
    out_dir: str,
    board: str = "nano33ble",
    arena_bytes: Optional[int] = None,
    tail_bytes: Optional[int] = None,
    overwrite: bool = False,
) -> SketchResult:
    """Writes an Arduino sketch folder for a (patched) int8 `.tflite` model.

    Args:
        tflite_bytes: the model (bytes or path).
        out_dir: the sketch folder to create; its name names the sketch.
        board: a key of `keras_patch.arduino.boards.BOARDS`.
        arena_bytes: use this arena instead of the estimate (still checked
            against the board).
        tail_bytes: TFLM persistent bytes to assume instead of measuring the
            unpatched model with the tflite-micro wheel.
        overwrite: replace an existing non-empty `out_dir`.

    Returns:
        A `SketchResult`.

    Raises:
        BoardBudgetError: arena or flash do not fit the board.
        UnsupportedModelError: an op TFLM's resolver cannot register.
        KerasPatchError: bad board, sketch name, or an existing folder.
    """
    target = get_board(board)
    data = read_model_bytes(tflite_bytes)
    label = os.path.basename(tflite_bytes) if isinstance(tflite_bytes, str) else "model bytes"
    out_dir = os.path.abspath(os.fspath(out_dir))
    name = os.path.basename(out_dir.rstrip(os.sep))
    _check_sketch_name(name)
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise KerasPatchError(f"--out: '{out_dir}' exists and is not a folder.")
    if os.path.isdir(out_dir) and os.listdir(out_dir) and not overwrite:
        raise KerasPatchError(f"--out: '{out_dir}' exists and is not empty (use --force to replace it).")

    model = TFLiteModel.from_bytes(data)
    plan = resolver_calls(data)
    arena = estimate_arena(data, tail_bytes=tail_bytes)
    if arena_bytes is not None:
        if arena_bytes <= 0:
            raise KerasPatchError(f"--arena-bytes must be positive, got {arena_bytes}.")
        arena.total_bytes = (int(arena_bytes) + 15) // 16 * 16
        arena.tail_source += f"; arena set to {arena.total_bytes:,} B by --arena-bytes"
    flash = flash_estimate(len(data), plan)
    check_budget(target, arena, flash)

    files = {
        f"{name}.ino": sketch_source(name, target, model, label, len(data), plan, arena),
        "model_data.h": model_data_header(),
        "model_data.cc": model_data_source(data, label),
    }
    parent = os.path.dirname(out_dir)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{name}.kp-", dir=parent)
    try:
        for rel, text in files.items():
            with open(os.path.join(tmp, rel), "w", encoding="utf-8") as f:
                f.write(text)
        os.chmod(tmp, 0o755)
        if os.path.isdir(out_dir):
            old = tempfile.mkdtemp(prefix=f".{name}.kp-old-", dir=parent)
            os.rmdir(old)
            os.replace(out_dir, old)
            os.replace(tmp, out_dir)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return SketchResult(out_dir=out_dir, ino_path=os.path.join(out_dir, f"{name}.ino"), board=target,
                        arena=arena, flash=flash, resolver=plan)
