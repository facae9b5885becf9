"""Reading, inspecting and writing `.tflite` flatbuffers.

A thin layer over the object API of the TFLite schema that ships with
`ai-edge-litert` (no TensorFlow import).  `TFLiteModel` answers the graph
questions the rest of keras-patch asks (which op produces or consumes a
tensor, shapes, quantization, constant data) and writes the model back with
16-byte aligned constant buffers, like the TFLite converter does.

Example:

>>> from keras_patch.graph.tflite_model import TFLiteModel
>>> model = TFLiteModel.from_bytes(open("model.tflite", "rb").read())  # doctest: +SKIP
>>> [model.op_type(i) for i in range(model.num_ops)][:3]  # doctest: +SKIP
['CONV_2D', 'DEPTHWISE_CONV_2D', 'CONV_2D']
"""

from __future__ import annotations

import inspect
import os
from dataclasses import dataclass
from typing import Optional, Sequence, Union

import flatbuffers
import flatbuffers.table
import numpy as np
from ai_edge_litert import schema_py_generated as schema

from keras_patch.errors import InvalidModelError, UnsupportedModelError

FILE_IDENTIFIER = b"TFL3"
BUFFER_ALIGNMENT = 16

BUILTIN_OPERATOR_NAMES = {
    value: name
    for name, value in vars(schema.BuiltinOperator).items()
    if not name.startswith("_")
}
TENSOR_TYPE_NAMES = {
    value: name for name, value in vars(schema.TensorType).items() if not name.startswith("_")
}
_NUMPY_DTYPES = {
    schema.TensorType.FLOAT32: np.float32,
    schema.TensorType.FLOAT16: np.float16,
    schema.TensorType.INT32: np.int32,
    schema.TensorType.UINT8: np.uint8,
    schema.TensorType.INT64: np.int64,
    schema.TensorType.BOOL: np.bool_,
    schema.TensorType.INT16: np.int16,
    schema.TensorType.INT8: np.int8,
    schema.TensorType.FLOAT64: np.float64,
    schema.TensorType.UINT64: np.uint64,
    schema.TensorType.UINT32: np.uint32,
    schema.TensorType.UINT16: np.uint16,
}

ModelSource = Union[bytes, bytearray, memoryview, str, os.PathLike]


@dataclass(frozen=True)
class TensorInfo:
    """What keras-patch needs to know about one tensor of the graph."""

    index: int
    name: str
    shape: tuple
    dtype: type
    scale: np.ndarray  # float32, empty when not quantized
    zero_point: np.ndarray  # int64, empty when not quantized
    quantized_dimension: int
    is_constant: bool
    shape_signature: tuple

    @property
    def num_bytes(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) * np.dtype(self.dtype).itemsize

    @property
    def is_dynamic(self) -> bool:
        return any(int(d) < 0 for d in self.shape_signature)


def read_model_bytes(source: ModelSource) -> bytes:
    """Returns the bytes of `source`: bytes-like as is, or a path's contents."""
    if isinstance(source, (bytes, bytearray, memoryview)):
        return bytes(source)
    if isinstance(source, (str, os.PathLike)):
        path = os.fspath(source)
        if not os.path.isfile(path):
            raise InvalidModelError(f"No .tflite file at '{path}'.")
        with open(path, "rb") as f:
            return f.read()
    raise TypeError(
        f"Expected .tflite bytes or a path, got {type(source).__name__}."
    )


class _AlignedBufferT(schema.BufferT):
    """A BufferT whose data vector is written 16-byte aligned."""

    def Pack(self, builder):  # noqa: N802 (flatbuffers naming)
        data_offset = None
        if self.data is not None and len(self.data):
            payload = np.ascontiguousarray(self.data, dtype=np.uint8).tobytes()
            builder.StartVector(1, len(payload), BUFFER_ALIGNMENT)
            builder.head = builder.head - len(payload)
            builder.Bytes[builder.head : builder.head + len(payload)] = payload
            data_offset = builder.EndVector()
        schema.BufferStart(builder)
        if data_offset is not None:
            schema.BufferAddData(builder, data_offset)
        schema.BufferAddOffset(builder, self.offset)
        schema.BufferAddSize(builder, self.size)
        return schema.BufferEnd(builder)


