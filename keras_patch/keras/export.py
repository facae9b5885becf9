"""Int8 export of a Keras model whose PatchStage layers become KP_PATCH_STAGE ops.

The model is converted by the standard TFLite converter (full int8: int8
input/output, per-channel weights); then the ops each `PatchStage` produced
(found by the name scope the layer opens in `call`) are replaced by one
KP_PATCH_STAGE custom op.  Everything outside the stages is exactly what the
converter produced.

Example:

>>> import numpy as np, keras, keras_patch
>>> block = keras.Sequential([keras.Input((32, 32, 3)),
...                           keras.layers.Conv2D(8, 3, strides=2, padding="same", activation="relu")])
>>> inputs = keras.Input((32, 32, 3))
>>> x = keras_patch.PatchStage(block, grid=(2, 2))(inputs)
>>> outputs = keras.layers.Dense(2)(keras.layers.GlobalAveragePooling2D()(x))
>>> model = keras.Model(inputs, outputs)
>>> data = np.random.rand(8, 32, 32, 3).astype("float32")
>>> tflite_bytes = keras_patch.export_tflite(model, data)  # doctest: +SKIP
"""

from __future__ import annotations

import contextlib
import faulthandler
import io
import logging
import os
import sys
import tempfile
from typing import TYPE_CHECKING, Callable, Iterable, List, Optional, Sequence, Union

import numpy as np
from ai_edge_litert import schema_py_generated as schema

from keras_patch.errors import CalibrationDataError, UnsupportedModelError
from keras_patch.files import check_output_path, write_atomically  # noqa: F401  (write_atomically: public here)
from keras_patch.graph.patchify import plan_stage, rewrite_stage, stage_ops
from keras_patch.graph.tflite_model import TFLiteModel

if TYPE_CHECKING:  # the layer imports Keras; `write_atomically` must not
    from keras_patch.keras.patch_stage import PatchStage

logger = logging.getLogger(__name__)

RepresentativeData = Union[np.ndarray, Callable[[], Iterable], Iterable]


def patch_stages(model) -> List[PatchStage]:
    """The PatchStage layers of a Keras model, outermost first."""
    from keras_patch.keras.patch_stage import PatchStage

    found = []
    for layer in model.layers:
        if isinstance(layer, PatchStage):
            found.append(layer)
        elif hasattr(layer, "layers"):
            found.extend(patch_stages(layer))
    return found


def _representative_dataset(data: RepresentativeData, model=None) -> Callable[[], Iterable]:
    """A TFLite-converter representative dataset from arrays or a generator.

    Every sample is checked before the converter sees it (see
    `check_calibration_sample`): arrays and iterables up front, a generator
    function as the converter draws from it.  `model`, when given, supplies
    the input shapes the samples must fit.

    Raises:
        CalibrationDataError: empty data, a sample of the wrong shape, or
            NaN/inf values; the message names the sample.
        TypeError: `data` is none of the accepted forms.
    """
    inputs = _model_inputs(model)
    if isinstance(data, np.ndarray):
        samples = _numeric(data, "representative_dataset", to_float=True)
        if samples.ndim < 2 or len(samples) == 0:
            raise CalibrationDataError(
                f"representative_dataset holds no samples: got an array of shape {data.shape}, "
                f"expected (N, H, W, C) with N >= 1."
            )
        if len(inputs) == 1:
            _check_shape(samples.shape, inputs[0], "representative_dataset", batched=True)
        check_finite_samples(samples)

        def generate():
            for sample in samples:
                yield [sample[None]]

        return generate
    if callable(data):

        def generate_checked():
            count = 0
            for count, item in enumerate(data(), start=1):
                yield check_calibration_sample(item, count - 1, inputs)
            if count == 0:
                raise CalibrationDataError("representative_dataset: the generator yielded no samples.")

        return generate_checked
    if isinstance(data, Iterable):
        items = [check_calibration_sample(item, i, inputs) for i, item in enumerate(data)]
        if not items:
            raise CalibrationDataError("representative_dataset holds no samples.")

        def generate():
            yield from items

        return generate
    raise TypeError(
        "representative_dataset must be an array of samples, an iterable, or a generator function, "
        f"got {type(data).__name__}."
    )


