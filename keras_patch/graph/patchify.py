"""Rewriting an int8 `.tflite`: a run of ops becomes one KP_PATCH_STAGE custom op.

`patchify` is the public entry point for models keras-patch did not produce
(e.g. MobileNetV2 from the standard converter, float input and a QUANTIZE op
first); `export_tflite` uses `rewrite_stage` on the stages a Keras model marks
with `PatchStage`.

Example:

>>> import keras_patch
>>> patched = keras_patch.patchify(open("mbv2.tflite", "rb").read(),  # doctest: +SKIP
...                                split="model/block_5_add/Add", grid=(4, 4))
"""

from __future__ import annotations

import difflib
import re
from dataclasses import dataclass
from typing import List, Optional, Sequence, Union

import numpy as np
from ai_edge_litert import schema_py_generated as schema

from keras_patch.errors import InvalidOptionsError, UnsupportedModelError
from keras_patch.grid import check_grid
from keras_patch.stage import options as o
from keras_patch.stage.executor import ConstantTensor, prepare_stage
from keras_patch.graph import rules
from keras_patch.graph.rules import layer_label, op_label
from keras_patch.graph.tflite_model import ModelSource, TensorInfo, TFLiteModel, read_model_bytes

#: TFLite op name -> layer op code of the ops a stage may contain (one list: `rules.SUPPORTED_STAGE_OPS`).
SUPPORTED_STAGE_OPS = rules.SUPPORTED_STAGE_OPS


@dataclass
class StagePlan:
    """A stage found in a model: its ops, boundary tensors and KP_PATCH_STAGE form."""

    op_indices: List[int]
    entry_tensor: int
    exit_tensor: int
    options: o.StageOptions
    op_inputs: List[int]  # model tensor indices: entry, then filters/biases


def normalize_grid(grid) -> tuple:
    """`(rows, columns)` from a pair of positive ints, an int n or ASCII "4x4" (`keras_patch.grid.check_grid`)."""
    return check_grid(grid)


def default_entry_tensor(model: TFLiteModel) -> int:
    """The int8 activation the stage starts from: the model input, or its QUANTIZE."""
    if len(model.inputs) != 1:
        raise UnsupportedModelError(
            f"The model has {len(model.inputs)} inputs; give the stage's first tensor explicitly."
        )
    entry = model.inputs[0]
    info = model.tensor(entry)
    if info.dtype == np.int8:
        return entry
    consumers = model.consumers().get(entry, [])
    if len(consumers) == 1 and model.op_type(consumers[0]) == "QUANTIZE":
        out = model.op_outputs(consumers[0])[0]
        if model.tensor(out).dtype == np.int8:
            return out
    raise UnsupportedModelError(
        f"The model input '{info.name}' is {np.dtype(info.dtype).name} and is not quantized to int8 "
        f"by a QUANTIZE op: keras-patch needs a fully int8-quantized model "
        f"(convert with optimizations=[tf.lite.Optimize.DEFAULT], a representative dataset and "
        f"TFLITE_BUILTINS_INT8)."
    )


