"""The offline memory plan: the allocator (`arena.offline_plan`), the pass and its check
(`graph.passes.offline_plan`), `profile`/`run_tflite` refusing bad plans, and real TFLM
(`tflite_micro` wheel) using the plan: measured head == predicted head, same outputs."""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import itertools  # noqa: E402
import struct  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402
from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

import model_zoo  # noqa: E402
import strategies as kps  # noqa: E402
import keras_patch  # noqa: E402
from keras_patch.arena.memory_planner import PlannedBuffer, align_up, plan_greedy  # noqa: E402
from keras_patch.arena.offline_metadata import read_offline_offsets, write_offline_offsets  # noqa: E402
from keras_patch.arena.offline_plan import ONLINE, live_lower_bound, plan_offline  # noqa: E402
from keras_patch.arena.tflm_arena import run_tflm  # noqa: E402
from keras_patch.errors import KerasPatchError, OfflinePlanError  # noqa: E402
from keras_patch.graph.passes.offline_plan import (  # noqa: E402
    attach_offline_plan,
    check_offline_plan,
    plan_buffers,
    planned_tensors,
)
from keras_patch.graph.tflite_model import TFLiteModel, decode_name  # noqa: E402
from keras_patch.runtime.host import run_tflite  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore:Statistics for quantized inputs")

try:  # the project's hypothesis profiles and example counts
    from tests.test_bit_exact import examples
except ImportError:  # tests/ itself on sys.path
    from test_bit_exact import examples  # noqa: E402


# ----------------------------------------------------------------------------
# random buffer sets
# ----------------------------------------------------------------------------
@st.composite
def buffer_sets(draw, max_buffers=30, max_scratch=4, with_aliases=True):
    """(buffers, aliases): tensors t<i>, scratch buffers alive for one op, aliases out -> dying input."""
    n = draw(st.integers(0, max_buffers))
    buffers = []
    for i in range(n):
        first = draw(st.integers(-1, 12))
        buffers.append(PlannedBuffer(draw(st.integers(1, 400)), first, first + draw(st.integers(0, 5)), f"t{i}"))
    for k in range(draw(st.integers(0, max_scratch))):
        op = draw(st.integers(0, 12))
        buffers.append(PlannedBuffer(draw(st.integers(0, 300)), op, op, f"scratch:op{op}:{k}"))
    aliases = {}
    if with_aliases and n:
        for _ in range(draw(st.integers(0, 3))):
            out = draw(st.integers(0, n - 1))
            # An output may occupy an input that dies at the op creating it.
            inputs = [j for j in range(n) if j != out and buffers[j].last_op == buffers[out].first_op
                      and j not in aliases.values() and j not in aliases]
            if out in aliases or not inputs:
                continue
            aliases[out] = draw(st.sampled_from(inputs))
    return buffers, aliases


def _groups(n, aliases):
    parent = list(range(n))

    def find(i):
        while parent[i] != i:
            i = parent[i]
        return i

    for a, b in aliases.items():
        parent[find(a)] = find(b)
    return [find(i) for i in range(n)]


def _replay(buffers, offsets):
    fixed = [PlannedBuffer(b.size, b.first_op, b.last_op, b.name, None if o == ONLINE else o)
             for b, o in zip(buffers, offsets)]
    return plan_greedy(fixed)


def _assert_no_overlap(buffers, offsets, aliases):
    replay = _replay(buffers, offsets)
    group = _groups(len(buffers), aliases)
    for i, j in itertools.combinations(range(len(buffers)), 2):
        a, b = buffers[i], buffers[j]
        if a.first_op > b.last_op or b.first_op > a.last_op:
            continue
        oi, oj = replay.offsets[i], replay.offsets[j]
        si, sj = align_up(a.size), align_up(b.size)
        if si == 0 or sj == 0:
            continue
        if group[i] == group[j]:
            assert oi == oj, (i, j)
            continue
        assert oi + si <= oj or oj + sj <= oi, (a, oi, b, oj)
    return replay


