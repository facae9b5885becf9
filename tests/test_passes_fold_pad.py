"""`fold_pad`: PAD -> VALID conv folded into SAME or a one-layer KP_PATCH_STAGE, bit for bit.

Random `ZeroPadding2D -> Conv2D / DepthwiseConv2D (VALID)` models (pads
symmetric, asymmetric, SAME-equivalent or not; strides 1 and 2; kernels 1, 3
and 5; dilations; odd and even sizes) are converted to int8.  The converter
keeps a PAD that is not SAME padding; one that is, it folds itself, and the
test puts it back (`_unfold_same`) so that every case starts from a PAD op.
The folded model (run by `run_tflite`, KP_PATCH_STAGE by the reference
executor and by the C++ kernel core) must give the unfolded model's LiteRT
BUILTIN_REF outputs exactly, and `unpatchify` must turn a folded stage back
into PAD + VALID conv with the same outputs.
"""

import os

os.environ["TF_CPP_MIN_LOG_LEVEL"] = "3"

import contextlib  # noqa: E402
import io  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402
from ai_edge_litert import schema_py_generated as schema  # noqa: E402
from hypothesis import HealthCheck, assume, event, given, note, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from keras_patch.arena.memory_planner import arena_head_bytes  # noqa: E402
from keras_patch.arena.profiler import stage_scratch_bytes  # noqa: E402
from keras_patch.graph.passes.fold_pad import fold_pad, pad_fold_failure  # noqa: E402
from keras_patch.graph.patchify import _same_padding  # noqa: E402
from keras_patch.graph.tflite_model import TFLiteModel  # noqa: E402
from keras_patch.graph.unpatchify import _int8_tensor, _paddings_tensor, unpatchify  # noqa: E402
from keras_patch.runtime.host import run_tflite  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore:Statistics for quantized inputs")

_PROFILE = os.environ.get("KP_HYPOTHESIS_PROFILE", "ci")
_EXAMPLES = {"ci": 60, "dev": 8}.get(_PROFILE, 60)


def _build(h, w, c, pads, depthwise, kernel, stride, dilation, filters, seed) -> bytes:
    import keras
    from keras_patch.keras.export import convert_int8

    keras.backend.clear_session()
    keras.utils.set_random_seed(seed)
    inputs = keras.Input((h, w, c))
    # The converter writes a dilated conv as SPACE_TO_BATCH_ND + conv: dilated cases are built as a
    # SAME conv without dilation, and `_unfold_same` dilates it and splits off its padding as a PAD.
    padding = "same" if dilation > 1 else "valid"
    x = keras.layers.ZeroPadding2D(pads)(inputs) if dilation == 1 else inputs
    if depthwise:
        x = keras.layers.DepthwiseConv2D(kernel, strides=stride, padding=padding,
                                         depth_multiplier=filters % 2 + 1, bias_initializer="random_normal")(x)
    else:
        x = keras.layers.Conv2D(filters, kernel, strides=stride, padding=padding,
                                bias_initializer="random_normal")(x)
    x = keras.layers.ReLU()(x)
    outputs = keras.layers.Conv2D(2, 1)(x)  # the folded conv is not the model output
    net = keras.Model(inputs, outputs)
    data = np.random.default_rng(seed).uniform(-1, 1, (4, h, w, c)).astype(np.float32)
    with contextlib.redirect_stdout(io.StringIO()):
        return bytes(convert_int8(net, data))


