"""The C++ kernel core (keras_patch._kp_core) against the reference executor.

Random stages are drawn directly as KP_PATCH_STAGE options plus constant
weights (no Keras, no converter), so hundreds run in seconds:

* valid stages: the C++ Eval output equals `executor.run_stage` bit for bit,
  and the C++ patch-arena plan equals `geometry.plan_patch_arena`;
* mutated stages (one options entry or weight changed at random): both
  accept, or both reject naming the same options key;
* garbage, truncated, missing-key, wrong-type and wrong-length options raise
  InvalidOptionsError naming the key.

The end-to-end comparison with LiteRT on converted Keras models is in
tests/test_bit_exact.py (it runs both executors on the same examples).
"""

import array
import dataclasses
import os
import re

import numpy as np
import pytest
from hypothesis import HealthCheck, event, given, note, settings
from hypothesis import strategies as st

from keras_patch.runtime import cpp_executor
from keras_patch.errors import InvalidOptionsError
from keras_patch.stage import geometry
from keras_patch.stage import options as o
from keras_patch.stage.executor import ConstantTensor, prepare_stage, run_stage

try:
    from tests import test_op_spec as spec_tests
except ImportError:  # tests/ itself on sys.path
    import test_op_spec as spec_tests

if not cpp_executor.is_available():  # pragma: no cover - depends on the build
    pytest.fail(
        "keras_patch._kp_core is not built; run `python setup.py build_ext --inplace` "
        "or `pip install .`", pytrace=False)

PROFILE = os.environ.get("KP_HYPOTHESIS_PROFILE", "ci")
N_EXAMPLES = {"ci": 300, "dev": 60}.get(PROFILE, 300)
_SETTINGS = dict(deadline=None, suppress_health_check=list(HealthCheck), derandomize=PROFILE == "ci",
                 database=None)

WINDOW_OPS = (o.OP_CONV_2D, o.OP_DEPTHWISE_CONV_2D, o.OP_MAX_POOL_2D, o.OP_AVERAGE_POOL_2D)
ALL_OPS = WINDOW_OPS + (o.OP_PAD, o.OP_ADD, o.OP_RELU, o.OP_RELU6)


def _scale(draw):
    return float(np.float32(draw(st.floats(0.004, 0.6))))


