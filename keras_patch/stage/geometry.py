"""Patch geometry of a KP_PATCH_STAGE: tiles, per-layer regions, patch arena.

Implements the "Patch geometry" and "Scratch buffers" sections of
`docs/patch_stage_op.md`:

* the stage output (or, when the last layer is a MEAN, the MEAN's input) is cut
  into `grid_h x grid_w` tiles, tile `i` covering rows
  `[floor(i*H/grid_h), floor((i+1)*H/grid_h))` (same for columns);
* walking the layers backwards, each tensor's region for a patch is the hull
  of what its consumers read, clipped to the tensor (taps outside it are
  padding);
* intermediate tensors live in one scratch "patch arena", placed by a
  first-fit planner over their per-patch lifetimes (after a MEAN's int32 sums,
  which live for the whole op).

Example:

>>> tile_bounds(10, 3)
[(0, 3), (3, 6), (6, 10)]
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import List, Optional, Tuple

from keras_patch.stage.options import (
    OP_CONV_2D,
    OP_DEPTHWISE_CONV_2D,
    StageOptions,
)

Region = tuple  # (y0, y1, x0, x1), half-open
PATCH_ARENA_ALIGNMENT = 4


def tile_bounds(size: int, parts: int) -> list:
    """Balanced split of `size` into `parts` half-open ranges."""
    return [((i * size) // parts, ((i + 1) * size) // parts) for i in range(parts)]


def is_empty(region: Optional[Region]) -> bool:
    return region is None or region[0] >= region[1] or region[2] >= region[3]


def region_area(region: Optional[Region]) -> int:
    if is_empty(region):
        return 0
    return (region[1] - region[0]) * (region[3] - region[2])


def hull(a: Optional[Region], b: Optional[Region]) -> Optional[Region]:
    if is_empty(a):
        return b if not is_empty(b) else None
    if is_empty(b):
        return a
    return (min(a[0], b[0]), max(a[1], b[1]), min(a[2], b[2]), max(a[3], b[3]))


def input_span(o0: int, o1: int, kernel: int, stride: int, dilation: int, pad: int, size: int) -> tuple:
    """Input rows read by output rows [o0, o1), clipped to [0, size)."""
    lo = o0 * stride - pad
    hi = (o1 - 1) * stride - pad + (kernel - 1) * dilation + 1
    return max(lo, 0), min(hi, size)


def layer_input_region(options: StageOptions, layer_index: int, out_region: Region) -> Region:
    """Region of the layer's input(s) its output region `out_region` reads."""
    layer = options.layers[layer_index]
    in_h, in_w, _ = options.tensor_shapes[layer.inputs[0]]
    y = input_span(out_region[0], out_region[1], layer.kernel[0], layer.stride[0],
                   layer.dilation[0], layer.pad[0], in_h)
    x = input_span(out_region[2], out_region[3], layer.kernel[1], layer.stride[1],
                   layer.dilation[1], layer.pad[1], in_w)
    return (y[0], y[1], x[0], x[1])


def patch_regions(options: StageOptions, tile: Region) -> List[Optional[Region]]:
    """Region of every stage tensor (index 0..L) needed to compute `tile` of the tiled tensor.

    The tiled tensor is the output, or the MEAN's input when the stage ends
    with a MEAN (whose 1x1 output then has no region: it is written once,
    after the last tile).
    """
    regions: List[Optional[Region]] = [None] * (options.num_layers + 1)
    regions[options.tiled_tensor] = tile
    for l in range(options.tiled_tensor - 1, -1, -1):
        out_region = regions[l + 1]
        if is_empty(out_region):
            continue
        needed = layer_input_region(options, l, out_region)
        if is_empty(needed):
            continue
        for t in options.layers[l].inputs:
            if t >= 0:
                regions[t] = hull(regions[t], needed)
    return regions


