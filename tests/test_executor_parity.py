"""run_tflite's two KP_PATCH_STAGE executors accept and reject the same models.

The TFLM kernel's Prepare (tflm_ops/patch_stage.cc) checks the op's form
(one output, a stage input) and its input 0 / output 0 against the options
(`KpCheckStageIo`: int8, shape, scale, zero point). `run_tflite` makes the
same checks with `executor="reference"` and `executor="cpp"`. Here valid
patched models are mutated -- a KP_PATCH_STAGE options key or value, the
op's input / output tensor, a filter or bias, the op's input / output
lists -- and both
executors must raise a KerasPatchError or both return identical outputs.

Hypothesis profiles (env var KP_HYPOTHESIS_PROFILE): "ci" (default, 100
examples, derandomized) and "dev" (15 examples).
"""

import array
import os
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import numpy as np
import pytest
from flatbuffers import flexbuffers
from hypothesis import HealthCheck, event, given, note, settings
from hypothesis import strategies as st

import model_zoo
from keras_patch.runtime import cpp_executor
from keras_patch.errors import InvalidOptionsError, KerasPatchError, UnsupportedModelError
from keras_patch.stage import geometry
from keras_patch.stage import options as o
from keras_patch.graph.patchify import find_stages, patchify
from keras_patch.runtime.host import HOST_MAX_STAGE_OPERATIONS, run_tflite, stage_operations
from keras_patch.graph.tflite_model import TFLiteModel

pytestmark = [
    pytest.mark.filterwarnings("ignore:Statistics for quantized inputs"),
    pytest.mark.skipif(not cpp_executor.is_available(), reason="keras_patch._kp_core is not built"),
]

PROFILE = os.environ.get("KP_HYPOTHESIS_PROFILE", "ci")
N_EXAMPLES = {"ci": 100, "dev": 15}.get(PROFILE, 100)
_SETTINGS = dict(deadline=None, suppress_health_check=list(HealthCheck), derandomize=PROFILE == "ci",
                 database=None, print_blob=True)
EXECUTORS = ("reference", "cpp")


@pytest.fixture(scope="module")
def patched_models():
    """Valid patched models whose stage starts at the model's int8 input (no LiteRT op before it)."""
    tiny = model_zoo.to_int8_tflite(model_zoo.tiny_conv_model())  # CONV_2D, DEPTHWISE_CONV_2D | MEAN, FC
    pooling = model_zoo.to_int8_tflite(model_zoo.pooling_model())  # PAD, CONV_2D, MAX_POOL, PAD, CONV_2D | ...
    return [patchify(tiny, split=1, grid=2), patchify(pooling, split=4, grid=(2, 3))]


def _stage(model: TFLiteModel) -> int:
    return find_stages(model)[0]


def _options(model: TFLiteModel) -> o.StageOptions:
    return o.decode_options(bytes(np.asarray(model.operator(_stage(model)).customOptions, np.uint8)))


def _set_options(model: TFLiteModel, data: bytes) -> None:
    model.operator(_stage(model)).customOptions = np.frombuffer(data, np.uint8).copy()


def _replace(opts: o.StageOptions, **changes) -> o.StageOptions:
    fields = dict(grid=opts.grid, tensor_shapes=opts.tensor_shapes, tensor_scales=opts.tensor_scales,
                  tensor_zero_points=opts.tensor_zero_points, layers=opts.layers, version=opts.version)
    return o.StageOptions(**{**fields, **changes})


def _input(model_bytes: bytes, seed: int) -> np.ndarray:
    model = TFLiteModel.from_bytes(model_bytes)
    info = model.tensor(model.inputs[0])
    return np.random.default_rng(seed).integers(-128, 128, (1, *info.shape[1:])).astype(np.int8)


def _outcomes(model_bytes: bytes, x: np.ndarray) -> dict:
    """executor -> outputs, or the KerasPatchError it raised."""
    result = {}
    for executor in EXECUTORS:
        try:
            result[executor] = run_tflite(model_bytes, x, executor=executor)
        except KerasPatchError as e:
            result[executor] = e
    return result


def _assert_same_decision(outcomes: dict) -> str:
    ref, cpp = outcomes["reference"], outcomes["cpp"]
    assert isinstance(ref, Exception) == isinstance(cpp, Exception), (ref, cpp)
    if isinstance(ref, Exception):
        assert type(ref) is type(cpp), (ref, cpp)
        return "rejected"
    assert len(ref) == len(cpp)
    for a, b in zip(ref, cpp):
        np.testing.assert_array_equal(a, b)
    return "accepted"


# ----------------------------------------------------------- regressions


