"""The whole-network planner (`keras_patch.plan`) and its cost model (`arena.network`)."""

import json
import os
import random

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import model_zoo
import strategies as kst
import keras_patch
from keras_patch.arena import memory_planner
from keras_patch.arena.network import ArenaNetwork, StageSpan, stage_scratch_sizes
from keras_patch.arena.profiler import op_macs, profile, stage_scratch_bytes
from keras_patch.errors import KerasPatchError, PlanError, UnsupportedModelError
from keras_patch.graph import rules
from keras_patch.graph.patchify import build_stage_options, patchify_stages, plan_stage
from keras_patch.graph.tflite_model import TFLiteModel
from keras_patch.planner.plan import PatchPlan, PlannedStage
from keras_patch.planner.search import plan
from keras_patch.stage import geometry

PROFILE = os.environ.get("KP_HYPOTHESIS_PROFILE", "ci")
EXAMPLES = {"ci": 10, "dev": 2}.get(PROFILE, 10)
KERNELS = ("portable", "cmsis_nn")


@pytest.fixture(scope="module")
def pooling() -> bytes:
    return model_zoo.to_int8_tflite(model_zoo.pooling_model())


@pytest.fixture(scope="module")
def small_models(residual, pooling):
    return {"residual": residual, "pooling": pooling}


def _stage(model: TFLiteModel, run, grid, kernel):
    first, last, entry, exit_tensor = run
    options, _ = build_stage_options(model, list(range(first, last + 1)), entry, exit_tensor, grid)
    return options, StageSpan(first, last, stage_scratch_sizes(options, kernel))


def _random_plans(model: TFLiteModel, count: int, seed: int):
    """Random sets of disjoint patchable runs with random grids: [(run, grid), ...]."""
    rng = random.Random(seed)
    runs = [r for r in rules.patchable_runs(model) if r[1] > r[0]]
    plans = []
    for _ in range(count):
        rng.shuffle(runs)
        chosen, used = [], set()
        for run in runs[:rng.randint(1, 6)]:
            ops = set(range(run[0], run[1] + 1))
            if ops & used:
                continue
            h, w = model.tensor(rules.tiled_tensor(model, run[3])).shape[1:3]
            grid = (rng.randint(1, min(h, 6)), rng.randint(1, min(w, 6)))
            chosen.append((run, grid))
            used |= ops
        plans.append(sorted(chosen))
    return plans


# ---------------------------------------------------------------------------
# The cost model equals the round trip patchify -> bytes -> profile
# ---------------------------------------------------------------------------
def test_network_without_stages_is_model_buffers(small_models, mbv2_144):
    for data in [*small_models.values(), mbv2_144]:
        model = TFLiteModel.from_bytes(data)
        net = ArenaNetwork(model)
        expected = memory_planner.model_buffers(model, memory_planner.merged_scratch_bytes(model))
        assert net.buffers() == expected
        assert net.head() == memory_planner.plan_greedy(expected).head_bytes
        assert net.head() == profile(data).layer_by_layer_peak_bytes


@pytest.mark.parametrize("kernel", KERNELS)
def test_network_head_equals_profile_of_patched_model(small_models, mbv2_144, kernel):
    for name, data in [*small_models.items(), ("mbv2_144", mbv2_144)]:
        model = TFLiteModel.from_bytes(data)
        net = ArenaNetwork(model)
        for chosen in _random_plans(model, 3 if name == "mbv2_144" else 5, seed=hash((name, kernel)) % 1000):
            spans, requests = [], []
            for run, grid in chosen:
                _, span = _stage(model, run, grid, kernel)
                spans.append(span)
                requests.append((model.tensor(run[2]).name, model.tensor(run[3]).name, grid))
            patched_bytes = patchify_stages(data, requests, arena=False)  # the cost model without passes
            prof = profile(patched_bytes, kernel=kernel)
            assert net.head(spans) == prof.patched_peak_bytes, (name, chosen)
            # profile() asks the cost model too: check it against the TFLM replica on the patched file itself
            patched = TFLiteModel.from_bytes(patched_bytes)
            replica = memory_planner.model_buffers(
                patched, memory_planner.merged_scratch_bytes(patched, stage_scratch_bytes(patched, kernel)))
            assert net.buffers(spans) == replica, (name, chosen)
            assert net.head(spans) == memory_planner.plan_greedy(replica).head_bytes, (name, chosen)
            assert net.head(spans, include_input=False) == prof.patched_peak_bytes_without_input, (name, chosen)
            live = net.live_bytes(spans)
            for span in spans:  # the stage op's live set, as the DP sees it
                index = span.first_op - sum(s.last_op - s.first_op for s in spans if s.last_op < span.first_op)
                assert live[index] == net.stage_live_bytes(span.first_op, span.last_op, span.scratch)