def tiles(options: StageOptions) -> List[Region]:
    """Tiles of the tiled tensor (the output, or a final MEAN's input) in execution order (row-major)."""
    out_h, out_w, _ = options.tiled_shape
    rows = tile_bounds(out_h, options.grid[0])
    cols = tile_bounds(out_w, options.grid[1])
    return [(r0, r1, c0, c1) for (r0, r1) in rows for (c0, c1) in cols]


def all_patch_regions(options: StageOptions) -> List[List[Optional[Region]]]:
    return [patch_regions(options, tile) for tile in tiles(options)]


@dataclass(frozen=True)
class PatchArenaPlan:
    """Placement of the intermediate tensors inside the patch-arena scratch buffer.

    Layers that run in place (docs "In place") have a one-plane save buffer
    at `save_offsets[l]` (`save_sizes[l]` bytes); -1 / 0 for the others.  A
    tensor written in place shares its input's offset. A stage ending with a
    MEAN keeps its int32 sums at offset 0 (`accumulator_bytes`, alive for the
    whole op); everything else follows them.
    """

    offsets: List[int]  # per stage tensor; -1 for the stage input/output
    sizes: List[int]  # bytes reserved per stage tensor (max over patches)
    total_bytes: int
    save_offsets: tuple = ()  # per layer; -1: the layer does not run in place
    save_sizes: tuple = ()  # per layer; bytes of its one-plane save buffer
    accumulator_bytes: int = 0  # a final MEAN's int32 sums, at offset 0

    @property
    def in_place_layers(self) -> List[int]:
        """Layers that run in place (write their output over their input)."""
        return [l for l, offset in enumerate(self.save_offsets) if offset >= 0]


def tensor_lifetimes(options: StageOptions) -> list:
    """(first_layer, last_layer) per stage tensor within one patch."""
    last = [t - 1 for t in range(options.num_layers + 1)]
    for l, layer in enumerate(options.layers):
        for t in layer.inputs:
            if t >= 0:
                last[t] = max(last[t], l)
    return [(max(t - 1, 0), last[t]) for t in range(options.num_layers + 1)]


def _align(value: int, alignment: int = PATCH_ARENA_ALIGNMENT) -> int:
    return (value + alignment - 1) // alignment * alignment


def in_place_candidates(options: StageOptions) -> List[int]:
    """Layers of a multi-layer `in_place` stage that may write over their input (docs "In place").

    A DEPTHWISE_CONV_2D layer `l` with depth multiplier 1 whose input is an
    intermediate tensor (1 .. L-1) that no later layer reads, and whose
    output is an intermediate too (`l + 1 < L`).
    """
    L = options.num_layers
    if not getattr(options, "in_place", False) or L < 2:
        return []
    lifetimes = tensor_lifetimes(options)
    result = []
    for l, layer in enumerate(options.layers):
        a = layer.inputs[0]
        if (layer.op == OP_DEPTHWISE_CONV_2D and 1 <= a and l + 1 < L and lifetimes[a][1] == l
                and options.tensor_shapes[a][2] == options.tensor_shapes[l + 1][2]):
            result.append(l)
    return result


def plan_patch_arena(options: StageOptions) -> PatchArenaPlan:
    """First-fit plan of the per-patch intermediates (docs: "Scratch buffers", "In place").

    Size of tensor t = channels * max over patches of its region area, rounded
    up to 4 bytes.  Tensors are placed in order of decreasing size (ties: lower
    tensor index first), each at the lowest 4-aligned offset where it overlaps
    no already placed tensor whose lifetime overlaps its own.  With
    `options.in_place`, a one-layer DEPTHWISE_CONV_2D stage's arena is one
    plane of its input region; a multi-layer stage runs all its
    `in_place_candidates` in place when that gives a smaller arena.
    """
    num_tensors = options.num_layers + 1
    sizes = [0] * num_tensors
    planes = [0] * num_tensors  # max region area per tensor (one channel plane)
    for regions in all_patch_regions(options):
        for t in range(0, num_tensors - 1):
            area = region_area(regions[t])
            planes[t] = max(planes[t], area)
            if t >= 1:
                sizes[t] = max(sizes[t], area * options.tensor_shapes[t][2])
    return _plan_from_sizes(options, [_align(s) for s in sizes], planes)


