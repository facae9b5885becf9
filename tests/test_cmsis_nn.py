"""The core's CMSIS-NN fast path (-DCMSIS_NN) on a Cortex-M4F in QEMU: bit-exact with the reference.

CMSIS-NN is not on any package registry and keras-patch does not ship it:
point `KP_CMSIS_NN_DIR` at a CMSIS-NN checkout (e.g. the commit TFLM pins)
to run these tests; without it they are skipped. They also need the
firmware toolchain (gcc-arm-none-eabi, libnewlib-arm-none-eabi, libstdc++-arm-none-eabi-newlib,
qemu-system-arm).

* random stages (the `stages()` strategy of test_cpp_executor: every op,
  dilation, depth multipliers, asymmetric border padding, grids that do not
  divide the output, hulls of several consumers), random converted Keras
  stages (tests/strategies.py, random grids) and real stages
  (MobileNetV2 0.35@144 to block_2_add, the residual model) run through the
  firmware built with `CMSIS_NN_DIR`; each output is compared byte for byte
  with the Python reference executor;
* the CMSIS-NN context buffer the firmware's core requests equals
  `geometry.kernel_context_bytes(opts, "cmsis_nn")` (what
  `keras_patch.profile(..., kernel="cmsis_nn")` predicts), and its list of
  scratch buffers (`kp_stage_buffers`) `geometry.stage_buffers(opts, "cmsis_nn")`;
* the CMSIS-NN build really takes the fast path (far fewer instructions than
  the portable build on the same stage).

`KP_CMSIS_NN_EXAMPLES` / `KP_CMSIS_NN_MODEL_EXAMPLES` set the numbers of
random option-level stages (default 150) and random Keras stages (default 40).
"""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import numpy as np
import pytest
from hypothesis import HealthCheck, assume, given, note, settings
from hypothesis import strategies as st

import keras_patch
from keras_patch.errors import KerasPatchError
from keras_patch.runtime.firmware import (
    run_stage_firmware,
    stage_vectors_header,
    stage_vectors_header_from_options,
    toolchain_problem,
)
from keras_patch.stage import geometry
from keras_patch.graph.patchify import find_stages, stage_options
from keras_patch.graph.tflite_model import TFLiteModel

try:
    from tests import strategies as kps
    from tests.test_bit_exact import convert, stage_exit_op
    from tests.test_cpp_executor import _inputs, stages
except ImportError:  # tests/ itself on sys.path
    import strategies as kps
    from test_bit_exact import convert, stage_exit_op
    from test_cpp_executor import _inputs, stages

CMSIS_NN_DIR = os.environ.get("KP_CMSIS_NN_DIR", "")
N_EXAMPLES = int(os.environ.get("KP_CMSIS_NN_EXAMPLES", "150"))
N_MODEL_EXAMPLES = int(os.environ.get("KP_CMSIS_NN_MODEL_EXAMPLES", "40"))

pytestmark = [
    pytest.mark.skipif(not CMSIS_NN_DIR, reason="set KP_CMSIS_NN_DIR to a CMSIS-NN checkout "
                       "(github.com/ARM-software/CMSIS-NN; not shipped with keras-patch) to test the -DCMSIS_NN build"),
    pytest.mark.skipif(bool(toolchain_problem()), reason=f"Cortex-M firmware: {toolchain_problem()}"),
]

COUNTS = {"random": 0, "real": 0, "column_tiles": 0, "model": 0, "model_patches": 0}


def _make_args():
    if not os.path.isfile(os.path.join(CMSIS_NN_DIR, "Include", "arm_nnfunctions.h")):
        pytest.fail(f"KP_CMSIS_NN_DIR={CMSIS_NN_DIR!r} has no Include/arm_nnfunctions.h", pytrace=False)
    return [f"CMSIS_NN_DIR={os.path.abspath(CMSIS_NN_DIR)}"]


@pytest.fixture(scope="module")
def build_dir(tmp_path_factory):
    """One build directory for the module: CMSIS-NN's objects are compiled once."""
    path = tmp_path_factory.mktemp("cmsis_fw")
    yield str(path)
    print(f"\n[test_cmsis_nn] bit-exact on Cortex-M4 with CMSIS-NN: {COUNTS['random']} random stages "
          f"({COUNTS['column_tiles']} with column tiles), {COUNTS['model']} random Keras stages "
          f"({COUNTS['model_patches']} patches), {COUNTS['real']} real stage runs")


def _check(result, opts):
    assert result.ok, result.output[-3000:]
    assert result.fields["mismatches"] == "0"
    assert result.fields["cmsis_nn"] == "1"
    assert int(result.fields["arena"]) == geometry.plan_patch_arena(opts).total_bytes
    assert int(result.fields["context"]) == geometry.kernel_context_bytes(opts, "cmsis_nn")
    # The scratch buffers the core lists for Prepare (kp_stage_buffers) are geometry.stage_buffers'.
    assert result.fields["buffers"] == (",".join(
        f"{geometry.STAGE_BUFFER_NAMES.index(b.name)}:{b.bytes}" for b in geometry.stage_buffers(opts, "cmsis_nn"))
        or "-")