def resolve_split(model: TFLiteModel, split: Union[int, str]) -> int:
    """Op index of the stage's last op from an op index, output-tensor name or Keras layer name.

    A name that is no tensor's full name is taken as a Keras layer name: it
    matches a tensor when one of the tensor name's `/`-separated components
    is that name, optionally followed by the `_N` suffix Keras adds
    (`block_2_add` matches `mobilenetv2_0.35_144_1/block_2_add_1/Add`).

    Raises:
        UnsupportedModelError: the index is out of range, or the name matches
            no op output (close names are suggested) or several (listed).
    """
    if isinstance(split, (int, np.integer)) and not isinstance(split, bool):
        index = int(split)
        if not 0 <= index < model.num_ops:
            raise UnsupportedModelError(f"split {index} is not an op index (the model has {model.num_ops} ops).")
        return index
    if isinstance(split, str):
        if split.lstrip("-").isascii() and split.lstrip("-").isdigit():
            return resolve_split(model, int(split))
        producers = model.producers()
        for t, tensor in enumerate(model.subgraph.tensors):
            name = tensor.name.decode() if isinstance(tensor.name, bytes) else str(tensor.name)
            if name == split and t in producers:
                return producers[t]
        layer = re.compile(re.escape(split) + r"(_\d+)?")
        matches = [t for t in sorted(producers)
                   if any(layer.fullmatch(part) for part in re.split(r"[/;]", model.tensor(t).name))]
        if len(matches) == 1:
            return producers[matches[0]]
        if matches:
            listed = "; ".join(model.op_label(producers[t]) for t in matches[:10])
            more = f"; and {len(matches) - 10} more" if len(matches) > 10 else ""
            raise UnsupportedModelError(
                f"split '{split}' names the outputs of {len(matches)} ops; give an op index or a full "
                f"tensor name: {listed}{more}."
            )
        candidates = [model.tensor(t).name for t in producers if split in model.tensor(t).name][:5]
        if not candidates:
            parts = {part: t for t in producers for part in re.split(r"[/;]", model.tensor(t).name)}
            close = difflib.get_close_matches(split, list(parts), n=5, cutoff=0.6)
            candidates = [model.tensor(parts[c]).name for c in close]
        from keras_patch.planner.schedule import short_tensor_name

        candidates = list(dict.fromkeys(short_tensor_name(c) for c in candidates))  # Keras layer names
        hint = f" Close matches: {candidates}." if candidates else ""
        raise UnsupportedModelError(f"No op writes a tensor or Keras layer named '{split}'.{hint}")
    raise TypeError(f"split must be an op index or a tensor name, got {type(split).__name__}.")


def stage_ops(model: TFLiteModel, entry: int, exit_tensor: int) -> List[int]:
    """Ops that depend on `entry` and that `exit_tensor` depends on, in model order."""
    producers = model.producers()
    consumers = model.consumers()
    if exit_tensor not in producers:
        raise UnsupportedModelError(f"Tensor {layer_label(model, exit_tensor)} is not written by any op.")
    downstream = set()
    frontier = [entry]
    while frontier:
        t = frontier.pop()
        for op in consumers.get(t, []):
            if op not in downstream:
                downstream.add(op)
                frontier.extend(model.op_outputs(op))
    upstream = set()
    frontier = [producers[exit_tensor]]
    while frontier:
        op = frontier.pop()
        if op in upstream:
            continue
        upstream.add(op)
        for t in model.op_inputs(op):
            if t in producers:
                frontier.append(producers[t])
    ops = sorted(downstream & upstream)
    if not ops or producers[exit_tensor] not in ops:
        raise UnsupportedModelError(
            f"The split {op_label(model, producers[exit_tensor])} does not depend on the stage's start "
            f"{layer_label(model, entry)}: no ops lead from the start to the split (is the split before "
            f"the start, or on another branch?)."
        )
    return ops


def _same_padding(in_size: int, out_size: int, kernel: int, stride: int, dilation: int) -> int:
    effective = (kernel - 1) * dilation + 1
    total = max((out_size - 1) * stride + effective - in_size, 0)
    return total // 2


def _spatial(model: TFLiteModel, t: int, label: str) -> tuple:
    failure = rules.tensor_failure(model, t, label)
    if failure:
        raise UnsupportedModelError(failure)
    return model.tensor(t).shape[1:]


def plan_stage(model: TFLiteModel, op_indices: Sequence[int], entry: int, exit_tensor: int, grid) -> StagePlan:
    """Checks that the ops form a patchable single-entry/single-exit stage; builds its options.

    `build_stage_options` (the rules of `keras_patch.graph.rules`, cheap),
    then the kernel's Prepare checks on the constants (`prepare_stage`).
    """
    options, op_inputs = build_stage_options(model, op_indices, entry, exit_tensor, grid)
    constants = [None] + [
        ConstantTensor(model.constant(t), model.tensor(t).scale) for t in op_inputs[1:]
    ]
    prepare_stage(options, constants)  # the kernel's Prepare checks, run once here
    return StagePlan(list(op_indices), entry, exit_tensor, options, op_inputs)


