"""Predicted-vs-measured CSV: appending rows, summarising errors, the ``prima-sim report`` command, plots."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import pytest

from prima_sim.cli.main import main
from prima_sim.reports.emulation import (
    COLUMNS,
    append_rows,
    format_summary,
    read_rows,
    scatter,
    summarize_rows,
)


def _row(scenario: str, sched: str, sim: float, meas: float, ana: float, **over: object) -> dict:
    r = dict.fromkeys(COLUMNS, "")
    r.update(scenario=scenario, scheduler=sched, status="ok", k=1, tpot_sim_s=sim, tpot_meas_s=meas,
             tpot_analytic_s=ana, err_sim_pct=100 * (sim - meas) / meas, err_analytic_pct=100 * (ana - meas) / meas,
             mem_pressure_max_pct=4.0, mem_pressure_model_max_pct=1.0)  # fmt: skip
    r.update(over)
    return r


def test_append_and_summarize(tmp_path: Path) -> None:
    p = tmp_path / "e.csv"
    append_rows(p, [_row("a", "halda", 1.1, 1.0, 1.3), _row("a", "single-X", 5.0, 5.0, 6.0)])
    append_rows(
        p, [_row("b", "halda", 0.9, 1.0, 1.0), _row("a", "halda", 1.02, 1.0, 1.3)]
    )  # a re-run of a/halda
    rows = read_rows(p)
    assert len(rows) == 4
    s = summarize_rows(rows)
    assert s["measured"] == 3  # the latest a/halda replaces the first
    assert s["tpot_sim_error"]["max_pct"] == pytest.approx(10.0)
    assert s["tpot_sim_error"]["median_pct"] == pytest.approx(2.0)
    assert s["tpot_analytic_error"]["max_pct"] == pytest.approx(30.0)
    (ratio,) = s["single_vs_ring"]
    assert ratio["measured_ratio"] == pytest.approx(5.0) and ratio["simulated_ratio"] == pytest.approx(
        5.0 / 1.02
    )
    assert summarize_rows(rows, all_rows=True)["measured"] == 4
    text = format_summary(s)
    assert "median 2.0%" in text and "single-X / halda" in text
    assert "TTFT simulated with rates and prefill measured" not in text  # no run-phase TTFT in these rows
    append_rows(p, [_row("c", "halda", 1.0, 1.0, 1.0, ttft_sim_s=0.9, ttft_sim_run_s=0.95, ttft_meas_s=1.0,
                         err_ttft_sim_pct=-10.0, err_ttft_sim_run_pct=-5.0)])  # fmt: skip
    s = summarize_rows(read_rows(p))
    assert s["ttft_sim_error"]["max_pct"] == pytest.approx(10.0) and s["ttft_sim_run_error"]["n"] == 1
    assert (
        "TTFT simulated with rates and prefill measured during the runs - measured| / measured: median 5.0%"
        in (format_summary(s))
    )


def test_paging_bytes_are_compared_per_plan(tmp_path: Path) -> None:
    """Bytes read per token: a plan pages when either side reads >= 1 MiB per token; the summary counts the plans
    whose simulated bytes are within 10% of the measured median, and those within 10% of the repetitions' range."""
    p = tmp_path / "e.csv"
    append_rows(p, [
        _row("a", "halda", 1.0, 1.0, 1.0, disk_read_mib_per_token=0.2, sim_disk_read_mib_per_token=0.0),  # resident
        _row("a", "k2", 1.0, 1.0, 1.0, disk_read_mib_per_token=100.0, sim_disk_read_mib_per_token=105.0,
             disk_read_mib_per_token_reps="100.0;98.0;103.0"),
        _row("a", "stock", 1.0, 1.0, 1.0, disk_read_mib_per_token=3000.0, sim_disk_read_mib_per_token=2500.0,
             disk_read_mib_per_token_reps="3000.0;2510.0;3100.0"),
        _row("b", "halda", 1.0, 1.0, 1.0, disk_read_mib_per_token=0.0, sim_disk_read_mib_per_token=50.0),
    ])  # fmt: skip
    s = summarize_rows(read_rows(p))
    pg = {(x["scenario"], x["scheduler"]): x for x in s["paging_bytes"]}
    assert set(pg) == {("a", "k2"), ("a", "stock"), ("b", "halda")}  # the resident plan is not a paging plan
    assert pg[("a", "k2")]["err_pct"] == pytest.approx(5.0) and pg[("a", "k2")]["in_reps"]
    assert pg[("a", "stock")]["err_pct"] == pytest.approx(-100 / 6) and pg[("a", "stock")]["in_reps"]
    assert pg[("b", "halda")]["reps_mib"] == [] and not pg[("b", "halda")]["in_reps"]
    assert pg[("b", "halda")]["err_pct"] == math.inf  # simulated paging where nothing was read
    text = format_summary(s)
    assert "within 10% on 1 of 3" in text and "range on 2 of 2" in text
    assert (
        "outside: a/stock: 3000 MiB measured (repetitions 3000, 2510, 3100), 2500 simulated (-16.7%)" in text
    )


def test_failed_rows_are_listed_not_counted(tmp_path: Path) -> None:
    p = tmp_path / "e.csv"
    append_rows(p, [_row("a", "halda", 1.0, math.nan, 1.0, status="failed", error="worker B was OOM-killed")])
    s = summarize_rows(read_rows(p))
    assert s["measured"] == 0 and "OOM" in s["failed"][0]


def test_old_header_is_migrated(tmp_path: Path) -> None:
    p = tmp_path / "e.csv"
    with p.open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["scenario", "scheduler", "tpot_sim_s", "tpot_meas_s", "status"])
        w.writerow(["old", "halda", "1", "1", "ok"])
    append_rows(p, [_row("new", "halda", 1.0, 1.0, 1.0)])
    rows = read_rows(p)
    assert [r["scenario"] for r in rows] == ["old", "new"] and tuple(rows[0]) == COLUMNS


def test_report_cli_and_plot(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    p = tmp_path / "e.csv"
    append_rows(p, [_row("a", "halda", 0.11, 0.1, 0.12), _row("a", "memsched", 0.2, 0.25, 0.3)])
    png = tmp_path / "s.png"
    assert main(["report", str(p), "--json", "--plot", str(png)]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["tpot_sim_error"]["n"] == 2 and png.stat().st_size > 1000
    assert main(["report", str(p)]) == 0
    assert "memsched" in capsys.readouterr().out
    assert main(["report", str(tmp_path / "missing.csv")]) == 2


def test_scatter_with_no_measured_rows(tmp_path: Path) -> None:
    assert scatter([], tmp_path / "x.png").is_file()
