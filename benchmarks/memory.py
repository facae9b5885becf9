"""Peak SRAM of stock TFLM, the best single patch stage and the whole-network plan, side by side.

    python benchmarks/memory.py [--models mbv2-1.0-224,mbv2-0.35-144,...] [--grids 2-8]
                                [--markdown] [--cache DIR]

For each model (random weights, built offline, int8 input; the tuned person
model is the committed int8 file of the Arduino examples) and each method:

* **stock TFLM**: the arena head TFLM plans for the unpatched model,
  *measured* by the `tflite-micro` interpreter (RecordingMicroAllocator);
  A' (without the input tensor) is keras-patch's replica of that planner,
  which equals the measured head to the byte (checked below the table);
* **single stage**: today's method, one patch stage starting at the model
  input: every single-exit end of the stage x every grid is patched and
  profiled (`keras_patch.planner.schedule.evaluate_schedules`); the best by
  lowest head (any MAC overhead), and the best within each MAC-overhead cap;
* **plan**: the whole-network plan of `keras_patch.plan` at
  `max_mac_overhead` 1.10 and 1.30 (any number of stages, anywhere),
  profiled once applied (`profile(plan.apply(model))`, which must equal the
  planner's prediction).

Each row gives A (the predicted TFLM arena head), A' (the same without the
input tensor), the ratio to stock TFLM, the whole-network MAC overhead, the
number of stages, where the head is reached and the search time. Below the
table: the issue's targets and whether each holds and, where one does not,
the op at the head and the tensors that hold it there.

Prints a plain table (or Markdown with `--markdown`, as pasted into the
README). Converting MobileNetV2 1.0@224 takes minutes on 2 cores; `--cache
DIR` keeps the converted `.tflite` files (DIR/<name>.tflite) for the next run.
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

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

#: The unpatched int8 person model the Arduino examples were generated from (`examples/`, tuned).
PERSON_MODEL_SOURCE = os.path.join(REPO, "arduino", "KerasPatch", "examples", "MemoryReport", "model_data.cpp")

#: MAC-overhead caps of the planned (and capped single-stage) rows.
CAPS = (1.10, 1.30)
#: Plans with more stages are listed below the table, not in it.
MAX_STAGES_IN_TABLE = 2
#: Grids of the single-stage search unless --grids says otherwise (as before whole-network plans).
SINGLE_STAGE_GRIDS = [(n, n) for n in range(2, 9)]


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


def _mbv2_float_pad(alpha: float = 0.35, size: int = 144, classes: int = 10) -> bytes:
    """MobileNetV2 as MCUNet's PyTorch exports have it: float32 input, explicit PAD ops.

    Every stride-2 convolution is `ZeroPadding2D((1, 1))` + VALID (PyTorch's
    symmetric `padding=1`, not TF's SAME split, so the converter keeps a PAD
    op); converted with float32 input and output (QUANTIZE first, int8
    inside), random weights and calibration data.
    """
    import keras

    from keras_patch.keras.export import convert_int8

    keras.utils.set_random_seed(0)
    layers = keras.layers

    def divisible(v: float) -> int:  # keras.applications' _make_divisible(v, 8)
        rounded = max(8, int(v + 4) // 8 * 8)
        return rounded + 8 if rounded < 0.9 * v else rounded

    def conv_bn(x, filters, kernel, stride, name, act=True, depthwise=False):
        if stride == 2:
            x = layers.ZeroPadding2D((1, 1), name=f"{name}_pad")(x)
        padding = "valid" if stride == 2 or kernel == 1 else "same"
        if depthwise:
            x = layers.DepthwiseConv2D(kernel, strides=stride, padding=padding, use_bias=False, name=name)(x)
        else:
            x = layers.Conv2D(filters, kernel, strides=stride, padding=padding, use_bias=False, name=name)(x)
        x = layers.BatchNormalization(name=f"{name}_bn")(x)
        return layers.ReLU(6.0, name=f"{name}_relu")(x) if act else x

    inputs = keras.Input((size, size, 3))
    x = conv_bn(inputs, divisible(32 * alpha), 3, 2, "Conv1")
    channels = divisible(32 * alpha)
    block = 0
    for t, c, n, s in [(1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1),
                       (6, 160, 3, 2), (6, 320, 1, 1)]:
        out = divisible(c * alpha)
        for i in range(n):
            stride = s if i == 0 else 1
            y = x if t == 1 else conv_bn(x, channels * t, 1, 1, f"block_{block}_expand")
            y = conv_bn(y, 0, 3, stride, f"block_{block}_depthwise", depthwise=True)
            y = conv_bn(y, out, 1, 1, f"block_{block}_project", act=False)
            x = layers.Add(name=f"block_{block}_add")([x, y]) if stride == 1 and channels == out else y
            channels, block = out, block + 1
    x = conv_bn(x, 1280, 1, 1, "Conv_1")
    x = layers.GlobalAveragePooling2D()(x)
    model = keras.Model(inputs, layers.Dense(classes, name="logits")(x), name=f"mbv2_{alpha}_{size}_float_pad")
    for layer in model.layers:  # stand-in for training (see keras_patch.demo)
        if isinstance(layer, layers.BatchNormalization):
            layer.moving_variance.assign(np.random.default_rng(1).uniform(0.05, 0.2, layer.moving_variance.shape))
    calibration = np.random.default_rng(0).uniform(0, 1, (4, size, size, 3)).astype(np.float32)
    return bytes(convert_int8(model, calibration, int8_io=False))


def _person_tuned() -> bytes:
    """The tuned person model of `examples/` (int8, 96x96x1): MemoryReport's `g_unpatched_model`."""
    from keras_patch.arduino.sketch import model_bytes_from_source

    with open(PERSON_MODEL_SOURCE) as f:
        return model_bytes_from_source(f.read(), "g_unpatched_model")