def build_stage_options(model: TFLiteModel, op_indices: Sequence[int], entry: int, exit_tensor: int,
                        grid, consumers: Optional[dict] = None) -> tuple:
    """(StageOptions, op inputs) of a stage, checked by the structural rules only (no quantization).

    Raises `UnsupportedModelError` with the message of the first rule of
    `keras_patch.graph.rules` the ops break.
    """
    grid = normalize_grid(grid)
    failure = rules.exit_not_model_output(model, exit_tensor)
    if failure:
        raise UnsupportedModelError(failure)
    for op in op_indices:
        failure = rules.op_type_supported(model, op)
        if failure:
            raise UnsupportedModelError(failure)
    tensor_ids = {entry: 0}
    for position, op in enumerate(op_indices):
        failure = rules.op_single_output(model, op)
        if failure:
            raise UnsupportedModelError(failure)
        tensor_ids[model.op_outputs(op)[0]] = position + 1
    if model.op_outputs(op_indices[-1])[0] != exit_tensor:
        raise UnsupportedModelError(
            f"The stage's last op {op_label(model, op_indices[-1])} does not write the split tensor."
        )
    failure = rules.mean_not_last(model, op_indices) or rules.single_exit(model, op_indices, consumers)
    if failure:
        raise UnsupportedModelError(failure)
    layers = []
    op_inputs = [entry]
    for position, op in enumerate(op_indices):
        layers.append(_layer_options(model, op, position, tensor_ids, op_inputs))
    ordered = sorted(tensor_ids.items(), key=lambda kv: kv[1])
    shapes, scales, zero_points = [], [], []
    ends_with_mean = model.op_type(op_indices[-1]) == "MEAN"
    for t, _ in ordered:
        label = "the stage's input" if t == entry else f"stage tensor {tensor_ids[t]} (of {len(ordered) - 1})"
        if ends_with_mean and t == exit_tensor:
            failure = rules.mean_output_failure(model, t, label)
            if failure:
                raise UnsupportedModelError(failure)
            shapes.append((1, 1, int(model.tensor(t).shape[-1])))
        else:
            shapes.append(tuple(_spatial(model, t, label)))
        info = model.tensor(t)
        scales.append(float(info.scale[0]))
        zero_points.append(int(info.zero_point[0]))
    failure = rules.grid_fits(model, exit_tensor, grid)
    if failure:
        raise UnsupportedModelError(failure)
    options = o.StageOptions(
        grid=grid, tensor_shapes=shapes, tensor_scales=scales,
        tensor_zero_points=zero_points, layers=layers,
    )
    return options, op_inputs


def _layer_options(model: TFLiteModel, op: int, position: int, tensor_ids: dict, op_inputs: list) -> o.LayerOptions:
    op_type = model.op_type(op)
    code = SUPPORTED_STAGE_OPS[op_type]
    inputs = model.op_inputs(op)
    operator = model.operator(op)
    opts = operator.builtinOptions
    label = op_label(model, op)

    def activation_input(t: int) -> int:
        if t not in tensor_ids or tensor_ids[t] > position:
            raise UnsupportedModelError(rules.single_entry_failure(model, op, t))
        return tensor_ids[t]

    def constant_input(t: int, what: str) -> int:
        if t < 0:
            return -1
        if not model.is_constant(t):
            raise UnsupportedModelError(f"{label}: its {what} {layer_label(model, t)} is not a constant.")
        op_inputs.append(t)
        return len(op_inputs) - 1

    a = activation_input(inputs[0])
    in_h, in_w, _ = model.tensor(inputs[0]).shape[1:]
    out_h, out_w = (tuple(model.tensor(model.op_outputs(op)[0]).shape) + (1, 1, 1))[1:3]  # a MEAN's: [1, C]
    if code in (o.OP_CONV_2D, o.OP_DEPTHWISE_CONV_2D):
        filt = model.tensor(inputs[1])
        kh, kw = filt.shape[1], filt.shape[2]
        stride = (int(opts.strideH), int(opts.strideW))
        dilation = (int(opts.dilationHFactor), int(opts.dilationWFactor))
        pad = (0, 0)
        if opts.padding == schema.Padding.SAME:
            pad = (
                _same_padding(in_h, out_h, kh, stride[0], dilation[0]),
                _same_padding(in_w, out_w, kw, stride[1], dilation[1]),
            )
        failure = rules.op_constant_weights(model, op)
        if failure:
            raise UnsupportedModelError(failure)
        weights = (constant_input(inputs[1], "filter"),
                   constant_input(inputs[2] if len(inputs) > 2 else -1, "bias"))
        return o.LayerOptions(code, (a, -1), (kh, kw), stride, dilation, pad,
                              int(opts.fusedActivationFunction), weights)
    if code in (o.OP_MAX_POOL_2D, o.OP_AVERAGE_POOL_2D):
        kernel = (int(opts.filterHeight), int(opts.filterWidth))
        stride = (int(opts.strideH), int(opts.strideW))
        pad = (0, 0)
        if opts.padding == schema.Padding.SAME:
            pad = (_same_padding(in_h, out_h, kernel[0], stride[0], 1),
                   _same_padding(in_w, out_w, kernel[1], stride[1], 1))
        return o.LayerOptions(code, (a, -1), kernel, stride, (1, 1), pad, int(opts.fusedActivationFunction))
    if code == o.OP_ADD:
        b = activation_input(inputs[1])
        failure = rules.op_add_same_shapes(model, op)
        if failure:
            raise UnsupportedModelError(failure)
        return o.LayerOptions(code, (a, b), activation=int(opts.fusedActivationFunction) if opts else 0)
    if code == o.OP_PAD:
        failure = rules.op_pad_spatial(model, op)
        if failure:
            raise UnsupportedModelError(failure)
        paddings = model.constant(inputs[1])
        return o.LayerOptions(code, (a, -1), pad=(int(paddings[1, 0]), int(paddings[2, 0])))
    if code == o.OP_MEAN:
        failure = rules.op_mean_global(model, op)
        if failure:
            raise UnsupportedModelError(failure)
        return o.LayerOptions(code, (a, -1), kernel=(in_h, in_w))
    failure = rules.op_relu6_keeps_quantization(model, op)
    if failure:
        raise UnsupportedModelError(failure)
    return o.LayerOptions(code, (a, -1))  # RELU, RELU6


