"""Quantization-aware fine-tuning (QAT) of a trained PatchStage model, then patched int8 export.

tensorflow-model-optimization (tfmot) only works with tf_keras (Keras 2), and
importing it sets ``os.environ["TF_USE_LEGACY_KERAS"] = "1"`` for the whole
process (which makes ``tf.keras`` resolve to tf_keras in that process and in
every child it starts).  So the QAT step runs in a separate Python process:

1. here (Keras 3): the model's graph is walked, `PatchStage` blocks are
   flattened, every layer is recorded as (class, filtered config, inbound
   layers, weights) and the data is written to a temporary folder;
2. worker (``python -m keras_patch.tuning.qat WORKDIR``): rebuilds the same
   topology with tf_keras layers, sets the weights, wraps it with
   ``tfmot.quantization.keras.quantize_model``, fine-tunes it and converts it
   with the standard TFLite converter (full int8, int8 input/output);
3. here: the QAT ``.tflite`` is patched with `keras_patch.patchify` at the
   op that writes each stage's last tensor, with the stage's grid, and
   checked bit for bit against the unpatched QAT model; float, post-training
   (PTQ, `keras_patch.export_tflite`) and QAT int8 accuracies are measured
   with `keras_patch.run_tflite`.

Example:

>>> import keras, numpy as np, keras_patch
>>> from keras_patch.datasets import person_dataset
>>> from keras_patch.tuning.qat import quantization_aware_finetune
>>> x, y = person_dataset(400, seed=0, image_size=32)
>>> block = keras.Sequential([keras.Input((32, 32, 1)),
...     keras.layers.Conv2D(8, 3, strides=2, padding="same", use_bias=False),
...     keras.layers.BatchNormalization(), keras.layers.ReLU(6.0)])
>>> inputs = keras.Input((32, 32, 1))
>>> h = keras_patch.PatchStage(block, grid=(2, 2), name="stage")(inputs)
>>> h = keras.layers.GlobalAveragePooling2D()(h)
>>> model = keras.Model(inputs, keras.layers.Dense(2)(h))
>>> model.compile("adam", keras.losses.SparseCategoricalCrossentropy(from_logits=True))
>>> _ = model.fit(x[:300], y[:300], epochs=1, verbose=0)
>>> result = quantization_aware_finetune(model, (x[:300], y[:300]), (x[300:], y[300:]))  # doctest: +SKIP
>>> result.bit_exact, result.qat_int8_accuracy  # doctest: +SKIP
(True, 0.9...)
"""

from __future__ import annotations

import dataclasses
import importlib.util
import inspect
import json
import logging
import os
import subprocess
import sys
import tempfile
import time
from typing import Dict, List, Tuple

import numpy as np

logger = logging.getLogger("keras_patch.tuning.qat")  # also when run as __main__ (the worker)

#: Keras 3 layer classes (exact types, by name) that are rebuilt as the tf_keras class of the same name.
MAPPABLE_LAYERS = (
    "InputLayer",
    "Conv2D",
    "DepthwiseConv2D",
    "BatchNormalization",
    "ReLU",
    "Activation",
    "Add",
    "ZeroPadding2D",
    "MaxPooling2D",
    "AveragePooling2D",
    "GlobalAveragePooling2D",
    "Flatten",
    "Dropout",
    "Dense",
)

_REQUIRED = {"tf_keras": "tf_keras", "tensorflow_model_optimization": "tensorflow-model-optimization"}
_WORKER_TIMEOUT_S = 3600


class LayerMappingError(ValueError):
    """A layer of the Keras 3 model has no tf_keras counterpart that QAT can use."""


