"""``prima-sim worker``: one device of the ring.

A worker loads its shards (one llama.cpp context, with its own KV cache, per window), binds its PULL socket,
and then, for every message: checks it (a malformed or foreign message is logged and dropped), runs the
window the message names, sends the result to the owner of the next window, and right after sending advises
the kernel to read ahead the weights of the window it will run next, so that loading overlaps the other
devices' compute (prima.cpp's prefetch). A background thread reports its state, the number of rejected
messages and its measurements to the head every :data:`~prima_sim.exec.ring.HEARTBEAT_INTERVAL_S`.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Sequence
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import zmq

from prima_sim.errors import InputError, WorkerError
from prima_sim.exec import wire
from prima_sim.exec.hosts import Endpoints
from prima_sim.exec.llamacpp import Model, Window, supports_gpu_offload
from prima_sim.exec.manifest import DeviceManifest, shard_path
from prima_sim.exec.pagemap import residency, touch_resident
from prima_sim.exec.ring import (
    HEARTBEAT_INTERVAL_S,
    LINGER_MS,
    STOP_CHECK_MS,
    LatencyTable,
    LinkLatency,
    Prefetcher,
    SpanLog,
    WorkerFailed,
    WorkerIdle,
    WorkerLoading,
    WorkerReady,
    WorkerRunning,
    WorkerState,
    now,
)  # fmt: skip
from prima_sim.exec.stream import LayerStreamer
from prima_sim.exec.transport import open_socket
from prima_sim.metrics import SpanKind
from prima_sim.route import Route
from prima_sim.workload import (
    DEFAULT_UBATCH,  # tokens per prefill message (n_batch); head and workers must agree
)

log = logging.getLogger(__name__)


@dataclass
class LoadedWindow:
    """One window of this device: its shard, model and context."""

    index: int
    path: Path
    model: Model
    ctx: Window
    advise_end: int | None = None  # prefetch stops here: the window's streamed layers are the streamer's


def load_windows(
    shard_dir: Path,
    man: DeviceManifest,
    n_threads: int,
    n_batch: int,
    on_progress: object = None,
    n_seq: int = 1,
    arrays: bool = True,
) -> tuple[dict[int, LoadedWindow], ExitStack]:
    """Load every window shard of ``man`` (not the embedding shard); each context holds ``n_seq`` sequences and
    returns hidden states as numpy arrays (``arrays``, the head) or memoryviews (a worker: :class:`Window`).

    Returns:
        The windows by execution-order index, and the stack that frees them.

    Raises:
        InputError: a shard cannot be loaded.
    """
    plan = man.plan
    stack = ExitStack()
    out: dict[int, LoadedWindow] = {}
    shards = [s for s in man.shards if s.window >= 0]
    # drop-behind streaming of the device's one window (plan.DeviceAssignment.streamed_layers; exec/stream.py)
    streamed = plan.device(man.device).streamed_layers or 0
    gpu = sum(s.gpu_layers for s in shards)
    if gpu and not supports_gpu_offload():
        raise InputError(str(shard_dir), "gpu_layers", f"{man.device}'s windows put {gpu} layer(s) on the GPU but "
                         "this host's llama.cpp build has no GPU backend: install llama-cpp-python built with "
                         "CUDA/Metal/Vulkan here, or make a CPU-only plan ('prima-sim plan --cpu-only')")  # fmt: skip
    try:
        for i, s in enumerate(shards):
            if callable(on_progress):
                on_progress(i, len(shards))
            path = shard_path(shard_dir, man, s)
            model = stack.enter_context(Model(path, n_gpu_layers=s.gpu_layers))
            mode = "logits" if s.kind == "logits" else "hidden"
            streamer = None
            if streamed and model.n_layer:
                streamer = LayerStreamer(path, model.n_layer, streamed, s.gpu_layers, s.layer_data)
                stack.callback(streamer.close)
            ctx = stack.enter_context(
                Window(
                    model, mode, plan.n_ctx, n_batch, n_threads, n_seq=n_seq, arrays=arrays, streamer=streamer
                )
            )
            end = streamer.start_offset if streamer is not None else None
            out[s.window] = LoadedWindow(s.window, path, model, ctx, end)
        warm_up(list(out.values()))
    except BaseException:
        stack.close()
        raise
    return out, stack


WARM_RESIDENT = 0.98
"""A device with several windows is warmed only when this share of each is resident after its load (not paging)."""


def warm_up(windows: Sequence[LoadedWindow]) -> int:
    """Touch every resident page of the windows' mappings (their streamed layers excepted), as llama.cpp's own
    warm-up decode does before a first prompt (:mod:`prima_sim.exec.pagemap`): the first step's compute then runs
    at the speed of every later one. A device with one window is always warmed (what its load left resident is
    what its first step uses); one with several only if every window is resident (``WARM_RESIDENT``). Returns the
    bytes touched."""
    t0 = time.perf_counter()
    if len(windows) > 1:
        for w in windows:
            res, mapped = residency(w.path, w.advise_end)
            if res < WARM_RESIDENT * mapped:
                log.info("not warmed: window %d is %.0f of %.0f MiB resident (its windows page)", w.index,
                         res / 2**20, mapped / 2**20)  # fmt: skip
                return 0
    n = sum(touch_resident(w.path, w.advise_end) for w in windows)
    if n:
        log.info("warmed %.0f MiB of resident weights in %.2f s", n / 2**20, time.perf_counter() - t0)
    return n


class Worker:
    """One non-head device of the ring.

    Args:
        shard_dir: the device's shard directory (holding ``manifest.json``).
        man: its manifest.
        endpoints: where every device listens.
        n_threads: llama.cpp threads for every window.
        prefetch: advise readahead of the next window after sending.
        n_batch: the largest batch a message may carry.
        persist: keep serving after a ``stop`` (for the next head) instead of exiting.
        n_seq: sequences each window's KV cache holds (``prima-sim serve --parallel``; the head checks it).
        link_latency: emulated link latencies ``{receiver: {sender: seconds}}`` the worker adds to what it
            receives (:class:`~prima_sim.exec.ring.LinkLatency`; ``--link-latency``); None: none.
    """

    def __init__(
        self, shard_dir: Path, man: DeviceManifest, endpoints: Endpoints, n_threads: int,
        prefetch: bool = True, n_batch: int = DEFAULT_UBATCH, persist: bool = False, n_seq: int = 1,
        link_latency: LatencyTable | None = None,
    ) -> None:  # fmt: skip
        self.shard_dir, self.man, self.endpoints = shard_dir, man, endpoints
        self.plan = man.plan
        self.device = man.device
        self.fp = man.plan_fingerprint
        if self.plan.fingerprint() != self.fp:
            raise InputError(
                str(shard_dir), "plan_fingerprint", "does not match the plan stored in the manifest"
            )
        if self.device == self.plan.head:
            raise InputError("--device", "", f"{self.device} is the head: run it with 'prima-sim run --real'")
        self.route = Route.of(self.plan)
        self.n_threads, self.n_batch, self.persist = n_threads, min(n_batch, self.plan.n_ctx), persist
        self.n_seq = n_seq
        self.prefetcher = Prefetcher(prefetch)
        self._ran: set[int] = set()  # windows run so far (Route.prefetch_window)
        self.latency = LinkLatency(
            self.device, link_latency
        )  # emulated links (prima_sim.emulate); no-op by default
        self.spans = SpanLog(self.device)
        self.state: WorkerState = WorkerIdle()
        # (step, window) being computed: the heartbeat then says "running" (a tuple, not a state object per window)
        self._busy: tuple[int, int] | None = None
        self.rejected = 0
        self.stopping = threading.Event()
        self.n_embd = 0

    # --- control channel -------------------------------------------------------------------------------------
    def _status(self, kind: Literal["status", "bye"] = "status") -> wire.Status:
        busy = self._busy  # set and cleared by the compute thread without building a state object per window
        state = (
            WorkerRunning(step=busy[0], window=busy[1])
            if busy and isinstance(self.state, WorkerReady)
            else self.state
        )
        return wire.Status(
            type=kind, device=self.device, pid=os.getpid(), fp=self.fp, state=state, rejected=self.rejected,
            n_batch=self.n_batch, n_seq=self.n_seq, spans=tuple(self.spans.drain()),
        )  # fmt: skip

    def _reporter(self, done: threading.Event) -> None:
        sock = open_socket(zmq.PUSH, *self.endpoints.control, bind=False, linger_ms=LINGER_MS)
        try:
            while not done.wait(HEARTBEAT_INTERVAL_S):
                sock.send(wire.encode_status(self._status()))
            sock.send(wire.encode_status(self._status("bye")))
        finally:
            sock.close()

    # --- main loop -------------------------------------------------------------------------------------------
    def run(self) -> int:
        """Serve until a ``stop`` message or :meth:`stop`; returns the exit status.

        Raises:
            WorkerError: the shards could not be loaded or the socket could not be bound.
        """
        done = threading.Event()
        reporter = threading.Thread(target=self._reporter, args=(done,), name="reporter", daemon=True)
        reporter.start()
        stack = ExitStack()
        try:
            self.state = WorkerLoading(loaded=0, total=len(self.route.windows_of(self.device)))
            windows, wstack = load_windows(
                self.shard_dir, self.man, self.n_threads, self.n_batch,
                lambda i, n: setattr(self, "state", WorkerLoading(loaded=i, total=n)), self.n_seq, arrays=False,
            )  # fmt: skip
            stack.push(wstack)
            for w in windows.values():
                self.prefetcher.register(w.path, self.man.shard_for_window(w.index).advise_from)
            stack.callback(self.prefetcher.close)
            self.n_embd = next(iter(windows.values())).model.n_embd
            host, port = self.endpoints.data[self.device]
            try:
                pull = stack.enter_context(open_socket(zmq.PULL, host, port, bind=True, linger_ms=0))
            except zmq.ZMQError as exc:
                raise WorkerError(f"device {self.device} cannot listen on {host}:{port}: {exc}") from None
            push = {
                dest: stack.enter_context(open_socket(zmq.PUSH, *self.endpoints.data[dest], bind=False,
                                                      linger_ms=LINGER_MS))
                for dest in sorted(self.route.destinations(self.device))
            }  # fmt: skip
            self.state = WorkerReady()
            log.info("%s ready: windows %s on %s:%d", self.device, sorted(windows), host, port)
            self._serve(pull, push, windows)
            return 0
        except (InputError, WorkerError, RuntimeError) as exc:
            self.state = WorkerFailed(reason=str(exc))
            raise
        finally:
            stack.close()
            done.set()
            reporter.join(timeout=2 * HEARTBEAT_INTERVAL_S + 1)

    def stop(self) -> None:
        """Ask the main loop to return (from a signal handler or another thread)."""
        self.stopping.set()

    def _serve(self, pull: zmq.Socket, push: dict[str, zmq.Socket], windows: dict[int, LoadedWindow]) -> None:
        # a blocking receive (one system call less than poll-then-receive on every hop) that gives up every
        # STOP_CHECK_MS to look at self.stopping; signals interrupt it too
        pull.setsockopt(zmq.RCVTIMEO, STOP_CHECK_MS)
        last_done = now()
        while not self.stopping.is_set():
            try:
                frames = pull.recv_multipart(copy=False)
            except zmq.Again:
                continue
            t_arrive = now()
            try:
                # memoryviews, not arrays: a worker imports no numpy (docs/exec.md)
                hdr, positions, seqs, hidden = wire.decode_rows(frames, self.fp, self.n_embd, arrays=False)
                if hdr.type == "data" and hdr.window not in windows:
                    raise wire.WireError(f"window {hdr.window} is not run by {self.device}")
                if hdr.type == "data" and hdr.n_tokens > self.n_batch:
                    raise wire.WireError(
                        f"{hdr.n_tokens} tokens exceed this worker's batch of {self.n_batch}"
                    )
                if seqs is not None and max(seqs) >= self.n_seq:
                    raise wire.WireError(
                        f"sequence {max(seqs)} but this worker holds {self.n_seq} (--parallel)"
                    )
            except wire.WireError as exc:  # expected: garbage or a foreign ring must not kill the worker
                self.rejected += 1
                log.warning("%s: rejected a message: %s", self.device, exc)
                continue
            if hdr.type != "data":
                push[self.route.successor(self.device)].send_multipart(frames, copy=False)
                if hdr.type == "stop":
                    log.info("%s: stop received", self.device)
                    if not self.persist:
                        return
                continue
            assert positions is not None and hidden is not None
            t_arrive = self.latency.hold(hdr.origin, t_arrive)  # emulated link latency (prima_sim.emulate)
            waited = (max(last_done, hdr.t_step), t_arrive)
            self._run_data(hdr, positions[0], hidden, positions, push, windows, seqs, waited)
            self._busy = None
            last_done = now()

    def _run_data(self, hdr: wire.Header, pos0: int, hidden: memoryview[Any], positions: memoryview[int],
                  push: dict[str, zmq.Socket], windows: dict[int, LoadedWindow], seqs: memoryview[int] | None,
                  waited: tuple[float, float]) -> None:  # fmt: skip
        """Run the message's window (and this device's windows right after it), send the result on, and only
        then record the spans: nothing but the window's compute lies between receiving and sending."""
        j, h = hdr.window, hidden
        spans = [(SpanKind.RECV_WAIT, *waited, "")]
        while True:
            self._busy = (hdr.step, j)
            t0 = now()
            if seqs is None:
                out = windows[j].ctx.run_hidden(h, pos0)
            else:
                out = windows[j].ctx.run_rows(h, positions, seqs, set())
            t1 = now()
            self._ran.add(j)
            spans.append((SpanKind.COMPUTE, t0, t1, f"w{j}"))
            dest = self.route.owner(j + 1)
            if dest == self.device:  # consecutive windows on this device: no hop
                h, j = memoryview(out.tobytes()).cast("f"), j + 1
                continue
            # copy=False: a large batch's hidden states go from the window's output buffer to the socket uncopied
            # (the buffer is next written when this window runs again, after the message has gone round the ring)
            nh = hdr._replace(window=j + 1, origin=self.device)
            push[dest].send_multipart(wire.encode(nh, positions, out, seqs), copy=False)
            t2 = now()
            spans.append((SpanKind.SEND, t1, t2, f"to {dest}"))
            for kind, a, b, label in spans:
                self.spans.add(kind, a, b, hdr.step, label)
            nxt = self.route.prefetch_window(self.device, j, self._ran)
            if nxt is not None and self.prefetcher.enabled:
                self.prefetcher.advise(windows[nxt].path, windows[nxt].advise_end)
                self.spans.add(SpanKind.PREFETCH, t2, now(), hdr.step, f"w{nxt}")
            return
