"""keras_patch.run_tflite: argument checks and models the reference kernels cannot run."""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import subprocess
import sys

import numpy as np
import pytest

from keras_patch.errors import KerasPatchError, UnsupportedModelError
from keras_patch.runtime.host import quantize_input, run_tflite
from keras_patch.graph.tflite_model import TFLiteModel


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
        run_tflite(residual, np.zeros((1, 48, 48, 3), np.int32))
    # a float array for an int8 input is quantized with the input's scale and zero point
    x = np.random.default_rng(0).random((1, 48, 48, 3), dtype=np.float32)
    np.testing.assert_array_equal(run_tflite(residual, x)[0], run_tflite(residual, quantize_input(residual, x))[0])
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

    from keras_patch.keras.export import convert_int8

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
    from keras_patch.runtime.host import litert_interpreter

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


# --------------------------------------------- kernels that abort the process

_RAW_LITERT = """
import sys, numpy as np
from ai_edge_litert.interpreter import Interpreter, OpResolverType
it = Interpreter(model_path=sys.argv[1], experimental_op_resolver_type=OpResolverType.BUILTIN_REF)
it.allocate_tensors()
for d in it.get_input_details():
    it.set_tensor(d["index"], _fill(d["shape"], d["dtype"]))
it.invoke()
"""
_RAW_TFLM = """
import sys, numpy as np
from tflite_micro.python.tflite_micro import runtime
it = runtime.Interpreter.from_bytes(open(sys.argv[1], "rb").read(), arena_size=1 << 20)
for i in range(int(sys.argv[2])):
    d = it.get_input_details(i)
    it.set_input(_fill(tuple(d["shape"]), d["dtype"]), i)
it.invoke()
"""


_FILL = """
import numpy as np
def _fill(shape, dtype, flat={flat}):
    n = int(np.prod(shape))
    return np.zeros(shape, dtype) if flat else (np.arange(n) % 256 - 128).astype(dtype).reshape(shape)
"""


def _aborts(model_bytes: bytes, tmp_path, runtime: str = "litert", flat: bool = False) -> bool:
    """Whether the unscreened interpreter dies of SIGABRT (in a child process) on ramp inputs, or zeros."""
    path = tmp_path / "m.tflite"
    path.write_bytes(model_bytes)
    n = len(TFLiteModel.from_bytes(model_bytes).inputs)
    code = _FILL.format(flat=flat) + (_RAW_LITERT if runtime == "litert" else _RAW_TFLM)
    proc = subprocess.run([sys.executable, "-c", code, str(path), str(n)], capture_output=True, timeout=120)
    return proc.returncode in (-6, 134)


@pytest.fixture(scope="module")
def kernel_zoo() -> bytes:
    """ADD, SUB, SQUARED_DIFFERENCE, LESS on a 4x4x2 input; SOFTMAX over 600 classes, LOG_SOFTMAX over 10."""
    import keras
    import tensorflow as tf

    from keras_patch.keras.export import convert_int8

    keras.utils.set_random_seed(0)
    # Named: calibration samples are keyed by input name; the .tflite keeps this input order.
    image, logits, logits2 = (keras.Input((4, 4, 2), name="a_image"), keras.Input((600,), name="b_logits"),
                              keras.Input((10,), name="c_logits"))
    x = keras.layers.Conv2D(2, 1)(image)
    outputs = [
        keras.layers.Add()([image, x]),
        keras.layers.Subtract()([image, x]),
        keras.layers.Lambda(lambda t: tf.math.squared_difference(t[0], t[1]))([image, x]),
        keras.layers.Softmax()(logits),
        keras.layers.Lambda(tf.nn.log_softmax)(logits2),
        keras.layers.Lambda(lambda t: tf.cast(tf.math.less(t[0], t[1]), tf.float32))([image, x]),
    ]
    rng = np.random.default_rng(0)
    samples = [{"a_image": rng.random((1, 4, 4, 2), dtype=np.float32),
                "b_logits": rng.normal(0, 3, (1, 600)).astype(np.float32),
                "c_logits": rng.normal(0, 3, (1, 10)).astype(np.float32)} for _ in range(4)]
    return bytes(convert_int8(keras.Model([image, logits, logits2], outputs), lambda: iter(samples)))


