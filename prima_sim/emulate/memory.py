"""Memory of the emulated devices during a run, sampled from their cgroups.

Memory pressure (docs/metrics.md) is the drop in the memory other applications could use, over the device's
total memory. Page cache is not part of it: the kernel reclaims clean file pages whenever another program
needs memory, and that is exactly the design point of prima.cpp (weights live in the page cache, only the
KV cache and compute buffers are pinned). So for an emulated device::

    memory pressure = peak anonymous memory of the device's processes / the device's memory limit

and the page cache it used is reported beside it.

The sampler reads the cgroups' charge and their processes' anonymous memory every ``SAMPLE_INTERVAL_S``, and
``memory.stat`` only when it starts and stops: reading ``memory.stat`` flushes the cgroup's statistics, which the
kernel's reclaim decides on, and frequent reads change what it keeps (docs/pagecache.md; Group.memory_light).
"""

from __future__ import annotations

import os
import threading
import time
from dataclasses import dataclass, field

from prima_sim.emulate.cgroups import Group

SAMPLE_INTERVAL_S = float(os.environ.get("PRIMA_SIM_SAMPLE_INTERVAL", "0.05"))


@dataclass
class MemoryPeak:
    """Peaks of one device's memory over a run (bytes; ``swap``: the group's memory swapped out)."""

    limit: int = 0
    anon: int = 0
    file: int = 0
    usage: int = 0
    kernel_peak: int = 0
    io_read: int = 0
    samples: int = 0
    oom_kills: int = 0
    cpu_throttled_s: float = 0.0
    swap: int = 0

    @property
    def pressure(self) -> float:
        """Peak anonymous memory over the limit."""
        return self.anon / self.limit if self.limit else float("nan")

    @property
    def page_cache_share(self) -> float:
        """Peak page cache over the limit."""
        return self.file / self.limit if self.limit else float("nan")

    def merge(self, other: MemoryPeak) -> MemoryPeak:
        """The larger of two runs' peaks (I/O summed)."""
        return MemoryPeak(max(self.limit, other.limit), max(self.anon, other.anon), max(self.file, other.file),
                          max(self.usage, other.usage), max(self.kernel_peak, other.kernel_peak),
                          self.io_read + other.io_read, self.samples + other.samples,
                          self.oom_kills + other.oom_kills, self.cpu_throttled_s + other.cpu_throttled_s,
                          max(self.swap, other.swap))  # fmt: skip


@dataclass
class MemorySampler:
    """Samples every group's memory (:meth:`Group.memory_light`) in a background thread between :meth:`start`
    and :meth:`stop`; ``memory.stat`` is read only at those two moments."""

    groups: dict[str, Group]
    interval_s: float = SAMPLE_INTERVAL_S
    device: str | None = None  # the block device whose reads are counted ("MAJ:MIN"; None = all)
    peaks: dict[str, MemoryPeak] = field(default_factory=dict)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None
    timeline: dict[str, list[tuple[float, int, int, int]]] = field(default_factory=dict)
    _io0: dict[str, int] = field(default_factory=dict)
    _oom0: dict[str, int] = field(default_factory=dict)
    _thr0: dict[str, float] = field(default_factory=dict)
    full_stats: dict[str, list[dict[str, int]]] = field(default_factory=dict)
    """Per group: its whole ``memory.stat`` (normalized and raw fields) at :meth:`start` and at :meth:`stop`, the only
    two moments it is read (reading it flushes the statistics reclaim decides on)."""

    def start(self) -> MemorySampler:
        """Reset the kernel's peak counters and start sampling."""
        self.peaks = {n: MemoryPeak() for n in self.groups}
        self.timeline = {n: [] for n in self.groups}
        self.full_stats = {n: [] for n in self.groups}
        for n, g in self.groups.items():
            g.reset_peak()
            self._io0[n] = g.io_read_bytes(self.device)
            self._oom0[n] = g.oom_kills()
            self._thr0[n] = g.cpu_throttled_s()
        self._sample(full=True)
        self._stop.clear()
        self._thread = threading.Thread(target=self._loop, name="memory-sampler", daemon=True)
        self._thread.start()
        return self

    def _sample(self, full: bool = False) -> None:
        for n, g in self.groups.items():
            st = g.memory_stat() if full else g.memory_light()
            if full:
                self.full_stats.setdefault(n, []).append(dict(st))
            self.timeline[n].append(
                (time.time(), st.get("anon", 0), st.get("file", 0), g.io_read_bytes(self.device))
            )
            p = self.peaks[n]
            p.limit = st.get("limit", 0) or p.limit
            p.anon = max(p.anon, st.get("anon", 0))
            p.file = max(p.file, st.get("file", 0))
            p.usage = max(p.usage, st.get("usage", 0))
            p.kernel_peak = max(p.kernel_peak, st.get("peak", 0))
            p.swap = max(p.swap, g.swap_usage())  # memory+swap usage less usage: no statistics flush
            p.samples += 1

    def _loop(self) -> None:
        while not self._stop.is_set():
            self._sample()
            self._stop.wait(self.interval_s)

    def stop(self) -> dict[str, MemoryPeak]:
        """Stop sampling; returns the peaks per device."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        self._sample(full=True)
        for n, g in self.groups.items():
            self.peaks[n].io_read = g.io_read_bytes(self.device) - self._io0.get(n, 0)
            self.peaks[n].oom_kills = g.oom_kills() - self._oom0.get(n, 0)
            self.peaks[n].cpu_throttled_s = g.cpu_throttled_s() - self._thr0.get(n, 0.0)
        return self.peaks

    def io_between(self, device: str, t_a: float, t_b: float) -> float:
        """Bytes ``device`` read from disk between wall-clock times ``t_a`` and ``t_b`` (nearest samples)."""
        tl = self.timeline.get(device, [])
        if not tl:
            return float("nan")

        def at(t: float) -> int:
            best = min(tl, key=lambda x: abs(x[0] - t))
            return best[3]

        return float(at(t_b) - at(t_a))

    def lists_at_stop(self, device: str) -> dict[str, int]:
        """The device's file LRU lists when :meth:`stop` read ``memory.stat`` (``active_file``, ``inactive_file``, in
        bytes; after a run they still hold its page cache) and what changed since :meth:`start`: file refaults
        (``refault_file``, pages) and major faults (``pgmajfault``); {} if ``memory.stat`` was not read twice."""
        st = self.full_stats.get(device, [])
        if len(st) < 2:
            return {}
        a, b = st[0], st[-1]

        def get(d: dict[str, int], key: str) -> int:
            return int(d.get(f"total_{key}", d.get(key, 0)))

        out = {k: get(b, k) for k in ("active_file", "inactive_file")}
        for k, name in (("workingset_refault_file", "refault_file"), ("pgmajfault", "pgmajfault")):
            out[name] = get(b, k) - get(a, k)
        return out

    def anon_peak_between(self, device: str, t_a: float, t_b: float) -> int:
        """Highest anonymous memory sampled between ``t_a`` and ``t_b``."""
        vals = [x[1] for x in self.timeline.get(device, []) if t_a <= x[0] <= t_b]
        return max(vals) if vals else 0


def wait_quiet(seconds: float) -> None:
    """Sleep (a helper so tests can patch it)."""
    time.sleep(seconds)
