"""`import keras_patch` and the command line on a `.tflite` do not import TensorFlow or Keras.

The package imports the flatbuffers schema and numpy; the Keras side
(`PatchStage`, `wrap_stage`, `export_tflite`), the LiteRT interpreter, TFLM,
matplotlib and keras-tuner load when first used. `PatchStage` is still
registered for `.keras` loading as soon as Keras is imported. Wall-clock
times are measured by benchmarks/import_time.py (README).
"""

import json
import os
import subprocess
import sys

import pytest

HEAVY = ("tensorflow", "keras", "tf_keras")
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _python(code: str, *args: str, cwd=None) -> subprocess.CompletedProcess:
    """`code` in a fresh interpreter that imports keras_patch from this checkout."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([REPO, os.environ.get("PYTHONPATH", "")])}
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, env=env,
                          cwd=cwd, timeout=600)


# Runs the command line in-process, then reports its exit status and the heavy modules it imported.
_CLI = """
import json, sys
from keras_patch.cli import main
try:
    rc = main(json.loads(sys.argv[1]))
except SystemExit as e:
    rc = e.code
print(json.dumps({"rc": rc, "heavy": [m for m in %r if m in sys.modules]}))
""" % (HEAVY,)

ALLOWED_EXTRA = ("keras_patch", "ai_edge_litert", "ai_edge_litert.schema_py_generated", "flatbuffers")


def test_import_adds_only_the_schema_to_tensorflow():
    code = (
        "import sys, keras, tensorflow\n"
        "before = set(sys.modules)\n"
        "import keras_patch\n"
        "print(sorted(set(sys.modules) - before))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    extra = eval(out.stdout.strip().splitlines()[-1])
    unexpected = [m for m in extra if not m.startswith(ALLOWED_EXTRA)]
    assert unexpected == []


def test_public_api():
    import keras_patch

    for name in ["PatchStage", "wrap_stage", "wrap_stages", "apply_plan", "profile", "Profile", "export_tflite", "patchify",
                 "unpatchify", "run_tflite", "__version__"]:
        assert hasattr(keras_patch, name), name


def test_import_keras_patch_imports_no_tensorflow():
    code = ("import sys, keras_patch, keras_patch.cli\n"
            f"print([m for m in {HEAVY!r} if m in sys.modules])")
    proc = _python(code)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().splitlines()[-1] == "[]"


@pytest.fixture(scope="module")
def tflite_files(tmp_path_factory, residual):
    folder = tmp_path_factory.mktemp("no_tf")
    (folder / "model.tflite").write_bytes(residual)
    return folder


@pytest.mark.parametrize("argv", [
    pytest.param(["--help"], id="help"),
    pytest.param(["--version"], id="version"),
    pytest.param(["profile", "model.tflite", "--plot", "memory.png"], id="profile"),
    pytest.param(["profile", "model.tflite", "--json", "--kernel", "cmsis_nn"], id="profile-json"),
    pytest.param(["patchify", "model.tflite", "patched.tflite", "--split", "3", "--grid", "2x2"], id="patchify"),
    pytest.param(["export-arduino", "model.tflite", "--out", "Sketch", "--tail-bytes", "9000"], id="export-arduino"),
    pytest.param(["export-arduino", "model.tflite", "--out", "Report", "--sketch", "memory-report",
                  "--tail-bytes", "9000"], id="export-arduino-memory-report"),
])
def test_command_line_on_tflite_imports_no_tensorflow(tflite_files, argv):
    cli = _python(_CLI, json.dumps(argv), cwd=tflite_files)
    assert cli.returncode == 0, cli.stderr[-2000:]
    report = json.loads(cli.stdout.strip().splitlines()[-1])
    assert report == {"rc": 0, "heavy": []}, cli.stdout[-2000:] + cli.stderr[-2000:]


def test_version(capsys):
    from keras_patch import __version__
    from keras_patch.cli import main

    assert main(["--version"]) == 0
    assert capsys.readouterr().out.strip() == f"keras-patch {__version__}"


def test_lazy_api_and_keras_registration(tmp_path):
    """`PatchStage` is registered for `.keras` loading even when keras_patch is imported first
    (TensorFlow's import asks for Keras' module spec without loading it, which must not count)."""
    import keras
    from keras_patch import PatchStage

    block = keras.Sequential([keras.Input((8, 8, 3)), keras.layers.Conv2D(4, 3, padding="same")])
    inputs = keras.Input((8, 8, 3))
    path = tmp_path / "staged.keras"
    keras.Model(inputs, PatchStage(block, grid=(2, 2), name="stage")(inputs)).save(path)
    code = (
        "import sys, keras_patch\n"
        "assert 'keras' not in sys.modules\n"
        "import tensorflow, keras\n"
        f"model = keras.models.load_model({str(path)!r})\n"
        "from keras_patch import PatchStage, export_tflite, wrap_stage\n"
        "from keras_patch.keras.patch_stage import PatchStage as Layer\n"
        "assert type(model.get_layer('stage')) is PatchStage is Layer is keras_patch.PatchStage\n"
        "assert {'PatchStage', 'export_tflite', 'wrap_stage'} <= set(dir(keras_patch))\n"
        "assert callable(export_tflite) and callable(wrap_stage)\n"
        "print('ok')\n"
    )
    proc = _python(code)
    assert proc.returncode == 0 and proc.stdout.strip().endswith("ok"), proc.stderr[-3000:]


def test_unknown_attribute_is_an_attribute_error():
    import keras_patch

    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        keras_patch.nope  # noqa: B018
