"""Property tests: a patched model's outputs equal the unpatched model's, bit for bit.

Random stages (tests/strategies.py) are converted to full-int8 .tflite by the
standard converter; the ops from the model input up to a split become one
KP_PATCH_STAGE op (`patchify`, or `export_tflite` for `PatchStage` models).
`run_tflite` on the patched model (LiteRT + the KP_PATCH_STAGE op run by the
reference executor and, on the same examples, by the C++ kernel core) must
give exactly the unpatched model's LiteRT outputs: the model outputs and,
made visible by adding it to the model outputs after patching, the stage
output tensor itself (the head's global average pool could hide a wrong pixel).

Hypothesis profiles (env var KP_HYPOTHESIS_PROFILE):
  ci  (default) derandomized, 310 examples over this file;
  dev           ~10% of that (about 30 examples), randomized, with the
                example database, for development.
"""

import os

os.environ["TF_CPP_MIN_LOG_LEVEL"] = "3"

import contextlib  # noqa: E402
import io  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402
from hypothesis import HealthCheck, given, note, reject, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

try:
    from tests import strategies as kps
    from tests.model_zoo import representative_samples, to_int8_tflite
except ImportError:  # tests/ itself on sys.path (pytest's rootdir-less "prepend" import)
    import strategies as kps
    from model_zoo import representative_samples, to_int8_tflite

from keras_patch.errors import UnsupportedModelError  # noqa: E402
from keras_patch.stage.options import CUSTOM_CODE, LAYER_OP_NAMES  # noqa: E402
from keras_patch.graph.patchify import find_stages, patchify, patchify_stages, stage_options  # noqa: E402
from keras_patch.graph.rules import op_relu6_keeps_quantization, patchable_runs  # noqa: E402
from keras_patch.graph.unpatchify import unpatchify  # noqa: E402
from keras_patch.runtime.host import check_reference_kernel_limits, run_tflite  # noqa: E402
from keras_patch.graph.tflite_model import TFLiteModel  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore:Statistics for quantized inputs")

# ---------------------------------------------------------------- profiles

_COMMON = dict(
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    print_blob=True,
)
settings.register_profile("ci", max_examples=100, derandomize=True, database=None, **_COMMON)
settings.register_profile("dev", max_examples=10, **_COMMON)
PROFILE = os.environ.get("KP_HYPOTHESIS_PROFILE", "ci")
settings.load_profile(PROFILE)
_SCALE = {"ci": 1.0, "dev": 0.1}.get(PROFILE, 1.0)


def examples(n_ci: int) -> int:
    """Per-test example count: `n_ci` in the ci profile, scaled down in dev."""
    return max(2, round(n_ci * _SCALE))


# ----------------------------------------------------------------- helpers


def convert(model) -> bytes:
    """to_int8_tflite with the converter's Python-level chatter swallowed.

    Rejects (hypothesis `reject`) the rare random model with an ADD whose
    output range collapsed so far that TFLite's and TFLM's own kernels abort
    on it: no interpreter can run it, patched or not.
    """
    with contextlib.redirect_stdout(io.StringIO()):
        data = to_int8_tflite(model)
    try:
        check_reference_kernel_limits(TFLiteModel.from_bytes(data))
    except UnsupportedModelError as e:
        note(f"rejected: {e}")
        reject()
    return data


def reject_requantizing_relu6(m: TFLiteModel) -> None:
    """Drops the example when a RELU6 requantizes: TFLM and LiteRT disagree on it, and stages
    refuse it (`rules.op_relu6_keeps_quantization`; tests/test_patchify.py checks the refusal)."""
    if any(op_relu6_keeps_quantization(m, i) for i in range(m.num_ops)):
        reject()


def op_output_name(m: TFLiteModel, op: int) -> str:
    return m.tensor(m.op_outputs(op)[0]).name


