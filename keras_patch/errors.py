"""Exception types raised by keras-patch.

All of them derive from `ValueError`, so callers that already catch bad
arguments keep working; the subclasses let tools tell a corrupt file from an
unsupported graph.
"""


class KerasPatchError(ValueError):
    """Base class of every error keras-patch raises on bad input."""


class InvalidModelError(KerasPatchError):
    """The bytes are not a readable model: a `.tflite` flatbuffer or `.keras` archive (corrupt, truncated)."""


class WorseThanLayerByLayerError(KerasPatchError):
    """Patch stages that raise the predicted TFLM arena head above running the model layer by layer.

    The message names both heads and suggests `keras-patch plan`, which only
    chooses stages that lower the head; pass `allow_worse=True`
    (`--allow-worse`) to keep such stages anyway.
    """


class UnsupportedModelError(KerasPatchError):
    """A readable model that keras-patch cannot patch or profile as asked.

    The message names the operator (index, type, output tensor) or the tensor
    at fault.
    """


class InvalidOptionsError(KerasPatchError):
    """KP_PATCH_STAGE options that do not follow `docs/patch_stage_op.md`.

    The message names the offending options key.
    """


class CalibrationDataError(KerasPatchError):
    """A representative (calibration) dataset the int8 converter cannot use.

    Empty data, a sample whose shape does not fit the model input, or values
    that are NaN/inf (or overflow float32 inside the model).  The message
    names the sample (index) and the problem.
    """


class PlanError(KerasPatchError):
    """`keras_patch.plan` cannot give what was asked.

    A MAC-overhead limit below 1 (or not a finite number), an SRAM limit no
    plan within the overhead limit fits (the message says the lowest head
    reachable), or a model without a run of ops a patch stage can take.
    """


class OfflinePlanError(KerasPatchError):
    """An offline memory plan (`OfflineMemoryAllocation` metadata) TFLM must not trust.

    It does not match the model (version, subgraph, one offset per tensor),
    has an offset below -1, unaligned, or on a constant/variable tensor, or
    places two buffers alive at the same op on overlapping bytes (other than
    an in-place pair at one offset). The message names the tensors and ops.
    """
