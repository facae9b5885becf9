"""`PatchStage`: marks the memory-heavy first stage of a model for patching.

The layer behaves exactly like the block it wraps (same outputs, gradients,
training behavior and weights). It only adds a name scope around the block so
that, after TFLite conversion, the exporter can tell which operators belong to
the stage (see `stage_of_tensor_name`) and replace them with one custom
operator that runs the stage patch by patch.
"""

from __future__ import annotations

import re
from typing import Optional, Tuple, Union

import keras
from keras.src.models.functional import Functional

from keras_patch.grid import check_grid

STAGE_SCOPE_PREFIX = "kp_patch_stage__"
STAGE_SCOPE_SUFFIX = "__"

# `<prefix><name><suffix>` optionally uniquified by TF as `..._<k>`, then `/`.
_STAGE_SCOPE_RE = re.compile(
    re.escape(STAGE_SCOPE_PREFIX)
    + r"(?P<name>.+?)"
    + re.escape(STAGE_SCOPE_SUFFIX)
    + r"(?:_\d+)?/"
)

# Activation names a patch-based kernel implements (fused or standalone).
SUPPORTED_ACTIVATIONS = ("relu", "relu6", "linear")

# Layer classes (exact types) that can run patch by patch.
SUPPORTED_LAYERS = (
    keras.layers.InputLayer,
    keras.layers.Conv2D,
    keras.layers.DepthwiseConv2D,
    keras.layers.BatchNormalization,
    keras.layers.ReLU,
    keras.layers.Activation,
    keras.layers.Add,
    keras.layers.ZeroPadding2D,
    keras.layers.MaxPooling2D,
    keras.layers.AveragePooling2D,
    keras.layers.GlobalAveragePooling2D,  # only as the stage's last layer (a MEAN layer, options v3)
)


def stage_scope_name(layer_name: str) -> str:
    """Returns the name scope that marks the ops of a `PatchStage`.

    Args:
        layer_name: Name of the `PatchStage` layer.

    Returns:
        `"kp_patch_stage__<layer_name>__"`.

    Example:

    >>> stage_scope_name("stage1")
    'kp_patch_stage__stage1__'
    """
    return f"{STAGE_SCOPE_PREFIX}{layer_name}{STAGE_SCOPE_SUFFIX}"


def stage_of_tensor_name(tensor_name: str) -> Optional[str]:
    """Returns the `PatchStage` a converted TFLite tensor belongs to.

    The TFLite converter names a tensor after the TF ops it comes from, joining
    the names of fused ops with `;`. A tensor belongs to a stage when any of
    these parts lies under the stage's name scope (TF may have uniquified the
    scope as `kp_patch_stage__<name>___1`).

    Args:
        tensor_name: Name of a tensor of a converted `.tflite` model.

    Returns:
        The name of the `PatchStage` layer, or `None`.

    Example:

    >>> stage_of_tensor_name(
    ...     "model/stage1/kp_patch_stage__stage1__/block/conv/Relu;"
    ...     "model/stage1/kp_patch_stage__stage1__/block/conv/BiasAdd"
    ... )
    'stage1'
    >>> stage_of_tensor_name("model/s_1/kp_patch_stage__s_1___2/conv/Relu")
    's_1'
    >>> stage_of_tensor_name("model/dense/MatMul") is None
    True
    """
    for part in tensor_name.split(";"):
        match = _STAGE_SCOPE_RE.search(part)
        if match:
            return match.group("name")
    return None


def _normalize_grid(grid) -> Tuple[int, int]:
    """Validates `grid` and returns it as a `(n_h, n_w)` tuple of ints (no "4x4" text here)."""
    return check_grid(grid, allow_string=False)


def _activation_name(activation) -> Optional[str]:
    """Name of a built-in activation function, else `None`."""
    if activation is None:
        return "linear"
    try:
        name = keras.activations.serialize(activation)
    except Exception:
        return None
    if not isinstance(name, str):
        return None
    try:
        if keras.activations.get(name) is not activation:
            return None
    except Exception:
        return None
    return name


def _supported_list() -> str:
    return ", ".join(cls.__name__ for cls in SUPPORTED_LAYERS[1:]) + (
        f" (activations: {', '.join(SUPPORTED_ACTIVATIONS)})"
    )


