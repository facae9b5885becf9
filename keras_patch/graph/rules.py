"""Which ops and runs of ops can become a KP_PATCH_STAGE: the patchability rules, written once.

Each rule is a function that returns `None` when the op (or run of ops)
passes and otherwise the reason, as the message the user reads (the rule's
docstring says what it checks, in the manner of Arm Vela's
`supported_operators`). `patchify.plan_stage` raises `UnsupportedModelError`
with the first failing rule's message; the planner (`keras_patch.planner`)
and `planner.schedule.candidate_splits` use the same rules to enumerate
candidate stages, so a stage the planner proposes is one `patchify_stages`
accepts.

The op table is the specification's (`docs/patch_stage_op.md`, "Stage
tensors and layers"): `keras_patch.stage.options.LAYER_OP_NAMES`;
`SUPPORTED_STAGE_OPS` is its inverse (TFLite op name -> layer op code).

Example:

>>> sorted(SUPPORTED_STAGE_OPS)[:3]
['ADD', 'AVERAGE_POOL_2D', 'CONV_2D']
>>> from keras_patch.graph.tflite_model import TFLiteModel  # doctest: +SKIP
>>> model = TFLiteModel.from_bytes("model.tflite")  # doctest: +SKIP
>>> op_rule_failure(model, 0)  # doctest: +SKIP
"op 0 (QUANTIZE -> ...) cannot run inside a patch stage. Supported ops: ADD, ..."
"""

from __future__ import annotations

from typing import Callable, List, Optional, Sequence

import numpy as np

from keras_patch.graph.tflite_model import TFLiteModel
from keras_patch.stage import options as o

#: TFLite op name -> KP_PATCH_STAGE layer op code, from the spec's table (`options.LAYER_OP_NAMES`).
SUPPORTED_STAGE_OPS = {name: code for code, name in o.LAYER_OP_NAMES.items()}

#: A rule on one op: `rule(model, op_index) -> None | reason`.
OpRule = Callable[[TFLiteModel, int], Optional[str]]



def layer_label(model: TFLiteModel, t: int) -> str:
    """Tensor `t` for an error message: its Keras layer name and index, e.g. "'block_1_project_BN' (tensor 57)".

    The converter's tensor names run to hundreds of characters (every fused
    layer's scope, `;`-joined); `keras_patch.planner.schedule.short_tensor_name`
    keeps the layer name. The index tells apart tensors of one layer.
    """
    from keras_patch.planner.schedule import short_tensor_name

    return f"'{short_tensor_name(model.tensor(t).name)}' (tensor {t})"


def op_label(model: TFLiteModel, op: int) -> str:
    """Op `op` for an error message with its output's Keras layer name: 'op 12 (CONV_2D -> block_1_project_BN)'."""
    from keras_patch.planner.schedule import short_tensor_name

    outs = model.op_outputs(op)
    name = short_tensor_name(model.tensor(outs[0]).name) if outs else "?"
    return f"op {op} ({model.op_type(op)} -> {name})"

def op_type_supported(model: TFLiteModel, op: int) -> Optional[str]:
    """The op is one KP_PATCH_STAGE runs (the spec's op table)."""
    if model.op_type(op) not in SUPPORTED_STAGE_OPS:
        return (f"{op_label(model, op)} cannot run inside a patch stage. Supported ops: "
                f"{', '.join(sorted(SUPPORTED_STAGE_OPS))}. Choose a split before it.")
    return None


def op_single_output(model: TFLiteModel, op: int) -> Optional[str]:
    """The op writes exactly one tensor."""
    outputs = model.op_outputs(op)
    if len(outputs) != 1:
        return f"{op_label(model, op)} has {len(outputs)} outputs."
    return None


def tensor_failure(model: TFLiteModel, t: int, label: str) -> Optional[str]:
    """A stage tensor is a fixed-shape NHWC int8 tensor of batch 1 with per-tensor quantization."""
    info = model.tensor(t)
    if any(d < 0 for d in info.shape_signature[1:]):
        return (f"{label}: tensor {layer_label(model, t)} has a dynamic shape {info.shape_signature}; "
                f"patch stages need fixed height, width and channels.")
    if len(info.shape) != 4 or info.shape[0] != 1:
        return f"{label}: tensor {layer_label(model, t)} has shape {info.shape}; patch stages need NHWC with batch 1."
    if info.dtype != np.int8:
        return (f"{label}: tensor {layer_label(model, t)} is {np.dtype(info.dtype).name}, not int8: the model is not "
                f"fully int8-quantized (float models cannot be patched).")
    if info.scale.size != 1 or info.zero_point.size != 1:
        return f"{label}: tensor {layer_label(model, t)} needs per-tensor quantization, has {info.scale.size} scales."
    return None