def _stage_operator(model: TFLiteModel, plan: StagePlan) -> schema.OperatorT:
    custom = schema.OperatorT()
    custom.opcodeIndex = model.opcode_index(schema.BuiltinOperator.CUSTOM, o.CUSTOM_CODE)
    custom.inputs = np.array(plan.op_inputs, np.int32)
    custom.outputs = np.array([plan.exit_tensor], np.int32)
    custom.builtinOptionsType = schema.BuiltinOptions.NONE
    custom.customOptions = np.frombuffer(o.encode_options(plan.options), np.uint8)
    custom.customOptionsFormat = schema.CustomOptionsFormat.FLEXBUFFERS
    return custom


def rewrite_stages(model: TFLiteModel, plans: Sequence[StagePlan]) -> None:
    """Replaces each plan's ops with one KP_PATCH_STAGE op, at its last op's place (in place).

    The plans' op indices refer to `model` as it is now; plans must not share
    ops (`check_disjoint_stages`).
    """
    check_disjoint_stages(model, plans)
    sg = model.subgraph
    customs = {plan.op_indices[-1]: _stage_operator(model, plan) for plan in plans}
    removed = {op for plan in plans for op in plan.op_indices}
    sg.operators = [customs[i] if i in customs else op
                    for i, op in enumerate(sg.operators) if i in customs or i not in removed]
    model.remove_unused()


def rewrite_stage(model: TFLiteModel, plan: StagePlan) -> None:
    """Replaces the plan's ops with one KP_PATCH_STAGE op (in place)."""
    rewrite_stages(model, [plan])


def _stage_label(model: TFLiteModel, plan: StagePlan) -> str:
    return (f"the stage {layer_label(model, plan.entry_tensor)} -> {layer_label(model, plan.exit_tensor)} "
            f"(ops {plan.op_indices[0]}..{plan.op_indices[-1]})")


def check_disjoint_stages(model: TFLiteModel, plans: Sequence[StagePlan]) -> None:
    """Raises `UnsupportedModelError` naming two stages that share ops (overlapping or nested)."""
    owner = {}
    for k, plan in enumerate(plans):
        for op in plan.op_indices:
            if op in owner:
                other = plans[owner[op]]
                ops_k, ops_o = set(plan.op_indices), set(other.op_indices)
                how = ("repeats" if ops_k == ops_o else "is nested in" if ops_k <= ops_o
                       else "contains" if ops_o <= ops_k else "overlaps")
                raise UnsupportedModelError(
                    f"Stage {k}: {_stage_label(model, plan)} {how} stage {owner[op]}: "
                    f"{_stage_label(model, other)}; both contain {op_label(model, op)}. "
                    f"Stages must not share ops."
                )
            owner[op] = k


