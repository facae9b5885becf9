"""Hypothesis strategies: random patchable Keras stages, grids and int8 inputs.

A drawn `StageSpec` is plain data (input shape, a tuple of block specs, a
weight seed), so a failing example prints as a self-contained reproducer:

>>> from tests.strategies import *  # doctest: +SKIP
>>> spec = StageSpec(input_shape=(9, 14, 3), blocks=(Conv(filters=4, kernel=(3, 5), ...),), seed=0)  # doctest: +SKIP
>>> model = build_model(spec)  # doctest: +SKIP

`build_model` puts the stage (layers named `s<i>_...`) in front of a small
head (`kp_head_conv` 1x1 Conv2D -> GlobalAveragePooling2D -> Dense(3)) so the
stage output is never the model output. `build_stage_block` builds the stage
alone as a functional model (for `PatchStage`).

Every drawn architecture is valid by construction: the strategies track the
feature-map shape block by block, so spatial sizes stay >= 1, VALID kernels
fit, residual adds see equal shapes; no dilation anywhere (the converter
would turn dilated convs into SPACE_TO_BATCH_ND / BATCH_TO_SPACE_ND).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Tuple

import numpy as np
from hypothesis import strategies as st

MAX_CHANNELS = 16  # cap on any stage tensor's channels (keeps the tests fast)
HEAD_NAME = "kp_head_conv"

# ----------------------------------------------------------------- specs
# act: None, "relu" or "relu6"; act_mode: how it is expressed in Keras:
#   "fused"      -> the layer's own `activation=` argument,
#   "relu_layer" -> a following keras.layers.ReLU() / ReLU(6.0),
#   "act_layer"  -> a following keras.layers.Activation("relu" / "relu6").
# With bn=True the activation is never fused (it must come after the BN).


@dataclass(frozen=True)
class Conv:
    filters: int
    kernel: Tuple[int, int]
    strides: Tuple[int, int]
    padding: str
    use_bias: bool = True
    bn: bool = False
    act: Optional[str] = None
    act_mode: str = "fused"


@dataclass(frozen=True)
class DWConv:
    kernel: Tuple[int, int]
    strides: Tuple[int, int]
    padding: str
    depth_multiplier: int = 1
    use_bias: bool = True
    bn: bool = False
    act: Optional[str] = None
    act_mode: str = "fused"


@dataclass(frozen=True)
class Pool:
    kind: str  # "max" or "avg"
    pool: Tuple[int, int]
    strides: Tuple[int, int]
    padding: str


@dataclass(frozen=True)
class Pad:
    pads: Tuple[Tuple[int, int], Tuple[int, int]]  # ((top, bottom), (left, right))


@dataclass(frozen=True)
class Relu:
    act: str  # "relu" or "relu6"
    act_mode: str = "relu_layer"  # or "act_layer"


@dataclass(frozen=True)
class InvertedResidual:
    """[1x1 expand + BN? + ReLU6] -> DW (stride 1, same) + BN? + ReLU6 -> 1x1 project + BN? -> Add(input)."""

    expand_channels: Optional[int]  # None: no expand conv (MobileNetV2 t=1)
    dw_kernel: Tuple[int, int]
    bn: bool
    post_act: Optional[str] = None  # ReLU / ReLU6 after the Add (fused into ADD)


@dataclass(frozen=True)
class Branch:
    kind: str  # "identity", "conv", "dwpw", "maxpool", "avgpool"
    kernel: Tuple[int, int] = (1, 1)
    act: Optional[str] = None


@dataclass(frozen=True)
class TwoBranchAdd:
    """Add(branch_a(x), branch_b(x)); both branches use `stride` and SAME padding."""

    filters: int
    stride: int
    a: Branch
    b: Branch
    post_act: Optional[str] = None


@dataclass(frozen=True)
class StageSpec:
    input_shape: Tuple[int, int, int]  # H, W, C
    blocks: tuple
    seed: int = 0


# ----------------------------------------------------------- shape logic


def _out_size(n: int, k: int, s: int, padding: str) -> int:
    if padding == "same":
        return math.ceil(n / s)
    return (n - k) // s + 1


def block_output_shape(block, shape):
    """Output (H, W, C) of `block` on an input of `shape`."""
    h, w, c = shape
    if isinstance(block, (Conv, DWConv, Pool)):
        k = block.pool if isinstance(block, Pool) else block.kernel
        oh = _out_size(h, k[0], block.strides[0], block.padding)
        ow = _out_size(w, k[1], block.strides[1], block.padding)
        oc = block.filters if isinstance(block, Conv) else (
            c * block.depth_multiplier if isinstance(block, DWConv) else c)
        return oh, ow, oc
    if isinstance(block, Pad):
        (t, b), (l, r) = block.pads
        return h + t + b, w + l + r, c
    if isinstance(block, (Relu, InvertedResidual)):
        return shape
    if isinstance(block, TwoBranchAdd):
        return math.ceil(h / block.stride), math.ceil(w / block.stride), block.filters
    raise TypeError(block)


def stage_output_shape(spec: StageSpec):
    shape = tuple(spec.input_shape)
    for block in spec.blocks:
        shape = block_output_shape(block, shape)
        assert min(shape) >= 1, (spec, shape)
    return shape


def stage_shapes(spec: StageSpec):
    """Shapes of the stage input and of every block output."""
    shapes = [tuple(spec.input_shape)]
    for block in spec.blocks:
        shapes.append(block_output_shape(block, shapes[-1]))
    return shapes


# ------------------------------------------------------------ strategies

_ACTS = st.sampled_from([None, "relu", "relu6"])


@st.composite
def _kernel(draw, sizes, limit_h=None, limit_w=None):
    """A (kh, kw) from `sizes`, square most of the time, within the limits."""
    kh_choices = [k for k in sizes if limit_h is None or k <= limit_h]
    kw_choices = [k for k in sizes if limit_w is None or k <= limit_w]
    kh = draw(st.sampled_from(kh_choices))
    if kh in kw_choices and draw(st.booleans()):
        return kh, kh
    return kh, draw(st.sampled_from(kw_choices))


@st.composite
def _strides(draw):
    s = draw(st.sampled_from([1, 2]))
    if draw(st.integers(0, 5)) == 0:  # occasionally different per axis
        return s, draw(st.sampled_from([1, 2]))
    return s, s


@st.composite
def _padding_and_kernel(draw, sizes, h, w):
    """SAME, or VALID with a kernel that fits the (h, w) input."""
    fits = min(sizes) <= h and min(sizes) <= w
    padding = draw(st.sampled_from(["same", "valid"])) if fits else "same"
    if padding == "valid":
        return padding, draw(_kernel(sizes, h, w))
    return padding, draw(_kernel(sizes))


@st.composite
def _activation(draw, bn: bool):
    act = draw(_ACTS)
    if act is None:
        return None, "fused"
    modes = ["relu_layer", "act_layer"] if bn else ["fused", "fused", "relu_layer", "act_layer"]
    return act, draw(st.sampled_from(modes))


@st.composite
def conv_blocks(draw, shape):
    h, w, _ = shape
    padding, kernel = draw(_padding_and_kernel((1, 3, 5, 7), h, w))
    bn = draw(st.booleans())
    act, mode = draw(_activation(bn))
    return Conv(
        filters=draw(st.integers(1, 8)), kernel=kernel, strides=draw(_strides()),
        padding=padding, use_bias=draw(st.booleans()), bn=bn, act=act, act_mode=mode,
    )


@st.composite
def dwconv_blocks(draw, shape):
    h, w, c = shape
    padding, kernel = draw(_padding_and_kernel((3, 5, 7), h, w))
    bn = draw(st.booleans())
    act, mode = draw(_activation(bn))
    multiplier = draw(st.sampled_from([1, 2])) if 2 * c <= MAX_CHANNELS else 1
    return DWConv(
        kernel=kernel, strides=draw(_strides()), padding=padding,
        depth_multiplier=multiplier, use_bias=draw(st.booleans()), bn=bn, act=act, act_mode=mode,
    )


@st.composite
def pool_blocks(draw, shape):
    h, w, _ = shape
    padding, pool = draw(_padding_and_kernel((2, 3), h, w))
    return Pool(kind=draw(st.sampled_from(["max", "avg"])), pool=pool,
                strides=draw(_strides()), padding=padding)


@st.composite
def pad_blocks(draw, shape):
    pads = draw(st.tuples(st.tuples(st.integers(0, 3), st.integers(0, 3)),
                          st.tuples(st.integers(0, 3), st.integers(0, 3))))
    if not any(p for pair in pads for p in pair):
        pads = ((0, 1), (0, 0))  # an all-zero ZeroPadding2D is folded away
    return Pad(pads=pads)


@st.composite
def relu_blocks(draw, shape):
    return Relu(act=draw(st.sampled_from(["relu", "relu6"])),
                act_mode=draw(st.sampled_from(["relu_layer", "act_layer"])))


@st.composite
def inverted_residual_blocks(draw, shape):
    _, _, c = shape
    expand = draw(st.one_of(st.none(), st.integers(c, min(4 * c, MAX_CHANNELS))))
    return InvertedResidual(
        expand_channels=expand, dw_kernel=draw(_kernel((3, 5, 7))), bn=draw(st.booleans()),
        post_act=draw(_ACTS),
    )


@st.composite
def _branch(draw, stride, filters, c):
    kinds = ["conv", "dwpw"]
    if filters == c:
        kinds += ["maxpool", "avgpool"]
        if stride == 1:
            kinds.append("identity")
    kind = draw(st.sampled_from(kinds))
    if kind == "identity":
        return Branch("identity")
    if kind in ("maxpool", "avgpool"):
        return Branch(kind, kernel=draw(_kernel((2, 3))))
    sizes = (1, 3, 5) if kind == "conv" else (3, 5)
    return Branch(kind, kernel=draw(_kernel(sizes)), act=draw(_ACTS))


@st.composite
def two_branch_add_blocks(draw, shape):
    _, _, c = shape
    stride = draw(st.sampled_from([1, 2]))
    filters = draw(st.sampled_from(sorted({c, draw(st.integers(1, 8))})))
    a = draw(_branch(stride, filters, c))
    b = draw(_branch(stride, filters, c))
    if a.kind == "identity" and b.kind == "identity":
        b = Branch("conv", kernel=(3, 3))
    return TwoBranchAdd(filters=filters, stride=stride, a=a, b=b, post_act=draw(_ACTS))


BLOCK_STRATEGIES = {
    "conv": conv_blocks,
    "dwconv": dwconv_blocks,
    "pool": pool_blocks,
    "pad": pad_blocks,
    "relu": relu_blocks,
    "inverted_residual": inverted_residual_blocks,
    "two_branch_add": two_branch_add_blocks,
}


@st.composite
def stage_specs(draw, min_size=5, max_size=40, max_channels=8, max_blocks=6):
    """A random `StageSpec`: input H, W in [min_size, max_size] independently."""
    h = draw(st.integers(min_size, max_size))
    w = draw(st.integers(min_size, max_size))
    c = draw(st.integers(1, max_channels))
    n_blocks = draw(st.integers(1, max_blocks))
    shape = (h, w, c)
    blocks = []
    for _ in range(n_blocks):
        kinds = list(BLOCK_STRATEGIES)
        if shape[0] * shape[1] > 48 * 48:  # keep padded maps from growing without end
            kinds.remove("pad")
        kind = draw(st.sampled_from(kinds))
        block = draw(BLOCK_STRATEGIES[kind](shape))
        blocks.append(block)
        shape = block_output_shape(block, shape)
        assert min(shape) >= 1 and shape[2] <= MAX_CHANNELS, (blocks, shape)
    seed = draw(st.integers(0, 2**31 - 1))
    return StageSpec(input_shape=(h, w, c), blocks=tuple(blocks), seed=seed)


def grids(out_shape, max_grid=8):
    """A grid (n_h, n_w), each drawn from 1..max_grid and clipped to the output size.

    Clipping keeps the full range of grids valid while making grids that do not
    divide the output (e.g. 3 rows of a 7-pixel output) common.
    """
    oh, ow = int(out_shape[0]), int(out_shape[1])
    return st.tuples(st.integers(1, max_grid), st.integers(1, max_grid)).map(
        lambda g: (min(g[0], oh), min(g[1], ow))
    )


@dataclass(frozen=True)
class Int8Batch:
    """A batch of int8 images, drawn as (shape, extreme pattern, seed) so it prints short."""

    shape: Tuple[int, int, int]
    extreme: str  # "min", "max", "checker" or "sparse" (random -128/127)
    seed: int
    n_random: int = 2

    def array(self) -> np.ndarray:
        """(1 + n_random, H, W, C) int8: the extreme image, then uniform random ones."""
        h, w, c = self.shape
        rng = np.random.default_rng(self.seed)
        if self.extreme == "min":
            first = np.full((h, w, c), -128, np.int8)
        elif self.extreme == "max":
            first = np.full((h, w, c), 127, np.int8)
        elif self.extreme == "checker":
            yy, xx, cc = np.indices((h, w, c))
            first = np.where((yy + xx + cc) % 2 == 0, -128, 127).astype(np.int8)
        else:
            first = rng.choice(np.array([-128, 127], np.int8), size=(h, w, c))
        batch = [first] + [rng.integers(-128, 128, size=(h, w, c), dtype=np.int8) for _ in range(self.n_random)]
        return np.stack(batch)


def int8_inputs(input_shape, n_random=2):
    """Int8Batch: one extreme image (-128 / 127 / a -128,127 checkerboard / random -128,127) + random ones."""
    return st.builds(
        Int8Batch,
        shape=st.just(tuple(int(d) for d in input_shape)),
        extreme=st.sampled_from(["min", "max", "checker", "sparse"]),
        seed=st.integers(0, 2**32 - 1),
        n_random=st.just(n_random),
    )


# --------------------------------------------------------------- builders


def _keras():
    import keras

    return keras


def _activation_layers(x, act, mode, name):
    layers = _keras().layers
    if act is None or mode == "fused":
        return x
    if mode == "relu_layer":
        return layers.ReLU(6.0 if act == "relu6" else None, name=f"{name}_relu")(x)
    return layers.Activation(act, name=f"{name}_act")(x)


def _apply_block(x, block, name):
    layers = _keras().layers
    if isinstance(block, Conv):
        fused = block.act if (block.act and block.act_mode == "fused") else None
        x = layers.Conv2D(block.filters, block.kernel, strides=block.strides, padding=block.padding,
                          use_bias=block.use_bias, activation=fused, name=f"{name}_conv")(x)
        if block.bn:
            x = layers.BatchNormalization(name=f"{name}_bn")(x)
        return _activation_layers(x, block.act, block.act_mode, name)
    if isinstance(block, DWConv):
        fused = block.act if (block.act and block.act_mode == "fused") else None
        x = layers.DepthwiseConv2D(block.kernel, strides=block.strides, padding=block.padding,
                                   depth_multiplier=block.depth_multiplier, use_bias=block.use_bias,
                                   activation=fused, name=f"{name}_dw")(x)
        if block.bn:
            x = layers.BatchNormalization(name=f"{name}_bn")(x)
        return _activation_layers(x, block.act, block.act_mode, name)
    if isinstance(block, Pool):
        cls = layers.MaxPooling2D if block.kind == "max" else layers.AveragePooling2D
        return cls(block.pool, strides=block.strides, padding=block.padding, name=f"{name}_{block.kind}pool")(x)
    if isinstance(block, Pad):
        return layers.ZeroPadding2D(block.pads, name=f"{name}_pad")(x)
    if isinstance(block, Relu):
        return _activation_layers(x, block.act, block.act_mode, name)
    if isinstance(block, InvertedResidual):
        c = x.shape[-1]
        y = x
        if block.expand_channels is not None:
            y = layers.Conv2D(block.expand_channels, 1, use_bias=not block.bn, name=f"{name}_expand")(y)
            if block.bn:
                y = layers.BatchNormalization(name=f"{name}_expand_bn")(y)
            y = layers.ReLU(6.0, name=f"{name}_expand_relu")(y)
        y = layers.DepthwiseConv2D(block.dw_kernel, padding="same", use_bias=not block.bn, name=f"{name}_dw")(y)
        if block.bn:
            y = layers.BatchNormalization(name=f"{name}_dw_bn")(y)
        y = layers.ReLU(6.0, name=f"{name}_dw_relu")(y)
        y = layers.Conv2D(c, 1, use_bias=not block.bn, name=f"{name}_project")(y)
        if block.bn:
            y = layers.BatchNormalization(name=f"{name}_project_bn")(y)
        x = layers.Add(name=f"{name}_add")([x, y])
        return _activation_layers(x, block.post_act, "relu_layer", f"{name}_post")
    if isinstance(block, TwoBranchAdd):
        outs = [_apply_branch(x, br, block, f"{name}_{tag}") for tag, br in (("a", block.a), ("b", block.b))]
        x = layers.Add(name=f"{name}_add")(outs)
        return _activation_layers(x, block.post_act, "relu_layer", f"{name}_post")
    raise TypeError(block)


def _apply_branch(x, branch, block, name):
    layers = _keras().layers
    s = block.stride
    if branch.kind == "identity":
        return x
    if branch.kind in ("maxpool", "avgpool"):
        cls = layers.MaxPooling2D if branch.kind == "maxpool" else layers.AveragePooling2D
        return cls(branch.kernel, strides=s, padding="same", name=f"{name}_{branch.kind}")(x)
    if branch.kind == "conv":
        return layers.Conv2D(block.filters, branch.kernel, strides=s, padding="same",
                             activation=branch.act, name=f"{name}_conv")(x)
    y = layers.DepthwiseConv2D(branch.kernel, strides=s, padding="same", activation=branch.act,
                               name=f"{name}_dw")(x)
    return layers.Conv2D(block.filters, 1, name=f"{name}_pw")(y)


def _stage_tensor(inputs, spec: StageSpec):
    x = inputs
    for i, block in enumerate(spec.blocks):
        x = _apply_block(x, block, f"s{i}")
    return x


def randomize_weights(model, seed: int) -> None:
    """Non-trivial biases and BatchNormalization statistics (so BN folding matters).

    Kernels keep Keras' seeded Glorot init, with some output channels scaled
    (per-channel quantization scales then differ widely) and, rarely, zeroed.
    """
    keras = _keras()
    rng = np.random.default_rng(seed)
    for layer in model.layers:
        if isinstance(layer, keras.Model):
            randomize_weights(layer, int(rng.integers(2**31)))
            continue
        if isinstance(layer, keras.layers.BatchNormalization):
            n = layer.gamma.shape[0]
            sign = np.where(rng.random(n) < 0.15, -1.0, 1.0)
            layer.gamma.assign((sign * rng.uniform(0.3, 2.0, n)).astype("float32"))
            layer.beta.assign(rng.normal(0.0, 0.5, n).astype("float32"))
            layer.moving_mean.assign(rng.normal(0.0, 0.5, n).astype("float32"))
            layer.moving_variance.assign(rng.uniform(0.2, 3.0, n).astype("float32"))
        elif isinstance(layer, (keras.layers.Conv2D, keras.layers.DepthwiseConv2D, keras.layers.Dense)):
            kernel_var = layer.kernel  # DepthwiseConv2D: (kh, kw, in, multiplier)
            kernel = np.array(kernel_var.numpy())
            # output channels are the last axis (Conv2D/Dense) or the last two (DepthwiseConv2D)
            flat = kernel.reshape(kernel.shape[:2] + (-1,)) if kernel.ndim == 4 else kernel
            n_out = flat.shape[-1]
            scale = np.exp(rng.uniform(-1.5, 1.0, n_out))
            if n_out > 1 and rng.random() < 0.1:
                scale[rng.integers(n_out)] = 0.0  # an all-zero output channel
            flat = flat * scale
            kernel_var.assign(flat.reshape(kernel.shape).astype("float32"))
            if layer.use_bias:
                layer.bias.assign(rng.normal(0.0, 0.3, layer.bias.shape).astype("float32"))


def build_stage_block(spec: StageSpec, name="stage_block"):
    """The stage alone as a functional keras.Model (random weights from `spec.seed`)."""
    keras = _keras()
    keras.utils.set_random_seed(spec.seed)
    inputs = keras.Input(tuple(spec.input_shape), name="stage_input")
    block = keras.Model(inputs, _stage_tensor(inputs, spec), name=name)
    randomize_weights(block, spec.seed)
    return block


def _head(x):
    layers = _keras().layers
    x = layers.Conv2D(4, 1, name=HEAD_NAME)(x)
    x = layers.GlobalAveragePooling2D(name="kp_head_gap")(x)
    return layers.Dense(3, name="kp_head_dense")(x)


def build_model(spec: StageSpec, patch_grid=None):
    """Stage + head. With `patch_grid`, the stage is wrapped in a PatchStage(grid=patch_grid)."""
    keras = _keras()
    keras.backend.clear_session()  # hundreds of models per session: reset name counters/state
    if patch_grid is not None:
        from keras_patch.keras.patch_stage import PatchStage

        block = build_stage_block(spec)
        keras.utils.set_random_seed(spec.seed + 1)
        inputs = keras.Input(tuple(spec.input_shape), name="model_input")
        x = PatchStage(block, grid=patch_grid, name="stage1")(inputs)
    else:
        keras.utils.set_random_seed(spec.seed)
        inputs = keras.Input(tuple(spec.input_shape), name="model_input")
        x = _stage_tensor(inputs, spec)
    model = keras.Model(inputs, _head(x), name="kp_model")
    randomize_weights(model, spec.seed + 2)
    return model
