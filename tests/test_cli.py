"""The `keras-patch` command line: every command, its errors, and no half-written files."""

import json
import os
import re
import stat
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
from keras_patch.stage.options import CUSTOM_CODE
from keras_patch.runtime.host import run_tflite
from keras_patch.graph.tflite_model import TFLiteModel


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


def test_profile_plot_by_block(capsys, residual_tflite, tmp_path):
    code, out, err = _run(capsys, "profile", str(residual_tflite), "--plot", str(tmp_path / "b.png"), "--by", "block")
    assert code == 0, err
    assert (tmp_path / "b.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "no patch stage, nothing to compare" in out and "x lower" not in out
    assert main(["profile", str(residual_tflite), "--plot", str(tmp_path / "c.png"), "--by", "layer"]) == 2
    assert not (tmp_path / "c.png").exists()


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
    assert code == 2 and "Close matches: ['block_2_add']" in err and len(err.strip().splitlines()) == 1


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
    # The tiny stage raises the arena head (a 2x2 grid on a 6x6 output); tests/test_plan_cli.py checks the refusal.
    code, out, _ = _run(capsys, "export", str(model_path), "--rep-data", str(samples), "--out", str(tmp_path / "m.tflite"),
                        "--allow-worse")
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
    from keras_patch.keras import export as export_module

    def refuse(*args, **kwargs):
        raise export_module.UnsupportedModelError("op 1 (MEAN -> 'x') cannot run inside a patch stage")

    monkeypatch.setattr(export_module, "plan_stage", refuse)
    out_path = tmp_path / "m.tflite"
    code, _, err = _run(capsys, "export", str(model_path), "--rep-data", str(tmp_path / "rep.npy"), "--out", str(out_path))
    assert code == 2 and "PatchStage 'stage'" in err and "MEAN" in err
    assert not out_path.exists() and not [p for p in tmp_path.iterdir() if p.suffix == ".tmp"]


def _split_arg(tflite_path):
    m = TFLiteModel.from_bytes(tflite_path.read_bytes())
    return str(next(i for i in range(m.num_ops) if m.op_type(i) == "ADD"))


def test_patchify_output_path_errors_name_the_users_path(capsys, residual_tflite, tmp_path):
    split = _split_arg(residual_tflite)
    (tmp_path / "adir").mkdir()
    (tmp_path / "afile").write_text("x")
    cases = [
        (tmp_path / "adir", "is a folder"),
        (tmp_path / "missing" / "out.tflite", f"the folder '{tmp_path / 'missing'}' does not exist"),
        (tmp_path / "afile" / "out.tflite", f"'{tmp_path / 'afile'}' is not a folder"),
    ]
    for out_path, message in cases:
        code, _, err = _run(capsys, "patchify", str(residual_tflite), str(out_path), "--split", split)
        line = _one_line_error(err, "patchify")
        assert code == 2 and message in line and f"'{out_path}'" in line, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adir", "afile"] and not os.listdir(tmp_path / "adir")


def test_written_files_get_the_umask_and_keep_their_mode(capsys, residual_tflite, tmp_path):
    """mkstemp made every written .tflite 0600; a new file gets the umask, an old one keeps its mode."""
    split = _split_arg(residual_tflite)
    old_mask = os.umask(0o022)
    try:
        out_path, plot = tmp_path / "p.tflite", tmp_path / "m.png"
        assert _run(capsys, "patchify", str(residual_tflite), str(out_path), "--split", split)[0] == 0
        assert _run(capsys, "profile", str(residual_tflite), "--plot", str(plot))[0] == 0
        assert stat.S_IMODE(out_path.stat().st_mode) == stat.S_IMODE(plot.stat().st_mode) == 0o644
        out_path.chmod(0o640)
        plot.chmod(0o604)
        assert _run(capsys, "patchify", str(residual_tflite), str(out_path), "--split", split, "--grid", "2x2")[0] == 0
        assert _run(capsys, "profile", str(residual_tflite), "--plot", str(plot))[0] == 0
        assert stat.S_IMODE(out_path.stat().st_mode) == 0o640 and stat.S_IMODE(plot.stat().st_mode) == 0o604
        os.umask(0o027)
        out_path = tmp_path / "q.tflite"
        assert _run(capsys, "patchify", str(residual_tflite), str(out_path), "--split", split)[0] == 0
        assert stat.S_IMODE(out_path.stat().st_mode) == 0o640
    finally:
        os.umask(old_mask)


def test_profile_plot_writes_exactly_the_path_given(capsys, residual_tflite, tmp_path, monkeypatch):
    """`--plot DIR` said it wrote DIR but wrote DIR.png; a plain name got '.png' appended."""
    code, out, err = _run(capsys, "profile", str(residual_tflite), "--plot", str(tmp_path / "memory"))
    assert code == 0, err
    assert f"plot written to {tmp_path / 'memory'}\n" in out
    assert sorted(p.name for p in tmp_path.iterdir()) == ["memory"]
    assert (tmp_path / "memory").read_bytes()[:4] == b"\x89PNG"
    code, out, err = _run(capsys, "profile", str(residual_tflite), "--plot", str(tmp_path / "memory.svg"))
    assert code == 0 and b"<svg" in (tmp_path / "memory.svg").read_bytes()[:500]

    # Refused before the model is profiled: a folder, a missing folder, an unknown format.
    from keras_patch.arena import profiler

    monkeypatch.setattr(profiler, "profile", lambda *a, **k: pytest.fail("profiled before checking --plot"))
    (tmp_path / "figs").mkdir()
    cases = [(tmp_path / "figs", "is a folder"), (tmp_path / "no" / "m.png", "does not exist"),
             (tmp_path / "m.txt", "unknown image format")]
    for plot, message in cases:
        code, out, err = _run(capsys, "profile", str(residual_tflite), "--plot", str(plot))
        assert code == 2 and message in _one_line_error(err, "profile") and f"'{plot}'" in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["figs", "memory", "memory.svg"]
    assert not os.listdir(tmp_path / "figs")


def test_export_checks_the_output_path_before_converting(capsys, tmp_path, monkeypatch):
    """A bad --out used to fail only after the model was loaded and converted, naming a temp file."""
    from keras_patch import cli
    from keras_patch.keras import export as export_module
    from keras_patch.errors import KerasPatchError

    np.save(tmp_path / "rep.npy", np.zeros((2, 12, 12, 3), np.float32))
    (tmp_path / "adir").mkdir()
    monkeypatch.setattr(cli, "_load_keras", lambda path: pytest.fail("model loaded before checking --out"))
    cases = [(tmp_path / "adir", "is a folder"), (tmp_path / "missing" / "m.tflite", "does not exist"),
             ("", "empty")]
    for out_path, message in cases:
        code, _, err = _run(capsys, "export", str(tmp_path / "m.keras"), "--rep-data", str(tmp_path / "rep.npy"),
                            "--out", str(out_path))
        assert code == 2 and message in _one_line_error(err, "export"), err

    monkeypatch.setattr(export_module, "convert_int8", lambda *a, **k: pytest.fail("converted before checking path"))
    with pytest.raises(KerasPatchError, match="is a folder"):
        export_module.export_tflite(_keras_with_stage((2, 2)), np.zeros((2, 12, 12, 3), np.float32),
                                    path=tmp_path / "adir")


def test_missing_model_file(capsys, tmp_path):
    code, _, err = _run(capsys, "profile", str(tmp_path / "nope.tflite"))
    assert code == 2 and "nope.tflite" in err


@pytest.mark.slow
def test_demo_end_to_end(tmp_path):
    """`keras-patch demo` as a user runs it: layer by layer vs one stage vs the plan, bit-exactness
    against TFLM, a model that fits the Nano 33 BLE Sense, the plot."""
    proc = subprocess.run(
        [sys.executable, "-m", "keras_patch.cli", "demo", "--out-dir", str(tmp_path), "--images", "2"],
        capture_output=True, text=True, timeout=900,
        env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"},
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    out = proc.stdout
    assert "stock TFLM arena head, measured (tflite-micro): 311,040 B" in out
    assert ("bit-exact vs TFLM's output of the unpatched int8 model (tflite-micro) on 2 images: "
            "YES (reference executor), YES (C++ kernel core)") in out
    # ...on logits that are not all the same value (random weights easily fade to nothing).
    distinct = int(re.search(r"the logits \((\d+) distinct int8 values\)", out).group(1))
    assert distinct >= 8, out[-800:]
    planned = keras_patch.profile(str(tmp_path / "mobilenetv2_patched.tflite"))
    assert planned.num_stages >= 1 and planned.mac_overhead <= 1.10
    assert f"{planned.num_stages} stage output(s)" in out
    # The three ways side by side; the plan is no worse than the best single stage at the same cap.
    heads = {name: int(value.replace(",", "")) for name, value in
             re.findall(r"^(layer by layer|best single stage|whole-network plan) +([\d,]+) B", out, re.M)}
    assert heads["whole-network plan"] == planned.patched_peak_bytes
    assert heads["whole-network plan"] <= heads["best single stage"] < heads["layer by layer"] == 311_040
    assert "fits: tensor arena" in out
    assert (tmp_path / "memory.png").read_bytes()[:4] == b"\x89PNG"
    assert (tmp_path / "KerasPatchDemo" / "KerasPatchDemo.ino").exists()
    # The demo's own model fits the Nano 33 BLE Sense: `export-arduino --board nano33ble` succeeds
    # (before whole-network plans the demo's patched model needed 222,480 B with 212,992 B left).
    code = main(["export-arduino", str(tmp_path / "mobilenetv2_patched.tflite"), "--out", str(tmp_path / "Nano"),
                 "--board", "nano33ble"])
    assert code == 0 and (tmp_path / "Nano" / "Nano.ino").exists()


def _one_line_error(err: str, *words) -> str:
    """The CLI's usage and input errors: one line on stderr naming what is wrong, no traceback, no usage dump."""
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert "Traceback" not in err and "usage:" not in err, err
    for word in words:
        assert word in lines[0], err
    return lines[0]


@pytest.mark.parametrize(
    "argv, words",
    [
        (["patchify", "{model}", "{out}/o.tflite", "--split", "0", "--grid", "-2x2"], ["--grid", "n_h=-2"]),
        (["patchify", "{model}", "{out}/o.tflite", "--split", "0", "--grid", "２x２"], ["--grid", "'２x２'", "ASCII"]),
        (["patchify", "{model}", "{out}/o.tflite", "--split", "0", "--grid", "0x2"], ["--grid", "n_h=0"]),
        (["export-arduino", "{model}", "--out", "{out}/S", "--tail-bytes", "-1"], ["--tail-bytes", "-1", "0 or more"]),
        (["export-arduino", "{model}", "--out", "{out}/S", "--arena-bytes", "0"], ["--arena-bytes", "1 or more"]),
        (["export-arduino", "{model}", "--out", "{out}/S", "--arena-bytes", "-64"], ["--arena-bytes", "-64"]),
        (["export-arduino", "{model}", "--out", "{out}/S", "--arena-bytes", "１０"], ["--arena-bytes", "integer"]),
        (["export-arduino", "{model}", "--out", "{out}/S", "--person-class", "-1"], ["--person-class", "-1"]),
        (["demo", "--out-dir", "{out}/d", "--images", "0"], ["--images", "1 or more, got 0"]),
        (["demo", "--out-dir", "{out}/d", "--images", "-2"], ["--images", "got -2"]),
        (["demo", "--out-dir", "{out}/d", "--grid", "2.5x2"], ["--grid", "'2.5x2'"]),
        (["demo", "--out-dir", "{out}/d", "--max-overhead", "0.9"], ["--max-overhead", "1 or more", "got 0.9"]),
        (["demo", "--out-dir", "{out}/d", "--max-overhead", "x"], ["--max-overhead", "'x'"]),
        (["patchify", "{model}", "{out}/o.tflite"], ["--split", "required"]),
    ],
    ids=["grid-negative", "grid-fullwidth", "grid-zero", "tail-bytes", "arena-zero", "arena-negative",
         "arena-fullwidth", "person-class", "images-0", "images-negative", "demo-grid", "demo-overhead",
         "demo-overhead-text", "missing-split"],
)
def test_bad_arguments_are_one_line_and_exit_2(capsys, residual_tflite, tmp_path, monkeypatch, argv, words):
    import keras_patch.demo

    def no_demo(*args, **kwargs):
        raise AssertionError("the demo must not start with a bad argument")

    monkeypatch.setattr(keras_patch.demo, "run_demo", no_demo)
    argv = [a.format(model=residual_tflite, out=tmp_path) for a in argv]
    code, _, err = _run(capsys, *argv)
    assert code == 2
    line = _one_line_error(err, *words)
    assert line.startswith(f"keras-patch {argv[0]}: error: argument") or "required" in line
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("start", ["9999", "-5"])
def test_patchify_start_out_of_range(capsys, residual_tflite, tmp_path, start):
    num_tensors = len(TFLiteModel.from_bytes(residual_tflite.read_bytes()).subgraph.tensors)
    code, _, err = _run(capsys, "patchify", str(residual_tflite), str(tmp_path / "o.tflite"), "--split", "5",
                        "--start", start)
    assert code == 2
    _one_line_error(err, f"start {start}", f"valid indices are 0 to {num_tensors - 1}")
    assert list(tmp_path.iterdir()) == []


def _broken_keras_files(tmp_path):
    import zipfile

    (tmp_path / "empty.keras").write_bytes(b"")
    (tmp_path / "random.keras").write_bytes(np.random.default_rng(0).integers(0, 256, 3000, np.uint8).tobytes())
    with zipfile.ZipFile(tmp_path / "noconfig.keras", "w") as z:
        z.writestr("metadata.json", "{}")
    return [("empty.keras", "the file is empty"), ("random.keras", "3,000 bytes are not a zip archive"),
            ("noconfig.keras", "no config.json")]


@pytest.mark.parametrize("command", ["profile", "export"])
def test_broken_keras_file_is_not_a_valid_archive(capsys, tmp_path, command):
    np.save(tmp_path / "rep.npy", np.zeros((1, 12, 12, 3), np.float32))
    for name, detail in _broken_keras_files(tmp_path):
        extra = ["--rep-data", str(tmp_path / "rep.npy"), "--out", str(tmp_path / "o.tflite")] if command == "export" else []
        code, _, err = _run(capsys, command, str(tmp_path / name), *extra)
        assert code == 2
        line = _one_line_error(err, name, "not a valid .keras archive", detail)
        assert "not found" not in line.lower()
    assert not (tmp_path / "o.tflite").exists()


_CUSTOM_LAYER_MODULE = '''
import keras


@keras.saving.register_keras_serializable(package="kp_cli_test")
class TimesTwo(keras.layers.Layer):
    def call(self, x):
        return x * 2.0
'''


def test_unregistered_custom_layer(capsys, tmp_path):
    """The class is named with how to register it; `--custom-module` then loads the model."""
    import importlib.util

    module_path = tmp_path / "kp_cli_custom_layers.py"
    module_path.write_text(_CUSTOM_LAYER_MODULE)
    spec = importlib.util.spec_from_file_location("kp_cli_custom_layers", module_path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    registry = keras.saving.get_custom_objects()
    try:
        keras.utils.set_random_seed(0)
        model = keras.Sequential([keras.Input((8, 8, 3)), keras.layers.Conv2D(4, 3), module.TimesTwo()])
        model.save(tmp_path / "custom.keras")
        del registry["kp_cli_test>TimesTwo"]  # as in a fresh process that never imported the module

        code, _, err = _run(capsys, "profile", str(tmp_path / "custom.keras"))
        assert code == 2
        _one_line_error(err, "'TimesTwo'", "register_keras_serializable(package='kp_cli_test')",
                        "--custom-module", "custom_objects")
        code, _, err = _run(capsys, "profile", str(tmp_path / "custom.keras"), "--custom-module", "no_such_module_kp")
        assert code == 2
        _one_line_error(err, "--custom-module no_such_module_kp", "No module named")

        code, out, _ = _run(capsys, "profile", str(tmp_path / "custom.keras"), "--custom-module", str(module_path))
        assert code == 0 and "peak SRAM" in out
    finally:
        registry.pop("kp_cli_test>TimesTwo", None)
        sys.modules.pop("kp_cli_custom_layers", None)
