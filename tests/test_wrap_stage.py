import os

os.environ["TF_CPP_MIN_LOG_LEVEL"] = "3"

import numpy as np  # noqa: E402
import pytest  # noqa: E402

import keras  # noqa: E402
from keras_patch.keras.patch_stage import PatchStage  # noqa: E402
from keras_patch.keras.wrap import wrap_stage  # noqa: E402

layers = keras.layers


def images(size, n=2, seed=0):
    rng = np.random.default_rng(seed)
    return rng.uniform(-1, 1, (n, size, size, 3)).astype("float32")


@pytest.fixture(scope="module")
def mobilenet():
    keras.utils.set_random_seed(0)
    return keras.applications.MobileNetV2(
        input_shape=(96, 96, 3), alpha=0.35, weights=None, classifier_activation=None
    )


def residual_model():
    """conv-bn-relu, a residual block closed by `add`, then a head."""
    keras.utils.set_random_seed(0)
    inputs = keras.Input((32, 32, 3), name="image")
    x = layers.Conv2D(8, 3, strides=2, padding="same", name="stem")(inputs)
    x = layers.BatchNormalization(name="stem_bn")(x)
    x = layers.ReLU(6.0, name="stem_relu")(x)
    y = layers.DepthwiseConv2D(3, padding="same", name="dw")(x)
    y = layers.BatchNormalization(name="dw_bn")(y)
    y = layers.ReLU(name="dw_relu")(y)
    y = layers.Conv2D(8, 1, name="pw")(y)
    x = layers.Add(name="add")([x, y])
    x = layers.MaxPooling2D(name="pool")(x)
    x = layers.Conv2D(16, 3, padding="same", activation="relu", name="conv2")(x)
    x = layers.GlobalAveragePooling2D(name="gap")(x)
    outputs = layers.Dense(5, activation="softmax", name="head")(x)
    return keras.Model(inputs, outputs, name="resnet_tiny")


def check_same_predictions(original, wrapped, x):
    np.testing.assert_array_equal(
        wrapped(x, training=False).numpy(), original(x, training=False).numpy()
    )


def check_shared_weights(original, wrapped):
    assert {id(w) for w in wrapped.weights} == {id(w) for w in original.weights}
    assert len(wrapped.weights) == len(original.weights)


# ------------------------------------------------------------- MobileNetV2


def test_mobilenet_v2(mobilenet):
    wrapped = wrap_stage(mobilenet, until="block_5_add", grid=(4, 4), name="stage1")
    stage = wrapped.get_layer("stage1")
    assert isinstance(stage, PatchStage)
    assert stage.grid == (4, 4)
    assert tuple(stage.block.output.shape) == (None, 12, 12, 16)
    assert wrapped.name == mobilenet.name
    assert wrapped.layers[1] is stage and len(wrapped.layers) == len(mobilenet.layers) - len(
        stage.block.layers
    ) + 2
    # Same layer objects, so same variables, inside and after the stage.
    assert stage.block.get_layer("Conv1") is mobilenet.get_layer("Conv1")
    assert wrapped.get_layer("Conv_1") is mobilenet.get_layer("Conv_1")
    check_shared_weights(mobilenet, wrapped)

    x = images(96)
    check_same_predictions(mobilenet, wrapped, x)
    np.testing.assert_array_equal(
        wrapped.predict(x, verbose=0), mobilenet.predict(x, verbose=0)
    )


def test_mobilenet_weights_are_shared_not_copied(mobilenet):
    wrapped = wrap_stage(mobilenet, until="block_5_add", name="stage1")
    x = images(96, seed=1)
    before = wrapped(x).numpy()
    kernel = mobilenet.get_layer("block_1_project").kernel
    old = kernel.numpy()
    try:
        kernel.assign(old * 2.0)
        inner = wrapped.get_layer("stage1").block.get_layer("block_1_project").kernel
        np.testing.assert_array_equal(inner.numpy(), old * 2.0)
        after = wrapped(x).numpy()
        assert not np.array_equal(after, before)
        check_same_predictions(mobilenet, wrapped, x)
    finally:
        kernel.assign(old)


