"""wrap_stages: several PatchStages anywhere in a Keras model (issue 10 point 1)."""

import os

os.environ["TF_CPP_MIN_LOG_LEVEL"] = "3"

import numpy as np  # noqa: E402
import pytest  # noqa: E402

import keras  # noqa: E402
from keras_patch.errors import KerasPatchError, UnsupportedModelError  # noqa: E402
from keras_patch.keras.patch_stage import PatchStage  # noqa: E402
from keras_patch.keras.wrap import wrap_stages  # noqa: E402
from model_zoo import residual_model  # noqa: E402

layers = keras.layers

#: stage 0 from the model input, stage 1 one block plus a whole residual block
#: in the middle, stage 2 a residual block's branch whose input (the skip) is
#: read after the stage by `b4_add`.
STAGES = [
    (None, "b0_project_bn", (2, 2), "s0"),
    ("b1_expand", "b2_add", (2, 2), "s1"),
    ("b4_expand", "b4_project_bn", (3, 3), "s2"),
]


def images(size=48, n=3, seed=0):
    return np.random.default_rng(seed).uniform(-1, 1, (n, size, size, 3)).astype("float32")


def stage_layers(model):
    return [layer for layer in model.layers if isinstance(layer, PatchStage)]


def check_same(original, wrapped, x):
    np.testing.assert_array_equal(
        wrapped(x, training=False).numpy(), original(x, training=False).numpy()
    )


@pytest.fixture(scope="module")
def model():
    return residual_model()


def test_three_stages_share_layers_and_predictions(model):
    wrapped = wrap_stages(model, STAGES)
    stages = stage_layers(wrapped)
    assert [(s.name, s.grid) for s in stages] == [("s0", (2, 2)), ("s1", (2, 2)), ("s2", (3, 3))]
    assert [l.name for l in stages[1].block.layers] == ["s1_input"] + [
        f"b{b}_{part}" for b in (1, 2) for part in
        ("expand", "expand_bn", "expand_relu", "dw", "dw_bn", "dw_relu", "project", "project_bn")
    ] + ["b2_add"]
    # s2 ends before b4_add, which reads s2's input (the skip) and its output.
    assert stages[2].block.layers[-1].name == "b4_project_bn"
    add = wrapped.get_layer("b4_add")
    assert add is model.get_layer("b4_add")
    assert tuple(stages[2].block.input.shape) == (None, 6, 6, 16)
    # Same layer objects inside and outside the stages: same variables.
    assert stages[1].block.get_layer("b2_dw") is model.get_layer("b2_dw")
    assert wrapped.get_layer("b3_dw") is model.get_layer("b3_dw")
    assert {id(w) for w in wrapped.weights} == {id(w) for w in model.weights}
    assert len(wrapped.weights) == len(model.weights)
    n_wrapped = sum(len(s.block.layers) - 1 for s in stages)
    assert len(wrapped.layers) == len(model.layers) - n_wrapped + len(stages)
    x = images()
    check_same(model, wrapped, x)
    np.testing.assert_array_equal(wrapped.predict(x, verbose=0), model.predict(x, verbose=0))


def test_stage_order_does_not_matter_and_names_are_generated(model):
    wrapped = wrap_stages(model, [(first, last, grid) for first, last, grid, _ in reversed(STAGES)])
    stages = stage_layers(wrapped)
    assert len(stages) == 3 and len({s.name for s in stages}) == 3
    assert all(s.name.startswith("patch_stage") for s in stages)
    assert [s.block.layers[-1].name for s in stages] == ["b0_project_bn", "b2_add", "b4_project_bn"]
    check_same(model, wrapped, images(seed=1))


def test_fit_trains_the_shared_weights():
    model = residual_model()
    wrapped = wrap_stages(model, STAGES)
    wrapped.compile(optimizer=keras.optimizers.SGD(0.1), loss="mse", jit_compile=False)
    x = images(n=4)
    inside = model.get_layer("b2_expand").kernel
    outside = model.get_layer("b3_expand").kernel
    before = inside.numpy().copy(), outside.numpy().copy()
    wrapped.fit(x, np.ones((4, 10), "float32"), batch_size=2, epochs=1, verbose=0)
    assert not np.array_equal(inside.numpy(), before[0])
    assert not np.array_equal(outside.numpy(), before[1])
    check_same(model, wrapped, x)


