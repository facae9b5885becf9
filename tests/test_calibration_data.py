"""Calibration data that TensorFlow's quantizer cannot use gets a clear error, never a crash.

NaN/inf samples used to kill the process inside TensorFlow's quantizer (SIGSEGV,
nothing printed) or to yield float ops; empty data and samples of the wrong
shape gave raw TFLite RuntimeErrors.  Each case is refused with a
`CalibrationDataError` naming the sample, before any conversion, through the
API and through `keras-patch export`.
"""

import os
import subprocess
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import numpy as np
import pytest

import keras
from keras_patch._console import PROGRESS_LINE
from keras_patch.cli import main
from keras_patch.errors import CalibrationDataError
from keras_patch.keras.export import convert_int8, export_tflite
from keras_patch.graph.tflite_model import TFLiteModel


@pytest.fixture(scope="module")
def tiny_model():
    keras.utils.set_random_seed(0)
    return keras.Sequential([
        keras.Input((8, 8, 3)),
        keras.layers.Conv2D(4, 3, activation="relu"),
        keras.layers.GlobalAveragePooling2D(),
        keras.layers.Dense(2),
    ])


def _samples(n=4):
    return np.random.default_rng(0).random((n, 8, 8, 3), dtype=np.float32)


def _with(value, sample=2, where=(1, 5, 2)):
    x = _samples()
    x[(sample,) + where] = value
    return x


@pytest.mark.parametrize(
    "data, message",
    [
        (_with(np.nan), "sample 2 holds 1 NaN value (first at index (1, 5, 2))"),
        (_with(np.inf), "sample 2 holds 1 +inf value (first at index (1, 5, 2))"),
        (_with(-np.inf), "sample 2 holds 1 -inf value (first at index (1, 5, 2))"),
        (np.full((3, 8, 8, 3), np.nan, np.float32), "sample 0 holds 192 NaN values"),
        (np.zeros((0, 8, 8, 3), np.float32), "holds no samples"),
        (_samples()[:, :7], "shape (4, 7, 8, 3) does not fit the model input"),
        (_samples()[..., 0], "shape (4, 8, 8) does not fit the model input"),
        (np.array([["a"]]), "are not numbers"),
    ],
    ids=["nan", "+inf", "-inf", "all-nan", "empty", "wrong-shape", "wrong-rank", "strings"],
)
def test_array_data_is_checked_before_conversion(tiny_model, data, message, monkeypatch):
    import tensorflow as tf

    def no_conversion(*args, **kwargs):
        raise AssertionError("the converter ran on bad calibration data")

    monkeypatch.setattr(tf.lite.TFLiteConverter, "from_keras_model", no_conversion)
    with pytest.raises(CalibrationDataError, match="representative_dataset") as info:
        export_tflite(tiny_model, data)
    assert message in str(info.value) and "\n" not in str(info.value)


def test_expected_shape_is_named(tiny_model):
    with pytest.raises(CalibrationDataError) as info:
        export_tflite(tiny_model, _samples()[:, :, :5])
    assert "(None, 8, 8, 3)" in str(info.value) and "expected (N, 8, 8, 3)" in str(info.value)


@pytest.mark.parametrize("form", ["list", "generator function"])
@pytest.mark.parametrize(
    "bad, message",
    [
        (np.inf, "sample 1 holds 1 +inf value"),
        (np.nan, "sample 1 holds 1 NaN value"),
        ("shape", "sample 1: shape (1, 8, 9, 3) does not fit the model input"),
    ],
    ids=["inf", "nan", "shape"],
)
def test_iterable_and_generator_data(tiny_model, form, bad, message):
    samples = [s[None] for s in _samples(3)]
    if bad == "shape":
        samples[1] = np.zeros((1, 8, 9, 3), np.float32)
    else:
        samples[1][0, 0, 0, 0] = bad
    if form == "list":
        data = [[s] for s in samples]
    else:
        def data():
            for s in samples:
                yield [s]
    with pytest.raises(CalibrationDataError, match="representative_dataset") as info:
        export_tflite(tiny_model, data)
    assert message in str(info.value)