def stage_exit_op(m: TFLiteModel) -> int:
    """Index of the op writing the stage output: the producer of the head conv's input."""
    heads = [i for i in range(m.num_ops) if kps.HEAD_NAME in op_output_name(m, i)]
    assert heads, [op_output_name(m, i) for i in range(m.num_ops)]
    producers = m.producers()
    exit_tensor = m.op_inputs(heads[0])[0]
    assert exit_tensor in producers, "the converter removed the whole stage"
    return producers[exit_tensor]


def ancestors(m: TFLiteModel, op: int) -> set:
    """`op` and every op it (transitively) reads from."""
    producers = m.producers()
    seen, frontier = set(), [op]
    while frontier:
        i = frontier.pop()
        if i in seen:
            continue
        seen.add(i)
        frontier.extend(producers[t] for t in m.op_inputs(i) if t in producers)
    return seen


def is_single_exit(m: TFLiteModel, op: int) -> bool:
    """True if no tensor written inside ancestors(op), except op's output, is read after it."""
    stage = ancestors(m, op)
    consumers = m.consumers()
    for i in stage - {op}:
        for t in m.op_outputs(i):
            if t in m.outputs or any(c not in stage for c in consumers.get(t, [])):
                return False
    return True


def check_structure(original: bytes, patched: bytes, split: int) -> None:
    """Exactly one KP_PATCH_STAGE, replacing exactly the ops up to `split`, besides the one-layer
    stages the arena passes may add elsewhere (an in-place depthwise, a folded PAD): those are
    expanded back to builtins first."""
    m, p = TFLiteModel.from_bytes(original), TFLiteModel.from_bytes(patched)
    custom = [i for i in range(p.num_ops) if p.op_type(i) == CUSTOM_CODE]
    passes_stages = [i for i in custom if op_output_name(p, i) != op_output_name(m, split)]
    assert all(stage_options(p, i).num_layers == 1 for i in passes_stages), describe(p)
    if passes_stages:
        p = TFLiteModel.from_bytes(unpatchify(patched, passes_stages))
    stage = ancestors(m, split)
    custom = [i for i in range(p.num_ops) if p.op_type(i) == CUSTOM_CODE]
    assert len(custom) == 1, [p.op_type(i) for i in range(p.num_ops)]
    kept = [(m.op_type(i), op_output_name(m, i)) for i in range(m.num_ops) if i not in stage]
    left = [(p.op_type(i), op_output_name(p, i)) for i in range(p.num_ops) if i != custom[0]]
    assert left == kept, "builtin ops of the stage survive in the patched model (or others vanished)"
    assert p.num_ops == m.num_ops - len(stage) + 1
    assert op_output_name(p, custom[0]) == op_output_name(m, split)
    assert p.op_inputs(custom[0])[0] == p.inputs[0]


def with_outputs(model_bytes: bytes, names) -> bytes:
    """The model with the tensors `names` appended to its outputs (for inspection)."""
    m = TFLiteModel.from_bytes(model_bytes)
    extra = [m.find_tensor(n) for n in names]
    m.add_outputs(extra)  # drops an offline plan: made for the old lifetimes
    return m.to_bytes()


# Every patched run goes through both KP_PATCH_STAGE executors: the numpy
# reference and the C++ kernel core (keras_patch._kp_core, built by
# `pip install .` / `python setup.py build_ext --inplace`); they share the
# hypothesis examples, and each must equal LiteRT bit for bit.
EXECUTORS = ("reference", "cpp")


def assert_bit_exact(original: bytes, patched: bytes, x: np.ndarray, exit_name: str) -> None:
    want = run_tflite(original, x)
    # The stage output itself, pixel by pixel.
    want_stage = run_tflite(with_outputs(original, [exit_name]), x)[-1]
    inspected = with_outputs(patched, [exit_name])
    for executor in EXECUTORS:
        got = run_tflite(patched, x, executor=executor)
        assert len(want) == len(got)
        for w, g in zip(want, got):
            assert w.dtype == g.dtype == np.int8
            np.testing.assert_array_equal(g, w, err_msg=f"model output differs ({executor} executor)")
        got_stage = run_tflite(inspected, x, executor=executor)[-1]
        diff = np.argwhere(got_stage != want_stage)
        assert diff.size == 0, (
            f"{executor} executor: stage output '{exit_name}' {want_stage.shape}: {len(diff)} int8 "
            f"values differ, first at (n, y, x, c)={diff[0].tolist()}: "
            f"patched {got_stage[tuple(diff[0])]} vs LiteRT {want_stage[tuple(diff[0])]}"
        )


