"""keras_patch.profile: predictions checked against TFLM's own planner."""

import json
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import numpy as np
import pytest

import keras_patch
from keras_patch.patch_op import geometry
from keras_patch.patchify import find_stages, stage_options
from keras_patch.tflite_model import TFLiteModel
from keras_patch.tflm_arena import measure_tflm_arena


def _within(predicted: int, measured: int, tolerance: float = 0.02) -> bool:
    return abs(predicted - measured) <= tolerance * measured


@pytest.mark.parametrize("name", ["mbv2_144", "residual"])
def test_layer_by_layer_peak_equals_tflm_arena_head(name, request):
    model = request.getfixturevalue(name)
    measured = measure_tflm_arena(model).head_bytes
    summary = keras_patch.profile(model).summary
    assert _within(summary["layer_by_layer_peak_bytes"], measured)
    assert summary["layer_by_layer_peak_bytes"] == measured  # in practice it is exact
    if name == "mbv2_144":
        assert measured == 311_040  # the figure for int8 input


def test_unpatched_model_has_no_stage_and_no_overhead(residual):
    prof = keras_patch.profile(residual)
    s = prof.summary
    assert s["num_stages"] == 0 and prof.stages == []
    assert s["patched_peak_bytes"] == s["layer_by_layer_peak_bytes"]
    assert s["mac_overhead"] == 1.0
    assert len(prof.rows) == TFLiteModel.from_bytes(residual).num_ops


def test_patched_profile(mbv2_144):
    tm = TFLiteModel.from_bytes(mbv2_144)
    split = tm.find_tensor(next(tm.tensor(t).name for t in range(len(tm.subgraph.tensors))
                                if "block_2_add" in tm.tensor(t).name))
    patched = keras_patch.patchify(mbv2_144, tm.tensor(split).name, (4, 4))
    prof = keras_patch.profile(patched)
    s = prof.summary
    stock = keras_patch.profile(mbv2_144).summary["layer_by_layer_peak_bytes"]
    # The layer-by-layer view of the patched model is the unpatched network again.
    assert _within(s["layer_by_layer_peak_bytes"], stock)
    assert s["patched_peak_bytes"] < stock / 2.5
    assert s["patched_peak_bytes_without_input"] < s["patched_peak_bytes"]
    assert s["mac_overhead"] > 1.0
    (stage,) = prof.stages
    opts = stage_options(TFLiteModel.from_bytes(patched), find_stages(TFLiteModel.from_bytes(patched))[0])
    arena = geometry.plan_patch_arena(opts).total_bytes
    assert stage.patch_arena_bytes == arena
    assert stage.grid == (4, 4) and stage.input_shape == (144, 144, 3)
    assert stage.receptive_field[0] > 3 and stage.patch_input_shape[0] < 144
    # At the stage op TFLM holds its input, its output and the patch arena.
    in_bytes = 144 * 144 * 3
    out_bytes = int(np.prod(stage.output_shape))
    assert s["patched_peak_bytes"] >= in_bytes + out_bytes + arena
    stage_rows = [r for r in prof.rows if r.stage is not None]
    assert len(stage_rows) == stage.num_layers
    assert max(r.patched_live_bytes for r in stage_rows) <= s["patched_peak_bytes"]
    assert s["patched_macs"] == s["macs"] - stage.macs + stage.patched_macs
    table = prof.table()
    assert "patched" in table and f"{s['patched_peak_bytes']:,}" in table
    json.dumps(prof.to_dict(), default=list)


def test_one_by_one_grid_costs_no_extra_macs(residual):
    tm = TFLiteModel.from_bytes(residual)
    add = next(i for i in range(tm.num_ops) if tm.op_type(i) == "ADD")
    prof = keras_patch.profile(keras_patch.patchify(residual, add, (1, 1)))
    assert prof.summary["mac_overhead"] == 1.0


def test_plot_writes_a_png(residual, tmp_path):
    tm = TFLiteModel.from_bytes(residual)
    add = next(i for i in range(tm.num_ops) if tm.op_type(i) == "ADD")
    path = keras_patch.profile(keras_patch.patchify(residual, add, (3, 3))).plot(str(tmp_path / "memory.png"))
    with open(path, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_profile_of_a_keras_model_with_a_patch_stage():
    import keras

    block = keras.Sequential([
        keras.Input((40, 40, 3)),
        keras.layers.Conv2D(8, 3, strides=2, padding="same", activation="relu6"),
        keras.layers.DepthwiseConv2D(3, padding="same"),
        keras.layers.ReLU(6.0),
    ])
    inputs = keras.Input((40, 40, 3))
    x = keras_patch.PatchStage(block, grid=(2, 2))(inputs)
    x = keras.layers.Conv2D(16, 1)(x)
    outputs = keras.layers.Dense(3)(keras.layers.GlobalAveragePooling2D()(x))
    prof = keras_patch.profile(keras.Model(inputs, outputs))
    assert prof.summary["num_stages"] == 1
    assert prof.stages[0].grid == (2, 2) and prof.stages[0].num_layers == 2
