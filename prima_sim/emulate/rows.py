"""One emulated plan as a row of ``reports/emulation.csv``: the emulation turns its records into the report's rows
(reports reads rows and never imports the emulation)."""

from __future__ import annotations

import math
import statistics
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from prima_sim import __version__
from prima_sim.devices.model import ModelProfile
from prima_sim.emulate.records import PlanRun
from prima_sim.emulate.scenario import Scenario
from prima_sim.metrics import percentile
from prima_sim.reports.emulation import error_pct
from prima_sim.workload import Workload


def _median_per_device(reps: Sequence[Mapping[str, Mapping[str, float]]]) -> dict[str, dict[str, float]]:
    out: dict[str, dict[str, float]] = {}
    for dev in {d for r in reps for d in r}:
        cols = {c for r in reps for c in r.get(dev, {})}
        out[dev] = {c: statistics.median([r[dev][c] for r in reps if dev in r and c in r[dev]]) for c in cols}
    return out


def _per_device(per_device: Mapping[str, Mapping[str, float]], col: str, names: Sequence[str]) -> str:
    """``D0:12.3;D1:4.5``: a per-device column of a summary in milliseconds per decode token."""
    return ";".join(
        f"{n}:{1e3 * per_device[n][col]:.1f}" for n in names if n in per_device and col in per_device[n]
    )


def make_row(sc: Scenario, model_path: Path, model: ModelProfile, wl: Workload, pr: PlanRun, reps: int, host: str,
             date: str, run_id: str, runtime_anon: int) -> dict[str, Any]:  # fmt: skip
    """The CSV row of one plan of an emulation run."""
    plan = pr.plan
    lat = sorted(pr.token_latencies_s)
    meas = pr.measured_tpot_s
    names = [d.name for d in plan.devices] if plan else []
    limits = {d.name: d.memory for d in sc.devices}
    pressure = {n: pr.memory[n].pressure for n in names if n in pr.memory}
    model_pressure = {n: max(0.0, pr.memory[n].anon - runtime_anon) / pr.memory[n].limit
                      for n in names if n in pr.memory and pr.memory[n].limit}  # fmt: skip
    # the predictions: from the profiles measured (inside the limits) before the runs, what the planner saw
    pred = pr.prediction
    sim, ana, sim_ttft, ana_ttft = (
        pred.sim_tpot_s,
        pred.analytic_tpot_s,
        pred.sim_ttft_s,
        pred.analytic_ttft_s,
    )
    status = (
        "ok"
        if plan is not None and pr.rep_tpot_s and not pr.run_errors
        else ("failed" if plan else "infeasible")
    )
    errors = "; ".join([e for e in [pred.error, *pr.run_errors] if e])
    return {
        "scenario": sc.name,
        "model": sc.model.label(),
        "model_bytes": model_path.stat().st_size,
        "n_layers": model.arch.n_layer,
        "scheduler": pr.label,
        "status": status,
        "devices": ";".join(names),
        "dropped": ";".join(d.name for d in plan.dropped) if plan else "",
        "k": plan.k if plan else "",
        "windows": ";".join(f"{d.name}:{d.window}" for d in plan.devices) if plan else "",
        "prefetch": sc.run.prefetch,
        "prompt_tokens": pr.prompt_tokens_measured or wl.prompt_tokens,
        "decode_tokens": wl.decode_tokens,
        "repetitions": len(pr.rep_tpot_s) if pr.rep_tpot_s else reps,
        "tpot_analytic_s": ana,
        "tpot_sim_s": sim,
        "tpot_meas_s": meas,
        "tpot_meas_min_s": min(pr.rep_tpot_s) if pr.rep_tpot_s else math.nan,
        "tpot_meas_max_s": max(pr.rep_tpot_s) if pr.rep_tpot_s else math.nan,
        "tpot_meas_p10_s": percentile(lat, 10) if lat else math.nan,
        "tpot_meas_p90_s": percentile(lat, 90) if lat else math.nan,
        "tpot_meas_spread_pct": (
            100.0 * (max(pr.rep_tpot_s) - min(pr.rep_tpot_s)) / meas
            if len(pr.rep_tpot_s) > 1 and meas > 0
            else math.nan
        ),
        "ttft_analytic_s": ana_ttft,
        "ttft_sim_s": sim_ttft,
        "ttft_meas_s": pr.measured_ttft_s,
        "err_sim_pct": error_pct(sim, meas),
        "err_analytic_pct": error_pct(ana, meas),
        "err_ttft_sim_pct": error_pct(sim_ttft, pr.measured_ttft_s),
        "err_ttft_analytic_pct": error_pct(ana_ttft, pr.measured_ttft_s),
        "tpot_sim_run_s": pr.run_sim_tpot_s,
        "tpot_analytic_run_s": pr.run_analytic_tpot_s,
        "err_sim_run_pct": error_pct(pr.run_sim_tpot_s, meas),
        "err_analytic_run_pct": error_pct(pr.run_analytic_tpot_s, meas),
        "ttft_sim_run_s": pr.run_sim_ttft_s,
        "err_ttft_sim_run_pct": error_pct(pr.run_sim_ttft_s, pr.measured_ttft_s),
        "run_bw_gbps": ";".join(f"{n}:{v / 1e9:.2f}" for n, v in pr.run_rates.items()),
        "mem_limits_mib": ";".join(f"{n}:{limits[n] / 2**20:.0f}" for n in names if n in limits),
        "mem_pressure": ";".join(f"{n}:{100 * v:.1f}%" for n, v in pressure.items()),
        "mem_pressure_max_pct": 100 * max(pressure.values()) if pressure else math.nan,
        "mem_pressure_model_max_pct": 100 * max(model_pressure.values()) if model_pressure else math.nan,
        "page_cache_mib": ";".join(f"{n}:{pr.memory[n].file / 2**20:.0f}" for n in names if n in pr.memory),
        "sim_mem_pressure_max_pct": 100 * max(pred.sim_memory_pressure.values())
        if pred.sim_memory_pressure
        else math.nan,
        "runtime_anon_mib": runtime_anon / 2**20 if runtime_anon else math.nan,
        "disk_read_mib_per_token": (
            sum(pr.decode_disk_bytes_per_token.values()) / 2**20
            if pr.decode_disk_bytes_per_token
            else math.nan
        ),
        "disk_read_mib_per_token_reps": ";".join(f"{v / 2**20:.1f}" for v in pr.rep_decode_disk_bytes),
        "disk_read_per_device_mib": ";".join(
            f"{n}:{v / 2**20:.1f}" for n, v in pr.decode_disk_bytes_per_token.items()
        ),
        "sim_disk_read_mib_per_token": pred.sim_disk_bytes_per_token / 2**20
        if math.isfinite(pred.sim_disk_bytes_per_token)
        else math.nan,
        "cpu_throttled_ms_per_token": ";".join(
            f"{n}:{1e3 * pr.memory[n].cpu_throttled_s / max(1, len(pr.token_latencies_s)):.1f}"
            for n in names
            if n in pr.memory
        ),
        "compute_sim_ms": _per_device(pred.sim_per_device, "compute_s", names),
        "compute_meas_ms": _per_device(_median_per_device(pr.meas_per_device), "compute_s", names),
        "recv_wait_meas_ms": _per_device(_median_per_device(pr.meas_per_device), "recv_wait_s", names),
        "host": host,
        "date": date,
        "run_id": run_id,
        "version": __version__,
        "error": errors,
    }