def _plan_from_sizes(options: StageOptions, sizes: List[int], planes: List[int]) -> PatchArenaPlan:
    """`plan_patch_arena` from per-tensor sizes (4-aligned) and largest region areas."""
    plan = _plan_patch_buffers(options, sizes, planes)
    if not options.ends_with_mean:
        return plan
    sums = _align(4 * options.output_shape[2])  # docs "Scratch buffers", step 5
    return dataclasses.replace(
        plan, offsets=[o + sums if o >= 0 else o for o in plan.offsets],
        save_offsets=tuple(o + sums if o >= 0 else o for o in plan.save_offsets),
        total_bytes=plan.total_bytes + sums, accumulator_bytes=sums)


def _plan_patch_buffers(options: StageOptions, sizes: List[int], planes: List[int]) -> PatchArenaPlan:
    """The per-patch buffers of `_plan_from_sizes`, from offset 0."""
    L = options.num_layers
    save_sizes = [_align(planes[layer.inputs[0]]) for layer in options.layers]
    if getattr(options, "in_place", False) and L == 1:
        total = save_sizes[0]
        return PatchArenaPlan(offsets=[-1, -1], sizes=[0, 0], total_bytes=total,
                              save_offsets=(0 if total else -1,), save_sizes=(total,))
    plan = place_patch_arena(options, sizes)
    candidates = in_place_candidates(options)
    if candidates:
        in_place = place_patch_arena(options, sizes, candidates, save_sizes)
        if in_place.total_bytes < plan.total_bytes:
            return in_place
    return plan


def place_patch_arena(options: StageOptions, sizes: List[int], in_place_layers=(),
                      save_sizes=None) -> PatchArenaPlan:
    """First-fit placement of per-tensor sizes (4-aligned, 0 for tensors 0 and L) (`plan_patch_arena`).

    Each layer `l` of `in_place_layers` merges its output tensor into its
    input's slot (one buffer: the largest member's size, from the first
    member's producer to the last member's last reader) and adds its save
    buffer of `save_sizes[l]` bytes alive at layer `l` only.  Buffers are
    placed by decreasing size; ties: tensors by lowest member index, then
    save buffers by layer.
    """
    num_tensors = options.num_layers + 1
    L = options.num_layers
    lifetimes = tensor_lifetimes(options)
    head = list(range(num_tensors))
    for l in sorted(in_place_layers):
        head[l + 1] = head[options.layers[l].inputs[0]]
    # buffer key -> [size, first, last]; tensors keyed by head index, saves by L + 1 + l.
    buffers = {}
    for t in range(1, num_tensors - 1):
        h = head[t]
        size, first, last = buffers.get(h, [0, lifetimes[h][0], lifetimes[h][1]])
        buffers[h] = [max(size, sizes[t]), first, max(last, lifetimes[t][1])]
    for l in in_place_layers:
        buffers[L + 1 + l] = [save_sizes[l], l, l]
    order = sorted(buffers, key=lambda k: (-buffers[k][0], k))
    placed = {}
    for key in order:
        size, first, last = buffers[key]
        if size == 0:
            continue
        conflicts = sorted(
            (placed[u], placed[u] + buffers[u][0])
            for u in placed
            if not (buffers[u][2] < first or last < buffers[u][1])
        )
        offset = 0
        for start, end in conflicts:
            if offset + size <= start:
                break
            offset = max(offset, end)
        placed[key] = offset
    offsets = [-1] * num_tensors
    for t in range(1, num_tensors - 1):
        if sizes[t] > 0:
            offsets[t] = placed[head[t]]
    save_offsets = [-1] * L
    save_bytes = [0] * L
    for l in in_place_layers:
        save_offsets[l] = placed.get(L + 1 + l, -1)
        save_bytes[l] = save_sizes[l]
    total = max([placed[k] + buffers[k][0] for k in placed], default=0)
    return PatchArenaPlan(offsets=offsets, sizes=list(sizes), total_bytes=total,
                          save_offsets=tuple(save_offsets), save_sizes=tuple(save_bytes))


