"""Sizing the TFLM tensor arena of a patched model for a microcontroller.

TFLM's arena has two parts: the *head* (the planned, non-persistent tensors
and scratch buffers) and the *tail* (persistent allocations: TfLiteEvalTensor
array, node/registration records, each kernel's OpData, quantization
multipliers...). `estimate_arena` adds:

* **head**: `keras_patch.profile(model, kernel="cmsis_nn").patched_peak_bytes`
  (the larger of the portable and the CMSIS-NN build's heads), the replica
  of TFLM's GreedyMemoryPlanner with KP_PATCH_STAGE's patch arena (equal to
  TFLM's own plan on every unpatched model tested, for the reference
  kernels). The CMSIS-NN build of the kernel is what an Arm board's TFLM
  library gets by default; its "CMSIS-NN context" scratch buffer
  (`keras_patch.stage.geometry.stage_buffers(options, "cmsis_nn")`) is in
  the head.
* **tail**: measured. The `tflite-micro` wheel cannot load KP_PATCH_STAGE, so
  the tail of the UNPATCHED model is measured (`measure_tflm_arena(...)
  .tail_bytes`, RecordingMicroAllocator). That is an upper bound for the
  patched model's non-stage ops: the unpatched model has one node, one OpData
  and per-channel multipliers for every layer inside the stage, and the wheel
  runs on a 64-bit host (8-byte pointers; TFLM on a Cortex-M uses 4), with
  USE_TFLM_COMPRESSION (8 more bytes of OpData per conv/FC node).
* **stage persistent**: for each KP_PATCH_STAGE, the core's persistent data
  (`geometry.kernel_persistent_bytes(options, pointer_bytes=4)`) plus the
  adapter's OpData (24 B on 32-bit) and one pointer per op input, each
  allocation rounded up to 16 bytes as TFLM does.
* **margin**: `ARENA_MARGIN_BYTES` (1 KiB) for what the reference planner
  replica does not see: CMSIS-NN kernels request small scratch buffers
  (e.g. for 3x3 convs; +16 to +80 B over the reference kernels measured
  by hand on MobileNetV2-0.35@96 and three small models, Cortex-M4,
  tflite-micro 90b983c2b) and the arena start is re-aligned to 16 bytes.

The total is rounded up to 16 bytes.

Example:

>>> from keras_patch.arduino.arena import estimate_arena
>>> est = estimate_arena(open("residual_patched.tflite", "rb").read())  # doctest: +SKIP
>>> est.total_bytes, est.head_bytes, est.tail_bytes, est.stage_persistent_bytes  # doctest: +SKIP
(32848, 15840, 12240, 3744)

On that model (tests' residual model, first block patched 3x3) TFLM on a
Cortex-M4 (QEMU mps2-an386, CMSIS-NN kernels) used 26,036 B of the 32,848 B.
"""

from __future__ import annotations

import numbers
from dataclasses import dataclass, field
from typing import List, Optional

from keras_patch.errors import KerasPatchError
from keras_patch.stage import geometry
from keras_patch.graph.patchify import find_stages, stage_options
from keras_patch.graph.tflite_model import ModelSource, TFLiteModel, read_model_bytes

#: Extra bytes on top of head + tail (see the module docstring).
ARENA_MARGIN_BYTES = 1024
#: sizeof(OpData) of tflm_ops/patch_stage.cc on a 32-bit MCU.
ADAPTER_OPDATA_BYTES = 24
POINTER_BYTES = 4


def align16(n: int) -> int:
    """`n` rounded up to a multiple of 16 (TFLM's buffer alignment)."""
    return (int(n) + 15) // 16 * 16


