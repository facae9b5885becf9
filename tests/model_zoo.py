"""Small Keras models and an int8 TFLite conversion helper for the tests.

Every builder returns an uncompiled `keras.Model` with seeded random
weights; `to_int8_tflite` turns one into a fully int8 `.tflite`.

Example:

>>> from model_zoo import residual_model, to_int8_tflite
>>> tflite_bytes = to_int8_tflite(residual_model())  # doctest: +SKIP
"""

from __future__ import annotations

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import numpy as np  # noqa: E402


def _keras(seed=None):
    import keras

    if seed is not None:
        keras.utils.set_random_seed(seed)
    return keras


def tiny_conv_model(input_shape=(16, 16, 3), num_classes: int = 4, seed: int = 0):
    """Conv2D -> DepthwiseConv2D -> global average pool (MEAN) -> Dense."""
    keras = _keras(seed)
    return keras.Sequential(
        [
            keras.Input(input_shape),
            keras.layers.Conv2D(8, 3, activation="relu"),
            keras.layers.DepthwiseConv2D(3, activation="relu"),
            keras.layers.GlobalAveragePooling2D(),
            keras.layers.Dense(num_classes),
        ],
        name="tiny_conv",
    )


def _inverted_residual(x, expansion: int, filters: int, stride: int, name: str):
    keras = _keras()
    layers = keras.layers
    in_channels = x.shape[-1]
    y = layers.Conv2D(in_channels * expansion, 1, use_bias=False, name=f"{name}_expand")(x)
    y = layers.BatchNormalization(name=f"{name}_expand_bn")(y)
    y = layers.ReLU(6.0, name=f"{name}_expand_relu")(y)
    y = layers.DepthwiseConv2D(
        3, strides=stride, padding="same", use_bias=False, name=f"{name}_dw"
    )(y)
    y = layers.BatchNormalization(name=f"{name}_dw_bn")(y)
    y = layers.ReLU(6.0, name=f"{name}_dw_relu")(y)
    y = layers.Conv2D(filters, 1, use_bias=False, name=f"{name}_project")(y)
    y = layers.BatchNormalization(name=f"{name}_project_bn")(y)
    if stride == 1 and in_channels == filters:
        y = layers.Add(name=f"{name}_add")([x, y])
    return y


def residual_model(input_shape=(48, 48, 3), num_classes: int = 10, seed: int = 0):
    """A MobileNetV2-like stack of inverted residual blocks (with ADD)."""
    keras = _keras(seed)
    layers = keras.layers
    inputs = keras.Input(input_shape)
    x = layers.Conv2D(16, 3, strides=2, padding="same", use_bias=False, name="stem")(inputs)
    x = layers.BatchNormalization(name="stem_bn")(x)
    x = layers.ReLU(6.0, name="stem_relu")(x)
    x = _inverted_residual(x, 1, 8, 1, "b0")
    x = _inverted_residual(x, 4, 12, 2, "b1")
    x = _inverted_residual(x, 4, 12, 1, "b2")
    x = _inverted_residual(x, 4, 16, 2, "b3")
    x = _inverted_residual(x, 4, 16, 1, "b4")
    x = _inverted_residual(x, 4, 16, 1, "b5")
    x = layers.Conv2D(64, 1, use_bias=False, name="head")(x)
    x = layers.ReLU(6.0, name="head_relu")(x)
    x = layers.GlobalAveragePooling2D(name="pool")(x)
    outputs = layers.Dense(num_classes, name="logits")(x)
    return keras.Model(inputs, outputs, name="residual")


def mobilenet_v2(alpha: float = 0.35, size: int = 144, num_classes: int = 10, seed: int = 0):
    """keras.applications.MobileNetV2 (random weights, avg pooling) + Dense.

    The head is a small `num_classes` Dense without softmax: with random
    weights the activations shrink to scales around 1e-8, and TFLM's int8
    SOFTMAX aborts the process on such an input scale.
    """
    keras = _keras(seed)
    backbone = keras.applications.MobileNetV2(
        input_shape=(size, size, 3),
        alpha=alpha,
        weights=None,
        include_top=False,
        pooling="avg",
    )
    outputs = keras.layers.Dense(num_classes, name="logits")(backbone.output)
    return keras.Model(backbone.input, outputs, name=f"mobilenet_v2_{alpha}_{size}")


def pooling_model(input_shape=(30, 30, 3), num_classes: int = 6, seed: int = 0):
    """ZeroPadding2D (PAD), MaxPool, AvgPool, global average pool (MEAN)."""
    keras = _keras(seed)
    layers = keras.layers
    inputs = keras.Input(input_shape)
    x = layers.ZeroPadding2D(1)(inputs)
    x = layers.Conv2D(12, 3, activation="relu")(x)
    x = layers.MaxPooling2D(2)(x)
    x = layers.ZeroPadding2D(((1, 0), (0, 1)))(x)
    x = layers.Conv2D(16, 3, activation="relu")(x)
    x = layers.AveragePooling2D(2)(x)
    x = layers.GlobalAveragePooling2D()(x)
    outputs = layers.Dense(num_classes)(x)
    return keras.Model(inputs, outputs, name="pooling")


