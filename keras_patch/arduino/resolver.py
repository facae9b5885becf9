"""Which `tflite::MicroMutableOpResolver` calls a model needs.

`resolver_calls(model)` lists, in first-use order, the `AddXxx()` method of
`MicroMutableOpResolver` for every builtin operator of a `.tflite` model;
KP_PATCH_STAGE ops are registered by `keras_patch::AddKerasPatchOps`, which
takes one resolver slot per keras-patch custom op.

The method names are those of
`tensorflow/lite/micro/micro_mutable_op_resolver.h` in tflite-micro
(checked against commit 90b983c2b).

Example:

>>> from keras_patch.arduino.resolver import resolver_calls
>>> resolver_calls("model.tflite")  # doctest: +SKIP
ResolverPlan(builtin_methods=['AddQuantize', 'AddConv2D', ...], custom_ops=['KP_PATCH_STAGE'])
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import List

from keras_patch.errors import UnsupportedModelError
from keras_patch.stage.options import CUSTOM_CODE
from keras_patch.graph.tflite_model import (
    BUILTIN_OPERATOR_NAMES,
    ModelSource,
    TFLiteModel,
    operator_type_name,
    read_model_bytes,
)

#: TFLite builtin operator name -> MicroMutableOpResolver method.
BUILTIN_METHODS = {
    "ABS": "AddAbs",
    "ADD": "AddAdd",
    "ADD_N": "AddAddN",
    "ARG_MAX": "AddArgMax",
    "ARG_MIN": "AddArgMin",
    "ASSIGN_VARIABLE": "AddAssignVariable",
    "AVERAGE_POOL_2D": "AddAveragePool2D",
    "BATCH_MATMUL": "AddBatchMatMul",
    "BATCH_TO_SPACE_ND": "AddBatchToSpaceNd",
    "BROADCAST_ARGS": "AddBroadcastArgs",
    "BROADCAST_TO": "AddBroadcastTo",
    "CALL_ONCE": "AddCallOnce",
    "CAST": "AddCast",
    "CEIL": "AddCeil",
    "CONCATENATION": "AddConcatenation",
    "CONV_2D": "AddConv2D",
    "COS": "AddCos",
    "CUMSUM": "AddCumSum",
    "DEPTH_TO_SPACE": "AddDepthToSpace",
    "DEPTHWISE_CONV_2D": "AddDepthwiseConv2D",
    "DEQUANTIZE": "AddDequantize",
    "DIV": "AddDiv",
    "DYNAMIC_UPDATE_SLICE": "AddDynamicUpdateSlice",
    "ELU": "AddElu",
    "EMBEDDING_LOOKUP": "AddEmbeddingLookup",
    "EQUAL": "AddEqual",
    "EXP": "AddExp",
    "EXPAND_DIMS": "AddExpandDims",
    "FILL": "AddFill",
    "FLOOR": "AddFloor",
    "FLOOR_DIV": "AddFloorDiv",
    "FLOOR_MOD": "AddFloorMod",
    "FULLY_CONNECTED": "AddFullyConnected",
    "GATHER": "AddGather",
    "GATHER_ND": "AddGatherNd",
    "GREATER": "AddGreater",
    "GREATER_EQUAL": "AddGreaterEqual",
    "HARD_SWISH": "AddHardSwish",
    "IF": "AddIf",
    "L2_NORMALIZATION": "AddL2Normalization",
    "L2_POOL_2D": "AddL2Pool2D",
    "LEAKY_RELU": "AddLeakyRelu",
    "LESS": "AddLess",
    "LESS_EQUAL": "AddLessEqual",
    "LOG": "AddLog",
    "LOG_SOFTMAX": "AddLogSoftmax",
    "LOGICAL_AND": "AddLogicalAnd",
    "LOGICAL_NOT": "AddLogicalNot",
    "LOGICAL_OR": "AddLogicalOr",
    "LOGISTIC": "AddLogistic",
    "MAX_POOL_2D": "AddMaxPool2D",
    "MAXIMUM": "AddMaximum",
    "MEAN": "AddMean",
    "MINIMUM": "AddMinimum",
    "MIRROR_PAD": "AddMirrorPad",
    "MUL": "AddMul",
    "NEG": "AddNeg",
    "NOT_EQUAL": "AddNotEqual",
    "PACK": "AddPack",
    "PAD": "AddPad",
    "PADV2": "AddPadV2",
    "PRELU": "AddPrelu",
    "QUANTIZE": "AddQuantize",
    "READ_VARIABLE": "AddReadVariable",
    "REDUCE_ALL": "AddReduceAll",
    "REDUCE_MAX": "AddReduceMax",
    "REDUCE_MIN": "AddReduceMin",
    "RELU": "AddRelu",
    "RELU6": "AddRelu6",
    "RESHAPE": "AddReshape",
    "RESIZE_BILINEAR": "AddResizeBilinear",
    "RESIZE_NEAREST_NEIGHBOR": "AddResizeNearestNeighbor",
    "REVERSE_V2": "AddReverseV2",
    "ROUND": "AddRound",
    "RSQRT": "AddRsqrt",
    "SELECT_V2": "AddSelectV2",
    "SHAPE": "AddShape",
    "SIN": "AddSin",
    "SLICE": "AddSlice",
    "SOFTMAX": "AddSoftmax",
    "SPACE_TO_BATCH_ND": "AddSpaceToBatchNd",
    "SPACE_TO_DEPTH": "AddSpaceToDepth",
    "SPLIT": "AddSplit",
    "SPLIT_V": "AddSplitV",
    "SQRT": "AddSqrt",
    "SQUARE": "AddSquare",
    "SQUARED_DIFFERENCE": "AddSquaredDifference",
    "SQUEEZE": "AddSqueeze",
    "STRIDED_SLICE": "AddStridedSlice",
    "SUB": "AddSub",
    "SUM": "AddSum",
    "SVDF": "AddSvdf",
    "TANH": "AddTanh",
    "TRANSPOSE": "AddTranspose",
    "TRANSPOSE_CONV": "AddTransposeConv",
    "UNIDIRECTIONAL_SEQUENCE_LSTM": "AddUnidirectionalSequenceLSTM",
    "UNPACK": "AddUnpack",
    "VAR_HANDLE": "AddVarHandle",
    "WHILE": "AddWhile",
    "ZEROS_LIKE": "AddZerosLike",
}

#: Methods that current TFLM has but the older TFLM inside the Arduino library
#: Chirale_TensorFlowLite 2.0.0 does not (its micro_mutable_op_resolver.h,
#: checked by hand): a sketch using them needs a newer TFLM Arduino build.
NOT_IN_ARDUINO_TFLM = frozenset({
    "AddBatchMatMul", "AddDynamicUpdateSlice", "AddEmbeddingLookup",
    "AddReduceAll", "AddReduceMin", "AddReverseV2",
})

#: Custom ops `keras_patch::AddKerasPatchOps` registers.
KERAS_PATCH_CUSTOM_OPS = (CUSTOM_CODE,)


@dataclass
class ResolverPlan:
    """The resolver a model needs.

    Attributes:
        builtin_methods: `MicroMutableOpResolver` methods, one per distinct
            builtin op, in the order the model first uses them.
        builtin_ops: the matching TFLite op names.
        custom_ops: keras-patch custom op codes the model uses.
    """

    builtin_methods: List[str] = field(default_factory=list)
    builtin_ops: List[str] = field(default_factory=list)
    custom_ops: List[str] = field(default_factory=list)

    @property
    def not_in_arduino_tflm(self) -> List[str]:
        """Methods of this plan missing from Chirale_TensorFlowLite 2.0.0's TFLM."""
        return [m for m in self.builtin_methods if m in NOT_IN_ARDUINO_TFLM]

    @property
    def num_slots(self) -> int:
        """The `N` of `MicroMutableOpResolver<N>`: one slot per builtin op
        plus one per op `keras_patch::AddKerasPatchOps` registers (the
        generated sketch always calls it)."""
        return len(self.builtin_methods) + len(KERAS_PATCH_CUSTOM_OPS)


