"""keras_patch.planner.schedule: candidate splits and the best (split, grid)."""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import pytest

import keras_patch
from keras_patch.errors import KerasPatchError, UnsupportedModelError
from keras_patch.planner.schedule import (
    best_schedule,
    candidate_splits,
    evaluate_schedules,
    schedule_rank,
    short_tensor_name,
)
from keras_patch.graph.tflite_model import TFLiteModel


def _ancestors(m: TFLiteModel, op: int) -> set:
    producers, seen, frontier = m.producers(), set(), [op]
    while frontier:
        i = frontier.pop()
        if i not in seen:
            seen.add(i)
            frontier.extend(producers[t] for t in m.op_inputs(i) if t in producers)
    return seen


def _single_exit(m: TFLiteModel, op: int) -> bool:
    stage, consumers = _ancestors(m, op), m.consumers()
    return all(
        t not in m.outputs and all(c in stage for c in consumers.get(t, []))
        for i in stage - {op} for t in m.op_outputs(i)
    )


def test_candidates_are_exactly_the_single_exit_points(residual):
    m = TFLiteModel.from_bytes(residual)
    splits = candidate_splits(residual)
    first_unsupported = next(i for i in range(m.num_ops) if m.op_type(i) not in
                             {"CONV_2D", "DEPTHWISE_CONV_2D", "ADD", "PAD", "MAX_POOL_2D", "AVERAGE_POOL_2D", "RELU", "RELU6"})
    expected = [i for i in range(first_unsupported) if _single_exit(m, i)]
    assert splits == expected
    # Inside a residual block (its input still needed by the ADD) is no split.
    adds = [i for i in range(m.num_ops) if m.op_type(i) == "ADD"]
    assert adds and all(a in splits for a in adds)
    assert (adds[0] - 1) not in splits
    for split in splits:
        keras_patch.patchify(residual, split, (1, 1))  # each one really patches


def test_min_output_size_filters_small_outputs(residual):
    m = TFLiteModel.from_bytes(residual)
    for split in candidate_splits(residual, min_output_size=12):
        assert min(m.tensor(m.op_outputs(split)[0]).shape[1:3]) >= 12
    assert len(candidate_splits(residual, min_output_size=12)) < len(candidate_splits(residual))


def test_best_schedule_is_the_lowest_profiled_head(residual):
    grids = [(2, 2), (4, 4)]
    results = evaluate_schedules(residual, grids)
    assert {r.grid for r in results} == set(grids)
    best = best_schedule(residual, grids)
    assert best.patched_peak_bytes == min(r.patched_peak_bytes for r in results)
    again = keras_patch.profile(keras_patch.patchify(residual, best.split, best.grid))
    assert again.patched_peak_bytes == best.patched_peak_bytes
    assert again.mac_overhead == best.mac_overhead
    assert best.patched_peak_bytes < best.layer_by_layer_peak_bytes
    assert best.rest_peak_bytes <= best.patched_peak_bytes
    # Keras layer names, not the converter's long tensor names.
    assert best.split_layer == short_tensor_name(best.split_name) and "/" not in best.split_layer
    assert "/" not in best.patched_peak_op and "residual_1" not in best.patched_peak_op


def test_best_schedule_costs_in_memory_and_profiles_only_the_winner(residual, monkeypatch):
    """best_schedule ranks with the planner's cost model; each ranked head is the profiled one."""
    from keras_patch.planner import schedule

    grids = [(2, 2), (3, 3), (4, 4)]
    profiled = {(r.split, r.grid): r for r in evaluate_schedules(residual, grids)}
    ranked = schedule.single_stage_heads(residual, grids)
    assert ranked and ranked == sorted(ranked)
    for (head, extra, split), split_again, grid in ranked:
        assert split == split_again and profiled[(split, grid)].patched_peak_bytes == head
    calls = []
    real = schedule.evaluate_schedules
    monkeypatch.setattr(schedule, "evaluate_schedules", lambda *a, **k: calls.append(a) or real(*a, **k))
    best = schedule.best_schedule(residual, grids)
    assert len(calls) == 1
    assert schedule_rank(best) == min(schedule_rank(r) for r in profiled.values() if r.split > 0)
    capped = schedule.best_schedule(residual, grids, max_mac_overhead=1.1)
    assert capped.mac_overhead <= 1.1 and capped.patched_peak_bytes >= best.patched_peak_bytes
    assert schedule.best_schedule(residual, grids, max_mac_overhead=1.0).mac_overhead == 1.0  # 1x1 convs only


def test_grids_larger_than_every_stage_output_are_an_error(residual):
    with pytest.raises(KerasPatchError, match="No split"):
        best_schedule(residual, [(64, 64)])


def test_schedule_fields_are_typed_plain_values(residual):
    (result, *_) = evaluate_schedules(residual, ["2x2"])
    assert result.grid == (2, 2) and len(result.stage_output_shape) == 3 and len(result.receptive_field) == 2
    for value in (*result.grid, *result.stage_output_shape, *result.receptive_field, result.patched_peak_bytes):
        assert type(value) is int


@pytest.mark.parametrize("where", ["from the input", "in the middle"])
def test_an_already_patched_model_is_a_clear_error(residual, where):
    m = TFLiteModel.from_bytes(residual)
    splits = candidate_splits(residual)
    if where == "from the input":
        patched = keras_patch.patchify(residual, splits[-1], (2, 2))
    else:  # a stage after the first split: the schedules from the input could still end before it
        start = m.tensor(m.op_outputs(splits[0])[0]).name
        patched = keras_patch.patchify(residual, splits[-1], (2, 2), start=start)
    for call in (evaluate_schedules, best_schedule):
        with pytest.raises(UnsupportedModelError, match=r"already patched \(1 KP_PATCH_STAGE op: op \d+ .*unpatchify"):
            call(patched, [(2, 2)], splits=[splits[0]])


def test_short_tensor_name():
    assert short_tensor_name("mobilenet_v2_0.35_144_1/block_2_add_1/Add") == "block_2_add"
    assert short_tensor_name("m/block_1_depthwise_relu_1/Relu6;m/block_1_depthwise_BN_1/mul") == "block_1_depthwise_relu"
    assert short_tensor_name("input") == "input"
    # a BN-folded projection: the layer scope, not the converter's "batchnorm" scope
    assert short_tensor_name("mobilenetv2_1.0_224_1/block_3_project_BN_1/batchnorm/add_1;"
                             "mobilenetv2_1.0_224_1/block_3_project_1/convolution") == "block_3_project_BN"
    assert short_tensor_name("m/Conv1_relu_1/Relu6") == "Conv1_relu"