@dataclasses.dataclass
class QATResult:
    """What `quantization_aware_finetune` measured and produced.

    Attributes:
        patched_tflite: the QAT int8 model, each PatchStage as a KP_PATCH_STAGE op.
        unpatched_tflite: the QAT int8 model as the converter wrote it.
        float_accuracy: accuracy of the Keras 3 float model on the val data.
        ptq_int8_accuracy: accuracy of the post-training-quantized model
            (`keras_patch.export_tflite`, calibrated on `representative_samples`
            train images), run with `run_tflite`.
        qat_int8_accuracy: accuracy of `patched_tflite` on the val data.
        bit_exact: patched and unpatched QAT logits are identical on the val data.
        rebuild_max_abs_diff: max |logit difference| on the val data between the
            tf_keras rebuild (before QAT) and the Keras 3 model: checks the
            topology and weight transfer.
        seconds: wall-clock time of the whole call.
    """

    patched_tflite: bytes
    unpatched_tflite: bytes
    float_accuracy: float
    ptq_int8_accuracy: float
    qat_int8_accuracy: float
    bit_exact: bool
    rebuild_max_abs_diff: float
    seconds: float = 0.0

    @property
    def ptq_drop(self) -> float:
        """Float accuracy minus PTQ int8 accuracy."""
        return self.float_accuracy - self.ptq_int8_accuracy

    @property
    def qat_drop(self) -> float:
        """Float accuracy minus QAT int8 accuracy."""
        return self.float_accuracy - self.qat_int8_accuracy


def check_dependencies() -> None:
    """Raises an informative `ImportError` when tf_keras or tfmot is not installed.

    Only looks the packages up (``importlib.util.find_spec``); nothing is imported.
    """
    missing = [pip for module, pip in _REQUIRED.items() if importlib.util.find_spec(module) is None]
    if missing:
        raise ImportError(
            "Quantization-aware fine-tuning needs tensorflow-model-optimization, which runs on tf_keras "
            f"(Keras 2); missing: {', '.join(missing)}. Install with: "
            "pip install tensorflow-model-optimization tf_keras"
        )


# ----------------------------------------------------------------- Keras 3 side: graph -> spec

def _filtered_config(layer) -> dict:
    """The layer's config, keeping what a tf_keras layer of the same class accepts."""
    config = dict(layer.get_config())
    dropped = []
    for key in list(config):
        if key.endswith(("_initializer", "_constraint")):
            config.pop(key)  # the weights are copied; initializers/constraints do not matter for fine-tuning
        elif key.endswith("_regularizer"):
            if config[key] is not None:
                dropped.append(key)
            config.pop(key)
    if dropped:
        logger.warning("layer '%s': %s not carried over to the QAT model", layer.name, ", ".join(dropped))
    dtype = config.get("dtype")
    if isinstance(dtype, dict):  # Keras 3 DTypePolicy
        config["dtype"] = dtype.get("config", {}).get("name", "float32")
    if dtype is not None and config.get("dtype") != "float32":
        raise LayerMappingError(f"layer '{layer.name}' uses dtype {config['dtype']}; QAT needs float32 layers.")
    activation = config.get("activation")
    if activation is not None and not isinstance(activation, str):
        raise LayerMappingError(
            f"layer '{layer.name}' ({type(layer).__name__}) uses a custom activation {activation!r}, "
            "which cannot be rebuilt in tf_keras."
        )
    return config


def _flatten(model, input_keys: List[str], spec: list, weights: Dict[str, np.ndarray], stages: list) -> List[str]:
    """Appends `model`'s layers to `spec`; returns the keys of its outputs.

    A key names the layer that produced a tensor (each layer must be called once).
    `input_keys` are the keys of the tensors fed to `model`'s inputs.
    """
    from keras.src.models.functional import Functional

    if not isinstance(model, Functional):  # a Sequential block
        if not hasattr(model, "layers"):
            raise LayerMappingError(f"'{model.name}' ({type(model).__name__}) is not a functional model.")
        key = input_keys[0]
        for layer in model.layers:
            if type(layer).__name__ == "InputLayer":
                continue
            key = _flatten_layer(layer, [key], spec, weights, stages)[0]
        return [key]
    keys = {}
    for tensor, key in zip(model.inputs, input_keys):
        keys[id(tensor)] = key
    for depth in sorted(model._nodes_by_depth, reverse=True):
        for node in model._nodes_by_depth[depth]:
            op = node.operation
            if type(op).__name__ == "InputLayer":
                continue
            inbound = [keys[id(t)] for t in node.input_tensors]
            outs = _flatten_layer(op, inbound, spec, weights, stages)
            for tensor, key in zip(node.output_tensors, outs):
                keys[id(tensor)] = key
    return [keys[id(t)] for t in model.outputs]


