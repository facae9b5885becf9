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
from keras_patch.graph import rules
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
    return patchify_stages(residual, THREE_STAGES, arena=False)


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
        (None, 3, (2, 2)), (_out_name(m, 6), 10, (3, 3)), (_out_name(m, 13), 21, (2, 3))], arena=False))
    assert [stage_options(again, op) for op in find_stages(again)] == \
        [stage_options(TFLiteModel.from_bytes(three_stages), op) for op in find_stages(TFLiteModel.from_bytes(three_stages))]


def test_unpatchify_a_pool_whose_axes_agree_only_on_valid():
    """Was: a 2x2 pool with strides (2, 1), VALID, on an even height is also SAME along the height
    (nothing padded), so unpatchify saw 'SAME' there, 'VALID' along the width, and refused the stage."""
    spec = kps.StageSpec((12, 9, 2), (kps.Conv(4, (3, 3), (1, 1), "same", act="relu"),
                                      kps.Pool("max", (2, 2), (2, 1), "valid"),
                                      kps.Conv(3, (1, 1), (1, 1), "same")), seed=5)
    original = _convert(spec)
    m = TFLiteModel.from_bytes(original)
    pool = next(i for i in range(m.num_ops) if m.op_type(i) == "MAX_POOL_2D")
    patched = patchify_stages(original, [(None, pool + 1, (2, 2))], arena=False)
    plain = unpatchify(patched)
    u = TFLiteModel.from_bytes(plain)
    assert [u.op_type(i) for i in range(u.num_ops)] == [m.op_type(i) for i in range(m.num_ops)]
    assert u.operator(pool).builtinOptions.padding == m.operator(pool).builtinOptions.padding
    x = np.random.default_rng(0).integers(-128, 128, (2, 12, 9, 2), dtype=np.int8)
    np.testing.assert_array_equal(run_tflite(plain, x)[0], run_tflite(original, x)[0])


def test_patching_a_patched_model_again_adds_a_stage(residual, three_stages, images):
    """`patchify` on a model that has stages: a fourth stage between two of them."""
    four = keras_patch.patchify(three_stages, "b3_project", (2, 2), start="b2_add", arena=False)
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
    two = patchify_stages(residual, [(None, "b1_expand_relu", (2, 2)), ("b1_expand_relu", "b1_dw_relu", (2, 2))], arena=False)
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
    two = patchify_stages(residual, [(None, "b1_expand_relu", (2, 2)), ("b1_expand_relu", "b1_dw_relu", (2, 2))], arena=False)
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
        patchify_stages(model, stages, arena=False)
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


# ------------------------------------------------------ property tests
#
# Random networks with two or more stages placed anywhere: the patched model's outputs and every
# stage's output equal the unpatched int8 model's, run by the reference kernels (LiteRT
# BUILTIN_REF, the arithmetic TFLM runs), bit for bit, with both KP_PATCH_STAGE executors.
# Converting a Keras model takes seconds, so a few networks are converted once and the examples
# draw many stage placements, grids and inputs on them (100 examples, about 30 s: slow);
# `test_random_networks_with_n_stages` draws whole architectures too, four placements each
# (6 architectures, about 18 s).

from hypothesis import HealthCheck, given, note, reject, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

try:
    from tests import strategies as kps
except ImportError:  # tests/ itself on sys.path
    import strategies as kps

from keras_patch.graph.patchify import SUPPORTED_STAGE_OPS, default_entry_tensor  # noqa: E402

PROFILE = os.environ.get("KP_HYPOTHESIS_PROFILE", "ci")
_SETTINGS = dict(deadline=None, suppress_health_check=list(HealthCheck), derandomize=PROFILE == "ci",
                 database=None, print_blob=True)


