"""MODULE.bazel, WORKSPACE and tflm_ops/BUILD: parsed as Starlark (a Python
subset), their targets checked against the files on disk and, with KP_TFLM_DIR
set, the TFLM labels against TFLM's own BUILD files and the legacy WORKSPACE's
repositories against what TFLM's BUILD files and MODULE.bazel need."""

import ast
import glob
import os
import re

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


# ------------------------------------------------ legacy WORKSPACE (non-Bzlmod)


def _workspace():
    """WORKSPACE's repository rules ({name: keyword arguments + 'rule'}) and its loads
    [(label, names of the repositories declared before that load())]."""
    repos, loads = {}, []
    with open(os.path.join(ROOT, "WORKSPACE"), encoding="utf-8") as f:
        tree = ast.parse(f.read())
    calls = iter(_calls(os.path.join(ROOT, "WORKSPACE")))
    for node in tree.body:
        if not (isinstance(node, ast.Expr) and isinstance(node.value, ast.Call)):
            continue
        fn, kw = next(calls)
        if fn == "load":
            loads.append((node.value.args[0].value, set(repos)))
        elif fn in ("http_archive", "git_repository", "pip_parse"):
            assert kw["name"] not in repos, f"WORKSPACE declares {kw['name']} twice"
            repos[kw["name"]] = dict(kw, rule=fn)
    return repos, loads


def test_workspace_pins_the_same_tflm_as_module():
    module = {fn: kw for fn, kw in _calls(os.path.join(ROOT, "MODULE.bazel")) if fn == "git_override"}
    repos, _ = _workspace()
    tflm = repos["tflite_micro"]  # the repo_name MODULE.bazel gives TFLM, which its BUILD files use
    assert tflm["rule"] == "git_repository"
    assert tflm["commit"] == module["git_override"]["commit"] == TFLM_COMMIT
    assert tflm["remote"] == module["git_override"]["remote"]
    (workspace,) = [kw for fn, kw in _calls(os.path.join(ROOT, "WORKSPACE")) if fn == "workspace"]
    (mod,) = [kw for fn, kw in _calls(os.path.join(ROOT, "MODULE.bazel")) if fn == "module"]
    assert workspace["name"] == mod["name"]


def test_workspace_declares_every_repository_it_and_build_use():
    """Each @repo a load() of WORKSPACE or tflm_ops/BUILD names is declared (before the load),
    every archive is pinned by a hash, and every @repo label of tflm_ops/BUILD resolves."""
    repos, loads = _workspace()
    generated = {"tflm_pip_deps": "pip_parse", "bazel_features_globals": "bazel_features_deps",
                 "bazel_features_version": "bazel_features_deps"}
    for label, declared in loads:
        repo = label[1:].split("//")[0]
        if repo == "bazel_tools":
            continue
        assert repo in repos, f"WORKSPACE loads {label} but declares no repository {repo}"
        assert repo in declared, f"WORKSPACE loads {label} before it declares {repo}"
    for name, kw in repos.items():
        if kw["rule"] == "http_archive":
            assert kw.get("sha256") or kw.get("integrity", "").startswith("sha256-"), f"{name} has no hash"
    with open(os.path.join(ROOT, "tflm_ops", "BUILD"), encoding="utf-8") as f:
        build = f.read()
    for repo in set(re.findall(r'"@([A-Za-z0-9_]+)//', build)):
        assert repo in repos or repo in generated, f"tflm_ops/BUILD uses @{repo}, which WORKSPACE does not declare"


def _tflm_build(tflm, package):
    for name in ("BUILD", "BUILD.bazel"):
        path = os.path.join(tflm, package, name)
        if os.path.isfile(path):
            with open(path, encoding="utf-8") as f:
                return f.read()
    return None


def _target_block(text, name):
    """The text of the rule call in a BUILD file that defines `name` (None: no such rule)."""
    m = re.search(r'\bname\s*=\s*"%s"' % re.escape(name), text)
    if m is None:
        return None
    depth, i = 0, m.start()
    while i > 0:  # back to the call's "("
        i -= 1
        if text[i] == ")":
            depth += 1
        elif text[i] == "(":
            if depth == 0:
                break
            depth -= 1
    depth, j = 0, i
    while j < len(text):
        depth += {"(": 1, ")": -1}.get(text[j], 0)
        if depth == 0:
            break
        j += 1
    return text[i:j + 1]


