"""What swap changes for llama.cpp decoding mmapped weights in a memory cgroup that cannot hold them (issue 11,
item 5; docs/pagecache.md, "Swap").

    sudo flock -x /tmp/prima-cpu.lock python benchmarks/bench_swap.py [--limits 640,560,400]
        [--modes none,host,swap] [--swap-mib 256] [--tokens 8] [--warmup 3] [--disk-read 300]
        [--csv reports/swap-direct.csv] [--json reports/swap-direct.json]

One point is one process (``prima_sim.exec.llamacpp.Reference``: the whole generated 1B-shape model, 0.69 GB,
with its tokenizer, one thread, mmap, ``use_extra_bufts = False``) decoding token after token in a fresh memory
cgroup of ``limit`` MiB, reading the model from a loop-device disk (direct I/O, ext4, read_ahead_kb 128, the
emulation's disk) throttled to ``--disk-read`` MB/s per cgroup. Three modes:

* ``none``: no swap anywhere (this project's hosts; the testbed without swap);
* ``host``: a swap file on that disk is on, but the cgroup may not swap (memory+swap limit = memory limit,
  swappiness 0): the other devices of a testbed with one swapping device;
* ``swap``: the cgroup may swap ``--swap-mib`` (memory+swap limit raised by that, swappiness 60): the device with
  swap.

Per token the child records the bytes its cgroup read from the disk (blkio, model and swap-ins alike), the
cgroup's swap usage (memory+swap usage less memory usage: no ``memory.stat`` read, no statistics flush), the
host's ``pswpin``/``pswpout`` and refault counters (``/proc/vmstat``; the host is otherwise idle under the lock)
and its own ``RssAnon``/``RssFile``/``VmSwap``. ``memory.stat`` is read once after the load and once at the end.
Before every point the page cache is dropped. Needs root and llama-cpp-python.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import datetime as dt
import itertools
import json
import os
import shutil
import socket
import statistics
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from prima_sim.emulate.cgroups import blkio_read_bytes  # noqa: E402

if TYPE_CHECKING:
    from prima_sim.emulate.cgroups import Cgroups

MIB = 1 << 20
N_CTX = 256
SHAPE = {"layers": 16, "embd": 2048, "ff": 8192, "heads": 32, "kv_heads": 8}
VMSTAT = ("pswpin", "pswpout", "workingset_refault_file", "workingset_activate_file", "workingset_refault_anon",
          "workingset_activate_anon", "pgmajfault", "pgscan_anon", "pgscan_file")  # fmt: skip
STAT = ("total_cache", "total_rss", "total_swap", "total_active_file", "total_inactive_file", "total_active_anon",
        "total_inactive_anon", "total_mapped_file")  # fmt: skip
FIELDS = ["point", "mode", "limit_mib", "swap_mib", "model_bytes", "tokens", "read_mib_per_token",
          "read_mib_per_token_min", "read_mib_per_token_max", "tpot_s", "swap_used_mib", "pswpin_mib_per_token",
          "pswpout_mib_per_token", "refault_file_mib_per_token", "activate_file_mib_per_token", "rss_anon_mib",
          "vm_swap_mib", "rss_file_mib", "active_file_mib", "inactive_file_mib", "active_anon_mib",
          "inactive_anon_mib", "load_s", "status", "error", "host", "kernel", "date"]  # fmt: skip


def say(msg: str) -> None:
    print(f"[{dt.datetime.now().strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def read_kv(path: Path) -> dict[str, int]:
    out: dict[str, int] = {}
    with contextlib.suppress(OSError):
        for line in path.read_text().splitlines():
            p = line.split()
            if len(p) >= 2 and p[1].lstrip("-").isdigit():
                out[p[0].rstrip(":")] = int(p[1])
    return out


# ===========================================================================================================
# child: one process decoding the whole model inside the cgroup
# ===========================================================================================================
def child(cfg_path: str) -> int:
    import numpy as np

    from prima_sim.exec.llamacpp import Reference

    cfg = json.loads(Path(cfg_path).read_text())
    mem, io, dev = Path(cfg["memory_dir"]), Path(cfg["io_dir"]), cfg["dev"]

    def counters() -> dict[str, float]:
        c: dict[str, float] = {
            "t": time.time(),
            "read": blkio_read_bytes(io / "blkio.throttle.io_service_bytes", dev),
        }
        usage = int((mem / "memory.usage_in_bytes").read_text())
        memsw = int((mem / "memory.memsw.usage_in_bytes").read_text())
        c["swap"] = max(0, memsw - usage)
        vm = read_kv(Path("/proc/vmstat"))
        for k in VMSTAT:
            c[k] = vm.get(k, 0)
        st = read_kv(Path("/proc/self/status"))
        for k in ("RssAnon", "RssFile", "VmSwap"):
            c[k] = st.get(k, 0) * 1024
        return c

    c0 = counters()
    ref = Reference(cfg["model"], N_CTX, 32, 1)
    c1 = counters()
    stat_load = read_kv(mem / "memory.stat")
    rng = np.random.default_rng(0)
    prompt = [int(x) for x in rng.integers(100, 40000, size=8)]
    logits = ref.logits(prompt, 0)
    pos = len(prompt)
    tokens = []
    for step in range(cfg["warmup"] + cfg["tokens"]):
        tok = int(np.argmax(logits))
        logits = ref.logits([tok], pos)
        pos += 1
        tokens.append(counters())
        print(f"token {step + 1}", file=sys.stderr, flush=True)
    stat_end = read_kv(mem / "memory.stat")
    ref.close()
    Path(cfg["result"]).write_text(json.dumps({"before": c0, "loaded": c1, "tokens": tokens, "stat_load": stat_load,
                                               "stat_end": stat_end}))  # fmt: skip
    return 0


# ===========================================================================================================
# parent
# ===========================================================================================================
def summarize(
    key: str, mode: str, limit_mib: int, swap_mib: int, model_bytes: int, warmup: int, res: dict
) -> dict:
    toks = res["tokens"][
        warmup - 1 :
    ]  # counters at the end of the last warm-up token, then one per timed token
    d = [(b["read"] - a["read"]) / MIB for a, b in itertools.pairwise(toks)]
    dt_s = [b["t"] - a["t"] for a, b in itertools.pairwise(toks)]
    n = len(d)
    first, last = toks[0], toks[-1]
    page = os.sysconf("SC_PAGE_SIZE")

    def per_token(k: str) -> float:
        return (last[k] - first[k]) * page / MIB / n

    st = res["stat_end"]
    return {
        "point": key, "mode": mode, "limit_mib": limit_mib, "swap_mib": swap_mib if mode == "swap" else 0,
        "model_bytes": model_bytes, "tokens": n, "read_mib_per_token": statistics.median(d),
        "read_mib_per_token_min": min(d), "read_mib_per_token_max": max(d), "tpot_s": statistics.median(dt_s),
        "swap_used_mib": last["swap"] / MIB, "pswpin_mib_per_token": per_token("pswpin"),
        "pswpout_mib_per_token": per_token("pswpout"),
        "refault_file_mib_per_token": per_token("workingset_refault_file"),
        "activate_file_mib_per_token": per_token("workingset_activate_file"),
        "rss_anon_mib": last["RssAnon"] / MIB, "vm_swap_mib": last["VmSwap"] / MIB, "rss_file_mib": last["RssFile"] / MIB,
        "active_file_mib": st.get("total_active_file", 0) / MIB, "inactive_file_mib": st.get("total_inactive_file", 0) / MIB,
        "active_anon_mib": st.get("total_active_anon", 0) / MIB, "inactive_anon_mib": st.get("total_inactive_anon", 0) / MIB,
        "load_s": res["loaded"]["t"] - res["before"]["t"], "status": "ok", "error": "",
    }  # fmt: skip


def run_point(cgs: Cgroups, name: str, model: Path, dev: str, limit: int, swap_bytes: int, bps: float, tokens: int,
              warmup: int, workdir: Path) -> tuple[dict | None, str]:  # fmt: skip
    from prima_sim.emulate.cgroups import drop_caches
    from prima_sim.emulate.spawn import spawn, stop

    g = cgs.create(name)
    try:
        g.set_memory_limit(limit, swap_bytes)
        g.set_read_bps(dev, bps)
        result = workdir / f"{name}.json"
        cfg = {"model": str(model), "memory_dir": str(g.dirs["memory"]), "io_dir": str(g.dirs["io"]), "dev": dev,
               "tokens": tokens, "warmup": warmup, "result": str(result)}  # fmt: skip
        cfg_path = workdir / f"{name}.cfg.json"
        cfg_path.write_text(json.dumps(cfg))
        env = dict(os.environ, OMP_WAIT_POLICY="passive", PYTHONPATH=str(ROOT))
        drop_caches()
        with (workdir / f"{name}.log").open("wb") as log:
            p = spawn([sys.executable, str(Path(__file__).resolve()), "--child", str(cfg_path)],
                      procs_files=g.procs_files(), env=env, stdout=log, stderr=log)  # fmt: skip
            try:
                p.wait(timeout=600)
            except Exception:
                stop(p)
                raise
        if p.returncode != 0:
            tail = (workdir / f"{name}.log").read_text(errors="replace").strip().splitlines()[-3:]
            return None, ("OOM-killed; " if g.oom_kills() else "") + f"exit {p.returncode}: " + " | ".join(
                tail
            )
        return json.loads(result.read_text()), ""
    finally:
        g.remove()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--limits", default="640,560,400", help="memory limits, MiB")
    ap.add_argument("--modes", default="none,host,swap", help="none, host, swap (in this order)")
    ap.add_argument(
        "--points", default="", help="explicit MODE-LIMIT points, e.g. none-760,swap-760 (overrides both)"
    )
    ap.add_argument("--swap-mib", type=int, default=256, help="swap of the 'swap' mode, MiB")
    ap.add_argument("--tokens", type=int, default=8, help="timed decode tokens")
    ap.add_argument("--warmup", type=int, default=3, help="untimed decode tokens first")
    ap.add_argument("--disk-read", type=float, default=300, help="read limit, MB/s")
    ap.add_argument("--csv", default="reports/swap-direct.csv")
    ap.add_argument("--json", default="reports/swap-direct.json", help="every token's counters")
    ap.add_argument("--work", default="/var/tmp/prima-swap-bench")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return child(args.child)

    from prima_sim.emulate.cgroups import Cgroups
    from prima_sim.emulate.disk import EmulatedDisk
    from prima_sim.emulate.models import ensure_model
    from prima_sim.emulate.resources import Registry
    from prima_sim.emulate.scenario import ModelSpec
    from prima_sim.emulate.swap import SwapFile

    order = ("none", "host", "swap")  # swap goes on once, before the first point that needs it
    if args.points:
        points = [(m, int(lim)) for m, _, lim in (p.partition("-") for p in args.points.split(",") if p)]
        if any(m not in order for m, _ in points):
            ap.error(f"--points: modes are {', '.join(order)}")
        points.sort(key=lambda x: order.index(x[0]))
    else:
        limits = [int(x) for x in args.limits.split(",") if x]
        points = [(m, lim) for m in order if m in args.modes.split(",") for lim in limits]
    src = ensure_model(ModelSpec(**SHAPE, quant="Q4_0"), log=say)
    base = Path(args.work)
    rows: list[dict] = []
    raw: dict[str, dict] = {}
    with Registry() as reg:
        disk = EmulatedDisk(reg, base, src.stat().st_size + (args.swap_mib + 512) * MIB)
        mnt = disk.create()
        model = mnt / src.name
        shutil.copyfile(src, model)
        os.sync()
        cgs = Cgroups(reg.prefix, need=("memory", "io"))
        reg.add("cgroups", reg.prefix, cgs.remove_all_or_raise)
        swap_on = False
        for mode, lim in points:
            if mode != "none" and not swap_on:
                SwapFile(reg, mnt, args.swap_mib * MIB).create()
                swap_on = True
                say(f"swap on: {args.swap_mib} MiB on {disk.device}")
            key = f"{mode}-{lim}"
            say(f"point {key}")
            t0 = time.monotonic()
            sw = args.swap_mib * MIB if mode == "swap" else 0
            res, err = run_point(cgs, key, model, disk.majmin, lim * MIB, sw, args.disk_read * 1e6, args.tokens,
                                 args.warmup, base)  # fmt: skip
            if res is None:
                rows.append({"point": key, "mode": mode, "limit_mib": lim, "status": "failed", "error": err})
                say(f"  failed: {err}")
                continue
            raw[key] = res
            row = summarize(key, mode, lim, args.swap_mib, model.stat().st_size, args.warmup, res)
            rows.append(row)
            say(f"  {row['read_mib_per_token']:.0f} MiB/token read, swap {row['swap_used_mib']:.0f} MiB, "
                f"pswpin {row['pswpin_mib_per_token']:.1f} MiB/token, TPOT {row['tpot_s'] * 1e3:.0f} ms "
                f"({time.monotonic() - t0:.0f} s)")  # fmt: skip
    meta = {"host": socket.gethostname(), "kernel": os.uname().release,
            "date": dt.datetime.now(dt.UTC).replace(microsecond=0).isoformat()}  # fmt: skip
    out = Path(args.csv)
    out.parent.mkdir(parents=True, exist_ok=True)
    new = not out.exists()
    with out.open("a", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=FIELDS)
        if new:
            w.writeheader()
        for r in rows:
            w.writerow(
                {
                    k: (f"{v:.3f}" if isinstance(v, float) else v)
                    for k, v in {**r, **meta}.items()
                    if k in FIELDS
                }
            )
    Path(args.json).write_text(json.dumps({**meta, "points": raw}))
    say(f"wrote {out} and {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
