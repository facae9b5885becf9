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
import io
import logging
import os
import tempfile
from typing import TYPE_CHECKING, Callable, Iterable, List, Optional, Union

import numpy as np

from keras_patch.errors import UnsupportedModelError
from keras_patch.files import check_output_path, write_atomically  # noqa: F401  (write_atomically: public here)
from keras_patch.patchify import plan_stage, rewrite_stage, stage_ops
from keras_patch.tflite_model import TFLiteModel

if TYPE_CHECKING:  # the layer imports Keras; `write_atomically` must not
    from keras_patch.layers.patch_stage import PatchStage

logger = logging.getLogger(__name__)

RepresentativeData = Union[np.ndarray, Callable[[], Iterable], Iterable]


def patch_stages(model) -> List[PatchStage]:
    """The PatchStage layers of a Keras model, outermost first."""
    from keras_patch.layers.patch_stage import PatchStage

    found = []
    for layer in model.layers:
        if isinstance(layer, PatchStage):
            found.append(layer)
        elif hasattr(layer, "layers"):
            found.extend(patch_stages(layer))
    return found


def _representative_dataset(data: RepresentativeData) -> Callable[[], Iterable]:
    """A TFLite-converter representative dataset from arrays or a generator."""
    if isinstance(data, np.ndarray):
        samples = data.astype(np.float32)
        if samples.ndim < 2 or len(samples) == 0:
            raise ValueError("representative_dataset must hold at least one sample (N, H, W, C).")

        def generate():
            for sample in samples:
                yield [sample[None]]

        return generate
    if callable(data):
        return data
    if isinstance(data, Iterable):
        items = list(data)

        def generate():
            for item in items:
                yield item if isinstance(item, (list, tuple, dict)) else [np.asarray(item, np.float32)]

        return generate
    raise TypeError(
        "representative_dataset must be an array of samples, an iterable, or a generator function, "
        f"got {type(data).__name__}."
    )


@contextlib.contextmanager
def _captured_output():
    """Keeps converter chatter (Python and C++) out of the caller's terminal."""
    buffer = io.StringIO()
    saved = []
    try:
        for fd in (1, 2):
            try:
                saved.append((fd, os.dup(fd)))
            except OSError:
                continue
        sink = tempfile.TemporaryFile(mode="w+")
        for fd, _ in saved:
            os.dup2(sink.fileno(), fd)
        with contextlib.redirect_stdout(buffer):
            yield buffer
    finally:
        for fd, copy in saved:
            os.dup2(copy, fd)
            os.close(copy)
        if saved:
            sink.seek(0)
            logger.debug("converter output:\n%s%s", buffer.getvalue(), sink.read())
            sink.close()


def convert_int8(model, representative_dataset: RepresentativeData, int8_io: bool = True) -> bytes:
    """Full-int8 conversion with the standard converter (per-channel weights)."""
    import tensorflow as tf

    converter = tf.lite.TFLiteConverter.from_keras_model(model)
    converter.optimizations = [tf.lite.Optimize.DEFAULT]
    converter.representative_dataset = _representative_dataset(representative_dataset)
    converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
    if int8_io:
        converter.inference_input_type = tf.int8
        converter.inference_output_type = tf.int8
    with _captured_output():
        return converter.convert()


def _stage_op_set(tflite: TFLiteModel, stage: PatchStage) -> tuple:
    """(entry tensor, exit tensor) of the ops the converter made from `stage`."""
    from keras_patch.layers.patch_stage import stage_of_tensor_name

    marked = [
        i for i in range(tflite.num_ops)
        if any(stage_of_tensor_name(tflite.tensor(t).name) == stage.name for t in tflite.op_outputs(i))
    ]
    if not marked:
        raise UnsupportedModelError(
            f"PatchStage '{stage.name}': the converter produced no ops under its name scope; "
            f"the stage may have been folded away."
        )
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

    Returns:
        The `.tflite` bytes.

    Raises:
        UnsupportedModelError: a stage the converter turned into ops that
            cannot run patch by patch, or whose grid exceeds its output.
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
    result = tflite.to_bytes()
    if path is not None:
        write_atomically(path, result)
    return result
