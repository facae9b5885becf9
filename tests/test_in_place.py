"""In-place DEPTHWISE_CONV_2D inside KP_PATCH_STAGE (docs/patch_stage_op.md "In place").

* one-layer in-place stages: the C++ core run with input and output at the
  same address gives the reference executor's output (random strides,
  kernels, dilations, pads, odd sizes);
* multi-layer stages with `in_place`: the C++ output equals the reference
  (the stage without in_place), and the C++ plan (tensor offsets, save
  buffers, arena size) equals `geometry.plan_patch_arena`;
* the plan: no two buffers alive together overlap, and in place never makes
  the patch arena larger;
* options: `in_place` round-trips (version 2), version-1 files still read,
  bad values are refused naming the key, by both executors.
"""

import dataclasses
import os

import numpy as np
import pytest
from hypothesis import HealthCheck, event, given, note, settings
from hypothesis import strategies as st

from keras_patch.errors import InvalidOptionsError
from keras_patch.runtime import cpp_executor
from keras_patch.stage import geometry
from keras_patch.stage import options as o
from keras_patch.stage.executor import ConstantTensor, prepare_stage, run_stage

try:
    from tests.test_cpp_executor import ALL_OPS, _inputs, stages
except ImportError:  # tests/ itself on sys.path
    from test_cpp_executor import ALL_OPS, _inputs, stages

PROFILE = os.environ.get("KP_HYPOTHESIS_PROFILE", "ci")
N_EXAMPLES = {"ci": 200, "dev": 50}.get(PROFILE, 200)
_SETTINGS = dict(deadline=None, suppress_health_check=list(HealthCheck), derandomize=PROFILE == "ci",
                 database=None)


# Depthwise layers (depth multiplier 1 mostly) are drawn often, so most stages have in-place candidates.
IN_PLACE_OPS = ALL_OPS + (o.OP_DEPTHWISE_CONV_2D,) * 4 + (o.OP_CONV_2D,) * 2


