"""The options of the KP_PATCH_STAGE custom operator: schema, encoding, validation.

The options are a FlexBuffer map stored in the operator's `custom_options`.
`OPTION_KEYS` is the Python side of the one specification,
`docs/patch_stage_op.md` (a test checks that both list the same keys, types
and version); the C++ kernel's generated header is made from the same table.

Example:

>>> opts = StageOptions(
...     grid=(2, 2),
...     tensor_shapes=[(8, 8, 3), (4, 4, 8)],
...     tensor_scales=[0.02, 0.05],
...     tensor_zero_points=[-1, -128],
...     layers=[LayerOptions(op=OP_CONV_2D, inputs=(0, -1), kernel=(3, 3), stride=(2, 2),
...                          pad=(0, 0), activation=3, weights=(1, 2))],
... )
>>> decode_options(encode_options(opts)) == opts
True
"""

from __future__ import annotations

import array
from dataclasses import dataclass, field
from typing import List, Optional, Tuple

import numpy as np
from flatbuffers import flexbuffers

from keras_patch.errors import InvalidOptionsError
from keras_patch.stage.quantization import SUPPORTED_ACTIVATIONS

CUSTOM_CODE = "KP_PATCH_STAGE"
#: The newest options version this keras-patch reads and writes (docs "Versioning").
OPTIONS_VERSION = 3
#: Versions `decode_options` accepts; `encode_options` writes the lowest that holds the stage
#: (3 with a MEAN layer, else 2 with `in_place`, else 1).
READ_VERSIONS = (1, 2, 3)

# Layer op codes are TFLite's BuiltinOperator values.
OP_ADD = 0
OP_AVERAGE_POOL_2D = 1
OP_CONV_2D = 3
OP_DEPTHWISE_CONV_2D = 4
OP_MAX_POOL_2D = 17
OP_RELU = 19
OP_RELU6 = 21
OP_PAD = 34
OP_MEAN = 40
LAYER_OP_NAMES = {
    OP_ADD: "ADD",
    OP_AVERAGE_POOL_2D: "AVERAGE_POOL_2D",
    OP_CONV_2D: "CONV_2D",
    OP_DEPTHWISE_CONV_2D: "DEPTHWISE_CONV_2D",
    OP_MAX_POOL_2D: "MAX_POOL_2D",
    OP_RELU: "RELU",
    OP_RELU6: "RELU6",
    OP_PAD: "PAD",
    OP_MEAN: "MEAN",
}
WEIGHTED_OPS = (OP_CONV_2D, OP_DEPTHWISE_CONV_2D)
TWO_INPUT_OPS = (OP_ADD,)

# key -> (type, length) exactly as in the options table of docs/patch_stage_op.md
# (L = num_layers); tests/test_op_spec.py checks the two agree.
OPTION_KEYS = {
    "version": ("int", "scalar"),
    "grid": ("int vector", "2"),
    "num_layers": ("int", "scalar"),
    "tensor_shape": ("int vector", "3 * (L + 1)"),
    "tensor_scale": ("float vector", "L + 1"),
    "tensor_zero_point": ("int vector", "L + 1"),
    "layer_op": ("int vector", "L"),
    "layer_inputs": ("int vector", "2 * L"),
    "layer_params": ("int vector", "8 * L"),
    "layer_activation": ("int vector", "L"),
    "layer_weights": ("int vector", "2 * L"),
    "in_place": ("int", "scalar"),
}
#: Keys that exist only from a version on (older files do not carry them).
KEY_SINCE = {"in_place": 2}
#: Layer ops that exist only from a version on.
OP_SINCE = {OP_MEAN: 3}
#: Most pixels a MEAN layer averages: its int32 sums stay far from overflow.
MAX_MEAN_PIXELS = 2**22
LAYER_PARAMS_WIDTH = 8  # kernel_h, kernel_w, stride_h, stride_w, dilation_h, dilation_w, pad_top, pad_left
MAX_LAYERS = 256
MAX_GRID = 64
MAX_TENSOR_ELEMENTS = 2**31 - 1  # per stage tensor, and the patch arena in bytes


