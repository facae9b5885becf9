"""An offline memory planner: better tensor offsets than TFLM's greedy planner.

TFLM's `MicroAllocator` places every tensor listed in a model's
`OfflineMemoryAllocation` metadata (`keras_patch.arena.offline_metadata`) at
its offset without checking, then lets its `GreedyMemoryPlanner` place the
remaining buffers (online tensors and every kernel scratch buffer) around
them. This module computes such offsets:

* buffers that must share memory (an op writing its output over an input
  that dies there, `keras_patch.arena.aliases`) form one *group*: one offset,
  the union of the lifetimes and the larger size (a block: "exact" is
  optimal among plans that reserve the larger size for the whole pair);
* small problems are solved exactly (branch and bound over placements in
  offset order, pruned with the live-bytes lower bound); larger ones take the
  best of several orderings (size, lifetime start, size x duration, ...),
  each placed first-fit and best-fit, plus seeded random perturbations;
* scratch buffers stay online (TFLM cannot place them offline), so every
  candidate is replayed through the TFLM replica
  (`memory_planner.plan_greedy`) with the tensor offsets fixed, and the
  replayed head decides. Tensors are planned both jointly with the scratch
  buffers and alone; the better replay wins.

The result is never worse than TFLM's own greedy plan: when nothing beats it
(and no alias needs realising), `plan_offline` says so with
`method == "greedy"` and callers attach no plan. The search is deterministic:
its budgets count nodes and iterations, scaled from `time_limit_s`, not
wall-clock time.

Example:

>>> from keras_patch.arena.memory_planner import PlannedBuffer
>>> bufs = [PlannedBuffer(32, 0, 1, "a"), PlannedBuffer(48, 1, 2, "b"),
...         PlannedBuffer(32, 2, 3, "c"), PlannedBuffer(16, 0, 0, "d")]
>>> plan = plan_offline(bufs)
>>> plan.head_bytes, plan.lower_bound, plan.method
(80, 80, 'greedy')
>>> live_lower_bound(bufs)
80
"""

from __future__ import annotations

import dataclasses
import random
from dataclasses import dataclass
from typing import Dict, List, Mapping, Optional, Sequence

from keras_patch.arena.memory_planner import BUFFER_ALIGNMENT, PlannedBuffer, align_up, plan_greedy

#: Offset of a buffer left to TFLM's online planner.
ONLINE = -1
#: Branch-and-bound nodes (and heuristic placements) per second of `time_limit_s`.
_NODES_PER_SECOND = 40_000
#: Group pairs examined per second of `time_limit_s` by the randomized orderings.
_PLACEMENT_WORK_PER_SECOND = 20_000_000
#: Above this many groups the exact search is not tried.
_EXACT_MAX_GROUPS = 24


@dataclass
class OfflinePlan:
    """Result of `plan_offline`.

    Attributes:
        offsets: one per input buffer: the offline offset of a tensor buffer,
            `-1` for a buffer TFLM places online (scratch buffers).
        head_bytes: the arena head TFLM gives with those offsets fixed (the
            replica's replay; for `method == "greedy"` TFLM's own plan).
        lower_bound: `live_lower_bound` of the buffers (with the aliases).
        method: `"exact"` (proved optimal for the offline part), `"heuristic"`
            (best of the orderings) or `"greedy"` (nothing beats TFLM's greedy
            plan: attach no offline plan).
    """

    offsets: List[int]
    head_bytes: int
    lower_bound: int
    method: str

    @property
    def beats_greedy(self) -> bool:
        """Whether the offsets should be attached (anything but `"greedy"`)."""
        return self.method != "greedy"


# --------------------------------------------------------------------------
# groups and the lower bound
# --------------------------------------------------------------------------
@dataclass
class _Group:
    size: int
    first: int
    last: int
    members: List[int]


def _groups(buffers: Sequence[PlannedBuffer], aliases: Optional[Mapping[int, int]], alignment: int) -> List[_Group]:
    """Buffers joined by `aliases` (union-find), each group with its union lifetime and largest size."""
    n = len(buffers)
    parent = list(range(n))

    def find(i):
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for a, b in (aliases or {}).items():
        a, b = int(a), int(b)
        if not (0 <= a < n and 0 <= b < n) or a == b:
            raise ValueError(f"Alias {a} -> {b} does not name two different buffers of {n}.")
        parent[find(a)] = find(b)
    by_root: Dict[int, _Group] = {}
    order = []
    for i, buf in enumerate(buffers):
        r = find(i)
        size = align_up(buf.size, alignment)
        g = by_root.get(r)
        if g is None:
            g = by_root[r] = _Group(size, int(buf.first_op), int(buf.last_op), [i])
            order.append(r)
        else:
            g.size = max(g.size, size)
            g.first = min(g.first, int(buf.first_op))
            g.last = max(g.last, int(buf.last_op))
            g.members.append(i)
    return [by_root[r] for r in order]


