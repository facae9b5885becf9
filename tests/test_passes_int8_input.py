"""`drop_input_quantize`: float input + QUANTIZE -> int8 input, same bits, smaller arena.

Random stage architectures (tests/strategies.py) are converted with float32
I/O (the graph starts with QUANTIZE); the pass makes the QUANTIZE's int8
output the graph input.  `run_tflite` quantizes a float array for an int8
input as TFLite's QUANTIZE does, so the same float images must give the same
outputs, bit for bit, before and after (values on rounding ties, beyond the
int8 range and at zero included).
"""

import os

os.environ["TF_CPP_MIN_LOG_LEVEL"] = "3"

import contextlib  # noqa: E402
import io  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

try:
    from tests import strategies as kps
    from tests.model_zoo import to_int8_tflite
except ImportError:
    import strategies as kps
    from model_zoo import to_int8_tflite

from keras_patch.arena.memory_planner import BUFFER_ALIGNMENT, align_up, arena_head_bytes  # noqa: E402
from keras_patch.graph.passes.int8_input import drop_input_quantize  # noqa: E402
from keras_patch.graph.tflite_model import TFLiteModel  # noqa: E402
from keras_patch.runtime.host import quantize, run_tflite  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore:Statistics for quantized inputs")

_PROFILE = os.environ.get("KP_HYPOTHESIS_PROFILE", "ci")
_EXAMPLES = {"ci": 6, "dev": 3}.get(_PROFILE, 6)


def _float_model(spec) -> bytes:
    with contextlib.redirect_stdout(io.StringIO()):
        return to_int8_tflite(kps.build_model(spec), int8_io=False)


def _float_images(shape, scale: float, zero_point: int, seed: int) -> np.ndarray:
    """Uniform images, plus one of rounding ties, out-of-range values and zeros."""
    rng = np.random.default_rng(seed)
    random = rng.uniform(-0.5, 1.5, size=(2, *shape)).astype(np.float32)
    k = rng.integers(-140 - zero_point, 140 - zero_point, size=shape)
    ties = ((k + 0.5) * np.float32(scale)).astype(np.float32)  # many divide back to exactly k + 0.5
    ties.flat[::7] = 0.0
    ties.flat[1::11] = 1e6
    ties.flat[2::13] = -1e6
    return np.concatenate([random, ties[None]], axis=0)


@settings(max_examples=_EXAMPLES, deadline=None, derandomize=_PROFILE == "ci", database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(spec=kps.stage_specs(max_size=16, max_blocks=3), seed=st.integers(0, 2**31 - 1))
def test_dropped_quantize_gives_the_same_bits_and_a_smaller_arena(spec, seed):
    original = _float_model(spec)
    model = TFLiteModel.from_bytes(original)
    float_input = model.tensor(model.inputs[0])
    assert float_input.dtype == np.float32 and model.op_type(0) == "QUANTIZE"
    q_out = model.tensor(model.op_outputs(0)[0])
    head_before = arena_head_bytes(model)

    dropped = drop_input_quantize(model)
    assert len(dropped) == 1
    d = dropped[0]
    assert d.input_name == float_input.name and d.bytes_saved == float_input.num_bytes
    assert np.float32(d.scale) == q_out.scale[0] and d.zero_point == q_out.zero_point[0]
    new_input = model.tensor(model.inputs[0])
    assert new_input.dtype == np.int8 and new_input.shape == float_input.shape
    assert "QUANTIZE" not in [model.op_type(i) for i in range(model.num_ops)]
    assert all(model.tensor(t).dtype != np.float32 or t in model.outputs
               for t in range(len(model.subgraph.tensors)))
    head_after = arena_head_bytes(model)
    # The float input (4 bytes a value) is gone from the arena; nothing grew.
    assert head_after <= head_before
    assert head_before - head_after <= align_up(float_input.num_bytes, BUFFER_ALIGNMENT)

    dropped_bytes = model.to_bytes()
    x = _float_images(float_input.shape[1:], d.scale, d.zero_point, seed)
    want = run_tflite(original, x)
    got = run_tflite(dropped_bytes, x)
    for w, g in zip(want, got):
        np.testing.assert_array_equal(g, w)
    # and the int8 model's own input path: quantize() then run == run on floats
    for w, g in zip(want, run_tflite(dropped_bytes, quantize(x, d.scale, d.zero_point))):
        np.testing.assert_array_equal(g, w)


def test_no_op_on_an_int8_input_model():
    spec = kps.StageSpec(input_shape=(6, 6, 2), blocks=(kps.Conv(filters=3, kernel=(3, 3), strides=(1, 1),
                                                                     padding="same"),),
                         seed=1)
    with contextlib.redirect_stdout(io.StringIO()):
        data = to_int8_tflite(kps.build_model(spec))
    model = TFLiteModel.from_bytes(data)
    assert drop_input_quantize(model) == []
    assert model.to_bytes() == TFLiteModel.from_bytes(data).to_bytes()


def test_a_float_input_read_by_more_than_the_quantize_is_kept():
    model = TFLiteModel.from_bytes(_float_model(kps.StageSpec(
        input_shape=(5, 5, 1), blocks=(kps.Relu(act="relu"),), seed=3)))
    # a second reader of the float input: the graph also outputs it
    model.add_outputs([model.inputs[0]])
    assert drop_input_quantize(model) == []
    assert model.tensor(model.inputs[0]).dtype == np.float32


def test_run_tflite_quantizes_float_arrays_for_int8_inputs():
    spec = kps.StageSpec(input_shape=(7, 5, 3), blocks=(kps.Relu(act="relu6"),), seed=4)
    with contextlib.redirect_stdout(io.StringIO()):
        data = to_int8_tflite(kps.build_model(spec))
    info = TFLiteModel.from_bytes(data).tensor(TFLiteModel.from_bytes(data).inputs[0])
    x = np.random.default_rng(0).random((2, 7, 5, 3), dtype=np.float32)
    q = quantize(x, info.scale[0], info.zero_point[0])
    for a, b in zip(run_tflite(data, x), run_tflite(data, q)):
        np.testing.assert_array_equal(a, b)


def test_quantize_rounds_half_away_from_zero():
    # 2.5 and -2.5 are exact in float32: TfLiteRound gives 3 and -3 (numpy's round gives 2 and -2)
    assert quantize(np.array([2.5, -2.5, 0.5, -0.5, 1.49999988]), 1.0, 0).tolist() == [3, -3, 1, -1, 1]
    assert quantize(np.array([1e10, -1e10, np.inf, -np.inf]), 0.5, 10).tolist() == [127, -128, 127, -128]
