"""The demo's parts on a small model (fast): TFLM's own outputs, the three-way comparison, its checks.

`keras-patch demo` itself (MobileNetV2 0.35@144) runs end to end in
test_cli.py::test_demo_end_to_end (slow).
"""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import numpy as np
import pytest

import keras_patch.demo as demo
from keras_patch.arduino.boards import BOARDS, Board
from keras_patch.arena.profiler import profile
from keras_patch.arena.tflm_arena import measure_tflm_arena, run_tflm
from keras_patch.errors import KerasPatchError, UnsupportedModelError
from keras_patch.graph.patchify import patchify
from keras_patch.runtime.host import run_tflite

GRIDS = [(2, 2), (3, 3)]


def _images(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(-128, 128, (n, 48, 48, 3), dtype=np.int8)


def test_run_tflm_gives_tflm_outputs_and_arena(residual):
    x = _images(3)
    run = run_tflm(residual, x)
    (ref,) = run_tflite(residual, x)
    assert run.outputs[0].shape == (3, 10) and run.outputs[0].dtype == np.int8
    np.testing.assert_array_equal(run.outputs[0], ref)
    assert np.unique(ref).size > 1  # the comparison is not between constant outputs
    assert run.arena.head_bytes == measure_tflm_arena(residual).head_bytes


@pytest.mark.parametrize(
    "inputs, match",
    [
        (lambda: _images(2).astype(np.float32), "must be int8"),
        (lambda: np.zeros((2, 40, 48, 3), np.int8), r"\(N, \*\(48, 48, 3\)\)"),
        (lambda: np.zeros((0, 48, 48, 3), np.int8), "got int8 \\(0, 48, 48, 3\\)"),
        (lambda: [_images(1), _images(1)], "1 inputs, got 2 arrays"),
    ],
    ids=["dtype", "shape", "empty", "count"],
)
def test_run_tflm_rejects_inputs_that_do_not_match(residual, inputs, match):
    with pytest.raises(KerasPatchError, match=match):
        run_tflm(residual, inputs())


def test_run_tflm_refuses_patched_models(residual):
    with pytest.raises(UnsupportedModelError, match="KP_PATCH_STAGE"):
        run_tflm(patchify(residual, "b0_project", (2, 2)), _images(1))


@pytest.fixture(scope="module")
def compared(residual, tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    return out, demo.compare_schedules(residual, _images(2), str(out), max_mac_overhead=1.3, grids=GRIDS,
                                       title="residual", name="residual")


def test_compare_schedules_layer_by_layer_single_stage_and_plan(residual, compared):
    out, result = compared
    lbl, single, planned = result.methods
    assert (lbl.name, single.name, planned.name) == ("layer by layer", "best single stage", "whole-network plan")
    assert lbl.peak_bytes == result.stock_tflm_head_bytes == measure_tflm_arena(residual).head_bytes
    assert single.mac_overhead <= 1.3 and planned.mac_overhead <= 1.3
    # The planned model is what was checked, profiled and written; never above layer by layer.
    prof = profile(result.patched_path)
    assert prof.num_stages == len(result.plan.stages) == len(planned.stages)
    assert (prof.patched_peak_bytes, prof.patched_peak_bytes_without_input) == (
        planned.peak_bytes, planned.peak_bytes_without_input) == (
        result.plan.peak_bytes, result.plan.peak_bytes_without_input)
    assert planned.peak_bytes <= lbl.peak_bytes
    assert result.bit_exact and result.bit_exact_cpp
    stage_values = sum(int(np.prod(s.output_shape)) for s in prof.stages) * result.num_images
    assert result.stage_values_compared == stage_values
    assert result.fits_board and result.board.key == "nano33ble" and not result.board_message
    assert os.path.isfile(os.path.join(result.sketch_path, "model_data.cpp"))
    assert open(result.plot_path, "rb").read(4) == b"\x89PNG"
    assert open(result.unpatched_path, "rb").read() == residual


def test_compare_schedules_reports_outputs_that_differ(residual, tmp_path, monkeypatch):
    """The bit-exactness verdict comes from the outputs: one flipped value makes it NO."""
    import keras_patch.runtime.host as host

    real = host.run_tflite

    def off_by_one(model, images, executor="reference"):
        outputs = real(model, images, executor=executor)
        if executor == "cpp":
            outputs[0] = outputs[0].copy()
            outputs[0].flat[0] ^= 1
        return outputs

    monkeypatch.setattr(host, "run_tflite", off_by_one)
    result = demo.compare_schedules(residual, _images(1), str(tmp_path), max_mac_overhead=1.3, grids=GRIDS)
    assert result.bit_exact and not result.bit_exact_cpp


def test_compare_schedules_says_when_the_board_is_too_small(residual, tmp_path, monkeypatch):
    monkeypatch.setitem(BOARDS, "tiny", Board("tiny", "Tiny Board", "x:y:tiny", "mcu", "cortex-m4",
                                              983040, 20 * 1024, 100 * 1024, 16 * 1024))
    result = demo.compare_schedules(residual, _images(1), str(tmp_path), max_mac_overhead=1.3, grids=GRIDS,
                                    board="tiny")
    assert not result.fits_board and result.sketch_path == ""
    assert "does not fit the Tiny Board (tiny)" in result.board_message
    assert f"needs {result.board_arena_bytes:,} B" in result.board_message
    assert not os.path.exists(tmp_path / demo.DEMO_SKETCH)  # nothing half-written


@pytest.mark.parametrize("cap", [0.9, -1, float("nan"), float("inf"), "1.1", True])
def test_demo_checks_the_overhead_cap_before_building(cap, tmp_path, monkeypatch):
    monkeypatch.setattr(demo, "build_demo_model", lambda **k: pytest.fail("built the model before checking"))
    with pytest.raises(KerasPatchError, match="max_mac_overhead"):
        demo.run_demo(out_dir=str(tmp_path / "d"), max_mac_overhead=cap)
    assert not (tmp_path / "d").exists()