def patch_live_bytes(options: StageOptions, plan: PatchArenaPlan, layer: int) -> int:
    """Bytes of the patch arena alive while layer `layer` of one patch runs.

    Tensors written in place share their input's slot (counted once, the
    larger of the two); the layer's save buffer counts while it runs.
    """
    lifetimes = tensor_lifetimes(options)
    slots = {}
    for t, size in enumerate(plan.sizes):
        if plan.offsets[t] >= 0 and lifetimes[t][0] <= layer <= lifetimes[t][1]:
            slots[plan.offsets[t]] = max(slots.get(plan.offsets[t], 0), size)
    save = plan.save_sizes[layer] if layer < len(plan.save_offsets) and plan.save_offsets[layer] >= 0 else 0
    return sum(slots.values()) + save + plan.accumulator_bytes


def _align8(n: int) -> int:
    return (n + 7) // 8 * 8


def kernel_persistent_bytes(options: StageOptions, pointer_bytes: int = 4) -> int:
    """Persistent memory the C++ kernel core allocates in Prepare (docs: "Persistent data").

    `pointer_bytes` is 4 on 32-bit MCUs, 8 on 64-bit hosts.  The TFLM adapter
    adds its OpData and one pointer per op input (TFLM rounds each allocation
    up to 16 bytes).
    """
    L = options.num_layers
    channels = sum(options.tensor_shapes[l + 1][2] for l, layer in enumerate(options.layers)
                   if layer.op in (OP_CONV_2D, OP_DEPTHWISE_CONV_2D))
    return (_align8(32 + 5 * pointer_bytes) + _align8(36 * (L + 1)) + _align8(100 * L)
            + 2 * _align8(4 * channels) + _align8(16 * (L + 1)))


KERNELS = ("portable", "cmsis_nn")


def cmsis_nn_layer_buffer_bytes(options: StageOptions, layer_index: int) -> int:
    """CMSIS-NN's context buffer for one CONV_2D / DEPTHWISE_CONV_2D layer.

    Mirrors `arm_convolve_wrapper_s8_get_buffer_size` /
    `arm_depthwise_conv_wrapper_s8_get_buffer_size` of CMSIS-NN (the commit
    TFLM pins) on a Cortex-M with the DSP extension and no MVE (ARM_MATH_DSP),
    built with GCC, called with the whole tensors and the layer's own
    padding (every per-patch call has the same channels and kernel and no
    more padding, so needs no more).  0 for other ops.
    """
    layer = options.layers[layer_index]
    c_in = options.tensor_shapes[layer.inputs[0]][2]
    c_out = options.tensor_shapes[layer_index + 1][2]
    (kh, kw), (dh, dw), (pt, pl) = layer.kernel, layer.dilation, layer.pad
    if layer.op == OP_CONV_2D:
        if (kh, kw) == (1, 1) and (dh, dw) == (1, 1) and (pt, pl) == (0, 0):
            # arm_convolve_1x1_s8_fast (GCC: no buffer; armclang >= 6.10: 4 * c_in)
            # or arm_convolve_1x1_s8 (no buffer).
            return 0
        # arm_convolve_s8 / arm_convolve_1_x_n_s8: two int16 im2col columns.
        return 2 * _align(kh * kw * c_in) * 2
    if layer.op == OP_DEPTHWISE_CONV_2D:
        if c_in != c_out or (dh, dw) != (1, 1):
            return 0  # arm_depthwise_conv_s8
        if (kh, kw) == (3, 3) and pt <= 1 and pl <= 1:
            return 0  # arm_depthwise_conv_3x3_s8
        return c_in * kh * kw * 2  # arm_depthwise_conv_s8_opt
    return 0


