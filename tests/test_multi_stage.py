"""Models with several KP_PATCH_STAGE ops, anywhere in the network (`patchify_stages`).

Everything that takes a patched model must work with N stages, including
stages that start at an activation in the middle of the network: both
`run_tflite` executors, `unpatchify`, `profile` (rows, stages, blocks, table,
plot), `export-arduino` (resolver, arena estimate), the Cortex-M4 firmware
runner and the command line. `patchify_stages`' errors name the stages and
layers at fault in Keras layer names. The property tests at the end draw
random networks with two or more stages and check bit-exactness with both
executors against the unpatched int8 model.
"""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import re

import numpy as np
import pytest

import keras_patch
from keras_patch.arena.profiler import profile
from keras_patch.cli import main
from keras_patch.errors import KerasPatchError, UnsupportedModelError
from keras_patch.graph.patchify import find_stages, patchify_stages, stage_options
from keras_patch.graph.tflite_model import TFLiteModel
from keras_patch.graph.unpatchify import unpatchify
from keras_patch.runtime.host import run_tflite
from keras_patch.stage import options as o

pytestmark = pytest.mark.filterwarnings("ignore:Statistics for quantized inputs")

EXECUTORS = ("reference", "cpp")

# tests/model_zoo.residual_model as converted (conftest `residual`), op by op:
#   0 stem  1-3 b0 (expand, dw, project)  4-6 b1 (stride 2)  7-10 b2 (+ADD)  11-13 b3 (stride 2)
#   14-17 b4 (+ADD)  18-21 b5 (+ADD)  22 head  23 MEAN  24 FULLY_CONNECTED
THREE_STAGES = [(None, 3, (2, 2)), ("b1_project", "b2_add", (3, 3)), ("b3_project", "b5_add", (2, 3))]
THREE_STAGE_OPS = [range(0, 4), range(7, 11), range(14, 22)]


def _out_name(m: TFLiteModel, op: int) -> str:
    return m.tensor(m.op_outputs(op)[0]).name


def _with_outputs(model_bytes: bytes, names) -> bytes:
    m = TFLiteModel.from_bytes(model_bytes)
    m.add_outputs([m.find_tensor(n) for n in names])
    return m.to_bytes()


@pytest.fixture(scope="module")
def three_stages(residual) -> bytes:
    return patchify_stages(residual, THREE_STAGES)


@pytest.fixture(scope="module")
def images() -> np.ndarray:
    return np.random.default_rng(3).integers(-128, 128, (3, 48, 48, 3), dtype=np.int8)


# ------------------------------------------------------------- structure


def test_stages_replace_exactly_their_ops(residual, three_stages):
    m, p = TFLiteModel.from_bytes(residual), TFLiteModel.from_bytes(three_stages)
    staged = {op for ops in THREE_STAGE_OPS for op in ops}
    expected = []
    for i in range(m.num_ops):
        if any(i == ops[-1] for ops in THREE_STAGE_OPS):
            expected.append((o.CUSTOM_CODE, _out_name(m, i)))
        elif i not in staged:
            expected.append((m.op_type(i), _out_name(m, i)))
    assert [(p.op_type(i), _out_name(p, i)) for i in range(p.num_ops)] == expected
    stages = find_stages(p)
    assert len(stages) == 3
    # Each stage reads the tensor it starts at: the model input, then two activations mid-network.
    starts = [p.tensor(p.op_inputs(op)[0]).name for op in stages]
    assert starts == [m.tensor(m.inputs[0]).name, _out_name(m, 6), _out_name(m, 13)]
    assert [stage_options(p, op).num_layers for op in stages] == [len(ops) for ops in THREE_STAGE_OPS]


# ------------------------------------------------------------ executors


def test_both_executors_are_bit_exact_with_n_stages(residual, three_stages, images):
    m = TFLiteModel.from_bytes(residual)
    names = [_out_name(m, ops[-1]) for ops in THREE_STAGE_OPS] + [_out_name(m, 22)]
    want = run_tflite(_with_outputs(residual, names), images)
    inspected = _with_outputs(three_stages, names)
    for executor in EXECUTORS:
        got = run_tflite(inspected, images, executor=executor)
        assert len(got) == len(want) == 1 + len(names)
        for k, (w, g) in enumerate(zip(want, got)):
            np.testing.assert_array_equal(g, w, err_msg=f"{executor}: output {k}")
        np.testing.assert_array_equal(run_tflite(three_stages, images, executor=executor)[0], want[0])


