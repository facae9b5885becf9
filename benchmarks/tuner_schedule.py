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
    import numpy as np

    from keras_patch.keras.export import export_tflite
    from keras_patch.planner.search import plan
    from keras_patch.tuning import PatchSearchSpace, build_model, measure_model
    from keras_patch.tuning.budget import planned

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
        keras.backend.clear_session()
        arch = planner_space.spec(hp)
        # What measure_model(planner=True) does, with the int8 conversion shared by both caps.
        tflite = export_tflite(build_model(arch, seed=0),
                               np.random.default_rng(0).random((2, arch.resolution, arch.resolution,
                                                                arch.input_channels), dtype=np.float32))
        for cap in caps:
            lowest = plan(tflite, max_mac_overhead=cap)
            fitted = planned(tflite, sram_bytes, cap)
            row[cap] = (lowest.peak_bytes, lowest.mac_overhead, lowest.peak_bytes <= sram_bytes, len(lowest.stages))
            row[(cap, "budget")] = (fitted.peak_bytes, fitted.mac_overhead, fitted.peak_bytes <= sram_bytes,
                                    len(fitted.stages))
            row[(cap, "seconds")] = lowest.planner_seconds
        row["seconds"] = time.perf_counter() - started
        rows.append(row)
        print(f"trial {i}: {row['architecture']}: layer by layer {row['layer_by_layer']:,} B, sampled "
              f"({row['schedule']}) {row['sampled'][0]:,} B x{row['sampled'][1]:.2f}, planner lowest "
              + ", ".join(f"{row[c][0]:,} B x{row[c][1]:.2f} ({row[c][3]} stages, {row[(c, 'seconds')]:.1f} s)"
                          for c in caps)
              + ", under the budget " + ", ".join(f"{row[(c, 'budget')][0]:,} B x{row[(c, 'budget')][1]:.2f}"
                                                   for c in caps)
              + f" ({row['seconds']:.0f} s)", file=sys.stderr, flush=True)
    return rows


def summary(rows: list, caps: list) -> list:
    """Totals per schedule: feasible count, median peak SRAM, mean MAC overhead (all and feasible trials)."""
    out = []
    keys = [("sampled", "sampled: the space's PatchStage")]
    keys += [(c, f"planner, lowest head, MAC overhead <= {c:g}") for c in caps]
    keys += [((c, "budget"), f"planner, fewest MACs that fit, MAC overhead <= {c:g}") for c in caps]
    for key, name in keys:
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
    seconds = [r[(c, "seconds")] for r in rows for c in caps]
    print(f"{len(rows)} trials; planner time per model: median {statistics.median(seconds):.1f} s, "
          f"max {max(seconds):.1f} s")
    print(render_table(headers, summary(rows, caps), markdown=args.markdown))
    return 0


if __name__ == "__main__":
    sys.exit(main())