def test_save_load_and_config_round_trip(model, tmp_path):
    wrapped = wrap_stages(model, STAGES)
    x = images(n=2, seed=2)
    path = str(tmp_path / "stages.keras")
    wrapped.save(path)
    loaded = keras.models.load_model(path)
    assert [(s.name, s.grid) for s in stage_layers(loaded)] == [
        (s.name, s.grid) for s in stage_layers(wrapped)
    ]
    np.testing.assert_array_equal(loaded.predict(x, verbose=0), wrapped.predict(x, verbose=0))

    clone = keras.Model.from_config(wrapped.get_config())
    assert [s.name for s in stage_layers(clone)] == ["s0", "s1", "s2"]
    assert [l.name for l in clone.get_layer("s1").block.layers] == [
        l.name for l in wrapped.get_layer("s1").block.layers
    ]
    clone.set_weights(wrapped.get_weights())
    np.testing.assert_array_equal(clone.predict(x, verbose=0), wrapped.predict(x, verbose=0))


def test_mobilenet_v2_two_stages():
    keras.utils.set_random_seed(0)
    base = keras.applications.MobileNetV2(input_shape=(64, 64, 3), alpha=0.35, weights=None)
    wrapped = wrap_stages(base, [
        (None, "block_2_add", 4, "stage1"),
        ("block_3_expand", "block_5_add", (2, 2), "stage2"),
        ("block_7_expand", "block_9_add", (2, 2), "stage3"),
    ])
    assert [s.name for s in stage_layers(wrapped)] == ["stage1", "stage2", "stage3"]
    assert tuple(wrapped.get_layer("stage2").block.output.shape) == (None, 8, 8, 16)
    assert tuple(wrapped.get_layer("stage3").block.input.shape) == (None, 4, 4, 24)
    check_same(base, wrapped, images(64, n=2))


def test_sequential_middle_stage():
    keras.utils.set_random_seed(0)
    model = keras.Sequential([
        keras.Input((16, 16, 3)),
        layers.Conv2D(4, 3, name="c1"),
        layers.Activation("swish", name="swish"),  # no patch stage can hold it
        layers.Conv2D(8, 3, activation="relu", name="c2"),
        layers.MaxPooling2D(name="p"),
        layers.Flatten(name="flat"),
        layers.Dense(2, name="d"),
    ])
    wrapped = wrap_stages(model, [("c2", "p", (1, 2), "mid")])
    assert [l.name for l in wrapped.layers][1:] == ["c1", "swish", "mid", "flat", "d"]
    assert wrapped.get_layer("mid").grid == (1, 2)
    check_same(model, wrapped, images(16))


def test_export_emits_one_op_per_stage_bit_exact(model, caplog):
    from keras_patch.graph.patchify import find_stages
    from keras_patch.graph.tflite_model import TFLiteModel
    from keras_patch.graph.unpatchify import unpatchify
    from keras_patch.keras.export import export_tflite
    from keras_patch.keras.patch_stage import stage_of_tensor_name
    from keras_patch.planner.schedule import short_tensor_name
    from keras_patch.runtime.host import run_tflite

    wrapped = wrap_stages(model, STAGES)
    with caplog.at_level("WARNING", logger="keras_patch.keras.export"):
        patched = export_tflite(wrapped, images(n=4, seed=3))
    assert not caplog.records  # every boundary lies between two converted ops
    tflite = TFLiteModel.from_bytes(patched)
    stage_ops = find_stages(tflite)
    assert len(stage_ops) == len(STAGES)
    # Each op's exit tensor is the last layer of its stage; stages 1 and 2 start mid-network.
    exits = [tflite.tensor(tflite.op_outputs(i)[0]).name for i in stage_ops]
    assert [stage_of_tensor_name(name) for name in exits] == ["s0", "s1", "s2"]
    # (the converter folds b0/b4_project_bn into their convolution and names the op after either)
    assert [short_tensor_name(name).replace("_bn", "") for name in exits] == ["b0_project", "b2_add", "b4_project"]
    assert stage_ops[1] == stage_ops[0] + 1 and stage_ops[2] > stage_ops[1] + 1
    x = np.random.default_rng(4).integers(-128, 128, (1, 48, 48, 3), dtype=np.int8)
    for got, want in zip(run_tflite(patched, x), run_tflite(unpatchify(patched), x)):
        np.testing.assert_array_equal(got, want)


