"""The C++ kernel's own test targets: `make -C tflm_ops test|sanitize|fuzz`.

Each test builds into a temporary directory.  They skip (with the reason)
when the tool they need is missing: make and a C++ compiler for `test`,
a compiler with ASan/UBSan runtimes for `sanitize`, clang with libFuzzer for
`fuzz` (Debian: apt-get install clang libclang-rt-14-dev).
"""

import functools
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


@pytest.mark.slow
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
    from keras_patch.stage import options as o

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

    from keras_patch.stage.options import CUSTOM_CODE
    from keras_patch.graph.patchify import stage_constants, stage_options
    from keras_patch.graph.tflite_model import TFLiteModel

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

    from keras_patch.stage.executor import prepare_stage, run_stage
    from keras_patch.graph.patchify import patchify
    from keras_patch.graph.tflite_model import TFLiteModel

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
        (got,) = _read_runner_outputs(result.stdout, tmp_path / "y.bin")
        got = got.reshape(want.shape)
        np.testing.assert_array_equal(got, want, err_msg=f"case {k}: TFLM adapter vs reference")
    assert {"CONV_2D", "DEPTHWISE_CONV_2D", "ADD", "MAX_POOL_2D", "AVERAGE_POOL_2D", "PAD"} <= ops_seen


def _mean_stage_models():
    """(case, original with the MEAN output added, [(first op, patched with the MEAN output added)], x):
    the head's MEAN as the end of the longest stage that can end there and of the MEAN alone."""
    import contextlib
    import io

    import numpy as np

    from keras_patch.graph.patchify import find_stages, patchify_stages, stage_options
    from keras_patch.graph.rules import patchable_runs
    from keras_patch.graph.tflite_model import TFLiteModel

    try:
        from tests import strategies as kps
        from tests.model_zoo import to_int8_tflite
        from tests.test_bit_exact import with_outputs
    except ImportError:
        import strategies as kps
        from model_zoo import to_int8_tflite
        from test_bit_exact import with_outputs

    cases = [
        (kps.StageSpec((17, 13, 3), (kps.Conv(6, (3, 3), (2, 2), "same", act="relu6"),
                                     kps.Pool("max", (3, 3), (1, 1), "same"), kps.Pad(((1, 2), (0, 1))),
                                     kps.DWConv((3, 3), (1, 1), "valid", depth_multiplier=2, act="relu")), 7),
         (3, 2)),
        (kps.StageSpec((12, 12, 4), (kps.TwoBranchAdd(4, 2, kps.Branch("avgpool", (3, 3)),
                                                      kps.Branch("dwpw", (3, 3), "relu"), "relu6"),
                                     kps.Relu("relu6", "act_layer")), 3), (2, 3)),
    ]
    models = []
    for k, (spec, grid) in enumerate(cases):
        with contextlib.redirect_stdout(io.StringIO()):
            original = to_int8_tflite(kps.build_model(spec))
        m = TFLiteModel.from_bytes(original)
        (mean,) = [i for i in range(m.num_ops) if m.op_type(i) == "MEAN"]
        name = m.tensor(m.op_outputs(mean)[0]).name
        runs = [run for run in patchable_runs(m) if run[1] == mean]
        patched = []
        for first, _, entry, _ in (runs[0], runs[-1]):
            model = patchify_stages(original, [(m.tensor(entry).name, mean, grid)])
            p = TFLiteModel.from_bytes(model)
            (op,) = [i for i in find_stages(p) if p.tensor(p.op_outputs(i)[0]).name == name]
            opts = stage_options(p, op)
            assert opts.version == 3 and opts.layers[-1].op == 40 and opts.num_layers == mean - first + 1
            assert tuple(p.tensor(p.op_outputs(op)[0]).shape) == (1, opts.output_shape[2])  # [1, C]
            patched.append((first, with_outputs(model, [name])))
        x = np.random.default_rng(k).integers(-128, 128, (3, *spec.input_shape)).astype(np.int8)
        models.append((k, with_outputs(original, [name]), patched, x))
    return models


def test_tflm_adapter_stage_ending_with_mean(tmp_path):
    """Stages ending at the head's MEAN (options version 3, output [1, C]) in TFLM's
    MicroInterpreter == the unpatched model in TFLM (TFLM's own MEAN), every output bit for bit:
    the longest stage a MEAN can end and the MEAN alone (reading the op input), tiled grids."""
    import numpy as np

    runner = _tflm_runner(tmp_path)
    for k, original, patched, x in _mean_stage_models():
        want, _ = _run_tflm(runner, original, x, tmp_path)
        assert len({int(v) for v in want[-1].reshape(-1)}) > 2  # the MEAN output is not constant
        for first, model in patched:
            got, _ = _run_tflm(runner, model, x, tmp_path)
            assert len(got) == len(want)
            for w, g in zip(want, got):
                np.testing.assert_array_equal(g, w, err_msg=f"case {k}, stage from op {first}")


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


