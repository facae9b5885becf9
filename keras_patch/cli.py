"""`keras-patch` command line: profile, export, plan, patchify, export-arduino, demo.

    keras-patch demo
    keras-patch --version
    keras-patch profile model.tflite --plot memory.png --by block
    keras-patch export model.keras --rep-data samples.npy --out model.tflite
    keras-patch plan model.tflite --max-overhead 1.1 --sram 256K --out patched.tflite
    keras-patch patchify in.tflite out.tflite --split block_5_add --grid 4x4
    keras-patch export-arduino model.tflite --out MySketch --board nano33ble
    keras-patch export-arduino model.tflite --out PersonDetection --sketch person-detection
    keras-patch export-arduino model.tflite --out MemoryReport --sketch memory-report --compare-with unpatched.tflite

Only `.keras` models and the demo import TensorFlow/Keras (about 10 s); on a
`.tflite` no command does. TensorFlow's log noise is hidden unless `--verbose`;
long steps show progress on stderr.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import sys
from typing import List, Optional

import numpy as np

from keras_patch._console import Progress, configure_output, import_tensorflow
from keras_patch._version import __version__
from keras_patch.errors import KerasPatchError


def _load_rep_data(path: str) -> np.ndarray:
    if not os.path.isfile(path):
        raise KerasPatchError(f"--rep-data: no file at '{path}'.")
    data = np.load(path)
    if isinstance(data, np.lib.npyio.NpzFile):
        if not data.files:
            raise KerasPatchError(f"--rep-data: '{path}' holds no arrays.")
        data = data[data.files[0]]
    if data.ndim == 4 and len(data) == 0:
        raise KerasPatchError(f"--rep-data: '{path}' holds no samples (shape {data.shape}).")
    if data.ndim != 4:
        raise KerasPatchError(f"--rep-data: expected samples of shape (N, H, W, C), got {data.shape}.")
    return data.astype(np.float32)


@contextlib.contextmanager
def _naming_rep_data(path: str):
    """Calibration-data errors name the `--rep-data` file instead of `representative_dataset`."""
    from keras_patch.errors import CalibrationDataError

    try:
        yield
    except CalibrationDataError as e:
        raise CalibrationDataError(str(e).replace("representative_dataset", f"--rep-data '{path}'", 1)) from None


def _import_custom_modules(names: Optional[List[str]]) -> None:
    """Imports each `--custom-module` (a module name, or a `.py` file) so its Keras classes register."""
    import importlib
    import importlib.util

    for name in names or []:
        try:
            if name.endswith(".py"):
                if not os.path.isfile(name):
                    raise ImportError(f"no file at '{name}'")
                module_name = os.path.splitext(os.path.basename(name))[0]
                spec = importlib.util.spec_from_file_location(module_name, name)
                module = importlib.util.module_from_spec(spec)
                sys.modules[module_name] = module
                spec.loader.exec_module(module)
            else:
                if os.getcwd() not in sys.path:  # as `python -m` would
                    sys.path.insert(0, os.getcwd())
                importlib.import_module(name)
        except ImportError as e:
            raise KerasPatchError(f"--custom-module {name}: cannot import it ({e}).") from None


def _keras_error_text(e: Exception) -> str:
    """Keras' message in one line, without the object config it appends."""
    text = str(e).split(" Full object config:")[0]
    return " ".join(text.split())


def _load_keras(path: str, custom_modules: Optional[List[str]] = None):
    import zipfile

    import keras

    import keras_patch  # noqa: F401  (registers PatchStage for deserialization)
    from keras_patch.errors import InvalidModelError

    if not os.path.isfile(path):
        raise KerasPatchError(f"No Keras model at '{path}'.")
    if path.endswith(".tflite"):
        raise KerasPatchError(f"'{path}' is a .tflite already; this command takes a .keras model.")
    if path.endswith(".keras"):
        if not zipfile.is_zipfile(path):
            size = os.path.getsize(path)
            raise InvalidModelError(
                f"'{path}' is not a valid .keras archive (a zip file): "
                + ("the file is empty." if size == 0 else
                   f"its {size:,} bytes are not a zip archive (corrupt, truncated or another format).")
            )
        with zipfile.ZipFile(path) as archive:
            if "config.json" not in archive.namelist():
                raise InvalidModelError(f"'{path}' is not a valid .keras archive: the zip file has no config.json.")
    _import_custom_modules(custom_modules)
    try:
        return keras.models.load_model(path, compile=False)
    except TypeError as e:
        match = re.search(r"Could not locate (\w+) '([^']+)'", str(e))
        if not match:
            raise KerasPatchError(f"cannot load the Keras model '{path}': {_keras_error_text(e)}") from None
        kind, name = match.groups()
        registered = re.search(r"'registered_name': '([^']*)>", str(e))
        package = f"package={registered.group(1)!r}" if registered else ""
        raise KerasPatchError(
            f"'{path}' uses the custom {kind} '{name}', which is not registered: decorate it with "
            f"@keras.saving.register_keras_serializable({package}) and pass its module with --custom-module MODULE "
            f"(or, in Python, import it or give custom_objects={{'{name}': {name}}} to keras.models.load_model)."
        ) from None
    except (ValueError, KeyError, OSError, zipfile.BadZipFile) as e:
        raise KerasPatchError(f"cannot load the Keras model '{path}': {_keras_error_text(e)}") from None


