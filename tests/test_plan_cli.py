"""`keras-patch plan`, its bad input, and the never-worse guarantee on every path that writes a patched model.

A patch stage can *raise* the arena head (issue 10): on `model_zoo.residual_model`
a 2x2 stage ending at `b1_expand_relu` needs 30,752 B where layer by layer needs
23,040 B. `patchify`, `export`, `export-arduino` (and their Python functions)
refuse such a model unless told `--allow-worse` / `allow_worse=True`.
"""

import json
import logging
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import numpy as np
import pytest

import model_zoo
from keras_patch.arena.profiler import profile
from keras_patch.cli import main, parse_size
from keras_patch.errors import KerasPatchError, WorseThanLayerByLayerError
from keras_patch.graph.patchify import patchify
from keras_patch.runtime.host import run_tflite

WORSE_SPLIT, WORSE_GRID = "b1_expand_relu", (2, 2)  # raises residual_model's head (see the module docstring)
TAIL = 9000  # --tail-bytes: no tflite-micro wheel run


def _run(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def _one_line(err: str, *words) -> str:
    """The one error line (the progress lines of steps that finished before it aside)."""
    from keras_patch._console import PROGRESS_LINE

    lines = [line for line in err.splitlines() if line.strip() and not PROGRESS_LINE.fullmatch(line)]
    assert len(lines) == 1, err
    assert "Traceback" not in err, err
    for word in words:
        assert word in lines[0], err
    return lines[0]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """residual_model as an int8 .tflite, and the same with a stage that raises the arena head."""
    d = tmp_path_factory.mktemp("plan")
    plain = model_zoo.to_int8_tflite(model_zoo.residual_model())
    worse = patchify(plain, WORSE_SPLIT, WORSE_GRID)
    (d / "plain.tflite").write_bytes(plain)
    (d / "worse.tflite").write_bytes(worse)
    return d / "plain.tflite", d / "worse.tflite"


def test_the_worse_model_is_worse(models):
    prof = profile(str(models[1]))
    assert prof.patched_peak_bytes > prof.layer_by_layer_peak_bytes
    assert profile(str(models[1]), kernel="cmsis_nn").patched_peak_bytes > prof.layer_by_layer_peak_bytes


# ---------------------------------------------------------------- sizes


@pytest.mark.parametrize("text, expected", [
    ("262144", 262144), ("256K", 262144), ("256k", 262144), ("256KiB", 262144), ("256 KB", 262144),
    ("1M", 1 << 20), ("1.5M", 3 << 19), ("0.5K", 512), (" 64b ", 64),
])
def test_parse_size(text, expected):
    assert parse_size(text) == expected


@pytest.mark.parametrize("text, words", [
    ("12Q", ["'12Q'", "256K"]), ("", ["''"]), ("K", ["'K'"]), ("-5", ["'-5'"]), ("１２K", ["'１２K'"]),
    ("0", ["more than 0"]), ("0K", ["more than 0"]), ("1.3", ["whole number of bytes"]), ("1e3", ["'1e3'"]),
])
def test_parse_size_errors(text, words):
    with pytest.raises(KerasPatchError) as e:
        parse_size(text)
    for word in words:
        assert word in str(e.value)


# ------------------------------------------------------ plan: bad input


def _no_search(monkeypatch):
    import keras_patch.planner.search as search

    def refuse(*args, **kwargs):
        raise AssertionError("the planner must not run on bad input")

    monkeypatch.setattr(search, "plan", refuse)


@pytest.mark.parametrize("argv, words", [
    (["--max-overhead", "0.9"], ["--max-overhead", "1 or more", "0.9"]),
    (["--max-overhead", "-1"], ["--max-overhead", "-1"]),
    (["--max-overhead", "nan"], ["--max-overhead", "'nan'"]),
    (["--max-overhead", "fast"], ["--max-overhead", "'fast'"]),
    (["--sram", "12Q"], ["--sram", "'12Q'"]),
    (["--sram", "0"], ["--sram", "more than 0"]),
    (["--sram", "-256K"], ["--sram", "'-256K'"]),
    (["--grids", "2x2,0x2"], ["--grids", "n_h=0"]),
    (["--grids", ","], ["--grids"]),
    (["--kernel", "fast"], ["--kernel", "fast"]),
])
def test_plan_bad_arguments(capsys, models, tmp_path, monkeypatch, argv, words):
    pytest.importorskip("keras_patch.planner.search")
    _no_search(monkeypatch)
    code, out, err = _run(capsys, "plan", models[0], "--out", tmp_path / "p.tflite", *argv)
    assert code == 2 and out == ""
    assert _one_line(err, *words).startswith("keras-patch plan: error: argument")
    assert list(tmp_path.iterdir()) == []


def test_plan_bad_model_and_output_paths(capsys, models, tmp_path, monkeypatch):
    pytest.importorskip("keras_patch.planner.search")
    _no_search(monkeypatch)
    (tmp_path / "adir").mkdir()
    (tmp_path / "m.keras").write_bytes(b"PK")
    cases = [
        ([tmp_path / "none.tflite"], ["No .tflite model", "none.tflite"]),
        ([tmp_path / "m.keras"], ["m.keras", "keras-patch export"]),
        ([models[0], "--out", tmp_path / "adir"], ["adir"]),
        ([models[0], "--out", tmp_path / "no" / "p.tflite"], ["p.tflite"]),
    ]
    for argv, words in cases:
        code, out, err = _run(capsys, "plan", *argv)
        assert code == 2 and out == "", err
        assert _one_line(err, *words).startswith("keras-patch plan: error:")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adir", "m.keras"]
    assert list((tmp_path / "adir").iterdir()) == []


# ------------------------------------------------------ never worse: patchify


def test_patchify_refuses_a_worse_stage_unless_allowed(capsys, models, tmp_path):
    plain = models[0]
    out_path = tmp_path / "o.tflite"
    code, out, err = _run(capsys, "patchify", plain, out_path, "--split", WORSE_SPLIT, "--grid", "2x2")
    assert code == 2 and out == ""
    prof = profile(str(models[1]))
    _one_line(err, "keras-patch patchify: error:", f"{prof.patched_peak_bytes:,} B",
              f"{prof.layer_by_layer_peak_bytes:,} B", "layer by layer", "keras-patch plan", "--allow-worse")
    assert list(tmp_path.iterdir()) == []
    code, out, err = _run(capsys, "patchify", plain, out_path, "--split", WORSE_SPLIT, "--grid", "2x2",
                          "--allow-worse")
    assert code == 0, err
    assert out_path.read_bytes() == models[1].read_bytes()


def test_patchify_keeps_a_stage_that_lowers_the_head(capsys, models, tmp_path):
    code, _, err = _run(capsys, "patchify", models[0], tmp_path / "o.tflite", "--split", "b1_project", "--grid", "2x2")
    assert code == 0, err
    prof = profile(str(tmp_path / "o.tflite"))
    assert prof.patched_peak_bytes < prof.layer_by_layer_peak_bytes


# ------------------------------------------------- never worse: export-arduino


@pytest.mark.parametrize("sketch", ["basic", "memory-report"])
def test_export_arduino_refuses_a_worse_model_unless_allowed(capsys, models, tmp_path, sketch):
    out_dir = tmp_path / "Sketch"
    argv = ["export-arduino", models[1], "--out", out_dir, "--tail-bytes", TAIL, "--sketch", sketch]
    code, out, err = _run(capsys, *argv)
    assert code == 2 and out == ""
    head = profile(str(models[1]), kernel="cmsis_nn").patched_peak_bytes
    _one_line(err, "keras-patch export-arduino: error:", "worse.tflite", f"{head:,} B", "--allow-worse")
    assert not out_dir.exists()
    code, out, err = _run(capsys, *argv, "--allow-worse")
    assert code == 0, err
    assert out_dir.is_dir()


def test_export_arduino_functions_refuse_a_worse_model(models, tmp_path):
    from keras_patch.arduino.examples import export_memory_report, export_person_detection
    from keras_patch.arduino.sketch import export_sketch

    for export in (export_sketch, export_memory_report):
        with pytest.raises(WorseThanLayerByLayerError, match="layer by layer"):
            export(str(models[1]), str(tmp_path / "S"), tail_bytes=TAIL)
        assert not (tmp_path / "S").exists()
    gray = model_zoo.to_int8_tflite(model_zoo.residual_model(input_shape=(48, 48, 1), num_classes=2))
    worse_gray = patchify(gray, WORSE_SPLIT, WORSE_GRID)
    assert profile(worse_gray, kernel="cmsis_nn").patched_peak_bytes > profile(gray).layer_by_layer_peak_bytes
    with pytest.raises(WorseThanLayerByLayerError):
        export_person_detection(worse_gray, str(tmp_path / "P"), tail_bytes=TAIL)
    assert not (tmp_path / "P").exists()
    result = export_person_detection(worse_gray, str(tmp_path / "P"), tail_bytes=TAIL, allow_worse=True)
    assert os.path.isfile(result.ino_path)


def test_export_arduino_takes_unpatched_and_better_models(capsys, models, tmp_path):
    code, _, err = _run(capsys, "export-arduino", models[0], "--out", tmp_path / "Plain", "--tail-bytes", TAIL)
    assert code == 0, err


# ------------------------------------------------------- never worse: Keras


def _worse_keras_model():
    import keras_patch

    return keras_patch.wrap_stage(model_zoo.residual_model(), until=WORSE_SPLIT, grid=WORSE_GRID)


def test_export_tflite_warns_refuses_or_accepts_a_worse_stage(tmp_path, caplog):
    from keras_patch.keras.export import export_tflite

    model = _worse_keras_model()
    data = np.random.default_rng(0).random((2, 48, 48, 3), dtype=np.float32)
    with caplog.at_level(logging.WARNING, logger="keras_patch"):
        tflite = export_tflite(model, data)
    assert any("layer by layer" in r.getMessage() and r.levelno == logging.WARNING for r in caplog.records)
    prof = profile(tflite)
    assert prof.num_stages == 1 and prof.patched_peak_bytes > prof.layer_by_layer_peak_bytes
    path = tmp_path / "m.tflite"
    with pytest.raises(WorseThanLayerByLayerError, match="PatchStage"):
        export_tflite(model, data, path=str(path), allow_worse=False)
    assert not path.exists()
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="keras_patch"):
        assert export_tflite(model, data, allow_worse=True) == tflite
    assert not caplog.records


