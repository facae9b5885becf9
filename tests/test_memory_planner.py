"""keras_patch.arena.memory_planner against hand-derived layouts and against TFLM.

The model tests convert Keras models to int8 `.tflite`, predict the TFLM
arena head with `arena_head_bytes` and measure it with the `tflite_micro`
wheel (`measure_tflm_arena`); the two must be equal.
"""

import os

os.environ["TF_CPP_MIN_LOG_LEVEL"] = "3"

import numpy as np  # noqa: E402
import pytest  # noqa: E402
from ai_edge_litert import schema_py_generated as schema  # noqa: E402
from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

import model_zoo  # noqa: E402
from keras_patch.errors import UnsupportedModelError  # noqa: E402
from keras_patch.arena.memory_planner import (  # noqa: E402
    NEVER_SET,
    PlannedBuffer,
    align_up,
    arena_head_bytes,
    builtin_scratch_bytes,
    merged_scratch_bytes,
    model_buffers,
    plan_greedy,
)
from keras_patch.graph.tflite_model import TFLiteModel  # noqa: E402
from keras_patch.arena.tflm_arena import (  # noqa: E402
    TFLMError,
    measure_tflm_arena,
    parse_allocation_report,
)


def B(size, first, last, name="", offline=None):
    return PlannedBuffer(size=size, first_op=first, last_op=last, name=name, offline_offset=offline)


# ----------------------------------------------------------------------------
# (a) GreedyMemoryPlanner on hand-made buffer sets
# ----------------------------------------------------------------------------
def test_plan_empty():
    plan = plan_greedy([])
    assert plan.offsets == [] and plan.head_bytes == 0


def test_plan_disjoint_lifetimes_share_offset_zero():
    plan = plan_greedy([B(10, 0, 1), B(20, 2, 3)], alignment=1)
    assert plan.offsets == [0, 0]
    assert plan.head_bytes == 20


def test_plan_tflm_medium_case():
    # Largest first: 50@0, 40@0 (disjoint from 50), 30 above 40, 20 above 50.
    plan = plan_greedy(
        [B(10, 0, 1), B(20, 1, 2), B(30, 2, 3), B(40, 3, 4), B(50, 0, 1)], alignment=1
    )
    assert plan.offsets == [50, 70, 40, 0, 0]
    assert plan.head_bytes == 90


def test_plan_overlap_case():
    plan = plan_greedy([B(100, 0, 1), B(50, 2, 3), B(20, 1, 2)], alignment=1)
    assert plan.offsets == [0, 0, 100]
    assert plan.head_bytes == 120


def test_plan_equal_sizes_last_added_goes_first():
    # ReverseSortInPlace is stable over the buffers in *reverse* insertion
    # order, so of two equal sizes the later one is placed (at 0) first.
    plan = plan_greedy([B(16, 0, 1, "a"), B(16, 0, 1, "b")])
    assert plan.offsets == [16, 0]
    assert [b.offset for b in plan.buffers] == [16, 0]
    assert plan.head_bytes == 32


def test_plan_fills_gap_below_a_live_buffer():
    # 64@0 (t0), 48 (t0..1) must go above it at 64; at t1 the space below 64
    # is free: 32 fits at 0, then 16 in the remaining gap at 32.
    plan = plan_greedy([B(64, 0, 0), B(48, 0, 1), B(32, 1, 1), B(16, 1, 1)])
    assert plan.offsets == [0, 64, 0, 32]
    assert plan.head_bytes == 112


def test_plan_gap_too_small_is_skipped():
    # Placement order 64 (id0), then the two 48s with the later one (id3)
    # first: id3 (t1) at 0 beside id0 (t0); id1 (t0..1) on top at 64.  At t1
    # only 48..64 is free below id1: too small for 32, which goes to 112.
    plan = plan_greedy([B(64, 0, 0), B(48, 0, 1), B(32, 1, 1), B(48, 1, 1)])
    assert plan.offsets == [0, 64, 112, 0]
    assert plan.head_bytes == 144


def test_plan_rounds_sizes_up_to_16():
    plan = plan_greedy([B(10, 0, 1), B(20, 0, 1)])
    # aligned sizes 16 and 32: the 32 goes first at 0, the 16 above it.
    assert plan.offsets == [32, 0]
    assert plan.head_bytes == 48
    assert align_up(0) == 0 and align_up(1) == 16 and align_up(16) == 16 and align_up(17) == 32


def test_plan_offline_offsets_are_kept_and_placed_first():
    plan = plan_greedy([B(10, 0, 1, offline=100), B(50, 0, 1)], alignment=1)
    assert plan.offsets == [100, 0]
    assert plan.head_bytes == 110


