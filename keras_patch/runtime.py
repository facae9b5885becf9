"""Running any int8 model, patched or not, on the host.

KP_PATCH_STAGE ops run in the reference executor (patch by patch, numpy),
or with `executor="cpp"` in the C++ kernel core (`keras_patch.cpp_executor`,
the code the TFLM kernel runs); every other op runs in the LiteRT interpreter.  The model is cut into
segments at its KP_PATCH_STAGE ops; each run of builtin ops becomes a small
`.tflite` of its own, executed by LiteRT with its *reference* kernels
(`OpResolverType.BUILTIN_REF`): those are the kernels TFLM runs on
microcontrollers. LiteRT's default optimized kernels are not: XNNPACK, and
the ruy GEMM behind its int8 CONV_2D and FULLY_CONNECTED, round the
requantization once instead of twice and differ by one in some outputs.

Example:

>>> import numpy as np, keras_patch
>>> outputs = keras_patch.run_tflite(patched_bytes, np.zeros((1, 144, 144, 3), np.int8))  # doctest: +SKIP
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Dict, List, Sequence, Union

import numpy as np

from keras_patch.patch_op.executor import PreparedStage, prepare_stage, run_stage
from keras_patch.patch_op.options import CUSTOM_CODE
from keras_patch.patchify import kernel_tensor_view, stage_constants, stage_io_tensors, stage_options
from keras_patch.tflite_model import ModelSource, TFLiteModel, read_model_bytes
from keras_patch.errors import InvalidOptionsError, KerasPatchError, UnsupportedModelError


def litert_interpreter(model_bytes: bytes):
    """A LiteRT interpreter with the reference builtin kernels (TFLM's int8 arithmetic)."""
    from ai_edge_litert.interpreter import Interpreter, OpResolverType

    interpreter = Interpreter(
        model_content=model_bytes,
        experimental_op_resolver_type=OpResolverType.BUILTIN_REF,
        num_threads=1,
    )
    interpreter.allocate_tensors()
    return interpreter


def check_reference_kernel_limits(model: TFLiteModel) -> None:
    """Rejects int8 ops whose TFLite/TFLM reference kernels abort in Prepare.

    The reference int8 ADD and SUB requantize their output with
    `QuantizeMultiplierSmallerThanOneExp(2 * max(s_a, s_b) / (2^20 * s_out))`,
    which CHECK-fails (aborting the process, in LiteRT's reference resolver
    and in TFLM alike) unless that multiplier is below 1. Converters emit
    such ops when an activation range collapses to (almost) nothing.

    Raises:
        UnsupportedModelError: naming the op and the scales at fault.
    """
    for i in range(model.num_ops):
        if model.op_type(i) not in ("ADD", "SUB"):
            continue
        tensors = [model.tensor(t) for t in model.op_inputs(i)[:2] + model.op_outputs(i)[:1]]
        if any(t.dtype != np.int8 or t.scale.size == 0 for t in tensors):
            continue
        s_a, s_b, s_out = (float(t.scale[0]) for t in tensors)
        multiplier = 2.0 * max(s_a, s_b) / ((1 << 20) * s_out)
        if not 0.0 < multiplier < 1.0:
            raise UnsupportedModelError(
                f"{model.op_label(i)}: output scale {s_out:.4g} is too small for input scales "
                f"{s_a:.4g} and {s_b:.4g} (output multiplier {multiplier:.4g} must be < 1); "
                f"TFLite's and TFLM's int8 {model.op_type(i)} kernels abort on this model."
            )


@dataclass
class _BuiltinSegment:
    interpreter: object
    inputs: List[int]  # original tensor indices, in sub-model input order
    outputs: List[int]


@dataclass
class _StageSegment:
    stage: object  # PreparedStage (reference) or cpp_executor.CppStage
    input_tensor: int
    output_tensor: int

    def run(self, x: np.ndarray) -> np.ndarray:
        if isinstance(self.stage, PreparedStage):
            return run_stage(self.stage, x)
        return self.stage.run(x)


EXECUTORS = ("reference", "cpp")

#: The most operations (multiply-accumulates, window taps, element copies) one
#: inference of one KP_PATCH_STAGE may take on the host: 4.3e9, about 15 s of
#: average pooling in the C++ core and 14x the MACs of a whole MobileNetV2
#: 1.0@224, far beyond what a microcontroller runs. Options may describe
#: intermediates much larger than the op's tensors (a PAD followed by a
#: strided pooling); without a bound such a model runs for hours in either
#: executor, and the C++ core does not return to Python (nor see Ctrl-C)
#: until a sample is done.
HOST_MAX_STAGE_OPERATIONS = 2**32


def stage_operations(options) -> int:
    """Operations one inference of the stage executes, patch by patch (recomputation included).

    Per output pixel of a layer: `kh*kw*C_in*C_out` for CONV_2D, `kh*kw*C` for
    DEPTHWISE_CONV_2D and the poolings, `C` for PAD, ADD, RELU and RELU6.
    """
    from keras_patch.patch_op import geometry
    from keras_patch.patch_op import options as o

    per_pixel = []
    for l, layer in enumerate(options.layers):
        c_out = options.tensor_shapes[l + 1][2]
        taps = layer.kernel[0] * layer.kernel[1]
        if layer.op == o.OP_CONV_2D:
            per_pixel.append(taps * options.tensor_shapes[layer.inputs[0]][2] * c_out)
        elif layer.op in (o.OP_DEPTHWISE_CONV_2D, o.OP_MAX_POOL_2D, o.OP_AVERAGE_POOL_2D):
            per_pixel.append(taps * c_out)
        else:
            per_pixel.append(c_out)
    return sum(geometry.region_area(regions[l + 1]) * per_pixel[l]
               for regions in geometry.all_patch_regions(options) for l in range(options.num_layers))


def _check_host_work(model: TFLiteModel, op_index: int, options) -> None:
    operations = stage_operations(options)
    if operations > HOST_MAX_STAGE_OPERATIONS:
        raise UnsupportedModelError(
            f"{model.op_label(op_index)}: one inference of this stage takes {operations:.3g} operations "
            f"(its options describe intermediates up to {max(h * w * c for h, w, c in options.tensor_shapes):,} "
            f"elements); run_tflite runs at most {HOST_MAX_STAGE_OPERATIONS:.3g} per stage."
        )


def _prepare(model: TFLiteModel, op_index: int, executor: str):
    """The KP_PATCH_STAGE op at `op_index`, prepared with the TFLM kernel's Prepare checks.

    Both executors check the op's form and its input 0 / output 0 against
    the options (`patchify.stage_io_tensors`, `KpCheckStageIo`), so they
    accept and reject the same models; both refuse a stage above
    `HOST_MAX_STAGE_OPERATIONS`.

    Raises:
        InvalidOptionsError: options the kernel's Prepare rejects (naming the op and the key).
        UnsupportedModelError: an op of another form, or a stage too costly to run on the host.
    """
    if executor == "reference":
        prepared = prepare_stage(stage_options(model, op_index), stage_constants(model, op_index))
        _check_host_work(model, op_index, prepared.options)
        return prepared
    from keras_patch.cpp_executor import CppStage

    io = [kernel_tensor_view(t) for t in stage_io_tensors(model, op_index)]
    options = bytes(np.asarray(model.operator(op_index).customOptions, np.uint8))
    try:
        stage = CppStage(options, stage_constants(model, op_index), io=io)
    except InvalidOptionsError as e:
        raise InvalidOptionsError(f"{model.op_label(op_index)}: {e}") from None
    _check_host_work(model, op_index, stage.options)
    return stage


class HostRunner:
    """A patched or unpatched model split into LiteRT and reference-executor segments."""

    def __init__(self, model_bytes: bytes, executor: str = "reference"):
        if executor not in EXECUTORS:
            raise ValueError(f"executor must be one of {EXECUTORS}, got {executor!r}.")
        self.model_bytes = model_bytes
        self.executor = executor
        model = TFLiteModel.from_bytes(model_bytes)
        if len(model.model.subgraphs) != 1:
            raise UnsupportedModelError("run_tflite handles single-subgraph models.")
        self.inputs = model.inputs
        self.outputs = model.outputs
        self.input_details = [model.tensor(t) for t in model.inputs]
        stage_ops = [i for i in range(model.num_ops) if model.op_type(i) == CUSTOM_CODE]
        unknown = sorted({model.op_type(i) for i in range(model.num_ops)
                          if model.op_type(i) not in _builtin_names() and model.op_type(i) != CUSTOM_CODE})
        if unknown:
            raise UnsupportedModelError(f"run_tflite cannot run custom ops {unknown}.")
        check_reference_kernel_limits(model)
        self.segments: list = []
        if not stage_ops:
            self.segments.append(_BuiltinSegment(litert_interpreter(model_bytes), model.inputs, model.outputs))
            return
        consumers = model.consumers()
        run: List[int] = []
        for i in range(model.num_ops):
            if i in stage_ops:
                if run:
                    self.segments.append(self._builtin_segment(model_bytes, model, run, consumers))
                    run = []
                prepared = _prepare(model, i, executor)
                self.segments.append(
                    _StageSegment(prepared, model.op_inputs(i)[0], model.op_outputs(i)[0])
                )
            else:
                run.append(i)
        if run:
            self.segments.append(self._builtin_segment(model_bytes, model, run, consumers))

    @staticmethod
    def _builtin_segment(model_bytes: bytes, model: TFLiteModel, ops: List[int], consumers: dict) -> _BuiltinSegment:
        op_set = set(ops)
        produced = {t for op in ops for t in model.op_outputs(op)}
        seg_inputs: List[int] = []
        for op in ops:
            for t in model.op_inputs(op):
                if t >= 0 and t not in produced and not model.is_constant(t) and t not in seg_inputs:
                    seg_inputs.append(t)
        seg_outputs = [
            t for op in ops for t in model.op_outputs(op)
            if t in model.outputs or any(c not in op_set for c in consumers.get(t, []))
        ]
        sub = TFLiteModel.from_bytes(model_bytes)
        sub.subgraph.operators = [sub.subgraph.operators[i] for i in ops]
        sub.subgraph.inputs = np.array(seg_inputs, np.int32)
        sub.subgraph.outputs = np.array(seg_outputs, np.int32)
        sub.model.signatureDefs = []
        sub.remove_unused()
        # LiteRT lists inputs/outputs in subgraph order, as set above.
        interpreter = litert_interpreter(sub.to_bytes())
        return _BuiltinSegment(interpreter, seg_inputs, seg_outputs)

    def run(self, inputs: Sequence[np.ndarray]) -> List[np.ndarray]:
        """One inference (batch 1 per input, as the model's tensors are declared)."""
        env: Dict[int, np.ndarray] = dict(zip(self.inputs, inputs))
        for seg in self.segments:
            if isinstance(seg, _StageSegment):
                env[seg.output_tensor] = seg.run(env[seg.input_tensor])
                continue
            interp = seg.interpreter
            for detail, t in zip(interp.get_input_details(), seg.inputs):
                interp.set_tensor(detail["index"], np.asarray(env[t], detail["dtype"]).reshape(detail["shape"]))
            interp.invoke()
            for detail, t in zip(interp.get_output_details(), seg.outputs):
                env[t] = interp.get_tensor(detail["index"]).copy()
        return [env[t] for t in self.outputs]


@functools.lru_cache(maxsize=8)
def _builtin_names() -> frozenset:
    from keras_patch.tflite_model import BUILTIN_OPERATOR_NAMES

    return frozenset(BUILTIN_OPERATOR_NAMES.values())


@functools.lru_cache(maxsize=4)
def _runner(model_bytes: bytes, executor: str = "reference") -> HostRunner:
    return HostRunner(model_bytes, executor)


def _declared_batch(input_details: Sequence) -> int:
    """The batch size the model's inputs declare: samples per inference (1 unless fixed larger)."""
    batches = {int(info.shape[0]) if len(info.shape) and int(info.shape[0]) > 0 else 1 for info in input_details}
    if len(batches) > 1:
        names = ", ".join(f"'{info.name}' {tuple(int(d) for d in info.shape)}" for info in input_details)
        raise UnsupportedModelError(f"run_tflite needs one batch size for all inputs, the model declares {names}.")
    return batches.pop() if batches else 1


def run_tflite(
    tflite_bytes: ModelSource,
    inputs: Union[np.ndarray, Sequence[np.ndarray]],
    executor: str = "reference",
) -> List[np.ndarray]:
    """Runs a `.tflite` (patched or not) on the host; returns its outputs.

    Args:
        tflite_bytes: model bytes or path.
        inputs: one array per model input (a single array for one input).
            A leading batch of N > 1 samples runs as N inferences (as N / B
            for a model whose inputs declare a fixed batch B).
        executor: how KP_PATCH_STAGE ops run: "reference" (the numpy
            reference executor) or "cpp" (the C++ kernel core, built by
            `pip install .`); both give the same bits.

    Returns:
        A list with one array per model output, batched like the inputs.
    """
    if executor not in EXECUTORS:
        raise ValueError(f"executor must be one of {EXECUTORS}, got {executor!r}.")
    runner = _runner(read_model_bytes(tflite_bytes), executor)
    if isinstance(inputs, np.ndarray):
        inputs = [inputs]
    inputs = [np.asarray(x) for x in inputs]
    if len(inputs) != len(runner.inputs):
        raise KerasPatchError(f"The model has {len(runner.inputs)} inputs, got {len(inputs)} arrays.")
    step = _declared_batch(runner.input_details)
    batch = None
    for x, info in zip(inputs, runner.input_details):
        expected = tuple(int(d) for d in info.shape)
        if x.dtype != np.dtype(info.dtype):
            raise KerasPatchError(
                f"Input '{info.name}' must be {np.dtype(info.dtype).name}, got {x.dtype}."
            )
        if x.ndim == 0 or x.ndim != len(expected) or tuple(x.shape[1:]) != expected[1:]:
            raise KerasPatchError(
                f"Input '{info.name}' must have shape (N, *{expected[1:]}) (the model's input is {expected}), "
                f"got {x.shape}."
            )
        if x.shape[0] == 0 or x.shape[0] % step:
            what = "at least one sample" if step == 1 else f"a multiple of {step} samples (the model's fixed batch)"
            raise KerasPatchError(
                f"Input '{info.name}' has a batch of {x.shape[0]} (shape {x.shape}); the model's input is "
                f"{expected}: give {what}."
            )
        batch = x.shape[0] if batch is None else batch
        if x.shape[0] != batch:
            raise KerasPatchError(
                f"All inputs must have the same batch size: '{info.name}' has {x.shape[0]}, the first input {batch}."
            )
    results: List[list] = []
    for n in range(0, batch, step):
        results.append(runner.run([x[n : n + step] for x in inputs]))
    return [np.concatenate([r[k] for r in results], axis=0) for k in range(len(runner.outputs))]


def quantize_input(tflite_bytes: ModelSource, x: np.ndarray, index: int = 0) -> np.ndarray:
    """Quantizes float samples `x` with the scale and zero point of the model's input `index`.

    Example:

    >>> import numpy as np, keras
    >>> from keras_patch.export import convert_int8
    >>> model = keras.Sequential([keras.Input((4, 4, 1)), keras.layers.Conv2D(2, 3)])
    >>> data = convert_int8(model, np.random.default_rng(0).random((4, 4, 4, 1), dtype=np.float32))
    >>> quantize_input(data, np.zeros((1, 4, 4, 1), np.float32)).dtype.name
    'int8'
    """
    model = TFLiteModel.from_bytes(read_model_bytes(tflite_bytes))
    info = model.tensor(model.inputs[index])
    if not info.scale.size:
        raise ValueError(f"Input '{info.name}' of the model is not quantized ({np.dtype(info.dtype).name}).")
    return quantize(x, info.scale[0], info.zero_point[0], info.dtype)


def quantize(x: np.ndarray, scale: float, zero_point: int, dtype=np.int8) -> np.ndarray:
    """TFLite's affine quantization: `clip(round(x / scale) + zero_point)` to `dtype`'s range.

    `scale` is taken as float32, as TFLite stores it.

    >>> quantize(np.array([0.0, 0.5, 10.0]), 0.01, -3)
    array([ -3,  47, 127], dtype=int8)
    """
    dtype = np.dtype(dtype)
    limits = np.iinfo(dtype)
    q = np.round(np.asarray(x, np.float32) / float(np.float32(scale))) + int(zero_point)
    return np.clip(q, limits.min, limits.max).astype(dtype)
