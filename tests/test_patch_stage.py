import os

os.environ["TF_CPP_MIN_LOG_LEVEL"] = "3"

import collections  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import tensorflow as tf  # noqa: E402

import keras  # noqa: E402
from keras_patch.keras.patch_stage import STAGE_SCOPE_PREFIX  # noqa: E402
from keras_patch.keras.patch_stage import PatchStage  # noqa: E402
from keras_patch.keras.patch_stage import stage_of_tensor_name  # noqa: E402
from keras_patch.keras.patch_stage import stage_scope_name  # noqa: E402
from keras_patch.graph.tflite_model import TFLiteModel  # noqa: E402

layers = keras.layers


def make_block(seed=0, name="block"):
    """A block with every supported layer type (residual, pads, pools)."""
    keras.utils.set_random_seed(seed)
    inputs = keras.Input((16, 16, 3))
    x = layers.ZeroPadding2D(1, name="pad")(inputs)
    x = layers.Conv2D(8, 3, strides=1, name="conv")(x)
    x = layers.BatchNormalization(name="bn")(x)
    x = layers.ReLU(6.0, name="relu6")(x)
    y = layers.DepthwiseConv2D(3, padding="same", activation="relu", name="dw")(x)
    y = layers.BatchNormalization(name="dw_bn")(y)
    y = layers.Conv2D(8, 1, activation="relu6", name="pw")(y)
    x = layers.Add(name="add")([x, y])
    x = layers.Activation("relu", name="act")(x)
    x = layers.MaxPooling2D(name="max")(x)
    x = layers.AveragePooling2D(2, padding="same", name="avg")(x)
    return keras.Model(inputs, x, name=name)


def make_model(block, stage=True, seed=1):
    keras.utils.set_random_seed(seed)
    inputs = keras.Input((16, 16, 3))
    x = PatchStage(block, grid=(2, 2), name="stage1")(inputs) if stage else block(inputs)
    x = layers.Conv2D(4, 1, name="head_conv")(x)
    x = layers.GlobalAveragePooling2D(name="gap")(x)
    outputs = layers.Dense(3, name="dense")(x)
    return keras.Model(inputs, outputs)


def data(n=4, seed=0):
    return np.random.default_rng(seed).normal(size=(n, 16, 16, 3)).astype("float32")


# ------------------------------------------------------------- construction


def test_properties_and_grid_forms():
    block = make_block()
    stage = PatchStage(block, grid=3, name="s")
    assert stage.block is block
    assert stage.grid == (3, 3)
    assert PatchStage(block, grid=[2, 4]).grid == (2, 4)
    assert PatchStage(block, grid=(np.int64(1), 2)).grid == (1, 2)
    assert PatchStage(block).grid == (2, 2)


@pytest.mark.parametrize(
    "grid, message",
    [
        (0, "positive"),
        ((2, 0), "n_w=0"),
        ((-1, 2), "n_h=-1"),
        ((2,), "pair"),
        ((2, 2, 2), "pair"),
        ((1.5, 2), "ints"),
        ("2", "pair"),
        (True, "grid"),
        ((2, None), "ints"),
    ],
)
def test_bad_grid(grid, message):
    with pytest.raises(ValueError, match=message):
        PatchStage(make_block(), grid=grid)


def test_grid_larger_than_output():
    stage = PatchStage(make_block(), grid=(2, 5), name="s")
    with pytest.raises(ValueError, match="5 patches along width.*4 pixels"):
        stage(keras.Input((16, 16, 3)))


def _seq(*block_layers):
    return keras.Sequential([keras.Input((8, 8, 4)), *block_layers])


