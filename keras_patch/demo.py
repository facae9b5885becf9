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
import os
from dataclasses import dataclass

import numpy as np

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
    patched_path: str
    unpatched_path: str
    plot_path: str


def build_demo_model(
    input_size: int = DEMO_INPUT_SIZE, alpha: float = DEMO_ALPHA, seed: int = 0, num_classes: int = DEMO_CLASSES
):
    """MobileNetV2 (random weights, average pooling) with a Dense head without softmax."""
    import keras

    keras.utils.set_random_seed(seed)
    base = keras.applications.MobileNetV2(
        input_shape=(input_size, input_size, 3), alpha=alpha, weights=None,
        include_top=False, pooling="avg",
    )
    outputs = keras.layers.Dense(num_classes, name="classifier")(base.output)
    return keras.Model(base.input, outputs, name=f"mobilenetv2_{alpha}_{input_size}")


def run_demo(out_dir: str = "keras_patch_demo", grid=(6, 6), num_images: int = 4, seed: int = 0, progress=None) -> DemoResult:
    """Builds, wraps, exports, profiles and checks the demo model.

    Args:
        out_dir: where the `.tflite` files and `memory.png` go.
        grid: patches of the stage.
        num_images: random int8 images compared bit for bit.
        progress: optional callable(str) told about each step.
    """
    from keras_patch.export import convert_int8, export_tflite
    from keras_patch.profiler import profile
    from keras_patch.runtime import run_tflite
    from keras_patch.tflm_arena import measure_tflm_arena
    from keras_patch.wrap import wrap_stage

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
    expected = run_tflite(unpatched, images)[0]
    actual = run_tflite(patched, images)[0]
    actual_cpp = run_tflite(patched, images, executor="cpp")[0]
    return DemoResult(
        profile=prof,
        stock_tflm_head_bytes=stock_head,
        bit_exact=bool(np.array_equal(expected, actual)),
        bit_exact_cpp=bool(np.array_equal(expected, actual_cpp)),
        num_images=num_images,
        patched_path=patched_path,
        unpatched_path=unpatched_path,
        plot_path=plot_path,
    )
