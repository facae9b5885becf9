"""The arena passes, one at a time, then with the whole-network plan: side by side in one run.

    python benchmarks/arena.py [--models mbv2-1.0-224,mbv2-0.35-144,...] [--markdown] [--cache DIR]

For each model (the models of `benchmarks/memory.py`; `mbv2-0.35-144-float-pad`
is MobileNetV2 as a PyTorch export has it: float input, explicit PAD ops),
layer by layer:

* **stock TFLM**: the arena head the `tflite-micro` interpreter *measures*
  for the file as it is (greedy planner);
* **live bound (TinyEngine's rules)**: the most bytes alive at one op once
  the input is int8, PADs are folded and depthwise/ADD ops run in place
  (`optimize_arena(...).lower_bound_bytes`): no memory plan can go below it;
* then each arena pass added in turn (`keras_patch.graph.passes.pipeline`,
  `ArenaOptions`): int8 input, PAD folded, offline memory plan (which
  aliases ADD/MUL outputs with a dying input), in-place depthwise ops and
  patch arenas. Each head is the TFLM replica's for the rewritten file (byte
  exact against TFLM, `tests/test_offline_plan.py`, `tests/test_tflm_ops.py`).

Then the whole-network plan (`keras_patch.plan`, MAC overhead <= 1.10)
without any arena pass (the planner's first version) and with all of them:
A (arena head), A' (without the input tensor), MAC overhead. Below the
table: the issue's targets, whether each holds and, where one does not,
what holds it.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from memory import MODELS, load_model  # noqa: E402
from tables import render_table  # noqa: E402

#: The models of the table, in order.
DEFAULT_MODELS = ("mbv2-1.0-224", "mbv2-0.35-144", "mbv2-0.35-144-float-pad", "vww-96", "person-tuned")
MAX_MAC_OVERHEAD = 1.10
#: (model, A' limit in bytes) at MAC overhead <= MAX_MAC_OVERHEAD: issue 11's targets (kB = 1000 B).
A_PRIME_TARGETS = (("mbv2-0.35-144", 35_000), ("mbv2-1.0-224", 120_000))

#: The layer-by-layer rows: (label, ArenaOptions switches on).
STEPS = (
    ("+ int8 input", ("int8_input",)),
    ("+ PAD folded", ("int8_input", "fold_pad")),
    ("+ offline plan", ("int8_input", "fold_pad", "offline_plan")),
    ("+ in-place ops", ("int8_input", "fold_pad", "offline_plan", "in_place")),
)


def _options(on, kernel="portable"):
    from keras_patch.graph.passes.pipeline import ArenaOptions

    return ArenaOptions(kernel=kernel, **{f.name: f.name in on for f in dataclasses.fields(ArenaOptions)
                                          if f.name != "kernel"})


def measure_model(name: str, cache, log) -> dict:
    from keras_patch.arena.profiler import profile
    from keras_patch.arena.tflm_arena import measure_tflm_arena
    from keras_patch.graph.passes.pipeline import optimize_arena
    from keras_patch.graph.tflite_model import TFLiteModel
    from keras_patch.planner.search import plan

    tflite = load_model(name, cache, log)
    stock = measure_tflm_arena(tflite).head_bytes
    full = TFLiteModel.from_bytes(tflite)
    bound = optimize_arena(full, _options(("int8_input", "fold_pad", "offline_plan", "in_place"))).lower_bound_bytes
    rows = [dict(method="stock TFLM (measured)", A=stock, A_=None, overhead=1.0, stages=0),
            dict(method="live bound, TinyEngine's rules", A=bound, A_=None, overhead=None, stages=None)]
    for label, on in STEPS:
        model = TFLiteModel.from_bytes(tflite)
        optimize_arena(model, _options(on))
        prof = profile(model.to_bytes())
        rows.append(dict(method=label, A=prof.patched_peak_bytes, A_=prof.patched_peak_bytes_without_input,
                         overhead=1.0, stages=prof.num_stages))
    for label, arena in (("plan, no arena pass", False), ("plan + all arena passes", True)):
        started = time.perf_counter()
        result = plan(tflite, max_mac_overhead=MAX_MAC_OVERHEAD, arena=arena)
        patched = result.apply(tflite)
        prof = profile(patched)
        seconds = time.perf_counter() - started
        log(f"{name}: {label}: {len(result.stages)} stage(s) in {seconds:.1f} s")
        rows.append(dict(method=f"{label} (<= {MAX_MAC_OVERHEAD:.2f})", A=prof.patched_peak_bytes,
                         A_=prof.patched_peak_bytes_without_input, overhead=prof.mac_overhead,
                         stages=prof.num_stages, patched=patched, seconds=seconds))
    return dict(name=name, description=MODELS[name][0], stock=stock, bound=bound, rows=rows)


def render(models: list, markdown: bool) -> str:
    header = ["model", "arena", "A: arena head", "vs stock", "A' (w/o input)", "MAC overhead", "stage ops"]
    lines = []
    for m in models:
        for row in m["rows"]:
            lines.append([
                m["name"], row["method"], f"{row['A']:,}", f"{m['stock'] / row['A']:.2f}x",
                "-" if row["A_"] is None else f"{row['A_']:,}",
                "-" if row["overhead"] is None else f"{row['overhead']:.3f}",
                "-" if row["stages"] is None else str(row["stages"]),
            ])
    return render_table(header, lines, markdown)


def live_peak_text(patched: bytes, kernel: str = "portable", top: int = 4) -> str:
    """The op whose live set without the input (in-place pairs counted once) is largest, and its buffers."""
    from keras_patch.arena.profiler import _short_op_label
    from keras_patch.graph.passes.offline_plan import plan_buffers
    from keras_patch.graph.passes.pipeline import _live_per_op
    from keras_patch.graph.tflite_model import TFLiteModel
    from keras_patch.planner.schedule import short_tensor_name

    model = TFLiteModel.from_bytes(patched)
    live = _live_per_op(model, kernel, with_input=False, with_aliases=True)
    inputs = {model.tensor(t).name for t in model.inputs}
    buffers = plan_buffers(model, kernel)

    def holders(op: int) -> str:
        alive = sorted((b for b in buffers if b.first_op <= op <= b.last_op and b.name not in inputs),
                       key=lambda b: -b.size)
        names = [("scratch" if b.name.startswith("scratch:") else short_tensor_name(b.name)) + f" {b.size:,}"
                 for b in alive[:top]]
        return f"{_short_op_label(model, op)}: {live[op]:,} B = " + " + ".join(names)

    peak = max(live)
    return "; and ".join(holders(op) for op in range(len(live)) if live[op] == peak)


def check_targets(models: list) -> list:
    """The issue's targets: layer by layer at the live bound; A' limits with the plan."""
    lines = []
    for m in models:
        rows = {r["method"]: r for r in m["rows"]}
        last = rows[STEPS[-1][0]]
        holds = last["A"] <= m["bound"]
        lines.append(f"target {m['name']}: layer by layer with every pass <= live bound (TinyEngine's rules): "
                     f"{'HOLDS' if holds else 'NOT MET'} ({last['A']:,} vs {m['bound']:,} B)")
    by_name = {m["name"]: m for m in models}
    for name, limit in A_PRIME_TARGETS:
        if name not in by_name:
            continue
        row = next(r for r in by_name[name]["rows"] if r["method"].startswith("plan + all"))
        holds = row["A_"] <= limit and row["overhead"] <= MAX_MAC_OVERHEAD
        line = (f"target {name}: A' <= {limit:,} B at MAC overhead <= {MAX_MAC_OVERHEAD:.2f}: "
                f"{'HOLDS' if holds else 'NOT MET'} (A' {row['A_']:,} B at {row['overhead']:.3f})")
        if not holds:
            line += f"; held by the live set without input at {live_peak_text(row['patched'])}"
        lines.append(line)
    return lines


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", default=",".join(DEFAULT_MODELS), help=f"comma-separated, from {list(MODELS)}")
    parser.add_argument("--markdown", action="store_true")
    parser.add_argument("--cache", metavar="DIR", help="read/write the converted models as DIR/<name>.tflite")
    args = parser.parse_args(argv)
    names = args.models.split(",")
    unknown = [n for n in names if n not in MODELS]
    if unknown:
        parser.error(f"unknown model(s) {unknown}; choose from {list(MODELS)}")

    def log(message: str) -> None:
        print(f"[arena] {message}", file=sys.stderr, flush=True)

    models = [measure_model(name, args.cache, log) for name in names]
    print(render(models, args.markdown))
    print()
    for line in check_targets(models):
        print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
