"""Tuner: sampled patch schedule vs the planner's, on the same architectures (issue 10, point 2).

    python benchmarks/tuner_schedule.py [--trials 24] [--seed 0] [--sram 64K] [--max-overhead 1.1,1.3] [--markdown]

Draws `--trials` architectures of the default `PatchSearchSpace` (person
detection: 1 channel, 64-96 px, widths 0.25-0.5, six MobileNetV2 stages;
redistribution off, so that both searches see the very same networks) with a
seeded random generator, and measures each as the tuner does before training
(`keras_patch.tuning.measure_model`):

* **sampled**: `schedule="sampled"`, the search space's own one
  `PatchStage` (the stem and the first 1-3 stages, a sampled 2x2-4x4 grid);
* **planner**: `schedule="planner"`, the model without patch stages and the
  stages `keras_patch.plan` chooses under the SRAM budget, at each MAC
  overhead cap.

Prints per trial the layer-by-layer head, each schedule's peak SRAM and MAC
overhead and whether it fits the budget (a sampled schedule above layer by
layer counts as not fitting: the tuner refuses it), then the totals: feasible
count, median peak SRAM, mean MAC overhead. Weights do not change memory or
MACs, so nothing is trained. About 10 s per trial on 2 cores.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from tables import render_table  # noqa: E402


def sample_hyperparameters(space, count: int, seed: int) -> list:
    """`count` keras-tuner `HyperParameters` of `space`, every value drawn uniformly with `seed`."""
    import keras_tuner
    import numpy as np

    rng = np.random.default_rng(seed)
    drawn = []
    for _ in range(count):
        hp = keras_tuner.HyperParameters()
        space.spec(hp)  # declares every hyperparameter (at its default)
        for declared in hp.space:
            hp.values[declared.name] = declared.values[int(rng.integers(len(declared.values)))]
        drawn.append(hp)
    return drawn


def compare(trials: int, seed: int, sram_bytes: int, caps: list) -> list:
    """One row per trial: layer by layer, sampled and planner-chosen numbers."""
    import dataclasses

    import keras

    from keras_patch.tuning import PatchSearchSpace, build_model, measure_model

    sampled_space = PatchSearchSpace(redistribute=(False,))
    planner_space = dataclasses.replace(sampled_space, schedule="planner")
    rows = []
    for i, hp in enumerate(sample_hyperparameters(sampled_space, trials, seed)):
        keras.backend.clear_session()
        spec = sampled_space.spec(hp)
        started = time.perf_counter()
        sampled = measure_model(build_model(spec, seed=0), sram_bytes=sram_bytes)
        row = {"trial": i, "architecture": planner_space.spec(hp).describe(),
               "schedule": f"{spec.patch_stages} stage(s) {spec.grid[0]}x{spec.grid[1]}",
               "layer_by_layer": sampled.layer_by_layer_sram_bytes,
               "sampled": (sampled.peak_sram_bytes, 1 + sampled.mac_overhead, sampled.fits, sampled.patch_stages)}
        for cap in caps:
            keras.backend.clear_session()
            planned = measure_model(build_model(planner_space.spec(hp), seed=0), sram_bytes=sram_bytes,
                                    planner=True, max_mac_overhead=cap)
            row[cap] = (planned.peak_sram_bytes, 1 + planned.mac_overhead, planned.fits, planned.patch_stages)
        row["seconds"] = time.perf_counter() - started
        rows.append(row)
        print(f"trial {i}: {row['architecture']}: layer by layer {row['layer_by_layer']:,} B, sampled "
              f"{row['sampled'][0]:,} B x{row['sampled'][1]:.2f}, planner "
              + ", ".join(f"{row[c][0]:,} B x{row[c][1]:.2f} ({row[c][3]} stages)" for c in caps)
              + f" ({row['seconds']:.0f} s)", file=sys.stderr, flush=True)
    return rows


def summary(rows: list, caps: list, sram_bytes: int) -> list:
    """Totals per schedule: feasible count, median peak SRAM, mean MAC overhead (all and feasible trials)."""
    out = []
    for key, name in [("sampled", "sampled (space's PatchStage)")] + [(c, f"planner, MAC overhead <= {c:g}")
                                                                     for c in caps]:
        values = [r[key] for r in rows]
        feasible = [v for v in values if v[2]]
        worse = sum(1 for r, v in zip(rows, values) if v[0] > r["layer_by_layer"])
        out.append([
            name,
            f"{len(feasible)} / {len(values)}",
            str(worse),
            f"{statistics.median(v[0] for v in values):,.0f}",
            f"{statistics.median(v[0] / r['layer_by_layer'] for r, v in zip(rows, values)):.3f}",
            f"{statistics.mean(v[1] for v in values):.3f}",
            f"{statistics.mean(v[1] for v in feasible):.3f}" if feasible else "-",
            f"{statistics.mean(v[3] for v in values):.1f}",
        ])
    return out


def main(argv=None) -> int:
    from keras_patch.cli import parse_size

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--trials", type=int, default=24)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--sram", type=parse_size, default=64 * 1024, help="SRAM budget, e.g. 64K")
    parser.add_argument("--max-overhead", default="1.1,1.3", help="planner MAC overhead caps, comma-separated")
    parser.add_argument("--markdown", action="store_true")
    args = parser.parse_args(argv)
    caps = [float(c) for c in args.max_overhead.split(",")]
    rows = compare(args.trials, args.seed, args.sram, caps)
    headers = ["schedule", f"fits {args.sram:,} B", "above layer by layer", "median peak SRAM (B)",
               "median peak / layer by layer", "mean MAC overhead", "mean MAC overhead (fitting)", "mean stages"]
    print(render_table(headers, summary(rows, caps, args.sram), markdown=args.markdown))
    return 0


if __name__ == "__main__":
    sys.exit(main())