def test_cli_export_refuses_a_worse_stage_unless_allowed(capsys, tmp_path):
    model_path, data_path = tmp_path / "m.keras", tmp_path / "d.npy"
    _worse_keras_model().save(model_path)
    np.save(data_path, np.random.default_rng(0).random((2, 48, 48, 3), dtype=np.float32))
    out_path = tmp_path / "m.tflite"
    code, out, err = _run(capsys, "export", model_path, "--rep-data", data_path, "--out", out_path)
    assert code == 2 and out == ""
    _one_line(err, "keras-patch export: error:", "layer by layer", "--allow-worse")
    assert not out_path.exists()
    code, out, err = _run(capsys, "export", model_path, "--rep-data", data_path, "--out", out_path, "--allow-worse")
    assert code == 0, err
    assert profile(str(out_path)).num_stages == 1


# ------------------------------------------------------------ plan: the command


def test_plan_prints_the_table_and_writes_the_planned_model(capsys, models, tmp_path):
    from keras_patch.planner.search import plan

    out_path = tmp_path / "p.tflite"
    code, out, err = _run(capsys, "plan", models[0], "--max-overhead", "1.3", "--out", out_path)
    assert code == 0, err
    expected = plan(str(models[0]), max_mac_overhead=1.3)
    assert not expected.is_empty and expected.peak_bytes < expected.layer_by_layer_peak_bytes
    for stage in expected.stages:
        assert stage.end_layer in out
    assert f"{expected.peak_bytes:,}" in out and f"{expected.peak_bytes_without_input:,}" in out
    assert f"wrote {out_path}" in out
    assert "planning plain.tflite ... " in err  # off a terminal: one line when the search ends
    patched = out_path.read_bytes()
    assert patched == expected.apply(models[0].read_bytes())
    prof = profile(patched)
    # the plan's stages, plus the one-layer stages of the arena passes (in-place depthwise, folded PAD)
    assert sum(s.num_layers > 1 for s in prof.stages) == len(expected.stages)
    assert prof.patched_peak_bytes == expected.peak_bytes
    x = np.random.default_rng(0).integers(-128, 128, (2, 48, 48, 3), dtype=np.int8)
    np.testing.assert_array_equal(run_tflite(patched, x)[0], run_tflite(models[0].read_bytes(), x)[0])


