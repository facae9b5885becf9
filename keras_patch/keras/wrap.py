"""`wrap_stage` / `wrap_stages`: put runs of layers of an existing model in `PatchStage`s."""

from __future__ import annotations

import difflib
import logging
from typing import List, Optional, Sequence, Tuple, Union

import keras
from keras.src.models.functional import Functional
from keras.src.utils import naming

from keras_patch.errors import UnsupportedModelError
from keras_patch.keras.patch_stage import PatchStage

logger = logging.getLogger(__name__)


def _producer_node(tensor):
    """The node that computed the symbolic `tensor` (None for graph inputs)."""
    history = getattr(tensor, "_keras_history", None)
    if history is None or history.operation is None:
        return None
    return history.operation._inbound_nodes[history.node_index]


def _model_nodes(model) -> list:
    """The nodes of a functional model, inputs first (topological order)."""
    nodes = []
    for depth in sorted(model._nodes_by_depth, reverse=True):
        nodes.extend(model._nodes_by_depth[depth])
    return nodes


def _describe(node) -> str:
    return f"'{node.operation.name}' ({type(node.operation).__name__})"


def wrap_stage(
    model: keras.Model,
    until: str,
    grid: Union[int, Tuple[int, int]] = (4, 4),
    name: Optional[str] = None,
) -> keras.Model:
    """Returns `model` with its first layers, up to `until`, in a `PatchStage`.

    The layers from the model input up to and including layer `until` become
    the block of one `PatchStage`; the other layers of `model` are applied
    after it as before. The new model uses the very same layer objects as
    `model` (weights are shared, not copied), so it computes exactly the same
    predictions.

    The part of the model up to `until` must be single-entry, single-exit:
    the output of `until` is the only tensor of that part that later layers
    (or the model outputs) use. `wrap_stages` puts several stages, anywhere,
    into a model.

    Args:
        model: A functional (or built Sequential) model with one input.
        until: Name of the last layer of the stage.
        grid: Number of patches `(n_h, n_w)`, or an int `n` for `(n, n)`.
        name: Name of the `PatchStage` layer (auto-generated if `None`).

    Returns:
        A new functional `keras.Model` with the same name, inputs and outputs
        as `model`.

    Example:

    >>> import keras
    >>> from keras_patch.keras.wrap import wrap_stage
    >>> base = keras.applications.MobileNetV2(
    ...     input_shape=(96, 96, 3), alpha=0.35, weights=None)
    >>> model = wrap_stage(base, until="block_5_add", grid=(4, 4), name="stage1")
    >>> model.get_layer("stage1").block.output.shape
    (None, 12, 12, 16)
    """
    return _wrap(model, [(None, until, grid, name)], "wrap_stage", input_is_inside=True)


StageSpec = tuple  # (first_layer or None, last_layer, grid) or (first, last, grid, name)


