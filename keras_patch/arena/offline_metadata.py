"""Reading and writing TFLM's `OfflineMemoryAllocation` metadata (an offline memory plan).

TFLM's `MicroAllocator` reads, from the model metadata entry named
`OfflineMemoryAllocation`, a buffer of little-endian int32:
`[version = 1, subgraph = 0, num_tensors, offset_0, ..., offset_{n-1}]`, one
offset per tensor of every subgraph in order; `-1` leaves a tensor to the
online (greedy) planner. Offsets are bytes from the start of the arena head.
TFLM places offline-planned tensors at their offsets without checking them
and plans everything else (scratch buffers included) around them
(`memory_planner.plan_greedy` replays that), so a plan must be checked
before it is trusted (`keras_patch.arena.offline_plan`).

Example:

>>> from keras_patch.graph.tflite_model import TFLiteModel  # doctest: +SKIP
>>> model = TFLiteModel.from_bytes("model.tflite")  # doctest: +SKIP
>>> write_offline_offsets(model, [0, -1, 4096])  # doctest: +SKIP
>>> read_offline_offsets(model)  # doctest: +SKIP
[0, -1, 4096]
"""

from __future__ import annotations

import struct
from typing import List, Optional, Sequence

import numpy as np
from ai_edge_litert import schema_py_generated as schema

from keras_patch.arena.memory_planner import OFFLINE_MEMORY_ALLOCATION, _offline_offsets
from keras_patch.graph.tflite_model import TFLiteModel, decode_name

#: The metadata format version TFLM reads (micro/docs/memory_management.md).
OFFLINE_PLAN_VERSION = 1
ONLINE_PLANNED = -1


def read_offline_offsets(model: TFLiteModel) -> Optional[List[int]]:
    """The offsets of the model's `OfflineMemoryAllocation` entry, or None without one."""
    return _offline_offsets(model)


def remove_offline_offsets(model: TFLiteModel) -> bool:
    """Drops the `OfflineMemoryAllocation` entry (its buffer is emptied); True if there was one."""
    fb = model.model
    kept, removed = [], False
    for meta in fb.metadata or []:
        if decode_name(meta.name) == OFFLINE_MEMORY_ALLOCATION:
            fb.buffers[meta.buffer].data = None
            removed = True
        else:
            kept.append(meta)
    fb.metadata = kept or None
    return removed


def write_offline_offsets(model: TFLiteModel, offsets: Sequence[int]) -> None:
    """Sets the model's `OfflineMemoryAllocation` entry to `offsets` (one per tensor; -1 = online).

    Raises:
        ValueError: `offsets` does not have one entry per tensor, or an
            offset is below -1.
    """
    fb = model.model
    total = sum(len(sg.tensors or []) for sg in fb.subgraphs)
    offsets = [int(v) for v in offsets]
    if len(offsets) != total:
        raise ValueError(f"An offline plan needs {total} offsets (one per tensor), got {len(offsets)}.")
    if any(v < ONLINE_PLANNED for v in offsets):
        raise ValueError(f"Offline offsets must be >= 0 or -1 (online); got {min(offsets)}.")
    remove_offline_offsets(model)
    raw = struct.pack(f"<3I{total}i", OFFLINE_PLAN_VERSION, 0, total, *offsets)
    buffer = schema.BufferT()
    buffer.data = np.frombuffer(raw, np.uint8).copy()
    fb.buffers.append(buffer)
    meta = schema.MetadataT()
    meta.name = OFFLINE_MEMORY_ALLOCATION
    meta.buffer = len(fb.buffers) - 1
    fb.metadata = list(fb.metadata or []) + [meta]