def _disagreeing(model_bytes: bytes, what: str) -> bytes:
    m = TFLiteModel.from_bytes(model_bytes)
    opts = _options(m)
    last = opts.num_layers
    if what == "input_zero_point":
        zps = list(opts.tensor_zero_points)
        zps[0] += 5
        opts = _replace(opts, tensor_zero_points=zps)
    elif what == "output_scale":
        scales = list(opts.tensor_scales)
        scales[last] *= 2.0
        opts = _replace(opts, tensor_scales=scales)
    elif what == "output_shape":  # the options describe a consistent, smaller stage
        shapes = list(opts.tensor_shapes)
        h, w, c = shapes[last]
        shapes[last] = (h - 1, w - 1, c)
        opts = _replace(opts, tensor_shapes=shapes, grid=(1, 1))
    _set_options(m, o.encode_options(opts))
    return m.to_bytes()


@pytest.mark.parametrize("what, key", [("input_zero_point", "tensor_zero_point"),
                                       ("output_scale", "tensor_scale"), ("output_shape", "tensor_shape")])
def test_options_that_disagree_with_the_tensors_are_rejected_by_both(patched_models, what, key):
    """Was: the cpp executor skipped KpCheckStageIo and returned other logits than the reference."""
    bad = _disagreeing(patched_models[0], what)
    x = _input(bad, 0)
    for executor in EXECUTORS:
        with pytest.raises(InvalidOptionsError, match=f"'{key}'") as info:
            run_tflite(bad, x, executor=executor)
        assert "op 0 (KP_PATCH_STAGE -> " in str(info.value)  # names the op


def test_a_claimed_huge_output_is_rejected_at_once(patched_models):
    """Was: options claiming a 3937x3937 stage output ran in the cpp executor (for minutes on larger claims)."""
    m = TFLiteModel.from_bytes(patched_models[0])
    opts = _options(m)
    last = opts.num_layers
    huge = _replace(
        opts,
        tensor_shapes=opts.tensor_shapes + [(3937, 3937, opts.tensor_shapes[last][2])],
        tensor_scales=opts.tensor_scales + [opts.tensor_scales[last]],
        tensor_zero_points=opts.tensor_zero_points + [opts.tensor_zero_points[last]],
        layers=opts.layers + [o.LayerOptions(op=o.OP_PAD, inputs=(last, -1))],
    )
    _set_options(m, o.encode_options(huge))
    bad = m.to_bytes()
    x = _input(bad, 0)
    for executor in EXECUTORS:
        start = time.perf_counter()
        with pytest.raises(InvalidOptionsError, match=r"'tensor_shape'.*3937, 3937"):
            run_tflite(bad, x, executor=executor)
        assert time.perf_counter() - start < 2.0


def _inflated(opts: o.StageOptions, size: int) -> o.StageOptions:
    """The stage + PAD to size x size + 64x64 AVERAGE_POOL_2D + strided MAX_POOL_2D back to the output shape:
    valid options, the op's tensors unchanged, intermediates far larger than any tensor of the model."""
    last = opts.num_layers
    h, w, c = opts.tensor_shapes[last]
    pooled = size - 63
    stride = (pooled - 1) // (h - 1)
    return _replace(
        opts,
        tensor_shapes=opts.tensor_shapes + [(size, size, c), (pooled, pooled, c), (h, w, c)],
        tensor_scales=opts.tensor_scales + [opts.tensor_scales[last]] * 3,
        tensor_zero_points=opts.tensor_zero_points + [opts.tensor_zero_points[last]] * 3,
        layers=opts.layers + [
            o.LayerOptions(op=o.OP_PAD, inputs=(last, -1)),
            o.LayerOptions(op=o.OP_AVERAGE_POOL_2D, inputs=(last + 1, -1), kernel=(64, 64)),
            o.LayerOptions(op=o.OP_MAX_POOL_2D, inputs=(last + 2, -1), stride=(stride, stride)),
        ],
    )


def test_a_stage_too_costly_for_the_host_is_refused_at_once(patched_models):
    """Was: 7.6e9 operations (about 30 s, deaf to Ctrl-C, in the cpp executor) from a model of 12x12 tensors."""
    m = TFLiteModel.from_bytes(patched_models[0])
    inflated = _inflated(_options(m), 600)
    assert stage_operations(inflated) > HOST_MAX_STAGE_OPERATIONS
    _set_options(m, o.encode_options(inflated))
    bad = m.to_bytes()
    x = _input(bad, 0)
    for executor in EXECUTORS:
        start = time.perf_counter()
        with pytest.raises(UnsupportedModelError, match=r"op \d+ \(KP_PATCH_STAGE -> .*operations"):
            run_tflite(bad, x, executor=executor)
        assert time.perf_counter() - start < 2.0


