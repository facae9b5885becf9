"""`plan`: the set of patch stages that minimizes a whole network's TFLM arena head.

A stage is a contiguous run of ops `[i..j]` that `keras_patch.graph.rules`
accepts (`rules.patchable_runs`) with a grid. Outside the stages every op
keeps the live set it had layer by layer; a stage op holds the tensors alive
across it, its entry and exit and its scratch buffers
(`arena.network.ArenaNetwork`). The live-set peak of a plan is therefore a
maximum over segments, and for a threshold `T` a dynamic program over op
positions finds the plan with the fewest extra MACs whose every op and
stage keeps at most `T` bytes alive (per run, each grid is a choice):

    f[0] = 0
    f[k + 1] = min(f[k]             if op k alone keeps <= T alive,
                   f[i] + extra(c)  for each (run [i..k], grid) c keeping <= T alive)

The smallest feasible `T` (binary search over the distinct live sizes, with
the extra MACs within the budget `(max_mac_overhead - 1) * MACs`) bounds the
head from below. The objective is TFLM's greedy head (`plan_greedy`),
which can lie above the live-set peak (fragmentation), so the DP plans of
the lowest few thresholds are laid out with the TFLM replica, in memory, and
the one with the lowest head is kept (ties: the lowest head without the
input, then the fewest MACs). A local search then moves stages around the
buffers that hold the greedy head (`ArenaNetwork.head_buffers`): put one
candidate stage in (dropping those it overlaps) or drop one, keep the move
when the head goes down. `tests/test_planner.py` compares the result with
exhaustive search (every set of disjoint stages x grids, the true greedy
head) on small random graphs: no gap was found.

Example:

>>> import keras_patch
>>> p = keras_patch.plan("mbv2-0.35-144.tflite", max_mac_overhead=1.10)  # doctest: +SKIP
>>> print(p.table())  # doctest: +SKIP
>>> patched = p.apply("mbv2-0.35-144.tflite")  # doctest: +SKIP
"""

from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass
from typing import Callable, Dict, Iterable, List, Optional, Sequence, Tuple

import numpy as np

from keras_patch.arena import memory_planner
from keras_patch.arena.network import ArenaNetwork, StageSpan
from keras_patch.errors import KerasPatchError, PlanError, UnsupportedModelError
from keras_patch.graph import rules
from keras_patch.graph.patchify import build_stage_options, normalize_grid
from keras_patch.graph.tflite_model import TFLiteModel, read_model_bytes
from keras_patch.planner.plan import ARENA_PASSES, PatchPlan, PlannedStage
from keras_patch.stage import geometry
from keras_patch.stage.executor import ConstantTensor, prepare_stage

#: The default grids: every (rows, columns) up to 8x8 but 1x1, clamped to each stage output.
DEFAULT_GRIDS = tuple((r, c) for r in range(1, 9) for c in range(1, 9) if (r, c) != (1, 1))

# How many thresholds above the lowest feasible one are laid out with the TFLM replica.
_THRESHOLDS_TRIED = 8

_INF = float("inf")


@dataclass(frozen=True)
class _Candidate:
    """A run of ops with one grid: what it costs and keeps alive."""

    run: int  # index into _Problem.runs
    first_op: int
    last_op: int
    grid: Tuple[int, int]
    macs: int
    patched_macs: int
    scratch: Tuple[int, ...]
    patch_arena_bytes: int
    live: int  # bytes alive while the stage runs
    live_without_input: int

    @property
    def extra(self) -> int:
        return self.patched_macs - self.macs


@dataclass
class _Run:
    first_op: int
    last_op: int
    entry: int
    exit: int
    options: object  # StageOptions (grid 1x1)
    op_inputs: list


