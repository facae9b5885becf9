"""`keras_patch.patchify` on models keras-patch did not produce.

The main subject is MobileNetV2 0.35@96 from the standard converter with a
FLOAT input (no inference_input_type, so the graph starts with QUANTIZE and
ends with DEQUANTIZE): patched at an ADD tensor name or an op index, on
several grids (some not dividing the stage output), it must run bit-exactly
like the unpatched model under `run_tflite` with float inputs. Then every
kind of bad input must raise a `keras_patch.errors` exception whose message
names what is wrong, and corrupt KP_PATCH_STAGE options must raise
`InvalidOptionsError` naming the options key.
"""

import os

os.environ["TF_CPP_MIN_LOG_LEVEL"] = "3"

import array  # noqa: E402
import re  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402
from flatbuffers import flexbuffers  # noqa: E402

import model_zoo  # noqa: E402
import keras_patch  # noqa: E402
from keras_patch.errors import (  # noqa: E402
    InvalidModelError,
    InvalidOptionsError,
    KerasPatchError,
    UnsupportedModelError,
)
from keras_patch.grid import check_grid  # noqa: E402
from keras_patch.stage import options as o  # noqa: E402
from keras_patch.graph.patchify import SUPPORTED_STAGE_OPS, find_stages, stage_options  # noqa: E402
from keras_patch.runtime.host import run_tflite  # noqa: E402
from keras_patch.graph.tflite_model import TFLiteModel  # noqa: E402
from keras_patch.graph.unpatchify import unpatchify  # noqa: E402
from keras_patch.planner.schedule import short_tensor_name  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore:Statistics for quantized inputs")


# ------------------------------------------------------------------ helpers


def with_outputs(model_bytes: bytes, names) -> bytes:
    """The model with the tensors `names` appended to its outputs (for inspection)."""
    m = TFLiteModel.from_bytes(model_bytes)
    extra = [m.find_tensor(n) for n in names]
    m.add_outputs(extra)
    return m.to_bytes()


def op_types(m: TFLiteModel) -> list:
    return [m.op_type(i) for i in range(m.num_ops)]


def out_name(m: TFLiteModel, op: int) -> str:
    return m.tensor(m.op_outputs(op)[0]).name


def first_op(m: TFLiteModel, op_type: str, name_part: str = "") -> int:
    for i in range(m.num_ops):
        if m.op_type(i) == op_type and name_part in out_name(m, i):
            return i
    raise AssertionError(f"no {op_type} op writing a tensor containing '{name_part}'")


def assert_bit_exact(original: bytes, patched: bytes, x: np.ndarray, names) -> None:
    """Model outputs and the tensors `names` are equal in both models."""
    want = run_tflite(with_outputs(original, names), x)
    got = run_tflite(with_outputs(patched, names), x)
    assert len(want) == len(got) == 1 + len(names)
    labels = ["model output"] + [f"tensor '{n}'" for n in names]
    for label, w, g in zip(labels, want, got):
        assert w.dtype == g.dtype and w.shape == g.shape, label
        if not np.array_equal(w, g):
            diff = np.argwhere(w != g)
            raise AssertionError(
                f"{label}: {len(diff)} of {w.size} values differ, first at {diff[0].tolist()}: "
                f"unpatched {w[tuple(diff[0])]}, patched {g[tuple(diff[0])]}"
            )


# ----------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def mbv2_float_io() -> bytes:
    """MobileNetV2 0.35@96 + Dense(5), int8 inside, float32 input and output."""
    return model_zoo.to_int8_tflite(model_zoo.mobilenet_v2(alpha=0.35, size=96, num_classes=5), int8_io=False)


@pytest.fixture(scope="module")
def mbv2(mbv2_float_io):
    m = TFLiteModel.from_bytes(mbv2_float_io)
    add2 = first_op(m, "ADD", "block_2_add")
    add5 = first_op(m, "ADD", "block_5_add")
    mean = first_op(m, "MEAN")
    return dict(bytes=mbv2_float_io, model=m, add2=add2, add5=add5, mean=mean,
                add2_name=out_name(m, add2), add5_name=out_name(m, add5), mean_name=out_name(m, mean))


@pytest.fixture(scope="module")
def float_images():
    return np.random.default_rng(1).uniform(-1, 1, (3, 96, 96, 3)).astype(np.float32)


@pytest.fixture(scope="module")
def patched_add2(mbv2) -> bytes:
    return keras_patch.patchify(mbv2["bytes"], mbv2["add2_name"], grid=(4, 4), arena=False)


