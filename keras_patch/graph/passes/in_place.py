"""In-place depthwise convolutions: outputs written over the inputs they consume.

Two rewrites of a `TFLiteModel`, both bit-exact
(`docs/patch_stage_op.md`, section "In place"):

* `make_depthwise_in_place`: each eligible builtin DEPTHWISE_CONV_2D
  (`keras_patch.arena.aliases.depthwise_in_place_failure` is None: depth
  multiplier 1, its input dies at it, no more output than input pixels)
  becomes a one-layer `KP_PATCH_STAGE` with `in_place` set and grid 1x1.
  Its scratch is one input channel plane (`depthwise_save_bytes`) and its
  output may share its input's memory, which an offline memory plan
  (`keras_patch.arena.aliases.in_place_aliases`) then places there;
* `set_stages_in_place`: sets `in_place` on multi-layer stages whose patch
  arena (plus, for `kernel="cmsis_nn"`, the CMSIS-NN context) it lowers.

Both change only the ops they list in their result; what other passes
need (aliases, scratch sizes) follows from the options
(`keras_patch.stage.geometry.plan_patch_arena`).

Example (the docs/arena.md section "In-place operators" runs it in full):

>>> import keras, numpy as np, keras_patch  # doctest: +SKIP
>>> from keras_patch.graph.patchify import stage_options  # doctest: +SKIP
>>> from keras_patch.graph.tflite_model import TFLiteModel  # doctest: +SKIP
>>> base = keras.applications.MobileNetV2((96, 96, 3), alpha=0.35, weights=None, classes=10)  # doctest: +SKIP
>>> tflite = keras_patch.export_tflite(base, np.random.rand(4, 96, 96, 3).astype("float32"))  # doctest: +SKIP
>>> model = TFLiteModel.from_bytes(keras_patch.patchify(tflite, "block_2_add", (3, 3)))  # doctest: +SKIP
>>> set_stages_in_place(model)  # doctest: +SKIP
[0]
>>> changed = make_depthwise_in_place(model)  # doctest: +SKIP
>>> stage_options(model, changed[0]).in_place  # doctest: +SKIP
True
"""

from __future__ import annotations

import dataclasses
from typing import Iterable, List, Optional

import numpy as np

from keras_patch.arena.aliases import depthwise_in_place_failure
from keras_patch.errors import UnsupportedModelError
from keras_patch.graph.patchify import find_stages, plan_stage, rewrite_stages, stage_options
from keras_patch.graph.tflite_model import TFLiteModel
from keras_patch.stage import geometry
from keras_patch.stage import options as o


def make_depthwise_in_place(model: TFLiteModel, ops: Optional[Iterable[int]] = None) -> List[int]:
    """Turns builtin DEPTHWISE_CONV_2D ops into one-layer in-place KP_PATCH_STAGE ops (in place).

    Args:
        model: the model to rewrite.
        ops: op indices to convert; each must be eligible. None: every
            eligible DEPTHWISE_CONV_2D op (the others are left as they are).

    Returns:
        The indices of the converted ops (each KP_PATCH_STAGE op takes its
        DEPTHWISE_CONV_2D op's place, so indices do not move).

    Raises:
        UnsupportedModelError: an op listed in `ops` that cannot run in
            place (the message says why, naming the op).
    """
    explicit = ops is not None
    indices = sorted(set(int(i) for i in ops)) if explicit else range(model.num_ops)
    plans = []
    for op in indices:
        if not explicit and model.op_type(op) != "DEPTHWISE_CONV_2D":
            continue
        failure = depthwise_in_place_failure(model, op)
        if failure is not None:
            if explicit:
                raise UnsupportedModelError(failure)
            continue
        plan = plan_stage(model, [op], model.op_inputs(op)[0], model.op_outputs(op)[0], (1, 1))
        plan.options = dataclasses.replace(plan.options, in_place=True)
        o.validate_options(plan.options)
        plans.append(plan)
    if plans:
        rewrite_stages(model, plans)
    return [plan.op_indices[0] for plan in plans]


def _scratch_bytes(options: o.StageOptions, kernel: str) -> int:
    return sum(b.bytes for b in geometry.stage_buffers(options, kernel))


def set_stages_in_place(model: TFLiteModel, kernel: str = "portable") -> List[int]:
    """Sets `in_place` on the multi-layer KP_PATCH_STAGE ops where it lowers their scratch (in place).

    A stage's scratch is its patch arena plus, for `kernel="cmsis_nn"`, its
    CMSIS-NN context (in-place layers run the portable code there). Stages
    already in place and one-layer stages are left as they are.

    Returns:
        The indices of the stage ops that changed.
    """
    if kernel not in geometry.KERNELS:
        raise ValueError(f"kernel must be one of {geometry.KERNELS}, not {kernel!r}")
    changed = []
    for op in find_stages(model):
        options = stage_options(model, op)
        if options.in_place or options.num_layers < 2:
            continue
        in_place = dataclasses.replace(options, in_place=True)
        if _scratch_bytes(in_place, kernel) < _scratch_bytes(options, kernel):
            model.operator(op).customOptions = np.frombuffer(o.encode_options(in_place), np.uint8)
            changed.append(op)
    return changed


def stage_in_place_failure(model: TFLiteModel, op: int, last_readers=None) -> Optional[str]:
    """None if KP_PATCH_STAGE op `op`, a one-layer depthwise stage not yet in place (e.g. a folded
    PAD's, with explicit pads), can run in place over its input; else why not. The rules of
    `depthwise_in_place_failure`: grid 1x1, depth multiplier 1, an input that dies at it, no more
    output than input pixels, a saved plane smaller than the tensor it saves."""
    from keras_patch.arena import aliases

    options = stage_options(model, op)
    label = model.op_label(op)
    if options.num_layers != 1 or options.layers[0].op != o.OP_DEPTHWISE_CONV_2D:
        return f"{label} is not a one-layer DEPTHWISE_CONV_2D stage."
    if options.in_place:
        return f"{label} already runs in place."
    if tuple(options.grid) != (1, 1):
        return f"{label}: grid {options.grid[0]}x{options.grid[1]}; in place needs 1x1."
    if last_readers is None:
        last_readers = aliases._last_readers(model)
    t_in, t_out = model.op_inputs(op)[0], model.op_outputs(op)[0]
    _, ih, iw, ic = model.tensor(t_in).shape
    _, oh, ow, oc = model.tensor(t_out).shape
    if oc != ic:
        return f"{label}: depth multiplier {oc // max(ic, 1)}; in place needs 1."
    if not aliases._dies_at(model, t_in, op, last_readers):
        return f"{label}: its input is read after it (or is a graph output)."
    if oh * ow > ih * iw:
        return f"{label}: output {oh}x{ow} has more pixels than input {ih}x{iw}."
    if aliases.depthwise_save_bytes(ih, iw) >= min(ih * iw * ic, oh * ow * oc):
        return f"{label}: saving one {ih}x{iw} plane costs as much as the tensor it saves."
    return None


def set_one_layer_stages_in_place(model: TFLiteModel, ops: Iterable[int]) -> List[int]:
    """Sets `in_place` on one-layer depthwise stages (`stage_in_place_failure` is None for each).

    Raises:
        UnsupportedModelError: an op that cannot run in place (the reason).
    """
    changed = []
    for op in ops:
        reason = stage_in_place_failure(model, op)
        if reason:
            raise UnsupportedModelError(reason)
        options = dataclasses.replace(stage_options(model, op), in_place=True)
        model.operator(op).customOptions = np.frombuffer(o.encode_options(options), np.uint8)
        changed.append(op)
    return changed