# ---------------------------------------------------------------------------
# The rules
# ---------------------------------------------------------------------------
def test_patchable_runs_are_the_runs_plan_stage_accepts(residual, pooling):
    for data in (residual, pooling):
        model = TFLiteModel.from_bytes(data)
        runs = rules.patchable_runs(model)
        accepted = set()
        for i in range(model.num_ops):
            for j in range(i, model.num_ops):
                ops = list(range(i, j + 1))
                acts = rules._activation_inputs(model, i)
                if len(set(acts)) != 1:
                    continue
                failure = rules.run_failure(model, ops, acts[0])
                if failure is None:
                    accepted.add((i, j, acts[0], model.op_outputs(j)[0]))
                    plan_stage(model, ops, acts[0], model.op_outputs(j)[0], (1, 1))  # does not raise
        assert set(runs) == accepted


def test_one_op_list():
    from keras_patch.graph.patchify import SUPPORTED_STAGE_OPS
    from keras_patch.planner.schedule import STAGE_OP_NAMES
    from keras_patch.stage import options as o

    assert SUPPORTED_STAGE_OPS is rules.SUPPORTED_STAGE_OPS
    assert {code: name for name, code in SUPPORTED_STAGE_OPS.items()} == o.LAYER_OP_NAMES
    assert STAGE_OP_NAMES == set(o.LAYER_OP_NAMES.values())


# ---------------------------------------------------------------------------
# The planner equals exhaustive search on small graphs
# ---------------------------------------------------------------------------
GRIDS = [(2, 2), (1, 3), (3, 3), (4, 2)]


def exhaustive(data: bytes, max_mac_overhead: float, grids, kernel="portable"):
    """(head, head without input, extra MACs) of the best plan over every set of disjoint runs x grids."""
    model = TFLiteModel.from_bytes(data)
    net = ArenaNetwork(model)
    macs = sum(op_macs(model, op) for op in range(model.num_ops))
    budget = int(np.floor(max_mac_overhead * macs)) - macs
    options = []
    for run in rules.patchable_runs(model):
        try:  # a run whose constants fail the kernel's Prepare is no plan (patchify_stages refuses it)
            plan_stage(model, list(range(run[0], run[1] + 1)), run[2], run[3], (1, 1))
        except KerasPatchError:
            continue
        h, w = model.tensor(rules.tiled_tensor(model, run[3])).shape[1:3]
        for grid in grids:
            if grid[0] <= h and grid[1] <= w:
                opts, span = _stage(model, run, grid, kernel)
                full, patched = geometry.stage_macs(opts)
                if patched - full <= budget:
                    options.append((run[0], run[1], span, patched - full))
    options.sort(key=lambda o: o[0])
    best = (net.head(), net.head(include_input=False), 0)
    count = 0

    def walk(start_index, after, spans, extra):
        nonlocal best, count
        for k in range(start_index, len(options)):
            first, last, span, cost = options[k]
            if first <= after or extra + cost > budget:
                continue
            chosen = spans + [span]
            count += 1
            value = (net.head(chosen), net.head(chosen, include_input=False), extra + cost)
            best = min(best, value)
            walk(k + 1, last, chosen, extra + cost)

    walk(0, -1, [], 0)
    return best, count


def _check_against_exhaustive(data, overhead, grids, kernel="portable"):
    (head, head_without_input, extra), count = exhaustive(data, overhead, grids, kernel)
    p = plan(data, max_mac_overhead=overhead, grids=grids, kernel=kernel, arena=False)  # as exhaustive lays out
    got = (p.peak_bytes, p.peak_bytes_without_input)
    assert p.peak_bytes <= p.layer_by_layer_peak_bytes
    assert p.mac_overhead <= overhead
    return got, (head, head_without_input), count, p