def test_a_costly_stage_under_the_bound_still_runs(patched_models):
    """The bound counts what runs: an inflated stage below it runs, with the same bits in both executors."""
    m = TFLiteModel.from_bytes(patched_models[0])
    inflated = _inflated(_options(m), 100)
    assert 0 < stage_operations(inflated) < HOST_MAX_STAGE_OPERATIONS
    _set_options(m, o.encode_options(inflated))
    data = m.to_bytes()
    assert _assert_same_decision(_outcomes(data, _input(data, 2))) == "accepted"


def test_stage_operations_are_the_patched_macs_for_convolutions(patched_models):
    opts = _options(TFLiteModel.from_bytes(patched_models[0]))  # CONV_2D, DEPTHWISE_CONV_2D
    assert stage_operations(opts) == geometry.stage_macs(opts)[1] > 0


@pytest.mark.parametrize("form", ["two_outputs", "no_stage_input", "no_filter_input", "extra_absent_input",
                                  "filter_without_zero_points"])
def test_the_op_form_is_checked_by_both(patched_models, form):
    """The kernel's Prepare needs one output and a stage input; absent (-1) filters are rejected,
    and so are filters without zero points (TFLM then reads no scales either)."""
    m = TFLiteModel.from_bytes(patched_models[0])
    op = m.operator(_stage(m))
    inputs, outputs = [int(i) for i in op.inputs], [int(i) for i in op.outputs]
    if form == "two_outputs":
        op.outputs = np.array(outputs * 2, np.int32)
    elif form == "no_stage_input":
        op.inputs = np.array([-1] + inputs[1:], np.int32)
    elif form == "no_filter_input":
        op.inputs = np.array([inputs[0], -1] + inputs[2:], np.int32)
    elif form == "extra_absent_input":  # an unused optional input changes nothing
        op.inputs = np.array(inputs + [-1], np.int32)
    else:
        m.subgraph.tensors[inputs[1]].quantization.zeroPoint = np.array([], np.int64)
    data = m.to_bytes()
    outcomes = _outcomes(data, _input(data, 1))
    assert _assert_same_decision(outcomes) == ("accepted" if form == "extra_absent_input" else "rejected")
    if form in ("two_outputs", "no_stage_input"):
        assert isinstance(outcomes["cpp"], UnsupportedModelError)
    elif form in ("no_filter_input", "filter_without_zero_points"):
        assert "'layer_weights'" in str(outcomes["cpp"]) and "'layer_weights'" in str(outcomes["reference"])


def test_kernel_tensor_view_is_what_tflm_reads(patched_models):
    """TFLM's params: the first scale and zero point (int32), or (0, 0) without both."""
    from keras_patch.graph.patchify import kernel_tensor_view

    m = TFLiteModel.from_bytes(patched_models[0])
    t = m.subgraph.tensors[m.inputs[0]]
    t.quantization.zeroPoint = np.array([2**32 - 128, 7], np.int64)
    t.quantization.scale = np.array([0.5, 0.25], np.float32)
    view = kernel_tensor_view(m.tensor(m.inputs[0]))
    assert (view.scale, view.zero_point, view.dtype, view.shape) == (0.5, -128, np.int8, (1, 16, 16, 3))
    t.quantization.zeroPoint = np.array([], np.int64)
    assert (kernel_tensor_view(m.tensor(m.inputs[0])).scale, kernel_tensor_view(m.tensor(m.inputs[0])).zero_point) == (0.0, 0)


# -------------------------------------------------------- property test

OPTION_VALUES = ["grid", "tensor_shape", "tensor_scale", "tensor_zero_point", "layer"]
RAW_KEYS = sorted(o.OPTION_KEYS)


def _raw_entries(opts: o.StageOptions) -> dict:
    """key -> (kind, value) as encode_options writes them."""
    layers = opts.layers
    version = max(opts.version, 2 if opts.in_place else 1)
    extra = {"in_place": ("int", int(opts.in_place))} if version >= 2 else {}
    return {
        **extra,
        "version": ("int", version),
        "grid": ("ivec", list(opts.grid)),
        "num_layers": ("int", len(layers)),
        "tensor_shape": ("ivec", [v for s in opts.tensor_shapes for v in s]),
        "tensor_scale": ("fvec", list(opts.tensor_scales)),
        "tensor_zero_point": ("ivec", list(opts.tensor_zero_points)),
        "layer_op": ("ivec", [l.op for l in layers]),
        "layer_inputs": ("ivec", [v for l in layers for v in l.inputs]),
        "layer_params": ("ivec", [v for l in layers for v in (*l.kernel, *l.stride, *l.dilation, *l.pad)]),
        "layer_activation": ("ivec", [l.activation for l in layers]),
        "layer_weights": ("ivec", [v for l in layers for v in l.weights]),
    }