def _cmsis_in_place(layer, block_x0: int, block_x1: int, region: Region) -> bool:
    if layer.pad[1] + block_x0 - region[2] * layer.stride[1] < 0:
        return False
    fast_1x1 = (layer.op == OP_CONV_2D and layer.kernel == (1, 1) and layer.stride == (1, 1)
                and layer.dilation == (1, 1))
    return not fast_1x1 or block_x1 - block_x0 == region[3] - region[2]


def _portable_layers(options: StageOptions) -> set:
    """Layers the CMSIS-NN build runs with the portable code: the in-place ones (docs "In place")."""
    if not getattr(options, "in_place", False):
        return set()
    return set(plan_patch_arena(options).in_place_layers)


def cmsis_nn_staging_bytes(options: StageOptions) -> int:
    """Largest input band the CMSIS-NN path copies (docs: "Scratch buffers", #1).

    A CONV_2D / DEPTHWISE_CONV_2D input block (stage tensor 0: the whole
    tensor; an intermediate: its stored region) is passed in place when the
    left padding it implies, `pad_left + block_x0 - out_x0 * stride_w`, is
    `>= 0` and, for a 1x1 stride-1 CONV_2D, its width is the output
    region's; otherwise the layer runs one output row at a time and copies
    the input rows that row reads (clipped to the tensor), over the columns
    the whole output region reads.
    """
    staging = 0
    portable = _portable_layers(options)
    for regions in all_patch_regions(options):
        for l, layer in enumerate(options.layers):
            region = regions[l + 1]
            if layer.op not in (OP_CONV_2D, OP_DEPTHWISE_CONV_2D) or is_empty(region) or l in portable:
                continue
            t = layer.inputs[0]
            if t == 0:
                x0, x1 = 0, options.tensor_shapes[0][1]
            else:
                x0, x1 = regions[t][2], regions[t][3]
            if _cmsis_in_place(layer, x0, x1, region):
                continue
            window = layer_input_region(options, l, region)
            in_h = options.tensor_shapes[t][0]
            rows = max(min(y * layer.stride[0] - layer.pad[0] + (layer.kernel[0] - 1) * layer.dilation[0] + 1, in_h)
                       - max(y * layer.stride[0] - layer.pad[0], 0) for y in range(region[0], region[1]))
            staging = max(staging, rows * (window[3] - window[2]) * options.tensor_shapes[t][2])
    return staging


def kernel_context_bytes(options: StageOptions, kernel: str = "portable", staging_bytes: Optional[int] = None) -> int:
    """Scratch buffer #1 (CMSIS-NN context) the kernel requests (docs: "Scratch buffers").

    `kernel`: "portable" (0) or "cmsis_nn" (the core built with -DCMSIS_NN
    for a Cortex-M with DSP, no MVE):
    `align4(max over layers of cmsis_nn_layer_buffer_bytes) + align4(cmsis_nn_staging_bytes)`.
    """
    if kernel not in KERNELS:
        raise ValueError(f"kernel must be one of {KERNELS}, not {kernel!r}")
    if kernel == "portable":
        return 0
    portable = _portable_layers(options)
    cmsis = max([cmsis_nn_layer_buffer_bytes(options, l) for l in range(options.num_layers) if l not in portable],
                default=0)
    staging = cmsis_nn_staging_bytes(options) if staging_bytes is None else staging_bytes
    return _align(cmsis) + _align(staging)


#: Names of the KP_PATCH_STAGE scratch buffers (docs: "Scratch buffers"), in request order.
PATCH_ARENA = "patch arena"
CMSIS_NN_CONTEXT = "CMSIS-NN context"
STAGE_BUFFER_NAMES = (PATCH_ARENA, CMSIS_NN_CONTEXT)