def test_export_warns_about_a_boundary_inside_a_fused_op(model, caplog):
    """b0_dw, b0_dw_bn and b0_dw_relu become one DEPTHWISE_CONV_2D: a boundary between them is reported."""
    from keras_patch.graph.patchify import find_stages
    from keras_patch.graph.tflite_model import TFLiteModel
    from keras_patch.graph.unpatchify import unpatchify
    from keras_patch.keras.export import export_tflite
    from keras_patch.runtime.host import run_tflite

    wrapped = wrap_stages(model, [(None, "b0_dw_bn", 2, "a"), ("b0_dw_relu", "b0_project_bn", 2, "b")])
    with caplog.at_level("WARNING", logger="keras_patch.keras.export"):
        patched = export_tflite(wrapped, images(n=4, seed=8))
    messages = [r.getMessage() for r in caplog.records]
    assert any(m.startswith("PatchStage 'a': the converter fused its layers with PatchStage 'b' into one op "
                            "(DEPTHWISE_CONV_2D writing") and "its KP_PATCH_STAGE op does not hold that op" in m
               for m in messages), messages
    assert any(m.startswith("PatchStage 'b': the converter fused its layers with PatchStage 'a'")
               and "op holds that op" in m for m in messages), messages
    assert len(find_stages(TFLiteModel.from_bytes(patched))) == 2
    x = np.random.default_rng(9).integers(-128, 128, (1, 48, 48, 3), dtype=np.int8)
    for got, want in zip(run_tflite(patched, x), run_tflite(unpatchify(patched), x)):
        np.testing.assert_array_equal(got, want)


def test_docstring_examples():
    import doctest

    from keras_patch.keras import wrap

    failures, tried = doctest.testmod(wrap, optionflags=doctest.ELLIPSIS)
    assert failures == 0 and tried >= 10


def test_stage_input_may_be_read_after_the_stage():
    """Unlike wrap_stage (whose stage must consume the model input), a stage's input may be reused."""
    from keras_patch.keras.wrap import wrap_stage

    inputs = keras.Input((8, 8, 3))
    x = layers.Conv2D(3, 1, name="c")(inputs)
    x = layers.ReLU(name="r")(x)
    model = keras.Model(inputs, layers.Add(name="add")([x, inputs]))
    wrapped = wrap_stages(model, [(None, "r", 2, "s")])
    assert [l.name for l in wrapped.layers][1:] == ["s", "add"]
    check_same(model, wrapped, images(8))
    with pytest.raises(UnsupportedModelError, match=r"'add' \(Add\) uses the model input"):
        wrap_stage(model, until="r")


# ------------------------------------------------------------------ errors


def test_errors_are_keras_patch_errors(model):
    with pytest.raises(UnsupportedModelError) as info:
        wrap_stages(model, [("b1_expand", "b2_ad", 2)])
    assert isinstance(info.value, KerasPatchError) and isinstance(info.value, ValueError)
    assert "stage 0 ('b1_expand' -> 'b2_ad'): last layer: model 'residual' has no layer named 'b2_ad'" in str(info.value)
    assert "Close names: ['b2_add'" in str(info.value)


def test_unknown_first_layer(model):
    with pytest.raises(UnsupportedModelError, match=r"stage 1 .*first layer: .*no layer named 'b3_expnd'.*'b3_expand'"):
        wrap_stages(model, [(None, "stem_relu", 2), ("b3_expnd", "b4_add", 2)])


@pytest.mark.parametrize(
    "second, how",
    [
        (("b0_expand", "b2_add", 2), "contains"),  # stage 1 holds all of stage 0
        (("b2_dw_relu", "b3_project_bn", 2), None),  # cuts b2's skip: reported as single-entry
        (("b0_expand", "b1_project_bn", 2), "overlaps"),
    ],
)
def test_overlapping_or_nested_stages(model, second, how):
    first = ("b1_expand", "b2_add", 2)
    if how is None:
        with pytest.raises(UnsupportedModelError, match=r"'b2_add' \(Add\) reads the output of layer 'b1_project_bn'"):
            wrap_stages(model, [first, second])
        return
    with pytest.raises(UnsupportedModelError, match=rf"Stage 1 .* {how} stage 0 .*Stages must not share layers"):
        wrap_stages(model, [first, second])


def test_nested_stage():
    with pytest.raises(UnsupportedModelError, match=r"Stage 1 \('b1_dw' -> 'b1_project_bn'\) is nested in stage 0"):
        wrap_stages(residual_model(), [("b1_expand", "b2_add", 2), ("b1_dw", "b1_project_bn", 2)])