def mean_output_failure(model: TFLiteModel, t: int, label: str) -> Optional[str]:
    """A MEAN's output is an int8 `[1, C]` or `[1, 1, 1, C]` tensor with per-tensor quantization."""
    info = model.tensor(t)
    if tuple(info.shape[:-1]) not in ((1,), (1, 1, 1)) or any(d < 0 for d in info.shape_signature[1:]):
        return (f"{label}: tensor {layer_label(model, t)} has shape {info.shape}; a MEAN in a patch stage "
                f"averages height and width into [1, C] or [1, 1, 1, C].")
    if info.dtype != np.int8 or info.scale.size != 1 or info.zero_point.size != 1:
        return f"{label}: tensor {layer_label(model, t)} must be int8 with per-tensor quantization."
    return None


def op_activations_int8(model: TFLiteModel, op: int) -> Optional[str]:
    """The op's activation inputs and its output are NHWC int8 tensors with per-tensor quantization
    (a MEAN's output: `mean_output_failure`)."""
    for t in _activation_inputs(model, op):
        failure = tensor_failure(model, t, op_label(model, op))
        if failure:
            return failure
    check = mean_output_failure if model.op_type(op) == "MEAN" else tensor_failure
    return check(model, model.op_outputs(op)[0], op_label(model, op)) if model.op_outputs(op) else None


def op_constant_weights(model: TFLiteModel, op: int) -> Optional[str]:
    """A CONV_2D / DEPTHWISE_CONV_2D has a constant int8 filter and a constant (or no) bias."""
    if model.op_type(op) not in ("CONV_2D", "DEPTHWISE_CONV_2D"):
        return None
    inputs = model.op_inputs(op)
    label = op_label(model, op)
    filt = model.tensor(inputs[1])
    if filt.dtype != np.int8:
        return f"{label}: filter is {np.dtype(filt.dtype).name}, not int8."
    for t, what in ((inputs[1], "filter"), (inputs[2] if len(inputs) > 2 else -1, "bias")):
        if t >= 0 and not model.is_constant(t):
            return f"{label}: its {what} {layer_label(model, t)} is not a constant."
    return None


def op_add_same_shapes(model: TFLiteModel, op: int) -> Optional[str]:
    """An ADD adds two tensors of the same shape (no broadcasting)."""
    if model.op_type(op) != "ADD":
        return None
    inputs = model.op_inputs(op)
    shapes = {model.tensor(inputs[0]).shape, model.tensor(inputs[1]).shape}
    if len(shapes) != 1:
        return f"{op_label(model, op)}: broadcasting ADD {sorted(shapes)} is not supported in a stage."
    return None


def op_pad_spatial(model: TFLiteModel, op: int) -> Optional[str]:
    """A PAD has constant 4x2 paddings that pad only height and width, by non-negative amounts."""
    if model.op_type(op) != "PAD":
        return None
    inputs = model.op_inputs(op)
    label = op_label(model, op)
    paddings = model.constant(inputs[1]) if model.is_constant(inputs[1]) else None
    if paddings is None or paddings.shape != (4, 2):
        return f"{label}: paddings must be a constant 4x2 tensor."
    if paddings[0].any() or paddings[3].any() or (paddings < 0).any():
        return f"{label}: only non-negative height/width padding is supported, got {paddings.tolist()}."
    return None


def op_mean_global(model: TFLiteModel, op: int) -> Optional[str]:
    """A MEAN averages a 4-D tensor over height and width only (a global average pool):
    its axes are a constant {1, 2} (or {-3, -2})."""
    if model.op_type(op) != "MEAN":
        return None
    inputs = model.op_inputs(op)
    label = op_label(model, op)
    axes = model.constant(inputs[1]) if len(inputs) > 1 and model.is_constant(inputs[1]) else None
    rank = len(model.tensor(inputs[0]).shape)
    if axes is None or rank != 4 or sorted(int(a) % 4 for a in np.ravel(axes)) != [1, 2]:
        shown = "not a constant" if axes is None else np.ravel(axes).tolist()
        return (f"{label}: only a MEAN over height and width of a 4-D tensor (axes [1, 2], a global "
                f"average pool) can run in a patch stage; its axes are {shown}.")
    return None