@st.composite
def one_layer_depthwise(draw, max_size=13, max_channels=7):
    """(StageOptions, op_inputs) of a random one-layer in-place DEPTHWISE_CONV_2D stage."""
    h, w, c = draw(st.integers(1, max_size)), draw(st.integers(1, max_size)), draw(st.integers(1, max_channels))
    kernel = (draw(st.integers(1, 5)), draw(st.integers(1, 5)))
    stride = (draw(st.sampled_from([1, 2])), draw(st.sampled_from([1, 2])))
    dilation = (draw(st.integers(1, 2)), draw(st.integers(1, 2)))
    eff = [(k - 1) * d + 1 for k, d in zip(kernel, dilation)]
    if draw(st.booleans()):  # SAME
        out = [-(-n // s) for n, s in zip((h, w), stride)]
        pad = tuple(max((oo - 1) * s + e - n, 0) // 2 for oo, s, e, n in zip(out, stride, eff, (h, w)))
    else:  # VALID, or any pad the spec allows
        pad = (draw(st.integers(0, eff[0] - 1)), draw(st.integers(0, eff[1] - 1)))
        out = [draw(st.integers(1, (n - 1 + p) // s + 1)) for n, p, s in zip((h, w), pad, stride)]
    if out[0] * out[1] > h * w:
        out = [min(out[0], h), min(out[1], w)]
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    filt = rng.integers(-127, 128, (1, kernel[0], kernel[1], c)).astype(np.int8)
    op_inputs = [None, ConstantTensor(filt, rng.uniform(0.0005, 0.05, draw(st.sampled_from([1, c]))).astype(np.float32))]
    bias = -1
    if draw(st.booleans()):
        bias = 2
        op_inputs.append(ConstantTensor(rng.integers(-3000, 3000, c).astype(np.int32)))
    layer = o.LayerOptions(op=o.OP_DEPTHWISE_CONV_2D, inputs=(0, -1), kernel=kernel, stride=stride,
                           dilation=dilation, pad=pad, activation=draw(st.integers(0, 3)), weights=(1, bias))
    opts = o.StageOptions(grid=(1, 1), tensor_shapes=[(h, w, c), (out[0], out[1], c)],
                          tensor_scales=[float(np.float32(draw(st.floats(0.004, 0.6)))) for _ in range(2)],
                          tensor_zero_points=[draw(st.integers(-128, 127)) for _ in range(2)],
                          layers=[layer], in_place=True)
    return opts, op_inputs


@st.composite
def inverted_residual_stage(draw):
    """(StageOptions, op_inputs): 1-2 MobileNetV2 blocks (1x1 expand, k x k depthwise, 1x1 project,
    ADD when shapes allow) on a random input, random grid, `in_place` set."""
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    shapes = [(draw(st.integers(3, 17)), draw(st.integers(3, 17)), draw(st.integers(1, 6)))]
    scales = [float(np.float32(draw(st.floats(0.01, 0.3))))]
    zps = [draw(st.integers(-128, 127))]
    layers, op_inputs = [], [None]

    def add_layer(op, inputs, shape, kernel=(1, 1), stride=(1, 1), dilation=(1, 1), pad=(0, 0), weighted=True):
        weights = (-1, -1)
        if weighted:
            c_in, c_out = shapes[inputs[0]][2], shape[2]
            fshape = (c_out, *kernel, c_in) if op == o.OP_CONV_2D else (1, *kernel, c_out)
            op_inputs.append(ConstantTensor(rng.integers(-127, 128, fshape).astype(np.int8),
                                            rng.uniform(0.001, 0.03, c_out).astype(np.float32)))
            op_inputs.append(ConstantTensor(rng.integers(-2000, 2000, c_out).astype(np.int32)))
            weights = (len(op_inputs) - 2, len(op_inputs) - 1)
        layers.append(o.LayerOptions(op=op, inputs=inputs, kernel=kernel, stride=stride, dilation=dilation,
                                     pad=pad, activation=draw(st.sampled_from([0, 3])), weights=weights))
        shapes.append(shape)
        scales.append(float(np.float32(draw(st.floats(0.01, 0.3)))))
        zps.append(draw(st.integers(-128, 127)))
        return len(shapes) - 1

    for _ in range(draw(st.integers(1, 2))):
        x = len(shapes) - 1
        h, w, c = shapes[x]
        e = c * draw(st.integers(2, 6))
        t = add_layer(o.OP_CONV_2D, (x, -1), (h, w, e))
        k, s, d = draw(st.sampled_from([3, 5])), draw(st.sampled_from([1, 2])), draw(st.sampled_from([1, 1, 2]))
        eff = (k - 1) * d + 1
        oh, ow = -(-h // s), -(-w // s)
        pad = (max((oh - 1) * s + eff - h, 0) // 2, max((ow - 1) * s + eff - w, 0) // 2)
        t = add_layer(o.OP_DEPTHWISE_CONV_2D, (t, -1), (oh, ow, e), (k, k), (s, s), (d, d), pad)
        c2 = draw(st.sampled_from([c, c + 1])) if s == 1 else draw(st.integers(1, 8))
        t = add_layer(o.OP_CONV_2D, (t, -1), (oh, ow, c2))
        if (oh, ow, c2) == (h, w, c) and draw(st.booleans()):
            add_layer(o.OP_ADD, (x, t), (oh, ow, c2), weighted=False)
    out_h, out_w, _ = shapes[-1]
    grid = (draw(st.integers(1, min(out_h, 4))), draw(st.integers(1, min(out_w, 4))))
    opts = o.StageOptions(grid=grid, tensor_shapes=shapes, tensor_scales=scales, tensor_zero_points=zps,
                          layers=layers, in_place=True)
    return opts, op_inputs


def _cpp_plan(cpp: cpp_executor.CppStage) -> tuple:
    return (*cpp.arena_plan(), *cpp.save_plan(), cpp.arena_bytes)


def _py_plan(opts: o.StageOptions) -> tuple:
    plan = geometry.plan_patch_arena(opts)
    return plan.offsets, plan.sizes, list(plan.save_offsets), list(plan.save_sizes), plan.total_bytes


@settings(max_examples=N_EXAMPLES, **_SETTINGS)
@given(stage=one_layer_depthwise(), seed=st.integers(0, 2**32 - 1))
def test_one_layer_in_place_aliased_equals_reference(stage, seed):
    opts, op_inputs = stage
    note(repr(opts))
    o.validate_options(opts)
    plain = dataclasses.replace(opts, in_place=False)
    x = _inputs(opts, seed)
    want = run_stage(prepare_stage(plain, op_inputs), x)
    cpp = cpp_executor.CppStage(o.encode_options(opts), op_inputs)
    np.testing.assert_array_equal(cpp.run(x, aliased=True), want)
    np.testing.assert_array_equal(cpp.run(x, aliased=False), want)
    assert _cpp_plan(cpp) == _py_plan(opts)
    h, w, _ = opts.input_shape
    # The arena is one plane of the region the output reads, at most depthwise_save_bytes.
    from keras_patch.arena.aliases import depthwise_save_bytes

    assert 0 < cpp.arena_bytes <= depthwise_save_bytes(h, w)
    assert geometry.kernel_context_bytes(opts, "cmsis_nn") == 0  # runs the portable kernel


@settings(max_examples=N_EXAMPLES, **_SETTINGS)
@given(stage=st.one_of(inverted_residual_stage(), stages(min_layers=3, max_channels=10, ops=IN_PLACE_OPS, depth_multipliers=(1, 1, 1, 2))), seed=st.integers(0, 2**32 - 1))
def test_multi_layer_in_place_equals_reference_and_python_plan(stage, seed):
    opts, op_inputs = stage
    opts = dataclasses.replace(opts, in_place=True)
    note(repr(opts))
    o.validate_options(opts)
    x = _inputs(opts, seed)
    want = run_stage(prepare_stage(dataclasses.replace(opts, in_place=False), op_inputs), x)
    cpp = cpp_executor.CppStage(o.encode_options(opts), op_inputs)
    np.testing.assert_array_equal(cpp.run(x), want)
    assert _cpp_plan(cpp) == _py_plan(opts)
    plan = geometry.plan_patch_arena(opts)
    assert plan.total_bytes <= geometry.plan_patch_arena(dataclasses.replace(opts, in_place=False)).total_bytes
    assert geometry.stage_costs(opts).arena == plan
    _check_no_overlap(opts, plan)
    event(f"in-place layers: {len(plan.in_place_layers)}")


def _check_no_overlap(opts: o.StageOptions, plan: geometry.PatchArenaPlan) -> None:
    """Buffers alive at the same layer never overlap, except a tensor and the in-place output over it."""
    lifetimes = geometry.tensor_lifetimes(opts)
    merged = {(opts.layers[l].inputs[0], l + 1) for l in plan.in_place_layers}
    buffers = [(f"t{t}", plan.offsets[t], plan.sizes[t], *lifetimes[t])
               for t in range(opts.num_layers + 1) if plan.offsets[t] >= 0]
    buffers += [(f"s{l}", plan.save_offsets[l], plan.save_sizes[l], l, l) for l in plan.in_place_layers]
    for name, off, size, first, last in buffers:
        assert off % 4 == 0 and off + size <= plan.total_bytes
    for i, (n1, o1, s1, f1, l1) in enumerate(buffers):
        for n2, o2, s2, f2, l2 in buffers[i + 1:]:
            if l1 < f2 or l2 < f1 or o1 + s1 <= o2 or o2 + s2 <= o1:
                continue
            pair = (int(n1[1:]), int(n2[1:]))
            assert n1[0] == n2[0] == "t", (n1, n2)
            # Only a chain of in-place layers shares a slot.
            chain = set(merged)
            assert pair in chain or _chained(pair, chain), (n1, n2)


def _chained(pair, merged) -> bool:
    a, b = pair
    while True:
        nxt = [y for x, y in merged if x == a]
        if not nxt:
            return False
        a = nxt[0]
        if a == b:
            return True


def _opts_one_layer(**changes) -> o.StageOptions:
    base = dict(grid=(1, 1), tensor_shapes=[(6, 5, 3), (3, 3, 3)], tensor_scales=[0.1, 0.2],
                tensor_zero_points=[1, -2], in_place=True,
                layers=[o.LayerOptions(op=o.OP_DEPTHWISE_CONV_2D, inputs=(0, -1), kernel=(3, 3),
                                       stride=(2, 2), pad=(1, 1), weights=(1, 2))])
    base.update(changes)
    return o.StageOptions(**base)


def test_options_round_trip_and_versions():
    opts = _opts_one_layer()
    data = o.encode_options(opts)
    decoded = o.decode_options(data)
    assert decoded == opts and decoded.in_place and decoded.version == 2
    plain = dataclasses.replace(opts, in_place=False)
    assert o.decode_options(o.encode_options(plain)).version == 1  # old kernels still read it
    assert cpp_executor.persistent_bytes(data) == geometry.kernel_persistent_bytes(opts, pointer_bytes=8)


@pytest.mark.parametrize("changes", [
    dict(grid=(1, 2)),
    dict(tensor_shapes=[(6, 5, 3), (3, 3, 6)]),  # depth multiplier 2
    dict(tensor_shapes=[(2, 2, 3), (3, 3, 3)], layers=[o.LayerOptions(
        op=o.OP_DEPTHWISE_CONV_2D, inputs=(0, -1), kernel=(3, 3), pad=(1, 1), weights=(1, 2))]),  # more pixels
    dict(layers=[o.LayerOptions(op=o.OP_MAX_POOL_2D, inputs=(0, -1), kernel=(3, 3), stride=(2, 2),
                                pad=(1, 1))], tensor_scales=[0.1, 0.1], tensor_zero_points=[1, 1]),
])
def test_bad_one_layer_in_place_is_refused_naming_the_key(changes):
    opts = _opts_one_layer(**changes)
    with pytest.raises(InvalidOptionsError, match="'in_place'"):
        o.validate_options(opts)
    data = o.encode_options(opts)
    with pytest.raises(InvalidOptionsError, match="'in_place'"):
        o.decode_options(data)
    with pytest.raises(InvalidOptionsError, match="'in_place'"):
        cpp_executor.persistent_bytes(data)


@pytest.mark.parametrize("value", [2, -1, 7])
def test_in_place_value_must_be_0_or_1(value):
    from flatbuffers import flexbuffers

    try:
        from tests.test_op_spec import _encode_raw
    except ImportError:
        from test_op_spec import _encode_raw
    root = flexbuffers.Loads(o.encode_options(_opts_one_layer()))
    root["in_place"] = value
    import array

    entries = {k: (array.array("f" if k == "tensor_scale" else "i", v) if isinstance(v, list) else v)
               for k, v in root.items()}
    data = _encode_raw(entries)
    with pytest.raises(InvalidOptionsError, match="'in_place'"):
        o.decode_options(data)
    with pytest.raises(InvalidOptionsError, match="'in_place'"):
        cpp_executor.persistent_bytes(data)
