"""`wrap_stage`: puts the first layers of an existing model in a `PatchStage`."""

from __future__ import annotations

import difflib
from typing import Optional, Tuple, Union

import keras
from keras.src.models.functional import Functional
from keras.src.utils import naming

from keras_patch.keras.patch_stage import PatchStage


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
    (or the model outputs) use.

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
    if isinstance(model, keras.Sequential):
        if not model.built or getattr(model, "_functional", None) is None:
            raise ValueError(
                "wrap_stage needs a built Sequential model with a known input "
                "shape (start it with keras.Input(...))."
            )
        model = model._functional
    if not isinstance(model, Functional):
        raise ValueError(
            "wrap_stage needs a functional or Sequential keras.Model, got "
            f"{type(model).__name__} (subclassed models have no layer graph)."
        )
    if len(model.inputs) != 1:
        raise ValueError(
            f"wrap_stage needs a model with one input; model '{model.name}' "
            f"has {len(model.inputs)}: {[t.name for t in model.inputs]}."
        )
    layer_names = [op.name for op in model.operations]
    if until not in layer_names:
        close = difflib.get_close_matches(until, layer_names, n=5, cutoff=0.5)
        hint = f" Close names: {close}." if close else ""
        raise ValueError(
            f"`until`: model '{model.name}' has no layer named '{until}'.{hint}"
        )

    nodes = _model_nodes(model)
    until_nodes = [n for n in nodes if n.operation.name == until]
    if len(until_nodes) != 1:
        raise ValueError(
            f"`until`: layer '{until}' is called {len(until_nodes)} times in "
            f"model '{model.name}'; the stage must end at a single call."
        )
    until_node = until_nodes[0]
    if until_node.is_input:
        raise ValueError(
            f"`until`: '{until}' is the input layer of model '{model.name}'; "
            "name the last layer of the stage."
        )
    if len(until_node.outputs) != 1:
        raise ValueError(
            f"`until`: layer '{until}' has {len(until_node.outputs)} outputs; "
            "the stage must end with a single 4D tensor."
        )
    stage_output = until_node.outputs[0]

    # The stage: `until` and everything it depends on.
    prefix = set()
    stack = [until_node]
    while stack:
        node = stack.pop()
        if id(node) in prefix:
            continue
        prefix.add(id(node))
        for tensor in node.input_tensors:
            parent = _producer_node(tensor)
            if parent is not None and not parent.is_input:
                stack.append(parent)
    prefix_nodes = [n for n in nodes if id(n) in prefix]

    # Single exit: nothing after the stage may read a tensor from inside it
    # (or the model input), other than the stage output.
    inside = {id(t): n for n in prefix_nodes for t in n.outputs}
    inside.update({id(t): None for t in model.inputs})
    del inside[id(stage_output)]
    for node in nodes:
        if id(node) in prefix or node.is_input:
            continue
        for tensor in node.input_tensors:
            if id(tensor) in inside:
                _raise_crossing(until, inside[id(tensor)], f"layer {_describe(node)}")
    for tensor in model.outputs:
        if id(tensor) in inside:
            _raise_crossing(until, inside[id(tensor)], "the model outputs")

    remaining_names = {n.operation.name for n in nodes if id(n) not in prefix}
    if name is None:
        name = naming.auto_name("patch_stage")
        while name in remaining_names:
            name = naming.auto_name("patch_stage")
    elif name in remaining_names:
        raise ValueError(
            f"`name`: model '{model.name}' already has a layer named "
            f"'{name}' after the stage; choose another name."
        )
    block = keras.Model(model.inputs[0], stage_output, name=f"{name}_block")
    stage = PatchStage(block, grid=grid, name=name)

    source = model.inputs[0]
    inputs = keras.Input(
        batch_shape=source.shape,
        dtype=source.dtype,
        name=source._keras_history.operation.name,
    )
    tensors = {id(stage_output): stage(inputs)}
    for node in nodes:
        if id(node) in prefix or node.is_input:
            continue
        args, kwargs = node.arguments.fill_in(tensors)
        outputs = node.operation(*args, **kwargs)
        for old, new in zip(node.outputs, keras.tree.flatten(outputs)):
            tensors[id(old)] = new
    outputs = keras.tree.map_structure(
        lambda t: tensors[id(t)], model._outputs_struct
    )
    return keras.Model(inputs, outputs, name=model.name)


def _raise_crossing(until, producer, user) -> None:
    source = "the model input" if producer is None else (
        f"the output of layer {_describe(producer)}"
    )
    raise ValueError(
        f"Cannot wrap the layers up to '{until}' in one PatchStage: {user} "
        f"uses {source}, which lies inside the stage. A stage must have a "
        "single entry and a single exit (its output is the only tensor used "
        "after it); move `until` past the end of this branch (e.g. past the "
        "Add that closes a skip connection)."
    )