def _cmd_profile(args) -> int:
    from keras_patch.arena.profiler import profile

    if args.plot:
        from keras_patch.files import figure_format

        figure_format(args.plot)  # a bad --plot path fails before the profiling
    if args.model.endswith(".keras"):
        _import_tensorflow(args)
        with args.progress.step(f"loading {args.model}"):
            source = _load_keras(args.model, args.custom_module)
        with args.progress.step("converting to int8 and profiling (about a minute for MobileNetV2)"):
            prof = profile(source, kernel=args.kernel)
    else:
        prof = profile(args.model, kernel=args.kernel)
    if args.json:
        print(json.dumps(prof.to_dict(), indent=1, default=list))
    else:
        print(prof.table())
    if args.plot:
        written = prof.plot(args.plot, by=args.by)
        print(f"plot written to {written}")
    return 0


def _cmd_export(args) -> int:
    from keras_patch.keras.export import check_finite_samples, export_tflite
    from keras_patch.files import check_output_path

    out = args.out if args.out is not None else os.path.splitext(args.model)[0] + ".tflite"
    check_output_path(out)  # before the model is loaded and converted
    data = _load_rep_data(args.rep_data)
    with _naming_rep_data(args.rep_data):
        check_finite_samples(data)  # before TensorFlow is loaded
    _import_tensorflow(args)
    with args.progress.step(f"loading {args.model}"):
        model = _load_keras(args.model, args.custom_module)
    with args.progress.step(f"converting to int8, calibrating on {len(data)} samples "
                            "(about a minute for MobileNetV2)"), _naming_rep_data(args.rep_data):
        result = export_tflite(model, data, path=out, allow_worse=args.allow_worse, arena=_arena_options(args))
    print(f"wrote {out} ({len(result):,} bytes)")
    return 0


def _cmd_patchify(args) -> int:
    from keras_patch.files import check_output_path, write_atomically
    from keras_patch.graph.patchify import normalize_grid, patchify
    from keras_patch.planner.guard import check_never_worse

    check_output_path(args.output)
    grid = normalize_grid(args.grid)
    result = patchify(args.input, args.split, grid, start=args.start, arena=_arena_options(args))
    check_never_worse(result, allow_worse=args.allow_worse, override="--allow-worse",
                      what=f"{args.input} with --split {args.split} --grid {grid[0]}x{grid[1]}")
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
    from keras_patch.arena.tflm_arena import TFLMError

    common = dict(board=args.board, arena_bytes=args.arena_bytes, tail_bytes=args.tail_bytes, overwrite=args.force,
                  allow_worse=args.allow_worse)
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


def _cmd_plan(args) -> int:
    from keras_patch.files import check_output_path, write_atomically
    from keras_patch.planner.guard import check_never_worse
    from keras_patch.planner.search import plan

    if args.out is not None:
        check_output_path(args.out)  # before the search
    if args.model.endswith(".keras"):
        raise KerasPatchError(f"'{args.model}' is a Keras model; `keras-patch plan` takes an int8 .tflite: "
                              "export it first (keras-patch export MODEL.keras --rep-data ...), or call "
                              "keras_patch.plan(keras_model, representative_dataset=...) in Python.")
    if not os.path.isfile(args.model):
        raise KerasPatchError(f"No .tflite model at '{args.model}'.")
    with _planner_progress(args, f"planning {os.path.basename(args.model)}") as progress:
        result = plan(args.model, max_mac_overhead=args.max_overhead, sram_bytes=args.sram, grids=args.grids,
                      kernel=args.kernel, progress=progress, arena=_arena_options(args))
    report = sys.stderr if args.json else sys.stdout
    if args.json:
        print(result.to_json())
    else:
        print(result.table())
    if args.out is not None:
        with open(args.model, "rb") as f:
            patched = result.apply(f.read())
        check_never_worse(patched, kernel=args.kernel, what=f"{args.model} with the plan")
        write_atomically(args.out, patched)
        what = ("no patch stage (empty plan)" if result.is_empty else f"{len(result.stages)} patch stage(s)") + (
            f", arena passes: {', '.join(result.arena_passes)}" if result.arena_passes else "")
        print(f"wrote {args.out} ({len(patched):,} bytes, {what})", file=report)
    return 0


