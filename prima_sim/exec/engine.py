"""The ring as a long-running service: shards load once, requests are served from a bounded FIFO queue.

:class:`Engine` owns one ring (the head of :mod:`prima_sim.exec.head` and, with ``local``, the worker processes
of :mod:`prima_sim.exec.local`) and one thread that does everything llama.cpp does in this process: it
builds the ring, gives waiting requests free *slots* (llama.cpp sequence ids) in arrival order, tokenizes them
(through the GGUF's chat template for chat requests), and runs the ring one batch at a time
(:meth:`Head.step_rows`): every pass carries one decode row for each generating sequence plus as much of the
new prompts as the batch has room for (continuous batching), and one token is sampled for each sequence whose
prompt is all in. Each slot remembers the tokens its caches hold, so a prompt that extends a previous one
(a conversation's next turn) only prefills the new part. Stop strings are applied on the text, and every piece
of text goes to the request's ``deliver`` callback. Between requests it watches the workers (:meth:`Head.watch`).

``spec.n_seq`` sequences are in flight at once (``prima-sim serve --parallel``; 1 serves one request at a time);
the others wait in the queue, first come first served, and a request beyond ``queue_limit`` waiting ones is
refused at once (:class:`QueueFull`, HTTP 429). A request is cancelled between two tokens when its client goes
away.

When a worker is lost the requests in flight end with a ``server_error`` event (HTTP 500, or an error event
that closes a stream), every waiting request gets ``unavailable`` (503), and the engine rebuilds the ring:
with ``local`` it respawns the workers; otherwise it waits again for every worker of the hosts file to report
ready (start the lost one again; run workers with ``--persist`` so that they outlive a head). Until then
:meth:`Engine.submit` raises :class:`NotReady` (503).

Why one module of this size: the engine's one llama.cpp thread owns the queue, the slots, admission, batching and
finishing; they share that thread's state, and splitting them would add locks where today there are none.
"""

from __future__ import annotations

import codecs
import collections
import contextlib
import logging
import os
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, cast

import numpy as np
import tomli_w

from prima_sim.errors import InputError, PrimaSimError, WorkerError
from prima_sim.exec.head import Head, SamplingParams
from prima_sim.exec.hosts import HostsFile, local_hosts, resolve
from prima_sim.exec.llamacpp import Sampler
from prima_sim.exec.local import LocalWorkers
from prima_sim.exec.manifest import MANIFEST_NAME, load_manifest
from prima_sim.exec.ring import DEFAULT_TIMEOUT_S, STARTUP_TIMEOUT_S
from prima_sim.exec.spec import DEFAULT_DRAFT_MAX, common_prefix
from prima_sim.plan import Plan
from prima_sim.workload import DEFAULT_UBATCH

log = logging.getLogger(__name__)
notes = logging.getLogger("prima_sim.notes")

DEFAULT_QUEUE_LIMIT = 32  # waiting requests beyond the one in flight
IDLE_WATCH_S = 0.2  # how often an idle engine reads the workers' heartbeats
RETRY_MIN_S, RETRY_MAX_S = 0.5, 10.0  # back-off between attempts to rebuild a lost ring

State = Literal["starting", "ready", "recovering", "stopped"]


class QueueFull(PrimaSimError):
    """The request queue is at its limit (HTTP 429)."""


class NotReady(PrimaSimError):
    """The ring is starting or being rebuilt (HTTP 503)."""


@dataclass(frozen=True)
class Event:
    """What the engine tells a request: a piece of text, the end, or an error.

    ``kind`` is ``"text"`` (``text``), ``"done"`` (``finish_reason``, ``usage``) or ``"error"`` (``status``, the
    HTTP status it maps to, and ``message``).
    """

    kind: Literal["text", "done", "error"]
    text: str = ""
    finish_reason: str = ""
    usage: dict[str, Any] = field(default_factory=dict)
    status: int = 0
    message: str = ""


@dataclass
class Job:
    """One request: a prompt (text, token ids, or chat messages) and how to continue it.

    Args:
        prompt: text (tokenized with the model's BOS rule), token ids, or OpenAI chat messages.
        max_tokens: the most tokens to generate; None: as many as the context has room for.
        sampling: temperature, top-k, top-p and seed.
        stop: strings that end the generation (not included in the text).
        deliver: called from the engine's thread with every :class:`Event`; must not block.
    """

    prompt: str | list[int] | list[dict[str, Any]]
    max_tokens: int | None
    sampling: SamplingParams
    stop: tuple[str, ...]
    deliver: Callable[[Event], None]
    chat: bool = False
    ignore_eos: bool = False
    cancelled: threading.Event = field(default_factory=threading.Event)

    def cancel(self) -> None:
        """Ask the engine to stop this request at the next token (or skip it while it waits)."""
        self.cancelled.set()


