"""`keras-patch` command line: profile, export, patchify, export-arduino, demo.

    keras-patch demo
    keras-patch profile model.tflite --plot memory.png
    keras-patch export model.keras --rep-data samples.npy --out model.tflite
    keras-patch patchify in.tflite out.tflite --split block_5_add --grid 4x4
    keras-patch export-arduino model.tflite --out MySketch --board nano33ble
    keras-patch export-arduino model.tflite --out PersonDetection --sketch person-detection
    keras-patch export-arduino model.tflite --out MemoryReport --sketch memory-report --compare-with unpatched.tflite
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import List, Optional

import numpy as np

from keras_patch.errors import KerasPatchError


def _load_rep_data(path: str) -> np.ndarray:
    if not os.path.isfile(path):
        raise KerasPatchError(f"--rep-data: no file at '{path}'.")
    data = np.load(path)
    if isinstance(data, np.lib.npyio.NpzFile):
        if not data.files:
            raise KerasPatchError(f"--rep-data: '{path}' holds no arrays.")
        data = data[data.files[0]]
    if data.ndim != 4 or len(data) == 0:
        raise KerasPatchError(f"--rep-data: expected samples of shape (N, H, W, C), got {data.shape}.")
    return data.astype(np.float32)


def _load_keras(path: str):
    import keras

    import keras_patch  # noqa: F401  (registers PatchStage for deserialization)

    if not os.path.isfile(path):
        raise KerasPatchError(f"No Keras model at '{path}'.")
    return keras.models.load_model(path, compile=False)


def _cmd_profile(args) -> int:
    from keras_patch.profiler import profile

    source = _load_keras(args.model) if args.model.endswith(".keras") else args.model
    prof = profile(source, kernel=args.kernel)
    if args.json:
        print(json.dumps(prof.to_dict(), indent=1, default=list))
    else:
        print(prof.table())
    if args.plot:
        prof.plot(args.plot)
        print(f"plot written to {args.plot}")
    return 0


def _cmd_export(args) -> int:
    from keras_patch.export import export_tflite

    model = _load_keras(args.model)
    data = _load_rep_data(args.rep_data)
    out = args.out or os.path.splitext(args.model)[0] + ".tflite"
    result = export_tflite(model, data, path=out)
    print(f"wrote {out} ({len(result):,} bytes)")
    return 0


def _cmd_patchify(args) -> int:
    from keras_patch.export import write_atomically
    from keras_patch.patchify import normalize_grid, patchify

    result = patchify(args.input, args.split, normalize_grid(args.grid), start=args.start)
    write_atomically(args.output, result)
    print(f"wrote {args.output} ({len(result):,} bytes)")
    return 0


def _cmd_export_arduino(args) -> int:
    from keras_patch.arduino.examples import export_memory_report, export_person_detection
    from keras_patch.arduino.sketch import export_sketch

    for path in [args.model] + ([args.compare_with] if args.compare_with else []):
        if not os.path.isfile(path):
            raise KerasPatchError(f"No .tflite model at '{path}'.")
    if args.compare_with and args.sketch != "memory-report":
        raise KerasPatchError("--compare-with is for --sketch memory-report.")
    from keras_patch.tflm_arena import TFLMError

    common = dict(board=args.board, arena_bytes=args.arena_bytes, tail_bytes=args.tail_bytes, overwrite=args.force)
    try:
        if args.sketch == "person-detection":
            result = export_person_detection(args.model, args.out, person_class=args.person_class, **common)
        elif args.sketch == "memory-report":
            result = export_memory_report(args.model, args.out, unpatched=args.compare_with, **common)
        else:
            result = export_sketch(args.model, args.out, **common)
    except TFLMError as e:
        raise KerasPatchError(
            f"measuring TFLM's persistent arena bytes of the unpatched model failed ({e}); "
            "pass --tail-bytes N to give them."
        ) from None
    board = result.board
    print(f"board: {board.name} ({board.fqbn})")
    if args.sketch == "memory-report":
        print("patched model:\n" + result.patched_arena.explain())
        print("unpatched model:\n" + result.unpatched_arena.explain())
        print(f"shared arena: {result.arena.total_bytes:,} B (the larger)")
    else:
        print(result.arena.explain())
    extra = 0
    if args.sketch == "person-detection":
        from keras_patch.arduino.examples import FRAME_HEIGHT, FRAME_WIDTH

        extra = FRAME_WIDTH * FRAME_HEIGHT
        print(f"camera frame buffer: {extra:,} B")
    print(f"  -> fits: {result.arena.total_bytes + extra:,} of {board.arena_budget_bytes:,} B RAM left "
          f"next to the core ({board.ram_bytes:,} B total for the sketch)")
    print(result.flash.explain())
    print(f"  -> fits: {result.flash.total_bytes:,} of {board.model_flash_budget_bytes:,} B flash left "
          f"next to the core ({board.flash_bytes:,} B total for the sketch)")
    print(f"resolver: MicroMutableOpResolver<{result.resolver.num_slots}>: "
          + ", ".join(result.resolver.builtin_methods + ["keras_patch::AddKerasPatchOps"]))
    missing = result.resolver.not_in_arduino_tflm
    if missing:
        print(f"note: {', '.join(missing)} are not in the TFLM that Chirale_TensorFlowLite 2.0.0 ships; "
              "build the sketch against a newer TFLM Arduino library")
    written = sorted(os.listdir(result.out_dir))
    print(f"wrote {result.out_dir}: {', '.join(written)}")
    return 0


def _cmd_demo(args) -> int:
    from keras_patch.demo import run_demo
    from keras_patch.patchify import normalize_grid

    def say(message: str) -> None:
        print(f"[demo] {message}", flush=True)

    result = run_demo(out_dir=args.out_dir, grid=normalize_grid(args.grid), num_images=args.images, progress=say)
    prof = result.profile
    s = prof.summary
    print()
    print(prof.table())
    print()
    predicted = s["layer_by_layer_peak_bytes"]
    measured = result.stock_tflm_head_bytes
    print(f"stock TFLM arena head, measured (tflite-micro): {measured:,} B; "
          f"keras-patch prediction {predicted:,} B ({100 * (predicted - measured) / measured:+.2f} %)")
    print(f"patched arena head (prediction): {s['patched_peak_bytes']:,} B -> "
          f"{measured / s['patched_peak_bytes']:.2f}x lower than stock TFLM")
    print(f"bit-exact vs the unpatched int8 model on {result.num_images} images: "
          f"{'YES' if result.bit_exact else 'NO'} (reference executor), "
          f"{'YES' if result.bit_exact_cpp else 'NO'} (C++ kernel core); compared: the logits "
          f"({result.distinct_logits} distinct int8 values) and all {result.stage_values_compared:,} "
          f"int8 values of the stage output")
    print(f"files: {result.patched_path}, {result.unpatched_path}, {result.plot_path}")
    return 0 if result.bit_exact and result.bit_exact_cpp else 1


def _board_keys() -> list:
    from keras_patch.arduino.boards import BOARDS

    return sorted(BOARDS)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="keras-patch", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("profile", help="memory/MAC table of a .tflite or .keras model")
    p.add_argument("model")
    p.add_argument("--plot", help="write the memory plot (PNG) here")
    p.add_argument("--json", action="store_true", help="print the profile as JSON")
    p.add_argument("--kernel", choices=["portable", "cmsis_nn"], default="portable",
                   help="KP_PATCH_STAGE build to predict scratch for (cmsis_nn: -DCMSIS_NN, adds buffer #1)")
    p.set_defaults(func=_cmd_profile)

    p = sub.add_parser("export", help="int8 .tflite from a .keras model; PatchStages become KP_PATCH_STAGE")
    p.add_argument("model")
    p.add_argument("--rep-data", required=True, help=".npy/.npz of calibration samples (N, H, W, C)")
    p.add_argument("--out", help="output .tflite (default: next to the model)")
    p.set_defaults(func=_cmd_export)

    p = sub.add_parser("patchify", help="rewrite the first stage of an int8 .tflite as KP_PATCH_STAGE")
    p.add_argument("input")
    p.add_argument("output")
    p.add_argument("--split", required=True, help="op index, output tensor name or Keras layer name of the stage's last op")
    p.add_argument("--grid", default="4x4", help="patches, e.g. 4x4")
    p.add_argument("--start", help="first tensor of the stage (default: the int8 model input)")
    p.set_defaults(func=_cmd_patchify)

    p = sub.add_parser("export-arduino", help="Arduino sketch folder for a .tflite, sized and checked for a board")
    p.add_argument("model", help="int8 .tflite (patched or not)")
    p.add_argument("--out", required=True, help="sketch folder to create; its name is the sketch's name")
    p.add_argument("--board", default="nano33ble", help="target board (default nano33ble): " + ", ".join(_board_keys()))
    p.add_argument("--arena-bytes", type=int, help="use this tensor arena instead of the estimate")
    p.add_argument("--tail-bytes", type=int,
                   help="TFLM persistent bytes to assume instead of measuring the unpatched model")
    p.add_argument("--force", action="store_true", help="replace a non-empty --out folder (a README.md in it is kept)")
    p.add_argument("--sketch", choices=("basic", "person-detection", "memory-report"), default="basic",
                   help="what the sketch does (default basic: a constant test input every second); "
                        "person-detection: OV7675 camera frame -> model -> Serial + RGB LED (grayscale "
                        "(1, H, W, 1) int8 input, pixels/255); memory-report: arena used by the patched vs the "
                        "unpatched model and whether their outputs are identical")
    p.add_argument("--compare-with", metavar="UNPATCHED.tflite",
                   help="memory-report: the same model without patches (default: keras_patch.unpatchify(MODEL))")
    p.add_argument("--person-class", type=int, default=1,
                   help="person-detection: output index meaning 'person' (default 1)")
    p.set_defaults(func=_cmd_export_arduino)

    p = sub.add_parser("demo", help="MobileNetV2 0.35@144 end to end: memory table, bit-exactness, plot")
    p.add_argument("--out-dir", default="keras_patch_demo")
    p.add_argument("--grid", default="6x6")
    p.add_argument("--images", type=int, default=4)
    p.set_defaults(func=_cmd_demo)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (KerasPatchError, ValueError, OSError) as e:
        print(f"keras-patch {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