#: TfLiteTypeGetName's spelling -> numpy dtype (the runner's "output I TYPE DIMS BYTES" lines).
_TFLITE_TYPES = {"FLOAT32": "float32", "FLOAT16": "float16", "FLOAT64": "float64", "INT8": "int8",
                 "UINT8": "uint8", "INT16": "int16", "UINT16": "uint16", "INT32": "int32", "UINT32": "uint32",
                 "INT64": "int64", "UINT64": "uint64", "BOOL": "bool"}


def _read_runner_outputs(stdout: str, path) -> list:
    """The runner's OUTPUT_BIN as one array per model output, shaped (runs, *dims).

    The runner prints `output I TYPE DIMS BYTES` for each output and writes, run
    after run, outputs 0, 1, ... back to back (tests/tflm_runner.cc)."""
    import numpy as np

    specs = []
    for index, kind, dims, nbytes in re.findall(r"^output (\d+) (\w+) ([\dx]*) (\d+)$", stdout, re.M):
        assert int(index) == len(specs), stdout
        dtype = np.dtype(_TFLITE_TYPES[kind])
        shape = tuple(int(d) for d in dims.split("x")) if dims else ()
        assert int(np.prod(shape, dtype=np.int64)) * dtype.itemsize == int(nbytes), (kind, dims, nbytes)
        specs.append((dtype, shape, int(nbytes)))
    assert specs, stdout
    data = open(path, "rb").read()
    run_bytes = sum(n for _, _, n in specs)
    assert len(data) % run_bytes == 0, (len(data), run_bytes)
    runs = len(data) // run_bytes
    outputs, offset = [[] for _ in specs], 0
    for _ in range(runs):
        for k, (dtype, shape, nbytes) in enumerate(specs):
            outputs[k].append(np.frombuffer(data[offset:offset + nbytes], dtype).reshape(shape))
            offset += nbytes
    return [np.stack(o) for o in outputs]


