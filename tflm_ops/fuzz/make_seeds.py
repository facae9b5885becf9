"""Writes fuzz seeds (tflm_ops/fuzz/seeds/): options of random valid stages
(plus stages with `in_place` set and stages ending with a MEAN layer).

    PYTHONPATH=. python3 tflm_ops/fuzz/make_seeds.py

Each seed is the options bytes from the Python encoder followed by the
8-byte tail fuzz_options.cc reads (all zero: matching weights).
"""

import os
import sys

from hypothesis import HealthCheck, given, settings

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", ".."))
from keras_patch.stage import options as o  # noqa: E402
from tests.test_cpp_executor import stages  # noqa: E402

OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "seeds")


def write_seeds(prefix: str, strategy, count: int, what: str) -> None:
    """Draws `count` examples of `strategy` (derandomized: the same seeds every run), each an
    options object or a `(options, ...)` tuple, and writes the distinct ones as OUT/<prefix>_NN."""
    written = []

    @settings(max_examples=count, derandomize=True, database=None, deadline=None,
              suppress_health_check=list(HealthCheck))
    @given(drawn=strategy)
    def collect(drawn):
        options = drawn[0] if isinstance(drawn, tuple) else drawn
        data = o.encode_options(options) + bytes(8)
        if data not in written:
            written.append(data)

    collect()
    for i, data in enumerate(written):
        with open(os.path.join(OUT, f"{prefix}_{i:02d}"), "wb") as f:
            f.write(data)
    print(f"wrote {len(written)} {what} to {OUT}")


def main(count: int = 40) -> None:
    from hypothesis import strategies as st

    from tests.test_in_place import inverted_residual_stage, one_layer_depthwise

    os.makedirs(OUT, exist_ok=True)
    write_seeds("stage", stages(max_layers=6, max_size=10, max_channels=4), count, "seeds")
    # `in_place` set (options version 2): one-layer depthwise and MobileNetV2 blocks.
    write_seeds("in_place", st.one_of(one_layer_depthwise(max_size=9, max_channels=4), inverted_residual_stage()),
                count // 4, "in-place seeds")
    write_seeds("mean", mean_stages(), count // 4, "MEAN seeds")


def mean_stages():
    """Stages ending with a MEAN layer (options version 3): a random valid stage, then the
    global average pool of its output (the grid then tiles the MEAN's input)."""
    from hypothesis import strategies as st

    from tests.test_cpp_mean import with_mean

    return st.builds(lambda stage, scale, zp: with_mean(stage[0], scale, zp),
                     stages(max_layers=4, max_size=10, max_channels=4),
                     st.sampled_from([0.01, 0.3, 2.0]), st.integers(-128, 127))


if __name__ == "__main__":
    main()
