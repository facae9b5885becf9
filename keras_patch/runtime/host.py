"""Running any int8 model, patched or not, on the host.

KP_PATCH_STAGE ops run in the reference executor (patch by patch, numpy),
or with `executor="cpp"` in the C++ kernel core (`keras_patch.runtime.cpp_executor`,
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
import math
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence, Union

import numpy as np

from keras_patch.stage.executor import PreparedStage, prepare_stage, run_stage
from keras_patch.stage.options import CUSTOM_CODE
from keras_patch.graph.patchify import kernel_tensor_view, stage_constants, stage_io_tensors, stage_options
from keras_patch.graph.tflite_model import ModelSource, TFLiteModel, read_model_bytes
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


def _quantize_multiplier(multiplier: float) -> tuple:
    """TFLite's `QuantizeMultiplier`: (significand in [2^30, 2^31), shift) of a double."""
    if multiplier == 0.0:
        return 0, 0
    fraction, shift = math.frexp(multiplier)
    q_fixed = int(math.floor(abs(fraction) * (1 << 31) + 0.5)) * (1 if fraction > 0 else -1)  # TfLiteRound
    if q_fixed == 1 << 31:
        q_fixed //= 2
        shift += 1
    return q_fixed, shift


def _smaller_than_one_ok(multiplier: float) -> bool:
    """Whether `QuantizeMultiplierSmallerThanOneExp` accepts it (its CHECKs: 0 < m < 1, shift <= 0)."""
    return math.isfinite(multiplier) and 0.0 < multiplier < 1.0 and _quantize_multiplier(multiplier)[1] <= 0


def _greater_than_one_ok(multiplier: float) -> bool:
    """Whether `QuantizeMultiplierGreaterThanOne` accepts it (its CHECK: m > 1)."""
    return math.isfinite(multiplier) and multiplier > 1.0


# An int8 SOFTMAX sums exp() of its inputs in Q12.19 and CHECK-fails in Eval
# (`0 <= exponent <= 31` in reference_ops::Softmax) once that sum reaches 512.
_SOFTMAX_SUM_LIMIT = 512.0
# LiteRT's reference kernels and TFLM's: which of them CHECK-fail (abort) on the conditions below.
_ABORTS_IN = {
    "ADD": "TFLite's and TFLM's",
    "SUB": "TFLM's",
    "ADD_N": "TFLM's",
    "CUMSUM": "TFLM's",
    "SQUARED_DIFFERENCE": "TFLite's",
    "SOFTMAX": "TFLite's and TFLM's",
    "LOG_SOFTMAX": "TFLite's and TFLM's",
}
_COMPARISONS = ("EQUAL", "NOT_EQUAL", "GREATER", "GREATER_EQUAL", "LESS", "LESS_EQUAL")


def _scales(model: TFLiteModel, tensors: Sequence[int]) -> Optional[List[float]]:
    """Per-tensor scales (float32 as stored, as doubles) of int8/uint8 tensors; None if any is not quantized."""
    infos = [model.tensor(t) for t in tensors]
    if any(t.dtype not in (np.int8, np.uint8) or t.scale.size == 0 for t in infos):
        return None
    return [float(np.float32(t.scale[0])) for t in infos]


def _softmax_beta(model: TFLiteModel, op_index: int) -> float:
    options = model.operator(op_index).builtinOptions
    return float(np.float32(getattr(options, "beta", 1.0))) if options is not None else 1.0