def test_stage_cutting_a_residual_connection(model):
    # The stage starts inside block 2, but b2_add reads b2's input (the skip).
    with pytest.raises(
        UnsupportedModelError,
        match=r"Cannot wrap stage 0 \('b2_dw' -> 'b2_add'\) in one PatchStage: its layer 'b2_add' \(Add\) "
              r"reads the output of layer 'b1_project_bn' \(BatchNormalization\), which lies before the stage "
              r"\(the stage input is the output of layer 'b2_expand_relu' \(ReLU\)\)",
    ):
        wrap_stages(model, [("b2_dw", "b2_add", 2)])
    # The stage ends inside block 2's branch after its input was used by b2_add.
    with pytest.raises(
        UnsupportedModelError,
        match=r"Cannot wrap stage 0 \('b1_expand' -> 'b2_expand_relu'\) in one PatchStage: layer 'b2_add' "
              r"\(Add\) uses the output of layer 'b1_project_bn' \(BatchNormalization\), which lies inside",
    ):
        wrap_stages(model, [("b1_expand", "b2_expand_relu", 2)])


def test_inner_tensor_is_a_model_output():
    inputs = keras.Input((8, 8, 3))
    x = layers.Conv2D(3, 1, name="c0")(inputs)
    y = layers.Conv2D(3, 1, name="c")(x)
    z = layers.ReLU(name="r")(y)
    with pytest.raises(UnsupportedModelError, match=r"the model outputs uses the output of layer 'c'"):
        wrap_stages(keras.Model(inputs, [y, layers.Conv2D(2, 1)(z)]), [("c", "r", 2)])


def test_last_before_first(model):
    with pytest.raises(UnsupportedModelError, match="last layer 'b1_project' does not depend on the first layer 'b3_expand'"):
        wrap_stages(model, [("b3_expand", "b1_project", 2)])


def test_first_layer_reading_two_tensors(model):
    with pytest.raises(UnsupportedModelError, match=r"first layer 'b2_add' \(Add\) reads 2 tensors"):
        wrap_stages(model, [("b2_add", "b3_project", 2)])


def test_global_average_pool_ends_a_stage(model):
    wrapped = wrap_stages(model, [("head", "pool", (2, 2), "late")])  # grid over the pool's input
    assert type(wrapped.get_layer("late")).__name__ == "PatchStage"
    with pytest.raises(
        UnsupportedModelError,
        match=r"PatchStage 'late': layer 'pool' \(GlobalAveragePooling2D\) is not the block's last layer",
    ):
        wrap_stages(model, [("head", "logits", 1, "late")])


def test_name_collision_and_bad_spec(model):
    with pytest.raises(UnsupportedModelError, match="already has a layer named 'head'"):
        wrap_stages(model, [("b1_expand", "b2_add", 2, "head")])
    with pytest.raises(UnsupportedModelError, match="already has a layer named 'x'"):
        wrap_stages(model, [(None, "stem_relu", 2, "x"), ("b1_expand", "b2_add", 2, "x")])
    with pytest.raises(UnsupportedModelError, match=r"Stage 0: expected \(first_layer, last_layer, grid\)"):
        wrap_stages(model, ["b2_add"])
    with pytest.raises(UnsupportedModelError, match="no stage given"):
        wrap_stages(model, [])
    with pytest.raises(ValueError, match="grid"):
        wrap_stages(model, [("b1_expand", "b2_add", (0, 2))])


# -------------------------------------------------------------- apply_plan


class Stage:
    """A planned stage as `apply_plan` reads it (the fields of `planner.plan.PlannedStage` it uses)."""

    def __init__(self, start, end, grid):
        self.start, self.end, self.grid = start, end, grid


class Plan:
    def __init__(self, *stages, message=""):
        self.stages, self.message = tuple(stages), message


#: Tensor names the converter gives residual_model's ops (see tests above: BN folded, ReLU fused).
INPUT = "serving_default_keras_tensor:0"
B0_PROJECT = "residual_1/b0_project_1/convolution1"
B0_DW = ("residual_1/b0_dw_relu_1/Relu6;residual_1/b0_dw_bn_1/batchnorm/mul_1;"
         "residual_1/b0_dw_1/depthwise;1")
B2_ADD = "residual_1/b2_add_1/Add"
B3_PROJECT = "residual_1/b3_project_1/convolution1"
B4_PROJECT = "residual_1/b4_project_1/convolution1"


def test_apply_plan_maps_tensor_names_to_layers(model):
    from keras_patch import apply_plan

    wrapped = apply_plan(model, Plan(
        Stage(INPUT, B0_DW, (2, 2)),  # ends at the fused ReLU, the last layer the name holds
        Stage(B0_PROJECT, B2_ADD, (2, 2)),  # starts after b0_project_bn, folded into b0_project
        Stage(B3_PROJECT, B4_PROJECT, (3, 3)),  # ends at b4_project_bn: b4_add reads the stage input too
    ))
    stages = stage_layers(wrapped)
    assert [s.grid for s in stages] == [(2, 2), (2, 2), (3, 3)]
    assert [(s.block.layers[1].name, s.block.layers[-1].name) for s in stages] == [
        ("stem", "b0_dw_relu"), ("b1_expand", "b2_add"), ("b4_expand", "b4_project_bn")]
    assert wrapped.get_layer("b0_project") is model.get_layer("b0_project")
    check_same(model, wrapped, images(seed=5))