def _live_peak(groups: Sequence[_Group]) -> int:
    events: Dict[int, int] = {}
    for g in groups:
        if g.size <= 0 or g.last < g.first:
            continue
        events[g.first] = events.get(g.first, 0) + g.size
        events[g.last + 1] = events.get(g.last + 1, 0) - g.size
    peak = live = 0
    for t in sorted(events):
        live += events[t]
        peak = max(peak, live)
    return peak


def live_lower_bound(
    buffers: Sequence[PlannedBuffer], aliases: Optional[Mapping[int, int]] = None, alignment: int = BUFFER_ALIGNMENT
) -> int:
    """The most bytes alive at one time step: no plan of `buffers` has a smaller head.

    Sizes are rounded up to `alignment`; buffers joined by `aliases`
    (buffer index -> the buffer index whose memory it occupies) count once
    at a step where several of them are alive, as the largest of those.

    Example:

    >>> from keras_patch.arena.memory_planner import PlannedBuffer
    >>> live_lower_bound([PlannedBuffer(20, 0, 1), PlannedBuffer(30, 1, 2), PlannedBuffer(40, 2, 3)])
    80
    >>> live_lower_bound([PlannedBuffer(20, 0, 1), PlannedBuffer(30, 1, 2)], {1: 0})
    32
    """
    if not aliases:
        return _live_peak(_groups(buffers, None, alignment))
    peak = 0
    groups = _groups(buffers, aliases, alignment)
    for t in sorted({int(b.first_op) for b in buffers}):
        live = 0
        for g in groups:
            live += max((align_up(buffers[m].size, alignment) for m in g.members
                         if buffers[m].first_op <= t <= buffers[m].last_op), default=0)
        peak = max(peak, live)
    return peak


# --------------------------------------------------------------------------
# packing of groups (intervals in time, blocks in memory)
# --------------------------------------------------------------------------
class _Packer:
    """Places groups (time interval x size) at offsets; conflicts = overlapping lifetimes."""

    def __init__(self, groups: Sequence[_Group]):
        self.groups = list(groups)
        n = len(self.groups)
        self.conflicts = [
            [j for j in range(n) if j != i and _overlap(self.groups[i], self.groups[j])] for i in range(n)
        ]

    def place(self, order: Sequence[int], best_fit: bool = False) -> tuple:
        """(offsets, peak) of placing `order` one by one at the lowest (or tightest) fitting offset."""
        offsets = [-1] * len(self.groups)
        peak = 0
        for i in order:
            size = self.groups[i].size
            busy = sorted((offsets[j], offsets[j] + self.groups[j].size) for j in self.conflicts[i] if offsets[j] >= 0)
            offsets[i] = _fit(busy, size, best_fit)
            peak = max(peak, offsets[i] + size)
        return offsets, peak

    def exact(self, upper: int, budget: int, floor: int) -> tuple:
        """Branch and bound: (offsets or None, peak, proved) with peak < `upper` if offsets were found.

        Places groups in non-decreasing offset order, each at 0 or on the end
        of a placed group it conflicts with (every packing can be pushed down
        into that form without growing); bound: the current offset plus the
        unplaced bytes alive at any one step.
        """
        groups = self.groups
        n = len(groups)
        steps = sorted({t for g in groups for t in (g.first, g.last)})
        index = {t: k for k, t in enumerate(steps)}
        spans = [range(index[g.first], index[g.last] + 1) for g in groups]
        # A step stands for the whole range up to the next one; lifetimes are
        # unions of such ranges, so the sums at the steps are all the sums.
        live = [0] * len(steps)
        for i, g in enumerate(groups):
            for k in spans[i]:
                live[k] += g.size
        offsets = [-1] * n
        best = {"peak": upper, "offsets": None}
        nodes = [0]
        by_size = sorted(range(n), key=lambda i: (-groups[i].size, groups[i].first, i))

        def dfs(placed: int, low: int, last_item: int, peak: int) -> bool:
            if placed == n:
                best["peak"], best["offsets"] = peak, list(offsets)
                return best["peak"] <= floor
            nodes[0] += 1
            if nodes[0] > budget:
                return True
            candidates = []
            for i in by_size:
                if offsets[i] >= 0:
                    continue
                size = groups[i].size
                starts = {0} | {offsets[j] + groups[j].size for j in self.conflicts[i] if offsets[j] >= 0}
                for c in starts:
                    if c < low or (c == low and i < last_item and placed > 0):
                        continue
                    if max(peak, c + size) >= best["peak"]:
                        continue
                    if any(offsets[j] >= 0 and offsets[j] < c + size and c < offsets[j] + groups[j].size
                           for j in self.conflicts[i]):
                        continue
                    candidates.append((c, -size, i))
            candidates.sort()
            for c, _, i in candidates:
                if max(peak, c + groups[i].size) >= best["peak"]:
                    continue
                offsets[i] = c
                for k in spans[i]:
                    live[k] -= groups[i].size
                bound = max(peak, c + groups[i].size, c + max(live))
                stop = False
                if bound < best["peak"]:
                    stop = dfs(placed + 1, c, i, max(peak, c + groups[i].size))
                for k in spans[i]:
                    live[k] += groups[i].size
                offsets[i] = -1
                if stop:
                    return True
            return False

        if n == 0:
            return [], 0, True
        stopped = dfs(0, 0, -1, 0)
        proved = not stopped or best["peak"] <= floor
        return best["offsets"], best["peak"], proved


