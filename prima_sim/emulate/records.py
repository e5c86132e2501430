"""What the emulation records of one plan: its predictions and its measurements (no drawing, no reports).

Three frozen records, each written once by the step that knows it, and their sum:

- :class:`PlanPrediction`: the plan (with the planner's analytic prediction) and its simulation, before any
  run (:mod:`prima_sim.emulate.predict`);
- :class:`RunMeasurement`: one real run (repetition) of the plan (:mod:`prima_sim.emulate.runs`);
- :class:`RunPrediction`: the plan predicted again with the streaming rates measured around the runs;
- :class:`PlanRun`: one plan's prediction, runs and re-prediction, with the medians the report shows.

``prima_sim.reports.emulation`` reads :class:`PlanRun` to write rows and plots, and imports it from here, not from
the emulator that makes it.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Mapping
from dataclasses import dataclass, field

from prima_sim.devices.cluster import Cluster
from prima_sim.emulate.memory import MemoryPeak
from prima_sim.metrics import Span
from prima_sim.plan import Plan

Step = tuple[int, str, int, float, float]
"""One step of a timeline: (token, phase, batch tokens, start s, end s)."""


@dataclass(frozen=True)
class PlanPrediction:
    """One plan of the scenario and what was predicted for it from the profiles measured before the runs.

    Attributes:
        label: the scheduler (or manual plan, or ``single-<device>``).
        plan: None when no plan could be made (``error`` says why).
        cluster: the cluster the plan was made for.
        error: why there is no plan, or why its simulation failed ('' if neither).
        sim_*: the simulation's TPOT, TTFT, timeline, memory pressure, disk reads and per-device summary.
    """

    label: str
    plan: Plan | None
    cluster: Cluster | None
    error: str = ""
    sim_tpot_s: float = math.nan
    sim_ttft_s: float = math.nan
    sim_spans: tuple[Span, ...] = ()
    sim_steps: tuple[Step, ...] = ()
    sim_memory_pressure: Mapping[str, float] = field(default_factory=dict)
    sim_disk_bytes_per_token: float = math.nan
    sim_per_device: Mapping[str, Mapping[str, float]] = field(default_factory=dict)

    @property
    def analytic_tpot_s(self) -> float:
        """The planner's analytic TPOT."""
        return self.plan.prediction.tpot_s if self.plan and self.plan.prediction else math.nan

    @property
    def analytic_ttft_s(self) -> float:
        """The planner's analytic TTFT."""
        return self.plan.prediction.ttft_s if self.plan and self.plan.prediction else math.nan

    @property
    def runnable(self) -> bool:
        """There is a plan and its simulation did not fail."""
        return self.plan is not None and not self.error


@dataclass(frozen=True)
class RunMeasurement:
    """One real run of a plan (one repetition).

    Attributes:
        rep: the repetition's index.
        error: what went wrong ('' if the run finished); a failed run has only ``memory``.
        memory: per device, the cgroup's peaks during the run.
        tpot_s, ttft_s: the run's summary (median decode step, time to first token).
        token_latencies_s: every decode step's latency.
        per_device: the run's per-device summary (compute, receive wait, ... per decode token).
        decode_disk_bytes: per device, bytes read from disk per decode token (empty when unknown).
        spans, steps: the measured timeline.
        prompt_tokens: prompt tokens the head counted (0 if unknown).
    """

    rep: int
    error: str = ""
    memory: Mapping[str, MemoryPeak] = field(default_factory=dict)
    tpot_s: float = math.nan
    ttft_s: float = math.nan
    token_latencies_s: tuple[float, ...] = ()
    per_device: Mapping[str, Mapping[str, float]] = field(default_factory=dict)
    decode_disk_bytes: Mapping[str, float] = field(default_factory=dict)
    spans: tuple[Span, ...] = ()
    steps: tuple[Step, ...] = ()
    prompt_tokens: int = 0

    @property
    def ok(self) -> bool:
        """The run finished and was measured."""
        return not self.error


@dataclass(frozen=True)
class RunPrediction:
    """A plan predicted again (simulation and cost model) with the streaming rates measured around the runs.

    Attributes:
        rates: per device, the layers' streaming rate used (bytes/s).
        sim_tpot_s, sim_ttft_s, analytic_tpot_s, analytic_ttft_s: the predictions (NaN if the simulation failed).
    """

    rates: Mapping[str, float] = field(default_factory=dict)
    sim_tpot_s: float = math.nan
    sim_ttft_s: float = math.nan
    analytic_tpot_s: float = math.nan
    analytic_ttft_s: float = math.nan