class _ReadOnlyModel:
    """A `TFLiteModel` whose tensor and op queries are memoized (the planner never changes it)."""

    def __init__(self, model: TFLiteModel):
        self._model = model
        self._cache: dict = {}
        self.consumers = _memo(self, "consumers", model.consumers)
        self.producers = _memo(self, "producers", model.producers)
        self.tensor = _memo(self, "tensor", model.tensor)
        self.op_inputs = _memo(self, "op_inputs", model.op_inputs)
        self.op_outputs = _memo(self, "op_outputs", model.op_outputs)
        self.op_type = _memo(self, "op_type", model.op_type)
        self.op_label = _memo(self, "op_label", model.op_label)
        self.is_constant = _memo(self, "is_constant", model.is_constant)
        self.outputs = model.outputs
        self.inputs = model.inputs
        self.num_ops = model.num_ops

    def __getattr__(self, name):
        return getattr(self._model, name)


def _memo(owner: _ReadOnlyModel, name: str, function):
    def cached(*args):
        key = (name, *args)
        if key not in owner._cache:
            owner._cache[key] = function(*args)
        return owner._cache[key]

    return cached


class _Problem:
    """Everything the DP needs, computed once per model."""

    def __init__(self, model: TFLiteModel, net: ArenaNetwork, runs: List[_Run],
                 candidates: List[_Candidate], budget: int, macs: int,
                 all_grids: Optional[Dict[int, List[_Candidate]]] = None):
        self.model = model
        self.net = net
        self.arena = None  # the ArenaOptions the cost model counts (build_problem sets it)
        self.runs = runs
        self.budget = budget
        self.macs = macs
        self.num_ops = net.num_ops
        self.op_live = [int(v) for v in net.layer_live]
        self.op_live_without_input = [int(v) for v in net.layer_live_without_input]
        self.by_last: List[List[_Candidate]] = [[] for _ in range(self.num_ops)]
        for c in sorted(candidates, key=lambda c: (c.extra, c.live, c.grid)):
            self.by_last[c.last_op].append(c)
        self.candidates = candidates
        self.all_grids = all_grids or {}
        self.banned: set = set()  # runs whose constants fail the kernel's Prepare
        self._prepared: Dict[int, bool] = {}
        self._heads: Dict[tuple, tuple] = {}

    def solve(self, limit: float, limit_without_input: float = _INF) -> Optional[Tuple[int, tuple]]:
        """(extra MACs, candidates) of the cheapest plan keeping every op/stage within the limits."""
        n = self.num_ops
        f = [_INF] * (n + 1)
        back: List[Optional[_Candidate]] = [None] * (n + 1)
        f[0] = 0
        for k in range(n):
            best, choice = _INF, None
            if self.op_live[k] <= limit and self.op_live_without_input[k] <= limit_without_input:
                best = f[k]
            for c in self.by_last[k]:
                if c.live > limit or c.live_without_input > limit_without_input or c.run in self.banned:
                    continue
                value = f[c.first_op] + c.extra
                if value < best:
                    best, choice = value, c
            f[k + 1], back[k + 1] = best, choice
        if f[n] > self.budget:
            return None
        chosen = []
        k = n
        while k > 0:
            c = back[k]
            if c is None:
                k -= 1
            else:
                chosen.append(c)
                k = c.first_op
        return int(f[n]), tuple(reversed(chosen))

    def prepares(self, run: int) -> bool:
        """Whether the run's constants pass the kernel's Prepare checks (`prepare_stage`)."""
        if run not in self._prepared:
            r = self.runs[run]
            constants = [None] + [ConstantTensor(self.model.constant(t), self.model.tensor(t).scale)
                                  for t in r.op_inputs[1:]]
            try:
                prepare_stage(r.options, constants)
                self._prepared[run] = True
            except KerasPatchError:
                self._prepared[run] = False
        return self._prepared[run]

    def solve_checked(self, limit: float, limit_without_input: float = _INF):
        """`solve`, banning runs whose constants fail Prepare until the plan's runs all pass."""
        while True:
            result = self.solve(limit, limit_without_input)
            if result is None:
                return None
            bad = [c.run for c in result[1] if not self.prepares(c.run)]
            if not bad:
                return result
            self.banned.update(bad)

    def head(self, chosen: Sequence[_Candidate], include_input: bool = True) -> int:
        """The head TFLM's greedy planner gives the network with `chosen` (memoized)."""
        key = (include_input, tuple((c.run, c.grid) for c in chosen))
        if key not in self._heads:
            spans = [StageSpan(c.first_op, c.last_op, c.scratch) for c in chosen]
            self._heads[key] = self.net.head(spans, include_input)
        return self._heads[key]

    def heads(self, chosen: Sequence[_Candidate]) -> tuple:
        """(head, head without input) TFLM's greedy planner gives the network with `chosen`."""
        return self.head(chosen), self.head(chosen, include_input=False)