def _model_inputs(model) -> List[tuple]:
    """(name, shape with None for free dims) of each Keras model input; [] if unknown."""
    try:
        tensors = list(model.inputs) if model is not None and model.inputs is not None else []
    except (AttributeError, ValueError, TypeError):
        return []
    result = []
    for t in tensors:
        try:
            shape = tuple(None if d is None else int(d) for d in t.shape)
        except (TypeError, ValueError):
            return []
        result.append((str(getattr(t, "name", "")), shape))
    return result


def _numeric(values, where: str, to_float: bool = False) -> np.ndarray:
    """`values` as a numpy array of numbers (floats, or all if `to_float`, as float32)."""
    try:
        array = np.asarray(values)
    except (ValueError, TypeError) as e:
        raise CalibrationDataError(f"{where}: not an array of numbers ({e}).") from None
    if array.dtype.kind not in "biuf":
        raise CalibrationDataError(f"{where}: values of type {array.dtype} are not numbers.")
    return array.astype(np.float32) if to_float or array.dtype.kind == "f" else array


def _check_shape(shape: tuple, model_input: tuple, where: str, batched: bool = False) -> None:
    """Raises unless `shape` fits the model input (None dims are free)."""
    name, expected = model_input
    fits = len(shape) == len(expected) and all(
        e is None or e == g for e, g in zip(expected[1:], shape[1:])
    )
    if fits:
        return
    wanted = ("N",) + tuple("?" if e is None else e for e in expected[1:])
    got = f"an array of shape {shape}" if batched else f"shape {shape}"
    raise CalibrationDataError(
        f"{where}: {got} does not fit the model input '{name}' of shape {expected}; "
        f"expected ({', '.join(str(d) for d in wanted)})."
    )


def _nonfinite_problem(sample: np.ndarray) -> str:
    """'2 NaN, 1 +inf values (first at (0, 3, 1, 2))' for an array holding some."""
    counts = [
        (int(np.isnan(sample).sum()), "NaN"),
        (int(np.isposinf(sample).sum()), "+inf"),
        (int(np.isneginf(sample).sum()), "-inf"),
    ]
    first = tuple(int(i) for i in np.argwhere(~np.isfinite(sample))[0])
    what = ", ".join(f"{n} {kind}" for n, kind in counts if n)
    return f"{what} value{'s' if sum(n for n, _ in counts) > 1 else ''} (first at index {first})"


def check_finite_samples(samples: np.ndarray) -> None:
    """Raises naming the first sample of an (N, ...) float array that holds NaN/inf."""
    if samples.dtype.kind != "f":
        return
    bad = ~np.isfinite(samples.reshape(len(samples), -1)).all(axis=1)
    if bad.any():
        index = int(np.argmax(bad))
        raise CalibrationDataError(
            f"representative_dataset sample {index} holds {_nonfinite_problem(samples[index])}; "
            f"{int(bad.sum())} of {len(samples)} samples are not finite. Calibration data must be finite."
        )


def check_calibration_sample(item, index: int, inputs: Sequence[tuple] = ()):
    """Checks one representative-dataset item and returns it as the converter wants it.

    An item is an array (one input; a missing leading batch axis is added),
    a list of arrays (one per model input), a dict {input name: array}, or a
    (signature key, dict) tuple.  Each array must be numeric and finite, and
    where the model input is known (`inputs`, as `(name, shape)` pairs), fit
    its rank and fixed dimensions.

    Raises:
        CalibrationDataError: naming the sample `index` and the problem.
    """
    where = f"representative_dataset sample {index}"
    names = {name: (name, shape) for name, shape in inputs}

    def checked(value, model_input, label):
        array = _numeric(value, label, to_float=not isinstance(item, (list, tuple, dict)))
        if model_input is not None:
            if array.ndim == len(model_input[1]) - 1 and not isinstance(item, (list, tuple, dict)):
                array = array[None]
            _check_shape(array.shape, model_input, label)
        if array.dtype.kind == "f" and not np.isfinite(array).all():
            raise CalibrationDataError(
                f"{label} holds {_nonfinite_problem(array)}. Calibration data must be finite."
            )
        return array

    if isinstance(item, dict):
        return {k: checked(v, names.get(k), f"{where}, input '{k}'") for k, v in item.items()}
    if isinstance(item, tuple) and len(item) == 2 and isinstance(item[1], dict):
        return (item[0], {k: checked(v, names.get(k), f"{where}, input '{k}'") for k, v in item[1].items()})
    if isinstance(item, (list, tuple)):
        if inputs and len(item) != len(inputs):
            raise CalibrationDataError(
                f"{where} holds {len(item)} arrays, but the model has {len(inputs)} input(s)."
            )
        return [
            checked(v, inputs[i] if inputs else None, where if len(item) == 1 else f"{where}, input {i}")
            for i, v in enumerate(item)
        ]
    return [checked(item, inputs[0] if len(inputs) == 1 else None, where)]