def test_empty_iterable_and_generator(tiny_model):
    with pytest.raises(CalibrationDataError, match="no samples"):
        export_tflite(tiny_model, [])
    with pytest.raises(CalibrationDataError, match="yielded no samples"):
        export_tflite(tiny_model, lambda: iter(()))


def test_wrong_number_of_inputs(tiny_model):
    with pytest.raises(CalibrationDataError, match="sample 0 holds 2 arrays, but the model has 1 input"):
        export_tflite(tiny_model, [[_samples(1), _samples(1)]])


def test_good_data_in_every_form_converts(tiny_model):
    """Arrays, lists of unbatched samples and generator functions all calibrate."""
    x = _samples(3)
    expected = TFLiteModel.from_bytes(export_tflite(tiny_model, x))
    for data in ([s for s in x], lambda: ([s[None]] for s in x)):
        got = TFLiteModel.from_bytes(export_tflite(tiny_model, data))
        np.testing.assert_array_equal(got.tensor(got.inputs[0]).scale, expected.tensor(expected.inputs[0]).scale)


def test_overflow_inside_the_model_is_refused(tiny_model):
    """Finite inputs whose activations overflow float32 crashed TensorFlow's quantizer."""
    x = _samples()
    x[2] = 3e38
    with pytest.raises(CalibrationDataError, match=r"calibration recorded the range \[.*inf\] for tensor"):
        convert_int8(tiny_model, x)


def _cli(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.parametrize(
    "data, message",
    [
        (_with(np.nan), "sample 2 holds 1 NaN value"),
        (_with(np.inf), "sample 2 holds 1 +inf value"),
        (_with(-np.inf), "sample 2 holds 1 -inf value"),
        (np.zeros((0, 8, 8, 3), np.float32), "holds no samples"),
        (_samples()[:, :7], "does not fit the model input"),
        (_samples()[..., 0], "(N, H, W, C)"),
    ],
    ids=["nan", "+inf", "-inf", "empty", "wrong-shape", "wrong-rank"],
)
def test_cli_export_refuses_bad_rep_data(capsys, tmp_path, tiny_model, data, message):
    model_path = tmp_path / "m.keras"
    tiny_model.save(model_path)
    rep = tmp_path / "rep.npy"
    np.save(rep, data)
    out_path = tmp_path / "m.tflite"
    code, out, err = _cli(capsys, "export", str(model_path), "--rep-data", str(rep), "--out", str(out_path))
    assert code == 2 and out == ""
    errors = [line for line in err.splitlines() if not PROGRESS_LINE.fullmatch(line)]  # "loading m.keras ... 0.1 s"
    assert len(errors) == 1 and err.endswith(errors[0] + "\n"), err
    assert errors[0].startswith("keras-patch export: error: --rep-data") and message in errors[0]
    assert "Traceback" not in err
    assert not out_path.exists()


def test_a_crash_while_converter_output_is_captured_is_reported(tmp_path):
    """A fatal signal inside the converter printed nothing: its report went to the capture file."""
    code = (
        "import ctypes\n"
        "from keras_patch.keras.export import _captured_output\n"
        "with _captured_output():\n"
        "    ctypes.string_at(0)\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
        env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", "PYTHONPATH": os.pathsep.join(sys.path)},
    )
    assert proc.returncode != 0
    assert "Segmentation fault" in proc.stderr and 'File "<string>", line 4' in proc.stderr


def test_capture_keeps_the_callers_faulthandler(capsys):
    """The crash report is redirected only while the converter runs, even under capsys (no fileno)."""
    import faulthandler

    from keras_patch.keras.export import _captured_output

    faulthandler.enable(file=sys.__stderr__)
    with _captured_output():
        assert faulthandler.is_enabled()
    assert faulthandler.is_enabled()
