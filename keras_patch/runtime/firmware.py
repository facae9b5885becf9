"""Running a KP_PATCH_STAGE op of a real model on an emulated Cortex-M4.

`stage_vectors_header` turns one stage of a patched `.tflite` into a C
header (`stage_vectors.h`): the op's options bytes, its constant inputs
(filters, biases, per-channel scales), an int8 input and the output the
reference executor computes for it. `run_stage_firmware` builds the test
firmware in `tflm_ops/firmware/` around the portable C++ core with Debian's
`arm-none-eabi-gcc` (Cortex-M4F, hard float) and runs it in
`qemu-system-arm -M mps2-an386` with `-icount shift=0`, where the board's
25 MHz timer ticks once every 40 instructions: instruction counts are
repeatable to the tick.

A model may hold several stages, anywhere in the network: `stage_inputs`
computes each stage's int8 input from a model input (running the model on
the host), and `run_model_firmware` runs every stage of a model on the
emulated Cortex-M4, one firmware build per stage.

Example:

>>> from keras_patch.runtime.firmware import run_stage_firmware, stage_vectors_header
>>> header = stage_vectors_header(patched_bytes, x)  # doctest: +SKIP
>>> result = run_stage_firmware(header, "/tmp/fw")  # doctest: +SKIP
>>> result.ok, result.instructions  # doctest: +SKIP
(True, 41234520)
>>> [r.ok for r in run_model_firmware(patched_bytes, x, "/tmp/fw")]  # doctest: +SKIP
[True, True, True]
"""

from __future__ import annotations

import dataclasses
import functools
import os
import re
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from typing import List, Optional, Sequence

import numpy as np

from keras_patch.errors import KerasPatchError
from keras_patch.grid import check_grid
from keras_patch.stage import options as o
from keras_patch.stage.executor import prepare_stage, run_stage
from keras_patch.graph.patchify import find_stages, stage_constants, stage_options
from keras_patch.graph.tflite_model import ModelSource, TFLiteModel, read_model_bytes

#: QEMU's mps2-an386 timers run at 25 MHz; with -icount shift=0 one
#: instruction takes 1 ns, so one tick is 40 instructions.
INSTRUCTIONS_PER_TICK = 40
TOOLS = ("arm-none-eabi-gcc", "arm-none-eabi-g++", "qemu-system-arm", "make")

#: As `make -C tflm_ops/firmware run` runs it: the firmware's main() return
#: value becomes QEMU's exit status.
QEMU_ARGS = ("-M", "mps2-an386", "-nographic", "-monitor", "none", "-icount", "shift=0",
             "-semihosting-config", "enable=on,target=native")
_RESULT_RE = re.compile(r"KP_RESULT status=(\w+)(.*)")


@dataclass
class FirmwareResult:
    """What the firmware printed (`KP_RESULT ...`) and its exit status."""

    returncode: int
    output: str
    status: str  # "ok", "mismatch" or "error"
    fields: dict

    @property
    def ok(self) -> bool:
        return self.returncode == 0 and self.status == "ok"

    @property
    def instructions(self) -> int:
        """Instructions of one Eval (timer ticks x 40)."""
        return int(self.fields["ticks"]) * INSTRUCTIONS_PER_TICK


#: The one line to install every system package the firmware needs.
INSTALL_HINT = ("apt-get install gcc-arm-none-eabi libnewlib-arm-none-eabi "
                "libstdc++-arm-none-eabi-newlib qemu-system-arm make")


def missing_tools() -> list:
    """The cross-compiler/emulator programs not on PATH (empty: all there)."""
    return [tool for tool in TOOLS if shutil.which(tool) is None]