def plan(
    model,
    *,
    max_mac_overhead: float = 1.10,
    sram_bytes: Optional[int] = None,
    grids: Optional[Iterable] = None,
    kernel: str = "portable",
    progress: Optional[Callable[[Iterable], Iterable]] = None,
    representative_dataset=None,
    arena=True,
) -> PatchPlan:
    """Chooses the patch stages (start, end, grid) that minimize the network's TFLM arena head.

    Args:
        model: an unpatched int8 `.tflite` (bytes or path), or a Keras model
            without `PatchStage` layers (converted with `export_tflite`
            first, with `representative_dataset` or random samples: memory
            does not depend on the values).
        max_mac_overhead: the whole network's patched MACs may be at most
            this many times its layer-by-layer MACs (>= 1).
        sram_bytes: when given, the plan with the fewest MACs whose arena
            head fits in this many bytes (the empty plan if the model fits
            layer by layer), instead of the lowest head.
        grids: the grids a stage may use, e.g. `[(2, 2), "4x4"]`; by
            default every grid up to 8x8 but 1x1 (`DEFAULT_GRIDS`), clamped
            to each stage's output.
        kernel: how the KP_PATCH_STAGE kernel is built, "portable" or
            "cmsis_nn" (adds each stage's CMSIS-NN context buffer), as in
            `profile`.
        progress: wraps an iterable to show progress, e.g. `tqdm.tqdm`.
        representative_dataset: calibration data for a Keras model.
        arena: the arena passes the plan is made with and `apply` runs
            (`keras_patch.graph.passes.pipeline.ArenaOptions` switches, its
            kernel set to `kernel`; True: all, False: none). With them the
            cost model knows the int8 input, folded PADs, in-place depthwise
            ops and patch arenas, and the offline memory plan.

    Returns:
        A `PatchPlan`. Never worse than layer by layer: when no plan lowers
        the arena head (nor, at the same head, the head without the input),
        it is the empty plan and its `message` says so.

    Raises:
        PlanError: `max_mac_overhead` below 1 or not finite, an `sram_bytes`
            no plan within the overhead fits (the message gives the lowest
            head reachable), or no run of ops a patch stage can take.
        UnsupportedModelError: a model keras-patch cannot read as an
            unpatched int8 network (e.g. one that already has patch stages).

    Example:

    >>> import keras_patch
    >>> p = keras_patch.plan("model.tflite", max_mac_overhead=1.2)  # doctest: +SKIP
    >>> p.peak_bytes < p.layer_by_layer_peak_bytes, p.mac_overhead <= 1.2  # doctest: +SKIP
    (True, True)
    """
    started = time.perf_counter()
    if isinstance(max_mac_overhead, bool) or not isinstance(max_mac_overhead, (int, float, np.number)) \
            or not math.isfinite(float(max_mac_overhead)) or max_mac_overhead < 1:
        raise PlanError(
            f"max_mac_overhead must be a finite number >= 1 (1.0: no recomputation), got {max_mac_overhead!r}.")
    max_mac_overhead = float(max_mac_overhead)
    if sram_bytes is not None:
        if isinstance(sram_bytes, bool) or not isinstance(sram_bytes, (int, np.integer)) or sram_bytes <= 0:
            raise PlanError(f"sram_bytes must be a positive number of bytes, got {sram_bytes!r}.")
        sram_bytes = int(sram_bytes)
    if kernel not in geometry.KERNELS:
        raise ValueError(f"kernel must be one of {geometry.KERNELS}, not {kernel!r}")
    from keras_patch.graph.passes.pipeline import ArenaOptions, prepare_graph, undo_arena_stages

    options = dataclasses.replace(ArenaOptions.resolve(arena), kernel=kernel)
    prepared = TFLiteModel.from_bytes(undo_arena_stages(_model_bytes(model, representative_dataset)))
    if memory_planner._offline_offsets(prepared) is not None:
        from keras_patch.arena.offline_metadata import remove_offline_offsets

        remove_offline_offsets(prepared)  # planned again for the patched network
    prepare_graph(prepared, options)
    tflite = _ReadOnlyModel(TFLiteModel.from_bytes(prepared.to_bytes()))
    problem = build_problem(tflite, max_mac_overhead, grids, kernel, progress, options)
    return _search(problem, max_mac_overhead, sram_bytes, kernel, started)


