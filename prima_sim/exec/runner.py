"""One real run, end to end: shards, workers (local or remote), the head, and the measurements.

:func:`run_ring` is what ``prima-sim run --real`` / ``--local`` and the benchmark call. Whatever happens
(a worker dies, Ctrl-C, an error in the head) the local workers are killed and what was measured so far is
returned in the raised error's ``report`` attribute (and written to ``out_dir`` when one is given).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import tomli_w

from prima_sim.cache import cache_root
from prima_sim.errors import InputError, PrimaSimError
from prima_sim.exec.head import Generation, Head, SamplingParams
from prima_sim.exec.hosts import HostsFile, local_hosts, resolve
from prima_sim.exec.llamacpp import default_threads, supports_gpu_offload
from prima_sim.exec.local import LocalWorkers
from prima_sim.exec.manifest import MANIFEST_NAME, load_manifest
from prima_sim.exec.ring import DEFAULT_TIMEOUT_S, STARTUP_TIMEOUT_S, LatencyTable
from prima_sim.exec.spec import DEFAULT_DRAFT_MAX
from prima_sim.metrics import Span, TokenRow, rows_from_spans, summarize, write_chrome_trace, write_token_csv
from prima_sim.plan import Plan
from prima_sim.progress import Progress
from prima_sim.schema import atomic_write_text
from prima_sim.workload import DEFAULT_UBATCH

log = logging.getLogger(__name__)
notes = logging.getLogger("prima_sim.notes")


@dataclass
class RunOptions:
    """Knobs of a real run (defaults match the CLI's)."""

    n_predict: int = 32
    sampling: SamplingParams = field(default_factory=SamplingParams)
    chat: bool = False
    ignore_eos: bool = False
    threads: dict[str, int] = field(default_factory=dict)
    prefetch: bool = True
    n_batch: int = DEFAULT_UBATCH
    timeout_s: float = DEFAULT_TIMEOUT_S
    startup_timeout_s: float = STARTUP_TIMEOUT_S
    keep_logits: bool = False
    omp_wait_policy: str | None = "passive"
    extra_prompts: tuple[str | list[int], ...] = ()
    progress: bool = False  # show the progress of cutting shards on stderr
    link_latency: LatencyTable | None = None  # emulated link latencies (--link-latency; prima_sim.emulate)
    draft: Path | None = None  # speculative decoding: this whole GGUF drafts on the head (greedy only)
    draft_max: int = DEFAULT_DRAFT_MAX  # tokens the draft proposes per verification pass


@dataclass
class RunReport:
    """Result and measurements of a run (complete, or as far as it got)."""

    plan: Plan
    generations: list[Generation] = field(default_factory=list)
    spans: list[Span] = field(default_factory=list)
    rows: list[TokenRow] = field(default_factory=list)
    summary: dict[str, Any] = field(default_factory=dict)
    rejected: dict[str, int] = field(default_factory=dict)
    error: str = ""

    @property
    def last(self) -> Generation | None:
        """The first prompt's generation (the one the CLI reports)."""
        return self.generations[0] if self.generations else None

    def to_json(self) -> dict[str, Any]:
        """The object ``run --json`` prints."""
        g = self.last
        out: dict[str, Any] = {
            "text": g.text if g else "",
            "token_ids": g.token_ids if g else [],
            "prompt_tokens": len(g.prompt_tokens) if g else 0,
            "stop_reason": g.stop_reason if g else "",
            "ttft_s": self.summary.get("ttft_s"),
            "tpot_s": self.summary.get("tpot_s"),
            "tpot_mean_s": self.summary.get("tpot_mean_s"),
            "n_decode": self.summary.get("n_decode", 0),
            "per_device": self.summary.get("per_device", {}),
            "rejected_messages": self.rejected,
            "plan_fingerprint": self.plan.fingerprint(),
            "devices": [d.name for d in self.plan.devices],
            "t0_unix_s": g.t0
            if g
            else None,  # wall clock of t = 0 in tokens.csv/trace.json (for prima_sim.emulate)
        }
        if g is not None and g.spec is not None:
            out["speculation"] = g.spec.to_json() | {"decode_tokens_per_s": decode_rate(g)}
        if self.error:
            out["error"] = self.error
        return out

    def write(self, out_dir: Path) -> None:
        """tokens.csv, trace.json and summary.json (the simulator's formats)."""
        out_dir.mkdir(parents=True, exist_ok=True)
        write_token_csv(self.rows, out_dir / "tokens.csv")
        write_chrome_trace(
            self.spans, [d.name for d in self.plan.devices], out_dir / "trace.json", "prima-sim run"
        )
        atomic_write_text(out_dir / "summary.json", json.dumps(_finite(self.to_json()), indent=2) + "\n")


def decode_rate(g: Generation) -> float:
    """Generated tokens per second of decoding: the tokens after the first (which the prefill yields) over the
    decode steps' time; with speculative decoding a step (one verification pass) yields several (NaN without
    decode steps)."""
    t = sum(t1 - t0 for _, phase, _, t0, t1 in g.steps if phase == "decode")
    return (len(g.token_ids) - 1) / t if t > 0 else math.nan


def _finite(obj: Any) -> Any:
    """``obj`` with NaN and infinities replaced by None (strict JSON)."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    return obj


def check_gpu(plan: Plan, source: str = "plan", devices: list[str] | None = None) -> None:
    """Refuse, before anything starts, a plan with GPU layers on a llama.cpp build without a GPU backend.

    Args:
        plan: the plan.
        source: what to name in the error.
        devices: the devices that run on this host (default: all of them).

    Raises:
        InputError: naming the first device with GPU layers.
    """
    gpu = [d for d in plan.devices if d.gpu_layers > 0 and (devices is None or d.name in devices)]
    if gpu and not supports_gpu_offload():
        d = gpu[0]
        raise InputError(
            source, f"devices.{d.name}.gpu_layers",
            f"is {d.gpu_layers} but this llama.cpp build has no GPU backend (llama_supports_gpu_offload() is "
            f"false): make a CPU-only plan ('prima-sim plan --cpu-only') or install llama-cpp-python built with "
            f"CUDA/Metal/Vulkan (docs/tutorial.md)",
        )  # fmt: skip


def default_shard_dir(model: Path, plan: Plan) -> Path:
    """Cache directory for the shards of ``model`` under ``plan`` (keyed by file identity and plan)."""
    st = model.stat()
    key = hashlib.sha256(
        f"{model.resolve()}|{st.st_size}|{st.st_mtime_ns}|{plan.fingerprint()}".encode()
    ).hexdigest()
    return cache_root() / "shards" / key[:20]


def ensure_shards(
    model: Path, plan: Plan, shard_dir: Path, devices: list[str], progress: bool = False
) -> None:
    """Write the shards of ``devices`` unless a matching manifest is already there (``progress``: show it)."""
    todo = []
    for d in devices:
        try:
            man = load_manifest(shard_dir / d, d)
            if man.plan_fingerprint == plan.fingerprint():
                continue
        except InputError:
            pass
        todo.append(d)
    if not todo:
        notes.info("using the shards in %s", shard_dir)
        return
    in_cache = shard_dir.is_relative_to(cache_root())
    notes.info("cutting the shards of %s from %s into %s%s", ", ".join(todo), model, shard_dir,
               " ('prima-sim cache' lists and removes cached shards)" if in_cache else "")  # fmt: skip
    bar: Progress | None = None

    def tick(n: int, total: int, label: str) -> None:
        nonlocal bar
        if bar is None:
            bar = Progress(total, "shard", "B", disable=not progress)
        bar.set_description(label)
        bar.update(n)

    from prima_sim.exec.shard import write_shards  # the GGUF writer (gguf, yaml): only when shards are cut

    try:
        write_shards(model, plan, shard_dir, todo, tick)
    finally:
        if bar is not None:
            bar.close()


def _finish(report: RunReport, head: Head | None, gens: list[Generation]) -> None:
    report.generations = gens
    if head is None:
        return
    report.rejected = {w: p.rejected for w, p in head.peers.items()}
    if not gens:
        return
    t0 = gens[0].t0
    report.spans = head.all_spans(t0)
    steps = [s for g in gens[:1] for s in g.steps]
    names = [d.name for d in report.plan.devices]
    report.rows = rows_from_spans(report.spans, steps, names, measured=True)
    report.summary = summarize(report.rows)


def run_ring(
    plan: Plan, model: Path | None, prompt: str | list[int], opts: RunOptions, *, local: bool,
    hosts: HostsFile | None = None, hosts_source: str = "hosts.toml", shard_dir: Path | None = None,
    out_dir: Path | None = None, on_text: Any = None,
) -> RunReport:  # fmt: skip
    """Run ``prompt`` through the ring of ``plan`` and measure it.

    Args:
        plan: the plan.
        model: the unsplit GGUF (needed unless ``shard_dir`` already holds the shards).
        prompt: text, or token ids.
        opts: generation and runtime options.
        local: spawn every worker on this host (``--local``); otherwise they already run (``--real``).
        hosts: addresses (default: loopback with free ports when local, defaults otherwise).
        shard_dir: directory with one sub-directory of shards per device.
        out_dir: where tokens.csv, trace.json and summary.json go.
        on_text: called with each piece of generated text.

    Raises:
        PrimaSimError: bad inputs (InputError) or a failed worker (WorkerError); ``exc.report`` holds the
            measurements taken until then.
    """
    check_gpu(plan, devices=None if local else [plan.head])  # a remote worker checks its own build
    names = [d.name for d in plan.devices]
    if shard_dir is None:
        if model is None:
            raise InputError("--model", "", "a model (or --shards) is required")
        shard_dir = default_shard_dir(model, plan)
    if model is not None:
        ensure_shards(model, plan, shard_dir, names if local else [plan.head], opts.progress)
    hosts = hosts or (local_hosts(plan) if local else HostsFile())
    endpoints = resolve(hosts, plan, hosts_source)
    threads = {d: opts.threads.get(d) or default_threads() for d in names}
    report = RunReport(plan)
    head: Head | None = None
    gens: list[Generation] = []
    with tempfile.TemporaryDirectory(prefix="prima-run-") as tmp:
        hosts_file = Path(tmp) / "hosts.toml"
        hosts_file.write_text(tomli_w.dumps(hosts.model_dump(mode="json", exclude_none=True)))
        workers = None
        try:
            if local and len(names) > 1:
                devs = [(d, shard_dir / d, threads[d]) for d in names[1:]]
                workers = LocalWorkers(devs, hosts_file, (out_dir or Path(tmp)) / "logs", opts.prefetch,
                                       opts.n_batch, opts.omp_wait_policy, link_latency=opts.link_latency)  # fmt: skip
                workers.start()
            man = load_manifest(shard_dir / plan.head, plan.head)
            if man.plan_fingerprint != plan.fingerprint():
                raise InputError(str(shard_dir / plan.head / MANIFEST_NAME), "plan_fingerprint",
                                 f"shards are for plan {man.plan_fingerprint}, not {plan.fingerprint()}")  # fmt: skip
            head = Head(shard_dir / plan.head, man, endpoints, threads[plan.head], opts.prefetch, opts.n_batch,
                        opts.timeout_s, check_alive=workers.check_alive if workers else None,
                        link_latency=opts.link_latency)  # fmt: skip
            head.load()
            if opts.draft is not None:
                head.use_draft(opts.draft, opts.draft_max)
            head.barrier(opts.startup_timeout_s)
            for i, p in enumerate([prompt, *opts.extra_prompts]):
                toks = p if isinstance(p, list) else head.tokenize(p, opts.chat)
                gens.append(head.generate(toks, opts.n_predict, opts.sampling, on_text if i == 0 else None,
                                          opts.keep_logits, opts.ignore_eos))  # fmt: skip
            head.close(graceful=True)  # collects the workers' last measurements
            _finish(report, head, gens)
            head = None
            if workers:
                workers.stop(graceful=True)
                workers = None
        except (PrimaSimError, KeyboardInterrupt, Exception) as exc:
            if head is not None and getattr(head, "last", None) is not None and head.last not in gens:
                gens.append(head.last)
            try:
                _finish(report, head, gens)
            except Exception:  # measurements are best effort on the way out
                log.exception("could not assemble the partial measurements")
            report.error = str(exc)
            if out_dir is not None:
                report.write(out_dir)
            exc.report = report  # type: ignore[union-attr]
            raise
        finally:
            if head is not None:
                head.close(graceful=False)
            if workers is not None:
                workers.stop(graceful=False)
    if out_dir is not None:
        report.write(out_dir)
    return report


def logits_of(report: RunReport) -> list[np.ndarray]:
    """The logits kept by a run with ``keep_logits`` (first prompt)."""
    return report.last.logits if report.last else []