@functools.lru_cache(maxsize=None)
def toolchain_problem(need_emulator: bool = True) -> Optional[str]:
    """Why the Cortex-M firmware cannot be built (and run) here, or None.

    Programs on PATH are not enough: `gcc-arm-none-eabi` installed without
    its recommended `libstdc++-arm-none-eabi-newlib` compiles C but has no
    C++ headers nor `-lstdc++`. So this compiles and links a small C++
    program with the firmware Makefile's own flags (`make toolchain-check`)
    and reports the compiler's first error. The answer is cached.

    Args:
        need_emulator: also require `qemu-system-arm` (False for tests that
            only cross-compile).

    Returns:
        None when the toolchain works, else a one-line reason with the
        `apt-get install` line that fixes it.
    """
    tools = [t for t in missing_tools() if need_emulator or t != "qemu-system-arm"]
    if tools:
        return f"missing {', '.join(tools)}; install them with: {INSTALL_HINT}"
    try:
        source = firmware_source_dir()
    except KerasPatchError as e:
        return str(e)
    with tempfile.TemporaryDirectory(prefix="kp_toolchain_") as build:
        try:
            run = subprocess.run(["make", "-s", "-C", source, f"BUILD={build}", "toolchain-check"],
                                 capture_output=True, text=True, timeout=120)
        except subprocess.TimeoutExpired:
            return "the Cortex-M toolchain probe (make toolchain-check) took over 120 s"
    if run.returncode == 0:
        return None
    errors = [line.strip() for line in (run.stderr + run.stdout).splitlines()
              if not line.startswith("make") and ("error" in line.lower() or "cannot find" in line)]
    first = (errors[0] if errors else (run.stderr or run.stdout).strip()[-300:]).replace(build + os.sep, "")
    return (f"the Cortex-M toolchain cannot compile and link a C++ program ({first}); "
            f"install the missing parts with: {INSTALL_HINT}")


def firmware_source_dir() -> str:
    """`tflm_ops/firmware` of the keras-patch source checkout.

    Looked for next to the imported package (an editable install or a
    checkout on `sys.path`), then in the working directory (a checkout whose
    package was `pip install`ed).
    """
    package_root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    for root in (package_root, os.getcwd()):
        path = os.path.join(root, "tflm_ops", "firmware")
        if os.path.isfile(os.path.join(path, "Makefile")):
            return path
    raise KerasPatchError(
        f"No tflm_ops/firmware/Makefile next to the keras_patch package ({package_root}) or in "
        f"the working directory ({os.getcwd()}): the firmware is built from a source checkout of "
        "keras-patch; run from its root."
    )


def _c_array(name: str, ctype: str, values, per_line: int = 24) -> str:
    flat = [str(int(v)) if ctype != "float" else repr(float(v)) + "f" for v in np.asarray(values).reshape(-1)]
    lines = [", ".join(flat[i:i + per_line]) for i in range(0, len(flat), per_line)] or [""]
    body = ",\n    ".join(lines)
    return f"alignas(16) static const {ctype} {name}[] = {{\n    {body}}};\n"


def stage_vectors_header(
    tflite_bytes: ModelSource,
    input_image: np.ndarray,
    stage_index: int = 0,
    grid: Optional[Sequence[int]] = None,
) -> str:
    """The C header `tflm_ops/firmware/stage_test.cc` runs.

    Args:
        tflite_bytes: a patched model.
        input_image: the stage's int8 input, shape (1, H, W, C) or (H, W, C)
            (for a stage that does not start at the model input,
            `stage_inputs` computes it from a model input).
        stage_index: which KP_PATCH_STAGE op (in execution order).
        grid: run with this grid instead of the model's (`(1, 1)` runs the
            stage's layers one after the other on whole tensors: the
            layer-by-layer baseline).

    Returns:
        The header's text; its expected output is the reference executor's.

    Raises:
        KerasPatchError: no such stage, or `input_image` is not shaped like
            the stage's input.
    """
    model = TFLiteModel.from_bytes(read_model_bytes(tflite_bytes))
    stages = find_stages(model)
    if not 0 <= stage_index < len(stages):
        raise KerasPatchError(f"stage_index {stage_index}: the model has {len(stages)} KP_PATCH_STAGE op(s).")
    op = stages[stage_index]
    opts = stage_options(model, op)
    shape = np.shape(input_image)
    if tuple(shape) not in ((1, *opts.input_shape), tuple(opts.input_shape)):
        raise KerasPatchError(
            f"input_image has shape {tuple(shape)}; stage {stage_index} ({model.op_label(op)}) takes "
            f"(1, {', '.join(map(str, opts.input_shape))}), the int8 tensor "
            f"'{model.tensor(model.op_inputs(op)[0]).name}': stage_inputs(model, x) computes it from a model input."
        )
    if grid is not None:
        opts = dataclasses.replace(opts, grid=check_grid(grid))
    constants = stage_constants(model, op)
    label = model.op_label(op)
    return stage_vectors_header_from_options(opts, constants, input_image, label)