def resolver_calls(tflite_bytes: ModelSource) -> ResolverPlan:
    """The resolver calls a model needs (all subgraphs' ops).

    Raises:
        UnsupportedModelError: an op TFLM's `MicroMutableOpResolver` has no
            method for, or a custom op other than keras-patch's; the message
            names the op.
    """
    model = TFLiteModel.from_bytes(read_model_bytes(tflite_bytes))
    plan = ResolverPlan()
    for sub_index, subgraph in enumerate(model.model.subgraphs or []):
        for op_index, op in enumerate(subgraph.operators or []):
            name = operator_type_name(model.model, op)
            if name in KERAS_PATCH_CUSTOM_OPS:
                if name not in plan.custom_ops:
                    plan.custom_ops.append(name)
                continue
            method = BUILTIN_METHODS.get(name)
            if method is None:
                raise UnsupportedModelError(
                    f"op {op_index} of subgraph {sub_index} is {name}: "
                    "tflite::MicroMutableOpResolver has no method for it"
                    + (" (a custom op that is not keras-patch's)" if name not in BUILTIN_OPERATOR_NAMES.values() else "")
                    + "; the Arduino sketch cannot register it."
                )
            if method not in plan.builtin_methods:
                plan.builtin_methods.append(method)
                plan.builtin_ops.append(name)
    return plan

