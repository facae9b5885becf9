"""keras_patch.run_tflite: argument checks and models the reference kernels cannot run."""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import numpy as np
import pytest

from keras_patch.errors import KerasPatchError, UnsupportedModelError
from keras_patch.runtime import run_tflite
from keras_patch.tflite_model import TFLiteModel


def test_collapsed_add_is_an_error_not_an_abort(residual):
    """TFLite's/TFLM's reference ADD aborts the process on such a model; we say why instead."""
    m = TFLiteModel.from_bytes(residual)
    add = next(i for i in range(m.num_ops) if m.op_type(i) == "ADD")
    out = m.subgraph.tensors[m.op_outputs(add)[0]]
    out.quantization.scale = np.array([1e-12], np.float32)
    with pytest.raises(UnsupportedModelError, match=rf"op {add} \(ADD -> .*output scale 1e-12.*must be < 1"):
        run_tflite(m.to_bytes(), np.zeros((1, 48, 48, 3), np.int8))


def test_input_checks_name_the_input(residual):
    with pytest.raises(ValueError, match="must be int8"):
        run_tflite(residual, np.zeros((1, 48, 48, 3), np.float32))
    with pytest.raises(ValueError, match=r"shape \(N, \*\(48, 48, 3\)\)"):
        run_tflite(residual, np.zeros((1, 40, 48, 3), np.int8))
    with pytest.raises(ValueError, match="1 inputs, got 2"):
        run_tflite(residual, [np.zeros((1, 48, 48, 3), np.int8)] * 2)


def test_batch_runs_sample_by_sample(residual):
    x = np.random.default_rng(0).integers(-128, 128, (3, 48, 48, 3), dtype=np.int8)
    batched = run_tflite(residual, x)[0]
    single = np.concatenate([run_tflite(residual, x[i:i + 1])[0] for i in range(3)])
    np.testing.assert_array_equal(batched, single)


def test_empty_batch_names_the_shape(residual):
    with pytest.raises(KerasPatchError, match=r"batch of 0 \(shape \(0, 48, 48, 3\)\).*\(1, 48, 48, 3\).*at least one"):
        run_tflite(residual, np.zeros((0, 48, 48, 3), np.int8))


@pytest.fixture(scope="module")
def fixed_batch_2():
    """A full-int8 model whose input declares batch 2 (keras.Input(batch_size=2))."""
    import keras

    from keras_patch.export import convert_int8

    keras.utils.set_random_seed(0)
    model = keras.Sequential([
        keras.Input((8, 8, 3), batch_size=2),
        keras.layers.Conv2D(4, 3, activation="relu"),
        keras.layers.GlobalAveragePooling2D(),
        keras.layers.Dense(3),
    ])
    samples = [np.random.default_rng(i).random((2, 8, 8, 3), dtype=np.float32) for i in range(3)]
    return bytes(convert_int8(model, samples))


def test_fixed_batch_model_runs_in_chunks_of_its_batch(fixed_batch_2):
    from keras_patch.runtime import litert_interpreter

    m = TFLiteModel.from_bytes(fixed_batch_2)
    assert tuple(m.tensor(m.inputs[0]).shape) == (2, 8, 8, 3)
    x = np.random.default_rng(0).integers(-128, 128, (4, 8, 8, 3), dtype=np.int8)
    out = run_tflite(fixed_batch_2, x)[0]
    interp = litert_interpreter(fixed_batch_2)
    expected = []
    for chunk in (x[:2], x[2:]):
        interp.set_tensor(interp.get_input_details()[0]["index"], chunk)
        interp.invoke()
        expected.append(interp.get_tensor(interp.get_output_details()[0]["index"]).copy())
    np.testing.assert_array_equal(out, np.concatenate(expected))
    assert out.shape == (4, 3)


@pytest.mark.parametrize("n", [0, 1, 3])
def test_fixed_batch_model_rejects_other_batches(fixed_batch_2, n):
    with pytest.raises(KerasPatchError, match=rf"batch of {n} .*\(2, 8, 8, 3\).*multiple of 2"):
        run_tflite(fixed_batch_2, np.zeros((n, 8, 8, 3), np.int8))