def _overlap(a: _Group, b: _Group) -> bool:
    return not (a.first > b.last or b.first > a.last)


def _fit(busy: list, size: int, best_fit: bool) -> int:
    """Lowest (or, with `best_fit`, tightest) offset where `size` bytes fit between `busy` (offset-sorted)."""
    candidate = 0
    best = None  # (gap, offset)
    for start, end in busy:
        if start - candidate >= size:
            if not best_fit:
                return candidate
            gap = start - candidate
            if best is None or gap < best[0]:
                best = (gap, candidate)
        candidate = max(candidate, end)
    if best is not None:
        return best[1]
    return candidate


# --------------------------------------------------------------------------
# the planner
# --------------------------------------------------------------------------
def _orders(groups: Sequence[_Group]) -> List[List[int]]:
    n = range(len(groups))
    g = groups
    keys = [
        lambda i: (-g[i].size, g[i].first, i),
        lambda i: (g[i].first, -g[i].size, i),
        lambda i: (-g[i].size * (g[i].last - g[i].first + 1), i),
        lambda i: (-(g[i].last - g[i].first), -g[i].size, i),
        lambda i: (g[i].last, -g[i].size, i),
        lambda i: (-g[i].size, -(g[i].last - g[i].first), i),
    ]
    return [sorted(n, key=k) for k in keys]


def _pack(groups: List[_Group], time_limit_s: float, floor: int) -> tuple:
    """Best (offsets, peak, exact) packing of `groups`."""
    if not groups:
        return [], 0, True
    packer = _Packer(groups)
    n = len(groups)
    best_offsets, best_peak = None, None
    orders = _orders(groups)
    for order in orders:
        for best_fit in (False, True):
            offsets, peak = packer.place(order, best_fit)
            if best_peak is None or peak < best_peak:
                best_offsets, best_peak, best_order = offsets, peak, order
    # Seeded perturbations of the best order (a budget of placements, not seconds).
    budget = max(8, int(time_limit_s * _PLACEMENT_WORK_PER_SECOND / max(n * n, 1)))
    rng = random.Random(0)
    order = list(best_order)
    for step in range(min(budget, 20000)):
        if best_peak <= floor:
            break
        trial = list(order)
        a, b = rng.randrange(n), rng.randrange(n)
        if step % 2:  # move one group to an earlier place
            trial.insert(min(a, b), trial.pop(max(a, b)))
        else:  # swap two groups
            trial[a], trial[b] = trial[b], trial[a]
        for best_fit in (False, True):
            offsets, peak = packer.place(trial, best_fit)
            if peak <= best_peak:
                if peak < best_peak:
                    best_offsets, best_peak = offsets, peak
                order = trial
    exact = best_peak <= floor
    if not exact and n <= _EXACT_MAX_GROUPS:
        offsets, peak, proved = packer.exact(best_peak, int(time_limit_s * _NODES_PER_SECOND), floor)
        if offsets is not None and peak < best_peak:
            best_offsets, best_peak = offsets, peak
        exact = proved
    return best_offsets, best_peak, exact