_ARENA_SWITCHES = (
    ("int8_input", "--no-int8-input", "keep a float input and its QUANTIZE op"),
    ("fold_pad", "--no-fold-pad", "keep PAD ops (no folding into the convolutions)"),
    ("in_place", "--no-in-place", "no in-place depthwise ops or patch arenas"),
    ("offline_plan", "--no-offline-plan", "no offline memory plan: TFLM's greedy planner lays out the arena"),
)


def _add_arena_args(p) -> None:
    """The arena passes' switches (docs/arena.md): all passes run unless switched off."""
    for name, flag, what in _ARENA_SWITCHES:
        p.add_argument(flag, dest=f"no_{name}", action="store_true", help=what)


def _arena_options(args):
    from keras_patch.graph.passes.pipeline import ArenaOptions

    return ArenaOptions(kernel=getattr(args, "kernel", "portable"),
                        **{name: not getattr(args, f"no_{name}") for name, _, _ in _ARENA_SWITCHES})


@contextlib.contextmanager
def _planner_progress(args, message: str):
    """The planner's `progress`: a bar on a terminal once the search passes a second; else one line at the end."""
    stream = sys.stderr
    try:
        terminal = stream.isatty()
    except (AttributeError, ValueError):
        terminal = False
    if not terminal:
        with args.progress.step(message):
            yield None
        return
    from tqdm import tqdm

    bars = []

    def wrap(iterable):
        bar = tqdm(iterable, desc=message, delay=1.0, leave=False, file=stream, dynamic_ncols=True)
        bars.append(bar)
        return bar

    try:
        yield wrap
    finally:
        for bar in bars:
            bar.close()


def _cmd_demo(args) -> int:
    from keras_patch.demo import run_demo

    _import_tensorflow(args)
    with contextlib.ExitStack() as current_step:

        def say(message: str) -> None:  # each demo step shows until the next begins
            current_step.close()
            current_step.enter_context(args.progress.step(f"[demo] {message}"))

        result = run_demo(out_dir=args.out_dir, max_mac_overhead=args.max_overhead, grid=args.grid,
                          num_images=args.images, progress=say)
    prof = result.profile
    print()
    print(prof.table())
    print()
    print(result.plan.table())
    print()
    print(_demo_comparison(result))
    print()
    predicted = prof.layer_by_layer_peak_bytes
    measured = result.stock_tflm_head_bytes
    print(f"stock TFLM arena head, measured (tflite-micro): {measured:,} B; "
          f"keras-patch prediction {predicted:,} B ({100 * (predicted - measured) / measured:+.2f} %)")
    if result.plan.message:
        print(f"plan: {result.plan.message}")
    print(f"planned arena head (prediction): {prof.patched_peak_bytes:,} B -> "
          f"{measured / prof.patched_peak_bytes:.2f}x lower than stock TFLM, {prof.num_stages} patch stage(s), "
          f"MAC overhead {prof.mac_overhead:.3f}")
    stages = (f" and all {result.stage_values_compared:,} int8 values of the {prof.num_stages} stage output(s)"
              if prof.num_stages else "")
    print(f"bit-exact vs TFLM's output of the unpatched int8 model (tflite-micro) on {result.num_images} images: "
          f"{'YES' if result.bit_exact else 'NO'} (reference executor), "
          f"{'YES' if result.bit_exact_cpp else 'NO'} (C++ kernel core); compared: the logits "
          f"({result.distinct_logits} distinct int8 values){stages}")
    board = f"{result.board.name} ({result.board.key})"
    if result.fits_board:
        print(f"{board}: the planned model fits: tensor arena {result.board_arena_bytes:,} B of "
              f"{result.board.arena_budget_bytes:,} B; sketch {result.sketch_path}")
    else:
        print(f"{board}: DOES NOT FIT: {result.board_message}")
    print(f"files: {result.patched_path}, {result.unpatched_path}, {result.plot_path}")
    return 0 if result.bit_exact and result.bit_exact_cpp and result.fits_board else 1


