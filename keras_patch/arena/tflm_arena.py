"""Measuring a model's TFLM tensor arena with the `tflite_micro` wheel.

`measure_tflm_arena` loads the model into the TFLM Python interpreter (which
uses a `RecordingMicroAllocator`), runs one inference on zero inputs and
parses `PrintAllocations()`:

    [RecordingMicroAllocator] Arena allocation total 4512 bytes
    [RecordingMicroAllocator] Arena allocation head 2720 bytes
    [RecordingMicroAllocator] Arena allocation tail 1792 bytes
    [RecordingMicroAllocator] 'TfLiteEvalTensor data' used 264 bytes with ...

"head" is `SingleArenaBufferAllocator::GetNonPersistentUsedBytes()` (the
planned, non-persistent section), "tail" `GetPersistentUsedBytes()`.

TFLM reports many model errors by aborting the process, so the interpreter
runs in a child process (`sys.executable`); an abort, a failed allocation or
a failed invoke becomes a `TFLMError` carrying the child's output.

Example:

>>> from keras_patch.arena.tflm_arena import measure_tflm_arena
>>> report = measure_tflm_arena(open("model.tflite", "rb").read())  # doctest: +SKIP
>>> report.head_bytes, report.tail_bytes  # doctest: +SKIP
(83200, 14512)
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from typing import List, Optional, Sequence, Union

import numpy as np

from ai_edge_litert import schema_py_generated as schema

from keras_patch.errors import KerasPatchError, UnsupportedModelError
from keras_patch.graph.tflite_model import ModelSource, TFLiteModel, read_model_bytes

#: Arena tried first when `arena_size` is None; doubled on "arena too small".
DEFAULT_ARENA_SIZE = 16 * 1024 * 1024
MAX_ARENA_SIZE = 1024 * 1024 * 1024

#: Custom op codes the wheel's PythonOpsResolver registers.
WHEEL_CUSTOM_OPS = frozenset(
    {
        "CIRCULAR_BUFFER",
        "TFLM_DECODE",
        "TFLite_Detection_PostProcess",
        "SignalDelay",
        "SignalEnergy",
        "SignalFftAutoScale",
        "SignalFilterBank",
        "SignalFilterBankLog",
        "SignalFilterBankSquareRoot",
        "SignalFilterBankSpectralSubtraction",
        "SignalFramer",
        "SignalIrfft",
        "SignalOverlapAdd",
        "SignalPCAN",
        "SignalRfft",
        "SignalStacker",
        "SignalWindow",
    }
)

_TOTAL_RE = re.compile(r"\[RecordingMicroAllocator\] Arena allocation total (\d+) bytes")
_HEAD_RE = re.compile(r"\[RecordingMicroAllocator\] Arena allocation head (\d+) bytes")
_TAIL_RE = re.compile(r"\[RecordingMicroAllocator\] Arena allocation tail (\d+) bytes")
_RECORD_RE = re.compile(
    r"\[RecordingMicroAllocator\] '([^']+)' used (\d+) bytes with alignment overhead "
    r"\(requested (\d+) bytes for (\d+) "
)
_ARENA_TOO_SMALL = (
    "Failed to resize buffer",
    "Failed to allocate tail memory",
    "Failed to allocate temp memory",
    "Failed to allocate memory for memory planning",
)


class TFLMError(RuntimeError):
    """The TFLM interpreter failed (or aborted) on the model.

    Attributes:
        output: everything the child process wrote (stdout and stderr).
        returncode: the child's exit status (negative: killed by a signal,
            e.g. -6 for an abort).
    """

    def __init__(self, message: str, output: str = "", returncode: Optional[int] = None):
        super().__init__(message + (f"\n--- TFLM output ---\n{output.strip()}" if output.strip() else ""))
        self.output = output
        self.returncode = returncode


@dataclass
class TFLMArenaReport:
    """What `RecordingMicroAllocator::PrintAllocations()` reported.

    Attributes:
        head_bytes: "Arena allocation head": the planned, non-persistent part.
        tail_bytes: "Arena allocation tail": the persistent part.
        used_bytes: "Arena allocation total".
        arena_size: the arena the interpreter was given.
        report: the raw text `PrintAllocations()` printed.
        allocations: per-category tail usage, name -> (used bytes,
            requested bytes, count), e.g. 'Persistent buffer data'.
    """

    head_bytes: int
    tail_bytes: int
    used_bytes: int
    arena_size: int
    report: str
    allocations: dict = field(default_factory=dict)


_CHILD = r"""
import json, os, sys, tempfile
import numpy as np
from tflite_micro.python.tflite_micro import runtime

