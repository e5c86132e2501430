"""Re-predict a measured emulation suite with the current cost model and simulator (the measurements stay).

    python benchmarks/repredict_emulation.py --runs /var/tmp/prima-sim-emulation-... [--reports reports]

A suite run (``bench_emulation.py --out DIR``) keeps, per scenario, the cluster the plans were made on (profiles
measured inside the device limits, executor footprint subtracted), every plan and the rows it wrote. Measuring takes
an hour; predicting takes seconds. This script predicts every measured plan again, analytically and by simulation,
with the code as it is now, and writes ``emulation-repredicted.csv`` (the suite's columns; the prediction columns
replaced, the re-predictions with the rates measured during the runs blanked because those rates are not kept),
``emulation-repredicted-summary.txt`` and the scatter plot ``emulation-repredicted-scatter.png`` beside the suite's
own files, so a model change can be judged on the same measurements. The head's one-device baselines
(``single-<head>``, ``llama.cpp-<head>``) are predicted on the saved cluster cut down to the head; those on another
device keep their original predictions (their one-device cluster, with the head's footprint, is not saved). A run
made since 2026-12-07 keeps its ``scenario.json``; older ones are matched to the bundled scenario of their name.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Any

from prima_sim.devices.cluster import Cluster
from prima_sim.devices.model import ModelProfile, model_profile_from_gguf
from prima_sim.emulate.disk import with_read_limits
from prima_sim.emulate.models import ensure_model
from prima_sim.emulate.scenario import Scenario, load_scenario
from prima_sim.halda.costmodel import predict
from prima_sim.plan import Plan
from prima_sim.reports.emulation import (
    COLUMNS,
    ONE_DEVICE,
    append_rows,
    format_summary,
    read_rows,
    scatter,
    summarize_rows,
)
from prima_sim.schema import load_model
from prima_sim.sim import SimConfig, simulate
from prima_sim.workload import Workload

BLANKED = ("tpot_sim_run_s", "tpot_analytic_run_s", "err_sim_run_pct", "err_analytic_run_pct", "ttft_sim_run_s",
           "err_ttft_sim_run_pct")  # fmt: skip


def _pct(pred: float, meas: float) -> float:
    return 100.0 * (pred - meas) / meas if meas and math.isfinite(pred) and math.isfinite(meas) else math.nan


def repredict(scenario_dir: Path, models: dict[str, ModelProfile]) -> list[dict[str, Any]]:
    """The scenario's rows with predictions made by the current code."""
    rows: list[dict[str, Any]] = json.loads((scenario_dir / "rows.json").read_text())
    cluster = Cluster.model_validate_json((scenario_dir / "cluster.json").read_text())
    throttled: Cluster | None = None
    out = []
    for r in rows:
        pf = scenario_dir / "plans" / f"{r['scheduler']}.json"
        one_device = r["scheduler"].startswith(ONE_DEVICE)
        device = r["scheduler"].split("-", 1)[1] if one_device else ""
        # a one-device baseline was planned on the saved cluster cut down to its device; that cluster is the saved one
        # only where the device is the head (elsewhere it got the head's footprint): others are kept as predicted
        if r.get("status") != "ok" or not pf.exists() or (one_device and device != cluster.head):
            out.append(r)
            continue
        if throttled is None:
            # the scenario as run (kept since 2026-12-07), else the bundled one of that name: one per directory
            saved = scenario_dir / "scenario.json"
            sc = load_model(Scenario, saved) if saved.is_file() else load_scenario(r["scenario"])
            # runs made before profiles said so: every device with a disk_read limit read a blk-throttled disk
            throttled = with_read_limits(cluster, sc)
        on = throttled.alone(throttled.device(device)) if one_device else throttled
        if sc.name not in models:
            models[sc.name] = model_profile_from_gguf(ensure_model(sc.model))
        model = models[sc.name]
        plan = Plan.load(pf)
        wl = Workload(
            n_ctx=plan.n_ctx, prompt_tokens=int(r["prompt_tokens"]), decode_tokens=int(r["decode_tokens"])
        )
        prefetch = str(r["prefetch"]).lower() == "true"
        ana = predict(plan, on, model, wl, prefetch=prefetch)
        sim = simulate(plan, on, model, wl, SimConfig(prefetch=prefetch, warm=True))
        meas, meas_ttft = float(r["tpot_meas_s"]), float(r["ttft_meas_s"])
        disk = sum(st["sim_disk_bytes_per_decode_token"] for st in sim.device_stats.values())
        new = dict(r)
        new.update({
            "tpot_analytic_s": ana.tpot_s, "tpot_sim_s": sim.tpot_s, "ttft_analytic_s": ana.ttft_s,
            "ttft_sim_s": sim.ttft_s, "err_sim_pct": _pct(sim.tpot_s, meas), "err_analytic_pct": _pct(ana.tpot_s, meas),
            "err_ttft_sim_pct": _pct(sim.ttft_s, meas_ttft), "err_ttft_analytic_pct": _pct(ana.ttft_s, meas_ttft),
            "sim_disk_read_mib_per_token": disk / 2**20 if math.isfinite(disk) else math.nan,
        })  # fmt: skip
        for c in BLANKED:
            new[c] = math.nan
        out.append(new)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument(
        "--runs", required=True, help="the suite's --out directory (one sub-directory per scenario)"
    )
    ap.add_argument("--reports", default="reports", help="where to write the re-predicted CSV and summary")
    args = ap.parse_args()
    runs, reports = Path(args.runs), Path(args.reports)
    dirs = sorted(d for d in runs.iterdir() if (d / "rows.json").is_file())
    if not dirs:
        print(f"repredict: no scenario directories with rows.json under {runs}", file=sys.stderr)
        return 2
    models: dict[str, ModelProfile] = {}
    rows = [row for d in dirs for row in repredict(d, models)]
    csv_path = reports / "emulation-repredicted.csv"
    csv_path.unlink(missing_ok=True)
    append_rows(csv_path, rows)
    text = format_summary(summarize_rows(read_rows(csv_path)))
    (reports / "emulation-repredicted-summary.txt").write_text(
        f"the suite's measurements ({runs.name}), predictions re-made by the current code "
        f"(benchmarks/repredict_emulation.py); columns as emulation.csv ({len(COLUMNS)}), run-rate re-predictions "
        f"blanked\n\n{text}\n"
    )
    png = scatter(read_rows(csv_path), reports / "emulation-repredicted-scatter.png",
                  title=f"predicted vs measured TPOT ({runs.name}, re-predicted)")  # fmt: skip
    print(text)
    print(f"wrote {csv_path}, {png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
