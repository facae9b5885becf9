"""MAC overhead of patch-based inference before and after receptive-field redistribution.

    python benchmarks/redistribution.py [--markdown]

For MobileNetV2-like backbones (`keras_patch.tuning.ArchSpec` with
MobileNetV2's stage table, random weights, int8), patched up to stride 8 or
16, each row measures the base network and its `redistribute`d variant side
by side on their int8 graphs (`keras_patch.profile`): whole-network MACs, the
recompute overhead of patching, the patch stage's and the network's
receptive field, and the patched arena head. MCUNetV2 reports about 10 % ->
3 % overhead for MobileNetV2. Takes about two minutes on 2 cores.
"""

from __future__ import annotations

import argparse
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from tables import render_table  # noqa: E402

CASES = (
    # (resolution, width, patch stages, grid)
    (144, 0.35, 2, 4),
    (96, 0.35, 2, 3),
    (144, 0.35, 3, 4),
    (96, 0.5, 3, 3),
)


def main(argv=None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--markdown", action="store_true")
    args = parser.parse_args(argv)

    from tqdm import tqdm

    from keras_patch.tuning import ArchSpec, compare_redistribution

    header = ["backbone", "patched to", "grid", "MACs base → RD", "MAC overhead base → RD",
              "patch-stage RF base → RD", "network RF base → RD", "peak SRAM base → RD"]
    rows = []
    for resolution, width, stages, grid in tqdm(CASES, desc="redistribution", unit="case"):
        spec = ArchSpec(resolution=resolution, input_channels=3, width=width, patch_stages=stages,
                        grid=(grid, grid), num_classes=10)
        report = compare_redistribution(spec)
        b, r = report.base, report.redistributed
        rows.append([
            f"MbV2 {width}@{resolution}",
            f"stride {2 ** (1 + sum(s.stride == 2 for s in spec.stages[:stages]))}",
            f"{grid}x{grid}",
            f"{b.report.macs / 1e6:.2f} M → {r.report.macs / 1e6:.2f} M",
            f"{100 * b.report.mac_overhead:.1f} % → {100 * r.report.mac_overhead:.1f} %",
            f"{b.patch_receptive_field} → {r.patch_receptive_field} px",
            f"{b.receptive_field} → {r.receptive_field} px",
            f"{b.report.peak_sram_bytes:,} → {r.report.peak_sram_bytes:,} B",
        ])
    table = render_table(header, rows, args.markdown)
    print(table)
    return table


if __name__ == "__main__":
    main()
