"""The MEAN layer (KP_PATCH_STAGE options version 3) in the C++ core, host and Cortex-M4F.

A random valid stage (`test_cpp_executor.stages`) gets a final MEAN over its
output (docs/patch_stage_op.md, "Global average pool"): the grid now tiles
the MEAN's input, and the kernel adds each tile to int32 sums instead of
storing it. The oracle is independent of the kernel's MEAN: the reference
executor runs the stage without the MEAN (the whole tensor the MEAN reads),
and `_tflm_mean` below averages it as TFLM's int8 MEAN does
(`reference_ops::QuantizedMeanOrSum`, written out from
`quantization.quantize_multiplier` and `multiply_by_quantized_multiplier`).

* host: the C++ core (keras_patch._kp_core) equals that, with and without
  `in_place`; its patch arena starts with the sums;
* Cortex-M4F in QEMU (tests/test_firmware.py's firmware, portable and
  CMSIS-NN builds): the same stages, byte for byte.
"""

import dataclasses
import os

import numpy as np
import pytest
from hypothesis import HealthCheck, given, note, settings
from hypothesis import strategies as st

from keras_patch.runtime import cpp_executor
from keras_patch.runtime.firmware import run_stage_firmware, stage_vectors_header_from_options, toolchain_problem
from keras_patch.stage import options as o
from keras_patch.stage import quantization as q
from keras_patch.stage.executor import prepare_stage, run_stage

try:
    from tests.test_cpp_executor import stages
except ImportError:  # tests/ itself on sys.path
    from test_cpp_executor import stages

PROFILE = os.environ.get("KP_HYPOTHESIS_PROFILE", "ci")
N_EXAMPLES = {"ci": 150, "dev": 40}.get(PROFILE, 150)
N_FIRMWARE = int(os.environ.get("KP_MEAN_FIRMWARE_EXAMPLES", "4"))
_SETTINGS = dict(deadline=None, suppress_health_check=list(HealthCheck), derandomize=PROFILE == "ci",
                 database=None)
OP_MEAN = 40  # TFLite BuiltinOperator MEAN


def with_mean(opts: o.StageOptions, scale: float, zero_point: int) -> o.StageOptions:
    """`opts` followed by the MEAN of its output over height and width (options version 3)."""
    h, w, c = opts.output_shape
    mean = o.LayerOptions(op=OP_MEAN, inputs=(opts.num_layers, -1), kernel=(h, w))
    return dataclasses.replace(
        opts, version=3, layers=[*opts.layers, mean], tensor_shapes=[*opts.tensor_shapes, (1, 1, c)],
        tensor_scales=[*opts.tensor_scales, scale], tensor_zero_points=[*opts.tensor_zero_points, zero_point])


def _tflm_mean(x: np.ndarray, s_in: float, s_out: float, zp_in: int, zp_out: int) -> np.ndarray:
    """TFLM's int8 MEAN over axes 1 and 2 of (N, H, W, C) -> (N, C)."""
    n = x.shape[1] * x.shape[2]
    m, shift = q.quantize_multiplier(float(np.float32(s_in)) / float(np.float32(s_out)))
    k = min(n.bit_length() - 1, 32, 31 + shift)  # floor(log2(n)), clamped as TFLM does
    folded, folded_shift = (int(m) << k) // n, shift - k
    sums = x.astype(np.int64).sum(axis=(1, 2)) - zp_in * n
    y = q.multiply_by_quantized_multiplier(sums, folded, folded_shift) + zp_out
    return np.clip(y, -128, 127).astype(np.int8)


@st.composite
def mean_stages(draw, **kwargs):
    """(stage with a final MEAN, op inputs, the stage without it)."""
    prefix, op_inputs = draw(stages(**kwargs))
    scale = float(np.float32(draw(st.sampled_from([0.003, 0.02, 0.3, 2.0]))))
    return with_mean(prefix, scale, draw(st.integers(-128, 127))), op_inputs, prefix


def _want(opts, prefix, op_inputs, x):
    full = run_stage(prepare_stage(prefix, op_inputs), x)  # the whole tensor the MEAN reads
    return _tflm_mean(full, prefix.tensor_scales[-1], opts.tensor_scales[-1], prefix.tensor_zero_points[-1],
                      opts.tensor_zero_points[-1])


