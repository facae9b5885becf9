"""`keras-patch export-arduino`: the sketch folder, its resolver, arena and model data,
board budget refusals, and no half-written folders."""

import os
import re
import stat

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import pytest

import model_zoo
from keras_patch.arduino import arena as arena_module
from keras_patch.arduino.arena import align16, estimate_arena, stage_persistent_bytes
from keras_patch.arduino.boards import BOARDS, Board, get_board
from keras_patch.arduino.resolver import BUILTIN_METHODS, resolver_calls
from keras_patch.arduino.sketch import BoardBudgetError, FlashEstimate, check_budget, flash_estimate
from keras_patch.cli import main
from keras_patch.errors import KerasPatchError, UnsupportedModelError
from keras_patch.graph.patchify import find_stages, patchify
from keras_patch.arena.profiler import profile
from keras_patch.graph.tflite_model import BUILTIN_OPERATOR_NAMES, TFLiteModel

TAIL = 9000  # --tail-bytes in tests that need not run the tflite-micro wheel


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    d = tmp_path_factory.mktemp("arduino")
    plain = model_zoo.to_int8_tflite(model_zoo.residual_model())
    m = TFLiteModel.from_bytes(plain)
    add = next(i for i in range(m.num_ops) if m.op_type(i) == "ADD")
    patched = patchify(plain, add, (3, 3))
    (d / "plain.tflite").write_bytes(plain)
    (d / "patched.tflite").write_bytes(patched)
    return d / "plain.tflite", d / "patched.tflite"


