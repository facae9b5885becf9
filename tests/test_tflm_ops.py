"""The C++ kernel's own test targets: `make -C tflm_ops test|sanitize|fuzz`.

Each test builds into a temporary directory.  They skip (with the reason)
when the tool they need is missing: make and a C++ compiler for `test`,
a compiler with ASan/UBSan runtimes for `sanitize`, clang with libFuzzer for
`fuzz` (Debian: apt-get install clang libclang-rt-14-dev).
"""

import os
import re
import shutil
import subprocess
import sys

import pytest

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
TFLM_OPS = os.path.join(ROOT, "tflm_ops")
CXX = os.environ.get("CXX", "g++")
CLANGXX = os.environ.get("CLANGXX", "clang++")
FUZZ_SECONDS = int(os.environ.get("KP_FUZZ_SECONDS", "30"))


def _compiles(compiler: str, flags: list, tmp_path) -> bool:
    if shutil.which(compiler) is None:
        return False
    src = tmp_path / "probe.cc"
    src.write_text("extern \"C\" int LLVMFuzzerTestOneInput(const unsigned char*, unsigned long)"
                   " { return 0; }\n" if "-fsanitize=fuzzer" in " ".join(flags)
                   else "int main() { return 0; }\n")
    result = subprocess.run([compiler, *flags, str(src), "-o", str(tmp_path / "probe")],
                            capture_output=True)
    return result.returncode == 0


def _make(target: str, out_dir, *extra) -> subprocess.CompletedProcess:
    return subprocess.run(["make", "--no-print-directory", "-C", TFLM_OPS, target, f"OUT={out_dir}", *extra],
                          capture_output=True, text=True, timeout=900)


def _summary(result) -> tuple:
    lines = result.stdout.strip().splitlines()
    # The runner's closing line (make echoes nothing after it).
    m = re.fullmatch(r"(\d+) passed, (\d+) failed", lines[-1].strip() if lines else "")
    assert m, result.stdout[-2000:] + result.stderr[-2000:]
    return int(m.group(1)), int(m.group(2))


def _need_make():
    if shutil.which("make") is None:
        pytest.skip("make is not installed")


def test_cpp_unit_tests(tmp_path):
    _need_make()
    if not _compiles(CXX, ["-std=c++11"], tmp_path):
        pytest.skip(f"no working C++ compiler ({CXX})")
    result = _make("test", tmp_path / "out", f"CXX={CXX}")
    passed, failed = _summary(result)
    assert result.returncode == 0 and failed == 0, result.stdout[-3000:]
    assert passed >= 12


def test_cpp_unit_tests_under_sanitizers(tmp_path):
    _need_make()
    flags = ["-fsanitize=address,undefined", "-fno-sanitize-recover=all"]
    if not _compiles(CXX, flags, tmp_path):
        pytest.skip(f"{CXX} cannot build with -fsanitize=address,undefined (runtime libraries missing)")
    result = _make("sanitize", tmp_path / "out", f"CXX={CXX}")
    passed, failed = _summary(result)
    assert result.returncode == 0 and failed == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert passed >= 12


def test_fuzz_options(tmp_path):
    _need_make()
    if not _compiles(CLANGXX, ["-fsanitize=fuzzer,address,undefined"], tmp_path):
        pytest.skip(f"{CLANGXX} with libFuzzer is not available "
                    "(Debian: apt-get install clang libclang-rt-14-dev)")
    if not _compiles(CXX, ["-std=c++11"], tmp_path):
        pytest.skip(f"no working C++ compiler ({CXX}) for the seed writer")
    result = _make("fuzz", tmp_path / "out", f"FUZZ_SECONDS={FUZZ_SECONDS}", f"CXX={CXX}",
                   f"CLANGXX={CLANGXX}")
    log = result.stdout + result.stderr
    assert result.returncode == 0, log[-4000:]
    runs = re.search(r"Done (\d+) runs", log)
    stats = re.search(r"kp_fuzz: parsed (\d+), validated (\d+), prepared (\d+), evaluated (\d+)", log)
    assert runs and stats, log[-4000:]
    assert int(runs.group(1)) > 1000
    assert int(stats.group(4)) > 0, "no fuzz input reached Eval"


def test_golden_header_is_up_to_date():
    sys.path.insert(0, os.path.join(TFLM_OPS, "tests"))
    try:
        import make_golden
    finally:
        sys.path.pop(0)
    committed = open(os.path.join(TFLM_OPS, "tests", "golden_stage.h"), encoding="utf-8").read()
    assert committed == make_golden.render(), "run: PYTHONPATH=. python3 tflm_ops/tests/make_golden.py"


def test_fuzz_seeds_are_valid_options():
    from keras_patch.patch_op import options as o

    seeds = sorted(os.listdir(os.path.join(TFLM_OPS, "fuzz", "seeds")))
    assert len(seeds) >= 20
    for name in seeds:
        data = open(os.path.join(TFLM_OPS, "fuzz", "seeds", name), "rb").read()
        assert data[-8:] == bytes(8)
        o.decode_options(data[:-8])


