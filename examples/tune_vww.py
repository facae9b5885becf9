"""Joint architecture + patch-schedule search for person detection on a Nano 33 BLE Sense budget.

    python examples/tune_vww.py [--out-dir tune_vww_out] [--trials 10] [--epochs 3] [--qat]

Offline, on CPU, in minutes:

1. generates the person / no-person data set (`keras_patch.datasets`) at the
   largest searched resolution (each trial's images are resized to its own);
2. searches MCUNet-style backbones with keras-tuner (`PatchRandomSearch`):
   input resolution, width, per-stage depth / expand ratio / kernel size,
   where the patch stage ends, its grid, and receptive-field redistribution,
   under the Nano 33 BLE Sense's 256 KB SRAM and 1 MB flash: peak SRAM
   (activations) <= 256 KiB and flash <= 1 MiB, and, with `--board`, the
   sketch's whole tensor arena and flash within what the board leaves after
   its core. Each trial is measured on its int8 graph before training; trials
   over budget are recorded and never trained;
3. prints the results table, writes the Pareto plot (accuracy vs peak SRAM);
4. takes the best trial, fine-tunes it a little longer, exports it int8 with
   its patch stage as one KP_PATCH_STAGE op, checks bit-exactness against the
   same model converted without patching, reports float vs int8 accuracy
   (optionally after quantization-aware fine-tuning, `--qat`), and writes the
   Arduino sketch for the Nano 33 BLE Sense (`keras-patch export-arduino`).

Measured: see examples/README.md.
"""

from __future__ import annotations

import argparse
import os
import time

import numpy as np

KIB = 1024


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out-dir", default="tune_vww_out")
    parser.add_argument("--trials", type=int, default=10)
    parser.add_argument("--epochs", type=int, default=3, help="training epochs per trial")
    parser.add_argument("--final-epochs", type=int, default=3, help="extra epochs for the best trial")
    parser.add_argument("--samples", type=int, default=2000, help="images generated (80%% train, 20%% val)")
    parser.add_argument("--resolutions", default="64,80,96,128")
    parser.add_argument("--sram-kb", type=int, default=256, help="peak SRAM budget (KiB)")
    parser.add_argument("--flash-kb", type=int, default=1024, help="flash budget (KiB)")
    parser.add_argument("--board", default="nano33ble", help="also fit this board's arena and flash")
    parser.add_argument("--qat", action="store_true", help="quantization-aware fine-tuning of the best model")
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args(argv)


def search_space(resolutions):
    from keras_patch.tuning import PatchSearchSpace

    return PatchSearchSpace(
        resolutions=tuple(resolutions), widths=(0.35, 0.5, 0.75), num_stages=5, depths=(1, 2),
        expand_ratios=(3, 4, 6), kernel_sizes=(3, 5, 7), patch_stages=(0, 1, 2, 3), grids=(2, 3, 4),
        redistribute=(False, True), input_channels=1, num_classes=2)


