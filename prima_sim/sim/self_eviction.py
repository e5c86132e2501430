"""Reads a prefetching Linux device repeats because its own advice evicts them (the kernel model's verdict).

The simulator's device cache is an LRU (:class:`~prima_sim.sim.pagecache.PageCache`). For a device that prefetches
its next window (k >= 2) while its windows do not fit its page cache, an LRU reads every byte once per token: the
advice pushes out the least recently used chunks, which are the windows it ran before. Linux does worse
(reports/emulation.csv, every k >= 2 plan under memory pressure; docs/pagecache.md): pages read ahead and not yet
touched through the mapping are not young, so reclaim takes them before the young pages of the window that just
ran (``folio_check_references`` gives those a second chance). When the advised window is larger than the room the
others leave it, the advice evicts its own first reads, and the window's faults read them again. The head's last
window carries the output head and is the one that overflows: the emulation measured the head reading 1.2-1.3x its
windows per token (e.g. 358 MiB for 275 MiB of windows in 79 MiB of cache) where the LRU reads 1.0x and the
simulator was 20-30% fast.

:class:`~prima_sim.sim.kernel_cache.KernelCache` models that mechanism chunk by chunk and reproduces those reads
(``replay``: 364 against 358 MiB measured there). Running it inside the SimPy loop would cost an order of magnitude
in speed, so the device runs :func:`~prima_sim.sim.kernel_cache.replay_cyclic` once, on its windows' sizes, its room,
its disk and the time the ring leaves between its windows, and the simulator adds the reads the kernel makes beyond
the LRU's one read per byte as demand reads of the window that overflows (:func:`self_eviction_bytes`). The
replay is cached by its (rounded) inputs.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import lru_cache

from prima_sim.sim.kernel_cache import ReplayConfig, replay_cyclic

REPLAY_CHUNK_BYTES = 1 << 20
"""Chunk size of the replay (1 MiB: within 2% of 256 KiB chunks on the emulation's plans, 5x faster)."""
ROOM_SPREAD = (0.95, 1.0, 1.05)
"""Rooms the replay is run at, as fractions of the cost model's; the least of their reads counts. Near the cliff
(the largest window a few percent above the room) the kernel model's reads swing by 1.8x with a few MiB of room,
which the cost model does not know to the MiB (the runtime's own file pages); the emulation's runs there read
about one pass of the windows (logits-overflow k2-1,3,4: 136 MiB for 144), the least of the three."""
REPLAY_TOKENS, REPLAY_WARMUP = 4, 2
"""Decode steps replayed, and how many of them are skipped as warm-up (the steady state is reached by the second)."""


def self_eviction_bytes(window_bytes: Sequence[float], room: float, disk_bps: float, compute_s: float,
                        gap_s: float) -> float:  # fmt: skip
    """Bytes per token a prefetching device reads beyond one read of each of its windows' bytes.

    Args:
        window_bytes: paged bytes of each of the device's windows, in execution order (the head's last window
            with the output head).
        room: page cache its weights have (bytes).
        disk_bps: its read bandwidth (bytes/s).
        compute_s: its compute time of all its windows per token (seconds).
        gap_s: time the ring spends elsewhere between two of its windows (seconds).

    Returns:
        0 when its largest window fits the room, or there is a single window, or the kernel reads no more than
        once. Only a window larger than the room is replayed: that is where the emulation measured the extra
        reads and the replay matches them; with every window below the room the bench_pagecache grid measured
        about one read per byte, which the LRU gives, while the replay can read up to twice as much there (on
        GB-sized windows at 0.8 of the room) without a measurement to back it.
    """
    if not overflows(window_bytes, room) or disk_bps <= 0:
        return 0.0
    total = float(sum(window_bytes))
    mib = float(REPLAY_CHUNK_BYTES)
    key_windows = tuple(max(1, round(w / mib)) for w in window_bytes)
    rates = (round(disk_bps / 1e6), round(total / max(compute_s, 1e-6) / 1e6), round(gap_s * 1e3))
    reads = [_replay_read(key_windows, max(1, round(room * f / mib)), *rates) for f in ROOM_SPREAD]
    return max(0.0, min(reads) - sum(key_windows) * mib)


def overflows(window_bytes: Sequence[float], room: float) -> bool:
    """Whether a device of several windows has one larger than its room: the only case replayed."""
    return len(window_bytes) >= 2 and max(window_bytes) > room + 0.5


@lru_cache(maxsize=4096)
def _replay_read(
    windows_mib: tuple[int, ...], room_mib: int, disk_mbps: int, compute_mbps: int, gap_ms: int
) -> float:
    """Mean bytes read per token by the kernel model (inputs rounded: MiB, MB/s, ms)."""
    cfg = ReplayConfig(disk_bps=disk_mbps * 1e6, compute_bps=max(compute_mbps, 1) * 1e6, gap_s=gap_ms / 1e3,
                       prefetch=True, tokens=REPLAY_TOKENS, warmup=REPLAY_WARMUP)  # fmt: skip
    res = replay_cyclic([w * REPLAY_CHUNK_BYTES for w in windows_mib], room_mib * float(REPLAY_CHUNK_BYTES), cfg,
                        chunk_bytes=REPLAY_CHUNK_BYTES)  # fmt: skip
    return res.mean_read(REPLAY_WARMUP)