def test_unpatchify_expands_every_stage(residual, three_stages, images):
    m = TFLiteModel.from_bytes(residual)
    plain = unpatchify(three_stages)
    u = TFLiteModel.from_bytes(plain)
    assert find_stages(u) == []
    assert [u.op_type(i) for i in range(u.num_ops)] == [m.op_type(i) for i in range(m.num_ops)]
    np.testing.assert_array_equal(run_tflite(plain, images)[0], run_tflite(residual, images)[0])
    # The expanded model patches again into the same stages.
    again = TFLiteModel.from_bytes(patchify_stages(plain, [
        (None, 3, (2, 2)), (_out_name(m, 6), 10, (3, 3)), (_out_name(m, 13), 21, (2, 3))]))
    assert [stage_options(again, op) for op in find_stages(again)] == \
        [stage_options(TFLiteModel.from_bytes(three_stages), op) for op in find_stages(TFLiteModel.from_bytes(three_stages))]


def test_patching_a_patched_model_again_adds_a_stage(residual, three_stages, images):
    """`patchify` on a model that has stages: a fourth stage between two of them."""
    four = keras_patch.patchify(three_stages, "b3_project", (2, 2), start="b2_add")
    p = TFLiteModel.from_bytes(four)
    assert len(find_stages(p)) == 4 and p.num_ops == TFLiteModel.from_bytes(three_stages).num_ops - 2
    for executor in EXECUTORS:
        np.testing.assert_array_equal(run_tflite(four, images, executor=executor)[0], run_tflite(residual, images)[0])


# -------------------------------------------------------------- profile


def test_profile_rows_stages_and_totals(residual, three_stages):
    prof = profile(three_stages)
    plain = profile(residual)
    stage_ops = find_stages(TFLiteModel.from_bytes(three_stages))
    assert prof.num_stages == 3 and [s.op_index for s in prof.stages] == stage_ops
    # Every layer-by-layer op is in the stage it was patched into, or in none.
    expected = [next((stage_ops[k] for k, ops in enumerate(THREE_STAGE_OPS) if i in ops), None)
                for i in range(len(plain.rows))]
    assert [r.stage for r in prof.rows] == expected
    assert [r.layer_by_layer_live_bytes for r in prof.rows] == [r.layer_by_layer_live_bytes for r in plain.rows]
    assert prof.layer_by_layer_peak_bytes == plain.layer_by_layer_peak_bytes
    # Totals: the whole network's MACs, each stage adding its recomputation.
    assert prof.macs == plain.macs == sum(s.macs for s in prof.stages) + sum(
        r.macs for r in prof.rows if r.stage is None)
    assert prof.patched_macs == prof.macs + sum(s.patched_macs - s.macs for s in prof.stages)
    assert all(s.patched_macs > s.macs for s in prof.stages)
    assert [(s.start_layer, s.end_layer) for s in prof.stages] == [
        ("", "b0_project"), ("b1_project", "b2_add"), ("b3_project", "b5_add")]
    table = prof.table()
    assert "stage #0 (input -> b0_project): 4 layers, grid 2x2" in table
    assert f"stage #{stage_ops[1]} (b1_project -> b2_add): 4 layers, grid 3x3" in table
    assert f"stage #{stage_ops[2]} (b3_project -> b5_add): 8 layers, grid 2x3" in table
    assert "residual_1/" not in table


def test_blocks_do_not_span_a_stage_boundary(residual):
    """Was: consecutive ops of one Keras block were one block whatever stage each was in,
    so two adjacent stages (or a stage and the ops after it) shared a bar in the plot."""
    # Stage 0 ends at b1_expand_relu (op 4), stage 1 is b1's depthwise alone (op 5), op 6 runs layer by layer.
    two = patchify_stages(residual, [(None, "b1_expand_relu", (2, 2)), ("b1_expand_relu", "b1_dw_relu", (2, 2))])
    prof = profile(two)
    # The layers inside stage 0 have no Keras name (its output's name is fused: 'b1_expand_relu;b1_expand').
    assert [r.layer for r in prof.rows[:5]] == ["", "", "", "", "b1_expand_relu"]
    b1 = [(b.ops, b.stage) for b in prof.blocks() if b.name == "b1"]
    assert b1 == [([4], 0), ([5], 1), ([6], None)]
    for b in prof.blocks():
        assert {prof.rows[i].stage for i in b.ops} == {b.stage}


