"""The Cortex-M toolchain probe: a partial toolchain skips the firmware tests with the reason.

These run everywhere (no cross compiler needed): they put fake cross tools on PATH.
"""

import os
import shutil

import pytest

import keras_patch
from keras_patch.runtime.firmware import run_stage_firmware, toolchain_problem

def _fake_cross_toolchain(bin_dir, link_error: str) -> None:
    """arm-none-eabi-gcc/g++ that compile (touch the object) but fail to link, as a
    gcc-arm-none-eabi without libstdc++-arm-none-eabi-newlib does."""
    bin_dir.mkdir()
    script = ("#!/bin/sh\nout=''\nprev=''\nfor a in \"$@\"; do [ \"$prev\" = -o ] && out=$a; prev=$a; done\n"
              "case \"$*\" in *' -c '*) : > \"$out\"; exit 0;; esac\n"
              f"echo '{link_error}' >&2\nexit 1\n")
    for tool in ("arm-none-eabi-gcc", "arm-none-eabi-g++", "qemu-system-arm"):
        (bin_dir / tool).write_text(script)
        (bin_dir / tool).chmod(0o755)


def test_toolchain_probe_links_a_cxx_program(tmp_path, monkeypatch):
    """Programs on PATH are not a toolchain: a cross g++ that cannot link (no
    libstdc++-arm-none-eabi-newlib) makes the firmware tests skip with the reason
    and run_stage_firmware raise it, instead of failing at the first build."""
    if shutil.which("make") is None:
        pytest.skip("no make")
    _fake_cross_toolchain(tmp_path / "bin", "ld: cannot find -lstdc++: No such file or directory")
    monkeypatch.setenv("PATH", f"{tmp_path / 'bin'}{os.pathsep}{os.environ['PATH']}")
    problem = toolchain_problem.__wrapped__()
    assert problem is not None
    assert "cannot find -lstdc++" in problem and "libstdc++-arm-none-eabi-newlib" in problem
    monkeypatch.setattr("keras_patch.runtime.firmware.toolchain_problem", lambda need_emulator=True: problem)
    with pytest.raises(keras_patch.KerasPatchError, match="cannot compile and link a C\\+\\+ program"):
        run_stage_firmware("", str(tmp_path / "fw"))


def test_toolchain_probe_names_missing_programs(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))  # nothing on PATH
    problem = toolchain_problem.__wrapped__()
    assert problem.startswith("missing arm-none-eabi-gcc, arm-none-eabi-g++, qemu-system-arm, make")
    assert "qemu-system-arm" not in toolchain_problem.__wrapped__(need_emulator=False).split(";")[0]