def test_apply_plan_empty_plan_and_errors(model):
    from keras_patch import apply_plan

    assert apply_plan(model, Plan(message="no plan lowers the arena head")) is model
    with pytest.raises(TypeError, match="apply_plan takes a keras_patch.PatchPlan .*got str.*from_json"):
        apply_plan(model, '{"stages": []}')
    with pytest.raises(UnsupportedModelError, match=r"planned stage 0 .*end: tensor 'other_1/conv_1/Conv2D' "
                                                   r"names no layer of model 'residual'"):
        apply_plan(model, Plan(Stage(INPUT, "other_1/conv_1/Conv2D", (2, 2))))
    with pytest.raises(UnsupportedModelError, match=r"already holds PatchStage layers \['s0', 's1', 's2'\]"):
        apply_plan(wrap_stages(model, STAGES), Plan(Stage(B0_PROJECT, B2_ADD, (2, 2))))
    with pytest.raises(UnsupportedModelError, match=r"Stage 1 \(after 'b0_dw_relu' -> 'b2_add'\) contains stage 0"):
        apply_plan(model, Plan(Stage(B0_PROJECT, B2_ADD, (2, 2)), Stage(B0_DW, B2_ADD, (2, 2))))


@pytest.mark.slow  # three int8 conversions: ~45 s on 2 cores
def test_apply_plan_of_the_planner_trains_and_exports_bit_exact(model):
    """plan -> apply_plan -> fit -> export_tflite: one KP_PATCH_STAGE per planned stage, bit-exact.

    The arena passes stay off (`arena=False`): they are tested in test_arena_pipeline.py; here the
    stages alone are mapped back to Keras layers.
    """
    import keras_patch
    from keras_patch.graph.patchify import find_stages
    from keras_patch.graph.tflite_model import TFLiteModel
    from keras_patch.keras.export import export_tflite

    data = images(n=4, seed=6)
    unpatched = export_tflite(model, data, arena=False)
    plan = keras_patch.plan(unpatched, max_mac_overhead=1.3, arena=False)
    assert len(plan.stages) >= 2  # several stages, some mid-network: what apply_plan maps back
    wrapped = keras_patch.apply_plan(model, plan)
    stages = stage_layers(wrapped)
    assert [s.grid for s in stages] == [tuple(s.grid) for s in plan.stages]
    # Which layers each stage holds is checked through the export below: the same
    # stages give the same arena head as the plan and the same bits as plan.apply
    # (the converter names a folded conv+BatchNormalization op after either layer).
    check_same(model, wrapped, data)

    # Same weights: the exported model is the plan applied to the unpatched one.
    patched = export_tflite(wrapped, data, arena=False)
    assert len(find_stages(TFLiteModel.from_bytes(patched))) == len(plan.stages)
    assert keras_patch.profile(patched).patched_peak_bytes == plan.peak_bytes
    x = np.random.default_rng(7).integers(-128, 128, (2, 48, 48, 3), dtype=np.int8)
    expected = keras_patch.run_tflite(unpatched, x)
    for executor in ("reference", "cpp"):
        for got, want in zip(keras_patch.run_tflite(patched, x, executor=executor), expected):
            np.testing.assert_array_equal(got, want)
    for got, want in zip(keras_patch.run_tflite(plan.apply(unpatched), x), expected):
        np.testing.assert_array_equal(got, want)

    # It trains with ordinary fit and still exports one op per stage, bit-exact
    # against its own unpatched int8 model.
    wrapped.compile(optimizer=keras.optimizers.SGD(0.05), loss="mse", jit_compile=False)
    wrapped.fit(data, np.ones((4, 10), "float32"), batch_size=4, epochs=1, verbose=0)
    trained = export_tflite(wrapped, data, arena=False)
    assert len(find_stages(TFLiteModel.from_bytes(trained))) == len(plan.stages)
    assert keras_patch.profile(trained).patched_peak_bytes == plan.peak_bytes
    for got, want in zip(keras_patch.run_tflite(trained, x), keras_patch.run_tflite(keras_patch.unpatchify(trained), x)):
        np.testing.assert_array_equal(got, want)
