"""Receptive-field redistribution (MCUNetV2, Sec. 3.2).

Patch-based inference recomputes the overlap of neighbouring patches' input
regions, and that overlap grows with the receptive field of the patch stage.
Redistribution shrinks the patch stage's receptive field (3x3 kernels, fewer
blocks) and grows the later stages' (the removed blocks move there, and
their kernels grow until the whole network sees at least as far as before),
so the recompute overhead drops while capacity stays where memory is cheap.

Example:

>>> from keras_patch.tuning.architecture import ArchSpec, StageSpec
>>> from keras_patch.tuning.redistribution import redistribute
>>> base = ArchSpec(resolution=64, width=0.25, patch_stages=2, grid=(2, 2),
...                 stages=(StageSpec(16, 1, 1, expand=1), StageSpec(24, 3, 2, kernel=5), StageSpec(32, 2, 2)))
>>> redistribute(base).describe()
'64px w0.25 [1x(e1,k3) 2x(e6,k3) 3x(e6,k5)] patch 2 stage(s) 2x2'
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional

from keras_patch.errors import KerasPatchError
from keras_patch.tuning.architecture import ArchSpec, StageSpec, build_model, receptive_field
from keras_patch.tuning.budget import BudgetReport, measure_model


def redistribute(spec: ArchSpec, blocks_moved_per_stage: int = 1, later_kernel: int = 5) -> ArchSpec:
    """The redistributed variant of `spec`.

    1. Every patch stage gets 3x3 kernels and `blocks_moved_per_stage` fewer
       blocks (never fewer than one).
    2. The removed blocks are appended to the later stages, one per stage,
       starting right after the patch stage.
    3. Later stages, in order, get `later_kernel` kernels until the receptive
       field of the whole network is at least that of `spec` (or every later
       stage has one).

    Raises:
        KerasPatchError: `spec` has no patch stage, or no stage after it.
    """
    p = spec.patch_stages
    if p == 0:
        raise KerasPatchError("redistribute: the spec has no patch stage (patch_stages=0)")
    if p >= len(spec.stages):
        raise KerasPatchError(f"redistribute: all {len(spec.stages)} stages are patched; none is left to grow")
    if blocks_moved_per_stage < 0:
        raise KerasPatchError(f"redistribute: blocks_moved_per_stage={blocks_moved_per_stage} must be >= 0")
    stages: List[StageSpec] = list(spec.stages)
    moved = 0
    for i in range(p):
        s = stages[i]
        depth = max(1, s.depth - blocks_moved_per_stage)
        moved += s.depth - depth
        stages[i] = StageSpec(s.channels, depth, s.stride, s.expand, kernel=3)
    later = len(stages) - p
    for k in range(moved):
        j = p + k % later
        s = stages[j]
        stages[j] = StageSpec(s.channels, s.depth + 1, s.stride, s.expand, s.kernel)
    target = receptive_field(spec)
    for j in range(p, len(stages)):
        if receptive_field(spec.replace(stages=tuple(stages))) >= target:
            break
        s = stages[j]
        stages[j] = StageSpec(s.channels, s.depth, s.stride, s.expand, max(s.kernel, later_kernel))
    return spec.replace(stages=tuple(stages))


@dataclass
class ArchitectureCost:
    """One architecture and its device costs (`measure_model` on its int8 graph)."""

    spec: ArchSpec
    report: BudgetReport

    @property
    def patch_receptive_field(self) -> int:
        return receptive_field(self.spec, self.spec.patch_stages)

    @property
    def receptive_field(self) -> int:
        return receptive_field(self.spec)


def architecture_cost(spec: ArchSpec, representative_dataset=None, seed: int = 0) -> ArchitectureCost:
    """Builds `spec` (random weights: costs do not depend on them), converts it to int8 and measures it."""
    return ArchitectureCost(spec, measure_model(build_model(spec, seed=seed), representative_dataset=representative_dataset))


@dataclass
class RedistributionReport:
    """The base architecture and its redistributed variant, side by side."""

    base: ArchitectureCost
    redistributed: ArchitectureCost

    def table(self) -> str:
        rows = [("", "base", "redistributed")]
        for label, get in (
            ("architecture", lambda c: c.spec.describe()),
            ("MACs", lambda c: f"{c.report.macs:,}"),
            ("patched MACs", lambda c: f"{c.report.patched_macs:,}"),
            ("MAC overhead", lambda c: f"{100 * c.report.mac_overhead:.1f} %"),
            ("patch stage receptive field", lambda c: f"{c.patch_receptive_field} px"),
            ("network receptive field", lambda c: f"{c.receptive_field} px"),
            ("peak SRAM (patched)", lambda c: f"{c.report.peak_sram_bytes:,} B"),
            ("peak SRAM (layer by layer)", lambda c: f"{c.report.layer_by_layer_sram_bytes:,} B"),
        ):
            rows.append((label, get(self.base), get(self.redistributed)))
        widths = [max(len(r[k]) for r in rows) for k in range(3)]
        return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(r, widths)).rstrip() for r in rows)


def compare_redistribution(
    spec: ArchSpec,
    redistributed: Optional[ArchSpec] = None,
    representative_dataset=None,
) -> RedistributionReport:
    """Profiles `spec` and its redistributed variant (`redistribute(spec)` by default)."""
    redistributed = redistributed or redistribute(spec)
    return RedistributionReport(
        base=architecture_cost(spec, representative_dataset),
        redistributed=architecture_cost(redistributed, representative_dataset),
    )
