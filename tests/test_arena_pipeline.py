"""The arena passes as users get them: `patchify`, `plan`/`apply`, `export_tflite` and the CLI switches.

Random stage stacks (tests/strategies.py, with PAD, depthwise and residual
blocks) are converted to int8 `.tflite` with a float input; the default
passes (int8 input, PAD folding, in-place depthwise, offline plan) must keep
every output bit of the unmodified model under LiteRT's reference kernels,
with both executors, never raise TFLM's arena head, and leave a file whose
offline plan `check_offline_plan` accepts. `arena=False` and the `--no-*`
switches keep the old behaviour.
"""

import json
import os

os.environ["TF_CPP_MIN_LOG_LEVEL"] = "3"

import numpy as np  # noqa: E402
import pytest  # noqa: E402
from hypothesis import event, given, note, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

try:
    from tests import strategies as kps
    from tests.test_bit_exact import describe, examples
except ImportError:  # tests/ itself on sys.path
    import strategies as kps
    from test_bit_exact import describe, examples

import keras_patch  # noqa: E402
from keras_patch.arena.offline_metadata import read_offline_offsets  # noqa: E402
from keras_patch.arena.profiler import profile  # noqa: E402
from keras_patch.cli import main  # noqa: E402
from keras_patch.graph.passes.offline_plan import check_offline_plan  # noqa: E402
from keras_patch.graph.passes.pipeline import ArenaOptions, optimize_arena  # noqa: E402
from keras_patch.graph.patchify import find_stages, stage_options  # noqa: E402
from keras_patch.graph.tflite_model import TFLiteModel  # noqa: E402
from keras_patch.keras.export import convert_int8  # noqa: E402
from keras_patch.planner.plan import PatchPlan  # noqa: E402
from keras_patch.runtime.host import run_tflite  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore:Statistics for quantized inputs")


def _float_input(spec) -> bytes:
    model = kps.build_model(spec)
    shape = tuple(int(d) for d in model.inputs[0].shape[1:])
    data = np.random.default_rng(spec.seed % 1000).uniform(-1, 1, (4, *shape)).astype(np.float32)
    return bytes(convert_int8(model, data, int8_io=False))


def _op_types(data: bytes) -> list:
    m = TFLiteModel.from_bytes(data)
    return [m.op_type(i) for i in range(m.num_ops)]


@st.composite
def _specs(draw):
    h, w, c = draw(st.integers(6, 20)), draw(st.integers(6, 20)), draw(st.integers(1, 6))
    shape, blocks = (h, w, c), []
    for _ in range(draw(st.integers(2, 5))):
        kind = draw(st.sampled_from(["pad", "conv", "dwconv", "dwconv", "inverted_residual"]))
        block = draw(kps.BLOCK_STRATEGIES[kind](shape))
        blocks.append(block)
        shape = kps.block_output_shape(block, shape)
    return kps.StageSpec(input_shape=(h, w, c), blocks=tuple(blocks), seed=draw(st.integers(0, 2**31 - 1)))


@settings(max_examples=examples(20), deadline=None)
@given(spec=_specs(), data=st.data())
def test_default_passes_keep_every_bit_and_never_raise_the_head(spec, data):
    original = _float_input(spec)
    m = TFLiteModel.from_bytes(original)
    note(describe(m))
    rewritten = TFLiteModel.from_bytes(original)
    report = optimize_arena(rewritten)
    result = rewritten.to_bytes()
    event(f"passes that changed something: {sorted(s.name for s in report.steps[1:] if s.changes)}")
    assert "QUANTIZE" not in _op_types(result)[:1]  # the float input is gone
    assert report.head_bytes <= report.steps[0].head_bytes
    assert report.lower_bound_bytes <= report.head_bytes
    if read_offline_offsets(rewritten) is not None:
        assert check_offline_plan(rewritten) == report.head_bytes
    assert profile(result).patched_peak_bytes == report.head_bytes
    shape = tuple(m.tensor(m.inputs[0]).shape[1:])
    x = np.random.default_rng(data.draw(st.integers(0, 1000))).uniform(-1.2, 1.2, (2, *shape)).astype(np.float32)
    want = run_tflite(original, x)
    for executor in ("reference", "cpp"):
        got = run_tflite(result, x, executor=executor)
        for w, g in zip(want, got):
            np.testing.assert_array_equal(g, w, err_msg=f"{executor} executor")