def _replay(buffers: Sequence[PlannedBuffer], offsets: Sequence[int], alignment: int) -> int:
    fixed = [
        dataclasses.replace(b, offline_offset=None if o == ONLINE else int(o)) for b, o in zip(buffers, offsets)
    ]
    return plan_greedy(fixed, alignment, placed_copies=False).head_bytes


def plan_offline(
    buffers: Sequence[PlannedBuffer],
    aliases: Optional[Mapping[int, int]] = None,
    *,
    time_limit_s: float = 2.0,
    offline_indices: Optional[Sequence[int]] = None,
    alignment: int = BUFFER_ALIGNMENT,
) -> OfflinePlan:
    """Offline offsets for the tensor buffers, with the smallest TFLM head found.

    Args:
        buffers: the buffers TFLM plans (`memory_planner.model_buffers`), in
            its order; their own `offline_offset` is ignored.
        aliases: buffer index -> the buffer index whose memory it occupies
            (same offset). Both must be offline buffers.
        time_limit_s: search effort (converted into fixed node and iteration
            budgets, so the result does not depend on the machine's speed).
        offline_indices: the buffers that get offline offsets; default: all
            but scratch buffers (names starting with `scratch:`), which TFLM
            always places online.
        alignment: size rounding and offset alignment (TFLM: 16).

    Returns:
        An `OfflinePlan`; `method == "greedy"` when no offline plan beats
        TFLM's greedy plan (then `offsets` are the greedy plan's tensor
        offsets and nothing needs attaching). With aliases an offline plan
        is always returned (only it can realise them).

    Raises:
        ValueError: an alias names a buffer outside `offline_indices`.

    Example:

    >>> from keras_patch.arena.memory_planner import PlannedBuffer
    >>> bufs = [PlannedBuffer(64, -1, 0, "in"), PlannedBuffer(64, 0, 1, "out"),
    ...         PlannedBuffer(16, 1, 1, "scratch:op1:0")]
    >>> plan = plan_offline(bufs, {1: 0})
    >>> plan.offsets, plan.head_bytes, plan.method
    ([0, 0, -1], 80, 'exact')
    """
    n = len(buffers)
    if offline_indices is None:
        offline_set = {i for i, b in enumerate(buffers) if not str(b.name).startswith("scratch:")}
    else:
        offline_set = {int(i) for i in offline_indices}
        if any(not 0 <= i < n for i in offline_set):
            raise ValueError(f"offline_indices must name buffers 0..{n - 1}.")
    aliases = {int(a): int(b) for a, b in (aliases or {}).items()}
    for a, b in aliases.items():
        if a not in offline_set or b not in offline_set:
            raise ValueError(f"Alias {a} -> {b}: both buffers must be offline-planned (not scratch).")
    online = [dataclasses.replace(b, offline_offset=None) for b in buffers]
    lower = live_lower_bound(online, aliases, alignment)
    greedy = plan_greedy(online, alignment, placed_copies=False)
    greedy_offsets = [o if i in offline_set else ONLINE for i, o in enumerate(greedy.offsets)]
    if n == 0:
        return OfflinePlan([], 0, 0, "greedy")

    groups = _groups(online, aliases, alignment)
    tensor_groups = [g for g in groups if all(m in offline_set for m in g.members)]
    candidates = []  # (head, rank, offsets, exact)
    # Joint: scratch groups packed with the tensors, then replayed online.
    for rank, subset in enumerate((groups, tensor_groups)):
        if rank == 1 and len(tensor_groups) == len(groups):
            break
        floor = live_lower_bound(
            [PlannedBuffer(g.size, g.first, g.last) for g in subset], None, 1
        )
        offs, _, exact = _pack(list(subset), time_limit_s / 2, floor)
        offsets = [ONLINE] * n
        for g, o in zip(subset, offs):
            for m in g.members:
                if m in offline_set:
                    offsets[m] = o
        head = _replay(online, offsets, alignment)
        # Without scratch the replay is the packing itself, so an exact packing is an optimal plan.
        candidates.append((head, rank, offsets, exact and len(subset) == len(groups) == len(tensor_groups)))
    head, _, offsets, exact = min(candidates, key=lambda c: (c[0], c[1]))
    if head >= greedy.head_bytes and not aliases:
        return OfflinePlan(greedy_offsets, greedy.head_bytes, lower, "greedy")
    # With aliases the plan is kept even above greedy: only an offline plan realises them.
    exact = exact or head <= lower
    return OfflinePlan(offsets, int(head), lower, "exact" if exact else "heuristic")