@settings(max_examples=examples(150))
@given(buffer_sets())
def test_plan_never_overlaps_live_buffers_and_beats_greedy(case):
    buffers, aliases = case
    plan = plan_offline(buffers, aliases, time_limit_s=0.2)
    assert len(plan.offsets) == len(buffers)
    for o, b in zip(plan.offsets, buffers):
        assert (o == ONLINE) == b.name.startswith("scratch:")
        assert o == ONLINE or o % 16 == 0
    replay = _assert_no_overlap(buffers, plan.offsets, aliases)
    if plan.method != "greedy":
        assert replay.head_bytes == plan.head_bytes  # what TFLM places with these offsets fixed
    assert plan.lower_bound == live_lower_bound(buffers, aliases)
    assert plan.head_bytes >= plan.lower_bound
    if not aliases:
        assert plan.head_bytes <= plan_greedy(buffers).head_bytes
    else:
        assert plan.method != "greedy"
    # Deterministic.
    assert plan_offline(buffers, aliases, time_limit_s=0.2) == plan


def _brute_force_head(sizes, lifetimes):
    """The smallest peak over every order and every resting position (0 or on a placed conflicting buffer)."""
    n = len(sizes)
    conflict = [[lifetimes[i][0] <= lifetimes[j][1] and lifetimes[j][0] <= lifetimes[i][1] and i != j
                 for j in range(n)] for i in range(n)]
    best = [sum(sizes)]

    def place(offsets, peak):
        if peak >= best[0]:
            return
        free = [i for i in range(n) if offsets[i] is None]
        if not free:
            best[0] = peak
            return
        for i in free:
            for c in {0} | {offsets[j] + sizes[j] for j in range(n) if offsets[j] is not None and conflict[i][j]}:
                if all(offsets[j] is None or not conflict[i][j] or offsets[j] + sizes[j] <= c
                       or c + sizes[i] <= offsets[j] for j in range(n)):
                    offsets[i] = c
                    place(offsets, max(peak, c + sizes[i]))
                    offsets[i] = None

    place([None] * n, 0)
    return best[0]


@settings(max_examples=examples(150))
@given(buffer_sets(max_buffers=6, max_scratch=0, with_aliases=False))
def test_exact_on_small_sets_is_the_brute_force_optimum(case):
    buffers, _ = case
    plan = plan_offline(buffers)
    sizes = [align_up(b.size) for b in buffers]
    optimum = _brute_force_head(sizes, [(b.first_op, b.last_op) for b in buffers])
    assert plan.head_bytes == optimum
    assert plan.method in ("exact", "greedy")


def test_beats_greedy_where_greedy_is_not_optimal():
    # Greedy places the two 48-byte buffers above the 96/80 ones (head 192); the live bytes at op 1
    # are 48 + 80 + 48 = 176, which an offline plan reaches.
    buffers = [PlannedBuffer(48, 1, 2, "t0"), PlannedBuffer(96, 0, 0, "t1"),
               PlannedBuffer(80, 1, 1, "t2"), PlannedBuffer(48, 0, 1, "t3")]
    assert plan_greedy(buffers).head_bytes == 192
    plan = plan_offline(buffers)
    assert (plan.head_bytes, plan.lower_bound, plan.method) == (176, 176, "exact")
    _assert_no_overlap(buffers, plan.offsets, {})


def test_lower_bound_counts_an_alias_pair_once():
    buffers = [PlannedBuffer(100, -1, 0, "in"), PlannedBuffer(60, 0, 1, "out"), PlannedBuffer(10, 1, 1, "w")]
    assert live_lower_bound(buffers) == 112 + 64
    # At op 0 the pair holds max(112, 64) bytes; at op 1 only "out" (64) and "w" (16) are alive.
    assert live_lower_bound(buffers, {1: 0}) == 112
    plan = plan_offline(buffers, {1: 0})
    # The pair is one 112-byte block from op -1 to op 1, "w" goes above it.
    assert plan.offsets[0] == plan.offsets[1] and plan.head_bytes == 128 and plan.method == "exact"


def test_aliases_must_be_tensors():
    buffers = [PlannedBuffer(16, 0, 0, "t"), PlannedBuffer(16, 0, 0, "scratch:op0:0")]
    with pytest.raises(ValueError, match="offline-planned"):
        plan_offline(buffers, {1: 0})


