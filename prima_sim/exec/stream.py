"""Drop-behind streaming of a window larger than its device's page cache (``DeviceAssignment.streamed_layers``).

A window mapped through a page cache smaller than itself is scanned cyclically, once per token. Linux's two
LRU lists keep only a part of it (at most the active list's balanced share) and read the rest again every token;
a plain LRU keeps nothing. The executor knows the access pattern exactly, so it manages the cache itself: the
window's first layers stay resident, and each of its last ``streamed_layers`` layers is

* advised (``posix_fadvise(WILLNEED)``, in the pieces one advice can read) as soon as the layer before it is
  released, so the disk reads the whole layer at full speed while its first pages compute (the first streamed
  layer: as soon as the window has run, while the device waits for the next token);
* released right after its compute (``madvise(MADV_DONTNEED)`` on llama.cpp's mapping of it, then
  ``posix_fadvise(DONTNEED)`` on the file: clean pages that nothing maps leave the page cache at once).

So the cache never fills, reclaim never runs, and nothing resident is evicted: a token reads exactly the
streamed layers' bytes (measured in a 200 MiB memory cgroup on a 300 MiB file scanned per "token": 312 MiB per
pass left to the kernel, 160 MiB with the last 160 MiB streamed; docs/exec.md). The hooks run from llama.cpp's
graph-evaluation callback at each streamed layer's output (``l_out-<i>``), between two parts of the graph.

Linux only (``madvise`` through libc, ``/proc/self/maps``); elsewhere the window is left to the page cache.
"""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path

from prima_sim.exec.pagemap import MADV_DONTNEED, PAGE, madvise_fn, mapping_base
from prima_sim.exec.ring import advice_chunk

log = logging.getLogger(__name__)

FOLIO_SLOP = 2 << 20
"""How far beyond a released layer's range the release reaches (within the streamed layers): the largest page-cache
folio readahead makes (a PMD), which the kernel drops only when wholly inside the range."""
_LAYER = re.compile(r"blk\.(\d+)\.")


def layer_ranges(path: Path, n_layer: int) -> list[list[tuple[int, int]]]:
    """Per layer, the ``[start, end)`` file offsets of its tensors' data (``blk.<i>.*``; adjacent ones merged) in
    the GGUF at ``path``. A file need not keep a layer's tensors together (or its layers in order). Reads the
    tensor table (the planner's GGUF reader, imported here only: a shard's manifest says it without)."""
    from prima_sim.devices.gguf_file import read_gguf

    spans: dict[int, list[tuple[int, int]]] = {}
    for t in read_gguf(path).tensors:
        m = _LAYER.match(t.name)
        if m:
            spans.setdefault(int(m.group(1)), []).append((t.offset, t.offset + t.n_bytes))
    missing = [i for i in range(n_layer) if i not in spans]
    if missing:
        raise ValueError(f"{path}: no tensors of layer(s) {missing}")
    return [_merge(spans[i]) for i in range(n_layer)]


def _merge(spans: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """``spans`` sorted, those at most a page apart (alignment padding between tensors) joined."""
    merged: list[tuple[int, int]] = []
    for lo, hi in sorted(spans):
        if merged and lo <= merged[-1][1] + PAGE:
            merged[-1] = (merged[-1][0], max(merged[-1][1], hi))
        else:
            merged.append((lo, hi))
    return merged


class LayerStreamer:
    """Streams the last ``n_streamed`` of a shard's ``n_layer`` layers (see the module's docstring).

    Create it after llama.cpp has mapped the shard. :attr:`watch` maps the graph nodes whose completion
    matters (``l_out-<i>`` of each streamed layer) to their layer; the window calls :meth:`layer_done` there.

    Args:
        path: the shard file (mapped by this process).
        n_layer: its layers.
        n_streamed: how many of its last layers to stream (``1 .. n_layer``).
        n_gpu: of its last layers, how many run on the GPU (never streamed: their weights live in VRAM).
        layer_data: per layer, the ``[start, end)`` of its data (the shard manifest's ``layer_data``); None:
            read from the file's tensor table.

    Raises:
        ValueError: bad counts or a shard without the layers' tensors.
    """

    def __init__(self, path: Path, n_layer: int, n_streamed: int, n_gpu: int = 0,
                 layer_data: tuple[tuple[int, int], ...] | None = None) -> None:  # fmt: skip
        if not 1 <= n_streamed <= n_layer - n_gpu:
            raise ValueError(f"cannot stream {n_streamed} of {n_layer - n_gpu} CPU layers of {path}")
        self.path = path
        self.end = n_layer - n_gpu  # one past the last streamed layer
        self.first = self.end - n_streamed
        if layer_data is not None and len(layer_data) != n_layer:
            raise ValueError(
                f"{path}: the manifest gives {len(layer_data)} layer ranges for {n_layer} layers"
            )
        self.ranges = [[r] for r in layer_data] if layer_data is not None else layer_ranges(path, n_layer)
        self._region = _merge([x for i in range(self.first, self.end) for x in self.ranges[i]])
        self.watch = {f"l_out-{i}".encode(): i for i in range(self.first, self.end)}
        self.fd = os.open(path, os.O_RDONLY)
        self._chunk = advice_chunk(self.fd)
        self._madvise = madvise_fn()
        self.base = mapping_base(path)
        if self.base is None or self._madvise is None:
            log.warning("%s: its mapping was not found: streamed layers are read ahead but left to the page cache",
                        path)  # fmt: skip
        self.dropped_bytes = 0
        # the streamed layers the load read: released now, then the first one advised for the first token
        for i in range(self.first, self.end):
            self._drop(i)
        self._advise(self.first)

    @property
    def start_offset(self) -> int:
        """File offset of the first streamed layer's data: a prefetch of the window's resident part stops here."""
        return self.ranges[self.first][0][0]

    def layer_done(self, i: int) -> None:
        """Layer ``i`` has been computed: release it and advise the next one (after the window's last layer
        its first streamed layer, for the next token)."""
        if not self.first <= i < self.end:
            return
        self._drop(i)
        self._advise(i + 1 if i + 1 < self.end else self.first)

    def _advise(self, i: int) -> None:
        if not self.first <= i < self.end:
            return
        for off, end in self.ranges[i]:
            while off < end:
                n = min(self._chunk, end - off)
                os.posix_fadvise(self.fd, off, n, os.POSIX_FADV_WILLNEED)
                off += n

    def _drop(self, i: int) -> None:
        # The page cache holds large folios (readahead makes them up to 2 MiB on ext4 and others), and
        # POSIX_FADV_DONTNEED skips any folio partly outside its range: a layer's range is widened by FOLIO_SLOP
        # on both sides (its streamed neighbours', released or not yet read, may go) but never beyond the streamed
        # region, so no resident layer loses a page.
        for lo, hi in self.ranges[i]:
            rlo, rhi = next(((a, b) for a, b in self._region if a <= lo and hi <= b), (lo, hi))
            lo = -(-max(rlo, lo - FOLIO_SLOP) // PAGE) * PAGE
            hi = min(rhi, hi + FOLIO_SLOP) // PAGE * PAGE
            if hi <= lo:
                continue
            if self.base is not None and self._madvise is not None:
                self._madvise(self.base + lo, hi - lo, MADV_DONTNEED)
            os.posix_fadvise(self.fd, lo, hi - lo, os.POSIX_FADV_DONTNEED)
            self.dropped_bytes += hi - lo

    def close(self) -> None:
        """Close the file."""
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
