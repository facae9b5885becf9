"""The cost model: how TFLM lays out the arena of a network with patch stages, in memory.

`ArenaNetwork` is built once from an unpatched int8 model: the buffers TFLM
plans for it layer by layer (`memory_planner.model_buffers`, with the
built-in kernels' scratch buffers) and their lifetimes. For any set of
stages (`StageSpan`: a contiguous run of ops and the scratch buffers its
KP_PATCH_STAGE op requests) it gives, without writing or re-reading a
`.tflite`, the buffers TFLM would plan for the patched model: the stage
ops' intermediate tensors are gone, every stage is one op at its last
op's place, tensors keep their order (as `TFLiteModel.remove_unused`
keeps it) and scratch buffers follow in op order. From those come the live
bytes per op, the live-set peak and TFLM's greedy head
(`memory_planner.plan_greedy`), with and without the model input.

This is the one place that knows how the arena of a patched network is laid
out: the planner (`keras_patch.planner.search`) and `profile` ask it.

Example:

>>> from keras_patch.arena.network import ArenaNetwork, StageSpan
>>> net = ArenaNetwork.from_tflite("model.tflite")  # doctest: +SKIP
>>> net.head(), net.head([StageSpan(1, 5, (4096,))])  # doctest: +SKIP
(83200, 41216)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Sequence, Tuple

import numpy as np

from keras_patch.arena import memory_planner
from keras_patch.errors import UnsupportedModelError
from keras_patch.graph.tflite_model import ModelSource, TFLiteModel, int_list, read_model_bytes
from keras_patch.stage import geometry
from keras_patch.stage.options import StageOptions

#: Time `plan_offline` may spend per layout while the planner searches (the exported plan gets more).
OFFLINE_SEARCH_SECONDS = 0.2


@dataclass(frozen=True)
class StageSpan:
    """A patch stage as the cost model sees it.

    Attributes:
        first_op: its first op in the unpatched model.
        last_op: its last op (the KP_PATCH_STAGE op takes this op's place).
        scratch: byte sizes of the scratch buffers the KP_PATCH_STAGE op
            requests, in request order (`stage_scratch_sizes`).
    """

    first_op: int
    last_op: int
    scratch: Tuple[int, ...] = ()


def stage_scratch_sizes(options: StageOptions, kernel: str = "portable") -> Tuple[int, ...]:
    """The sizes of the scratch buffers a KP_PATCH_STAGE op requests, in request order
    (`geometry.stage_buffers`, docs "Scratch buffers")."""
    return tuple(b.bytes for b in geometry.stage_buffers(options, kernel))


class ArenaNetwork:
    """The arena layout of one unpatched model, for any set of stages (module docstring).

    Args:
        model: an unpatched int8 model with one subgraph.
        in_place: with `offline_plan`, ops outside the stages may write over
            a dying input (`keras_patch.arena.aliases`): ADD/MUL/RESHAPE as
            they are, an eligible DEPTHWISE_CONV_2D as a one-layer in-place
            stage (its scratch: one input plane). The live bytes count each
            such pair once.
        offline_plan: `head` is the lower of TFLM's greedy layout and the
            offline plan (`keras_patch.arena.offline_plan.plan_offline`) the
            model would carry.

    Raises:
        UnsupportedModelError: several subgraphs, an `OfflineMemoryAllocation`
            (offline-planned) model, or what `memory_planner` refuses.
    """

    def __init__(self, model: TFLiteModel, in_place: bool = False, offline_plan: bool = False):
        if len(model.model.subgraphs) != 1:
            raise UnsupportedModelError(
                f"The model has {len(model.model.subgraphs)} subgraphs; keras-patch plans one.")
        if memory_planner._offline_offsets(model) is not None:
            raise UnsupportedModelError(
                "The model has an OfflineMemoryAllocation (offline-planned arena); patch stages change "
                "its tensors, so it cannot be planned with stages.")
        self.model = model
        self.num_ops = model.num_ops
        sg = model.subgraph
        buffers_fb = model.model.buffers or []
        tensors = sg.tensors or []
        n = len(tensors)
        self.names = [model.tensor(t).name for t in range(n)]
        self.sizes = np.zeros(n, np.int64)
        needs = np.zeros(n, bool)
        for t, tensor in enumerate(tensors):
            nbytes = memory_planner._tensor_bytes(tensor, 0, t)
            self.sizes[t] = nbytes
            needs[t] = (not memory_planner._has_data(buffers_fb, tensor.buffer)) and not tensor.isVariable \
                and nbytes != 0
        self.needs = needs
        self.aligned = np.array([memory_planner.align_up(s) for s in self.sizes], np.int64)
        self.inputs = [int(t) for t in int_list(sg.inputs)]
        self.outputs = [int(t) for t in int_list(sg.outputs)]
        self.producer = np.full(n, -1, np.int64)
        self.consumer_ops: List[List[int]] = [[] for _ in range(n)]
        self.op_ins: List[List[int]] = []
        self.op_outs: List[List[int]] = []
        for op in range(self.num_ops):
            ins = [t for t in model.op_inputs(op) if t >= 0]
            outs = model.op_outputs(op)
            self.op_ins.append(ins)
            self.op_outs.append(outs)
            for t in outs:
                if self.producer[t] < 0:
                    self.producer[t] = op
            for t in ins:
                self.consumer_ops[t].append(op)
        self.builtin_scratch: Dict[int, List[int]] = {
            int(k): list(v) for k, v in memory_planner.builtin_scratch_bytes(model).items()}
        first, last = self._lifetimes(list(range(self.num_ops)), self.num_ops)
        self.first = np.array(first, np.int64)
        self.last = np.array(last, np.int64)
        self.in_place = bool(in_place)
        self.offline_plan = bool(offline_plan)
        self._offline_heads: Dict[tuple, int] = {}
        # In-place pairs (only an offline plan realises them): output tensor -> input tensor it
        # occupies, and the one-plane save buffer of each depthwise op that would run in place.
        self.alias_of: Dict[int, int] = {}
        self.depthwise_save: Dict[int, int] = {}
        if self.in_place and self.offline_plan:
            self._find_in_place(model)
        self.input_names = {self.names[t] for t in self.inputs}
        self.is_input = np.array([name in self.input_names for name in self.names], bool)
        # Layer-by-layer live bytes per op (tensors + built-in scratch), with and without the input.
        self.layer_live = np.zeros(self.num_ops, np.int64)
        self.layer_live_without_input = np.zeros(self.num_ops, np.int64)
        for op in range(self.num_ops):
            alive = self.needs & (self.first <= op) & (self.last >= op)
            scratch = sum(memory_planner.align_up(s) for s in self.builtin_scratch.get(op, []))
            self.layer_live[op] = int(self.aligned[alive].sum()) + scratch
            self.layer_live_without_input[op] = int(self.aligned[alive & ~self.is_input].sum()) + scratch
        for out, source in self.alias_of.items():
            op = int(self.producer[out])
            shared = int(min(self.aligned[out], self.aligned[source]))
            extra = 0
            if op in self.depthwise_save:
                extra = memory_planner.align_up(self.depthwise_save[op]) - \
                    sum(memory_planner.align_up(s) for s in self.builtin_scratch.get(op, []))
            self.layer_live[op] += extra - shared
            self.layer_live_without_input[op] += extra - (0 if self.is_input[source] else shared)

    def _find_in_place(self, model: TFLiteModel) -> None:
        from keras_patch.arena import aliases

        last_readers = aliases._last_readers(model)
        for op in range(self.num_ops):
            if model.op_type(op) == "DEPTHWISE_CONV_2D":
                if aliases.depthwise_in_place_failure(model, op, last_readers) is None:
                    source = model.op_inputs(op)[0]
                    _, in_h, in_w, _ = model.tensor(source).shape
                    self.depthwise_save[op] = aliases.depthwise_save_bytes(in_h, in_w)
                    self.alias_of[model.op_outputs(op)[0]] = source
                continue
            source = aliases.op_alias(model, op, last_readers)
            if source is not None:
                self.alias_of[model.op_outputs(op)[0]] = source

    @classmethod
    def from_tflite(cls, source: ModelSource) -> "ArenaNetwork":
        """An `ArenaNetwork` of a `.tflite` (bytes or path)."""
        return cls(TFLiteModel.from_bytes(read_model_bytes(source)))

    # ------------------------------------------------------------------
    def _lifetimes(self, new_index: Sequence[int], new_num_ops: int) -> tuple:
        """(first_op, last_op) per tensor as `AllocationInfoBuilder` marks them (memory_planner).

        Every op of a stage counts at its stage op's index `new_index[op]`;
        new indices never decrease, so the last mark is the largest.
        """
        n = len(self.names)
        first = [None] * n
        last = [None] * n
        for t in self.inputs:
            first[t] = 0
            last[t] = 0
        for op in range(self.num_ops):
            scope = new_index[op] + 1
            for t in self.op_outs[op]:
                if first[t] is None:
                    first[t] = scope
            for t in self.op_ins[op]:
                last[t] = scope
            for t in self.op_outs[op]:
                last[t] = scope
        for t in self.outputs:
            if first[t] is None:
                first[t] = new_num_ops
            last[t] = new_num_ops
        firsts = [(-1 if f is None else f) - 1 for f in first]
        lasts = [(-1 if l is None else l) - 1 for l in last]
        return firsts, lasts

    def _layout(self, stages: Sequence[StageSpan]):
        """(new index per unpatched op, removed ops, number of ops, stage at new index)."""
        stages = sorted(stages, key=lambda s: s.first_op)
        for a, b in zip(stages, stages[1:]):
            if b.first_op <= a.last_op:
                raise UnsupportedModelError(
                    f"Stages over ops {a.first_op}..{a.last_op} and {b.first_op}..{b.last_op} overlap.")
        removed = set()
        for s in stages:
            if not 0 <= s.first_op <= s.last_op < self.num_ops:
                raise UnsupportedModelError(
                    f"Stage over ops {s.first_op}..{s.last_op}: the model has {self.num_ops} ops.")
            removed.update(range(s.first_op, s.last_op))
        new_index = [0] * self.num_ops
        count = 0
        for op in range(self.num_ops):
            if op not in removed:
                new_index[op] = count
                count += 1
        for s in stages:
            for op in range(s.first_op, s.last_op):
                new_index[op] = new_index[s.last_op]
        return new_index, removed, count, {new_index[s.last_op]: s for s in stages}

    def buffers(self, stages: Sequence[StageSpan] = (), include_input: bool = True) -> List[memory_planner.PlannedBuffer]:
        """The buffers TFLM plans for the model with `stages` patched, in the order it adds them.

        Equal to `memory_planner.model_buffers` (with the merged scratch) of
        `patchify_stages(model, stages)`; `include_input=False` drops the
        model input tensor(s), as `profile`'s `..._without_input` figures do.
        """
        return self._buffers(stages, include_input, in_place=False)[0]

    def in_place_buffers(self, stages: Sequence[StageSpan] = (), include_input: bool = True) -> tuple:
        """`(buffers, aliases)` with the in-place pairs outside `stages` applied: the depthwise ops
        that run in place request their save plane instead of their built-in scratch, and
        `aliases` maps a buffer's index to the index of the buffer whose memory it occupies (what
        `offline_plan.plan_offline` takes)."""
        buffers, tensor_of = self._buffers(stages, include_input, in_place=True)
        index = {t: i for i, t in enumerate(tensor_of) if t >= 0}
        removed = self._layout(stages)[1]
        in_stage = set(removed) | {s.last_op for s in stages}
        aliases = {}
        for out, source in self.alias_of.items():
            if int(self.producer[out]) in in_stage or out not in index or source not in index:
                continue
            aliases[index[out]] = index[source]
        return buffers, aliases

    def _buffers(self, stages: Sequence[StageSpan], include_input: bool, in_place: bool) -> tuple:
        new_index, removed, count, stage_at = self._layout(stages)
        internal = set()
        for op in removed:
            internal.update(self.op_outs[op])
        first, last = self._lifetimes(new_index, count)
        used = None
        if stages:  # remove_unused drops the tensors nothing refers to any more
            used = set(self.inputs) | set(self.outputs)
            for op in range(self.num_ops):
                used.update(self.op_ins[op])
                used.update(self.op_outs[op])
        result, tensor_of = [], []
        for t, name in enumerate(self.names):
            if not self.needs[t] or t in internal or (used is not None and t not in used):
                continue
            if not include_input and name in self.input_names:
                continue
            result.append(memory_planner.PlannedBuffer(int(self.sizes[t]), first[t], last[t], name))
            tensor_of.append(t)
        scratch = {}
        for op, sizes in self.builtin_scratch.items():
            if op not in removed and new_index[op] not in stage_at:
                scratch[new_index[op]] = sizes
        if in_place:
            for op, save in self.depthwise_save.items():
                if op not in removed and new_index[op] not in stage_at:
                    scratch[new_index[op]] = [save]
        for index, stage in stage_at.items():
            scratch[index] = list(stage.scratch)
        for index in sorted(scratch):
            for k, size in enumerate(scratch[index]):
                result.append(memory_planner.PlannedBuffer(int(size), index, index, f"scratch:op{index}:{k}"))
                tensor_of.append(-1)
        return result, tensor_of

    def head(self, stages: Sequence[StageSpan] = (), include_input: bool = True) -> int:
        """TFLM's arena head with `stages` patched: its greedy layout (`plan_greedy`), or with
        `offline_plan` the lower of that and the offline plan with the in-place pairs."""
        greedy = memory_planner.plan_greedy(self.buffers(stages, include_input), placed_copies=False).head_bytes
        if not self.offline_plan:
            return greedy
        return min(greedy, self.offline_head(stages, include_input))

    def offline_head(self, stages: Sequence[StageSpan] = (), include_input: bool = True) -> int:
        """The head under the offline plan `plan_offline` finds (with the in-place pairs when
        `in_place`), as TFLM lays it out (scratch buffers placed online around it)."""
        from keras_patch.arena.offline_plan import plan_offline

        key = (include_input, tuple(sorted((s.first_op, s.last_op, tuple(s.scratch)) for s in stages)))
        if key not in self._offline_heads:
            buffers, aliases = self.in_place_buffers(stages, include_input)
            self._offline_heads[key] = plan_offline(buffers, aliases, time_limit_s=OFFLINE_SEARCH_SECONDS).head_bytes
        return self._offline_heads[key]

    def live_bytes(self, stages: Sequence[StageSpan] = (), include_input: bool = True) -> List[int]:
        """Bytes alive while each op of the patched network runs (16-byte aligned sizes)."""
        buffers = self.buffers(stages, include_input)
        count = self._layout(stages)[2]
        live = [0] * count
        for b in buffers:
            size = memory_planner.align_up(b.size)
            for op in range(max(b.first_op, 0), min(b.last_op, count - 1) + 1):
                live[op] += size
        return live

    def stage_live_bytes(self, first_op: int, last_op: int, scratch: Sequence[int] = (),
                         include_input: bool = True) -> int:
        """Bytes alive while a stage over ops `first_op..last_op` runs: the tensors alive across it,
        its entry and exit, and its scratch (the stage op's live set; `live_bytes` agrees)."""
        return self.stage_tensor_bytes(first_op, last_op, include_input) + \
            sum(memory_planner.align_up(s) for s in scratch)

    def stage_tensor_bytes(self, first_op: int, last_op: int, include_input: bool = True) -> int:
        """The tensors alive while a stage over `first_op..last_op` runs (no scratch)."""
        internal = (self.producer >= first_op) & (self.producer < last_op)
        alive = self.needs & (self.first <= last_op) & (self.last >= first_op) & ~internal
        if not include_input:
            alive &= ~self.is_input
        return int(self.aligned[alive].sum())

    def head_buffers(self, stages: Sequence[StageSpan] = (), include_input: bool = True) -> list:
        """The buffers TFLM's greedy layout stacks up to the head, bottom to top.

        Starts at a buffer that ends at the head (the lowest-placed one if
        several do) and walks down through the buffers it sits on (alive at
        the same time, ending where it starts). Each is a `PlannedBuffer`
        with `offset`; `first_op`/`last_op` are op indices of the patched
        network (`unpatched_ops` maps them back). This is what holds the
        head where it is.
        """
        plan = memory_planner.plan_greedy(self.buffers(stages, include_input))
        placed = [b for b in plan.buffers]
        size = {id(b): memory_planner.align_up(b.size) for b in placed}
        top = [b for b in placed if b.offset + size[id(b)] == plan.head_bytes]
        if not top:
            return []
        stack = [min(top, key=lambda b: b.offset)]
        while stack[-1].offset > 0:
            b = stack[-1]
            below = [u for u in placed if u.offset + size[id(u)] == b.offset
                     and not (u.first_op > b.last_op or b.first_op > u.last_op)]
            if not below:
                break
            stack.append(max(below, key=lambda u: size[id(u)]))
        return stack[::-1]

    def unpatched_ops(self, stages: Sequence[StageSpan], first_op: int, last_op: int) -> Tuple[int, int]:
        """The unpatched op range behind patched op indices `first_op..last_op`."""
        new_index = self._layout(stages)[0]
        ops = [op for op, n in enumerate(new_index) if first_op <= n <= last_op]
        return (min(ops), max(ops)) if ops else (0, -1)
