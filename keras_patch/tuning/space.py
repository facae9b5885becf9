"""The joint search space of architecture and patch schedule, as a keras-tuner HyperModel.

`PatchSearchSpace` lists the choices (input resolution, width multiplier,
per-stage depth, expand ratio and kernel size, where the patch stage ends,
its grid, and whether to redistribute the receptive field); `spec(hp)`
turns a `keras_tuner.HyperParameters` into an `ArchSpec`. `PatchHyperModel`
builds and compiles the model and, in `fit`, resizes the images to the
trial's resolution, so one data set serves every trial.

Example:

>>> import keras_tuner
>>> from keras_patch.tuning.space import PatchHyperModel, PatchSearchSpace
>>> space = PatchSearchSpace(resolutions=(48,), widths=(0.25,), num_stages=3, patch_stages=(1, 2))
>>> hypermodel = PatchHyperModel(space)
>>> model = hypermodel.build(keras_tuner.HyperParameters())
>>> model.layers[1].name, model.input_shape
('patch_stage', (None, 48, 48, 1))
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Optional, Tuple

import keras
import keras_tuner
import numpy as np

from keras_patch.errors import KerasPatchError
from keras_patch.grid import check_grid
from keras_patch.tuning.architecture import MOBILENET_V2_STAGES, ArchSpec, StageSpec, build_model
from keras_patch.tuning.redistribution import redistribute

logger = logging.getLogger(__name__)


#: How a trial's patch stages are chosen (`PatchSearchSpace.schedule`).
SCHEDULES = ("sampled", "planner")


@dataclass(frozen=True)
class PatchSearchSpace:
    """The choices of the search; every field is a tuple of options.

    Attributes:
        resolutions: input resolutions (square).
        widths: width multipliers.
        stages: channels and strides of the backbone's stages (their depth,
            expand and kernel are replaced by the searched values; a stage
            with `expand=1` keeps it, like MobileNetV2's first).
        num_stages: how many of `stages` the backbone uses.
        depths: blocks per stage.
        expand_ratios: expand ratios of the inverted-residual blocks.
        kernel_sizes: depthwise kernel sizes, per stage.
        patch_stages: how many leading stages (plus the stem) run patch by
            patch; 0 means no patching.
        grids: patches per side of the patch stage (clamped to its output size).
        redistribute: whether to apply `redistribute` (MCUNetV2's
            receptive-field redistribution) to the sampled architecture.
        schedule: "sampled" (default): `patch_stages`, `grids` and
            `redistribute` are hyperparameters and the model gets that one
            `PatchStage`; "planner": the model is built without patch stages
            and the tuner measures it with the stages `keras_patch.plan`
            chooses under the trial's SRAM budget and `max_mac_overhead`
            (several stages, anywhere; `patch_stages`, `grids` and
            `redistribute` are then not searched).
        max_mac_overhead: with `schedule="planner"`, the planner's
            whole-network MAC overhead cap (patched / layer-by-layer MACs).
        input_channels: 1 (grayscale) or 3 (RGB).
        num_classes: classifier outputs.
        head_channels: 1x1 conv before pooling (0: none).
        dropout: dropout before the classifier.
    """

    resolutions: Tuple[int, ...] = (64, 80, 96)
    widths: Tuple[float, ...] = (0.25, 0.35, 0.5)
    stages: Tuple[StageSpec, ...] = MOBILENET_V2_STAGES
    num_stages: int = 6
    depths: Tuple[int, ...] = (1, 2, 3)
    expand_ratios: Tuple[int, ...] = (3, 4, 6)
    kernel_sizes: Tuple[int, ...] = (3, 5, 7)
    patch_stages: Tuple[int, ...] = (1, 2, 3)
    grids: Tuple[int, ...] = (2, 3, 4)
    redistribute: Tuple[bool, ...] = (False, True)
    input_channels: int = 1
    num_classes: int = 2
    head_channels: int = 0
    dropout: float = 0.0
    schedule: str = "sampled"
    max_mac_overhead: float = 1.10

    def __post_init__(self):
        if self.schedule not in SCHEDULES:
            raise KerasPatchError(f"PatchSearchSpace: schedule={self.schedule!r}; expected one of {SCHEDULES}")
        if not (isinstance(self.max_mac_overhead, (int, float)) and self.max_mac_overhead >= 1.0):
            raise KerasPatchError(f"PatchSearchSpace: max_mac_overhead={self.max_mac_overhead!r} must be a number >= 1 "
                                  "(patched / layer-by-layer MACs)")
        for name in ("resolutions", "widths", "depths", "expand_ratios", "kernel_sizes", "patch_stages",
                     "grids", "redistribute", "stages"):
            value = tuple(getattr(self, name))
            if not value:
                raise ValueError(f"PatchSearchSpace: '{name}' needs at least one option")
            object.__setattr__(self, name, value)
        for grid in self.grids:
            try:
                check_grid((grid, grid), allow_string=False)  # patches per side
            except KerasPatchError as e:
                raise KerasPatchError(f"PatchSearchSpace: grids {self.grids}: {e}") from None
        if not 1 <= self.num_stages <= len(self.stages):
            raise ValueError(f"PatchSearchSpace: num_stages={self.num_stages} must be in [1, {len(self.stages)}]")
        if self.schedule == "sampled" and max(self.patch_stages) >= self.num_stages:
            raise ValueError(f"PatchSearchSpace: patch_stages {self.patch_stages} must leave at least one of the "
                             f"{self.num_stages} stages to run layer by layer")

    def spec(self, hp) -> ArchSpec:
        """Declares the hyperparameters on `hp` and returns the architecture they choose."""
        resolution = hp.Choice("resolution", list(self.resolutions))
        width = hp.Choice("width", list(self.widths))
        stages = []
        for i, base in enumerate(self.stages[: self.num_stages]):
            depth = hp.Choice(f"depth_{i}", list(self.depths))
            expand = base.expand if base.expand == 1 else hp.Choice(f"expand_{i}", list(self.expand_ratios))
            kernel = hp.Choice(f"kernel_{i}", list(self.kernel_sizes))
            stages.append(StageSpec(base.channels, depth, base.stride, expand, kernel))
        if self.schedule == "planner":  # no PatchStage: the tuner measures the planner's stages
            return ArchSpec(resolution=resolution, input_channels=self.input_channels, width=width,
                            stages=tuple(stages), patch_stages=0, num_classes=self.num_classes,
                            head_channels=self.head_channels, dropout=self.dropout)
        patch_stages = hp.Choice("patch_stages", list(self.patch_stages))
        grid = hp.Choice("grid", list(self.grids))
        redistributed = hp.Choice("redistribute", list(self.redistribute)) if len(self.redistribute) > 1 \
            else self.redistribute[0]
        spec = ArchSpec(resolution=resolution, input_channels=self.input_channels, width=width,
                        stages=tuple(stages), patch_stages=0, num_classes=self.num_classes,
                        head_channels=self.head_channels, dropout=self.dropout)
        if patch_stages:
            out = spec.output_size(patch_stages - 1)
            if grid > out:
                logger.info("grid %d clamped to the patch stage's output size %d", grid, out)
            spec = spec.replace(patch_stages=patch_stages, grid=(min(grid, out),) * 2)
            if redistributed:
                spec = redistribute(spec)
        return spec


def resize_images(x, size: int):
    """Resizes a batch of images (N, H, W, C) to `size` x `size` (area averaging when shrinking).

    Anything that is not such a numpy batch (a `tf.data.Dataset`, None) is returned unchanged.
    """
    if not isinstance(x, np.ndarray) or x.ndim != 4 or x.shape[1:3] == (size, size):
        return x
    import tensorflow as tf

    method = "area" if x.shape[1] >= size else "bilinear"
    return tf.image.resize(x, (size, size), method=method).numpy().astype(x.dtype)


class PatchHyperModel(keras_tuner.HyperModel):
    """Builds `space.spec(hp)` with a `PatchStage`, compiled for classification from logits.

    Args:
        space: the `PatchSearchSpace` (defaults: person detection, 1 channel, 2 classes).
        learning_rate: Adam's learning rate.
        seed: seeds each model's initial weights.
    """

    def __init__(self, space: Optional[PatchSearchSpace] = None, learning_rate: float = 3e-3,
                 seed: int = 0, name: Optional[str] = None, tunable: bool = True):
        super().__init__(name=name, tunable=tunable)
        self.space = space or PatchSearchSpace()
        self.learning_rate = learning_rate
        self.seed = seed

    def spec(self, hp) -> ArchSpec:
        """The architecture `hp` chooses."""
        return self.space.spec(hp)

    def measure_options(self) -> dict:
        """What `measure_model` needs besides the budgets: the planner and its MAC cap with `schedule="planner"`."""
        if self.space.schedule == "planner":
            return dict(planner=True, max_mac_overhead=self.space.max_mac_overhead)
        return {}

    def build(self, hp):
        model = build_model(self.spec(hp), seed=self.seed)
        model.compile(optimizer=keras.optimizers.Adam(self.learning_rate),
                      loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                      metrics=["accuracy"])
        return model

    def fit(self, hp, model, x=None, y=None, validation_data=None, **kwargs):
        """`model.fit` with numpy images resized to the model's input resolution."""
        size = int(model.inputs[0].shape[1])
        if isinstance(validation_data, (tuple, list)):
            validation_data = (resize_images(validation_data[0], size), *validation_data[1:])
        return model.fit(resize_images(x, size), y, validation_data=validation_data, **kwargs)