# ----------------------------------------------------------------------------
# the pass and its check on a real model
# ----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def planned(residual):
    """(model bytes with an attached plan, the plan): the residual model's ADDs write over a dying input."""
    model = TFLiteModel.from_bytes(residual)
    plan = attach_offline_plan(model)
    assert plan is not None  # the in-place ADDs need an offline plan
    return model.to_bytes(), plan


def _with_raw(data: bytes, raw: bytes) -> TFLiteModel:
    model = TFLiteModel.from_bytes(data)
    meta = next(m for m in model.model.metadata if decode_name(m.name) == "OfflineMemoryAllocation")
    model.model.buffers[meta.buffer].data = np.frombuffer(raw, np.uint8).copy()
    return model


def _offsets(data):
    return read_offline_offsets(TFLiteModel.from_bytes(data))


def test_metadata_round_trip_and_check(planned, residual):
    data, plan = planned
    model = TFLiteModel.from_bytes(data)
    tensors = planned_tensors(model)
    offsets = read_offline_offsets(model)
    assert [offsets[t] for t in tensors] == plan.offsets[:len(tensors)]
    assert all(offsets[t] == -1 for t in range(len(offsets)) if t not in tensors)
    assert check_offline_plan(model) == plan.head_bytes
    assert check_offline_plan(TFLiteModel.from_bytes(residual)) is None
    # attach again: the stale plan is replaced, not doubled.
    assert attach_offline_plan(model) == plan
    assert [decode_name(m.name) for m in model.model.metadata].count("OfflineMemoryAllocation") == 1


def test_aliases_share_an_offset(planned):
    from keras_patch.arena.aliases import in_place_aliases

    data, _ = planned
    model = TFLiteModel.from_bytes(data)
    offsets = read_offline_offsets(model)
    aliases = in_place_aliases(model)
    assert aliases and any(model.op_type(op) == "ADD" for op in range(model.num_ops))
    for out, inp in aliases.items():
        assert offsets[out] == offsets[inp] >= 0


def _header(data, version=1, subgraph=0, count=None, offsets=None):
    offsets = _offsets(data) if offsets is None else offsets
    count = len(offsets) if count is None else count
    return struct.pack(f"<3i{len(offsets)}i", version, subgraph, count, *offsets)


def _two_live_tensors(model):
    """(a, b): two planned tensors alive at one op with different offsets, not an alias pair."""
    from keras_patch.arena.aliases import in_place_aliases

    buffers = plan_buffers(model)
    tensors = planned_tensors(model)
    pairs = set(in_place_aliases(model).items())
    for i, j in itertools.combinations(range(len(tensors)), 2):
        a, b = buffers[i], buffers[j]
        if a.first_op <= b.last_op and b.first_op <= a.last_op and (tensors[i], tensors[j]) not in pairs \
                and (tensors[j], tensors[i]) not in pairs:
            return tensors[i], tensors[j]
    raise AssertionError("no two tensors alive together")


