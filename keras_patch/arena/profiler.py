"""Memory and compute profile of a model, layer by layer vs patch by patch.

`profile()` plans the TFLM arena of the int8 model twice with the replica of
TFLM's planner (`memory_planner`): once for the layer-by-layer network (every
KP_PATCH_STAGE expanded back into its layers) and once for the patched
network, where each KP_PATCH_STAGE op holds its input, its output and the
patch-arena scratch buffer the kernel requests (`docs/patch_stage_op.md`).

Example:

>>> import keras_patch
>>> prof = keras_patch.profile("patched.tflite")  # doctest: +SKIP
>>> prof.layer_by_layer_peak_bytes, prof.patched_peak_bytes  # doctest: +SKIP
(311040, 90368)
>>> print(prof.table())  # doctest: +SKIP
>>> prof.plot("memory.png", by="block")  # doctest: +SKIP

Blocks: `Profile.blocks()` and `Profile.plot(by="block")` group the
layer-by-layer ops into the Keras blocks they come from (MCUNetV2's Fig. 1
draws one bar per block). An op's block is derived from its output tensor's
Keras layer name (`keras_patch.planner.schedule.short_tensor_name`), see
`block_name`: trailing name parts that say what the layer does inside its
block (`_expand`, `_depthwise`, `_project`, `_add`, `_relu`, `_BN`, ...) are
dropped, so `block_3_expand_relu` and `block_3_project_BN` are block
`block_3`, `expanded_conv_depthwise_relu` is `expanded_conv` and `stem_relu`
is `stem`. An op without a Keras name is its own block, `op <index>`: the
converter's signature outputs (`StatefulPartitionedCall_1:0`) and the
layers inside a patch stage, which the `.tflite` does not name (all but its
last, which writes the stage output). Consecutive ops with the same block
name form one block.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, replace
from typing import List, Optional, Union

import numpy as np

from keras_patch.arena import memory_planner
from keras_patch.arena.network import ArenaNetwork, StageSpan, stage_scratch_sizes
from keras_patch.stage import geometry
from keras_patch.graph.patchify import find_stages, stage_options
from keras_patch.planner.schedule import short_tensor_name
from keras_patch.graph.tflite_model import ModelSource, TFLiteModel, read_model_bytes
from keras_patch.graph.unpatchify import layer_op_counts, unpatchify

#: Trailing parts of a Keras layer name (split at "_", compared in lower
#: case) that name the layer's role inside its block, not the block:
#: MobileNetV2 (`block_3_expand_relu`, `expanded_conv_project_BN`), MCUNet
#: style (`s0_b1_dw_relu`), ResNet/EfficientNet-like activations and
#: squeeze-excite parts. `block_name` drops them.
BLOCK_ROLE_WORDS = frozenset({
    "expand", "depthwise", "dw", "pw", "project", "add", "relu", "relu6", "bn", "batchnorm", "pad",
    "act", "activation", "se", "squeeze", "excite", "reduce", "mul", "swish", "sigmoid", "dropout",
})

_UNNAMED_STAGE_LAYER = re.compile(r"/kp_layer_\d+$")
# Names the converter gives the model's own inputs and outputs: no Keras layer.
_SIGNATURE_NAME = re.compile(r"^(StatefulPartitionedCall|PartitionedCall|serving_default_)")


def layer_name(tensor_name: str) -> str:
    """The Keras layer name behind a `.tflite` tensor name ("" if it has none).

    The converter's long names become the layer name (`short_tensor_name`);
    the tensors `unpatchify` creates inside a patch stage
    (`<stage output>/kp_layer_<l>`) and the converter's signature names
    (`StatefulPartitionedCall_1:0`) have no Keras layer and give "".
    """
    first = tensor_name.split(";")[0]
    # unpatchify appends "/kp_layer_<l>" to the whole stage output name, which may be ";"-fused.
    if not first or _UNNAMED_STAGE_LAYER.search(tensor_name) or _SIGNATURE_NAME.match(first):
        return ""
    return short_tensor_name(tensor_name)


def block_name(layer: str) -> str:
    """The Keras block a layer belongs to, from its name ("" if none).

    Drops the trailing `_`-separated parts of `layer` that are in
    `BLOCK_ROLE_WORDS` (never the first part):

    >>> block_name("block_3_expand_relu"), block_name("block_2_add"), block_name("Conv1_relu")
    ('block_3', 'block_2', 'Conv1')
    >>> block_name("expanded_conv_project_BN"), block_name("s0_b1_dw_relu"), block_name("predictions")
    ('expanded_conv', 's0_b1', 'predictions')
    """
    parts = layer.split("_") if layer else []
    while len(parts) > 1 and parts[-1].lower() in BLOCK_ROLE_WORDS:
        parts.pop()
    return "_".join(parts)


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
    layer: str = ""  # Keras layer name of its output ("" inside a patch stage or when unnamed)
    block: str = ""  # the block it belongs to (module docstring, "Blocks")


@dataclass
class BlockProfile:
    """Consecutive ops of one block (module docstring, "Blocks"): their peaks and MACs."""

    name: str
    ops: List[int]  # op indices (layer by layer) in the block
    macs: int
    layer_by_layer_live_bytes: int  # the largest of its ops'
    patched_live_bytes: int  # the largest of its ops'
    stage: Optional[int] = None  # the patch stage its first op belongs to


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
    patch_arena_bytes: int  # the kernel's "patch arena" scratch buffer (geometry.stage_buffers)
    macs: int  # layer by layer
    patched_macs: int  # patch by patch, recomputation included
    context_bytes: int = 0  # its "CMSIS-NN context" scratch buffer (kernel="cmsis_nn")
    start_layer: str = ""  # Keras layer of the stage's input ("" for the model input or an unnamed tensor)
    end_layer: str = ""  # Keras layer of the stage's output

    @property
    def mac_overhead(self) -> float:
        return self.patched_macs / self.macs if self.macs else 1.0


@dataclass(frozen=True)
class ProfileSummary:
    """The whole-network figures of a `Profile` (`Profile.summary`).

    Each field is also an attribute of the `Profile` itself (`Profile`
    documents them); `to_dict()` gives them as a plain dict, the `"summary"`
    object of `keras-patch profile --json`.
    """

    layer_by_layer_peak_bytes: int
    patched_peak_bytes: int
    layer_by_layer_peak_bytes_without_input: int
    patched_peak_bytes_without_input: int
    macs: int
    patched_macs: int
    mac_overhead: float
    patched_peak_op: str
    num_stages: int
    greedy_head_bytes: int = 0
    greedy_head_bytes_without_input: int = 0
    offline_plan_head_bytes: Optional[int] = None
    offline_plan_head_bytes_without_input: Optional[int] = None
    lower_bound_bytes: int = 0
    lower_bound_bytes_without_input: int = 0

    def to_dict(self) -> dict:
        """The fields as a dict, in declaration order."""
        return asdict(self)


@dataclass
class Profile:
    """What `profile()` returns: per-op rows, patch stages and summary figures.

    Every summary figure is an attribute (and a field of `summary`, a
    `ProfileSummary`):

    * `layer_by_layer_peak_bytes`: the TFLM arena head of the network run
      layer by layer (every patch stage expanded into its layers);
    * `patched_peak_bytes`: the same with every stage run patch by patch;
    * `layer_by_layer_peak_bytes_without_input`,
      `patched_peak_bytes_without_input`: both without the input tensor;
    * `macs`, `patched_macs` (recomputation included) and `mac_overhead`
      (`patched_macs / macs`);
    * `patched_peak_op`: the patched network's op where the head is reached,
      e.g. `"op 0 (KP_PATCH_STAGE -> block_2_add)"`;
    * `num_stages`: the number of KP_PATCH_STAGE ops;
    * `greedy_head_bytes`: the arena head of the model as given with TFLM's
      greedy planner alone (any offline plan ignored);
      `offline_plan_head_bytes`: the head under the offline memory plan the
      model carries (`OfflineMemoryAllocation`, checked first), None without
      one; `lower_bound_bytes`: the most bytes alive at one op (in-place
      pairs counted once), which no plan goes below; all three also
      `..._without_input`. With a plan, `patched_peak_bytes` (the head TFLM
      will use) is `offline_plan_head_bytes`; without the input, the figure
      is the better of the carried plan with the input left out and an
      offline plan of the rest (the arena the network needs when the input
      lives in a buffer of its own, e.g. the camera's).

    `rows` has one `OpProfile` per layer-by-layer op, `stages` one
    `StageProfile` per KP_PATCH_STAGE op, `blocks()` groups the rows per
    Keras block. `table()`, `plot()` and `to_dict()` present them.

    Example:

    >>> import keras, numpy as np, keras_patch
    >>> inputs = keras.Input((64, 64, 3))
    >>> x = keras.layers.Conv2D(16, 3, padding="same", name="stem")(inputs)
    >>> x = keras.layers.DepthwiseConv2D(3, strides=2, padding="same", name="b1_dw")(x)
    >>> x = keras.layers.Conv2D(8, 1, name="b1_project")(x)
    >>> x = keras.layers.Conv2D(16, 1, name="b2_expand")(x)
    >>> outputs = keras.layers.Dense(2, name="logits")(keras.layers.GlobalAveragePooling2D(name="pool")(x))
    >>> data = np.random.default_rng(0).random((4, 64, 64, 3), dtype=np.float32)
    >>> tflite = keras_patch.export_tflite(keras.Model(inputs, outputs), data)
    >>> prof = keras_patch.profile(keras_patch.patchify(tflite, 2, (4, 4)))
    >>> prof.num_stages, prof.patched_peak_bytes < prof.layer_by_layer_peak_bytes
    (1, True)
    >>> prof.mac_overhead > 1.0, prof.summary.mac_overhead == prof.mac_overhead
    (True, True)
    >>> [(b.name, b.stage) for b in prof.blocks()]
    [('op 0', 0), ('op 1', 0), ('b1', 0), ('b2', None), ('pool', None), ('op 5', None)]
    """

    rows: List[OpProfile]
    stages: List[StageProfile]
    summary: ProfileSummary

    @property
    def layer_by_layer_peak_bytes(self) -> int:
        """TFLM arena head of the network run layer by layer (bytes)."""
        return self.summary.layer_by_layer_peak_bytes

    @property
    def patched_peak_bytes(self) -> int:
        """TFLM arena head with every patch stage run patch by patch (bytes)."""
        return self.summary.patched_peak_bytes

    @property
    def layer_by_layer_peak_bytes_without_input(self) -> int:
        """`layer_by_layer_peak_bytes` without the model's input tensor."""
        return self.summary.layer_by_layer_peak_bytes_without_input

    @property
    def patched_peak_bytes_without_input(self) -> int:
        """`patched_peak_bytes` without the model's input tensor."""
        return self.summary.patched_peak_bytes_without_input

    @property
    def macs(self) -> int:
        """Multiply-accumulates of the network run layer by layer."""
        return self.summary.macs

    @property
    def patched_macs(self) -> int:
        """Multiply-accumulates with every stage run patch by patch (recomputation included)."""
        return self.summary.patched_macs

    @property
    def mac_overhead(self) -> float:
        """`patched_macs / macs` (1.0 without patch stages)."""
        return self.summary.mac_overhead

    @property
    def patched_peak_op(self) -> str:
        """The patched network's op at which its arena head is reached."""
        return self.summary.patched_peak_op

    @property
    def num_stages(self) -> int:
        """The number of KP_PATCH_STAGE ops."""
        return self.summary.num_stages

    @property
    def greedy_head_bytes(self) -> int:
        """The model's TFLM arena head under TFLM's greedy planner alone (no offline plan)."""
        return self.summary.greedy_head_bytes

    @property
    def greedy_head_bytes_without_input(self) -> int:
        """`greedy_head_bytes` without the model's input tensor."""
        return self.summary.greedy_head_bytes_without_input

    @property
    def offline_plan_head_bytes(self) -> Optional[int]:
        """The arena head under the offline memory plan the model carries (None without one)."""
        return self.summary.offline_plan_head_bytes

    @property
    def offline_plan_head_bytes_without_input(self) -> Optional[int]:
        """`offline_plan_head_bytes` without the model's input tensor."""
        return self.summary.offline_plan_head_bytes_without_input

    @property
    def lower_bound_bytes(self) -> int:
        """The live-bytes lower bound of the model's arena head (in-place pairs counted once)."""
        return self.summary.lower_bound_bytes

    @property
    def lower_bound_bytes_without_input(self) -> int:
        """`lower_bound_bytes` without the model's input tensor."""
        return self.summary.lower_bound_bytes_without_input

    def blocks(self) -> List[BlockProfile]:
        """The rows grouped per block (module docstring, "Blocks"), in execution order.

        A block's live bytes are the largest of its ops' (its peak), its MACs
        their sum.
        """
        groups: List[List[OpProfile]] = []
        for r in self.rows:
            name = r.block or f"op {r.index}"
            # A block never spans a stage boundary: ops of one Keras block in two stages (or in a
            # stage and outside it) are two blocks, so that each bar belongs to one stage.
            if groups and (groups[-1][0].block or f"op {groups[-1][0].index}") == name and groups[-1][0].stage == r.stage:
                groups[-1].append(r)
            else:
                groups.append([r])
        return [BlockProfile(
            name=g[0].block or f"op {g[0].index}",
            ops=[r.index for r in g],
            macs=sum(r.macs for r in g),
            layer_by_layer_live_bytes=max(r.layer_by_layer_live_bytes for r in g),
            patched_live_bytes=max(r.patched_live_bytes for r in g),
            stage=g[0].stage,
        ) for g in groups]

    def table(self) -> str:
        """A plain-text table of the ops and the summary."""
        lines = [
            f"{'#':>3}  {'op':<18} {'output':<16} {'MACs':>12} {'layer-by-layer':>15} {'patched':>10}  "
            f"{'stage':<6} layer",
        ]
        for r in self.rows:
            shape = "x".join(str(d) for d in r.output_shape[1:]) if len(r.output_shape) > 1 else str(r.output_shape)
            stage = "" if r.stage is None else f"#{r.stage}"
            lines.append(
                f"{r.index:>3}  {r.op:<18} {shape:<16} {r.macs:>12,} {r.layer_by_layer_live_bytes:>15,} "
                f"{r.patched_live_bytes:>10,}  {stage:<6} {r.layer or '-'}".rstrip()
            )
        s = self.summary
        lines.append("")
        for st in self.stages:
            lines.append(
                f"stage #{st.op_index} ({st.start_layer or 'input'} -> {st.end_layer or '?'}): "
                f"{st.num_layers} layers, grid {st.grid[0]}x{st.grid[1]}, "
                f"{'x'.join(map(str, st.input_shape))} -> {'x'.join(map(str, st.output_shape))}, "
                f"receptive field {st.receptive_field[0]}x{st.receptive_field[1]}, "
                f"patch input {'x'.join(map(str, st.patch_input_shape))}, "
                f"patch arena {st.patch_arena_bytes:,} B, MAC overhead {st.mac_overhead:.3f}"
            )
        if self.num_stages:
            lines.append(
                f"peak SRAM (TFLM arena head): layer-by-layer {s.layer_by_layer_peak_bytes:,} B, "
                f"patched {s.patched_peak_bytes:,} B ({self._comparison()})"
            )
        else:
            lines.append(
                f"peak SRAM (TFLM arena head): layer-by-layer {s.layer_by_layer_peak_bytes:,} B; no patch stage, "
                "nothing to compare (patchify the model to run a stage patch by patch)"
            )
        lines.append(
            f"without the input tensor: layer-by-layer {s.layer_by_layer_peak_bytes_without_input:,} B, "
            f"patched {s.patched_peak_bytes_without_input:,} B"
        )
        plan = (f"offline plan {s.offline_plan_head_bytes:,} B (without input {s.offline_plan_head_bytes_without_input:,} B)"
                if s.offline_plan_head_bytes is not None else "no offline plan")
        lines.append(
            f"arena head of this model: TFLM greedy {s.greedy_head_bytes:,} B (without input "
            f"{s.greedy_head_bytes_without_input:,} B), {plan}, lower bound {s.lower_bound_bytes:,} B "
            f"(without input {s.lower_bound_bytes_without_input:,} B)"
        )
        lines.append(
            f"MACs: {s.macs:,} layer-by-layer, {s.patched_macs:,} patched "
            f"(overhead {s.mac_overhead:.3f}); patched peak at {s.patched_peak_op}"
        )
        return "\n".join(lines)

    def _comparison(self) -> str:
        lbl, patched = self.layer_by_layer_peak_bytes, self.patched_peak_bytes
        if patched < lbl:
            return f"{lbl / patched:.2f}x lower"
        if patched == lbl:
            return "no lower: the head is outside the patch stages"
        return f"{patched / lbl:.2f}x HIGHER: try a coarser grid or an earlier split"

    def to_dict(self) -> dict:
        """Rows, stages, blocks and summary as plain Python values (JSON with `default=list`).

        `to_dict()["summary"][key]` equals the attribute `key` for every
        summary figure (`ProfileSummary.to_dict`).
        """
        return {"rows": [asdict(r) for r in self.rows], "stages": [asdict(s) for s in self.stages],
                "blocks": [asdict(b) for b in self.blocks()], "summary": self.summary.to_dict()}

    def plot(self, path: str, title: Optional[str] = None, by: str = "op") -> str:
        """Activation memory, layer-by-layer vs patch-based (MCUNetV2 Fig. 1), as an image.

        Args:
            path: where to write the figure: exactly this path, in the format
                its extension names (PNG without one).
            title: the plot title (default: says what is plotted).
            by: "op" for one pair of bars per layer-by-layer op, labelled with
                its Keras layer name; "block" for one pair per block
                (`blocks()`, its peak: the largest live set of its ops).

        Returns:
            `path`. Memory is in KiB (1 KiB = 1,024 B).

        Raises:
            KerasPatchError: `path` is a folder, its folder does not exist, or
                its extension is not an image format.
            ValueError: `by` is neither "op" nor "block".
        """
        if by not in PLOT_BY:
            raise ValueError(f"by must be one of {PLOT_BY}, not {by!r}")
        from keras_patch.files import figure_format, save_figure

        figure_format(path)
        import matplotlib

        matplotlib.use("Agg", force=False)
        import matplotlib.pyplot as plt

        if by == "block":
            groups = self.blocks()
            labels = [b.name for b in groups]
            lbl_bytes = [b.layer_by_layer_live_bytes for b in groups]
            pat_bytes = [b.patched_live_bytes for b in groups]
            stages = [b.stage for b in groups]
        else:
            labels = [r.layer or f"{r.op} #{r.index}" for r in self.rows]
            lbl_bytes = [r.layer_by_layer_live_bytes for r in self.rows]
            pat_bytes = [r.patched_live_bytes for r in self.rows]
            stages = [r.stage for r in self.rows]
        x = np.arange(len(labels))
        lbl = np.array(lbl_bytes) / 1024
        pat = np.array(pat_bytes) / 1024
        fig, ax = plt.subplots(figsize=(max(6.0, 0.22 * len(labels) + 2), 4.8))
        ax.bar(x - 0.2, lbl, width=0.4, label="layer-by-layer", color="#c44e52")
        ax.bar(x + 0.2, pat, width=0.4, label="patch-based", color="#4c72b0")
        ax.axhline(self.layer_by_layer_peak_bytes / 1024, color="#c44e52", ls="--", lw=1,
                   label=f"layer-by-layer peak {self.layer_by_layer_peak_bytes / 1024:.0f} KiB")
        ax.axhline(self.patched_peak_bytes / 1024, color="#4c72b0", ls="--", lw=1,
                   label=f"patched peak {self.patched_peak_bytes / 1024:.0f} KiB")
        for k, (first, last, st_index) in enumerate(stage_spans(stages)):
            # Alternating shades, each span labelled: adjacent stages stay apart.
            ax.axvspan(first - 0.5, last + 0.5, color=STAGE_SHADES[k % len(STAGE_SHADES)], zorder=0)
            ax.text((first + last) / 2, 1.0, f"#{st_index}", transform=ax.get_xaxis_transform(),
                    ha="center", va="bottom", fontsize=6)
        ax.set_xticks(x)
        ax.set_xticklabels(labels, rotation=90, fontsize=6)
        ax.set_xlabel(f"{by} (layer-by-layer order; shaded: patch stage)")
        ax.set_ylabel("live activation memory (KiB)")
        ax.set_title(title or f"Activation memory per {by}: layer-by-layer vs patch-based")
        ax.legend(fontsize=8)
        fig.tight_layout()
        try:
            path = save_figure(fig, path, dpi=120)
        finally:
            plt.close(fig)
        return path


#: What `Profile.plot(by=...)` accepts.
PLOT_BY = ("op", "block")
#: Background shades of the patch stages in `Profile.plot`, alternating from stage to stage.
STAGE_SHADES = ("#dddddd", "#bcbcbc")


def stage_spans(stages: List[Optional[int]]) -> List[tuple]:
    """(first, last, stage) for each run of consecutive bars of one patch stage, in order.

    `stages` holds each bar's stage (its KP_PATCH_STAGE op index, None
    outside the stages).

    >>> stage_spans([0, 0, None, 3, 3, 5, None])
    [(0, 1, 0), (3, 4, 3), (5, 5, 5)]
    """
    spans: List[tuple] = []
    for i, st in enumerate(stages):
        if st is None:
            continue
        if spans and spans[-1][2] == st and spans[-1][1] == i - 1:
            spans[-1] = (spans[-1][0], i, st)
        else:
            spans.append((i, i, st))
    return spans


def _short_op_label(model: TFLiteModel, op_index: int) -> str:
    """'op 3 (CONV_2D -> block_1_expand_relu)': `TFLiteModel.op_label` with the Keras layer name."""
    outs = model.op_outputs(op_index)
    name = model.tensor(outs[0]).name if outs else ""
    return f"op {op_index} ({model.op_type(op_index)} -> {layer_name(name) or name or '?'})"


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


def _arena_figures(plain: TFLiteModel, spans: list) -> tuple:
    """(layer-by-layer buffers, patched buffers, and the four heads) from the cost model.

    `arena.network.ArenaNetwork` (the one place that knows how a patched
    network's arena is laid out, the planner's cost model) on the unpatched
    network with the stages as spans. A model carrying an offline memory
    plan (`OfflineMemoryAllocation`) has no stages to place: the TFLM
    replica reads its offsets directly.
    """
    if memory_planner._offline_offsets(plain) is not None and not spans:
        buffers = memory_planner.model_buffers(plain, memory_planner.merged_scratch_bytes(plain, {}))
        inputs = {plain.tensor(t).name for t in plain.inputs}
        head = memory_planner.plan_greedy(buffers).head_bytes
        head_no_input = memory_planner.plan_greedy([b for b in buffers if b.name not in inputs]).head_bytes
        return buffers, buffers, head, head_no_input, head, head_no_input
    net = ArenaNetwork(plain)
    return (net.buffers(()), net.buffers(spans), net.head(()), net.head((), include_input=False),
            net.head(spans), net.head(spans, include_input=False))


def _offline_figures(data: bytes, kernel: str) -> tuple:
    """(the model bytes without its offline plan, the greedy / offline-plan / lower-bound heads).

    A plan the model carries is checked first (`check_offline_plan` raises
    `OfflinePlanError`); the figures are for the model as given (patch
    stages as KP_PATCH_STAGE ops with their scratch for `kernel`).
    """
    from keras_patch.arena.offline_metadata import read_offline_offsets, remove_offline_offsets
    from keras_patch.arena.offline_plan import live_lower_bound
    from keras_patch.graph.passes import offline_plan as pass_

    model = TFLiteModel.from_bytes(data)
    plan_head = pass_.check_offline_plan(model, kernel)
    offsets = None
    if plan_head is not None:
        offsets = read_offline_offsets(model)
        remove_offline_offsets(model)
        data = model.to_bytes()
        model = TFLiteModel.from_bytes(data)
    buffers = pass_.plan_buffers(model, kernel)
    tensors = pass_.planned_tensors(model)
    aliases = pass_.alias_buffers(model, tensors)
    inputs = {tensors.index(t) for t in model.inputs if t in tensors}

    def figures(drop: set) -> tuple:
        keep = [i for i in range(len(buffers)) if i not in drop]
        where = {i: k for k, i in enumerate(keep)}
        kept = [buffers[i] for i in keep]
        greedy = memory_planner.plan_greedy(kept, placed_copies=False).head_bytes
        lower = live_lower_bound(kept, {where[a]: where[b] for a, b in aliases.items() if a in where and b in where})
        head = None
        if offsets is not None:
            fixed = [replace(buffers[i], offline_offset=None if i >= len(tensors) or offsets[tensors[i]] < 0
                             else offsets[tensors[i]]) for i in keep]
            head = memory_planner.plan_greedy(fixed, placed_copies=False).head_bytes
            if drop:  # the input lives outside the arena: the best offline layout of the rest
                from keras_patch.arena.offline_plan import plan_offline

                kept_aliases = {where[a]: where[b] for a, b in aliases.items() if a in where and b in where}
                head = min(head, plan_offline(kept, kept_aliases,
                                              offline_indices=[k for k, i in enumerate(keep) if i < len(tensors)]
                                              ).head_bytes)
        return greedy, head, lower

    (greedy, head, lower), (greedy_ni, head_ni, lower_ni) = figures(set()), figures(inputs)
    return data, dict(
        greedy_head_bytes=greedy, greedy_head_bytes_without_input=greedy_ni,
        offline_plan_head_bytes=head, offline_plan_head_bytes_without_input=head_ni,
        lower_bound_bytes=lower, lower_bound_bytes_without_input=lower_ni,
    )


def stage_scratch_bytes(model: TFLiteModel, kernel: str = "portable") -> dict:
    """op index -> scratch sizes each KP_PATCH_STAGE op requests (docs: "Scratch buffers").

    In request order, as `keras_patch.stage.geometry.stage_buffers` defines them.
    """
    return {op: list(stage_scratch_sizes(stage_options(model, op), kernel)) for op in find_stages(model)}


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
            CMSIS-NN context buffer, `geometry.stage_buffers`). Built-in
            ops keep the reference kernels' scratch requests either way.

    Returns:
        A `Profile`. Its attributes (and `summary` fields)
        `layer_by_layer_peak_bytes` (the TFLM arena head of the unpatched
        network), `patched_peak_bytes` (the same with every stage run patch
        by patch), both also `..._without_input`, `macs`, `patched_macs`,
        `mac_overhead`, `patched_peak_op` and `num_stages`.
    """
    if not isinstance(model_or_tflite, (bytes, bytearray, memoryview, str)) and hasattr(model_or_tflite, "layers"):
        from keras_patch.keras.export import export_tflite

        keras_model = model_or_tflite
        if representative_dataset is None:
            shape = tuple(int(d) for d in keras_model.inputs[0].shape[1:])
            representative_dataset = np.random.default_rng(0).random((4, *shape), dtype=np.float32)
        data = export_tflite(keras_model, representative_dataset)
    else:
        data = read_model_bytes(model_or_tflite)
    if kernel not in geometry.KERNELS:
        raise ValueError(f"kernel must be one of {geometry.KERNELS}, not {kernel!r}")
    data, heads = _offline_figures(data, kernel)
    patched = TFLiteModel.from_bytes(data)
    plain = TFLiteModel.from_bytes(unpatchify(data))
    stage_ops = find_stages(patched)
    scratch = stage_scratch_bytes(patched, kernel)
    spans, plain_op = [], 0
    for p in range(patched.num_ops):  # unpatchify expands each stage in place, in order
        if p in scratch:  # a layer with explicit pads expands to PAD + VALID conv
            ops = sum(layer_op_counts(stage_options(patched, p)))
            spans.append(StageSpan(plain_op, plain_op + ops - 1, tuple(scratch[p])))
            plain_op += ops
        else:
            plain_op += 1
    plain_buffers, patched_buffers, lbl_peak, lbl_peak_no_input, patched_peak, patched_peak_no_input = \
        _arena_figures(plain, spans)
    if heads["offline_plan_head_bytes"] is not None:  # what TFLM will use
        patched_peak = heads["offline_plan_head_bytes"]
        patched_peak_no_input = heads["offline_plan_head_bytes_without_input"]
        if not spans:
            lbl_peak, lbl_peak_no_input = patched_peak, patched_peak_no_input

    # Map layer-by-layer ops to patched ops: each stage expands in place.
    plain_to_patched, plain_stage = [], []
    stages: List[StageProfile] = []
    for p in range(patched.num_ops):
        if p in stage_ops:
            opts = stage_options(patched, p)
            full, patched_macs = geometry.stage_macs(opts)
            ph, pw = geometry.max_patch_input(opts)
            buffers = geometry.stage_buffer_bytes(opts, kernel)
            stages.append(StageProfile(
                op_index=p, grid=opts.grid, num_layers=opts.num_layers,
                start_layer=layer_name(patched.tensor(patched.op_inputs(p)[0]).name),
                end_layer=layer_name(patched.tensor(patched.op_outputs(p)[0]).name),
                input_shape=opts.input_shape, output_shape=opts.output_shape,
                receptive_field=geometry.receptive_field(opts),
                patch_input_shape=(ph, pw, opts.input_shape[2]),
                patch_arena_bytes=buffers[geometry.PATCH_ARENA],
                macs=full, patched_macs=patched_macs,
                context_bytes=buffers[geometry.CMSIS_NN_CONTEXT],
            ))
            for l, count in enumerate(layer_op_counts(opts)):
                plain_to_patched.extend([(p, opts, l)] * count)
                plain_stage.extend([p] * count)
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
        in_patch = geometry.patch_live_bytes(opts, arena, layer)
        return _live_bytes(patched_buffers, p) - memory_planner.align_up(arena.total_bytes) * (arena.total_bytes > 0) + in_patch

    rows = []
    for i in range(plain.num_ops):
        layer = layer_name(plain.tensor(plain.op_outputs(i)[0]).name)
        block = block_name(layer) or f"op {i}"
        rows.append(OpProfile(
            index=i,
            op=plain.op_type(i),
            output_shape=plain.tensor(plain.op_outputs(i)[0]).shape,
            macs=op_macs(plain, i),
            layer_by_layer_live_bytes=_live_bytes(plain_buffers, i),
            patched_live_bytes=patched_live(plain_to_patched[i]),
            stage=plain_stage[i],
            layer=layer,
            block=block,
        ))
    macs = sum(r.macs for r in rows)
    patched_macs = macs + sum(s.patched_macs - s.macs for s in stages)
    peak_op = max(range(patched.num_ops), key=lambda p: _live_bytes(patched_buffers, p), default=0)
    summary = ProfileSummary(
        layer_by_layer_peak_bytes=lbl_peak,
        patched_peak_bytes=patched_peak,
        layer_by_layer_peak_bytes_without_input=lbl_peak_no_input,
        patched_peak_bytes_without_input=patched_peak_no_input,
        macs=macs,
        patched_macs=patched_macs,
        mac_overhead=patched_macs / macs if macs else 1.0,
        patched_peak_op=_short_op_label(patched, peak_op) if patched.num_ops else "",
        num_stages=len(stages),
        **heads,
    )
    return Profile(rows=rows, stages=stages, summary=summary)
