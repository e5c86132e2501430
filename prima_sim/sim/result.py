"""What a simulation produced: spans, steps, per-token rows, a summary, and the files written from them.

Outputs (``prima-sim simulate --out DIR``), all deterministic for the same inputs and seed:

* ``tokens.csv`` - one row per (step, device) with :data:`prima_sim.metrics.TOKEN_COLUMNS`;
* ``summary.json`` - TTFT, TPOT statistics, per-device means, memory pressure and page-cache occupancy,
  disk and network counters, and the cost model's prediction of the same plan for comparison;
* ``trace.json`` - Chrome/Perfetto trace: one thread per device, then one per link;
* ``gantt.png`` (first decode tokens) and ``gantt_full.png`` (the whole run), drawn by
  :func:`prima_sim.reports.timeline.draw_simulation` (the simulator draws nothing).

Definitions are in ``docs/metrics.md``.
"""

from __future__ import annotations

import json
import math
import statistics
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

from prima_sim.metrics import Span, TokenRow, rows_from_spans, summarize, write_chrome_trace, write_token_csv
from prima_sim.plan import Plan, Prediction
from prima_sim.schema import atomic_write_text

SUMMARY_SCHEMA = "prima-sim.simulation/1"


def clean_json(obj: Any) -> Any:
    """NaN and infinities become None (strict JSON); tuples become lists."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: clean_json(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [clean_json(v) for v in obj]
    return obj


@dataclass
class SimResult:
    """The outcome of one simulation.

    Attributes:
        plan: the simulated plan.
        cluster_name, model_id: what it ran on.
        workload: prompt, decode tokens, context and micro-batch (a dict).
        config: simulator settings (a dict).
        devices: device names in ring order (head first).
        spans: every span, ordered by start time.
        steps: (token, phase, batch_tokens, t_start_s, t_end_s) of every step.
        disk_read: bytes read per (step, device).
        device_stats: per-device memory, disk and compute counters.
        network: per-link and per-medium counters.
        events: SimPy events scheduled.
        analytic: the cost model's prediction of the same plan and workload.
        produced: with speculative decoding, the tokens each decode step (a verification pass) produced; empty
            otherwise (one token per decode step).
    """

    plan: Plan
    cluster_name: str
    model_id: str
    workload: dict[str, int]
    config: dict[str, Any]
    devices: list[str]
    spans: list[Span]
    steps: list[tuple[int, str, int, float, float]]
    disk_read: dict[tuple[int, str], float]
    device_stats: dict[str, dict[str, float]]
    network: dict[str, Any]
    events: int
    analytic: Prediction | None = None
    lanes: list[str] = field(default_factory=list)
    produced: list[int] = field(default_factory=list)

    # --- views ---------------------------------------------------------------------------------------------------
    @cached_property
    def rows(self) -> list[TokenRow]:
        """Per-(step, device) rows (:data:`prima_sim.metrics.TOKEN_COLUMNS`)."""
        return rows_from_spans(self.spans, self.steps, self.devices, self.disk_read)

    @cached_property
    def stats(self) -> dict[str, Any]:
        """:func:`prima_sim.metrics.summarize` of the rows."""
        return summarize(self.rows)

    @property
    def tpot_s(self) -> float:
        """Median time per output token over the decode steps (as :func:`prima_sim.metrics.summarize`); with
        speculative decoding (:attr:`produced`), the decode steps' time over the tokens they produced."""
        dec = [t1 - t0 for _, phase, _, t0, t1 in self.steps if phase == "decode"]
        if self.produced:
            return sum(dec) / sum(self.produced)
        return statistics.median(dec) if dec else math.nan

    @property
    def tokens_per_pass(self) -> float:
        """Mean tokens per decode step: 1 without speculation, accepted drafts plus one with it."""
        return sum(self.produced) / len(self.produced) if self.produced else 1.0

    @property
    def ttft_s(self) -> float:
        """Time to first token: the prefill step's latency (as :func:`prima_sim.metrics.summarize`)."""
        pre = [t1 - t0 for _, phase, _, t0, t1 in self.steps if phase == "prefill"]
        return sum(pre) if pre else math.nan

    @property
    def memory_pressure(self) -> dict[str, float]:
        """Per device: the run's pinned RAM over total RAM (docs/metrics.md)."""
        return {n: s["memory_pressure"] for n, s in self.device_stats.items()}

    @property
    def sim_time_s(self) -> float:
        """Simulated time at the end of the last step."""
        return self.steps[-1][4] if self.steps else 0.0

    def differences(self) -> list[str]:
        """Why the simulated TPOT differs from the cost model's, device by device (docs/sim.md)."""
        out: list[str] = []
        per = self.stats["per_device"]
        analytic = {t.name: t for t in (self.analytic.per_device if self.analytic else ())}
        gb = 1e9
        for name in self.devices:
            st = self.device_stats[name]
            sim_b = st["sim_disk_bytes_per_decode_token"]
            ana_b = st["analytic_disk_bytes_per_token"]
            if not math.isfinite(sim_b):
                continue
            n_tok = self.workload["decode_tokens"] + 1
            wasted = st["wasted_prefetch_bytes"] / n_tok
            if sim_b > 1.05 * ana_b + 1e6:
                out.append(f"{name}: reads {sim_b / gb:.2f} GB per decode token where the cost model re-reads "
                           f"{ana_b / gb:.2f} GB ({st['mapped_weight_bytes'] / gb:.2f} GB of weights for "
                           f"{st['page_cache_capacity_bytes'] / gb:.2f} GB of page cache)")  # fmt: skip
            elif sim_b < 0.95 * ana_b - 1e6:
                out.append(f"{name}: reads {sim_b / gb:.2f} GB per decode token, less than the cost model's "
                           f"{ana_b / gb:.2f} GB (part of its weights stays resident)")  # fmt: skip
            if wasted > 1e6:
                out.append(f"{name}: {wasted / gb:.2f} GB per token of prefetched weights are evicted before use (the "
                           "prefetch-release conflict: a window does not fit beside what the device still needs)")  # fmt: skip
            wait_s = per.get(name, {}).get("disk_wait_s", 0.0)
            useful_s = max(0.0, sim_b - wasted) / st["disk_read_bps"]
            a = analytic.get(name)
            if (
                a is not None
                and a.read_bytes > 1e6
                and not a.prefetch
                and sim_b > 1e6
                and wait_s < 0.5 * a.disk_s
            ):
                out.append(f"{name}: the cost model charges {a.disk_s * 1e3:.0f} ms per token of page-fault stalls "
                           "(its windows do not fit the room left for them, so it assumes prefetch cannot hold them), "
                           f"but in the simulation part of each prefetch lands in time: it waits {wait_s * 1e3:.0f} ms")  # fmt: skip
            elif sim_b > 1e6 and wait_s < 0.9 * useful_s:
                out.append(f"{name}: its disk reads {sim_b / st['disk_read_bps'] * 1e3:.0f} ms per token but the "
                           f"device waits only {wait_s * 1e3:.0f} ms: the rest overlaps other devices' work "
                           "(prefetch) or its own compute (readahead)")  # fmt: skip
        if not out:
            out.append("the simulated step follows the cost model (remaining differences: each token's real KV "
                       "context, page-rounded embedding rows, chunk-sized reads)")  # fmt: skip
        return out

    def summary(self) -> dict[str, Any]:
        """The ``summary.json`` object (also what ``simulate --json`` prints)."""
        s = self.stats
        p = self.plan
        tpot = s["tpot_s"]
        return {
            "schema": SUMMARY_SCHEMA,
            "model": self.model_id,
            "cluster": self.cluster_name,
            "scheduler": p.scheduler,
            "k": p.k,
            "ring": list(self.devices),
            "windows": list(p.windows),
            "gpu_layers": [d.gpu_layers for d in p.devices],
            "plan_fingerprint": p.fingerprint(),
            "workload": dict(self.workload),
            "config": dict(self.config),
            "ttft_s": s["ttft_s"],
            "tpot_s": tpot,
            "tpot_mean_s": s["tpot_mean_s"],
            "tpot_p90_s": s["tpot_p90_s"],
            "tpot_min_s": s["tpot_min_s"],
            "tpot_max_s": s["tpot_max_s"],
            "n_decode": s["n_decode"],
            "tokens_per_s": 1.0 / tpot if tpot and tpot > 0 else None,
            "analytic": {"tpot_s": self.analytic.tpot_s, "ttft_s": self.analytic.ttft_s}
            if self.analytic
            else None,
            "differences": self.differences() if self.spans else [],
            "per_device": s["per_device"],
            "memory_pressure": self.memory_pressure,
            "devices": self.device_stats,
            "network": self.network,
            "sim_time_s": self.sim_time_s,
            "events": self.events,
        }

    # --- files ---------------------------------------------------------------------------------------------------
    def write(self, out_dir: str | Path) -> dict[str, Path]:
        """Write tokens.csv, summary.json and trace.json into ``out_dir`` (the timelines are drawn by
        :func:`prima_sim.reports.timeline.draw_simulation`)."""
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        return {
            "tokens": write_token_csv(self.rows, out / "tokens.csv"),
            "summary": atomic_write_text(
                out / "summary.json", json.dumps(clean_json(self.summary()), indent=2) + "\n"
            ),
            "trace": write_chrome_trace(self.spans, [*self.devices, *self.lanes], out / "trace.json"),
        }
