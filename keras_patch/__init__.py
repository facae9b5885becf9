"""keras-patch: patch-based inference for tiny CNNs on microcontrollers.

Wrap the memory-heavy first stage of a Keras model in `PatchStage`, see the
peak-SRAM win with `profile`, export an int8 `.tflite` in which the stage is
one KP_PATCH_STAGE custom op (`export_tflite`, or `patchify` for an existing
`.tflite`), and run it on the host bit-exactly with `run_tflite`.

Example:

>>> import keras, keras_patch
>>> base = keras.applications.MobileNetV2(input_shape=(144, 144, 3), alpha=0.35, weights=None)
>>> model = keras_patch.wrap_stage(base, until="block_5_add", grid=(4, 4))  # doctest: +SKIP
>>> print(keras_patch.profile(model).table())  # doctest: +SKIP
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import logging
import sys

from keras_patch._version import __version__
from keras_patch.errors import (
    InvalidModelError,
    InvalidOptionsError,
    KerasPatchError,
    PlanError,
    UnsupportedModelError,
)
from keras_patch.graph.patchify import patchify, patchify_stages
from keras_patch.arena.profiler import Profile, profile
from keras_patch.runtime.host import run_tflite
from keras_patch.graph.unpatchify import unpatchify
from keras_patch.planner.plan import PatchPlan
from keras_patch.planner.search import plan

# The Keras-side API imports TensorFlow and Keras (about 10 s): it loads on
# first access (PEP 562), so that `import keras_patch` and the command line on
# a `.tflite` stay fast.
_LAZY = {
    "PatchStage": "keras_patch.keras.patch_stage",
    "export_tflite": "keras_patch.keras.export",
    "wrap_stage": "keras_patch.keras.wrap",
}

_PATCH_STAGE_MODULE = _LAZY["PatchStage"]


def __getattr__(name: str):
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'keras_patch' has no attribute '{name}'")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(_LAZY))


class _RegisterPatchStageWithKeras(importlib.abc.MetaPathFinder):
    """Imports `PatchStage` right after `keras`, registering it for `.keras` loading.

    `import keras_patch` used to import Keras and so registered `PatchStage`
    with `keras.saving`; it no longer imports Keras, but a model saved with a
    `PatchStage` still loads with `keras.models.load_model` after
    `import keras_patch`, whichever of the two was imported first.
    """

    def find_spec(self, fullname, path=None, target=None):
        if fullname != "keras":
            return None
        # TensorFlow asks for keras' spec without importing it: only loading it counts.
        for finder in sys.meta_path:
            find_spec = getattr(finder, "find_spec", None)
            if finder is self or find_spec is None:
                continue
            spec = find_spec(fullname, path, target)
            if spec is not None:
                break
        else:
            return None
        if spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec
        exec_module = spec.loader.exec_module

        def exec_module_then_register(module):
            _remove_keras_hook()
            exec_module(module)
            _register_patch_stage()

        spec.loader.exec_module = exec_module_then_register
        return spec


def _register_patch_stage() -> None:
    try:
        importlib.import_module(_PATCH_STAGE_MODULE)
    except Exception as e:  # never break `import keras` itself
        logging.getLogger(__name__).debug("PatchStage not registered with Keras: %s", e)


def _remove_keras_hook() -> None:
    sys.meta_path[:] = [f for f in sys.meta_path if not isinstance(f, _RegisterPatchStageWithKeras)]


if "keras" in sys.modules:
    _register_patch_stage()
elif not any(isinstance(f, _RegisterPatchStageWithKeras) for f in sys.meta_path):
    sys.meta_path.insert(0, _RegisterPatchStageWithKeras())

__all__ = [
    "__version__",
    "InvalidModelError",
    "InvalidOptionsError",
    "KerasPatchError",
    "PatchPlan",
    "PatchStage",
    "PlanError",
    "Profile",
    "UnsupportedModelError",
    "export_tflite",
    "patchify",
    "patchify_stages",
    "plan",
    "profile",
    "run_tflite",
    "unpatchify",
    "wrap_stage",
]