class TFLiteModel:
    """A mutable, validated view of a single-subgraph `.tflite` model."""

    def __init__(self, model: schema.ModelT):
        self.model = model
        self._validate()

    # ------------------------------------------------------------------ I/O
    @classmethod
    def from_bytes(cls, source: ModelSource) -> "TFLiteModel":
        """Parses a `.tflite` flatbuffer (bytes or path).

        Raises:
            InvalidModelError: the data is not a complete TFLite flatbuffer,
                or one whose offsets share tables so that unpacking it would
                cost far more than its size (see `check_unpack_cost`).
        """
        data = read_model_bytes(source)
        if len(data) < 8:
            raise InvalidModelError(
                f"Not a .tflite model: {len(data)} bytes is shorter than a flatbuffer header."
            )
        if data[4:8] != FILE_IDENTIFIER:
            raise InvalidModelError(
                f"Not a .tflite model: file identifier is {data[4:8]!r}, expected {FILE_IDENTIFIER!r}."
            )
        root = int.from_bytes(data[0:4], "little")
        if root >= len(data):
            raise InvalidModelError(
                f"Corrupt or truncated .tflite: root table offset {root} is past the end "
                f"of the {len(data)}-byte buffer."
            )
        try:
            check_unpack_cost(data)
            model = schema.ModelT.InitFromPackedBuf(bytearray(data), 0)
        except InvalidModelError:
            raise
        except Exception as e:  # flatbuffers raises IndexError/struct.error/... on garbage
            raise InvalidModelError(
                f"Corrupt or truncated .tflite ({len(data)} bytes): {type(e).__name__}: {e}"
            ) from None
        return cls(model)

    def to_bytes(self) -> bytes:
        """Serializes the model; constant buffers are 16-byte aligned."""
        self.model.buffers = [self._aligned(b) for b in self.model.buffers]
        builder = flatbuffers.Builder(1024 + sum(len(b.data) for b in self.model.buffers if b.data is not None))
        root = self.model.Pack(builder)
        builder.Finish(root, file_identifier=FILE_IDENTIFIER)
        return bytes(builder.Output())

    @staticmethod
    def _aligned(buffer: schema.BufferT) -> schema.BufferT:
        if isinstance(buffer, _AlignedBufferT):
            return buffer
        aligned = _AlignedBufferT()
        aligned.data = buffer.data
        aligned.offset = buffer.offset
        aligned.size = buffer.size
        return aligned

    def _validate(self) -> None:
        m = self.model
        if not m.subgraphs:
            raise InvalidModelError("Corrupt .tflite: the model has no subgraph.")
        buffers = m.buffers or []
        for sg_index, sg in enumerate(m.subgraphs):
            tensors = sg.tensors or []
            for t_index, t in enumerate(tensors):
                if t.buffer is not None and not 0 <= t.buffer < max(len(buffers), 1):
                    raise InvalidModelError(
                        f"Corrupt .tflite: tensor {t_index} of subgraph {sg_index} refers "
                        f"to buffer {t.buffer}, but the model has {len(buffers)} buffers."
                    )
            for op_index, op in enumerate(sg.operators or []):
                if not 0 <= op.opcodeIndex < len(m.operatorCodes or []):
                    raise InvalidModelError(
                        f"Corrupt .tflite: operator {op_index} uses opcode {op.opcodeIndex}, "
                        f"but the model has {len(m.operatorCodes or [])} operator codes."
                    )
                for i in list(int_list(op.inputs)) + list(int_list(op.outputs)):
                    if not -1 <= i < len(tensors):
                        raise InvalidModelError(
                            f"Corrupt .tflite: operator {op_index} refers to tensor {i}, "
                            f"but subgraph {sg_index} has {len(tensors)} tensors."
                        )
            for i in list(int_list(sg.inputs)) + list(int_list(sg.outputs)):
                if not 0 <= i < len(tensors):
                    raise InvalidModelError(
                        f"Corrupt .tflite: subgraph {sg_index} input/output {i} is not a tensor index."
                    )

    # -------------------------------------------------------------- queries
    @property
    def subgraph(self) -> schema.SubGraphT:
        return self.model.subgraphs[0]

    @property
    def num_ops(self) -> int:
        return len(self.subgraph.operators or [])

    @property
    def inputs(self) -> list:
        return [int(i) for i in int_list(self.subgraph.inputs)]

    @property
    def outputs(self) -> list:
        return [int(i) for i in int_list(self.subgraph.outputs)]

    def operator(self, op_index: int) -> schema.OperatorT:
        return self.subgraph.operators[op_index]

    def op_type(self, op_index: int) -> str:
        """Builtin operator name (e.g. 'CONV_2D') or the custom code."""
        return operator_type_name(self.model, self.operator(op_index))

    def op_inputs(self, op_index: int) -> list:
        return [int(i) for i in int_list(self.operator(op_index).inputs)]

    def op_outputs(self, op_index: int) -> list:
        return [int(i) for i in int_list(self.operator(op_index).outputs)]

    def op_label(self, op_index: int) -> str:
        """'op 3 (CONV_2D -> name)' for error messages."""
        outs = self.op_outputs(op_index)
        name = self.tensor(outs[0]).name if outs else "?"
        return f"op {op_index} ({self.op_type(op_index)} -> '{name}')"

    def tensor(self, index: int) -> TensorInfo:
        t = self.subgraph.tensors[index]
        q = t.quantization
        scale = np.asarray(q.scale if q is not None and q.scale is not None else [], np.float32)
        zp = np.asarray(q.zeroPoint if q is not None and q.zeroPoint is not None else [], np.int64)
        shape = tuple(int(d) for d in int_list(t.shape))
        signature = tuple(int(d) for d in int_list(t.shapeSignature)) or shape
        return TensorInfo(
            index=index,
            name=decode_name(t.name),
            shape=shape,
            dtype=_NUMPY_DTYPES.get(t.type, np.uint8),
            scale=scale,
            zero_point=zp,
            quantized_dimension=int(q.quantizedDimension) if q is not None else 0,
            is_constant=self.is_constant(index),
            shape_signature=signature,
        )

    def tensor_type_name(self, index: int) -> str:
        return TENSOR_TYPE_NAMES.get(self.subgraph.tensors[index].type, "?")

    def is_constant(self, index: int) -> bool:
        t = self.subgraph.tensors[index]
        buffers = self.model.buffers or []
        if t.buffer is None or t.buffer <= 0 or t.buffer >= len(buffers):
            return False
        data = buffers[t.buffer].data
        return data is not None and len(data) > 0

    def constant(self, index: int) -> np.ndarray:
        """The constant data of tensor `index` as a shaped numpy array."""
        info = self.tensor(index)
        if not info.is_constant:
            raise UnsupportedModelError(f"Tensor {index} ('{info.name}') has no constant data.")
        raw = np.asarray(self.model.buffers[self.subgraph.tensors[index].buffer].data, np.uint8)
        expected = info.num_bytes
        if raw.size != expected:
            raise InvalidModelError(
                f"Corrupt .tflite: constant tensor {index} ('{info.name}') of shape {info.shape} "
                f"needs {expected} bytes, its buffer holds {raw.size}."
            )
        return raw.view(info.dtype).reshape(info.shape)

    def producers(self) -> dict:
        """tensor index -> index of the op that writes it."""
        result = {}
        for op_index in range(self.num_ops):
            for t in self.op_outputs(op_index):
                result[t] = op_index
        return result

    def consumers(self) -> dict:
        """tensor index -> sorted list of op indices that read it."""
        result: dict = {}
        for op_index in range(self.num_ops):
            for t in self.op_inputs(op_index):
                if t >= 0:
                    result.setdefault(t, []).append(op_index)
        return result

    def find_tensor(self, name: str) -> int:
        matches = [i for i, t in enumerate(self.subgraph.tensors) if decode_name(t.name) == name]
        if not matches:
            raise UnsupportedModelError(f"No tensor named '{name}' in the model.")
        return matches[0]

    # ------------------------------------------------------------ mutation
    def add_outputs(self, tensors: Sequence[int]) -> None:
        """Appends tensors to the model outputs (to inspect intermediates).

        Outputs live to the end, so an offline memory plan the model carries
        (made for the old lifetimes) is dropped.
        """
        from keras_patch.arena.offline_metadata import remove_offline_offsets

        self.subgraph.outputs = np.array(self.outputs + [int(t) for t in tensors], np.int32)
        self.model.signatureDefs = []
        remove_offline_offsets(self)

    def opcode_index(self, builtin: int, custom_code: Optional[str] = None, version: int = 1) -> int:
        """Index of the operator code, added to the model if missing."""
        codes = self.model.operatorCodes
        for i, code in enumerate(codes):
            b = max(int(code.builtinCode), int(code.deprecatedBuiltinCode))
            if b != builtin:
                continue
            if custom_code is None or decode_name(code.customCode) == custom_code:
                return i
        code = schema.OperatorCodeT()
        code.builtinCode = builtin
        code.deprecatedBuiltinCode = min(builtin, 127)
        code.version = version
        if custom_code is not None:
            code.customCode = custom_code
        codes.append(code)
        return len(codes) - 1

    def remove_unused(self) -> dict:
        """Drops tensors no op or graph edge uses, then unused buffers and opcodes.

        Returns the map old tensor index -> new tensor index.
        """
        sg = self.subgraph
        used = set(self.inputs) | set(self.outputs)
        for op_index in range(self.num_ops):
            used.update(t for t in self.op_inputs(op_index) + self.op_outputs(op_index) if t >= 0)
        sg.tensors, remap = _compact(sg.tensors, used)
        for op in sg.operators:
            op.inputs = np.array([remap[int(i)] if i >= 0 else -1 for i in int_list(op.inputs)], np.int32)
            op.outputs = np.array([remap[int(i)] for i in int_list(op.outputs)], np.int32)
            if op.intermediates is not None and len(op.intermediates):
                op.intermediates = np.array(
                    [remap[int(i)] for i in int_list(op.intermediates) if int(i) in remap], np.int32
                )
        sg.inputs = np.array([remap[i] for i in self.inputs], np.int32)
        sg.outputs = np.array([remap[i] for i in self.outputs], np.int32)
        for signature in self.model.signatureDefs or []:
            for tensor_map in list(signature.inputs or []) + list(signature.outputs or []):
                tensor_map.tensorIndex = remap[int(tensor_map.tensorIndex)]
        self._remove_unused_buffers()
        self._remove_unused_opcodes()
        return remap

    def _remove_unused_buffers(self) -> None:
        m = self.model
        used = {0}
        for sg in m.subgraphs:
            used.update(int(t.buffer) for t in sg.tensors)
        for meta in m.metadata or []:
            used.add(int(meta.buffer))
        m.buffers, remap = _compact(m.buffers, used)
        for sg in m.subgraphs:
            for t in sg.tensors:
                t.buffer = remap[int(t.buffer)]
        for meta in m.metadata or []:
            meta.buffer = remap[int(meta.buffer)]

    def _remove_unused_opcodes(self) -> None:
        m = self.model
        used = sorted({int(op.opcodeIndex) for sg in m.subgraphs for op in sg.operators})
        remap = {old: new for new, old in enumerate(used)}
        m.operatorCodes = [m.operatorCodes[i] for i in used]
        for sg in m.subgraphs:
            for op in sg.operators:
                op.opcodeIndex = remap[int(op.opcodeIndex)]