def _model_bytes(model, representative_dataset) -> bytes:
    if isinstance(model, (bytes, bytearray, memoryview, str)) or not hasattr(model, "layers"):
        return read_model_bytes(model)
    staged = [layer.name for layer in model.layers if type(layer).__name__ == "PatchStage"]
    if staged:
        raise PlanError(
            f"The Keras model already has PatchStage layers ({', '.join(staged)}); plan the model "
            f"without them (the planner chooses the stages).")
    from keras_patch.keras.export import export_tflite

    if representative_dataset is None:
        shape = tuple(int(d) for d in model.inputs[0].shape[1:])
        representative_dataset = np.random.default_rng(0).random((4, *shape), dtype=np.float32)
    return export_tflite(model, representative_dataset, arena=False)  # the plan runs the passes


def _grid_choices(grids: Optional[Iterable], out_h: int, out_w: int) -> List[tuple]:
    if grids is None:
        chosen = {(min(r, out_h), min(c, out_w)) for r, c in DEFAULT_GRIDS}
        chosen.discard((1, 1))
    else:
        chosen = {g for g in grids if g[0] <= out_h and g[1] <= out_w}
    return sorted(chosen)


def build_problem(model: TFLiteModel, max_mac_overhead: float, grids=None, kernel: str = "portable",
                  progress=None, arena=None) -> _Problem:
    """Costs every patchable run with every grid (in memory) for the DP.

    `arena` (`ArenaOptions`, default none) says which arena passes the cost
    model counts: in-place patch arenas and depthwise ops, the offline plan.
    """
    from keras_patch.graph.passes.pipeline import ArenaOptions

    arena = ArenaOptions.resolve(False if arena is None else arena)
    from keras_patch.arena.profiler import op_macs
    failure = rules.model_unpatched(model)
    if failure:
        raise UnsupportedModelError(failure)
    grids = None if grids is None else [normalize_grid(g) for g in grids]
    net = ArenaNetwork(model._model if isinstance(model, _ReadOnlyModel) else model,
                       in_place=arena.in_place, offline_plan=arena.offline_plan)
    macs = sum(op_macs(model, op) for op in range(model.num_ops))
    budget = math.floor(max_mac_overhead * macs) - macs
    # One op alone never lowers the head, except a MEAN: as a stage it needs its int32 sums only,
    # not the builtin's index buffers.
    found = [r for r in rules.patchable_runs(model) if r[1] > r[0] or model.op_type(r[0]) == "MEAN"]
    if not found:
        raise PlanError(
            "No run of two or more ops in this model can become a patch stage: a stage is a "
            "single-entry/single-exit run of " + ", ".join(sorted(rules.SUPPORTED_STAGE_OPS))
            + " ops on int8 NHWC tensors.")
    consumers = model.consumers()
    runs: List[_Run] = []
    candidates: List[_Candidate] = []
    all_grids: Dict[int, List[_Candidate]] = {}
    for first, last, entry, exit_tensor in (progress or (lambda x: x))(found):
        try:
            options, op_inputs = build_stage_options(model, list(range(first, last + 1)), entry, exit_tensor,
                                                     (1, 1), consumers)
        except UnsupportedModelError:
            continue
        if arena.in_place:  # the patch arena runs depthwise layers in place where that is smaller
            options = dataclasses.replace(options, in_place=True)
        out_h, out_w, _ = options.tiled_shape  # a final MEAN: its input is tiled
        choices = _grid_choices(grids, out_h, out_w)
        if not choices:
            continue
        run = len(runs)
        runs.append(_Run(first, last, entry, exit_tensor, options, op_inputs))
        tensors = net.stage_tensor_bytes(first, last)
        tensors_without_input = net.stage_tensor_bytes(first, last, include_input=False)
        front = []
        costed = geometry.stage_costs_by_grid(options, choices, max_extra_macs=budget, staging=kernel != "portable")
        for grid, costs in costed.items():
            if costs is None:
                continue
            scratch = tuple(b.bytes for b in geometry.stage_buffers(
                dataclasses.replace(options, grid=grid), kernel, arena=costs.arena, staging_bytes=costs.staging_bytes))
            scratch_bytes = sum(memory_planner.align_up(b) for b in scratch)
            front.append(_Candidate(run, first, last, grid, costs.macs, costs.patched_macs, scratch,
                                    costs.arena.total_bytes, tensors + scratch_bytes,
                                    tensors_without_input + scratch_bytes))
        candidates.extend(_pareto(front))
        all_grids[run] = front
    if not runs:
        raise PlanError("No run of ops in this model can become a patch stage with the given grids.")
    problem = _Problem(model, net, runs, candidates, budget, macs, all_grids)
    problem.arena = arena
    return problem