def describe(m: TFLiteModel) -> str:
    return "\n".join(
        f"  {i:2d} {m.op_type(i):18s} {m.tensor(m.op_outputs(i)[0]).shape} {op_output_name(m, i)}"
        for i in range(m.num_ops)
    )


# ------------------------------------------------------------------ tests


@pytest.mark.slow
@settings(max_examples=examples(130))
@given(spec=kps.stage_specs(), data=st.data())
def test_patched_stage_is_bit_exact(spec, data):
    """Split at the stage's last op (the op feeding the head), random grid."""
    model = kps.build_model(spec)
    original = convert(model)
    m = TFLiteModel.from_bytes(original)
    note(describe(m))
    reject_requantizing_relu6(m)
    split = stage_exit_op(m)
    exit_shape = m.tensor(m.op_outputs(split)[0]).shape
    assert tuple(exit_shape[1:]) == kps.stage_output_shape(spec)
    grid = data.draw(kps.grids(exit_shape[1:3]), label="grid")
    x = data.draw(kps.int8_inputs(spec.input_shape), label="x").array()

    patched = patchify(original, split, grid)

    check_structure(original, patched, split)
    assert_bit_exact(original, patched, x, op_output_name(m, split))


@pytest.mark.slow
@settings(max_examples=examples(70))
@given(spec=kps.stage_specs(max_size=32), data=st.data())
def test_patched_prefix_is_bit_exact(spec, data):
    """Split at a random single-exit op inside the stage; non-single-exit splits are rejected."""
    model = kps.build_model(spec)
    original = convert(model)
    m = TFLiteModel.from_bytes(original)
    note(describe(m))
    reject_requantizing_relu6(m)
    stage = sorted(ancestors(m, stage_exit_op(m)))
    single_exit = [i for i in stage if is_single_exit(m, i)]
    # Every split that is not single-exit must be refused with a clear error.
    for i in stage:
        if i not in single_exit:
            with pytest.raises(UnsupportedModelError, match="single-exit"):
                patchify(original, i, (1, 1))
    split = data.draw(st.sampled_from(single_exit), label="split")
    exit_shape = m.tensor(m.op_outputs(split)[0]).shape
    grid = data.draw(kps.grids(exit_shape[1:3]), label="grid")
    x = data.draw(kps.int8_inputs(spec.input_shape), label="x").array()

    patched = patchify(original, op_output_name(m, split), grid)  # split given by tensor name

    check_structure(original, patched, split)
    assert_bit_exact(original, patched, x, op_output_name(m, split))


