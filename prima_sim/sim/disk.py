"""The disk of one device: one queue of reads, served one at a time at the read's bandwidth.

Two kinds of reads share it, and therefore compete:

* **demand** reads: a page fault of the compute thread (it waits) and the kernel's sequential readahead that
  a fault triggers (nobody waits yet, the thread will need it next);
* **prefetch** reads: ``posix_madvise(WILLNEED)`` issued after a device sends its activations; the kernel
  queues the whole range and reads it in the background.

Demand reads are served before queued prefetch reads (the block layer favours synchronous reads over
asynchronous ones), but a read in service is never interrupted. Within a kind, reads are first come, first
served. A read is a whole chunk (or a few pages); its time is ``bytes / bandwidth`` at the bandwidth its
device gives it (the cost model's page-fault bandwidth: sequential on Linux/Android, random on macOS).

An emulated device's disk is a cgroup read limit (blk-throttle) over a faster physical disk, and that limit is not
a steady rate: see :class:`BlkThrottle`, which a :class:`Disk` given one serves its reads through.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Callable, Generator
from typing import Any, Protocol

import simpy

QUEUED, SERVING, DONE, CANCELLED = 0, 1, 2, 3


class Batch(Protocol):
    """What a read reports its end to (the device's record of one prefetch advice)."""

    def finish_one(self) -> None:
        """One read of the batch has ended (done or withdrawn)."""


class Read:
    """One read request on a :class:`Disk`.

    Attributes:
        chunk: page-cache chunk it brings in (-1: a small read that is not cached, e.g. an embedding row).
        nbytes: bytes to read.
        bps: bandwidth it is served at.
        prefetch: True for a WILLNEED prefetch (low priority), False for a fault or readahead.
        readahead: brought in by readahead (the next touch triggers the next readahead).
        state: QUEUED, SERVING, DONE or CANCELLED.
        end_s: when its service ends (set when it starts).
    """

    __slots__ = (
        "batch",
        "bps",
        "chunk",
        "done",
        "end_ev",
        "end_s",
        "nbytes",
        "prefetch",
        "readahead",
        "state",
    )

    def __init__(self, chunk: int, nbytes: float, bps: float, prefetch: bool = False, readahead: bool = False,
                 batch: Batch | None = None) -> None:  # fmt: skip
        if nbytes < 0 or bps <= 0:
            raise ValueError(f'"nbytes" must be >= 0 and "bps" > 0, got {nbytes} and {bps}')
        self.chunk = chunk
        self.nbytes = nbytes
        self.bps = bps
        self.prefetch = prefetch
        self.readahead = readahead
        self.batch = batch
        self.state = QUEUED
        self.done: simpy.Event | None = None
        self.end_ev: simpy.Event | None = None
        self.end_s = 0.0

    def wait(self, env: simpy.Environment) -> simpy.Event:
        """An event that fires when the read has finished (or at once if it already has).

        For a read in service it is the disk's own timer: the disk registered first, so the chunk is in the
        page cache before any waiter resumes (one event less per fault).
        """
        if self.state == SERVING and self.end_ev is not None:
            return self.end_ev
        if self.done is None:
            self.done = env.event()
            if self.state in (DONE, CANCELLED):
                self.done.succeed()
        return self.done


JIFFY_S = 0.004
"""One kernel tick at ``CONFIG_HZ=250`` (the emulation host's): the least a throttled bio waits."""


class BlkThrottle:
    """Linux's cgroup read limit (``blkio.throttle.read_bps_device``, ``io.max rbps``), as block/blk-throttle.c of
    Linux 6.x grants it: budget in whole slices, not a steady rate.

    The group keeps a slice ``[start, end]`` and the bytes ``disp`` it let through since ``start``. A bio may pass
    at ``t`` when ``disp + size <= bps * roundup(t - start, slice)`` (an elapsed time of 0 counts as one slice):
    the whole budget of the slice under way is granted at its start. A bio over budget waits until the next slice
    boundary after its excess (at least one tick). When a bio arrives with none queued and the slice has ended
    (``t > end``), a new slice starts at ``t`` with ``disp = 0``; otherwise ``end`` is extended to
    ``roundup(t + slice, slice)`` (aligned to whole slices of the clock). After each dispatch the slice is trimmed:
    once ``rounddown(t - start, slice) >= 2 slices``, ``start`` moves on by that less one slice and ``disp`` drops
    by the budget of the time moved (not below 0). So a group that was idle for more than a slice or two gets a
    whole slice of budget (``bps * slice``, 30 MB at 300 MB/s and 100 ms) at once, and one that paused for less
    finds the budget of its pause still there. The bytes let through go to the physical disk at ``raw_bps``.

    Modelled as a fluid (bios of no size), with continuous time; ``CONFIG_HZ`` only sets the one-tick wait.

    Args:
        slice_s: the throttle slice (``DFL_THROTL_SLICE``: HZ/10 = 100 ms on Linux 6.x, every disk).
        raw_bps: read bandwidth of the physical disk under the limit (0: infinitely fast).
    """

    __slots__ = ("disp", "end", "last_s", "raw_bps", "slice_s", "start")

    def __init__(self, slice_s: float, raw_bps: float = 0.0) -> None:
        if slice_s <= 0 or raw_bps < 0:
            raise ValueError(f'"slice_s" must be > 0 and "raw_bps" >= 0, got {slice_s} and {raw_bps}')
        self.slice_s = slice_s
        self.raw_bps = raw_bps
        self.start = -math.inf
        self.end = -math.inf
        self.disp = 0.0
        self.last_s = -math.inf  # the last dispatch (the throttle's queue is empty after it)

    def _roundup(self, x: float) -> float:
        s = self.slice_s
        k = math.ceil(x / s - 1e-9)
        return k * s

    def read(self, t: float, nbytes: float, bps: float) -> float:
        """A read of ``nbytes`` submitted at ``t`` under a limit of ``bps``: when its last byte is read."""
        s = self.slice_s
        left = float(nbytes)
        done = t  # the physical disk's clock
        t = max(t, self.last_s)  # behind an earlier read's bytes (the throttle's queue is FIFO)
        queued = False
        while True:
            if not queued and not self.start <= t <= self.end:
                self.start, self.end, self.disp = t, t + s, 0.0
            else:
                self.end = max(self.end, self._roundup(t + s))
            elapsed = t - self.start
            rnd = s if elapsed <= 0 else self._roundup(elapsed)
            allowed = bps * rnd
            x = min(left, allowed - self.disp)
            if x > 0:
                self.disp += x
                left -= x
                self.last_s = t
                done = max(done, t) + (x / self.raw_bps if self.raw_bps > 0 else 0.0)
                self._trim(t, bps)
            if left <= 0:
                return done
            queued = True
            # the next bio waits for the slice boundary after its excess (a bio of no size has none), plus at least
            # a tick; reckoned on the slice as trimmed
            elapsed = t - self.start
            t = self.start + (s if elapsed <= 0 else self._roundup(elapsed)) + JIFFY_S

    def _trim(self, t: float, bps: float) -> None:
        s = self.slice_s
        if not self.start <= t <= self.end:
            return
        self.end = self._roundup(t + s)
        e = math.floor((t - self.start) / s + 1e-9) * s
        if e < 2 * s:
            return
        e -= s
        self.disp = max(0.0, self.disp - bps * e)
        self.start += e


class Disk:
    """A device's storage, serving :class:`Read` requests one at a time.

    Args:
        env: the simulation environment.
        name: device name.
        on_start: called when a read is about to be served; returns False to skip it without cost (the chunk
            became resident meanwhile: readahead skips cached pages).
        on_done: called when a read has finished (puts the chunk in the page cache).
        throttle: the disk is a blk-throttle read limit (the read's ``bps``) over a faster disk: its reads take as
            long as :meth:`BlkThrottle.read` says (None: ``nbytes / bps``).
    """

    def __init__(self, env: simpy.Environment, name: str, on_start: Callable[[Read], bool],
                 on_done: Callable[[Read], None], throttle: BlkThrottle | None = None) -> None:  # fmt: skip
        self.env = env
        self.throttle = throttle
        self.name = name
        self._on_start = on_start
        self._on_done = on_done
        self._demand: deque[Read] = deque()
        self._prefetch: deque[Read] = deque()
        self._wake: simpy.Event | None = None
        self.serving: Read | None = None
        self.busy_s = 0.0
        self.bytes_read = 0.0
        self.prefetch_bytes = 0.0
        self.reads = 0
        env.process(self._serve())

    @property
    def active(self) -> bool:
        """Whether a read is in service or queued."""
        return self.serving is not None or bool(self._demand) or bool(self._prefetch)

    @property
    def next_done_s(self) -> float:
        """When the read in service finishes (infinity when idle)."""
        return self.serving.end_s if self.serving is not None else float("inf")

    def submit(self, read: Read) -> Read:
        """Queue a read (demand reads ahead of prefetch reads)."""
        (self._prefetch if read.prefetch else self._demand).append(read)
        if self._wake is not None and not self._wake.triggered:
            self._wake.succeed()
        return read

    def cancel(self, read: Read) -> None:
        """Withdraw a queued read (it will be skipped); a read in service cannot be cancelled."""
        if read.state == QUEUED:
            read.state = CANCELLED
            if read.done is not None and not read.done.triggered:
                read.done.succeed()

    def _serve(self) -> Generator[simpy.Event, Any, None]:
        env = self.env
        demand, prefetch = self._demand, self._prefetch
        while True:
            if demand:
                r = demand.popleft()
            elif prefetch:
                r = prefetch.popleft()
            else:
                self._wake = env.event()
                yield self._wake
                self._wake = None
                continue
            if r.state == CANCELLED:
                continue
            if not self._on_start(r):
                r.state = CANCELLED
                if r.done is not None and not r.done.triggered:
                    r.done.succeed()
                self._on_done(r)
                continue
            if self.throttle is None:
                dt = r.nbytes / r.bps
            else:
                dt = self.throttle.read(env.now, r.nbytes, r.bps) - env.now
            r.state = SERVING
            r.end_s = env.now + dt
            self.serving = r
            r.end_ev = env.timeout(dt)
            yield r.end_ev
            self.serving = None
            self.busy_s += dt
            self.bytes_read += r.nbytes
            self.reads += 1
            if r.prefetch:
                self.prefetch_bytes += r.nbytes
            r.state = DONE
            self._on_done(r)
            if r.done is not None and not r.done.triggered:
                r.done.succeed()
