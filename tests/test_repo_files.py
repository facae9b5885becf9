"""Files of the repository itself: the license it declares, what git ignores."""

import ast
import os
import re
import shutil
import subprocess

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _read(*path):
    with open(os.path.join(ROOT, *path), encoding="utf-8") as f:
        return f.read()


def test_license_is_the_apache_2_text_setup_declares():
    text = _read("LICENSE")
    assert text.lstrip().startswith("Apache License\n") and "Version 2.0, January 2004" in text
    assert "TERMS AND CONDITIONS FOR USE, REPRODUCTION, AND DISTRIBUTION" in text
    assert "END OF TERMS AND CONDITIONS" in text and len(text) > 11_000
    setup = _read("setup.py")
    assert 'license="Apache-2.0"' in setup and 'license_files=["LICENSE"]' in setup
    assert re.search(r"^include LICENSE$", _read("MANIFEST.in"), re.M)


def _example_out_dirs():
    """The default --out-dir of every example script and of `keras-patch demo`."""
    dirs = []
    for name in sorted(os.listdir(os.path.join(ROOT, "examples"))) + ["../keras_patch/cli.py"]:
        if not name.endswith(".py"):
            continue
        tree = ast.parse(_read("examples", name))
        for node in ast.walk(tree):
            if (isinstance(node, ast.Call) and getattr(node.func, "attr", "") == "add_argument"
                    and node.args and getattr(node.args[0], "value", None) == "--out-dir"):
                dirs.extend(k.value.value for k in node.keywords if k.arg == "default")
    return dirs


def test_git_ignores_what_examples_write():
    if shutil.which("git") is None or not os.path.exists(os.path.join(ROOT, ".git")):
        pytest.skip("not a git checkout")
    dirs = _example_out_dirs()
    assert {"quickstart_out", "vww_patch_out", "tune_vww_out", "keras_patch_demo"} <= set(dirs)
    for path in [f"{d}/model.tflite" for d in dirs] + [f"{d}/memory.png" for d in dirs] + ["memory.png"]:
        result = subprocess.run(["git", "check-ignore", "-q", "--no-index", path], cwd=ROOT)
        assert result.returncode == 0, f"git does not ignore {path}: add it to .gitignore"
