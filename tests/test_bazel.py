"""MODULE.bazel and tflm_ops/BUILD: parsed as Starlark (a Python subset), their
targets checked against the files on disk and, with KP_TFLM_DIR set, the TFLM
labels against TFLM's own BUILD files."""

import ast
import glob
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TFLM_COMMIT = "90b983c2b3f1480642e040bbd2ddb37b998f3424"


def _calls(path):
    """Top-level calls of a Starlark file: [(function name, {keyword: python value})]."""
    with open(path, encoding="utf-8") as f:
        tree = ast.parse(f.read(), filename=path)
    constants = {}
    calls = []
    for node in tree.body:
        if isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name):
            constants[node.targets[0].id] = ast.literal_eval(node.value)
        elif isinstance(node, ast.Expr) and isinstance(node.value, ast.Call):
            call = node.value
            kwargs = {}
            for kw in call.keywords:
                if isinstance(kw.value, ast.Name):
                    kwargs[kw.arg] = constants[kw.value.id]
                else:
                    kwargs[kw.arg] = ast.literal_eval(kw.value)
            calls.append((call.func.id, kwargs))
        elif not isinstance(node, ast.Expr):
            raise AssertionError(f"{path}: unexpected statement at line {node.lineno}")
    return calls


def _targets():
    return {kw["name"]: kw for fn, kw in _calls(os.path.join(ROOT, "tflm_ops", "BUILD")) if fn == "cc_library"}


def test_module_pins_tflite_micro():
    calls = _calls(os.path.join(ROOT, "MODULE.bazel"))
    deps = {kw["name"]: kw for fn, kw in calls if fn == "bazel_dep"}
    assert deps["tflm"]["repo_name"] == "tflite_micro" and "rules_cc" in deps
    (override,) = [kw for fn, kw in calls if fn == "git_override"]
    assert override["module_name"] == "tflm" and override["commit"] == TFLM_COMMIT
    assert override["remote"] == "https://github.com/tensorflow/tflite-micro.git"
    (module,) = [kw for fn, kw in calls if fn == "module"]
    from keras_patch._version import __version__

    assert module["version"] == __version__


def test_build_targets_exist_and_cover_every_source():
    targets = _targets()
    assert {"patch_stage_core", "patch_stage", "patch_stage_c_api"} <= set(targets)
    core = targets["patch_stage_core"]
    assert not [d for d in core.get("deps", []) if d.startswith("@")], "the core must not depend on TFLM"
    assert "patch_stage.cc" in targets["patch_stage"]["srcs"]
    assert ":patch_stage_core" in targets["patch_stage"]["deps"]
    assert any(d.startswith("@tflite_micro//tensorflow/lite/micro") for d in targets["patch_stage"]["deps"])

    listed = []
    for kw in targets.values():
        for f in kw.get("srcs", []) + kw.get("hdrs", []):
            assert os.path.isfile(os.path.join(ROOT, "tflm_ops", f)), f"tflm_ops/BUILD names missing file {f}"
            listed.append(f)
    assert len(listed) == len(set(listed)), "a file is in two targets"
    on_disk = {os.path.basename(p) for p in glob.glob(os.path.join(ROOT, "tflm_ops", "*.cc"))
               + glob.glob(os.path.join(ROOT, "tflm_ops", "*.h"))}
    assert on_disk == set(listed), f"not in any target: {sorted(on_disk - set(listed))}"


def test_core_headers_do_not_include_tflm():
    for f in _targets()["patch_stage_core"]["srcs"] + _targets()["patch_stage_core"]["hdrs"]:
        with open(os.path.join(ROOT, "tflm_ops", f), encoding="utf-8") as fh:
            assert '#include "tensorflow/' not in fh.read(), f


def test_tflm_labels_exist_in_tflm():
    tflm = os.environ.get("KP_TFLM_DIR")
    if not tflm:
        pytest.skip("set KP_TFLM_DIR to a tflite-micro checkout (90b983c2b) to check the @tflite_micro labels")
    for label in _targets()["patch_stage"]["deps"]:
        if not label.startswith("@tflite_micro//"):
            continue
        package, name = label[len("@tflite_micro//"):].split(":")
        build = os.path.join(tflm, package, "BUILD")
        with open(build, encoding="utf-8") as f:
            text = f.read()
        assert f'name = "{name}"' in text, f"{label}: no target {name} in {build}"
