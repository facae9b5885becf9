"""benchmarks/memory.py on a small model (fast): its rows, checks and head explanations."""

import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))
import memory  # noqa: E402

from keras_patch.arena.profiler import profile  # noqa: E402
from keras_patch.arena.tflm_arena import measure_tflm_arena  # noqa: E402


@pytest.fixture(scope="module")
def measured(residual):
    memory.MODELS["residual"] = ("residual test model", lambda: residual)
    try:
        yield memory.measure_model("residual", [(2, 2), (3, 3)], None, lambda message: None)
    finally:
        del memory.MODELS["residual"]


def test_rows_side_by_side(residual, measured):
    rows = {r["method"]: r for r in measured["rows"]}
    assert list(rows) == ["stock TFLM", "single stage", "single stage <= 1.10", "single stage <= 1.30",
                          "plan <= 1.10", "plan <= 1.30"]
    stock = rows["stock TFLM"]
    assert stock["A"] == measured["stock"] == measure_tflm_arena(residual).head_bytes
    assert measured["input_bytes"] == 48 * 48 * 3
    for cap in memory.CAPS:
        planned = rows[f"plan <= {cap:.2f}"]
        prof = profile(planned["patched"])
        assert (planned["A"], planned["A_"], planned["stages"]) == (
            prof.patched_peak_bytes, prof.patched_peak_bytes_without_input, prof.num_stages)
        assert planned["overhead"] <= cap and planned["A"] <= stock["A"]
        single = rows[f"single stage <= {cap:.2f}"]
        assert "none" in single or single["overhead"] <= cap
    table = memory.render([measured], markdown=True).splitlines()
    assert len(table) == 2 + len(rows) and all(line.count("|") == 11 for line in table)


def test_checks_and_where_the_head_sits(measured):
    lines = memory.check_targets([measured])
    # Only the never-worse checks apply to this model (the targets name MobileNetV2s).
    assert lines and all(line.startswith("check residual test model: plan <= ") for line in lines)
    assert all("HOLDS" in line for line in lines), lines
    stock = measured["rows"][0]
    # The stock head is a live set the explanation names, tensor by tensor, at an op of the model.
    assert stock["head_at"].startswith("op ") and f"live {stock['A']:,} B = " in stock["head_at"]


def test_a_missed_target_says_what_holds_the_head(measured, monkeypatch):
    monkeypatch.setattr(memory, "TARGETS", [("residual", "plan <= 1.10", 1, 1.10)])
    (line, *_) = memory.check_targets([measured])
    assert "A' <= 1 B at MAC overhead <= 1.10: NOT MET" in line
    assert "the head without input sits at op " in line and " live " in line