def resolve_start(model: TFLiteModel, start: Union[int, str]) -> int:
    """Tensor index of the stage's first tensor from a tensor index (int or ASCII digits) or name.

    Raises:
        UnsupportedModelError: an index outside `[0, number of tensors)` (a
            negative one too: it is not counted from the end), an unknown
            name, or a constant tensor.
    """
    if isinstance(start, str) and start.strip().lstrip("+-").isascii() and start.strip().lstrip("+-").isdigit():
        start = int(start)
    if isinstance(start, str):
        entry = model.find_tensor(start)
    elif isinstance(start, (bool, np.bool_)) or not isinstance(start, (int, np.integer)):
        raise UnsupportedModelError(
            f"start must be a tensor index or name, got {start!r} ({type(start).__name__})."
        )
    else:
        entry = int(start)
        num_tensors = len(model.subgraph.tensors)
        if not 0 <= entry < num_tensors:
            raise UnsupportedModelError(
                f"start {entry} is not a tensor index: the model has {num_tensors} tensors, "
                f"valid indices are 0 to {num_tensors - 1}."
            )
    if model.is_constant(entry):
        raise UnsupportedModelError(
            f"start {start!r} is the constant tensor {layer_label(model, entry)} (weights); "
            f"the stage starts at an activation."
        )
    return entry


#: One stage of `patchify_stages`: (start, split, grid); start None is the model's int8 input.
StageRequest = tuple


def patchify(
    tflite_bytes: ModelSource,
    split: Union[int, str],
    grid=(4, 4),
    start: Optional[Union[int, str]] = None,
    arena=True,
) -> bytes:
    """Rewrites the ops of an int8 model up to `split` as one KP_PATCH_STAGE op.

    Args:
        tflite_bytes: an int8 `.tflite` (bytes or path), e.g. from the standard
            converter; a float input followed by QUANTIZE is fine.
        split: op index, output-tensor name or Keras layer name (see
            `resolve_split`) of the stage's last op.
        grid: patches as (rows, columns), an int n for (n, n) or "4x4".
        start: tensor index or name where the stage begins; by default the
            model's int8 input (after its QUANTIZE op, if any).
        arena: the arena passes run on the patched model
            (`keras_patch.graph.passes.pipeline.ArenaOptions`; True: all of
            them, False: none, the model keeps its ops as they were).

    Returns:
        The patched model's bytes.

    Raises:
        InvalidModelError: corrupt or truncated input.
        UnsupportedModelError: float models, dynamic shapes, an unsupported op,
            a split that is not single-entry/single-exit or is the model output,
            a grid larger than the stage output.
    """
    return patchify_stages(tflite_bytes, [(start, split, grid)], arena=arena)


def patchify_stages(tflite_bytes: ModelSource, stages: Sequence[StageRequest], arena=True) -> bytes:
    """Rewrites several runs of ops, each as one KP_PATCH_STAGE op.

    Args:
        tflite_bytes: an int8 `.tflite` (bytes or path).
        stages: `(start, split, grid)` per stage, as `patchify` takes them:
            `start` a tensor index or name (None: the model's int8 input),
            `split` the op index, tensor or Keras layer name of the stage's
            last op, `grid` its patches. Indices refer to the unpatched model.
        arena: the arena passes run once the stages are in place (int8
            input, PAD folding, in-place depthwise, offline memory plan):
            an `ArenaOptions`, True (all) or False (none).

    Returns:
        The patched model's bytes.

    Raises:
        UnsupportedModelError: what `patchify` raises, prefixed with the
            stage's number, and stages that overlap or nest.

    Example:

    >>> import keras_patch
    >>> patched = keras_patch.patchify_stages("mbv2.tflite", [  # doctest: +SKIP
    ...     (None, "block_2_add", (4, 4)), ("block_2_add", "block_5_add", (2, 2))])
    """
    from keras_patch.graph.passes.pipeline import undo_arena_stages

    # The one-layer stages of the arena passes (an exported model's in-place depthwise ops, folded
    # PADs) become builtin ops again: stages are placed on the network, then the passes run again.
    model = TFLiteModel.from_bytes(undo_arena_stages(read_model_bytes(tflite_bytes)))
    if len(model.model.subgraphs) != 1:
        raise UnsupportedModelError(f"The model has {len(model.model.subgraphs)} subgraphs; keras-patch handles one.")
    stages = list(stages)
    if not stages:
        raise UnsupportedModelError("No stage given: patchify_stages needs at least one (start, split, grid).")
    plans = []
    for k, request in enumerate(stages):
        if not isinstance(request, (tuple, list)) or len(request) != 3:
            raise UnsupportedModelError(f"Stage {k}: expected (start, split, grid), got {request!r}.")
        start, split, grid = request
        try:
            plans.append(_plan_request(model, start, split, grid))
        except UnsupportedModelError as e:
            raise UnsupportedModelError(
                f"Stage {k} ({_request_label(start)} -> {_request_label(split)}): {e}" if len(stages) > 1 else str(e)
            ) from None
    rewrite_stages(model, plans)
    from keras_patch.graph.passes.pipeline import optimize_arena

    optimize_arena(model, arena)
    return model.to_bytes()


