"""The KP_PATCH_STAGE options: docs/patch_stage_op.md is the one source of truth."""

import array
import dataclasses
import os
import re

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import pytest
from flatbuffers import flexbuffers

from keras_patch.errors import InvalidOptionsError
from keras_patch.stage import options as o

SPEC = os.path.join(os.path.dirname(__file__), "..", "docs", "patch_stage_op.md")


def _spec_section(title: str) -> str:
    text = open(SPEC, encoding="utf-8").read()
    start = text.index(f"## {title}")
    end = text.find("\n## ", start + 1)
    return text[start : end if end > 0 else None]


def _doc_option_rows() -> dict:
    rows = {}
    for line in _spec_section("Options (FlexBuffer map)").splitlines():
        m = re.match(r"\|\s*`(\w+)`\s*\|\s*([^|]+?)\s*\|\s*`?([^|`]+?)`?\s*\|", line)
        if m:
            rows[m.group(1)] = (m.group(2), m.group(3))
    return rows


def test_doc_lists_exactly_the_option_keys_with_types_and_lengths():
    assert _doc_option_rows() == o.OPTION_KEYS


def test_doc_lists_every_layer_op_code():
    section = _spec_section("Stage tensors and layers")
    documented = {int(code): name for code, name in re.findall(r"^\|\s*(\d+)\s*\|\s*(\w+)\s*\|", section, re.M)}
    assert documented == o.LAYER_OP_NAMES
    # The one list patchify, the planner and candidate_splits check ops against is that table.
    from keras_patch.graph import patchify, rules
    from keras_patch.planner import schedule

    assert {code: name for name, code in rules.SUPPORTED_STAGE_OPS.items()} == documented
    assert patchify.SUPPORTED_STAGE_OPS is rules.SUPPORTED_STAGE_OPS
    assert schedule.STAGE_OP_NAMES == set(documented.values())


def test_doc_version_matches():
    assert f"options version {o.OPTIONS_VERSION}" in open(SPEC, encoding="utf-8").read()
    assert o.CUSTOM_CODE == "KP_PATCH_STAGE"


def _good_options(**changes) -> o.StageOptions:
    layers = [
        o.LayerOptions(op=o.OP_CONV_2D, inputs=(0, -1), kernel=(3, 3), stride=(2, 2), pad=(0, 0),
                       activation=3, weights=(1, 2)),
        o.LayerOptions(op=o.OP_DEPTHWISE_CONV_2D, inputs=(1, -1), kernel=(3, 3), pad=(1, 1),
                       activation=1, weights=(3, 4)),
        o.LayerOptions(op=o.OP_ADD, inputs=(1, 2)),
        o.LayerOptions(op=o.OP_PAD, inputs=(3, -1), pad=(1, 0)),
        o.LayerOptions(op=o.OP_MAX_POOL_2D, inputs=(4, -1), kernel=(2, 2), stride=(2, 2)),
    ]
    base = dict(
        grid=(2, 2),
        tensor_shapes=[(9, 9, 3), (4, 4, 8), (4, 4, 8), (4, 4, 8), (5, 5, 8), (2, 2, 8)],
        tensor_scales=[0.02, 0.05, 0.04, 0.06, 0.06, 0.06],
        tensor_zero_points=[-1, -128, -5, 3, 3, 3],
        layers=layers,
        in_place=True,  # options version 2: every key of the table is present
    )
    base.update(changes)
    return o.StageOptions(**base)


def test_encode_decode_round_trip():
    opts = _good_options()
    assert o.decode_options(o.encode_options(opts)) == opts


def test_encoding_uses_32_bit_typed_vectors():
    root = flexbuffers.GetRoot(bytearray(o.encode_options(_good_options()))).AsMap
    entries = {k.AsKey: v for k, v in zip(root.Keys, root.Values)}
    assert set(entries) == set(o.OPTION_KEYS)
    for key, (kind, length) in o.OPTION_KEYS.items():
        ref = entries[key]
        if length == "scalar":
            assert ref.IsInt, key
        else:
            assert ref.IsTypedVector, key
            vec = ref.AsTypedVector
            assert vec.ElementType == (flexbuffers.Type.FLOAT if kind == "float vector" else flexbuffers.Type.INT), key
            assert vec.ByteWidth == 4, key


def _encode_raw(entries: dict) -> bytes:
    builder = flexbuffers.Builder()
    with builder.Map():
        for key, value in entries.items():
            if isinstance(value, int):
                builder.Int(key, value)
            elif isinstance(value, str):
                builder.String(key, value)
            elif isinstance(value, array.array):
                builder.TypedVectorFromElements(key, value)
            else:
                builder.VectorFromElements(key, value)
    return bytes(builder.Finish())


def _raw_entries() -> dict:
    return flexbuffers_entries(o.encode_options(_good_options()))


