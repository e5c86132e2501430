"""Halda solve time, device selection included, on the paper cluster and synthetic heterogeneous clusters.

    python benchmarks/bench_halda.py [--sizes 4,8,16,32,64,128,256] [--repeat 5] [--model llama3-70b]

Prints, per cluster size, the median wall time of ``make_plan(..., "halda")`` over repeated runs, the number
of integer programs solved, the chosen k, the devices kept and the predicted TPOT. Synthetic clusters are
drawn deterministically (seeded) from a mix of home devices: Linux laptops/desktops with and without CUDA
GPUs, Apple Silicon Macs (Metal), Intel Macs and Android phones, on Wi-Fi.
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np

from prima_sim.devices.catalog import catalog_model
from prima_sim.devices.cluster import Cluster, load_cluster
from prima_sim.devices.profile import DeviceProfile
from prima_sim.halda.planner import make_plan
from prima_sim.workload import Workload

GiB = 2**30


def synthetic_device(i: int, rng: np.random.Generator) -> DeviceProfile:
    """One random home device (kinds in proportions a home might have)."""
    kind = rng.choice(
        ["linux", "linux-cuda", "mac-metal", "mac-intel", "android"], p=[0.3, 0.2, 0.2, 0.1, 0.2]
    )
    cpu = float(rng.uniform(0.5, 4.0)) * 1e11
    base = {
        "name": f"dev{i:03d}", "cores": int(rng.choice([4, 8, 16])),
        "cpu_flops": {"f32": cpu / 3, "f16": cpu / 2, "q4_k": cpu, "q6_k": cpu * 0.8, "q5_0": cpu * 0.9, "q8_0": cpu},
        "memory_bandwidth_bps": float(rng.uniform(15, 80)) * 1e9,
        "disk_seq_read_bps": float(rng.uniform(0.3, 3.5)) * 1e9, "disk_rand_read_bps": float(rng.uniform(0.1, 1.0)) * 1e9,
        "provenance": {"kind": "derived", "notes": "synthetic benchmark device"},
    }  # fmt: skip
    ram = float(rng.choice([8, 16, 32])) * GiB
    avail = ram * float(rng.uniform(0.2, 0.6))
    base.update(ram_total_bytes=int(ram), ram_available_bytes=int(avail))
    if kind == "linux-cuda":
        vram = float(rng.choice([6, 8, 11, 12, 24])) * GiB
        g = float(rng.uniform(5, 30)) * 1e12
        base.update(os="linux", gpu={"kind": "cuda", "flops": {"f32": g / 4, "f16": g, "q4_k": g / 2, "q6_k": g / 2,
                    "q5_0": g / 2, "q8_0": g / 2}, "vram_total_bytes": int(vram), "vram_free_bytes": int(vram * 0.9),
                    "memory_bandwidth_bps": float(rng.uniform(300, 900)) * 1e9})  # fmt: skip
    elif kind == "mac-metal":
        g = float(rng.uniform(2, 10)) * 1e12
        base.update(os="macos", unified_memory=True, gpu={"kind": "metal", "flops": {"f32": g / 2, "f16": g, "q4_k": g / 2,
                    "q6_k": g / 2, "q5_0": g / 2, "q8_0": g / 2}, "vram_total_bytes": int(ram * 0.67),
                    "vram_free_bytes": int(avail), "memory_bandwidth_bps": float(rng.uniform(60, 200)) * 1e9})  # fmt: skip
    elif kind == "mac-intel":
        base.update(os="macos")
    elif kind == "android":
        base.update(
            os="android", swap_total_bytes=2 * GiB, swap_available_bytes=2 * GiB, swappable_bytes=int(GiB)
        )
    else:
        base.update(os="linux")
    return DeviceProfile.model_validate(base)


def synthetic_cluster(n: int, seed: int = 0) -> Cluster:
    """``n`` random home devices on one Wi-Fi network (320-610 Mbps, 3-7 ms)."""
    rng = np.random.default_rng(seed)
    devs = [synthetic_device(i, rng) for i in range(n)]
    return Cluster.model_validate({"name": f"synthetic-{n}", "devices": devs,
                                   "default_link": {"bandwidth_bps": "450 Mbps", "latency_s": "5 ms"}})  # fmt: skip


def bench(cluster: Cluster, model_id: str, repeat: int) -> dict:
    """Median make_plan time and the plan's figures."""
    model = catalog_model(model_id)
    wl = Workload(n_ctx=1024, prompt_tokens=64, decode_tokens=128)
    times, plan = [], None
    for _ in range(repeat):
        t0 = time.perf_counter()
        plan = make_plan(cluster, model, wl, "halda")
        times.append(time.perf_counter() - t0)
    assert plan is not None and plan.prediction is not None
    return {"devices": len(cluster.devices), "median_ms": statistics.median(times) * 1e3, "min_ms": min(times) * 1e3,
            "solves": getattr(plan.solver.details, "dynamic_programs", None), "k": plan.k, "kept": len(plan.devices),
            "tpot_ms": plan.prediction.tpot_s * 1e3}  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="4,8,16,32,64,128,256")
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--model", default="llama3-70b")
    args = ap.parse_args()
    print(
        f"{'cluster':<22}{'devices':>8}{'median ms':>11}{'min ms':>9}{'DPs':>6}{'k':>4}{'kept':>6}{'TPOT ms':>10}"
    )
    rows = []
    try:
        rows.append(("paper-d1-d4", load_cluster("paper-d1-d4")))
    except Exception as exc:  # the bundled dataset may be absent in a partial checkout
        print(f"(paper-d1-d4 not available: {exc})")
    rows += [(f"synthetic-{n}", synthetic_cluster(n)) for n in (int(x) for x in args.sizes.split(","))]
    for name, c in rows:
        r = bench(c, args.model, args.repeat)
        print(f"{name:<22}{r['devices']:>8}{r['median_ms']:>11.1f}{r['min_ms']:>9.1f}{r['solves']:>6}{r['k']:>4}"
              f"{r['kept']:>6}{r['tpot_ms']:>10.1f}", flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