def _demo_comparison(result) -> str:
    """The demo's table: layer by layer, the best single stage, the whole-network plan."""
    stock = result.stock_tflm_head_bytes
    rows = [("", "arena head (A)", "without input (A')", "vs layer by layer", "MAC overhead", "search", "stages")]
    for m in result.methods:
        search = "-" if m.name == "layer by layer" else f"{m.search_seconds:.1f} s"
        if m.note and not m.peak_bytes:
            rows.append((m.name, "-", "-", "-", "-", search, m.note))
            continue
        if m.name == "layer by layer":
            what = "0 (head measured in TFLM)"
        elif len(m.stages) == 1:
            what = f"1: {m.stages[0]}"
        else:
            what = f"{len(m.stages)} (the plan above)"
        rows.append((m.name, f"{m.peak_bytes:,} B", f"{m.peak_bytes_without_input:,} B",
                     f"{stock / m.peak_bytes:.2f}x", f"{m.mac_overhead:.3f}", search, what))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]) - 1)]
    return "\n".join("  ".join([c.ljust(w) for c, w in zip(r, widths)] + [r[-1]]).rstrip() for r in rows)


def _import_tensorflow(args) -> None:
    if "tensorflow" not in sys.modules:
        with args.progress.step("loading TensorFlow"):
            import_tensorflow(verbose=args.verbose)


def _grid_arg(text: str) -> tuple:
    """argparse type of --grid: ASCII 'NxM' or 'N', positive (`keras_patch.grid.check_grid`)."""
    from keras_patch.grid import check_grid

    try:
        return check_grid(text)
    except KerasPatchError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


#: Multipliers of the size suffixes `--sram` takes (K, M: 1024 and 1024 ** 2, as RAM sizes are given).
SIZE_UNITS = {"": 1, "B": 1, "K": 1024, "KB": 1024, "KIB": 1024, "M": 1024 ** 2, "MB": 1024 ** 2, "MIB": 1024 ** 2}


def parse_size(text: str) -> int:
    """A byte count such as '262144', '256K', '256KiB', '1.5M' (K = 1024 B, M = 1024 * 1024 B).

    Raises:
        KerasPatchError: anything else (an unknown suffix such as '12Q', no
            number, a size that is not a positive whole number of bytes).
    """
    match = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]*)?|\.[0-9]+)\s*([A-Za-z]*)\s*", text)
    unit = match.group(2).upper() if match else None
    if match is None or unit not in SIZE_UNITS:
        raise KerasPatchError(f"expected a size in bytes such as 262144, 256K or 1M (K = 1024 B, M = 1024 KiB), "
                              f"got {text!r}.")
    number = match.group(1)
    value = float(number) * SIZE_UNITS[unit] if "." in number else int(number) * SIZE_UNITS[unit]
    if value != int(value):
        raise KerasPatchError(f"{text!r} is not a whole number of bytes ({value:g} B).")
    if value <= 0:
        raise KerasPatchError(f"must be more than 0 bytes, got {text!r}.")
    return int(value)


def _size_arg(text: str) -> int:
    """argparse type of --sram: `parse_size`."""
    try:
        return parse_size(text)
    except KerasPatchError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _overhead_arg(text: str) -> float:
    """argparse type of --max-overhead: a finite number >= 1 (whole-network patched MACs / layer-by-layer MACs)."""
    import math

    try:
        value = float(text) if re.fullmatch(r"\s*[+-]?[0-9.eE+-]+\s*", text) else math.nan
    except ValueError:
        value = math.nan
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"expected a number such as 1.1, got {text!r}.")
    if value < 1.0:
        raise argparse.ArgumentTypeError(
            f"must be 1 or more (patched MACs / layer-by-layer MACs: 1.0 allows no recomputation, 1.1 allows 10 %), "
            f"got {value:g}.")
    return value


def _grids_arg(text: str) -> list:
    """argparse type of --grids: comma-separated grids, e.g. '2x2,3x3,4x4' (each as --grid)."""
    parts = [part.strip() for part in text.split(",")]
    if not any(parts):
        raise argparse.ArgumentTypeError(f"expected grids such as 2x2,4x4, got {text!r}.")
    return [_grid_arg(part) for part in parts if part]