@pytest.mark.parametrize(
    "layer, cls, detail",
    [
        (layers.Flatten(name="bad"), "Flatten", "cannot run patch by patch"),
        (layers.Dense(4, name="bad"), "Dense", "cannot run patch by patch"),
        (layers.LeakyReLU(name="bad"), "LeakyReLU", "cannot run patch by patch"),
        (layers.SeparableConv2D(4, 3, name="bad"), "SeparableConv2D", "cannot run"),
        (layers.Conv2DTranspose(4, 3, name="bad"), "Conv2DTranspose", "cannot run"),
        (layers.Activation("sigmoid", name="bad"), "Activation", "activation 'sigmoid'"),
        (layers.Activation("swish", name="bad"), "Activation", "activation 'silu'"),
        (layers.Conv2D(4, 3, activation="tanh", name="bad"), "Conv2D", "activation 'tanh'"),
        (
            layers.DepthwiseConv2D(3, activation="sigmoid", name="bad"),
            "DepthwiseConv2D",
            "activation 'sigmoid'",
        ),
        (layers.Conv2D(4, 3, groups=2, name="bad"), "Conv2D", "groups=2"),
        (layers.Conv2D(4, 3, dilation_rate=2, name="bad"), "Conv2D", "dilation_rate=(2, 2)"),
        (layers.DepthwiseConv2D(3, dilation_rate=2, name="bad"), "DepthwiseConv2D", "dilation_rate"),
        (layers.ReLU(negative_slope=0.1, name="bad"), "ReLU", "negative_slope=0.1"),
        (layers.ReLU(threshold=0.5, name="bad"), "ReLU", "threshold=0.5"),
        (layers.ReLU(max_value=4.0, name="bad"), "ReLU", "max_value=4.0"),
    ],
)
def test_unsupported_layer(layer, cls, detail):
    with pytest.raises(ValueError) as info:
        PatchStage(_seq(layers.Conv2D(4, 1), layer), name="stage1")
    message = str(info.value)
    assert message.startswith(f"PatchStage 'stage1': layer 'bad' ({cls})")
    assert detail in message
    assert "Supported layers: Conv2D, DepthwiseConv2D, BatchNormalization" in message


def test_unsupported_custom_activation():
    layer = layers.Activation(lambda t: t * 2.0, name="bad")
    with pytest.raises(ValueError, match=r"'bad' \(Activation\) uses activation"):
        PatchStage(_seq(layer), name="s")


def test_channels_first_rejected():
    layer = layers.MaxPooling2D(data_format="channels_first", name="bad")
    with pytest.raises(ValueError, match=r"'bad' \(MaxPooling2D\).*channels_first"):
        PatchStage(_seq(layer), name="s")


def test_unsupported_layer_in_nested_model():
    inner = keras.Sequential(
        [keras.Input((8, 8, 4)), layers.Conv2D(4, 1), layers.Dropout(0.5, name="drop")],
        name="inner",
    )
    with pytest.raises(ValueError, match=r"layer 'drop' \(Dropout\)"):
        PatchStage(_seq(layers.ReLU(), inner), name="s")
    ok = keras.Sequential([keras.Input((8, 8, 4)), layers.Conv2D(4, 1)], name="ok")
    PatchStage(_seq(layers.ReLU(), ok))


def test_keras_op_in_block_rejected():
    inputs = keras.Input((8, 8, 4))
    x = layers.Conv2D(4, 1)(inputs)
    outputs = keras.ops.sigmoid(x)
    with pytest.raises(ValueError, match="operation .*sigmoid.* cannot run patch by patch"):
        PatchStage(keras.Model(inputs, outputs), name="s")


def test_bad_block_type_and_io():
    with pytest.raises(ValueError, match="Sequential or functional"):
        PatchStage(layers.Conv2D(4, 1))
    a, b = keras.Input((8, 8, 4)), keras.Input((8, 8, 4))
    with pytest.raises(ValueError, match="exactly one input, got 2"):
        PatchStage(keras.Model([a, b], layers.Add()([a, b])))
    c = keras.Input((8, 8, 4))
    with pytest.raises(ValueError, match="exactly one output, got 2"):
        PatchStage(keras.Model(c, [layers.ReLU()(c), layers.ReLU()(c)]))
    d = keras.Input((8, 4))
    with pytest.raises(ValueError, match="input of `block` must be 4D"):
        PatchStage(keras.Model(d, layers.ReLU()(d)))


# ---------------------------------------------------------------- behavior


@pytest.mark.parametrize("training", [False, True])
def test_outputs_and_gradients_match_block(training):
    block = make_block()
    stage = PatchStage(block, name="s")
    x = tf.constant(data())
    with tf.GradientTape(persistent=True) as tape:
        tape.watch(x)
        expected = block(x, training=training)
        actual = stage(x, training=training)
        loss_expected = tf.reduce_sum(expected**2)
        loss_actual = tf.reduce_sum(actual**2)
    np.testing.assert_array_equal(actual.numpy(), expected.numpy())
    assert [id(w) for w in stage.trainable_weights] == [
        id(w) for w in block.trainable_weights
    ]
    variables = block.trainable_weights + [x]
    grads_expected = tape.gradient(loss_expected, variables)
    grads_actual = tape.gradient(loss_actual, variables)
    for g_e, g_a in zip(grads_expected, grads_actual):
        np.testing.assert_array_equal(g_a.numpy(), g_e.numpy())


