"""Quantization-aware fine-tuning (keras_patch.tuning.qat): tf_keras rebuild, QAT, patched int8 export.

A tiny PatchStage model (stem conv, an inverted-residual block with Add and
ZeroPadding2D in the stage, conv + pooling + Dense head) is trained for a few
epochs on a small `person_dataset`, then fine-tuned with tfmot in a worker
process and patched.  Measured on 2 CPU cores: about 40 s for the module when idle,
55-60 s while other TensorFlow jobs ran.
"""

import importlib.util
import logging
import os
import subprocess
import sys

import numpy as np
import pytest

# Not pytest.importorskip: importing tfmot sets TF_USE_LEGACY_KERAS=1 for this process and its children.
if any(importlib.util.find_spec(m) is None for m in ("tf_keras", "tensorflow_model_optimization")):
    pytest.skip("needs tf_keras and tensorflow-model-optimization", allow_module_level=True)

import keras  # noqa: E402

import keras_patch  # noqa: E402
from keras_patch.datasets import person_dataset  # noqa: E402
from keras_patch.tuning.qat import (  # noqa: E402
    LayerMappingError,
    model_spec,
    quantization_aware_finetune,
)

SIZE = 40
# QAT int8 accuracy may be below the float accuracy by at most this much (120 val images: 6 images).
QAT_TOLERANCE = 0.05


def tiny_model(seed: int = 0) -> keras.Model:
    keras.utils.set_random_seed(seed)
    L = keras.layers
    inputs = keras.Input((SIZE, SIZE, 1))
    x = L.ZeroPadding2D(1, name="pad")(inputs)
    x = L.Conv2D(8, 3, strides=2, padding="valid", use_bias=False, name="stem")(x)
    x = L.BatchNormalization(momentum=0.9, name="stem_bn")(x)
    x = L.ReLU(6.0, name="stem_relu")(x)
    y = L.DepthwiseConv2D(3, padding="same", use_bias=False, name="dw")(x)
    y = L.BatchNormalization(momentum=0.9, name="dw_bn")(y)
    y = L.ReLU(6.0, name="dw_relu")(y)
    y = L.Conv2D(8, 1, use_bias=False, name="project")(y)
    y = L.BatchNormalization(momentum=0.9, name="project_bn")(y)
    x = L.Add(name="stage_out")([x, y])
    x = L.Conv2D(16, 3, strides=2, padding="same", activation="relu", name="head_conv")(x)
    x = L.GlobalAveragePooling2D(name="pool")(x)
    outputs = L.Dense(2, name="logits")(x)
    base = keras.Model(inputs, outputs, name="tiny")
    return keras_patch.wrap_stage(base, until="stage_out", grid=(2, 2))


@pytest.fixture(scope="module")
def data():
    x, y = person_dataset(600, seed=0, image_size=SIZE)
    return (x[:480], y[:480]), (x[480:], y[480:])


@pytest.fixture(scope="module")
def trained(data):
    (x_train, y_train), (x_val, y_val) = data
    model = tiny_model()
    model.compile(optimizer=keras.optimizers.Adam(1e-2),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True), metrics=["accuracy"])
    model.fit(x_train, y_train, epochs=12, batch_size=32, verbose=0)
    return model


@pytest.fixture(scope="module")
def result(trained, data):
    return quantization_aware_finetune(trained, *data, epochs=1, learning_rate=1e-4)


def test_rebuild_is_the_same_model(result):
    assert result.rebuild_max_abs_diff < 1e-4


def test_patched_qat_model_is_bit_exact(result):
    assert result.bit_exact
    # the stage became one KP_PATCH_STAGE op
    from keras_patch.graph.patchify import find_stages
    from keras_patch.graph.tflite_model import TFLiteModel

    assert len(find_stages(TFLiteModel.from_bytes(result.patched_tflite))) == 1
    assert find_stages(TFLiteModel.from_bytes(result.unpatched_tflite)) == []


def test_qat_int8_accuracy_drop(result):
    logging.getLogger(__name__).info(
        "float %.3f, PTQ int8 %.3f (drop %.3f), QAT int8 %.3f (drop %.3f)",
        result.float_accuracy, result.ptq_int8_accuracy, result.ptq_drop,
        result.qat_int8_accuracy, result.qat_drop)
    assert result.float_accuracy > 0.6  # the model learned something, so the drop means something
    assert result.qat_drop <= QAT_TOLERANCE  # PTQ's drop is only reported (logged above)


def test_unmappable_layer_is_named():
    inputs = keras.Input((8, 8, 1))
    x = keras.layers.Conv2D(4, 3, padding="same", name="conv")(inputs)
    x = keras.layers.LayerNormalization(name="my_layer_norm")(x)
    model = keras.Model(inputs, keras.layers.Dense(2)(keras.layers.Flatten()(x)))
    with pytest.raises(LayerMappingError, match="my_layer_norm.*LayerNormalization"):
        model_spec(model)
    with pytest.raises(LayerMappingError, match="my_layer_norm"):
        quantization_aware_finetune(model, (np.zeros((2, 8, 8, 1)), np.zeros(2)), (np.zeros((2, 8, 8, 1)), np.zeros(2)))


def test_missing_packages_give_an_informative_import_error(monkeypatch):
    from keras_patch.tuning import qat

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "tensorflow_model_optimization" else real(name, *a))
    with pytest.raises(ImportError, match="pip install tensorflow-model-optimization tf_keras"):
        qat.check_dependencies()


def test_keras_patch_imports_neither_tfmot_nor_tf_keras(result):
    # after a QAT run: the worker process kept tfmot's TF_USE_LEGACY_KERAS=1 to itself
    assert "TF_USE_LEGACY_KERAS" not in os.environ
    assert not any(m.startswith(("tf_keras", "tensorflow_model_optimization")) for m in sys.modules)
    code = ("import sys, keras_patch, keras_patch.tuning.qat\n"
            "print([m for m in sys.modules if m.startswith(('tf_keras', 'tensorflow_model_optimization'))])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip().splitlines()[-1] == "[]"