@pytest.mark.parametrize(
    "alpha, size, until, stage_shape",
    [
        (0.5, 64, "block_2_add", (None, 16, 16, 16)),
        (0.75, 80, "block_1_project_BN", (None, 20, 20, 24)),
    ],
)
def test_mobilenet_other_configs(alpha, size, until, stage_shape):
    keras.utils.set_random_seed(0)
    base = keras.applications.MobileNetV2(
        input_shape=(size, size, 3), alpha=alpha, weights=None, include_top=False
    )
    wrapped = wrap_stage(base, until=until, grid=2)
    stage = [l for l in wrapped.layers if isinstance(l, PatchStage)]
    assert len(stage) == 1 and stage[0].grid == (2, 2)
    assert tuple(stage[0].block.output.shape) == stage_shape
    check_shared_weights(base, wrapped)
    check_same_predictions(base, wrapped, images(size))


def test_mobilenet_rejects_until_inside_residual(mobilenet):
    with pytest.raises(ValueError, match="block_5_add.*block_4_add.*single entry"):
        wrap_stage(mobilenet, until="block_5_project_BN")


# ------------------------------------------------------- user models


@pytest.mark.parametrize("until", ["add", "pool", "stem_relu"])
def test_residual_model(until):
    model = residual_model()
    wrapped = wrap_stage(model, until=until, grid=(2, 2), name="kp_stage")
    stage = wrapped.get_layer("kp_stage")
    assert stage.block.layers[-1].name == until
    assert wrapped.layers[0].name == "image"
    check_shared_weights(model, wrapped)
    x = images(32, n=3)
    check_same_predictions(model, wrapped, x)
    np.testing.assert_array_equal(wrapped.predict(x, verbose=0), model.predict(x, verbose=0))


def test_sequential_model():
    keras.utils.set_random_seed(0)
    model = keras.Sequential(
        [
            keras.Input((16, 16, 3)),
            layers.Conv2D(4, 3, activation="relu", name="c1"),
            layers.AveragePooling2D(2, name="p1"),
            layers.Flatten(name="flat"),
            layers.Dense(2, name="d"),
        ]
    )
    wrapped = wrap_stage(model, until="p1", grid=(1, 2), name="s")
    assert wrapped.get_layer("s").grid == (1, 2)
    check_shared_weights(model, wrapped)
    check_same_predictions(model, wrapped, images(16))


def test_multi_output_model_and_whole_model_stage():
    inputs = keras.Input((16, 16, 3))
    x = layers.Conv2D(4, 3, name="c1")(inputs)
    a = layers.ReLU(name="a")(x)
    b = layers.MaxPooling2D(name="b")(a)
    model = keras.Model(inputs, {"a_out": layers.Conv2D(2, 1, name="ca")(a), "b": b})
    wrapped = wrap_stage(model, until="a", name="s")
    out, expected = wrapped(images(16)), model(images(16))
    assert set(out) == {"a_out", "b"}
    for key in out:
        np.testing.assert_array_equal(out[key].numpy(), expected[key].numpy())
    whole = keras.Model(inputs, b)
    wrapped = wrap_stage(whole, until="b", name="s2")
    assert [type(l).__name__ for l in wrapped.layers] == ["InputLayer", "PatchStage"]
    check_same_predictions(whole, wrapped, images(16))


def test_wrapped_model_save_load_and_training(tmp_path):
    model = residual_model()
    wrapped = wrap_stage(model, until="add", name="s")
    x = images(32, n=4)
    path = str(tmp_path / "wrapped.keras")
    wrapped.save(path)
    loaded = keras.models.load_model(path)
    assert isinstance(loaded.get_layer("s"), PatchStage)
    np.testing.assert_array_equal(loaded.predict(x, verbose=0), wrapped.predict(x, verbose=0))

    # Training the wrapped model trains the original (shared variables).
    wrapped.compile(optimizer=keras.optimizers.SGD(0.1), loss="mse", jit_compile=False)
    before = model.get_layer("stem").kernel.numpy().copy()
    wrapped.fit(x, np.zeros((4, 5), "float32"), batch_size=2, verbose=0)
    assert not np.array_equal(model.get_layer("stem").kernel.numpy(), before)
    check_same_predictions(model, wrapped, x)


