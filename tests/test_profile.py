"""keras_patch.profile: predictions checked against TFLM's own planner."""

import dataclasses
import json
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import numpy as np
import pytest

import keras_patch
from keras_patch.stage import geometry
from keras_patch.graph.patchify import find_stages, stage_options
from keras_patch.graph.tflite_model import TFLiteModel
from keras_patch.arena.tflm_arena import measure_tflm_arena


def _within(predicted: int, measured: int, tolerance: float = 0.02) -> bool:
    return abs(predicted - measured) <= tolerance * measured


@pytest.mark.parametrize("name", ["mbv2_144", "residual"])
def test_layer_by_layer_peak_equals_tflm_arena_head(name, request):
    model = request.getfixturevalue(name)
    measured = measure_tflm_arena(model).head_bytes
    prof = keras_patch.profile(model)
    assert _within(prof.layer_by_layer_peak_bytes, measured)
    assert prof.layer_by_layer_peak_bytes == measured  # in practice it is exact
    if name == "mbv2_144":
        assert measured == 311_040  # the figure for int8 input


def test_unpatched_model_has_no_stage_and_no_overhead(residual):
    prof = keras_patch.profile(residual)
    assert prof.num_stages == 0 and prof.stages == []
    assert prof.patched_peak_bytes == prof.layer_by_layer_peak_bytes
    assert prof.mac_overhead == 1.0
    assert len(prof.rows) == TFLiteModel.from_bytes(residual).num_ops


def test_patched_profile(mbv2_144):
    tm = TFLiteModel.from_bytes(mbv2_144)
    split = tm.find_tensor(next(tm.tensor(t).name for t in range(len(tm.subgraph.tensors))
                                if "block_2_add" in tm.tensor(t).name))
    patched = keras_patch.patchify(mbv2_144, tm.tensor(split).name, (4, 4), arena=False)  # one stage alone
    prof = keras_patch.profile(patched)
    stock = keras_patch.profile(mbv2_144).layer_by_layer_peak_bytes
    # The layer-by-layer view of the patched model is the unpatched network again.
    assert _within(prof.layer_by_layer_peak_bytes, stock)
    assert prof.patched_peak_bytes < stock / 2.5
    assert prof.patched_peak_bytes_without_input < prof.patched_peak_bytes
    assert prof.mac_overhead > 1.0
    (stage,) = prof.stages
    opts = stage_options(TFLiteModel.from_bytes(patched), find_stages(TFLiteModel.from_bytes(patched))[0])
    arena = geometry.plan_patch_arena(opts).total_bytes
    assert stage.patch_arena_bytes == arena
    assert stage.grid == (4, 4) and stage.input_shape == (144, 144, 3)
    assert stage.receptive_field[0] > 3 and stage.patch_input_shape[0] < 144
    # At the stage op TFLM holds its input, its output and the patch arena.
    in_bytes = 144 * 144 * 3
    out_bytes = int(np.prod(stage.output_shape))
    assert prof.patched_peak_bytes >= in_bytes + out_bytes + arena
    stage_rows = [r for r in prof.rows if r.stage is not None]
    assert len(stage_rows) == stage.num_layers
    assert max(r.patched_live_bytes for r in stage_rows) <= prof.patched_peak_bytes
    assert prof.patched_macs == prof.macs - stage.macs + stage.patched_macs
    table = prof.table()
    assert "patched" in table and f"{prof.patched_peak_bytes:,}" in table
    json.dumps(prof.to_dict(), default=list)


def test_one_by_one_grid_costs_no_extra_macs(residual):
    tm = TFLiteModel.from_bytes(residual)
    add = next(i for i in range(tm.num_ops) if tm.op_type(i) == "ADD")
    prof = keras_patch.profile(keras_patch.patchify(residual, add, (1, 1)))
    assert prof.mac_overhead == 1.0


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
    assert prof.num_stages == 1
    assert prof.stages[0].grid == (2, 2) and prof.stages[0].num_layers == 2