def test_bad_plans_are_refused(planned):
    data, _ = planned
    offsets = _offsets(data)
    model = TFLiteModel.from_bytes(data)
    n = len(offsets)
    cases = [
        (_header(data, version=2), "version 2"),
        (_header(data, subgraph=1), "subgraph 1"),
        (_header(data, count=n + 1), f"{n + 1} offsets .*{n} tensors"),
        (_header(data, offsets=offsets[:-1]), f"{n - 1} offsets .*{n} tensors"),
        (b"\x01\x00\x00", "3 bytes"),
    ]
    bad = list(offsets)
    t = planned_tensors(model)[0]
    bad[t] = -7
    cases.append((_header(data, offsets=bad), rf"tensor {t} .* offset -7"))
    bad = list(offsets)
    bad[t] = offsets[t] + 8
    cases.append((_header(data, offsets=bad), rf"tensor {t} .* offset {offsets[t] + 8}, not a multiple of 16"))
    const = next(i for i in range(n) if model.is_constant(i))
    bad = list(offsets)
    bad[const] = 0
    cases.append((_header(data, offsets=bad), rf"tensor {const} .* constant tensor"))
    a, b = _two_live_tensors(model)
    bad = list(offsets)
    bad[b] = bad[a]
    cases.append((_header(data, offsets=bad),
                  rf"tensor ({a}|{b}) .* and tensor ({a}|{b}) .* overlap in memory while alive together "
                  rf"\((during|before) .*op \d+ \("))
    for raw, message in cases:
        with pytest.raises(OfflinePlanError, match=message):
            check_offline_plan(_with_raw(data, raw))
    # A variable tensor with an offset.
    var = _with_raw(data, _header(data))
    var.subgraph.tensors[t].isVariable = True
    with pytest.raises(OfflinePlanError, match=rf"tensor {t} .* variable tensor"):
        check_offline_plan(var)
    # Two metadata entries.
    twice = TFLiteModel.from_bytes(data)
    twice.model.metadata = list(twice.model.metadata) * 2
    with pytest.raises(OfflinePlanError, match="2 OfflineMemoryAllocation"):
        check_offline_plan(twice)


def test_alias_pair_at_different_offsets_is_refused(planned):
    from keras_patch.arena.aliases import in_place_aliases

    data, _ = planned
    model = TFLiteModel.from_bytes(data)
    out, inp = next(iter(in_place_aliases(model).items()))
    offsets = _offsets(data)
    offsets[out] = offsets[inp] + 16  # overlapping, not the same offset
    write_offline_offsets(model, offsets)
    with pytest.raises(OfflinePlanError, match="in-place pair at different offsets"):
        check_offline_plan(model)


def test_bad_plans_are_refused_by_profile_and_run_tflite(planned):
    data, _ = planned
    tiny = model_zoo.to_int8_tflite(model_zoo.tiny_conv_model())
    x = np.zeros((1, 16, 16, 3), np.int8)
    # Another model's plan: the tensor count does not match.
    other = TFLiteModel.from_bytes(tiny)
    other.model.metadata = TFLiteModel.from_bytes(data).model.metadata
    other.model.buffers = list(other.model.buffers)
    src = TFLiteModel.from_bytes(data)
    meta = next(m for m in src.model.metadata if decode_name(m.name) == "OfflineMemoryAllocation")
    other.model.buffers.append(src.model.buffers[meta.buffer])
    meta.buffer = len(other.model.buffers) - 1
    other.model.metadata = [meta]
    mismatched = other.to_bytes()
    # Every tensor at offset 0: a layer's input and output share bytes.
    overlapping = TFLiteModel.from_bytes(tiny)
    offsets = [-1] * len(overlapping.subgraph.tensors)
    for t in planned_tensors(overlapping):
        offsets[t] = 0
    write_offline_offsets(overlapping, offsets)
    overlapping = overlapping.to_bytes()
    for bad, message in ((mismatched, "does not match this model"), (overlapping, "overlap in memory")):
        with pytest.raises(OfflinePlanError, match=message):
            keras_patch.profile(bad)
        with pytest.raises(OfflinePlanError, match=message):
            run_tflite(bad, x)
    assert issubclass(OfflinePlanError, KerasPatchError)


def test_profile_reports_plan_greedy_and_lower_bound(planned, residual):
    data, plan = planned
    prof = keras_patch.profile(data)
    plain = keras_patch.profile(residual)
    assert prof.offline_plan_head_bytes == plan.head_bytes == prof.patched_peak_bytes
    assert plain.offline_plan_head_bytes is None
    assert prof.greedy_head_bytes == plain.greedy_head_bytes == plain.patched_peak_bytes
    assert prof.lower_bound_bytes == plan.lower_bound <= prof.offline_plan_head_bytes
    assert prof.lower_bound_bytes_without_input <= prof.lower_bound_bytes
    assert prof.greedy_head_bytes_without_input <= prof.greedy_head_bytes
    assert prof.offline_plan_head_bytes_without_input <= prof.offline_plan_head_bytes
    summary = prof.to_dict()["summary"]
    assert summary["offline_plan_head_bytes"] == plan.head_bytes
    assert summary["lower_bound_bytes"] == prof.lower_bound_bytes
    assert f"offline plan {plan.head_bytes:,} B" in prof.table()
    assert "no offline plan" in plain.table()


