"""The portable C++ core as Cortex-M4F firmware in QEMU (mps2-an386), against Python's golden vectors.

`.ci/run` installs gcc-arm-none-eabi, libnewlib-arm-none-eabi,
libstdc++-arm-none-eabi-newlib and qemu-system-arm; where they are missing,
or cannot compile and link a C++ program (`firmware.toolchain_problem`),
these tests are skipped with the reason.
"""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import numpy as np
import pytest

import keras_patch
from keras_patch.runtime.firmware import run_stage_firmware, stage_vectors_header, toolchain_problem
from keras_patch.runtime.host import run_tflite
from keras_patch.graph.tflite_model import TFLiteModel

pytestmark = pytest.mark.skipif(bool(toolchain_problem()), reason=f"Cortex-M firmware: {toolchain_problem()}")


def _stage_output_by_litert(original: bytes, split: int, x: np.ndarray) -> np.ndarray:
    m = TFLiteModel.from_bytes(original)
    m.subgraph.outputs = np.array(m.outputs + [m.op_outputs(split)[0]], np.int32)
    m.model.signatureDefs = []
    return run_tflite(m.to_bytes(), x)[-1]


@pytest.mark.parametrize("grid", [(3, 3), (1, 1), (4, 5)])
def test_residual_stage_on_cortex_m4(residual, grid, tmp_path):
    m = TFLiteModel.from_bytes(residual)
    split = [i for i in range(m.num_ops) if m.op_type(i) == "ADD"][1]
    patched = keras_patch.patchify(residual, split, grid, arena=False)
    x = np.random.default_rng(1).integers(-128, 128, (1, 48, 48, 3), dtype=np.int8)
    header = stage_vectors_header(patched, x)
    # The golden output is the unpatched model's own stage output (LiteRT reference kernels).
    want = _stage_output_by_litert(residual, split, x).reshape(-1)
    assert f"kExpected[] = {{\n    {', '.join(str(int(v)) for v in want[:24])}" in header
    result = run_stage_firmware(header, str(tmp_path))
    assert result.ok, result.output[-2000:]
    assert result.fields["mismatches"] == "0"
    assert result.fields["cmsis_nn"] == "0" and result.fields["context"] == "0"  # portable build
    assert int(result.fields["output"]) == want.size
    assert result.instructions > 0


def test_mobilenet_v2_stage_on_cortex_m4(mbv2_144, tmp_path):
    """MobileNetV2 0.35@144 up to block_2_add, 4x4 patches, and the same layers layer by layer."""
    m = TFLiteModel.from_bytes(mbv2_144)
    split = next(i for i in range(m.num_ops) if "block_2_add" in m.tensor(m.op_outputs(i)[0]).name)
    patched = keras_patch.patchify(mbv2_144, split, (4, 4), arena=False)
    x = np.random.default_rng(2).integers(-128, 128, (1, 144, 144, 3), dtype=np.int8)
    patch = run_stage_firmware(stage_vectors_header(patched, x), str(tmp_path / "patch"))
    whole = run_stage_firmware(stage_vectors_header(patched, x, grid=(1, 1)), str(tmp_path / "whole"))
    assert patch.ok, patch.output[-2000:]
    assert whole.ok, whole.output[-2000:]
    # The patch arena the firmware's core planned is the profile's prediction.
    (stage,) = keras_patch.profile(patched).stages
    assert int(patch.fields["arena"]) == stage.patch_arena_bytes
    assert int(whole.fields["arena"]) > 4 * int(patch.fields["arena"])
    # Recomputed halos cost instructions, in proportion to the MAC overhead (loosely).
    assert whole.instructions < patch.instructions < 3 * stage.mac_overhead * whole.instructions


def test_bad_options_are_an_error_not_a_crash(residual, tmp_path):
    m = TFLiteModel.from_bytes(residual)
    patched = keras_patch.patchify(residual, [i for i in range(m.num_ops) if m.op_type(i) == "ADD"][0], (2, 2), arena=False)
    x = np.zeros((1, 48, 48, 3), np.int8)
    header = stage_vectors_header(patched, x)
    start = header.index("kOptions[] = {") + len("kOptions[] = {")
    end = header.index("};", start)
    options = [int(v) for v in header[start:end].replace("\n", "").split(",")]
    truncated = header[:start] + "\n    " + ", ".join(map(str, options[: len(options) // 2])) + header[end:]
    result = run_stage_firmware(truncated, str(tmp_path))
    assert result.returncode == 2 and result.status == "error", result.output[-2000:]
    assert "where=persistent_bytes" in result.output