def _unsupported_reason(layer) -> Optional[str]:
    """Why `layer` cannot run patch by patch, or `None` if it can."""
    cls = type(layer)
    if cls not in SUPPORTED_LAYERS:
        return "cannot run patch by patch"
    data_format = getattr(layer, "data_format", "channels_last")
    if data_format != "channels_last":
        return f"uses data_format='{data_format}', only 'channels_last' is supported"
    if cls in (keras.layers.Conv2D, keras.layers.DepthwiseConv2D, keras.layers.Activation):
        name = _activation_name(layer.activation)
        if name not in SUPPORTED_ACTIVATIONS:
            shown = name or getattr(layer.activation, "__name__", repr(layer.activation))
            return f"uses activation '{shown}', which cannot run patch by patch"
    if cls is keras.layers.Conv2D and layer.groups != 1:
        return f"uses groups={layer.groups}, only groups=1 is supported"
    if cls in (keras.layers.Conv2D, keras.layers.DepthwiseConv2D):
        dilation = tuple(layer.dilation_rate)
        if any(d != 1 for d in dilation):
            # The TFLite converter rewrites dilated convolutions into
            # SPACE_TO_BATCH_ND / BATCH_TO_SPACE_ND, which are not local ops.
            return f"uses dilation_rate={dilation}, only 1 is supported"
    if cls is keras.layers.ReLU:
        if float(layer.negative_slope) != 0.0:
            return (
                f"uses negative_slope={float(layer.negative_slope)}, "
                "only 0 is supported"
            )
        if float(layer.threshold) != 0.0:
            return f"uses threshold={float(layer.threshold)}, only 0 is supported"
        if layer.max_value is not None and float(layer.max_value) != 6.0:
            return (
                f"uses max_value={float(layer.max_value)}, only None (ReLU) "
                "or 6 (ReLU6) is supported"
            )
    if cls is keras.layers.BatchNormalization and layer.axis not in (-1, 3, [-1], [3]):
        return f"normalizes axis={layer.axis}, only the channel axis (-1) is supported"
    return None


def _block_operations(block) -> list:
    """The operations of a Sequential or functional model."""
    if isinstance(block, keras.Sequential):
        return list(block.layers)
    return list(block.operations)


def validate_block(block, stage_name: str) -> None:
    """Raises `ValueError` unless every op of `block` can run patch by patch.

    Walks nested Sequential and functional models recursively.

    Args:
        block: A Sequential or functional Keras model.
        stage_name: Name of the `PatchStage`, used in error messages.
    """
    if not isinstance(block, (keras.Sequential, Functional)):
        raise ValueError(
            f"PatchStage '{stage_name}': `block` must be a Sequential or "
            f"functional keras.Model, got {type(block).__name__}."
        )
    operations = _block_operations(block)
    for k, op in enumerate(operations):
        if isinstance(op, (keras.Sequential, Functional)):
            validate_block(op, stage_name)
            continue
        if isinstance(op, keras.layers.GlobalAveragePooling2D) and k != len(operations) - 1:
            raise ValueError(
                f"PatchStage '{stage_name}': layer '{op.name}' (GlobalAveragePooling2D) is not the "
                f"block's last layer: a global average pool can only end a patch stage."
            )
        if not isinstance(op, keras.layers.Layer):
            raise ValueError(
                f"PatchStage '{stage_name}': operation '{op.name}' "
                f"({type(op).__name__}) cannot run patch by patch; use layers, "
                f"not keras.ops, inside the stage. Supported layers: "
                f"{_supported_list()}."
            )
        reason = _unsupported_reason(op)
        if reason is not None:
            raise ValueError(
                f"PatchStage '{stage_name}': layer '{op.name}' "
                f"({type(op).__name__}) {reason}. Supported layers: "
                f"{_supported_list()}."
            )