@pytest.mark.parametrize("overhead, kernel", [(1.05, "portable"), (1.3, "portable"), (1.3, "cmsis_nn")])
def test_planner_equals_exhaustive_search_on_pooling_model(pooling, overhead, kernel):
    got, best, count, _ = _check_against_exhaustive(pooling, overhead, GRIDS, kernel)
    assert count > 10
    assert got == best


@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
@given(spec=kst.stage_specs(min_size=8, max_size=24, max_channels=6, max_blocks=2),
       overhead=st.sampled_from([1.1, 1.5, 3.0]))
def test_planner_equals_exhaustive_search_on_random_graphs(spec, overhead):
    """Measured on 40 random graphs of 4 to 11 ops (up to 141,406 plans each): no gap."""
    data = model_zoo.to_int8_tflite(kst.build_model(spec), num_samples=2)
    model = TFLiteModel.from_bytes(data)
    if model.num_ops > 10:
        return  # exhaustive search grows exponentially (11 ops: ~125,000 plans)
    try:
        got, best, count, p = _check_against_exhaustive(data, overhead, GRIDS)
    except PlanError as e:
        assert "No run" in str(e)
        return
    assert got == best, (spec, got, best)
    assert profile(p.apply(data)).patched_peak_bytes == p.peak_bytes


# ---------------------------------------------------------------------------
# Predictions, never worse, SRAM mode, JSON, errors
# ---------------------------------------------------------------------------
@pytest.mark.parametrize("kernel", KERNELS)
def test_predicted_head_equals_profile_of_applied_plan(residual, kernel):
    for overhead in (1.05, 1.2, 2.0):
        p = plan(residual, max_mac_overhead=overhead, kernel=kernel)
        assert not p.is_empty and p.mac_overhead <= overhead
        prof = profile(p.apply(residual), kernel=kernel)
        assert (prof.patched_peak_bytes, prof.patched_peak_bytes_without_input) == \
            (p.peak_bytes, p.peak_bytes_without_input)
        assert (prof.macs, prof.patched_macs) == (p.macs, p.patched_macs)
        assert prof.layer_by_layer_peak_bytes == p.layer_by_layer_peak_bytes
        planned = [s for s in prof.stages if s.num_layers > 1]  # not the passes' one-layer stages
        assert len(planned) == len(p.stages)
        assert [s.patch_arena_bytes for s in planned] == [s.patch_arena_bytes for s in p.stages]
        assert p.peak_bytes < p.layer_by_layer_peak_bytes


def _concat_head_model():
    """The head is at a CONCATENATION of two branches; only the convs after it can be patched."""
    import keras

    keras.utils.set_random_seed(0)
    inputs = keras.Input((16, 16, 3))
    a = keras.layers.Conv2D(8, 1, name="a")(inputs)
    b = keras.layers.Conv2D(8, 1, name="b")(inputs)
    x = keras.layers.Concatenate(name="cat")([a, b])
    x = keras.layers.Conv2D(4, 3, strides=2, name="c1")(x)
    x = keras.layers.Conv2D(4, 3, name="c2")(x)
    outputs = keras.layers.Dense(2, name="logits")(keras.layers.GlobalAveragePooling2D(name="pool")(x))
    return keras.Model(inputs, outputs)


def test_plan_is_never_worse_than_layer_by_layer():
    data = model_zoo.to_int8_tflite(_concat_head_model())
    p = plan(data, max_mac_overhead=3.0, arena=False)  # no pass: the file stays as it is
    assert p.is_empty and p.peak_bytes == p.layer_by_layer_peak_bytes == profile(data).layer_by_layer_peak_bytes
    assert "lowers the arena head" in p.message and p.message in p.table()
    assert p.apply(data) == data and p.stage_requests() == []
    assert p.patched_macs == p.macs and p.mac_overhead == 1.0
    assert PatchPlan.from_json(p.to_json()) == p


