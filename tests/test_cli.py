"""The `keras-patch` command line: every command, its errors, and no half-written files."""

import json
import os
import re
import subprocess
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import numpy as np
import pytest

import keras
import model_zoo
import keras_patch
from keras_patch import PatchStage
from keras_patch.cli import main
from keras_patch.patch_op.options import CUSTOM_CODE
from keras_patch.runtime import run_tflite
from keras_patch.tflite_model import TFLiteModel


def _run(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture(scope="module")
def residual_tflite(tmp_path_factory):
    path = tmp_path_factory.mktemp("cli") / "residual.tflite"
    path.write_bytes(model_zoo.to_int8_tflite(model_zoo.residual_model()))
    return path


def _keras_with_stage(grid):
    keras.utils.set_random_seed(0)
    block = keras.Sequential([
        keras.Input((12, 12, 3)),
        keras.layers.Conv2D(8, 3, strides=2, padding="same", activation="relu6"),
        keras.layers.DepthwiseConv2D(3, padding="same", activation="relu6"),
    ])
    inputs = keras.Input((12, 12, 3))
    x = PatchStage(block, grid=grid, name="stage")(inputs)
    x = keras.layers.GlobalAveragePooling2D()(x)
    return keras.Model(inputs, keras.layers.Dense(2)(x))


def test_profile_table_json_and_plot(capsys, residual_tflite, tmp_path):
    code, out, _ = _run(capsys, "profile", str(residual_tflite), "--plot", str(tmp_path / "m.png"))
    assert code == 0 and "peak SRAM (TFLM arena head)" in out
    assert (tmp_path / "m.png").read_bytes()[:4] == b"\x89PNG"
    code, out, _ = _run(capsys, "profile", str(residual_tflite), "--json")
    assert code == 0
    summary = json.loads(out)["summary"]
    assert summary["patched_peak_bytes"] == summary["layer_by_layer_peak_bytes"] > 0


def test_patchify_readme_command_takes_a_keras_layer_name(capsys, mbv2_144, tmp_path):
    """README: `keras-patch patchify IN.tflite OUT.tflite --split block_2_add --grid 4x4`."""
    src = tmp_path / "IN.tflite"
    src.write_bytes(mbv2_144)
    code, out, err = _run(capsys, "patchify", str(src), str(tmp_path / "OUT.tflite"),
                          "--split", "block_2_add", "--grid", "4x4")
    assert code == 0, err
    m = TFLiteModel.from_bytes(mbv2_144)
    add = next(i for i in range(m.num_ops) if "/block_2_add_1/" in m.tensor(m.op_outputs(i)[0]).name)
    assert (tmp_path / "OUT.tflite").read_bytes() == keras_patch.patchify(mbv2_144, add, (4, 4))
    code, _, err = _run(capsys, "patchify", str(src), str(tmp_path / "x.tflite"), "--split", "block_2_ad")
    assert code == 2 and "block_2_add_1/Add" in err and len(err.strip().splitlines()) == 1


def test_patchify_writes_a_bit_exact_model(capsys, residual_tflite, tmp_path):
    m = TFLiteModel.from_bytes(residual_tflite.read_bytes())
    add = next(i for i in range(m.num_ops) if m.op_type(i) == "ADD")
    out_path = tmp_path / "patched.tflite"
    code, out, _ = _run(capsys, "patchify", str(residual_tflite), str(out_path), "--split", str(add), "--grid", "3x2")
    assert code == 0 and "wrote" in out
    patched = out_path.read_bytes()
    assert CUSTOM_CODE in [TFLiteModel.from_bytes(patched).op_type(i) for i in range(TFLiteModel.from_bytes(patched).num_ops)]
    x = np.random.default_rng(0).integers(-128, 128, (2, 48, 48, 3), dtype=np.int8)
    np.testing.assert_array_equal(run_tflite(patched, x)[0], run_tflite(residual_tflite.read_bytes(), x)[0])


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--split", "no_such_tensor"], "no_such_tensor"),
        (["--split", "0", "--grid", "64x64"], "64x64"),
        (["--split", "0", "--grid", "4by4"], "grid"),
    ],
)
def test_patchify_errors_leave_no_file(capsys, residual_tflite, tmp_path, argv, message):
    out_path = tmp_path / "out.tflite"
    code, _, err = _run(capsys, "patchify", str(residual_tflite), str(out_path), *argv)
    assert code == 2 and message in err and err.startswith("keras-patch patchify: error:")
    assert list(tmp_path.iterdir()) == []