@pytest.mark.slow
@settings(max_examples=examples(30))
@given(spec=kps.stage_specs(max_size=24), data=st.data())
def test_stage_ending_in_global_average_pool_is_bit_exact(spec, data):
    """A stage ending at the head's MEAN (options version 3): the grid tiles the MEAN's input, the
    stage starts at a random single-entry op; the MEAN output equals TFLM's (the oracle) and
    LiteRT's, with both executors."""
    model = kps.build_model(spec)
    original = convert(model)
    m = TFLiteModel.from_bytes(original)
    note(describe(m))
    reject_requantizing_relu6(m)
    (mean,) = [i for i in range(m.num_ops) if m.op_type(i) == "MEAN"]
    runs = [run for run in patchable_runs(m) if run[1] == mean]
    assert runs, "no patch stage can end at the MEAN"
    first, _, entry, _ = data.draw(st.sampled_from(runs), label="run")
    tiled_h, tiled_w = m.tensor(m.op_inputs(mean)[0]).shape[1:3]
    grid = data.draw(kps.grids((tiled_h, tiled_w)), label="grid")
    x = data.draw(kps.int8_inputs(spec.input_shape), label="x").array()

    patched = patchify_stages(original, [(m.tensor(entry).name, mean, grid)])

    p = TFLiteModel.from_bytes(patched)
    stages = [op for op in find_stages(p) if op_output_name(p, op) == op_output_name(m, mean)]
    assert len(stages) == 1, describe(p)
    options = stage_options(p, stages[0])
    assert options.ends_with_mean and options.version == 3 and tuple(options.grid) == grid
    assert options.num_layers == mean - first + 1
    mean_name = op_output_name(m, mean)
    # TFLM (the oracle) runs the MEAN alone on LiteRT's MEAN input: the stage must give its output.
    # (Not the whole chain: TFLM's int8 RELU6 ignores the output quantization, LiteRT's requantizes.)
    mean_input = run_tflite(with_outputs(original, [m.tensor(m.op_inputs(mean)[0]).name]), x)[-1]
    want_tflm = tflm_outputs(single_op_model(original, mean), mean_input, 1)[0]
    got = run_tflite(with_outputs(patched, [mean_name]), x)[-1]
    np.testing.assert_array_equal(got, want_tflm.reshape(got.shape), err_msg="the stage's MEAN vs TFLM's")
    assert_bit_exact(original, patched, x, mean_name)  # both executors, vs LiteRT


def test_relu6_that_requantizes_differs_in_tflm():
    """A standalone RELU6 whose output quantization differs from its input's (here after a PAD):
    TFLM clamps in the input's quantization, LiteRT requantizes, so the references disagree and
    patchify refuses to put it in a stage (naming the op); the planner leaves it out."""
    spec = kps.StageSpec(input_shape=(5, 5, 1), blocks=(
        kps.InvertedResidual(expand_channels=None, dw_kernel=(3, 3), bn=False, post_act=None),
        kps.Pad(pads=((0, 1), (0, 0))), kps.Relu(act="relu6", act_mode="relu_layer")), seed=0)
    original = convert(kps.build_model(spec))
    m = TFLiteModel.from_bytes(original)
    (relu6,) = [i for i in range(m.num_ops) if m.op_type(i) == "RELU6"]
    assert op_relu6_keeps_quantization(m, relu6)
    x = np.random.default_rng(0).integers(-128, 128, (2, 5, 5, 1), dtype=np.int8)
    single = single_op_model(original, relu6)
    relu6_input = run_tflite(with_outputs(original, [m.tensor(m.op_inputs(relu6)[0]).name]), x)[-1]
    tflm = tflm_outputs(single, relu6_input, 1)[0]
    assert not np.array_equal(tflm, run_tflite(single, relu6_input)[0])
    with pytest.raises(UnsupportedModelError, match=f"op {relu6} \\(RELU6 .*TFLM's int8 RELU6 ignores"):
        patchify(original, relu6, (1, 1))
    import keras_patch

    plan = keras_patch.plan(original, max_mac_overhead=1.5)
    assert all(not s.first_op <= relu6 <= s.last_op for s in plan.stages)


def single_op_model(model_bytes: bytes, op: int) -> bytes:
    """The model cut down to op `op` alone: its activation input in, its output out."""
    sub = TFLiteModel.from_bytes(model_bytes)
    sub.subgraph.inputs = np.array(sub.op_inputs(op)[:1], np.int32)
    sub.subgraph.outputs = np.array(sub.op_outputs(op), np.int32)
    sub.subgraph.operators = [sub.subgraph.operators[op]]
    sub.model.signatureDefs = []
    sub.remove_unused()
    return sub.to_bytes()