@dataclass(frozen=True)
class LayerOptions:
    """One layer of a patch stage; its output is stage tensor `index + 1`."""

    op: int
    inputs: Tuple[int, int]  # stage tensor ids; the second is -1 unless ADD
    kernel: Tuple[int, int] = (1, 1)
    stride: Tuple[int, int] = (1, 1)
    dilation: Tuple[int, int] = (1, 1)
    pad: Tuple[int, int] = (0, 0)  # (top, left) zero padding / PAD amounts
    activation: int = 0  # TFLite ActivationFunctionType
    weights: Tuple[int, int] = (-1, -1)  # op input indices of filter and bias

    @property
    def op_name(self) -> str:
        return LAYER_OP_NAMES.get(self.op, f"op code {self.op}")


@dataclass(frozen=True)
class StageOptions:
    """Decoded KP_PATCH_STAGE options (see docs/patch_stage_op.md)."""

    grid: Tuple[int, int]
    tensor_shapes: List[Tuple[int, int, int]]
    tensor_scales: List[float]
    tensor_zero_points: List[int]
    layers: List[LayerOptions] = field(default_factory=list)
    # The version the options were read with; None for options built in memory
    # (`encode_options` writes the lowest version that holds them: 3 with a MEAN
    # layer, 2 with `in_place`, else 1). Not part of equality.
    version: Optional[int] = field(default=None, compare=False)
    in_place: bool = False  # docs/patch_stage_op.md "In place" (options version 2)

    def __post_init__(self):
        # Scales travel as float32 (the spec's type): hold exactly those values.
        object.__setattr__(
            self, "tensor_scales", [float(np.float32(s)) for s in self.tensor_scales]
        )

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    @property
    def input_shape(self) -> tuple:
        return self.tensor_shapes[0]

    @property
    def output_shape(self) -> tuple:
        return self.tensor_shapes[-1]

    @property
    def ends_with_mean(self) -> bool:
        """Whether the last layer is a MEAN (a global average pool computed patch by patch)."""
        return bool(self.layers) and self.layers[-1].op == OP_MEAN

    @property
    def tiled_tensor(self) -> int:
        """The stage tensor `grid` tiles: the output, or the MEAN's input (docs "Patch geometry")."""
        return self.num_layers - 1 if self.ends_with_mean else self.num_layers

    @property
    def tiled_shape(self) -> tuple:
        """`tensor_shapes[tiled_tensor]`: what the grid cuts into patches."""
        return self.tensor_shapes[self.tiled_tensor]

    @property
    def minimum_version(self) -> int:
        """The lowest options version that holds these options."""
        return max([2 if self.in_place else 1] + [OP_SINCE.get(l.op, 1) for l in self.layers])


def _int_vector(values) -> array.array:
    return array.array("i", [int(v) for v in values])


def encode_options(options: StageOptions) -> bytes:
    """FlexBuffer map of `options` (int vectors 32-bit, float vectors float32)."""
    builder = flexbuffers.Builder()
    layers = options.layers
    version = max(int(options.version or 1), options.minimum_version)
    with builder.Map():
        builder.Int("version", version)
        if version >= KEY_SINCE["in_place"]:
            builder.Int("in_place", 1 if options.in_place else 0)
        builder.TypedVectorFromElements("grid", _int_vector(options.grid))
        builder.Int("num_layers", len(layers))
        builder.TypedVectorFromElements(
            "tensor_shape", _int_vector(v for shape in options.tensor_shapes for v in shape)
        )
        builder.TypedVectorFromElements(
            "tensor_scale", array.array("f", [float(s) for s in options.tensor_scales])
        )
        builder.TypedVectorFromElements("tensor_zero_point", _int_vector(options.tensor_zero_points))
        builder.TypedVectorFromElements("layer_op", _int_vector(l.op for l in layers))
        builder.TypedVectorFromElements(
            "layer_inputs", _int_vector(v for l in layers for v in l.inputs)
        )
        builder.TypedVectorFromElements(
            "layer_params",
            _int_vector(
                v
                for l in layers
                for v in (*l.kernel, *l.stride, *l.dilation, *l.pad)
            ),
        )
        builder.TypedVectorFromElements("layer_activation", _int_vector(l.activation for l in layers))
        builder.TypedVectorFromElements(
            "layer_weights", _int_vector(v for l in layers for v in l.weights)
        )
    return bytes(builder.Finish())


