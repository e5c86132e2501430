"""Pieces shared by the head and the workers: lifecycle states, prefetch, span logging, sockets.

Routing (who runs which window, where each message goes next) is :class:`prima_sim.route.Route`, shared with the
simulator.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import Field, NonNegativeFloat, TypeAdapter, ValidationError

from prima_sim.errors import InputError
from prima_sim.metrics import Span, SpanKind
from prima_sim.schema import FrozenModel

log = logging.getLogger(__name__)

HEARTBEAT_INTERVAL_S = 0.25  # how often a worker reports on the control channel
DEFAULT_TIMEOUT_S = 5.0  # a worker silent for this long is declared dead
STARTUP_TIMEOUT_S = 120.0  # every worker must be loaded and on the plan within this time
STEP_TIMEOUT_S = 600.0  # one step (prefill or one token) may take this long while every worker is alive
POLL_SLICE_MS = 20  # granularity of waits outside the hot path (start-up, shutdown)
WAIT_SLICE_MS = 100  # the head's wait for ring data: bounds how late a dead or silent worker is noticed
STOP_CHECK_MS = 200  # a worker's blocking receive gives up this often to see whether it was asked to stop
BYE_TIMEOUT_S = 5.0  # how long the head waits for workers' final measurements at shutdown
LINGER_MS = 1000  # how long a closing socket may keep trying to deliver queued messages


# --- lifecycle -------------------------------------------------------------------------------------------
# A worker's state is a tagged union (the tag is ``name``): the worker holds one of these, and its heartbeat
# carries the same typed value to the head (:class:`prima_sim.exec.wire.Status`), validated on arrival.
class WorkerIdle(FrozenModel):
    """Started, nothing loaded yet."""

    name: Literal["idle"] = "idle"


class WorkerLoading(FrozenModel):
    """Loading its shards."""

    name: Literal["loading"] = "loading"
    loaded: int = Field(ge=0)
    total: int = Field(ge=0)


class WorkerReady(FrozenModel):
    """Shards loaded, waiting for messages."""

    name: Literal["ready"] = "ready"


class WorkerRunning(FrozenModel):
    """Computing a window."""

    name: Literal["running"] = "running"
    step: int = Field(ge=0)
    window: int = Field(ge=0)


class WorkerFailed(FrozenModel):
    """Cannot go on; ``reason`` says why."""

    name: Literal["failed"] = "failed"
    reason: str


WorkerState = Annotated[
    WorkerIdle | WorkerLoading | WorkerReady | WorkerRunning | WorkerFailed, Field(discriminator="name")
]


def describe(state: WorkerState) -> str:
    """One-word state and its detail, for status messages."""
    if isinstance(state, WorkerLoading):
        return f"{state.loaded}/{state.total}"
    if isinstance(state, WorkerRunning):
        return f"step {state.step} window {state.window}"
    if isinstance(state, WorkerFailed):
        return state.reason
    return ""


# --- prefetch ----------------------------------------------------------------------------------------------
class Prefetcher:
    """Advises the kernel to read a shard's tensor data ahead (``posix_fadvise(WILLNEED)``).

    prima.cpp calls ``posix_madvise(WILLNEED)`` on the page-aligned ranges of the next sub-graph's weights in
    its mapping. On Linux ``madvise(MADV_WILLNEED)`` on a file mapping is implemented by the same readahead as
    ``posix_fadvise(POSIX_FADV_WILLNEED)`` on the file (mm/madvise.c -> vfs_fadvise), and llama.cpp does not
    expose its mapping's address, so the file range is advised: the tensor data of the shard the device runs
    next, which is exactly the bytes its mmap will touch. The call is asynchronous (it queues reads).

    Args:
        enabled: False turns every call into a no-op (``--no-prefetch``).
    """

    def __init__(self, enabled: bool = True) -> None:
        self.enabled = enabled and hasattr(os, "posix_fadvise")
        self._fds: dict[Path, tuple[int, int, int]] = {}

    def register(self, path: Path, data_offset: int) -> None:
        """Open ``path`` once so later advice costs one system call."""
        if self.enabled and path not in self._fds:
            fd = os.open(path, os.O_RDONLY)
            self._fds[path] = (fd, data_offset, os.fstat(fd).st_size - data_offset)

    def advise(self, path: Path, end: int | None = None) -> None:
        """Queue readahead of ``path``'s tensor data (up to byte ``end``: a streamed window's resident layers,
        whose streamed layers exec/stream.py advises one at a time)."""
        if not self.enabled or path not in self._fds:
            return
        fd, off, length = self._fds[path]
        if end is not None:
            length = max(0, min(length, end - off))
        # Linux caps one WILLNEED at one readahead window (mm/readahead.c force_page_cache_ra: at most
        # max(read_ahead_kb, max_sectors_kb) per call; 128 KiB on a typical disk), so one call over the whole
        # window reads its first 128 KiB and nothing more. Advise it chunk by chunk (found by prima_sim.emulate:
        # without this, k = 2 with prefetch ran exactly as slowly as k = 1 under memory pressure).
        step = advice_chunk(fd)
        end = off + length
        while off < end:
            n = min(step, end - off)
            os.posix_fadvise(fd, off, n, os.POSIX_FADV_WILLNEED)
            off += n

    def close(self) -> None:
        """Close the files."""
        for fd, _, _ in self._fds.values():
            os.close(fd)
        self._fds.clear()


_ADVICE_CHUNK: dict[int, int] = {}


def advice_chunk(fd: int) -> int:
    """Largest range one WILLNEED reads on the file's block device: max(read_ahead_kb, max_sectors_kb), from
    sysfs (a partition's disk for a partition), 128 KiB when unknown (added for prima_sim.emulate)."""
    dev = os.fstat(fd).st_dev
    if dev not in _ADVICE_CHUNK:
        kib = 0
        base = Path(f"/sys/dev/block/{os.major(dev)}:{os.minor(dev)}")
        for q in (base / "queue", base / ".." / "queue"):
            try:
                kib = max(int((q / "read_ahead_kb").read_text()), int((q / "max_sectors_kb").read_text()))
                break
            except (OSError, ValueError):
                continue
        _ADVICE_CHUNK[dev] = max(16, kib or 128) << 10
    return _ADVICE_CHUNK[dev]


# --- measurements ---------------------------------------------------------------------------------------------
class SpanLog:
    """Spans of one device in wall-clock seconds, appended by the compute thread, drained by the reporter."""

    def __init__(self, device: str) -> None:
        self.device = device
        self._lock = threading.Lock()
        self._items: list[tuple[str, float, float, int, str]] = []

    def add(self, kind: SpanKind, start: float, end: float, step: int, label: str = "") -> None:
        """Record one span."""
        with self._lock:
            self._items.append((kind.value, start, end, step, label))

    def drain(self) -> list[tuple[str, float, float, int, str]]:
        """Take every span recorded so far."""
        with self._lock:
            out, self._items = self._items, []
        return out


def to_spans(device: str, items: list[Any] | tuple[Any, ...], t0: float) -> list[Span]:
    """Spans from wire tuples, with times made relative to ``t0``."""
    return [Span(device, SpanKind(k), s - t0, e - t0, int(tok), lab) for k, s, e, tok, lab in items]


def now() -> float:
    """Wall-clock seconds (comparable across processes on one host, and across NTP-synced hosts)."""
    return time.time()


# --- user-space link latency (added for one-host emulation, prima_sim.emulate; owner: emulation) ---------------
LatencyTable = dict[str, dict[str, float]]
"""Link latencies to add in user space: ``{receiver: {sender: seconds}}``."""

_LATENCY_TABLE: TypeAdapter[dict[str, dict[str, NonNegativeFloat]]] = TypeAdapter(
    dict[str, dict[str, NonNegativeFloat]]
)


def parse_latency_table(text: str, source: str = "--link-latency") -> LatencyTable:
    """The table of a ``--link-latency`` value: JSON ``{receiver: {sender: seconds}}`` ('' or absent: none).

    Raises:
        InputError: it is not a JSON object of objects of non-negative numbers.
    """
    if not text:
        return {}
    try:
        return _LATENCY_TABLE.validate_json(text)
    except ValidationError:
        raise InputError(source, "", "must be a JSON object {receiver: {sender: seconds}}") from None


class LinkLatency:
    """Latency of emulated links, added by the receiver (``prima-sim emulate``; a no-op otherwise).

    On one host the kernel shapes bandwidth, but ``netem`` (which would delay packets) is not always
    available, so the emulation gives the head and every worker the table of link latencies
    (``--link-latency``, passed on to :class:`~prima_sim.exec.head.Head` and :class:`~prima_sim.exec.worker.Worker`),
    and every receiver holds a message from ``sender`` until ``latency`` seconds after it arrived, before
    processing it. In the ring one message is in flight at a time and its receiver is idle waiting for it, so
    this is the same as a link with that latency.

    Args:
        device: the receiver.
        table: ``{receiver: {sender: seconds}}`` (None: no latency).
    """

    def __init__(self, device: str, table: LatencyTable | None = None) -> None:
        self.delay: dict[str, float] = {k: float(v) for k, v in (table or {}).get(device, {}).items()}

    def hold(self, sender: str, t_arrived: float) -> float:
        """Sleep until ``t_arrived`` + the latency of the link from ``sender``; returns the time it ends."""
        d = self.delay.get(sender, 0.0)
        if d <= 0.0:
            return t_arrived
        until = t_arrived + d
        while (left := until - now()) > 0:
            time.sleep(left)
        return now()