def test_hand_checked_mean():
    """5x5x2, scales 0.5 / 0.5, zero points 3 / -2 (tflm_ops/tests TestMeanHandChecked)."""
    x = np.zeros((1, 5, 5, 2), np.int8)
    x[..., 0], x[..., 1] = 10, -40
    x[0, 3, 2, 0] = 22
    np.testing.assert_array_equal(_tflm_mean(x, 0.5, 0.5, 3, -2), [[6, -45]])
    opts = o.StageOptions(grid=(3, 2), tensor_shapes=[(5, 5, 2), (1, 1, 2)], tensor_scales=[0.5, 0.5],
                          tensor_zero_points=[3, -2], layers=[o.LayerOptions(op=OP_MEAN, inputs=(0, -1), kernel=(5, 5))],
                          version=3)
    cpp = cpp_executor.CppStage(o.encode_options(opts), [None])
    np.testing.assert_array_equal(cpp.run(x).reshape(1, 2), [[6, -45]])
    assert cpp.arena_bytes == 8  # the sums alone
    cpp.check_io(True, np.int8, (1, 2), 0.5, -2)  # [1, C] as TFLite's MEAN without keep_dims
    cpp.check_io(True, np.int8, (1, 1, 1, 2), 0.5, -2)


@settings(max_examples=N_EXAMPLES, **_SETTINGS)
@given(stage=mean_stages(), seed=st.integers(0, 2**32 - 1), in_place=st.booleans())
def test_cpp_mean_equals_tflm_mean_of_the_whole_tensor(stage, seed, in_place):
    opts, op_inputs, prefix = stage
    opts = dataclasses.replace(opts, in_place=in_place)
    note(repr(opts))
    cpp = cpp_executor.CppStage(o.encode_options(opts), op_inputs)
    x = np.random.default_rng(seed).integers(-128, 128, (2, *opts.input_shape)).astype(np.int8)
    got = cpp.run(x)
    assert got.shape == (2, 1, 1, opts.output_shape[2])
    np.testing.assert_array_equal(got.reshape(2, -1), _want(opts, prefix, op_inputs, x))
    # The sums first (docs "Scratch buffers", step 5), every other buffer after them.
    sums = (4 * opts.output_shape[2] + 3) // 4 * 4
    offsets, sizes = cpp.arena_plan()
    assert all(off >= sums for off in offsets if off >= 0)
    assert all(off >= sums for off in cpp.save_plan()[0] if off >= 0)
    assert cpp.arena_bytes == sums + max([off + size - sums for off, size in zip(offsets, sizes) if off >= 0] +
                                         [off + size - sums for off, size in zip(*cpp.save_plan()) if off >= 0] + [0])


CMSIS_NN_DIR = os.environ.get("KP_CMSIS_NN_DIR", "")
BUILDS = ["portable", pytest.param("cmsis_nn", marks=pytest.mark.skipif(
    not CMSIS_NN_DIR, reason="set KP_CMSIS_NN_DIR to a CMSIS-NN checkout to test the -DCMSIS_NN build"))]


@pytest.fixture(scope="module", params=BUILDS)
def build(request, tmp_path_factory):
    """(kernel, build dir, make args): one build directory per kernel, objects compiled once."""
    # The portable build says so explicitly: an exported CMSIS_NN_DIR (/work/tflm/env.sh) would reach make.
    args = [f"CMSIS_NN_DIR={os.path.abspath(CMSIS_NN_DIR)}" if request.param == "cmsis_nn" else "CMSIS_NN_DIR="]
    return request.param, str(tmp_path_factory.mktemp(f"mean_fw_{request.param}")), args


@pytest.mark.skipif(bool(toolchain_problem()), reason=f"Cortex-M firmware: {toolchain_problem()}")
@settings(max_examples=N_FIRMWARE, **_SETTINGS)
@given(stage=mean_stages(max_layers=4, max_size=16, max_channels=8), seed=st.integers(0, 2**32 - 1))
def test_mean_stage_on_cortex_m4(build, stage, seed):
    kernel, build_dir, args = build
    opts, op_inputs, prefix = stage
    note(repr(opts))
    x = np.random.default_rng(seed).integers(-128, 128, (1, *opts.input_shape)).astype(np.int8)
    want = _want(opts, prefix, op_inputs, x)
    header = stage_vectors_header_from_options(opts, op_inputs, x, "stage ending with a MEAN")
    assert f"kExpected[] = {{\n    {', '.join(str(int(v)) for v in want.reshape(-1))}" in header
    result = run_stage_firmware(header, build_dir, make_args=args)
    assert result.ok, result.output[-3000:]
    assert result.fields["mismatches"] == "0"
    assert result.fields["cmsis_nn"] == str(int(kernel == "cmsis_nn"))
    assert int(result.fields["output"]) == opts.output_shape[2]
    assert int(result.fields["arena"]) == cpp_executor.CppStage(o.encode_options(opts), op_inputs).arena_bytes