model_path, arena_size, num_inputs = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
with open(model_path, "rb") as f:
    data = f.read()
interpreter = runtime.Interpreter.from_bytes(data, arena_size=arena_size)
for i in range(num_inputs):
    details = interpreter.get_input_details(i)
    interpreter.set_input(np.zeros(tuple(details["shape"]), details["dtype"]), i)
interpreter.invoke()

sys.stdout.flush(); sys.stderr.flush()
with tempfile.TemporaryFile() as capture:
    saved = os.dup(1), os.dup(2)
    os.dup2(capture.fileno(), 1); os.dup2(capture.fileno(), 2)
    try:
        interpreter.print_allocations()
    finally:
        os.dup2(saved[0], 1); os.dup2(saved[1], 2)
        os.close(saved[0]); os.close(saved[1])
    capture.seek(0)
    text = capture.read().decode("utf-8", "replace")
sys.stdout.write("\n@@KP_TFLM_REPORT@@" + json.dumps({"report": text}) + "\n")
sys.stdout.flush()
"""


def measure_tflm_arena(
    tflite_bytes: ModelSource, arena_size: Optional[int] = None, timeout: float = 300.0
) -> TFLMArenaReport:
    """Runs `tflite_bytes` once in TFLM and returns its arena usage.

    Args:
        tflite_bytes: the `.tflite` model (bytes or a path).
        arena_size: tensor arena given to the interpreter.  `None` starts at
            16 MiB and doubles (up to 1 GiB) while TFLM says it is too small.
        timeout: seconds before the child process is killed.

    Returns:
        A `TFLMArenaReport`.

    Raises:
        UnsupportedModelError: the model has custom ops the wheel's op
            resolver does not know (e.g. KP_PATCH_STAGE).
        InvalidModelError: the bytes are not a `.tflite` model.
        TFLMError: TFLM failed to allocate, prepare or invoke the model, or
            aborted the process.

    Example:

    >>> measure_tflm_arena(model_bytes).head_bytes  # doctest: +SKIP
    2720
    """
    data = read_model_bytes(tflite_bytes)
    model = TFLiteModel.from_bytes(data)
    _check_wheel_ops(model)
    num_inputs = len(model.inputs)

    with tempfile.TemporaryDirectory(prefix="kp_tflm_") as tmp:
        path = os.path.join(tmp, "model.tflite")
        with open(path, "wb") as f:
            f.write(data)
        text, size = _run_growing_arena(lambda n: _run_child(path, n, num_inputs, timeout), arena_size)
    return parse_allocation_report(text, arena_size=size)


_RUN_CHILD = _CHILD.replace(
    """for i in range(num_inputs):
    details = interpreter.get_input_details(i)
    interpreter.set_input(np.zeros(tuple(details["shape"]), details["dtype"]), i)
interpreter.invoke()
""",
    """inputs = np.load(sys.argv[4])
arrays = [inputs[f"x{i}"] for i in range(num_inputs)]
step = int(interpreter.get_input_details(0)["shape"][0]) or 1
num_outputs = int(sys.argv[6])
results = [[] for _ in range(num_outputs)]
for n in range(0, arrays[0].shape[0], step):
    for i in range(num_inputs):
        interpreter.set_input(arrays[i][n:n + step], i)
    interpreter.invoke()
    for k in range(num_outputs):
        results[k].append(np.array(interpreter.get_output(k)))
