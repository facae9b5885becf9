"""Models shared by several test files, converted once per test session."""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import pytest

import model_zoo


@pytest.fixture(scope="session")
def residual() -> bytes:
    """model_zoo.residual_model as a full-int8 .tflite (int8 input and output)."""
    return model_zoo.to_int8_tflite(model_zoo.residual_model())


@pytest.fixture(scope="session")
def mbv2_144() -> bytes:
    """MobileNetV2 0.35@144 (random weights, 10-class logits) as a full-int8 .tflite."""
    return model_zoo.to_int8_tflite(model_zoo.mobilenet_v2(alpha=0.35, size=144))