# ----------------------------------------------------------------------------
# real TFLM
# ----------------------------------------------------------------------------
def _tflm_agrees(data: bytes, seed: int) -> None:
    """Attach a plan (or, where greedy is as good, write the greedy tensor offsets as one):
    TFLM's measured head == the replica's, outputs == without the plan."""
    model = TFLiteModel.from_bytes(data)
    plan = attach_offline_plan(model)
    if plan is None:
        tensors = planned_tensors(model)
        greedy = plan_offline(plan_buffers(model), offline_indices=range(len(tensors)))
        offsets = [-1] * len(model.subgraph.tensors)
        for i, t in enumerate(tensors):
            offsets[t] = greedy.offsets[i]
        write_offline_offsets(model, offsets)
    with_plan = model.to_bytes()
    predicted = check_offline_plan(TFLiteModel.from_bytes(with_plan))
    shape = TFLiteModel.from_bytes(data).tensor(TFLiteModel.from_bytes(data).inputs[0]).shape
    x = np.random.default_rng(seed).integers(-128, 128, (2, *shape[1:]), dtype=np.int8)
    run_plan, run_plain = run_tflm(with_plan, x), run_tflm(data, x)
    assert run_plan.arena.head_bytes == predicted, run_plan.arena.report
    for a, b in zip(run_plan.outputs, run_plain.outputs):
        np.testing.assert_array_equal(a, b)
    # run_tflite (LiteRT's kernels, which may differ from TFLM's by one LSB) ignores the plan too.
    for a, b in zip(run_tflite(with_plan, x), run_tflite(data, x)):
        np.testing.assert_array_equal(a, b)


def test_tflm_uses_the_plan_with_in_place_adds(planned, residual):
    data, plan = planned
    shape = TFLiteModel.from_bytes(data).tensor(TFLiteModel.from_bytes(data).inputs[0]).shape
    x = np.random.default_rng(1).integers(-128, 128, (2, *shape[1:]), dtype=np.int8)
    run_plan, run_plain = run_tflm(data, x), run_tflm(residual, x)
    assert run_plan.arena.head_bytes == plan.head_bytes, run_plan.arena.report
    for a, b in zip(run_plan.outputs, run_plain.outputs):
        np.testing.assert_array_equal(a, b)


@settings(max_examples=examples(12))
@given(kps.stage_specs(min_size=5, max_size=20, max_channels=6, max_blocks=4))
def test_tflm_head_equals_prediction_on_random_models(spec):
    data = model_zoo.to_int8_tflite(kps.build_model(spec), num_samples=2)
    _tflm_agrees(data, spec.seed)


@pytest.mark.parametrize("kernel", ["portable", "cmsis_nn"])
def test_patched_model_with_plan(residual, kernel):
    """KP_PATCH_STAGE scratch stays online under the plan; profile and run_tflite accept the plan, same bits."""
    patched = keras_patch.patchify(residual, 3, (2, 2))
    model = TFLiteModel.from_bytes(patched)
    plan = attach_offline_plan(model, kernel)
    assert plan is not None  # the ADDs
    assert any(b.name.startswith("scratch:op0") for b in plan_buffers(model, kernel))
    with_plan = model.to_bytes()
    assert check_offline_plan(TFLiteModel.from_bytes(with_plan), kernel) == plan.head_bytes
    prof = keras_patch.profile(with_plan, kernel=kernel)
    assert prof.patched_peak_bytes == prof.offline_plan_head_bytes == plan.head_bytes
    assert prof.lower_bound_bytes <= plan.head_bytes
    assert prof.greedy_head_bytes == keras_patch.profile(patched, kernel=kernel).patched_peak_bytes
    x = np.random.default_rng(0).integers(-128, 128, (2, 48, 48, 3), dtype=np.int8)
    for a, b in zip(run_tflite(with_plan, x), run_tflite(patched, x)):
        np.testing.assert_array_equal(a, b)