@dataclass(frozen=True)
class StageBuffer:
    """One scratch buffer a KP_PATCH_STAGE op requests with `RequestScratchBufferInArena`.

    Attributes:
        name: one of `STAGE_BUFFER_NAMES` ("patch arena", "CMSIS-NN context").
        bytes: its size (> 0: buffers of 0 bytes are not requested).
    """

    name: str
    bytes: int


def stage_buffers(options: StageOptions, kernel: str = "portable", *, arena: Optional[PatchArenaPlan] = None,
                  staging_bytes: Optional[int] = None) -> Tuple[StageBuffer, ...]:
    """The scratch buffers the kernel requests in Prepare, in request order (docs: "Scratch buffers").

    The one definition of that list (its C++ twin is `KpStageBuffers` in
    tflm_ops/patch_geometry.h): the patch arena `P` (`plan_patch_arena`) when
    `P > 0`, then, for `kernel="cmsis_nn"` (the core built with -DCMSIS_NN),
    the CMSIS-NN context `Q` (`kernel_context_bytes`) when `Q > 0`.

    `arena` (`plan_patch_arena(options)`) and `staging_bytes`
    (`cmsis_nn_staging_bytes(options)`) may be given when already known
    (e.g. from `stage_costs_by_grid`).
    """
    if kernel not in KERNELS:
        raise ValueError(f"kernel must be one of {KERNELS}, not {kernel!r}")
    if arena is None:
        arena = plan_patch_arena(options)
    buffers = [StageBuffer(PATCH_ARENA, arena.total_bytes)]
    if kernel == "cmsis_nn":
        buffers.append(StageBuffer(CMSIS_NN_CONTEXT, kernel_context_bytes(options, kernel, staging_bytes)))
    return tuple(b for b in buffers if b.bytes > 0)


def stage_buffer_bytes(options: StageOptions, kernel: str = "portable") -> dict:
    """`stage_buffers` as name -> bytes, with 0 for a buffer the kernel does not request."""
    sizes = dict.fromkeys(STAGE_BUFFER_NAMES, 0)
    sizes.update((b.name, b.bytes) for b in stage_buffers(options, kernel))
    return sizes


def layer_macs_per_pixel(options: StageOptions, layer_index: int) -> int:
    """Multiply-accumulates per output pixel (0 for adds, pooling, pad, relu)."""
    layer = options.layers[layer_index]
    in_c = options.tensor_shapes[layer.inputs[0]][2]
    out_c = options.tensor_shapes[layer_index + 1][2]
    kh, kw = layer.kernel
    if layer.op == OP_CONV_2D:
        return kh * kw * in_c * out_c
    if layer.op == OP_DEPTHWISE_CONV_2D:
        return kh * kw * out_c
    return 0


def stage_macs(options: StageOptions) -> tuple:
    """(layer-by-layer MACs, patch-by-patch MACs including recomputation)."""
    full = 0
    for l in range(options.num_layers):
        h, w, _ = options.tensor_shapes[l + 1]
        full += h * w * layer_macs_per_pixel(options, l)
    patched = patched_pixel_sum(options, [layer_macs_per_pixel(options, l) for l in range(options.num_layers)])
    return full, patched


def patched_pixel_sum(options: StageOptions, per_pixel) -> int:
    """Sum over patches and layers of the output pixels each patch computes times `per_pixel[layer]`."""
    return sum(region_area(regions[l + 1]) * per_pixel[l]
               for regions in all_patch_regions(options) for l in range(options.num_layers))


