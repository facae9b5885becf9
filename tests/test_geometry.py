"""Patch geometry, patch-arena planning and fixed-point arithmetic."""

import math
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from keras_patch.stage import geometry
from keras_patch.stage import options as o
from keras_patch.stage import quantization as q
from keras_patch.stage.executor import ConstantTensor, ExecutionMode, prepare_stage, run_stage


@given(size=st.integers(1, 300), parts=st.integers(1, 64))
def test_tiles_partition_the_axis(size, parts):
    if parts > size:
        return
    bounds = geometry.tile_bounds(size, parts)
    assert bounds[0][0] == 0 and bounds[-1][1] == size
    assert all(a[1] == b[0] for a, b in zip(bounds, bounds[1:]))
    lengths = [b - a for a, b in bounds]
    assert min(lengths) >= 1 and max(lengths) - min(lengths) <= 1


@st.composite
def chains(draw):
    """Random conv/pool/pad/add chains with consistent shapes, sometimes ending with a MEAN."""
    h = draw(st.integers(4, 40))
    w = draw(st.integers(4, 40))
    c = draw(st.integers(1, 4))
    shapes = [(h, w, c)]
    layers = []
    weights = 1
    for l in range(draw(st.integers(1, 6))):
        in_h, in_w, in_c = shapes[-1]
        kind = draw(st.sampled_from(["conv", "dw", "max", "avg", "pad", "add"]))
        if kind == "add" and l == 0:
            kind = "conv"
        if kind == "add":
            layers.append(o.LayerOptions(op=o.OP_ADD, inputs=(l, l)))
            shapes.append(shapes[-1])
            continue
        if kind == "pad":
            top, left = draw(st.integers(0, 2)), draw(st.integers(0, 2))
            bottom, right = draw(st.integers(0, 2)), draw(st.integers(0, 2))
            layers.append(o.LayerOptions(op=o.OP_PAD, inputs=(l, -1), pad=(top, left)))
            shapes.append((in_h + top + bottom, in_w + left + right, in_c))
            continue
        k = draw(st.sampled_from([1, 3, 5, 7] if kind in ("conv", "dw") else [2, 3]))
        s = draw(st.sampled_from([1, 2]))
        same = draw(st.booleans())
        if not same and (k > in_h or k > in_w):
            same = True
        if same:
            out_h, out_w = -(-in_h // s), -(-in_w // s)
            pad = (max((out_h - 1) * s + k - in_h, 0) // 2, max((out_w - 1) * s + k - in_w, 0) // 2)
        else:
            out_h, out_w = (in_h - k) // s + 1, (in_w - k) // s + 1
            pad = (0, 0)
        out_c = in_c
        op = {"conv": o.OP_CONV_2D, "dw": o.OP_DEPTHWISE_CONV_2D, "max": o.OP_MAX_POOL_2D,
              "avg": o.OP_AVERAGE_POOL_2D}[kind]
        wts = (-1, -1)
        if kind in ("conv", "dw"):
            out_c = draw(st.integers(1, 6)) if kind == "conv" else in_c * draw(st.sampled_from([1, 2]))
            wts = (weights, weights + 1)
            weights += 2
        layers.append(o.LayerOptions(op=op, inputs=(l, -1), kernel=(k, k), stride=(s, s), pad=pad, weights=wts))
        shapes.append((out_h, out_w, out_c))
    grid = (draw(st.integers(1, min(8, shapes[-1][0]))), draw(st.integers(1, min(8, shapes[-1][1]))))
    if draw(st.booleans()):  # a global average pool: the grid tiles its input
        layers.append(o.LayerOptions(op=o.OP_MEAN, inputs=(len(layers), -1), kernel=shapes[-1][:2]))
        shapes.append((1, 1, shapes[-1][2]))
    return o.StageOptions(grid=grid, tensor_shapes=shapes, tensor_scales=[0.05] * len(shapes),
                          tensor_zero_points=[0] * len(shapes), layers=layers)


@settings(max_examples=150, deadline=None)
@given(opts=chains())
def test_stage_costs_per_axis_equal_patch_by_patch(opts):
    """`stage_costs` (per axis, what the planner uses) equals the patch-by-patch functions."""
    costs = geometry.stage_costs(opts)
    assert (costs.macs, costs.patched_macs) == geometry.stage_macs(opts)
    assert costs.arena == geometry.plan_patch_arena(opts)
    assert costs.staging_bytes == geometry.cmsis_nn_staging_bytes(opts)
    assert geometry.kernel_context_bytes(opts, "cmsis_nn", costs.staging_bytes) == \
        geometry.kernel_context_bytes(opts, "cmsis_nn")


@settings(max_examples=150, deadline=None)
@given(opts=chains())
def test_patch_arena_never_overlaps_live_tensors(opts):
    o.validate_options(opts)
    plan = geometry.plan_patch_arena(opts)
    lifetimes = geometry.tensor_lifetimes(opts)
    placed = [t for t in range(len(plan.sizes)) if plan.offsets[t] >= 0]
    assert set(placed) <= set(range(1, opts.num_layers))
    assert plan.accumulator_bytes == (-(-4 * opts.output_shape[2] // 4) * 4 if opts.ends_with_mean else 0)
    for t in placed:
        assert plan.offsets[t] >= plan.accumulator_bytes  # the MEAN's sums live for the whole op
        assert plan.offsets[t] % geometry.PATCH_ARENA_ALIGNMENT == 0
        assert plan.offsets[t] + plan.sizes[t] <= plan.total_bytes
        for u in placed:
            if u <= t:
                continue
            live_together = not (lifetimes[t][1] < lifetimes[u][0] or lifetimes[u][1] < lifetimes[t][0])
            disjoint = (plan.offsets[t] + plan.sizes[t] <= plan.offsets[u]
                        or plan.offsets[u] + plan.sizes[u] <= plan.offsets[t])
            assert disjoint or not live_together


@settings(max_examples=150, deadline=None)
@given(opts=chains())
def test_regions_fit_tensors_and_tiles_cover_output(opts):
    o.validate_options(opts)
    covered = np.zeros(opts.tiled_shape[:2], np.int32)
    for tile in geometry.tiles(opts):
        regions = geometry.patch_regions(opts, tile)
        for t, region in enumerate(regions):
            if geometry.is_empty(region):
                continue
            h, w, _ = opts.tensor_shapes[t]
            assert 0 <= region[0] < region[1] <= h and 0 <= region[2] < region[3] <= w
        covered[tile[0]:tile[1], tile[2]:tile[3]] += 1
    assert (covered == 1).all()


@settings(max_examples=60, deadline=None)
@given(opts=chains(), seed=st.integers(0, 2**31 - 1))
def test_patch_by_patch_equals_layer_by_layer(opts, seed):
    """The executor's two modes agree for random weights (coverage is asserted inside)."""
    rng = np.random.default_rng(seed)
    constants = [None]
    for layer in opts.layers:
        if layer.op in o.WEIGHTED_OPS:
            in_c = opts.tensor_shapes[layer.inputs[0]][2]
            out_c = opts.tensor_shapes[opts.layers.index(layer) + 1][2]
            kh, kw = layer.kernel
            shape = (out_c, kh, kw, in_c) if layer.op == o.OP_CONV_2D else (1, kh, kw, out_c)
            constants.append(ConstantTensor(rng.integers(-127, 128, shape).astype(np.int8),
                                            rng.uniform(0.001, 0.02, out_c).astype(np.float32)))
            constants.append(ConstantTensor(rng.integers(-5000, 5000, out_c).astype(np.int32)))
    stage = prepare_stage(opts, constants)
    x = rng.integers(-128, 128, (1, *opts.input_shape)).astype(np.int8)
    layer_by_layer = run_stage(stage, x, ExecutionMode.LAYER_BY_LAYER)
    np.testing.assert_array_equal(run_stage(stage, x), layer_by_layer)
    np.testing.assert_array_equal(run_stage(stage, x, mode=ExecutionMode.RECOMPUTE), layer_by_layer)


def test_execution_mode_and_deprecated_patch_by_patch():
    """`run_stage(mode=...)`; the old boolean `patch_by_patch` still works, with a DeprecationWarning."""
    opts = o.StageOptions(grid=(2, 2), tensor_shapes=[(6, 6, 1), (6, 6, 1)], tensor_scales=[0.1, 0.1],
                          tensor_zero_points=[0, 0],
                          layers=[o.LayerOptions(op=o.OP_MAX_POOL_2D, inputs=(0, -1), kernel=(3, 3), pad=(1, 1))])
    stage = prepare_stage(opts, [None])
    x = np.arange(36, dtype=np.int8).reshape(1, 6, 6, 1)
    want = run_stage(stage, x, ExecutionMode.LAYER_BY_LAYER)
    assert int(want[0, 0, 0, 0]) == 7 and int(want[0, 5, 5, 0]) == 35
    np.testing.assert_array_equal(run_stage(stage, x, "recompute"), want)
    np.testing.assert_array_equal(run_stage(stage, x, "layer_by_layer"), want)
    for flag in (True, False):
        with pytest.warns(DeprecationWarning, match="patch_by_patch"):
            np.testing.assert_array_equal(run_stage(stage, x, patch_by_patch=flag), want)
        with pytest.warns(DeprecationWarning, match="patch_by_patch"):
            np.testing.assert_array_equal(run_stage(stage, x, flag), want)  # the old positional form
    with pytest.warns(DeprecationWarning), pytest.raises(ValueError, match="contradicts"):
        run_stage(stage, x, ExecutionMode.RECOMPUTE, patch_by_patch=False)
    with pytest.raises(ValueError):
        run_stage(stage, x, "cache")  # not a mode (yet)


def test_cmsis_nn_context_of_known_stages():
    """kernel_context_bytes: CMSIS-NN's DSP buffer sizes plus the staging area (docs: "Scratch buffers")."""
    conv = o.LayerOptions(op=o.OP_CONV_2D, inputs=(0, -1), kernel=(3, 3), stride=(2, 2), pad=(0, 0),
                          weights=(1, 2))
    dw = o.LayerOptions(op=o.OP_DEPTHWISE_CONV_2D, inputs=(1, -1), kernel=(3, 3), pad=(1, 1), weights=(3, 4))
    pw = o.LayerOptions(op=o.OP_CONV_2D, inputs=(2, -1), weights=(5, 6))
    opts = o.StageOptions(grid=(1, 1), tensor_shapes=[(17, 17, 3), (8, 8, 8), (8, 8, 8), (8, 8, 5)],
                          tensor_scales=[0.1] * 4, tensor_zero_points=[0] * 4, layers=[conv, dw, pw])
    # 3x3 conv over 3 channels: two int16 columns of align4(27) = 28; the 3x3 depthwise with
    # pads <= 1 and the 1x1 conv need none; grid 1x1 copies nothing.
    assert geometry.cmsis_nn_layer_buffer_bytes(opts, 0) == 112
    assert geometry.cmsis_nn_layer_buffer_bytes(opts, 1) == 0
    assert geometry.cmsis_nn_layer_buffer_bytes(opts, 2) == 0
    assert geometry.kernel_context_bytes(opts, "cmsis_nn") == 112
    assert geometry.kernel_context_bytes(opts) == 0
    # Column tiles: the right tile (output columns 4..8) needs tensor 1 columns 3..8 and so
    # tensor 0 columns 6..17; tensor 0 is read in place only from column 0
    # (pad_left + 0 - 3 * 2 < 0), so the conv runs row by row, staging the 3 input rows of
    # each output row (3 * 11 * 3 bytes). The depthwise (pad 1 + 3 - 4 = 0) and the 1x1 conv
    # (same width) read their blocks in place.
    two = o.StageOptions(**{**opts.__dict__, "grid": (1, 2)})
    assert geometry.cmsis_nn_staging_bytes(two) == 3 * 11 * 3
    assert geometry.kernel_context_bytes(two, "cmsis_nn") == 112 + 100
    # A 5x5 depthwise (or 3x3 with pad 2) takes the opt kernel: 2 * C * kh * kw.
    dw5 = o.LayerOptions(op=o.OP_DEPTHWISE_CONV_2D, inputs=(1, -1), kernel=(5, 5), pad=(2, 2), weights=(3, 4))
    five = o.StageOptions(**{**opts.__dict__, "layers": [conv, dw5, pw]})
    assert geometry.cmsis_nn_layer_buffer_bytes(five, 1) == 2 * 8 * 25
    with pytest.raises(ValueError, match="kernel"):
        geometry.kernel_context_bytes(opts, "helium")


def test_receptive_field_of_a_known_chain():
    # conv 3x3 s2 -> conv 3x3 s1 -> maxpool 2 s2: RF = 1 -> 2 -> 4 -> 9 ... computed by hand
    opts = o.StageOptions(
        grid=(1, 1),
        tensor_shapes=[(32, 32, 1), (16, 16, 1), (16, 16, 1), (8, 8, 1)],
        tensor_scales=[0.1] * 4, tensor_zero_points=[0] * 4,
        layers=[
            o.LayerOptions(op=o.OP_CONV_2D, inputs=(0, -1), kernel=(3, 3), stride=(2, 2), pad=(0, 0), weights=(1, 2)),
            o.LayerOptions(op=o.OP_CONV_2D, inputs=(1, -1), kernel=(3, 3), pad=(1, 1), weights=(3, 4)),
            o.LayerOptions(op=o.OP_MAX_POOL_2D, inputs=(2, -1), kernel=(2, 2), stride=(2, 2)),
        ],
    )
    # pool: 1 -> 2; conv s1 k3: 2 -> 4; conv s2 k3: (4-1)*2+3 = 9
    assert geometry.receptive_field(opts) == (9, 9)
    full, patched = geometry.stage_macs(opts)
    assert full == 16 * 16 * 9 + 16 * 16 * 9 and patched == full  # 1x1 grid: no recomputation


# --------------------------------------------------------------- arithmetic
def _srdhm(a: int, b: int) -> int:
    if a == b == -(2**31):
        return 2**31 - 1
    ab = a * b
    nudge = (1 << 30) if ab >= 0 else 1 - (1 << 30)
    return _trunc_div(ab + nudge, 1 << 31)


def _trunc_div(a: int, b: int) -> int:
    q_ = abs(a) // abs(b)
    return q_ if (a >= 0) == (b > 0) else -q_


def _rdbp(x: int, e: int) -> int:
    mask = (1 << e) - 1
    remainder = x & mask
    threshold = (mask >> 1) + (1 if x < 0 else 0)
    return (x >> e) + (1 if remainder > threshold else 0)


def _wrap32(x: int) -> int:
    return (x + 2**31) % 2**32 - 2**31


@settings(max_examples=500)
@given(x=st.integers(-(2**31), 2**31 - 1), m=st.integers(2**30, 2**31 - 1), shift=st.integers(-31, 8))
def test_multiply_by_quantized_multiplier_matches_scalar_c_semantics(x, m, shift):
    expected = _rdbp(_srdhm(_wrap32(x * (1 << max(shift, 0))), m), max(-shift, 0))
    assert int(q.multiply_by_quantized_multiplier(np.array([x]), m, shift)[0]) == expected


@settings(max_examples=300)
@given(real=st.floats(1e-12, 1e3, allow_nan=False))
def test_quantize_multiplier_reconstructs_the_scale(real):
    m, shift = q.quantize_multiplier(real)
    if m == 0:
        assert real < 2.0**-31
        return
    assert 2**30 <= m < 2**31
    assert math.isclose(m * 2.0 ** (shift - 31), real, rel_tol=2**-30)


def test_quantize_multiplier_known_values():
    # Values TFLite's QuantizeMultiplier produces (quantization_util_test.cc).
    assert q.quantize_multiplier(0.0) == (0, 0)
    assert q.quantize_multiplier(1.0) == (1 << 30, 1)
    assert q.quantize_multiplier(0.5) == (1 << 30, 0)
    assert q.quantize_multiplier(0.25) == (1 << 30, -1)
    assert q.quantize_multiplier(2**-40) == (0, 0)
    assert q.quantize_multiplier(1 - 2**-33) == (1 << 30, 1)  # rounds up to 2^31, renormalized


@pytest.mark.parametrize("scale, zp, expected", [
    (6 / 255, -128, {1: (-128, 127), 3: (-128, 127)}),
    (0.05, -10, {0: (-128, 127), 1: (-10, 127), 3: (-10, 110), 2: (-30, 10)}),
])
def test_activation_ranges(scale, zp, expected):
    for act, rng in expected.items():
        assert q.activation_range(act, scale, zp) == rng
