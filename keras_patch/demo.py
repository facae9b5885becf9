"""The built-in demo: MobileNetV2 0.35@144, layer by layer vs one patch stage vs a whole-network plan.

Runs offline (random weights, no download): builds the model, exports it
int8, measures its arena in TFLM (the `tflite-micro` wheel), finds the best
single patch stage from the model input (today's method: every single-exit
end x every grid, patched and profiled) and the whole-network plan
(`keras_patch.plan`: any number of stages, anywhere) under the same MAC
overhead cap, applies the plan, checks that the planned model's int8
outputs equal real TFLM's outputs of the unpatched model bit for bit (with
both KP_PATCH_STAGE executors, on the logits and on every stage's output),
checks that it fits an Arduino Nano 33 BLE Sense (`export-arduino --board
nano33ble`, whose sketch it writes) and draws the memory plot with every
stage shaded.

Example:

>>> from keras_patch.demo import run_demo
>>> result = run_demo(out_dir="/tmp/kp-demo")  # doctest: +SKIP
>>> result.bit_exact, result.bit_exact_cpp, result.fits_board  # doctest: +SKIP
(True, True, True)
"""

from __future__ import annotations

import logging
import numbers
import os
import time
from dataclasses import dataclass, field
from typing import Callable, List, Optional, Sequence

import numpy as np

from keras_patch.errors import KerasPatchError
from keras_patch.grid import check_grid

logger = logging.getLogger(__name__)

DEMO_INPUT_SIZE = 144
DEMO_ALPHA = 0.35
DEMO_CLASSES = 10  # a small head: TFLM's int8 softmax aborts on 1000 classes
#: The demo's MAC-overhead cap, for the plan and the single stage alike. At 1.30 the plan's
#: head is the same (79,584 B, benchmarks/memory.py): its first stage holds the input image.
DEMO_MAX_MAC_OVERHEAD = 1.10
#: Grids the single-stage search tries (the planner's own default otherwise).
SINGLE_STAGE_GRIDS = tuple((n, n) for n in range(2, 9))
#: The board whose budget the planned model must fit (`export-arduino --board`).
DEMO_BOARD = "nano33ble"
#: The Arduino sketch folder the demo writes into its `out_dir`.
DEMO_SKETCH = "KerasPatchDemo"


@dataclass
class DemoMethod:
    """One way to run the demo model, as the demo's comparison shows it.

    Attributes:
        name: "layer by layer", "best single stage" or "whole-network plan".
        peak_bytes: predicted TFLM arena head (A); for layer by layer the
            head TFLM itself measured.
        peak_bytes_without_input: the same without the input tensor (A').
        mac_overhead: whole-network MACs over layer-by-layer MACs.
        stages: "start -> end grid" per stage ("" for none).
        search_seconds: how long finding it took (0 for layer by layer).
        note: why there is no such schedule, or "".
    """

    name: str
    peak_bytes: int
    peak_bytes_without_input: int
    mac_overhead: float
    stages: List[str] = field(default_factory=list)
    search_seconds: float = 0.0
    note: str = ""


@dataclass
class DemoResult:
    profile: object  # `Profile` of the planned model
    plan: object  # the `PatchPlan` applied
    methods: List[DemoMethod]  # layer by layer, best single stage, whole-network plan
    stock_tflm_head_bytes: int  # measured by the tflite-micro interpreter on the unpatched model
    bit_exact: bool  # planned model, KP_PATCH_STAGE by the numpy reference executor, vs TFLM unpatched
    bit_exact_cpp: bool  # the same with the C++ kernel core (what runs in TFLM)
    num_images: int
    distinct_logits: int  # distinct int8 values among the compared model outputs
    stage_values_compared: int  # int8 values of the stage outputs compared
    patched_path: str
    unpatched_path: str
    plot_path: str
    board: object = None  # `keras_patch.arduino.boards.Board` checked
    board_arena_bytes: int = 0  # the tensor arena the planned model needs there
    fits_board: bool = False  # `export-arduino --board` succeeded
    board_message: str = ""  # why not, when it does not fit
    sketch_path: str = ""  # the sketch written for the board ("" when it does not fit)


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