@contextlib.contextmanager
def _captured_output():
    """Keeps converter chatter (Python and C++) out of the caller's terminal.

    A fatal signal inside TensorFlow while the output is captured would
    otherwise die silently (its report going to the capture file), so
    `faulthandler` reports to the real stderr meanwhile.
    """
    buffer = io.StringIO()
    saved = []
    fault_report = None
    was_enabled = faulthandler.is_enabled()
    try:
        for fd in (1, 2):
            try:
                saved.append((fd, os.dup(fd)))
            except OSError:
                continue
        for fd, copy in saved:
            if fd == 2:
                fault_report = os.fdopen(os.dup(copy), "w")
                faulthandler.enable(file=fault_report)
        sink = tempfile.TemporaryFile(mode="w+")
        for fd, _ in saved:
            os.dup2(sink.fileno(), fd)
        with contextlib.redirect_stdout(buffer):
            yield buffer
    finally:
        for fd, copy in saved:
            os.dup2(copy, fd)
            os.close(copy)
        if fault_report is not None:
            faulthandler.disable()
            if was_enabled:
                _reenable_faulthandler()
            fault_report.close()
        if saved:
            sink.seek(0)
            logger.debug("converter output:\n%s%s", buffer.getvalue(), sink.read())
            sink.close()


def _reenable_faulthandler() -> None:
    """Turns `faulthandler` back on for the caller, who had it on (best effort)."""
    for stream in (sys.stderr, sys.__stderr__):
        try:
            faulthandler.enable(file=stream)
            return
        except (AttributeError, ValueError, OSError):  # e.g. a stream without fileno()
            continue


def check_calibration_ranges(calibrated: bytes) -> None:
    """Raises unless every activation range the calibration recorded is finite.

    Finite inputs can still overflow float32 inside the model (values near
    3e38 through a convolution); the range then holds inf, and TensorFlow's
    quantizer crashes the process (SIGSEGV) instead of raising.

    Args:
        calibrated: the float `.tflite` with min/max statistics that the
            converter's calibration step produced.

    Raises:
        CalibrationDataError: naming the first tensor whose range is not finite.
    """
    model = schema.Model.GetRootAs(calibrated, 0)
    for s in range(model.SubgraphsLength()):
        subgraph = model.Subgraphs(s)
        for t in range(subgraph.TensorsLength()):
            tensor = subgraph.Tensors(t)
            q = tensor.Quantization()
            if q is None or q.MinLength() == 0 or q.MaxLength() == 0:
                continue
            lo = q.MinAsNumpy().astype(np.float32)
            hi = q.MaxAsNumpy().astype(np.float32)
            with np.errstate(over="ignore", invalid="ignore"):
                spread = hi - lo
            if not (np.isfinite(lo).all() and np.isfinite(hi).all() and np.isfinite(spread).all()):
                name = (tensor.Name() or b"").decode(errors="replace")
                raise CalibrationDataError(
                    f"representative_dataset: calibration recorded the range [{lo.min():g}, {hi.max():g}] "
                    f"for tensor '{name}', which int8 cannot represent (the data overflow float32 inside "
                    f"the model); scale the calibration data like the training data."
                )