@keras.saving.register_keras_serializable(package="keras_patch")
class PatchStage(keras.layers.Layer):
    """Wraps a stage of a CNN so that it can run patch by patch.

    On microcontrollers the first stage of a CNN needs the most activation
    memory, and later blocks with wide expanded tensors come next. A model
    may hold several `PatchStage`s, each over a single-entry/single-exit run
    of layers anywhere in the network (`keras_patch.wrap_stages`,
    `keras_patch.apply_plan`). `PatchStage` marks such a stage: in Keras it computes exactly what
    `block` computes (outputs, gradients, weights and training behavior are
    those of `block`), and when the model is exported, the stage is replaced
    by one operator that computes its output one spatial patch at a time, on a
    `grid` of `n_h x n_w` patches.

    The ops of `block` are created under the name scope
    `stage_scope_name(layer.name)`, which survives TFLite conversion in the
    tensor names (see `stage_of_tensor_name`).

    Only layers that a patch-based kernel implements are allowed in `block`:
    `Conv2D` (groups=1), `DepthwiseConv2D`, `BatchNormalization`, `ReLU`
    (ReLU or ReLU6), `Activation` (relu, relu6, linear), `Add`,
    `ZeroPadding2D`, `MaxPooling2D` and `AveragePooling2D`, in
    `channels_last` format, with relu/relu6/linear activations.

    Args:
        block: A Sequential or functional `keras.Model` with one 4D (NHWC)
            input and one 4D output. Its layers are used as they are (weights
            are shared, not copied).
        grid: Number of patches `(n_h, n_w)` along height and width, or an
            int `n` for `(n, n)`.
        **kwargs: Base layer keyword arguments, such as `name`.

    Example:

    >>> import keras
    >>> from keras_patch import PatchStage
    >>> block = keras.Sequential([
    ...     keras.Input((32, 32, 3)),
    ...     keras.layers.Conv2D(8, 3, strides=2, padding="same"),
    ...     keras.layers.BatchNormalization(),
    ...     keras.layers.ReLU(6.0),
    ... ])
    >>> inputs = keras.Input((32, 32, 3))
    >>> x = PatchStage(block, grid=(2, 2), name="stage1")(inputs)
    >>> outputs = keras.layers.Dense(10)(keras.layers.GlobalAveragePooling2D()(x))
    >>> model = keras.Model(inputs, outputs)
    >>> model.get_layer("stage1").grid
    (2, 2)
    """

    def __init__(self, block: keras.Model, grid: Union[int, Tuple[int, int]] = (2, 2), **kwargs):
        super().__init__(**kwargs)
        self._grid = _normalize_grid(grid)
        validate_block(block, self.name)
        self._block = block
        if isinstance(block, Functional):
            self._check_io(block.inputs, block.outputs)

    def _ends_with_global_pool(self) -> bool:
        operations = _block_operations(self._block)
        return bool(operations) and isinstance(operations[-1], keras.layers.GlobalAveragePooling2D)

    def _tiled_shape(self, input_shape) -> tuple:
        """The shape the grid tiles: the block's output, or the input of its final
        GlobalAveragePooling2D (the patches are summed into the pool)."""
        if not self._ends_with_global_pool():
            return tuple(self._block.compute_output_shape(input_shape))
        pool = _block_operations(self._block)[-1]
        return tuple(pool.input.shape) if isinstance(self._block, Functional) else tuple(
            keras.Sequential(self._block.layers[:-1]).compute_output_shape(input_shape))

    def _check_io(self, inputs, outputs) -> None:
        for kind, tensors in (("input", inputs), ("output", outputs)):
            if len(tensors) != 1:
                raise ValueError(
                    f"PatchStage '{self.name}': `block` must have exactly one "
                    f"{kind}, got {len(tensors)}."
                )
            if kind == "output" and self._ends_with_global_pool() and len(tensors[0].shape) in (2, 4):
                continue  # GlobalAveragePooling2D: (batch, channels), or 4-D with keepdims
            if len(tensors[0].shape) != 4:
                raise ValueError(
                    f"PatchStage '{self.name}': the {kind} of `block` must be "
                    f"4D (batch, height, width, channels), got shape "
                    f"{tuple(tensors[0].shape)}."
                )

    @property
    def block(self) -> keras.Model:
        """The wrapped model."""
        return self._block

    @property
    def grid(self) -> Tuple[int, int]:
        """Number of patches `(n_h, n_w)`."""
        return self._grid

    def build(self, input_shape):
        if len(input_shape) != 4:
            raise ValueError(
                f"PatchStage '{self.name}' expects 4D (batch, height, width, "
                f"channels) inputs, got shape {tuple(input_shape)}."
            )
        if not self._block.built:
            self._block.build(input_shape)
        output_shape = self._block.compute_output_shape(input_shape)
        self._check_io([keras.KerasTensor(input_shape)], [keras.KerasTensor(output_shape)])
        tiled_shape = self._tiled_shape(input_shape)
        what = "the input of the final global average pool" if self._ends_with_global_pool() else "the stage output"
        for axis, size, n in zip(("height", "width"), tiled_shape[1:3], self._grid):
            if size is not None and n > size:
                raise ValueError(
                    f"PatchStage '{self.name}': grid={self._grid} asks for {n} "
                    f"patches along {axis}, but {what} is only "
                    f"{size} pixels {'high' if axis == 'height' else 'wide'} "
                    f"(shape {tiled_shape})."
                )

    def call(self, inputs, training=None):
        with keras.name_scope(stage_scope_name(self.name)):
            return self._block(inputs, training=training)

    def compute_output_shape(self, input_shape):
        return self._block.compute_output_shape(input_shape)

    def get_config(self):
        config = super().get_config()
        config.update(
            {
                "block": keras.saving.serialize_keras_object(self._block),
                "grid": list(self._grid),
            }
        )
        return config

    @classmethod
    def from_config(cls, config):
        config = dict(config)
        block = keras.saving.deserialize_keras_object(config.pop("block"))
        return cls(block, **config)