np.savez(sys.argv[5], **{f"y{k}": np.concatenate(r, axis=0) for k, r in enumerate(results)})
""")


@dataclass
class TFLMRun:
    """What `run_tflm` returns.

    Attributes:
        outputs: one array per model output, batched like the inputs.
        arena: the arena the interpreter used (`TFLMArenaReport`).
    """

    outputs: List[np.ndarray]
    arena: TFLMArenaReport


def run_tflm(
    tflite_bytes: ModelSource,
    inputs: Union[np.ndarray, Sequence[np.ndarray]],
    arena_size: Optional[int] = None,
    timeout: float = 300.0,
) -> TFLMRun:
    """Runs `tflite_bytes` in TFLM itself (the `tflite_micro` wheel) on `inputs`.

    Where `keras_patch.run_tflite` runs built-in ops with LiteRT's reference
    kernels, this runs the model in TFLM's `MicroInterpreter` (a child
    process, as `measure_tflm_arena`): the outputs real TFLM computes, and the
    arena it used for them.

    Args:
        tflite_bytes: the `.tflite` model (bytes or a path); no KP_PATCH_STAGE.
        inputs: one array per model input (a single array for one input), each
            with a leading batch of N samples (N a multiple of the model's
            declared batch), of the input's dtype.
        arena_size: as in `measure_tflm_arena`.
        timeout: seconds before the child process is killed.

    Returns:
        A `TFLMRun`: the outputs (one array per model output, N samples) and
        the arena report.

    Raises:
        UnsupportedModelError: custom ops the wheel cannot run.
        KerasPatchError: the inputs do not match the model's.
        TFLMError: TFLM failed or aborted.

    Example:

    >>> run = run_tflm(model_bytes, np.zeros((2, 8, 8, 3), np.int8))  # doctest: +SKIP
    >>> run.outputs[0].shape, run.arena.head_bytes  # doctest: +SKIP
    ((2, 10), 2720)
    """
    data = read_model_bytes(tflite_bytes)
    model = TFLiteModel.from_bytes(data)
    _check_wheel_ops(model)
    arrays = [np.asarray(inputs)] if isinstance(inputs, np.ndarray) else [np.asarray(x) for x in inputs]
    if len(arrays) != len(model.inputs):
        raise KerasPatchError(f"The model has {len(model.inputs)} inputs, got {len(arrays)} arrays.")
    batch = None
    for x, t in zip(arrays, model.inputs):
        info = model.tensor(t)
        step = int(info.shape[0]) if len(info.shape) and int(info.shape[0]) > 0 else 1
        dtype = np.dtype(model.tensor_type_name(t).lower())
        if x.dtype != dtype or x.ndim != len(info.shape) or tuple(x.shape[1:]) != tuple(info.shape[1:]) \
                or x.shape[0] == 0 or x.shape[0] % step or (batch is not None and x.shape[0] != batch):
            raise KerasPatchError(
                f"Input '{info.name}' must be {dtype.name} of shape (N, *{tuple(info.shape[1:])}) with N a "
                f"multiple of {step} (the same N for every input), got {x.dtype} {x.shape}."
            )
        batch = x.shape[0]
    with tempfile.TemporaryDirectory(prefix="kp_tflm_") as tmp:
        path, x_path, y_path = (os.path.join(tmp, n) for n in ("model.tflite", "x.npz", "y.npz"))
        with open(path, "wb") as f:
            f.write(data)
        np.savez(x_path, **{f"x{i}": x for i, x in enumerate(arrays)})
        extra = (x_path, y_path, str(len(model.outputs)))
        text, size = _run_growing_arena(
            lambda n: _run_child(path, n, len(model.inputs), timeout, code=_RUN_CHILD, extra_args=extra), arena_size)
        with np.load(y_path) as y:
            outputs = [y[f"y{k}"] for k in range(len(model.outputs))]
    return TFLMRun(outputs=outputs, arena=parse_allocation_report(text, arena_size=size))


def _run_growing_arena(run, arena_size: Optional[int]) -> tuple:
    """(output, arena size) of `run(arena size)`: from `arena_size`, or from `DEFAULT_ARENA_SIZE`
    doubled while TFLM says the arena is too small (up to `MAX_ARENA_SIZE`)."""
    size = int(arena_size) if arena_size is not None else DEFAULT_ARENA_SIZE
    while True:
        try:
            return run(size), size
        except TFLMError as e:
            too_small = any(s in e.output for s in _ARENA_TOO_SMALL)
            if arena_size is not None or not too_small or size >= MAX_ARENA_SIZE:
                raise
            size *= 2


def _check_wheel_ops(model: TFLiteModel) -> None:
    """Raises `UnsupportedModelError` for custom ops the wheel's op resolver does not know."""
    custom = sorted(
        {
            f"{model.op_type(i)} (op {i})"
            for i in range(model.num_ops)
            if _is_custom(model, i) and model.op_type(i) not in WHEEL_CUSTOM_OPS
        }
    )
    if custom:
        raise UnsupportedModelError(
            "The tflite_micro wheel cannot load this model: its op resolver has no "
            "kernel for the custom op(s) "
            + ", ".join(custom)
            + ". Measure the unpatched model instead."
        )