# ------------------------------------------- TFLM adapter, end to end on the host


def _stage_only_model(patched: bytes):
    """The patched model cut to its KP_PATCH_STAGE op: (model bytes, options, constants)."""
    import numpy as np

    from keras_patch.patch_op.options import CUSTOM_CODE
    from keras_patch.patchify import stage_constants, stage_options
    from keras_patch.tflite_model import TFLiteModel

    m = TFLiteModel.from_bytes(patched)
    i = [k for k in range(m.num_ops) if m.op_type(k) == CUSTOM_CODE][0]
    sub = TFLiteModel.from_bytes(patched)
    sub.subgraph.operators = [sub.subgraph.operators[i]]
    sub.subgraph.inputs = np.array([m.op_inputs(i)[0]], np.int32)
    sub.subgraph.outputs = np.array([m.op_outputs(i)[0]], np.int32)
    sub.model.signatureDefs = []
    sub.remove_unused()
    return sub.to_bytes(), stage_options(m, i), stage_constants(m, i)


def _tflm_runner(tmp_path) -> str:
    """A built tests/tflm_runner.cc: $KP_TFLM_RUNNER, or built from $KP_TFLM_DIR + $KP_TFLM_LIB."""
    runner = os.environ.get("KP_TFLM_RUNNER")
    if runner:
        return runner
    tflm_dir, tflm_lib = os.environ.get("KP_TFLM_DIR"), os.environ.get("KP_TFLM_LIB")
    if not (tflm_dir and tflm_lib):
        pytest.skip("TFLM is not on any registry: set KP_TFLM_DIR to a tflite-micro checkout (with "
                    "third-party headers, or KP_TFLM_INCLUDES) and KP_TFLM_LIB to a TFLM library built "
                    "from it, or KP_TFLM_RUNNER to a built `make -C tflm_ops tflm-runner`")
    _need_make()
    extra = [f"TFLM_DIR={tflm_dir}", f"TFLM_LIB={tflm_lib}", f"CXX={CXX}"]
    if os.environ.get("KP_TFLM_INCLUDES"):
        extra.append(f"TFLM_INCLUDES={os.environ['KP_TFLM_INCLUDES']}")
    result = _make("tflm-runner", tmp_path / "out", *extra)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return str(tmp_path / "out" / "tflm_runner")


def test_tflm_adapter_end_to_end(tmp_path):
    """Patched stages in TFLM's MicroInterpreter (adapter + core) == the reference executor."""
    import contextlib
    import io

    import numpy as np

    from keras_patch.patch_op.executor import prepare_stage, run_stage
    from keras_patch.patchify import patchify
    from keras_patch.tflite_model import TFLiteModel

    try:
        from tests import strategies as kps
        from tests.model_zoo import to_int8_tflite
        from tests.test_bit_exact import stage_exit_op
    except ImportError:
        import strategies as kps
        from model_zoo import to_int8_tflite
        from test_bit_exact import stage_exit_op

    runner = _tflm_runner(tmp_path)
    cases = [
        (kps.StageSpec((5, 5, 8), (kps.InvertedResidual(None, (7, 7), True, None),), 1233), (2, 2)),
        (kps.StageSpec((17, 13, 3), (kps.Conv(6, (3, 3), (2, 2), "same", act="relu6"),
                                     kps.Pool("max", (3, 3), (1, 1), "same"), kps.Pad(((1, 2), (0, 1))),
                                     kps.DWConv((3, 3), (1, 1), "valid", depth_multiplier=2, act="relu")), 7),
         (3, 2)),
        (kps.StageSpec((12, 12, 4), (kps.TwoBranchAdd(4, 2, kps.Branch("avgpool", (3, 3)),
                                                      kps.Branch("dwpw", (3, 3), "relu"), "relu6"),
                                     kps.Relu("relu6", "act_layer")), 3), (2, 3)),
        (kps.StageSpec((9, 11, 2), (kps.Conv(4, (1, 1), (1, 1), "valid", bn=True, act="relu", act_mode="relu_layer"),
                                    kps.Pool("avg", (2, 2), (2, 1), "valid")), 11), (4, 1)),
    ]
    ops_seen = set()
    for k, (spec, grid) in enumerate(cases):
        with contextlib.redirect_stdout(io.StringIO()):
            original = to_int8_tflite(kps.build_model(spec))
        patched = patchify(original, stage_exit_op(TFLiteModel.from_bytes(original)), grid)
        model, opts, consts = _stage_only_model(patched)
        ops_seen |= {layer.op_name for layer in opts.layers}
        x = np.random.default_rng(k).integers(-128, 128, (3, *opts.input_shape)).astype(np.int8)
        want = run_stage(prepare_stage(opts, consts), x)
        (tmp_path / "m.tflite").write_bytes(model)
        x.tofile(tmp_path / "x.bin")
        result = subprocess.run([runner, str(tmp_path / "m.tflite"), str(tmp_path / "x.bin"),
                                 str(tmp_path / "y.bin")], capture_output=True, text=True, timeout=300)
        assert result.returncode == 0, result.stdout + result.stderr
        got = np.fromfile(tmp_path / "y.bin", np.int8).reshape(want.shape)
        np.testing.assert_array_equal(got, want, err_msg=f"case {k}: TFLM adapter vs reference")
    assert {"CONV_2D", "DEPTHWISE_CONV_2D", "ADD", "MAX_POOL_2D", "AVERAGE_POOL_2D", "PAD"} <= ops_seen