def run_demo(
    out_dir: str = "keras_patch_demo",
    max_mac_overhead: float = DEMO_MAX_MAC_OVERHEAD,
    grid=None,
    num_images: int = 4,
    seed: int = 0,
    progress: Optional[Callable[[str], None]] = None,
) -> DemoResult:
    """Builds and exports the demo model, then `compare_schedules` on it.

    Args:
        out_dir: where the `.tflite` files, `memory.png` and the Arduino
            sketch go.
        max_mac_overhead: the MAC-overhead cap of the plan and of the single
            stage it is compared with (1.10: 10 % more multiply-accumulates
            than layer by layer).
        grid: only this grid (e.g. `(4, 4)`) in both searches; `None`: the
            planner's grids, and 2x2 to 8x8 for the single stage.
        num_images: random int8 images compared bit for bit.
        seed: of the model's random weights and of the images.
        progress: optional callable(str) told about each step.
    """
    from keras_patch.keras.export import convert_int8

    grid = None if grid is None else check_grid(grid)
    if isinstance(num_images, bool) or not isinstance(num_images, numbers.Integral) or num_images < 1:
        raise KerasPatchError(f"num_images (--images) must be a positive int, got {num_images!r}.")
    _check_overhead(max_mac_overhead)
    say = progress or (lambda message: logger.info(message))
    os.makedirs(out_dir, exist_ok=True)
    say(f"building MobileNetV2 {DEMO_ALPHA}@{DEMO_INPUT_SIZE} (random weights)")
    model = build_demo_model(seed=seed)
    rng = np.random.default_rng(seed)
    calibration = rng.uniform(-1, 1, (8, DEMO_INPUT_SIZE, DEMO_INPUT_SIZE, 3)).astype(np.float32)
    say("exporting int8 .tflite")
    unpatched = convert_int8(model, calibration)
    images = rng.integers(-128, 128, (num_images, DEMO_INPUT_SIZE, DEMO_INPUT_SIZE, 3), dtype=np.int8)
    return compare_schedules(
        unpatched, images, out_dir, max_mac_overhead=max_mac_overhead,
        grids=None if grid is None else [grid], progress=say,
        title=f"MobileNetV2 {DEMO_ALPHA}@{DEMO_INPUT_SIZE}",
    )


def compare_schedules(
    unpatched: bytes,
    images: np.ndarray,
    out_dir: str,
    *,
    max_mac_overhead: float = DEMO_MAX_MAC_OVERHEAD,
    grids: Optional[Sequence] = None,
    board: str = DEMO_BOARD,
    progress: Optional[Callable[[str], None]] = None,
    title: str = "",
    name: str = "mobilenetv2",
) -> DemoResult:
    """Layer by layer vs the best single stage vs the whole-network plan of `unpatched`.

    Measures the unpatched model's arena in TFLM, searches the best single
    stage from the model input (every single-exit end x every grid, MAC
    overhead <= `max_mac_overhead`), plans the whole network
    (`keras_patch.plan`) under the same cap, applies the plan and checks the
    planned model against TFLM's output of the unpatched model with both
    KP_PATCH_STAGE executors (model outputs and every stage's output), sizes
    its tensor arena for `board` and writes the sketch there when it fits,
    and plots memory with every stage shaded.

    Args:
        unpatched: an int8 `.tflite` without KP_PATCH_STAGE ops.
        images: int8 inputs, shape (N, *input shape[1:]).
        out_dir: where `<name>.tflite`, `<name>_patched.tflite`, `memory.png`
            and the sketch folder `DEMO_SKETCH` go (must exist).
        max_mac_overhead: MAC-overhead cap of both searches.
        grids: grids of both searches; `None`: the planner's default and
            `SINGLE_STAGE_GRIDS`.
        board: `export-arduino --board` key the planned model must fit.
        progress: optional callable(str) told about each step.
        title: the model's name in the plot title.
        name: file name stem of the `.tflite` files.

    Returns:
        A `DemoResult`.
    """
    from keras_patch.arduino.arena import estimate_arena
    from keras_patch.arduino.boards import get_board
    from keras_patch.arduino.sketch import BoardBudgetError, export_sketch
    from keras_patch.arena.profiler import profile
    from keras_patch.arena.tflm_arena import measure_tflm_arena, run_tflm
    from keras_patch.planner.search import plan as plan_network
    from keras_patch.runtime.host import run_tflite

    _check_overhead(max_mac_overhead)
    target = get_board(board)
    say = progress or (lambda message: logger.info(message))
    unpatched_path = os.path.join(out_dir, f"{name}.tflite")
    patched_path = os.path.join(out_dir, f"{name}_patched.tflite")
    with open(unpatched_path, "wb") as f:
        f.write(unpatched)

    say("measuring the unpatched model's arena in TFLM (tflite-micro)")
    stock = measure_tflm_arena(unpatched)
    layer_by_layer = profile(unpatched)
    methods = [DemoMethod("layer by layer", stock.head_bytes, layer_by_layer.layer_by_layer_peak_bytes_without_input,
                          1.0)]
    say(f"searching the best single stage from the input (MAC overhead <= {max_mac_overhead:.2f})")
    methods.append(best_single_stage(unpatched, max_mac_overhead, grids))
    say(f"planning the whole network (keras_patch.plan, MAC overhead <= {max_mac_overhead:.2f})")
    plan = plan_network(unpatched, max_mac_overhead=max_mac_overhead, grids=grids)
    patched = plan.apply(unpatched)
    with open(patched_path, "wb") as f:
        f.write(patched)
    prof = profile(patched)
    methods.append(DemoMethod("whole-network plan", prof.patched_peak_bytes, prof.patched_peak_bytes_without_input,
                              prof.mac_overhead, [_stage_text(s.start_layer, s.end_layer, s.grid) for s in plan.stages],
                              plan.planner_seconds, plan.message))
    say("plotting memory")
    stages = f"{len(plan.stages)} patch stage{'s' * (len(plan.stages) != 1)}"
    plot_path = prof.plot(os.path.join(out_dir, "memory.png"),
                          title=f"{title or name}: whole-network plan, {stages}, MAC overhead {prof.mac_overhead:.2f}")

    say(f"checking bit-exactness on {len(images)} images against TFLM (reference executor and C++ core)")
    # The model outputs and, pixel by pixel, the output of every stage.
    ends = [s.end for s in plan.stages]
    expected = run_tflm(_with_outputs(unpatched, ends), images).outputs
    actual = run_tflite(_with_outputs(patched, ends), images)
    actual_cpp = run_tflite(_with_outputs(patched, ends), images, executor="cpp")
    num_outputs = len(expected) - len(ends)

    say(f"sizing the tensor arena for the {target.name}")
    sketch_path, message = "", ""
    arena = estimate_arena(patched, tail_bytes=stock.tail_bytes)
    try:
        export_sketch(patched_path, os.path.join(out_dir, DEMO_SKETCH), board, tail_bytes=stock.tail_bytes,
                               overwrite=True)
        sketch_path = os.path.join(out_dir, DEMO_SKETCH)
    except BoardBudgetError as e:
        message = str(e)
    return DemoResult(
        profile=prof,
        plan=plan,
        methods=methods,
        stock_tflm_head_bytes=stock.head_bytes,
        bit_exact=all(np.array_equal(e, a) for e, a in zip(expected, actual)),
        bit_exact_cpp=all(np.array_equal(e, a) for e, a in zip(expected, actual_cpp)),
        distinct_logits=int(np.unique(expected[0]).size),
        stage_values_compared=int(sum(e.size for e in expected[num_outputs:])),
        num_images=len(images),
        patched_path=patched_path,
        unpatched_path=unpatched_path,
        plot_path=plot_path,
        board=target,
        board_arena_bytes=arena.total_bytes,
        fits_board=not message,
        board_message=message,
        sketch_path=sketch_path,
    )


