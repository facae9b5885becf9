"""Quickstart: wrap MobileNetV2's first stage, export int8, profile, check bit-exactness.

    python examples/quickstart.py [--out-dir quickstart_out]

Runs offline in about 40-100 s on 2 CPU cores (28 s of CPU time; the high end
on a busy machine; random weights: train with `model.fit` as usual before
exporting a real model).
"""

import argparse
import os

import numpy as np


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out-dir", default="quickstart_out")
    args = parser.parse_args()
    os.makedirs(args.out_dir, exist_ok=True)

    import keras

    import keras_patch
    from keras_patch.keras.export import convert_int8

    base = keras.applications.MobileNetV2(input_shape=(144, 144, 3), alpha=0.35, weights=None,
                                          include_top=False, pooling="avg")
    base = keras.Model(base.input, keras.layers.Dense(10)(base.output))
    model = keras_patch.wrap_stage(base, until="block_2_add", grid=(6, 6))  # shares base's weights

    data = np.random.default_rng(0).uniform(-1, 1, (8, 144, 144, 3)).astype("float32")
    patched = keras_patch.export_tflite(model, data, path=os.path.join(args.out_dir, "patched.tflite"))
    unpatched = convert_int8(base, data)

    prof = keras_patch.profile(patched)
    print(prof.table())
    prof.plot(os.path.join(args.out_dir, "memory.png"))

    images = np.random.default_rng(1).integers(-128, 128, (2, 144, 144, 3), dtype=np.int8)
    same = np.array_equal(keras_patch.run_tflite(patched, images)[0], keras_patch.run_tflite(unpatched, images)[0])
    print(f"bit-exact: {same}")


if __name__ == "__main__":
    main()
