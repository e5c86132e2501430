"""Replay the page-cache grid's access patterns through the simulator's LRU cache and the kernel model.

    python benchmarks/replay_pagecache.py [--csv reports/pagecache-grid.csv] [--trace reports/pagecache-trace.json.gz]
        [--layouts reports/pagecache-layouts.json] [--chunk-kib 1024] [--points 1b-k1-large-r0.3-nopf,...]
        [--flush measured|fresh|SECONDS] [--out reports/pagecache-replay.csv]

Every grid point of ``benchmarks/bench_pagecache.py`` (one device decoding its k windows in a memory cgroup) is
replayed at chunk granularity with :func:`prima_sim.sim.kernel_cache.replay`: the same windows (their shards'
tensor layout, read in llama.cpp's graph order), the load (``MAP_POPULATE`` in window order), the same advice
(``WILLNEED`` of the next window after each window when prefetch is on), the same idle gap, a disk at the
measured read limit and compute at the rate measured when everything was resident. The cache capacity is the
page cache the cgroup actually gave the model (memory.stat ``total_cache`` during the measured tokens, minus a
few MiB of other files). ``--flush measured`` (default) flushes the model's statistics when the benchmark read
``memory.stat`` (every sample and token end), as the kernel did; a number flushes them with that period only
(0.05 s: the emulation's sampler; 2 s: the kernel's own flush); ``fresh`` reads exact statistics.

It prints, per point, the measured bytes read per decode token against the LRU cache's and the kernel model's,
and the summary of the errors; ``--out`` writes them as CSV.
"""

from __future__ import annotations

import argparse
import csv
import gzip
import json
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from prima_sim.devices.behaviour import OVERSHOOT_S, reread_fraction  # noqa: E402
from prima_sim.sim.kernel_cache import KernelCache, ReplayConfig, Window, replay  # noqa: E402
from prima_sim.sim.pagecache import PageCache  # noqa: E402

MIB = 1 << 20
OTHER_FILE_BYTES = (
    3 * MIB
)  # other files that stay cached under pressure (interpreter, libraries), measured 1-5 MiB
GRAPH_ORDER = (
    "attn_norm",
    "attn_q",
    "attn_k",
    "attn_v",
    "attn_output",
    "ffn_norm",
    "ffn_gate",
    "ffn_up",
    "ffn_down",
)


def layout(files: list[dict], chunk: int) -> tuple[list[int], list[int], list[Window], list[int]]:
    """Chunks of the device's shards (each file's tensor data cut in ``chunk`` bytes) and each window's access
    order: per layer, its tensors in llama.cpp's graph order (attention, then feed-forward)."""
    sizes: list[int] = []
    groups: list[int] = []
    nxt: list[int] = []
    wins: list[Window] = []
    for g, f in enumerate(files):
        start, end = int(f["data_offset"]), int(f["file_size"])
        first = len(sizes)
        off = start
        while off < end:
            n = min(chunk, end - off)
            sizes.append(n)
            groups.append(g)
            off += n
        ids = list(range(first, len(sizes)))
        nxt += [*ids[1:], -1]
        tens = {name: (int(o), int(n)) for name, o, n in f["tensors"]}
        layers = sorted({int(name.split(".")[1]) for name in tens if name.startswith("blk.")})
        order: list[tuple[int, int]] = []
        for layer in layers:
            for part in GRAPH_ORDER:
                key = f"blk.{layer}.{part}.weight"
                if key not in tens:
                    continue
                o, n = tens[key]
                a, b = o - start, o - start + n
                c = a // chunk
                while c * chunk < b:
                    lo, hi = max(a, c * chunk), min(b, (c + 1) * chunk)
                    cid = first + c
                    if order and order[-1][0] == cid:
                        order[-1] = (cid, order[-1][1] + hi - lo)
                    else:
                        order.append((cid, hi - lo))
                    c += 1
        wins.append(Window(ids, order))
    return sizes, groups, wins, nxt


def base_name(point: str) -> str:
    """The grid point a repetition belongs to (``1b-k1-large-r0.45-nopf-rep2`` -> ``...-nopf``; a variant such
    as ``...-nopf-s2000`` is its own point)."""
    parts = point.split("-")
    return "-".join(p for p in parts if not (p.startswith("rep") and p[3:].isdigit()))


def load_trace(path: Path) -> dict[str, dict]:
    out = {}
    with gzip.open(path, "rt") as fh:
        for line in fh:
            rec = json.loads(line)
            out[rec["point"]] = rec
    return out


