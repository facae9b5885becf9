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

from keras_patch._version import __version__
from keras_patch.errors import (
    InvalidModelError,
    InvalidOptionsError,
    KerasPatchError,
    UnsupportedModelError,
)
from keras_patch.export import export_tflite
from keras_patch.layers.patch_stage import PatchStage
from keras_patch.patchify import patchify
from keras_patch.profiler import Profile, profile
from keras_patch.runtime import run_tflite
from keras_patch.unpatchify import unpatchify
from keras_patch.wrap import wrap_stage

__all__ = [
    "__version__",
    "InvalidModelError",
    "InvalidOptionsError",
    "KerasPatchError",
    "PatchStage",
    "Profile",
    "UnsupportedModelError",
    "export_tflite",
    "patchify",
    "profile",
    "run_tflite",
    "unpatchify",
    "wrap_stage",
]
