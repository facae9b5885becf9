"""In-place depthwise stages on an emulated Cortex-M4F (QEMU mps2-an386), portable and CMSIS-NN builds.

* one-layer in-place DEPTHWISE_CONV_2D stages (random strides, kernels,
  dilations, pads, odd sizes) run with input and output in ONE buffer
  (`KP_STAGE_ALIASED`: the output is written over the input, as an offline
  memory plan that aliases them runs it);
* multi-layer stages with `in_place` (MobileNetV2 blocks, random grids)
  whose depthwise layers write over their input inside the patch arena.

Each output is compared byte for byte with the Python reference executor
(the stage without `in_place`), and the patch arena the firmware's core
plans equals `geometry.plan_patch_arena`. The CMSIS-NN build (in-place
layers run the portable code there) needs `KP_CMSIS_NN_DIR`, as
tests/test_cmsis_nn.py does; without it that half is skipped.
"""

import dataclasses
import os

import numpy as np
import pytest
from hypothesis import HealthCheck, given, note, settings
from hypothesis import strategies as st

from keras_patch.runtime.firmware import run_stage_firmware, stage_vectors_header_from_options, toolchain_problem
from keras_patch.stage import geometry
from keras_patch.stage.executor import prepare_stage, run_stage

try:
    from tests.test_in_place import inverted_residual_stage, one_layer_depthwise
except ImportError:  # tests/ itself on sys.path
    from test_in_place import inverted_residual_stage, one_layer_depthwise

pytestmark = pytest.mark.skipif(bool(toolchain_problem()), reason=f"Cortex-M firmware: {toolchain_problem()}")

CMSIS_NN_DIR = os.environ.get("KP_CMSIS_NN_DIR", "")
N_EXAMPLES = int(os.environ.get("KP_IN_PLACE_FIRMWARE_EXAMPLES", "8"))
BUILDS = ["portable", pytest.param("cmsis_nn", marks=pytest.mark.skipif(
    not CMSIS_NN_DIR, reason="set KP_CMSIS_NN_DIR to a CMSIS-NN checkout to test the -DCMSIS_NN build"))]


@pytest.fixture(scope="module", params=BUILDS)
def build(request, tmp_path_factory):
    """(kernel, build dir, make args): one build directory per kernel, objects compiled once."""
    args = [f"CMSIS_NN_DIR={os.path.abspath(CMSIS_NN_DIR)}"] if request.param == "cmsis_nn" else []
    return request.param, str(tmp_path_factory.mktemp(f"in_place_fw_{request.param}")), args


def _run(build, opts, op_inputs, seed, aliased):
    kernel, build_dir, args = build
    x = np.random.default_rng(seed).integers(-128, 128, (1, *opts.input_shape), dtype=np.int8)
    want = run_stage(prepare_stage(dataclasses.replace(opts, in_place=False), op_inputs), x)
    header = stage_vectors_header_from_options(opts, op_inputs, x, "in-place stage", aliased=aliased)
    expected = ", ".join(str(int(v)) for v in want.reshape(-1)[:24])
    assert f"kExpected[] = {{\n    {expected}" in header  # the stage without in_place is the oracle
    result = run_stage_firmware(header, build_dir, make_args=args)
    assert result.ok, result.output[-3000:]
    assert result.fields["mismatches"] == "0"
    assert result.fields["aliased"] == str(int(aliased))
    assert result.fields["cmsis_nn"] == str(int(kernel == "cmsis_nn"))
    assert int(result.fields["arena"]) == geometry.plan_patch_arena(opts).total_bytes
    assert int(result.fields["context"]) == geometry.kernel_context_bytes(opts, kernel)


@settings(max_examples=N_EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck),
          derandomize=True, database=None)
@given(stage=one_layer_depthwise(max_size=13, max_channels=6), seed=st.integers(0, 2**32 - 1))
def test_one_layer_in_place_aliased_on_cortex_m4(build, stage, seed):
    opts, op_inputs = stage
    note(repr(opts))
    _run(build, opts, op_inputs, seed, aliased=True)


@settings(max_examples=N_EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck),
          derandomize=True, database=None)
@given(stage=inverted_residual_stage(), seed=st.integers(0, 2**32 - 1))
def test_multi_layer_in_place_on_cortex_m4(build, stage, seed):
    opts, op_inputs = stage
    note(repr(opts))
    _run(build, opts, op_inputs, seed, aliased=False)
