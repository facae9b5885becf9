"""Visual-wake-words style example: train, patch, export int8, check, size, write an Arduino sketch.

    python examples/vww_patch.py [--out-dir vww_patch_out] [--epochs 6] [--samples 3000] [--grid 3]

End to end, offline:

1. generates a person / no-person dataset (96x96 grayscale, seeded numpy, no
   download): "person" images hold a procedurally drawn figure (head, body,
   arms, legs; random position, scale and brightness); every image has a
   textured, noisy background and distractor shapes (boxes, lines, blobs);
2. builds a small MCUNet-style network (inverted-residual blocks), wraps its
   stride-4 first stage in a `PatchStage` and trains it with `model.fit`;
3. exports int8 with the stage as one KP_PATCH_STAGE op, and checks that its
   logits on the int8 validation images equal, bit for bit, those of the same
   model converted without PatchStage; reports float and int8 accuracy;
4. prints the memory table (layer-by-layer vs patched peak) and the stock
   TFLM arena of the unpatched model, measured with tflite-micro;
5. writes an Arduino sketch for the Nano 33 BLE (what `keras-patch
   export-arduino` does).

Measured runtime: about 110 s on 2 CPU cores with the defaults (3000 images,
6 epochs, grid 3x3): float val accuracy 0.972, int8 0.968 (600 val images),
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


# --------------------------------------------------------------------------- data

def _disk(yy, xx, cy, cx, ry, rx):
    return ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1.0


def _segment(yy, xx, y0, x0, y1, x1, width):
    """Pixels within `width / 2` of the segment (y0, x0)-(y1, x1)."""
    dy, dx = y1 - y0, x1 - x0
    t = np.clip(((yy - y0) * dy + (xx - x0) * dx) / max(dy * dy + dx * dx, 1e-6), 0.0, 1.0)
    return (yy - (y0 + t * dy)) ** 2 + (xx - (x0 + t * dx)) ** 2 <= (width / 2.0) ** 2


def _background(rng) -> np.ndarray:
    """Smooth random texture + stripes + pixel noise, in [0, 1]."""
    n = IMAGE_SIZE
    coarse = rng.uniform(0, 1, (int(rng.integers(3, 9)),) * 2)
    idx = np.linspace(0, coarse.shape[0] - 1, n)
    lo = np.floor(idx).astype(int)
    hi = np.minimum(lo + 1, coarse.shape[0] - 1)
    w = idx - lo
    rows = coarse[lo] * (1 - w)[:, None] + coarse[hi] * w[:, None]
    smooth = rows[:, lo] * (1 - w)[None, :] + rows[:, hi] * w[None, :]
    img = rng.uniform(0.2, 0.8) + rng.uniform(0.1, 0.4) * (smooth - 0.5)
    if rng.random() < 0.3:
        yy, xx = np.mgrid[0:n, 0:n]
        angle = rng.uniform(0, np.pi)
        img = img + 0.08 * np.sin((yy * np.cos(angle) + xx * np.sin(angle)) * rng.uniform(0.2, 0.8))
    return img + rng.normal(0, rng.uniform(0.02, 0.08), (n, n))


def _paint(img, mask, value, rng):
    img[mask] = value + rng.normal(0, 0.03, int(mask.sum()))


def _distractors(img, yy, xx, rng, count):
    n = IMAGE_SIZE
    for _ in range(count):
        kind = rng.integers(3)
        value = rng.uniform(0, 1)
        if kind == 0:  # box
            y0, x0 = rng.uniform(0, n - 8, 2)
            h, w = rng.uniform(6, 30, 2)
            mask = (yy >= y0) & (yy < y0 + h) & (xx >= x0) & (xx < x0 + w)
        elif kind == 1:  # line
            y0, x0, y1, x1 = rng.uniform(0, n, 4)
            mask = _segment(yy, xx, y0, x0, y1, x1, rng.uniform(1.5, 4))
        else:  # blob
            cy, cx = rng.uniform(0, n, 2)
            mask = _disk(yy, xx, cy, cx, *rng.uniform(3, 12, 2))
        _paint(img, mask, value, rng)


def _person(img, yy, xx, rng):
    """A stick-and-ellipse figure: head, torso, two arms, two legs."""
    n = IMAGE_SIZE
    h = rng.uniform(34, 80)  # figure height in pixels
    cx = rng.uniform(h * 0.2, n - h * 0.2)
    top = rng.uniform(-0.05 * h, n - 0.95 * h)
    bg = float(np.median(img))
    value = float(np.clip(bg + rng.choice([-1, 1]) * rng.uniform(0.3, 0.6), 0, 1))
    limb = max(2.0, 0.07 * h)
    head_r = 0.09 * h
    head_cy = top + head_r
    neck = top + 2 * head_r
    hip = neck + 0.38 * h
    mask = _disk(yy, xx, head_cy, cx, head_r, head_r * rng.uniform(0.85, 1.05))
    mask |= _disk(yy, xx, (neck + hip) / 2, cx, 0.2 * h, 0.11 * h * rng.uniform(0.9, 1.3))
    shoulder = neck + 0.06 * h
    for side in (-1, 1):
        ang = rng.uniform(0.2, 1.6)  # arm angle from hanging down
        ex, ey = cx + side * 0.32 * h * np.sin(ang), shoulder + 0.32 * h * np.cos(ang)
        mask |= _segment(yy, xx, shoulder, cx + side * 0.08 * h, ey, ex, limb)
        spread = rng.uniform(0.05, 0.5)
        fx, fy = cx + side * 0.45 * h * np.sin(spread), hip + 0.45 * h * np.cos(spread)
        mask |= _segment(yy, xx, hip - 0.03 * h, cx + side * 0.05 * h, fy, fx, limb * 1.2)
    _paint(img, mask, value, rng)


def make_dataset(samples: int, seed: int = 0):
    """`samples` images (float32 in [0, 1], shape (N, 96, 96, 1)) and labels (1 = person), half each."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:IMAGE_SIZE, 0:IMAGE_SIZE].astype(np.float32)
    images = np.empty((samples, IMAGE_SIZE, IMAGE_SIZE, 1), np.float32)
    labels = (np.arange(samples) % 2).astype(np.int32)
    rng.shuffle(labels)
    for i in range(samples):
        img = _background(rng)
        _distractors(img, yy, xx, rng, int(rng.integers(1, 5)))
        if labels[i]:
            _person(img, yy, xx, rng)
        if rng.random() < 0.5:
            _distractors(img, yy, xx, rng, 1)  # sometimes in front of the person
        images[i, :, :, 0] = np.clip(img, 0, 1)
    return images, labels


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
    return parser.parse_args(argv)


