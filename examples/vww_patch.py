"""Visual-wake-words style example: train, patch, export int8, check, size, write an Arduino sketch.

    python examples/vww_patch.py [--out-dir vww_patch_out] [--epochs 6] [--samples 3000] [--grid 3]
                                 [--arduino-examples arduino/KerasPatch/examples]

End to end, offline:

1. generates a person / no-person dataset (96x96 grayscale, seeded numpy, no
   download; `keras_patch.datasets.person_dataset`): "person" images hold a
   procedurally drawn figure (head, body, arms, legs; random position, scale
   and brightness); every image has a textured, noisy background and
   distractor shapes (boxes, lines, blobs);
2. builds a small MCUNet-style network (inverted-residual blocks), wraps its
   stride-4 first stage in a `PatchStage` and trains it with `model.fit`;
3. exports int8 with the stage as one KP_PATCH_STAGE op, and checks that its
   logits on the int8 validation images equal, bit for bit, those of the same
   model converted without PatchStage; reports float and int8 accuracy;
4. prints the memory table (layer-by-layer vs patched peak) and the stock
   TFLM arena of the unpatched model, measured with tflite-micro;
5. writes an Arduino sketch for the Nano 33 BLE (what `keras-patch
   export-arduino` does); with `--arduino-examples DIR`, also the KerasPatch
   library's examples DIR/PersonDetectionPatched (OV7675 camera -> model ->
   Serial + LED) and DIR/MemoryReport (patched vs unpatched arena, outputs
   compared), from `vww_patched.tflite` and `vww.tflite`; README.md files
   already there are kept (`keras_patch.arduino.examples`).

Runtime: about 2-8 min on 2 CPU cores (110 s of CPU time; 7 min 55 s
measured on a busy machine). With the defaults (3000 images, 6 epochs,
grid 3x3): float val accuracy 0.972, int8 0.968 (600 val images),
patched logits bit-exact; peak SRAM (arena head) 129,024 B layer by layer
(= TFLM's measured head) vs 46,080 B patched.
"""

from __future__ import annotations

import argparse
import os
import time

import numpy as np

IMAGE_SIZE = 96
STAGE_END = "stage1_out"  # last layer of the patched stage (output 24x24, stride 4)


# -------------------------------------------------------------------------- model

def build_model(width: int = 8, seed: int = 0):
    """MCUNet-style: 3x3 stem and inverted-residual blocks (MobileNetV2's), ReLU6, small width.

    Layers up to `STAGE_END` (96x96 -> 24x24) are the memory-heavy stage that
    gets patched; the rest runs layer by layer.
    """
    import keras
    from keras import layers

    keras.utils.set_random_seed(seed)

    def conv_bn(x, filters, kernel, stride, name, act=True):
        x = layers.Conv2D(filters, kernel, strides=stride, padding="same", use_bias=False, name=name)(x)
        x = layers.BatchNormalization(momentum=0.9, name=name + "_bn")(x)
        return layers.ReLU(6.0, name=name + "_relu")(x) if act else x

    def inverted_residual(x, expand, filters, stride, name, out_name=None):
        inp = x
        x = conv_bn(x, x.shape[-1] * expand, 1, 1, name + "_expand")
        x = layers.DepthwiseConv2D(3, strides=stride, padding="same", use_bias=False, name=name + "_dw")(x)
        x = layers.BatchNormalization(momentum=0.9, name=name + "_dw_bn")(x)
        x = layers.ReLU(6.0, name=name + "_dw_relu")(x)
        x = conv_bn(x, filters, 1, 1, name + "_project", act=False)
        if stride == 1 and inp.shape[-1] == filters:
            x = layers.Add(name=out_name or name + "_add")([inp, x])
        return x

    inputs = keras.Input((IMAGE_SIZE, IMAGE_SIZE, 1), name="image")
    x = conv_bn(inputs, width, 3, 2, "stem")                       # 48x48
    x = inverted_residual(x, 3, width, 1, "b1")                    # 48x48
    x = inverted_residual(x, 4, 2 * width, 2, "b2")                # 24x24
    x = inverted_residual(x, 3, 2 * width, 1, "b3", out_name=STAGE_END)
    x = inverted_residual(x, 4, 3 * width, 2, "b4")                # 12x12
    x = inverted_residual(x, 3, 3 * width, 1, "b5")
    x = inverted_residual(x, 4, 4 * width, 2, "b6")                # 6x6
    x = inverted_residual(x, 3, 4 * width, 1, "b7")
    x = layers.GlobalAveragePooling2D(name="pool")(x)
    outputs = layers.Dense(2, name="logits")(x)
    return keras.Model(inputs, outputs, name="vww_mcunet")


# ------------------------------------------------------------------------- script