def flexbuffers_entries(data: bytes) -> dict:
    """The options map as {key: int or array.array}, to re-encode with changes (`_encode_raw`)."""
    root = flexbuffers.GetRoot(bytearray(data)).AsMap
    result = {}
    for k, v in zip(root.Keys, root.Values):
        if v.IsInt:
            result[k.AsKey] = int(v.AsInt)
        else:
            vec = v.AsTypedVector
            result[k.AsKey] = array.array("f" if vec.ElementType == flexbuffers.Type.FLOAT else "i", vec.Value)
    return result


@pytest.mark.parametrize("key", sorted(o.OPTION_KEYS))
def test_missing_key_is_named(key):
    entries = _raw_entries()
    del entries[key]
    with pytest.raises(InvalidOptionsError, match=f"'{key}'"):
        o.decode_options(_encode_raw(entries))


@pytest.mark.parametrize("key", sorted(o.OPTION_KEYS))
def test_wrong_type_is_named(key):
    entries = _raw_entries()
    entries[key] = "oops"
    with pytest.raises(InvalidOptionsError, match=f"'{key}'"):
        o.decode_options(_encode_raw(entries))


@pytest.mark.parametrize("key", [k for k, (_, n) in o.OPTION_KEYS.items() if n != "scalar"])
def test_wrong_length_is_named(key):
    entries = _raw_entries()
    entries[key] = array.array(entries[key].typecode, list(entries[key]) + [1])
    with pytest.raises(InvalidOptionsError, match=f"'{key}'"):
        o.decode_options(_encode_raw(entries))


def test_float_vector_where_int_expected_is_named():
    entries = _raw_entries()
    entries["grid"] = array.array("f", [2.0, 2.0])
    with pytest.raises(InvalidOptionsError, match="'grid'"):
        o.decode_options(_encode_raw(entries))


@pytest.mark.parametrize("data", [b"", b"\x00", b"garbage bytes!", bytes(range(256))])
def test_garbage_bytes_raise_invalid_options(data):
    with pytest.raises(InvalidOptionsError):
        o.decode_options(data)


@pytest.mark.parametrize(
    "changes, key",
    [
        (dict(version=4), "version"),
        (dict(version=0), "version"),
        (dict(grid=(3, 2)), "grid"),
        (dict(grid=(0, 1)), "grid"),
        (dict(tensor_zero_points=[-1, -128, -5, 3, 3, 300]), "tensor_zero_point"),
        (dict(tensor_scales=[0.02, 0.05, 0.0, 0.06, 0.06, 0.06]), "tensor_scale"),
        (dict(tensor_shapes=[(9, 9, 3), (4, 4, 8), (4, 4, 8), (4, 4, 8), (5, 5, 8), (2, 2, 0)]), "tensor_shape"),
        (dict(tensor_shapes=[(9, 9, 3), (9, 4, 8), (4, 4, 8), (4, 4, 8), (5, 5, 8), (2, 2, 8)]), "layer_params"),
        (dict(tensor_shapes=[(9, 9, 3), (4, 4, 8), (4, 4, 8), (4, 4, 8), (5, 5, 7), (2, 2, 7)]), "tensor_shape"),
    ],
)
def test_inconsistent_options_name_the_key(changes, key):
    opts = _good_options(**{k: v for k, v in changes.items() if k != "version"})
    if "version" in changes:
        entries = _raw_entries()
        entries["version"] = changes["version"]
        data = _encode_raw(entries)
    else:
        data = o.encode_options(opts)
    with pytest.raises(InvalidOptionsError, match=f"'{key}'"):
        o.decode_options(data)


def _with_layer(index: int, **changes) -> o.StageOptions:
    opts = _good_options()
    layers = list(opts.layers)
    fields = {f: getattr(layers[index], f) for f in
              ("op", "inputs", "kernel", "stride", "dilation", "pad", "activation", "weights")}
    fields.update(changes)
    layers[index] = o.LayerOptions(**fields)
    return _good_options(layers=layers)


@pytest.mark.parametrize(
    "index, changes, key",
    [
        (0, dict(op=99), "layer_op"),
        (0, dict(inputs=(1, -1)), "layer_inputs"),  # reads its own output
        (2, dict(inputs=(1, 7)), "layer_inputs"),
        (0, dict(inputs=(0, 0)), "layer_inputs"),  # second input on a one-input op
        (0, dict(activation=7), "layer_activation"),
        (0, dict(kernel=(0, 3)), "layer_params"),
        (0, dict(pad=(3, 0)), "layer_params"),  # pad >= kernel: an output with no input
        (4, dict(dilation=(2, 2)), "layer_params"),  # pools have no dilation
        (3, dict(kernel=(3, 3)), "layer_params"),  # PAD with a kernel
        (2, dict(pad=(1, 0)), "layer_params"),  # elementwise op with padding
        (0, dict(weights=(-1, 2)), "layer_weights"),
        (1, dict(weights=(1, 4)), "layer_weights"),  # filter shared with layer 0
        (2, dict(weights=(5, -1)), "layer_weights"),  # ADD has no weights
    ],
)
def test_bad_layer_options_name_the_key(index, changes, key):
    with pytest.raises(InvalidOptionsError, match=f"'{key}'"):
        o.validate_options(_with_layer(index, **changes), num_op_inputs=5)


