"""One source of truth for the KP_PATCH_STAGE options (issue 3, point 8).

docs/patch_stage_op.md defines the options; keras_patch.stage.options
(OPTION_KEYS, op codes, limits) and the C++ core's table in
tflm_ops/patch_stage_types.h must say the same.  The header is parsed as
text (no compiler needed); the built core's runtime table is checked too.
"""

import os
import re

import pytest

from keras_patch.stage import options as o
from keras_patch.stage import quantization as q

try:
    from tests.test_op_spec import _doc_option_rows
except ImportError:  # tests/ itself on sys.path
    from test_op_spec import _doc_option_rows

HEADER = os.path.join(os.path.dirname(__file__), "..", "tflm_ops", "patch_stage_types.h")


def _header() -> str:
    return open(HEADER, encoding="utf-8").read()


def header_option_keys() -> dict:
    text = _header()
    block = text[text.index("// KP_OPTION_KEYS_BEGIN"):text.index("// KP_OPTION_KEYS_END")]
    rows = re.findall(r'\{"(\w+)", "([^"]+)", "([^"]+)"\}', block)
    assert len(rows) == len(set(r[0] for r in rows)), "duplicate key in the C++ table"
    return {name: (kind, length) for name, kind, length in rows}


def _enum(name: str) -> dict:
    text = _header()
    body = re.search(r"enum %s \{(.*?)\};" % name, text, re.S).group(1)
    return {k: int(v) for k, v in re.findall(r"(\w+) = (-?\d+)", body)}


def test_cpp_table_equals_python_and_doc():
    cpp = header_option_keys()
    assert cpp == o.OPTION_KEYS
    assert cpp == _doc_option_rows()
    # Same order as the spec table (the C++ enum indexes this table).
    assert list(cpp) == list(_doc_option_rows())


def test_cpp_key_enum_matches_table():
    text = _header()
    body = re.search(r"enum KpOptionKeyIndex \{(.*?)\};", text, re.S).group(1)
    names = re.findall(r"kKey(\w+)", body)
    camel = ["".join(p.capitalize() for p in key.split("_")) for key in header_option_keys()]
    assert names == camel


def test_cpp_op_codes_and_activations_match():
    ops = _enum("KpLayerOp")
    assert sorted(ops.values()) == sorted(o.LAYER_OP_NAMES)
    for cpp_name, code in ops.items():
        python_name = o.LAYER_OP_NAMES[code]
        assert cpp_name.lower() == "kkpop" + python_name.replace("_", "").lower()
    assert sorted(_enum("KpActivation").values()) == sorted(q.SUPPORTED_ACTIVATIONS)


def test_cpp_limits_match():
    text = _header()

    def const(name):
        return int(re.search(r"%s = (\d+);" % name, text).group(1))

    assert const("kKpOptionsVersion") == o.OPTIONS_VERSION
    assert const("kKpMaxLayers") == o.MAX_LAYERS
    assert const("kKpMaxGrid") == o.MAX_GRID
    assert const("kKpLayerParamsWidth") == o.LAYER_PARAMS_WIDTH
    assert const("kKpMaxDim") == 65536


def test_built_core_reads_the_same_keys():
    from keras_patch.runtime import cpp_executor

    if not cpp_executor.is_available():
        pytest.skip("keras_patch._kp_core is not built (python setup.py build_ext --inplace)")
    assert cpp_executor.option_keys() == o.OPTION_KEYS