def _run(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def _model_bytes_from_cc(text):
    body = text[text.index("g_model[] = {") : text.index("};")]
    return bytes(int(h, 16) for h in re.findall(r"0x([0-9a-f]{2})", body))


def test_sketch_folder(capsys, models, tmp_path):
    _, patched = models
    out_dir = tmp_path / "ResidualPatched"
    code, out, err = _run(capsys, "export-arduino", patched, "--out", out_dir, "--board", "nano33ble",
                          "--tail-bytes", TAIL)
    assert code == 0, err
    assert sorted(os.listdir(out_dir)) == ["ResidualPatched.ino", "model_data.cpp", "model_data.h"]
    ino = (out_dir / "ResidualPatched.ino").read_text()
    cc = (out_dir / "model_data.cpp").read_text()

    # Model data: the exact bytes, 16-byte aligned, const.
    assert _model_bytes_from_cc(cc) == patched.read_bytes()
    assert "alignas(16) const unsigned char g_model[]" in cc
    assert f"const unsigned int g_model_len = {len(patched.read_bytes())};" in cc
    assert "extern const unsigned char g_model[];" in (out_dir / "model_data.h").read_text()

    # Resolver: exactly the model's builtin ops, plus the keras-patch op.
    m = TFLiteModel.from_bytes(patched.read_bytes())
    used = {m.op_type(i) for i in range(m.num_ops)} - {"KP_PATCH_STAGE"}
    calls = re.findall(r"resolver\.(Add\w+)\(\)", ino)
    assert sorted(calls) == sorted(BUILTIN_METHODS[op] for op in used)
    assert "keras_patch::AddKerasPatchOps(resolver)" in ino
    assert "MicroMutableOpResolver<kNumOps>" in ino and f"kNumOps = {len(used) + 1};" in ino
    assert "#include <KerasPatch.h>" in ino and "#include <Chirale_TensorFlowLite.h>" in ino

    # Arena: head from profile(), tail as given, stage persistent bytes, margin; printed and in the sketch.
    # The head is the CMSIS-NN build's (its context buffer on top): the fast path is on by
    # default with an Arm board's TFLM library, so an arena sized for the portable build can be short.
    head = profile(patched.read_bytes(), kernel="cmsis_nn").patched_peak_bytes
    assert head > profile(patched.read_bytes()).patched_peak_bytes
    persistent = sum(stage_persistent_bytes(m, op) for op in find_stages(m))
    expected = align16(head + TAIL + persistent + arena_module.ARENA_MARGIN_BYTES)
    assert f"constexpr size_t kTensorArenaSize = {expected};" in ino
    assert f"tensor arena {expected:,} B" in out and f"head {head:,} B" in out and f"tail {TAIL:,} B (given)" in out
    assert "fits" in out and "MicroMutableOpResolver<" in out


def test_arena_tail_is_measured_with_the_tflm_wheel(models, monkeypatch):
    plain, patched = models
    from keras_patch.arena.tflm_arena import measure_tflm_arena

    est = estimate_arena(patched.read_bytes())
    assert est.tail_bytes == measure_tflm_arena(plain.read_bytes()).tail_bytes > 0
    assert "tflite-micro wheel" in est.tail_source
    assert est.head_bytes < est.layer_by_layer_head_bytes
    assert est.stage_persistent_bytes >= 16 * 3 and est.total_bytes % 16 == 0
    assert est.total_bytes >= est.head_bytes + est.tail_bytes + est.stage_persistent_bytes + est.margin_bytes


def test_refuses_an_arena_the_board_cannot_hold(capsys, models, tmp_path):
    _, patched = models
    out_dir = tmp_path / "TooBig"
    board = get_board("nano33ble")
    code, _, err = _run(capsys, "export-arduino", patched, "--out", out_dir, "--board", "nano33ble",
                        "--tail-bytes", TAIL, "--arena-bytes", board.arena_budget_bytes + 16)
    assert code == 2
    assert "Arduino Nano 33 BLE" in err and f"{board.arena_budget_bytes + 16:,} B" in err
    assert f"{board.arena_budget_bytes:,} B" in err and "tensor arena" in err
    assert list(tmp_path.iterdir()) == []


def test_refuses_flash_and_names_both_needs():
    tiny = Board("tiny", "Tiny Board", "x:y:z", "MCU", "cortex-m0plus", flash_bytes=100_000,
                 ram_bytes=50_000, core_flash_bytes=40_000, core_ram_bytes=10_000)
    from keras_patch.arduino.arena import ArenaEstimate

    est = ArenaEstimate(total_bytes=45_000, head_bytes=40_000, tail_bytes=4_000, stage_persistent_bytes=0,
                        margin_bytes=1024, tail_source="given")
    with pytest.raises(BoardBudgetError) as info:
        check_budget(tiny, est, FlashEstimate(model_bytes=50_000, code_bytes=20_000))
    message = str(info.value)
    assert "Tiny Board (tiny)" in message
    assert "45,000 B" in message and "40,000 B of RAM" in message
    assert "70,000 B of flash" in message and "60,000 B are left" in message
    check_budget(tiny, ArenaEstimate(40_000, 0, 0, 0, 0, "given"), FlashEstimate(40_000, 20_000))  # fits exactly


def test_flash_refusal_from_the_cli(capsys, models, tmp_path, monkeypatch):
    _, patched = models
    from keras_patch.arduino import boards

    small = Board("small", "Small Flash Board", "a:b:c", "MCU", "cortex-m4", flash_bytes=150_000,
                  ram_bytes=262_144, core_flash_bytes=100_000, core_ram_bytes=0)
    monkeypatch.setitem(boards.BOARDS, "small", small)
    code, _, err = _run(capsys, "export-arduino", patched, "--out", tmp_path / "S", "--board", "small",
                        "--tail-bytes", TAIL)
    assert code == 2 and "Small Flash Board" in err and "of flash" in err and "50,000 B are left" in err
    assert list(tmp_path.iterdir()) == []


def test_bad_arguments_leave_nothing(capsys, models, tmp_path):
    _, patched = models
    cases = [
        (["--board", "uno"], "unknown board", "S1"),
        (["--board", "nano33ble"], "not a valid Arduino sketch name", "bad name"),
        (["--arena-bytes", "0"], "--arena-bytes", "S2"),
    ]
    for extra, message, name in cases:
        code, _, err = _run(capsys, "export-arduino", patched, "--out", tmp_path / name, "--tail-bytes", TAIL, *extra)
        assert code == 2 and message in err, err
    code, _, err = _run(capsys, "export-arduino", tmp_path / "missing.tflite", "--out", tmp_path / "S3")
    assert code == 2 and "missing.tflite" in err
    assert list(tmp_path.iterdir()) == []


def test_existing_folder_needs_force(capsys, models, tmp_path):
    _, patched = models
    out_dir = tmp_path / "Sketch"
    code, _, err = _run(capsys, "export-arduino", patched, "--out", out_dir, "--tail-bytes", TAIL)
    assert code == 0, err
    (out_dir / "README.md").write_text("my notes")
    code, _, err = _run(capsys, "export-arduino", patched, "--out", out_dir, "--tail-bytes", TAIL)
    assert code == 2 and "not empty" in err and "--force" in err
    code, _, err = _run(capsys, "export-arduino", patched, "--out", out_dir, "--tail-bytes", TAIL, "--force")
    assert code == 0, err
    assert sorted(os.listdir(out_dir)) == ["README.md", "Sketch.ino", "model_data.cpp", "model_data.h"]
    assert (out_dir / "README.md").read_text() == "my notes"
    assert sorted(os.listdir(tmp_path)) == ["Sketch"]  # no temporary folders left behind


def _tree(path):
    return {str(p.relative_to(path)): (p.read_bytes() if p.is_file() else None) for p in sorted(path.rglob("*"))}


def test_force_replaces_only_folders_keras_patch_wrote(capsys, models, tmp_path):
    """A folder of the user's, or a sketch folder with a file of the user's, is never replaced."""
    _, patched = models
    mine = tmp_path / "Mine"
    (mine / "sub").mkdir(parents=True)
    (mine / "notes.txt").write_text("mine")
    (mine / "sub" / "data.bin").write_bytes(b"\0")
    sketch = tmp_path / "Sketch"
    assert _run(capsys, "export-arduino", patched, "--out", sketch, "--tail-bytes", TAIL)[0] == 0
    (sketch / "extra.cpp").write_text("// my code\n")
    for out_dir, names in [(mine, ["notes.txt", "sub"]), (sketch, ["extra.cpp"])]:
        before = _tree(out_dir)
        for force in ([], ["--force"]):
            code, _, err = _run(capsys, "export-arduino", patched, "--out", out_dir, "--tail-bytes", TAIL, *force)
            assert code == 2 and "not a sketch folder keras-patch wrote" in err and "--force" not in err, err
            assert all(name in err for name in names) and len(err.strip().splitlines()) == 1
            assert _tree(out_dir) == before


def test_force_refuses_the_current_folder_and_the_models_folder(capsys, models, tmp_path, monkeypatch):
    """`--out . --force` inside the model's folder used to delete the folder, model included."""
    plain, patched = models
    work = tmp_path / "Work"
    work.mkdir()
    (work / "model.tflite").write_bytes(patched.read_bytes())
    (work / "unpatched.tflite").write_bytes(plain.read_bytes())
    before = _tree(tmp_path)
    monkeypatch.chdir(work)
    cases = [
        (["model.tflite", "--out", ".", "--force"], "current folder"),
        (["model.tflite", "--out", "..", "--force"], "current folder"),
        (["model.tflite", "--out", str(work), "--force"], "current folder"),
    ]
    for argv, message in cases:
        code, _, err = _run(capsys, "export-arduino", *argv, "--tail-bytes", TAIL)
        assert code == 2 and message in err and "'" + argv[2] + "'" in err, err
    code, _, err = _run(capsys, "export-arduino", "model.tflite", "--out", "", "--tail-bytes", TAIL)
    assert code == 2 and "empty" in err and "--force" not in err, err

    monkeypatch.chdir(tmp_path)
    code, _, err = _run(capsys, "export-arduino", work / "model.tflite", "--out", "Work", "--force",
                        "--tail-bytes", TAIL)
    assert code == 2 and "holds the model" in err and "model.tflite" in err, err
    code, _, err = _run(capsys, "export-arduino", patched, "--out", "Work", "--force", "--sketch", "memory-report",
                        "--compare-with", work / "unpatched.tflite", "--tail-bytes", TAIL)
    assert code == 2 and "holds the model" in err and "unpatched.tflite" in err, err
    assert _tree(tmp_path) == before


def test_interrupted_force_keeps_the_old_folder(models, tmp_path, monkeypatch):
    """An interrupt between the two renames of a --force replacement puts the old folder back."""
    plain, patched = models
    from keras_patch.arduino import sketch

    out_dir = tmp_path / "Sketch"
    sketch.export_sketch(str(plain), str(out_dir), tail_bytes=TAIL)
    (out_dir / "README.md").write_text("my notes")
    before = _tree(out_dir)
    real_replace = os.replace
    calls = []

    def interrupted_replace(src, dst):
        calls.append((src, dst))
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", interrupted_replace)
    with pytest.raises(KeyboardInterrupt):
        sketch.export_sketch(str(patched), str(out_dir), tail_bytes=TAIL, overwrite=True)
    monkeypatch.undo()
    assert len(calls) >= 2 and calls[0][0] == str(out_dir)  # the old folder had been moved aside
    assert _tree(out_dir) == before
    assert sorted(os.listdir(tmp_path)) == ["Sketch"]


def test_sketch_files_get_the_umask_and_keep_their_modes(models, tmp_path):
    plain, patched = models
    from keras_patch.arduino import sketch

    old_mask = os.umask(0o077)
    try:
        out_dir = tmp_path / "Private"
        sketch.export_sketch(str(plain), str(out_dir), tail_bytes=TAIL)
        assert stat.S_IMODE(out_dir.stat().st_mode) == 0o700
        assert {stat.S_IMODE(p.stat().st_mode) for p in out_dir.iterdir()} == {0o600}
        os.umask(0o022)
        out_dir = tmp_path / "Public"
        sketch.export_sketch(str(plain), str(out_dir), tail_bytes=TAIL)
        assert stat.S_IMODE(out_dir.stat().st_mode) == 0o755
        assert {stat.S_IMODE(p.stat().st_mode) for p in out_dir.iterdir()} == {0o644}
        # Replacing the folder keeps the modes its folder and files had.
        out_dir.chmod(0o750)
        (out_dir / "model_data.cpp").chmod(0o640)
        sketch.export_sketch(str(patched), str(out_dir), tail_bytes=TAIL, overwrite=True)
        assert stat.S_IMODE(out_dir.stat().st_mode) == 0o750
        assert stat.S_IMODE((out_dir / "model_data.cpp").stat().st_mode) == 0o640
        assert stat.S_IMODE((out_dir / "Public.ino").stat().st_mode) == 0o644
        assert _model_bytes_from_cc((out_dir / "model_data.cpp").read_text()) == patched.read_bytes()
    finally:
        os.umask(old_mask)


def test_out_under_a_file_is_refused_before_any_work(capsys, models, tmp_path):
    _, patched = models
    (tmp_path / "file").write_text("x")
    code, _, err = _run(capsys, "export-arduino", patched, "--out", tmp_path / "file" / "Sketch", "--tail-bytes", TAIL)
    assert code == 2 and "is not a folder" in err and str(tmp_path / "file") in err and ".kp-" not in err, err
    assert sorted(os.listdir(tmp_path)) == ["file"]


def test_failure_while_writing_leaves_no_folder(models, tmp_path, monkeypatch):
    _, patched = models
    from keras_patch.arduino import sketch

    def boom(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(sketch, "model_data_source", boom)
    with pytest.raises(OSError):
        sketch.export_sketch(str(patched), str(tmp_path / "Half"), tail_bytes=TAIL)
    assert list(tmp_path.iterdir()) == []


def test_resolver_plan(models):
    plain, patched = models
    plan = resolver_calls(plain.read_bytes())
    assert plan.builtin_methods[0] == "AddConv2D" and plan.custom_ops == []
    assert plan.num_slots == len(plan.builtin_methods) + 1
    assert resolver_calls(patched.read_bytes()).custom_ops == ["KP_PATCH_STAGE"]


def test_resolver_flags_ops_the_arduino_tflm_lacks(models):
    from keras_patch.arduino.resolver import NOT_IN_ARDUINO_TFLM

    plain, _ = models
    assert resolver_calls(plain.read_bytes()).not_in_arduino_tflm == []
    assert NOT_IN_ARDUINO_TFLM <= set(BUILTIN_METHODS.values())
    m = TFLiteModel.from_bytes(plain.read_bytes())
    from ai_edge_litert import schema_py_generated as schema

    code = m.model.operatorCodes[m.operator(m.num_ops - 1).opcodeIndex]  # FULLY_CONNECTED -> BATCH_MATMUL
    code.builtinCode = code.deprecatedBuiltinCode = schema.BuiltinOperator.BATCH_MATMUL
    assert resolver_calls(m.to_bytes()).not_in_arduino_tflm == ["AddBatchMatMul"]


def test_resolver_refuses_foreign_custom_ops(models):
    plain, _ = models
    m = TFLiteModel.from_bytes(plain.read_bytes())
    code = m.model.operatorCodes[m.operator(m.num_ops - 1).opcodeIndex]
    from ai_edge_litert import schema_py_generated as schema

    code.builtinCode = code.deprecatedBuiltinCode = schema.BuiltinOperator.CUSTOM
    code.customCode = b"MY_OP"
    with pytest.raises(UnsupportedModelError, match="MY_OP.*not keras-patch's"):
        resolver_calls(m.to_bytes())


def test_resolver_method_names():
    """Every mapped op is a real TFLite builtin; names follow TFLM's spelling.
    With KP_TFLM_DIR set, each method must exist in micro_mutable_op_resolver.h."""
    assert set(BUILTIN_METHODS) <= set(BUILTIN_OPERATOR_NAMES.values())
    assert BUILTIN_METHODS["CONV_2D"] == "AddConv2D" and BUILTIN_METHODS["DEPTHWISE_CONV_2D"] == "AddDepthwiseConv2D"
    tflm = os.environ.get("KP_TFLM_DIR")
    if tflm:
        with open(os.path.join(tflm, "tensorflow/lite/micro/micro_mutable_op_resolver.h")) as f:
            header = f.read()
        missing = [m for m in BUILTIN_METHODS.values() if f"TfLiteStatus {m}(" not in header]
        assert missing == []


def test_board_table():
    nano = get_board("nano33ble")
    assert (nano.flash_bytes, nano.ram_bytes, nano.fqbn) == (983040, 262144, "arduino:mbed_nano:nano33ble")
    assert {"nano33ble", "nicla_vision", "portenta_h7", "nano_rp2040_connect", "pico", "esp32s3"} <= set(BOARDS)
    for b in BOARDS.values():
        assert 0 < b.arena_budget_bytes < b.ram_bytes and 0 < b.model_flash_budget_bytes < b.flash_bytes
    with pytest.raises(KerasPatchError, match="nano33ble"):
        get_board("uno")


def test_flash_estimate_counts_ops(models):
    _, patched = models
    plan = resolver_calls(patched.read_bytes())
    est = flash_estimate(1000, plan)
    from keras_patch.arduino import sketch

    assert est.code_bytes == (sketch.TFLM_RUNTIME_FLASH_BYTES + sketch.KP_KERNEL_FLASH_BYTES
                              + sketch.FLASH_PER_BUILTIN_OP_BYTES * len(plan.builtin_methods))
    assert est.total_bytes == 1000 + est.code_bytes


ARDUINO_SHIM = """#pragma once
#include <stdint.h>
#include <string.h>
unsigned long millis();
unsigned long micros();
void delay(unsigned long ms);
struct SerialShim {
  void begin(unsigned long) {}
  explicit operator bool() const { return true; }
  void print(const char*) {}
  void print(char) {}
  void print(int) {}
  void print(unsigned long) {}
  void println(const char*) {}
  void println() {}
};
extern SerialShim Serial;
"""


def test_sketch_compiles_against_tflm(capsys, models, tmp_path):
    """With KP_TFLM_DIR (and KP_TFLM_INCLUDES, as for tests/test_tflm_ops.py) set, the
    generated .ino (with a minimal Arduino.h) and the library's adapter compile
    against that TFLM tree."""
    import shutil
    import subprocess

    tflm = os.environ.get("KP_TFLM_DIR")
    if not tflm or shutil.which("g++") is None:
        pytest.skip("set KP_TFLM_DIR (and KP_TFLM_INCLUDES) to a tflite-micro tree with its third-party headers")
    includes = os.environ.get("KP_TFLM_INCLUDES", f"-isystem {tflm}").split()
    _, patched = models
    out_dir = tmp_path / "Compiled"
    assert _run(capsys, "export-arduino", patched, "--out", out_dir, "--tail-bytes", TAIL)[0] == 0
    shim = tmp_path / "shim"
    shim.mkdir()
    (shim / "Arduino.h").write_text(ARDUINO_SHIM)
    (shim / "Chirale_TensorFlowLite.h").write_text("// stand-in for the TFLM Arduino library header\n")
    from keras_patch.arduino.library import library_dir

    src = os.path.join(library_dir(), "src")
    common = ["g++", "-std=gnu++17", "-fsyntax-only", "-Wall", "-Wextra", "-Werror", "-Wno-unused-parameter",
              "-fno-exceptions", "-fno-rtti", "-DTF_LITE_STATIC_MEMORY", f"-I{shim}", f"-I{src}", *includes]
    for args in (["-include", "Arduino.h", "-x", "c++", str(out_dir / "Compiled.ino")],
                 [os.path.join(src, "patch_stage.cpp")]):
        run = subprocess.run(common + args, capture_output=True, text=True)
        assert run.returncode == 0, run.stderr[-3000:]