def wrap_stages(model: keras.Model, stages: Sequence[StageSpec]) -> keras.Model:
    """Returns `model` with several runs of layers, each in its own `PatchStage`.

    Each stage is `(first_layer, last_layer, grid)` (or `(first_layer,
    last_layer, grid, name)`): the layers from `first_layer` (inclusive;
    `None` = from the model input) through `last_layer` become the block of
    one `PatchStage`, whose input is the tensor `first_layer` reads. The
    stage holds every layer that depends on that tensor and that
    `last_layer` depends on (so a skip connection that starts at the stage
    input and closes inside the stage is part of it). The other layers stay
    as they are: the new model uses the very same layer objects (weights are
    shared, not copied) and computes exactly the same predictions; it trains
    with ordinary `fit`, and `export_tflite` turns each stage into one
    KP_PATCH_STAGE op.

    Each stage must be single-entry, single-exit: its layers read only the
    stage input and each other, and only the output of `last_layer` is used
    after the stage (the stage input may be). Stages must not overlap or
    nest, and hold only layers a patch stage can run (see `PatchStage`).

    Args:
        model: A functional (or built Sequential) model with one input.
        stages: `(first_layer, last_layer, grid[, name])` per stage, layer
            names as in `model.get_layer`; `grid` is `(n_h, n_w)` or an int
            `n`; `name` names the `PatchStage` layer (auto-generated if
            omitted or `None`).

    Returns:
        A new functional `keras.Model` with the same name, inputs and outputs
        as `model`.

    Raises:
        UnsupportedModelError: an unknown layer name (close names are
            suggested), a stage whose last layer does not depend on its first,
            stages that overlap or nest, a stage that is not
            single-entry/single-exit (e.g. one that cuts a residual
            connection), or a layer a patch stage cannot run; the message
            names the stage and the layers at fault.

    Example:

    >>> import keras
    >>> from keras_patch.keras.wrap import wrap_stages
    >>> base = keras.applications.MobileNetV2(
    ...     input_shape=(96, 96, 3), alpha=0.35, weights=None)
    >>> model = wrap_stages(base, [
    ...     (None, "block_2_add", (4, 4), "stage1"),
    ...     ("block_3_expand", "block_5_add", (2, 2), "stage2"),
    ... ])
    >>> [(s.name, s.grid) for s in model.layers if type(s).__name__ == "PatchStage"]
    [('stage1', (4, 4)), ('stage2', (2, 2))]
    >>> model.get_layer("stage2").block.output.shape
    (None, 12, 12, 16)
    """
    return _wrap(model, stages, "wrap_stages", input_is_inside=False)


def apply_plan(keras_model: keras.Model, plan) -> keras.Model:
    """Returns `keras_model` with the stages of a `PatchPlan` as `PatchStage`s.

    `keras_patch.plan` chooses the stages on the model's int8 `.tflite`; this
    puts the same stages into the Keras model (see `wrap_stages`), so that it
    trains with ordinary `fit` and `export_tflite` emits one KP_PATCH_STAGE
    op per planned stage, with the plan's grids. The layers are shared with
    `keras_model` (same weights, same predictions).

    Each planned stage names the `.tflite` tensors it starts and ends at;
    they are mapped back to Keras layers by the layer names inside the
    tensor names (`planner.schedule.short_tensor_name`). The converter folds
    a `BatchNormalization` into the convolution before it and fuses ReLUs
    into the op before them, so a tensor named after a convolution may be the
    output of the BatchNormalization that follows it: the stage then ends
    (or the next one starts) after that BatchNormalization.

    Args:
        keras_model: The functional (or built Sequential) model the plan was
            made for (`keras_patch.plan(keras_model)`, or a plan of its
            exported `.tflite`), without `PatchStage` layers.
        plan: A `keras_patch.PatchPlan` (or a sequence of its stages).

    Returns:
        A new functional `keras.Model` with one `PatchStage` per planned stage
        (named `patch_stage`, `patch_stage_1`, ...), or `keras_model` itself
        for the empty plan.

    Raises:
        UnsupportedModelError: a planned stage whose tensors name no layer of
            `keras_model` (a plan made for another model), a model that
            already holds `PatchStage` layers, or stages that `wrap_stages`
            refuses.

    Example:

    >>> import keras, keras_patch
    >>> inputs = keras.Input((32, 32, 3))
    >>> x = keras.layers.Conv2D(16, 3, padding="same", activation="relu", name="c1")(inputs)
    >>> x = keras.layers.Conv2D(16, 3, strides=2, padding="same", activation="relu", name="c2")(x)
    >>> x = keras.layers.Conv2D(32, 3, strides=2, padding="same", activation="relu", name="c3")(x)
    >>> x = keras.layers.GlobalAveragePooling2D()(x)
    >>> model = keras.Model(inputs, keras.layers.Dense(4)(x))
    >>> plan = keras_patch.plan(model, max_mac_overhead=1.3)
    >>> plan.peak_bytes < plan.layer_by_layer_peak_bytes
    True
    >>> patched = keras_patch.apply_plan(model, plan)  # train it with fit, then export_tflite
    >>> stages = [l for l in patched.layers if isinstance(l, keras_patch.PatchStage)]
    >>> [s.grid for s in stages] == [s.grid for s in plan.stages]
    True
    """
    stages = getattr(plan, "stages", plan)
    if isinstance(stages, (str, bytes, dict)) or not hasattr(stages, "__iter__") or not all(
        hasattr(stage, field) for stage in stages for field in ("start", "end", "grid")
    ):
        raise TypeError(
            f"apply_plan takes a keras_patch.PatchPlan (or its stages), got {type(plan).__name__}; "
            f"a plan stored as JSON loads with keras_patch.PatchPlan.from_json."
        )
    stages = list(stages)
    if not stages:
        message = getattr(plan, "message", "")
        logger.info("apply_plan: the plan is empty%s; the model is unchanged.", f" ({message})" if message else "")
        return keras_model
    model = _functional(keras_model, "apply_plan")
    held = [layer.name for layer in model.layers if isinstance(layer, PatchStage)]
    if held:
        raise UnsupportedModelError(
            f"apply_plan: model '{model.name}' already holds PatchStage layers {held}; "
            f"apply a plan to the model without them (the one the plan was made for)."
        )
    nodes = _model_nodes(model)
    specs = []
    for k, stage in enumerate(stages):
        start = _start_name(stage)
        label = f"planned stage {k} ({start or 'the model input'} -> {stage.end})"
        if start:
            first = _After(_layer_of_tensor(model, nodes, start, f"{label}: start"))
        else:
            first = None
        last = _layer_of_tensor(model, nodes, stage.end, f"{label}: end")
        specs.append((first, last, tuple(stage.grid)))
    return _wrap(model, specs, "apply_plan", input_is_inside=False)