def _pareto(front: List[_Candidate]) -> List[_Candidate]:
    """The grids of one run that no other grid beats on both extra MACs and live bytes."""
    kept = []
    best_live = _INF
    for c in sorted(front, key=lambda c: (c.extra, c.live, c.grid)):
        if c.live < best_live:
            kept.append(c)
            best_live = c.live
    return kept


def _thresholds(problem: _Problem, without_input: bool, upper: float = _INF) -> List[int]:
    """The distinct live sizes a DP threshold can take (sorted), at least the lower bound."""
    ops = problem.op_live_without_input if without_input else problem.op_live
    best_cover = list(ops)
    values = set(ops)
    for c in problem.candidates:
        live = c.live_without_input if without_input else c.live
        values.add(live)
        for k in range(c.first_op, c.last_op + 1):
            if live < best_cover[k]:
                best_cover[k] = live
    lower = max(best_cover, default=0)
    return sorted(v for v in values if lower <= v <= upper)


def _lowest_feasible(problem: _Problem, values: List[int], solve) -> Optional[int]:
    """Index of the smallest value for which `solve(value)` finds a plan (monotone), or None."""
    lo, hi = 0, len(values) - 1
    if hi < 0 or solve(values[hi]) is None:
        return None
    while lo < hi:
        mid = (lo + hi) // 2
        if solve(values[mid]) is not None:
            hi = mid
        else:
            lo = mid + 1
    return lo


#: How many plans the local search lays out at most (it stops earlier at a local optimum).
LOCAL_SEARCH_EVALUATIONS = 4000


def _local_search(problem: _Problem, chosen: Sequence[_Candidate], value,
                  max_evaluations: Optional[int] = None) -> tuple:
    """The best of `_descend` with moves ordered around the head without the input, then with it."""
    results = [_descend(problem, chosen, value, with_input, max_evaluations) for with_input in (False, True)]
    return min(results, key=lambda r: (r[0] is None, r[0] or ()))