def test_lazy_sequential_block():
    block = keras.Sequential([layers.Conv2D(4, 3, padding="same"), layers.ReLU()])
    stage = PatchStage(block, grid=(2, 2))
    x = data(2)
    np.testing.assert_array_equal(stage(x).numpy(), block(x).numpy())
    assert stage.compute_output_shape((None, 16, 16, 3)) == (None, 16, 16, 4)


def test_fit_matches_bare_block():
    x, y = data(8), np.random.default_rng(1).normal(size=(8, 3)).astype("float32")
    with_stage = make_model(make_block(seed=0), stage=True)
    bare = make_model(make_block(seed=0), stage=False)
    bare.set_weights(with_stage.get_weights())
    before = [w.copy() for w in with_stage.get_weights()]
    for model in (with_stage, bare):
        model.compile(
            optimizer=keras.optimizers.SGD(0.1), loss="mse", jit_compile=False
        )
        model.fit(x, y, batch_size=4, epochs=1, shuffle=False, verbose=0)
    after_stage, after_bare = with_stage.get_weights(), bare.get_weights()
    assert any(not np.array_equal(a, b) for a, b in zip(after_stage, before))
    for a, b in zip(after_stage, after_bare):
        np.testing.assert_array_equal(a, b)
    # BatchNormalization ran in training mode: its moving statistics moved.
    bn = with_stage.get_layer("stage1").block.get_layer("bn")
    assert not np.allclose(bn.moving_mean.numpy(), 0.0)


# ------------------------------------------------------------ serialization


def test_get_config_from_config():
    stage = PatchStage(make_block(), grid=(2, 4), name="s")
    config = stage.get_config()
    assert config["grid"] == [2, 4]
    assert config["name"] == "s"
    assert config["block"]["class_name"] == "Functional"
    clone = PatchStage.from_config(config)
    assert isinstance(clone, PatchStage)
    assert clone.grid == (2, 4) and clone.name == "s"
    assert [l.name for l in clone.block.layers] == [l.name for l in stage.block.layers]
    clone.block.set_weights(stage.block.get_weights())
    x = data(2)
    np.testing.assert_array_equal(clone(x).numpy(), stage(x).numpy())
    serialized = keras.saving.serialize_keras_object(stage)
    assert serialized["registered_name"] == "keras_patch>PatchStage"
    assert isinstance(keras.saving.deserialize_keras_object(serialized), PatchStage)


def test_save_load_round_trip(tmp_path):
    model = make_model(make_block())
    x = data(3)
    path = str(tmp_path / "m.keras")
    model.save(path)
    loaded = keras.models.load_model(path)
    stage = loaded.get_layer("stage1")
    assert isinstance(stage, PatchStage)
    assert stage.grid == (2, 2)
    np.testing.assert_array_equal(loaded.predict(x, verbose=0), model.predict(x, verbose=0))
    np.testing.assert_array_equal(
        stage.block.get_layer("bn").moving_variance.numpy(),
        model.get_layer("stage1").block.get_layer("bn").moving_variance.numpy(),
    )


# ------------------------------------------------------------- scope names


def test_scope_helpers():
    assert STAGE_SCOPE_PREFIX == "kp_patch_stage__"
    assert stage_scope_name("s") == "kp_patch_stage__s__"
    m = "model/s/kp_patch_stage__s__/block/conv/Conv2D"
    assert stage_of_tensor_name(m) == "s"
    assert stage_of_tensor_name("m/s_2/kp_patch_stage__s___2/conv/Relu") == "s"
    assert stage_of_tensor_name("m/s_1/kp_patch_stage__s_1__/conv/Relu") == "s_1"
    assert stage_of_tensor_name("m/s_1/kp_patch_stage__s_1___3/conv/Relu") == "s_1"
    assert stage_of_tensor_name("m/x/kp_patch_stage__s____1/conv") == "s_"
    assert stage_of_tensor_name("m/x/kp_patch_stage__a__b__/conv") == "a__b"
    assert stage_of_tensor_name("m/dense/MatMul;m/x/kp_patch_stage__s__/c/Relu") == "s"
    assert stage_of_tensor_name("m/dense/MatMul;m/dense/BiasAdd") is None
    assert stage_of_tensor_name("kp_patch_stage__s__") is None
    assert stage_of_tensor_name("") is None