def mixed_ops_model(input_shape=(20, 20, 3), num_classes: int = 5, seed: int = 0):
    """CONCATENATION, MUL, HARD_SWISH, LOGISTIC, RESHAPE and SOFTMAX."""
    keras = _keras(seed)
    layers = keras.layers
    inputs = keras.Input(input_shape)
    a = layers.Conv2D(8, 3, padding="same", activation="hard_swish")(inputs)
    b = layers.DepthwiseConv2D(3, padding="same")(inputs)
    x = layers.Concatenate()([a, b])
    gate = layers.Conv2D(11, 1, activation="sigmoid")(x)
    x = layers.Multiply()([x, gate])
    x = layers.MaxPooling2D(2)(x)
    x = layers.Reshape((10 * 10 * 11,))(x)
    outputs = layers.Dense(num_classes, activation="softmax")(x)
    return keras.Model(inputs, outputs, name="mixed_ops")


def branch_concat_model(input_shape=(12, 12, 4), num_classes: int = 3, seed: int = 0):
    """Two equal-sized parallel 1x1 convs -> ADD -> 3x3 conv -> CONCATENATION.

    Its greedy plan depends on how TFLM breaks ties between equal-sized
    buffers: placing them in insertion order instead gives a 15 % smaller
    (wrong) head.
    """
    keras = _keras(seed)
    layers = keras.layers
    inputs = keras.Input(input_shape)
    a = layers.Conv2D(8, 1)(inputs)
    b = layers.Conv2D(8, 1)(inputs)
    x = layers.Add()([a, b])
    y = layers.Conv2D(4, 3, padding="same")(x)
    x = layers.Concatenate()([y, x])
    x = layers.GlobalAveragePooling2D()(x)
    outputs = layers.Dense(num_classes)(x)
    return keras.Model(inputs, outputs, name="branch_concat")


def channel_mean_model(input_shape=(32, 32, 3), num_classes: int = 4, seed: int = 0):
    """A MEAN over the channel axis, whose int8 kernel needs an int32
    accumulator scratch buffer 4x the size of its output."""
    keras = _keras(seed)
    layers = keras.layers
    inputs = keras.Input(input_shape)
    x = layers.Conv2D(4, 3, padding="same", activation="relu")(inputs)
    x = layers.Lambda(lambda t: keras.ops.mean(t, axis=-1, keepdims=True))(x)
    x = layers.Conv2D(4, 3, strides=2, activation="relu")(x)
    x = layers.GlobalAveragePooling2D()(x)
    outputs = layers.Dense(num_classes)(x)
    return keras.Model(inputs, outputs, name="channel_mean")


def tiny_scale_softmax_model(num_classes: int = 10, seed: int = 0):
    """Dense with ~1e-9 weights -> SOFTMAX: an int8 model TFLM aborts on.

    The logits' quantization scale ends up around 1e-9, which trips a check
    in TFLM's int8 softmax Prepare (the process aborts with SIGABRT) - the
    same failure as the stock 1000-class MobileNetV2 head with random
    weights.
    """
    keras = _keras(seed)
    return keras.Sequential(
        [
            keras.Input((8,)),
            keras.layers.Dense(
                num_classes,
                kernel_initializer=keras.initializers.RandomNormal(stddev=1e-9, seed=0),
            ),
            keras.layers.Softmax(),
        ],
        name="tiny_scale_softmax",
    )


def representative_samples(keras_model, num_samples: int = 4, seed: int = 0):
    """Uniform [0, 1) float32 samples shaped like the model's (batch-1) input."""
    rng = np.random.default_rng(seed)
    shape = (1,) + tuple(int(d) for d in keras_model.input_shape[1:])
    return [rng.random(shape, dtype=np.float32) for _ in range(num_samples)]


def to_int8_tflite(keras_model, int8_io: bool = True, num_samples: int = 4, seed: int = 0) -> bytes:
    """Full-integer post-training quantization with the TFLite converter.

    Args:
        keras_model: the model to convert.
        int8_io: int8 input and output tensors; `False` keeps float32 I/O,
            so the graph starts with QUANTIZE and ends with DEQUANTIZE.
        num_samples: representative samples (random, see `seed`).
        seed: seed of the representative samples.

    Returns:
        The `.tflite` flatbuffer.
    """
    from keras_patch.keras.export import convert_int8

    return bytes(convert_int8(keras_model, representative_samples(keras_model, num_samples, seed), int8_io=int8_io))


def dynamic_input_model(channels: int = 3, num_classes: int = 3, seed: int = 0):
    """Conv2D -> DepthwiseConv2D -> global pool -> Dense on a (None, None, C) input.

    Converted with `to_int8_tflite_dynamic`, its activations have dynamic
    height and width (shape signature -1).
    """
    keras = _keras(seed)
    layers = keras.layers
    inputs = keras.Input((None, None, channels))
    x = layers.Conv2D(8, 3, strides=2, padding="same", activation="relu")(inputs)
    x = layers.DepthwiseConv2D(3, padding="same", activation="relu")(x)
    x = layers.GlobalAveragePooling2D()(x)
    outputs = layers.Dense(num_classes)(x)
    return keras.Model(inputs, outputs, name="dynamic_input")


def to_int8_tflite_dynamic(keras_model, sample_shape=(16, 16, 3), num_samples: int = 3, seed: int = 0) -> bytes:
    """Full-int8 conversion of a model with unknown spatial dims (int8 I/O);
    calibration samples have `sample_shape`."""
    from keras_patch.keras.export import convert_int8

    rng = np.random.default_rng(seed)
    samples = [rng.random((1, *sample_shape), dtype=np.float32) for _ in range(num_samples)]
    return bytes(convert_int8(keras_model, samples))


def to_float_tflite(keras_model) -> bytes:
    """Plain float32 conversion (no quantization at all)."""
    import tensorflow as tf

    return bytes(tf.lite.TFLiteConverter.from_keras_model(keras_model).convert())
