"""One definition of a KP_PATCH_STAGE's scratch buffers (docs/patch_stage_op.md "Scratch buffers").

`keras_patch.stage.geometry.stage_buffers(options, kernel)` and the C++
`KpStageBuffers` (tflm_ops/patch_geometry.h, what the TFLM kernel's Prepare
requests, exposed as `kp_stage_buffers` / `CppStage.stage_buffers`) give the
same list, in request order, over random stages: every op, in-place stages,
stages ending with a MEAN (options version 3).

* host (the Python extension, a portable build): the C++ list equals
  `stage_buffers(opts, "portable")`; asked for a CMSIS-NN build's list it has
  no context buffer (the host core computes no context) and
  `stage_buffers(opts, "cmsis_nn")` is the portable list plus the context
  `geometry.kernel_context_bytes(opts, "cmsis_nn")` when that is > 0;
* Cortex-M4F in QEMU (tests/test_firmware.py's firmware, which allocates its
  scratch buffers from `kp_stage_buffers`): the portable build's list equals
  `stage_buffers(opts, "portable")` and, with `KP_CMSIS_NN_DIR`, the
  -DCMSIS_NN build's list equals `stage_buffers(opts, "cmsis_nn")`.
"""

import dataclasses
import os

import pytest
from hypothesis import HealthCheck, event, given, note, settings
from hypothesis import strategies as st

from keras_patch.arena.network import stage_scratch_sizes
from keras_patch.errors import InvalidOptionsError
from keras_patch.runtime import cpp_executor
from keras_patch.runtime.firmware import run_stage_firmware, stage_vectors_header_from_options, toolchain_problem
from keras_patch.stage import geometry
from keras_patch.stage import options as o
from keras_patch.stage.executor import prepare_stage

try:
    from tests.test_cpp_executor import _inputs, stages
    from tests.test_cpp_mean import mean_stages
    from tests.test_in_place import IN_PLACE_OPS, inverted_residual_stage
except ImportError:  # tests/ itself on sys.path
    from test_cpp_executor import _inputs, stages
    from test_cpp_mean import mean_stages
    from test_in_place import IN_PLACE_OPS, inverted_residual_stage

PROFILE = os.environ.get("KP_HYPOTHESIS_PROFILE", "ci")
N_EXAMPLES = {"ci": 200, "dev": 50}.get(PROFILE, 200)
N_FIRMWARE = int(os.environ.get("KP_STAGE_BUFFERS_FIRMWARE_EXAMPLES", "10"))
_SETTINGS = dict(deadline=None, suppress_health_check=list(HealthCheck), derandomize=PROFILE == "ci",
                 database=None)
CMSIS_NN_DIR = os.environ.get("KP_CMSIS_NN_DIR", "")


@st.composite
def any_stage(draw, max_layers=6, max_size=12, max_channels=6):
    """(options, op inputs) of a random stage: plain, ending with a MEAN, or in place."""
    kind = draw(st.sampled_from(["plain", "mean", "in_place", "inverted_residual"]))
    if kind == "mean":
        opts, op_inputs, _ = draw(mean_stages(max_layers=max_layers, max_size=max_size, max_channels=max_channels))
    elif kind == "inverted_residual":
        opts, op_inputs = draw(inverted_residual_stage())
    elif kind == "in_place":
        opts, op_inputs = draw(stages(max_layers=max_layers, max_size=max_size, max_channels=max_channels,
                                      ops=IN_PLACE_OPS, depth_multipliers=(1, 1, 1, 2)))
    else:
        opts, op_inputs = draw(stages(max_layers=max_layers, max_size=max_size, max_channels=max_channels))
    if kind != "plain" and draw(st.booleans()):
        opts = dataclasses.replace(opts, in_place=True)
    return opts, op_inputs


def _names(buffers) -> list:
    return [(b.name, b.bytes) for b in buffers]


def _cpp_stage(opts, op_inputs):
    try:
        return cpp_executor.CppStage(o.encode_options(opts), op_inputs)
    except InvalidOptionsError:  # e.g. in_place on a stage that cannot take it: not this test's subject
        return None