def reference_kernel_problem(model: TFLiteModel, op_index: int) -> Optional[str]:
    """Why the int8 reference kernel of op `op_index` would abort in Prepare, or None.

    The conditions are the `TFLITE_CHECK`s that LiteRT's reference kernels
    (`OpResolverType.BUILTIN_REF`) and TFLM's kernels reach through
    `QuantizeMultiplierSmallerThanOneExp` (multiplier in (0, 1)) and
    `QuantizeMultiplierGreaterThanOne` (multiplier > 1) while preparing:

    * ADD, SUB (left shift 20), ADD_N, CUMSUM: input multipliers
      `s_in / (2 max s_in)` and output multiplier `2 max s_in / (2^20 s_out)`.
    * SQUARED_DIFFERENCE (LiteRT; left shift 7): `(2 max s_in)^2 / (2^14 s_out)`.
    * SOFTMAX, LOG_SOFTMAX (int8/uint8 input): `min(beta s_in 2^26, 2^31 - 1)` must exceed 1,
      i.e. an input scale of at least `2^-26 / beta` (about 1.5e-8).
    * EQUAL ... LESS_EQUAL (TFLM): each input scale in (0, 1).

    Other int8 kernels (CONV_2D, DEPTHWISE_CONV_2D, FULLY_CONNECTED, MUL,
    MEAN, pooling, QUANTIZE, HARD_SWISH, LOGISTIC, ...) use the unchecked
    `QuantizeMultiplier` or return an error (a Python exception) instead.
    """
    op_type = model.op_type(op_index)
    inputs = [t for t in model.op_inputs(op_index) if t >= 0]
    outputs = model.op_outputs(op_index)[:1]
    where = f"{model.op_label(op_index)}: "
    if op_type in ("ADD", "SUB", "SQUARED_DIFFERENCE", "ADD_N", "CUMSUM"):
        ins = inputs[:1] if op_type == "CUMSUM" else inputs if op_type == "ADD_N" else inputs[:2]
        scales = _scales(model, ins + outputs)
        if scales is None:
            return None
        *s_in, s_out = scales
        if op_type == "ADD_N":
            s_in = s_in[:1]  # TFLM rescales every input with the first one's scale
        if not all(s > 0 and math.isfinite(s) for s in scales):
            return f"{where}scales {scales} must be positive and finite (input multipliers must be in (0, 1))"
        twice_max = 2.0 * max(s_in)
        if op_type == "SQUARED_DIFFERENCE":
            multiplier = twice_max * twice_max / ((1 << 14) * s_out)
            formula = "(2 * max input scale)^2 / (2^14 * output scale)"
        else:
            multiplier = twice_max / ((1 << 20) * s_out)
            formula = "2 * max input scale / (2^20 * output scale)"
        if not _smaller_than_one_ok(multiplier):
            shown = " and ".join(f"{s:.4g}" for s in s_in)
            return (f"{where}output scale {s_out:.4g} is too small for input scales {shown} "
                    f"(output multiplier {formula} = {multiplier:.4g} must be < 1)")
        return None
    if op_type in ("SOFTMAX", "LOG_SOFTMAX"):
        scales = _scales(model, inputs[:1])
        if scales is None:
            return None
        beta = _softmax_beta(model, op_index) if op_type == "SOFTMAX" else 1.0
        multiplier = min(beta * scales[0] * (1 << 26), (1 << 31) - 1.0)
        if not _greater_than_one_ok(multiplier):
            return (f"{where}input scale {scales[0]:.4g} is too small (input multiplier beta * input scale "
                    f"* 2^26 = {multiplier:.4g} with beta {beta:g} must be > 1; the logits' range has "
                    f"collapsed, e.g. untrained weights or a calibration set that does not fit)")
        return None
    if op_type in _COMPARISONS:
        scales = _scales(model, inputs[:2])
        if scales is not None and not all(_smaller_than_one_ok(s) for s in scales):
            return f"{where}input scales {scales} must be in (0, 1)"
    return None


def check_reference_kernel_limits(model: TFLiteModel) -> None:
    """Rejects int8 ops whose TFLite/TFLM reference kernels abort in Prepare.

    Such a kernel CHECK-fails, killing the whole process (in LiteRT's
    reference resolver and in TFLM alike) instead of returning an error;
    converters emit such ops when an activation range collapses to (almost)
    nothing. `reference_kernel_problem` lists the conditions.

    Raises:
        UnsupportedModelError: naming the op and the scales at fault.
    """
    for i in range(model.num_ops):
        problem = reference_kernel_problem(model, i)
        if problem:
            kernels = _ABORTS_IN.get(model.op_type(i), "TFLM's")
            raise UnsupportedModelError(
                f"{problem}; {kernels} int8 {model.op_type(i)} kernels abort on this model."
            )