def parse_allocation_report(text: str, arena_size: int = 0) -> TFLMArenaReport:
    """Parses the text of `RecordingMicroAllocator::PrintAllocations()`.

    Raises:
        TFLMError: the head/tail/total lines are missing.
    """
    matches = [r.search(text) for r in (_HEAD_RE, _TAIL_RE, _TOTAL_RE)]
    if not all(matches):
        raise TFLMError("No RecordingMicroAllocator summary in the TFLM output.", text)
    head, tail, total = (int(m.group(1)) for m in matches)
    allocations = {
        m.group(1): (int(m.group(2)), int(m.group(3)), int(m.group(4)))
        for m in _RECORD_RE.finditer(text)
    }
    return TFLMArenaReport(
        head_bytes=head,
        tail_bytes=tail,
        used_bytes=total,
        arena_size=arena_size,
        report=text,
        allocations=allocations,
    )


def _run_child(path: str, arena_size: int, num_inputs: int, timeout: float, code: str = _CHILD,
               extra_args: Sequence[str] = ()) -> str:
    env = dict(os.environ)
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    try:
        proc = subprocess.run(
            [sys.executable, "-c", code, path, str(arena_size), str(num_inputs), *extra_args],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            timeout=timeout,
            env=env,
        )
    except subprocess.TimeoutExpired as e:
        out = (e.stdout or b"").decode("utf-8", "replace")
        raise TFLMError(f"TFLM did not finish within {timeout:g} s.", out) from None
    out = proc.stdout.decode("utf-8", "replace")
    marker = "@@KP_TFLM_REPORT@@"
    if proc.returncode != 0 or marker not in out:
        how = (
            f"was killed by signal {-proc.returncode}"
            if proc.returncode < 0
            else f"exited with status {proc.returncode}"
        )
        raise TFLMError(
            f"The TFLM interpreter {how} (arena {arena_size} bytes).",
            out,
            proc.returncode,
        )
    payload = out[out.rindex(marker) + len(marker):].strip().splitlines()[0]
    return json.loads(payload)["report"]


def _is_custom(model: TFLiteModel, op_index: int) -> bool:
    code = model.model.operatorCodes[model.operator(op_index).opcodeIndex]
    builtin = max(int(code.builtinCode), int(code.deprecatedBuiltinCode))
    return builtin == schema.BuiltinOperator.CUSTOM
