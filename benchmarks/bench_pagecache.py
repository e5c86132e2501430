"""Page-cache fidelity grid: what Linux really re-reads per token when llama.cpp decodes windows larger than
a memory cgroup's cache (issue 11, items 1-2; docs/pagecache.md).

    sudo python benchmarks/bench_pagecache.py [--shapes 1b,3b] [--ratios 0.3,0.45,...] [--k 1,2,3]
        [--sizes large,small] [--prefetch off,on] [--tokens 8] [--warmup 3] [--disk-read 500]
        [--gap-ms 200] [--threads 1] [--csv reports/pagecache-grid.csv]
        [--trace reports/pagecache-trace.json.gz] [--budget-min 9] [--plot reports/pagecache-grid.png]
    python benchmarks/bench_pagecache.py --plot-only          # redraw the PNG from the CSV (and the replay's)

One grid point is one *device* of a ring: a process that holds ``k`` layer windows of a generated model
(vocabulary-free shards cut by ``prima_sim.exec.shard`` for a two-device plan whose other device holds the
layers in between), inside a memory cgroup whose room for the model is ``ratio`` x the bytes of its windows,
reading from a throttled disk. It decodes token after token exactly as ``prima-sim worker`` does, with the
executor's own code: every window runs through ``prima_sim.exec.llamacpp.Window.run_hidden`` (llama.cpp,
mmap, ``use_extra_bufts = False``), and after each window the next one is advised with
``prima_sim.exec.ring.Prefetcher`` under the executor's rule (``prima_sim.plan.prefetch_window``). The only
difference from a worker is that the hidden state does not travel over ZeroMQ: the time the other devices
would take is a sleep of ``--gap-ms`` after each window (their compute, during which prefetch reads go on).

The disk is a loop device over a sparse image kept in the cache directory (``~/.cache/prima-sim/pagecache-bench``,
``PRIMA_SIM_CACHE``), attached with direct I/O, ext4, ``read_ahead_kb`` = 128 (a typical device, as the
emulation's disk), read-throttled per cgroup with blkio (``--disk-read`` MB/s). Shards are written once.

Before every point the host's page cache is dropped (``echo 1 > /proc/sys/vm/drop_caches``). Per point the CSV
records the measured bytes read per decode token (the cgroup's blkio counter on the loop device), the model
bytes resident in the page cache (``mincore`` on the shards at every token's end), the device's busy time per
token (its windows' run time plus the advice calls), active/inactive file pages, refaults and major faults.
The trace file keeps every point's per-window spans, per-token counters and a 100 ms sampling of memory.stat:
the input of the replay harness (``benchmarks/replay_pagecache.py``).

Budget: ``--budget-min`` stops before a point that would start after that many minutes (default 9: one
``flock -x /tmp/prima-cpu.lock`` hold of at most ~10 minutes). Points already in the CSV are skipped, so
running the command again continues the grid.

Needs root (cgroups, loop device, drop_caches) and llama-cpp-python.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import ctypes
import datetime as dt
import gzip
import json
import os
import signal
import socket
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from prima_sim.emulate.cgroups import blkio_read_bytes  # noqa: E402

if TYPE_CHECKING:
    from prima_sim.emulate.cgroups import Cgroups
    from prima_sim.emulate.resources import Registry
    from prima_sim.plan import Plan

MB = 1_000_000
MIB = 1 << 20
N_CTX = 64
IMAGE_BYTES = 24 << 30  # sparse
READAHEAD_KB = 128
SAMPLE_S = 0.1
CHILD_TIMEOUT_S = 600
STAT_KEYS = ("total_cache", "total_rss", "total_active_file", "total_inactive_file", "total_mapped_file",
             "total_workingset_refault_file", "total_pgmajfault")  # fmt: skip
VMSTAT_KEYS = ("workingset_refault_file", "workingset_activate_file", "workingset_restore_file", "pgactivate",
               "pgdeactivate", "pgrefill", "pgscan_direct", "pgsteal_direct", "pgmajfault", "pgpgin")  # fmt: skip

SHAPES = {
    # the 1B shape of the bundled scenarios (0.69 GB, 34 MB per layer) and a Llama 3.2 3B shape (1.75 GB,
    # 57 MB per layer: caches above 1 GiB, where the kernel's inactive_ratio changes)
    "1b": {"layers": 16, "embd": 2048, "ff": 8192, "heads": 32, "kv_heads": 8},
    "3b": {"layers": 28, "embd": 3072, "ff": 8192, "heads": 24, "kv_heads": 8},
}
# (k, size) -> windows [other device, measured device] in ring order; the measured device runs first in
# every round, so with these windows it holds k windows (the last one may be shorter)
CONFIGS = {
    "1b": {(1, "large"): [1, 15], (1, "small"): [8, 8], (2, "large"): [1, 7], (2, "small"): [4, 4],
           (3, "large"): [1, 5], (3, "small"): [3, 3]},
    "3b": {(1, "large"): [2, 26], (1, "small"): [14, 14], (2, "large"): [1, 13], (2, "small"): [7, 7],
           (3, "large"): [1, 9], (3, "small"): [5, 5]},
}  # fmt: skip
RATIOS = (0.3, 0.45, 0.6, 0.75, 0.9, 1.05, 1.2)
CSV_FIELDS = [
    "point", "shape", "model_bytes", "layer_bytes", "k", "size", "windows", "device_layers", "ws_bytes",
    "window_bytes", "ratio", "prefetch", "disk_bps", "gap_s", "threads", "tokens", "warmup", "limit_bytes",
    "pinned_bytes", "room_bytes", "cache_bytes", "cache_ratio", "read_per_token", "read_per_token_min",
    "read_per_token_max", "reread_frac", "busy_s", "wall_s", "advise_s", "active_file", "inactive_file",
    "other_file", "refault_per_token", "activate_per_token", "majfault_per_token", "load_read_bytes", "load_s",
    "sample_s", "file_bytes", "status", "error", "host", "kernel", "date",
]  # fmt: skip


def say(msg: str) -> None:
    print(f"[{dt.datetime.now().strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# --- mincore: which pages of a file are in the page cache ----------------------------------------------------
_libc = ctypes.CDLL(None, use_errno=True)
_libc.mmap.restype = ctypes.c_void_p
_libc.mmap.argtypes = [
    ctypes.c_void_p,
    ctypes.c_size_t,
    ctypes.c_int,
    ctypes.c_int,
    ctypes.c_int,
    ctypes.c_long,
]
_libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
_libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
PAGE = os.sysconf("SC_PAGE_SIZE")


class Residency:
    """``mincore`` over read-only mappings of some files (mapping a file faults nothing in)."""

    def __init__(self, paths: list[Path]) -> None:
        self.maps: list[tuple[int, int, ctypes.Array[ctypes.c_ubyte]]] = []
        for p in paths:
            fd = os.open(p, os.O_RDONLY)
            size = os.fstat(fd).st_size
            addr = _libc.mmap(None, size, 1, 1, fd, 0)  # PROT_READ, MAP_SHARED
            os.close(fd)
            if addr in (None, ctypes.c_void_p(-1).value):
                raise OSError(ctypes.get_errno(), f"mmap {p}")
            self.maps.append((addr, size, (ctypes.c_ubyte * ((size + PAGE - 1) // PAGE))()))

    def vectors(self) -> list[np.ndarray]:
        """Per file, one bool per page: resident."""
        out = []
        for addr, size, vec in self.maps:
            if _libc.mincore(addr, size, vec) != 0:
                raise OSError(ctypes.get_errno(), "mincore")
            out.append(np.frombuffer(memoryview(vec), dtype=np.uint8) & 1)
        return out

    def resident_bytes(self) -> int:
        return int(sum(int(v.sum()) for v in self.vectors())) * PAGE

    def close(self) -> None:
        for addr, size, _ in self.maps:
            _libc.munmap(addr, size)
        self.maps.clear()


# --- cgroup v1 counters read by path (the child reads its own group) ----------------------------------------
def read_kv(path: Path) -> dict[str, int]:
    out: dict[str, int] = {}
    with contextlib.suppress(OSError):
        for line in path.read_text().splitlines():
            p = line.split()
            if len(p) == 2 and p[1].lstrip("-").isdigit():
                out[p[0]] = int(p[1])
    return out


# ===========================================================================================================
# child: one device decoding its windows (runs inside the cgroup)
# ===========================================================================================================
def child(cfg_path: str) -> int:
    cfg = json.loads(Path(cfg_path).read_text())
    from prima_sim.exec.llamacpp import Model, Window
    from prima_sim.exec.ring import Prefetcher
    from prima_sim.exec.shard import load_manifest, shard_path
    from prima_sim.plan import prefetch_window

    shard_dir = Path(cfg["shard_dir"])
    man = load_manifest(shard_dir, "D")
    mem_dir = Path(cfg["memory_dir"]) if cfg.get("memory_dir") else None
    io_dir = Path(cfg["io_dir"]) if cfg.get("io_dir") else None
    dev = cfg["dev"]
    shards = sorted((s for s in man.shards if s.window >= 0), key=lambda s: s.window)
    paths = [shard_path(shard_dir, man, s) for s in shards]
    res = Residency(paths)

    def counters() -> dict[str, int]:
        c: dict[str, int] = {}
        if io_dir is not None:
            c["io_read"] = blkio_read_bytes(io_dir / "blkio.throttle.io_service_bytes", dev)
        if mem_dir is not None and cfg.get("child_stat", True):
            st = read_kv(mem_dir / "memory.stat")
            for k in STAT_KEYS:
                c[k] = st.get(k, 0)
            c["usage"] = int((mem_dir / "memory.usage_in_bytes").read_text())
        vm = read_kv(Path("/proc/vmstat"))
        for k in VMSTAT_KEYS:
            c["vm_" + k] = vm.get(k, 0)
        with contextlib.suppress(OSError):
            for line in Path("/proc/self/io").read_text().splitlines():
                if line.startswith("read_bytes:"):
                    c["proc_read"] = int(line.split()[1])
        c["resident"] = res.resident_bytes()
        return c

    out: dict[str, object] = {"windows": [s.window for s in shards], "files": [str(p) for p in paths]}
    c0 = counters()
    t0 = time.time()
    stack = contextlib.ExitStack()
    wins = []
    for p in paths:
        m = stack.enter_context(Model(p))
        wins.append(stack.enter_context(Window(m, "hidden", N_CTX, 1, cfg["threads"])))
    t1 = time.time()
    c1 = counters()
    out["load"] = {"t0": t0, "t1": t1, "before": c0, "after": c1}
    pf = Prefetcher(cfg["prefetch"])
    for s, p in zip(shards, paths, strict=True):
        pf.register(p, s.data_offset)
    mine = [s.window for s in shards]
    by_window = dict(zip(mine, range(len(mine)), strict=True))
    ran: set[int] = set()
    n_embd = wins[0].n_embd
    hidden = (np.random.default_rng(0).standard_normal((1, n_embd)) * 0.1).astype(np.float32)
    gap = cfg["gap_s"]
    spans: list[list[float]] = []
    tokens: list[dict[str, object]] = []
    steps = cfg["warmup"] + cfg["tokens"]
    for step in range(steps):
        ts = time.time()
        for j in mine:
            a = time.time()
            wins[by_window[j]].run_hidden(hidden, step)
            b = time.time()
            ran.add(j)
            nxt = prefetch_window(mine, j, ran) if cfg["prefetch"] else None
            if nxt is not None:
                pf.advise(paths[by_window[nxt]])
            c = time.time()
            spans.append([step, j, a, b, c, -1 if nxt is None else nxt])
            time.sleep(gap)
        tokens.append({"step": step, "t0": ts, "t1": time.time(), "c": counters()})
        print(f"token {step + 1}/{steps}", file=sys.stderr, flush=True)
    # Let the last advice's reads finish before exiting: a page whose read is in flight survives the next
    # point's drop_caches, stays charged to this (removed) cgroup and would be free cache for the next point.
    if io_dir is not None:
        last, quiet, deadline = -1, 0.0, time.time() + 20.0
        while quiet < 0.5 and time.time() < deadline:
            now_read = blkio_read_bytes(io_dir / "blkio.throttle.io_service_bytes", dev)
            quiet = quiet + 0.1 if now_read == last else 0.0
            last = now_read
            time.sleep(0.1)
    pf.close()
    stack.close()
    res.close()
    out["spans"] = spans
    out["tokens"] = tokens
    Path(cfg["result"]).write_text(json.dumps(out))
    return 0


# ===========================================================================================================
# parent: disk, shards, cgroups, grid
# ===========================================================================================================
@dataclass(frozen=True)
class Point:
    shape: str
    k: int
    size: str
    ratio: float
    prefetch: bool
    rep: int = 1
    tag: str = ""

    @property
    def key(self) -> str:
        base = f"{self.shape}-k{self.k}-{self.size}-r{self.ratio:g}-{'pf' if self.prefetch else 'nopf'}"
        return (base if self.rep == 1 else f"{base}-rep{self.rep}") + (f"-{self.tag}" if self.tag else "")


def parse_point(key: str, rep: int = 1, tag: str = "") -> Point:
    """The point a key names (``1b-k1-large-r0.45-nopf``)."""
    parts = key.split("-")
    if (
        len(parts) != 5
        or parts[0] not in SHAPES
        or parts[2] not in ("large", "small")
        or parts[4] not in ("pf", "nopf")
    ):
        raise ValueError(f"bad point name {key!r} (e.g. 1b-k1-large-r0.45-nopf)")
    return Point(parts[0], int(parts[1][1:]), parts[2], float(parts[3][1:]), parts[4] == "pf", rep, tag)


def grid(
    shapes: list[str], ks: list[int], sizes: list[str], ratios: list[float], prefetch: list[bool]
) -> list[Point]:
    """Points in run order: shape, config, prefetch, ratio (k = 1 has no prefetch under the executor's rule)."""
    pts = []
    for sh in shapes:
        for k in ks:
            for size in sizes:
                for pf in prefetch:
                    if pf and k == 1:
                        continue
                    for r in ratios:
                        pts.append(Point(sh, k, size, r, pf))
    return pts


class Disk:
    """The persistent loop-device disk of the grid (image in the cache directory)."""

    def __init__(self, base: Path, registry: Registry) -> None:
        from prima_sim.emulate.disk import detach, run_tool, unmount

        self.base = base
        self.image = base / "disk.img"
        self.mnt = base / "mnt"
        self.reg = registry
        fresh = not self.image.exists()
        base.mkdir(parents=True, exist_ok=True)
        if fresh:
            with self.image.open("wb") as fh:
                fh.truncate(IMAGE_BYTES)
        self.dev = run_tool(
            ["losetup", "--find", "--show", "--direct-io=on", str(self.image)], "attaching"
        ).strip()
        dev = self.dev
        registry.add("loop device", dev, lambda: detach(dev))
        if fresh:
            run_tool(
                ["mkfs.ext4", "-q", "-F", "-m", "0", "-E", "lazy_itable_init=0,lazy_journal_init=0", dev],
                "mkfs",
            )
        self.mnt.mkdir(exist_ok=True)
        run_tool(["mount", "-o", "noatime", dev, str(self.mnt)], "mounting")
        registry.add("mount", str(self.mnt), lambda: unmount(self.mnt))
        Path(f"/sys/block/{Path(dev).name}/queue/read_ahead_kb").write_text(str(READAHEAD_KB))
        st = os.stat(dev)
        self.majmin = f"{os.major(st.st_rdev)}:{os.minor(st.st_rdev)}"


def model_path(shape: str) -> Path:
    from prima_sim.emulate.models import ensure_model
    from prima_sim.emulate.scenario import ModelSpec

    return ensure_model(ModelSpec(**SHAPES[shape], quant="Q4_0"), log=say)


def plan_for(shape: str, k: int, size: str) -> Plan:
    from prima_sim.plan import Plan, make_assignments, rounds_for

    L = SHAPES[shape]["layers"]
    windows = CONFIGS[shape][(k, size)]
    assert rounds_for(windows, L) == k, (shape, k, size, windows)
    devs = make_assignments(["H", "D"], windows, [0, 0], L)
    return Plan(model_id=f"synth-{shape}", n_layers=L, cluster_name="pagecache-bench", k=k, n_ctx=N_CTX,
                devices=devs, scheduler="manual")  # fmt: skip


def ensure_shards(disk: Disk, shape: str, k: int, size: str) -> Path:
    from prima_sim.exec.shard import write_shards

    d = disk.mnt / shape / f"k{k}-{size}"
    if (d / "D" / "manifest.json").exists():
        return d / "D"
    say(f"cutting shards {shape} k={k} {size}")
    write_shards(model_path(shape), plan_for(shape, k, size), d, devices=["D"])
    os.sync()
    return d / "D"


def shard_info(shard_dir: Path) -> tuple[int, list[int], list[int]]:
    """(working-set bytes, per-window bytes, per-window layer counts) of the measured device."""
    from prima_sim.exec.shard import load_manifest

    man = load_manifest(shard_dir, "D")
    ws = sorted((s for s in man.shards if s.window >= 0), key=lambda s: s.window)
    sizes = [s.n_bytes - s.data_offset for s in ws]
    return sum(sizes), sizes, [s.layers[1] - s.layers[0] for s in ws]


def write_layouts(disk: Disk, path: Path) -> None:
    """Tensor layout of every configuration's shards (file order: name, offset, bytes), for the replay."""
    from prima_sim.devices.gguf_file import read_gguf
    from prima_sim.exec.shard import load_manifest, shard_path

    out = json.loads(path.read_text()) if path.exists() else {}
    for shape, confs in CONFIGS.items():
        for k, size in confs:
            key = f"{shape}-k{k}-{size}"
            d = disk.mnt / shape / f"k{k}-{size}" / "D"
            if key in out or not (d / "manifest.json").exists():
                continue
            man = load_manifest(d, "D")
            files = []
            for s in sorted((s for s in man.shards if s.window >= 0), key=lambda s: s.window):
                g = read_gguf(shard_path(d, man, s))
                files.append({"window": s.window, "layers": list(s.layers), "file_size": g.file_size,
                              "data_offset": s.data_offset,
                              "tensors": [[t.name, t.offset, t.n_bytes] for t in g.tensors]})  # fmt: skip
            out[key] = files
    path.write_text(json.dumps(out, indent=0))


def drop_caches() -> None:
    os.sync()
    Path("/proc/sys/vm/drop_caches").write_text("1")


def run_child(cgs: Cgroups, name: str, shard_dir: Path, disk: Disk, limit: int | None, bps: float, prefetch: bool,
              gap_s: float, threads: int, warmup: int, tokens: int, workdir: Path,
              sample_s: float = SAMPLE_S) -> tuple[dict, list, str]:  # fmt: skip
    """Run one child in a fresh cgroup; returns (its result, the parent's memory samples, error or '')."""
    from prima_sim.emulate.spawn import spawn, stop

    g = cgs.create(name)
    try:
        if limit:
            g.set_memory_limit(limit)
        if bps:
            g.set_read_bps(disk.majmin, bps)
        result = workdir / f"{name}.json"
        cfg = {"shard_dir": str(shard_dir), "memory_dir": str(g.dirs["memory"]), "io_dir": str(g.dirs["io"]),
               "dev": disk.majmin, "prefetch": prefetch, "gap_s": gap_s, "threads": threads, "warmup": warmup,
               "tokens": tokens, "result": str(result), "child_stat": sample_s < 1.0}  # fmt: skip
        cfg_path = workdir / f"{name}.cfg.json"
        cfg_path.write_text(json.dumps(cfg))
        env = dict(os.environ, OMP_WAIT_POLICY="passive", PYTHONPATH=str(ROOT))
        log = (workdir / f"{name}.log").open("wb")
        drop_caches()
        p = spawn([sys.executable, str(Path(__file__).resolve()), "--child", str(cfg_path)],
                  procs_files=g.procs_files(), env=env, stdout=log, stderr=log)  # fmt: skip
        samples = []
        t_end = time.time() + CHILD_TIMEOUT_S
        mem = g.dirs["memory"]
        while p.poll() is None:
            st = read_kv(mem / "memory.stat")
            samples.append([time.time()] + [st.get(k, 0) for k in STAT_KEYS] +
                           [blkio_read_bytes(g.dirs["io"] / "blkio.throttle.io_service_bytes", disk.majmin)])  # fmt: skip
            if time.time() > t_end:
                stop(p)
                break
            time.sleep(sample_s)
        log.close()
        oom = g.oom_kills()
        err = ""
        if p.returncode != 0:
            tail = (workdir / f"{name}.log").read_text(errors="replace").strip().splitlines()[-3:]
            err = ("OOM-killed; " if oom else "") + f"child exited {p.returncode}: " + " | ".join(tail)
            return {}, samples, err[-400:]
        return json.loads(result.read_text()), samples, ""
    finally:
        g.remove()


def calibrate(cgs: Cgroups, disk: Disk, shape: str, k: int, size: str, shard_dir: Path, threads: int, workdir: Path,
              cache: dict) -> int:  # fmt: skip
    """Memory the device's process holds besides the model's page cache (anonymous memory, kernel memory and
    non-model file pages), measured once per configuration without a limit."""
    key = f"{shape}-k{k}-{size}-t{threads}"
    if key in cache:
        return int(cache[key])
    say(f"calibrating the process footprint of {key}")
    res, _s, err = run_child(cgs, "calib", shard_dir, disk, None, 0, False, 0.0, threads, 1, 1, workdir)
    if err:
        raise RuntimeError(f"calibration of {key} failed: {err}")
    c = res["tokens"][-1]["c"]
    pinned = int(c["usage"]) - int(c["resident"])
    cache[key] = pinned
    return pinned


def summarize(pt: Point, res: dict, samples: list, meta: dict) -> dict:
    toks = res["tokens"]
    warm = meta["warmup"]
    meas = toks[warm:]
    prev = toks[warm - 1]["c"] if warm > 0 else res["load"]["after"]
    per_read, per_busy, per_wall, per_adv = [], [], [], []
    last = prev
    for t in meas:
        c = t["c"]
        per_read.append(c["io_read"] - last["io_read"])
        last = c
    spans = [s for s in res["spans"] if s[0] >= warm]
    for step in range(warm, warm + meta["tokens"]):
        ss = [s for s in spans if s[0] == step]
        per_busy.append(sum(s[4] - s[2] for s in ss))
        per_adv.append(sum(s[4] - s[3] for s in ss))
    for t in meas:
        per_wall.append(t["t1"] - t["t0"])
    n = len(meas)
    first, endc = prev, meas[-1]["c"]
    resident = [t["c"]["resident"] for t in meas]
    cache = statistics.median(resident)
    act = statistics.median(t["c"].get("total_active_file", 0) for t in meas)
    ina = statistics.median(t["c"].get("total_inactive_file", 0) for t in meas)
    tot = statistics.median(t["c"].get("total_cache", 0) for t in meas)
    load = res["load"]
    return {
        "read_per_token": sum(per_read) / n,
        "read_per_token_min": min(per_read),
        "read_per_token_max": max(per_read),
        "reread_frac": sum(per_read) / n / meta["ws_bytes"],
        "busy_s": statistics.median(per_busy),
        "wall_s": statistics.median(per_wall),
        "advise_s": statistics.median(per_adv),
        "cache_bytes": cache,
        "cache_ratio": cache / meta["ws_bytes"],
        "file_bytes": tot,
        "active_file": act,
        "inactive_file": ina,
        "other_file": tot - cache,
        "refault_per_token": (
            endc.get("total_workingset_refault_file", 0) - first.get("total_workingset_refault_file", 0)
        )
        * PAGE
        / n,
        "activate_per_token": (endc["vm_workingset_activate_file"] - first["vm_workingset_activate_file"])
        * PAGE
        / n,
        "majfault_per_token": (endc.get("total_pgmajfault", 0) - first.get("total_pgmajfault", 0)) / n,
        "load_read_bytes": load["after"].get("io_read", 0) - load["before"].get("io_read", 0),
        "load_s": load["t1"] - load["t0"],
        "per_token_read": per_read,
    }


def read_csv(path: Path) -> list[dict[str, str]]:
    if not path.exists():
        return []
    with path.open() as fh:
        return list(csv.DictReader(fh))


def append_csv(path: Path, row: dict) -> None:
    """Append a row; a file written with other columns is rewritten with the current ones first."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.exists():
        with path.open() as fh:
            header = next(csv.reader(fh), [])
        if header != CSV_FIELDS:
            old = read_csv(path)
            with path.open("w", newline="") as fh:
                w = csv.DictWriter(fh, fieldnames=CSV_FIELDS, extrasaction="ignore")
                w.writeheader()
                w.writerows(old)
    new = not path.exists()
    with path.open("a", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=CSV_FIELDS, extrasaction="ignore")
        if new:
            w.writeheader()
        w.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in row.items()})


def drop_rows(csv_path: Path, trace_path: Path, keys: set[str]) -> None:
    """Remove the rows and trace records of points ``keys`` (to measure them again)."""
    rows = read_csv(csv_path)
    if rows:
        with csv_path.open("w", newline="") as fh:
            w = csv.DictWriter(fh, fieldnames=CSV_FIELDS, extrasaction="ignore")
            w.writeheader()
            w.writerows(r for r in rows if r["point"] not in keys)
    if trace_path.exists():
        with gzip.open(trace_path, "rt") as fh:
            keep = [line for line in fh if json.loads(line)["point"] not in keys]
        with gzip.open(trace_path, "wt") as fh:
            fh.writelines(keep)


def append_trace(path: Path, rec: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with gzip.open(path, "at") as fh:
        fh.write(json.dumps(rec, separators=(",", ":")) + "\n")


def run_grid(args: argparse.Namespace) -> int:
    from prima_sim.emulate import cgroups as cg
    from prima_sim.emulate.models import cache_dir
    from prima_sim.emulate.resources import Registry

    cg.check_root()
    t_start = time.time()
    csv_path, trace_path = Path(args.csv), Path(args.trace)
    if args.redo and args.points:
        drop_rows(csv_path, trace_path, set(args.points))
    done = {r["point"] for r in read_csv(csv_path) if r.get("status") == "ok"}
    if args.points:
        pts = [parse_point(k, r, args.tag) for r in range(1, args.reps + 1) for k in args.points]
    else:
        pts = grid(args.shapes, args.k, args.sizes, args.ratios, args.prefetch)
    pts = [p for p in pts if p.key not in done]
    say(f"{len(pts)} points to run ({len(done)} already in {csv_path})")
    if not pts:
        return 0
    base = cache_dir() / "pagecache-bench"
    calib_file = base / "calibration.json"
    with Registry() as reg:
        disk = Disk(base, reg)
        cgs = cg.Cgroups(reg.prefix, need=("memory", "io"))
        reg.add("cgroups", reg.prefix, cgs.remove_all_or_raise)
        workdir = base / "work"
        workdir.mkdir(exist_ok=True)
        calib = json.loads(calib_file.read_text()) if calib_file.exists() else {}
        write_layouts(disk, Path(args.layouts))
        host, kernel = socket.gethostname(), os.uname().release
        for i, pt in enumerate(pts):
            elapsed = (time.time() - t_start) / 60
            if elapsed > args.budget_min:
                say(f"budget of {args.budget_min} min reached after {i} points; run again to continue")
                break
            shard_dir = ensure_shards(disk, pt.shape, pt.k, pt.size)
            ws, wbytes, wlayers = shard_info(shard_dir)
            pinned = calibrate(cgs, disk, pt.shape, pt.k, pt.size, shard_dir, args.threads, workdir, calib)
            write_layouts(disk, Path(args.layouts))
            calib_file.write_text(json.dumps(calib, indent=1))
            room = int(pt.ratio * ws)
            limit = pinned + room
            mp = model_path(pt.shape)
            meta = {"warmup": args.warmup, "tokens": args.tokens, "ws_bytes": ws}
            say(f"[{i + 1}/{len(pts)}] {pt.key}: ws {ws / MIB:.0f} MiB, room {room / MIB:.0f} MiB, "
                f"limit {limit / MIB:.0f} MiB")  # fmt: skip
            res, samples, err = run_child(cgs, "point", shard_dir, disk, limit, args.disk_read * MB, pt.prefetch,
                                          args.gap_ms / 1e3, args.threads, args.warmup, args.tokens, workdir,
                                          args.sample_ms / 1e3)  # fmt: skip
            row: dict[str, object] = {
                "point": pt.key, "sample_s": args.sample_ms / 1e3, "shape": pt.shape, "model_bytes": mp.stat().st_size,
                "layer_bytes": ws / sum(wlayers), "k": pt.k, "size": pt.size,
                "windows": "/".join(str(x) for x in CONFIGS[pt.shape][(pt.k, pt.size)]),
                "device_layers": "/".join(str(x) for x in wlayers), "ws_bytes": ws,
                "window_bytes": "/".join(str(x) for x in wbytes), "ratio": pt.ratio, "prefetch": int(pt.prefetch),
                "disk_bps": args.disk_read * MB, "gap_s": args.gap_ms / 1e3, "threads": args.threads,
                "tokens": args.tokens, "warmup": args.warmup, "limit_bytes": limit, "pinned_bytes": pinned,
                "room_bytes": room, "host": host, "kernel": kernel, "date": dt.date.today().isoformat(),
            }  # fmt: skip
            if err:
                row.update(status="failed", error=err)
                say(f"  failed: {err}")
            else:
                s = summarize(pt, res, samples, meta)
                row.update(s, status="ok", error="")
                say(f"  read {s['read_per_token'] / MIB:.0f} MiB/token ({s['reread_frac']:.2f} of ws), cache "
                    f"{s['cache_ratio']:.2f} of ws, busy {s['busy_s'] * 1e3:.0f} ms/token, per token "
                    f"{' '.join(f'{x / MIB:.0f}' for x in s['per_token_read'])}")  # fmt: skip
                append_trace(trace_path, {"point": pt.key, "row": {k: v for k, v in row.items() if k != "per_token_read"},
                                          "files": res["files"], "windows": res["windows"], "spans": res["spans"],
                                          "tokens": res["tokens"], "load": res["load"], "samples": samples,
                                          "sample_keys": ["t", *STAT_KEYS, "io_read"]})  # fmt: skip
            append_csv(csv_path, row)
    return 0


# ===========================================================================================================
# plot
# ===========================================================================================================
OTHER_FILE_BYTES = 3 * MIB  # other files that stay cached under pressure (interpreter, libraries): 1-5 MiB


def model_cache_ratio(row: dict) -> float:
    """The page cache the model got over its working set: the cgroup's file pages minus the few MiB of other
    files that stay (``mincore`` misses pages whose read is in flight, which prefetch keeps many of)."""
    fb = float(row.get("file_bytes") or 0)
    if fb <= 0:
        return float(row["cache_ratio"])
    return (fb - OTHER_FILE_BYTES) / float(row["ws_bytes"])


def backfill(csv_path: Path, trace_path: Path) -> None:
    """Fill ``file_bytes`` of rows written before it existed, from the trace (median ``total_cache`` of the
    measured tokens)."""
    rows = read_csv(csv_path)
    if not rows or all(r.get("file_bytes") for r in rows) or not trace_path.exists():
        return
    fill: dict[str, float] = {}
    with gzip.open(trace_path, "rt") as fh:
        for line in fh:
            rec = json.loads(line)
            warm = int(rec["row"]["warmup"])
            vals = [t["c"]["total_cache"] for t in rec["tokens"][warm:] if "total_cache" in t["c"]]
            if vals:
                fill[rec["point"]] = statistics.median(vals)
    for r in rows:
        if not r.get("file_bytes") and r["point"] in fill:
            r["file_bytes"] = f"{fill[r['point']]:.6g}"
    with csv_path.open("w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=CSV_FIELDS, extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)


def plot(csv_path: Path, png: Path, replay_csv: Path | None = None) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in read_csv(csv_path) if r.get("status") == "ok" and r["point"].count("-") == 4]
    model = (
        {r["point"]: float(r["kernel"]) for r in read_csv(replay_csv)}
        if replay_csv and replay_csv.exists()
        else {}
    )
    shapes = sorted({r["shape"] for r in rows})
    fig, axes = plt.subplots(len(shapes), 3, figsize=(15, 4.2 * len(shapes)), squeeze=False, sharey=True)
    colors = {"large": "tab:blue", "small": "tab:orange"}
    for i, sh in enumerate(shapes):
        for j, k in enumerate((1, 2, 3)):
            ax = axes[i][j]
            for size in ("large", "small"):
                for pf, ls in ((0, "-"), (1, "--")):
                    rs = sorted((r for r in rows if r["shape"] == sh and int(r["k"]) == k and r["size"] == size
                                 and int(r["prefetch"]) == pf), key=model_cache_ratio)  # fmt: skip
                    if not rs:
                        continue
                    x = [min(model_cache_ratio(r), 1.25) for r in rs]
                    y = [float(r["reread_frac"]) for r in rs]
                    ws = float(rs[0]["ws_bytes"]) / MIB
                    ax.plot(x, y, ls, marker="o" if not pf else "s", color=colors[size], ms=4,
                            label=f"{size} ({ws:.0f} MiB){' prefetch' if pf else ''}")  # fmt: skip
                    ym = [
                        model[r["point"]] / float(r["ws_bytes"]) if r["point"] in model else None for r in rs
                    ]
                    pts = [(a, b) for a, b in zip(x, ym, strict=True) if b is not None]
                    if pts:
                        ax.plot([a for a, _ in pts], [b for _, b in pts], "x" if not pf else "+", color=colors[size],
                                ms=7, mew=1.5, label=f"{size}{' prefetch' if pf else ''}: kernel model")  # fmt: skip
            xx = np.linspace(0.2, 1.3, 50)
            ax.plot(xx, np.where(xx < 1, 1.0, 0.0), ":", color="grey", lw=1, label="pure LRU")
            ax.plot(xx, np.clip(1 - xx, 0, 1), "-.", color="grey", lw=1, label="overflow only")
            ax.set_title(f"{sh} shape, k = {k}")
            ax.set_xlabel("page cache the model got / working set")
            if j == 0:
                ax.set_ylabel("bytes read per token / working set")
            ax.set_xlim(0.2, 1.3)
            ax.set_ylim(-0.05, 2.0)
            ax.grid(alpha=0.3)
            ax.legend(fontsize=6, ncol=2)
    fig.suptitle(
        "Bytes Linux re-reads per token when llama.cpp decodes k windows in a memory cgroup "
        "(o/s measured, x/+ prima_sim.sim.kernel_cache replayed)"
    )
    fig.tight_layout()
    png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png, dpi=110)
    say(f"wrote {png}")


def floats(s: str) -> list[float]:
    return [float(x) for x in s.split(",") if x]


def main() -> int:
    if len(sys.argv) == 3 and sys.argv[1] == "--child":
        signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
        return child(sys.argv[2])
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shapes", default="1b,3b")
    ap.add_argument("--k", default="1,2,3")
    ap.add_argument("--sizes", default="large,small")
    ap.add_argument("--ratios", default=",".join(f"{r:g}" for r in RATIOS))
    ap.add_argument("--prefetch", default="off,on")
    ap.add_argument("--tokens", type=int, default=8, help="measured decode tokens per point")
    ap.add_argument("--warmup", type=int, default=3, help="decode tokens before the measured ones")
    ap.add_argument("--disk-read", type=float, default=500, help="read limit of the disk, MB/s")
    ap.add_argument("--gap-ms", type=float, default=200, help="time the other devices take after each window")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--csv", default=str(ROOT / "reports" / "pagecache-grid.csv"))
    ap.add_argument("--trace", default=str(ROOT / "reports" / "pagecache-trace.json.gz"))
    ap.add_argument("--plot", default=str(ROOT / "reports" / "pagecache-grid.png"))
    ap.add_argument("--layouts", default=str(ROOT / "reports" / "pagecache-layouts.json"))
    ap.add_argument(
        "--replay",
        default=str(ROOT / "reports" / "pagecache-replay.csv"),
        help="replay_pagecache.py --out CSV whose kernel-model bytes the plot adds",
    )
    ap.add_argument("--budget-min", type=float, default=9.0)
    ap.add_argument("--plot-only", action="store_true")
    ap.add_argument(
        "--points", default="", help="run these points only (names as in the CSV), e.g. to repeat them"
    )
    ap.add_argument(
        "--reps", type=int, default=1, help="with --points: repetitions (rows named <point>-rep<i>)"
    )
    ap.add_argument("--tag", default="", help="with --points: suffix of the rows' names (e.g. a variant)")
    ap.add_argument(
        "--redo", action="store_true", help="with --points: drop their rows and measure them again"
    )
    ap.add_argument(
        "--sample-ms",
        type=float,
        default=SAMPLE_S * 1e3,
        help="how often the parent reads memory.stat (each read flushes the cgroup's statistics); "
        "from 1000 on the child no longer reads it at every token either",
    )
    args = ap.parse_args()
    if args.plot_only:
        backfill(Path(args.csv), Path(args.trace))
        plot(Path(args.csv), Path(args.plot), Path(args.replay))
        return 0
    for name in args.shapes.split(","):
        if name not in SHAPES:
            ap.error(f"--shapes: unknown shape {name!r} (choose from {', '.join(SHAPES)})")
    args.shapes = args.shapes.split(",")
    args.k = [int(x) for x in args.k.split(",")]
    if any(k not in (1, 2, 3) for k in args.k):
        ap.error("--k: values must be 1, 2 or 3")
    args.sizes = args.sizes.split(",")
    if any(s not in ("large", "small") for s in args.sizes):
        ap.error("--sizes: values must be large or small")
    args.ratios = floats(args.ratios)
    if any(not 0.05 <= r <= 3 for r in args.ratios):
        ap.error("--ratios: values must be in [0.05, 3]")
    pf = args.prefetch.split(",")
    if any(x not in ("on", "off") for x in pf):
        ap.error("--prefetch: values must be on or off")
    args.prefetch = [x == "on" for x in pf]
    args.points = [x for x in args.points.split(",") if x]
    try:
        for x in args.points:
            parse_point(x)
    except ValueError as exc:
        ap.error(f"--points: {exc}")
    if args.reps < 1 or args.sample_ms <= 0:
        ap.error("--reps and --sample-ms must be positive")
    if args.tokens < 1 or args.warmup < 1:
        ap.error("--tokens and --warmup must be >= 1")
    rc = run_grid(args)
    if Path(args.csv).exists():
        plot(Path(args.csv), Path(args.plot), Path(args.replay))
    return rc


if __name__ == "__main__":
    sys.exit(main())