def test_plot_shades_adjacent_stages_apart(residual, tmp_path, monkeypatch):
    """Was: every stage got the same grey, so adjacent stages looked like one."""
    from matplotlib.axes import Axes

    from keras_patch.arena.profiler import stage_spans

    spans = []
    axvspan = Axes.axvspan

    def record(ax, xmin, xmax, **kwargs):
        spans.append((xmin, xmax, kwargs.get("color")))
        return axvspan(ax, xmin, xmax, **kwargs)

    monkeypatch.setattr(Axes, "axvspan", record)
    two = patchify_stages(residual, [(None, "b1_expand_relu", (2, 2)), ("b1_expand_relu", "b1_dw_relu", (2, 2))])
    prof = profile(two)
    for by in ("op", "block"):
        spans.clear()
        prof.plot(str(tmp_path / f"{by}.png"), by=by)
        assert len(spans) == 2, spans
        (a0, a1, color_a), (b0, b1, color_b) = spans
        assert a1 == b0 and color_a != color_b  # adjacent, told apart
    assert stage_spans([None, 0, 0, 1, None, 1]) == [(1, 2, 0), (3, 3, 1), (5, 5, 1)]


# ------------------------------------------------------- export-arduino


def _run(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.parametrize("sketch", ["basic", "memory-report"])
def test_export_arduino_with_n_stages(capsys, three_stages, tmp_path, sketch):
    from keras_patch.arduino.arena import ARENA_MARGIN_BYTES, align16, stage_persistent_bytes
    from keras_patch.arduino.resolver import BUILTIN_METHODS

    model = tmp_path / "three.tflite"
    model.write_bytes(three_stages)
    out_dir = tmp_path / "Three"
    code, out, err = _run(capsys, "export-arduino", model, "--out", out_dir, "--tail-bytes", 9000, "--sketch", sketch)
    assert code == 0, err
    ino = (out_dir / "Three.ino").read_text()
    p = TFLiteModel.from_bytes(three_stages)
    used = {p.op_type(i) for i in range(p.num_ops)} - {o.CUSTOM_CODE}
    if sketch == "memory-report":  # runs the unpatched model too
        u = TFLiteModel.from_bytes(unpatchify(three_stages))
        used |= {u.op_type(i) for i in range(u.num_ops)}
    # One resolver slot registers KP_PATCH_STAGE for all three stages.
    assert sorted(re.findall(r"resolver\.(Add\w+)\(\)", ino)) == sorted(BUILTIN_METHODS[op] for op in used)
    assert f"kNumOps = {len(used) + 1};" in ino and ino.count("keras_patch::AddKerasPatchOps(resolver)") == 1
    # The arena holds every stage's persistent data.
    persistent = [stage_persistent_bytes(p, op) for op in find_stages(p)]
    head = max(profile(three_stages).patched_peak_bytes, profile(three_stages, kernel="cmsis_nn").patched_peak_bytes)
    total = align16(head + 9000 + sum(persistent) + ARENA_MARGIN_BYTES)
    assert len(persistent) == 3 and f"KP_PATCH_STAGE persistent {sum(persistent):,} B" in out
    if sketch == "basic":
        assert f"tensor arena {total:,} B" in out


# ----------------------------------------------------------- firmware


def test_stage_vectors_header_names_the_stage_input_it_needs(three_stages, images):
    """Was: an input of the wrong shape for a mid-network stage failed in numpy's reshape."""
    from keras_patch.runtime.firmware import stage_inputs, stage_vectors_header

    with pytest.raises(KerasPatchError, match=r"stage 1 .*takes \(1, 12, 12, 12\).*stage_inputs"):
        stage_vectors_header(three_stages, images[:1], stage_index=1)
    inputs = stage_inputs(three_stages, images[0])
    assert [x.shape for x in inputs] == [(1, 48, 48, 3), (1, 12, 12, 12), (1, 6, 6, 16)]
    np.testing.assert_array_equal(inputs[0], images[:1])
    assert "kExpected" in stage_vectors_header(three_stages, inputs[1], stage_index=1)


def test_n_stages_on_cortex_m4(residual, three_stages, images, tmp_path):
    """Every stage of a three-stage model runs bit-exactly on the emulated Cortex-M4."""
    from keras_patch.runtime.firmware import run_model_firmware, stage_inputs, toolchain_problem

    if toolchain_problem():
        pytest.skip(f"Cortex-M firmware: {toolchain_problem()}")
    m = TFLiteModel.from_bytes(residual)
    names = [_out_name(m, ops[-1]) for ops in THREE_STAGE_OPS]
    want = run_tflite(_with_outputs(residual, names), images[:1])[1:]  # the unpatched model's stage outputs
    results = run_model_firmware(three_stages, images[0], str(tmp_path / "fw"))
    assert len(results) == 3
    prof = profile(three_stages)
    for k, (result, w) in enumerate(zip(results, want)):
        assert result.ok, result.output[-2000:]
        assert result.fields["mismatches"] == "0" and int(result.fields["output"]) == w.size
        assert int(result.fields["arena"]) == prof.stages[k].patch_arena_bytes
    # The firmware's expected outputs are the unpatched model's (checked through the headers).
    from keras_patch.runtime.firmware import stage_vectors_header

    for k, x in enumerate(stage_inputs(three_stages, images[0])):
        header = stage_vectors_header(three_stages, x, stage_index=k)
        head = ", ".join(str(int(v)) for v in want[k].reshape(-1)[:24])
        assert f"kExpected[] = {{\n    {head}" in header


# ------------------------------------------------------------------ CLI


def test_cli_patchify_twice_then_profile(capsys, residual, tmp_path, images):
    first, second = tmp_path / "one.tflite", tmp_path / "two.tflite"
    (tmp_path / "plain.tflite").write_bytes(residual)
    assert _run(capsys, "patchify", tmp_path / "plain.tflite", first, "--split", "b0_project", "--grid", "2x2")[0] == 0
    code, out, err = _run(capsys, "patchify", first, second, "--split", "b2_add", "--start", "b1_project",
                          "--grid", "3x3")
    assert code == 0, err
    p = TFLiteModel.from_bytes(second.read_bytes())
    assert len(find_stages(p)) == 2
    np.testing.assert_array_equal(run_tflite(second.read_bytes(), images, executor="cpp")[0],
                                  run_tflite(residual, images)[0])
    code, out, err = _run(capsys, "profile", second)
    assert code == 0, err
    assert "stage #0 (input -> b0_project)" in out and "(b1_project -> b2_add)" in out


# --------------------------------------------------------------- errors


def _stages_error(model: bytes, stages) -> str:
    with pytest.raises(UnsupportedModelError) as info:
        patchify_stages(model, stages)
    message = str(info.value)
    assert "residual_1/" not in message and len(message) < 400, message  # Keras layer names, not converter names
    return message


def test_error_overlapping_stages(residual):
    message = _stages_error(residual, [(None, "b1_project", 2), ("b0_project", "b2_add", 2)])
    assert message.startswith("Stage 1: the stage 'b0_project' (tensor ")
    assert "overlaps stage 0: the stage " in message and "(ops 0..6)" in message and "(ops 4..10)" in message
    assert "both contain op 4 (CONV_2D -> b1_expand_relu)" in message


def test_error_nested_stages(residual):
    message = _stages_error(residual, [(None, "b2_add", 2), ("b1_project", "b2_add", 2)])
    assert "Stage 1: " in message and "is nested in stage 0" in message and "op 7 (CONV_2D -> b2_expand_relu)" in message
    message = _stages_error(residual, [("b1_project", "b2_add", 2), (None, "b2_add", 2)])
    assert "Stage 1: " in message and "contains stage 0" in message
    message = _stages_error(residual, [("b1_project", "b2_add", 2), ("b1_project", "b2_add", 3)])
    assert "repeats stage 0" in message


def test_error_stage_cuts_a_residual_connection(residual):
    # b2 without its input: the ADD reads b1_project, which would stay outside the stage.
    message = _stages_error(residual, [(None, 3, 2), ("b2_expand_relu", "b2_add", 2)])
    assert message.startswith("Stage 1 ('b2_expand_relu' -> 'b2_add'): The stage is not single-entry: ")
    assert "op 10 (ADD -> b2_add) reads tensor 'b1_project' (tensor " in message and "residual connection" in message


def test_error_stage_leaks_a_residual_connection(residual):
    # Ending at b4's project: b3_project (inside) is read by b4's ADD after the stage.
    message = _stages_error(residual, [(None, 3, 2), ("b2_add", "b4_project", 2)])
    assert "Stage 1 ('b2_add' -> 'b4_project'): The stage is not single-exit: tensor 'b3_project'" in message
    assert "read by op 17 (ADD -> b4_add)" in message


def test_error_stage_starts_at_a_constant(residual):
    m = TFLiteModel.from_bytes(residual)
    weights = m.op_inputs(7)[1]  # b2_expand's filter
    message = _stages_error(residual, [(None, 3, 2), (weights, "b2_add", 2)])
    assert message.startswith(f"Stage 1 ({weights} -> 'b2_add'): start {weights} is the constant tensor")
    assert f"(tensor {weights}) (weights)" in message


def test_error_split_before_start(residual):
    message = _stages_error(residual, [(None, 3, 2), ("b3_project", "b2_add", 2)])
    assert message.startswith("Stage 1 ('b3_project' -> 'b2_add'): The split op 10 (ADD -> b2_add) does not depend on")
    assert "'b3_project' (tensor " in message and "before the start" in message


def test_error_full_tensor_names_are_shortened_in_the_stage_prefix(residual):
    m = TFLiteModel.from_bytes(residual)
    message = _stages_error(residual, [(None, 3, 2), (_out_name(m, 13), _out_name(m, 10), 2)])
    assert message.startswith("Stage 1 (b3_project -> b2_add): ")
