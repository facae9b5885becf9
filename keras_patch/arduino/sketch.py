"""`keras-patch export-arduino`: a ready Arduino sketch for a patched model.

`export_sketch(model, out_dir, board)` writes

    out_dir/<name>.ino     the sketch: MicroMutableOpResolver<N> with exactly
                           the model's builtin ops + keras_patch::AddKerasPatchOps,
                           a tensor arena sized by `keras_patch.arduino.arena`,
                           one inference per second on a constant test input
    out_dir/model_data.h   extern const unsigned char g_model[]; g_model_len
    out_dir/model_data.cpp the model bytes, 16-byte aligned, const (in flash);
                           `.cpp`, not `.cc`: arduino-cli compiles `.cc` sketch
                           files only since 2023, older IDEs skip them

where `<name>` is the folder's name (the Arduino IDE wants the `.ino` named
like its folder). Before writing anything it checks the board's budget
(`keras_patch.arduino.boards`): the arena against the RAM left next to the
board core, the model plus an estimate of the code against the flash left
next to the core; if either does not fit it raises `BoardBudgetError`,
naming the board, what is needed and the budget. Files are written in a
temporary folder next to `out_dir` and moved into place at the end, so an
error leaves no half-written folder; a `README.md` already in `out_dir` is
kept. An existing non-empty `out_dir` is replaced only with `overwrite` and
only if keras-patch wrote it (`prepare_sketch_dir`). `keras_patch.arduino.examples` builds the PersonDetection and
MemoryReport sketches from the same pieces.

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
from typing import Dict, Optional, Sequence, Tuple

from keras_patch._version import __version__
from keras_patch.arduino.arena import ArenaEstimate, estimate_arena
from keras_patch.arduino.boards import Board, get_board
from keras_patch.arduino.library import TFLM_LIBRARY, TFLM_LIBRARY_HEADER
from keras_patch.arduino.resolver import ResolverPlan, resolver_calls
from keras_patch.errors import KerasPatchError
from keras_patch.files import new_file_mode, new_folder_mode
from keras_patch.graph.tflite_model import ModelSource, TFLiteModel, read_model_bytes
from keras_patch.planner.guard import check_never_worse

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

#: The one file of an existing sketch folder that regenerating it keeps.
KEPT_FILE = "README.md"

#: The generated model data source. `.cpp`: arduino-cli compiles `.cc` files
#: of a sketch only since 2023 (Arduino IDE 1.x and older CLIs leave them
#: out, and the link fails without g_model).
MODEL_DATA_SOURCE = "model_data.cpp"

_MODEL_COMMENT = "The .tflite model, 16-byte aligned, const: it stays in flash."

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


def check_budget(board: Board, arena: ArenaEstimate, flash: FlashEstimate, extra_ram_bytes: int = 0,
                 extra_ram_what: str = "", arena_what: str = "the tensor arena",
                 arena_advice: str = "try a finer grid or an earlier split") -> None:
    """Raises `BoardBudgetError` when the arena (plus `extra_ram_bytes`, e.g. a
    camera frame buffer, described by `extra_ram_what`) or the flash do not fit `board`.

    `arena_what` names the arena in the message and `arena_advice` says what
    to do when it does not fit."""
    problems = []
    if arena.total_bytes + extra_ram_bytes > board.arena_budget_bytes:
        extra = f" + {extra_ram_what} {extra_ram_bytes:,} B" if extra_ram_bytes else ""
        problems.append(
            f"{arena_what}{extra} needs {arena.total_bytes + extra_ram_bytes:,} B but only "
            f"{board.arena_budget_bytes:,} B of RAM are left ({board.ram_bytes:,} B for the sketch minus "
            f"about {board.core_ram_bytes:,} B for the board core); {arena_advice}"
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


def model_data_header(arrays: Sequence[Tuple[str, str]] = (("g_model", _MODEL_COMMENT),)) -> str:
    """Text of `model_data.h` declaring each `(symbol, comment)` of `arrays`."""
    decls = "\n".join(f"// {comment}\nextern const unsigned char {symbol}[];\nextern const unsigned int {symbol}_len;"
                       for symbol, comment in arrays)
    return f"""// GENERATED by keras-patch export-arduino. Do not edit.
