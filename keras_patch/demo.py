"""The built-in demo: MobileNetV2 0.35@144, its stride-8 stage run patch by patch.

Runs offline (random weights, no download): builds the model, wraps the
stage up to `block_5_add` (output 18x18, stride 8) in a PatchStage, exports
int8 with the stage as one KP_PATCH_STAGE op, profiles both networks, checks
that the patched model's int8 outputs equal the unpatched model's bit for
bit on random images, and writes the memory plot.

Example:

>>> from keras_patch.demo import run_demo
>>> result = run_demo(out_dir="/tmp/kp-demo")  # doctest: +SKIP
>>> result.bit_exact  # doctest: +SKIP
True
"""

from __future__ import annotations

import logging
import numbers
import os
from dataclasses import dataclass

import numpy as np

from keras_patch.errors import KerasPatchError
from keras_patch.grid import check_grid

logger = logging.getLogger(__name__)

DEMO_INPUT_SIZE = 144
DEMO_ALPHA = 0.35
DEMO_SPLIT_LAYER = "block_5_add"  # end of the stride-8 stage
DEMO_CLASSES = 10  # a small head: TFLM's int8 softmax aborts on 1000 classes


@dataclass
class DemoResult:
    profile: object
    stock_tflm_head_bytes: int  # measured by the tflite-micro interpreter on the unpatched model
    bit_exact: bool  # KP_PATCH_STAGE by the numpy reference executor
    bit_exact_cpp: bool  # KP_PATCH_STAGE by the C++ kernel core (what runs in TFLM)
    num_images: int
    distinct_logits: int  # distinct int8 values among the compared model outputs
    stage_values_compared: int  # int8 values of the stage output compared
    patched_path: str
    unpatched_path: str
    plot_path: str


def build_demo_model(
    input_size: int = DEMO_INPUT_SIZE, alpha: float = DEMO_ALPHA, seed: int = 0, num_classes: int = DEMO_CLASSES
):
    """MobileNetV2 (random weights, average pooling) with a Dense head without softmax.

    Keras' initial BatchNormalization statistics make random-weight
    activations fade layer after layer until every int8 logit is the same,
    and a bit-exactness check on such outputs would prove nothing. So the
    BatchNormalization layers get random (seeded) statistics, and the head
    is scaled so the logits of inputs in [-1, 1] span about +-4.
    """
    import keras

    keras.utils.set_random_seed(seed)
    base = keras.applications.MobileNetV2(
        input_shape=(input_size, input_size, 3), alpha=alpha, weights=None,
        include_top=False, pooling="avg",
    )
    outputs = keras.layers.Dense(num_classes, name="classifier")(base.output)
    model = keras.Model(base.input, outputs, name=f"mobilenetv2_{alpha}_{input_size}")
    rng = np.random.default_rng(seed)
    for layer in model.layers:
        if isinstance(layer, keras.layers.BatchNormalization):
            shape = layer.gamma.shape
            layer.set_weights([rng.uniform(0.5, 1.5, shape), rng.uniform(0.0, 0.5, shape),
                               rng.uniform(-0.1, 0.1, shape), rng.uniform(0.05, 0.2, shape)])
    head = model.get_layer("classifier")
    kernel, bias = head.get_weights()
    probe = rng.uniform(-1, 1, (4, input_size, input_size, 3)).astype(np.float32)
    features = np.asarray(keras.Model(model.input, head.input)(probe))
    head.set_weights([kernel * (4.0 / max(float(np.abs(features @ kernel).max()), 1e-12)), bias])
    return model