def softmax_sum_guard(model: TFLiteModel, op_index: int):
    """A check of an int8 SOFTMAX's input that its Eval would not abort on, or None if it never can.

    TFLite's and TFLM's reference int8 SOFTMAX sum `exp(beta * s_in * (x - max))`
    over the last axis in Q12.19 and CHECK-fail once the sum reaches 512,
    which softmaxes over 512 or more classes do on flat enough inputs.
    The returned function raises `UnsupportedModelError` on such an input.
    """
    if model.op_type(op_index) != "SOFTMAX":
        return None
    t_in, t_out = model.op_inputs(op_index)[0], model.op_outputs(op_index)[0]
    info_in, info_out = model.tensor(t_in), model.tensor(t_out)
    if (info_in.dtype not in (np.int8, np.uint8) or info_out.dtype not in (np.int8, np.uint8)
            or not info_in.scale.size or not info_in.shape or info_in.shape[-1] < _SOFTMAX_SUM_LIMIT):
        return None
    scale = _softmax_beta(model, op_index) * float(np.float32(info_in.scale[0]))
    label = model.op_label(op_index)

    def guard(x: np.ndarray) -> None:
        x = np.asarray(x, np.float64).reshape(-1, x.shape[-1])
        diff = x - x.max(axis=-1, keepdims=True)
        total = np.exp(np.maximum(diff * scale, -32.0)).sum(axis=-1).max()
        if total >= _SOFTMAX_SUM_LIMIT * (1 - 1e-3):
            raise UnsupportedModelError(
                f"{label}: the exp() sum of this input, {total:.1f}, reaches the int8 SOFTMAX "
                f"kernel's limit of 512 (Q12.19 accumulator over {x.shape[-1]} classes); TFLite's and "
                f"TFLM's reference SOFTMAX abort on it. Its logits are too flat (input scale "
                f"{scale:.4g}); fewer classes, or an int16 or float softmax, avoid it."
            )

    return guard


@dataclass
class _BuiltinSegment:
    interpreter: object
    inputs: List[int]  # original tensor indices, in sub-model input order
    outputs: List[int]
    guard: Optional[Callable[[Dict[int, np.ndarray]], None]] = None  # checks the inputs before invoke


@dataclass
class _StageSegment:
    stage: object  # PreparedStage (reference) or cpp_executor.CppStage
    input_tensor: int
    output_tensor: int
    output_shape: tuple  # as the model declares it: a final MEAN's may be [1, C]

    def run(self, x: np.ndarray) -> np.ndarray:
        y = run_stage(self.stage, x) if isinstance(self.stage, PreparedStage) else self.stage.run(x)
        return y.reshape(self.output_shape)


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
    DEPTHWISE_CONV_2D and the poolings, `C` for PAD, ADD, RELU and RELU6; a
    final MEAN adds every pixel of its input once (`H * W * C`).
    """
    from keras_patch.stage import geometry
    from keras_patch.stage import options as o

    per_pixel = []
    for l, layer in enumerate(options.layers):
        c_out = options.tensor_shapes[l + 1][2]
        if layer.op in (o.OP_CONV_2D, o.OP_DEPTHWISE_CONV_2D):
            per_pixel.append(geometry.layer_macs_per_pixel(options, l))
        elif layer.op in (o.OP_MAX_POOL_2D, o.OP_AVERAGE_POOL_2D):
            per_pixel.append(layer.kernel[0] * layer.kernel[1] * c_out)
        else:
            per_pixel.append(c_out)
    mean = 0
    if options.ends_with_mean:
        h, w, c = options.tiled_shape
        mean = h * w * c
    return geometry.patched_pixel_sum(options, per_pixel) + mean


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
    from keras_patch.runtime.cpp_executor import CppStage

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
        guards = {i: g for i in range(model.num_ops) for g in [softmax_sum_guard(model, i)] if g is not None}
        self.segments: list = []
        if not stage_ops and not guards:
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
                    _StageSegment(prepared, model.op_inputs(i)[0], model.op_outputs(i)[0],
                                  tuple(model.tensor(model.op_outputs(i)[0]).shape))
                )
            elif i in guards:  # its own segment, its input checked before LiteRT runs it
                if run:
                    self.segments.append(self._builtin_segment(model_bytes, model, run, consumers))
                    run = []
                segment = self._builtin_segment(model_bytes, model, [i], consumers)
                t_in, guard = model.op_inputs(i)[0], guards[i]
                segment.guard = lambda env, t_in=t_in, guard=guard: guard(env[t_in])
                self.segments.append(segment)
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
            if seg.guard is not None:
                seg.guard(env)
            interp = seg.interpreter
            for detail, t in zip(interp.get_input_details(), seg.inputs):
                interp.set_tensor(detail["index"], np.asarray(env[t], detail["dtype"]).reshape(detail["shape"]))
            interp.invoke()
            for detail, t in zip(interp.get_output_details(), seg.outputs):
                env[t] = interp.get_tensor(detail["index"]).copy()
        return [env[t] for t in self.outputs]


@functools.lru_cache(maxsize=8)
def _builtin_names() -> frozenset:
    from keras_patch.graph.tflite_model import BUILTIN_OPERATOR_NAMES

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


def _check_offline_plan(data: bytes) -> None:
    """Refuses (OfflinePlanError) a model whose offline memory plan TFLM must not trust."""
    if b"OfflineMemoryAllocation" not in data:
        return
    from keras_patch.graph.passes.offline_plan import check_offline_plan

    check_offline_plan(TFLiteModel.from_bytes(data))


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
            for a model whose inputs declare a fixed batch B).  A float
            array for an int8 input is quantized first with the input's
            scale and zero point, exactly as TFLite's QUANTIZE op does
            (`quantize`): a model whose leading QUANTIZE was dropped
            (`keras_patch.graph.passes.int8_input`) gives the same outputs
            for the same float array as the float-input model.
        executor: how KP_PATCH_STAGE ops run: "reference" (the numpy
            reference executor) or "cpp" (the C++ kernel core, built by
            `pip install .`); both give the same bits.

    Returns:
        A list with one array per model output, batched like the inputs.

    Raises:
        OfflinePlanError: the model carries an offline memory plan
            (`OfflineMemoryAllocation`) that does not match it or overlaps
            live buffers (`graph.passes.offline_plan.check_offline_plan`).
    """
    if executor not in EXECUTORS:
        raise ValueError(f"executor must be one of {EXECUTORS}, got {executor!r}.")
    data = read_model_bytes(tflite_bytes)
    _check_offline_plan(data)
    runner = _runner(data, executor)
    if isinstance(inputs, np.ndarray):
        inputs = [inputs]
    inputs = [np.asarray(x) for x in inputs]
    if len(inputs) != len(runner.inputs):
        raise KerasPatchError(f"The model has {len(runner.inputs)} inputs, got {len(inputs)} arrays.")
    step = _declared_batch(runner.input_details)
    batch = None
    inputs = [_quantized_if_float(x, info) for x, info in zip(inputs, runner.input_details)]
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