# ---------------------------------------------- summary figures as attributes, blocks, plot

SUMMARY_KEYS = ("layer_by_layer_peak_bytes", "patched_peak_bytes", "layer_by_layer_peak_bytes_without_input",
                "patched_peak_bytes_without_input", "macs", "patched_macs", "mac_overhead", "patched_peak_op",
                "num_stages", "greedy_head_bytes", "greedy_head_bytes_without_input", "offline_plan_head_bytes",
                "offline_plan_head_bytes_without_input", "lower_bound_bytes", "lower_bound_bytes_without_input")


@pytest.fixture(scope="module")
def mbv2_patched(mbv2_144):
    return keras_patch.patchify(mbv2_144, 9, (4, 4), arena=False)  # op 9: block_2_add, no arena pass


def test_summary_figures_are_attributes(mbv2_patched):
    prof = keras_patch.profile(mbv2_patched)
    assert isinstance(prof.summary, keras_patch.ProfileSummary)
    assert tuple(f.name for f in dataclasses.fields(prof.summary)) == SUMMARY_KEYS
    as_dict = prof.to_dict()
    assert tuple(as_dict["summary"]) == SUMMARY_KEYS  # the --json "summary" object keeps its keys and order
    for key in SUMMARY_KEYS:
        assert getattr(prof, key) == getattr(prof.summary, key) == as_dict["summary"][key], key
    with pytest.raises(dataclasses.FrozenInstanceError):
        prof.summary.patched_peak_bytes = 0
    assert prof.num_stages == 1 and prof.mac_overhead > 1.0
    assert prof.patched_peak_bytes < prof.layer_by_layer_peak_bytes
    assert as_dict["blocks"] == [dataclasses.asdict(b) for b in prof.blocks()]
    json.dumps(as_dict, default=list)


def test_profile_class_docstring_example_runs():
    import doctest

    from keras_patch.arena import profiler

    finder = doctest.DocTestFinder()
    tests = [t for t in finder.find(profiler) if t.name.endswith((".Profile", ".block_name"))]
    assert len(tests) == 2 and all(t.examples for t in tests)
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS)
    for t in tests:
        runner.run(t)
    assert runner.summarize(verbose=False).failed == 0


def test_blocks_of_mobilenet_v2(mbv2_144, mbv2_patched):
    prof = keras_patch.profile(mbv2_144)
    blocks = prof.blocks()
    names = [b.name for b in blocks]
    assert names[:4] == ["Conv1", "expanded_conv", "block_1", "block_2"]
    assert [f"block_{i}" for i in range(1, 17)] == [n for n in names if n.startswith("block_")]
    assert [b.ops for b in blocks if b.name == "block_2"] == [[6, 7, 8, 9]]  # expand, depthwise, project, add
    # Every op is in exactly one block, in order; a block's peak is the largest of its ops'.
    assert [i for b in blocks for i in b.ops] == [r.index for r in prof.rows]
    for b in blocks:
        ops = [prof.rows[i] for i in b.ops]
        assert {r.block for r in ops} == {b.name} or b.name == f"op {b.ops[0]}"
        assert b.layer_by_layer_live_bytes == max(r.layer_by_layer_live_bytes for r in ops)
        assert b.patched_live_bytes == max(r.patched_live_bytes for r in ops)
        assert b.macs == sum(r.macs for r in ops)
    assert max(b.layer_by_layer_live_bytes for b in blocks) == prof.layer_by_layer_peak_bytes
    # The classifier's output is the converter's signature tensor: no layer name, its own block.
    assert prof.rows[-1].layer == "" and names[-1] == f"op {prof.rows[-1].index}"

    # The layers inside a patch stage have no names in the .tflite (but its last: the stage output's).
    patched = keras_patch.profile(mbv2_patched)
    assert [b.name for b in patched.blocks()[:13]] == [f"op {i}" for i in range(9)] + ["block_2", "block_3",
                                                                                     "block_4", "block_5"]
    assert [b.stage for b in patched.blocks()[8:11]] == [0, 0, None]
    assert max(b.patched_live_bytes for b in patched.blocks()) == max(r.patched_live_bytes for r in patched.rows)