def run_demo(out_dir: str = "keras_patch_demo", grid=(6, 6), num_images: int = 4, seed: int = 0, progress=None) -> DemoResult:
    """Builds, wraps, exports, profiles and checks the demo model.

    Args:
        out_dir: where the `.tflite` files and `memory.png` go.
        grid: patches of the stage.
        num_images: random int8 images compared bit for bit.
        progress: optional callable(str) told about each step.
    """
    from keras_patch.keras.export import convert_int8, export_tflite
    from keras_patch.arena.profiler import profile
    from keras_patch.runtime.host import run_tflite
    from keras_patch.arena.tflm_arena import measure_tflm_arena
    from keras_patch.keras.wrap import wrap_stage

    grid = check_grid(grid)
    if isinstance(num_images, bool) or not isinstance(num_images, numbers.Integral) or num_images < 1:
        raise KerasPatchError(f"num_images (--images) must be a positive int, got {num_images!r}.")
    say = progress or (lambda message: logger.info(message))
    os.makedirs(out_dir, exist_ok=True)
    say(f"building MobileNetV2 {DEMO_ALPHA}@{DEMO_INPUT_SIZE} (random weights)")
    model = build_demo_model(seed=seed)
    say(f"wrapping layers up to '{DEMO_SPLIT_LAYER}' in a PatchStage, grid {grid[0]}x{grid[1]}")
    wrapped = wrap_stage(model, until=DEMO_SPLIT_LAYER, grid=grid)
    rng = np.random.default_rng(seed)
    calibration = rng.uniform(-1, 1, (8, DEMO_INPUT_SIZE, DEMO_INPUT_SIZE, 3)).astype(np.float32)
    say("exporting int8 .tflite (patched and unpatched)")
    patched_path = os.path.join(out_dir, "mobilenetv2_patched.tflite")
    unpatched_path = os.path.join(out_dir, "mobilenetv2.tflite")
    patched = export_tflite(wrapped, calibration, path=patched_path)
    unpatched = convert_int8(model, calibration)
    with open(unpatched_path, "wb") as f:
        f.write(unpatched)
    say("profiling memory")
    prof = profile(patched)
    plot_path = prof.plot(os.path.join(out_dir, "memory.png"),
                          title=f"MobileNetV2 {DEMO_ALPHA}@{DEMO_INPUT_SIZE}, stage to {DEMO_SPLIT_LAYER}, "
                                f"{grid[0]}x{grid[1]} patches")
    say("measuring the unpatched model's arena in TFLM (tflite-micro)")
    stock_head = measure_tflm_arena(unpatched).head_bytes
    say(f"checking bit-exactness on {num_images} random images (reference executor and C++ core)")
    images = rng.integers(-128, 128, (num_images, DEMO_INPUT_SIZE, DEMO_INPUT_SIZE, 3), dtype=np.int8)
    # The model outputs and, pixel by pixel, the stage output itself.
    expected = run_tflite(_with_stage_output(unpatched, stage_tensor=DEMO_SPLIT_LAYER), images)
    actual = run_tflite(_with_stage_output(patched), images)
    actual_cpp = run_tflite(_with_stage_output(patched), images, executor="cpp")
    return DemoResult(
        profile=prof,
        stock_tflm_head_bytes=stock_head,
        bit_exact=all(np.array_equal(e, a) for e, a in zip(expected, actual)),
        bit_exact_cpp=all(np.array_equal(e, a) for e, a in zip(expected, actual_cpp)),
        distinct_logits=int(np.unique(expected[0]).size),
        stage_values_compared=int(expected[-1].size),
        num_images=num_images,
        patched_path=patched_path,
        unpatched_path=unpatched_path,
        plot_path=plot_path,
    )


def _with_stage_output(model_bytes: bytes, stage_tensor: str = None) -> bytes:
    """The model with its stage output appended to its outputs: the KP_PATCH_STAGE
    op's output, or (unpatched) the output of the layer named `stage_tensor`."""
    from keras_patch.graph.patchify import find_stages
    from keras_patch.planner.schedule import short_tensor_name
    from keras_patch.graph.tflite_model import TFLiteModel

    model = TFLiteModel.from_bytes(model_bytes)
    if stage_tensor is None:
        (op,) = find_stages(model)
    else:
        op = next(i for i in range(model.num_ops)
                  if short_tensor_name(model.tensor(model.op_outputs(i)[0]).name) == stage_tensor)
    model.add_outputs([model.op_outputs(op)[0]])
    return model.to_bytes()