def main(argv=None) -> dict:
    args = parse_args(argv)
    os.makedirs(args.out_dir, exist_ok=True)
    t0 = time.time()

    import keras

    import keras_patch
    from keras_patch.arduino.sketch import BoardBudgetError, export_sketch
    from keras_patch.datasets import person_dataset
    from keras_patch.keras.export import convert_int8
    from keras_patch.runtime.host import quantize_input
    from keras_patch.tuning import PatchHyperModel, PatchRandomSearch, resize_images

    resolutions = sorted(int(r) for r in args.resolutions.split(","))
    images, labels = person_dataset(args.samples, seed=args.seed, image_size=resolutions[-1])
    split = int(0.8 * args.samples)
    x_train, y_train, x_val, y_val = images[:split], labels[:split], images[split:], labels[split:]
    print(f"data: {len(x_train)} train / {len(x_val)} val images at {resolutions[-1]} px ({time.time() - t0:.0f} s)")

    hypermodel = PatchHyperModel(search_space(resolutions), seed=args.seed)
    tuner = PatchRandomSearch(
        hypermodel, max_trials=args.trials, seed=args.seed + 1,  # keras-tuner reads seed 0 as "unseeded"
        sram_bytes=args.sram_kb * KIB, flash_bytes=args.flash_kb * KIB, board=args.board,
        directory=args.out_dir, project_name="search", overwrite=True)
    tuner.search(x_train, y_train, validation_data=(x_val, y_val), epochs=args.epochs, batch_size=32, verbose=0)
    search_seconds = time.time() - t0
    print(tuner.results_table())
    pareto = tuner.plot_pareto(os.path.join(args.out_dir, "pareto.png"),
                               title=f"person detection, {args.sram_kb} KiB SRAM / {args.flash_kb} KiB flash")
    print(f"Pareto plot: {pareto} (search {search_seconds:.0f} s)")

    best = tuner.best_result()
    print(f"best trial {best.trial_id}: {best.architecture}, val_accuracy {best.objective:.3f}, "
          f"peak SRAM {best.peak_sram_bytes:,} B")
    model = tuner.get_best_models(1)[0]
    size = int(model.inputs[0].shape[1])
    x_train_r, x_val_r = resize_images(x_train, size), resize_images(x_val, size)
    if args.final_epochs:
        model.compile(optimizer=keras.optimizers.Adam(1e-3),
                      loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True), metrics=["accuracy"])
        model.fit(x_train_r, y_train, validation_data=(x_val_r, y_val), epochs=args.final_epochs, batch_size=32,
                  verbose=2)
    float_acc = float(np.mean(np.argmax(model.predict(x_val_r, verbose=0), -1) == y_val))

    calibration = x_train_r[:100]
    patched = keras_patch.export_tflite(model, calibration)
    unpatched = convert_int8(model, calibration)
    qat = None
    if args.qat:
        from keras_patch.tuning.qat import quantization_aware_finetune

        qat = quantization_aware_finetune(model, (x_train_r, y_train), (x_val_r, y_val), seed=args.seed)
        patched, unpatched = qat.patched_tflite, qat.unpatched_tflite
        print(f"QAT: float {qat.float_accuracy:.3f}, PTQ int8 {qat.ptq_int8_accuracy:.3f}, "
              f"QAT int8 {qat.qat_int8_accuracy:.3f} ({qat.seconds:.0f} s)")
    patched_path = os.path.join(args.out_dir, "person_patched.tflite")
    keras_patch.keras.export.write_atomically(patched_path, patched)
    keras_patch.keras.export.write_atomically(os.path.join(args.out_dir, "person.tflite"), unpatched)

    xq = quantize_input(patched, x_val_r)
    logits = keras_patch.run_tflite(patched, xq)[0]
    bit_exact = bool(np.array_equal(logits, keras_patch.run_tflite(unpatched, xq)[0]))
    int8_acc = float(np.mean(np.argmax(logits, -1) == y_val))
    print(f"bit-exact (patched vs unpatched int8 logits, {len(xq)} val images): {bit_exact}")
    print(f"val accuracy: float {float_acc:.3f}, int8 {int8_acc:.3f}" + (" (QAT)" if qat else " (post-training)"))

    prof = keras_patch.profile(patched)
    print(prof.table())
    sketch_dir = os.path.join(args.out_dir, "PersonTuned")
    try:
        sketch = export_sketch(patched_path, sketch_dir, board=args.board, overwrite=True)
        print(f"Arduino sketch for {sketch.board.name}: {sketch.ino_path}")
        print(sketch.arena.explain())
        print(sketch.flash.explain())
        ino_path = sketch.ino_path
    except BoardBudgetError as e:  # the search budget is the arena head; the sketch adds tail + margin
        print(f"no sketch written: {e}")
        ino_path = None
    elapsed = time.time() - t0
    print(f"done in {elapsed:.0f} s")
    results = tuner.results()
    return {
        "trials": len(results),
        "trained": sum(r.status == "trained" for r in results),
        "over_budget": sum(r.status == "over budget" for r in results),
        "best_trial": best.trial_id,
        "best_peak_sram_bytes": best.peak_sram_bytes,
        "float_acc": float_acc,
        "int8_acc": int8_acc,
        "qat": None if qat is None else {"ptq_int8": qat.ptq_int8_accuracy, "qat_int8": qat.qat_int8_accuracy,
                                         "float": qat.float_accuracy},
        "bit_exact": bit_exact,
        "pareto_png": pareto,
        "ino_path": ino_path,
        "search_seconds": search_seconds,
        "seconds": elapsed,
    }


if __name__ == "__main__":
    main()