def _encode_raw(entries: dict) -> bytes:
    builder = flexbuffers.Builder()
    with builder.Map():
        for key, (kind, value) in entries.items():
            if kind == "int":
                builder.Int(key, int(value))
            elif kind == "float":
                builder.Float(key, float(value))
            elif kind == "ivec":
                builder.TypedVectorFromElements(key, array.array("i", [int(v) for v in value]))
            elif kind == "qvec":  # 64-bit elements
                builder.TypedVectorFromElements(key, array.array("q", [int(v) for v in value]))
            elif kind == "fvec":
                builder.TypedVectorFromElements(key, array.array("f", [float(v) for v in value]))
            elif kind == "string":
                builder.String(key, str(value))
    return bytes(builder.Finish())


@st.composite
def _option_value_mutation(draw, opts: o.StageOptions) -> o.StageOptions:
    what = draw(st.sampled_from(OPTION_VALUES))
    last = opts.num_layers
    t = draw(st.sampled_from(sorted({0, last, draw(st.integers(0, last))})))  # the ends most often
    if what == "grid":
        return _replace(opts, grid=(draw(st.integers(-1, 9)), draw(st.integers(-1, 9))))
    if what == "tensor_shape":
        shapes = list(opts.tensor_shapes)
        shape = list(shapes[t])
        axis = draw(st.integers(0, 2))
        shape[axis] = draw(st.sampled_from([shape[axis] - 1, shape[axis] + 1, 0, 3937, 65537]))
        shapes[t] = tuple(shape)
        return _replace(opts, tensor_shapes=shapes)
    if what == "tensor_scale":
        scales = list(opts.tensor_scales)
        s = np.float32(scales[t])
        scales[t] = draw(st.sampled_from([float(np.nextafter(s, np.float32(1))), float(s) * 2, 0.0, -float(s),
                                          float("nan"), float("inf")]))
        return _replace(opts, tensor_scales=scales)
    if what == "tensor_zero_point":
        zps = list(opts.tensor_zero_points)
        zps[t] = draw(st.sampled_from([zps[t] - 1, zps[t] + 1, -129, 128, 2**32 + zps[t]]))
        zps[t] = max(min(zps[t], 2**31 - 1), -(2**31))  # int32 on the wire
        return _replace(opts, tensor_zero_points=zps)
    layers = list(opts.layers)
    l = draw(st.integers(0, last - 1))
    field = draw(st.sampled_from(["op", "inputs", "kernel", "stride", "dilation", "pad", "activation", "weights"]))
    values = {f: getattr(layers[l], f) for f in
              ("op", "inputs", "kernel", "stride", "dilation", "pad", "activation", "weights")}
    small = st.integers(-2, 5)
    if field == "op":
        values["op"] = draw(st.sampled_from(sorted(o.LAYER_OP_NAMES) + [2, 99]))
    elif field == "activation":
        values["activation"] = draw(small)
    else:
        values[field] = (draw(small), draw(small))
    layers[l] = o.LayerOptions(**values)
    return _replace(opts, layers=layers)


@st.composite
def _option_key_mutation(draw, opts: o.StageOptions) -> bytes:
    entries = _raw_entries(opts)
    key = draw(st.sampled_from(sorted(entries)))
    kind, value = entries[key]
    change = draw(st.sampled_from(["delete", "as_float", "as_string", "wide_ints", "shorter", "longer",
                                   "unknown_key", "version"]))
    if change == "delete":
        del entries[key]
    elif change == "as_float":
        entries[key] = ("fvec", value) if kind == "ivec" else ("float", value) if kind == "int" else ("ivec", [1] * len(value))
    elif change == "as_string":
        entries[key] = ("string", "1")
    elif change == "wide_ints" and kind == "ivec":
        entries[key] = ("qvec", value)
    elif change == "shorter" and kind in ("ivec", "fvec"):
        entries[key] = (kind, value[:-1])
    elif change == "longer" and kind in ("ivec", "fvec"):
        entries[key] = (kind, value + value[-1:])
    elif change == "unknown_key":
        entries["zz_unknown"] = ("ivec", [1, 2, 3])
    elif change == "version":
        entries["version"] = ("int", draw(st.sampled_from([0, 3, -1])))
    return _encode_raw(entries)