# ------------------------------------------------------------ errors


def test_until_not_a_layer():
    with pytest.raises(ValueError, match=r"no layer named 'ad'.*Close names: \['add'"):
        wrap_stage(residual_model(), until="ad")
    with pytest.raises(ValueError, match="no layer named 'nothing_like_it'"):
        wrap_stage(residual_model(), until="nothing_like_it")


def test_until_is_input_layer():
    with pytest.raises(ValueError, match="input layer"):
        wrap_stage(residual_model(), until="image")


def test_multiple_inputs():
    a, b = keras.Input((8, 8, 3), name="a"), keras.Input((8, 8, 3), name="b")
    x = layers.Add(name="add")([layers.ReLU(name="r")(a), b])
    with pytest.raises(ValueError, match="one input.*has 2"):
        wrap_stage(keras.Model([a, b], x), until="r")


@pytest.mark.parametrize("until", ["dw", "dw_relu", "pw"])
def test_skip_connection_crossing_until(until):
    with pytest.raises(ValueError, match=r"layer 'add' \(Add\) uses the output of layer"):
        wrap_stage(residual_model(), until=until)


def test_input_used_after_stage():
    inputs = keras.Input((8, 8, 3))
    x = layers.Conv2D(3, 1, name="c")(inputs)
    x = layers.Add(name="add")([x, inputs])
    with pytest.raises(ValueError, match=r"'add' \(Add\) uses the model input"):
        wrap_stage(keras.Model(inputs, x), until="c")


def test_inner_tensor_is_a_model_output():
    inputs = keras.Input((8, 8, 3))
    x = layers.Conv2D(3, 1, name="c")(inputs)
    y = layers.ReLU(name="r")(x)
    with pytest.raises(ValueError, match="the model outputs uses the output of layer 'c'"):
        wrap_stage(keras.Model(inputs, [x, y]), until="r")


def test_unsupported_layer_in_prefix():
    inputs = keras.Input((8, 8, 3))
    x = layers.Conv2D(4, 1, name="c")(inputs)
    x = layers.Activation("swish", name="swish")(x)
    x = layers.Conv2D(4, 1, name="c2")(x)
    model = keras.Model(inputs, layers.Flatten()(x))
    with pytest.raises(
        ValueError,
        match=r"PatchStage 's': layer 'swish' \(Activation\) uses activation 'silu'.*"
        r"Supported layers: Conv2D",
    ):
        wrap_stage(model, until="c2", name="s")
    x = layers.Conv2D(4, 1, activation="elu", name="elu_conv")(inputs)
    model = keras.Model(inputs, layers.Conv2D(4, 1, name="c3")(x))
    with pytest.raises(ValueError, match=r"layer 'elu_conv' \(Conv2D\) uses activation 'elu'"):
        wrap_stage(model, until="elu_conv")


def test_dense_in_prefix():
    model = keras.Sequential(
        [keras.Input((8, 8, 3)), layers.Conv2D(4, 1, name="c"), layers.Dense(2, name="d")]
    )
    with pytest.raises(ValueError, match=r"layer 'd' \(Dense\) cannot run patch by patch"):
        wrap_stage(model, until="d", name="s")


def test_stage_name_collision():
    with pytest.raises(ValueError, match="already has a layer named 'head'"):
        wrap_stage(residual_model(), until="add", name="head")


def test_bad_grid():
    with pytest.raises(ValueError, match="grid"):
        wrap_stage(residual_model(), until="add", grid=(0, 2))


def test_auto_name_avoids_existing_layers():
    keras.backend.clear_session()  # the next auto name is "patch_stage"
    inputs = keras.Input((8, 8, 3))
    x = layers.Conv2D(4, 1, name="c")(inputs)
    model = keras.Model(inputs, layers.ReLU(name="patch_stage")(x))
    wrapped = wrap_stage(model, until="c")
    names = [l.name for l in wrapped.layers]
    assert names[1].startswith("patch_stage_") and "patch_stage" in names
    check_same_predictions(model, wrapped, images(8))
