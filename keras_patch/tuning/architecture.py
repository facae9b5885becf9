"""MCUNet-style inverted-residual backbones described by a small spec.

An `ArchSpec` is everything the search chooses: input resolution, width
multiplier, and per stage the depth, expand ratio and kernel size, plus how
many leading stages run patch by patch and on which grid. `build_model`
turns it into a Keras model whose first stages are one `PatchStage`; the
model trains with ordinary `fit`.

Example:

>>> from keras_patch.tuning.architecture import ArchSpec, StageSpec, build_model
>>> spec = ArchSpec(resolution=48, width=0.25, patch_stages=2, grid=(2, 2),
...                 stages=(StageSpec(16, 1, 1, expand=1), StageSpec(24, 2, 2), StageSpec(32, 2, 2)))
>>> model = build_model(spec)
>>> [layer.name for layer in model.layers][:2]
['image', 'patch_stage']
>>> spec.patch_stage_end
's1_b1_add'
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Optional, Tuple

from keras_patch.errors import KerasPatchError
from keras_patch.grid import check_grid

KERNEL_SIZES = (3, 5, 7)


def make_divisible(value: float, divisor: int = 8) -> int:
    """Rounds channel counts like MobileNetV2 (multiple of `divisor`, at most 10% down)."""
    rounded = max(divisor, int(value + divisor / 2) // divisor * divisor)
    return rounded + divisor if rounded < 0.9 * value else rounded


@dataclass(frozen=True)
class StageSpec:
    """A stage of `depth` inverted-residual blocks; the first has stride `stride`.

    Attributes:
        channels: output channels before the width multiplier.
        depth: number of blocks.
        stride: stride of the first block (1 or 2).
        expand: expand ratio of the 1x1 expansion conv (1: no expansion conv).
        kernel: depthwise kernel size (3, 5 or 7).
    """

    channels: int
    depth: int
    stride: int
    expand: int = 6
    kernel: int = 3

    def __post_init__(self):
        problems = []
        if self.channels < 1:
            problems.append(f"channels={self.channels} must be >= 1")
        if self.depth < 1:
            problems.append(f"depth={self.depth} must be >= 1")
        if self.stride not in (1, 2):
            problems.append(f"stride={self.stride} must be 1 or 2")
        if self.expand < 1:
            problems.append(f"expand={self.expand} must be >= 1")
        if self.kernel not in KERNEL_SIZES:
            problems.append(f"kernel={self.kernel} must be one of {KERNEL_SIZES}")
        if problems:
            raise KerasPatchError("StageSpec: " + "; ".join(problems))


# MobileNetV2's seven stages (Sandler et al. 2018, Table 2).
MOBILENET_V2_STAGES = (
    StageSpec(16, 1, 1, expand=1),
    StageSpec(24, 2, 2),
    StageSpec(32, 3, 2),
    StageSpec(64, 4, 2),
    StageSpec(96, 3, 1),
    StageSpec(160, 3, 2),
    StageSpec(320, 1, 1),
)


@dataclass(frozen=True)
class ArchSpec:
    """A whole network: stem (3x3 conv, stride 2), stages, head.

    Attributes:
        resolution: input height and width.
        input_channels: 1 (grayscale) or 3 (RGB).
        width: width multiplier applied to every stage's and the stem's channels.
        stem_channels: stem output channels before `width`.
        stages: the `StageSpec`s, in order.
        patch_stages: the stem and the first `patch_stages` stages form the
            `PatchStage` (0: no patching).
        grid: patches `(rows, cols)` of the `PatchStage`.
        num_classes: outputs of the final Dense layer (logits).
        head_channels: a 1x1 conv before pooling (MobileNetV2: 1280); 0 for none.
        dropout: dropout rate before the classifier.
    """

    resolution: int = 96
    input_channels: int = 1
    width: float = 0.5
    stem_channels: int = 32
    stages: Tuple[StageSpec, ...] = MOBILENET_V2_STAGES
    patch_stages: int = 2
    grid: Tuple[int, int] = (3, 3)
    num_classes: int = 2
    head_channels: int = 0
    dropout: float = 0.0

    def __post_init__(self):
        object.__setattr__(self, "stages", tuple(self.stages))
        problems = []
        try:
            object.__setattr__(self, "grid", check_grid(self.grid, allow_string=False))
        except KerasPatchError as e:
            problems.append(f"grid={self.grid!r}: {e}")
        if self.resolution < 8:
            problems.append(f"resolution={self.resolution} must be >= 8")
        if not 0 <= self.patch_stages <= len(self.stages):
            problems.append(f"patch_stages={self.patch_stages} must be in [0, {len(self.stages)}]")
        if self.width <= 0:
            problems.append(f"width={self.width} must be > 0")
        if problems:
            raise KerasPatchError("ArchSpec: " + "; ".join(problems))
        out = self.patch_stage_output_size
        if self.patch_stages and (self.grid[0] > out or self.grid[1] > out):
            raise KerasPatchError(
                f"ArchSpec: grid={self.grid} has more patches per side than the patch stage's "
                f"{out}x{out} output (stage {self.patch_stages - 1}, '{self.patch_stage_end}')"
            )

    def replace(self, **changes) -> "ArchSpec":
        """A copy with `changes` applied (validated again)."""
        return dataclasses.replace(self, **changes)

    def channels(self, stage: int) -> int:
        """Output channels of stage `stage` after the width multiplier."""
        return make_divisible(self.stages[stage].channels * self.width)

    @property
    def stem_output_channels(self) -> int:
        return make_divisible(self.stem_channels * self.width)

    def output_size(self, stage: int) -> int:
        """Spatial size of stage `stage`'s output (`-1`: the stem's)."""
        size = -(-self.resolution // 2)
        for s in self.stages[: stage + 1]:
            size = -(-size // s.stride)
        return size

    @property
    def patch_stage_output_size(self) -> int:
        return self.output_size(self.patch_stages - 1) if self.patch_stages else 0

    @property
    def patch_stage_end(self) -> Optional[str]:
        """Name of the last layer of the `PatchStage` (None without patching)."""
        if not self.patch_stages:
            return None
        return block_output_name(self, self.patch_stages - 1, self.stages[self.patch_stages - 1].depth - 1)

    @property
    def num_blocks(self) -> int:
        return sum(s.depth for s in self.stages)

    def describe(self) -> str:
        """One line: resolution, width, per-stage depth/expand/kernel, split and grid."""
        stages = " ".join(f"{s.depth}x(e{s.expand},k{s.kernel})" for s in self.stages)
        split = (f"patch {self.patch_stages} stage(s) {self.grid[0]}x{self.grid[1]}" if self.patch_stages
                 else "no PatchStage")
        return f"{self.resolution}px w{self.width:g} [{stages}] {split}"


def _has_residual(spec: ArchSpec, stage: int, block: int) -> bool:
    in_channels = spec.channels(stage - 1) if stage else spec.stem_output_channels
    first_stride = spec.stages[stage].stride if block == 0 else 1
    return first_stride == 1 and (block > 0 or in_channels == spec.channels(stage))


def block_output_name(spec: ArchSpec, stage: int, block: int) -> str:
    """Name of the layer that outputs block `block` of stage `stage`."""
    prefix = f"s{stage}_b{block}"
    return f"{prefix}_add" if _has_residual(spec, stage, block) else f"{prefix}_project_bn"


def build_backbone(spec: ArchSpec, seed: Optional[int] = None):
    """The plain (unpatched) Keras model of `spec`: logits, no softmax."""
    import keras
    from keras import layers

    if seed is not None:
        keras.utils.set_random_seed(seed)

    def conv_bn(x, filters, kernel, stride, name, act=True):
        x = layers.Conv2D(filters, kernel, strides=stride, padding="same", use_bias=False, name=name)(x)
        x = layers.BatchNormalization(momentum=0.9, name=name + "_bn")(x)
        return layers.ReLU(6.0, name=name + "_relu")(x) if act else x

    inputs = keras.Input((spec.resolution, spec.resolution, spec.input_channels), name="image")
    x = conv_bn(inputs, spec.stem_output_channels, 3, 2, "stem")
    for i, stage in enumerate(spec.stages):
        filters = spec.channels(i)
        for b in range(stage.depth):
            name = f"s{i}_b{b}"
            shortcut = x
            if stage.expand > 1:
                x = conv_bn(x, int(x.shape[-1]) * stage.expand, 1, 1, name + "_expand")
            x = layers.DepthwiseConv2D(stage.kernel, strides=stage.stride if b == 0 else 1, padding="same",
                                       use_bias=False, name=name + "_dw")(x)
            x = layers.BatchNormalization(momentum=0.9, name=name + "_dw_bn")(x)
            x = layers.ReLU(6.0, name=name + "_dw_relu")(x)
            x = conv_bn(x, filters, 1, 1, name + "_project", act=False)
            if _has_residual(spec, i, b):
                x = layers.Add(name=name + "_add")([shortcut, x])
    if spec.head_channels:
        x = conv_bn(x, spec.head_channels, 1, 1, "head")
    x = layers.GlobalAveragePooling2D(name="pool")(x)
    if spec.dropout:
        x = layers.Dropout(spec.dropout, name="dropout")(x)
    outputs = layers.Dense(spec.num_classes, name="logits")(x)
    return keras.Model(inputs, outputs, name="mcunet_style")


def build_model(spec: ArchSpec, seed: Optional[int] = None):
    """`build_backbone(spec)` with the stem and first `spec.patch_stages` stages in a `PatchStage`."""
    from keras_patch.keras.wrap import wrap_stage

    base = build_backbone(spec, seed=seed)
    if not spec.patch_stages:
        return base
    return wrap_stage(base, until=spec.patch_stage_end, grid=spec.grid, name="patch_stage")


def receptive_field(spec: ArchSpec, stages: Optional[int] = None) -> int:
    """Receptive field (input pixels per side) of one output pixel of the first `stages` stages (all if None)."""
    rf, jump = 3, 2  # the stem
    for s in spec.stages[: len(spec.stages) if stages is None else stages]:
        for b in range(s.depth):
            stride = s.stride if b == 0 else 1
            rf += (s.kernel - 1) * jump
            jump *= stride
    return rf


__all__ = [
    "ArchSpec",
    "KERNEL_SIZES",
    "MOBILENET_V2_STAGES",
    "StageSpec",
    "block_output_name",
    "build_backbone",
    "build_model",
    "make_divisible",
    "receptive_field",
]