@contextlib.contextmanager
def _checked_calibration():
    """Runs `check_calibration_ranges` between the converter's calibration and its quantizer.

    TensorFlow's MLIR quantizer (`lite._mlir_quantize`) crashes the process
    on non-finite ranges.  Measured on 2 shared cores: the quantizer step
    takes 0.015 s (tiny model) / 0.19 s (MobileNetV2 0.35@144, whole export
    43 s), while running it in a child process costs 23-27 s (the child
    imports TensorFlow).  So the conversion stays in process: the samples
    are checked before calibration, the recorded ranges before quantization,
    and a crash TensorFlow could still have is reported by `faulthandler`
    (see `_captured_output`) rather than silent.  Where this TensorFlow has
    no such hook the ranges go unchecked (logged at debug level).
    """
    try:
        from tensorflow.lite.python import lite as tf_lite

        original = tf_lite._mlir_quantize
    except (ImportError, AttributeError):
        logger.debug("no tensorflow.lite.python.lite._mlir_quantize: calibration ranges unchecked")
        yield
        return

    def checked_quantize(calibrated, *args, **kwargs):
        check_calibration_ranges(calibrated)
        return original(calibrated, *args, **kwargs)

    tf_lite._mlir_quantize = checked_quantize
    try:
        yield
    finally:
        tf_lite._mlir_quantize = original


def convert_int8(model, representative_dataset: RepresentativeData, int8_io: bool = True) -> bytes:
    """Full-int8 conversion with the standard converter (per-channel weights).

    Raises:
        CalibrationDataError: empty calibration data, a sample that does not
            fit the model input, or NaN/inf values (before conversion), or
            activation ranges that overflow (before quantization).
    """
    import tensorflow as tf

    dataset = _representative_dataset(representative_dataset, model)
    converter = tf.lite.TFLiteConverter.from_keras_model(model)
    converter.optimizations = [tf.lite.Optimize.DEFAULT]
    converter.representative_dataset = dataset
    converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
    if int8_io:
        converter.inference_input_type = tf.int8
        converter.inference_output_type = tf.int8
    with _captured_output(), _checked_calibration():
        return converter.convert()


def _part_stages(tensor_name: str) -> list:
    """The PatchStage (or None) of each layer op the converter fused into the op writing `tensor_name`."""
    from keras_patch.keras.patch_stage import stage_of_tensor_name

    return [stage_of_tensor_name(part) for part in tensor_name.split(";") if "/" in part]


def _warn_fused_across(tflite: TFLiteModel, stage: PatchStage, marked: List[int]) -> None:
    """Logs a warning where the converter fused layers across a boundary of `stage`.

    The converter folds a BatchNormalization into the convolution before it and
    fuses a ReLU into the op before it; when a stage boundary lies between them,
    the fused op goes to one side only, so the KP_PATCH_STAGE op holds a little
    more or less than the `PatchStage` (the model still computes the same).
    """
    for i in range(tflite.num_ops):
        name = tflite.tensor(tflite.op_outputs(i)[0]).name if tflite.op_outputs(i) else ""
        parts = _part_stages(name)
        if stage.name not in parts or len(set(parts)) == 1:
            continue
        others = sorted({f"PatchStage '{p}'" if p else "layers outside any stage" for p in parts if p != stage.name})
        logger.warning(
            "PatchStage '%s': the converter fused its layers with %s into one op (%s writing '%s'); "
            "its KP_PATCH_STAGE op %s that op. Start or end the stage after the BatchNormalization/ReLU "
            "that follows a convolution to keep the two the same.",
            stage.name, " and ".join(others), tflite.op_type(i), name,
            "holds" if i in marked else "does not hold",
        )