#: Layers the TFLite converter folds into the Conv2D / DepthwiseConv2D before them, leaving no name in the tensor.
_FOLDED_INTO_CONV = (keras.layers.BatchNormalization,)


def _start_name(stage) -> str:
    """The planned stage's start tensor name; "" for the model input."""
    start = stage.start or ""
    start_layer = getattr(stage, "start_layer", None)
    if start_layer == "" or (start_layer is None and "/" not in start):  # PlannedStage.start_layer's rule
        return ""
    return start


def _layer_of_tensor(model, nodes, tensor_name: str, what: str) -> str:
    """The Keras layer whose output is the converted `.tflite` tensor `tensor_name`."""
    from keras_patch.planner.schedule import short_tensor_name

    order = {n.operation.name: i for i, n in enumerate(nodes) if not n.is_input}
    named = [short_tensor_name(part) for part in tensor_name.split(";")]
    found = [name for name in named if name in order]
    if not found:
        raise UnsupportedModelError(
            f"{what}: tensor '{tensor_name}' names no layer of model '{model.name}'; "
            f"was the plan made for this model (keras_patch.plan(keras_model) or its exported .tflite)?"
        )
    node = nodes[max(order[name] for name in found)]  # a fused op is named after several layers
    if isinstance(node.operation, (keras.layers.Conv2D, keras.layers.DepthwiseConv2D)):
        while True:  # BatchNormalization folded into the convolution leaves no name behind
            out = node.outputs[0]
            users = [n for n in nodes if any(t is out for t in n.input_tensors)]
            if any(t is out for t in model.outputs) or len(users) != 1:
                break
            if not isinstance(users[0].operation, _FOLDED_INTO_CONV):
                break
            node = users[0]
    return node.operation.name