# Union fields of the schema and the enum that names their table type.
_UNION_ENUMS = {
    "BuiltinOptions": schema.BuiltinOptions,
    "BuiltinOptions2": schema.BuiltinOptions2,
    "Details": schema.QuantizationDetails,
    "ArraySegments": schema.SparseIndexVector,
    "ArrayIndices": schema.SparseIndexVector,
}
_UNION_TABLES = {
    enum: {value: getattr(schema, name, None) for name, value in vars(enum).items() if not name.startswith("_")}
    for enum in set(_UNION_ENUMS.values())
}
_TABLE_FIELDS: dict = {}
_SCALAR_FIELDS: set = set()  # (table class, field) seen to hold a number: skipped by the walk
_ITEM_SIZES: dict = {}  # (table class, numeric vector field) -> bytes per element


def _table_fields(cls) -> tuple:
    """(single fields, (vector field, is numeric)) of a generated table class, from its accessors.

    Read from the generated class itself, so fields a newer schema adds are
    walked as well: every accessor without arguments is a field, and a name
    `X` with `XLength` is a vector (numeric when `XAsNumpy` exists).
    """
    fields = _TABLE_FIELDS.get(cls)
    if fields is None:
        names = {n for n in dir(cls) if n[:1].isupper() and callable(getattr(cls, n))}
        vectors = tuple((n, n + "AsNumpy" in names) for n in sorted(names) if n + "Length" in names)
        derived = {v + suffix for v, _ in vectors for suffix in ("Length", "AsNumpy", "IsNone")}
        derived |= {v for v, _ in vectors}
        singles = []
        for n in sorted(names - derived):
            try:
                params = list(inspect.signature(getattr(cls, n)).parameters)
            except (TypeError, ValueError):
                continue
            if params == ["self"]:
                singles.append(n)
        fields = (tuple(singles), vectors)
        _TABLE_FIELDS[cls] = fields
    return fields


