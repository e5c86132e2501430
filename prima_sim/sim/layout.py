"""How one device's mapped weights are cut into page-cache chunks, and each window's work into segments.

A window's layers run in order: its CPU layers first, then its last ``gpu_layers`` on the GPU (the plan's
rule). Each CPU layer's weights are one contiguous byte range of the model file (llama.cpp writes
``blk.<i>.*`` together), cut into equal chunks of at most ``chunk_bytes``; the layer's compute time is spread
over its chunks in proportion to their bytes, so a layer whose second half is missing computes its first
half, then waits for the disk. GPU layers on a discrete GPU (CUDA, Vulkan, ROCm, SYCL) live in VRAM, loaded
once: they have no chunks and never page.

On macOS with Metal the unit is a whole window: llama.cpp wraps a window's weights in one Metal buffer and the
GPU needs the buffer resident before a command buffer runs, so a window is either resident or reloaded whole
(the cost model's "Metal reloads the whole working set when it does not fit" emerges when the windows do not
fit together).

The head's output head (final norm and ``output.weight``, or the tied embedding table) is one more group.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field

from prima_sim.devices.behaviour import behaviour_of
from prima_sim.devices.model import ModelProfile
from prima_sim.devices.profile import DeviceProfile
from prima_sim.plan import DeviceAssignment, LayerRange

OUT = -1
"""Window index of the head's output head in :attr:`DeviceLayout.works`."""


@dataclass
class Work:
    """One window of a device (or the head's output head): what it computes and which chunks it touches.

    Attributes:
        window: index of the window in the plan's execution order (:data:`OUT` for the output head).
        layers: the window's half-open layer range (None for the output head).
        group: page-cache group of its chunks.
        slots: (layer, on_gpu) in compute order.
        seg_chunk, seg_slot, seg_frac: the segments, in order: a segment touches ``seg_chunk`` (-1: none)
            and takes ``seg_frac`` of the time of slot ``seg_slot`` (-1: of the whole work's time).
        chunks: every chunk it touches, in order.
        prefetch_chunks: chunks ``WILLNEED`` covers when this window is advised (its own, plus the output
            head's on the head's last window: its shard ends with ``output.weight``).
        gpu_copies: runs GPU layers on a discrete GPU (hidden state copied to VRAM and back).
    """

    window: int
    layers: LayerRange | None
    group: int
    slots: list[tuple[int, bool]] = field(default_factory=list)
    seg_chunk: list[int] = field(default_factory=list)
    seg_slot: list[int] = field(default_factory=list)
    seg_frac: list[float] = field(default_factory=list)
    chunks: list[int] = field(default_factory=list)
    prefetch_chunks: list[int] = field(default_factory=list)
    prefetch_groups: list[int] = field(default_factory=list)
    gpu_copies: bool = False


@dataclass
class DeviceLayout:
    """Chunks and works of one device.

    Attributes:
        chunk_bytes: size of each chunk.
        chunk_group: group of each chunk.
        next_chunk: the chunk that follows in the file (-1 at a window's end): what readahead reads next.
        works: window index -> :class:`Work` (:data:`OUT` for the head's output head).
        load_order: chunks in the order loading reads them (warm start).
        n_groups: number of groups.
        emb_row_chunk_offset: for a tied embedding, byte offset of ``token_embd`` inside the output head's
            chunks (None when the embedding table is separate).
    """

    chunk_bytes: list[int] = field(default_factory=list)
    chunk_group: list[int] = field(default_factory=list)
    next_chunk: list[int] = field(default_factory=list)
    works: dict[int, Work] = field(default_factory=dict)
    load_order: list[int] = field(default_factory=list)
    n_groups: int = 0
    emb_row_chunk_offset: int | None = None

    def _new_chunks(self, sizes: list[int], group: int) -> list[int]:
        ids = []
        for s in sizes:
            ids.append(len(self.chunk_bytes))
            self.chunk_bytes.append(int(s))
            self.chunk_group.append(group)
            self.next_chunk.append(-1)
        for a, b in itertools.pairwise(ids):
            self.next_chunk[a] = b
        return ids

    def chunk_at(self, group_chunks: list[int], offset: int) -> int:
        """The chunk of ``group_chunks`` holding byte ``offset`` of their concatenation (-1 past the end)."""
        pos = 0
        for c in group_chunks:
            pos += self.chunk_bytes[c]
            if offset < pos:
                return c
        return -1