def decode_options(data: bytes) -> StageOptions:
    """Parses and validates KP_PATCH_STAGE options; errors name the key at fault."""
    try:
        root = flexbuffers.GetRoot(bytearray(data))
        if not root.IsMap:
            raise InvalidOptionsError("KP_PATCH_STAGE options: the root is not a FlexBuffer map.")
        root_map = root.AsMap
        entries = {key.AsKey: value for key, value in zip(root_map.Keys, root_map.Values)}
    except InvalidOptionsError:
        raise
    except Exception as e:
        raise InvalidOptionsError(
            f"KP_PATCH_STAGE options are not a readable FlexBuffer map: {type(e).__name__}: {e}"
        ) from None

    def scalar(key: str) -> int:
        if key not in entries:
            raise InvalidOptionsError(f"KP_PATCH_STAGE options: missing key '{key}'.")
        ref = entries[key]
        if not ref.IsInt:
            raise InvalidOptionsError(f"KP_PATCH_STAGE options: key '{key}' must be an int.")
        return int(ref.AsInt)

    def vector(key: str, length: int, kind: str = "int") -> list:
        if key not in entries:
            raise InvalidOptionsError(f"KP_PATCH_STAGE options: missing key '{key}'.")
        ref = entries[key]
        if not ref.IsTypedVector:
            raise InvalidOptionsError(
                f"KP_PATCH_STAGE options: key '{key}' must be a typed {kind} vector."
            )
        values = ref.AsTypedVector
        element_ok = {
            "int": values.ElementType == flexbuffers.Type.INT,
            "float": values.ElementType == flexbuffers.Type.FLOAT,
        }[kind]
        if not element_ok:
            raise InvalidOptionsError(
                f"KP_PATCH_STAGE options: key '{key}' must be a typed {kind} vector."
            )
        result = list(values.Value)
        if len(result) != length:
            raise InvalidOptionsError(
                f"KP_PATCH_STAGE options: key '{key}' has {len(result)} elements, expected {length}."
            )
        return result

    version = scalar("version")
    if version not in READ_VERSIONS:
        raise InvalidOptionsError(
            f"KP_PATCH_STAGE options: key 'version' is {version}; this keras-patch reads versions "
            f"{READ_VERSIONS[0]}..{OPTIONS_VERSION}."
        )
    num_layers = scalar("num_layers")
    if not 1 <= num_layers <= MAX_LAYERS:
        raise InvalidOptionsError(
            f"KP_PATCH_STAGE options: key 'num_layers' is {num_layers}, allowed 1..{MAX_LAYERS}."
        )
    in_place = 0
    if version >= KEY_SINCE["in_place"]:
        in_place = scalar("in_place")
        if in_place not in (0, 1):
            raise InvalidOptionsError(f"KP_PATCH_STAGE options: key 'in_place' is {in_place}; allowed 0 or 1.")
    grid = tuple(vector("grid", 2))
    shapes_flat = vector("tensor_shape", 3 * (num_layers + 1))
    scales = [float(s) for s in vector("tensor_scale", num_layers + 1, "float")]
    zero_points = vector("tensor_zero_point", num_layers + 1)
    ops = vector("layer_op", num_layers)
    inputs = vector("layer_inputs", 2 * num_layers)
    params = vector("layer_params", LAYER_PARAMS_WIDTH * num_layers)
    activations = vector("layer_activation", num_layers)
    weights = vector("layer_weights", 2 * num_layers)
    layers = []
    for l in range(num_layers):
        p = params[LAYER_PARAMS_WIDTH * l : LAYER_PARAMS_WIDTH * (l + 1)]
        layers.append(
            LayerOptions(
                op=int(ops[l]),
                inputs=(int(inputs[2 * l]), int(inputs[2 * l + 1])),
                kernel=(int(p[0]), int(p[1])),
                stride=(int(p[2]), int(p[3])),
                dilation=(int(p[4]), int(p[5])),
                pad=(int(p[6]), int(p[7])),
                activation=int(activations[l]),
                weights=(int(weights[2 * l]), int(weights[2 * l + 1])),
            )
        )
    options = StageOptions(
        grid=(int(grid[0]), int(grid[1])),
        tensor_shapes=[tuple(int(v) for v in shapes_flat[3 * t : 3 * t + 3]) for t in range(num_layers + 1)],
        tensor_scales=scales,
        tensor_zero_points=[int(z) for z in zero_points],
        layers=layers,
        version=version,
        in_place=bool(in_place),
    )
    validate_options(options)
    return options


