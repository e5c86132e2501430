"""Benchmark of the discrete-event simulator: wall time, events per second, and how cost grows.

    python benchmarks/bench_sim.py            # main case + scaling with devices, layers and tokens
    python benchmarks/bench_sim.py --sweep 1000 --jobs 2   # also time a sweep of 1000 cluster variants

Main case: the paper's D1-D6 cluster, Llama 3 70B Q4_K_M planned by Halda, 128 prompt tokens and 256 decode
tokens (target: at most 1 s). Wall time is the best of ``--repeat`` runs of ``simulate`` plus building the
per-token rows (what ``prima-sim simulate`` does before writing files). It also prints the must-emerge
numbers of docs/sim.md (prefetch study, Halda against MemSched, device selection).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from prima_sim.devices.catalog import catalog_model
from prima_sim.devices.cluster import load_cluster
from prima_sim.halda.planner import make_plan, manual_plan
from prima_sim.sim import SimConfig, simulate
from prima_sim.sim.sweep import grid, run_sweep
from prima_sim.sim.toy import toy_cluster, toy_device
from prima_sim.workload import Workload


def timed(plan, cluster, model, wl, cfg=None, repeat=3):
    best, res = float("inf"), None
    for _ in range(repeat):
        t0 = time.perf_counter()
        res = simulate(plan, cluster, model, wl, cfg)
        if res.spans:
            _ = res.rows
        best = min(best, time.perf_counter() - t0)
    return best, res


def line(label, wall, res):
    print(
        f"  {label:<34}{wall * 1e3:>9.0f} ms{res.events:>10,} ev{res.events / wall:>12,.0f} ev/s"
        f"{len(res.spans):>9,} spans   TPOT {res.tpot_s * 1e3:>9.1f} ms (analytic {res.analytic.tpot_s * 1e3:.1f})"
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--sweep", type=int, default=0, help="also time a sweep of about this many variants")
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--quick", action="store_true", help="main case and must-emerge numbers only")
    args = ap.parse_args()

    m70 = catalog_model("llama3-70b")
    d16 = load_cluster("paper-d1-d6")
    wl = Workload(n_ctx=1024, prompt_tokens=128, decode_tokens=256)
    plan = make_plan(d16, m70, wl, "halda")
    print(f"host: {os.cpu_count()} cores; python {sys.version.split()[0]}")
    print(f"main case: paper-d1-d6, {m70.id}, Halda windows {plan.windows}, prompt 128, 256 decode tokens")
    wall, res = timed(plan, d16, m70, wl, repeat=args.repeat)
    line("simulate + rows", wall, res)
    wall_np, res_np = timed(plan, d16, m70, wl, SimConfig(prefetch=False), repeat=args.repeat)
    line("same, no prefetch", wall_np, res_np)
    wall_ns, res_ns = timed(plan, d16, m70, wl, SimConfig(record_spans=False), repeat=args.repeat)
    line("same, no spans (sweep mode)", wall_ns, res_ns)
    print(f"  target <= 1 s: {'met' if wall <= 1.0 else 'MISSED'}")

    print("\nmust-emerge numbers (prompt 8-16, a few decode tokens)")
    pf = load_cluster("prefetch-4x8g")
    wl_pf = Workload(n_ctx=1024, prompt_tokens=8, decode_tokens=4)
    for w in (20, 10, 5):
        p = manual_plan(pf, m70, wl_pf, [w] * 4)
        off = simulate(p, pf, m70, wl_pf, SimConfig(prefetch=False))
        on = simulate(p, pf, m70, wl_pf, SimConfig(prefetch=True))
        assert p.prediction is not None
        print(
            f"  prefetch-4x8g k={p.k} windows {w}x4: TPOT {off.tpot_s:.2f} s without prefetch, {on.tpot_s:.2f} s with "
            f"({off.tpot_s / on.tpot_s:.2f}x); analytic {p.prediction.tpot_s:.2f} s"
        )
    wl_s = Workload(n_ctx=1024, prompt_tokens=16, decode_tokens=8)
    d14 = load_cluster("paper-d1-d4")
    for s in ("halda", "memsched"):
        p = make_plan(d14, m70, wl_s, s)
        r = simulate(p, d14, m70, wl_s)
        assert r.analytic is not None  # the simulation computes it when the plan has none
        print(
            f"  paper-d1-d4 {m70.id} {s:<9} windows {p.windows}: simulated {r.tpot_s:.2f} s, analytic {r.analytic.tpot_s:.2f} s"
        )
    for mid in ("llama3-45b", "llama1-30b", "llama3-70b"):
        mm = catalog_model(mid)
        a = make_plan(d16, mm, wl_s, "halda", allow_drop=True)
        b = make_plan(d16, mm, wl_s, "halda", allow_drop=False)
        ra, rb = simulate(a, d16, mm, wl_s), simulate(b, d16, mm, wl_s)
        assert a.prediction is not None and b.prediction is not None
        print(
            f"  paper-d1-d6 {mid:<11} drop {[d.name for d in a.dropped]}: {ra.tpot_s * 1e3:.0f} ms vs all six "
            f"{rb.tpot_s * 1e3:.0f} ms (analytic {a.prediction.tpot_s * 1e3:.0f} vs {b.prediction.tpot_s * 1e3:.0f})"
        )
    if args.quick:
        return

    print("\nscaling with devices (toy CPU devices, Llama 3 70B even windows, 64 decode tokens)")
    wl_d = Workload(n_ctx=1024, prompt_tokens=32, decode_tokens=64)
    for n in (2, 4, 8, 16):
        for label, ram in (("resident", 64 * 2**30), ("paging  ", 6 * 2**30)):
            c = toy_cluster([toy_device(f"n{i}", ram_total_bytes=ram) for i in range(n)])
            windows = [80 // n + (1 if i < 80 % n else 0) for i in range(n)]
            wall, r = timed(manual_plan(c, m70, wl_d, windows), c, m70, wl_d, repeat=1)
            line(f"{n:>2} devices {label}", wall, r)

    print("\nscaling with layers (6 toy devices, even windows, everything resident, 64 decode tokens)")
    c6 = toy_cluster([toy_device(f"n{i}", ram_total_bytes=64 * 2**30) for i in range(6)])
    for mid in ("llama3-8b", "qwen2.5-14b", "llama1-30b", "llama3-70b"):
        mm = catalog_model(mid)
        L = mm.arch.n_layer
        windows = [L // 6 + (1 if i < L % 6 else 0) for i in range(6)]
        wall, r = timed(manual_plan(c6, mm, wl_d, windows), c6, mm, wl_d, repeat=1)
        line(f"{L:>3} layers ({mid})", wall, r)
    p2 = manual_plan(c6, m70, wl_d, [2] * 6)
    wall, r = timed(p2, c6, m70, wl_d, repeat=1)
    line(f"80 layers, windows of 2 (k={p2.k})", wall, r)

    print("\nscaling with tokens (main case)")
    for n in (64, 128, 256, 512):
        wl_t = Workload(n_ctx=1024, prompt_tokens=128, decode_tokens=n)
        wall, r = timed(plan, d16, m70, wl_t, repeat=1)
        line(f"{n:>4} decode tokens", wall, r)

    if args.sweep:
        base = d16
        variants = grid(base, [2, 3, 4, 5, 6], [0.5, 0.75, 1, 1.5, 2], [0.5, 1, 2, 4], [0.5, 1, 2, 4, 8],
                        ["halda", "memsched"])[: args.sweep]  # fmt: skip
        wl_sw = Workload(n_ctx=1024, prompt_tokens=16, decode_tokens=8)
        t0 = time.perf_counter()
        rows = run_sweep(
            base, m70, wl_sw, variants, SimConfig(chunk_bytes=64 * 2**20, record_spans=False), jobs=args.jobs
        )
        dt = time.perf_counter() - t0
        ok = sum(1 for r in rows if r["status"] == "ok")
        print(
            f"\nsweep: {len(rows)} variants of paper-d1-d6 x {m70.id} ({ok} ok) on {args.jobs} processes: {dt:.1f} s "
            f"({dt / len(rows) * 1e3:.0f} ms per variant wall, {dt * args.jobs / len(rows) * 1e3:.0f} ms per variant per core)"
        )


if __name__ == "__main__":
    main()
