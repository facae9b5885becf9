"""Reading a `.tflite` costs time and memory proportional to its size.

Flatbuffer offsets may point many times at the same table: a 24 KB file whose
subgraph vector names one subgraph 3000 times, whose operator vector names one
operator 3000 times, describes nine million operators.  Unpacking it with the
object API took minutes and 1.7 GB in every command; `TFLiteModel.from_bytes`
now counts the tree through the accessors first and refuses it.
"""

import os
import tracemalloc

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import flatbuffers
import numpy as np
import pytest
from ai_edge_litert import schema_py_generated as schema

import keras_patch
from keras_patch.cli import main
from keras_patch.errors import InvalidModelError
from keras_patch.graph.tflite_model import TFLiteModel, check_unpack_cost

REFUSED = "reuse the same tables"


def _int32_vector(builder, values):
    builder.StartVector(4, len(values), 4)
    for v in reversed(values):
        builder.PrependInt32(v)
    return builder.EndVector()


def _offset_vector(builder, offset, count):
    """A vector of `count` offsets, all to the same table."""
    builder.StartVector(4, count, 4)
    for _ in range(count):
        builder.PrependUOffsetTRelative(offset)
    return builder.EndVector()


def crafted_model(subgraphs=1, operators=1, tensor_refs=2, shape_rank=2) -> bytes:
    """A RELU model whose vectors repeat one offset: `subgraphs` x `operators` ops.

    With every count at its default this is an ordinary, valid one-op model.
    `tensor_refs` > 2 repeats the second tensor (whose shape has `shape_rank`
    dimensions) in the tensor vector.
    """
    b = flatbuffers.Builder(1024)
    tensors = []
    for index, name in enumerate((b"in", b"out")):
        shape = _int32_vector(b, [1] * (shape_rank - 1) + [4] if index else [1, 4])
        name_offset = b.CreateString(name)
        schema.TensorStart(b)
        schema.TensorAddShape(b, shape)
        schema.TensorAddType(b, schema.TensorType.FLOAT32)
        schema.TensorAddBuffer(b, 0)
        schema.TensorAddName(b, name_offset)
        tensors.append(schema.TensorEnd(b))
    op_inputs, op_outputs = _int32_vector(b, [0]), _int32_vector(b, [1])
    schema.OperatorStart(b)
    schema.OperatorAddOpcodeIndex(b, 0)
    schema.OperatorAddInputs(b, op_inputs)
    schema.OperatorAddOutputs(b, op_outputs)
    operator = schema.OperatorEnd(b)

    b.StartVector(4, tensor_refs, 4)
    for _ in range(tensor_refs - 1):
        b.PrependUOffsetTRelative(tensors[1])
    b.PrependUOffsetTRelative(tensors[0])
    tensor_vector = b.EndVector()
    operator_vector = _offset_vector(b, operator, operators)
    sg_inputs, sg_outputs = _int32_vector(b, [0]), _int32_vector(b, [1])
    schema.SubGraphStart(b)
    schema.SubGraphAddTensors(b, tensor_vector)
    schema.SubGraphAddOperators(b, operator_vector)
    schema.SubGraphAddInputs(b, sg_inputs)
    schema.SubGraphAddOutputs(b, sg_outputs)
    subgraph = schema.SubGraphEnd(b)
    subgraph_vector = _offset_vector(b, subgraph, subgraphs)

    schema.OperatorCodeStart(b)
    schema.OperatorCodeAddBuiltinCode(b, schema.BuiltinOperator.RELU)
    schema.OperatorCodeAddDeprecatedBuiltinCode(b, schema.BuiltinOperator.RELU)
    schema.OperatorCodeAddVersion(b, 1)
    opcode = schema.OperatorCodeEnd(b)
    opcode_vector = _offset_vector(b, opcode, 1)
    schema.BufferStart(b)
    buffer = schema.BufferEnd(b)
    buffer_vector = _offset_vector(b, buffer, 1)

    schema.ModelStart(b)
    schema.ModelAddVersion(b, 3)
    schema.ModelAddOperatorCodes(b, opcode_vector)
    schema.ModelAddSubgraphs(b, subgraph_vector)
    schema.ModelAddBuffers(b, buffer_vector)
    b.Finish(schema.ModelEnd(b), file_identifier=b"TFL3")
    return bytes(b.Output())


@pytest.fixture
def no_unpacking(monkeypatch):
    """Fails the test if the object tree of a model is unpacked."""

    def unpack(*args, **kwargs):
        raise AssertionError("ModelT.InitFromPackedBuf ran on a crafted model")

    monkeypatch.setattr(schema.ModelT, "InitFromPackedBuf", unpack)


def test_the_crafted_builder_makes_a_valid_model():
    data = crafted_model()
    model = TFLiteModel.from_bytes(data)
    assert [model.op_type(i) for i in range(model.num_ops)] == ["RELU"]
    assert check_unpack_cost(data) <= len(data)
    x = np.array([[-1.0, 0.5, -2.0, 3.0]], np.float32)
    np.testing.assert_array_equal(keras_patch.run_tflite(data, x)[0], np.maximum(x, 0))


@pytest.mark.parametrize(
    "kwargs, where",
    [
        (dict(subgraphs=3000, operators=3000), ".Subgraphs["),  # nine million operators from 24 KB
        (dict(operators=20_000), ".Subgraphs[0].Operators["),  # 80 KB, 20,000 refs to one operator
        (dict(tensor_refs=4000, shape_rank=4000), ".Subgraphs[0].Tensors["),  # 16M shape entries
    ],
    ids=["subgraphs x operators", "operators", "tensors x shape"],
)
def test_shared_offsets_are_refused_without_unpacking(no_unpacking, kwargs, where):
    data = crafted_model(**kwargs)
    tracemalloc.start()
    try:
        with pytest.raises(InvalidModelError, match=REFUSED) as info:
            TFLiteModel.from_bytes(data)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert f"({len(data):,} bytes)" in str(info.value) and where in str(info.value)
    assert peak < 64 * 2**20


def test_every_entry_point_refuses_the_crafted_model(no_unpacking, tmp_path, capsys):
    data = crafted_model(subgraphs=3000, operators=3000)
    assert len(data) < 30_000
    path = tmp_path / "crafted.tflite"
    path.write_bytes(data)
    calls = [
        lambda: keras_patch.profile(str(path)),
        lambda: keras_patch.patchify(data, 0, (2, 2)),
        lambda: keras_patch.unpatchify(data),
        lambda: keras_patch.run_tflite(data, np.zeros((1, 4), np.float32)),
    ]
    for call in calls:
        with pytest.raises(InvalidModelError, match=REFUSED):
            call()
    for argv in (["profile", str(path)], ["patchify", str(path), str(tmp_path / "out.tflite"), "--split", "0"]):
        code = main(argv)
        out, err = capsys.readouterr()
        assert code == 2 and REFUSED in err and err.count("\n") == 1 and out == ""
    assert sorted(p.name for p in tmp_path.iterdir()) == ["crafted.tflite"]


def test_a_legit_model_counts_at_most_its_size(residual):
    assert 0 < check_unpack_cost(residual) <= len(residual)
    with pytest.raises(InvalidModelError, match=REFUSED):
        check_unpack_cost(residual, budget=len(residual) // 2)