def receptive_field(options: StageOptions) -> tuple:
    """(height, width) of the input window one pixel of the tiled tensor depends on (unclipped).

    The tiled tensor is the stage output, or a final MEAN's input.
    """
    extents = [None] * (options.num_layers + 1)
    extents[options.tiled_tensor] = (1, 1)
    for l in range(options.tiled_tensor - 1, -1, -1):
        if extents[l + 1] is None:
            continue
        layer = options.layers[l]
        h, w = extents[l + 1]
        need = (
            (h - 1) * layer.stride[0] + (layer.kernel[0] - 1) * layer.dilation[0] + 1,
            (w - 1) * layer.stride[1] + (layer.kernel[1] - 1) * layer.dilation[1] + 1,
        )
        for t in layer.inputs:
            if t >= 0:
                prev = extents[t]
                extents[t] = need if prev is None else (max(prev[0], need[0]), max(prev[1], need[1]))
    return extents[0]


def max_patch_input(options: StageOptions) -> tuple:
    """Largest (height, width) of the stage-input region any patch reads."""
    best = (0, 0)
    for regions in all_patch_regions(options):
        r = regions[0]
        if not is_empty(r):
            best = (max(best[0], r[1] - r[0]), max(best[1], r[3] - r[2]))
    return best


@dataclass(frozen=True)
class StageCosts:
    """What a stage costs: MACs layer by layer and patch by patch, its patch arena, CMSIS-NN staging."""

    macs: int
    patched_macs: int
    arena: PatchArenaPlan
    staging_bytes: int  # cmsis_nn_staging_bytes


def _axis_spans(options: StageOptions, axis: int, parts: Optional[int] = None) -> Optional[list]:
    """Per stage tensor, per tile along one axis (0: rows, 1: columns), the half-open span a patch
    needs; None when a span comes out empty (then regions are not a product of the two axes).
    `parts`: tiles along the axis (default: the options' grid)."""
    parts = options.grid[axis] if parts is None else parts
    spans: list = [None] * (options.num_layers + 1)
    spans[options.tiled_tensor] = tile_bounds(options.tiled_shape[axis], parts)
    if options.ends_with_mean:  # its 1x1 output: no MACs, no patch-arena buffer; a placeholder span
        spans[-1] = [(0, 1)] * parts
    for l in range(options.tiled_tensor - 1, -1, -1):
        out = spans[l + 1]
        if out is None:
            return None
        layer = options.layers[l]
        size = options.tensor_shapes[layer.inputs[0]][axis]
        k, st, d, p = layer.kernel[axis], layer.stride[axis], layer.dilation[axis], layer.pad[axis]
        reach = (k - 1) * d + 1 - p
        needed = [(max(o0 * st - p, 0), min((o1 - 1) * st + reach, size)) for (o0, o1) in out]
        if any(a >= b for a, b in needed):
            return None
        for t in set(u for u in layer.inputs if u >= 0):
            if spans[t] is None:
                spans[t] = needed
            else:
                spans[t] = [(min(a[0], b[0]), max(a[1], b[1])) for a, b in zip(spans[t], needed)]
    return spans


def stage_costs(options: StageOptions) -> StageCosts:
    """`stage_macs`, `plan_patch_arena` and `cmsis_nn_staging_bytes` of a stage, computed per axis.

    A patch's region of every stage tensor is the product of a row span and
    a column span, so sums and maxima over the `rows x columns` patches
    factor into one pass per axis: `O(rows + columns)` instead of
    `O(rows * columns)`. Where a span comes out empty (a PAD whose padding
    alone makes a tile), the patch-by-patch functions are used. Equal to
    them in every case.
    """
    return stage_costs_by_grid(options, [options.grid])[tuple(options.grid)]


