"""Exception types raised by keras-patch.

All of them derive from `ValueError`, so callers that already catch bad
arguments keep working; the subclasses let tools tell a corrupt file from an
unsupported graph.
"""


class KerasPatchError(ValueError):
    """Base class of every error keras-patch raises on bad input."""


class InvalidModelError(KerasPatchError):
    """The bytes are not a readable model: a `.tflite` flatbuffer or `.keras` archive (corrupt, truncated)."""


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
