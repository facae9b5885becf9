"""The generated example sketches of arduino/KerasPatch (PersonDetectionPatched,
MemoryReport): committed folders equal a regeneration from their own model
bytes, resolvers, the patched/unpatched pair, the preprocessing in C++ vs
Python, the CLI, and (with a TFLM tree) the sketches linked and run on the host."""

import os
import re
import shutil
import subprocess

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import numpy as np
import pytest

from keras_patch.arduino.examples import (
    FRAME_HEIGHT,
    FRAME_WIDTH,
    export_memory_report,
    export_person_detection,
    memory_report_input,
    merge_plans,
    preprocess_frame,
)
from keras_patch.arduino.library import library_dir
from keras_patch.runtime.firmware import toolchain_problem
from keras_patch.arduino.resolver import resolver_calls
from keras_patch.arduino.sketch import KEPT_FILE, model_bytes_from_source
from keras_patch.cli import main
from keras_patch.runtime.host import quantize, quantize_input, run_tflite
from keras_patch.graph.tflite_model import TFLiteModel
from keras_patch.graph.unpatchify import unpatchify

EXAMPLES = os.path.join(library_dir(), "examples")
PERSON = os.path.join(EXAMPLES, "PersonDetectionPatched")
REPORT = os.path.join(EXAMPLES, "MemoryReport")
SHIM = os.path.join(os.path.dirname(os.path.abspath(__file__)), "arduino_shim")
TAIL = 9000


def _read(path):
    with open(path, encoding="utf-8") as f:
        return f.read()


@pytest.fixture(scope="module")
def vww(tmp_path_factory):
    """The committed examples' models, recovered from their model_data.cpp, as the files they came from."""
    d = tmp_path_factory.mktemp("vww")
    report_cc = _read(os.path.join(REPORT, "model_data.cpp"))
    patched = model_bytes_from_source(_read(os.path.join(PERSON, "model_data.cpp")))
    assert model_bytes_from_source(report_cc) == patched
    (d / "vww_patched.tflite").write_bytes(patched)
    (d / "vww.tflite").write_bytes(model_bytes_from_source(report_cc, "g_unpatched_model"))
    return d / "vww_patched.tflite", d / "vww.tflite"


def _assert_same_folder(committed, generated):
    names = sorted(os.listdir(generated))
    assert sorted(os.listdir(committed)) == sorted(names + [KEPT_FILE])
    for name in names:
        with open(os.path.join(committed, name), "rb") as a, open(os.path.join(generated, name), "rb") as b:
            assert a.read() == b.read(), f"{name} differs from a regeneration: rerun the command in README.md"


def test_person_detection_is_generated(vww, tmp_path):
    patched, _ = vww
    result = export_person_detection(str(patched), str(tmp_path / "PersonDetectionPatched"), board="nano33ble")
    _assert_same_folder(PERSON, result.out_dir)
    assert sorted(os.listdir(result.out_dir)) == ["PersonDetectionPatched.ino", "image_provider.cpp",
                                                  "image_provider.h", "model_data.cpp", "model_data.h"]


def test_memory_report_is_generated(vww, tmp_path):
    patched, unpatched = vww
    result = export_memory_report(str(patched), str(tmp_path / "MemoryReport"), unpatched=str(unpatched))
    _assert_same_folder(REPORT, result.out_dir)
    assert result.arena.total_bytes == max(result.patched_arena.total_bytes, result.unpatched_arena.total_bytes)
    assert result.patched_arena.total_bytes < result.unpatched_arena.total_bytes


def _registered(ino):
    return re.findall(r"resolver\.(Add\w+)\(\) != kTfLiteOk", ino)


def test_resolvers_register_exactly_the_models_ops(vww):
    patched, unpatched = vww
    plan = resolver_calls(patched.read_bytes())
    assert plan.custom_ops == ["KP_PATCH_STAGE"]
    person = _read(os.path.join(PERSON, "PersonDetectionPatched.ino"))
    assert _registered(person) == plan.builtin_methods
    assert f"kNumOps = {len(plan.builtin_methods) + 1};" in person
    report = _read(os.path.join(REPORT, "MemoryReport.ino"))
    both = merge_plans(plan, resolver_calls(unpatched.read_bytes()))
    assert _registered(report) == both.builtin_methods
    m = TFLiteModel.from_bytes(unpatched.read_bytes())
    assert set(both.builtin_ops) == {m.op_type(i) for i in range(m.num_ops)}
    for ino in (person, report):
        assert "keras_patch::AddKerasPatchOps(resolver) != kTfLiteOk" in ino