def check_unpack_cost(data: bytes, budget: Optional[int] = None) -> int:
    """Refuses a flatbuffer whose object tree is far larger than the file.

    Flatbuffer offsets may point many times at the same table or vector, so a
    few kilobytes can describe millions of operators (a vector of offsets to
    one subgraph, whose operator vector points at one operator, ...).  The
    object API (`ModelT.InitFromPackedBuf`) and everything after it would
    then cost minutes and gigabytes.  This walks the tree through the
    accessors (no unpacking), counting one unit per table, per vector
    element and per byte of numeric vectors and strings, and stops as soon
    as the count passes `budget`: a model without shared offsets counts at
    most its size in bytes, so the walk costs time proportional to the file.
    Measured on 2 shared cores: MobileNetV2 0.35@144 (646 KB) walks in
    17-23 ms against 37-39 ms to unpack; a 24 KB model describing nine
    million operators is refused after 0.14 s.

    Args:
        data: the `.tflite` bytes (identifier already checked).
        budget: the most units allowed; default `2 * len(data) + 4096`.

    Returns:
        The units counted.

    Raises:
        InvalidModelError: the count passed `budget`, naming where.
    """
    limit = 2 * len(data) + 4096 if budget is None else budget
    count = 0
    path: list = []

    def spend(units: int) -> None:
        nonlocal count
        count += units
        if count > limit:
            where = "".join(path) or "the model"
            raise InvalidModelError(
                f"Refusing .tflite ({len(data):,} bytes): its offsets reuse the same tables so that "
                f"reading it means unpacking over {limit:,} objects/bytes (exceeded at {where}); "
                f"a crafted or corrupt model."
            )

    def walk(table) -> None:
        spend(1)
        cls = type(table)
        singles, vectors = _table_fields(cls)
        for name in singles:
            if (cls, name) in _SCALAR_FIELDS:
                continue
            value = getattr(table, name)()
            if isinstance(value, (int, float)):
                _SCALAR_FIELDS.add((cls, name))
            elif isinstance(value, (bytes, bytearray)):
                spend(len(value))
            elif isinstance(value, flatbuffers.table.Table):
                enum = _UNION_ENUMS.get(name)
                kind = _UNION_TABLES.get(enum, {}).get(getattr(table, name + "Type")()) if enum else None
                if kind is not None:
                    union = kind()
                    union.Init(value.Bytes, value.Pos)
                    path.append(f".{name}")
                    walk(union)
                    path.pop()
            elif hasattr(value, "_tab"):
                path.append(f".{name}")
                walk(value)
                path.pop()
        for name, numeric in vectors:
            length = getattr(table, name + "Length")()
            if numeric:
                itemsize = _ITEM_SIZES.get((cls, name))
                if itemsize is None and length:
                    itemsize = getattr(table, name + "AsNumpy")().itemsize
                    _ITEM_SIZES[(cls, name)] = itemsize
                spend(length * (itemsize or 0))
                continue
            spend(length)
            accessor = getattr(table, name)
            for j in range(length):
                item = accessor(j)
                if isinstance(item, (bytes, bytearray)):
                    spend(len(item))
                elif item is not None:
                    path.append(f".{name}[{j}]")
                    walk(item)
                    path.pop()

    walk(schema.Model.GetRootAs(data, 0))
    return count


def int_list(values) -> list:
    """A flatbuffer int vector (or None) as a list of Python ints."""
    if values is None:
        return []
    return [int(v) for v in values]


def decode_name(name) -> str:
    """A flatbuffer string (bytes or None) as str."""
    if name is None:
        return ""
    return name.decode() if isinstance(name, (bytes, bytearray)) else str(name)


def operator_type_name(model: schema.ModelT, op: schema.OperatorT) -> str:
    """Builtin operator name (e.g. 'CONV_2D') or the custom code of `op`."""
    code = model.operatorCodes[op.opcodeIndex]
    builtin = max(int(code.builtinCode), int(code.deprecatedBuiltinCode))
    if builtin == schema.BuiltinOperator.CUSTOM:
        return decode_name(code.customCode)
    return BUILTIN_OPERATOR_NAMES.get(builtin, f"BUILTIN_{builtin}")


def _compact(items: list, used: set) -> tuple:
    """(the items whose index is in `used`, map old index -> new index)."""
    remap, kept = {}, []
    for old, item in enumerate(items):
        if old in used:
            remap[old] = len(kept)
            kept.append(item)
    return kept, remap