@dataclass
class RingSpec:
    """Everything needed to (re)build the ring.

    Args:
        plan: the plan (its shards already cut in ``shard_dir``).
        shard_dir: one sub-directory of shards per device.
        local: spawn the workers on this host over loopback; otherwise they run on the hosts of ``hosts``.
        hosts: addresses (ignored with ``local``: free loopback ports are picked on every build).
        hosts_source: what to name in errors about ``hosts``.
        threads: llama.cpp threads per device.
        n_seq: sequences in flight at once (``--parallel``): every window's KV cache holds that many.
        draft: a draft model (the same vocabulary) that proposes up to ``draft_max`` tokens per pass for every
            greedy request; the ring verifies them in the same pass (:mod:`prima_sim.exec.spec`).
    """

    plan: Plan
    shard_dir: Path
    local: bool
    hosts: HostsFile | None = None
    hosts_source: str = "hosts.toml"
    threads: dict[str, int] = field(default_factory=dict)
    prefetch: bool = True
    n_batch: int = DEFAULT_UBATCH
    timeout_s: float = DEFAULT_TIMEOUT_S
    startup_timeout_s: float = STARTUP_TIMEOUT_S
    omp_wait_policy: str | None = "passive"
    log_dir: Path | None = None
    n_seq: int = 1
    draft: Path | None = None  # speculative decoding of greedy requests: this whole GGUF drafts on the head
    draft_max: int = DEFAULT_DRAFT_MAX


class Ring:
    """A started ring: the head (loaded, past its barrier) and the local workers, if any."""

    def __init__(self, spec: RingSpec) -> None:
        plan = spec.plan
        names = [d.name for d in plan.devices]
        self.tmp = tempfile.TemporaryDirectory(prefix="prima-serve-")
        hosts = local_hosts(plan) if spec.local else (spec.hosts or HostsFile())
        endpoints = resolve(hosts, plan, spec.hosts_source)
        self.workers: LocalWorkers | None = None
        self.head: Head | None = None
        try:
            if spec.local and len(names) > 1:
                hosts_file = Path(self.tmp.name) / "hosts.toml"
                hosts_file.write_text(tomli_w.dumps(hosts.model_dump(mode="json", exclude_none=True)))
                devs = [(d, spec.shard_dir / d, spec.threads.get(d, 1)) for d in names[1:]]
                self.workers = LocalWorkers(devs, hosts_file, spec.log_dir or Path(self.tmp.name) / "logs",
                                            spec.prefetch, spec.n_batch, spec.omp_wait_policy, spec.n_seq)  # fmt: skip
                self.workers.start()
            man = load_manifest(spec.shard_dir / plan.head, plan.head)
            if man.plan_fingerprint != plan.fingerprint():
                raise InputError(str(spec.shard_dir / plan.head / MANIFEST_NAME), "plan_fingerprint",
                                 f"shards are for plan {man.plan_fingerprint}, not {plan.fingerprint()}")  # fmt: skip
            self.head = Head(spec.shard_dir / plan.head, man, endpoints, spec.threads.get(plan.head, 1), spec.prefetch,
                             spec.n_batch, spec.timeout_s,
                             check_alive=self.workers.check_alive if self.workers else None,
                             n_seq=spec.n_seq)  # fmt: skip
            self.head.load()
            if spec.draft is not None:
                self.head.use_draft(spec.draft, spec.draft_max)
            self.head.barrier(spec.startup_timeout_s)
        except BaseException:
            self.close(graceful=False)
            raise

    def pids(self) -> dict[str, int]:
        """Process id of every device (the head's is this process)."""
        out = {self.head.device: os.getpid()} if self.head else {}
        if self.workers:
            out.update({n: p.pid for n, p in self.workers.procs.items()})
        elif self.head:
            out.update({w: p.pid for w, p in self.head.peers.items()})
        return out

    def close(self, graceful: bool = True) -> None:
        """Stop the ring (``stop`` round it when ``graceful``) and kill the local workers."""
        try:
            if self.head is not None:
                self.head.close(graceful=graceful)
        finally:
            self.head = None
            if self.workers is not None:
                self.workers.stop(graceful=graceful)
                self.workers = None
            self.tmp.cleanup()


