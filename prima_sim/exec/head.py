"""The head device: tokenizer, embedding, its own windows, output head, sampling, and the ring's clock.

Per step (the prompt's prefill, in batches of ``n_batch`` tokens, or one generated token) the head embeds the
tokens with its embedding shard, sends the hidden state to the owner of the first window, runs its own
windows as the hidden state comes back (the last window of every round), and samples from the logits of its
logits window (or, when the plan gives the head no window, from its output head). It watches the workers'
heartbeats the whole time: a worker that dies or goes silent for ``timeout`` seconds ends the run with a
:class:`~prima_sim.errors.WorkerError` naming the device.

Why one module of this size: the head is one object on one thread that embeds, runs its windows, samples, speculates
and keeps the ring's clock; its steps share its sockets, contexts and caches (the draft model itself lives in
:mod:`prima_sim.exec.spec`).
"""

from __future__ import annotations

import codecs
import logging
import os
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import zmq

from prima_sim.errors import InputError, WorkerError
from prima_sim.exec import wire
from prima_sim.exec.hosts import Endpoints
from prima_sim.exec.llamacpp import Model, Sampler, Window
from prima_sim.exec.manifest import DeviceManifest, ShardFile, shard_path
from prima_sim.exec.pagemap import fault_in, release_range
from prima_sim.exec.ring import (
    BYE_TIMEOUT_S,
    DEFAULT_TIMEOUT_S,
    LINGER_MS,
    POLL_SLICE_MS,
    STARTUP_TIMEOUT_S,
    STEP_TIMEOUT_S,
    WAIT_SLICE_MS,
    LatencyTable,
    LinkLatency,
    Prefetcher,
    SpanLog,
    WorkerFailed,
    WorkerIdle,
    WorkerReady,
    WorkerRunning,
    WorkerState,
    describe,
    now,
    to_spans,
)  # fmt: skip
from prima_sim.exec.spec import Draft, SpecStats
from prima_sim.exec.token_table import TokenTable, verified_table
from prima_sim.exec.transport import open_socket
from prima_sim.exec.worker import LoadedWindow, load_windows
from prima_sim.metrics import Span, SpanKind
from prima_sim.route import Route
from prima_sim.workload import DEFAULT_UBATCH

EMBED_CHUNK = 32
"""Tokens the head embeds per llama.cpp call. Its embedding context runs on the logits window's model (or on
embed.gguf), whose every layer gets a KV cache as large as the context, although the graph stops before the first
layer: a small context keeps that memory small (with the full 512-token batch it was 11 MiB on a 1B-shape head of 11
layers, enough to push a window that fit into Linux's near-fit re-reads)."""

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SamplingParams:
    """How the next token is chosen: greedy when ``temperature <= 0``."""

    temperature: float = 0.0
    top_k: int = 40
    top_p: float = 0.95
    seed: int = 0


@dataclass
class Generation:
    """What one prompt produced, and the measurements of the run so far."""

    prompt_tokens: list[int]
    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    stop_reason: str = "length"
    logits: list[np.ndarray] = field(default_factory=list)
    steps: list[tuple[int, str, int, float, float]] = field(default_factory=list)
    t0: float = 0.0
    spec: SpecStats | None = None  # what speculative decoding did (with a draft model)


@dataclass
class _Peer:
    """What the head knows about one worker from its heartbeats."""

    last_seen: float = 0.0
    state: WorkerState = field(default_factory=WorkerIdle)
    fp: str = ""
    pid: int = 0
    rejected: int = 0
    n_batch: int = 0
    n_seq: int = 1
    bye: bool = False
    spans: list[tuple[str, float, float, int, str]] = field(default_factory=list)