def test_tflite_int8_names_mark_exactly_the_stage_ops():
    """Two stages named 's' and 's_1' (a TF uniquification look-alike)."""
    keras.utils.set_random_seed(0)
    first = keras.Sequential(
        [
            keras.Input((16, 16, 3)),
            layers.Conv2D(8, 3, padding="same"),
            layers.BatchNormalization(),
            layers.ReLU(6.0),
            layers.ZeroPadding2D(((1, 0), (1, 0))),  # not SAME: stays a PAD
            layers.DepthwiseConv2D(3, strides=2),
        ]
    )
    inner = keras.Input((8, 8, 8))
    y = layers.Conv2D(8, 1, activation="relu")(inner)
    y = layers.Add()([inner, y])
    second = keras.Model(inner, layers.AveragePooling2D(2)(y))
    inputs = keras.Input((16, 16, 3))
    x = PatchStage(first, grid=2, name="s")(inputs)
    x = PatchStage(second, grid=2, name="s_1")(x)
    x = layers.Conv2D(4, 1)(x)
    x = layers.GlobalAveragePooling2D()(x)
    model = keras.Model(inputs, layers.Dense(3)(x))

    converter = tf.lite.TFLiteConverter.from_keras_model(model)
    converter.optimizations = [tf.lite.Optimize.DEFAULT]
    rng = np.random.default_rng(0)
    converter.representative_dataset = lambda: (
        [rng.uniform(-1, 1, (1, 16, 16, 3)).astype("float32")] for _ in range(4)
    )
    converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
    converter.inference_input_type = tf.int8
    converter.inference_output_type = tf.int8
    tflite = TFLiteModel.from_bytes(converter.convert())

    found = collections.defaultdict(collections.Counter)
    for op in range(tflite.num_ops):
        stages = {stage_of_tensor_name(tflite.tensor(t).name) for t in tflite.op_outputs(op)}
        assert len(stages) == 1, tflite.op_label(op)
        found[stages.pop()][tflite.op_type(op)] += 1
    assert found == {
        "s": collections.Counter({"CONV_2D": 1, "PAD": 1, "DEPTHWISE_CONV_2D": 1}),
        "s_1": collections.Counter({"CONV_2D": 1, "ADD": 1, "AVERAGE_POOL_2D": 1}),
        None: collections.Counter({"CONV_2D": 1, "MEAN": 1, "FULLY_CONNECTED": 1}),
    }, dict(found)


# ------------------------------------------------------------- a final global average pool


def test_global_average_pool_only_ends_a_stage():
    block = keras.Sequential([keras.Input((8, 8, 4)), layers.Conv2D(4, 1),
                              layers.GlobalAveragePooling2D(keepdims=True, name="gap"), layers.Conv2D(4, 1)])
    with pytest.raises(ValueError, match="'gap' \\(GlobalAveragePooling2D\\).*can only end a patch stage"):
        PatchStage(block, name="stage1")


@pytest.mark.parametrize("keepdims", [False, True])
def test_stage_ending_with_global_average_pool_exports_one_mean_stage(keepdims):
    """The grid tiles the pool's input (8x8 here, so 3x3 fits though the output is 1x1); the
    export is one KP_PATCH_STAGE (options version 3) and bit-exact with the unpatched export."""
    from keras_patch.graph.patchify import find_stages, stage_options
    from keras_patch.keras.export import export_tflite
    from keras_patch.runtime.host import run_tflite

    def model(stage: bool):
        keras.utils.set_random_seed(3)
        block = keras.Sequential([keras.Input((16, 16, 3)), layers.Conv2D(8, 3, strides=2, padding="same",
                                                                          activation="relu"),
                                  layers.Conv2D(32, 1, activation="relu6"),
                                  layers.GlobalAveragePooling2D(keepdims=keepdims)], name="block")
        inputs = keras.Input((16, 16, 3))
        x = PatchStage(block, grid=(3, 3), name="stage1")(inputs) if stage else block(inputs)
        return keras.Model(inputs, layers.Dense(3)(layers.Flatten()(x)))

    with pytest.raises(ValueError, match="input of the final global average pool is only 8 pixels"):
        keras.Model(keras.Input((16, 16, 3)), PatchStage(model(False).layers[1], grid=(9, 1))(keras.Input((16, 16, 3))))
    patched = export_tflite(model(True), data(), arena=False)
    plain = export_tflite(model(False), data(), arena=False)
    p = TFLiteModel.from_bytes(patched)
    (op,) = find_stages(p)
    options = stage_options(p, op)
    assert options.ends_with_mean and options.version == 3 and tuple(options.grid) == (3, 3)
    x = np.random.default_rng(0).integers(-128, 128, (3, 16, 16, 3), dtype=np.int8)
    for executor in ("reference", "cpp"):
        np.testing.assert_array_equal(run_tflite(patched, x, executor=executor)[0], run_tflite(plain, x)[0])