def _request_label(where) -> str:
    """A stage's start or split as the user gave it, a converter tensor name shortened to its Keras layer."""
    from keras_patch.planner.schedule import short_tensor_name

    if where is None:
        return "model input"
    if isinstance(where, str) and ("/" in where or ";" in where):
        return short_tensor_name(where)
    return repr(where) if isinstance(where, str) else str(where)


def _plan_request(model: TFLiteModel, start, split, grid) -> StagePlan:
    split_op = resolve_split(model, split)
    if model.op_type(split_op) == o.CUSTOM_CODE:
        raise UnsupportedModelError(f"{op_label(model, split_op)} is already a patch stage.")
    exit_tensor = model.op_outputs(split_op)[0]
    if start is None:
        entry = default_entry_tensor(model)
    else:
        entry = resolve_start(model, start) if not isinstance(start, str) or _is_tensor_name(model, start) \
            else model.op_outputs(resolve_split(model, start))[0]
    ops = stage_ops(model, entry, exit_tensor)
    for op in ops:
        if model.op_type(op) == o.CUSTOM_CODE:
            raise UnsupportedModelError(f"{op_label(model, op)} is already a patch stage; stages cannot nest.")
    return plan_stage(model, ops, entry, exit_tensor, grid)


def _is_tensor_name(model: TFLiteModel, name: str) -> bool:
    """True for digits (a tensor index) and a tensor's full name; False for a Keras layer name."""
    if name.strip().lstrip("+-").isascii() and name.strip().lstrip("+-").isdigit():
        return True
    return any(model.tensor(t).name == name for t in range(len(model.subgraph.tensors)))


def find_stages(model: TFLiteModel) -> List[int]:
    """Indices of the KP_PATCH_STAGE ops in a model."""
    return [i for i in range(model.num_ops) if model.op_type(i) == o.CUSTOM_CODE]


def stage_options(model: TFLiteModel, op_index: int) -> o.StageOptions:
    """Decoded options of the KP_PATCH_STAGE op at `op_index`, checked against its tensors.

    Raises:
        InvalidOptionsError: undecodable options, or stage tensor 0 / L whose
            shape, scale or zero point (`tensor_shape`, `tensor_scale`,
            `tensor_zero_point`) differ from the op's input / output tensor
            (the checks of the kernel's Prepare, `KpCheckStageIo`).
        UnsupportedModelError: an op without exactly one output and a stage
            input (`stage_io_tensors`).
    """
    data = model.operator(op_index).customOptions
    options = o.decode_options(bytes(np.asarray(data, np.uint8)))
    _check_stage_io(model, op_index, options)
    return options


@dataclass(frozen=True)
class KernelTensorView:
    """An op input / output tensor as the TFLM kernel's Prepare sees it.

    TFLM fills `TfLiteTensor.params` from the first scale and zero point when
    the tensor has both (the zero point cast to int32), and with (0.0, 0)
    otherwise; `KpCheckStageIo` compares those with the stage tensor.
    """

    dtype: type
    shape: tuple
    scale: float  # float32 value
    zero_point: int  # int32 value


def kernel_tensor_view(info: TensorInfo) -> KernelTensorView:
    """`info` reduced to what the kernel's Prepare reads of it (see `KernelTensorView`)."""
    scale, zero_point = 0.0, 0
    if info.scale.size and info.zero_point.size:
        scale = float(np.float32(info.scale[0]))
        zero_point = int(np.int64(info.zero_point[0]).astype(np.int32))  # static_cast<int32_t>
    return KernelTensorView(dtype=info.dtype, shape=tuple(info.shape), scale=scale, zero_point=zero_point)