def test_reference_model_is_what_the_issue_describes(mbv2):
    m = mbv2["model"]
    types = op_types(m)
    assert types[0] == "QUANTIZE" and types[-1] == "DEQUANTIZE"
    assert m.tensor(m.inputs[0]).dtype == np.float32
    assert m.tensor(m.outputs[0]).dtype == np.float32
    assert m.tensor(m.op_outputs(0)[0]).dtype == np.int8
    assert m.tensor(m.op_outputs(mbv2["add2"])[0]).shape == (1, 24, 24, 8)
    assert m.tensor(m.op_outputs(mbv2["add5"])[0]).shape == (1, 12, 12, 16)


# -------------------------------------------------------------- structure


def test_patched_structure(mbv2, patched_add2):
    m, p = mbv2["model"], TFLiteModel.from_bytes(patched_add2)
    split = mbv2["add2"]
    # QUANTIZE stays in front; ops 1..split become one custom op; the rest is untouched.
    assert op_types(p) == ["QUANTIZE", o.CUSTOM_CODE] + op_types(m)[split + 1:]
    assert find_stages(p) == [1]
    code = p.model.operatorCodes[p.operator(1).opcodeIndex]
    assert code.customCode in (o.CUSTOM_CODE, o.CUSTOM_CODE.encode())
    assert p.operator(1).customOptionsFormat == 0  # FLEXBUFFERS

    inputs, (exit_t,) = p.op_inputs(1), p.op_outputs(1)
    assert inputs[0] == p.op_outputs(0)[0]  # the QUANTIZE output
    assert p.tensor(exit_t).name == mbv2["add2_name"]
    assert not any(p.is_constant(t) for t in inputs[:1]) and all(p.is_constant(t) for t in inputs[1:])

    opts = stage_options(p, 1)
    assert opts.grid == (4, 4)
    assert opts.num_layers == split  # ops 1..split
    assert [o.LAYER_OP_NAMES[l.op] for l in opts.layers] == op_types(m)[1:split + 1]
    assert opts.tensor_shapes[0] == (96, 96, 3) and opts.tensor_shapes[-1] == (24, 24, 8)
    weights = [w for l in opts.layers for w in l.weights if w >= 0]
    assert weights == list(range(1, len(inputs)))  # filter, bias, filter, bias, ... in layer order
    # The stage's weights are the original constant data.
    ref_consts = [t for op in range(1, split + 1) for t in m.op_inputs(op)[1:] if t >= 0 and m.is_constant(t)]
    assert len(ref_consts) == len(inputs) - 1
    for rt, pt in zip(ref_consts, inputs[1:]):
        np.testing.assert_array_equal(p.constant(pt), m.constant(rt))
        np.testing.assert_array_equal(p.tensor(pt).scale, m.tensor(rt).scale)
    # The stage's intermediate tensors are gone.
    internal = {out_name(m, op) for op in range(1, split)}
    names = {p.tensor(t).name for t in range(len(p.subgraph.tensors))}
    assert not internal & names
    assert len(p.subgraph.tensors) == len(m.subgraph.tensors) - (split - 1)


# ------------------------------------------------------------ bit-exactness


@pytest.mark.parametrize("grid", [(4, 4), (5, 7), (1, 1), (7, 24), (24, 24)])
def test_bit_exact_at_add_tensor_name(mbv2, float_images, grid):
    patched = keras_patch.patchify(mbv2["bytes"], mbv2["add2_name"], grid=grid, arena=False)
    assert stage_options(TFLiteModel.from_bytes(patched), 1).grid == grid
    assert_bit_exact(mbv2["bytes"], patched, float_images, [mbv2["add2_name"], mbv2["mean_name"]])


@pytest.mark.parametrize("grid", [(3, 3), (5, 5), "4x3", 12])
def test_bit_exact_at_op_index(mbv2, float_images, grid):
    split = mbv2["add5"]
    patched = keras_patch.patchify(mbv2["bytes"], split, grid=grid, arena=False)
    p = TFLiteModel.from_bytes(patched)
    assert op_types(p)[:3] == ["QUANTIZE", o.CUSTOM_CODE, "CONV_2D"]
    assert stage_options(p, 1).num_layers == split
    assert_bit_exact(mbv2["bytes"], patched, float_images, [mbv2["add5_name"], mbv2["mean_name"]])