def _descend(problem: _Problem, chosen: Sequence[_Candidate], value, with_input: bool,
             max_evaluations: Optional[int] = None) -> tuple:
    """First-improvement local search from `chosen` on `value(plan)` (lower is better; None: not allowed).

    A move puts one candidate (any run, Pareto grids; any grid of a run in
    the plan) in the plan, dropping the stages it overlaps, or drops one
    stage. Moves touching the ops that hold the greedy head (with or
    without the input: `with_input`; `ArenaNetwork.head_buffers`) are tried
    first, the cheapest first. `value(plan, current_value)` may return early with any
    value above `current_value`.
    """
    max_evaluations = LOCAL_SEARCH_EVALUATIONS if max_evaluations is None else max_evaluations
    current = tuple(sorted(chosen, key=lambda c: c.first_op))
    current_value = value(current)
    evaluations = 0
    improved = True
    while improved and evaluations < max_evaluations:
        improved = False
        spans = [StageSpan(c.first_op, c.last_op, c.scratch) for c in current]
        lo, hi = problem.num_ops, -1
        for b in problem.net.head_buffers(spans, with_input):
            a, z = problem.net.unpatched_ops(spans, max(b.first_op, 0), max(b.last_op, 0))
            lo, hi = min(lo, a), max(hi, z)
        pool = list(problem.candidates)
        for c in current:
            pool.extend(problem.all_grids.get(c.run, []))
        pool = [c for c in pool if c.run not in problem.banned]
        pool.sort(key=lambda c: (c.last_op < lo or c.first_op > hi, c.extra))
        moves = [tuple(s for s in current if s is not drop) for drop in current]
        for c in pool:
            if c in current:
                continue
            kept = tuple(s for s in current if s.last_op < c.first_op or s.first_op > c.last_op)
            moves.append(tuple(sorted(kept + (c,), key=lambda s: s.first_op)))
        for move in moves:
            if sum(c.extra for c in move) > problem.budget:
                continue
            evaluations += 1
            v = value(move, current_value)
            if v is not None and (current_value is None or v < current_value):
                if not all(problem.prepares(c.run) for c in move):
                    problem.banned.update(c.run for c in move if not problem.prepares(c.run))
                    continue
                current, current_value, improved = move, v, True
                break
            if evaluations >= max_evaluations:
                break
    return current_value, current


def _search(problem: _Problem, max_mac_overhead: float, sram_bytes: Optional[int], kernel: str,
            started: float) -> PatchPlan:
    base = problem.heads(())
    results: Dict[tuple, tuple] = {}

    def consider(result) -> Optional[tuple]:
        if result is None:
            return None
        extra, chosen = result
        head, head_without_input = problem.heads(chosen)
        key = tuple((c.run, c.grid) for c in chosen)
        results[key] = (head, head_without_input, extra, chosen)
        return results[key]

    # Lowest head: the lowest few feasible thresholds on the live set with the input, and for each the
    # lowest few on the live set without it.
    values = _thresholds(problem, without_input=False)
    start = _lowest_feasible(problem, values, problem.solve_checked)
    best = None
    if start is not None:
        for limit in values[start:start + _THRESHOLDS_TRIED]:
            if best is not None and limit > best[0]:
                break
            values2 = _thresholds(problem, without_input=True, upper=limit)
            start2 = _lowest_feasible(problem, values2, lambda v: problem.solve_checked(limit, v))
            if start2 is None:
                continue
            for limit2 in values2[start2:start2 + _THRESHOLDS_TRIED]:
                if best is not None and limit == best[0] and limit2 > best[1]:
                    break
                r = consider(problem.solve_checked(limit, limit2))
                if r is not None and (best is None or r[:3] < best[:3]):
                    best = r
    if best is not None and (sram_bytes is None or best[0] > sram_bytes):
        def value(chosen, current=None):
            head = problem.head(chosen)
            if current is not None and head > current[0]:
                return head, _INF, 0  # worse whatever the rest
            return head, problem.head(chosen, include_input=False), sum(c.extra for c in chosen)

        v, chosen = _local_search(problem, best[3], value)
        best = (*v, chosen)
    if sram_bytes is not None:
        return _fit_sram(problem, best, base, sram_bytes, max_mac_overhead, kernel, started, values, consider)
    if best is None or (best[0], best[1]) >= base:
        how = "" if best is None else (
            f" (the best plan found has head {best[0]:,} B and {best[1]:,} B without the input)")
        message = (f"No plan within MAC overhead {max_mac_overhead:.2f} lowers the arena head below "
                   f"{base[0]:,} B layer by layer{how}: the model runs best layer by layer.")
        return _make_plan(problem, (), base, kernel, max_mac_overhead, None, started, message)
    return _make_plan(problem, best[3], best[:2], kernel, max_mac_overhead, None, started, "")