def op_relu6_keeps_quantization(model: TFLiteModel, op: int) -> Optional[str]:
    """A RELU6 has the same scale and zero point on its input and output.

    The two int8 references disagree otherwise: TFLM's RELU6 kernel clamps to
    [0, 6] in the input's quantization and copies the bytes (it ignores the
    output's), LiteRT's reference kernel requantizes. A stage would match one
    of them only, so such a RELU6 stays a builtin op.
    """
    if model.op_type(op) != "RELU6":
        return None
    a, b = model.tensor(model.op_inputs(op)[0]), model.tensor(model.op_outputs(op)[0])
    same = (np.array_equal(np.float32(a.scale), np.float32(b.scale))
            and np.array_equal(a.zero_point, b.zero_point))
    if same:
        return None
    return (f"{op_label(model, op)} requantizes (input scale {float(a.scale[0]):.6g}, zero point "
            f"{int(a.zero_point[0])}; output {float(b.scale[0]):.6g}, {int(b.zero_point[0])}): TFLM's int8 RELU6 "
            f"ignores the output quantization while LiteRT's reference kernel requantizes, so no stage can "
            f"match both. End the stage before it, or start it after.")


#: The rules every op of a stage must pass, in the order they are checked.
OP_RULES: List[OpRule] = [
    op_type_supported, op_single_output, op_constant_weights, op_add_same_shapes, op_pad_spatial,
    op_mean_global, op_relu6_keeps_quantization,
]


def mean_not_last(model: TFLiteModel, op_indices: Sequence[int]) -> Optional[str]:
    """A MEAN can only end a stage (its 1x1 output exists once, after the last patch)."""
    for op in op_indices[:-1]:
        if model.op_type(op) == "MEAN":
            return (f"{op_label(model, op)} is not the stage's last op: a MEAN (global average pool) "
                    f"can only end a patch stage. End the stage at it.")
    return None


def op_rule_failure(model: TFLiteModel, op: int, check_tensors: bool = True) -> Optional[str]:
    """The first failing op rule's message for `op`, or None when it can run inside a stage.

    `check_tensors=False` leaves out `op_activations_int8` (`plan_stage`
    checks the stage tensors itself, after the structural checks).
    """
    rules = OP_RULES + ([op_activations_int8] if check_tensors else [])
    for rule in rules:
        failure = rule(model, op)
        if failure:
            return failure
    return None


def _activation_inputs(model: TFLiteModel, op: int) -> List[int]:
    """The op's non-constant inputs that are stage tensors (ADD: both; others: the first)."""
    inputs = model.op_inputs(op)
    count = 2 if model.op_type(op) == "ADD" else 1
    return [t for t in inputs[:count] if t >= 0]


# ---------------------------------------------------------------------------
# Rules on a run of ops (entry tensor -> ops -> exit tensor)
# ---------------------------------------------------------------------------
def exit_not_model_output(model: TFLiteModel, exit_tensor: int) -> Optional[str]:
    """The stage ends before the model does: its exit tensor is not a model output."""
    if exit_tensor in model.outputs:
        return (f"The split tensor {layer_label(model, exit_tensor)} is a model output: the stage must "
                f"end before the model does (choose an earlier split).")
    return None


def single_exit(model: TFLiteModel, op_indices: Sequence[int], consumers: Optional[dict] = None) -> Optional[str]:
    """Only the last op's output leaves the stage: every other op's output is read inside it only."""
    consumers = model.consumers() if consumers is None else consumers
    op_set = set(op_indices)
    for op in op_indices[:-1]:
        t = model.op_outputs(op)[0]
        outside = [c for c in consumers.get(t, []) if c not in op_set]
        if outside or t in model.outputs:
            user = op_label(model, outside[0]) if outside else "the model outputs"
            return (f"The stage is not single-exit: tensor {layer_label(model, t)} written by "
                    f"{op_label(model, op)} inside the stage is also read by {user} after the split. "
                    f"Choose a split where only one tensor crosses.")
    return None


def single_entry_failure(model: TFLiteModel, op: int, t: int) -> str:
    """The message for a stage op that reads a tensor from outside the stage other than its entry."""
    return (f"The stage is not single-entry: {op_label(model, op)} reads tensor {layer_label(model, t)}, "
            f"which comes from outside the stage: a residual connection or branch would be cut "
            f"(start the stage at or before that tensor, or end it before this op).")


def tiled_tensor(model: TFLiteModel, exit_tensor: int) -> int:
    """The tensor a stage ending at `exit_tensor` cuts into patches: the exit itself, or the input
    of the MEAN that writes it (docs/patch_stage_op.md, "Global average pool")."""
    producer = model.producers().get(exit_tensor)
    if producer is not None and model.op_type(producer) == "MEAN":
        return model.op_inputs(producer)[0]
    return exit_tensor