def _functional(model, caller: str):
    """`model` as a one-input functional model (a built Sequential's inner one)."""
    if isinstance(model, keras.Sequential):
        if not model.built or getattr(model, "_functional", None) is None:
            raise ValueError(
                f"{caller} needs a built Sequential model with a known input "
                "shape (start it with keras.Input(...))."
            )
        model = model._functional
    if not isinstance(model, Functional):
        raise ValueError(
            f"{caller} needs a functional or Sequential keras.Model, got "
            f"{type(model).__name__} (subclassed models have no layer graph)."
        )
    if len(model.inputs) != 1:
        raise ValueError(
            f"{caller} needs a model with one input; model '{model.name}' "
            f"has {len(model.inputs)}: {[t.name for t in model.inputs]}."
        )
    return model


def _find_node(model, nodes, layer: str, what: str):
    """The single call of layer `layer` in `model` (`what` names the argument in errors)."""
    layer_names = [op.name for op in model.operations]
    if not isinstance(layer, str) or layer not in layer_names:
        close = difflib.get_close_matches(str(layer), layer_names, n=5, cutoff=0.5)
        hint = f" Close names: {close}." if close else ""
        raise UnsupportedModelError(
            f"{what}: model '{model.name}' has no layer named '{layer}'.{hint}"
        )
    found = [n for n in nodes if n.operation.name == layer]
    if len(found) != 1:
        raise UnsupportedModelError(
            f"{what}: layer '{layer}' is called {len(found)} times in "
            f"model '{model.name}'; a stage boundary must be a single call."
        )
    node = found[0]
    if node.is_input:
        raise UnsupportedModelError(
            f"{what}: '{layer}' is the input layer of model '{model.name}'; "
            "name a layer after it (or None for the model input)."
        )
    if len(node.outputs) != 1:
        raise UnsupportedModelError(
            f"{what}: layer '{layer}' has {len(node.outputs)} outputs; "
            "a stage boundary must be a single 4D tensor."
        )
    return node


class _After:
    """A stage start given as "the output of layer `layer`" (`apply_plan`) instead of a first layer."""

    def __init__(self, layer: str):
        self.layer = layer

    def __repr__(self) -> str:
        return f"after '{self.layer}'"


class _Stage:
    """One stage being wrapped: its entry tensor, nodes, exit tensor, grid and name."""

    def __init__(self, label, entry, first_layer, last_node, nodes, grid, name):
        self.label = label
        self.entry = entry
        self.first_layer = first_layer
        self.last_node = last_node
        self.exit = last_node.outputs[0]
        self.nodes = nodes  # in model order
        self.ids = {id(n) for n in nodes}
        self.grid = grid
        self.name = name


def _ancestors(node, stop) -> set:
    """ids of `node` and the non-input nodes it depends on, not walking past tensor id `stop`."""
    seen = set()
    stack = [node]
    while stack:
        n = stack.pop()
        if id(n) in seen:
            continue
        seen.add(id(n))
        for tensor in n.input_tensors:
            if id(tensor) == stop:
                continue
            parent = _producer_node(tensor)
            if parent is not None and not parent.is_input:
                stack.append(parent)
    return seen


def _descendants(tensor, nodes) -> set:
    """ids of the nodes (among `nodes`, model order) that depend on `tensor`."""
    reached = {id(tensor)}
    found = set()
    for n in nodes:
        if not n.is_input and any(id(t) in reached for t in n.input_tensors):
            found.add(id(n))
            reached.update(id(t) for t in n.outputs)
    return found