def test_plan_ignores_lifetimes_that_touch_only_different_ops():
    # last_op == first_op of the next buffer is an overlap (both alive at op 1).
    plan = plan_greedy([B(32, 0, 1), B(32, 1, 2)])
    assert sorted(plan.offsets) == [0, 32]
    plan = plan_greedy([B(32, 0, 1), B(32, 2, 3)])
    assert plan.offsets == [0, 0]


@settings(max_examples=150, deadline=None)
@given(
    st.lists(
        st.tuples(st.integers(1, 600), st.integers(-2, 8), st.integers(0, 4)),
        min_size=1,
        max_size=25,
    )
)
def test_plan_never_overlaps_live_buffers(specs):
    buffers = [B(size, first, first + length) for size, first, length in specs]
    plan = plan_greedy(buffers)
    sizes = [align_up(b.size) for b in buffers]
    assert all(o % 16 == 0 and o >= 0 for o in plan.offsets)
    assert plan.head_bytes == max(o + s for o, s in zip(plan.offsets, sizes))
    assert plan.head_bytes <= sum(sizes)
    for i, a in enumerate(buffers):
        for j in range(i + 1, len(buffers)):
            b = buffers[j]
            if a.first_op > b.last_op or b.first_op > a.last_op:
                continue
            oa, ob = plan.offsets[i], plan.offsets[j]
            assert oa + sizes[i] <= ob or ob + sizes[j] <= oa, (i, j)


# ----------------------------------------------------------------------------
# AllocationInfoBuilder lifetimes on a hand-built graph
# ----------------------------------------------------------------------------
def _tensor(name, shape, type_=schema.TensorType.INT8, buffer=0, variable=False):
    t = schema.TensorT()
    t.name = name
    t.shape = np.array(shape, np.int32)
    t.type = type_
    t.buffer = buffer
    t.isVariable = variable
    return t


def _op(inputs, outputs):
    op = schema.OperatorT()
    op.opcodeIndex = 0
    op.inputs = np.array(inputs, np.int32)
    op.outputs = np.array(outputs, np.int32)
    return op


def hand_built_model():
    """Tensors exercising every AllocationInfoBuilder rule.

    0 input -> op0 (+ const 1) -> 2 -> op1 -> 3, 4 (4 never consumed)
    op2(3, -1, 5 variable, 9 never produced) -> 7 (output); 6 is empty,
    8 an unused graph input, 10 referenced by nothing, 11 an int32 tensor.
    """
    model = schema.ModelT()
    model.version = 3
    code = schema.OperatorCodeT()
    code.builtinCode = code.deprecatedBuiltinCode = schema.BuiltinOperator.ADD
    code.version = 1
    model.operatorCodes = [code]
    empty, const = schema.BufferT(), schema.BufferT()
    const.data = np.ones(2, np.uint8)
    model.buffers = [empty, const]
    sg = schema.SubGraphT()
    sg.tensors = [
        _tensor("in", [1, 4, 4, 2]),
        _tensor("const", [2], buffer=1),
        _tensor("t2", [1, 4, 4, 2]),
        _tensor("t3", [1, 4, 4, 2]),
        _tensor("side", [1, 2, 2, 2]),
        _tensor("var", [8], variable=True),
        _tensor("empty", [0, 3]),
        _tensor("out", [1, 4, 4, 2]),
        _tensor("unused_in", [5]),
        _tensor("orphan", [3]),
        _tensor("dangling", [7]),
        _tensor("i32", [1, 3], type_=schema.TensorType.INT32),
    ]
    sg.operators = [_op([0, 1], [2]), _op([2, 2], [3, 4, 11]), _op([3, -1, 5, 9, 6], [7])]
    sg.inputs = np.array([0, 8], np.int32)
    sg.outputs = np.array([7], np.int32)
    model.subgraphs = [sg]
    return TFLiteModel(model)


def test_model_buffers_lifetimes_follow_allocation_info_builder():
    buffers = model_buffers(hand_built_model(), {1: [100, 4]})
    got = [(b.name, b.size, b.first_op, b.last_op) for b in buffers]
    assert got == [
        ("in", 32, -1, 0),  # graph input: created before op 0
        ("t2", 32, 0, 1),
        ("t3", 32, 1, 2),
        ("side", 8, 1, 1),  # produced, never consumed: its producer only
        ("out", 32, 2, 2),  # graph output: to the end of the graph
        ("unused_in", 5, -1, -1),
        ("orphan", 3, NEVER_SET, 2),  # consumed, never created
        ("dangling", 7, NEVER_SET, NEVER_SET),
        ("i32", 12, 1, 1),
        ("scratch:op1:0", 100, 1, 1),  # scratch: after all tensors
        ("scratch:op1:1", 4, 1, 1),
    ]
    # const (constant data), var (variable: tail) and empty (0 bytes) are
    # not planned.