@settings(max_examples=N_EXAMPLES, **_SETTINGS)
@given(stage=any_stage())
def test_python_and_cpp_stage_buffers_agree(stage):
    opts, op_inputs = stage
    note(repr(opts))
    cpp = _cpp_stage(opts, op_inputs)
    if cpp is None:
        with pytest.raises(InvalidOptionsError):
            prepare_stage(opts, op_inputs)
        return
    event(f"ends with MEAN: {opts.ends_with_mean}, in place: {bool(opts.in_place)}")
    portable = geometry.stage_buffers(opts, "portable")
    assert _names(cpp.stage_buffers(cmsis_nn=False)) == _names(portable)
    assert _names(cpp.stage_buffers()) == _names(portable) == _names(cpp.buffers)  # the host build
    # The request order and the "> 0" rule, written out once more.
    arena = geometry.plan_patch_arena(opts).total_bytes
    context = geometry.kernel_context_bytes(opts, "cmsis_nn")
    want_cmsis = [(n, b) for n, b in ((geometry.PATCH_ARENA, arena), (geometry.CMSIS_NN_CONTEXT, context)) if b > 0]
    assert _names(geometry.stage_buffers(opts, "cmsis_nn")) == want_cmsis
    assert tuple(b for _, b in want_cmsis) == stage_scratch_sizes(opts, "cmsis_nn")
    if not cpp_executor.cmsis_nn_enabled():
        # The host core computes no CMSIS-NN context: a CMSIS-NN build's list is the portable one
        # (the -DCMSIS_NN core's list is compared on the Cortex-M4 below).
        assert cpp.context_bytes == 0
        assert _names(cpp.stage_buffers(cmsis_nn=True)) == _names(portable)
    else:  # pragma: no cover - a host core built with -DCMSIS_NN
        assert _names(cpp.stage_buffers(cmsis_nn=True)) == want_cmsis


def test_stage_buffer_names_follow_the_spec():
    text = open(os.path.join(os.path.dirname(__file__), "..", "docs", "patch_stage_op.md")).read()
    section = text.split("## Scratch buffers", 1)[1].split("\n## ", 1)[0]
    for i, name in enumerate(geometry.STAGE_BUFFER_NAMES):
        assert f"| {i} | {name} |" in section
    assert "stage_buffers" in section and "KpStageBuffers" in section
    with pytest.raises(ValueError, match="kernel"):
        geometry.stage_buffers(None, "helium")


BUILDS = ["portable", pytest.param("cmsis_nn", marks=pytest.mark.skipif(
    not CMSIS_NN_DIR, reason="set KP_CMSIS_NN_DIR to a CMSIS-NN checkout to test the -DCMSIS_NN build"))]


@pytest.fixture(scope="module", params=BUILDS)
def build(request, tmp_path_factory):
    """(kernel, build dir, make args): one build directory per kernel, objects compiled once."""
    args = [f"CMSIS_NN_DIR={os.path.abspath(CMSIS_NN_DIR)}" if request.param == "cmsis_nn" else "CMSIS_NN_DIR="]
    return request.param, str(tmp_path_factory.mktemp(f"buffers_fw_{request.param}")), args


def _firmware_buffers(field: str) -> list:
    if field == "-":
        return []
    return [(geometry.STAGE_BUFFER_NAMES[int(kind)], int(size))
            for kind, size in (entry.split(":") for entry in field.split(","))]


@pytest.mark.skipif(bool(toolchain_problem()), reason=f"Cortex-M firmware: {toolchain_problem()}")
@settings(max_examples=N_FIRMWARE, **_SETTINGS)
@given(stage=any_stage(max_layers=4, max_size=14, max_channels=8), seed=st.integers(0, 2**32 - 1))
def test_firmware_stage_buffers_equal_python(build, stage, seed):
    kernel, build_dir, args = build
    opts, op_inputs = stage
    if _cpp_stage(opts, op_inputs) is None:
        return
    note(repr(opts))
    x = _inputs(opts, seed, n=1)
    header = stage_vectors_header_from_options(opts, op_inputs, x, "stage_buffers")
    result = run_stage_firmware(header, build_dir, make_args=args)
    assert result.ok, result.output[-3000:]
    assert result.fields["mismatches"] == "0"
    assert result.fields["cmsis_nn"] == str(int(kernel == "cmsis_nn"))
    assert _firmware_buffers(result.fields["buffers"]) == _names(geometry.stage_buffers(opts, kernel))


def test_firmware_buffers_field_parses():
    assert _firmware_buffers("-") == []
    assert _firmware_buffers("0:1536,1:112") == [("patch arena", 1536), ("CMSIS-NN context", 112)]
    assert _firmware_buffers("1:8") == [("CMSIS-NN context", 8)]
