"""What the emulation records of one plan: its predictions and its measurements (no drawing, no reports).

:class:`PlanRun` is filled in as the emulation goes (prediction, simulation, repetitions); ``prima_sim.reports.emulation``
reads it to write rows and plots, and imports it from here, not from the emulator that fills it.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass, field
from pathlib import Path

from prima_sim.devices.cluster import Cluster
from prima_sim.emulate.memory import MemoryPeak
from prima_sim.metrics import Span
from prima_sim.plan import Plan


@dataclass
class PlanRun:
    """One plan of the scenario: its prediction, simulation and measurements."""

    label: str
    plan: Plan | None
    cluster: Cluster | None
    error: str = ""
    sim_tpot_s: float = math.nan
    sim_ttft_s: float = math.nan
    sim_spans: list[Span] = field(default_factory=list)
    sim_steps: list[tuple[int, str, int, float, float]] = field(default_factory=list)
    sim_memory_pressure: dict[str, float] = field(default_factory=dict)
    sim_disk_bytes_per_token: float = math.nan
    rep_tpot_s: list[float] = field(default_factory=list)
    rep_ttft_s: list[float] = field(default_factory=list)
    token_latencies_s: list[float] = field(default_factory=list)
    measured_spans: list[Span] = field(default_factory=list)
    measured_steps: list[tuple[int, str, int, float, float]] = field(default_factory=list)
    memory: dict[str, MemoryPeak] = field(default_factory=dict)
    run_errors: list[str] = field(default_factory=list)
    prompt_tokens_measured: int = 0
    sim_per_device: dict[str, dict[str, float]] = field(default_factory=dict)
    shard_dir: Path | None = None
    run_dir: Path | None = None
    rep_sim_tpot_s: list[float] = field(default_factory=list)
    rep_sim_ttft_s: list[float] = field(default_factory=list)
    rep_analytic_tpot_s: list[float] = field(default_factory=list)
    rep_analytic_ttft_s: list[float] = field(default_factory=list)
    run_rates: dict[str, list[float]] = field(default_factory=dict)
    meas_per_device: list[dict[str, dict[str, float]]] = field(default_factory=list)
    decode_disk_bytes: dict[str, list[float]] = field(default_factory=dict)

    @property
    def decode_disk_bytes_per_token(self) -> dict[str, float]:
        """Per device: bytes read from disk per decode token (median over the repetitions)."""
        return {n: statistics.median(v) for n, v in self.decode_disk_bytes.items() if v}

    @property
    def analytic_tpot_s(self) -> float:
        """The planner's analytic TPOT."""
        return self.plan.prediction.tpot_s if self.plan and self.plan.prediction else math.nan

    @property
    def analytic_ttft_s(self) -> float:
        """The planner's analytic TTFT."""
        return self.plan.prediction.ttft_s if self.plan and self.plan.prediction else math.nan

    @property
    def run_sim_tpot_s(self) -> float:
        """Simulated TPOT with the rates measured around the runs (median over the repetitions)."""
        return statistics.median(self.rep_sim_tpot_s) if self.rep_sim_tpot_s else math.nan

    @property
    def run_sim_ttft_s(self) -> float:
        """Simulated TTFT with the rates measured around the runs."""
        return statistics.median(self.rep_sim_ttft_s) if self.rep_sim_ttft_s else math.nan

    @property
    def run_analytic_tpot_s(self) -> float:
        """Analytic TPOT with the rates measured around the runs."""
        return statistics.median(self.rep_analytic_tpot_s) if self.rep_analytic_tpot_s else math.nan

    @property
    def run_analytic_ttft_s(self) -> float:
        """Analytic TTFT with the rates measured around the runs."""
        return statistics.median(self.rep_analytic_ttft_s) if self.rep_analytic_ttft_s else math.nan

    @property
    def measured_tpot_s(self) -> float:
        """Median of every decode token of every repetition (docs/metrics.md's TPOT over the pooled steps)."""
        if self.token_latencies_s:
            return statistics.median(self.token_latencies_s)
        return statistics.median(self.rep_tpot_s) if self.rep_tpot_s else math.nan

    @property
    def measured_ttft_s(self) -> float:
        """Median of the repetitions' TTFTs."""
        return statistics.median(self.rep_ttft_s) if self.rep_ttft_s else math.nan