def test_model_buffers_rejects_bad_scratch_keys():
    with pytest.raises(ValueError, match="not an op"):
        model_buffers(hand_built_model(), {7: [16]})


def test_builtin_scratch_for_reduce_and_int4_conv():
    model = hand_built_model()
    assert builtin_scratch_bytes(model) == {}
    fb = model.model
    mean = schema.OperatorCodeT()
    mean.builtinCode = mean.deprecatedBuiltinCode = schema.BuiltinOperator.MEAN
    mean.version = 2
    fb.operatorCodes.append(mean)
    fb.buffers.append(schema.BufferT())
    fb.buffers[-1].data = np.array([1, 0, 0, 0, 2, 0, 0, 0], np.uint8)
    fb.subgraphs[0].tensors.append(_tensor("axis", [2], schema.TensorType.INT32, buffer=2))
    # MEAN over H, W of t3 (1x4x4x2) -> out: int8 accumulator 4 * 2 elements,
    # then 4 * rank(4) and 4 * num_axes(2).
    fb.subgraphs[0].operators[2].opcodeIndex = 1
    fb.subgraphs[0].operators[2].inputs = np.array([3, 12], np.int32)
    fb.subgraphs[0].tensors[7].shape = np.array([1, 2], np.int32)
    assert builtin_scratch_bytes(model) == {2: [8, 16, 8]}
    # A caller-supplied entry replaces the built-in estimate of that op.
    assert merged_scratch_bytes(model, {2: [1]}) == {(0, 2): [1]}
    assert merged_scratch_bytes(model, {0: [64]}) == {(0, 0): [64], (0, 2): [8, 16, 8]}


def test_builtin_scratch_unknown_sizes_raise():
    model = hand_built_model()
    lstm = schema.OperatorCodeT()
    op = schema.BuiltinOperator.UNIDIRECTIONAL_SEQUENCE_LSTM
    lstm.builtinCode = op
    lstm.deprecatedBuiltinCode = min(op, 127)
    model.model.operatorCodes.append(lstm)
    model.model.subgraphs[0].operators[1].opcodeIndex = 1
    with pytest.raises(NotImplementedError, match="UNIDIRECTIONAL_SEQUENCE_LSTM"):
        builtin_scratch_bytes(model)
    # ...unless the caller knows them.
    assert arena_head_bytes(model, {1: [64]}) > 0


def test_parse_allocation_report():
    text = (
        "noise\n"
        "[RecordingMicroAllocator] Arena allocation total 4512 bytes\n"
        "[RecordingMicroAllocator] Arena allocation head 2720 bytes\n"
        "[RecordingMicroAllocator] Arena allocation tail 1792 bytes\n"
        "[RecordingMicroAllocator] 'Persistent buffer data' used 472 bytes with alignment "
        "overhead (requested 452 bytes for 12 allocations)\n"
    )
    report = parse_allocation_report(text)
    assert (report.head_bytes, report.tail_bytes, report.used_bytes) == (2720, 1792, 4512)
    assert report.allocations == {"Persistent buffer data": (472, 452, 12)}
    assert report.report == text
    with pytest.raises(TFLMError):
        parse_allocation_report("nothing here")


# ----------------------------------------------------------------------------
# (b) prediction == TFLM measurement
# ----------------------------------------------------------------------------
MODELS = {
    "tiny_conv": lambda: model_zoo.to_int8_tflite(model_zoo.tiny_conv_model()),
    "tiny_conv_float_io": lambda: model_zoo.to_int8_tflite(
        model_zoo.tiny_conv_model(), int8_io=False
    ),
    "residual": lambda: model_zoo.to_int8_tflite(model_zoo.residual_model()),
    "pooling": lambda: model_zoo.to_int8_tflite(model_zoo.pooling_model()),
    "mixed_ops": lambda: model_zoo.to_int8_tflite(model_zoo.mixed_ops_model()),
    "branch_concat": lambda: model_zoo.to_int8_tflite(model_zoo.branch_concat_model()),
    "channel_mean": lambda: model_zoo.to_int8_tflite(model_zoo.channel_mean_model()),
    "mobilenet_v2_0.35_144": lambda: model_zoo.to_int8_tflite(model_zoo.mobilenet_v2(0.35, 144)),
}


@pytest.fixture(scope="module")
def zoo():
    """name -> (tflite bytes, TFLMArenaReport), converted and measured once."""
    cache = {}

    def get(name):
        if name not in cache:
            data = MODELS[name]()
            cache[name] = (data, measure_tflm_arena(data))
        return cache[name]

    return get