def test_unread_intermediate_tensor_is_rejected():
    opts = _with_layer(2, inputs=(2, 2))  # tensor 1 only read by layer 1... still read
    o.validate_options(opts)
    dangling = _with_layer(1, inputs=(0, -1))
    dangling = _good_options(
        layers=[dangling.layers[0], dangling.layers[1], o.LayerOptions(op=o.OP_ADD, inputs=(2, 2)),
                *dangling.layers[3:]],
        tensor_shapes=[(9, 9, 3), (4, 4, 8), (9, 9, 3), (9, 9, 3), (10, 10, 3), (5, 5, 3)],
    )
    with pytest.raises(InvalidOptionsError, match="'layer_inputs'"):
        o.validate_options(dangling)


# ------------------------------------------------------------------ MEAN (options version 3)


def _mean_options(**changes) -> o.StageOptions:
    """conv 3x3 -> MEAN: a global average pool whose input (7x6x5) the grid tiles."""
    layers = [
        o.LayerOptions(op=o.OP_CONV_2D, inputs=(0, -1), kernel=(3, 3), pad=(1, 1), activation=1, weights=(1, 2)),
        o.LayerOptions(op=o.OP_MEAN, inputs=(1, -1), kernel=(7, 6)),
    ]
    base = dict(grid=(3, 2), tensor_shapes=[(7, 6, 3), (7, 6, 5), (1, 1, 5)],
                tensor_scales=[0.02, 0.05, 0.03], tensor_zero_points=[-1, -128, 7], layers=layers)
    base.update(changes)
    return o.StageOptions(**base)


def _with_mean_layer(**changes) -> o.StageOptions:
    opts = _mean_options()
    return _mean_options(layers=[opts.layers[0], dataclasses.replace(opts.layers[1], **changes)])


def test_mean_options_are_version_3_and_round_trip():
    opts = _mean_options()
    assert opts.ends_with_mean and opts.tiled_tensor == 1 and opts.tiled_shape == (7, 6, 5)
    decoded = o.decode_options(o.encode_options(opts))
    assert decoded == opts and decoded.version == 3
    # Without a MEAN the lowest version that holds the stage is still written.
    assert o.decode_options(o.encode_options(_good_options(in_place=False))).version == 1


@pytest.mark.parametrize(
    "opts, key, words",
    [
        (_mean_options(grid=(8, 1)), "grid", "MEAN's input"),
        (_with_mean_layer(kernel=(7, 5)), "layer_params", "whole 7x6 input"),
        (_with_mean_layer(stride=(2, 1)), "layer_params", "whole 7x6 input"),
        (_with_mean_layer(pad=(1, 0)), "layer_params", "whole 7x6 input"),
        (_with_mean_layer(activation=1), "layer_activation", "no fused activation"),
        (_mean_options(tensor_shapes=[(7, 6, 3), (7, 6, 5), (1, 1, 4)]), "tensor_shape", "is 1x1x5"),
        (_mean_options(tensor_shapes=[(7, 6, 3), (7, 6, 5), (1, 2, 5)]), "tensor_shape", "is 1x1x5"),
    ],
)
def test_mean_inconsistent_options_name_the_key(opts, key, words):
    with pytest.raises(InvalidOptionsError, match=f"'{key}'.*{words}"):
        o.decode_options(o.encode_options(opts))


def test_mean_too_many_pixels_names_tensor_shape():
    opts = _mean_options(grid=(1, 1), tensor_shapes=[(2048, 4096, 1), (2048, 4096, 1), (1, 1, 1)],
                         layers=[o.LayerOptions(op=o.OP_RELU, inputs=(0, -1)),
                                 o.LayerOptions(op=o.OP_MEAN, inputs=(1, -1), kernel=(2048, 4096))])
    with pytest.raises(InvalidOptionsError, match="'tensor_shape'.*2\\^22"):
        o.validate_options(opts)


def test_mean_must_be_the_last_layer():
    opts = _mean_options(
        grid=(1, 1), tensor_shapes=[(7, 6, 3), (1, 1, 3), (1, 1, 3)], tensor_scales=[0.02, 0.05, 0.05],
        tensor_zero_points=[0, 0, 0],
        layers=[o.LayerOptions(op=o.OP_MEAN, inputs=(0, -1), kernel=(7, 6)),
                o.LayerOptions(op=o.OP_RELU, inputs=(1, -1))])
    with pytest.raises(InvalidOptionsError, match="'layer_op'.*last layer"):
        o.validate_options(opts)


@pytest.mark.parametrize("version", [1, 2])
def test_mean_in_an_older_version_names_layer_op(version):
    entries = flexbuffers_entries(o.encode_options(_mean_options()))
    entries["version"] = version
    if version == 1:
        del entries["in_place"]
    with pytest.raises(InvalidOptionsError, match=f"'layer_op'.*needs options version 3; the file is version {version}"):
        o.decode_options(_encode_raw(entries))