def _examples(n_ci: int) -> int:
    return n_ci if PROFILE == "ci" else max(2, n_ci // 10)


#: Fixed architectures (odd sizes, residual blocks, strides 1-2, kernels 1-7, PAD, pools); random weights.
NETWORKS = (
    kps.StageSpec((23, 19, 3), (
        kps.Pad(((1, 2), (0, 1))),
        kps.Conv(8, (3, 3), (2, 2), "valid", use_bias=False, bn=True, act="relu6", act_mode="relu_layer"),
        kps.InvertedResidual(expand_channels=16, dw_kernel=(5, 5), bn=True),
        kps.Pool("max", (3, 3), (2, 2), "same"),
        kps.InvertedResidual(expand_channels=None, dw_kernel=(3, 7), bn=False, post_act="relu"),
        kps.Conv(6, (1, 1), (1, 1), "same", act="relu"),
    ), seed=11),
    kps.StageSpec((31, 31, 4), (
        kps.Conv(8, (7, 7), (2, 2), "same", act="relu"),
        kps.TwoBranchAdd(8, 1, kps.Branch("dwpw", (5, 5), "relu6"), kps.Branch("identity"), post_act="relu6"),
        kps.Pool("avg", (2, 2), (2, 2), "valid"),
        kps.DWConv((3, 3), (1, 2), "same", depth_multiplier=2, bn=True, act="relu", act_mode="act_layer"),
        kps.TwoBranchAdd(12, 2, kps.Branch("conv", (3, 3)), kps.Branch("dwpw", (3, 3), "relu")),
        kps.InvertedResidual(expand_channels=16, dw_kernel=(3, 3), bn=True),
    ), seed=12),
    kps.StageSpec((17, 26, 2), (
        kps.Conv(4, (5, 3), (1, 1), "valid"),
        kps.Relu("relu6"),
        kps.Pad(((0, 1), (2, 0))),
        kps.DWConv((7, 7), (2, 2), "same"),
        kps.Pool("max", (2, 3), (1, 1), "same"),
        kps.InvertedResidual(expand_channels=12, dw_kernel=(3, 3), bn=True, post_act="relu6"),
        kps.Conv(8, (1, 1), (2, 1), "same"),
    ), seed=13),
)


def _convert(spec) -> bytes:
    """The network (stage blocks + head) as a full-int8 .tflite; rejects models no kernel can run."""
    from test_bit_exact import convert

    return convert(kps.build_model(spec))


def candidate_stages(m: TFLiteModel) -> list:
    """Every (entry tensor, op indices) a stage can be: supported ops, single-entry, single-exit.

    Written from the definition (docs/patch_stage_op.md), independently of `patchify`.
    """
    producers, consumers = m.producers(), m.consumers()
    entries = [default_entry_tensor(m)] + [m.op_outputs(i)[0] for i in range(m.num_ops)
                                           if m.op_type(i) in SUPPORTED_STAGE_OPS]
    found = []
    for entry in entries:
        downstream, frontier = set(), [entry]
        while frontier:
            for op in consumers.get(frontier.pop(), []):
                if op not in downstream:
                    downstream.add(op)
                    frontier.extend(m.op_outputs(op))
        for last in sorted(downstream):
            exit_tensor = m.op_outputs(last)[0]
            if exit_tensor in m.outputs:
                continue
            upstream, frontier = set(), [last]
            while frontier:
                op = frontier.pop()
                if op not in upstream:
                    upstream.add(op)
                    frontier.extend(producers[t] for t in m.op_inputs(op) if t in producers)
            ops = sorted(downstream & upstream)
            inside = {m.op_outputs(op)[0] for op in ops} | {entry}
            if (all(m.op_type(op) in SUPPORTED_STAGE_OPS and not rules.op_relu6_keeps_quantization(m, op)
                    for op in ops)
                    and all(t < 0 or t in inside or m.is_constant(t) for op in ops for t in m.op_inputs(op))
                    and all(c in ops for op in ops if op != last for c in consumers.get(m.op_outputs(op)[0], []))):
                found.append((entry, tuple(ops)))
    return found


_CONVERTED: dict = {}


def _network(index: int):
    if index not in _CONVERTED:
        data = _convert(NETWORKS[index])
        m = TFLiteModel.from_bytes(data)
        _CONVERTED[index] = (data, m, candidate_stages(m))
    return _CONVERTED[index]


def _draw_stages(data, m: TFLiteModel, candidates: list, max_stages: int = 4) -> list:
    """Two to `max_stages` disjoint stages with a grid each, in the order drawn."""
    order = data.draw(st.permutations(range(len(candidates))), label="candidate order")
    wanted = data.draw(st.integers(2, max_stages), label="number of stages")
    chosen, used = [], set()
    for k in order:
        entry, ops = candidates[k]
        if used.isdisjoint(ops):
            chosen.append((entry, ops))
            used.update(ops)
        if len(chosen) == wanted:
            break
    stages = []
    for entry, ops in chosen:
        tiled_shape = m.tensor(rules.tiled_tensor(m, m.op_outputs(ops[-1])[0])).shape  # a final MEAN's input
        grid = data.draw(kps.grids(tiled_shape[1:3]), label=f"grid of ops {ops[0]}..{ops[-1]}")
        start = None if entry == default_entry_tensor(m) and data.draw(st.booleans()) else entry
        stages.append((start, ops[-1], grid))
    return stages


def check_n_stages_bit_exact(original: bytes, m: TFLiteModel, stages: list, x: np.ndarray) -> None:
    """patchify_stages -> structure, both executors bit-exact (outputs and stage outputs), unpatchify, profile."""
    note(f"stages: {stages}")
    patched = patchify_stages(original, stages, arena=False)
    p = TFLiteModel.from_bytes(patched)
    exits = [_out_name(m, split) for _, split, _ in stages]
    assert sorted(_out_name(p, op) for op in find_stages(p)) == sorted(exits)
    want = run_tflite(_with_outputs(original, exits), x)
    inspected = _with_outputs(patched, exits)
    for executor in EXECUTORS:
        got = run_tflite(inspected, x, executor=executor)
        for k, (w, g) in enumerate(zip(want, got)):
            what = "the model output" if k == 0 else f"the output of stage {stages[k - 1]}"
            np.testing.assert_array_equal(g, w, err_msg=f"{executor} executor: {what}")
    plain = unpatchify(patched)
    u = TFLiteModel.from_bytes(plain)
    assert sorted(u.op_type(i) for i in range(u.num_ops)) == sorted(m.op_type(i) for i in range(m.num_ops))
    np.testing.assert_array_equal(run_tflite(plain, x)[0], want[0])
    prof = profile(patched)
    assert prof.num_stages == len(stages)
    assert sum(r.stage is not None for r in prof.rows) == sum(s.num_layers for s in prof.stages)
    assert prof.patched_macs == prof.macs + sum(s.patched_macs - s.macs for s in prof.stages)


@pytest.mark.slow
@settings(max_examples=_examples(100), **_SETTINGS)
@given(data=st.data())
def test_n_stages_anywhere_are_bit_exact(data):
    """Two to four stages on one of NETWORKS, anywhere (adjacent, mid-network, in branches)."""
    original, m, candidates = _network(data.draw(st.integers(0, len(NETWORKS) - 1), label="network"))
    stages = _draw_stages(data, m, candidates)
    x = data.draw(kps.int8_inputs(m.tensor(m.inputs[0]).shape[1:], n_random=1), label="x").array()
    check_n_stages_bit_exact(original, m, stages, x)


@settings(max_examples=_examples(6), **_SETTINGS)
@given(spec=kps.stage_specs(max_size=24).filter(lambda s: len(s.blocks) >= 3), data=st.data())
def test_random_networks_with_n_stages(spec, data):
    """Random architectures (tests/strategies.py), four stage placements each."""
    original = _convert(spec)
    m = TFLiteModel.from_bytes(original)
    candidates = candidate_stages(m)
    disjoint = {ops for _, ops in candidates}
    if not any(set(a).isdisjoint(b) for a in disjoint for b in disjoint):
        reject()  # a single-op stage network: no two stages fit
    x = data.draw(kps.int8_inputs(spec.input_shape, n_random=1), label="x").array()
    for _ in range(4):
        check_n_stages_bit_exact(original, m, _draw_stages(data, m, candidates), x)


def test_candidate_stages_are_what_patchify_accepts(residual):
    """The test's own stage rule agrees with patchify on the residual model, both ways."""
    m = TFLiteModel.from_bytes(residual)
    candidates = candidate_stages(m)
    assert (default_entry_tensor(m), tuple(range(0, 4))) in candidates
    assert (m.op_outputs(6)[0], tuple(range(7, 11))) in candidates
    assert (m.op_outputs(7)[0], tuple(range(8, 11))) not in candidates  # would cut b2's residual
    accepted = set(candidates)
    # Stages from the input and from b1..b3 (strides, two residual ADDs) to the end of b4.
    for entry in [default_entry_tensor(m)] + [m.op_outputs(i)[0] for i in range(5, 14)]:
        for last in range(6, 18):
            try:
                patched = patchify_stages(residual, [(entry, last, (1, 1))], arena=False)
            except UnsupportedModelError:
                assert not any(e == entry and ops[-1] == last for e, ops in accepted), (entry, last)
                continue
            n_ops = m.num_ops - TFLiteModel.from_bytes(patched).num_ops + 1
            assert (entry, tuple(range(last - n_ops + 1, last + 1))) in accepted, (entry, last)