def split_bytes(total: int, chunk_bytes: int) -> list[int]:
    """Cut ``total`` bytes into the fewest pieces of at most ``chunk_bytes``, equal to within one byte."""
    if total <= 0:
        return []
    n = max(1, -(-total // chunk_bytes))
    q, r = divmod(total, n)
    return [q + 1] * r + [q] * (n - r)


def build_layout(
    assignment: DeviceAssignment,
    device: DeviceProfile,
    model: ModelProfile,
    window_index: dict[LayerRange, int],
    is_head: bool,
    chunk_bytes: int,
) -> DeviceLayout:
    """The chunks and works of one device for its assignment.

    Args:
        assignment: the device's windows.
        device: its profile (GPU kind decides what pages).
        model: the model (bytes per layer and of the output head).
        window_index: execution-order index of each of the device's layer ranges.
        is_head: whether it runs the output head.
        chunk_bytes: largest chunk of a CPU layer (see :data:`~prima_sim.sim.config.DEFAULT_CHUNK_BYTES`).
    """
    lay = DeviceLayout()
    mem = behaviour_of(device)
    whole_buffers = mem.whole_window_residency
    has_gpu = mem.has_gpu
    n_layer = model.arch.n_layer
    group = 0
    last_window: int | None = None
    for rng in assignment.layers:
        j = window_index[rng]
        start, end = rng
        g = assignment.gpu_layers_in(rng)
        w = Work(window=j, layers=rng, group=group)
        w.slots = [(i, i >= end - g and has_gpu) for i in range(start, end)]
        w.gpu_copies = g > 0 and has_gpu and mem.host_copy_bps > 0
        if whole_buffers:
            ids = lay._new_chunks([sum(model.layer_bytes[i] for i in range(start, end))], group)
            w.seg_chunk, w.seg_slot, w.seg_frac = [ids[0]], [-1], [1.0]
            w.chunks = ids
        else:
            for s, (i, on_gpu) in enumerate(w.slots):
                if on_gpu:  # VRAM (CUDA and other discrete backends): loaded once, never pages
                    w.seg_chunk.append(-1)
                    w.seg_slot.append(s)
                    w.seg_frac.append(1.0)
                    continue
                b = int(model.layer_bytes[i])
                pieces = split_bytes(b, chunk_bytes)
                if not pieces:
                    w.seg_chunk.append(-1)
                    w.seg_slot.append(s)
                    w.seg_frac.append(1.0)
                    continue
                ids = lay._new_chunks(pieces, group)
                for c, size in zip(ids, pieces, strict=True):
                    w.seg_chunk.append(c)
                    w.seg_slot.append(s)
                    w.seg_frac.append(size / b)
                w.chunks.extend(ids)
            for a_, b_ in itertools.pairwise(w.chunks):  # readahead runs on through the window's file
                lay.next_chunk[a_] = b_
        w.prefetch_chunks = list(w.chunks)
        w.prefetch_groups = [group]
        lay.works[j] = w
        lay.load_order.extend(w.chunks)
        if end == n_layer:
            last_window = j
        group += 1
    if is_head:
        out = Work(window=OUT, layers=None, group=group)
        total = int(model.output_bytes)
        sizes = [total] if whole_buffers else split_bytes(total, chunk_bytes)
        ids = lay._new_chunks(sizes, group)
        out.chunks = ids
        out.seg_chunk = list(ids) if ids else [-1]
        out.seg_slot = [-1] * len(out.seg_chunk)
        out.seg_frac = [s / total for s in sizes] if ids else [1.0]
        out.prefetch_chunks = list(ids)
        out.prefetch_groups = [group]
        lay.works[OUT] = out
        lay.load_order.extend(ids)
        group += 1
        if last_window is not None:
            lay.works[last_window].prefetch_chunks.extend(ids)
            lay.works[last_window].prefetch_groups.append(out.group)
        emb = model.tensor("token_embd.weight")
        if model.tensor("output.weight") is None and emb is not None:
            lay.emb_row_chunk_offset = total - emb.n_bytes  # the tied table ends the output head's range
    lay.n_groups = group
    return lay