def _flatten_layer(layer, inbound: List[str], spec: list, weights: dict, stages: list) -> List[str]:
    import keras

    from keras_patch.keras.patch_stage import PatchStage

    if isinstance(layer, PatchStage):
        first = len(spec)
        outs = _flatten(layer.block, inbound, spec, weights, stages)
        stages.append({"name": layer.name, "grid": list(layer.grid), "last_layer": outs[0],
                       "layers": [entry["name"] for entry in spec[first:]]})
        return outs
    if isinstance(layer, keras.Model):
        return _flatten(layer, inbound, spec, weights, stages)
    cls = type(layer).__name__
    if cls not in MAPPABLE_LAYERS or not type(layer).__module__.startswith("keras."):
        raise LayerMappingError(
            f"layer '{layer.name}' ({type(layer).__module__}.{cls}) cannot be rebuilt as a tf_keras layer "
            f"for quantization-aware training. Mappable layers: {', '.join(MAPPABLE_LAYERS)} "
            "(and PatchStage / nested functional or Sequential models of them)."
        )
    if any(entry["name"] == layer.name for entry in spec):
        raise LayerMappingError(f"layer '{layer.name}' is called more than once; shared layers are not supported.")
    spec.append({"name": layer.name, "class_name": cls, "config": _filtered_config(layer), "inbound": inbound})
    for i, w in enumerate(layer.get_weights()):
        weights[f"{layer.name}/{i}"] = np.asarray(w)
    return [layer.name]


def model_spec(model) -> Tuple[dict, Dict[str, np.ndarray]]:
    """Flattens a Keras 3 model (PatchStage blocks inlined) into a JSON spec and its weights.

    Raises:
        LayerMappingError: naming the first layer that has no tf_keras counterpart.
    """
    if len(model.inputs) != 1 or len(model.outputs) != 1:
        raise LayerMappingError("quantization-aware fine-tuning needs a model with one input and one output.")
    spec: list = []
    weights: Dict[str, np.ndarray] = {}
    stages: list = []
    input_shape = list(model.inputs[0].shape[1:])
    outputs = _flatten(model, ["__input__"], spec, weights, stages)
    return {"input_shape": input_shape, "layers": spec, "outputs": outputs, "stages": stages,
            "name": model.name}, weights


# --------------------------------------------------------------------- worker (tf_keras + tfmot)

def build_tf_keras_model(spec: dict, weights: Dict[str, np.ndarray]):
    """Rebuilds the spec with tf_keras layers and sets the weights (worker process only)."""
    import tf_keras

    inputs = tf_keras.Input(tuple(spec["input_shape"]), name="qat_input")
    tensors = {"__input__": inputs}
    for entry in spec["layers"]:
        cls = getattr(tf_keras.layers, entry["class_name"])
        accepted = set(inspect.signature(cls.__init__).parameters) | {"name", "trainable", "dtype"}
        config = {k: v for k, v in entry["config"].items() if k in accepted}
        ignored = sorted(set(entry["config"]) - set(config))
        if ignored:
            logger.debug("layer '%s': Keras 3 config keys not used by tf_keras: %s", entry["name"], ignored)
        layer = cls.from_config(config)
        args = [tensors[k] for k in entry["inbound"]]
        tensors[entry["name"]] = layer(args if entry["class_name"] == "Add" else args[0])
        n = len(layer.weights)
        if n:
            layer.set_weights([weights[f"{entry['name']}/{i}"] for i in range(n)])
    return tf_keras.Model(inputs, [tensors[k] for k in spec["outputs"]], name=spec["name"])