def _fit_sram(problem, best, base, sram_bytes, max_mac_overhead, kernel, started, values, consider) -> PatchPlan:
    if base[0] <= sram_bytes:
        return _make_plan(problem, (), base, kernel, max_mac_overhead, sram_bytes, started,
                          f"The model fits in {sram_bytes:,} B layer by layer ({base[0]:,} B): no stage needed.")
    if best is None or best[0] > sram_bytes:
        lowest = base[0] if best is None else min(best[0], base[0])
        raise PlanError(
            f"No plan within MAC overhead {max_mac_overhead:.2f} fits in {sram_bytes:,} B: the lowest arena "
            f"head reachable is {lowest:,} B (layer by layer {base[0]:,} B). Allow more SRAM or a higher "
            f"MAC overhead.")
    # The fewest MACs: the largest thresholds whose DP plan (fewest MACs within them) fits.
    fitting = [v for v in values if v <= sram_bytes]
    chosen = best
    lo, hi = 0, len(fitting) - 1
    # Binary search for the largest threshold whose plan's head fits (heads grow with the threshold).
    while lo <= hi:
        mid = (lo + hi) // 2
        r = consider(problem.solve_checked(fitting[mid]))
        if r is not None and r[0] <= sram_bytes:
            if (r[2], r[0]) < (chosen[2], chosen[0]):
                chosen = r
            lo = mid + 1
        else:
            hi = mid - 1
    for v in fitting[lo:lo + _THRESHOLDS_TRIED]:
        r = consider(problem.solve_checked(v))
        if r is not None and r[0] <= sram_bytes and (r[2], r[0]) < (chosen[2], chosen[0]):
            chosen = r

    def value(plan, current=None):
        extra = sum(c.extra for c in plan)
        if current is not None and extra > current[0]:
            return extra, _INF, _INF  # worse whatever the head
        head = problem.head(plan)
        return None if head > sram_bytes else (extra, head, problem.head(plan, include_input=False))

    v, plan = _local_search(problem, chosen[3], value)
    chosen = (v[1], v[2], v[0], plan)
    return _make_plan(problem, chosen[3], chosen[:2], kernel, max_mac_overhead, sram_bytes, started, "")