def test_plan_json_round_trips(capsys, models):
    from keras_patch.planner.plan import PatchPlan

    code, out, err = _run(capsys, "plan", models[0], "--max-overhead", "1.3", "--grids", "2x2,3x3", "--json")
    assert code == 0, err
    parsed = PatchPlan.from_json(out)
    assert json.loads(out)["stages"] and all(s.grid in {(2, 2), (3, 3)} for s in parsed.stages)
    assert parsed.max_mac_overhead == 1.3 and parsed.mac_overhead <= 1.3


def test_plan_sram_budget(capsys, models, tmp_path):
    from keras_patch.planner.search import plan

    lowest = plan(str(models[0]), max_mac_overhead=1.3)
    out_path = tmp_path / "p.tflite"
    code, out, err = _run(capsys, "plan", models[0], "--max-overhead", "1.3", "--sram", lowest.peak_bytes - 1,
                          "--out", out_path)
    assert code == 2 and out == ""
    _one_line(err, "keras-patch plan: error:", f"{lowest.peak_bytes:,} B", f"{lowest.peak_bytes - 1:,} B")
    assert not out_path.exists()
    code, out, err = _run(capsys, "plan", models[0], "--max-overhead", "1.3", "--sram", lowest.peak_bytes,
                          "--json", "--out", out_path)
    assert code == 0, err
    fitted = json.loads(out)
    assert fitted["peak_bytes"] <= lowest.peak_bytes and fitted["sram_bytes"] == lowest.peak_bytes
    assert profile(str(out_path)).patched_peak_bytes == fitted["peak_bytes"]
    assert f"wrote {out_path}" in err  # --json keeps stdout JSON only