def _tflm_closure(tflm, roots):
    """Packages of TFLM reached from `roots` through the labels of each rule (every select() branch),
    and {external repo: a target that names it}."""
    todo, seen, packages, external = list(roots), set(), set(), {}
    label = re.compile(r'"(@[A-Za-z0-9_]*)?(//[A-Za-z0-9_/.\-]*)?(:[A-Za-z0-9_.\-/+]+)?"')
    while todo:
        package, name = todo.pop()
        if (package, name) in seen:
            continue
        seen.add((package, name))
        text = _tflm_build(tflm, package)
        if text is None:
            continue  # //visibility:public, //conditions:default, a file
        packages.add(package)
        block = _target_block(text, name)
        for m in label.finditer(block or ""):
            repo, pkg, target = m.groups()
            if repo and repo != "@tflite_micro":
                external.setdefault(repo[1:], f"//{package}:{name}")
            elif pkg is not None or target is not None:
                pkg = pkg[2:] if pkg is not None else package
                if not pkg.endswith("..."):
                    todo.append((pkg, target[1:] if target else pkg.split("/")[-1]))
    return packages, external


def test_workspace_has_what_tflm_needs():
    """With KP_TFLM_DIR: each repository TFLM's targets behind //tflm_ops:patch_stage use, and each
    one a BUILD file of their packages loads from, is declared in WORKSPACE; TFLM's own
    http_archive pins (MODULE.bazel) are repeated exactly; every @tflite_micro file WORKSPACE
    names exists."""
    tflm = os.environ.get("KP_TFLM_DIR")
    if not tflm:
        pytest.skip("set KP_TFLM_DIR to a tflite-micro checkout (90b983c2b) to check WORKSPACE against TFLM")
    repos, _ = _workspace()
    roots = []
    for dep in _targets()["patch_stage"]["deps"]:
        if dep.startswith("@tflite_micro//"):
            package, name = dep[len("@tflite_micro//"):].split(":")
            roots.append((package, name))
    packages, external = _tflm_closure(tflm, roots)
    assert "tensorflow/lite/micro/kernels" in packages and "tensorflow/lite/micro" in packages
    needed = dict(external)
    for package in packages:
        text = _tflm_build(tflm, package)
        for lbl in re.findall(r'load\(\s*"@([A-Za-z0-9_]+)//', text):
            needed.setdefault(lbl, f"load() in {package}/BUILD")
    # .bzl files those BUILD files load from TFLM itself load further repositories.
    for bzl in set(re.findall(r'load\(\s*"//([^"]+)"', "".join(_tflm_build(tflm, p) for p in packages))):
        with open(os.path.join(tflm, bzl.replace(":", "/")), encoding="utf-8") as f:
            for lbl in re.findall(r'load\(\s*"@([A-Za-z0-9_]+)//', f.read()):
                needed.setdefault(lbl, f"load() in //{bzl}")
    missing = {r: why for r, why in needed.items() if r not in repos and r != "bazel_tools"}
    # Xtensa-only libraries (select() branches for other targets) are not fetched on a host build
    # but keep their repository declared, like TFLM's MODULE.bazel does.
    assert not missing, f"WORKSPACE lacks repositories TFLM needs: {missing}"

    with open(os.path.join(tflm, "MODULE.bazel"), encoding="utf-8") as f:
        tflm_module = ast.parse(f.read())
    archives = 0
    for node in ast.walk(tflm_module):
        if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "http_archive":
            kw = {k.arg: ast.literal_eval(k.value) for k in node.keywords}
            ours = repos.get(kw["name"])
            assert ours is not None, f"WORKSPACE lacks TFLM's http_archive {kw['name']}"
            for key in ("sha256", "integrity", "strip_prefix", "urls", "patch_args"):
                assert ours.get(key) == kw.get(key), (kw["name"], key)
            in_tflm = lambda v: "@tflite_micro" + v if v.startswith("//") else v  # noqa: E731
            assert ours.get("build_file") == (in_tflm(kw["build_file"]) if "build_file" in kw else None)
            assert ours.get("patches", []) == [in_tflm(v) for v in kw.get("patches", [])], kw["name"]
            archives += 1
    assert archives >= 4
    for kw in repos.values():
        for value in [kw.get("build_file"), kw.get("requirements_lock")] + list(kw.get("patches", [])):
            if value and value.startswith("@tflite_micro//"):
                path = os.path.join(tflm, value[len("@tflite_micro//"):].replace(":", "/"))
                assert os.path.isfile(path), f"WORKSPACE names {value}, not a file in {tflm}"