def stage_io_tensors(model: TFLiteModel, op_index: int) -> tuple:
    """(input 0, output 0) of the KP_PATCH_STAGE op, with the kernel's Prepare checks of the op.

    The TFLM kernel's Prepare requires exactly one output and at least one
    input, and fails when a tensor it reads is absent (index -1). Both host
    executors (`run_tflite`'s "reference" and "cpp") start from here.

    Raises:
        UnsupportedModelError: naming the op, when it does not have that form.
    """
    inputs, outputs = model.op_inputs(op_index), model.op_outputs(op_index)
    label = f"op {op_index} ({o.CUSTOM_CODE})"
    if len(outputs) != 1 or not inputs:
        raise UnsupportedModelError(
            f"{label} has {len(inputs)} inputs and {len(outputs)} outputs; the kernel needs at least "
            f"one input (the stage input first) and exactly one output."
        )
    num_tensors = len(model.subgraph.tensors)
    for role, t in [("input", i) for i in inputs] + [("output", outputs[0])]:
        if not -1 <= t < num_tensors:
            raise UnsupportedModelError(f"{label} names {role} tensor {t}; the model has {num_tensors} tensors.")
    if inputs[0] < 0 or outputs[0] < 0:
        raise UnsupportedModelError(f"{label} has no stage {'input' if inputs[0] < 0 else 'output'} tensor (index -1).")
    return model.tensor(inputs[0]), model.tensor(outputs[0])


def _check_stage_io(model: TFLiteModel, op_index: int, options: o.StageOptions) -> None:
    """The kernel's `KpCheckStageIo` (tflm_ops/patch_stage_core.cc) on the op's input 0 and output 0."""
    tensors = stage_io_tensors(model, op_index)
    ends = [(0, "input", tensors[0]), (options.num_layers, "output", tensors[1])]
    for stage_tensor, role, info in ends:
        view = kernel_tensor_view(info)
        where = f"{model.op_label(op_index)}: stage tensor {stage_tensor} vs the op's {role} '{info.name}'"
        if view.dtype != np.int8:
            raise InvalidOptionsError(
                f"'tensor_shape' {where}: the {role} is {np.dtype(view.dtype).name}, KP_PATCH_STAGE needs int8."
            )
        shapes = [(1, *options.tensor_shapes[stage_tensor])]
        if role == "output" and options.ends_with_mean:  # MEAN without keep_dims: [1, C]
            shapes.append((1, options.tensor_shapes[stage_tensor][2]))
        if view.shape not in shapes:
            raise InvalidOptionsError(
                f"'tensor_shape' {where}: options say {options.tensor_shapes[stage_tensor]}, the tensor is {info.shape}."
            )
        if np.float32(options.tensor_scales[stage_tensor]) != np.float32(view.scale):
            raise InvalidOptionsError(
                f"'tensor_scale' {where}: options say {options.tensor_scales[stage_tensor]}, the tensor has "
                f"{info.scale.tolist() or 'none'}{' (no zero point)' if info.scale.size and not info.zero_point.size else ''}."
            )
        if options.tensor_zero_points[stage_tensor] != view.zero_point:
            raise InvalidOptionsError(
                f"'tensor_zero_point' {where}: options say {options.tensor_zero_points[stage_tensor]}, "
                f"the tensor has {info.zero_point.tolist() or 'none'}."
            )


def stage_constants(model: TFLiteModel, op_index: int) -> List[Optional[ConstantTensor]]:
    """The op's inputs as the executor takes them (None for the stage input)."""
    constants: List[Optional[ConstantTensor]] = [None]
    for t in model.op_inputs(op_index)[1:]:
        # An absent input (-1) is None: a layer that names it is rejected ('layer_weights'), as in TFLM.
        if t < 0:
            constants.append(None)
            continue
        info = model.tensor(t)
        # TFLM reads a tensor's scales only when it also has zero points (micro_allocator).
        scales = info.scale if info.zero_point.size else info.scale[:0]
        constants.append(ConstantTensor(model.constant(t), scales))
    return constants