def _int_arg(minimum: int):
    """argparse type: a decimal int >= `minimum`, the valid range named in the error."""

    def parse(text: str) -> int:
        if not re.fullmatch(r"\s*[+-]?[0-9]+\s*", text):  # ASCII digits only; int() takes any Unicode digit
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}.")
        value = int(text)
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be {minimum} or more, got {value}.")
        return value

    return parse


class _ArgumentParser(argparse.ArgumentParser):
    """ArgumentParser whose usage errors are one line on stderr (exit 2), like the commands' own errors.

    An option value that starts with '-' (`--grid -2x2`) is taken as the
    value rather than as an unknown option, so that its own check names it.
    """

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message.rstrip('.')} (see {self.prog} --help)\n")

    def parse_known_args(self, args=None, namespace=None):
        args = list(sys.argv[1:] if args is None else args)
        takes_value = {
            option for action in self._actions if action.nargs is None and action.option_strings
            for option in action.option_strings
        }
        merged = []
        for arg in args:
            if (merged and merged[-1] in takes_value and arg.startswith("-") and not arg.startswith("--")
                    and arg not in self._option_string_actions):
                merged[-1] = f"{merged[-1]}={arg}"
            else:
                merged.append(arg)
        return super().parse_known_args(merged, namespace)


def _board_keys() -> list:
    from keras_patch.arduino.boards import BOARDS

    return sorted(BOARDS)


_CUSTOM_MODULE_HELP = ("import MODULE (a module name, or a .py file) before loading a .keras model, so that the custom "
                       "layers it registers with @keras.saving.register_keras_serializable load; repeatable")


_ALLOW_WORSE_HELP = ("write the model even if its patch stages raise the predicted TFLM arena head above running it "
                     "layer by layer (refused by default; `keras-patch plan` chooses stages that lower it)")