def describe_head(net: ArenaNetwork, chosen: Sequence[_Candidate], include_input: bool = True) -> str:
    """Where TFLM's greedy layout reaches the head, and the buffers stacked up to it (bottom first)."""
    from keras_patch.planner.schedule import short_tensor_name

    spans = [StageSpan(c.first_op, c.last_op, c.scratch) for c in chosen]
    stack = net.head_buffers(spans, include_input)
    if not stack:
        return ""
    new_index = net._layout(spans)[0]
    stage_of = {new_index[c.last_op]: k for k, c in enumerate(chosen)}

    def ops_label(first, last):
        a, z = net.unpatched_ops(spans, max(first, 0), max(last, 0))
        return f"op {a}" if a == z else f"ops {a}..{z}"

    def label(b):
        if b.name.startswith("scratch:op"):
            index, k = (int(x) for x in b.name[len("scratch:op"):].split(":"))
            if index in stage_of:
                what = "patch arena" if k == 0 else "CMSIS-NN context"
                return f"{what} of stage {stage_of[index]} ({b.size:,} B)"
            return f"scratch of {ops_label(index, index)} ({b.size:,} B)"
        return f"{short_tensor_name(b.name)} ({b.size:,} B, {ops_label(b.first_op, b.last_op)})"

    top = stack[-1]
    head = top.offset + memory_planner.align_up(top.size)
    return (f"head {head:,} B at {ops_label(top.first_op, top.last_op)}: "
            + " + ".join(label(b) for b in stack))


def _make_plan(problem: _Problem, chosen: Sequence[_Candidate], heads: tuple, kernel: str,
               max_mac_overhead: float, sram_bytes: Optional[int], started: float, message: str) -> PatchPlan:
    model = problem.model
    stages = tuple(PlannedStage(
        start=model.tensor(problem.runs[c.run].entry).name,
        end=model.tensor(problem.runs[c.run].exit).name,
        grid=tuple(c.grid), first_op=c.first_op, last_op=c.last_op, macs=c.macs,
        patched_macs=c.patched_macs, patch_arena_bytes=c.patch_arena_bytes,
    ) for c in chosen)
    base = problem.heads(())
    arena = problem.arena
    passes = tuple(name for name in ARENA_PASSES if arena is not None and getattr(arena, name))
    plan = PatchPlan(
        stages=stages, kernel=kernel, max_mac_overhead=max_mac_overhead, sram_bytes=sram_bytes,
        layer_by_layer_peak_bytes=base[0], layer_by_layer_peak_bytes_without_input=base[1],
        peak_bytes=heads[0], peak_bytes_without_input=heads[1], macs=problem.macs,
        patched_macs=problem.macs + sum(c.extra for c in chosen),
        planner_seconds=time.perf_counter() - started, message=message,
        head_at=describe_head(problem.net, chosen), head_at_without_input=describe_head(problem.net, chosen, False),
        arena_passes=passes,
    )
    if not passes:
        return plan
    # The passes decide which depthwise ops run in place and where the offline plan puts each
    # tensor: the figures are those of the models `apply` writes, laid out by the TFLM replica.
    from keras_patch.arena.profiler import profile

    data = model.to_bytes()
    empty = dataclasses.replace(plan, stages=(), patched_macs=problem.macs)
    layer_by_layer = profile(empty.apply(data), kernel=kernel)
    base = (layer_by_layer.patched_peak_bytes, layer_by_layer.patched_peak_bytes_without_input)
    patched = layer_by_layer if not stages else profile(plan.apply(data), kernel=kernel)
    heads = (patched.patched_peak_bytes, patched.patched_peak_bytes_without_input)
    if stages and heads >= base:
        message = (f"With the arena passes, the best plan found ({heads[0]:,} B) does not lower the arena head "
                   f"below {base[0]:,} B layer by layer: the model runs best layer by layer.")
        plan, heads = dataclasses.replace(empty, head_at="", head_at_without_input=""), base
    def where(text: str, head: int) -> str:  # the greedy layout's story, if it is the head the passes reach
        return text if text.startswith(f"head {head:,} B") else ""

    return dataclasses.replace(
        plan, head_at=where(plan.head_at, heads[0]), head_at_without_input=where(plan.head_at_without_input, heads[1]),
        layer_by_layer_peak_bytes=base[0], layer_by_layer_peak_bytes_without_input=base[1],
        peak_bytes=heads[0], peak_bytes_without_input=heads[1], message=message,
        planner_seconds=time.perf_counter() - started)