#: name -> (description, builder): a Keras model (converted to int8 with random
#: calibration data) or `.tflite` bytes. Heads are Dense logits without softmax:
#: TFLM's int8 SOFTMAX aborts on the tiny logit scales of random weights.
MODELS = {
    "mbv2-1.0-224": ("MobileNetV2 1.0@224 (1000-class logits)", lambda: _mobilenet_v2(1.0, 224, 1000)),
    "mbv2-0.35-144": ("MobileNetV2 0.35@144 (10-class logits)", lambda: _mobilenet_v2(0.35, 144, 10)),
    "mbv2-0.5-160": ("MobileNetV2 0.5@160 (1000-class logits)", lambda: _mobilenet_v2(0.5, 160, 1000)),
    "vww-96": ("VWW: MobileNetV1 0.25@96x96x1 (2 classes)", _vww),
    "person-tuned": ("tuned person model of examples/ (96x96x1)", _person_tuned),
    "mbv2-0.35-144-float-pad": ("MobileNetV2 0.35@144, float input, PyTorch-style PAD ops (10-class logits)",
                                _mbv2_float_pad),
}

#: (model, method, the largest A' in bytes, the largest MAC overhead): the issue's targets (kB = 1,000 B).
TARGETS = [
    ("mbv2-1.0-224", "plan <= 1.10", 120_000, 1.10),
    ("mbv2-0.35-144", "plan <= 1.10", 45_000, 1.10),
]
#: The planner's time limit on MobileNetV2 1.0@224 (2 cores).
PLANNER_SECONDS_TARGET = ("mbv2-1.0-224", 60.0)


def _parse_grids(text: str) -> list:
    if "-" in text:
        lo, hi = (int(v) for v in text.split("-"))
        return [(n, n) for n in range(lo, hi + 1)]
    return [(int(v), int(v)) for v in text.split(",")]