#ifndef KERAS_PATCH_MODEL_DATA_H_
#define KERAS_PATCH_MODEL_DATA_H_

{decls}

#endif  // KERAS_PATCH_MODEL_DATA_H_
"""


def model_data_source(data: bytes, label: str) -> str:
    """Text of `model_data.cpp` holding `data` as `g_model`."""
    return model_data_sources([("g_model", data)], label)


def model_data_sources(arrays: Sequence[Tuple[str, bytes]], label: str) -> str:
    """Text of `model_data.cpp` holding each `(symbol, data)` of `arrays`."""
    defs = "\n".join(f"""alignas(16) const unsigned char {symbol}[] = {{
{_c_bytes(data)}
}};
const unsigned int {symbol}_len = {len(data)};""" for symbol, data in arrays)
    return f"""// GENERATED by keras-patch export-arduino from {label}. Do not edit.
#include "model_data.h"

{defs}
"""


def resolver_registration(plan: ResolverPlan) -> str:
    """The sketch's `if (resolver.AddXxx() != kTfLiteOk || ...) {` lines for `plan`."""
    adds = [f"      resolver.{m}() != kTfLiteOk ||  // {op}"
            for m, op in zip(plan.builtin_methods, plan.builtin_ops)]
    adds.append("      keras_patch::AddKerasPatchOps(resolver) != kTfLiteOk) {  // "
                + (", ".join(plan.custom_ops) if plan.custom_ops else "none used; harmless"))
    return "  if (\n" + "\n".join(adds)


def interpreter_setup(plan: ResolverPlan) -> str:
    """The `setup()` lines that load `g_model`, register `plan`'s ops and allocate the tensor arena."""
    return f"""  const tflite::Model* model = tflite::GetModel(g_model);
  if (model->version() != TFLITE_SCHEMA_VERSION) {{
    Halt("model schema version differs from the TFLM library's");
  }}
{resolver_registration(plan)}
    Halt("could not register the model's ops (resolver full?)");
  }}

  static tflite::MicroInterpreter static_interpreter(model, resolver, tensor_arena, kTensorArenaSize);
  interpreter = &static_interpreter;
  if (interpreter->AllocateTensors() != kTfLiteOk) {{
    Halt("AllocateTensors() failed: the tensor arena is too small or an op is missing");
  }}
"""


# What the sketches print after AllocateTensors().
ARENA_USED_REPORT = """  Serial.print("tensor arena: used ");
  Serial.print((unsigned long)interpreter->arena_used_bytes());
  Serial.print(" of ");
  Serial.print((unsigned long)kTensorArenaSize);
  Serial.println(" bytes");
"""


def model_bytes_from_source(text: str, symbol: str = "g_model") -> bytes:
    """The bytes of array `symbol` in a generated `model_data.cpp` (the inverse
    of `model_data_sources`), e.g. to regenerate a committed example.

    Raises:
        KerasPatchError: no such array, or its length line disagrees.
    """
    match = re.search(r"const unsigned char " + re.escape(symbol) + r"\[\] = \{(.*?)\};", text, re.S)
    length = re.search(r"const unsigned int " + re.escape(symbol) + r"_len = (\d+);", text)
    if match is None or length is None:
        raise KerasPatchError(f"no array '{symbol}' in this model_data.cpp.")
    data = bytes(int(h, 16) for h in re.findall(r"0x([0-9a-f]{2})", match.group(1)))
    if len(data) != int(length.group(1)):
        raise KerasPatchError(f"'{symbol}' holds {len(data)} bytes but {symbol}_len says {length.group(1)}.")
    return data


def sketch_source(name: str, board: Board, model: TFLiteModel, label: str, model_len: int,
                  plan: ResolverPlan, arena: ArenaEstimate) -> str:
    """Text of `<name>.ino`."""
    explain = "\n".join("//   " + line for line in arena.explain().splitlines())
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

{interpreter_setup(plan)}{ARENA_USED_REPORT}}}

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


#: Every file keras-patch writes into a sketch folder starts with a line
#: holding this text; `--force` replaces only folders whose files all do
#: (plus the kept README.md).
GENERATED_MARK = "GENERATED by keras-patch"