def validate_options(options: StageOptions, num_op_inputs: int = None) -> None:
    """Checks shapes and parameters for consistency (the kernel's Prepare does the same).

    Raises:
        InvalidOptionsError: naming the key (and layer) at fault.
    """
    def fail(key: str, message: str):
        raise InvalidOptionsError(f"KP_PATCH_STAGE options: key '{key}': {message}")

    gh, gw = options.grid
    for t, shape in enumerate(options.tensor_shapes):
        if any(d < 1 or d > 1 << 16 for d in shape):
            fail("tensor_shape", f"tensor {t} has shape {shape}; every dimension must be in 1..65536.")
        if shape[0] * shape[1] * shape[2] > MAX_TENSOR_ELEMENTS:
            fail("tensor_shape", f"tensor {t} has shape {shape}; at most 2^31 - 1 elements are supported.")
    out_h, out_w, _ = options.tiled_shape
    if not (1 <= gh <= MAX_GRID and 1 <= gw <= MAX_GRID):
        fail("grid", f"{options.grid} must be two ints in 1..{MAX_GRID}.")
    if gh > out_h or gw > out_w:
        tiled = "the MEAN's input" if options.ends_with_mean else "the stage output"
        fail("grid", f"grid {gh}x{gw} is larger than {tiled} {out_h}x{out_w}.")
    for t, (scale, zp) in enumerate(zip(options.tensor_scales, options.tensor_zero_points)):
        if not (scale > 0 and scale < float("inf")):
            fail("tensor_scale", f"tensor {t} has scale {scale}; it must be positive and finite.")
        if not -128 <= zp <= 127:
            fail("tensor_zero_point", f"tensor {t} has zero point {zp}; int8 needs -128..127.")
    used_weights = set()
    for l, layer in enumerate(options.layers):
        where = f"layer {l} ({layer.op_name})"
        if layer.op not in LAYER_OP_NAMES:
            fail("layer_op", f"layer {l} has op code {layer.op}; supported: {sorted(LAYER_OP_NAMES)}.")
        if layer.op == OP_MEAN:
            if options.version is not None and options.version < OP_SINCE[OP_MEAN]:
                fail("layer_op", f"{where} needs options version {OP_SINCE[OP_MEAN]}; the file is version "
                     f"{options.version}.")
            if l != options.num_layers - 1:
                fail("layer_op", f"{where}: a MEAN must be the last layer of a stage.")
        a, b = layer.inputs
        if not 0 <= a <= l:
            fail("layer_inputs", f"{where} reads tensor {a}; it may read tensors 0..{l}.")
        if layer.op in TWO_INPUT_OPS:
            if not 0 <= b <= l:
                fail("layer_inputs", f"{where} reads second tensor {b}; it may read tensors 0..{l}.")
        elif b != -1:
            fail("layer_inputs", f"{where} takes one input; the second entry must be -1, got {b}.")
        if layer.activation not in SUPPORTED_ACTIVATIONS:
            fail("layer_activation", f"{where} has activation {layer.activation}; supported {SUPPORTED_ACTIVATIONS}.")
        kh, kw = layer.kernel
        sh, sw = layer.stride
        dh, dw = layer.dilation
        pt, pl = layer.pad
        window = (sh, sw, dh, dw) if layer.op == OP_MEAN else (kh, kw, sh, sw, dh, dw)  # a MEAN's: its input
        if min(kh, kw, sh, sw, dh, dw) < 1 or max(window) > 64 or min(pt, pl) < 0:
            fail("layer_params", f"{where} has kernel {layer.kernel}, stride {layer.stride}, "
                 f"dilation {layer.dilation}, pad {layer.pad}; kernel/stride/dilation must be 1..64, pad >= 0.")
        in_h, in_w, in_c = options.tensor_shapes[a]
        out_h, out_w, out_c = options.tensor_shapes[l + 1]
        fw, fb = layer.weights
        if layer.op in WEIGHTED_OPS:
            if fw < 1 or (num_op_inputs is not None and fw >= num_op_inputs):
                fail("layer_weights", f"{where} needs a filter input index >= 1, got {fw}.")
            if fb != -1 and (fb < 1 or (num_op_inputs is not None and fb >= num_op_inputs)):
                fail("layer_weights", f"{where} has bias input index {fb}; use -1 or a valid op input.")
            for w in (fw, fb):
                if w != -1 and w in used_weights:
                    fail("layer_weights", f"{where} reuses op input {w}, already used by another layer.")
                used_weights.add(w)
        elif (fw, fb) != (-1, -1):
            fail("layer_weights", f"{where} has no weights; expected (-1, -1), got {layer.weights}.")
        if layer.op in (OP_CONV_2D, OP_DEPTHWISE_CONV_2D, OP_MAX_POOL_2D, OP_AVERAGE_POOL_2D):
            if layer.op in (OP_MAX_POOL_2D, OP_AVERAGE_POOL_2D) and (dh, dw) != (1, 1):
                fail("layer_params", f"{where}: pooling has no dilation, got {layer.dilation}.")
            for axis, (i, o, k, s, d, p) in enumerate(((in_h, out_h, kh, sh, dh, pt), (in_w, out_w, kw, sw, dw, pl))):
                effective = (k - 1) * d + 1
                if p > effective - 1 or (o - 1) * s - p > i - 1:
                    fail("layer_params",
                         f"{where}: {'height' if axis == 0 else 'width'} in {i}, out {o}, kernel {k}, "
                         f"stride {s}, dilation {d}, pad {p} leave an output without input.")
            if layer.op == OP_DEPTHWISE_CONV_2D and out_c % in_c:
                fail("tensor_shape", f"{where}: output channels {out_c} are not a multiple of input channels {in_c}.")
            if layer.op in (OP_MAX_POOL_2D, OP_AVERAGE_POOL_2D) and out_c != in_c:
                fail("tensor_shape", f"{where}: pooling keeps channels, got {in_c} -> {out_c}.")
        elif layer.op == OP_MEAN:
            if (kh, kw, sh, sw, dh, dw, pt, pl) != (in_h, in_w, 1, 1, 1, 1, 0, 0):
                fail("layer_params", f"{where}: a MEAN averages its whole {in_h}x{in_w} input: parameters "
                     f"must be [{in_h}, {in_w}, 1, 1, 1, 1, 0, 0], got {[kh, kw, sh, sw, dh, dw, pt, pl]}.")
            if layer.activation != 0:
                fail("layer_activation", f"{where}: MEAN carries no fused activation.")
            if (out_h, out_w, out_c) != (1, 1, in_c):
                fail("tensor_shape", f"{where}: the mean of {in_h}x{in_w}x{in_c} is 1x1x{in_c}, "
                     f"got {out_h}x{out_w}x{out_c}.")
            if in_h * in_w > MAX_MEAN_PIXELS:
                fail("tensor_shape", f"{where} averages {in_h}x{in_w} pixels; at most 2^22 are supported.")
        elif layer.op == OP_PAD:
            if (kh, kw, sh, sw, dh, dw) != (1, 1, 1, 1, 1, 1):
                fail("layer_params", f"{where}: PAD needs kernel, stride and dilation 1.")
            if not (out_h >= in_h + pt and out_w >= in_w + pl and out_c == in_c):
                fail("tensor_shape", f"{where}: {in_h}x{in_w}x{in_c} padded by top {pt}, left {pl} "
                     f"cannot give {out_h}x{out_w}x{out_c}.")
        else:  # ADD, RELU, RELU6: elementwise
            if (kh, kw, sh, sw, dh, dw, pt, pl) != (1, 1, 1, 1, 1, 1, 0, 0):
                fail("layer_params", f"{where}: elementwise ops need kernel/stride/dilation 1 and pad 0.")
            shapes = [options.tensor_shapes[a]] + ([options.tensor_shapes[b]] if layer.op == OP_ADD else [])
            if any(s != (out_h, out_w, out_c) for s in shapes):
                fail("tensor_shape", f"{where}: inputs {shapes} must have the output shape {(out_h, out_w, out_c)}.")
            if layer.op in (OP_RELU, OP_RELU6) and layer.activation != 0:
                fail("layer_activation", f"{where}: RELU/RELU6 carry no fused activation.")
    consumed = {t for layer in options.layers for t in layer.inputs if t >= 0}
    for t in range(options.num_layers):
        if t not in consumed:
            fail("layer_inputs", f"tensor {t} is never read; only the last tensor may leave the stage.")
    if options.in_place and options.num_layers == 1:
        layer = options.layers[0]
        (in_h, in_w, in_c), (out_h, out_w, out_c) = options.tensor_shapes
        if (layer.op != OP_DEPTHWISE_CONV_2D or out_c != in_c or tuple(options.grid) != (1, 1)
                or out_h * out_w > in_h * in_w):
            fail("in_place", f"a one-layer in-place stage must be one DEPTHWISE_CONV_2D with depth multiplier 1, "
                 f"grid 1x1 and no more output than input pixels; got {layer.op_name} "
                 f"{in_h}x{in_w}x{in_c} -> {out_h}x{out_w}x{out_c}, grid {options.grid}.")