def init_activation_ranges(q_model, model, calibration: np.ndarray) -> int:
    """Sets the activation-range variables of a tfmot model to the float model's ranges.

    tfmot starts every activation range at [-6, 6] (the input's at [0, 0]) and
    moves it towards the batch min/max with an exponential moving average of
    decay 0.999: short fine-tuning (hundreds of steps) leaves the ranges far
    from the data, and the int8 model loses accuracy.  Starting from the ranges
    the float model shows on the calibration images (what post-training
    quantization uses) avoids this.  Returns the number of ranges set.
    """
    import tf_keras

    names = [layer.name for layer in model.layers[1:]]
    probe = tf_keras.Model(model.inputs, [model.get_layer(n).output for n in names])
    outputs = probe.predict(calibration, verbose=0)
    ranges = {n: (min(0.0, float(np.min(o))), max(0.0, float(np.max(o)))) for n, o in zip(names, outputs)}
    ranges["__input__"] = (min(0.0, float(np.min(calibration))), max(0.0, float(np.max(calibration))))
    count = 0
    for layer in q_model.layers:
        if type(layer).__name__ == "QuantizeLayer":
            target = "__input__"
        elif layer.name.startswith("quant_") and layer.name[len("quant_"):] in ranges:
            target = layer.name[len("quant_"):]
        else:
            continue
        for var in layer.non_trainable_weights:
            short = var.name.split("/")[-1].split(":")[0]
            for suffix, value in (("_min", ranges[target][0]), ("_max", ranges[target][1])):
                if short in (f"output{suffix}", f"post_activation{suffix}", f"quantize_layer{suffix}"):
                    var.assign(np.full(var.shape, value, np.float32))
                    count += 1
    return count


def _worker(workdir: str) -> None:
    import tensorflow as tf
    import tensorflow_model_optimization as tfmot
    import tf_keras

    with open(os.path.join(workdir, "spec.json")) as f:
        job = json.load(f)
    weights = dict(np.load(os.path.join(workdir, "weights.npz")))
    data = np.load(os.path.join(workdir, "data.npz"))
    tf_keras.utils.set_random_seed(job["seed"])
    t0 = time.time()
    model = build_tf_keras_model(job["spec"], weights)
    # The rebuilt float model must compute what the Keras 3 model computes.
    np.save(os.path.join(workdir, "rebuilt_logits.npy"), model.predict(data["x_val"], verbose=0))
    q_model = tfmot.quantization.keras.quantize_model(model)
    calibration = data["x_train"][: job["representative_samples"]].astype(np.float32)
    if job.get("init_ranges", True):
        logger.info("QAT worker: %d activation range variables set from the float model",
                    init_activation_ranges(q_model, model, calibration))
    q_model.compile(
        optimizer=tf_keras.optimizers.Adam(job["learning_rate"]),
        loss=tf_keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
    )
    history = q_model.fit(data["x_train"], data["y_train"], validation_data=(data["x_val"], data["y_val"]),
                          epochs=job["epochs"], batch_size=job["batch_size"], verbose=2)

    def representative():
        for sample in calibration:
            yield [sample[None]]

    converter = tf.lite.TFLiteConverter.from_keras_model(q_model)
    converter.optimizations = [tf.lite.Optimize.DEFAULT]
    converter.representative_dataset = representative
    converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
    converter.inference_input_type = tf.int8
    converter.inference_output_type = tf.int8
    t1 = time.time()
    tflite = converter.convert()
    logger.info("QAT worker: fine-tuning %.1f s, conversion %.1f s", t1 - t0, time.time() - t1)
    with open(os.path.join(workdir, "qat.tflite"), "wb") as f:
        f.write(tflite)
    with open(os.path.join(workdir, "history.json"), "w") as f:
        json.dump({k: [float(v) for v in vals] for k, vals in history.history.items()}, f)