def _unfold_same(data: bytes, dilation: int = 1, shift=(0, 0)) -> bytes:
    """The first SAME conv of the model as PAD + VALID conv.

    With `dilation`, the conv is dilated first (a SAME conv's output size
    does not depend on it); the PAD pads TF's SAME split, `shift` rows /
    columns moved from bottom / right to top / left (same total, so the same
    output size: not SAME padding any more).
    """
    model = TFLiteModel.from_bytes(data)
    conv = next((i for i in range(model.num_ops) if model.op_type(i) in ("CONV_2D", "DEPTHWISE_CONV_2D")
                 and model.operator(i).builtinOptions.padding == schema.Padding.SAME), None)
    if conv is None:  # a dilated conv the converter wrote as SPACE_TO_BATCH_ND + conv
        return None
    x, out = model.op_inputs(conv)[0], model.op_outputs(conv)[0]
    xi = model.tensor(x)
    opts = model.operator(conv).builtinOptions
    if dilation > 1:
        opts.dilationHFactor = opts.dilationWFactor = dilation
    filt = model.tensor(model.op_inputs(conv)[1]).shape
    pads = []
    for i, o, k, s, d in ((xi.shape[1], model.tensor(out).shape[1], filt[1], opts.strideH, opts.dilationHFactor),
                          (xi.shape[2], model.tensor(out).shape[2], filt[2], opts.strideW, opts.dilationWFactor)):
        total = max((o - 1) * s + (k - 1) * d + 1 - i, 0)
        top = min(total // 2 + shift[len(pads)], total)
        pads.append((top, total - top))
    padded = _int8_tensor(model, "unfolded/pad", (xi.shape[1] + sum(pads[0]), xi.shape[2] + sum(pads[1]),
                                                  xi.shape[3]), xi.scale[0], xi.zero_point[0])
    paddings = _paddings_tensor(model, "unfolded/paddings", np.array([[0, 0], pads[0], pads[1], [0, 0]]))
    pad = schema.OperatorT()
    pad.opcodeIndex = model.opcode_index(schema.BuiltinOperator.PAD, version=2)
    pad.builtinOptionsType = schema.BuiltinOptions.PadOptions
    pad.builtinOptions = schema.PadOptionsT()
    pad.inputs = np.array([x, paddings], np.int32)
    pad.outputs = np.array([padded], np.int32)
    model.operator(conv).inputs = np.array([padded] + model.op_inputs(conv)[1:], np.int32)
    opts.padding = schema.Padding.VALID
    model.subgraph.operators.insert(conv, pad)
    return model.to_bytes()


def _pad_ops(model: TFLiteModel) -> list:
    return [i for i in range(model.num_ops) if model.op_type(i) in ("PAD", "PADV2")]


@st.composite
def cases(draw):
    kernel = draw(st.sampled_from([1, 3, 5]))
    dilation = draw(st.sampled_from([1, 1, 2])) if kernel > 1 else 1
    stride = draw(st.sampled_from([1, 2]))
    eff = (kernel - 1) * dilation + 1
    same = draw(st.sampled_from([True, False, False]))
    h = draw(st.integers(max(eff - 2, 2), 13))
    w = draw(st.integers(max(eff - 2, 2), 13))
    shift = (0, 0) if same else draw(st.tuples(st.integers(0, 2), st.integers(0, 2)))
    if same or dilation > 1:
        pads = []
        for i in (h, w):
            o = -(-i // stride)
            total = max((o - 1) * stride + eff - i, 0)
            pads.append((total // 2, total - total // 2))
        pads = tuple(pads)
        assume(any(sum(p) for p in pads))
        if dilation > 1:  # the PAD `_unfold_same` writes
            pads = tuple((min(t + d, t + b), t + b - min(t + d, t + b)) for (t, b), d in zip(pads, shift))
    else:
        pads = draw(st.tuples(st.tuples(st.integers(0, 2), st.integers(0, 3)),
                              st.tuples(st.integers(0, 2), st.integers(0, 3))))
        assume(any(sum(p) for p in pads))
    assume(h + sum(pads[0]) >= eff and w + sum(pads[1]) >= eff)
    return dict(h=h, w=w, c=draw(st.integers(1, 4)), pads=pads, depthwise=draw(st.booleans()), kernel=kernel,
                stride=stride, dilation=dilation, filters=draw(st.integers(1, 5)),
                seed=draw(st.integers(0, 2**16)), shift=shift)


@settings(max_examples=_EXAMPLES, deadline=None, derandomize=_PROFILE == "ci", database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
@given(case=cases(), fallback=st.sampled_from([True, True, True, False]))
def test_folded_pad_is_bit_exact(case, fallback):
    data = _build(**{k: v for k, v in case.items() if k != "shift"})
    if case["dilation"] > 1:
        data = _unfold_same(data, case["dilation"], case["shift"])
    elif not _pad_ops(TFLiteModel.from_bytes(data)):
        data = _unfold_same(data)  # the converter folded a SAME-equivalent pad itself: undo it
    assume(data is not None)
    unfolded = TFLiteModel.from_bytes(data)
    pad_ops = _pad_ops(unfolded)
    assert len(pad_ops) == 1 and pad_fold_failure(unfolded, pad_ops[0]) is None
    conv = unfolded.consumers()[unfolded.op_outputs(pad_ops[0])[0]][0]
    padded = unfolded.tensor(unfolded.op_outputs(pad_ops[0])[0])
    x_shape = unfolded.tensor(unfolded.op_inputs(pad_ops[0])[0]).shape
    out_shape = unfolded.tensor(unfolded.op_outputs(conv)[0]).shape
    opts = unfolded.operator(conv).builtinOptions
    k = unfolded.tensor(unfolded.op_inputs(conv)[1]).shape[1:3]
    (top, _), (left, _) = case["pads"]
    same = all(o == -(-i // s) and p == _same_padding(i, o, kk, s, d) for i, o, kk, s, d, p in (
        (x_shape[1], out_shape[1], k[0], opts.strideH, opts.dilationHFactor, top),
        (x_shape[2], out_shape[2], k[1], opts.strideW, opts.dilationWFactor, left)))
    fits = all(p <= (kk - 1) * d and (o - 1) * s - p <= i - 1 for i, o, kk, s, d, p in (
        (x_shape[1], out_shape[1], k[0], opts.strideH, opts.dilationHFactor, top),
        (x_shape[2], out_shape[2], k[1], opts.strideW, opts.dilationWFactor, left)))
    note(f"same={same} fits={fits} pads={case['pads']} in={x_shape} out={out_shape}")

    model = TFLiteModel.from_bytes(data)
    folded = fold_pad(model, fallback=fallback)
    types = [model.op_type(i) for i in range(model.num_ops)]
    event(f"folded: {[f.how for f in folded]}, depthwise={case['depthwise']}, stride={case['stride']}, "
          f"dilation={case['dilation']}")
    if same:
        assert [f.how for f in folded] == ["same"] and "KP_PATCH_STAGE" not in types
    elif fallback and fits:
        assert [f.how for f in folded] == ["stage"] and types.count("KP_PATCH_STAGE") == 1
    else:
        assert folded == []
        assert model.to_bytes() == TFLiteModel.from_bytes(data).to_bytes()
        return
    f = folded[0]
    assert "PAD" not in types and f.paddings == case["pads"] and f.bytes_saved == padded.num_bytes
    assert f.stage_scratch_bytes == 0  # the one-layer stage reads its input in place: no padded copy
    scratch = stage_scratch_bytes(model)
    assert all(s == [] for s in scratch.values())
    assert arena_head_bytes(model, scratch) <= arena_head_bytes(unfolded)

    folded_bytes = model.to_bytes()
    x = np.random.default_rng(case["seed"]).integers(-128, 128, size=(3, *x_shape[1:]), dtype=np.int8)
    x[0] = -128
    want = run_tflite(data, x)
    executors = ["reference", "cpp"] if f.how == "stage" else ["reference"]
    for executor in executors:
        for w_, g in zip(want, run_tflite(folded_bytes, x, executor=executor)):
            np.testing.assert_array_equal(g, w_)
    if f.how == "stage":
        plain = TFLiteModel.from_bytes(unpatchify(folded_bytes))
        plain_types = [plain.op_type(i) for i in range(plain.num_ops)]
        assert plain_types[:2] == ["PAD", unfolded.op_type(conv)]
        assert plain.operator(1).builtinOptions.padding == schema.Padding.VALID
        for w_, g in zip(want, run_tflite(plain.to_bytes(), x)):
            np.testing.assert_array_equal(g, w_)


def test_a_pad_read_by_something_else_is_kept():
    import keras
    from keras_patch.keras.export import convert_int8

    keras.backend.clear_session()
    inputs = keras.Input((6, 6, 2))
    p = keras.layers.ZeroPadding2D(((1, 0), (2, 1)))(inputs)
    a = keras.layers.Conv2D(2, 3)(p)
    b = keras.layers.MaxPooling2D(3, strides=1)(p)
    net = keras.Model(inputs, keras.layers.Add()([a, b]))
    with contextlib.redirect_stdout(io.StringIO()):
        data = bytes(convert_int8(net, np.random.default_rng(0).random((4, 6, 6, 2), np.float32)))
    model = TFLiteModel.from_bytes(data)
    pad = _pad_ops(model)[0]
    assert "MAX_POOL_2D" in pad_fold_failure(model, pad)
    assert fold_pad(model) == []
    assert _pad_ops(model) == [pad]


def _pytorch_style() -> bytes:
    """ZeroPadding2D(1) + stride-2 VALID depthwise on an even map (not SAME: the converter keeps the PAD)."""
    import keras
    from keras_patch.keras.export import convert_int8

    keras.backend.clear_session()
    keras.utils.set_random_seed(5)
    net = keras.Sequential([keras.Input((10, 12, 3)), keras.layers.ZeroPadding2D(1),
                            keras.layers.DepthwiseConv2D(3, strides=2, bias_initializer="random_normal"),
                            keras.layers.Conv2D(2, 1)])
    with contextlib.redirect_stdout(io.StringIO()):
        return bytes(convert_int8(net, np.random.default_rng(0).uniform(-1, 1, (4, 10, 12, 3)).astype(np.float32)))


def _as_padv2(data: bytes, value_offset: int) -> bytes:
    """The model's PAD as PADV2 padding with the zero point + `value_offset`."""
    model = TFLiteModel.from_bytes(data)
    pad = _pad_ops(model)[0]
    zp = int(model.tensor(model.op_outputs(pad)[0]).zero_point[0])
    buffer = schema.BufferT()
    buffer.data = np.frombuffer(np.array([zp + value_offset], np.int8).tobytes(), np.uint8)
    model.model.buffers.append(buffer)
    tensor = schema.TensorT()
    tensor.shape, tensor.type, tensor.buffer, tensor.name = np.array([1], np.int32), schema.TensorType.INT8, \
        len(model.model.buffers) - 1, "pad_value"
    tensor.quantization = schema.QuantizationParametersT()  # TFLite: the output's quantization
    out_q = model.subgraph.tensors[model.op_outputs(pad)[0]].quantization
    tensor.quantization.scale, tensor.quantization.zeroPoint = list(out_q.scale), list(out_q.zeroPoint)
    model.subgraph.tensors.append(tensor)
    op = model.operator(pad)
    op.opcodeIndex = model.opcode_index(schema.BuiltinOperator.PADV2, version=2)
    op.builtinOptionsType = schema.BuiltinOptions.PadV2Options
    op.builtinOptions = schema.PadV2OptionsT()
    op.inputs = np.array(list(op.inputs) + [len(model.subgraph.tensors) - 1], np.int32)
    model.remove_unused()
    return model.to_bytes()


def test_padv2_folds_only_when_it_pads_with_the_zero_point():
    base = _pytorch_style()
    x = np.random.default_rng(2).integers(-128, 128, size=(2, 10, 12, 3), dtype=np.int8)
    for offset in (0, 3):
        data = _as_padv2(base, offset)
        model = TFLiteModel.from_bytes(data)
        assert model.op_type(_pad_ops(model)[0]) == "PADV2"
        folded = fold_pad(model)
        if offset:
            assert folded == [] and "not the zero point" in pad_fold_failure(model, _pad_ops(model)[0])
            continue
        assert [f.how for f in folded] == ["stage"]
        np.testing.assert_array_equal(run_tflite(model.to_bytes(), x)[0], run_tflite(data, x)[0])


def test_unpatchify_then_fold_pad_round_trips():
    data = _pytorch_style()
    model = TFLiteModel.from_bytes(data)
    fold_pad(model)
    folded = model.to_bytes()
    plain = unpatchify(folded)
    again = TFLiteModel.from_bytes(plain)
    assert [again.op_type(i) for i in range(again.num_ops)] == ["PAD", "DEPTHWISE_CONV_2D", "CONV_2D"]
    assert [f.how for f in fold_pad(again)] == ["stage"]
    assert again.to_bytes() == folded or [again.op_type(i) for i in range(again.num_ops)] == \
        [model.op_type(i) for i in range(model.num_ops)]
    x = np.random.default_rng(3).integers(-128, 128, size=(2, 10, 12, 3), dtype=np.int8)
    for bytes_ in (plain, again.to_bytes()):
        np.testing.assert_array_equal(run_tflite(bytes_, x)[0], run_tflite(data, x)[0])


def test_profile_counts_the_pad_a_folded_stage_unpatchifies_to():
    """A one-layer stage with explicit pads unpatchifies to PAD + VALID conv (two ops): profile()
    maps both to the stage (it used to assume one op per layer and raised IndexError)."""
    from keras_patch.arena.profiler import profile
    from keras_patch.graph.patchify import find_stages, stage_options
    from keras_patch.graph.unpatchify import layer_op_counts

    model = TFLiteModel.from_bytes(_pytorch_style())
    assert [f.how for f in fold_pad(model)] == ["stage"]
    (stage,) = find_stages(model)
    assert layer_op_counts(stage_options(model, stage)) == [2]
    folded = model.to_bytes()
    for kernel in ("portable", "cmsis_nn"):
        p = profile(folded, kernel=kernel)
        assert [r.op for r in p.rows] == ["PAD", "DEPTHWISE_CONV_2D", "CONV_2D"]
        assert [r.stage for r in p.rows] == [stage, stage, None]
        assert p.patched_peak_bytes == arena_head_bytes(model, stage_scratch_bytes(model, kernel))
