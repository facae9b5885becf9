"""Keras layers of keras-patch."""

from keras_patch.layers.patch_stage import STAGE_SCOPE_PREFIX
from keras_patch.layers.patch_stage import SUPPORTED_LAYERS
from keras_patch.layers.patch_stage import PatchStage
from keras_patch.layers.patch_stage import stage_of_tensor_name
from keras_patch.layers.patch_stage import stage_scope_name
from keras_patch.layers.patch_stage import validate_block

__all__ = [
    "STAGE_SCOPE_PREFIX",
    "SUPPORTED_LAYERS",
    "PatchStage",
    "stage_of_tensor_name",
    "stage_scope_name",
    "validate_block",
]