@st.composite
def stages(draw, max_layers=6, max_size=12, max_channels=6, min_layers=1, ops=ALL_OPS,
           depth_multipliers=(1, 2)):
    """(StageOptions, op_inputs) of a random valid stage (layer ops drawn from `ops`)."""
    shapes = [(draw(st.integers(1, max_size)), draw(st.integers(1, max_size)),
               draw(st.integers(1, max_channels)))]
    scales = [_scale(draw)]
    zps = [draw(st.integers(-128, 127))]
    layers, op_inputs = [], [None]
    for l in range(draw(st.integers(min_layers, max_layers))):
        h, w, c = shapes[l]
        op = draw(st.sampled_from(ops))
        kernel, stride, dilation, pad, act, weights = (1, 1), (1, 1), (1, 1), (0, 0), 0, (-1, -1)
        inputs = (l, -1)
        if op in WINDOW_OPS:
            kernel = (draw(st.integers(1, 4)), draw(st.integers(1, 4)))
            stride = (draw(st.integers(1, 3)), draw(st.integers(1, 3)))
            if op in (o.OP_CONV_2D, o.OP_DEPTHWISE_CONV_2D):
                dilation = (draw(st.integers(1, 2)), draw(st.integers(1, 2)))
            eff = [(k - 1) * d + 1 for k, d in zip(kernel, dilation)]
            pad = (draw(st.integers(0, eff[0] - 1)), draw(st.integers(0, eff[1] - 1)))
            out_hw = [draw(st.integers(1, (n - 1 + p) // s + 1))
                      for n, p, s in zip((h, w), pad, stride)]
            out_c = c
            if op == o.OP_CONV_2D:
                out_c = draw(st.integers(1, max_channels))
            elif op == o.OP_DEPTHWISE_CONV_2D:
                out_c = c * draw(st.sampled_from(depth_multipliers))
            out_shape = (out_hw[0], out_hw[1], out_c)
            act = draw(st.integers(0, 3))
        elif op == o.OP_PAD:
            pad = (draw(st.integers(0, 2)), draw(st.integers(0, 2)))
            out_shape = (h + pad[0] + draw(st.integers(0, 2)), w + pad[1] + draw(st.integers(0, 2)), c)
        else:
            out_shape = (h, w, c)
            if op == o.OP_ADD:
                same = [t for t in range(l + 1) if shapes[t] == shapes[l]]
                other = draw(st.sampled_from(same))
                inputs = (l, other) if draw(st.booleans()) else (other, l)
                act = draw(st.integers(0, 3))
        if op in (o.OP_MAX_POOL_2D, o.OP_AVERAGE_POOL_2D, o.OP_PAD):
            scale, zp = scales[inputs[0]], zps[inputs[0]]
        else:
            scale, zp = _scale(draw), draw(st.integers(-128, 127))
        if op in (o.OP_CONV_2D, o.OP_DEPTHWISE_CONV_2D):
            out_c = out_shape[2]
            fshape = (out_c, kernel[0], kernel[1], c) if op == o.OP_CONV_2D else (1, kernel[0], kernel[1], out_c)
            rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
            filt = rng.integers(-127, 128, fshape).astype(np.int8)
            n_scales = draw(st.sampled_from([1, out_c]))
            fscales = rng.uniform(0.0005, 0.05, n_scales).astype(np.float32)
            if n_scales > 1 and draw(st.booleans()):
                fscales[0] = 0.0  # an all-zero channel gets scale 0 in some converters
            fw = len(op_inputs)
            op_inputs.append(ConstantTensor(filt, fscales))
            fb = -1
            if draw(st.booleans()):
                fb = len(op_inputs)
                op_inputs.append(ConstantTensor(rng.integers(-3000, 3000, out_c).astype(np.int32)))
            weights = (fw, fb)
        layers.append(o.LayerOptions(op=op, inputs=inputs, kernel=kernel, stride=stride,
                                     dilation=dilation, pad=pad, activation=act, weights=weights))
        shapes.append(out_shape)
        scales.append(scale)
        zps.append(zp)
    out_h, out_w, _ = shapes[-1]
    grid = (draw(st.integers(1, min(out_h, 5))), draw(st.integers(1, min(out_w, 5))))
    opts = o.StageOptions(grid=grid, tensor_shapes=shapes, tensor_scales=scales,
                          tensor_zero_points=zps, layers=layers)
    return opts, op_inputs


def _inputs(opts, seed, n=2):
    rng = np.random.default_rng(seed)
    x = rng.integers(-128, 128, (n, *opts.input_shape)).astype(np.int8)
    x[0].flat[::3] = 127  # some extremes
    return x


@settings(max_examples=N_EXAMPLES, **_SETTINGS)
@given(stage=stages(), seed=st.integers(0, 2**32 - 1), in_place=st.booleans())
def test_cpp_equals_reference_executor(stage, seed, in_place):
    opts, op_inputs = stage
    if in_place and opts.num_layers > 1:  # docs "In place": same outputs, the plan may differ
        opts = dataclasses.replace(opts, in_place=True)
    note(repr(opts))
    ref = prepare_stage(opts, op_inputs)
    cpp = cpp_executor.CppStage(o.encode_options(opts), op_inputs)
    x = _inputs(opts, seed)
    np.testing.assert_array_equal(cpp.run(x), run_stage(ref, x))
    plan = geometry.plan_patch_arena(opts)
    assert cpp.arena_plan() == (plan.offsets, plan.sizes)
    assert cpp.save_plan() == (list(plan.save_offsets), list(plan.save_sizes))
    assert cpp.arena_bytes == plan.total_bytes
    assert cpp_executor.persistent_bytes(o.encode_options(opts)) == geometry.kernel_persistent_bytes(
        opts, pointer_bytes=8)
    # The host core is the portable build: no CMSIS-NN context buffer (tests/test_cmsis_nn.py
    # checks the -DCMSIS_NN build's Q against geometry.kernel_context_bytes(opts, "cmsis_nn")).
    assert not cpp_executor.cmsis_nn_enabled()
    assert cpp.context_bytes == geometry.kernel_context_bytes(opts, "portable") == 0


def _key(message: str) -> str:
    m = re.search(r"key '(\w+)'", message)
    return m.group(1) if m else f"<no key in: {message}>"


MUTABLE = ["grid", "tensor_shapes", "tensor_scales", "tensor_zero_points", "op", "inputs", "kernel",
           "stride", "dilation", "pad", "activation", "weights", "filter", "bias"]


@st.composite
def mutated_stages(draw):
    opts, op_inputs = draw(stages(max_layers=4, max_size=8, max_channels=4))
    what = draw(st.sampled_from(MUTABLE))
    small = st.integers(-3, 9)
    layers = list(opts.layers)
    l = draw(st.integers(0, len(layers) - 1))
    if what == "grid":
        opts = o.StageOptions(**{**_fields(opts), "grid": (draw(small), draw(small))})
    elif what == "tensor_shapes":
        shapes = list(opts.tensor_shapes)
        t = draw(st.integers(0, len(shapes) - 1))
        shapes[t] = tuple(draw(st.integers(-1, 10)) for _ in range(3))
        opts = o.StageOptions(**{**_fields(opts), "tensor_shapes": shapes})
    elif what == "tensor_scales":
        scales = list(opts.tensor_scales)
        scales[draw(st.integers(0, len(scales) - 1))] = draw(st.sampled_from(
            [0.0, -0.1, float("inf"), float("nan"), 1e-30, 1e30, 3e38, 1e-45, 0.5]))
        opts = o.StageOptions(**{**_fields(opts), "tensor_scales": scales})
    elif what == "tensor_zero_points":
        zps = list(opts.tensor_zero_points)
        zps[draw(st.integers(0, len(zps) - 1))] = draw(st.sampled_from([-129, 128, 0, 1000]))
        opts = o.StageOptions(**{**_fields(opts), "tensor_zero_points": zps})
    elif what in ("filter", "bias"):
        idx = [i for i in range(1, len(op_inputs))]
        if idx:
            i = draw(st.sampled_from(idx))
            t = op_inputs[i]
            change = draw(st.sampled_from(["dtype", "shape", "scales", "bad_scale"]))
            data, scales = t.data, t.scales
            if change == "dtype":
                data = data.astype(np.int16 if data.dtype == np.int8 else np.int8)
            elif change == "shape":
                data = data.reshape(-1)[: max(data.size - 1, 1)]
            elif change == "scales":
                scales = np.ones(len(scales) + 1, np.float32) * 0.01
            else:
                scales = np.array([draw(st.sampled_from([float("nan"), -1.0, float("inf"), 1e30]))],
                                  np.float32)
            op_inputs = list(op_inputs)
            op_inputs[i] = ConstantTensor(data, scales)
    else:
        field = {"op": "op", "inputs": "inputs", "kernel": "kernel", "stride": "stride",
                 "dilation": "dilation", "pad": "pad", "activation": "activation",
                 "weights": "weights"}[what]
        values = {f: getattr(layers[l], f) for f in
                  ("op", "inputs", "kernel", "stride", "dilation", "pad", "activation", "weights")}
        if field == "op":
            values["op"] = draw(st.sampled_from(list(ALL_OPS) + [2, 99, -1]))
        elif field == "activation":
            values["activation"] = draw(small)
        else:
            values[field] = (draw(small), draw(small))
        layers[l] = o.LayerOptions(**values)
        opts = o.StageOptions(**{**_fields(opts), "layers": layers})
    return opts, op_inputs


def _fields(opts):
    return dict(grid=opts.grid, tensor_shapes=opts.tensor_shapes, tensor_scales=opts.tensor_scales,
                tensor_zero_points=opts.tensor_zero_points, layers=opts.layers)


@settings(max_examples=N_EXAMPLES, **_SETTINGS)
@given(stage=mutated_stages(), seed=st.integers(0, 2**32 - 1))
def test_cpp_and_reference_reject_the_same_options(stage, seed):
    opts, op_inputs = stage
    note(repr(opts))
    data = o.encode_options(opts)
    ref_error = cpp_error = None
    try:
        ref = prepare_stage(o.decode_options(data), op_inputs)
    except InvalidOptionsError as e:
        ref_error = str(e)
    try:
        cpp = cpp_executor.CppStage(data, op_inputs)
    except InvalidOptionsError as e:
        cpp_error = str(e)
    note(f"reference: {ref_error}\ncpp: {cpp_error}")
    event("rejected" if ref_error else "accepted")
    assert (ref_error is None) == (cpp_error is None)
    if ref_error is not None:
        assert _key(cpp_error) == _key(ref_error)
        return
    x = _inputs(o.decode_options(data), seed, n=1)
    np.testing.assert_array_equal(cpp.run(x), run_stage(ref, x))


# ----------------------------------------------------- hostile options bytes


def _cpp_error(data: bytes) -> str:
    with pytest.raises(InvalidOptionsError) as info:
        cpp_executor.persistent_bytes(data)
    return str(info.value)


@pytest.mark.parametrize("key", sorted(o.OPTION_KEYS))
def test_missing_key_is_named(key):
    entries = spec_tests._raw_entries()
    del entries[key]
    assert f"'{key}'" in _cpp_error(spec_tests._encode_raw(entries))


@pytest.mark.parametrize("key", sorted(o.OPTION_KEYS))
def test_wrong_type_is_named(key):
    entries = spec_tests._raw_entries()
    entries[key] = "oops"
    assert f"'{key}'" in _cpp_error(spec_tests._encode_raw(entries))


@pytest.mark.parametrize("key", [k for k, (_, n) in o.OPTION_KEYS.items() if n != "scalar"])
def test_wrong_length_is_named(key):
    entries = spec_tests._raw_entries()
    entries[key] = array.array(entries[key].typecode, list(entries[key]) + [1])
    assert f"'{key}'" in _cpp_error(spec_tests._encode_raw(entries))


@pytest.mark.parametrize("key", [k for k, (t, _) in o.OPTION_KEYS.items() if t == "int vector"])
def test_float_vector_where_int_expected_is_named(key):
    entries = spec_tests._raw_entries()
    entries[key] = array.array("f", [float(v) for v in entries[key]])
    assert f"'{key}'" in _cpp_error(spec_tests._encode_raw(entries))


@pytest.mark.parametrize("version", [0, 4])
def test_unread_version_is_rejected_naming_version(version):
    """The kernel reads options versions 1, 2 and 3 (docs "Versioning")."""
    entries = spec_tests._raw_entries()
    entries["version"] = version
    assert "'version'" in _cpp_error(spec_tests._encode_raw(entries))


def test_unknown_keys_are_ignored():
    entries = spec_tests._raw_entries()
    entries["zz_future_key"] = 7
    entries["aa_future_key"] = "x"
    data = spec_tests._encode_raw(entries)
    assert cpp_executor.persistent_bytes(data) == cpp_executor.persistent_bytes(
        o.encode_options(spec_tests._good_options())) > 0


@pytest.mark.parametrize("data", [b"", b"\x00", b"garbage bytes!", bytes(range(256)),
                                  b"\xff" * 64, b"\x00\x24\x01", b"\x01\x00\x24\x01"])
def test_garbage_bytes_raise(data):
    assert "FlexBuffer" in _cpp_error(data) or "key '" in _cpp_error(data)


def test_every_truncation_and_bit_flip_is_handled():
    """Truncated or corrupted options never crash the core: accepted or an error."""
    good = o.encode_options(spec_tests._good_options())
    for n in range(len(good)):
        _cpp_error(good[:n])
    rng = np.random.default_rng(0)
    for _ in range(2000):
        data = bytearray(good)
        for _ in range(rng.integers(1, 4)):
            data[rng.integers(len(data))] ^= 1 << int(rng.integers(8))
        try:
            cpp_executor.persistent_bytes(bytes(data))
        except InvalidOptionsError as e:
            assert str(e).startswith("KP_PATCH_STAGE")


def test_weights_are_checked_naming_layer_weights():
    opts = spec_tests._good_options()
    data = o.encode_options(opts)
    with pytest.raises(InvalidOptionsError, match="'layer_weights'"):
        cpp_executor.CppStage(data, [None] * 5)  # filter inputs missing


def test_check_io():
    pool = o.StageOptions(grid=(2, 2), tensor_shapes=[(6, 6, 2), (3, 3, 2)], tensor_scales=[0.1, 0.1],
                          tensor_zero_points=[3, 3],
                          layers=[o.LayerOptions(op=o.OP_MAX_POOL_2D, inputs=(0, -1), kernel=(2, 2),
                                                 stride=(2, 2))])
    stage = cpp_executor.CppStage(o.encode_options(pool), [None])
    scale = float(np.float32(0.1))
    stage.check_io(False, np.int8, (1, 6, 6, 2), scale, 3)
    stage.check_io(True, np.int8, (1, 3, 3, 2), scale, 3)
    with pytest.raises(InvalidOptionsError, match="'tensor_shape'"):
        stage.check_io(False, np.int8, (1, 6, 5, 2), scale, 3)
    with pytest.raises(InvalidOptionsError, match="'tensor_shape'"):
        stage.check_io(True, np.uint8, (1, 3, 3, 2), scale, 3)
    with pytest.raises(InvalidOptionsError, match="'tensor_scale'"):
        stage.check_io(True, np.int8, (1, 3, 3, 2), 0.2, 3)
    with pytest.raises(InvalidOptionsError, match="'tensor_zero_point'"):
        stage.check_io(False, np.int8, (1, 6, 6, 2), scale, 4)


def test_arithmetic_helpers_match_python():
    from keras_patch.stage import quantization as q
    import ctypes

    lib = cpp_executor.load_library()
    rng = np.random.default_rng(1)
    for real in list(rng.uniform(1e-6, 4.0, 500)) + [0.0, 0.5, 1.0, 2**-31, 2**-40, 0.9999999999]:
        m, s = ctypes.c_int32(), ctypes.c_int32()
        lib.kp_quantize_multiplier(float(real), ctypes.byref(m), ctypes.byref(s))
        assert (m.value, s.value) == q.quantize_multiplier(float(real)), real
        for x in rng.integers(-2**20, 2**20, 4).tolist() + [2**31 - 1, -2**31]:
            want = int(q.multiply_by_quantized_multiplier(np.array([x]), m.value, s.value)[0])
            assert lib.kp_multiply_by_quantized_multiplier(x, m.value, s.value) == want


@pytest.mark.parametrize("first, last", [(4, 1), (1, 4)])
def test_duplicate_key_last_one_counts(first, last):
    """Like the Python reader, the core reads the last of repeated keys."""
    from flatbuffers import flexbuffers

    builder = flexbuffers.Builder()
    with builder.Map():
        builder.Int("version", first)
        for key, value in spec_tests._raw_entries().items():
            if isinstance(value, int):
                builder.Int(key, last if key == "version" else value)
            else:
                builder.TypedVectorFromElements(key, value)
    data = bytes(builder.Finish())
    if last == 1:
        assert o.decode_options(data).version == 1
        assert cpp_executor.persistent_bytes(data) > 0
    else:
        with pytest.raises(InvalidOptionsError, match="'version'"):
            o.decode_options(data)
        assert "'version'" in _cpp_error(data)