@pytest.mark.parametrize("name", list(MODELS))
def test_prediction_equals_tflm_head(zoo, name):
    data, measured = zoo(name)
    model = TFLiteModel.from_bytes(data)
    predicted = arena_head_bytes(model)
    assert abs(predicted - measured.head_bytes) <= 0.02 * measured.head_bytes
    assert predicted == measured.head_bytes, measured.report
    assert measured.tail_bytes > 0
    assert measured.used_bytes == measured.head_bytes + measured.tail_bytes


def test_tie_breaks_matter_and_are_right(zoo):
    # Equal-sized buffers placed in insertion order (instead of TFLM's
    # last-added-first) would give a different head than TFLM measures.
    data, measured = zoo("branch_concat")
    model = TFLiteModel.from_bytes(data)
    buffers = model_buffers(model, merged_scratch_bytes(model))
    assert plan_greedy(buffers).head_bytes == measured.head_bytes
    assert plan_greedy(buffers[::-1]).head_bytes != measured.head_bytes


def test_builtin_scratch_matters_and_is_right(zoo):
    # The channel MEAN's int32 accumulator (4 * 32 * 32 bytes) sets the peak.
    data, measured = zoo("channel_mean")
    model = TFLiteModel.from_bytes(data)
    scratch = builtin_scratch_bytes(model)
    assert scratch[1] == [4 * 32 * 32, 4 * 4, 4 * 1]
    assert arena_head_bytes(model) == measured.head_bytes
    assert plan_greedy(model_buffers(model)).head_bytes < measured.head_bytes


def test_models_cover_the_int8_cnn_ops(zoo):
    ops = set()
    for name in MODELS:
        model = TFLiteModel.from_bytes(zoo(name)[0])
        ops.update(model.op_type(i) for i in range(model.num_ops))
    expected = {
        "CONV_2D", "DEPTHWISE_CONV_2D", "ADD", "PAD", "MEAN", "FULLY_CONNECTED",
        "SOFTMAX", "RESHAPE", "AVERAGE_POOL_2D", "MAX_POOL_2D", "QUANTIZE",
        "DEQUANTIZE", "MUL", "CONCATENATION", "HARD_SWISH", "LOGISTIC",
    }
    assert expected <= ops, expected - ops


def test_float_io_model_starts_with_quantize(zoo):
    model = TFLiteModel.from_bytes(zoo("tiny_conv_float_io")[0])
    assert model.op_type(0) == "QUANTIZE"
    assert model.op_type(model.num_ops - 1) == "DEQUANTIZE"


def test_residual_model_has_add_with_long_lived_skip(zoo):
    model = TFLiteModel.from_bytes(zoo("residual")[0])
    adds = [i for i in range(model.num_ops) if model.op_type(i) == "ADD"]
    assert len(adds) >= 3
    buffers = model_buffers(model, builtin_scratch_bytes(model))
    # each skip input lives across a whole inverted residual block
    assert max(b.last_op - b.first_op for b in buffers) >= 3


def test_scratch_bytes_of_custom_ops_are_planned(zoo):
    data, measured = zoo("tiny_conv")
    model = TFLiteModel.from_bytes(data)
    # A huge scratch buffer in op 0 must sit beside op 0's input and output.
    head = arena_head_bytes(model, {0: [100_000]})
    sizes = [align_up(model.tensor(t).num_bytes) for t in model.op_inputs(0)[:1] + model.op_outputs(0)]
    assert head == align_up(100_000) + sum(sizes)
    assert head > measured.head_bytes


# ----------------------------------------------------------------------------
# measurement errors
# ----------------------------------------------------------------------------
def test_custom_ops_are_rejected_before_running_tflm(zoo):
    model = TFLiteModel.from_bytes(zoo("tiny_conv")[0])
    index = model.opcode_index(schema.BuiltinOperator.CUSTOM, custom_code="KP_PATCH_STAGE")
    model.operator(1).opcodeIndex = index
    with pytest.raises(UnsupportedModelError, match="KP_PATCH_STAGE"):
        measure_tflm_arena(model.to_bytes())


def test_tflm_abort_becomes_tflm_error():
    data = model_zoo.to_int8_tflite(model_zoo.tiny_scale_softmax_model())
    with pytest.raises(TFLMError) as info:
        measure_tflm_arena(data)
    assert info.value.returncode is not None and info.value.returncode != 0


def test_arena_too_small_is_an_error(zoo):
    data, measured = zoo("tiny_conv")
    with pytest.raises(TFLMError, match="arena 1024 bytes"):
        measure_tflm_arena(data, arena_size=1024)
    exact = measure_tflm_arena(data, arena_size=measured.used_bytes + 64)
    assert exact.head_bytes == measured.head_bytes
