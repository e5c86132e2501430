"""One device of the ring: its compute units, page cache and disk, and the loop that runs its windows.

A device waits for a hidden state, runs the window it is addressed to (and the next ones while they are its
own), sends the result to the owner of the next window and then, as prima.cpp does right after
``llama_send_tensors``, advises the kernel to load its *next own* window (``posix_madvise(WILLNEED)``,
wrapping to the first window of the next token). Nothing is ever released explicitly: the prefetched
chunks enter the page cache as most recently used and push out whatever is least recently used, which may
be chunks the device needs before the prefetched ones (the prefetch-release conflict).

While running a window, each chunk a layer touches is either resident (used, moved to the LRU's end) or
faults: the compute thread stops, the disk reads the chunk (queued behind whatever the disk is already
serving), and on Linux/Android the fault also queues the next chunk as readahead so the disk keeps reading
while the thread computes.

The head also embeds the input tokens (reading each new token's row of the embedding table), runs the
output head after the last window, and samples.

Why one module of this size: the device loop (receive, compute, send, prefetch, page faults) is one SimPy process
whose steps share the device's cache and disk state.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Generator
from typing import Any

import simpy

from prima_sim.devices.behaviour import fit_limit, frozen_active_bytes
from prima_sim.devices.profile import DeviceProfile
from prima_sim.halda.costmodel import (
    ACTIVATION_BYTES_PER_ELEMENT,
    HEADER_BYTES,
    DeviceCosts,
    MemoryUse,
)
from prima_sim.metrics import SpanKind
from prima_sim.plan import DeviceAssignment
from prima_sim.sim.compute import ComputeUnit
from prima_sim.sim.config import PAGE_BYTES, Jitter, component_rng
from prima_sim.sim.disk import DONE, SERVING, BlkThrottle, Disk, Read
from prima_sim.sim.layout import OUT, DeviceLayout, Work
from prima_sim.sim.pagecache import PageCache
from prima_sim.sim.ring import Message, Ring

Proc = Generator[simpy.Event, Any, None]
DISK_WAIT, COMPUTE, HEAD, SEND = SpanKind.DISK_WAIT, SpanKind.COMPUTE, SpanKind.HEAD, SpanKind.SEND
RECV_WAIT, PREFETCH, TRANSFER = SpanKind.RECV_WAIT, SpanKind.PREFETCH, SpanKind.TRANSFER


class _PrefetchBatch:
    """The reads of one WILLNEED advice; its span lasts from the advice to the last read."""

    __slots__ = ("device", "label", "left", "start", "token")

    def __init__(self, device: SimDevice, token: int, label: str, start: float) -> None:
        self.device = device
        self.token = token
        self.label = label
        self.start = start
        self.left = 0

    def finish_one(self) -> None:
        self.left -= 1
        if self.left == 0:
            d = self.device
            d.ring.rec.add(d.name, PREFETCH, self.start, d.env.now, self.token, self.label)


def cache_capacity(costs: DeviceCosts, use: MemoryUse) -> tuple[float, float]:
    """(page-cache room for weights, extra room Android can make by swapping other apps out), in bytes:
    the device's :meth:`~prima_sim.devices.behaviour.MemoryBehaviour.cache_room` once the run's pinned memory
    (KV cache, compute buffers; on unified memory the GPU's too) is placed."""
    return costs.memory.cache_room(use.pinned_ram)


class SimDevice:
    """A device of the ring in the simulation.

    Args:
        ring: the ring it belongs to (clock, settings, recorder, network, route).
        assignment: its windows.
        profile: its device profile.
        costs: its cost model.
        use: its memory needs (cost model).
        layout: its chunks and works.
        is_head: whether it is the head.
        self_eviction: (window index, bytes): the bytes its own prefetch evicts and the window's faults read
            again each time that window runs (:mod:`prima_sim.sim.self_eviction`); None: none.
    """

    def __init__(self, ring: Ring, assignment: DeviceAssignment, profile: DeviceProfile, costs: DeviceCosts,
                 use: MemoryUse, layout: DeviceLayout, is_head: bool,
                 self_eviction: tuple[int, float] | None = None) -> None:  # fmt: skip
        self.self_eviction = self_eviction
        self.ring = ring
        self.env = ring.env
        self.name = assignment.name
        self.assignment = assignment
        self.profile = profile
        self.costs = costs
        self.use = use
        self.layout = layout
        self.is_head = is_head
        cfg = ring.cfg
        cap, growth = cache_capacity(costs, use)
        mem = costs.memory
        near = float(fit_limit(cap + growth, mem.kernel_lru))
        if near + 0.5 < use.mapped_ram <= cap + growth:
            # Linux re-reads weights this close to filling the room (behaviour.NEAR_FIT_MARGIN); the room made by
            # swapping (the last to be made) goes first
            cut = cap + growth - near
            growth, cap = max(0.0, growth - cut), cap - max(0.0, cut - growth)
        mapped = float(sum(layout.chunk_bytes))
        # a capped advice (prima.cpp's one WILLNEED per window) reads next to nothing: such a device pages as
        # one that does not prefetch, unless --force makes its thread read the window itself
        prefetching = (cfg.prefetch and (cfg.willneed_cap_bytes == 0 or cfg.force_touch)
                       and len(assignment.layers) >= 2 and ring.n_devices >= 2)  # fmt: skip
        # drop-behind streaming (exec/stream.py): the chunks of each streamed layer, in order
        self._stream: list[list[int]] = []
        self._ra_next = layout.next_chunk  # what a readahead after each chunk reads (_readahead)
        self._stream_window, self._stream_first = -2, 0
        if cfg.stream and assignment.streamed_layers:
            ((j, work),) = ((j, w) for j, w in layout.works.items() if j != OUT)
            cpu = [s for s, (_, on_gpu) in enumerate(work.slots) if not on_gpu]
            slots = cpu[len(cpu) - assignment.streamed_layers :]
            per: dict[int, list[int]] = {s: [] for s in slots}
            for c, s in zip(work.seg_chunk, work.seg_slot, strict=True):
                if c >= 0 and s in per:
                    per[s].append(c)
            self._stream, self._stream_window, self._stream_first = [per[s] for s in slots], j, slots[0]
            # Readahead stops where a streamed layer begins: the streamer advises each one itself, once the layer
            # before it is released, and the kernel's readahead past a fault (its window, a few hundred KiB; none
            # at all on advised pages) reaches nowhere near a chunk into it. A whole chunk read ahead there would
            # enter the cache before the layer before it leaves: on a blk-throttled disk at once (a slice's
            # budget), pushing a resident layer out of a cache sized for one streamed layer (memory-starved
            # manual-4,4,8: 186 MiB read per token instead of the 130 measured).
            owner = {c: i for i, layer in enumerate(self._stream) for c in layer}
            self._ra_next = [-1 if nxt in owner and owner.get(c) != owner[nxt] else nxt
                             for c, nxt in enumerate(layout.next_chunk)]  # fmt: skip
        frozen = (0.0 if prefetching or self._stream or cfg.page_cache == "lru" else
                  float(frozen_active_bytes(mapped, cap + growth, mem.kernel_lru, mem.fault_bps)))  # fmt: skip
        self.cache = PageCache(self.name, layout.chunk_bytes, layout.chunk_group, max(layout.n_groups, 1), cap, growth,
                               protected_bytes=frozen)  # fmt: skip
        self.swapped_at_start = (max(0.0, use.pinned_ram - (mem.ram_budget_bytes - mem.swap_out_first_bytes))
                                 if mem.swap_out_first_bytes > 0 else 0.0)  # fmt: skip
        slice_s = profile.disk_throttle_slice_s
        self.disk = Disk(self.env, self.name, self._read_starts, self._read_done,
                         BlkThrottle(slice_s) if slice_s else None)  # fmt: skip
        self.cpu = ComputeUnit(
            self.name, "cpu", costs, Jitter(cfg.jitter, component_rng(cfg.seed, f"{self.name}/cpu"))
        )
        self.gpu = (ComputeUnit(self.name, "gpu", costs, Jitter(cfg.jitter, component_rng(cfg.seed, f"{self.name}/gpu")))
                    if profile.gpu is not None else None)  # fmt: skip
        self.sampler = component_rng(cfg.seed, f"{self.name}/sampler")
        self.fault_bps = mem.fault_bps  # sequential on Linux/Android, random on macOS/Windows
        self.prefetch_bps = self.fault_bps  # the same reads through the same mapping (see docs/sim.md)
        self.readahead = cfg.readahead and mem.readahead
        self._pending: dict[int, Read] = {}
        self._ra_marks: set[int] = set()
        self._box: deque[Message] = deque()
        self._wake: simpy.Event | None = None
        self._seen_rows: set[int] = set()
        self.last_done = 0.0
        self.faults = 0
        self.fault_bytes = 0.0
        self.prefetches = 0
        self.ran: set[int] = set()  # windows run so far (the prefetch rule)
        if cfg.warm:
            self.cache.fill(layout.load_order)
        if self._stream:  # what the load read of the streamed layers is released, the first one is advised
            for chunks in self._stream:
                self.cache.release(chunks)
            self._advise_layer(0, 0)
        self._out_s: dict[int, tuple[float, float]] = {}
        self.env.process(self._loop())

    # --- the disk's callbacks ----------------------------------------------------------------------------------
    def _read_starts(self, r: Read) -> bool:
        return r.chunk < 0 or not self.cache.resident(r.chunk)

    def _read_done(self, r: Read) -> None:
        if r.chunk >= 0:
            if self._pending.get(r.chunk) is r:
                del self._pending[r.chunk]
            if r.state == DONE and self.cache.insert(r.chunk, r.prefetch) and r.readahead:
                self._ra_marks.add(r.chunk)
        if r.state == DONE:
            self.ring.count_disk_read(self.name, r.nbytes)
        if r.batch is not None:
            r.batch.finish_one()

    # --- reads -------------------------------------------------------------------------------------------------
    def _fault(self, chunk: int) -> Read:
        """The read a touch of a missing chunk waits for (an in-flight one, or a new demand read)."""
        r = self._pending.get(chunk)
        if r is not None:
            if r.state == SERVING or not r.prefetch:
                return r
            self._withdraw(r)  # queued prefetch: the fault reads it now
        self.faults += 1
        size = self.cache.size[chunk]
        self.fault_bytes += size
        r = Read(chunk, size, self.fault_bps)
        self._pending[chunk] = r
        return self.disk.submit(r)

    def _withdraw(self, r: Read) -> None:
        self.disk.cancel(r)
        if self._pending.get(r.chunk) is r:
            del self._pending[r.chunk]
        if r.batch is not None:
            r.batch.finish_one()
            r.batch = None

    def _readahead(self, chunk: int) -> None:
        """Queue the chunk after ``chunk`` as asynchronous readahead (Linux's sequential readahead)."""
        nxt = self._ra_next[chunk]
        if nxt < 0 or self.cache.resident(nxt):
            return
        r = self._pending.get(nxt)
        if r is not None:
            if r.state == SERVING or not r.prefetch:
                return
            self._withdraw(r)
        r = Read(nxt, self.cache.size[nxt], self.fault_bps, readahead=True)
        self._pending[nxt] = r
        self.disk.submit(r)

    def prefetch(self, window: int, token: int) -> None:
        """``posix_madvise(WILLNEED)`` over a window's chunks.

        The kernel walks the range in order and skips pages that are cached *when it gets to them* (the call
        submits reads as the device queue drains, so its walk is paced by the disk): every chunk not already
        in flight is queued, and a chunk still resident when its turn comes is skipped without cost. A chunk
        resident now may be evicted by the prefetch's own earlier reads before its turn, and is then read
        again: with a window larger than the cache, the prefetch ends with the window's *last* bytes resident.
        """
        work = self.layout.works.get(window)
        if work is None or not work.prefetch_chunks:
            return
        batch = _PrefetchBatch(self, token, f"w{window}", self.env.now)
        cache, pending = self.cache, self._pending
        if not cache.can_evict and all(cache.missing[g] == 0 for g in work.prefetch_groups):
            return  # everything is resident and nothing can ever be evicted: the advice reads nothing
        chunks, partial = self._advised(work)
        if window == self._stream_window:  # its streamed layers are advised one at a time (_layer_done)
            streamed = {c for layer in self._stream for c in layer}
            chunks = [c for c in chunks if c not in streamed]
        self._queue_advised(chunks, batch)
        for c, nbytes in partial:
            # the cap ends inside chunk c: its first bytes are read (disk time) but the chunk stays missing,
            # since the simulator's residency unit is the chunk (an error of under one cap per advice)
            if c not in pending and not cache.resident(c):
                batch.left += 1
                self.disk.submit(Read(-1, nbytes, self.prefetch_bps, prefetch=True, batch=batch))
        if batch.left:
            self.prefetches += 1

    def _queue_advised(self, chunks: list[int], batch: _PrefetchBatch) -> None:
        """Queue a prefetch read of every chunk of ``chunks`` not already in flight (resident ones are skipped
        when their turn comes, :meth:`_read_starts`)."""
        pending, size = self._pending, self.cache.size
        for c in chunks:
            if c in pending:
                continue
            r = Read(c, size[c], self.prefetch_bps, prefetch=True, batch=batch)
            pending[c] = r
            batch.left += 1
            self.disk.submit(r)

    def _advise_layer(self, i: int, token: int) -> None:
        """Advise streamed layer ``i`` (``WILLNEED`` of its chunks), if it exists."""
        if 0 <= i < len(self._stream):
            batch = _PrefetchBatch(self, token, f"stream {i}", self.env.now)
            self._queue_advised(self._stream[i], batch)
            if batch.left:
                self.prefetches += 1

    def _layer_done(self, i: int, token: int) -> None:
        """Streamed layer ``i`` has been computed: release it and advise the next one (the window's first
        streamed layer after its last one), as :class:`prima_sim.exec.stream.LayerStreamer` does."""
        if not 0 <= i < len(self._stream):
            return
        self.cache.release(self._stream[i])
        if i + 1 < len(self._stream):
            self._advise_layer(i + 1, token)
        else:
            self._advise_layer(0, token + 1)

    def _advised(self, work: Work) -> tuple[list[int], list[tuple[int, float]]]:
        """The chunks one advice over ``work`` reads whole, and (chunk, bytes) where a cap ends inside one.

        Without a cap (``SimConfig.willneed_cap_bytes`` = 0) every chunk of the advised range. With one, each
        contiguous range (a page-cache group: the window; the head's output head) is read only up to the cap
        from its start, as ``force_page_cache_ra`` does for one ``madvise(MADV_WILLNEED)`` call.
        """
        cap = self.ring.cfg.willneed_cap_bytes
        if cap <= 0:
            return work.prefetch_chunks, []
        size, group = self.cache.size, self.layout.chunk_group
        whole: list[int] = []
        partial: list[tuple[int, float]] = []
        left = {g: float(cap) for g in work.prefetch_groups}
        for c in work.prefetch_chunks:
            g = group[c]
            room = left.get(g, 0.0)
            if room <= 0:
                continue
            if size[c] <= room:
                whole.append(c)
                left[g] = room - size[c]
            else:
                partial.append((c, room))
                left[g] = 0.0
        return whole, partial

    def force_touch(self, window: int, token: int) -> Proc:
        """prima.cpp's ``--force``: the device's thread reads one byte of every page of ``window`` right after
        advising it, faulting every missing chunk in (with readahead) before it can take its next input."""
        work = self.layout.works.get(window)
        if work is None or not work.chunks:
            return
        env, cache = self.env, self.cache
        t0 = env.now
        for c in work.chunks:
            if cache.resident(c):
                cache.touch(c)
                continue
            r = self._fault(c)
            if self.readahead:
                self._readahead(c)
            yield r.wait(env)
            if cache.resident(c):
                cache.touch(c)
        if env.now > t0:
            self.ring.rec.add(self.name, DISK_WAIT, t0, env.now, token, f"force w{window}")

    # --- running work -----------------------------------------------------------------------------------------
    def _run(self, work: Work, times: list[float], total: float, extra_s: float, token: int, label: str,
             kind: SpanKind) -> Proc:  # fmt: skip
        """Run a window (or the output head): ``times`` per slot, ``total`` for the whole, ``extra_s`` first."""
        env, cache, disk, rec = self.env, self.cache, self.disk, self.ring.rec
        name = self.name
        t0 = env.now
        pending = extra_s
        stream = self._stream if work.window == self._stream_window else None
        first, prev = self._stream_first, -1
        if stream is None and cache.missing[work.group] == 0 and (not disk.active or not cache.can_evict):
            if cache.can_evict:
                cache.touch_all(work.chunks)
                if self._ra_marks:
                    self._ra_marks.difference_update(work.chunks)
            yield env.timeout(pending + total)
            rec.add(name, kind, t0, env.now, token, label)
            return
        resident, touch = cache.resident, cache.touch
        marks, inflight = self._ra_marks, self._pending
        if token == 0 and self.ring.cfg.warm and cache.can_evict and not self.ran - {work.window}:
            # the first window run after the load: llama.cpp's populating load left every resident page mapped
            # and young, this window's and the others' alike, and reclaim takes its victims from both in turn,
            # not only this window's next chunks as an LRU cascade would (docs/sim.md, "first pass")
            cache.spared = frozenset(work.chunks)
        for chunk, slot, frac in zip(work.seg_chunk, work.seg_slot, work.seg_frac, strict=True):
            if stream is not None and slot != prev:
                if prev >= first:  # a streamed layer has been computed: at that moment it is released
                    if pending > 0:
                        yield env.timeout(pending)
                        rec.add(name, kind, t0, env.now, token, label)
                        t0, pending = env.now, 0.0
                    self._layer_done(prev - first, token)
                prev = slot
            dt = frac * (times[slot] if slot >= 0 else total)
            if chunk < 0:
                pending += dt
                continue
            if resident(chunk) and env.now + pending > disk.next_done_s:
                # a read completes (and may evict) before this touch: let time reach the touch first
                yield env.timeout(pending)
                rec.add(name, kind, t0, env.now, token, label)
                t0, pending = env.now, 0.0
            if not resident(chunk):
                r = inflight.get(chunk)
                t_touch = env.now + pending
                # the chunk is being read and arrives after the compute before it ends: nothing else can happen on
                # this device's disk meanwhile, so one wait covers both
                serving = r is not None and r.state == SERVING and r.end_s >= t_touch
                if not serving and pending > 0:
                    # the compute before the touch first: the chunk's read may complete meanwhile (a hit, below)
                    yield env.timeout(pending)
                    rec.add(name, kind, t0, env.now, token, label)
                    t0, pending = env.now, 0.0
            if resident(chunk):
                touch(chunk)
                if chunk in marks:
                    marks.discard(chunk)
                    self._readahead(chunk)
                pending += dt
                continue
            if serving and r is not None:  # (serving implies a read in flight)
                if pending > 0:
                    rec.add(name, kind, t0, t_touch, token, label)
            else:
                t_touch = env.now
                r = self._fault(chunk)
            pending = 0.0
            if self.readahead:
                self._readahead(chunk)
            yield r.wait(env)
            rec.add(name, DISK_WAIT, t_touch, env.now, token, label)
            touch(chunk)
            t0 = env.now
            pending = dt
        cache.spared = frozenset()
        if pending > 0:
            yield env.timeout(pending)
            rec.add(name, kind, t0, env.now, token, label)
        if stream is not None and prev >= first:
            self._layer_done(prev - first, token)

    def run_window(self, j: int, msg: Message) -> Proc:
        """Run window ``j`` for the message's batch (decode-call overhead, copies, layers)."""
        self.ran.add(j)
        work = self.layout.works[j]
        cf = self.cpu.jitter.factor()
        gf = self.gpu.jitter.factor() if self.gpu is not None else 1.0
        n, n_kv = msg.n_tokens, msg.n_kv
        cpu, gpu = self.cpu, self.gpu
        rows = self.ring.row_passes  # passes of several rows (SimConfig.concurrency, speculation)
        times = []
        for layer, on_gpu in work.slots:
            if on_gpu:
                times.append(gpu.layer_s(layer, n, n_kv, rows) * gf)  # type: ignore[union-attr]
            else:
                times.append(cpu.layer_s(layer, n, n_kv, rows) * cf)
        total = sum(times)
        extra = self.profile.decode_overhead_s
        if work.gpu_copies and self.profile.gpu is not None and self.profile.gpu.host_link_bps > 0:
            extra += (
                2
                * ACTIVATION_BYTES_PER_ELEMENT
                * self.costs.model.arch.n_embd
                * n
                / self.profile.gpu.host_link_bps
            )
        extra *= cf
        n_gpu = sum(1 for _, g in work.slots if g)
        cpu.layers_run += len(work.slots) - n_gpu
        cpu.busy_s += extra + sum(t for t, (_, g) in zip(times, work.slots, strict=True) if not g)
        if gpu is not None and n_gpu:
            gpu.layers_run += n_gpu
            gpu.busy_s += sum(t for t, (_, g) in zip(times, work.slots, strict=True) if g)
        if self.self_eviction is not None and self.self_eviction[0] == j:
            # the part of this window its own advice evicted before use: its faults read it again
            t0 = self.env.now
            r = self.disk.submit(Read(-1, self.self_eviction[1], self.fault_bps))
            yield r.wait(self.env)
            self.ring.rec.add(self.name, DISK_WAIT, t0, self.env.now, msg.step, f"w{j}")
        yield from self._run(work, times, total, extra, msg.step, f"w{j}", COMPUTE)

    def output_head(self, msg: Message) -> Proc:
        """The output norm and head for the batch's last token (on the head's CPU); with several sequences
        (``SimConfig.concurrency``), one row of logits for each sequence in the batch."""
        key = msg.n_tokens
        if key not in self._out_s:
            full = self.costs.head_time(msg.n_tokens, 1).total_s
            out = self.costs.head_time(0, 1).total_s
            self._out_s[key] = (out, full - out)
        t = self._out_s[key][0]
        logits = self.ring.logit_rows(msg)
        if logits > 1:
            t += (logits - 1) * self.costs.logits_row_s()
        t *= self.cpu.jitter.factor()
        self.cpu.busy_s += t
        yield from self._run(self.layout.works[OUT], [], t, 0.0, msg.step, "output head", HEAD)

    def embed(self, token_ids: list[int], step: int) -> Proc:
        """Look up the input embedding of ``token_ids``: read new rows from the mapped table, then copy them."""
        env, lay, cache = self.env, self.layout, self.cache
        emb = self.costs.model.tensor("token_embd.weight")
        row = emb.n_bytes / emb.shape[-1] if emb is not None else 0.0
        nbytes = 0
        out = lay.works.get(OUT)
        for tok in token_ids:
            if row <= 0:
                break
            if lay.emb_row_chunk_offset is not None and out is not None:
                c = lay.chunk_at(out.chunks, int(lay.emb_row_chunk_offset + tok * row))
                if c >= 0 and cache.resident(c):
                    continue  # the tied table is the resident output head
            if tok in self._seen_rows:
                continue
            self._seen_rows.add(tok)
            off = int(tok * row)
            first, last = off // PAGE_BYTES, (off + max(1, int(row)) - 1) // PAGE_BYTES
            nbytes += (last - first + 1) * PAGE_BYTES
        if nbytes:
            t0 = env.now
            r = self.disk.submit(Read(-1, nbytes, self.fault_bps))
            yield r.wait(env)
            self.ring.rec.add(self.name, DISK_WAIT, t0, env.now, step, "embed")
        n = len(token_ids)
        if n not in self._out_s:
            full = self.costs.head_time(n, 1).total_s
            out_s = self.costs.head_time(0, 1).total_s
            self._out_s[n] = (out_s, full - out_s)
        t = self._out_s[n][1] * self.cpu.jitter.factor()
        self.cpu.busy_s += t
        t0 = env.now
        yield env.timeout(t)
        self.ring.rec.add(self.name, HEAD, t0, env.now, step, "embed")

    def draft(self, n: int, draft_s: float, step: int) -> Proc:
        """The draft model proposes ``n`` tokens on the head's CPU, ``draft_s`` seconds each (speculation)."""
        t = n * draft_s * self.cpu.jitter.factor()
        self.cpu.busy_s += t
        t0 = self.env.now
        yield self.env.timeout(t)
        self.ring.rec.add(self.name, HEAD, t0, self.env.now, step, "draft")

    def sample(self, step: int, rows: int = 1) -> Generator[simpy.Event, Any, int]:
        """Pick the next token of each of ``rows`` sequences from their logits (one pass over ``n_vocab`` floats
        each); returns one id."""
        m = self.costs.model
        t = rows * m.arch.n_vocab * 4 / self.profile.memory_bandwidth_bps * self.cpu.jitter.factor()
        t0 = self.env.now
        yield self.env.timeout(t)
        self.ring.rec.add(self.name, HEAD, t0, self.env.now, step, "sample")
        return int(self.sampler.integers(0, m.arch.n_vocab))

    # --- the ring ---------------------------------------------------------------------------------------------
    def deliver(self, msg: Message) -> None:
        """A hidden state arrives."""
        self._box.append(msg)
        if self._wake is not None and not self._wake.triggered:
            self._wake.succeed()

    def send(self, dest: str, msg: Message) -> Proc:
        """Send a hidden state to ``dest`` (the SEND span lasts until its last byte is on the link)."""
        ring, env = self.ring, self.env
        nbytes = ACTIVATION_BYTES_PER_ELEMENT * self.costs.model.arch.n_embd * msg.n_tokens + HEADER_BYTES
        t0 = env.now
        link_lane = f"{self.name}->{dest}"

        def arrive(_sent: float) -> None:
            ring.rec.add(link_lane, TRANSFER, t0, env.now, msg.step, f"w{msg.window}")
            ring.deliver(dest, msg)

        yield from ring.net.send(self.name, dest, nbytes, arrive)
        ring.rec.add(self.name, SEND, t0, env.now, msg.step, f"to {dest}")

    def _loop(self) -> Proc:
        env = self.env
        while True:
            if not self._box:
                self._wake = env.event()
                yield self._wake
                self._wake = None
                continue
            yield from self._handle(self._box.popleft())

    def _handle(self, msg: Message) -> Proc:
        ring, env = self.ring, self.env
        since = max(self.last_done, ring.step_start)
        if env.now > since:
            ring.rec.add(self.name, RECV_WAIT, since, env.now, msg.step)
        j = msg.window
        while True:
            if j == ring.n_windows:
                yield from self.output_head(msg)
                self.last_done = env.now
                ring.batch_done()
                return
            yield from self.run_window(j, msg)
            dest = ring.owner(j + 1)
            if dest == self.name:  # consecutive windows here: no hop
                j += 1
                continue
            out = Message(msg.step, j + 1, msg.n_tokens, msg.n_kv)
            yield from self.send(dest, out)
            if ring.cfg.prefetch:
                nxt = ring.prefetch_window(self.name, j, self.ran)
                if nxt is not None:
                    self.prefetch(nxt, msg.step)
                    if ring.cfg.force_touch:
                        yield from self.force_touch(nxt, msg.step)
            self.last_done = env.now
            return

    # --- accounting -------------------------------------------------------------------------------------------
    def stats(self, decode_tokens: int, analytic_disk_bytes: float) -> dict[str, float]:
        """A snapshot of this device's counters after the run (the result's ``device_stats`` entry);
        ``analytic_disk_bytes`` is the cost model's re-read per token, set beside the simulated one."""
        c, disk, p = self.cache, self.disk, self.profile
        dec_bytes = sum(v for (tok, dev), v in self.ring.disk_read.items() if dev == self.name and tok >= 1)
        return {
            "ram_total_bytes": float(p.ram_total_bytes),
            "ram_available_bytes": float(p.ram_available_bytes),
            "pinned_ram_bytes": self.pinned_ram_bytes,
            "memory_pressure": self.pinned_ram_bytes / p.ram_total_bytes if p.ram_total_bytes else 0.0,
            "swapped_out_bytes": self.swapped_at_start + c.swapped_out_bytes,
            "mapped_weight_bytes": c.mapped_bytes,
            "vram_weight_bytes": float(self.use.weights_gpu)
            if not self.costs.memory.gpu_memory_is_ram
            else 0.0,
            "page_cache_capacity_bytes": c.capacity,
            "model_page_cache_peak_bytes": c.peak_used,
            "model_page_cache_end_bytes": c.used,
            "evictions": float(c.evictions),
            "evicted_bytes": c.evicted_bytes,
            "disk_read_bytes": disk.bytes_read,
            "disk_prefetch_bytes": disk.prefetch_bytes,
            "disk_busy_s": disk.busy_s,
            "disk_read_bps": self.fault_bps,
            "wasted_prefetch_bytes": c.wasted_prefetch_bytes,
            "page_faults": float(self.faults),
            "sim_disk_bytes_per_decode_token": dec_bytes / max(1, decode_tokens)
            if decode_tokens
            else math.nan,
            "analytic_disk_bytes_per_token": analytic_disk_bytes,
            "cpu_busy_s": self.cpu.busy_s,
            "gpu_busy_s": self.gpu.busy_s if self.gpu is not None else 0.0,
        }

    @property
    def pinned_ram_bytes(self) -> float:
        """Memory the run pins in this device's RAM (KV cache, compute buffers; GPU ones too with unified memory)."""
        return self.use.pinned_ram