def test_split_forms_agree(mbv2, tmp_path):
    """Index, numeric string and tensor name give the same model; so do bytes and a path."""
    by_name = keras_patch.patchify(mbv2["bytes"], mbv2["add5_name"], grid=(3, 3), arena=False)
    assert keras_patch.patchify(mbv2["bytes"], mbv2["add5"], grid=(3, 3), arena=False) == by_name
    assert keras_patch.patchify(mbv2["bytes"], str(mbv2["add5"]), grid="3x3", arena=False) == by_name
    assert keras_patch.patchify(mbv2["bytes"], np.int64(mbv2["add5"]), grid=3, arena=False) == by_name
    path = tmp_path / "mbv2.tflite"
    path.write_bytes(mbv2["bytes"])
    assert keras_patch.patchify(str(path), mbv2["add5_name"], grid=(3, 3), arena=False) == by_name
    assert keras_patch.patchify(path, mbv2["add5_name"], grid=(3, 3), arena=False) == by_name


def test_split_by_keras_layer_name(mbv2):
    """A Keras layer name (tensor `.../block_2_add_1/Add`) picks the one op it names."""
    assert "/block_2_add_1/" in mbv2["add2_name"]
    by_name = keras_patch.patchify(mbv2["bytes"], mbv2["add2_name"], grid=(2, 2), arena=False)
    assert keras_patch.patchify(mbv2["bytes"], "block_2_add", grid=(2, 2), arena=False) == by_name
    project = first_op(mbv2["model"], "CONV_2D", "/block_1_project_1/")
    assert keras_patch.patchify(mbv2["bytes"], "block_1_project", grid=(2, 2), arena=False) == \
        keras_patch.patchify(mbv2["bytes"], project, grid=(2, 2), arena=False)


def test_error_ambiguous_layer_name_lists_candidates(mbv2):
    m = mbv2["model"]
    model_name = out_name(m, mbv2["add2"]).split("/")[0]  # e.g. 'mobilenet_v2_0.35_96_1'
    message = _error(keras_patch.patchify, mbv2["bytes"], model_name.rsplit("_", 1)[0], grid=(2, 2))
    assert "names the outputs of" in message and "op 1 (CONV_2D" in message and "more." in message
    assert "\n" not in message


def test_unpatchify_round_trip(mbv2, patched_add2, float_images):
    plain = unpatchify(patched_add2)
    pm = TFLiteModel.from_bytes(plain)
    assert o.CUSTOM_CODE not in op_types(pm)
    assert op_types(pm) == op_types(mbv2["model"])
    assert_bit_exact(patched_add2, plain, float_images, [mbv2["add2_name"], mbv2["mean_name"]])


def test_start_argument(mbv2, float_images):
    """A stage in the middle of the network: block_2 (expand .. add) only."""
    m = mbv2["model"]
    block1_project = first_op(m, "CONV_2D", "block_1_project")
    start_name = out_name(m, block1_project)
    start_index = m.op_outputs(block1_project)[0]
    patched = keras_patch.patchify(m.to_bytes(), mbv2["add2_name"], grid=(3, 5), start=start_name, arena=False)
    p = TFLiteModel.from_bytes(patched)
    assert op_types(p) == op_types(m)[: block1_project + 1] + [o.CUSTOM_CODE] + op_types(m)[mbv2["add2"] + 1:]
    stage = find_stages(p)[0]
    assert p.tensor(p.op_inputs(stage)[0]).name == start_name
    opts = stage_options(p, stage)
    assert [o.LAYER_OP_NAMES[l.op] for l in opts.layers] == ["CONV_2D", "DEPTHWISE_CONV_2D", "CONV_2D", "ADD"]
    assert sorted(opts.layers[-1].inputs) == [0, 3]  # the skip connection reads the stage input
    assert keras_patch.patchify(m.to_bytes(), mbv2["add2_name"], grid=(3, 5), start=start_index, arena=False) == patched
    assert keras_patch.patchify(m.to_bytes(), mbv2["add2_name"], grid=(3, 5), start=str(start_index), arena=False) == patched
    assert_bit_exact(mbv2["bytes"], patched, float_images, [mbv2["add2_name"], mbv2["mean_name"]])


def test_patch_then_patch_a_second_stage(mbv2, patched_add2, float_images):
    """A patched model can be patched again after its first stage."""
    p = TFLiteModel.from_bytes(patched_add2)
    twice = keras_patch.patchify(patched_add2, mbv2["add5_name"], grid=(2, 2), start=mbv2["add2_name"], arena=False)
    t = TFLiteModel.from_bytes(twice)
    assert op_types(t)[:3] == ["QUANTIZE", o.CUSTOM_CODE, o.CUSTOM_CODE]
    assert len(find_stages(t)) == 2 and p.num_ops - t.num_ops == mbv2["add5"] - mbv2["add2"] - 1
    assert_bit_exact(mbv2["bytes"], twice, float_images, [mbv2["add2_name"], mbv2["add5_name"], mbv2["mean_name"]])


# ------------------------------------------------------------------ errors