def _resolve_stage(model, nodes, k: int, spec, input_is_inside: bool) -> _Stage:
    """Finds the nodes of stage `k` and checks that it is single-entry/single-exit."""
    if not isinstance(spec, (tuple, list)) or len(spec) not in (3, 4):
        raise UnsupportedModelError(
            f"Stage {k}: expected (first_layer, last_layer, grid) or "
            f"(first_layer, last_layer, grid, name), got {spec!r}."
        )
    first, last, grid = spec[:3]
    name = spec[3] if len(spec) == 4 else None
    label = f"stage {k} ({first!r} -> {last!r})"
    last_node = _find_node(model, nodes, last, "`until`" if input_is_inside else f"{label}: last layer")
    first_node = None
    if first is None:
        entry = model.inputs[0]
        first_layer = None
    elif isinstance(first, _After):
        entry = _find_node(model, nodes, first.layer, f"{label}: start").outputs[0]
        first_layer = repr(first)
    else:
        first_node = _find_node(model, nodes, first, f"{label}: first layer")
        inputs = [t for t in first_node.input_tensors]
        if len({id(t) for t in inputs}) != 1:
            raise UnsupportedModelError(
                f"{label}: the first layer '{first}' ({type(first_node.operation).__name__}) "
                f"reads {len(inputs)} tensors; a stage starts at a layer that reads one tensor, "
                f"the stage input."
            )
        entry = inputs[0]
        first_layer = first
    ancestors = _ancestors(last_node, id(entry))
    descendants = _descendants(entry, nodes)
    if first_node is not None and id(first_node) not in ancestors:
        raise UnsupportedModelError(
            f"{label}: the last layer '{last}' does not depend on the first layer '{first}'; "
            f"give the stage's layers in model order."
        )
    if id(last_node) not in descendants:
        raise UnsupportedModelError(
            f"{label}: the last layer '{last}' does not depend on the stage input."
        )
    stage_ids = ancestors & descendants
    stage_nodes = [n for n in nodes if id(n) in stage_ids]
    where = _entry_description(entry, first_layer)

    # Single entry: the stage's layers read only the stage input and each other.
    inside = {id(t) for n in stage_nodes for t in n.outputs}
    for n in stage_nodes:
        for tensor in n.input_tensors:
            if id(tensor) == id(entry) or id(tensor) in inside:
                continue
            producer = _producer_node(tensor)
            source = "the model input" if producer is None or producer.is_input else (
                f"the output of layer {_describe(producer)}"
            )
            raise UnsupportedModelError(
                f"Cannot wrap {label} in one PatchStage: its layer {_describe(n)} reads "
                f"{source}, which lies before the stage (the stage input is {where}). A stage "
                f"must have a single entry; start it earlier (e.g. at the layer where the skip "
                f"connection begins) or end it before this layer."
            )

    # Single exit: nothing after the stage reads a tensor from inside it.
    if input_is_inside:  # wrap_stage's words
        what, move = f"the layers up to '{last}'", "`until`"
    else:
        what, move = label, "the last layer"
    inside_by_id = {id(t): n for n in stage_nodes for t in n.outputs}
    if input_is_inside:
        inside_by_id.update({id(t): None for t in model.inputs})
    inside_by_id.pop(id(last_node.outputs[0]), None)
    for n in nodes:
        if id(n) in stage_ids or n.is_input:
            continue
        for tensor in n.input_tensors:
            if id(tensor) in inside_by_id:
                _raise_crossing(what, inside_by_id[id(tensor)], f"layer {_describe(n)}", move)
    for tensor in model.outputs:
        if id(tensor) in inside_by_id:
            _raise_crossing(what, inside_by_id[id(tensor)], "the model outputs", move)
    return _Stage(label, entry, first_layer, last_node, stage_nodes, grid, name)


def _entry_description(entry, first_layer) -> str:
    if first_layer is None:
        return "the model input"
    producer = _producer_node(entry)
    if producer is None or producer.is_input:
        return "the model input"
    return f"the output of layer {_describe(producer)}"


def _check_disjoint(stages: List[_Stage]) -> None:
    owner = {}
    for k, stage in enumerate(stages):
        for n in stage.nodes:
            if id(n) in owner:
                other = stages[owner[id(n)]]
                how = (
                    "is nested in" if stage.ids <= other.ids
                    else "contains" if other.ids <= stage.ids else "overlaps"
                )
                raise UnsupportedModelError(
                    f"{stage.label[0].upper()}{stage.label[1:]} {how} {other.label}: both hold "
                    f"layer {_describe(n)}. Stages must not share layers."
                )
            owner[id(n)] = k