def apply_chat_template(template: str, bos: str, eos: str, messages: list[dict[str, Any]]) -> str:
    """``messages`` rendered with the GGUF's Jinja chat template, ending with the assistant's turn.

    Uses llama-cpp-python's :class:`Jinja2ChatFormatter` (a sandboxed Jinja environment, as llama.cpp's server
    and Hugging Face render these templates).

    Raises:
        InputError: the template refuses the messages (``raise_exception`` in the template) or fails.
    """
    from llama_cpp.llama_chat_format import Jinja2ChatFormatter

    try:
        fmt = Jinja2ChatFormatter(template, eos_token=eos, bos_token=bos)
        return str(fmt(messages=cast(Any, messages)).prompt)
    except Exception as exc:  # the template is the model's code: any failure is a bad request for it
        raise InputError("messages", "", f"the model's chat template refused them: {exc}") from None


def _hold_back(text: str, stops: tuple[str, ...]) -> int:
    """How many characters at the end of ``text`` could be the start of a stop string (not yet sent)."""
    keep = 0
    for s in stops:
        for n in range(min(len(s) - 1, len(text)), keep, -1):
            if text.endswith(s[:n]):
                keep = n
                break
    return keep


@dataclass
class _Slot:
    """One sequence of the ring's KV caches (llama.cpp sequence id ``index``) and the request using it."""

    index: int
    kv: list[int] = field(default_factory=list)  # the tokens its caches hold, positions 0..
    job: Job | None = None
    prompt: list[int] = field(default_factory=list)
    pending: list[int] = field(default_factory=list)  # tokens to feed: the prompt's rest, or the last sampled
    sampler: Sampler | None = None
    n_max: int = 0
    n_gen: int = 0
    cached: int = 0
    text: str = ""  # generated text not sent yet (it could be the start of a stop string)
    utf8: Any = None