def test_memory_report_holds_the_patched_unpatched_pair(vww):
    patched, unpatched = vww
    p, u = patched.read_bytes(), unpatched.read_bytes()
    expanded = TFLiteModel.from_bytes(unpatchify(p))
    plain = TFLiteModel.from_bytes(u)
    assert [expanded.op_type(i) for i in range(expanded.num_ops)] == [plain.op_type(i) for i in range(plain.num_ops)]
    shape = plain.tensor(plain.inputs[0]).shape
    from keras_patch.datasets import person_dataset

    images, _ = person_dataset(3, seed=11)
    x = np.concatenate([memory_report_input(int(np.prod(shape))).reshape(shape), quantize_input(p, images)])
    out_p, out_u = run_tflite(p, x)[0], run_tflite(u, x)[0]
    assert np.array_equal(out_p, out_u)
    assert len(np.unique(out_p, axis=0)) > 1


def test_memory_report_input_matches_the_sketch():
    ino = _read(os.path.join(REPORT, "MemoryReport.ino"))
    assert "(i * 31u + (i >> 7) * 17u) & 0xFFu" in ino
    x = memory_report_input(300)
    i = 200
    assert x[i] == np.uint8((i * 31 + (i >> 7) * 17) & 0xFF).view(np.int8)
    assert set(memory_report_input(256 * 4).tolist()) == set(range(-128, 128))


def test_sketches_are_complete_arduino_sketches():
    person = _read(os.path.join(PERSON, "PersonDetectionPatched.ino"))
    report = _read(os.path.join(REPORT, "MemoryReport.ino"))
    for ino in (person, report):
        assert "void setup() {" in ino and "void loop() {" in ino
        assert ino.index("#include <Chirale_TensorFlowLite.h>") < ino.index("#include <KerasPatch.h>")
        assert ino.count("{") == ino.count("}")
        assert "GENERATED by keras-patch" in ino.splitlines()[0]
    assert "#include <Arduino_OV767X.h>" in person
    assert "Camera.begin(QCIF, GRAYSCALE, 5, OV7675)" in person and "Camera.readFrame(frame)" in person
    assert f"constexpr int kFrameWidth = {FRAME_WIDTH};" in person
    assert "#if defined(LEDR) && defined(LEDG) && defined(LEDB)" in person
    assert "input->params.scale, input->params.zero_point" in person
    assert "arena_used_bytes()" in report and "memcmp(patched_output, unpatched_output" in report
    assert "g_unpatched_model" in _read(os.path.join(REPORT, "model_data.h"))


# ------------------------------------------------------------ image_provider.cpp

HARNESS = r"""
#include <stdio.h>
#include <stdlib.h>
#include "image_provider.h"
// argv: frame.bin frame_w frame_h out_w out_h scale zero_point out.bin
int main(int argc, char** argv) {
  if (argc != 9) return 2;
  const int fw = atoi(argv[2]), fh = atoi(argv[3]), ow = atoi(argv[4]), oh = atoi(argv[5]);
  unsigned char* frame = (unsigned char*)malloc(fw * fh);
  signed char* out = (signed char*)malloc(ow * oh);
  FILE* f = fopen(argv[1], "rb");
  if (!f || fread(frame, 1, fw * fh, f) != (size_t)(fw * fh)) return 3;
  fclose(f);
  keras_patch_example::CropResizeQuantize(frame, fw, fh, ow, oh, strtof(argv[6], nullptr), atoi(argv[7]),
                                          (int8_t*)out);
  f = fopen(argv[8], "wb");
  fwrite(out, 1, ow * oh, f);
  fclose(f);
  return 0;
}
"""


def person_frame(seed: int = 1, label: int = 1) -> np.ndarray:
    """A QCIF frame holding the first image of `person_dataset(16, seed)` with `label`
    (1: person), upscaled (nearest) to 144x144 in the centre, edge columns repeated
    left and right."""
    from keras_patch.datasets import person_dataset

    images, labels = person_dataset(16, seed=seed)
    image = np.round(images[int(np.argmax(labels == label)), :, :, 0] * 255).astype(np.uint8)
    rows = np.arange(FRAME_HEIGHT) * image.shape[0] // FRAME_HEIGHT
    square = image[rows][:, rows]
    pad = (FRAME_WIDTH - FRAME_HEIGHT) // 2
    return np.pad(square, ((0, 0), (pad, FRAME_WIDTH - FRAME_HEIGHT - pad)), mode="edge")