@dataclass(frozen=True)
class PlanRun:
    """One plan of the scenario: its prediction, its runs (in order) and its prediction at run time."""

    prediction: PlanPrediction
    runs: tuple[RunMeasurement, ...] = ()
    at_run: RunPrediction | None = None

    @property
    def label(self) -> str:
        """The plan's label."""
        return self.prediction.label

    @property
    def plan(self) -> Plan | None:
        """The plan (None: none could be made)."""
        return self.prediction.plan

    @property
    def ok_runs(self) -> tuple[RunMeasurement, ...]:
        """The runs that finished."""
        return tuple(r for r in self.runs if r.ok)

    @property
    def run_errors(self) -> list[str]:
        """``rep N: what went wrong`` of every failed run."""
        return [f"rep {r.rep}: {r.error}" for r in self.runs if r.error]

    @property
    def rep_tpot_s(self) -> list[float]:
        """TPOT of every finished run."""
        return [r.tpot_s for r in self.ok_runs]

    @property
    def rep_ttft_s(self) -> list[float]:
        """TTFT of every finished run."""
        return [r.ttft_s for r in self.ok_runs]

    @property
    def token_latencies_s(self) -> list[float]:
        """Every decode step of every finished run."""
        return [t for r in self.ok_runs for t in r.token_latencies_s]

    @property
    def meas_per_device(self) -> list[Mapping[str, Mapping[str, float]]]:
        """The per-device summary of every finished run."""
        return [r.per_device for r in self.ok_runs]

    @property
    def memory(self) -> dict[str, MemoryPeak]:
        """Per device, the peaks over every run (failed ones included)."""
        out: dict[str, MemoryPeak] = {}
        for r in self.runs:
            for n, pk in r.memory.items():
                out[n] = out[n].merge(pk) if n in out else pk
        return out

    @property
    def timeline_run(self) -> RunMeasurement | None:
        """The run whose timeline is shown: the first finished run with spans, else the last finished run."""
        ok = self.ok_runs
        return next((r for r in ok if r.spans), ok[-1] if ok else None)

    @property
    def measured_spans(self) -> tuple[Span, ...]:
        """The measured timeline (:attr:`timeline_run`)."""
        r = self.timeline_run
        return r.spans if r else ()

    @property
    def measured_steps(self) -> tuple[Step, ...]:
        """The measured steps (:attr:`timeline_run`)."""
        r = self.timeline_run
        return r.steps if r else ()

    @property
    def prompt_tokens_measured(self) -> int:
        """Prompt tokens the head counted (:attr:`timeline_run`; 0 if unknown)."""
        r = self.timeline_run
        return r.prompt_tokens if r else 0

    @property
    def decode_disk_bytes_per_token(self) -> dict[str, float]:
        """Per device: bytes read from disk per decode token (median over the repetitions)."""
        per: dict[str, list[float]] = {}
        for r in self.ok_runs:
            for n, v in r.decode_disk_bytes.items():
                per.setdefault(n, []).append(v)
        return {n: statistics.median(v) for n, v in per.items() if v}

    @property
    def rep_decode_disk_bytes(self) -> list[float]:
        """Bytes read from disk per decode token, all devices together, of every finished run that measured them."""
        return [sum(r.decode_disk_bytes.values()) for r in self.ok_runs if r.decode_disk_bytes]

    @property
    def run_rates(self) -> Mapping[str, float]:
        """Per device: the layers' streaming rate measured around the runs (empty without)."""
        return self.at_run.rates if self.at_run else {}

    @property
    def run_sim_tpot_s(self) -> float:
        """Simulated TPOT with the rates measured around the runs."""
        return self.at_run.sim_tpot_s if self.at_run else math.nan

    @property
    def run_sim_ttft_s(self) -> float:
        """Simulated TTFT with the rates measured around the runs."""
        return self.at_run.sim_ttft_s if self.at_run else math.nan

    @property
    def run_analytic_tpot_s(self) -> float:
        """Analytic TPOT with the rates measured around the runs."""
        return self.at_run.analytic_tpot_s if self.at_run else math.nan

    @property
    def run_analytic_ttft_s(self) -> float:
        """Analytic TTFT with the rates measured around the runs."""
        return self.at_run.analytic_ttft_s if self.at_run else math.nan

    @property
    def measured_tpot_s(self) -> float:
        """Median of every decode token of every repetition (docs/metrics.md's TPOT over the pooled steps)."""
        lat = self.token_latencies_s
        if lat:
            return statistics.median(lat)
        rep = self.rep_tpot_s
        return statistics.median(rep) if rep else math.nan

    @property
    def measured_ttft_s(self) -> float:
        """Median of the repetitions' TTFTs."""
        rep = self.rep_ttft_s
        return statistics.median(rep) if rep else math.nan