def build_parser() -> argparse.ArgumentParser:
    parser = _ArgumentParser(prog="keras-patch", description=__doc__.split("\n")[0])
    parser.add_argument("--version", action="version", version=f"keras-patch {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true",
                        help="show TensorFlow's logs and keras-patch's debug log")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("profile", help="memory/MAC table of a .tflite or .keras model")
    p.add_argument("model")
    p.add_argument("--plot", help="write the memory plot (PNG) here")
    p.add_argument("--by", choices=("op", "block"), default="op",
                   help="--plot: one pair of bars per op (default) or per Keras block (MCUNetV2 Fig. 1)")
    p.add_argument("--json", action="store_true", help="print the profile as JSON")
    p.add_argument("--kernel", choices=["portable", "cmsis_nn"], default="portable",
                   help="KP_PATCH_STAGE build to predict scratch for "
                        "(cmsis_nn: -DCMSIS_NN, adds the CMSIS-NN context buffer)")
    p.add_argument("--custom-module", action="append", metavar="MODULE", help=_CUSTOM_MODULE_HELP)
    p.set_defaults(func=_cmd_profile)

    p = sub.add_parser("export", help="int8 .tflite from a .keras model; PatchStages become KP_PATCH_STAGE")
    p.add_argument("model")
    p.add_argument("--rep-data", required=True, help=".npy/.npz of calibration samples (N, H, W, C)")
    p.add_argument("--out", help="output .tflite (default: next to the model)")
    p.add_argument("--allow-worse", action="store_true", help=_ALLOW_WORSE_HELP)
    p.add_argument("--custom-module", action="append", metavar="MODULE", help=_CUSTOM_MODULE_HELP)
    _add_arena_args(p)
    p.set_defaults(func=_cmd_export)

    p = sub.add_parser("patchify", help="rewrite a run of ops of an int8 .tflite as one KP_PATCH_STAGE "
                                        "(run it again with --start for another stage)")
    p.add_argument("input")
    p.add_argument("output")
    p.add_argument("--split", required=True, help="op index, output tensor name or Keras layer name of the stage's last op")
    p.add_argument("--grid", type=_grid_arg, default="4x4", help="patches, e.g. 4x4")
    p.add_argument("--start", help="first tensor of the stage (default: the int8 model input)")
    p.add_argument("--allow-worse", action="store_true", help=_ALLOW_WORSE_HELP)
    _add_arena_args(p)
    p.set_defaults(func=_cmd_patchify)

    p = sub.add_parser("export-arduino", help="Arduino sketch folder for a .tflite, sized and checked for a board")
    p.add_argument("model", help="int8 .tflite (patched or not)")
    p.add_argument("--out", required=True, help="sketch folder to create; its name is the sketch's name")
    p.add_argument("--board", default="nano33ble", help="target board (default nano33ble): " + ", ".join(_board_keys()))
    p.add_argument("--arena-bytes", type=_int_arg(1), help="use this tensor arena instead of the estimate")
    p.add_argument("--tail-bytes", type=_int_arg(0),
                   help="TFLM persistent bytes to assume instead of measuring the unpatched model")
    p.add_argument("--force", action="store_true", help="replace a non-empty --out folder that keras-patch wrote (a README.md in it is kept); "
                        "other folders are never replaced")
    p.add_argument("--sketch", choices=("basic", "person-detection", "memory-report"), default="basic",
                   help="what the sketch does (default basic: a constant test input every second); "
                        "person-detection: OV7675 camera frame -> model -> Serial + RGB LED (grayscale "
                        "(1, H, W, 1) int8 input, pixels/255); memory-report: arena used by the patched vs the "
                        "unpatched model and whether their outputs are identical")
    p.add_argument("--compare-with", metavar="UNPATCHED.tflite",
                   help="memory-report: the same model without patches (default: keras_patch.unpatchify(MODEL))")
    p.add_argument("--person-class", type=_int_arg(0), default=1,
                   help="person-detection: output index meaning 'person' (default 1)")
    p.add_argument("--allow-worse", action="store_true", help=_ALLOW_WORSE_HELP.replace("write the model", "export it"))
    p.set_defaults(func=_cmd_export_arduino)

    p = sub.add_parser("plan", help="choose the patch stages that minimize the arena head of an int8 .tflite")
    p.add_argument("model", help="int8 .tflite, unpatched")
    p.add_argument("--max-overhead", type=_overhead_arg, default=1.10, metavar="X",
                   help="whole-network MAC overhead cap (patched / layer-by-layer MACs), default 1.1")
    p.add_argument("--sram", type=_size_arg, metavar="SIZE",
                   help="arena head budget, e.g. 256K or 262144: the fewest MACs among plans that fit it")
    p.add_argument("--grids", type=_grids_arg, metavar="GRIDS",
                   help="grids to try, comma-separated (e.g. 2x2,3x3,4x4; default: the planner's)")
    p.add_argument("--kernel", choices=["portable", "cmsis_nn"], default="portable",
                   help="KP_PATCH_STAGE build to predict scratch for "
                        "(cmsis_nn: -DCMSIS_NN, adds the CMSIS-NN context buffer)")
    p.add_argument("--out", metavar="PATCHED.tflite", help="write the model with the plan applied here")
    p.add_argument("--json", action="store_true", help="print the plan as JSON (PatchPlan.to_json)")
    _add_arena_args(p)
    p.set_defaults(func=_cmd_plan)

    from keras_patch.demo import DEMO_MAX_MAC_OVERHEAD  # numpy only, no TensorFlow

    p = sub.add_parser("demo", help="MobileNetV2 0.35@144 end to end: layer by layer vs one stage vs a "
                                    "whole-network plan, bit-exactness vs TFLM, Nano 33 BLE fit, plot")
    p.add_argument("--out-dir", default="keras_patch_demo")
    p.add_argument("--max-overhead", type=_overhead_arg, default=DEMO_MAX_MAC_OVERHEAD,
                   help=f"MAC-overhead cap of the plan and the single stage (default {DEMO_MAX_MAC_OVERHEAD})")
    p.add_argument("--grid", type=_grid_arg, default=None, help="only this grid, e.g. 4x4 (default: all)")
    p.add_argument("--images", type=_int_arg(1), default=4)
    p.set_defaults(func=_cmd_demo)

    # --verbose after the command, too (`keras-patch profile m.keras --verbose`); SUPPRESS keeps the
    # subcommand's default from overriding the flag given before the command.
    for p in sub.choices.values():
        p.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS,
                       help="show TensorFlow's logs and keras-patch's debug log")
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as e:  # --help, --version, or a usage error argparse printed in one line
        return int(e.code or 0)
    configure_output(verbose=args.verbose)
    args.progress = Progress()
    try:
        return args.func(args)
    except (KerasPatchError, ValueError, OSError) as e:
        print(f"keras-patch {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