@pytest.mark.skipif(shutil.which("g++") is None, reason="no host g++")
def test_image_provider_matches_the_python_path(vww, tmp_path):
    patched, _ = vww
    exe = tmp_path / "harness"
    (tmp_path / "harness.cc").write_text(HARNESS)
    run = subprocess.run(["g++", "-std=c++11", "-O2", "-Wall", "-Wextra", "-Werror", f"-I{PERSON}",
                          str(tmp_path / "harness.cc"), os.path.join(PERSON, "image_provider.cpp"), "-o", str(exe)],
                         capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    model = TFLiteModel.from_bytes(patched.read_bytes())
    info = model.tensor(model.inputs[0])
    scale, zp = float(info.scale[0]), int(info.zero_point[0])
    rng = np.random.default_rng(0)
    cases = [(person_frame(), 96, 96, scale, zp, True),
             (rng.integers(0, 256, (FRAME_HEIGHT, FRAME_WIDTH), dtype=np.uint8), 96, 96, scale, zp, True),
             (rng.integers(0, 256, (FRAME_HEIGHT, FRAME_WIDTH), dtype=np.uint8), 48, 64, 0.0031, -7, False),
             (rng.integers(0, 256, (120, 100), dtype=np.uint8), 150, 90, 1 / 255, -128, False),
             (np.arange(256, dtype=np.uint8).reshape(16, 16), 16, 16, 0.002, 3, False)]  # clamps
    for frame, h, w, s, z, model_path in cases:
        frame_path, out_path = tmp_path / "frame.bin", tmp_path / "out.bin"
        frame_path.write_bytes(frame.tobytes())
        run = subprocess.run([str(exe), str(frame_path), str(frame.shape[1]), str(frame.shape[0]), str(w), str(h),
                              repr(float(np.float32(s))), str(z), str(out_path)], capture_output=True, text=True)
        assert run.returncode == 0, run.stderr
        got = np.frombuffer(out_path.read_bytes(), np.int8).reshape(1, h, w, 1)
        x = preprocess_frame(frame, h, w)
        expected = quantize_input(patched.read_bytes(), x) if model_path else quantize(x, s, z)
        assert np.array_equal(got, expected), (h, w, s, z, np.argwhere(got != expected)[:5])


def test_preprocess_frame_crops_the_centre():
    frame = np.zeros((FRAME_HEIGHT, FRAME_WIDTH), np.uint8)
    frame[:, :16] = frame[:, -16:] = 255  # outside the centred 144x144 square
    assert preprocess_frame(frame, 96, 96).max() == 0.0
    frame[:, 16:160] = 51
    x = preprocess_frame(frame, 96, 96)
    assert x.shape == (1, 96, 96, 1) and np.all(x == np.float32(51) / np.float32(255))


@pytest.mark.skipif(bool(toolchain_problem(need_emulator=False)),
                    reason=f"Cortex-M C++ toolchain: {toolchain_problem(need_emulator=False)}")
def test_image_provider_compiles_for_cortex_m4f(tmp_path):
    run = subprocess.run(["arm-none-eabi-g++", "-mcpu=cortex-m4", "-mfpu=fpv4-sp-d16", "-mfloat-abi=hard", "-mthumb",
                          "-std=c++11", "-fno-exceptions", "-fno-rtti", "-Os", "-Wall", "-Wextra", "-Werror", "-c",
                          os.path.join(PERSON, "image_provider.cpp"), "-o", str(tmp_path / "image_provider.o")],
                         capture_output=True, text=True)
    assert run.returncode == 0, run.stderr


# ---------------------------------------------------------------------- the CLI

def _run(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_cli_sketch_kinds(capsys, vww, tmp_path):
    patched, unpatched = vww
    out_dir = tmp_path / "Person"
    code, out, err = _run(capsys, "export-arduino", patched, "--out", out_dir, "--sketch", "person-detection",
                          "--tail-bytes", TAIL)
    assert code == 0, err
    assert "camera frame buffer: 25,344 B" in out and "image_provider.cpp" in out
    (out_dir / KEPT_FILE).write_text("my notes\n")
    code, out, err = _run(capsys, "export-arduino", patched, "--out", out_dir, "--sketch", "person-detection",
                          "--tail-bytes", TAIL, "--person-class", "0", "--force")
    assert code == 0, err
    assert (out_dir / KEPT_FILE).read_text() == "my notes\n"
    assert "constexpr int kPersonClass = 0;" in (out_dir / "Person.ino").read_text()

    code, out, err = _run(capsys, "export-arduino", patched, "--out", tmp_path / "Report", "--sketch", "memory-report",
                          "--compare-with", unpatched, "--tail-bytes", TAIL)
    assert code == 0, err
    assert "patched model:" in out and "unpatched model:" in out and "shared arena" in out
    assert model_bytes_from_source((tmp_path / "Report" / "model_data.cpp").read_text(),
                                   "g_unpatched_model") == unpatched.read_bytes()

    # Without --compare-with, the unpatched model is unpatchify(patched).
    code, _, err = _run(capsys, "export-arduino", patched, "--out", tmp_path / "Report2", "--sketch", "memory-report",
                        "--tail-bytes", TAIL)
    assert code == 0, err
    cc = (tmp_path / "Report2" / "model_data.cpp").read_text()
    assert model_bytes_from_source(cc, "g_unpatched_model") == unpatchify(patched.read_bytes())
    assert "keras_patch.unpatchify(patched)" in cc


def test_cli_refusals(capsys, vww, tmp_path):
    patched, unpatched = vww
    import model_zoo

    rgb = tmp_path / "rgb.tflite"
    rgb.write_bytes(model_zoo.to_int8_tflite(model_zoo.residual_model()))
    cases = [
        ([rgb, "--sketch", "person-detection"], "(1, H, W, 1)"),
        ([patched, "--sketch", "person-detection", "--person-class", "2"], "--person-class 2"),
        ([patched, "--compare-with", unpatched], "--compare-with is for --sketch memory-report"),
        ([patched, "--sketch", "memory-report", "--compare-with", rgb], "same inputs and outputs"),
        ([patched, "--sketch", "memory-report", "--compare-with", tmp_path / "none.tflite"], "none.tflite"),
    ]
    for i, (args, message) in enumerate(cases):
        code, _, err = _run(capsys, "export-arduino", *args, "--out", tmp_path / f"S{i}", "--tail-bytes", TAIL)
        assert code == 2 and message in err, err
    assert sorted(os.listdir(tmp_path)) == ["rgb.tflite"]


def test_memory_report_says_which_model_does_not_fit(vww, tmp_path, monkeypatch):
    """The unpatched comparison model not fitting is not cured by "a finer grid"."""
    from keras_patch.arduino import boards, examples
    from keras_patch.arduino.sketch import BoardBudgetError

    patched, unpatched = vww
    sizes = export_memory_report(str(patched), str(tmp_path / "Big"), unpatched=str(unpatched), tail_bytes=TAIL)
    need_patched, need_unpatched = sizes.patched_arena.total_bytes, sizes.unpatched_arena.total_bytes
    assert need_patched < need_unpatched
    table = dict(boards.BOARDS)
    monkeypatch.setattr(boards, "BOARDS", table)
    monkeypatch.setattr(examples, "BOARDS", table, raising=False)

    def board(key, arena_budget):
        table[key] = boards.Board(key, f"test board {key}", "x:y:z", "mcu", "cortex-m4", 2_000_000,
                                  arena_budget + 1000, 0, 1000)
        return key

    mid = board("mid", (need_patched + need_unpatched) // 2)
    with pytest.raises(BoardBudgetError) as e:
        export_memory_report(str(patched), str(tmp_path / "Mid"), unpatched=str(unpatched), board=mid, tail_bytes=TAIL)
    message = str(e.value)
    assert "finer grid" not in message
    assert f"unpatched comparison model ({os.path.basename(unpatched)})" in message
    assert f"patched model needs {need_patched:,} B and fits" in message
    assert f"--arena-bytes {need_patched}" in message and "--board nano33ble" in message
    assert not (tmp_path / "Mid").exists()
    # As the message says: --arena-bytes builds it.
    result = export_memory_report(str(patched), str(tmp_path / "Mid"), unpatched=str(unpatched), board=mid,
                                  tail_bytes=TAIL, arena_bytes=need_patched)
    assert result.arena.total_bytes == need_patched

    tiny = board("tiny", need_patched // 2)
    with pytest.raises(BoardBudgetError, match="the patched model does not fit either: try a finer grid"):
        export_memory_report(str(patched), str(tmp_path / "Tiny"), unpatched=str(unpatched), board=tiny,
                             tail_bytes=TAIL)
    with pytest.raises(BoardBudgetError, match="pass a smaller --arena-bytes"):
        export_memory_report(str(patched), str(tmp_path / "Tiny"), unpatched=str(unpatched), board=tiny,
                             tail_bytes=TAIL, arena_bytes=need_unpatched)


# ------------------------------------------- linked against TFLM, run on the host

def _tflm():
    tflm, lib = os.environ.get("KP_TFLM_DIR"), os.environ.get("KP_TFLM_LIB")
    if not tflm or not lib or not os.environ.get("KP_TFLM_INCLUDES") or shutil.which("g++") is None:
        pytest.skip("set KP_TFLM_DIR, KP_TFLM_LIB (a host TFLM library built from it with -DTF_LITE_STATIC_MEMORY) "
                    "and KP_TFLM_INCLUDES, as for tests/test_tflm_ops.py")
    return lib, os.environ["KP_TFLM_INCLUDES"].split()


def _build(sketch_dir, tmp_path):
    lib, includes = _tflm()
    name = os.path.basename(sketch_dir)
    src = os.path.join(library_dir(), "src")
    sources = sorted(os.path.join(sketch_dir, n) for n in os.listdir(sketch_dir) if n.endswith((".cpp", ".cc")))
    sources += sorted(os.path.join(src, n) for n in os.listdir(src) if n.endswith(".cpp"))
    exe = tmp_path / name
    run = subprocess.run(
        ["g++", "-std=c++17", "-O2", "-Wall", "-Wextra", "-Werror", "-Wno-unused-parameter", "-fno-exceptions",
         "-fno-rtti", "-fno-threadsafe-statics", "-DTF_LITE_STATIC_MEMORY", f"-I{SHIM}", f"-I{src}", f"-I{sketch_dir}",
         *includes, "-include", "Arduino.h", "-x", "c++", os.path.join(sketch_dir, f"{name}.ino"), "-x", "none",
         *sources, os.path.join(SHIM, "arduino_shim.cc"), lib, "-o", str(exe)],
        capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-4000:]
    return exe


def test_memory_report_runs_on_host_tflm(vww, tmp_path):
    exe = _build(REPORT, tmp_path)
    run = subprocess.run([str(exe)], capture_output=True, text=True, timeout=300)
    print(run.stdout)
    assert run.returncode == 0, run.stdout + run.stderr
    used = {k: int(v) for k, v in re.findall(r"^(patched|unpatched) .*: arena used (\d+) B", run.stdout, re.M)}
    assert 0 < used["patched"] < used["unpatched"]
    assert f"difference: {used['unpatched'] - used['patched']} B less" in run.stdout
    assert "outputs identical: yes (bit-exact)" in run.stdout
    patched, _ = vww
    inp = TFLiteModel.from_bytes(patched.read_bytes())
    shape = inp.tensor(inp.inputs[0]).shape
    expected = run_tflite(patched.read_bytes(), memory_report_input(int(np.prod(shape))).reshape(shape))[0]
    printed = re.search(r"^patched output: +([-\d ]+)", run.stdout, re.M).group(1).split()
    assert [int(v) for v in printed] == expected.reshape(-1).tolist()[:16]


@pytest.mark.parametrize("label", [1, 0])
def test_person_detection_runs_on_host_tflm(vww, tmp_path, label):
    exe = _build(PERSON, tmp_path)
    frame = person_frame(label=label)
    (tmp_path / "frame.bin").write_bytes(frame.tobytes())
    env = dict(os.environ, KP_SHIM_FRAME=str(tmp_path / "frame.bin"), KP_SHIM_LOOPS="2")
    run = subprocess.run([str(exe)], capture_output=True, text=True, timeout=300, env=env)
    print(run.stdout)
    assert run.returncode == 0, run.stdout + run.stderr
    patched, _ = vww
    x = quantize_input(patched.read_bytes(), preprocess_frame(frame, 96, 96))
    logits = run_tflite(patched.read_bytes(), x)[0].reshape(-1).tolist()
    printed = re.findall(r"person score ([\d.]+) (PERSON|no person) \(int8 outputs ([-\d ]+)\)", run.stdout)
    assert len(printed) == 2
    is_person = logits[1] > logits[0]
    assert is_person == bool(label)  # the model gets these two frames right
    for score, verdict, outputs in printed:
        assert [int(v) for v in outputs.split()] == logits
        assert verdict == ("PERSON" if is_person else "no person") and (float(score) > 0.5) == is_person
    assert re.search(r"tensor arena: used \d+ of \d+ bytes", run.stdout)
    assert ("[shim] LED R=off G=on B=off" if is_person else "[shim] LED R=on G=off B=off") in run.stdout