class Head:
    """The head of a ring.

    Args:
        shard_dir: the head's shard directory.
        man: its manifest.
        endpoints: addresses of every device and of the head's control socket.
        n_threads: llama.cpp threads.
        prefetch: advise readahead of the next own window after sending.
        n_batch: prefill batch (tokens per message).
        timeout: seconds of silence after which a worker is declared dead.
        step_timeout: seconds one step may take while every worker is alive.
        check_alive: called while waiting; raises :class:`WorkerError` when a local worker process is gone.
        n_seq: sequences every window's KV cache holds (``prima-sim serve --parallel``; :meth:`step_rows`).
        link_latency: emulated link latencies ``{receiver: {sender: seconds}}`` the head adds to what it
            receives (:class:`~prima_sim.exec.ring.LinkLatency`; ``prima-sim emulate``); None: none.
    """

    def __init__(
        self, shard_dir: Path, man: DeviceManifest, endpoints: Endpoints, n_threads: int, prefetch: bool = True,
        n_batch: int = DEFAULT_UBATCH, timeout: float = DEFAULT_TIMEOUT_S, step_timeout: float = STEP_TIMEOUT_S,
        check_alive: Callable[[], None] | None = None, n_seq: int = 1, link_latency: LatencyTable | None = None,
    ) -> None:  # fmt: skip
        self.shard_dir, self.man, self.endpoints = shard_dir, man, endpoints
        self.n_seq = n_seq
        self.plan = man.plan
        self.fp = man.plan_fingerprint
        self.route = Route.of(self.plan)
        self.device = self.plan.head
        self.workers = [d for d in self.route.ring if d != self.device]
        self.n_threads, self.n_batch = n_threads, min(n_batch, self.plan.n_ctx)
        self.timeout, self.step_timeout = timeout, step_timeout
        self.check_alive = check_alive or (lambda: None)
        self.prefetcher = Prefetcher(prefetch)
        # PRIMA_SIM_EMBED=window: embed with the 0-layer window even where the table lookup is exact (an A/B knob)
        self.embed_by_window = os.environ.get("PRIMA_SIM_EMBED", "") == "window"
        self.table: TokenTable | None = None
        self._ran: set[int] = set()  # windows run so far (Route.prefetch_window)
        self.latency = LinkLatency(
            self.device, link_latency
        )  # emulated links (prima_sim.emulate); no-op by default
        self.spans = SpanLog(self.device)
        self.peers: dict[str, _Peer] = {w: _Peer() for w in self.workers}
        self._stack = ExitStack()
        self._seq = 0
        self.windows: dict[int, LoadedWindow] = {}
        self.started = False
        self.closing = False  # close() has begun: a worker's 'bye' is expected from now on
        self._kept: list[Span] = []  # every span all_spans() has returned (it returns them all again)
        self.draft: Draft | None = None  # speculative decoding (use_draft)
        self.draft_max = 0

    # --- start-up ----------------------------------------------------------------------------------------------
    def load(self) -> None:
        """Load the head's shards (embedding, own windows, output head) and open the sockets.

        Raises:
            InputError: a shard cannot be loaded.
            WorkerError: a socket cannot be bound.
        """
        emb = self.man.shard_of_kind("embed")
        self.out_ctx: Window | None = None
        if emb is not None:  # the head does not run the last layer: embed.gguf embeds and is the output head
            self.embed_model = self._stack.enter_context(Model(shard_path(self.shard_dir, self.man, emb)))
            if emb.output_head:
                self.out_ctx = self._stack.enter_context(
                    Window(
                        self.embed_model, "logits", self.n_batch, self.n_batch, self.n_threads, stateless=True
                    )
                )
        self.windows, wstack = load_windows(
            self.shard_dir, self.man, self.n_threads, self.n_batch, n_seq=self.n_seq
        )
        self._stack.push(wstack)
        if emb is None:  # the logits window's shard holds the token table: it embeds too (one copy mapped)
            emb = self.man.shard_of_kind("logits")
            assert emb is not None, "the head's manifest has neither an embedding nor a logits shard"
            self.embed_model = self.windows[emb.window].model
        # stateless (cleared every call) and small: it stops at the first norm's input, so its KV cache (one per
        # layer of the model it runs on) only has to hold one call's tokens
        self.embed = self._stack.enter_context(
            Window(self.embed_model, "embed", EMBED_CHUNK, EMBED_CHUNK, self.n_threads)
        )
        # the same rows read straight from the table when that is bit-identical to the window (token_table.py)
        self.table = (
            None
            if self.embed_by_window
            else verified_table(self.embed_model.path, emb.token_table, self.embed)
        )
        if self.table is not None:
            self._stack.callback(self.table.close)
        self._give_back_table(shard_path(self.shard_dir, self.man, emb), emb)
        for w in self.windows.values():
            self.prefetcher.register(w.path, self.man.shard_for_window(w.index).advise_from)
        self._stack.callback(self.prefetcher.close)
        self.n_embd = self.embed_model.n_embd
        if self.workers:
            self._open_sockets()

    @staticmethod
    def _give_back_table(path: Path, shard: ShardFile) -> None:
        """Give the token table's pages back to the window after the load (a separate output head only: a tied
        one is the table). llama.cpp's load reads the whole shard, the table too, and a head whose weights nearly
        fill its memory then starts with part of its window evicted in the table's favour, of which a step reads
        a row or two (measured in a 512 MiB cgroup: the 57 MB table resident, the 83 MB output head 16%; the first
        prompt re-read it). The table leaves the page cache (its rows fault back one page each:
        :class:`~prima_sim.exec.token_table.TokenTable`), and as many of the window's missing bytes as it held are
        read back now, at load, where a device that fits gets its whole window back (what the simulator's warm
        start assumes) and a paging one no more than the room the table took."""
        if shard.token_table is None or shard.prefetch_offset is None:
            return
        freed = release_range(path, shard.token_table.offset, shard.prefetch_offset)
        if not freed:
            return
        back = fault_in(path, shard.prefetch_offset, freed)
        log.info("gave the token table's %.0f MiB back; read %.0f MiB of the window back", freed / 2**20,
                 back / 2**20)  # fmt: skip

    def use_draft(self, path: Path, draft_max: int, source: str = "--draft") -> None:
        """Load a draft model for speculative decoding (greedy generation proposes up to ``draft_max`` tokens per
        step with it; :mod:`prima_sim.exec.spec`). Call after :meth:`load`.

        Raises:
            InputError: the draft cannot be loaded, its vocabulary is not the model's, or ``draft_max`` does
                not fit the batch.
        """
        if not 1 <= draft_max < self.n_batch:
            raise InputError("--draft-max", "", f"must be 1..{self.n_batch - 1} (one verification pass carries the "
                             f"drafts and the last token in one batch of --batch {self.n_batch}), got {draft_max}")  # fmt: skip
        draft = self._stack.enter_context(
            Draft(path, self.plan.n_ctx, self.n_batch, self.n_threads, source, self.n_seq)
        )
        draft.check_vocab(self.embed_model)
        self.draft, self.draft_max = draft, draft_max

    def _open_sockets(self) -> None:
        pulls: list[zmq.Socket[Any]] = []
        for (host, port), what in (
            (self.endpoints.data[self.device], "data"),
            (self.endpoints.control, "control"),
        ):
            try:
                pulls.append(
                    self._stack.enter_context(open_socket(zmq.PULL, host, port, bind=True, linger_ms=0))
                )
            except zmq.ZMQError as exc:
                raise WorkerError(
                    f"head {self.device} cannot listen for {what} on {host}:{port}: {exc}"
                ) from None
        self.pull, self.control = pulls
        self.push: dict[str, zmq.Socket[Any]] = {}
        for dest in sorted(self.route.destinations(self.device)):
            host, port = self.endpoints.data[dest]
            self.push[dest] = self._stack.enter_context(
                open_socket(zmq.PUSH, host, port, bind=False, linger_ms=LINGER_MS)
            )
        self.poller = zmq.Poller()
        self.poller.register(self.pull, zmq.POLLIN)
        self.poller.register(self.control, zmq.POLLIN)

    def barrier(self, startup_timeout: float = STARTUP_TIMEOUT_S) -> None:
        """Wait until every worker is loaded and on this plan, then pass a ``hello`` round the ring.

        Raises:
            WorkerError: a worker runs another plan, failed, died, or did not answer in time.
        """
        if not self.workers:
            self.started = True
            return
        deadline = now() + startup_timeout
        while not all(isinstance(p.state, WorkerReady) for p in self.peers.values()):
            self._wait(deadline, lambda: self._missing(f"did not report ready within {startup_timeout:g} s"))
        for w, p in self.peers.items():
            if p.n_batch < self.n_batch:
                raise WorkerError(
                    f"device {w} takes batches of up to {p.n_batch} tokens but the head sends {self.n_batch}: "
                    f"start both with the same --batch"
                )
            if p.n_seq < self.n_seq:
                raise WorkerError(
                    f"device {w} holds {p.n_seq} sequence(s) per window but the head serves {self.n_seq}: "
                    f"start it with --parallel {self.n_seq}"
                )
        seq = self._next_seq()
        self.push[self.route.successor(self.device)].send_multipart(
            wire.encode(wire.Header(type="hello", fp=self.fp, seq=seq, origin=self.device))
        )
        hdr = None
        while hdr is None or hdr.type != "hello" or hdr.seq != seq:
            hdr, _, _ = self._recv(deadline, lambda: "the start-up 'hello' did not come back round the ring")
        self.started = True

    def _missing(self, what: str) -> str:
        late = [w for w, p in self.peers.items() if not isinstance(p.state, WorkerReady)]
        where = ", ".join(f"{w} at {self.endpoints.url(w)}" for w in late)
        return (
            f"device(s) {where} {what} (is 'prima-sim worker --device NAME' running there with these shards?)"
        )

    # --- waiting -----------------------------------------------------------------------------------------------
    def _next_seq(self) -> int:
        self._seq += 1
        return self._seq

    def _on_status(self, frame: object) -> None:
        try:
            st = wire.decode_status(frame)
        except wire.VersionError as exc:  # one of the ring's devices runs another release: say so at once
            if exc.device in self.peers:
                raise WorkerError(
                    f"device {exc.device} speaks wire protocol version {exc.version}, this head speaks "
                    f"{wire.WIRE_VERSION}: run the same prima-sim release on every device"
                ) from None
            log.warning("head: rejected a control message: %s", exc)
            return
        except wire.WireError as exc:  # expected: stray traffic on the control port is ignored
            log.warning("head: rejected a control message: %s", exc)
            return
        p = self.peers.get(st.device)
        if p is None:
            log.warning("head: status from unknown device %r ignored", st.device)
            return
        p.last_seen, p.state, p.fp, p.pid = now(), st.state, st.fp, st.pid
        p.rejected, p.n_batch, p.n_seq = st.rejected, st.n_batch, st.n_seq
        p.spans.extend(st.spans)
        p.bye = p.bye or st.type == "bye"
        if st.fp != self.fp:
            raise WorkerError(
                f"device {st.device} runs plan {st.fp} but the head runs plan {self.fp}: "
                f"give it the shards of this plan ('prima-sim shard') and restart it"
            )
        if isinstance(st.state, WorkerFailed):
            raise WorkerError(f"device {st.device} failed: {st.state.reason}")
        if st.type == "bye" and not self.closing:
            raise WorkerError(f"device {st.device} left the ring (it stopped before the head did)")

    def _check_liveness(self) -> None:
        self.check_alive()
        t = now()
        for w, p in self.peers.items():
            if p.last_seen and t - p.last_seen > self.timeout and not p.bye:
                last = f"{p.state.name} {describe(p.state)}".rstrip()
                raise WorkerError(
                    f"device {w} ({self.endpoints.url(w)}) stopped answering: no heartbeat for "
                    f"{t - p.last_seen:.1f} s (timeout {self.timeout:g} s; last state: {last})"
                )

    def _wait(
        self, deadline: float, why: Callable[[], str], slice_ms: int = POLL_SLICE_MS
    ) -> zmq.Socket | None:
        """Wait one poll slice; handle control messages; raise on death or deadline. Returns the data
        socket when a data message is waiting."""
        events = dict(self.poller.poll(slice_ms))
        while self.control in events:
            self._on_status(self.control.recv(copy=False))
            events = dict(self.poller.poll(0))
        if self.pull in events:  # the ring moves: liveness is checked when a wait runs out instead
            return self.pull
        self._check_liveness()
        if now() > deadline:
            raise WorkerError(why())
        return None

    def _recv(
        self, deadline: float, why: Callable[[], str]
    ) -> tuple[wire.Header, np.ndarray | None, np.ndarray | None]:
        # Every wake-up of the head costs the device computing now (on one shared CPU, directly): wait in
        # slices of WAIT_SLICE_MS (heartbeats wake it four times a second per worker anyway, and every wake-up
        # checks liveness), not POLL_SLICE_MS
        while True:
            if self._wait(deadline, why, WAIT_SLICE_MS) is None:
                continue
            frames = self.pull.recv_multipart(copy=False)
            t_arrived = now()
            try:
                msg = wire.decode(frames, self.fp, self.n_embd)
                self.latency.hold(msg[0].origin, t_arrived)  # emulated link latency (prima_sim.emulate)
                return msg
            except wire.WireError as exc:  # expected: stray or foreign traffic on the data port
                log.warning("head: rejected a message: %s", exc)

    def _holder(self) -> str:
        busy = [w for w, p in self.peers.items() if isinstance(p.state, WorkerRunning)]
        return (
            f"; device {busy[0]} is still computing ({describe(self.peers[busy[0]].state)})" if busy else ""
        )

    # --- one step ---------------------------------------------------------------------------------------------
    def step_rows(
        self, tokens: list[int], positions: np.ndarray, seqs: np.ndarray, out_rows: set[int], step: int = 0
    ) -> Window:
        """Run one batch that mixes several sequences (row ``i``: ``tokens[i]`` of sequence ``seqs[i]`` at
        ``positions[i]``) through the whole model; returns the window holding the logits of ``out_rows``
        (:meth:`Window.logits_at`, :meth:`Sampler.sample` with the row)."""
        return self._step(tokens, int(positions[0]), step, now(), (positions, seqs, out_rows))

    def _embed(self, tokens: list[int]) -> np.ndarray:
        """The layer-0 input of ``tokens``: rows of the token table, or embedded by the window :data:`EMBED_CHUNK`
        tokens per call."""
        if self.table is not None:
            return self.table.rows(tokens)
        if len(tokens) <= EMBED_CHUNK:
            return self.embed.run_tokens(tokens, 0)
        return np.concatenate([self.embed.run_tokens(tokens[i : i + EMBED_CHUNK], 0).copy()
                               for i in range(0, len(tokens), EMBED_CHUNK)])  # fmt: skip

    def _step(
        self, tokens: list[int], pos0: int, step: int, t_step: float,
        rows: tuple[np.ndarray, np.ndarray, set[int]] | None = None,
    ) -> Window:  # fmt: skip
        """Run ``tokens`` at ``pos0`` (or as ``rows``: positions, sequence ids, output rows) through the whole
        model; returns the window holding the logits."""
        n = len(tokens)
        t0 = now()
        h: np.ndarray = self._embed(tokens)
        self.spans.add(SpanKind.HEAD, t0, now(), step, "embed")
        positions = np.arange(pos0, pos0 + n, dtype=np.int32) if rows is None else rows[0]
        seqs = None if rows is None else rows[1]
        j, seq = 0, self._next_seq()
        deadline = now() + self.step_timeout
        waited: tuple[float, float] | None = None  # the last receive-wait, recorded after the compute it fed
        while True:
            owner = self.route.owner(j)
            if j == self.route.n_windows:  # the head runs only the output head
                assert self.out_ctx is not None
                t0 = now()
                if rows is None:
                    self.out_ctx.run_hidden(h, pos0)
                else:
                    self.out_ctx.run_rows(h, *rows)
                self.spans.add(SpanKind.HEAD, t0, now(), step, "output head")
                if waited:
                    self.spans.add(SpanKind.RECV_WAIT, *waited, step)
                return self.out_ctx
            if owner == self.device:
                win = self.windows[j]
                t0 = now()
                h = win.ctx.run_hidden(h, pos0) if rows is None else win.ctx.run_rows(h, *rows)
                self._ran.add(j)
                self.spans.add(SpanKind.COMPUTE, t0, now(), step, f"w{j}")
                if waited:
                    self.spans.add(SpanKind.RECV_WAIT, *waited, step)
                    waited = None
                if win.ctx.mode == "logits":
                    return win.ctx
                j += 1
                continue
            t1 = now()
            hdr = wire.Header(type="data", fp=self.fp, seq=seq, step=step, window=j, n_tokens=n,
                              shape=(n, self.n_embd), origin=self.device, t_step=t_step, rows=rows is not None)  # fmt: skip
            self.push[owner].send_multipart(wire.encode(hdr, positions, h, seqs), copy=False)
            t2 = now()
            self.spans.add(SpanKind.SEND, t1, t2, step, f"to {owner}")
            nxt = self.route.prefetch_window(self.device, j - 1, self._ran)
            if nxt is not None and self.prefetcher.enabled:
                self.prefetcher.advise(self.windows[nxt].path, self.windows[nxt].advise_end)
                self.spans.add(SpanKind.PREFETCH, t2, now(), step, f"w{nxt}")
            t_wait = now()
            while True:
                rh, _, hidden = self._recv(deadline, lambda: f"step {step} took longer than {self.step_timeout:g} s"
                                           + self._holder())  # fmt: skip
                if (
                    rh.type == "data"
                    and rh.seq == seq
                    and (rh.window == self.route.n_windows or rh.window in self.windows)
                ):
                    break
                log.warning("head: dropped a stale %s message (seq %d, expected %d)", rh.type, rh.seq, seq)
            waited = (t_wait, now())
            assert hidden is not None
            h, j = hidden, rh.window

    # --- generation ------------------------------------------------------------------------------------------
    def tokenize(self, text: str, chat: bool = False) -> list[int]:
        """Token ids of a prompt (through the model's chat template with ``chat``)."""
        if chat:
            return self.embed_model.tokenize(
                self.embed_model.chat_prompt(text), add_special=True, parse_special=True
            )
        return self.embed_model.tokenize(text)

    def generate(
        self, prompt_tokens: list[int], n_predict: int, sampling: SamplingParams = SamplingParams(),
        on_text: Callable[[str], None] | None = None, keep_logits: bool = False, ignore_eos: bool = False,
    ) -> Generation:  # fmt: skip
        """Generate up to ``n_predict`` tokens after ``prompt_tokens`` (the KV caches start empty).

        The result is filled in as the run goes, so a caller that catches a :class:`WorkerError` still finds
        what was measured in :attr:`last`.

        Raises:
            WorkerError: a worker died or stopped answering.
            InputError: the prompt is empty, or the prompt and ``n_predict`` do not fit the plan's context.
        """
        if not prompt_tokens:
            raise InputError("--prompt", "", "the prompt has no tokens")
        if len(prompt_tokens) + n_predict > self.plan.n_ctx:
            room = self.plan.n_ctx - len(prompt_tokens)
            raise InputError("-n/--n-predict", "", f"{len(prompt_tokens)} prompt + {n_predict} new tokens exceed the "
                             f"plan's context of {self.plan.n_ctx} tokens: ask for at most {max(room, 0)} new tokens, "
                             f"or re-plan with a larger --ctx")  # fmt: skip
        if not self.started:
            self.barrier()
        gen = Generation(list(prompt_tokens), t0=now())
        self.last = gen
        sampler = Sampler(sampling.temperature, sampling.top_k, sampling.top_p, sampling.seed)
        utf8 = codecs.getincrementaldecoder("utf-8")("replace")
        try:
            t_step = now()
            for i in range(0, len(prompt_tokens), self.n_batch):  # pos 0: every window clears its KV cache
                ctx = self._step(prompt_tokens[i : i + self.n_batch], i, 0, t_step)
            spec = self.draft is not None and sampling.temperature <= 0  # only greedy output is speculated
            if spec:  # the draft reads the prompt too, as part of the prefill
                assert self.draft is not None
                t0 = now()
                self.draft.catch_up(prompt_tokens)
                self.spans.add(SpanKind.HEAD, t0, now(), 0, "draft prefill")
                gen.spec = SpecStats(self.draft_max, draft_s=now() - t0)
            gen.steps.append((0, "prefill", len(prompt_tokens), t_step - gen.t0, now() - gen.t0))
            pos = len(prompt_tokens)
            # tokens a verification pass chose (and their logits), not given out yet
            verified: list[tuple[int, np.ndarray | None]] = []
            while True:
                if verified:
                    tok, lg = verified.pop(0)
                    if keep_logits and lg is not None:
                        gen.logits.append(lg)
                else:
                    if keep_logits:
                        gen.logits.append(ctx.last_logits())
                    t0 = now()
                    tok = sampler.sample(ctx)
                    self.spans.add(SpanKind.HEAD, t0, now(), len(gen.token_ids), "sample")
                if not ignore_eos and self.embed_model.is_eog(tok):
                    gen.stop_reason = "eos"
                    break
                gen.token_ids.append(tok)
                piece = utf8.decode(self.embed_model.piece(tok))
                gen.text += piece
                if on_text and piece:
                    on_text(piece)
                if len(gen.token_ids) >= n_predict:
                    break
                if verified:  # chosen by the last pass already: no ring pass for it
                    continue
                step = len(gen.token_ids)
                t_step = now()
                if not spec:
                    ctx = self._step([tok], pos, step, t_step)
                    gen.steps.append((step, "decode", 1, t_step - gen.t0, now() - gen.t0))
                    pos += 1
                    continue
                # at most the tokens still wanted: the pass itself yields one more than it accepts
                verified, n_rows = self._speculate(
                    gen, tok, pos, step, sampler, n_predict - step - 1, keep_logits
                )
                gen.steps.append((step, "decode", n_rows, t_step - gen.t0, now() - gen.t0))
                pos += len(verified)
            tail = utf8.decode(b"", final=True)
            gen.text += tail
            if on_text and tail:
                on_text(tail)
        finally:
            sampler.close()
        return gen

    def _speculate(
        self, gen: Generation, tok: int, pos: int, step: int, sampler: Sampler, room: int, keep_logits: bool
    ) -> tuple[list[tuple[int, np.ndarray | None]], int]:
        """One speculative step: the draft proposes up to ``room`` (at most ``draft_max``) tokens after the
        accepted ones and ``tok``; the ring runs ``tok`` and the drafts at ``pos..`` as one batch whose every row
        gives logits; returns the tokens the target chose (the accepted drafts, then its own next token) with
        their logits (with ``keep_logits``), and the rows of the batch. The rejected rows stay in the KV caches
        until the next batch, which starts at the first rejected position and so cuts them (every window's
        ``llama_memory_seq_rm``)."""
        assert self.draft is not None and gen.spec is not None
        st = gen.spec
        drafts: list[int] = []
        if room > 0:
            t0 = now()
            drafts = self.draft.propose(gen.prompt_tokens + gen.token_ids, min(self.draft_max, room))
            t1 = now()
            st.draft_s += t1 - t0
            self.spans.add(SpanKind.HEAD, t0, t1, step, f"draft {len(drafts)}")
        rows = [tok, *drafts]
        n = len(rows)
        ctx = self.step_rows(rows, np.arange(pos, pos + n, dtype=np.int32), np.zeros(n, dtype=np.int32),
                             set(range(n)), step)  # fmt: skip
        t0 = now()
        out: list[tuple[int, np.ndarray | None]] = []
        for i in range(n):  # the target's greedy choice after row i, as far as the drafts agree with it
            t = sampler.sample(ctx, i)
            out.append((t, ctx.logits_at(i) if keep_logits else None))
            if i == len(drafts) or drafts[i] != t or self.embed_model.is_eog(t):
                break
        self.spans.add(SpanKind.HEAD, t0, now(), step, "verify")
        m = len(out) - 1
        if drafts:
            st.passes += 1
            st.drafted += len(drafts)
            st.accepted += m
            st.rejections += m < len(drafts)
            st.tokens += len(out)
        return out, n

    # --- serving (prima_sim.exec.engine) ---------------------------------------------------------------------
    def watch(self) -> None:
        """Between requests: read the control channel, check every worker's liveness, and drop the
        measurements a long-running server does not keep.

        Raises:
            WorkerError: a worker failed, left, or stopped answering.
        """
        self.spans.drain()
        if not self.workers:
            return
        while self.control.poll(0):
            self._on_status(self.control.recv(copy=False))
        for p in self.peers.values():
            p.spans = []
        self._check_liveness()

    # --- measurements and shutdown ------------------------------------------------------------------------------
    def all_spans(self, t0: float) -> list[Span]:
        """Every span measured so far (head and workers), relative to ``t0``."""
        out = to_spans(self.device, self.spans.drain(), t0)
        for w, p in self.peers.items():
            out += to_spans(w, p.spans, t0)
            p.spans = []
        self._kept += out
        return list(self._kept)

    def close(self, graceful: bool = True) -> None:
        """Stop the ring (``stop`` round the ring, then wait for every worker's last report) and free all."""
        self.closing = True
        try:
            if graceful and self.workers and self.started:
                self.push[self.route.successor(self.device)].send_multipart(
                    wire.encode(
                        wire.Header(type="stop", fp=self.fp, seq=self._next_seq(), origin=self.device)
                    )
                )
                deadline = now() + BYE_TIMEOUT_S
                while not all(p.bye for p in self.peers.values()) and now() < deadline:
                    events = dict(self.poller.poll(POLL_SLICE_MS))
                    if self.control in events:
                        self._on_status(self.control.recv(copy=False))
                    if self.pull in events:
                        self.pull.recv_multipart()  # the stop coming back round the ring
        except WorkerError as exc:  # the run is over; a worker failing on the way out only loses measurements
            log.warning("head: during shutdown: %s", exc)
        finally:
            self._stack.close()
