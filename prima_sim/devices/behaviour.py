"""How a device's operating system and GPU treat memory: the one memory model of prima-sim.

Every question about a device's memory is answered here, and only here: how much RAM the model may use
without pushing other applications out, what is pinned and what pages, where GPU layers live and whether
they page, at which bandwidth and in which pattern a page fault reads the disk, what a Metal working set
does when it overflows, what Android swaps out first, how much VRAM a GPU backend keeps for itself, and how
many bytes a device re-reads per token when its weights do not fit. The planner (the integer program's
coefficients, the exact search, :func:`prima_sim.halda.costmodel.predict`), the baselines and the simulator
all read :class:`MemoryBehaviour`; no other module tests an OS or GPU name. A new OS or device kind is one
entry in :func:`behaviour_of` and one test.

The rules, by device kind:

========================  ==========================================================================
Linux (CPU, CUDA, ...)    budget = available RAM; weights are clean file pages in the page cache;
                          faults read at the *sequential* bandwidth with readahead (llama.cpp advises
                          ``POSIX_FADV_SEQUENTIAL``); CUDA/Vulkan/ROCm/SYCL layers are copied into VRAM
                          and never page; the backend keeps a reserve of VRAM free.
Linux with swap           as Linux, and the cold anonymous memory the profile calls ``swappable`` (the
                          executor's runtime and buffers no decode step touches) goes to swap under the
                          weights' page-cache pressure, up to ``min(swappable, swap available)``: that room
                          is part of the budget, as on Android (measured: docs/pagecache.md, "Swap"; the
                          swap-ins a token causes, 0.01-2.4 MiB, are not modelled).
Android (Termux)          as Linux, but before evicting weights the OS swaps other apps out, up to
                          ``min(swappable, swap available)``: that memory is part of the budget.
macOS without Metal       budget = available RAM; faults read at the *random* bandwidth (no readahead
                          on APFS mappings, prima.cpp's measurement).
macOS with Metal          GPU memory *is* RAM: GPU layers' weights, KV cache and buffers count against
                          the same budget, which is the smaller of Metal's free working set and the
                          RAM really available (plus what macOS would swap out). A window is one Metal
                          buffer, resident as a whole or reloaded whole; over the budget every window
                          reloads every token (prima.cpp's Case 2).
Windows                   as Linux without readahead (random bandwidth), for completeness.
========================  ==========================================================================

Paging (:meth:`MemoryBehaviour.reread_bytes`, :func:`reread_fraction`): a device maps ``W`` bytes of weights
and has ``C`` bytes of page cache for them. When everything fits nothing is read while decoding. Otherwise the
ring touches the weights cyclically once per token, and what is read again is what Linux's reclaim decides
(docs/pagecache.md: measured on 140 points and modelled from mm/vmscan.c and mm/workingset.c): near a fit
(``C/W`` above about 0.8) every byte, as an LRU would; further below, about ``1 - (frozen active part)/W``; and
with prefetch of several windows one read per byte, plus part of each window larger than the cache read again
(the advice evicts its own reads: :data:`SELF_EVICTION`). Neither "the overflow only" (prima.cpp) nor "always everything"
(LRU). A Metal working set reloads whole, and macOS without Metal is taken as an LRU (not measured).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from prima_sim.devices.profile import DeviceProfile
from prima_sim.units import MiB

CUDA_RESERVE_BYTES = 700 * MiB
"""VRAM prima.cpp keeps free for a discrete GPU backend's context and scratch (common.cpp, after several
OOM fixes); applies to every discrete GPU kind."""
METAL_RESERVE_BYTES = 300 * MiB
"""The same reserve on Metal."""
MIN_PAGING_DISK_BPS = 0.1e9
"""A disk slower than this is never planned to page weights (prima.cpp's ``min_disk_read_speed``)."""
ArrayOrFloat = float | np.ndarray
GIB = 1 << 30


@dataclass(frozen=True)
class MemoryBehaviour:
    """The memory rules of one device (see the module docstring). All sizes in bytes, rates in bytes/s.

    Attributes:
        name: the device's name (for messages).
        ram_budget_bytes: memory the run may use (weights in the page cache, KV cache, buffers; on unified
            memory the GPU's too) without pushing other applications out.
        swap_out_first_bytes: part of the budget that the OS makes by swapping anonymous memory out first
            (Android: other apps; Linux with swap: the run's own cold memory), before it evicts any weight.
        pinned_budget_bytes: anonymous memory the run can pin at all (available RAM plus swap).
        vram_bytes: free memory of a discrete GPU (0 without one, and on unified memory).
        gpu_reserve_bytes: VRAM (or working set) the GPU backend keeps for itself.
        has_gpu: the device has a GPU backend (its buffers exist even without offloaded layers).
        gpu_memory_is_ram: GPU layers, GPU KV cache and GPU buffers live in RAM (Metal, unified memory).
        gpu_layers_page: GPU layers' weights are file pages that can be evicted and re-read (Metal maps the
            model's pages; a discrete GPU, or another unified-memory GPU backend, holds a copy).
        whole_window_residency: a window is resident or reloaded as a whole (one Metal buffer).
        fault_bps: bandwidth of the reads page faults and prefetch cause.
        readahead: faults also read ahead sequentially (Linux, Android).
        host_copy_bps: RAM<->VRAM copy bandwidth for a window's activations (0: no copies, unified).
        pages_weights: the disk is fast enough to plan weights that page (:data:`MIN_PAGING_DISK_BPS`).
        kernel_lru: the page cache is Linux's two-list LRU (docs/pagecache.md), not a plain LRU.
    """

    name: str
    ram_budget_bytes: int
    swap_out_first_bytes: int
    pinned_budget_bytes: int
    vram_bytes: int
    gpu_reserve_bytes: int
    has_gpu: bool
    gpu_memory_is_ram: bool
    gpu_layers_page: bool
    whole_window_residency: bool
    fault_bps: float
    readahead: bool
    host_copy_bps: float
    pages_weights: bool
    kernel_lru: bool = False

    # --- what a run pins, maps and needs --------------------------------------------------------------------
    def pinned_ram_bytes(
        self, kv_cpu: float, buffers_cpu: float, weights_gpu: float, kv_gpu: float, buffers_gpu: float
    ) -> float:
        """Anonymous RAM a run pins: KV cache and compute buffers, plus the GPU's when its memory is RAM (and
        its layers' weights too when they are copies rather than mapped file pages)."""
        pinned = kv_cpu + buffers_cpu
        if self.gpu_memory_is_ram:
            pinned += kv_gpu + buffers_gpu + (0.0 if self.gpu_layers_page else weights_gpu)
        return pinned

    def mapped_ram_bytes(self, weights_cpu: float, weights_gpu: float, head: float) -> float:
        """Weight bytes that live in the page cache (and may page): CPU layers and the head's output head,
        plus GPU layers when the GPU's memory is RAM."""
        mapped = weights_cpu + head
        if self.gpu_layers_page:
            mapped += weights_gpu
        return mapped

    def vram_need_bytes(self, weights_gpu: float, kv_gpu: float, buffers_gpu: float) -> float:
        """Memory a discrete GPU needs for its layers (0 when the GPU's memory is RAM)."""
        return 0.0 if self.gpu_memory_is_ram else weights_gpu + kv_gpu + buffers_gpu

    def cache_room(self, pinned_ram: float) -> tuple[float, float]:
        """(page-cache room for weights, extra room made by swapping other apps out) once ``pinned_ram`` is
        placed. Android's swap-out room is used only when needed; pinned memory beyond the available RAM
        already takes from it."""
        if self.swap_out_first_bytes <= 0:
            return max(0.0, self.ram_budget_bytes - pinned_ram), 0.0
        base = self.ram_budget_bytes - self.swap_out_first_bytes - pinned_ram
        growth = float(self.swap_out_first_bytes)
        if base < 0:
            growth = max(0.0, growth + base)
            base = 0.0
        return float(base), growth

    def weights_room(self, pinned_ram: float) -> float:
        """All the page cache weights can have once ``pinned_ram`` is placed (swap-out included)."""
        base, growth = self.cache_room(pinned_ram)
        return base + growth

    # --- paging ---------------------------------------------------------------------------------------------
    def reread_fraction(self, mapped: ArrayOrFloat, room: ArrayOrFloat, prefetching: bool | np.ndarray,
                        overflow: ArrayOrFloat) -> ArrayOrFloat:  # fmt: skip
        """Bytes re-read per token over ``mapped`` (:func:`paging_fraction` with this device's rules)."""
        out = paging_fraction(mapped, room, prefetching, overflow, self.kernel_lru, self.fault_bps)
        return float(out) if out.ndim == 0 else out

    def reread_bytes(
        self, mapped: float, room: float, prefetching: bool = False, windows: Sequence[float] = ()
    ) -> float:
        """Bytes re-read from disk per token (:meth:`reread_fraction` x ``mapped``); ``windows``: the mapped bytes of
        each of the device's windows (a prefetching device re-reads part of those larger than the room)."""
        if mapped <= fit_limit(room, self.kernel_lru) + 0.5:
            return 0.0
        overflow = self.overflow_bytes(windows, room) if prefetching else 0.0
        return float(self.reread_fraction(mapped, room, prefetching, overflow)) * mapped

    def overflow_bytes(self, windows: Sequence[float], room: float) -> float:
        """Bytes a prefetching device reads a second time per token because windows exceed its room
        (:func:`overflow_reread_bytes` summed over ``windows``)."""
        return float(np.sum(overflow_reread_bytes(np.asarray(windows, dtype=float), room, self.kernel_lru)))

    @property
    def can_stream(self) -> bool:
        """The executor can stream a window through this OS's page cache with drop-behind
        (``madvise(MADV_DONTNEED)`` and ``posix_fadvise``: Linux, Android)."""
        return self.readahead

    def read_seconds(self, nbytes: float) -> float:
        """Seconds the device's disk needs to read ``nbytes`` through page faults or prefetch."""
        return nbytes / self.fault_bps if nbytes > 0 else 0.0


def behaviour_of(d: DeviceProfile) -> MemoryBehaviour:
    """The memory rules of a device profile (the one place that looks at OS and GPU kinds)."""
    gpu = d.gpu
    metal = gpu is not None and gpu.kind == "metal"
    unified = metal or (gpu is not None and d.unified_memory)
    swap_first = min(d.swappable_bytes, d.swap_available_bytes) if d.os in ("android", "linux") else 0
    if metal:
        assert gpu is not None
        budget = min(gpu.vram_free_bytes, d.ram_available_bytes + d.swappable_bytes)
    else:
        budget = d.ram_available_bytes + swap_first
    sequential = d.os in ("linux", "android")
    fault_bps = d.disk_seq_read_bps if sequential else d.disk_rand_read_bps
    reserve = 0 if gpu is None else (METAL_RESERVE_BYTES if metal else CUDA_RESERVE_BYTES)
    return MemoryBehaviour(
        name=d.name,
        ram_budget_bytes=int(budget),
        swap_out_first_bytes=int(swap_first),
        pinned_budget_bytes=int(d.ram_available_bytes + d.swap_available_bytes),
        vram_bytes=int(gpu.vram_free_bytes) if gpu is not None and not unified else 0,
        gpu_reserve_bytes=reserve,
        has_gpu=gpu is not None,
        gpu_memory_is_ram=unified,
        gpu_layers_page=metal,
        whole_window_residency=metal,
        fault_bps=float(fault_bps),
        readahead=sequential and not metal,
        host_copy_bps=float(gpu.host_link_bps) if gpu is not None and not unified else 0.0,
        pages_weights=fault_bps >= MIN_PAGING_DISK_BPS,
        kernel_lru=sequential and not metal,
    )


# --- Linux's page cache under the ring's cyclic reads (docs/pagecache.md) --------------------------------------
def inactive_ratio(file_lru_bytes: float) -> int:
    """The kernel's target active:inactive ratio of a file LRU of this size (mm/vmscan.c ``inactive_is_low``):
    ``int_sqrt(10 * gb)`` with ``gb`` the whole GiB of the list, 1 below 1 GiB."""
    gb = max(0, int(file_lru_bytes)) >> 30
    return math.isqrt(10 * gb) if gb else 1


OVERSHOOT_S = 0.075
"""Where the cgroup's statistics are read every 0.1 s (``memory.stat``, which flushes them: the bench_pagecache grid),
the load and first decode token deactivate the active list past its balance for about this many seconds of the disk's
reads: fitted on the grid (50-100 ms of reads at 500 MB/s). Pass it as ``overshoot_s`` to predict such runs."""
OVERSHOOT_FRACTION = 0.25
"""Where nothing reads the cgroup's statistics (a real device, the emulation: the kernel flushes them every 2 s), the
overshoot is about this fraction of the bytes the load reclaimed, ``W - C``: the default. Reclaim decides whether to
deactivate on statistics up to 2 s old (``prepare_scan_control``, ``inactive_is_low`` on ``lruvec_page_state``), and
at the end of the load it goes on deactivating until the next flush. Measured without polling (2026-12-07, stock
llama.cpp, one process, 400 MB/s; per repetition, ``/proc/vmstat`` activations less deactivations over the load, and
bytes read per token): the 4.2 GB 8B shape in 2 GiB (W - C = 2006 MiB) kept 418-1443 MiB active of a balanced 1504
(overshoot 61-1086 MiB, mean 553: 0.28 of W - C) and read 2448-3479 MiB per token; the 0.69 GB 1B shape in 384 MiB
(W - C = 315 MiB) overshot about 64 MiB (0.20) and read 501-586, and in 512 MiB (167 MiB) about 0.1-0.2; the grid's
runs polled every 2 s overshot 0.12-0.85 of W - C (median 0.43). Simulated with the polled 0.075 s, the 8B shape read
2487 MiB per token against 2998 measured (-17%), the 1B shape in 384 MiB -14%, in 512 MiB -4%; with this rule -2.4%,
-5.1% and -0.3%, and the 1B shape in 320 MiB, measured after the rule was set, -2.1% (-14% before). The kernel's own
spread at one point is larger than these errors. Capped at :data:`OVERSHOOT_STALE_S` of reads."""
OVERSHOOT_STALE_S = 1.5
"""The longest overshoot, in seconds of the disk's reads, taken where nothing reads the cgroup's statistics: reclaim
acts on statistics at most one flush period (2 s) old, a few hundred ms more when the flush worker runs late; the 8B
shape's long load (5.3 s of reclaim) overshot 0.16-2.86 s, mean 1.45 s."""
NEAR_FIT_MARGIN = 0.02
"""Linux starts re-reading a device's weights before they fill its page cache: weights within this fraction of the
room are paged as at a near fit (every byte re-read per token, about one read with prefetch). Measured in the
emulation (memory cgroups, llama.cpp), free room over the room: 0.02% (0.1 MiB on 457 MiB) read 358 MiB per token
and 1.1% (5 MiB on 440 MiB) 68-108 MiB (the reclaim of the cgroup's other file pages, the runtime's libraries among
them, and its batching); 2.7% (4.6 MiB on prima.cpp's 163.4 MiB windows in 168 MiB, bench_peers larger-than-memory
D1 and D2, 2026-12-07: its 278 MiB per token are the head's alone) and 4-6% (5.4-5.6 MiB on 98-131 MiB) read
0-4 MiB. The margin sits between the last point that paged and the first that did not (1.1% and 2.7%); it was 3%
until the 2.7% point, which then predicted prima.cpp 2.3x too slow there. A planner that packs a device to the
byte of its room gets a plan 2-3x slower than predicted; with the margin it pays for it. Linux only (a kernel
LRU); on real devices of GBs it is also the headroom other programs need."""
SELF_EVICTION = {True: (0.65, 1.0, 0.25), False: (1.0, 1.0, 0.15)}
"""A prefetching device re-reads part of each window larger than its page cache: ``share x clamp((w / C - start) /
span, 0, 1)`` of the window's ``w`` bytes, by kernel (Linux's two-list LRU: True; a plain LRU: False).

Linux: the advice of a window larger than the room evicts its own completed reads (not mapped, not young) before
the young pages of the window that just ran, and the window's faults read them again
(:mod:`prima_sim.sim.self_eviction`). Fitted on the bytes per token measured on every prefetching device of the
emulation suite (19 devices, windows of 33-228 MiB of which the largest is 0.66-1.85x the room: median error 5.6%,
15 of 19 within 10%) and the bench_pagecache grid's 46 prefetch points (equal windows of 98-702 MiB: median
7.6%); the cascade this replaced, ``1 + clamp((largest / C - 0.85) / 0.3, 0, 1)`` of every window, had 36% and
7.7%. From 1.25x the room about 0.65 of a window is read twice, as the kernel model's replay
(:func:`~prima_sim.sim.kernel_cache.replay_cyclic`) also gives (0.4-0.9 at 1.2-2x). Just above the room the
kernel's outcome is chaotic (1.0-1.7 reads per byte in identical runs: docs/pagecache.md); the ramp starts at the
room, not later, so that the planner does not pack windows onto that cliff. A plain LRU re-reads all of a window
larger than the cache (its cyclic scan keeps nothing)."""


def overflow_reread_bytes(
    window: ArrayOrFloat, room: ArrayOrFloat, kernel_lru: bool | np.ndarray
) -> np.ndarray:
    """Bytes a prefetching device reads a second time per token of one window of ``window`` bytes through ``room``
    bytes of page cache (elementwise: :data:`SELF_EVICTION`)."""
    w = np.asarray(window, dtype=float)
    c = np.maximum(np.asarray(room, dtype=float), 1.0)
    lru = np.asarray(kernel_lru)
    share, start, span = (np.where(lru, SELF_EVICTION[True][i], SELF_EVICTION[False][i]) for i in range(3))
    out: np.ndarray = w * share * np.clip((w / c - start) / span, 0.0, 1.0)
    return out


def prefetch_start(kernel_lru: bool | np.ndarray) -> np.ndarray:
    """The largest window, as a fraction of the room, that a prefetching device reads once per token."""
    out: np.ndarray = np.where(np.asarray(kernel_lru), SELF_EVICTION[True][1], SELF_EVICTION[False][1])
    return out


def reread_fraction(cache_ratio: float, k: int = 1, prefetch: bool = False, ws_bytes: float = 1 << 30,
                    window_ratio: float | None = None, disk_bps: float = 500e6,
                    overshoot_s: float | None = None) -> float:  # fmt: skip
    """Bytes a device reads from disk per decode token, as a fraction of its working set (the bytes of its
    windows), under Linux's page cache (two-list LRU, no MGLRU, no swap, llama.cpp's mmap load). The closed form
    of :class:`KernelCache`'s regimes, for the analytic cost model; docs/pagecache.md has the measurements it is
    checked against (the kernel itself varies up to 20-45% between identical runs at some points).

    With ``C`` the page cache the device's windows get and ``W`` their bytes (``cache_ratio = C / W``):

    * ``C >= W`` (less :data:`NEAR_FIT_MARGIN`): 0 (nothing is evicted once loaded).
    * **Prefetch with several windows** (``prefetch`` and ``k > 1``): one read per byte, plus the part of each
      window larger than the cache that the advice evicts before it is used (:data:`SELF_EVICTION`). The largest
      window is ``window_ratio x C`` (default ``W / k``); the other ``k - 1`` share the rest equally.
    * **Near fit** (``C / W >= 2 / (2 + s)``, ``s = R / (R + 1)`` the active share of a balanced cache,
      ``R = inactive_ratio(C)``: 0.8 below 1 GiB, 0.73 at 1-2 GiB): refaults are recent, the active list churns
      and the whole window is read every token: 1.
    * **Below:** the active list freezes after the load and first token, holding its balanced share ``s C`` less
      their overshoot ``o``: ``1 - max(0, s C - o) / W``, ``o = min(OVERSHOOT_FRACTION x (W - C), disk_bps x
      OVERSHOOT_STALE_S)`` (the kernel flushes the cgroup's statistics itself) or ``disk_bps x overshoot_s``
      (given: statistics read that often).

    Args:
        cache_ratio: ``C / W`` (> 0).
        k: windows per device (ring rounds).
        prefetch: the device advises its next window (the executor's rule: only with ``k > 1``).
        ws_bytes: ``W``, the device's windows' bytes (> 0).
        window_ratio: the largest window over ``C`` (default ``W / (k C)``).
        disk_bps: the device's read bandwidth (bytes/s).
        overshoot_s: seconds of reads the load and first token deactivate past the balance, for a cgroup whose
            statistics are read every 0.1 s (:data:`OVERSHOOT_S`, the grid); None (default): a device whose
            statistics only the kernel flushes (:data:`OVERSHOOT_FRACTION`).

    Raises:
        ValueError: a ratio, size or rate is not positive, ``overshoot_s`` is negative or ``k < 1``.
    """
    if not cache_ratio > 0 or not ws_bytes > 0 or not disk_bps > 0 or (overshoot_s or 0.0) < 0 or k < 1:
        raise ValueError(
            '"cache_ratio", "ws_bytes" and "disk_bps" must be > 0, "overshoot_s" >= 0 and "k" >= 1'
        )
    cache = cache_ratio * ws_bytes
    largest = min(ws_bytes, window_ratio * cache) if window_ratio is not None else ws_bytes / k
    rest = [(ws_bytes - largest) / (k - 1)] * (k - 1) if k > 1 else []
    pf = prefetch and k > 1
    overflow = float(np.sum(overflow_reread_bytes(np.asarray([largest, *rest]), cache, True))) if pf else 0.0
    return float(paging_fraction(ws_bytes, cache, pf, overflow, True, disk_bps, overshoot_s))


def frozen_active_bytes(
    mapped: ArrayOrFloat,
    room: ArrayOrFloat,
    kernel_lru: bool | np.ndarray,
    disk_bps: ArrayOrFloat,
    overshoot_s: float | None = None,
) -> np.ndarray:
    """Bytes of a device's weights that Linux keeps resident for good when ``mapped`` bytes are read once per
    token through ``room`` bytes of page cache without prefetch (docs/pagecache.md): below a near fit
    (``room / mapped < 2 / (2 + s)``) the active list freezes after the load and first token at its balanced share
    ``s * room`` less their overshoot: :data:`OVERSHOOT_FRACTION` of ``mapped - room``, at most
    :data:`OVERSHOOT_STALE_S` of reads (statistics flushed by the kernel alone), or ``disk_bps * overshoot_s`` when
    given (statistics read every 0.1 s: :data:`OVERSHOOT_S`); near a fit, or everything fitting, or a plain LRU
    (``kernel_lru`` false): 0."""
    m = np.maximum(np.asarray(mapped, dtype=float), 1.0)
    c = np.maximum(np.asarray(room, dtype=float), 1.0)
    share = _active_share(c)
    bps = np.asarray(disk_bps, dtype=float)
    over = (
        np.minimum(OVERSHOOT_FRACTION * np.maximum(m - c, 0.0), bps * OVERSHOOT_STALE_S)
        if overshoot_s is None
        else bps * overshoot_s
    )
    frozen = np.maximum(0.0, share * c - over)
    out: np.ndarray = np.where(
        np.asarray(kernel_lru) & (m > c + 0.5) & (c / m < 2.0 / (2.0 + share)), frozen, 0.0
    )
    return out


def paging_fraction(mapped: ArrayOrFloat, room: ArrayOrFloat, prefetching: bool | np.ndarray,
                    overflow: ArrayOrFloat, kernel_lru: bool | np.ndarray, disk_bps: ArrayOrFloat,
                    overshoot_s: float | None = None) -> np.ndarray:  # fmt: skip
    """Bytes re-read per token over ``mapped`` (elementwise; numpy broadcasting): ``mapped`` bytes of weights read
    once per token through ``room`` bytes of page cache (the rules of :func:`reread_fraction`).

    ``prefetching``: the device advises its next window while the others work, and reads each byte once plus
    ``overflow`` bytes (:func:`overflow_reread_bytes` of its windows); ``kernel_lru``: Linux's two-list page
    cache (its frozen active part below a near fit), else a plain LRU (a Metal working set, macOS).
    """
    m = np.maximum(np.asarray(mapped, dtype=float), 1.0)
    c = np.maximum(np.asarray(room, dtype=float), 1.0)
    below = 1.0 - frozen_active_bytes(m, c, kernel_lru, disk_bps, overshoot_s) / m
    once = 1.0 + np.maximum(np.asarray(overflow, dtype=float), 0.0) / m
    f = np.where(prefetching, once, below)
    # within NEAR_FIT_MARGIN of the room Linux already re-reads: the near-fit regime (nothing frozen there, so
    # ``below`` is 1; ``once`` is at least 1)
    out: np.ndarray = np.where(m > fit_limit(c, kernel_lru) + 0.5, f, 0.0)
    return out


STREAM_IN_FLIGHT = 1
"""Streamed layers a device holds at once beside its resident layers (drop-behind streaming,
``DeviceAssignment.streamed_layers``): the one being computed (advised as a whole when its predecessor is
released, so the disk reads it at full speed while its first pages compute). Counted at the model's largest layer,
so that the planner's search and its prediction agree whatever the window."""


def streamed_count(mapped: float, fit: float, layer_bytes: Sequence[float], in_flight: float) -> int:
    """How many of a window's last CPU layers (``layer_bytes``, in order) to stream so that the rest of the
    ``mapped`` bytes, plus ``in_flight`` bytes of streamed layers, fit in ``fit`` bytes (:func:`fit_limit` of the
    room); 0 when everything fits, or when even streaming all of them does not make the rest fit (the page cache
    then decides)."""
    need = mapped + in_flight - fit - 0.5
    if mapped <= fit + 0.5:
        return 0
    tail = 0.0
    for t in range(1, len(layer_bytes) + 1):
        tail += layer_bytes[-t]
        if tail >= need:
            return t
    return 0


def streamed_count_prefix(prefix: np.ndarray, row: np.ndarray, start: np.ndarray, end: np.ndarray,
                          mapped: np.ndarray, fit: np.ndarray, in_flight: ArrayOrFloat) -> np.ndarray:  # fmt: skip
    """:func:`streamed_count` elementwise (the planner's search): the CPU layers of each window are ``[start,
    end)`` and ``prefix[row, i]`` the bytes of layers ``[0, i)`` of its device (flat ``prefix``: ``row`` is the
    device's offset into it). A bisection over the count, all windows at once."""
    need = mapped + np.asarray(in_flight, dtype=float) - fit - 0.5
    n = end - start
    top = np.take(prefix, row + end)

    def tail(t: np.ndarray) -> np.ndarray:
        out: np.ndarray = top - np.take(prefix, row + np.maximum(end - t, start))
        return out

    lo, hi = np.ones_like(n), np.maximum(n, 1)  # the answer lies in [lo, hi] where any exists
    while np.any(lo < hi):
        mid = (lo + hi) // 2
        ok = tail(mid) >= need
        hi = np.where(ok, mid, hi)
        lo = np.where(ok, lo, mid + 1)
    out: np.ndarray = np.where((mapped > fit + 0.5) & (n >= 1) & (tail(lo) >= need), lo, 0)
    return out


def fit_limit(room: ArrayOrFloat, kernel_lru: bool | np.ndarray) -> np.ndarray:
    """The most weight bytes a device keeps without re-reading any (elementwise): ``room`` less
    :data:`NEAR_FIT_MARGIN` of it under Linux's page cache, the whole room otherwise."""
    c = np.asarray(room, dtype=float)
    out: np.ndarray = np.where(np.asarray(kernel_lru), c * (1.0 - NEAR_FIT_MARGIN), c)
    return out


def _active_share(cache: np.ndarray) -> np.ndarray:
    """``R / (R + 1)`` with ``R = inactive_ratio(cache)``, elementwise."""
    gb = np.floor(np.maximum(cache, 0.0) / GIB)
    r = np.where(gb >= 1, np.floor(np.sqrt(10 * gb)), 1.0)
    out: np.ndarray = r / (r + 1)
    return out