def test_sram_mode_gives_fewest_macs_that_fit(residual):
    lowest = plan(residual, max_mac_overhead=2.0)
    loose = plan(residual, max_mac_overhead=2.0, sram_bytes=lowest.layer_by_layer_peak_bytes - 16)
    tight = plan(residual, max_mac_overhead=2.0, sram_bytes=lowest.peak_bytes)
    assert loose.peak_bytes <= lowest.layer_by_layer_peak_bytes - 16
    assert tight.peak_bytes <= lowest.peak_bytes
    assert loose.patched_macs <= tight.patched_macs <= lowest.patched_macs
    assert profile(loose.apply(residual)).patched_peak_bytes == loose.peak_bytes
    fits = plan(residual, sram_bytes=lowest.layer_by_layer_peak_bytes)
    assert fits.is_empty and "fits" in fits.message
    with pytest.raises(PlanError, match=f"lowest arena head reachable is {lowest.peak_bytes:,} B"):
        plan(residual, max_mac_overhead=2.0, sram_bytes=lowest.peak_bytes - 1)


def test_json_round_trip(residual, tmp_path):
    p = plan(residual, max_mac_overhead=1.2)
    again = PatchPlan.from_json(p.to_json())
    assert again == p
    assert isinstance(again.stages[0], PlannedStage) and again.stages[0].grid == p.stages[0].grid
    assert again.apply(residual) == p.apply(residual)
    assert json.loads(p.to_json())["stages"][0]["grid"] == list(p.stages[0].grid)
    table = p.table()
    assert p.stages[0].end_layer in table and "MAC overhead" in table
    broken = json.loads(p.to_json())
    del broken["peak_bytes"]
    with pytest.raises(KerasPatchError, match="missing fields \\['peak_bytes'\\]"):
        PatchPlan.from_dict(broken)
    with pytest.raises(KerasPatchError, match="not valid JSON"):
        PatchPlan.from_json("{")


@pytest.mark.parametrize("overhead", [0.99, float("nan"), float("inf"), -1, "1.1"])
def test_bad_overhead_is_a_plan_error(residual, overhead):
    with pytest.raises(PlanError, match="max_mac_overhead"):
        plan(residual, max_mac_overhead=overhead)


def test_no_patchable_run_is_a_plan_error():
    data = model_zoo.to_int8_tflite(model_zoo.tiny_scale_softmax_model())
    with pytest.raises(PlanError, match="No run"):
        plan(data)


def test_patched_model_is_refused(residual):
    p = plan(residual)
    with pytest.raises(UnsupportedModelError, match="already patched"):
        plan(p.apply(residual))


def test_progress_wraps_the_search(residual):
    seen = []

    def progress(items):
        items = list(items)
        seen.append(len(items))
        return items

    assert plan(residual, progress=progress).stages == plan(residual).stages
    assert seen and seen[0] > 0


def test_top_level_names():
    assert keras_patch.plan is plan and keras_patch.PatchPlan is PatchPlan
    assert keras_patch.PlanError is PlanError and issubclass(PlanError, KerasPatchError)


def test_keras_model_and_grids(residual):
    model = model_zoo.residual_model()
    p = plan(model, max_mac_overhead=1.2, grids=["2x2", (4, 4)])
    same = plan(residual, max_mac_overhead=1.2, grids=[(2, 2), (4, 4)])  # the same layers, converted apart

    def summary(q):
        return q.peak_bytes, q.peak_bytes_without_input, q.patched_macs, [(s.first_op, s.last_op, s.grid) for s in q.stages]

    assert summary(p) == summary(same) and not p.is_empty
    assert {s.grid for s in p.stages} <= {(2, 2), (4, 4)}
    staged = keras_patch.wrap_stage(model, until="b1_project_bn", grid=(2, 2))
    with pytest.raises(PlanError, match="already has PatchStage layers"):
        plan(staged)


def test_docstring_examples_run():
    import doctest

    from keras_patch.arena import network
    from keras_patch.planner import plan as plan_module
    from keras_patch.planner import search

    finder = doctest.DocTestFinder()
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS)
    examples = 0
    for module in (plan_module, rules, network, search):
        for test in finder.find(module):
            examples += sum(not ex.options.get(doctest.SKIP) for ex in test.examples)
            runner.run(test)
    assert runner.summarize(verbose=False).failed == 0 and examples >= 5