def test_plan_that_fits_layer_by_layer_writes_the_model_unchanged(capsys, models, tmp_path):
    head = profile(str(models[0])).layer_by_layer_peak_bytes
    out_path = tmp_path / "p.tflite"
    code, out, err = _run(capsys, "plan", models[0], "--sram", f"{head}", "--out", out_path, "--no-int8-input",
                          "--no-fold-pad", "--no-in-place", "--no-offline-plan")
    assert code == 0, err
    assert out_path.read_bytes() == models[0].read_bytes() and "no patch stage (empty plan)" in out


def test_plan_model_without_a_patchable_run(capsys, tmp_path):
    import keras

    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((16, 16, 3)), keras.layers.Conv2D(4, 3),
                              keras.layers.Flatten(), keras.layers.Dense(2)])
    path = tmp_path / "one_conv.tflite"
    path.write_bytes(model_zoo.to_int8_tflite(model))
    capsys.readouterr()  # the converter's warnings
    code, out, err = _run(capsys, "plan", path, "--out", tmp_path / "p.tflite")
    assert code == 2 and out == ""
    _one_line(err, "keras-patch plan: error:", "patch stage")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["one_conv.tflite"]


def test_plan_progress_bar_only_after_a_second(models, monkeypatch):
    """On a terminal the planner's progress shows as a bar once the search passes a second."""
    import io
    import sys
    import time

    import keras_patch.planner.search as search

    planned = search.plan(str(models[0]), max_mac_overhead=1.3)

    class Terminal(io.StringIO):
        def isatty(self):
            return True

    def run(delay):
        def slow_plan(model, progress=None, **kwargs):
            for _ in progress(range(3)):
                time.sleep(delay)
            return planned

        monkeypatch.setattr(search, "plan", slow_plan)
        stderr = Terminal()
        monkeypatch.setattr(sys, "stderr", stderr)
        assert main(["plan", str(models[0]), "--max-overhead", "1.3"]) == 0
        monkeypatch.setattr(sys, "stderr", sys.__stderr__)
        return stderr.getvalue()

    assert "3/3" in run(0.5)  # 1.5 s: the bar shows
    assert run(0.0) == ""  # a fast search shows nothing


@pytest.mark.parametrize("argv, words", [
    (["--start", "b2_expand_relu", "--split", "b2_add"], ["not single-entry", "residual connection", "b2_add"]),
    (["--split", "b2_expand_relu"], ["not single-exit", "b1_project", "b2_add"]),
])
def test_patchify_refuses_a_stage_that_cuts_a_residual(capsys, models, tmp_path, argv, words):
    code, out, err = _run(capsys, "patchify", models[0], tmp_path / "o.tflite", *argv)
    assert code == 2 and out == ""
    _one_line(err, "keras-patch patchify: error:", *words)
    assert list(tmp_path.iterdir()) == []