def compute_rates(rows: list[dict]) -> dict[tuple[str, str, str], float]:
    """Streaming rate of llama.cpp per configuration: working set over busy time, when nothing pages."""
    rates: dict[tuple[str, str, str], list[float]] = {}
    for r in rows:
        if float(r["read_per_token"]) == 0 and float(r["busy_s"]) > 0:
            key = (r["shape"], r["k"], r["size"])
            rates.setdefault(key, []).append(float(r["ws_bytes"]) / float(r["busy_s"]))
    return {k: max(v) for k, v in rates.items()}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--csv", default=str(ROOT / "reports" / "pagecache-grid.csv"))
    ap.add_argument("--trace", default=str(ROOT / "reports" / "pagecache-trace.json.gz"))
    ap.add_argument("--layouts", default=str(ROOT / "reports" / "pagecache-layouts.json"))
    ap.add_argument(
        "--chunk-kib",
        type=int,
        default=256,
        help="chunk size (256 KiB: the folios llama.cpp's FADV_SEQUENTIAL readahead allocates)",
    )
    ap.add_argument("--points", default="", help="comma-separated point names (default: all)")
    ap.add_argument(
        "--flush",
        default="measured",
        help="measured (flush when the benchmark read memory.stat), fresh (exact statistics), or a "
        "period in seconds (0.05: the emulation's sampler, 2: the kernel's own flush)",
    )
    ap.add_argument("--out", default="")
    ap.add_argument(
        "--no-preload",
        dest="preload",
        action="store_false",
        help="start with an empty cache (default: the other files the cgroup held before the load)",
    )
    args = ap.parse_args()
    if args.chunk_kib < 4:
        ap.error("--chunk-kib must be >= 4")
    period: float | None = 2.0
    if args.flush not in ("measured", "fresh"):
        try:
            period = float(args.flush)
            assert period > 0
        except (ValueError, AssertionError):
            ap.error("--flush: measured, fresh, or a positive number of seconds")
    elif args.flush == "fresh":
        period = None
    with open(args.csv) as fh:
        rows = [r for r in csv.DictReader(fh) if r["status"] == "ok"]
    want = set(args.points.split(",")) if args.points else None
    traces = load_trace(Path(args.trace))
    layouts = json.loads(Path(args.layouts).read_text())
    rates = compute_rates(rows)
    chunk = args.chunk_kib << 10
    out_rows = []
    print(f"{'point':30s} {'cache/ws':>8s} {'measured':>9s} {'LRU':>9s} {'kernel':>9s} {'closed':>9s} {'err LRU':>8s} "
          f"{'err kern':>8s} {'err cf':>7s} {'busy meas':>9s} {'busy kern':>9s}  (MiB per token, %, s)")  # fmt: skip
    for r in rows:
        name = r["point"]
        if want is not None and name not in want:
            continue
        tr = traces.get(name)
        key = f"{r['shape']}-k{r['k']}-{r['size']}"
        if tr is None or key not in layouts:
            continue
        sizes, groups, wins, nxt = layout(layouts[key], chunk)
        # the files the cgroup held before llama.cpp loaded anything (interpreter, libraries): evicted first
        other = tr["load"]["before"].get("total_cache", 0) if args.preload else 0
        first_other = len(sizes)
        while other > 0:
            sizes.append(min(chunk, other))
            groups.append(len(wins))
            nxt.append(-1)
            other -= chunk
        preload = list(range(first_other, len(sizes)))
        t0 = tr["load"]["t0"]
        warm, toks = int(r["warmup"]), int(r["tokens"])
        file_bytes = statistics.median(t["c"].get("total_cache", t["c"]["resident"] + OTHER_FILE_BYTES)
                                       for t in tr["tokens"][warm:])  # fmt: skip
        cap = max(0.0, file_bytes - OTHER_FILE_BYTES)
        ws = float(r["ws_bytes"])
        if float(r["read_per_token"]) == 0:
            cap = max(cap, ws)
        flush_times = None
        if args.flush == "measured":
            flush_times = [s[0] - t0 for s in tr["samples"]] + [t["t1"] - t0 for t in tr["tokens"]]
        cfg = ReplayConfig(disk_bps=float(r["disk_bps"]), compute_bps=rates.get((r["shape"], r["k"], r["size"]), 5e9),
                           gap_s=float(r["gap_s"]), prefetch=bool(int(r["prefetch"])), tokens=toks, warmup=warm,
                           flush_times=flush_times, preload=preload)  # fmt: skip
        kc = KernelCache(name, sizes, groups, len(wins) + 1, cap, flush_interval_s=period)
        rk = replay(kc, wins, cfg, nxt)
        lru = PageCache(name, sizes, groups, len(wins) + 1, cap)
        rl = replay(lru, wins, cfg, nxt)
        meas = float(r["read_per_token"])
        k_read, l_read = rk.mean_read(warm), rl.mean_read(warm)
        wmax = max(int(x) for x in r["window_bytes"].split("/"))
        # the grid's sampler read memory.stat (flushing the statistics) every sample_s: every 0.1 s but for the
        # variant polled every 2 s, whose statistics were as stale as the kernel's own flush leaves them
        polled = float(r.get("sample_s") or 0.1) < 1.0
        cf = ws * reread_fraction(min(cap / ws, 0.9999), int(r["k"]), bool(int(r["prefetch"])), ws,
                                  wmax / max(cap, 1.0), float(r["disk_bps"]),
                                  OVERSHOOT_S if polled else None) if cap < ws else 0.0  # fmt: skip

        def err(x: float, m: float = meas) -> float:
            return 100.0 * (x - m) / m if m > 0 else (0.0 if x == 0 else float("inf"))

        row = {"point": name, "cache_ratio": cap / ws, "measured": meas, "lru": l_read, "kernel": k_read,
               "closed_form": cf, "err_lru_pct": err(l_read), "err_kernel_pct": err(k_read),
               "err_closed_form_pct": err(cf), "busy_measured_s": float(r["busy_s"]),
               "busy_kernel_s": rk.median_busy(warm), "busy_lru_s": rl.median_busy(warm),
               "kernel_active_mib": rk.lists_per_token[-1][0] / MIB, "measured_active_mib": float(r["active_file"]) / MIB}  # fmt: skip
        out_rows.append(row)
        print(f"{name:30s} {cap / ws:8.2f} {meas / MIB:9.0f} {l_read / MIB:9.0f} {k_read / MIB:9.0f} {cf / MIB:9.0f} "
              f"{row['err_lru_pct']:8.1f} {row['err_kernel_pct']:8.1f} {row['err_closed_form_pct']:7.1f} "
              f"{row['busy_measured_s']:9.3f} {row['busy_kernel_s']:9.3f}")  # fmt: skip
    paging = [x for x in out_rows if x["measured"] > 0]
    if paging:
        for label, k in (
            ("LRU", "err_lru_pct"),
            ("kernel model", "err_kernel_pct"),
            ("closed form", "err_closed_form_pct"),
        ):
            errs = sorted(abs(x[k]) for x in paging)
            within = sum(e <= 10 for e in errs)
            print(f"{label}: |error| of bytes per token over {len(errs)} paging points: median {statistics.median(errs):.1f}%, "
                  f"max {errs[-1]:.1f}%, within 10%: {within}/{len(errs)}")  # fmt: skip
        for label, k in (("LRU", "busy_lru_s"), ("kernel model", "busy_kernel_s")):
            errs = sorted(abs(x[k] - x["busy_measured_s"]) / x["busy_measured_s"] * 100 for x in paging)
            print(f"{label}: |error| of the device's busy time per token: median {statistics.median(errs):.1f}%, "
                  f"max {errs[-1]:.1f}%, within 10%: {sum(e <= 10 for e in errs)}/{len(errs)}")  # fmt: skip
    by_base: dict[str, list[dict]] = {}
    for x in out_rows:
        by_base.setdefault(base_name(x["point"]), []).append(x)
    reps = {k: v for k, v in by_base.items() if len(v) > 1 and v[0]["measured"] > 0}
    if reps:
        print("\nrepeated points (MiB per token): measured runs, kernel model per run (each with its own statistics "
              "flushes), closed form")  # fmt: skip
        for k, v in sorted(reps.items()):
            m = [x["measured"] / MIB for x in v]
            km = [x["kernel"] / MIB for x in v]
            print(f"  {k:28s} measured {' '.join(f'{a:5.0f}' for a in m)} (spread {100 * (max(m) - min(m)) / min(m):4.0f}%)"
                  f"   kernel {' '.join(f'{a:5.0f}' for a in km)}   closed form {v[0]['closed_form'] / MIB:5.0f}")  # fmt: skip
    if args.out:
        with open(args.out, "w", newline="") as fh:
            w = csv.DictWriter(fh, fieldnames=list(out_rows[0]))
            w.writeheader()
            for x in out_rows:
                w.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in x.items()})
    return 0


if __name__ == "__main__":
    sys.exit(main())