def _run_tflm(runner: str, model: bytes, x, tmp_path) -> tuple:
    """(one array per model output (runs, *dims), {'arena_head_bytes': .., 'arena_tail_bytes': ..,
    'arena_used_bytes': ..}). `x`: the input array (runs first), or a list of them, one per input."""
    import numpy as np

    (tmp_path / "m.tflite").write_bytes(model)
    xs = x if isinstance(x, (list, tuple)) else [x]
    with open(tmp_path / "x.bin", "wb") as f:
        for run in range(len(xs[0])):
            for array in xs:
                f.write(np.ascontiguousarray(array[run]).tobytes())
    result = subprocess.run([runner, str(tmp_path / "m.tflite"), str(tmp_path / "x.bin"),
                             str(tmp_path / "y.bin")], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    arena = {k: int(v) for k, v in re.findall(r"^(arena_\w+_bytes) (\d+)$", result.stdout, re.M)}
    assert set(arena) == {"arena_head_bytes", "arena_tail_bytes", "arena_used_bytes"}, result.stdout
    return _read_runner_outputs(result.stdout, tmp_path / "y.bin"), arena


def test_tflm_patched_mobilenet_v2(tmp_path):
    """A whole patched MobileNetV2 in TFLM's MicroInterpreter (builtin kernels + KP_PATCH_STAGE):
    outputs == the unpatched model in LiteRT and in TFLM, bit for bit, and the arena head TFLM
    allocates == keras_patch.profile's prediction, byte for byte (patched and unpatched)."""
    import contextlib
    import io

    import numpy as np

    from keras_patch.keras.export import convert_int8
    from keras_patch.graph.patchify import patchify
    from keras_patch.arena.profiler import profile
    from keras_patch.runtime.host import run_tflite
    from keras_patch.planner.schedule import candidate_splits, short_tensor_name
    from keras_patch.graph.tflite_model import TFLiteModel

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

    (got,), arena = _run_tflm(runner, unpatched, x, tmp_path)
    np.testing.assert_array_equal(got.reshape(-1), want, err_msg="unpatched: TFLM vs LiteRT")
    assert arena["arena_head_bytes"] == profile(unpatched).layer_by_layer_peak_bytes
    unpatched_head = arena["arena_head_bytes"]
    for split, grid in (("block_2_add", (4, 4)), ("block_5_add", (3, 3))):
        patched = patchify(unpatched, split_at[split], grid)
        (got,), arena = _run_tflm(runner, patched, x, tmp_path)
        np.testing.assert_array_equal(got.reshape(-1), want,
                                      err_msg=f"{split} {grid}: patched TFLM vs unpatched LiteRT")
        predicted = profile(patched).patched_peak_bytes
        assert arena["arena_head_bytes"] == predicted, (split, grid, arena, predicted)
        assert arena["arena_head_bytes"] < unpatched_head


#: Whole-network plans of `_live_mobilenet_v2(96, 0.35, 10)`: two and three stages, some starting in
#: the middle of the network (block_1_project_BN, block_2_add, block_3_project_BN, block_5_add).
SEVERAL_STAGE_PLANS = (
    ((None, "block_2_add", (4, 4)), ("block_2_add", "block_5_add", (2, 2)),
     ("block_5_add", "block_6_project_BN", (2, 1))),
    ((None, "block_1_project_BN", (6, 6)), ("block_1_project_BN", "block_2_add", (2, 2)),
     ("block_2_add", "block_5_add", (2, 2))),
    ((None, "block_1_project_BN", (3, 3)), ("block_3_project_BN", "block_5_add", (3, 2))),
)


@functools.lru_cache(maxsize=1)
def _live_mobilenet_v2_int8(size: int = 96) -> tuple:
    """(int8 .tflite of _live_mobilenet_v2(size, 0.35, 10), two int8 inputs, LiteRT's outputs for them)."""
    import contextlib
    import io

    import numpy as np

    from keras_patch.keras.export import convert_int8
    from keras_patch.runtime.host import run_tflite

    with contextlib.redirect_stdout(io.StringIO()):
        model = _live_mobilenet_v2(size, 0.35, 10)
        calibration = np.random.default_rng(0).uniform(-1, 1, (4, size, size, 3)).astype(np.float32)
        unpatched = convert_int8(model, calibration)
    x = np.random.default_rng(11).integers(-128, 128, (2, size, size, 3), dtype=np.int8)
    want = np.stack([np.asarray(run_tflite(unpatched, x[i:i + 1])[0], np.int8).reshape(-1) for i in range(len(x))])
    assert len(np.unique(want)) > 5, "degenerate logits: the comparison would prove nothing"
    return unpatched, x, want


def _several_stage_models(unpatched: bytes, kernel: str) -> list:
    """(stages, patched .tflite, the planner's predicted head or None) for each of SEVERAL_STAGE_PLANS
    and for the plan keras_patch.plan chooses at MAC overhead <= 1.10 for `kernel`."""
    from keras_patch.graph.patchify import patchify_stages
    from keras_patch.planner.search import plan

    models = [(stages, patchify_stages(unpatched, stages), None) for stages in SEVERAL_STAGE_PLANS]
    chosen = plan(unpatched, max_mac_overhead=1.10, kernel=kernel)
    # With the arena passes (in-place ops, offline plan) one stage may be the lowest head here;
    # SEVERAL_STAGE_PLANS hold the plans of two and three stages.
    assert chosen.stages, chosen.table()
    models.append((chosen.stage_requests(), chosen.apply(unpatched), chosen.peak_bytes))
    return models


def test_tflm_patched_mobilenet_v2_several_stages(tmp_path):
    """Whole-network plans in TFLM's MicroInterpreter: two and three KP_PATCH_STAGE ops, some of
    them starting in the middle of the network, one closing a residual block, and the plan
    keras_patch.plan chooses. Outputs == the unpatched model in TFLM and LiteRT, bit for bit, and
    the arena head TFLM allocates == profile()'s patched_peak_bytes (and the planner's
    peak_bytes), byte for byte."""
    import numpy as np

    from keras_patch.arena.aliases import in_place_stage
    from keras_patch.arena.profiler import profile
    from keras_patch.graph.patchify import find_stages, stage_options
    from keras_patch.graph.tflite_model import TFLiteModel

    runner = _tflm_runner(tmp_path)
    unpatched, x, want = _live_mobilenet_v2_int8()
    (reference,), arena = _run_tflm(runner, unpatched, x, tmp_path)
    np.testing.assert_array_equal(reference.reshape(want.shape), want, err_msg="unpatched: TFLM vs LiteRT")
    assert arena["arena_head_bytes"] == profile(unpatched).layer_by_layer_peak_bytes
    unpatched_head = arena["arena_head_bytes"]
    for stages, patched, planned_head in _several_stage_models(unpatched, "portable"):
        # The arena passes may add one-layer in-place depthwise stages beside the patch stages.
        model = TFLiteModel.from_bytes(patched)
        ops = find_stages(model)
        assert len([i for i in ops if not in_place_stage(stage_options(model, i))]) == len(stages)
        (got,), arena = _run_tflm(runner, patched, x, tmp_path)
        np.testing.assert_array_equal(got.reshape(want.shape), want, err_msg=f"{stages}: patched TFLM vs LiteRT")
        predicted = profile(patched)
        assert predicted.num_stages == len(ops)
        assert arena["arena_head_bytes"] == predicted.patched_peak_bytes, (stages, arena, predicted.patched_peak_bytes)
        assert planned_head is None or arena["arena_head_bytes"] == planned_head, (stages, arena, planned_head)
        assert arena["arena_head_bytes"] < unpatched_head, stages


def _tflm_m4_runner(tmp_path) -> str:
    """A built tests/tflm_runner_m4.cc (Cortex-M4F firmware): $KP_TFLM_M4_RUNNER, or built from
    $KP_TFLM_DIR + $KP_TFLM_M4_LIB (+ $KP_CMSIS_NN_DIR for the CMSIS-NN path)."""
    from keras_patch.runtime.firmware import toolchain_problem

    runner = os.environ.get("KP_TFLM_M4_RUNNER")
    tflm_dir, tflm_lib = os.environ.get("KP_TFLM_DIR"), os.environ.get("KP_TFLM_M4_LIB")
    if not (runner or (tflm_dir and tflm_lib)):
        pytest.skip("TFLM is not on any registry: set KP_TFLM_DIR to a tflite-micro checkout and KP_TFLM_M4_LIB "
                    "to a TFLM library built from it for Cortex-M4 (+ KP_CMSIS_NN_DIR), or KP_TFLM_M4_RUNNER "
                    "to a built `make -C tflm_ops tflm-runner-m4`")
    problem = toolchain_problem(need_emulator=True)
    if problem:
        pytest.skip(problem)
    if runner:
        return runner
    extra = [f"TFLM_DIR={tflm_dir}", f"TFLM_M4_LIB={tflm_lib}"]
    if os.environ.get("KP_TFLM_INCLUDES"):
        extra.append(f"TFLM_INCLUDES={os.environ['KP_TFLM_INCLUDES']}")
    if os.environ.get("KP_CMSIS_NN_DIR"):
        extra.append(f"CMSIS_NN_DIR={os.environ['KP_CMSIS_NN_DIR']}")
    result = _make("tflm-runner-m4", tmp_path / "out", *extra)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return str(tmp_path / "out" / "m4" / "tflm_runner_m4.elf")


def _run_tflm_m4(elf: str, model: bytes, x, tmp_path) -> tuple:
    """_run_tflm on the Cortex-M4F firmware in QEMU: (outputs, arena sizes, kernel, instructions)."""
    import numpy as np

    from keras_patch.runtime.firmware import QEMU_ARGS

    (tmp_path / "m.tflite").write_bytes(model)
    np.ascontiguousarray(x).tofile(tmp_path / "x.bin")
    args = [a if a != "enable=on,target=native" else a + ",arg=tflm_runner_m4,arg=m.tflite,arg=x.bin,arg=y.bin"
            for a in QEMU_ARGS]
    result = subprocess.run(["qemu-system-arm", *args, "-kernel", elf], cwd=tmp_path, capture_output=True,
                            text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    arena = {k: int(v) for k, v in re.findall(r"^(arena_\w+_bytes) (\d+)$", result.stdout, re.M)}
    assert set(arena) == {"arena_head_bytes", "arena_tail_bytes", "arena_used_bytes"}, result.stdout
    kernel = re.search(r"^kernel (\w+)$", result.stdout, re.M).group(1)
    instructions = int(re.search(r"^instructions (\d+)$", result.stdout, re.M).group(1))
    return _read_runner_outputs(result.stdout, tmp_path / "y.bin"), arena, kernel, instructions


def test_tflm_m4_patched_mobilenet_v2_several_stages(tmp_path):
    """The same plans (the planner's for the firmware's kernel) in TFLM on a Cortex-M4F (QEMU
    mps2-an386; TFLM's CMSIS-NN kernels and KP_PATCH_STAGE's CMSIS-NN path when so built):
    outputs == LiteRT's, bit for bit, and the measured arena head == profile(kernel=<the
    firmware's kernel>)'s prediction (and the planner's peak_bytes)."""
    import numpy as np

    from keras_patch.arena.profiler import profile

    elf = _tflm_m4_runner(tmp_path)
    unpatched, x, want = _live_mobilenet_v2_int8()
    (got,), arena, kernel, _ = _run_tflm_m4(elf, unpatched, x, tmp_path)
    np.testing.assert_array_equal(got.reshape(want.shape), want, err_msg="unpatched: Cortex-M4 TFLM vs LiteRT")
    assert arena["arena_head_bytes"] == profile(unpatched, kernel=kernel).layer_by_layer_peak_bytes
    for stages, patched, planned_head in _several_stage_models(unpatched, kernel):
        (got,), arena, _, _ = _run_tflm_m4(elf, patched, x, tmp_path)
        np.testing.assert_array_equal(got.reshape(want.shape), want, err_msg=f"{stages}: Cortex-M4 TFLM vs LiteRT")
        predicted = profile(patched, kernel=kernel).patched_peak_bytes
        assert arena["arena_head_bytes"] == predicted, (stages, kernel, arena, predicted)
        assert planned_head is None or arena["arena_head_bytes"] == planned_head, (stages, kernel, arena, planned_head)


def _float_pad_mobilenet(size: int = 48, head_channels: int = 64) -> bytes:
    """A small MobileNetV2-like int8 model with a float input and output (QUANTIZE / DEQUANTIZE),
    PyTorch-style explicit ZeroPadding2D((1, 1)) before the stride-2 stem conv and before a
    stride-2 depthwise conv (not TF's SAME split, so the converter keeps both as PAD ops),
    inverted residual blocks with residual ADDs, random BatchNorm statistics (live activations),
    a 1x1 head conv of `head_channels` channels before the global average pool (MEAN)."""
    import contextlib
    import io

    import keras
    import numpy as np

    from keras_patch.keras.export import convert_int8

    layers = keras.layers
    keras.utils.set_random_seed(3)

    def bn_relu(x, act=True):
        x = layers.BatchNormalization()(x)
        return layers.ReLU(6.0)(x) if act else x

    def block(x, expand, out, stride):
        y = bn_relu(layers.Conv2D(expand, 1, use_bias=False)(x))
        if stride == 2:
            y = layers.ZeroPadding2D(((1, 1), (1, 1)))(y)
        y = bn_relu(layers.DepthwiseConv2D(3, strides=stride, padding="valid" if stride == 2 else "same",
                                           use_bias=False)(y))
        y = bn_relu(layers.Conv2D(out, 1, use_bias=False)(y), act=False)
        return layers.Add()([x, y]) if stride == 1 and x.shape[-1] == out else y

    inputs = keras.Input((size, size, 3))
    x = layers.ZeroPadding2D(((1, 1), (1, 1)))(inputs)
    x = bn_relu(layers.Conv2D(8, 3, strides=2, padding="valid", use_bias=False)(x))
    x = bn_relu(layers.DepthwiseConv2D(3, padding="same", use_bias=False)(x))
    x = bn_relu(layers.Conv2D(8, 1, use_bias=False)(x), act=False)
    for expand, out, stride in ((48, 12, 2), (72, 12, 1), (72, 16, 2), (96, 16, 1)):
        x = block(x, expand, out, stride)
    x = layers.GlobalAveragePooling2D()(bn_relu(layers.Conv2D(head_channels, 1, use_bias=False)(x)))
    model = keras.Model(inputs, layers.Dense(10)(x))
    rng = np.random.default_rng(1)
    for layer in model.layers:
        if isinstance(layer, layers.BatchNormalization):
            shape = layer.get_weights()[0].shape
            layer.set_weights([rng.uniform(0.5, 1.5, shape), rng.uniform(0.0, 0.5, shape),
                               rng.uniform(-0.1, 0.1, shape), rng.uniform(0.05, 0.2, shape)])
    calibration = rng.uniform(-1, 1, (4, size, size, 3)).astype(np.float32)
    with contextlib.redirect_stdout(io.StringIO()):
        return bytes(convert_int8(model, calibration, int8_io=False))


def _arena_passes_check(unpatched: bytes, kernel: str, run) -> list:
    """The arena passes for `kernel` on `unpatched` (a float-input model with non-SAME PADs), two ways:
    keras_patch.plan + apply (patch stages, one of them in place) and the layer-by-layer model
    (`optimize_arena` alone: each PAD folded into a one-layer KP_PATCH_STAGE with explicit pads).
    Both take int8 input, carry TFLM's offline plan and have no PAD left; `run` (model, input) ->
    (outputs, arena sizes) gives the unpatched model's outputs bit for bit on the same
    (dequantized) inputs, and the arena head == profile(kernel=kernel)'s prediction.
    Returns the StageOptions of the planned model's KP_PATCH_STAGE ops."""
    import numpy as np

    import keras_patch
    from keras_patch.arena.offline_metadata import read_offline_offsets
    from keras_patch.arena.profiler import profile
    from keras_patch.graph.passes.pipeline import ArenaOptions, optimize_arena
    from keras_patch.graph.patchify import find_stages, stage_options
    from keras_patch.graph.tflite_model import TFLiteModel
    from keras_patch.graph.unpatchify import layer_op_counts

    original = TFLiteModel.from_bytes(unpatched)
    assert original.tensor(original.inputs[0]).dtype == np.float32
    assert sum(original.op_type(i) == "PAD" for i in range(original.num_ops)) >= 2
    planned = keras_patch.plan(unpatched, max_mac_overhead=1.10, kernel=kernel).apply(unpatched)
    layer_by_layer = TFLiteModel.from_bytes(unpatched)
    optimize_arena(layer_by_layer, ArenaOptions(kernel=kernel))
    want, q = None, None
    for name, patched in (("plan", planned), ("layer by layer", layer_by_layer.to_bytes())):
        model = TFLiteModel.from_bytes(patched)
        options = [stage_options(model, i) for i in find_stages(model)]
        assert read_offline_offsets(model) is not None, f"{name}: no OfflineMemoryAllocation"
        assert not {"PAD", "PADV2", "QUANTIZE"} & {model.op_type(i) for i in range(model.num_ops)}, name
        if name == "plan":
            assert any(opts.in_place for opts in options), "no in-place op"
        else:
            assert [layer_op_counts(opts) for opts in options].count([2]) >= 2, "PADs not folded into stages"
        source = model.tensor(model.inputs[0])
        assert source.dtype == np.int8
        if want is None:
            q = np.random.default_rng(13).integers(-128, 128, (2, *source.shape[1:]), dtype=np.int8)
            x = ((q.astype(np.float32) - float(source.zero_point[0])) * float(source.scale[0])).astype(np.float32)
            (want,), _ = run(unpatched, x)
            assert len(np.unique(want)) > 5, "degenerate logits: the comparison would prove nothing"
        (got,), arena = run(patched, q)
        np.testing.assert_array_equal(got, want, err_msg=f"{kernel} {name}: arena passes vs unpatched TFLM")
        predicted = profile(patched, kernel=kernel).patched_peak_bytes
        assert arena["arena_head_bytes"] == predicted, (kernel, name, arena, predicted)
        if name == "plan":
            planned_options = options
    return planned_options


def test_tflm_m4_stage_ending_with_mean(tmp_path):
    """test_tflm_adapter_stage_ending_with_mean on the Cortex-M4F firmware in QEMU (TFLM's CMSIS-NN
    kernels and KP_PATCH_STAGE's CMSIS-NN path when so built; a MEAN always runs the portable code)."""
    import numpy as np

    elf = _tflm_m4_runner(tmp_path)
    for k, original, patched, x in _mean_stage_models():
        want, _, _, _ = _run_tflm_m4(elf, original, x, tmp_path)
        for first, model in patched:
            got, _, _, _ = _run_tflm_m4(elf, model, x, tmp_path)
            assert len(got) == len(want)
            for w, g in zip(want, got):
                np.testing.assert_array_equal(g, w, err_msg=f"case {k}, stage from op {first} (Cortex-M4)")


def test_tflm_arena_passes_float_pad_mobilenet(tmp_path):
    """Issue 11's arena passes in real TFLM: a float-input MobileNetV2-like model with explicit
    (non-SAME) PADs, planned and applied with int8 input, PAD folding, in-place ops and the
    offline memory plan, runs bit-exact against the unpatched model in the host runner (portable
    kernel) and, with KP_TFLM_M4_LIB, on the Cortex-M4F firmware under QEMU (its kernel,
    CMSIS-NN when so built); TFLM's measured arena head == profile()'s prediction."""
    runner = _tflm_runner(tmp_path)
    unpatched = _float_pad_mobilenet()
    _arena_passes_check(unpatched, "portable", lambda model, x: _run_tflm(runner, model, x, tmp_path))
    if not (os.environ.get("KP_TFLM_M4_RUNNER") or os.environ.get("KP_TFLM_M4_LIB")):
        return
    elf = _tflm_m4_runner(tmp_path)
    (_, _, kernel, _) = _run_tflm_m4(elf, unpatched, _float_pad_probe(unpatched), tmp_path)
    _arena_passes_check(unpatched, kernel, lambda model, x: _run_tflm_m4(elf, model, x, tmp_path)[:2])


def _ends_with_mean(opts) -> bool:
    """A KP_PATCH_STAGE (options version 3) whose last layer is a MEAN (op code 40)."""
    from keras_patch.stage.options import OP_MEAN

    return opts.version == 3 and opts.layers[-1].op == OP_MEAN


def test_tflm_arena_passes_plan_with_mean_stage(tmp_path):
    """test_tflm_arena_passes_float_pad_mobilenet with a wide head conv (6x6x512, the largest
    activation after the early stages are patched): the whole-network plan ends with a stage
    Conv_1 + MEAN (options version 3, the global average pool computed patch by patch, [1, C]
    output), next to in-place ops, folded PADs, int8 input and the offline memory plan. Bit-exact
    against the unpatched model and arena head == profile()'s prediction, on the host runner and,
    with KP_TFLM_M4_LIB, on the Cortex-M4F firmware under QEMU (CMSIS-NN when so built)."""
    runner = _tflm_runner(tmp_path)
    unpatched = _float_pad_mobilenet(head_channels=512)
    options = _arena_passes_check(unpatched, "portable", lambda model, x: _run_tflm(runner, model, x, tmp_path))
    assert any(_ends_with_mean(opts) and opts.num_layers >= 2 for opts in options), "no stage ends with a MEAN"
    if not (os.environ.get("KP_TFLM_M4_RUNNER") or os.environ.get("KP_TFLM_M4_LIB")):
        return
    elf = _tflm_m4_runner(tmp_path)
    (_, _, kernel, _) = _run_tflm_m4(elf, unpatched, _float_pad_probe(unpatched), tmp_path)
    options = _arena_passes_check(unpatched, kernel, lambda model, x: _run_tflm_m4(elf, model, x, tmp_path)[:2])
    assert any(_ends_with_mean(opts) and opts.num_layers >= 2 for opts in options), f"{kernel}: no stage ends with a MEAN"


def _float_pad_probe(unpatched: bytes):
    """One zero input for `unpatched` (to ask the firmware which kernel it was built with)."""
    import numpy as np

    from keras_patch.graph.tflite_model import TFLiteModel

    model = TFLiteModel.from_bytes(unpatched)
    return np.zeros((1, *model.tensor(model.inputs[0]).shape[1:]), np.float32)


# ------------------------------------------------- the runner: every builtin op, every output


def _runner_builtin_methods() -> list:
    """The MicroMutableOpResolver methods AddOps in tests/tflm_runner.cc calls (KP_PATCH_STAGE aside)."""
    with open(os.path.join(TFLM_OPS, "tests", "tflm_runner.cc"), encoding="utf-8") as f:
        text = f.read()
    body = text[text.index("TfLiteStatus AddOps("):]
    body = body[:body.index("\n}\n")]
    count = int(re.search(r"kNumBuiltinOps = (\d+);", text).group(1))
    methods = re.findall(r"\br\.(Add\w+)\(\)", body)
    assert count == len(methods), "kNumBuiltinOps (the resolver's capacity - 1) != the number of Add calls"
    return methods


def _tflm_builtin_methods(tflm_dir: str) -> dict:
    """{method: BuiltinOperator name} of every MicroMutableOpResolver method that registers a builtin op."""
    with open(os.path.join(tflm_dir, "tensorflow/lite/micro/micro_mutable_op_resolver.h"), encoding="utf-8") as f:
        header = f.read()
    starts = list(re.finditer(r"TfLiteStatus (Add\w+)\(", header))
    methods = {}
    for k, m in enumerate(starts):
        body = header[m.end():starts[k + 1].start() if k + 1 < len(starts) else len(header)]
        op = re.search(r"AddBuiltin\(\s*(?:tflite::)?BuiltinOperator_(\w+)", body)
        if op and m.group(1) != "AddBuiltin":
            methods[m.group(1)] = op.group(1)
    return methods


def test_runner_registers_every_builtin():
    """tests/tflm_runner.cc registers each builtin op once; with KP_TFLM_DIR set, exactly the
    builtin ops that TFLM's micro_mutable_op_resolver.h offers (keep the list in sync)."""
    methods = _runner_builtin_methods()
    assert len(methods) == len(set(methods)), "an op is registered twice"
    assert {"AddTranspose", "AddResizeNearestNeighbor", "AddConv2D", "AddDepthwiseConv2D"} <= set(methods)
    tflm = os.environ.get("KP_TFLM_DIR")
    if not tflm:
        pytest.skip("set KP_TFLM_DIR to compare the runner's ops with TFLM's micro_mutable_op_resolver.h")
    offered = _tflm_builtin_methods(tflm)
    assert len(offered) >= 90 and offered["AddTranspose"] == "TRANSPOSE"
    assert sorted(set(offered) - set(methods)) == [], "builtin ops TFLM offers that the runner does not register"
    assert sorted(set(methods) - set(offered)) == [], "the runner calls methods TFLM does not have"


def _transpose_resize_model(int8_io: bool):
    """A tiny two-output int8 model with TRANSPOSE and RESIZE_NEAREST_NEIGHBOR (ops of real MCUNet
    exports that TFLM runs but the runner used not to register): (tflite bytes, op names)."""
    import contextlib
    import io

    import keras

    from keras_patch.graph.tflite_model import TFLiteModel

    try:
        from tests.model_zoo import to_int8_tflite
    except ImportError:
        from model_zoo import to_int8_tflite

    keras.utils.set_random_seed(3)
    layers = keras.layers
    x = layers.Input((12, 10, 3))
    y = layers.Conv2D(8, 3, strides=2, padding="same", activation="relu")(x)
    y = layers.DepthwiseConv2D(3, padding="same", activation="relu6")(y)
    up = layers.Resizing(12, 10, interpolation="nearest")(y)  # RESIZE_NEAREST_NEIGHBOR
    a = layers.Conv2D(4, 1, name="map_head")(up)
    t = layers.Permute((2, 1, 3))(y)  # TRANSPOSE
    t = layers.Conv2D(6, (3, 1), activation="relu")(t)
    b = layers.Dense(5, name="class_head")(layers.GlobalAveragePooling2D()(t))
    with contextlib.redirect_stdout(io.StringIO()):
        tflite = to_int8_tflite(keras.Model(x, [a, b]), int8_io=int8_io, num_samples=8)
    m = TFLiteModel.from_bytes(tflite)
    return tflite, {m.op_type(k) for k in range(m.num_ops)}


def test_tflm_runner_transpose_resize_two_outputs(tmp_path):
    """Regression: the runner failed on TRANSPOSE / RESIZE_NEAREST_NEIGHBOR ("Didn't find op for
    builtin opcode") and wrote output 0 only. A two-output model with both ops (int8 I/O, then
    patched, then float I/O): every output == LiteRT's, bit for bit."""
    import numpy as np

    from keras_patch.graph.patchify import patchify
    from keras_patch.runtime.host import run_tflite
    from keras_patch.planner.schedule import candidate_splits
    from keras_patch.graph.tflite_model import TFLiteModel

    runner = _tflm_runner(tmp_path)
    model, ops = _transpose_resize_model(int8_io=True)
    assert {"TRANSPOSE", "RESIZE_NEAREST_NEIGHBOR"} <= ops, ops
    rng = np.random.default_rng(5)
    x = rng.integers(-128, 128, (3, 12, 10, 3), dtype=np.int8)
    want = [np.asarray(w) for w in run_tflite(model, x)]
    assert len(want) == 2 and all(len(np.unique(w)) > 3 for w in want), "degenerate outputs"
    got, _ = _run_tflm(runner, model, x, tmp_path)
    assert [g.shape[2:] for g in got] == [w.shape[1:] for w in want]  # (runs, batch 1, ...)
    for k, (g, w) in enumerate(zip(got, want)):
        np.testing.assert_array_equal(g.reshape(w.shape), w, err_msg=f"output {k}: TFLM vs LiteRT")

    patched = patchify(model, candidate_splits(model)[-1], (2, 2))  # KP_PATCH_STAGE + the rest
    got, _ = _run_tflm(runner, patched, x, tmp_path)
    for k, (g, w) in enumerate(zip(got, want)):
        np.testing.assert_array_equal(g.reshape(w.shape), w, err_msg=f"output {k}: patched TFLM vs LiteRT")

    model, _ = _transpose_resize_model(int8_io=False)  # float32 in and out (QUANTIZE ... DEQUANTIZE)
    m = TFLiteModel.from_bytes(model)
    (quantize,) = [k for k in range(m.num_ops) if m.op_type(k) == "QUANTIZE"]
    q = m.tensor(m.op_outputs(quantize)[0])
    # Inputs on the int8 grid: LiteRT's and TFLM's QUANTIZE may round other floats one step apart.
    xf = ((rng.integers(-128, 128, (2, 12, 10, 3)) - q.zero_point[0]) * q.scale[0]).astype(np.float32)
    want = [np.asarray(w) for w in run_tflite(model, xf)]
    got, _ = _run_tflm(runner, model, xf, tmp_path)
    assert [g.dtype for g in got] == [np.float32, np.float32]
    for k, (g, w) in enumerate(zip(got, want)):
        np.testing.assert_array_equal(g.reshape(w.shape), w, err_msg=f"float output {k}: TFLM vs LiteRT")


# ------------------------------------------ CMSIS-NN fast path: on where the build offers it


def _cmsis_macros(tmp_path, compiler: list, includes: list, *defines) -> dict:
    """The KP_CMSIS_NN* macros (and the fake header's marker) after preprocessing
    tflm_ops/patch_stage_cmsis.cc with `compiler` and `includes`."""
    result = subprocess.run([*compiler, "-std=c++11", "-E", "-dM", f"-I{TFLM_OPS}",
                             *[f"-I{d}" for d in includes], *defines, os.path.join(TFLM_OPS, "patch_stage_cmsis.cc")],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    return dict(re.findall(r"^#define (KP_CMSIS_NN\w*|KP_FAKE_\w+) (.*)$", result.stdout, re.M))


def test_cmsis_nn_is_detected_from_the_include_path(tmp_path):
    """The fast path turns on by itself on an Arm M-profile target whose include path has
    CMSIS-NN (the TFLM Arduino library's third_party/cmsis_nn/Include/arm_nnfunctions.h, or
    <arm_nnfunctions.h>), stays off on the host and without CMSIS-NN, and -DKP_NO_CMSIS_NN
    turns it off. (Fake headers: only the preprocessor's choice is checked here; the real
    build is test_cmsis_nn.py and, against the Arduino library, test_arduino_library.py.)"""
    if shutil.which("arm-none-eabi-g++") and _compiles("arm-none-eabi-g++", ["-c", "-mcpu=cortex-m4"], tmp_path):
        m_profile = ["arm-none-eabi-g++", "-mcpu=cortex-m4", "-mthumb"]
    elif _compiles(CXX, ["-std=c++11"], tmp_path):
        m_profile = [CXX, "-D__ARM_ARCH_PROFILE='M'"]  # what an M-profile compiler predefines
    else:
        pytest.skip("no C++ compiler")
    chirale = tmp_path / "chirale_src"  # Chirale_TensorFlowLite's src/ layout
    (chirale / "third_party" / "cmsis_nn" / "Include").mkdir(parents=True)
    (chirale / "third_party" / "cmsis_nn" / "Include" / "arm_nnfunctions.h").write_text("#define KP_FAKE_CHIRALE 1\n")
    plain = tmp_path / "cmsis_nn_include"
    plain.mkdir()
    (plain / "arm_nnfunctions.h").write_text("#define KP_FAKE_PLAIN 1\n")

    on = _cmsis_macros(tmp_path, m_profile, [chirale])
    assert on == {"KP_CMSIS_NN": "1", "KP_CMSIS_NN_HEADER": '"third_party/cmsis_nn/Include/arm_nnfunctions.h"',
                  "KP_FAKE_CHIRALE": "1"}
    on = _cmsis_macros(tmp_path, m_profile, [plain])
    assert on == {"KP_CMSIS_NN": "1", "KP_CMSIS_NN_HEADER": "<arm_nnfunctions.h>", "KP_FAKE_PLAIN": "1"}
    assert _cmsis_macros(tmp_path, m_profile, []) == {"KP_CMSIS_NN": "0"}
    assert _cmsis_macros(tmp_path, m_profile, [chirale, plain], "-DKP_NO_CMSIS_NN") == {"KP_CMSIS_NN": "0"}
    # -DCMSIS_NN (TFLM's cmsis_nn builds, the firmware): on, with CMSIS-NN's Include/ on the path.
    assert _cmsis_macros(tmp_path, m_profile, [plain], "-DCMSIS_NN")["KP_CMSIS_NN_HEADER"] == '"arm_nnfunctions.h"'
    if _compiles(CXX, ["-std=c++11"], tmp_path) and "__ARM_ARCH_PROFILE" not in subprocess.run(
            [CXX, "-E", "-dM", "-x", "c++", "/dev/null"], capture_output=True, text=True).stdout:
        # The host build (the Python extension, the unit tests) stays portable.
        assert _cmsis_macros(tmp_path, [CXX], [chirale, plain]) == {"KP_CMSIS_NN": "0"}