# ---------------------------------------------------------------------------- public API

def _accuracy(logits: np.ndarray, labels: np.ndarray) -> float:
    return float(np.mean(np.argmax(logits, -1) == np.asarray(labels).reshape(-1)))


def split_op_of_layer(tflite_bytes: bytes, layer_name: str) -> int:
    """Index of the op of a converted QAT model that writes `layer_name`'s output.

    tfmot wraps layers as ``quant_<name>``; the converter names a tensor after
    the TF ops fused into it, joined with ``;``.  The last op whose output
    name has a part under ``/<name>/`` or ``/quant_<name>/`` is taken.
    """
    from keras_patch.graph.tflite_model import TFLiteModel

    model = TFLiteModel.from_bytes(tflite_bytes)
    marks = (f"/{layer_name}/", f"/quant_{layer_name}/")
    found = [
        i for i in range(model.num_ops)
        if any(m in part + "/" for t in model.op_outputs(i) for part in model.tensor(t).name.split(";")
               for m in marks)
    ]
    if not found:
        from keras_patch.errors import UnsupportedModelError

        raise UnsupportedModelError(f"no op of the QAT model writes the output of layer '{layer_name}'.")
    return max(found)


def quantization_aware_finetune(
    model,
    train_data: Tuple[np.ndarray, np.ndarray],
    val_data: Tuple[np.ndarray, np.ndarray],
    epochs: int = 2,
    batch_size: int = 32,
    learning_rate: float = 1e-4,
    representative_samples: int = 100,
    seed: int = 0,
    init_ranges: bool = True,
) -> QATResult:
    """Fine-tunes a trained PatchStage model with QAT (tfmot) and exports it patched, int8.

    Args:
        model: a trained Keras 3 functional model with `PatchStage` layer(s)
            and a classification head producing logits.  Its layers must be in
            `MAPPABLE_LAYERS` (PatchStage blocks are flattened).
        train_data: ``(x, y)`` float images (N, H, W, C) and integer labels.
        val_data: ``(x, y)`` used for all accuracies and the bit-exactness check.
        epochs, batch_size, learning_rate: of the QAT fine-tuning (Adam,
            sparse categorical cross-entropy on logits).
        representative_samples: first train images used to calibrate the PTQ
            baseline and the QAT converter.
        seed: random seed of the fine-tuning.
        init_ranges: start tfmot's activation ranges from the float model's
            ranges on the calibration images (`init_activation_ranges`)
            instead of tfmot's [-6, 6]; recommended for short fine-tuning.

    Returns:
        A `QATResult`.

    Raises:
        ImportError: tf_keras or tensorflow-model-optimization is not installed.
        LayerMappingError: a layer cannot be rebuilt in tf_keras (named in the message).
        RuntimeError: the QAT worker process failed (its output is in the message).
    """
    import keras_patch
    from keras_patch.keras.export import patch_stages
    from keras_patch.runtime.host import quantize_input

    t0 = time.time()
    check_dependencies()
    spec, weights = model_spec(model)  # raises LayerMappingError before any work
    stages = {s.name: s for s in patch_stages(model)}
    x_train, y_train = (np.asarray(a) for a in train_data)
    x_val, y_val = (np.asarray(a) for a in val_data)
    calibration = x_train[:representative_samples].astype(np.float32)

    float_logits = model.predict(x_val, verbose=0)
    float_acc = _accuracy(float_logits, y_val)
    ptq = keras_patch.export_tflite(model, calibration)
    ptq_acc = _accuracy(keras_patch.run_tflite(ptq, quantize_input(ptq, x_val))[0], y_val)
    logger.info("float accuracy %.4f, PTQ int8 accuracy %.4f", float_acc, ptq_acc)

    t_worker = time.time()
    with tempfile.TemporaryDirectory(prefix="kp-qat-") as workdir:
        job = {"spec": spec, "epochs": epochs, "batch_size": batch_size, "learning_rate": learning_rate,
               "representative_samples": representative_samples, "seed": seed, "init_ranges": init_ranges}
        with open(os.path.join(workdir, "spec.json"), "w") as f:
            json.dump(job, f)
        np.savez(os.path.join(workdir, "weights.npz"), **weights)
        np.savez(os.path.join(workdir, "data.npz"), x_train=x_train.astype(np.float32), y_train=y_train,
                 x_val=x_val.astype(np.float32), y_val=y_val)
        package_root = os.path.dirname(os.path.dirname(os.path.abspath(keras_patch.__file__)))
        pythonpath = os.pathsep.join(p for p in (package_root, os.environ.get("PYTHONPATH")) if p)
        env = dict(os.environ, TF_USE_LEGACY_KERAS="1", TF_CPP_MIN_LOG_LEVEL="2", PYTHONPATH=pythonpath)
        proc = subprocess.run([sys.executable, "-m", "keras_patch.tuning.qat", workdir], env=env,
                              capture_output=True, text=True, timeout=_WORKER_TIMEOUT_S)
        logger.debug("QAT worker output:\n%s%s", proc.stdout, proc.stderr)
        for line in proc.stderr.splitlines():
            if line.startswith("INFO:keras_patch"):
                logger.info("worker: %s", line.split(":", 2)[-1])
        logger.info("QAT worker process: %.1f s", time.time() - t_worker)
        if proc.returncode != 0:
            raise RuntimeError(f"the QAT worker process failed (exit {proc.returncode}):\n{proc.stderr[-4000:]}")
        with open(os.path.join(workdir, "qat.tflite"), "rb") as f:
            unpatched = f.read()
        with open(os.path.join(workdir, "history.json")) as f:
            logger.info("QAT fine-tuning history: %s", json.load(f))
        rebuilt_logits = np.load(os.path.join(workdir, "rebuilt_logits.npy"))
    rebuild_diff = float(np.max(np.abs(rebuilt_logits - float_logits)))
    logger.info("tf_keras rebuild vs Keras 3 float logits: max |diff| %.2e", rebuild_diff)

    patched = unpatched
    for stage in spec["stages"]:
        split = split_op_of_layer(patched, stage["last_layer"])
        patched = keras_patch.patchify(patched, split, grid=tuple(stages[stage["name"]].grid), arena=False)
        logger.info("PatchStage '%s': patched at op %d, grid %s", stage["name"], split, stage["grid"])
    if spec["stages"]:  # the arena passes once every stage is in place
        from keras_patch.graph.passes.pipeline import optimize_arena
        from keras_patch.graph.tflite_model import TFLiteModel

        model = TFLiteModel.from_bytes(patched)
        optimize_arena(model)
        patched = model.to_bytes()

    xq = quantize_input(unpatched, x_val)
    logits_unpatched = keras_patch.run_tflite(unpatched, xq)[0]
    logits_patched = keras_patch.run_tflite(patched, xq)[0]
    bit_exact = bool(np.array_equal(logits_patched, logits_unpatched))
    qat_acc = _accuracy(logits_patched, y_val)
    result = QATResult(patched, unpatched, float_acc, ptq_acc, qat_acc, bit_exact, rebuild_diff, time.time() - t0)
    logger.info("QAT int8 accuracy %.4f (float %.4f, PTQ %.4f), bit-exact %s, %.0f s",
                qat_acc, float_acc, ptq_acc, bit_exact, result.seconds)
    return result


if __name__ == "__main__":  # the worker: python -m keras_patch.tuning.qat WORKDIR
    logging.basicConfig(level=logging.INFO)
    _worker(sys.argv[1])