def load_model(name: str, cache, log) -> bytes:
    """The int8 `.tflite` of `name`: from `cache/<name>.tflite`, else built (and cached)."""
    from keras_patch.keras.export import convert_int8

    path = os.path.join(cache, f"{name}.tflite") if cache else None
    if path and os.path.exists(path):
        with open(path, "rb") as f:
            return f.read()
    start = time.perf_counter()
    built = MODELS[name][1]()
    if isinstance(built, (bytes, bytearray)):
        tflite = bytes(built)
    else:
        shape = tuple(int(d) for d in built.inputs[0].shape[1:])
        calibration = np.random.default_rng(0).uniform(-1, 1, (4, *shape)).astype(np.float32)
        tflite = convert_int8(built, calibration)
        log(f"{name}: converted in {time.perf_counter() - start:.0f} s")
    if path:
        os.makedirs(cache, exist_ok=True)
        with open(path, "wb") as f:
            f.write(tflite)
    return tflite


def head_holders(patched: bytes, without_input: bool, kernel: str = "portable", top: int = 4) -> str:
    """Where the arena head of `patched` sits and which buffers hold it there.

    The op with the largest live set (every buffer alive while it runs),
    that set's largest buffers and, when TFLM's greedy placement puts the head
    above that live set, by how much.
    """
    from keras_patch.arena import memory_planner
    from keras_patch.arena.profiler import _short_op_label, stage_scratch_bytes
    from keras_patch.graph.tflite_model import TFLiteModel
    from keras_patch.planner.schedule import short_tensor_name

    model = TFLiteModel.from_bytes(patched)
    scratch = memory_planner.merged_scratch_bytes(model, stage_scratch_bytes(model, kernel))
    buffers = memory_planner.model_buffers(model, scratch)
    if without_input:
        inputs = {model.tensor(t).name for t in model.inputs}
        buffers = [b for b in buffers if b.name not in inputs]
    arena = memory_planner.plan_greedy(buffers)
    head = arena.head_bytes
    top_buffer = max(arena.buffers, key=lambda b: b.offset + memory_planner.align_up(b.size))
    shapes = {model.tensor(t).name: model.tensor(t).shape for t in range(len(model.subgraph.tensors))}

    def live(op):
        return [b for b in buffers if b.first_op <= op <= b.last_op]

    op = max(range(model.num_ops), key=lambda p: sum(memory_planner.align_up(b.size) for b in live(p)))
    alive = sorted(live(op), key=lambda b: -b.size)
    total = sum(memory_planner.align_up(b.size) for b in alive)

    def label(b) -> str:
        if b.name.startswith("scratch:"):
            owner = int(b.name.split(":")[1][2:])
            kind = "patch arena" if model.op_type(owner) == "KP_PATCH_STAGE" else "scratch"
            return f"{kind} of op {owner} {b.size:,}"
        shape = "x".join(map(str, shapes.get(b.name, ())[1:]))
        return f"{short_tensor_name(b.name)} {shape} {b.size:,}"

    text = f"{_short_op_label(model, op)}: live {total:,} B = " + " + ".join(label(b) for b in alive[:top])
    if len(alive) > top:
        text += f" + {len(alive) - top} more"
    if head > total:
        text += (f"; TFLM's greedy placement adds {head - total:,} B (head {head:,} B reached by "
                 f"{label(top_buffer)} B at offset {top_buffer.offset:,}, alive during ops "
                 f"{max(top_buffer.first_op, 0)}..{top_buffer.last_op})")
    return text


def _stages_text(stages) -> str:
    return ", ".join(f"{s.start_layer or 'input'}->{s.end_layer} {s.grid[0]}x{s.grid[1]}" for s in stages)