def _mutate_tensor(draw, model: TFLiteModel, role: str) -> None:
    op = model.operator(_stage(model))
    index = int(op.inputs[0]) if role == "input" else int(op.outputs[0])
    tensor = model.subgraph.tensors[index]
    q = tensor.quantization
    change = draw(st.sampled_from(["shape", "rank", "dtype", "scale", "zero_point", "no_zero_point",
                                   "per_channel", "unquantized"]))
    if change == "shape":
        shape = [int(d) for d in tensor.shape]
        axis = draw(st.integers(1, 3))
        shape[axis] += draw(st.sampled_from([-1, 1]))
        tensor.shape = np.array(shape, np.int32)
    elif change == "rank":
        tensor.shape = np.array([int(d) for d in tensor.shape][1:], np.int32)
    elif change == "dtype":
        tensor.type = draw(st.sampled_from([3, 7, 2]))  # UINT8, INT16, INT32
    elif change == "scale":
        s = np.float32(q.scale[0])
        q.scale = np.array([draw(st.sampled_from([np.nextafter(s, np.float32(0)), s * 2]))], np.float32)
    elif change == "zero_point":
        zp = int(q.zeroPoint[0])
        # + 2^32: TFLM keeps the low 32 bits (the same zero point); the input only, no LiteRT op reads it.
        options = [zp - 1, zp + 1] + ([zp + 2**32] if role == "input" else [])
        q.zeroPoint = np.array([draw(st.sampled_from(options))], np.int64)
    elif change == "no_zero_point":
        q.zeroPoint = np.array([], np.int64)
    elif change == "per_channel" and role == "input":  # TFLM reads the first scale and zero point
        first = draw(st.booleans())
        q.scale = np.array([q.scale[0] if first else q.scale[0] * 2, q.scale[0]], np.float32)
        q.zeroPoint = np.array([q.zeroPoint[0]] * 2, np.int64)
    else:
        tensor.quantization = None
    event(f"tensor {role}: {change}")


def _mutate_constant(draw, model: TFLiteModel) -> None:
    """A filter or bias of the op: what the kernel's Prepare checks of it (type, shape, scales)."""
    op = model.operator(_stage(model))
    index = int(draw(st.sampled_from([int(i) for i in op.inputs[1:]])))
    tensor = model.subgraph.tensors[index]
    q = tensor.quantization
    change = draw(st.sampled_from(["dtype", "shape", "scales", "bad_scale", "no_zero_point"]))
    if change == "dtype":  # same byte size, so the buffer still fits
        tensor.type = {9: 3, 2: 5}.get(int(tensor.type), 9)  # INT8 -> UINT8, INT32 -> UINT32
    elif change == "shape":  # same element count, other shape
        shape = [int(d) for d in tensor.shape]
        tensor.shape = np.array(shape[::-1] if len(shape) > 1 and shape != shape[::-1] else shape + [1], np.int32)
    elif change == "scales":
        q.scale = np.concatenate([np.asarray(q.scale, np.float32), np.float32([0.01])])
    elif change == "bad_scale":
        scale = np.asarray(q.scale, np.float32).copy()
        scale[draw(st.integers(0, scale.size - 1))] = draw(st.sampled_from([-1.0, float("nan"), float("inf"), 0.0]))
        q.scale = scale
    else:
        q.zeroPoint = np.array([], np.int64)
    event(f"constant: {change}")


@st.composite
def mutated_models(draw, models):
    base = draw(st.sampled_from(models))
    model = TFLiteModel.from_bytes(base)
    opts = _options(model)
    target = draw(st.sampled_from(["option_value", "option_key", "input_tensor", "output_tensor", "constant"]))
    event(target)
    if target == "option_value":
        mutated = draw(_option_value_mutation(opts))
        note(f"options: {mutated}")
        _set_options(model, o.encode_options(mutated))
    elif target == "option_key":
        _set_options(model, draw(_option_key_mutation(opts)))
    elif target == "constant":
        _mutate_constant(draw, model)
    else:
        _mutate_tensor(draw, model, target.split("_")[0])
    return model.to_bytes()


@settings(max_examples=N_EXAMPLES, **_SETTINGS)
@given(data=st.data(), seed=st.integers(0, 2**32 - 1))
def test_both_executors_accept_and_reject_the_same_mutated_models(patched_models, data, seed):
    """Mutated options keys/values and stage input/output tensors: both reject, or both give the same bits."""
    model_bytes = data.draw(mutated_models(patched_models), label="mutated model")
    event(_assert_same_decision(_outcomes(model_bytes, _input(model_bytes, seed))))