def _wrap(model, specs, caller: str, input_is_inside: bool) -> keras.Model:
    model = _functional(model, caller)
    if isinstance(specs, tuple) and len(specs) in (3, 4) and not isinstance(specs[0], (tuple, list)):
        specs = [specs]  # one stage given without the enclosing list
    specs = list(specs)
    if not specs:
        raise UnsupportedModelError(f"{caller}: no stage given; pass at least one (first_layer, last_layer, grid).")
    nodes = _model_nodes(model)
    stages = [_resolve_stage(model, nodes, k, spec, input_is_inside) for k, spec in enumerate(specs)]
    _check_disjoint(stages)

    wrapped_ids = set().union(*(s.ids for s in stages))
    taken = {n.operation.name for n in nodes if id(n) not in wrapped_ids}
    for stage in stages:
        if stage.name is None:
            stage.name = naming.auto_name("patch_stage")
            while stage.name in taken:
                stage.name = naming.auto_name("patch_stage")
        elif stage.name in taken:
            raise UnsupportedModelError(
                f"{stage.label}: `name`: model '{model.name}' already has a layer named "
                f"'{stage.name}' (outside the stages, or another stage); choose another name."
            )
        taken.add(stage.name)
    for stage in stages:
        stage.layer = _make_stage(model, stage)

    source = model.inputs[0]
    inputs = keras.Input(
        batch_shape=source.shape,
        dtype=source.dtype,
        name=source._keras_history.operation.name,
    )
    tensors = {id(source): inputs}
    stage_of = {id(n): s for s in stages for n in s.nodes}
    called = set()
    for node in nodes:
        if node.is_input:
            continue
        stage = stage_of.get(id(node))
        if stage is not None:
            if id(stage) not in called:  # the stage's first layer in model order: its input is ready
                called.add(id(stage))
                tensors[id(stage.exit)] = stage.layer(tensors[id(stage.entry)])
            continue
        args, kwargs = node.arguments.fill_in(tensors)
        outputs = node.operation(*args, **kwargs)
        for old, new in zip(node.outputs, keras.tree.flatten(outputs)):
            tensors[id(old)] = new
    outputs = keras.tree.map_structure(
        lambda t: tensors[id(t)], model._outputs_struct
    )
    return keras.Model(inputs, outputs, name=model.name)


def _make_stage(model, stage: _Stage) -> PatchStage:
    """The `PatchStage` over `stage.nodes`: their layers, called again on a fresh input."""
    entry = stage.entry
    input_name = (
        entry._keras_history.operation.name if stage.first_layer is None else f"{stage.name}_input"
    )
    block_input = keras.Input(batch_shape=entry.shape, dtype=entry.dtype, name=input_name)
    tensors = {id(entry): block_input}
    for node in stage.nodes:
        args, kwargs = node.arguments.fill_in(tensors)
        outputs = node.operation(*args, **kwargs)
        for old, new in zip(node.outputs, keras.tree.flatten(outputs)):
            tensors[id(old)] = new
    block = keras.Model(block_input, tensors[id(stage.exit)], name=f"{stage.name}_block")
    try:
        return PatchStage(block, grid=stage.grid, name=stage.name)
    except UnsupportedModelError:
        raise
    except ValueError as e:  # PatchStage's own checks name the stage and the layer
        raise UnsupportedModelError(str(e)) from None


def _raise_crossing(what, producer, user, move="`until`") -> None:
    source = "the model input" if producer is None else (
        f"the output of layer {_describe(producer)}"
    )
    raise UnsupportedModelError(
        f"Cannot wrap {what} in one PatchStage: {user} "
        f"uses {source}, which lies inside the stage. A stage must have a "
        "single entry and a single exit (its output is the only tensor used "
        f"after it); move {move} past the end of this branch (e.g. past the "
        "Add that closes a skip connection)."
    )