def _model_paths(sources: Sequence) -> list:
    return [os.path.realpath(os.fspath(s)) for s in sources if isinstance(s, (str, os.PathLike))]


def foreign_entries(out_dir: str) -> list:
    """What `out_dir` holds that keras-patch did not write (and `--force` would delete).

    Everything but the kept `README.md` and files whose first line carries
    keras-patch's GENERATED mark: subfolders, links, other files.
    """
    foreign = []
    with os.scandir(out_dir) as entries:
        for entry in sorted(entries, key=lambda e: e.name):
            if entry.name == KEPT_FILE and entry.is_file(follow_symlinks=False):
                continue
            if entry.is_file(follow_symlinks=False):
                try:
                    with open(entry.path, "rb") as f:
                        first_line = f.readline(512)
                except OSError:
                    first_line = b""
                if GENERATED_MARK.encode() in first_line:
                    continue
            foreign.append(entry.name + (os.sep if entry.is_dir(follow_symlinks=False) else ""))
    return foreign


def prepare_sketch_dir(out_dir: str, overwrite: bool, keep: Sequence = ()) -> Tuple[str, str]:
    """Checks `out_dir` before anything is computed or written.

    `overwrite` replaces only a folder keras-patch wrote: every file in it
    (but a `README.md`, which is kept) starts with keras-patch's GENERATED
    line. The current folder, a folder holding it or one of the `keep`
    files (the input models), and any other non-empty folder are refused.

    Args:
        out_dir: the sketch folder to create.
        overwrite: replace a non-empty sketch folder keras-patch wrote.
        keep: model sources (paths; bytes are ignored) that must not lie
            inside `out_dir`.

    Returns:
        `(absolute out_dir, sketch name)`.

    Raises:
        KerasPatchError: empty path, invalid sketch name, a file in the way,
            a parent that cannot hold the folder, the current folder or one
            holding a model, a folder keras-patch did not write, or a
            non-empty sketch folder without `overwrite`.
    """
    given = os.fspath(out_dir)
    if not given.strip():
        raise KerasPatchError("--out: the path is empty; name the sketch folder to create (e.g. --out MySketch).")
    out_dir = os.path.abspath(given)
    name = os.path.basename(out_dir.rstrip(os.sep))
    _check_sketch_name(name)
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise KerasPatchError(f"--out: '{given}' exists and is not a folder.")
    ancestor = os.path.dirname(out_dir)
    while not os.path.exists(ancestor):
        ancestor = os.path.dirname(ancestor)
    if not os.path.isdir(ancestor):
        raise KerasPatchError(f"--out: cannot create '{given}': '{ancestor}' is not a folder.")
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise KerasPatchError(f"--out: cannot create '{given}': no permission to write in '{ancestor}'.")
    real = os.path.realpath(out_dir)
    cwd = os.path.realpath(os.getcwd())
    if cwd == real or cwd.startswith(real.rstrip(os.sep) + os.sep):
        raise KerasPatchError(f"--out: '{given}' is the current folder or holds it; keras-patch writes the "
                              "sketch as a new folder: name one (e.g. --out MySketch).")
    for model_path in _model_paths(keep):
        if model_path.startswith(real.rstrip(os.sep) + os.sep):
            raise KerasPatchError(f"--out: '{given}' holds the model '{model_path}'; keras-patch writes the "
                                  "sketch as a new folder: name another one.")
    if os.path.isdir(out_dir) and os.listdir(out_dir):
        foreign = foreign_entries(out_dir)
        if foreign:
            shown = ", ".join(foreign[:5]) + (f" and {len(foreign) - 5} more" if len(foreign) > 5 else "")
            raise KerasPatchError(f"--out: '{given}' is not a sketch folder keras-patch wrote (it holds {shown}); "
                                  "keras-patch replaces only its own folders: name a new one.")
        if not overwrite:
            raise KerasPatchError(f"--out: '{given}' exists and is not empty (use --force to replace it).")
    return out_dir, name


