"""Models shared by several test files, converted once per test session."""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import pytest

import model_zoo


def pytest_configure(config):
    config.addinivalue_line(
        "markers",
        "slow: over ~20 s each on 2 cores (the ci-profile property tests of test_bit_exact, the examples, "
        "the distributed search, the fuzzer, the demo, the docs' code blocks). The README's test command and "
        ".ci/run run them; `-m 'not slow'` is a quick run.",
    )


@pytest.fixture(scope="session")
def residual() -> bytes:
    """model_zoo.residual_model as a full-int8 .tflite (int8 input and output)."""
    return model_zoo.to_int8_tflite(model_zoo.residual_model())


@pytest.fixture(scope="session")
def mbv2_144() -> bytes:
    """MobileNetV2 0.35@144 (random weights, 10-class logits) as a full-int8 .tflite."""
    return model_zoo.to_int8_tflite(model_zoo.mobilenet_v2(alpha=0.35, size=144))