def stage_vectors_header_from_options(opts: o.StageOptions, constants: Sequence, input_image: np.ndarray,
                                      label: str = "", aliased: bool = False) -> str:
    """`stage_vectors_header` for a stage given as options and op inputs.

    Args:
        opts: the stage's `StageOptions`.
        constants: op inputs as `ConstantTensor`s (entry 0 is not read).
        input_image: the stage's int8 input, shape (1, H, W, C) or (H, W, C).
        label: a comment line for the header.
        aliased: the firmware passes one buffer as input and output (a
            one-layer in-place stage, docs/patch_stage_op.md "In place");
            the expected output is the stage's own output either way.
    """
    if aliased:
        from keras_patch.arena.aliases import in_place_stage

        if not in_place_stage(opts):
            raise KerasPatchError("aliased=True needs a one-layer in-place DEPTHWISE_CONV_2D stage.")
    x = np.asarray(input_image, np.int8).reshape((1, *opts.input_shape))
    expected = run_stage(prepare_stage(opts, constants), x)
    parts = [
        "// Generated by keras_patch.runtime.firmware.stage_vectors_header; do not edit.\n",
        "#ifndef KP_STAGE_VECTORS_H_\n#define KP_STAGE_VECTORS_H_\n",
        "#include <stdint.h>\n#include \"patch_stage_c_api.h\"\n\n",
        f"// {label or 'stage'}, grid {opts.grid[0]}x{opts.grid[1]}, {opts.num_layers} layers\n",
        "#define KP_STAGE_ALIASED 1\n" if aliased else "",
        _c_array("kOptions", "uint8_t", np.frombuffer(o.encode_options(opts), np.uint8)),
    ]
    entries = ["    {0, 0, {0, 0, 0, 0}, 0, nullptr, nullptr}"]
    for i, c in enumerate(constants[1:], start=1):
        data = np.asarray(c.data)
        type_code = {np.dtype(np.int8): 1, np.dtype(np.int32): 2}.get(data.dtype, 0)
        ctype = {1: "int8_t", 2: "int32_t"}.get(type_code, "uint8_t")
        parts.append(_c_array(f"kConst{i}", ctype, data if type_code else data.view(np.uint8)))
        scales = np.asarray(c.scales, np.float32).reshape(-1)
        scale_ref = "nullptr"
        if scales.size:
            parts.append(_c_array(f"kScales{i}", "float", scales))
            scale_ref = f"kScales{i}"
        dims = list(data.shape) + [0] * (4 - data.ndim)
        entries.append(
            f"    {{{type_code}, {data.ndim}, {{{', '.join(map(str, dims[:4]))}}}, {scales.size}, {scale_ref}, kConst{i}}}"
        )
    parts.append(f"static const int32_t kNumOpInputs = {len(constants)};\n")
    parts.append("static const kp_const_tensor kOpInputs[] = {\n" + ",\n".join(entries) + "};\n")
    parts.append(_c_array("kInput", "int8_t", x))
    parts.append(_c_array("kExpected", "int8_t", expected))
    parts.append("#endif  // KP_STAGE_VECTORS_H_\n")
    return "".join(parts)


