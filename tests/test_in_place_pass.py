"""keras_patch.graph.passes.in_place on converted Keras models, against LiteRT's reference kernels.

Random stages (tests/strategies.py: depthwise, inverted-residual, pooling,
PAD, ADD blocks) are converted to int8 .tflite; `make_depthwise_in_place`
turns every eligible DEPTHWISE_CONV_2D into a one-layer in-place
KP_PATCH_STAGE, `set_stages_in_place` sets `in_place` on a patched stage.
`run_tflite` with both executors (the C++ core runs the in-place stages with
input and output at the same address) must give exactly the unmodified
model's LiteRT BUILTIN_REF outputs: the model outputs and every rewritten
op's output tensor.
"""

import os

os.environ["TF_CPP_MIN_LOG_LEVEL"] = "3"


import numpy as np  # noqa: E402
import pytest  # noqa: E402
from hypothesis import event, given, note, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

try:
    from tests import strategies as kps
    from tests.test_bit_exact import convert, describe, examples, op_output_name, stage_exit_op, with_outputs
except ImportError:  # tests/ itself on sys.path
    import strategies as kps
    from test_bit_exact import convert, describe, examples, op_output_name, stage_exit_op, with_outputs

from keras_patch.arena.aliases import depthwise_in_place_failure, depthwise_save_bytes, in_place_aliases  # noqa: E402
from keras_patch.arena.profiler import stage_scratch_bytes  # noqa: E402
from keras_patch.errors import UnsupportedModelError  # noqa: E402
from keras_patch.graph.passes.in_place import make_depthwise_in_place, set_stages_in_place  # noqa: E402
from keras_patch.graph.patchify import find_stages, patchify, stage_options  # noqa: E402
from keras_patch.graph.tflite_model import TFLiteModel  # noqa: E402
from keras_patch.runtime.host import run_tflite  # noqa: E402
from keras_patch.stage import geometry  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore:Statistics for quantized inputs")

EXECUTORS = ("reference", "cpp")


def _assert_same(original: bytes, rewritten: bytes, x: np.ndarray, names) -> None:
    want = run_tflite(with_outputs(original, names), x)
    for executor in EXECUTORS:
        got = run_tflite(with_outputs(rewritten, names), x, executor=executor)
        assert len(got) == len(want)
        for i, (w, g) in enumerate(zip(want, got)):
            np.testing.assert_array_equal(g, w, err_msg=f"output {i} differs ({executor} executor)")


@st.composite
def _dw_specs(draw, min_size=5, max_size=24):
    """Depthwise-rich StageSpecs: conv, depthwise and inverted-residual blocks, 1..4 of them."""
    h, w, c = draw(st.integers(min_size, max_size)), draw(st.integers(min_size, max_size)), draw(st.integers(1, 8))
    shape = (h, w, c)
    blocks = []
    for _ in range(draw(st.integers(1, 4))):
        kind = draw(st.sampled_from(["conv", "dwconv", "dwconv", "inverted_residual", "inverted_residual"]))
        block = draw(kps.BLOCK_STRATEGIES[kind](shape))
        blocks.append(block)
        shape = kps.block_output_shape(block, shape)
    return kps.StageSpec(input_shape=(h, w, c), blocks=tuple(blocks),
                         seed=draw(st.integers(0, 2**31 - 1)))


@settings(max_examples=examples(30))
@given(spec=_dw_specs(), data=st.data())
def test_make_depthwise_in_place_is_bit_exact(spec, data):
    original = convert(kps.build_model(spec))
    m = TFLiteModel.from_bytes(original)
    note(describe(m))
    eligible = [i for i in range(m.num_ops) if m.op_type(i) == "DEPTHWISE_CONV_2D"
                and depthwise_in_place_failure(m, i) is None]
    names = [op_output_name(m, i) for i in eligible]
    changed = make_depthwise_in_place(m)
    assert changed == eligible
    event(f"depthwise ops made in place: {min(len(changed), 2)}+")
    for op in changed:
        assert m.op_type(op) == "KP_PATCH_STAGE"
        opts = stage_options(m, op)
        assert opts.in_place and opts.num_layers == 1 and opts.grid == (1, 1)
        h, w, _ = opts.input_shape
        # One channel plane of the input, no other scratch: below the tensor it saves.
        assert stage_scratch_bytes(m, "cmsis_nn")[op] == [geometry.plan_patch_arena(opts).total_bytes]
        assert 0 < geometry.plan_patch_arena(opts).total_bytes <= depthwise_save_bytes(h, w)
        assert m.op_outputs(op)[0] in in_place_aliases(m)  # the offline plan may alias them
    rewritten = m.to_bytes()
    x = data.draw(kps.int8_inputs(spec.input_shape), label="x").array()
    _assert_same(original, rewritten, x, names)


@settings(max_examples=examples(25))
@given(spec=_dw_specs(max_size=32), data=st.data())
def test_set_stages_in_place_is_bit_exact_and_never_grows_the_arena(spec, data):
    original = convert(kps.build_model(spec))
    m = TFLiteModel.from_bytes(original)
    split = stage_exit_op(m)
    grid = data.draw(kps.grids(m.tensor(m.op_outputs(split)[0]).shape[1:3], max_grid=4), label="grid")
    patched = patchify(original, split, grid, arena=False)  # the pass under test runs below
    p = TFLiteModel.from_bytes(patched)
    before = {op: geometry.plan_patch_arena(stage_options(p, op)).total_bytes for op in find_stages(p)}
    changed = set_stages_in_place(p)
    event(f"stage set in place: {bool(changed)}")
    for op in find_stages(p):
        opts = stage_options(p, op)
        after = geometry.plan_patch_arena(opts).total_bytes
        assert opts.in_place == (op in changed)
        assert after < before[op] if op in changed else after == before[op]
        if op in changed:
            assert geometry.plan_patch_arena(opts).in_place_layers
            assert stage_scratch_bytes(p)[op] == [after]
    x = data.draw(kps.int8_inputs(spec.input_shape), label="x").array()
    _assert_same(original, p.to_bytes(), x, [op_output_name(m, split)])


def test_explicit_ineligible_op_is_refused_naming_it():
    spec = kps.StageSpec(input_shape=(8, 8, 4), blocks=(kps.DWConv(kernel=(3, 3), strides=(1, 1), padding="same",
                                                                     depth_multiplier=2, act="relu6"),), seed=1)
    m = TFLiteModel.from_bytes(convert(kps.build_model(spec)))
    dw = [i for i in range(m.num_ops) if m.op_type(i) == "DEPTHWISE_CONV_2D"]
    with pytest.raises(UnsupportedModelError, match="depth multiplier"):
        make_depthwise_in_place(m, dw)
    assert make_depthwise_in_place(m) == []


def test_set_stages_in_place_checks_kernel():
    with pytest.raises(ValueError, match="kernel"):
        set_stages_in_place(TFLiteModel.from_bytes(convert(kps.build_model(
            kps.StageSpec(input_shape=(6, 6, 2), blocks=(kps.Relu("relu"),), seed=0)))), kernel="gpu")