def _feed(model_bytes: bytes, **arrays) -> list:
    """The arrays in the model's input order, matched by input name ('a_image', ...)."""
    m = TFLiteModel.from_bytes(model_bytes)
    return [next(a for k, a in arrays.items() if k in m.tensor(t).name) for t in m.inputs]


def _with_scale(model_bytes: bytes, op_type: str, which: str, scale: float):
    m = TFLiteModel.from_bytes(model_bytes)
    op = next(i for i in range(m.num_ops) if m.op_type(i) == op_type)
    t = m.op_outputs(op)[0] if which == "out" else m.op_inputs(op)[int(which)]
    m.subgraph.tensors[t].quantization.scale = np.array([scale], np.float32)
    return m.to_bytes(), op


@pytest.mark.parametrize("op_type, which, scale, runtime, message", [
    ("ADD", "out", 1e-12, "litert", r"output multiplier .* must be < 1"),
    ("SUB", "out", 1e-12, "tflm", r"output multiplier .* must be < 1"),
    ("SQUARED_DIFFERENCE", "out", 1e-9, "litert", r"\(2 \* max input scale\)\^2 .* must be < 1"),
    ("ADD", "0", 0.0, "litert", r"must be positive and finite"),
    ("SOFTMAX", "0", 1e-8, "litert", r"input scale 1e-08 is too small .* must be > 1"),
    ("SOFTMAX", "0", 1e-8, "tflm", r"input scale 1e-08 is too small .* must be > 1"),
    ("LOG_SOFTMAX", "0", 1e-8, "litert", r"input scale 1e-08 is too small .* must be > 1"),
    ("LESS", "0", 2.0, "tflm", r"input scales \[2\.0, .*\] must be in \(0, 1\)"),
])
def test_prepare_aborts_are_errors(kernel_zoo, tmp_path, op_type, which, scale, runtime, message):
    """Each screened condition really kills the process in the raw interpreter; run_tflite names it."""
    bad, op = _with_scale(kernel_zoo, op_type, which, scale)
    assert not _aborts(kernel_zoo, tmp_path, runtime)
    assert _aborts(bad, tmp_path, runtime)
    with pytest.raises(UnsupportedModelError, match=rf"op {op} \({op_type} -> .*{message}.*abort"):
        run_tflite(bad, _feed(bad, a_image=np.zeros((1, 4, 4, 2), np.int8),
                              b_logits=np.arange(600).astype(np.int8)[None], c_logits=np.zeros((1, 10), np.int8)))


def test_flat_softmax_over_many_classes_is_an_error(kernel_zoo, tmp_path):
    """600 equal logits: the int8 SOFTMAX's Q12.19 exp() sum reaches 512 and the kernel aborts in Eval."""
    assert not _aborts(kernel_zoo, tmp_path)  # ramp inputs: a few large logits
    assert _aborts(kernel_zoo, tmp_path, flat=True)  # zero inputs: equal logits
    image = np.zeros((1, 4, 4, 2), np.int8)
    with pytest.raises(UnsupportedModelError, match=r"SOFTMAX .*exp\(\) sum of this input, 600\.0, reaches"):
        run_tflite(kernel_zoo, _feed(kernel_zoo, a_image=image, b_logits=np.zeros((1, 600), np.int8),
                                     c_logits=np.zeros((1, 10), np.int8)))
    peaked = np.full((1, 600), -128, np.int8)
    peaked[0, :5] = 127
    outputs = run_tflite(kernel_zoo, _feed(kernel_zoo, a_image=image, b_logits=peaked,
                                           c_logits=np.zeros((1, 10), np.int8)))
    probs = next(y for y in outputs if y.shape == (1, 600))
    assert probs[0, :5].min() > probs[0, 5:].max()  # softmax ran


def test_multiplier_replica_matches_tflite_rounding():
    from keras_patch.runtime.host import _quantize_multiplier, _smaller_than_one_ok

    assert _quantize_multiplier(0.5) == (1 << 30, 0)
    assert _quantize_multiplier(1.0) == (1 << 30, 1)
    assert _quantize_multiplier(1 - 2.0 ** -40) == (1 << 30, 1)  # rounds up to 1.0: shift 1
    assert not _smaller_than_one_ok(1 - 2.0 ** -40) and _smaller_than_one_ok(1 - 2.0 ** -20)
    assert not _smaller_than_one_ok(float("nan")) and not _smaller_than_one_ok(0.0)
