"""keras_patch.run_tflite: argument checks and models the reference kernels cannot run."""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import numpy as np
import pytest

from keras_patch.errors import UnsupportedModelError
from keras_patch.runtime import run_tflite
from keras_patch.tflite_model import TFLiteModel


def test_collapsed_add_is_an_error_not_an_abort(residual):
    """TFLite's/TFLM's reference ADD aborts the process on such a model; we say why instead."""
    m = TFLiteModel.from_bytes(residual)
    add = next(i for i in range(m.num_ops) if m.op_type(i) == "ADD")
    out = m.subgraph.tensors[m.op_outputs(add)[0]]
    out.quantization.scale = np.array([1e-12], np.float32)
    with pytest.raises(UnsupportedModelError, match=rf"op {add} \(ADD -> .*output scale 1e-12.*must be < 1"):
        run_tflite(m.to_bytes(), np.zeros((1, 48, 48, 3), np.int8))


def test_input_checks_name_the_input(residual):
    with pytest.raises(ValueError, match="must be int8"):
        run_tflite(residual, np.zeros((1, 48, 48, 3), np.float32))
    with pytest.raises(ValueError, match=r"shape \(N, \*\(48, 48, 3\)\)"):
        run_tflite(residual, np.zeros((1, 40, 48, 3), np.int8))
    with pytest.raises(ValueError, match="1 inputs, got 2"):
        run_tflite(residual, [np.zeros((1, 48, 48, 3), np.int8)] * 2)


def test_batch_runs_sample_by_sample(residual):
    x = np.random.default_rng(0).integers(-128, 128, (3, 48, 48, 3), dtype=np.int8)
    batched = run_tflite(residual, x)[0]
    single = np.concatenate([run_tflite(residual, x[i:i + 1])[0] for i in range(3)])
    np.testing.assert_array_equal(batched, single)