def _error(fn, *args, expected=UnsupportedModelError, **kwargs) -> str:
    with pytest.raises(expected) as info:
        fn(*args, **kwargs)
    assert isinstance(info.value, KerasPatchError) and isinstance(info.value, ValueError)
    return str(info.value)


def test_error_unsupported_op_in_range(mbv2):
    m = mbv2["model"]
    fc = first_op(m, "FULLY_CONNECTED")
    message = _error(keras_patch.patchify, mbv2["bytes"], fc, grid=(1, 1))
    assert f"op {fc} (FULLY_CONNECTED -> {short_tensor_name(out_name(m, fc))})" in message
    assert "cannot run inside a patch stage" in message and "CONV_2D" in message  # lists the supported ops


def test_stage_through_the_global_average_pool(mbv2, float_images):
    """The whole network up to the MEAN is one stage: the grid tiles the MEAN's input (3x3)."""
    m = mbv2["model"]
    patched = keras_patch.patchify(mbv2["bytes"], mbv2["mean"], grid=(3, 3), arena=False)
    p = TFLiteModel.from_bytes(patched)
    assert op_types(p) == ["QUANTIZE", o.CUSTOM_CODE] + op_types(m)[mbv2["mean"] + 1:]
    opts = stage_options(p, 1)
    assert opts.ends_with_mean and opts.version == 3 and opts.tiled_shape[:2] == (3, 3)
    assert_bit_exact(mbv2["bytes"], patched, float_images, [mbv2["mean_name"]])
    message = _error(keras_patch.patchify, mbv2["bytes"], mbv2["mean"], grid=(4, 1))
    assert "input of the stage's final MEAN 3x3" in message


def _mean_model(axis, keepdims: bool, after: bool) -> bytes:
    import keras

    inputs = keras.Input((8, 8, 3), batch_size=1)
    x = keras.layers.Conv2D(4, 3, padding="same")(inputs)
    x = keras.layers.Lambda(lambda t: keras.ops.mean(t, axis=axis, keepdims=keepdims))(x)
    if after:
        x = keras.layers.Conv2D(4, 1)(x)
    return model_zoo.to_int8_tflite(keras.Model(inputs, keras.layers.Flatten()(x)))


def test_error_mean_over_channels():
    data = _mean_model(axis=-1, keepdims=True, after=False)
    m = TFLiteModel.from_bytes(data)
    message = _error(keras_patch.patchify, data, first_op(m, "MEAN"), grid=(1, 1))
    assert "only a MEAN over height and width" in message and "its axes are [-1]" in message


def test_error_mean_inside_a_stage():
    data = _mean_model(axis=(1, 2), keepdims=True, after=True)
    m = TFLiteModel.from_bytes(data)
    mean = first_op(m, "MEAN")
    message = _error(keras_patch.patchify, data, mean + 1, grid=(1, 1))
    assert f"op {mean} (MEAN" in message and "can only end a patch stage" in message


def test_error_unsupported_op_mixed_ops_model():
    data = model_zoo.to_int8_tflite(model_zoo.mixed_ops_model())
    m = TFLiteModel.from_bytes(data)
    concat = first_op(m, "CONCATENATION")
    # The first op of the range that a stage cannot hold is the one named.
    bad = next(i for i in range(concat + 1) if m.op_type(i) not in SUPPORTED_STAGE_OPS)
    message = _error(keras_patch.patchify, data, out_name(m, concat), grid=(2, 2))
    assert f"op {bad} ({m.op_type(bad)} -> {short_tensor_name(out_name(m, bad))})" in message


def test_error_not_single_exit(mbv2):
    m = mbv2["model"]
    project = first_op(m, "CONV_2D", "block_2_project")  # block_1_project's output skips past it
    inner = m.op_outputs(first_op(m, "CONV_2D", "block_1_project"))[0]
    message = _error(keras_patch.patchify, mbv2["bytes"], project, grid=(2, 2))
    assert "single-exit" in message and f"'block_1_project' (tensor {inner})" in message
    assert f"op {mbv2['add2']} (ADD -> block_2_add)" in message and "mobilenet" not in message


def test_error_not_single_entry(mbv2):
    m = mbv2["model"]
    start = out_name(m, first_op(m, "CONV_2D", "block_2_expand"))  # the ADD also reads block_1_project
    outside = m.op_outputs(first_op(m, "CONV_2D", "block_1_project"))[0]
    message = _error(keras_patch.patchify, mbv2["bytes"], mbv2["add2_name"], grid=(2, 2), start=start)
    assert "single-entry" in message and f"'block_1_project' (tensor {outside})" in message and "ADD" in message