def test_patchify_corrupt_input_leaves_no_file(capsys, residual_tflite, tmp_path):
    bad = tmp_path / "bad.tflite"
    bad.write_bytes(residual_tflite.read_bytes()[:1000])
    code, _, err = _run(capsys, "patchify", str(bad), str(tmp_path / "out.tflite"), "--split", "0")
    assert code == 2 and "error" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.tflite"]


def test_export_and_its_errors(capsys, tmp_path):
    model_path = tmp_path / "m.keras"
    _keras_with_stage((2, 2)).save(model_path)
    samples = tmp_path / "rep.npy"
    np.save(samples, np.random.default_rng(0).random((3, 12, 12, 3), dtype=np.float32))
    code, out, _ = _run(capsys, "export", str(model_path), "--rep-data", str(samples), "--out", str(tmp_path / "m.tflite"))
    assert code == 0 and "wrote" in out
    exported = TFLiteModel.from_bytes((tmp_path / "m.tflite").read_bytes())
    assert [exported.op_type(i) for i in range(exported.num_ops)].count(CUSTOM_CODE) == 1

    # Calibration data of the wrong rank, and a missing file: clear errors, no output.
    np.save(tmp_path / "flat.npy", np.zeros((3, 12), np.float32))
    for rep, message in [(tmp_path / "flat.npy", "(N, H, W, C)"), (tmp_path / "none.npy", "no file")]:
        out_path = tmp_path / "bad.tflite"
        code, _, err = _run(capsys, "export", str(model_path), "--rep-data", str(rep), "--out", str(out_path))
        assert code == 2 and message in err and not out_path.exists()


def test_export_unsupported_stage_leaves_no_file(capsys, tmp_path, monkeypatch):
    """A stage the converter turns into ops that cannot run patch by patch."""
    model_path = tmp_path / "m.keras"
    _keras_with_stage((2, 2)).save(model_path)
    np.save(tmp_path / "rep.npy", np.random.default_rng(0).random((2, 12, 12, 3), dtype=np.float32))
    from keras_patch import export as export_module

    def refuse(*args, **kwargs):
        raise export_module.UnsupportedModelError("op 1 (MEAN -> 'x') cannot run inside a patch stage")

    monkeypatch.setattr(export_module, "plan_stage", refuse)
    out_path = tmp_path / "m.tflite"
    code, _, err = _run(capsys, "export", str(model_path), "--rep-data", str(tmp_path / "rep.npy"), "--out", str(out_path))
    assert code == 2 and "PatchStage 'stage'" in err and "MEAN" in err
    assert not out_path.exists() and not [p for p in tmp_path.iterdir() if p.suffix == ".tmp"]


def test_missing_model_file(capsys, tmp_path):
    code, _, err = _run(capsys, "profile", str(tmp_path / "nope.tflite"))
    assert code == 2 and "nope.tflite" in err


def test_demo_end_to_end(tmp_path):
    """`keras-patch demo` as a user runs it: memory table, bit-exactness, plot."""
    proc = subprocess.run(
        [sys.executable, "-m", "keras_patch.cli", "demo", "--out-dir", str(tmp_path), "--images", "2"],
        capture_output=True, text=True, timeout=900,
        env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"},
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    out = proc.stdout
    assert "stock TFLM arena head, measured (tflite-micro): 311,040 B" in out
    assert "bit-exact vs the unpatched int8 model on 2 images: YES (reference executor), YES (C++ kernel core)" in out
    # ...on logits that are not all the same value (random weights easily fade to nothing).
    distinct = int(re.search(r"the logits \((\d+) distinct int8 values\)", out).group(1))
    assert distinct >= 8, out[-800:]
    assert "all 10,368 int8 values of the stage output" in out  # 2 images x 18x18x16
    assert "KP_PATCH_STAGE" in out or "stage #" in out
    assert (tmp_path / "memory.png").read_bytes()[:4] == b"\x89PNG"
    assert (tmp_path / "mobilenetv2_patched.tflite").exists()