def test_patchify_runs_the_passes_and_arena_false_keeps_the_old_file(residual):
    plain = keras_patch.patchify(residual, "b2_add", (2, 2), arena=False)
    assert read_offline_offsets(TFLiteModel.from_bytes(plain)) is None
    passes = keras_patch.patchify(residual, "b2_add", (2, 2))
    model = TFLiteModel.from_bytes(passes)
    assert read_offline_offsets(model) is not None
    assert profile(passes).patched_peak_bytes <= profile(plain).patched_peak_bytes
    x = np.random.default_rng(0).integers(-128, 128, (2, 48, 48, 3), dtype=np.int8)
    np.testing.assert_array_equal(run_tflite(passes, x)[0], run_tflite(residual, x)[0])
    # Patching a patched file again: the passes' one-layer stages and plan are redone, not stacked.
    again = keras_patch.patchify(passes, "b4_add", (2, 2), start="b3_project")
    stages = find_stages(TFLiteModel.from_bytes(again))
    assert sum(stage_options(TFLiteModel.from_bytes(again), op).num_layers > 1 for op in stages) == 2
    np.testing.assert_array_equal(run_tflite(again, x)[0], run_tflite(residual, x)[0])


def test_plan_records_its_passes_and_old_plans_still_read(residual):
    plan = keras_patch.plan(residual, max_mac_overhead=1.3)
    assert plan.arena_passes == ("int8_input", "fold_pad", "in_place", "offline_plan")
    assert PatchPlan.from_json(plan.to_json()) == plan
    assert profile(plan.apply(residual)).patched_peak_bytes == plan.peak_bytes
    old = json.loads(plan.to_json())
    old["version"] = 1
    del old["arena_passes"]
    legacy = PatchPlan.from_dict(old)
    assert legacy.arena_passes == () and read_offline_offsets(
        TFLiteModel.from_bytes(legacy.apply(residual))) is None
    bad = dict(json.loads(plan.to_json()), arena_passes=["int8_input", "magic"])
    with pytest.raises(keras_patch.KerasPatchError, match="arena_passes"):
        PatchPlan.from_dict(bad)
    off = keras_patch.plan(residual, max_mac_overhead=1.3, arena=False)
    assert off.arena_passes == () and off.peak_bytes >= plan.peak_bytes


def test_cli_switches(residual, tmp_path, capsys):
    src = tmp_path / "m.tflite"
    src.write_bytes(residual)
    for flags, has_plan in (([], True), (["--no-offline-plan"], False)):
        out = tmp_path / f"o{len(flags)}.tflite"
        assert main(["patchify", str(src), str(out), "--split", "b2_add", "--grid", "2x2", *flags]) == 0
        assert (read_offline_offsets(TFLiteModel.from_bytes(out.read_bytes())) is not None) == has_plan
    out = tmp_path / "none.tflite"
    flags = ["--no-int8-input", "--no-fold-pad", "--no-in-place", "--no-offline-plan"]
    assert main(["plan", str(src), "--out", str(out), "--max-overhead", "1.3", *flags]) == 0
    assert "arena passes" not in capsys.readouterr().out
    assert out.read_bytes() == keras_patch.plan(residual, max_mac_overhead=1.3, arena=False).apply(residual)


def test_arena_options_are_checked():
    with pytest.raises(ValueError, match="kernel"):
        ArenaOptions(kernel="fast")
    with pytest.raises(TypeError, match="arena"):
        ArenaOptions.resolve("yes")
    assert not ArenaOptions.resolve(False).any and ArenaOptions.resolve(None) == ArenaOptions()


def test_a_folded_pad_stage_runs_in_place_bit_exact():
    import keras

    keras.utils.set_random_seed(3)
    inputs = keras.Input((33, 31, 8))
    x = keras.layers.Conv2D(24, 1, name="expand")(inputs)
    x = keras.layers.ZeroPadding2D(((1, 2), (2, 1)), name="pad")(x)  # not TF's SAME split: a PAD op stays
    x = keras.layers.DepthwiseConv2D(3, strides=2, name="dw")(x)
    outputs = keras.layers.Conv2D(8, 1, name="project")(x)
    data = np.random.default_rng(0).uniform(-1, 1, (4, 33, 31, 8)).astype(np.float32)
    original = bytes(convert_int8(keras.Model(inputs, outputs), data, int8_io=False))
    assert "PAD" in _op_types(original)
    model = TFLiteModel.from_bytes(original)
    report = optimize_arena(model)
    result = model.to_bytes()
    stages = [stage_options(model, op) for op in find_stages(model)]
    assert any(s.in_place and s.layers[0].pad != (0, 0) for s in stages), report.table()
    assert "PAD" not in _op_types(result) and check_offline_plan(model) == report.head_bytes
    x = np.random.default_rng(1).uniform(-1, 1, (3, 33, 31, 8)).astype(np.float32)
    want = run_tflite(original, x)[0]
    for executor in ("reference", "cpp"):
        np.testing.assert_array_equal(run_tflite(result, x, executor=executor)[0], want, err_msg=executor)