def test_error_split_at_model_output(mbv2):
    m = mbv2["model"]
    last = m.num_ops - 1
    message = _error(keras_patch.patchify, mbv2["bytes"], last, grid=(1, 1))
    assert "model output" in message and m.tensor(m.outputs[0]).name in message
    # The same with an int8-output model, whose last op is the classifier.
    data = model_zoo.to_int8_tflite(model_zoo.tiny_conv_model())
    t = TFLiteModel.from_bytes(data)
    message = _error(keras_patch.patchify, data, t.tensor(t.outputs[0]).name, grid=(1, 1))
    assert "model output" in message and t.tensor(t.outputs[0]).name in message


@pytest.mark.parametrize("grid", [(25, 25), (1, 25), (25, 1), (64, 64)])
def test_error_grid_larger_than_stage_output(mbv2, grid):
    message = _error(keras_patch.patchify, mbv2["bytes"], mbv2["add2_name"], grid=grid)
    assert f"{grid[0]}x{grid[1]}" in message and "24x24" in message and "'block_2_add'" in message


def test_error_float_model():
    data = model_zoo.to_float_tflite(model_zoo.tiny_conv_model())
    m = TFLiteModel.from_bytes(data)
    name = m.tensor(m.inputs[0]).name
    message = _error(keras_patch.patchify, data, 1, grid=(1, 1))
    assert name in message and "float32" in message and "int8" in message
    # Starting the stage explicitly at the float input does not get around it.
    message = _error(keras_patch.patchify, data, 1, grid=(1, 1), start=name)
    assert "float32" in message and "CONV_2D" in message


def test_error_dynamic_shapes():
    data = model_zoo.to_int8_tflite_dynamic(model_zoo.dynamic_input_model())
    m = TFLiteModel.from_bytes(data)
    assert m.tensor(m.inputs[0]).is_dynamic
    message = _error(keras_patch.patchify, data, 1, grid=(1, 1))
    assert "dynamic shape" in message and m.tensor(m.inputs[0]).name in message and "-1" in message


def test_error_dynamic_intermediate_shape(mbv2):
    """A static input but one dynamic tensor inside the stage: that tensor is named."""
    m = TFLiteModel.from_bytes(mbv2["bytes"])
    t = m.op_outputs(first_op(m, "CONV_2D", "block_1_expand"))[0]
    m.subgraph.tensors[t].shapeSignature = np.array([1, -1, -1, 48], np.int32)
    message = _error(keras_patch.patchify, m.to_bytes(), mbv2["add2_name"], grid=(2, 2))
    assert "dynamic shape" in message and f"'block_1_expand_relu' (tensor {t})" in message


def test_error_bad_split_names_it(mbv2):
    message = _error(keras_patch.patchify, mbv2["bytes"], "no_such_tensor", grid=(2, 2))
    assert "no_such_tensor" in message
    message = _error(keras_patch.patchify, mbv2["bytes"], "block_2_ad", grid=(2, 2))  # a part of a name
    assert "block_2_ad" in message and "'block_2_add'" in message  # suggested, as a Keras layer name
    message = _error(keras_patch.patchify, mbv2["bytes"], "blok_2_add", grid=(2, 2))  # a typo
    assert "blok_2_add" in message and "'block_2_add'" in message and "mobilenet" not in message  # a close match
    message = _error(keras_patch.patchify, mbv2["bytes"], 999, grid=(2, 2))
    assert "999" in message and str(mbv2["model"].num_ops) in message
    message = _error(keras_patch.patchify, mbv2["bytes"], mbv2["add2_name"], grid=(2, 2), start="nope_tensor")
    assert "nope_tensor" in message


def test_error_start_after_split(mbv2):
    message = _error(keras_patch.patchify, mbv2["bytes"], mbv2["add2_name"], grid=(2, 2), start=mbv2["add5_name"])
    assert f"op {mbv2['add2']} (ADD -> block_2_add)" in message and "'block_5_add'" in message
    assert "before the start" in message


def test_error_already_patched(mbv2, patched_add2):
    message = _error(keras_patch.patchify, patched_add2, 1, grid=(2, 2))
    assert o.CUSTOM_CODE in message and "op 1" in message


def test_error_bad_grid_argument(mbv2):
    for grid in ["4by4", (0, 2), (2, 2, 2), -1, True, (2.5, 2), (2, False), "２x２", "-2x2", np.array([2.0, 2.0])]:
        with pytest.raises(KerasPatchError) as info:
            keras_patch.patchify(mbv2["bytes"], mbv2["add2_name"], grid=grid, arena=False)
        assert "grid" in str(info.value)


