"""Graph pass: the model takes int8 input instead of a float input plus a QUANTIZE copy.

The standard converter with float32 I/O starts the graph with
`float input -> QUANTIZE -> int8`.  In TFLM both tensors are alive while
QUANTIZE runs, so the float image (4 bytes a value) sits in the arena next to
its int8 copy.  `drop_input_quantize` makes the QUANTIZE op's int8 output the
graph input (same scale and zero point) and removes the op and the float
tensor; the caller quantizes the image itself (`run_tflite` does it for a
float array, the Arduino image providers write int8 pixels).

Example:

>>> import numpy as np, keras
>>> from keras_patch.keras.export import convert_int8
>>> from keras_patch.graph.tflite_model import TFLiteModel
>>> net = keras.Sequential([keras.Input((8, 8, 3), name="image"), keras.layers.Conv2D(4, 3)])
>>> data = convert_int8(net, np.random.default_rng(0).random((4, 8, 8, 3), dtype=np.float32), int8_io=False)
>>> model = TFLiteModel.from_bytes(data)
>>> [(d.input_name, d.bytes_saved) for d in drop_input_quantize(model)]
[('serving_default_image:0', 768)]
>>> model.tensor(model.inputs[0]).dtype.__name__
'int8'
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import List

import numpy as np
from ai_edge_litert import schema_py_generated as schema

from keras_patch.graph.tflite_model import TFLiteModel

__all__ = ["DroppedQuantize", "drop_input_quantize", "droppable_input_quantize"]


@dataclass(frozen=True)
class DroppedQuantize:
    """One graph input that now takes int8 instead of float + QUANTIZE."""

    input_name: str  # the graph input's name (kept on the new int8 input)
    scale: float  # of the int8 input (float32 value)
    zero_point: int
    shape: tuple
    bytes_saved: int  # the float input tensor's bytes, no longer in the arena


def droppable_input_quantize(model: TFLiteModel, input_tensor: int):
    """Index of the QUANTIZE op that is the only reader of float graph input `input_tensor`, or None.

    None when the input is not FLOAT32, is also a graph output, has another
    reader, or its QUANTIZE does not write a per-tensor int8 tensor.
    """
    if model.subgraph.tensors[input_tensor].type != schema.TensorType.FLOAT32:
        return None
    if input_tensor in model.outputs:
        return None
    readers = model.consumers().get(input_tensor, [])
    if len(readers) != 1 or model.op_type(readers[0]) != "QUANTIZE":
        return None
    op = readers[0]
    outs = model.op_outputs(op)
    if len(outs) != 1 or model.op_inputs(op) != [input_tensor]:
        return None
    out = model.tensor(outs[0])
    if out.dtype != np.int8 or out.scale.size != 1 or out.zero_point.size != 1:
        return None
    if outs[0] in model.inputs:
        return None
    return op


def drop_input_quantize(model: TFLiteModel) -> List[DroppedQuantize]:
    """Makes every float graph input read only by a QUANTIZE to int8 an int8 input (in place).

    The QUANTIZE op's int8 output becomes the graph input (and signature
    input), under the float input's name; the QUANTIZE op and the float
    tensor are removed.  Inputs that are int8 already, or whose float value
    is read by anything else, are left alone: the pass is a no-op on int8
    models.

    Returns:
        One `DroppedQuantize` per input changed, in graph-input order.
    """
    dropped: List[DroppedQuantize] = []
    removed_ops = set()
    new_inputs = list(model.inputs)
    renames = {}
    for position, t in enumerate(model.inputs):
        op = droppable_input_quantize(model, t)
        if op is None:
            continue
        q_out = model.op_outputs(op)[0]
        float_info, int8_info = model.tensor(t), model.tensor(q_out)
        dropped.append(DroppedQuantize(
            input_name=float_info.name,
            scale=float(np.float32(int8_info.scale[0])),
            zero_point=int(int8_info.zero_point[0]),
            shape=tuple(int8_info.shape),
            bytes_saved=float_info.num_bytes,
        ))
        removed_ops.add(op)
        new_inputs[position] = q_out
        renames[t] = q_out
    if not dropped:
        return dropped
    sg = model.subgraph
    for old, new in renames.items():
        new_tensor = sg.tensors[new]
        new_tensor.name = sg.tensors[old].name
        if sg.tensors[old].shapeSignature is not None and new_tensor.shapeSignature is None:
            new_tensor.shapeSignature = sg.tensors[old].shapeSignature
    sg.inputs = np.array(new_inputs, np.int32)
    for signature in model.model.signatureDefs or []:
        for tensor_map in signature.inputs or []:
            if int(tensor_map.tensorIndex) in renames:
                tensor_map.tensorIndex = renames[int(tensor_map.tensorIndex)]
    sg.operators = [op for i, op in enumerate(sg.operators) if i not in removed_ops]
    model.remove_unused()
    return dropped
