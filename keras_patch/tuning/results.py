"""Search results: a table and a Pareto plot of accuracy vs peak SRAM.

Example:

>>> from keras_patch.tuning.results import TrialResult, format_results_table, pareto_front
>>> results = [TrialResult("0", "trained", 0.9, {"peak_sram_bytes": 50000.0}),
...            TrialResult("1", "trained", 0.8, {"peak_sram_bytes": 60000.0}),
...            TrialResult("2", "over budget", None, {"peak_sram_bytes": 400000.0, "feasible": 0.0})]
>>> [r.trial_id for r in pareto_front(results)]
['0']
>>> print(format_results_table(results, sram_budget_bytes=262144).splitlines()[-1])
3 trials: 2 trained, 1 over budget (not trained), 0 failed; budget: peak SRAM <= 256.0 KiB
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Dict, List, Optional

STATUS_TRAINED = "trained"
STATUS_OVER_BUDGET = "over budget"
STATUS_FAILED = "failed"
STATUS_RUNNING = "running"


@dataclass
class TrialResult:
    """One trial as `results()` reports it."""

    trial_id: str
    status: str  # STATUS_*
    objective: Optional[float]  # e.g. val_accuracy; None when not trained
    metrics: Dict[str, float] = field(default_factory=dict)  # BUDGET_METRICS and the fit metrics
    hyperparameters: Dict[str, object] = field(default_factory=dict)
    architecture: str = ""
    message: str = ""

    @property
    def peak_sram_bytes(self) -> Optional[int]:
        value = self.metrics.get("peak_sram_bytes")
        return None if value is None else int(value)

    @property
    def flash_bytes(self) -> Optional[int]:
        value = self.metrics.get("flash_bytes")
        return None if value is None else int(value)


def format_results_table(results: List[TrialResult], objective_name: str = "val_accuracy",
                         sram_budget_bytes: Optional[int] = None, flash_budget_bytes: Optional[int] = None,
                         sort_by_objective: bool = True, board: Optional[str] = None) -> str:
    """The text table `BudgetMixin.results_table` returns, for any list of `TrialResult`s.

    The "arena" column (the Arduino sketch's whole tensor arena) appears when
    the trials were measured for a board.
    """
    order = {STATUS_TRAINED: 0, STATUS_RUNNING: 1, STATUS_OVER_BUDGET: 2, STATUS_FAILED: 3}
    rows = sorted(results, key=lambda r: (order[r.status], -(r.objective or 0.0) if sort_by_objective else 0,
                                          r.trial_id))
    with_arena = any("arena_bytes" in r.metrics for r in results)
    with_stages = any("patch_stages" in r.metrics for r in results)
    header = ("trial", "status", objective_name, "peak SRAM") + (("arena",) if with_arena else ()) + (
        "flash", "MACs", "overhead") + (("stages",) if with_stages else ()) + ("architecture",)

    def kib(value) -> str:
        return "-" if value is None else f"{value / 1024:,.1f} KiB"

    lines = [header]
    for r in rows:
        m = r.metrics
        lines.append((
            r.trial_id, r.status,
            "-" if r.objective is None else f"{r.objective:.4f}",
            kib(m.get("peak_sram_bytes")), *((kib(m.get("arena_bytes")),) if with_arena else ()),
            kib(m.get("flash_bytes")),
            "-" if "macs" not in m else f"{m['macs'] / 1e6:,.2f} M",
            "-" if "mac_overhead" not in m else f"{100 * m['mac_overhead']:.1f} %",
            *(("-" if "patch_stages" not in m else str(int(m["patch_stages"])),) if with_stages else ()),
            r.architecture or ", ".join(f"{k}={v}" for k, v in r.hyperparameters.items()),
        ))
    widths = [max(len(str(line[k])) for line in lines) for k in range(len(header) - 1)]
    text = ["  ".join(str(c).ljust(w) for c, w in zip(line[:-1], widths)) + "  " + str(line[-1]) for line in lines]
    budgets = []
    if sram_budget_bytes is not None:
        budgets.append(f"peak SRAM <= {kib(sram_budget_bytes)}")
    if flash_budget_bytes is not None:
        budgets.append(f"flash <= {kib(flash_budget_bytes)}")
    if board is not None:
        from keras_patch.arduino.boards import get_board

        spec = get_board(board)
        budgets.append(f"{spec.key}: arena <= {kib(spec.arena_budget_bytes)}, "
                       f"model + code <= {kib(spec.model_flash_budget_bytes)}")
    counts = {s: sum(r.status == s for r in results) for s in order}
    text.append(f"{len(results)} trials: {counts[STATUS_TRAINED]} trained, {counts[STATUS_OVER_BUDGET]} over budget "
                f"(not trained), {counts[STATUS_FAILED]} failed" + (f"; budget: {', '.join(budgets)}" if budgets else ""))
    return "\n".join(text)




def pareto_front(results: List[TrialResult]) -> List[TrialResult]:
    """Trained trials no other trained trial beats on both objective (higher) and peak SRAM (lower).

    Sorted by peak SRAM.
    """
    trained = [r for r in results if r.status == STATUS_TRAINED and r.objective is not None
               and r.peak_sram_bytes is not None]
    trained.sort(key=lambda r: (r.peak_sram_bytes, -r.objective))
    front, best = [], float("-inf")
    for r in trained:
        if r.objective > best:
            front.append(r)
            best = r.objective
    return front


def plot_pareto(results: List[TrialResult], path: str, objective: str = "val_accuracy",
                sram_budget_bytes: Optional[int] = None, title: Optional[str] = None) -> str:
    """Writes a PNG: objective vs peak SRAM of trained trials, the Pareto front, over-budget trials and the budget.

    Over-budget trials were never trained, so they have no objective: they
    are drawn as crosses along the bottom at their measured peak SRAM.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    trained = [r for r in results if r.status == STATUS_TRAINED and r.peak_sram_bytes is not None]
    over = [r for r in results if r.status == STATUS_OVER_BUDGET and r.peak_sram_bytes is not None]
    front = pareto_front(results)
    fig, ax = plt.subplots(figsize=(7, 4.5))
    if trained:
        ax.scatter([r.peak_sram_bytes / 1024 for r in trained], [r.objective for r in trained],
                   color="tab:blue", label="trained trial", zorder=3)
    if front:
        # The front as a staircase, continued to the largest trained trial.
        right = max(r.peak_sram_bytes for r in trained) / 1024
        xs = [r.peak_sram_bytes / 1024 for r in front] + [right]
        ys = [r.objective for r in front] + [front[-1].objective]
        ax.step(xs, ys, where="post", color="tab:orange", linewidth=2, label="Pareto front", zorder=2)
        for r in front:
            ax.annotate(r.trial_id, (r.peak_sram_bytes / 1024, r.objective), textcoords="offset points",
                        xytext=(4, 4), fontsize=8)
    low = min([r.objective for r in trained], default=0.0)
    if over:
        ax.scatter([r.peak_sram_bytes / 1024 for r in over], [low - 0.02] * len(over), marker="x",
                   color="tab:red", label="over a budget: SRAM, board arena or flash (not trained)", zorder=3)
        for r in over:
            ax.annotate(r.trial_id, (r.peak_sram_bytes / 1024, low - 0.02), textcoords="offset points",
                        xytext=(4, 4), fontsize=8, color="tab:red")
    if sram_budget_bytes is not None:
        ax.axvline(sram_budget_bytes / 1024, color="tab:red", linestyle="--", label="peak SRAM budget")
    ax.set_xlabel("peak SRAM (KiB, patched, keras_patch.profile)")
    ax.set_ylabel(objective)
    ax.set_title(title or f"{objective} vs peak SRAM ({len(results)} trials)")
    ax.grid(alpha=0.3)
    ax.legend(loc="best", fontsize=8)
    fig.tight_layout()
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    from keras_patch.files import save_figure

    try:
        path = save_figure(fig, path, dpi=120)
    finally:
        plt.close(fig)
    return path