def best_single_stage(unpatched: bytes, max_mac_overhead: float, grids: Optional[Sequence] = None) -> DemoMethod:
    """The best single stage from the model input (the method before whole-network plans):
    every single-exit end x every grid, the lowest arena head among those within
    `max_mac_overhead` (`planner.schedule.best_schedule`, costed in memory)."""
    from keras_patch.errors import KerasPatchError
    from keras_patch.planner.schedule import best_schedule, candidate_splits

    start = time.perf_counter()
    try:
        best = best_schedule(unpatched, grids or SINGLE_STAGE_GRIDS, candidate_splits(unpatched, min_output_size=2),
                             max_mac_overhead=max_mac_overhead)
    except KerasPatchError:
        return DemoMethod("best single stage", 0, 0, 1.0, [], time.perf_counter() - start,
                          f"no single stage from the input within MAC overhead {max_mac_overhead:.2f}")
    return DemoMethod("best single stage", best.patched_peak_bytes, best.patched_peak_bytes_without_input,
                      best.mac_overhead, [_stage_text("", best.split_layer, best.grid)], time.perf_counter() - start)


def _stage_text(start: str, end: str, grid) -> str:
    return f"{start or 'input'} -> {end} {grid[0]}x{grid[1]}"


def _check_overhead(max_mac_overhead) -> None:
    if (isinstance(max_mac_overhead, bool) or not isinstance(max_mac_overhead, numbers.Real)
            or not max_mac_overhead >= 1.0 or max_mac_overhead == float("inf")):
        raise KerasPatchError(
            f"max_mac_overhead (--max-overhead) must be a number 1.0 or more (1.10: 10 % more MACs than layer by "
            f"layer), got {max_mac_overhead!r}."
        )


def _with_outputs(model_bytes: bytes, tensor_names: Sequence[str]) -> bytes:
    """The model with the tensors called `tensor_names` appended to its outputs."""
    from keras_patch.graph.tflite_model import TFLiteModel

    if not tensor_names:
        return model_bytes
    model = TFLiteModel.from_bytes(model_bytes)
    model.add_outputs([model.find_tensor(n) for n in tensor_names])
    return model.to_bytes()