def measure_model(name: str, grids: list, cache, log) -> dict:
    from keras_patch.arena.profiler import profile
    from keras_patch.arena.tflm_arena import measure_tflm_arena
    from keras_patch.graph.patchify import patchify
    from keras_patch.graph.tflite_model import TFLiteModel
    from keras_patch.planner.schedule import candidate_splits, evaluate_schedules, schedule_rank, short_tensor_name
    from keras_patch.planner.search import plan

    tflite = load_model(name, cache, log)
    model = TFLiteModel.from_bytes(tflite)
    stock = measure_tflm_arena(tflite).head_bytes
    unpatched = profile(tflite)
    rows = [dict(method="stock TFLM", A=stock, A_=unpatched.layer_by_layer_peak_bytes_without_input,
                 overhead=1.0, stages=0, detail="-", head_at="", seconds=None, patched=tflite)]

    start = time.perf_counter()
    results = evaluate_schedules(tflite, grids or SINGLE_STAGE_GRIDS, candidate_splits(tflite, min_output_size=2))
    seconds = time.perf_counter() - start
    log(f"{name}: single stage: {len(results)} schedules in {seconds:.0f} s")
    for method, cap in [("single stage", None)] + [(f"single stage <= {c:.2f}", c) for c in CAPS]:
        fits = [r for r in results if cap is None or r.mac_overhead <= cap]
        if not fits:
            rows.append(dict(method=method, none=f"no single stage within MAC overhead {cap:.2f}"))
            continue
        r = min(fits, key=schedule_rank)
        patched = patchify(tflite, r.split, r.grid)
        rows.append(dict(method=method, A=r.patched_peak_bytes, A_=r.patched_peak_bytes_without_input,
                         overhead=r.mac_overhead, stages=1,
                         detail=f"input->{short_tensor_name(r.split_name)} {r.grid[0]}x{r.grid[1]}",
                         seconds=seconds, patched=patched))

    for cap in CAPS:
        result = plan(tflite, max_mac_overhead=cap, grids=grids)
        patched = result.apply(tflite)
        prof = profile(patched)
        if (prof.patched_peak_bytes, prof.patched_peak_bytes_without_input) != (
                result.peak_bytes, result.peak_bytes_without_input):
            log(f"{name}: WARNING plan <= {cap:.2f} predicted {result.peak_bytes:,} / "
                f"{result.peak_bytes_without_input:,} B, profile of the applied plan "
                f"{prof.patched_peak_bytes:,} / {prof.patched_peak_bytes_without_input:,} B")
        log(f"{name}: plan <= {cap:.2f}: {len(result.stages)} stage(s) in {result.planner_seconds:.1f} s"
            + (f" ({result.message})" if result.message else ""))
        rows.append(dict(method=f"plan <= {cap:.2f}", A=prof.patched_peak_bytes,
                         A_=prof.patched_peak_bytes_without_input, overhead=prof.mac_overhead,
                         stages=prof.num_stages, detail=_stages_text(result.stages) or "(empty plan)",
                         seconds=result.planner_seconds, patched=patched, message=result.message))
    for row in rows:
        if "patched" in row:
            row["head_at"] = head_holders(row["patched"], without_input=False)
            row["head_at_without_input"] = head_holders(row["patched"], without_input=True)
    return dict(name=name, description=MODELS[name][0], stock=stock,
                predicted=unpatched.layer_by_layer_peak_bytes,
                input_bytes=sum(model.tensor(t).num_bytes for t in model.inputs),
                rows=rows)


def render(models: list, markdown: bool) -> str:
    header = ["model", "method", "A: arena head", "vs stock", "A' (w/o input)", "MAC overhead", "stages",
              "stages (start->end grid)", "head (A) at", "search time"]
    lines = []
    for m in models:
        for row in m["rows"]:
            if "none" in row:
                lines.append([m["description"], row["method"], "-", "-", "-", "-", "-", row["none"], "-", "-"])
                continue
            head_at = row["head_at"].split(":")[0]
            lines.append([
                m["description"], row["method"], f"{row['A']:,}", f"{m['stock'] / row['A']:.2f}x",
                f"{row['A_']:,}", f"{row['overhead']:.3f}", str(row["stages"]),
                row["detail"] if row["stages"] <= MAX_STAGES_IN_TABLE else "listed below the table", head_at,
                "-" if row["seconds"] is None else f"{row['seconds']:.1f} s",
            ])
    return render_table(header, lines, markdown)