def stage_inputs(tflite_bytes: ModelSource, model_input: np.ndarray) -> List[np.ndarray]:
    """The int8 input of every KP_PATCH_STAGE op when the model runs on `model_input`.

    The model runs on the host (`run_tflite`, reference executor) with each
    stage's input tensor added to its outputs.

    Args:
        tflite_bytes: a patched model with one input.
        model_input: one sample for the model's input, with or without the
            batch axis, in the input's dtype (float for a model that starts
            with QUANTIZE).

    Returns:
        One (1, H, W, C) int8 array per stage, in execution order.
    """
    from keras_patch.runtime.host import run_tflite

    model = TFLiteModel.from_bytes(read_model_bytes(tflite_bytes))
    if len(model.inputs) != 1:
        raise KerasPatchError(f"stage_inputs needs a model with one input, this one has {len(model.inputs)}.")
    stages = find_stages(model)
    if not stages:
        return []
    info = model.tensor(model.inputs[0])
    x = np.asarray(model_input)
    if x.ndim == len(info.shape) - 1:
        x = x[np.newaxis]
    if x.ndim != len(info.shape) or x.shape[0] != 1:
        raise KerasPatchError(
            f"model_input has shape {np.shape(model_input)}; the model's input '{info.name}' is "
            f"{tuple(info.shape)}: give one sample."
        )
    tensors = [model.op_inputs(op)[0] for op in stages]
    model.add_outputs(tensors)
    outputs = run_tflite(model.to_bytes(), x.astype(info.dtype, copy=False))
    return [np.asarray(a, np.int8) for a in outputs[len(outputs) - len(tensors):]]


def run_model_firmware(tflite_bytes: ModelSource, model_input: np.ndarray, build_dir: str,
                       grid: Optional[Sequence[int]] = None, timeout: float = 900.0,
                       make_args: Sequence[str] = ()) -> List[FirmwareResult]:
    """Runs every KP_PATCH_STAGE op of a model on the emulated Cortex-M4, each on its own input.

    Each stage's input is what it reads when the model runs on `model_input`
    (`stage_inputs`); the firmware checks the stage's output against the
    reference executor's. The stages are built one after the other in
    `build_dir` (the core's objects are compiled once).

    Args:
        tflite_bytes: a patched model (any number of stages, anywhere).
        model_input: one sample for the model's input (see `stage_inputs`).
        build_dir: where the firmware is built.
        grid: run every stage with this grid instead of its own (`(1, 1)`:
            layer by layer).
        timeout, make_args: as `run_stage_firmware` takes them.

    Returns:
        One `FirmwareResult` per stage, in execution order.

    Raises:
        KerasPatchError: the model has no KP_PATCH_STAGE op, a tool is
            missing or a build failed.
    """
    data = read_model_bytes(tflite_bytes)
    inputs = stage_inputs(data, model_input)
    if not inputs:
        raise KerasPatchError("The model has no KP_PATCH_STAGE op: nothing runs on the firmware.")
    return [run_stage_firmware(stage_vectors_header(data, x, stage_index=k, grid=grid), build_dir,
                               timeout=timeout, make_args=make_args)
            for k, x in enumerate(inputs)]


def run_stage_firmware(header: str, build_dir: str, timeout: float = 900.0,
                       make_args: Sequence[str] = ()) -> FirmwareResult:
    """Builds the firmware with `header` as stage_vectors.h and runs it in QEMU.

    Raises:
        KerasPatchError: a tool is missing or the build failed.
    """
    problem = toolchain_problem()
    if problem:
        raise KerasPatchError(problem)
    source = firmware_source_dir()
    build_dir = os.path.abspath(build_dir)
    os.makedirs(build_dir, exist_ok=True)
    with open(os.path.join(build_dir, "stage_vectors.h"), "w") as f:
        f.write(header)
    make = ["make", "-s", "-C", source, f"BUILD={build_dir}", f"VECTORS_DIR={build_dir}", *make_args]
    built = subprocess.run(make + ["all"], capture_output=True, text=True, timeout=timeout)
    if built.returncode != 0:
        raise KerasPatchError(f"firmware build failed:\n{built.stdout[-4000:]}{built.stderr[-4000:]}")
    elf = os.path.join(build_dir, "stage_test.elf")
    ran = subprocess.run(
        ["qemu-system-arm", *QEMU_ARGS, "-kernel", elf], capture_output=True, text=True, timeout=timeout
    )
    output = ran.stdout + ran.stderr
    match = _RESULT_RE.search(output)
    fields = dict(kv.split("=", 1) for kv in match.group(2).split() if "=" in kv) if match else {}
    return FirmwareResult(
        returncode=ran.returncode,
        output=output,
        status=match.group(1) if match else "error",
        fields=fields,
    )
