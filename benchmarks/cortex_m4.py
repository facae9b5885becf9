"""Instructions of one patch stage on a Cortex-M4F: patch by patch vs layer by layer.

    python benchmarks/cortex_m4.py [--cmsis-nn /path/to/CMSIS-NN] [--markdown]

For each stage below (random weights, int8), the portable C++ core runs as
bare-metal firmware in `qemu-system-arm -M mps2-an386 -icount shift=0`
(one instruction per virtual ns; the board's 25 MHz timer ticks every 40
instructions, so counts repeat exactly). The same stage runs twice in one
go: with its patch grid, and with grid 1x1, i.e. every layer on its whole
tensor one after the other (layer by layer: the same kernels, no
recomputation, full-size intermediates). Reported: instructions of one Eval
each, their ratio, the stage's MAC overhead (patched MACs / layer-by-layer
MACs) and the working memory (patch arena) each needs; both outputs are
checked byte for byte against the reference executor. "working memory" is
the patch arena (scratch buffer #0; at grid 1x1 it holds the full-size
intermediates); the CMSIS-NN build also requests the context buffer #1
(CMSIS-NN's im2col/column buffers and the staging area for copied input
windows), reported in the last column.

`--cmsis-nn DIR` builds a second pair with `-DCMSIS_NN` and CMSIS-NN's
sources from DIR (not on any registry; see tflm_ops/README.md); without it,
only the portable path is measured.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import numpy as np  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from tables import render_table  # noqa: E402

#: name -> (builder args for keras_patch.demo.build_demo_model or "vww", split layer, grid)
STAGES = {
    "MobileNetV2 0.35@144 to block_2_add, 4x4": ("mbv2", 0.35, 144, "block_2_add", (4, 4)),
    "MobileNetV2 0.35@144 to block_5_add, 6x6": ("mbv2", 0.35, 144, "block_5_add", (6, 6)),
    "VWW MobileNetV1 0.25@96 to conv_dw_4, 4x4": ("vww", 0.25, 96, "conv_dw_4_relu", (4, 4)),
}


def _tflite(kind: str, alpha: float, size: int) -> bytes:
    from keras_patch.keras.export import convert_int8

    if kind == "vww":
        from memory import _vww

        model = _vww(size)
    else:
        from keras_patch.demo import build_demo_model

        model = build_demo_model(input_size=size, alpha=alpha)
    shape = tuple(int(d) for d in model.inputs[0].shape[1:])
    calibration = np.random.default_rng(0).uniform(-1, 1, (4, *shape)).astype(np.float32)
    return convert_int8(model, calibration)


def _split(tflite: bytes, layer: str) -> int:
    from keras_patch.planner.schedule import candidate_splits, short_tensor_name
    from keras_patch.graph.tflite_model import TFLiteModel

    m = TFLiteModel.from_bytes(tflite)
    for op in candidate_splits(tflite):
        if short_tensor_name(m.tensor(m.op_outputs(op)[0]).name) == layer:
            return op
    raise SystemExit(f"no split '{layer}' in the model")


def measure(cmsis_nn: str, log) -> list:
    from keras_patch import patchify, profile
    from keras_patch.runtime.firmware import run_stage_firmware, stage_vectors_header

    variants = [("portable", [])]
    if cmsis_nn:
        variants.append(("CMSIS-NN", [f"CMSIS_NN_DIR={os.path.abspath(cmsis_nn)}"]))
    rows = []
    converted = {}
    with tempfile.TemporaryDirectory(prefix="kp_cm4_") as tmp:
        for name, (kind, alpha, size, layer, grid) in STAGES.items():
            key = (kind, alpha, size)
            if key not in converted:
                converted[key] = _tflite(kind, alpha, size)
            tflite = converted[key]
            patched = patchify(tflite, _split(tflite, layer), grid)
            (stage,) = profile(patched).stages
            x = np.random.default_rng(0).integers(-128, 128, (1, *stage.input_shape), dtype=np.int8)
            for variant, make_args in variants:
                runs = {}
                for label, g in (("patch", None), ("layer", (1, 1))):
                    build = os.path.join(tmp, f"{len(rows)}_{label}")
                    result = run_stage_firmware(stage_vectors_header(patched, x, grid=g), build, make_args=make_args)
                    if not result.ok:
                        raise SystemExit(f"{name} ({variant}, {label}): firmware failed:\n{result.output[-3000:]}")
                    runs[label] = result
                log(f"{name} [{variant}]: {runs['patch'].instructions:,} vs {runs['layer'].instructions:,} instructions")
                rows.append(dict(
                    stage=name, variant=variant, macs=stage.macs, mac_overhead=stage.mac_overhead,
                    patch_instr=runs["patch"].instructions, layer_instr=runs["layer"].instructions,
                    patch_arena=int(runs["patch"].fields["arena"]), layer_arena=int(runs["layer"].fields["arena"]),
                    patch_context=int(runs["patch"].fields.get("context", 0)),
                    layer_context=int(runs["layer"].fields.get("context", 0)),
                ))
    return rows


def render(rows: list, markdown: bool) -> str:
    header = ["stage", "kernels", "MACs (layer by layer)", "stage MAC overhead", "instructions, layer by layer",
              "instructions, patch by patch", "ratio", "intermediates, layer by layer (grid 1x1)", "patch arena",
              "CMSIS-NN context, layer by layer / patch by patch"]
    lines = [[r["stage"], r["variant"], f"{r['macs']:,}", f"{r['mac_overhead']:.3f}", f"{r['layer_instr']:,}",
              f"{r['patch_instr']:,}", f"{r['patch_instr'] / r['layer_instr']:.3f}", f"{r['layer_arena']:,}",
              f"{r['patch_arena']:,}", f"{r['layer_context']:,} / {r['patch_context']:,}"] for r in rows]
    return render_table(header, lines, markdown)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cmsis-nn", help="CMSIS-NN source tree: also measure the -DCMSIS_NN build")
    parser.add_argument("--markdown", action="store_true")
    args = parser.parse_args(argv)

    def log(message: str) -> None:
        print(f"[cortex_m4] {message}", file=sys.stderr, flush=True)

    print(render(measure(args.cmsis_nn, log), args.markdown))
    return 0


if __name__ == "__main__":
    sys.exit(main())