def stage_costs_by_grid(options: StageOptions, grids, max_extra_macs: Optional[int] = None,
                        staging: bool = True) -> dict:
    """`stage_costs` of the stage with each grid of `grids` (the options' own grid is ignored).

    The per-axis spans are computed once per number of rows and of columns.
    Grids whose extra MACs (`patched_macs - macs`) exceed `max_extra_macs`
    map to None; `staging=False` leaves `staging_bytes` 0 (the portable
    kernel does not need it).
    """
    per_pixel = [layer_macs_per_pixel(options, l) for l in range(options.num_layers)]
    full = sum(options.tensor_shapes[l + 1][0] * options.tensor_shapes[l + 1][1] * per_pixel[l]
               for l in range(options.num_layers))
    spans = {}

    def cached(key, make):
        if key not in spans:
            spans[key] = make()
        return spans[key]

    result = {}
    for grid in grids:
        grid = tuple(grid)
        rows = cached((0, grid[0]), lambda: _axis_spans(options, 0, grid[0]))
        cols = cached((1, grid[1]), lambda: _axis_spans(options, 1, grid[1]))
        opts = options if tuple(options.grid) == grid else StageOptions(
            grid=grid, tensor_shapes=options.tensor_shapes, tensor_scales=options.tensor_scales,
            tensor_zero_points=options.tensor_zero_points, layers=options.layers, version=options.version,
            in_place=options.in_place)
        if rows is None or cols is None:
            _, patched = stage_macs(opts)
            if max_extra_macs is not None and patched - full > max_extra_macs:
                result[grid] = None
                continue
            result[grid] = StageCosts(full, patched, plan_patch_arena(opts),
                                      cmsis_nn_staging_bytes(opts) if staging else 0)
            continue
        totals = cached(("sum", 0, grid[0]), lambda: [sum(b - a for a, b in s) for s in rows])
        totals_c = cached(("sum", 1, grid[1]), lambda: [sum(b - a for a, b in s) for s in cols])
        patched = sum(per_pixel[l] * totals[l + 1] * totals_c[l + 1]
                      for l in range(options.num_layers) if per_pixel[l])
        if max_extra_macs is not None and patched - full > max_extra_macs:
            result[grid] = None
            continue
        longest = cached(("max", 0, grid[0]), lambda: [max(b - a for a, b in s) for s in rows])
        longest_c = cached(("max", 1, grid[1]), lambda: [max(b - a for a, b in s) for s in cols])
        sizes = [0] * (options.num_layers + 1)
        planes = [longest[t] * longest_c[t] for t in range(options.num_layers + 1)]
        for t in range(1, options.num_layers):
            sizes[t] = _align(planes[t] * options.tensor_shapes[t][2])
        arena = _plan_from_sizes(opts, sizes, planes)
        result[grid] = StageCosts(full, patched, arena,
                                  _staging_per_axis(opts, rows, cols, arena.in_place_layers) if staging else 0)
    return result


def _staging_per_axis(options: StageOptions, rows: list, cols: list, portable=()) -> int:
    """`cmsis_nn_staging_bytes` from the per-axis spans (`portable`: in-place layers, not staged)."""
    staging = 0
    for l, layer in enumerate(options.layers):
        if layer.op not in (OP_CONV_2D, OP_DEPTHWISE_CONV_2D) or l in portable:
            continue
        t = layer.inputs[0]
        width = 0
        for c, out_x in enumerate(cols[l + 1]):
            x0, x1 = (0, options.tensor_shapes[0][1]) if t == 0 else cols[t][c]
            if _cmsis_in_place(layer, x0, x1, (0, 1, out_x[0], out_x[1])):
                continue
            window = input_span(out_x[0], out_x[1], layer.kernel[1], layer.stride[1], layer.dilation[1],
                                layer.pad[1], options.tensor_shapes[t][1])
            width = max(width, window[1] - window[0])
        if not width:
            continue
        in_h = options.tensor_shapes[t][0]
        (kh, sh, dh, ph) = (layer.kernel[0], layer.stride[0], layer.dilation[0], layer.pad[0])
        height = max(min(y * sh - ph + (kh - 1) * dh + 1, in_h) - max(y * sh - ph, 0)
                     for (y0, y1) in rows[l + 1] for y in range(y0, y1))
        staging = max(staging, height * width * options.tensor_shapes[t][2])
    return staging
