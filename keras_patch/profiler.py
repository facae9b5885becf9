"""Memory and compute profile of a model, layer by layer vs patch by patch.

`profile()` plans the TFLM arena of the int8 model twice with the replica of
TFLM's planner (`memory_planner`): once for the layer-by-layer network (every
KP_PATCH_STAGE expanded back into its layers) and once for the patched
network, where each KP_PATCH_STAGE op holds its input, its output and the
patch-arena scratch buffer the kernel requests (`docs/patch_stage_op.md`).

Example:

>>> import keras_patch
>>> prof = keras_patch.profile("patched.tflite")  # doctest: +SKIP
>>> prof.summary["layer_by_layer_peak_bytes"], prof.summary["patched_peak_bytes"]  # doctest: +SKIP
(311040, 90368)
>>> print(prof.table())  # doctest: +SKIP
>>> prof.plot("memory.png")  # doctest: +SKIP
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import List, Optional, Union

import numpy as np

from keras_patch import memory_planner
from keras_patch.patch_op import geometry
from keras_patch.patchify import find_stages, stage_options
from keras_patch.tflite_model import ModelSource, TFLiteModel, read_model_bytes
from keras_patch.unpatchify import unpatchify


@dataclass
class OpProfile:
    """One op of the layer-by-layer network."""

    index: int
    op: str
    output_shape: tuple
    macs: int
    layer_by_layer_live_bytes: int  # activation bytes alive while the op runs
    patched_live_bytes: int  # the same in the patched network (stage ops: within one patch)
    stage: Optional[int] = None  # which patch stage the op belongs to


@dataclass
class StageProfile:
    """One KP_PATCH_STAGE op of the patched network."""

    op_index: int
    grid: tuple
    num_layers: int
    input_shape: tuple
    output_shape: tuple
    receptive_field: tuple  # (h, w) input pixels behind one output pixel
    patch_input_shape: tuple  # largest input region of a patch (h, w, c)
    patch_arena_bytes: int  # the kernel's scratch buffer #0
    macs: int  # layer by layer
    patched_macs: int  # patch by patch, recomputation included
    context_bytes: int = 0  # scratch buffer #1: CMSIS-NN context (kernel="cmsis_nn")

    @property
    def mac_overhead(self) -> float:
        return self.patched_macs / self.macs if self.macs else 1.0


@dataclass
class Profile:
    """Per-op rows and a summary; `table()` and `plot()` present them."""

    rows: List[OpProfile]
    stages: List[StageProfile]
    summary: dict = field(default_factory=dict)

    def table(self) -> str:
        """A plain-text table of the ops and the summary."""
        lines = [
            f"{'#':>3}  {'op':<18} {'output':<16} {'MACs':>12} {'layer-by-layer':>15} {'patched':>10}  stage",
        ]
        for r in self.rows:
            shape = "x".join(str(d) for d in r.output_shape[1:]) if len(r.output_shape) > 1 else str(r.output_shape)
            stage = "" if r.stage is None else f"#{r.stage}"
            lines.append(
                f"{r.index:>3}  {r.op:<18} {shape:<16} {r.macs:>12,} {r.layer_by_layer_live_bytes:>15,} "
                f"{r.patched_live_bytes:>10,}  {stage}"
            )
        s = self.summary
        lines.append("")
        for st in self.stages:
            lines.append(
                f"stage #{st.op_index}: {st.num_layers} layers, grid {st.grid[0]}x{st.grid[1]}, "
                f"{'x'.join(map(str, st.input_shape))} -> {'x'.join(map(str, st.output_shape))}, "
                f"receptive field {st.receptive_field[0]}x{st.receptive_field[1]}, "
                f"patch input {'x'.join(map(str, st.patch_input_shape))}, "
                f"patch arena {st.patch_arena_bytes:,} B, MAC overhead {st.mac_overhead:.3f}"
            )
        lines.append(
            f"peak SRAM (TFLM arena head): layer-by-layer {s['layer_by_layer_peak_bytes']:,} B, "
            f"patched {s['patched_peak_bytes']:,} B "
            f"({s['layer_by_layer_peak_bytes'] / max(s['patched_peak_bytes'], 1):.2f}x lower)"
        )
        lines.append(
            f"without the input tensor: layer-by-layer {s['layer_by_layer_peak_bytes_without_input']:,} B, "
            f"patched {s['patched_peak_bytes_without_input']:,} B"
        )
        lines.append(
            f"MACs: {s['macs']:,} layer-by-layer, {s['patched_macs']:,} patched "
            f"(overhead {s['mac_overhead']:.3f}); patched peak at {s['patched_peak_op']}"
        )
        return "\n".join(lines)

    def to_dict(self) -> dict:
        return {"rows": [asdict(r) for r in self.rows], "stages": [asdict(s) for s in self.stages],
                "summary": dict(self.summary)}

    def plot(self, path: str, title: Optional[str] = None) -> str:
        """Per-op activation memory, layer-by-layer vs patch-based (MCUNetV2 Fig. 1).

        Writes exactly `path`, in the format its extension names (PNG without
        one), and returns it.

        Raises:
            KerasPatchError: `path` is a folder, its folder does not exist, or
                its extension is not an image format.
        """
        from keras_patch.files import figure_format, save_figure

        figure_format(path)
        import matplotlib

        matplotlib.use("Agg", force=False)
        import matplotlib.pyplot as plt

        x = np.arange(len(self.rows))
        lbl = np.array([r.layer_by_layer_live_bytes for r in self.rows]) / 1024
        pat = np.array([r.patched_live_bytes for r in self.rows]) / 1024
        fig, ax = plt.subplots(figsize=(max(6.0, 0.18 * len(self.rows) + 2), 4.0))
        ax.bar(x - 0.2, lbl, width=0.4, label="layer-by-layer", color="#c44e52")
        ax.bar(x + 0.2, pat, width=0.4, label="patch-based", color="#4c72b0")
        s = self.summary
        ax.axhline(s["layer_by_layer_peak_bytes"] / 1024, color="#c44e52", ls="--", lw=1,
                   label=f"layer-by-layer peak {s['layer_by_layer_peak_bytes'] / 1024:.0f} kB")
        ax.axhline(s["patched_peak_bytes"] / 1024, color="#4c72b0", ls="--", lw=1,
                   label=f"patched peak {s['patched_peak_bytes'] / 1024:.0f} kB")
        for st_index in sorted({r.stage for r in self.rows if r.stage is not None}):
            idx = [i for i, r in enumerate(self.rows) if r.stage == st_index]
            ax.axvspan(min(idx) - 0.5, max(idx) + 0.5, color="#dddddd", zorder=0)
        ax.set_xlabel("op (layer-by-layer order; shaded: patch stage)")
        ax.set_ylabel("live activation memory (kB)")
        ax.set_title(title or "Activation memory per op: layer-by-layer vs patch-based")
        ax.legend(fontsize=8)
        fig.tight_layout()
        try:
            path = save_figure(fig, path, dpi=120)
        finally:
            plt.close(fig)
        return path


def op_macs(model: TFLiteModel, op_index: int) -> int:
    """Multiply-accumulates of CONV_2D, DEPTHWISE_CONV_2D and FULLY_CONNECTED (others 0)."""
    op_type = model.op_type(op_index)
    inputs = model.op_inputs(op_index)
    out = model.tensor(model.op_outputs(op_index)[0]).shape
    if op_type == "CONV_2D":
        f = model.tensor(inputs[1]).shape  # (O, kh, kw, I)
        return int(np.prod(out[:-1])) * f[0] * f[1] * f[2] * f[3]
    if op_type == "DEPTHWISE_CONV_2D":
        f = model.tensor(inputs[1]).shape  # (1, kh, kw, C*M)
        return int(np.prod(out)) * f[1] * f[2]
    if op_type == "FULLY_CONNECTED":
        f = model.tensor(inputs[1]).shape  # (O, I)
        return int(np.prod(out)) * f[-1]
    return 0


def _live_bytes(buffers: list, op_index: int, exclude: set = frozenset()) -> int:
    return sum(
        memory_planner.align_up(b.size)
        for b in buffers
        if b.first_op <= op_index <= b.last_op and b.name not in exclude
    )


def _plan(model: TFLiteModel, scratch: dict, exclude_inputs: bool) -> tuple:
    merged = memory_planner.merged_scratch_bytes(model, scratch)
    buffers = memory_planner.model_buffers(model, merged)
    input_names = {model.tensor(t).name for t in model.inputs}
    if exclude_inputs:
        buffers = [b for b in buffers if b.name not in input_names]
    return buffers, memory_planner.plan_greedy(buffers).head_bytes


def stage_scratch_bytes(model: TFLiteModel, kernel: str = "portable") -> dict:
    """op index -> scratch sizes each KP_PATCH_STAGE op requests (docs: "Scratch buffers").

    In request order: the patch arena (#0) if non-zero, then, for
    `kernel="cmsis_nn"`, the CMSIS-NN context (#1) if non-zero.
    """
    scratch = {}
    for op in find_stages(model):
        opts = stage_options(model, op)
        arena = geometry.plan_patch_arena(opts).total_bytes
        context = geometry.kernel_context_bytes(opts, kernel)
        scratch[op] = [b for b in (arena, context) if b > 0]
    return scratch


def profile(
    model_or_tflite: Union[ModelSource, "object"],
    representative_dataset=None,
    kernel: str = "portable",
) -> Profile:
    """Profiles a Keras model (converted to int8 first) or an int8 `.tflite`.

    Args:
        model_or_tflite: a Keras model (its PatchStage layers become patch
            stages), `.tflite` bytes or a path.
        representative_dataset: calibration data for a Keras model; random
            samples when omitted (memory does not depend on the values).
        kernel: how the KP_PATCH_STAGE kernel is built: "portable" (default)
            or "cmsis_nn" (-DCMSIS_NN, Cortex-M with DSP: adds each stage's
            CMSIS-NN context buffer, docs "Scratch buffers" #1). Built-in
            ops keep the reference kernels' scratch requests either way.

    Returns:
        A `Profile`. `summary` holds `layer_by_layer_peak_bytes` (the TFLM arena
        head of the unpatched network), `patched_peak_bytes` (the same with
        every stage run patch by patch), both also `..._without_input`,
        `macs`, `patched_macs`, `mac_overhead` and `patched_peak_op`.
    """
    if not isinstance(model_or_tflite, (bytes, bytearray, memoryview, str)) and hasattr(model_or_tflite, "layers"):
        from keras_patch.export import export_tflite

        keras_model = model_or_tflite
        if representative_dataset is None:
            shape = tuple(int(d) for d in keras_model.inputs[0].shape[1:])
            representative_dataset = np.random.default_rng(0).random((4, *shape), dtype=np.float32)
        data = export_tflite(keras_model, representative_dataset)
    else:
        data = read_model_bytes(model_or_tflite)
    patched = TFLiteModel.from_bytes(data)
    plain = TFLiteModel.from_bytes(unpatchify(data))
    stage_ops = find_stages(patched)
    if kernel not in geometry.KERNELS:
        raise ValueError(f"kernel must be one of {geometry.KERNELS}, not {kernel!r}")
    scratch = stage_scratch_bytes(patched, kernel)

    plain_buffers, lbl_peak = _plan(plain, {}, exclude_inputs=False)
    _, lbl_peak_no_input = _plan(plain, {}, exclude_inputs=True)
    patched_buffers, patched_peak = _plan(patched, scratch, exclude_inputs=False)
    _, patched_peak_no_input = _plan(patched, scratch, exclude_inputs=True)

    # Map layer-by-layer ops to patched ops: each stage expands in place.
    plain_to_patched, plain_stage = [], []
    stages: List[StageProfile] = []
    for p in range(patched.num_ops):
        if p in stage_ops:
            opts = stage_options(patched, p)
            full, patched_macs = geometry.stage_macs(opts)
            ph, pw = geometry.max_patch_input(opts)
            stages.append(StageProfile(
                op_index=p, grid=opts.grid, num_layers=opts.num_layers,
                input_shape=opts.input_shape, output_shape=opts.output_shape,
                receptive_field=geometry.receptive_field(opts),
                patch_input_shape=(ph, pw, opts.input_shape[2]),
                patch_arena_bytes=geometry.plan_patch_arena(opts).total_bytes,
                macs=full, patched_macs=patched_macs,
                context_bytes=geometry.kernel_context_bytes(opts, kernel),
            ))
            plain_to_patched.extend([(p, opts, l) for l in range(opts.num_layers)])
            plain_stage.extend([p] * opts.num_layers)
        else:
            plain_to_patched.append(p)
            plain_stage.append(None)

    def patched_live(entry) -> int:
        if not isinstance(entry, tuple):
            return _live_bytes(patched_buffers, entry)
        # Inside a stage: the op's live set with the patch arena replaced by
        # what layer l of one patch keeps alive.
        p, opts, layer = entry
        arena = geometry.plan_patch_arena(opts)
        lifetimes = geometry.tensor_lifetimes(opts)
        in_patch = sum(size for t, size in enumerate(arena.sizes)
                       if arena.offsets[t] >= 0 and lifetimes[t][0] <= layer <= lifetimes[t][1])
        return _live_bytes(patched_buffers, p) - memory_planner.align_up(arena.total_bytes) * (arena.total_bytes > 0) + in_patch

    rows = []
    for i in range(plain.num_ops):
        rows.append(OpProfile(
            index=i,
            op=plain.op_type(i),
            output_shape=plain.tensor(plain.op_outputs(i)[0]).shape,
            macs=op_macs(plain, i),
            layer_by_layer_live_bytes=_live_bytes(plain_buffers, i),
            patched_live_bytes=patched_live(plain_to_patched[i]),
            stage=plain_stage[i],
        ))
    macs = sum(r.macs for r in rows)
    patched_macs = macs + sum(s.patched_macs - s.macs for s in stages)
    peak_op = max(range(patched.num_ops), key=lambda p: _live_bytes(patched_buffers, p), default=0)
    summary = dict(
        layer_by_layer_peak_bytes=lbl_peak,
        patched_peak_bytes=patched_peak,
        layer_by_layer_peak_bytes_without_input=lbl_peak_no_input,
        patched_peak_bytes_without_input=patched_peak_no_input,
        macs=macs,
        patched_macs=patched_macs,
        mac_overhead=patched_macs / macs if macs else 1.0,
        patched_peak_op=patched.op_label(peak_op) if patched.num_ops else "",
        num_stages=len(stages),
    )
    return Profile(rows=rows, stages=stages, summary=summary)