def write_sketch_folder(out_dir: str, files: Dict[str, str]) -> None:
    """Writes `files` (name -> text) as the folder `out_dir`, atomically.

    The files go to a temporary folder next to `out_dir`, which then replaces
    `out_dir`: an error leaves no half-written folder, and an error or an
    interrupt between the two renames of a replacement puts the old folder
    back. A `README.md` already in `out_dir` (never generated: the user's
    notes, or the measured results in the library's examples) is carried over
    unless `files` has one. New files and the folder get the user's umask;
    files and a folder that existed keep their modes.
    """
    name = os.path.basename(out_dir.rstrip(os.sep))
    parent = os.path.dirname(out_dir)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{name}.kp-", dir=parent)
    old = None
    try:
        for rel, text in files.items():
            path = os.path.join(tmp, rel)
            with open(path, "w", encoding="utf-8") as f:
                f.write(text)
            os.chmod(path, new_file_mode(os.path.join(out_dir, rel)))
        readme = os.path.join(out_dir, KEPT_FILE)
        if KEPT_FILE not in files and os.path.isfile(readme):
            shutil.copy2(readme, os.path.join(tmp, KEPT_FILE))
        os.chmod(tmp, new_folder_mode(out_dir))
        if os.path.isdir(out_dir):
            old = tempfile.mkdtemp(prefix=f".{name}.kp-old-", dir=parent)
            os.rmdir(old)
            os.replace(out_dir, old)
            os.replace(tmp, out_dir)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out_dir)
    except BaseException:
        # The old folder moved aside but the new one not in place: put it back.
        if old is not None and os.path.isdir(old):
            if os.path.lexists(out_dir):
                shutil.rmtree(old, ignore_errors=True)
            else:
                os.replace(old, out_dir)
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def model_label(source: ModelSource) -> str:
    """How generated files name a model: its file name, or "model bytes"."""
    return os.path.basename(source) if isinstance(source, str) else "model bytes"


def sized_arena(data: bytes, arena_bytes: Optional[int], tail_bytes: Optional[int]) -> ArenaEstimate:
    """`estimate_arena(data)`, or `arena_bytes` (rounded up to 16) when given."""
    if arena_bytes is not None and arena_bytes <= 0:
        raise KerasPatchError(f"--arena-bytes must be positive, got {arena_bytes}.")
    arena = estimate_arena(data, tail_bytes=tail_bytes)
    if arena_bytes is not None:
        arena.total_bytes = (int(arena_bytes) + 15) // 16 * 16
        arena.tail_source += f"; arena set to {arena.total_bytes:,} B by --arena-bytes"
    return arena


def export_sketch(
    tflite_bytes: ModelSource,
    out_dir: str,
    board: str = "nano33ble",
    arena_bytes: Optional[int] = None,
    tail_bytes: Optional[int] = None,
    overwrite: bool = False,
    allow_worse: bool = False,
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
        overwrite: replace an existing non-empty `out_dir`, if keras-patch
            wrote it (see `prepare_sketch_dir`).
        allow_worse: export a model whose patch stages raise the predicted
            arena head above running it layer by layer (refused by default).

    Returns:
        A `SketchResult`.

    Raises:
        BoardBudgetError: arena or flash do not fit the board.
        WorseThanLayerByLayerError: the patch stages raise the arena head
            (`keras_patch.planner.guard.check_never_worse`), without `allow_worse`.
        UnsupportedModelError: an op TFLM's resolver cannot register.
        KerasPatchError: bad board, sketch name, or an existing folder.
    """
    target = get_board(board)
    data = read_model_bytes(tflite_bytes)
    label = model_label(tflite_bytes)
    out_dir, name = prepare_sketch_dir(out_dir, overwrite, keep=[tflite_bytes])
    check_never_worse(data, allow_worse=allow_worse, kernel="cmsis_nn", what=label, override="--allow-worse")

    model = TFLiteModel.from_bytes(data)
    plan = resolver_calls(data)
    arena = sized_arena(data, arena_bytes, tail_bytes)
    flash = flash_estimate(len(data), plan)
    check_budget(target, arena, flash)

    write_sketch_folder(out_dir, {
        f"{name}.ino": sketch_source(name, target, model, label, len(data), plan, arena),
        "model_data.h": model_data_header(),
        MODEL_DATA_SOURCE: model_data_source(data, label),
    })
    return SketchResult(out_dir=out_dir, ino_path=os.path.join(out_dir, f"{name}.ino"), board=target,
                        arena=arena, flash=flash, resolver=plan)