def check_targets(models: list) -> list:
    """One line per target of the issue: whether it holds and, where not, what holds the head."""
    by_name = {m["name"]: m for m in models}
    lines = []
    for name, method, limit, cap in TARGETS:
        m = by_name.get(name)
        if m is None:
            continue
        row = next(r for r in m["rows"] if r["method"] == method)
        holds = row["A_"] <= limit and row["overhead"] <= cap
        line = (f"target {m['description']}: A' <= {limit:,} B at MAC overhead <= {cap:.2f}: "
                f"{'HOLDS' if holds else 'NOT MET'} (A' {row['A_']:,} B at {row['overhead']:.3f})")
        if not holds:
            line += f"; the head without input sits at {row['head_at_without_input']}"
        lines.append(line)
    for m in models:
        rows = {r["method"]: r for r in m["rows"]}
        for cap in CAPS:
            planned, single = rows[f"plan <= {cap:.2f}"], rows[f"single stage <= {cap:.2f}"]
            if "none" in single:
                continue
            holds = planned["A"] <= single["A"]
            lines.append(f"check {m['description']}: plan <= {cap:.2f} head not above the best single stage within "
                         f"the same cap: {'HOLDS' if holds else 'NOT MET'} ({planned['A']:,} vs {single['A']:,} B)")
    name, limit = PLANNER_SECONDS_TARGET
    if name in by_name:
        m = by_name[name]
        for row in m["rows"]:
            if row["method"].startswith("plan"):
                holds = row["seconds"] <= limit
                lines.append(f"target {m['description']}: planner ({row['method']}) <= {limit:.0f} s: "
                             f"{'HOLDS' if holds else 'NOT MET'} ({row['seconds']:.1f} s)")
    return lines


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", default=",".join(MODELS), help=f"comma-separated, from {list(MODELS)}")
    parser.add_argument("--grids", help="grids of both searches: '2-8' or '2,4,6' (square); default: 2x2 to 8x8 "
                                        "for the single stage, the planner's own grids (up to 8x8) for the plan")
    parser.add_argument("--markdown", action="store_true")
    parser.add_argument("--cache", metavar="DIR", help="read/write the converted models as DIR/<name>.tflite")
    args = parser.parse_args(argv)
    grids = _parse_grids(args.grids) if args.grids else None
    names = args.models.split(",")
    unknown = [n for n in names if n not in MODELS]
    if unknown:
        parser.error(f"unknown model(s) {unknown}; choose from {list(MODELS)}")

    def log(message: str) -> None:
        print(f"[memory] {message}", file=sys.stderr, flush=True)

    models = [measure_model(name, grids, args.cache, log) for name in names]
    print(render(models, args.markdown))
    print()
    for m in models:
        check = 100 * (m["predicted"] - m["stock"]) / m["stock"]
        print(f"{m['description']}: input tensor {m['input_bytes']:,} B; keras-patch's layer-by-layer "
              f"prediction vs measured stock TFLM head: {check:+.2f} %")
    print()
    for m in models:
        for row in m["rows"]:
            if row["method"].startswith("plan") and row.get("message"):
                print(f"{m['description']}, {row['method']}: {row['message']}")
    for m in models:
        for row in m["rows"]:
            if row["method"].startswith("plan") and row["stages"] > MAX_STAGES_IN_TABLE:
                print(f"{m['description']}, {row['method']}: {row['detail']}")
    print()
    for m in models:
        best = next(r for r in m["rows"] if r["method"] == f"plan <= {CAPS[0]:.2f}")
        print(f"{m['description']}, {best['method']}: head (A) at {best['head_at']}")
    print()
    for line in check_targets(models):
        print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