@pytest.mark.parametrize(
    "grid, expected",
    [((4, 2), (4, 2)), ([3, 1], (3, 1)), (3, (3, 3)), (np.int64(2), (2, 2)), ((np.int32(2), 5), (2, 5)),
     (np.array([2, 3]), (2, 3)), ("4x4", (4, 4)), (" 6X2 ", (6, 2)), ("3×4", (3, 4)), ("5", (5, 5))],
)
def test_check_grid_accepts(grid, expected):
    assert check_grid(grid) == expected and all(type(g) is int for g in check_grid(grid))


@pytest.mark.parametrize(
    "grid, message",
    [(True, "True (bool)"), ((2.5, 2), "n_h=2.5 (float)"), ((2, np.float32(2)), "(float32)"),
     ((np.True_, 2), "(bool)"), ("２x２", "ASCII"), ("2x２", "ASCII"), ("-2x2", "n_h=-2"), ("4by4", "'4x4'"),
     ("", "'4x4'"), ((0, 3), "n_h=0"), ((2,), "1 values"), (None, "NoneType")],
)
def test_check_grid_rejects(grid, message):
    with pytest.raises(KerasPatchError, match=re.escape(message)):
        check_grid(grid)


def test_check_grid_text_only_where_allowed():
    with pytest.raises(KerasPatchError, match="pair"):
        check_grid("4x4", allow_string=False)


@pytest.mark.parametrize("start", [9999, -5, "-5", "9999", np.int64(-1)])
def test_error_start_out_of_range(mbv2, start):
    """A negative start is not counted from the end, and a large one is no IndexError."""
    num_tensors = len(TFLiteModel.from_bytes(mbv2["bytes"]).subgraph.tensors)
    message = _error(keras_patch.patchify, mbv2["bytes"], mbv2["add2_name"], grid=(2, 2), start=start)
    assert f"start {int(start)} is not a tensor index" in message and f"0 to {num_tensors - 1}" in message


def test_error_start_is_a_constant(mbv2):
    m = TFLiteModel.from_bytes(mbv2["bytes"])
    weights = next(t for t in range(len(m.subgraph.tensors)) if m.is_constant(t))
    message = _error(keras_patch.patchify, mbv2["bytes"], mbv2["add2_name"], grid=(2, 2), start=weights)
    assert "constant tensor" in message and f"(tensor {weights})" in message


