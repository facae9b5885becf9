"""Never worse than layer by layer: the check every path that writes a patched model goes through.

A patch stage trades MACs for memory; a badly chosen one (a stage that ends
at a low resolution, a coarse grid, a scratch buffer larger than what it
saves) can *raise* the TFLM arena head above that of the same model run layer
by layer. `check_never_worse` profiles a patched model and refuses it when
its predicted head is above the unpatched one, unless `allow_worse=True`
(`--allow-worse` on the command line) says the user wants it anyway.

`keras-patch patchify`, `keras-patch export` (a `.keras` model with
`PatchStage`s), `keras-patch export-arduino` and the Arduino export functions
call it; `keras_patch.plan` never returns such stages in the first place.

Example:

>>> from keras_patch.planner.guard import check_never_worse
>>> prof = check_never_worse(open("patched.tflite", "rb").read())  # doctest: +SKIP
"""

from __future__ import annotations

import logging
from typing import Optional

from keras_patch.errors import WorseThanLayerByLayerError

logger = logging.getLogger(__name__)

#: What the messages suggest instead of a stage set that makes memory worse.
PLAN_ADVICE = "`keras-patch plan MODEL.tflite` (keras_patch.plan) chooses stages that lower it"


def worse_message(patched_bytes: int, layer_by_layer_bytes: int, what: str = "the patched model",
                  override: str = "--allow-worse / allow_worse=True", kernel: str = "portable") -> str:
    """The one-line explanation of a patched head above the layer-by-layer head."""
    advice = PLAN_ADVICE if kernel == "portable" else PLAN_ADVICE.replace("MODEL.tflite", f"MODEL.tflite --kernel {kernel}")
    build = "" if kernel == "portable" else f" with the {kernel} kernel build"
    return (f"{what}: its patch stages raise the predicted TFLM arena head{build} to {patched_bytes:,} B, above the "
            f"{layer_by_layer_bytes:,} B of running it layer by layer (+{patched_bytes - layer_by_layer_bytes:,} B); "
            f"{advice}, or pass {override} to keep these stages anyway.")


def check_never_worse(model, *, allow_worse: Optional[bool] = False, kernel: str = "portable",
                      what: str = "the patched model", override: str = "--allow-worse / allow_worse=True"):
    """Profiles `model` and refuses it if its patch stages raise the predicted arena head.

    Args:
        model: a (patched) int8 `.tflite` as bytes or a path, or a `Profile`
            of one (then nothing is profiled again).
        allow_worse: False: raise; None: log a warning instead; True: accept
            silently.
        kernel: the KP_PATCH_STAGE build the head is predicted for
            ("portable" or "cmsis_nn", see `keras_patch.profile`).
        what: how the message names the model (e.g. its file name).
        override: how the message names the way to accept it anyway.

    Returns:
        The model's `Profile`.

    Raises:
        WorseThanLayerByLayerError: `profile(model).patched_peak_bytes >
            layer_by_layer_peak_bytes` and not `allow_worse`.
    """
    from keras_patch.arena.profiler import Profile, profile

    prof = model if isinstance(model, Profile) else profile(model, kernel=kernel)
    patched, layer_by_layer = prof.patched_peak_bytes, prof.layer_by_layer_peak_bytes
    if patched > layer_by_layer and allow_worse is not True:
        message = worse_message(patched, layer_by_layer, what, override, kernel)
        if allow_worse is False:
            raise WorseThanLayerByLayerError(message)
        logger.warning("%s", message)
    return prof