def _input_quant(tflite_bytes: bytes):
    import tensorflow as tf

    interpreter = tf.lite.Interpreter(model_content=tflite_bytes)
    scale, zero_point = interpreter.get_input_details()[0]["quantization"]
    return float(scale), int(zero_point)


def main(argv=None) -> dict:
    args = parse_args(argv)
    os.makedirs(args.out_dir, exist_ok=True)
    t0 = time.time()

    import keras

    import keras_patch
    from keras_patch.arduino.sketch import export_sketch
    from keras_patch.export import convert_int8
    from keras_patch.tflm_arena import measure_tflm_arena

    print(f"generating {args.samples} images ...")
    images, labels = make_dataset(args.samples, seed=args.seed)
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

    scale, zero_point = _input_quant(patched)
    assert (scale, zero_point) == _input_quant(unpatched)
    xq = np.clip(np.round(x_val / scale) + zero_point, -128, 127).astype(np.int8)
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
    elapsed = time.time() - t0
    print(f"done in {elapsed:.0f} s")
    return {
        "bit_exact": bit_exact, "distinct_logits": distinct, "float_acc": float_acc, "int8_acc": int8_acc,
        "stock_tflm_head_bytes": stock.head_bytes, "sketch_dir": sketch_dir, "ino_path": sketch.ino_path,
        "seconds": elapsed,
    }


if __name__ == "__main__":
    main()
