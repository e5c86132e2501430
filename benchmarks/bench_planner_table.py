"""Halda against every scheduler, and the cost model against the simulator, on every bundled cluster x model.

    python benchmarks/bench_planner_table.py [--models llama3-8b,...] [--clusters paper-d1-d4,...] [--no-sim]
        [--csv reports/planner-table.csv]

For every bundled cluster and catalog model (default: the paper's nine model sizes) it plans with every
scheduler, prints Halda's predicted TPOT beside the best other scheduler's (a loss is Halda slower than any of
them: there must be none), and simulates Halda's plan to compare the cost model's TPOT with the simulator's
(a short decode run). The summary gives the number of losses and, over the plans that page, the distribution of
|analytic - simulated| / simulated.
"""

from __future__ import annotations

import argparse
import csv
import math
import statistics
import sys
import time
from pathlib import Path

from prima_sim.devices.catalog import catalog_model
from prima_sim.devices.cluster import bundled_names, load_cluster
from prima_sim.errors import InfeasiblePlanError
from prima_sim.halda.planner import SCHEDULERS, make_plan
from prima_sim.sim import SimConfig, simulate
from prima_sim.workload import Workload

PAPER_MODELS = ("llama3-8b", "llama3-14b", "llama1-30b", "llama3-45b", "llama3-60b", "llama1-65b", "llama3-70b",
                "qwen2.5-32b", "qwen2.5-72b")  # fmt: skip


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default=",".join(PAPER_MODELS))
    ap.add_argument("--clusters", default=",".join(c for c in bundled_names("clusters") if c != "default"))
    ap.add_argument("--no-sim", action="store_true", help="skip the simulations")
    ap.add_argument("--csv", help="also write the rows to this CSV")
    args = ap.parse_args()
    wl = Workload(n_ctx=1024, prompt_tokens=64, decode_tokens=128)
    sim_wl = Workload(n_ctx=1024, prompt_tokens=16, decode_tokens=8)
    rows, losses, errs = [], 0, []
    print(f"{'cluster':<17}{'model':<13}{'halda ms':>10}{'k':>3}  {'windows':<24}{'best other':<11}{'ms':>10}"
          f"{'prima ms':>10}{'sim ms':>10}{'err':>8}  bound")  # fmt: skip
    for cname in args.clusters.split(","):
        cl = load_cluster(cname)
        for mname in args.models.split(","):
            m = catalog_model(mname)
            t0 = time.perf_counter()
            h = make_plan(cl, m, wl)
            solve = time.perf_counter() - t0
            others = {}
            for s in SCHEDULERS[1:]:
                try:
                    others[s] = make_plan(cl, m, wl, s).prediction.tpot_s  # type: ignore[union-attr]
                except InfeasiblePlanError:
                    others[s] = math.inf
            best_s = min(others, key=lambda s: others[s])
            assert h.prediction is not None
            ht = h.prediction.tpot_s
            loss = ht > others[best_s] * (1 + 1e-9)
            losses += loss
            paging = any(t.read_bytes > 1e7 for t in h.prediction.per_device)
            sim_t = err = math.nan
            if not args.no_sim:
                hs = make_plan(cl, m, sim_wl)
                assert hs.prediction is not None
                sim_t = simulate(hs, cl, m, sim_wl, SimConfig(record_spans=False)).tpot_s
                err = 100 * (hs.prediction.tpot_s - sim_t) / sim_t
                if paging:
                    errs.append(abs(err))
            row = {"cluster": cname, "model": mname, "halda_tpot_s": ht, "k": h.k,
                   "windows": " ".join(f"{d.name}:{d.window}/{d.gpu_layers}" for d in h.devices),
                   "best_other": best_s, "best_other_tpot_s": others[best_s], "prima_tpot_s": others["prima"],
                   "sim_tpot_s": sim_t, "err_vs_sim_pct": err, "paging": paging, "bound": h.prediction.bound,
                   "solve_s": solve, "loss": loss}  # fmt: skip
            rows.append(row)
            win = ",".join(str(w) for w in h.windows)
            print(f"{cname:<17}{mname:<13}{ht * 1e3:>10.1f}{h.k:>3}  {win:<24}{best_s:<11}{others[best_s] * 1e3:>10.1f}"
                  f"{others['prima'] * 1e3:>10.1f}{sim_t * 1e3:>10.1f}{err:>+7.1f}%  {h.prediction.bound}"
                  + ("  LOSS" if loss else ""), flush=True)  # fmt: skip
    print(f"\n{len(rows)} cases, Halda slower than another scheduler in {losses}")
    if errs:
        print(f"cost model vs simulator on the {len(errs)} paging plans: median {statistics.median(errs):.1f}%, "
              f"max {max(errs):.1f}%, within 10%: {sum(e <= 10 for e in errs)}")  # fmt: skip
    if args.csv:
        Path(args.csv).parent.mkdir(parents=True, exist_ok=True)
        with open(args.csv, "w", newline="") as fh:
            wr = csv.DictWriter(fh, fieldnames=list(rows[0]))
            wr.writeheader()
            wr.writerows(rows)
    return 1 if losses else 0


if __name__ == "__main__":
    sys.exit(main())