def tflm_outputs(model_bytes: bytes, x: np.ndarray, num_outputs: int) -> list:
    """Runs the model on TFLM (the MCU reference interpreter), batch by batch."""
    from tflite_micro.python.tflite_micro import runtime

    interpreter = runtime.Interpreter.from_bytes(model_bytes, arena_size=4 * 1024 * 1024)
    results = [[] for _ in range(num_outputs)]
    for n in range(len(x)):
        interpreter.set_input(x[n : n + 1], 0)
        interpreter.invoke()
        for k in range(num_outputs):
            results[k].append(np.array(interpreter.get_output(k)).copy())
    return [np.concatenate(r, axis=0) for r in results]


@pytest.mark.slow
@settings(max_examples=examples(40))
@given(spec=kps.stage_specs(max_size=32), data=st.data())
def test_tflm_matches_litert_on_unpatched_model(spec, data):
    """On every op a patch stage can hold, TFLM (the MCU interpreter) and
    LiteRT's reference kernels agree bit for bit, so LiteRT is the right oracle.

    Every such op's output is compared, not only the model output: the head's
    FULLY_CONNECTED is not a stage op, and there LiteRT's reference kernel and
    TFLM's do differ by one now and then (seen on a 1x5 conv + MEAN + FC model),
    nor is a RELU6 that requantizes (TFLM's clamps in the input quantization and
    ignores the output's: `test_relu6_that_requantizes_differs_in_tflm`).
    """
    model = kps.build_model(spec)
    original = convert(model)
    m = TFLiteModel.from_bytes(original)
    note(describe(m))
    reject_requantizing_relu6(m)
    stage_ops = [i for i in range(m.num_ops) if m.op_type(i) in LAYER_OP_NAMES.values()]
    assert stage_exit_op(m) in stage_ops
    names = [op_output_name(m, i) for i in stage_ops]
    inspected = with_outputs(original, names)
    x = data.draw(kps.int8_inputs(spec.input_shape), label="x").array()

    want = run_tflite(inspected, x)
    got = tflm_outputs(inspected, x, len(want))
    first = len(want) - len(names)
    for k in range(first, len(want)):
        op = stage_ops[k - first]
        np.testing.assert_array_equal(
            got[k].reshape(want[k].shape), want[k],
            err_msg=f"TFLM vs LiteRT reference kernels, op {op} ({m.op_type(op)})",
        )


@pytest.mark.slow
@settings(max_examples=examples(70))
@given(spec=kps.stage_specs(max_size=32), data=st.data())
def test_export_patch_stage_is_bit_exact(spec, data):
    """PatchStage(block, grid) + head -> export_tflite == the unpatched int8 conversion."""
    from keras_patch.keras.export import export_tflite

    out_h, out_w, _ = kps.stage_output_shape(spec)
    grid = data.draw(kps.grids((out_h, out_w)), label="grid")
    model = kps.build_model(spec, patch_grid=grid)
    samples = np.concatenate(representative_samples(model), axis=0)  # to_int8_tflite's calibration data

    original = convert(model)  # same model, same calibration data, no patching
    m = TFLiteModel.from_bytes(original)
    note(describe(m))
    reject_requantizing_relu6(m)
    exported = export_tflite(model, samples)
    p = TFLiteModel.from_bytes(exported)
    note(describe(p))
    split = stage_exit_op(m)
    check_structure(original, exported, split)
    custom = [i for i in range(p.num_ops) if p.op_type(i) == CUSTOM_CODE][0]
    options_grid = tuple(stage_options(p, custom).grid)
    assert options_grid == grid
    x = data.draw(kps.int8_inputs(spec.input_shape), label="x").array()
    assert_bit_exact(original, exported, x, op_output_name(m, split))


def test_strategies_draw_valid_architectures():
    """Cheap sanity check of the strategies themselves (no conversion)."""

    @settings(max_examples=examples(200), database=None)
    @given(spec=kps.stage_specs())
    def check(spec):
        shape = kps.stage_output_shape(spec)
        assert min(shape) >= 1
        assert 1 <= len(spec.blocks) <= 6

    check()
