"""Peak SRAM of stock TFLM vs patch-based inference, per model and grid.

    python benchmarks/memory.py [--models mbv2-1.0-224,mbv2-0.35-144,vww-96] [--grids 2-8] [--markdown]

For each model (random weights, built offline, int8 input and output):

* **stock TFLM** — the arena head TFLM plans for the unpatched model,
  *measured* by the `tflite-micro` interpreter (RecordingMicroAllocator);
  next to it keras-patch's prediction of the same number, as a check;
* for each grid, the **best split** (the single-exit point of the first
  stage that gives the lowest patched arena head, searched over every
  candidate by `keras_patch.planner.schedule`), its predicted patched arena head
  with and without the input tensor, the ratio to stock TFLM, the
  whole-network MAC overhead, and where the patched network's head lies:
  `stage` when the KP_PATCH_STAGE op sets it, or the later op that does
  (the layer-by-layer rest of the network is a floor no grid can go under).

Prints a plain table (or Markdown with `--markdown`, as pasted into the
README). Takes a few minutes on 2 cores, mostly converting MobileNetV2 1.0@224.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import numpy as np  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from tables import render_table  # noqa: E402


def _mobilenet_v2(alpha: float, size: int, classes: int):
    from keras_patch.demo import build_demo_model

    return build_demo_model(input_size=size, alpha=alpha, num_classes=classes)


def _vww(size: int = 96):
    """The TFLM person-detection architecture: MobileNetV1 0.25, grayscale, 2 classes."""
    import keras

    keras.utils.set_random_seed(0)
    base = keras.applications.MobileNet(
        input_shape=(size, size, 1), alpha=0.25, weights=None, include_top=False, pooling="avg"
    )
    outputs = keras.layers.Dense(2, name="person")(base.output)
    return keras.Model(base.input, outputs, name=f"vww_mobilenet_v1_0.25_{size}")


#: name -> (description, builder). Heads are Dense logits without softmax:
#: TFLM's int8 SOFTMAX aborts on the tiny logit scales of random weights.
MODELS = {
    "mbv2-1.0-224": ("MobileNetV2 1.0@224 (1000-class logits)", lambda: _mobilenet_v2(1.0, 224, 1000)),
    "mbv2-0.35-144": ("MobileNetV2 0.35@144 (10-class logits)", lambda: _mobilenet_v2(0.35, 144, 10)),
    "vww-96": ("VWW: MobileNetV1 0.25@96x96x1 (2 classes)", _vww),
}


def _parse_grids(text: str) -> list:
    if "-" in text:
        lo, hi = (int(v) for v in text.split("-"))
        return [(n, n) for n in range(lo, hi + 1)]
    return [(int(v), int(v)) for v in text.split(",")]


def measure_model(name: str, grids: list, log) -> dict:
    from keras_patch.keras.export import convert_int8
    from keras_patch.arena.profiler import profile
    from keras_patch.planner.schedule import candidate_splits, evaluate_schedules, schedule_rank
    from keras_patch.arena.tflm_arena import measure_tflm_arena

    description, build = MODELS[name]
    start = time.perf_counter()
    model = build()
    shape = tuple(int(d) for d in model.inputs[0].shape[1:])
    calibration = np.random.default_rng(0).uniform(-1, 1, (4, *shape)).astype(np.float32)
    tflite = convert_int8(model, calibration)
    log(f"{name}: converted in {time.perf_counter() - start:.0f} s")
    stock = measure_tflm_arena(tflite).head_bytes
    predicted = profile(tflite).layer_by_layer_peak_bytes
    splits = candidate_splits(tflite, min_output_size=2)
    results = evaluate_schedules(tflite, grids, splits)
    best = {}
    for grid in grids:
        of_grid = [r for r in results if r.grid == grid]
        if of_grid:
            best[grid] = min(of_grid, key=schedule_rank)
    log(f"{name}: {len(results)} schedules over {len(splits)} splits in {time.perf_counter() - start:.0f} s")
    return dict(name=name, description=description, stock=stock, predicted=predicted, best=best,
                input_bytes=int(np.prod(shape)))


def _bound(result) -> str:
    from keras_patch.planner.schedule import short_tensor_name

    label = result.patched_peak_op
    if "KP_PATCH_STAGE" in label:
        return "stage"
    op, _, rest = label.partition(" -> ")
    return f"{op.split(' (')[0]} {short_tensor_name(rest.strip(chr(39)))}"


def render(rows: list, markdown: bool) -> str:
    from keras_patch.planner.schedule import short_tensor_name

    header = ["model", "stock TFLM head (measured)", "predicted", "grid", "best split", "stage out",
              "patched head", "vs stock", "patched w/o input", "MAC overhead", "head set by", "rest-of-net floor"]
    lines = []
    for m in rows:
        for grid, r in m["best"].items():
            lines.append([
                m["description"], f"{m['stock']:,}", f"{m['predicted']:,}", f"{grid[0]}x{grid[1]}",
                short_tensor_name(r.split_name), "x".join(map(str, r.stage_output_shape)),
                f"{r.patched_peak_bytes:,}", f"{m['stock'] / r.patched_peak_bytes:.2f}x",
                f"{r.patched_peak_bytes_without_input:,}", f"{r.mac_overhead:.3f}", _bound(r),
                f"{r.rest_peak_bytes:,}",
            ])
    return render_table(header, lines, markdown)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", default=",".join(MODELS), help=f"comma-separated, from {list(MODELS)}")
    parser.add_argument("--grids", default="2-8", help="'2-8' or '2,4,6'")
    parser.add_argument("--markdown", action="store_true")
    args = parser.parse_args(argv)
    grids = _parse_grids(args.grids)
    names = args.models.split(",")
    unknown = [n for n in names if n not in MODELS]
    if unknown:
        parser.error(f"unknown model(s) {unknown}; choose from {list(MODELS)}")

    def log(message: str) -> None:
        print(f"[memory] {message}", file=sys.stderr, flush=True)

    rows = [measure_model(name, grids, log) for name in names]
    print(render(rows, args.markdown))
    print()
    for m in rows:
        check = 100 * (m["predicted"] - m["stock"]) / m["stock"]
        print(f"{m['description']}: input tensor {m['input_bytes']:,} B; keras-patch's layer-by-layer "
              f"prediction vs measured stock TFLM head: {check:+.2f} %")
    return 0


if __name__ == "__main__":
    sys.exit(main())