def _stage_op_set(tflite: TFLiteModel, stage: PatchStage) -> tuple:
    """(entry tensor, exit tensor) of the ops the converter made from `stage`."""
    from keras_patch.keras.patch_stage import stage_of_tensor_name

    marked = [
        i for i in range(tflite.num_ops)
        if any(stage_of_tensor_name(tflite.tensor(t).name) == stage.name for t in tflite.op_outputs(i))
    ]
    if not marked:
        raise UnsupportedModelError(
            f"PatchStage '{stage.name}': the converter produced no ops under its name scope; "
            f"the stage may have been folded away."
        )
    _warn_fused_across(tflite, stage, marked)
    producers = tflite.producers()
    marked_set = set(marked)
    external = []
    for i in marked:
        for t in tflite.op_inputs(i):
            if t < 0 or tflite.is_constant(t):
                continue
            if producers.get(t) not in marked_set and t not in external:
                external.append(t)
    if len(external) != 1:
        names = [tflite.tensor(t).name for t in external]
        raise UnsupportedModelError(
            f"PatchStage '{stage.name}': its converted ops read {len(external)} outside tensors {names}; "
            f"a stage must have exactly one input."
        )
    exit_op = max(marked)
    return external[0], tflite.op_outputs(exit_op)[0]


def export_tflite(
    model,
    representative_dataset: RepresentativeData,
    path: Optional[Union[str, os.PathLike]] = None,
    int8_io: bool = True,
    allow_worse: Optional[bool] = None,
    arena=True,
) -> bytes:
    """Exports a Keras model to int8 `.tflite`, each PatchStage as one KP_PATCH_STAGE op.

    Args:
        model: a Keras model, possibly containing `PatchStage` layers.
        representative_dataset: calibration samples: an array (N, H, W, C),
            an iterable of arrays, or a TFLite-style generator function.
        path: if given, the model is also written there (atomically: a failed
            export leaves no file). The path is checked before the conversion
            starts.
        int8_io: int8 model input and output (the default, as on an MCU).
        allow_worse: what to do when the PatchStages raise the predicted TFLM
            arena head above running the model layer by layer
            (`keras_patch.planner.guard.check_never_worse`): None (default)
            logs a warning, False raises (nothing is written), True accepts.
        arena: the arena passes run on the exported model (int8 input, PAD
            folding, in-place depthwise, offline memory plan;
            `keras_patch.graph.passes.pipeline.ArenaOptions`): True (all),
            False (none) or an `ArenaOptions`.

    Returns:
        The `.tflite` bytes.

    Raises:
        CalibrationDataError: empty calibration data, a sample whose shape
            does not fit the model input, NaN/inf values, or values that
            overflow float32 inside the model; checked before TensorFlow's
            quantizer, which would crash the process on them.
        UnsupportedModelError: a stage the converter turned into ops that
            cannot run patch by patch, or whose grid exceeds its output.
        WorseThanLayerByLayerError: `allow_worse=False` and the stages raise
            the arena head.
        KerasPatchError: `path` cannot be written (a folder, a missing
            parent folder, ...).
    """
    if path is not None:
        check_output_path(path)
    stages = patch_stages(model)
    converted = convert_int8(model, representative_dataset, int8_io=int8_io)
    tflite = TFLiteModel.from_bytes(converted)
    for stage in stages:
        entry, exit_tensor = _stage_op_set(tflite, stage)
        ops = stage_ops(tflite, entry, exit_tensor)
        try:
            plan = plan_stage(tflite, ops, entry, exit_tensor, stage.grid)
        except UnsupportedModelError as e:
            raise UnsupportedModelError(f"PatchStage '{stage.name}': {e}") from None
        rewrite_stage(tflite, plan)
        logger.info("PatchStage '%s': %d ops -> one KP_PATCH_STAGE op", stage.name, len(ops))
    import dataclasses

    from keras_patch.graph.passes.pipeline import ArenaOptions, optimize_arena

    arena = ArenaOptions.resolve(arena)
    if not int8_io:  # a float input was asked for: keep it
        arena = dataclasses.replace(arena, int8_input=False)
    optimize_arena(tflite, arena)
    result = tflite.to_bytes()
    if stages and allow_worse is not True:
        from keras_patch.planner.guard import check_never_worse

        names = ", ".join(f"'{stage.name}'" for stage in stages)
        check_never_worse(result, allow_worse=allow_worse, what=f"the exported model (PatchStage {names})",
                          override="allow_worse=True (--allow-worse)")
    if path is not None:
        write_atomically(path, result)
    return result