class Engine:
    """The ring behind a server: one thread, up to ``n_seq`` sequences in flight, a bounded FIFO queue.

    Args:
        spec: how to build the ring (``spec.n_seq``: sequences batched together per window pass).
        queue_limit: requests that may wait while ``n_seq`` run; more are refused with :class:`QueueFull`.
    """

    def __init__(self, spec: RingSpec, queue_limit: int = DEFAULT_QUEUE_LIMIT) -> None:
        self.spec = spec
        self.queue_limit = queue_limit
        self.state: State = "starting"
        self.error = ""  # why the ring is not ready (the last failure)
        self.ring: Ring | None = None
        self.served = 0
        self.cancelled = 0
        self.rebuilds = 0
        self.steps = 0  # window passes (batches) run
        self.batched_rows = 0  # decode rows of those batches that came from more than one sequence
        self.drafted = 0  # tokens a draft model proposed (spec.draft)
        self.accepted = 0  # of them, accepted by the ring
        self._queue: collections.deque[Job] = collections.deque()
        self._slots = [_Slot(i) for i in range(spec.n_seq)]
        self._busy = 0  # slots in use
        self._cv = threading.Condition()
        self._stopping = False
        self._thread = threading.Thread(target=self._main, name="prima-engine", daemon=True)
        self.chat_template = ""
        self.n_ctx = spec.plan.n_ctx

    # --- public ------------------------------------------------------------------------------------------------
    def start(self) -> None:
        """Start the engine's thread (which builds the ring; :attr:`state` says when it is ready)."""
        self._thread.start()

    def wait_ready(self, timeout: float) -> bool:
        """Wait until the ring is ready (True) or ``timeout`` seconds have passed (False)."""
        deadline = time.monotonic() + timeout
        with self._cv:
            while self.state != "ready" and not self._stopping and time.monotonic() < deadline:
                self._cv.wait(min(0.1, max(0.0, deadline - time.monotonic())))
            return self.state == "ready"

    def submit(self, job: Job) -> None:
        """Queue ``job``.

        Raises:
            NotReady: the ring is starting, being rebuilt, or stopped.
            QueueFull: every slot is in use and ``queue_limit`` requests are already waiting.
        """
        with self._cv:
            if self.state != "ready":
                raise NotReady(self._not_ready())
            if len(self._queue) + self._busy >= self.queue_limit + len(self._slots):
                raise QueueFull(f"{self._busy} request(s) running and {len(self._queue)} waiting (the queue limit is "
                                f"{self.queue_limit}): retry later")  # fmt: skip
            self._queue.append(job)
            self._cv.notify_all()

    def status(self) -> dict[str, Any]:
        """State, queue length, devices and counters (``GET /health``)."""
        ring = self.ring
        return {
            "state": self.state,
            "error": self.error,
            "queued": len(self._queue),
            "running": self._busy,
            "parallel": len(self._slots),
            "queue_limit": self.queue_limit,
            "served": self.served,
            "cancelled": self.cancelled,
            "rebuilds": self.rebuilds,
            "steps": self.steps,
            "batched_rows": self.batched_rows,
            "drafted": self.drafted,
            "accepted": self.accepted,
            "devices": [d.name for d in self.spec.plan.devices],
            "pids": ring.pids() if ring is not None and self.state == "ready" else {},
            "n_ctx": self.n_ctx,
        }

    def close(self) -> None:
        """Stop the thread, fail what waits, and stop the ring."""
        with self._cv:
            self._stopping = True
            self._cv.notify_all()
        if self._thread.is_alive():
            self._thread.join(timeout=30)

    # --- the engine's thread ----------------------------------------------------------------------------------
    def _not_ready(self) -> str:
        if self.state == "stopped":
            return "the server is shutting down"
        if self.state == "starting":
            return "the ring is starting (loading shards, waiting for every worker): retry shortly"
        return f"the ring is being rebuilt after a failure ({self.error}): retry shortly"

    def _set_state(self, state: State, error: str = "") -> None:
        with self._cv:
            self.state, self.error = state, error
            self._cv.notify_all()

    def _main(self) -> None:
        backoff = RETRY_MIN_S
        try:
            while not self._stopping:
                if self.ring is None:
                    try:
                        self._build()
                        backoff = RETRY_MIN_S
                    except PrimaSimError as exc:
                        log.warning("could not start the ring: %s", exc)
                        self._set_state("recovering", str(exc))
                        self._sleep(backoff)
                        backoff = min(2 * backoff, RETRY_MAX_S)
                    continue
                self._admit()
                active = [sl for sl in self._slots if sl.job is not None]
                if not active:
                    with self._cv:
                        if not self._queue and not self._stopping:
                            self._cv.wait(IDLE_WATCH_S)
                    if not self._queue:
                        self._watch()
                    continue
                self._step(active)
        finally:
            self._set_state("stopped")
            for sl in self._slots:
                if sl.job is not None:
                    self._finish(sl, error=(503, "the server is shutting down"))
            self._fail_waiting(503, "the server is shutting down")
            if self.ring is not None:
                with contextlib.suppress(Exception):
                    self.ring.close(graceful=True)
                self.ring = None

    def _sleep(self, s: float) -> None:
        with self._cv:
            self._cv.wait_for(lambda: self._stopping, timeout=s)

    def _build(self) -> None:
        ring = Ring(self.spec)
        assert ring.head is not None
        self.model = ring.head.embed_model
        self.chat_template = self.model.chat_template()
        self.bos, self.eos = self.model.special_text("bos"), self.model.special_text("eos")
        for sl in self._slots:  # a new ring starts with empty caches
            sl.kv = []
        self.ring = ring
        self._set_state("ready")
        notes.info("the ring of %d device(s) is ready", len(self.spec.plan.devices))

    def _watch(self) -> None:
        assert self.ring is not None and self.ring.head is not None
        try:
            self.ring.head.watch()
        except WorkerError as exc:
            self._lost(str(exc))

    def _lost(self, why: str) -> None:
        log.warning("ring lost: %s", why)
        self._set_state("recovering", why)
        self._fail_waiting(503, f"the ring is being rebuilt after a failure ({why}): retry shortly")
        if self.ring is not None:
            with contextlib.suppress(Exception):
                self.ring.close(graceful=False)
            self.ring = None
        self.rebuilds += 1

    def _fail_waiting(self, status: int, message: str) -> None:
        with self._cv:
            waiting, self._queue = list(self._queue), collections.deque()
        for job in waiting:
            _send(job, Event("error", status=status, message=message))

    def tokenize(self, job: Job) -> list[int]:
        """The prompt of ``job`` as token ids (engine thread only).

        Raises:
            InputError: the prompt is empty, has out-of-range ids, or the chat template refuses it.
        """
        m = self.model
        if isinstance(job.prompt, str):
            toks = m.tokenize(job.prompt)
        elif job.chat:
            if not self.chat_template:
                raise InputError("messages", "", "the model has no chat template (tokenizer.chat_template): use "
                                 "/v1/completions")  # fmt: skip
            text = apply_chat_template(self.chat_template, self.bos, self.eos, job.prompt)  # type: ignore[arg-type]
            toks = m.tokenize(text, add_special=False, parse_special=True)
        else:
            toks = [int(t) for t in job.prompt]  # type: ignore[arg-type]
            bad = [t for t in toks if not 0 <= t < m.n_vocab]
            if bad:
                raise InputError(
                    "prompt", "", f"token id {bad[0]} is outside the vocabulary (0..{m.n_vocab - 1})"
                )
        if not toks:
            raise InputError("prompt", "", "the prompt has no tokens")
        return toks

    # --- scheduling ---------------------------------------------------------------------------------------------
    def _admit(self) -> None:
        """Give free slots to waiting requests, oldest first; each takes the free slot whose cache shares the
        longest prefix with its prompt (a conversation's next turn finds its previous turn's cache)."""
        while True:
            free = [sl for sl in self._slots if sl.job is None]
            with self._cv:
                if not free or not self._queue:
                    return
                job = self._queue.popleft()
            if job.cancelled.is_set():
                continue
            try:
                toks = self.tokenize(job)
                n_max = self.n_ctx - len(toks) if job.max_tokens is None else job.max_tokens
                if len(toks) + max(n_max, 1) > self.n_ctx:
                    room = self.n_ctx - len(toks)
                    raise InputError("max_tokens", "", f"{len(toks)} prompt + {n_max} new tokens exceed the context "
                                     f"of {self.n_ctx} tokens: ask for at most {max(room, 0)} new tokens")  # fmt: skip
            except InputError as exc:
                _send(job, Event("error", status=400, message=str(exc)))
                continue
            sl = max(free, key=lambda f: (common_prefix(f.kv, toks), -f.index))
            p = min(common_prefix(sl.kv, toks), len(toks) - 1)
            sl.kv, sl.job, sl.prompt, sl.pending = sl.kv[:p], job, toks, toks[p:]
            sl.cached, sl.n_max, sl.n_gen, sl.text = p, n_max, 0, ""
            sl.utf8 = codecs.getincrementaldecoder("utf-8")("replace")
            sp = job.sampling
            sl.sampler = Sampler(sp.temperature, sp.top_k, sp.top_p, sp.seed)
            with self._cv:
                self._busy += 1

    def _step(self, active: list[_Slot]) -> None:
        """One pass through the ring: a decode row for every generating sequence and as much prefill as the
        batch has room for, then one token sampled for every sequence whose pending tokens are all in."""
        assert self.ring is not None and self.ring.head is not None
        head = self.ring.head
        for sl in active:
            if sl.job is not None and sl.job.cancelled.is_set():
                self.cancelled += 1
                self._finish(sl, reason="cancelled")
        active = [sl for sl in active if sl.job is not None]
        if not active:
            return
        budget = head.n_batch
        tokens: list[int] = []
        positions: list[int] = []
        seqs: list[int] = []
        outs: dict[int, _Slot] = {}
        fed: list[tuple[_Slot, int]] = []
        drafts: dict[int, list[int]] = {}  # slot index -> the tokens its draft proposed after its pending one
        for sl in sorted(active, key=lambda x: len(x.pending) > 1):  # decoding sequences first, then prefill
            if budget == 0:
                break
            chunk = sl.pending[:budget]
            room = min(head.draft_max, budget - 1, sl.n_max - sl.n_gen - 1)
            assert sl.job is not None
            greedy = sl.job.sampling.temperature <= 0
            if (
                len(sl.pending) == 1 and room > 0 and head.draft is not None and greedy
            ):  # speculate (exec.spec)
                drafts[sl.index] = head.draft.propose(sl.kv + chunk, room, sl.index)
                chunk = chunk + drafts[sl.index]
                self.drafted += len(drafts[sl.index])
            start = len(sl.kv)
            tokens += chunk
            positions += range(start, start + len(chunk))
            seqs += [sl.index] * len(chunk)
            if sl.index in drafts:
                outs.update(dict.fromkeys(range(len(tokens) - len(chunk), len(tokens)), sl))
            elif len(chunk) == len(sl.pending):
                outs[len(tokens) - 1] = sl
            fed.append((sl, len(chunk)))
            budget -= len(chunk)
        self.steps += 1
        if len(fed) > 1:
            self.batched_rows += len(fed)
        try:
            ctx = head.step_rows(tokens, np.array(positions, dtype=np.int32), np.array(seqs, dtype=np.int32),
                                 set(outs), self.steps)  # fmt: skip
            for sl, n in fed:
                if sl.index in drafts:  # the pending token and the drafts the ring accepts (cut below)
                    sl.kv += sl.pending + drafts[sl.index]
                    sl.pending = []
                else:
                    sl.kv += sl.pending[:n]
                    sl.pending = sl.pending[n:]
            rows_of: dict[int, list[int]] = {}
            for row, sl in outs.items():
                rows_of.setdefault(sl.index, []).append(row)
            for idx, rows in rows_of.items():
                sl = self._slots[idx]
                d = drafts.get(idx, [])
                for i, row in enumerate(rows):  # row i: the target's choice after the drafts before it
                    assert sl.sampler is not None
                    tok = sl.sampler.sample(ctx, row)
                    agree = i < len(d) and d[i] == tok
                    self.accepted += agree
                    self._advance(sl, tok)
                    if sl.job is None or not agree:
                        # done, or the target's own token: the drafts after it are not the target's (their KV
                        # entries are cut when the slot's next batch starts where they start)
                        del sl.kv[len(sl.kv) - len(d) + i + agree :]
                        break
        except WorkerError as exc:
            for sl in active:
                if sl.job is not None:
                    self._finish(sl, error=(500, f"a worker was lost: {exc}"))
            self._lost(str(exc))
        except Exception as exc:  # llama.cpp failed in this process: the ring's state is unknown
            log.exception("a step failed")
            for sl in active:
                if sl.job is not None:
                    self._finish(sl, error=(500, f"internal error: {exc}"))
            self._lost(f"internal error: {exc}")

    def _advance(self, sl: _Slot, tok: int) -> None:
        """Take the token sampled for ``sl``: end of generation, text (with stop strings), or the next row."""
        job = sl.job
        assert job is not None
        if not job.ignore_eos and self.model.is_eog(tok):
            self._finish(sl, reason="stop")
            return
        sl.n_gen += 1
        sl.text += sl.utf8.decode(self.model.piece(tok))
        cut = min((i for i in (sl.text.find(st) for st in job.stop) if i >= 0), default=-1)
        if cut >= 0:
            sl.text = sl.text[:cut]
            self._finish(sl, reason="stop", flush=False)
            return
        keep = _hold_back(sl.text, job.stop)
        out, sl.text = sl.text[: len(sl.text) - keep], sl.text[len(sl.text) - keep :]
        if out:
            _send(job, Event("text", text=out))
        if sl.n_gen >= sl.n_max:
            self._finish(sl, reason="length")
        else:
            sl.pending = [tok]

    def _finish(
        self, sl: _Slot, reason: str = "", flush: bool = True, error: tuple[int, str] | None = None
    ) -> None:
        """End the request of ``sl`` (done with ``reason``, or ``error``) and free the slot; its cache stays."""
        job = sl.job
        assert job is not None
        if error is not None:
            _send(job, Event("error", status=error[0], message=error[1]))
            sl.kv = []  # what the caches hold after a failed step is unknown
        else:
            if flush:
                sl.text += sl.utf8.decode(b"", final=True)
            if sl.text:
                _send(job, Event("text", text=sl.text))
            usage = {
                "prompt_tokens": len(sl.prompt),
                "completion_tokens": sl.n_gen,
                "total_tokens": len(sl.prompt) + sl.n_gen,
                "prompt_tokens_details": {"cached_tokens": sl.cached},
            }
            _send(job, Event("done", finish_reason=reason, usage=usage))
            self.served += 1
        if sl.sampler is not None:
            sl.sampler.close()
        sl.job, sl.sampler, sl.pending, sl.text = None, None, [], ""
        with self._cv:
            self._busy -= 1


def _send(job: Job, ev: Event) -> None:
    try:
        job.deliver(ev)
    except Exception:  # the client's side is gone (its event loop closed): nothing left to tell it
        log.debug("could not deliver %s", ev.kind, exc_info=True)
