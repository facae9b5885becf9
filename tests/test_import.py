"""`import keras_patch` costs no more than importing TensorFlow/Keras.

The package imports Keras (PatchStage is a Keras layer) and otherwise only the
flatbuffers schema; the LiteRT interpreter, TFLM, matplotlib and keras-tuner
load lazily.  Wall-clock import time is compared in benchmarks/import_time.py.
"""

import subprocess
import sys

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

    for name in ["PatchStage", "wrap_stage", "profile", "Profile", "export_tflite", "patchify",
                 "unpatchify", "run_tflite", "__version__"]:
        assert hasattr(keras_patch, name), name