@dataclass
class ArenaEstimate:
    """How big the sketch's tensor arena is, and why.

    Attributes:
        total_bytes: the arena to allocate (16-byte multiple).
        head_bytes: planned activations + scratch (keras-patch planner).
        tail_bytes: persistent allocations of the unpatched model, measured
            with the tflite-micro wheel (or given).
        stage_persistent_bytes: KP_PATCH_STAGE persistent data, all stages.
        margin_bytes: `ARENA_MARGIN_BYTES`.
        tail_source: how `tail_bytes` was obtained.
        layer_by_layer_head_bytes: head of the unpatched model (for the report).
    """

    total_bytes: int
    head_bytes: int
    tail_bytes: int
    stage_persistent_bytes: int
    margin_bytes: int
    tail_source: str
    layer_by_layer_head_bytes: int = 0
    stage_persistent_parts: List[int] = field(default_factory=list)

    def explain(self) -> str:
        """One line per term, e.g. for the CLI and the sketch's comment."""
        return "\n".join([
            f"tensor arena {self.total_bytes:,} B = align16(",
            f"  head {self.head_bytes:,} B (keras_patch.profile: patched arena head, CMSIS-NN build; "
            f"layer by layer it would be {self.layer_by_layer_head_bytes:,} B)",
            f"  + tail {self.tail_bytes:,} B ({self.tail_source})",
            f"  + KP_PATCH_STAGE persistent {self.stage_persistent_bytes:,} B "
            f"(kernel_persistent_bytes + adapter OpData + input pointers, 32-bit)",
            f"  + margin {self.margin_bytes:,} B (CMSIS-NN scratch, arena alignment))",
        ])


def stage_persistent_bytes(model: TFLiteModel, op_index: int) -> int:
    """Persistent arena bytes one KP_PATCH_STAGE op takes on a 32-bit MCU."""
    opts = stage_options(model, op_index)
    num_inputs = len(model.op_inputs(op_index))
    return (align16(geometry.kernel_persistent_bytes(opts, pointer_bytes=POINTER_BYTES))
            + align16(ADAPTER_OPDATA_BYTES) + align16(POINTER_BYTES * num_inputs))


def measure_unpatched_tail(tflite_bytes: ModelSource) -> int:
    """Tail bytes of the unpatched model in the tflite-micro wheel (child process)."""
    from keras_patch.arena.tflm_arena import measure_tflm_arena
    from keras_patch.graph.unpatchify import unpatchify

    return measure_tflm_arena(unpatchify(read_model_bytes(tflite_bytes))).tail_bytes


def estimate_arena(tflite_bytes: ModelSource, tail_bytes: Optional[int] = None) -> ArenaEstimate:
    """The tensor arena a patched (or plain) int8 model needs under TFLM on a 32-bit MCU.

    Args:
        tflite_bytes: the model.
        tail_bytes: persistent bytes to use instead of measuring them with
            the tflite-micro wheel.

    Raises:
        keras_patch.arena.tflm_arena.TFLMError: the wheel could not run the
            unpatched model (pass `tail_bytes`).
    """
    from keras_patch.arena.profiler import profile

    if tail_bytes is not None and (isinstance(tail_bytes, bool) or not isinstance(tail_bytes, numbers.Integral)
                                   or tail_bytes < 0):
        raise KerasPatchError(f"--tail-bytes must be a whole number of bytes, 0 or more, got {tail_bytes!r}.")
    data = read_model_bytes(tflite_bytes)
    # The Arm boards' TFLM library ships CMSIS-NN, so the kernel's fast path is on there by
    # default (-DKP_NO_CMSIS_NN turns it off); its context buffer only adds to the head, and
    # the larger of the two builds' heads fits either.
    prof = profile(data)
    cmsis_head = profile(data, kernel="cmsis_nn").patched_peak_bytes
    model = TFLiteModel.from_bytes(data)
    parts = [stage_persistent_bytes(model, op) for op in find_stages(model)]
    if tail_bytes is None:
        tail = measure_unpatched_tail(data)
        source = "unpatched model, tflite-micro wheel RecordingMicroAllocator, 64-bit host: an upper bound"
    else:
        tail = int(tail_bytes)
        source = "given"
    head = max(prof.patched_peak_bytes, int(cmsis_head))
    total = align16(head + tail + sum(parts) + ARENA_MARGIN_BYTES)
    return ArenaEstimate(
        total_bytes=total,
        head_bytes=head,
        tail_bytes=tail,
        stage_persistent_bytes=sum(parts),
        margin_bytes=ARENA_MARGIN_BYTES,
        tail_source=source,
        layer_by_layer_head_bytes=prof.layer_by_layer_peak_bytes,
        stage_persistent_parts=parts,
    )