@pytest.mark.parametrize(
    "corrupt, words",
    [
        (lambda b: b[: len(b) // 2], ["truncated"]),
        (lambda b: b[:100], ["truncated"]),
        (lambda b: b[:6], ["shorter than a flatbuffer header"]),
        (lambda b: b"", ["0 bytes"]),
        (lambda b: b[:4] + b"XXXX" + b[8:], ["identifier", "XXXX"]),
        (lambda b: b"\xff\xff\xff\x7fTFL3" + b[8:], ["root table offset"]),
        (lambda b: b[:8] + bytes(len(b) - 8), ["subgraph"]),
        (lambda b: b"garbage!" * 64, ["identifier"]),
    ],
    ids=["half", "100-bytes", "6-bytes", "empty", "identifier", "root-offset", "zeroed", "garbage"],
)
def test_error_corrupt_or_truncated(mbv2, corrupt, words):
    data = corrupt(mbv2["bytes"])
    message = _error(keras_patch.patchify, data, 3, grid=(2, 2), expected=InvalidModelError)
    for word in words:
        assert word in message
    _error(run_tflite, data, np.zeros((1, 96, 96, 3), np.float32), expected=InvalidModelError)


def test_error_missing_file(tmp_path):
    missing = tmp_path / "missing.tflite"
    message = _error(keras_patch.patchify, str(missing), 1, expected=InvalidModelError)
    assert str(missing) in message


# ---------------------------------------------------- corrupt stage options


def _typed(key, value):
    return array.array("f" if key == "tensor_scale" else "i", value)


def encode_entries(entries: dict) -> bytes:
    """A FlexBuffer map from {key: int | float | str | array.array | list}."""
    builder = flexbuffers.Builder()
    with builder.Map():
        for key, value in entries.items():
            if isinstance(value, bool) or isinstance(value, (int, np.integer)):
                builder.Int(key, int(value))
            elif isinstance(value, float):
                builder.Float(key, value)
            elif isinstance(value, str):
                builder.String(key, value)
            elif isinstance(value, array.array):
                builder.TypedVectorFromElements(key, value)
            else:
                builder.VectorFromElements(key, list(value))  # an untyped vector
    return bytes(builder.Finish())


@pytest.fixture(scope="module")
def good_entries(patched_add2) -> dict:
    p = TFLiteModel.from_bytes(patched_add2)
    raw = bytes(np.asarray(p.operator(1).customOptions, np.uint8))
    entries = {k: (_typed(k, v) if isinstance(v, list) else v) for k, v in flexbuffers.Loads(raw).items()}
    # patchify writes version 1 (no in-place stage): the keys of version 1.
    assert set(entries) == set(o.OPTION_KEYS) - set(o.KEY_SINCE)
    assert o.decode_options(encode_entries(entries)) == o.decode_options(raw)
    return entries


def with_options(patched: bytes, options: bytes) -> bytes:
    m = TFLiteModel.from_bytes(patched)
    m.operator(find_stages(m)[0]).customOptions = np.frombuffer(options, np.uint8)
    return m.to_bytes()


def _edit(entries, key, fn):
    values = list(entries[key])
    fn(values)
    return {**entries, key: _typed(key, values)}


def _set(index, value):
    def fn(values):
        values[index] = value
    return fn


CORRUPTIONS = {
    # name: (make the options bytes from the good entries, words the message must contain)
    "garbage": (lambda e: b"\x13\x37not a flexbuffer map at all", ["FlexBuffer map"]),
    "empty": (lambda e: b"", ["FlexBuffer"]),
    "root-not-map": (lambda e: flexbuffers.Dumps([1, 2, 3]), ["map"]),
    "missing-version": (lambda e: encode_entries({k: v for k, v in e.items() if k != "version"}), ["'version'", "missing"]),
    "missing-grid": (lambda e: encode_entries({k: v for k, v in e.items() if k != "grid"}), ["'grid'", "missing"]),
    "missing-layer_weights": (
        lambda e: encode_entries({k: v for k, v in e.items() if k != "layer_weights"}), ["'layer_weights'", "missing"]),
    "version-wrong-type": (lambda e: encode_entries({**e, "version": "1"}), ["'version'", "int"]),
    "version-4": (lambda e: encode_entries({**e, "version": 4}), ["'version'"]),
    "version-2-without-in_place": (lambda e: encode_entries({**e, "version": 2}), ["'in_place'", "missing"]),
    "num_layers-float": (lambda e: encode_entries({**e, "num_layers": 10.0}), ["'num_layers'"]),
    "num_layers-0": (lambda e: encode_entries({**e, "num_layers": 0}), ["'num_layers'"]),
    "grid-float-vector": (lambda e: encode_entries({**e, "grid": array.array("f", [2.0, 2.0])}), ["'grid'"]),
    "grid-untyped-vector": (lambda e: encode_entries({**e, "grid": [2, 2]}), ["'grid'"]),
    "grid-scalar": (lambda e: encode_entries({**e, "grid": 2}), ["'grid'"]),
    "tensor_scale-int-vector": (
        lambda e: encode_entries({**e, "tensor_scale": array.array("i", [1] * len(e["tensor_scale"]))}),
        ["'tensor_scale'"]),
    "grid-length-3": (lambda e: encode_entries({**e, "grid": array.array("i", [2, 2, 2])}), ["'grid'", "3"]),
    "tensor_scale-short": (lambda e: encode_entries(_edit(e, "tensor_scale", lambda v: v.pop())), ["'tensor_scale'"]),
    "layer_params-long": (lambda e: encode_entries(_edit(e, "layer_params", lambda v: v.append(1))), ["'layer_params'"]),
    "tensor_shape-short": (lambda e: encode_entries(_edit(e, "tensor_shape", lambda v: v.pop())), ["'tensor_shape'"]),
    "grid-too-large": (lambda e: encode_entries({**e, "grid": array.array("i", [25, 2])}), ["'grid'", "24x24"]),
    "zero-point-out-of-range": (
        lambda e: encode_entries(_edit(e, "tensor_zero_point", _set(1, 300))), ["'tensor_zero_point'"]),
    "negative-scale": (lambda e: encode_entries(_edit(e, "tensor_scale", _set(2, -0.5))), ["'tensor_scale'"]),
    "unknown-layer-op": (lambda e: encode_entries(_edit(e, "layer_op", _set(0, 9))), ["'layer_op'"]),
    "layer-reads-future-tensor": (lambda e: encode_entries(_edit(e, "layer_inputs", _set(0, 5))), ["'layer_inputs'"]),
    "bad-activation": (lambda e: encode_entries(_edit(e, "layer_activation", _set(0, 5))), ["'layer_activation'"]),
    "weights-out-of-range": (lambda e: encode_entries(_edit(e, "layer_weights", _set(0, 99))), ["'layer_weights'"]),
    "weights-reused": (lambda e: encode_entries(_edit(e, "layer_weights", _set(2, 1))), ["'layer_weights'"]),
    # Shapes that contradict each other or the weights.
    "output-channels-vs-add": (lambda e: encode_entries(_edit(e, "tensor_shape", _set(-1, 7))), ["'tensor_shape'"]),
    "output-size-vs-add": (
        lambda e: encode_entries(_edit(e, "tensor_shape", lambda v: v.__setitem__(slice(-3, -1), [12, 12]))),
        ["'tensor_shape'"]),
    "depthwise-channels": (lambda e: encode_entries(_edit(e, "tensor_shape", _set(5, 12))), ["'tensor_shape'"]),
    "kernel-vs-filter": (
        lambda e: encode_entries(_edit(e, "layer_params", lambda v: v.__setitem__(slice(0, 2), [5, 5]))),
        ["'layer_weights'", "filter shape"]),
}


# Found only against the op's inputs (the kernel's Prepare), not by decode_options.
NEEDS_WEIGHTS = {"kernel-vs-filter", "weights-out-of-range"}


@pytest.mark.parametrize("name", list(CORRUPTIONS))
def test_corrupt_options(good_entries, patched_add2, name):
    make, words = CORRUPTIONS[name]
    data = make(good_entries)
    if name in NEEDS_WEIGHTS:
        o.decode_options(data)
    else:
        with pytest.raises(InvalidOptionsError) as info:
            o.decode_options(data)
        message = str(info.value)
        assert "KP_PATCH_STAGE" in message
        for word in words:
            assert word in message, message
    # run_tflite (which prepares every stage) reports it too.
    with pytest.raises(InvalidOptionsError) as info:
        run_tflite(with_options(patched_add2, data), np.zeros((1, 96, 96, 3), np.float32))
    message = str(info.value)
    assert "KP_PATCH_STAGE" in message
    for word in words:
        assert word in message, message


def test_unknown_options_keys_are_ignored(good_entries, patched_add2, float_images, mbv2):
    data = encode_entries({**good_entries, "reserved_for_v2": array.array("i", [1, 2, 3])})
    assert o.decode_options(data) == o.decode_options(encode_entries(good_entries))
    patched = with_options(patched_add2, data)
    np.testing.assert_array_equal(run_tflite(patched, float_images[:1])[0],
                                  run_tflite(mbv2["bytes"], float_images[:1])[0])


def test_options_shape_disagreeing_with_the_op_input(good_entries, patched_add2):
    """docs/patch_stage_op.md: `tensor_shape` of stage tensor 0 is the op input's shape."""
    # 95x95 is consistent in itself (a stride-2 SAME conv also gives 48x48), not with the 96x96 input.
    entries = _edit(good_entries, "tensor_shape", lambda v: v.__setitem__(slice(0, 2), [95, 95]))
    o.decode_options(encode_entries(entries))
    with pytest.raises(InvalidOptionsError) as info:
        run_tflite(with_options(patched_add2, encode_entries(entries)), np.zeros((1, 96, 96, 3), np.float32))
    assert "'tensor_shape'" in str(info.value)


@pytest.mark.parametrize("key, index", [("tensor_zero_point", 0), ("tensor_scale", -1)])
def test_options_quantization_disagreeing_with_the_op_tensors(good_entries, patched_add2, key, index):
    """docs/patch_stage_op.md: quantization of stage tensors 0 and L must equal the op's tensors'."""
    entries = _edit(good_entries, key, lambda v: v.__setitem__(index, v[index] + 5 if key == "tensor_zero_point"
                                                                else v[index] * 2))
    o.decode_options(encode_entries(entries))
    with pytest.raises(InvalidOptionsError) as info:
        run_tflite(with_options(patched_add2, encode_entries(entries)), np.zeros((1, 96, 96, 3), np.float32))
    assert f"'{key}'" in str(info.value)


def test_error_split_in_non_ascii_digits(mbv2):
    """`int()` reads '５' (fullwidth) as 5; an op index is ASCII digits, anything else a tensor name."""
    message = _error(keras_patch.patchify, mbv2["bytes"], "５", grid=(1, 1))
    assert "No op writes a tensor or Keras layer named '５'" in message


def test_a_stage_of_a_mean_alone_is_kept_by_undo_arena_stages():
    """The planner may make the MEAN alone a stage; the passes' undo (one-layer stages back to
    builtins, before stages are placed again) leaves it, as it leaves multi-layer stages."""
    from keras_patch.graph.passes.pipeline import undo_arena_stages

    data = _mean_model(axis=(1, 2), keepdims=True, after=True)
    m = TFLiteModel.from_bytes(data)
    mean = first_op(m, "MEAN")
    patched = keras_patch.patchify(data, mean, grid=(2, 2), start=m.op_inputs(mean)[0], arena=False)
    assert op_types(TFLiteModel.from_bytes(patched)).count(o.CUSTOM_CODE) == 1
    assert undo_arena_stages(patched) == patched
