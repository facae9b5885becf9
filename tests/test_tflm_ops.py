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