def _quantized_if_float(x: np.ndarray, info) -> np.ndarray:
    """`x` quantized with `info`'s scale and zero point when it is float and the input int8; else `x`."""
    if (np.issubdtype(x.dtype, np.floating) and np.dtype(info.dtype) == np.int8
            and info.scale.size == 1 and info.zero_point.size == 1):
        return quantize(x, info.scale[0], info.zero_point[0], np.int8)
    return x


def quantize_input(tflite_bytes: ModelSource, x: np.ndarray, index: int = 0) -> np.ndarray:
    """Quantizes float samples `x` with the scale and zero point of the model's input `index`.

    Example:

    >>> import numpy as np, keras
    >>> from keras_patch.keras.export import convert_int8
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
    """TFLite's QUANTIZE op: `clip(round(x / scale) + zero_point)` to `dtype`'s range, bit for bit.

    As the reference kernel (`reference_ops::AffineQuantize`, which TFLM
    runs): `x` as float32 divided by `scale` as float32 (TFLite stores it so)
    in float32, rounded half away from zero (`TfLiteRound`, i.e.
    `std::round`), plus the zero point, clamped.  NaN maps to the zero
    point; values beyond the int32 range clamp like ARM's saturating
    conversion (x86 builds of TFLite wrap them, undefined behaviour in C++).

    >>> quantize(np.array([0.0, 0.5, 10.0, 0.025, -0.025]), 0.01, -3)
    array([ -3,  47, 127,   0,  -6], dtype=int8)
    """
    dtype = np.dtype(dtype)
    limits = np.iinfo(dtype)
    with np.errstate(invalid="ignore", divide="ignore", over="ignore"):
        v = np.asarray(x, np.float32) / np.float32(scale)
        r = np.trunc(v)
        r = r + np.where(np.abs(v - r) >= np.float32(0.5), np.sign(v), np.float32(0))
        r = np.nan_to_num(np.clip(r.astype(np.float64), -2.0**31, 2.0**31 - 1), nan=0.0)
    q = r.astype(np.int64) + int(zero_point)
    return np.clip(q, limits.min, limits.max).astype(dtype)