def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out-dir", default="vww_patch_out")
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--samples", type=int, default=3000, help="images generated (80%% train, 20%% val)")
    parser.add_argument("--grid", type=int, default=3, help="patches per side of the first stage")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--arduino-examples", metavar="DIR",
                        help="also write DIR/PersonDetectionPatched and DIR/MemoryReport (replaced if present)")
    return parser.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    os.makedirs(args.out_dir, exist_ok=True)
    t0 = time.time()

    import keras

    import keras_patch
    from keras_patch.arduino.sketch import export_sketch
    from keras_patch.datasets import person_dataset
    from keras_patch.keras.export import convert_int8
    from keras_patch.runtime.host import quantize_input
    from keras_patch.arena.tflm_arena import measure_tflm_arena

    print(f"generating {args.samples} images ...")
    images, labels = person_dataset(args.samples, seed=args.seed, image_size=IMAGE_SIZE)
    split = int(0.8 * args.samples)
    x_train, y_train, x_val, y_val = images[:split], labels[:split], images[split:], labels[split:]
    print(f"  train {len(x_train)}, val {len(x_val)}, person fraction {labels.mean():.2f} "
          f"({time.time() - t0:.0f} s)")

    base = build_model(seed=args.seed)
    model = keras_patch.wrap_stage(base, until=STAGE_END, grid=(args.grid, args.grid))  # shares base's weights
    model.compile(optimizer=keras.optimizers.Adam(3e-3),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True), metrics=["accuracy"])
    print(f"model: {base.count_params():,} parameters; stage up to '{STAGE_END}' in a "
          f"{args.grid}x{args.grid} PatchStage")
    model.fit(x_train, y_train, validation_data=(x_val, y_val), epochs=args.epochs, batch_size=32, verbose=2)
    float_acc = float(np.mean(np.argmax(model.predict(x_val, verbose=0), -1) == y_val))
    print(f"float val accuracy: {float_acc:.3f} ({time.time() - t0:.0f} s)")

    calibration = x_train[:100]
    patched_path = os.path.join(args.out_dir, "vww_patched.tflite")
    patched = keras_patch.export_tflite(model, calibration, path=patched_path)
    unpatched = convert_int8(base, calibration)  # same weights, no PatchStage
    with open(os.path.join(args.out_dir, "vww.tflite"), "wb") as f:
        f.write(unpatched)

    xq = quantize_input(patched, x_val)
    assert np.array_equal(xq, quantize_input(unpatched, x_val))  # same input quantization
    logits_patched = keras_patch.run_tflite(patched, xq)[0]
    logits_unpatched = keras_patch.run_tflite(unpatched, xq)[0]
    bit_exact = bool(np.array_equal(logits_patched, logits_unpatched))
    distinct = int(np.unique(logits_patched, axis=0).shape[0])
    int8_acc = float(np.mean(np.argmax(logits_patched, -1) == y_val))
    print(f"bit-exact (patched vs unpatched int8 logits, {len(xq)} val images): {bit_exact}; "
          f"{distinct} distinct logit pairs")
    print(f"int8 val accuracy: {int8_acc:.3f} (float {float_acc:.3f}) ({time.time() - t0:.0f} s)")

    prof = keras_patch.profile(patched)
    print(prof.table())
    prof.plot(os.path.join(args.out_dir, "memory.png"), title=f"VWW MCUNet-style, {args.grid}x{args.grid} patches")
    stock = measure_tflm_arena(unpatched)
    print(f"stock TFLM arena of the unpatched model (tflite-micro): head {stock.head_bytes:,} B, "
          f"tail {stock.tail_bytes:,} B, total {stock.used_bytes:,} B")

    sketch_dir = os.path.join(args.out_dir, "VWWPatch")
    sketch = export_sketch(patched_path, sketch_dir, board="nano33ble", overwrite=True)
    print(f"Arduino sketch for {sketch.board.name}: {sketch.ino_path}")
    print(sketch.arena.explain())
    print(sketch.flash.explain())
    examples = {}
    if args.arduino_examples:
        from keras_patch.arduino.examples import export_memory_report, export_person_detection

        unpatched_path = os.path.join(args.out_dir, "vww.tflite")
        person = export_person_detection(patched_path, os.path.join(args.arduino_examples, "PersonDetectionPatched"),
                                         board="nano33ble", person_class=1, overwrite=True)
        report = export_memory_report(patched_path, os.path.join(args.arduino_examples, "MemoryReport"),
                                      unpatched=unpatched_path, board="nano33ble", overwrite=True)
        examples = {"person_detection_dir": person.out_dir, "memory_report_dir": report.out_dir}
        print(f"Arduino library examples: {person.out_dir}, {report.out_dir}")
    elapsed = time.time() - t0
    print(f"done in {elapsed:.0f} s")
    return {
        "bit_exact": bit_exact, "distinct_logits": distinct, "float_acc": float_acc, "int8_acc": int8_acc,
        "stock_tflm_head_bytes": stock.head_bytes, "sketch_dir": sketch_dir, "ino_path": sketch.ino_path,
        "seconds": elapsed, **examples,
    }


if __name__ == "__main__":
    main()