def _live_mobilenet_v2(size: int, alpha: float, classes: int):
    """build_demo_model with random BatchNorm statistics and a rescaled head:
    with Keras' default BN init the random-weight activations vanish and every
    logit quantizes to the same value, which would make "bit-exact" vacuous."""
    import keras
    import numpy as np

    from keras_patch.demo import build_demo_model

    model = build_demo_model(input_size=size, alpha=alpha, num_classes=classes)
    rng = np.random.default_rng(1)
    for layer in model.layers:
        if isinstance(layer, keras.layers.BatchNormalization):
            shape = layer.get_weights()[0].shape
            layer.set_weights([rng.uniform(0.5, 1.5, shape), rng.uniform(0.0, 0.5, shape),
                               rng.uniform(-0.1, 0.1, shape), rng.uniform(0.05, 0.2, shape)])
    head = model.layers[-1]
    w, b = head.get_weights()
    features = keras.Model(model.input, head.input)(rng.uniform(-1, 1, (4, size, size, 3)).astype(np.float32))
    head.set_weights([w * (4.0 / max(float(np.abs(np.asarray(features) @ w).max()), 1e-12)), b])
    return model


def _run_tflm(runner: str, model: bytes, x, tmp_path) -> tuple:
    """(outputs, {'arena_head_bytes': .., 'arena_tail_bytes': .., 'arena_used_bytes': ..})."""
    import numpy as np

    (tmp_path / "m.tflite").write_bytes(model)
    np.ascontiguousarray(x).tofile(tmp_path / "x.bin")
    result = subprocess.run([runner, str(tmp_path / "m.tflite"), str(tmp_path / "x.bin"),
                             str(tmp_path / "y.bin")], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    arena = {k: int(v) for k, v in re.findall(r"^(arena_\w+_bytes) (\d+)$", result.stdout, re.M)}
    assert set(arena) == {"arena_head_bytes", "arena_tail_bytes", "arena_used_bytes"}, result.stdout
    return np.fromfile(tmp_path / "y.bin", np.int8), arena


def test_tflm_patched_mobilenet_v2(tmp_path):
    """A whole patched MobileNetV2 in TFLM's MicroInterpreter (builtin kernels + KP_PATCH_STAGE):
    outputs == the unpatched model in LiteRT and in TFLM, bit for bit, and the arena head TFLM
    allocates == keras_patch.profile's prediction, byte for byte (patched and unpatched)."""
    import contextlib
    import io

    import numpy as np

    from keras_patch.export import convert_int8
    from keras_patch.patchify import patchify
    from keras_patch.profiler import profile
    from keras_patch.runtime import run_tflite
    from keras_patch.schedule import candidate_splits, short_tensor_name
    from keras_patch.tflite_model import TFLiteModel

    runner = _tflm_runner(tmp_path)
    size = 96
    with contextlib.redirect_stdout(io.StringIO()):
        model = _live_mobilenet_v2(size, 0.35, 10)
        calibration = np.random.default_rng(0).uniform(-1, 1, (4, size, size, 3)).astype(np.float32)
        unpatched = convert_int8(model, calibration)
    m = TFLiteModel.from_bytes(unpatched)
    split_at = {short_tensor_name(m.tensor(m.op_outputs(i)[0]).name): i for i in candidate_splits(unpatched)}
    x = np.random.default_rng(7).integers(-128, 128, (3, size, size, 3), dtype=np.int8)
    want = np.asarray(run_tflite(unpatched, x)[0], np.int8).reshape(-1)
    assert len(np.unique(want)) > 5, "degenerate logits: the comparison would prove nothing"

    got, arena = _run_tflm(runner, unpatched, x, tmp_path)
    np.testing.assert_array_equal(got, want, err_msg="unpatched: TFLM vs LiteRT")
    assert arena["arena_head_bytes"] == profile(unpatched).summary["layer_by_layer_peak_bytes"]
    unpatched_head = arena["arena_head_bytes"]
    for split, grid in (("block_2_add", (4, 4)), ("block_5_add", (3, 3))):
        patched = patchify(unpatched, split_at[split], grid)
        got, arena = _run_tflm(runner, patched, x, tmp_path)
        np.testing.assert_array_equal(got, want, err_msg=f"{split} {grid}: patched TFLM vs unpatched LiteRT")
        predicted = profile(patched).summary["patched_peak_bytes"]
        assert arena["arena_head_bytes"] == predicted, (split, grid, arena, predicted)
        assert arena["arena_head_bytes"] < unpatched_head