def grid_fits(model: TFLiteModel, exit_tensor: int, grid: tuple) -> Optional[str]:
    """The grid has at most as many rows and columns as the stage output (or a final MEAN's input) has pixels."""
    tiled = tiled_tensor(model, exit_tensor)
    out_h, out_w = model.tensor(tiled).shape[1:3]
    if grid[0] > out_h or grid[1] > out_w:
        what = "stage output" if tiled == exit_tensor else "input of the stage's final MEAN"
        return (f"grid {grid[0]}x{grid[1]} is larger than the {what} {out_h}x{out_w} "
                f"(tensor {layer_label(model, tiled)}): use at most {out_h}x{out_w} patches.")
    return None


def run_failure(model: TFLiteModel, op_indices: Sequence[int], entry: int, consumers: Optional[dict] = None) -> Optional[str]:
    """The first failing rule of the contiguous run `op_indices` starting at tensor `entry` (None: a stage).

    Checks, in order: every op passes `op_rule_failure`; single entry (every
    activation an op reads is `entry` or written inside the run); the exit
    is not a model output; single exit; every op but the last feeds the run.
    """
    inside = {entry}
    for op in op_indices:
        failure = op_rule_failure(model, op)
        if failure:
            return failure
        for t in _activation_inputs(model, op):
            if t not in inside:
                return single_entry_failure(model, op, t)
        inside.add(model.op_outputs(op)[0])
    exit_tensor = model.op_outputs(op_indices[-1])[0]
    failure = (mean_not_last(model, op_indices) or exit_not_model_output(model, exit_tensor)
               or single_exit(model, op_indices, consumers))
    if failure:
        return failure
    consumers = model.consumers() if consumers is None else consumers
    op_set = set(op_indices)
    for op in op_indices[:-1]:
        if not any(c in op_set for c in consumers.get(model.op_outputs(op)[0], [])):
            return (f"{op_label(model, op)} inside the stage writes a tensor no op of the stage reads: "
                    f"the stage's output does not depend on it.")
    return None


def patchable_runs(model: TFLiteModel, max_layers: int = o.MAX_LAYERS, first_ops: Optional[Sequence[int]] = None) -> List[tuple]:
    """Every contiguous run of ops that `run_failure` accepts, as `(first_op, last_op, entry, exit)`.

    The same rules as `run_failure`, checked incrementally while a run
    grows op by op: a run starting at op `i` reads one tensor from outside
    (op `i`'s activation input); it stops growing at an op that breaks an op
    rule, reads a second outside tensor or follows an op whose output is a
    model output or read by nobody; it is a stage wherever every tensor it
    writes but the last is read only inside it.

    Args:
        model: the model.
        max_layers: the longest run (`options.MAX_LAYERS`, the op's limit).
        first_ops: the ops runs may start at (default: every op).

    Returns:
        Runs in order of first op, then last op.
    """
    consumers = model.consumers()
    outputs = set(model.outputs)
    n = model.num_ops
    op_ok = [op_rule_failure(model, op) is None for op in range(n)]
    reach = []  # the last op that reads an op's output (-1: none)
    for op in range(n):
        outs = model.op_outputs(op)
        reach.append(max(consumers.get(outs[0], [-1])) if len(outs) == 1 else -1)
    runs = []
    for i in (range(n) if first_ops is None else first_ops):
        if not op_ok[i]:
            continue
        acts = set(_activation_inputs(model, i))
        if len(acts) != 1:
            continue
        (entry,) = acts
        inside = {entry}
        furthest = -1  # the last op reading a tensor written inside the run before its last op
        for j in range(i, min(n, i + max_layers)):
            if not op_ok[j] or any(t not in inside for t in _activation_inputs(model, j)):
                break
            out = model.op_outputs(j)[0]
            if furthest <= j and out not in outputs:
                runs.append((i, j, entry, out))
            if out in outputs or reach[j] < 0 or model.op_type(j) == "MEAN":  # a MEAN ends every run
                break
            furthest = max(furthest, reach[j])
            inside.add(out)
    return runs


def model_unpatched(model: TFLiteModel) -> Optional[str]:
    """The model holds no KP_PATCH_STAGE op yet: stages are chosen on the unpatched model (keras_patch.unpatchify() it first)."""
    existing = [op for op in range(model.num_ops) if model.op_type(op) == o.CUSTOM_CODE]
    if not existing:
        return None
    listed = ", ".join(op_label(model, op) for op in existing[:3]) + (", ..." if len(existing) > 3 else "")
    return (f"The model is already patched ({len(existing)} KP_PATCH_STAGE op{'s' * (len(existing) > 1)}: "
            f"{listed}); stages are chosen on the unpatched model: keras_patch.unpatchify() it first.")
