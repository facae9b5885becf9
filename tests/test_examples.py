"""The examples/ scripts, run with tiny settings."""

import importlib.util
import os

EXAMPLES = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples")


def _load(name):
    spec = importlib.util.spec_from_file_location(name, os.path.join(EXAMPLES, f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_vww_patch_smoke(tmp_path):
    vww = _load("vww_patch")
    result = vww.main(["--out-dir", str(tmp_path), "--samples", "200", "--epochs", "1", "--grid", "3"])
    assert result["bit_exact"]
    assert result["distinct_logits"] > 1  # the compared logits are not all the same
    assert result["stock_tflm_head_bytes"] > 0
    assert os.path.isdir(result["sketch_dir"])
    assert os.path.isfile(result["ino_path"])
    assert os.path.isfile(os.path.join(result["sketch_dir"], "model_data.cc"))


def test_vww_dataset_is_seeded():
    vww = _load("vww_patch")
    a, la = vww.make_dataset(6, seed=1)
    b, lb = vww.make_dataset(6, seed=1)
    assert a.shape == (6, 96, 96, 1) and a.dtype.name == "float32"
    assert (a == b).all() and (la == lb).all() and set(la) == {0, 1}