def _is_valid(opts, op_inputs):
    from keras_patch.errors import InvalidOptionsError
    from keras_patch.stage.executor import prepare_stage

    try:
        prepare_stage(opts, op_inputs)
    except InvalidOptionsError:
        return False
    return True


@settings(max_examples=N_EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck),
          derandomize=True, database=None)
@given(stage=stages(max_layers=6, max_size=16, max_channels=8), seed=st.integers(0, 2**32 - 1))
def test_random_stages_bit_exact(build_dir, stage, seed):
    opts, op_inputs = stage
    assume(_is_valid(opts, op_inputs))
    note(repr(opts))
    x = _inputs(opts, seed, n=1)
    try:
        header = stage_vectors_header_from_options(opts, op_inputs, x, "random stage")
    except KerasPatchError:  # pragma: no cover - the reference rejects the options
        assume(False)
    result = run_stage_firmware(header, build_dir, make_args=_make_args())
    _check(result, opts)
    COUNTS["random"] += 1
    COUNTS["column_tiles"] += opts.grid[1] > 1


@settings(max_examples=N_MODEL_EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck),
          derandomize=True, database=None)
@given(spec=kps.stage_specs(max_size=32), data=st.data())
def test_random_keras_stages_bit_exact(build_dir, spec, data):
    """Random converted Keras stages (inverted residuals, two-branch adds, pads, pools), random grids."""
    original = convert(kps.build_model(spec))
    m = TFLiteModel.from_bytes(original)
    split = stage_exit_op(m)
    grid = data.draw(kps.grids(m.tensor(m.op_outputs(split)[0]).shape[1:3]), label="grid")
    patched = keras_patch.patchify(original, split, grid, arena=False)
    x = data.draw(kps.int8_inputs(spec.input_shape, n_random=0), label="x").array()
    result = run_stage_firmware(stage_vectors_header(patched, x), build_dir, make_args=_make_args())
    _check(result, _first_stage_options(patched))
    COUNTS["model"] += 1
    COUNTS["model_patches"] += grid[0] * grid[1]


def _first_stage_options(patched, grid=None):
    m = TFLiteModel.from_bytes(patched)
    opts = stage_options(m, find_stages(m)[0])
    if grid is not None:
        import dataclasses

        opts = dataclasses.replace(opts, grid=grid)
    return opts


@pytest.mark.parametrize("grid", [(3, 3), (1, 1), (4, 5), (6, 1), (1, 6)])
@pytest.mark.parametrize("which_add", [0, 1])
def test_residual_stages_bit_exact(residual, build_dir, grid, which_add):
    m = TFLiteModel.from_bytes(residual)
    split = [i for i in range(m.num_ops) if m.op_type(i) == "ADD"][which_add]
    patched = keras_patch.patchify(residual, split, grid, arena=False)
    for seed in (1, 2):
        x = np.random.default_rng(seed).integers(-128, 128, (1, 48, 48, 3), dtype=np.int8)
        result = run_stage_firmware(stage_vectors_header(patched, x), build_dir, make_args=_make_args())
        _check(result, _first_stage_options(patched))
        COUNTS["real"] += 1


def test_mobilenet_v2_stage_bit_exact_and_fast(mbv2_144, build_dir, tmp_path):
    """MobileNetV2 0.35@144 to block_2_add, 4x4 patches and layer by layer, CMSIS-NN vs portable."""
    m = TFLiteModel.from_bytes(mbv2_144)
    split = next(i for i in range(m.num_ops) if "block_2_add" in m.tensor(m.op_outputs(i)[0]).name)
    patched = keras_patch.patchify(mbv2_144, split, (4, 4), arena=False)
    x = np.random.default_rng(2).integers(-128, 128, (1, 144, 144, 3), dtype=np.int8)
    runs = {}
    for grid in ((4, 4), (1, 1)):
        header = stage_vectors_header(patched, x, grid=grid)
        runs[grid] = run_stage_firmware(header, build_dir, make_args=_make_args())
        _check(runs[grid], _first_stage_options(patched, grid))
        COUNTS["real"] += 1
    # profile(kernel="cmsis_nn") predicts the context buffer the firmware's core requested.
    (stage,) = keras_patch.profile(patched, kernel="cmsis_nn").stages
    assert stage.context_bytes == int(runs[(4, 4)].fields["context"]) > 0
    (portable_stage,) = keras_patch.profile(patched).stages
    assert portable_stage.context_bytes == 0
    # The fast path is really taken: the portable build of the same stage needs several times the instructions.
    # (CMSIS_NN_DIR= explicitly: an exported CMSIS_NN_DIR, e.g. from /work/tflm/env.sh, would reach make.)
    portable = run_stage_firmware(stage_vectors_header(patched, x), str(tmp_path / "portable"),
                                  make_args=["CMSIS_NN_DIR="])
    assert portable.ok and portable.fields["context"] == "0" and portable.fields["cmsis_nn"] == "0"
    assert runs[(4, 4)].instructions * 2 < portable.instructions
