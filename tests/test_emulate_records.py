"""A plan's records (prediction, runs, prediction at run time) and the report row made of them."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import pytest

from prima_sim.emulate.memory import MemoryPeak
from prima_sim.emulate.records import PlanPrediction, PlanRun, RunMeasurement, RunPrediction
from prima_sim.emulate.scenario import Scenario
from prima_sim.metrics import Span, SpanKind
from prima_sim.testing import smollm2_path
from prima_sim.workload import Workload


def _span(t: float) -> Span:
    return Span("A", SpanKind.COMPUTE, t, t + 0.1, 1)


def _run(rep: int, tpot: float, **over: object) -> RunMeasurement:
    base: dict = {
        "memory": {"A": MemoryPeak(limit=1000, anon=100 * (rep + 1), file=10, cpu_throttled_s=0.5)},
        "tpot_s": tpot, "ttft_s": 10 * tpot, "token_latencies_s": (tpot, tpot),
        "per_device": {"A": {"compute_s": tpot / 2}}, "decode_disk_bytes": {"A": 1000.0 * (rep + 1)},
        "steps": ((rep, "decode", 1, 0.0, tpot),), "prompt_tokens": 7 + rep,
    }  # fmt: skip
    base.update(over)
    return RunMeasurement(rep, **base)


def test_records_are_frozen() -> None:
    pred = PlanPrediction("halda", None, None, error="plan: no")
    with pytest.raises(dataclasses.FrozenInstanceError):
        pred.error = "x"  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        _run(0, 0.1).tpot_s = 1.0  # type: ignore[misc]
    assert not pred.runnable and math.isnan(pred.analytic_tpot_s)


def test_plan_run_pools_the_finished_runs() -> None:
    pred = PlanPrediction("halda", None, None, sim_tpot_s=0.2)
    runs = (
        _run(0, 0.10),  # no spans: its timeline is shown only if no later run has one
        _run(1, 0.30, spans=(_span(0.0),)),
        _run(2, 0.20, spans=(_span(1.0),)),
        RunMeasurement(3, error="worker B died", memory={"A": MemoryPeak(limit=1000, anon=900, oom_kills=1)}),
    )
    pr = PlanRun(pred, runs, RunPrediction({"A": 4e9}, 0.21, 2.0, 0.19, 1.9))
    assert pr.label == "halda" and pr.rep_tpot_s == [0.10, 0.30, 0.20] and pr.rep_ttft_s == [1.0, 3.0, 2.0]
    assert pr.run_errors == ["rep 3: worker B died"]
    assert pr.measured_tpot_s == 0.20 and pr.measured_ttft_s == 2.0
    assert (
        pr.timeline_run is runs[1] and pr.measured_spans == (_span(0.0),) and pr.prompt_tokens_measured == 8
    )
    assert pr.memory["A"].anon == 900 and pr.memory["A"].oom_kills == 1  # the failed run's peaks count
    assert pr.decode_disk_bytes_per_token == {"A": 2000.0}
    assert pr.run_sim_tpot_s == 0.21 and pr.run_analytic_ttft_s == 1.9 and pr.run_rates == {"A": 4e9}
    none_shown = PlanRun(pred, (runs[0], _run(1, 0.3)))
    assert none_shown.timeline_run is none_shown.runs[1]  # the last finished run
    empty = PlanRun(pred)
    assert math.isnan(empty.measured_tpot_s) and empty.measured_spans == () and empty.run_rates == {}


def test_report_row_reads_the_records(tmp_path: Path) -> None:
    from prima_sim.emulate.rows import make_row
    from prima_sim.reports.emulation import COLUMNS
    from tests.factories import cluster, device, smollm2_model

    model = smollm2_model()
    sc = Scenario.model_validate({
        "name": "t", "model": {"gguf": str(smollm2_path())},
        "devices": [{"name": "A", "memory": "1 GiB"}, {"name": "B", "memory": "1 GiB"}],
    })  # fmt: skip
    wl = Workload(n_ctx=128, prompt_tokens=5, decode_tokens=4, n_ubatch=32)
    cl = cluster([device("A"), device("B")])
    from prima_sim.halda.planner import manual_plan

    plan = manual_plan(cl, model, wl, [15, 15])
    pred = PlanPrediction("m", plan, cl, sim_tpot_s=0.11, sim_ttft_s=1.0, sim_disk_bytes_per_token=0.0)
    pr = PlanRun(pred, (_run(0, 0.1), _run(1, 0.12)), RunPrediction({"A": 4e9, "B": 5e9}, 0.105))
    row = make_row(sc, smollm2_path(), model, wl, pr, 2, "host", "date", "rid", 50)
    assert set(row) == set(COLUMNS)
    assert row["status"] == "ok" and row["repetitions"] == 2 and row["prompt_tokens"] == 8
    assert row["tpot_meas_s"] == pytest.approx(0.11) and row["tpot_sim_s"] == 0.11
    assert row["err_sim_run_pct"] == pytest.approx(100 * (0.105 - 0.11) / 0.11)
    assert row["run_bw_gbps"] == "A:4.00;B:5.00"
    assert row["tpot_analytic_s"] == pytest.approx(plan.prediction.tpot_s)  # type: ignore[union-attr]
    failed = PlanRun(pred, (RunMeasurement(0, error="boom"),))
    assert make_row(sc, smollm2_path(), model, wl, failed, 2, "h", "d", "r", 0)["error"] == "rep 0: boom"