def test_block_name_rule():
    from keras_patch.arena.profiler import block_name, layer_name

    assert block_name("block_13_depthwise_relu") == "block_13"
    assert block_name("expanded_conv_depthwise_relu") == "expanded_conv"
    assert block_name("stem_relu") == "stem" and block_name("s2_b0_expand_relu") == "s2_b0"
    assert block_name("relu") == "relu" and block_name("") == ""
    assert layer_name("m/block_2_add_1/Add/kp_layer_3") == ""
    assert layer_name("StatefulPartitionedCall_1:0") == "" and layer_name("") == ""
    assert layer_name("mobilenetv2_0.35_144_1/block_3_project_BN_1/FusedBatchNormV3;x") == "block_3_project_BN"


def _captured_plot(prof, monkeypatch, tmp_path, **kwargs):
    """Plots and returns (the figure's text, its x tick labels, the PNG's first bytes)."""
    from matplotlib.figure import Figure

    figures = []
    save = Figure.savefig

    def savefig(fig, *args, **kw):
        figures.append(fig)
        return save(fig, *args, **kw)

    monkeypatch.setattr(Figure, "savefig", savefig)
    path = prof.plot(str(tmp_path / "memory.png"), **kwargs)
    (ax,) = figures[0].axes
    texts = [ax.get_ylabel(), ax.get_xlabel()] + [t.get_text() for t in ax.get_legend().get_texts()]
    with open(path, "rb") as f:
        return texts, [t.get_text() for t in ax.get_xticklabels()], f.read(8)


def test_plot_labels_kib_and_keras_layer_names(mbv2_patched, monkeypatch, tmp_path):
    prof = keras_patch.profile(mbv2_patched)
    texts, ticks, head = _captured_plot(prof, monkeypatch, tmp_path)
    assert head == b"\x89PNG\r\n\x1a\n"
    # Units: the figures are bytes / 1024, so they are KiB, never "kB".
    assert not [t for t in texts if "kB" in t]
    assert "live activation memory (KiB)" in texts
    assert f"layer-by-layer peak {prof.layer_by_layer_peak_bytes / 1024:.0f} KiB" in texts
    assert len(ticks) == len(prof.rows) and "block_3_expand_relu" in ticks and max(len(t) for t in ticks) < 40


def test_plot_by_block(mbv2_patched, monkeypatch, tmp_path):
    prof = keras_patch.profile(mbv2_patched)
    texts, ticks, head = _captured_plot(prof, monkeypatch, tmp_path, by="block")
    assert head == b"\x89PNG\r\n\x1a\n"
    assert ticks == [b.name for b in prof.blocks()] and ticks[9:11] == ["block_2", "block_3"]
    assert "live activation memory (KiB)" in texts and "block (layer-by-layer order; shaded: patch stage)" in texts
    with pytest.raises(ValueError, match="by must be one of"):
        prof.plot(str(tmp_path / "x.png"), by="layer")


def test_table_says_when_there_is_nothing_to_compare(residual, mbv2_patched):
    table = keras_patch.profile(residual).table()
    assert "x lower" not in table and "no patch stage, nothing to compare" in table
    prof = keras_patch.profile(mbv2_patched)
    assert f"({prof.layer_by_layer_peak_bytes / prof.patched_peak_bytes:.2f}x lower)" in prof.table()


def test_table_and_peak_op_show_keras_layer_names(mbv2_patched):
    prof = keras_patch.profile(mbv2_patched)
    assert prof.patched_peak_op == "op 0 (KP_PATCH_STAGE -> block_2_add)"
    table = prof.table()
    assert "block_3_expand_relu" in table and "mobilenet" not in table
    assert max(len(line) for line in table.splitlines()) < 200
