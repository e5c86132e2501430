"""Sweeps: plan and simulate a grid of cluster variants derived from one base cluster, across processes.

A variant takes the base cluster's first ``n`` devices in ring order (the head always stays) and scales a
field on every device: RAM (total and available, swap, and on unified-memory Macs the GPU's working set),
disk read bandwidth (sequential and random), or network bandwidth (every link and shared medium). Each
variant is planned with each scheduler and simulated; one CSV row per (variant, scheduler) records the plan,
the analytic and the simulated TPOT/TTFT and the memory pressure. Rows come out in grid order whatever the
number of processes, so the CSV is deterministic.
"""

from __future__ import annotations

import csv
import itertools
import math
import multiprocessing
import os
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from prima_sim.devices.behaviour import behaviour_of
from prima_sim.devices.cluster import Cluster
from prima_sim.devices.model import ModelProfile
from prima_sim.devices.profile import DeviceProfile
from prima_sim.errors import PrimaSimError
from prima_sim.halda.planner import make_plan
from prima_sim.sim.config import SimConfig
from prima_sim.sim.engine import simulate
from prima_sim.workload import Workload

SWEEP_COLUMNS: tuple[str, ...] = (
    "variant", "n_devices", "ram_scale", "disk_scale", "bandwidth_scale", "scheduler", "status", "k", "windows",
    "gpu_layers", "dropped", "analytic_tpot_s", "sim_tpot_s", "analytic_ttft_s", "sim_ttft_s", "sim_over_analytic",
    "max_memory_pressure", "memory_pressure", "disk_read_bytes_per_token", "events", "error",
)  # fmt: skip
"""Columns of the sweep CSV (docs/sim.md)."""


@dataclass(frozen=True)
class Variant:
    """One point of the grid: how to derive the cluster, and which scheduler plans it."""

    index: int
    n_devices: int
    ram_scale: float = 1.0
    disk_scale: float = 1.0
    bandwidth_scale: float = 1.0
    scheduler: str = "halda"

    @property
    def name(self) -> str:
        """Short label, e.g. ``n4-ram0.5-disk1-bw1``."""
        return f"n{self.n_devices}-ram{self.ram_scale:g}-disk{self.disk_scale:g}-bw{self.bandwidth_scale:g}"


def grid(base: Cluster, devices: Sequence[int] | None = None, ram: Sequence[float] = (1.0,),
         disk: Sequence[float] = (1.0,), bandwidth: Sequence[float] = (1.0,),
         schedulers: Sequence[str] = ("halda",)) -> list[Variant]:  # fmt: skip
    """Every combination of the given values, in a fixed order.

    Raises:
        ValueError: a device count outside [1, devices of the base cluster] or a scale that is not positive.
    """
    counts = list(devices) if devices else [len(base.devices)]
    for n in counts:
        if not 1 <= n <= len(base.devices):
            raise ValueError(f"device count {n} is outside 1..{len(base.devices)} (cluster {base.name})")
    for what, vals in (("ram", ram), ("disk", disk), ("bandwidth", bandwidth)):
        if not vals or any(not (v > 0 and math.isfinite(v)) for v in vals):
            raise ValueError(f"{what} scales must be positive numbers, got {list(vals)}")
    combos = itertools.product(counts, ram, disk, bandwidth, schedulers)
    return [Variant(i, n, float(r), float(d), float(b), s) for i, (n, r, d, b, s) in enumerate(combos)]


def _scale_device(d: DeviceProfile, ram: float, disk: float) -> DeviceProfile:
    upd: dict[str, Any] = {}
    if ram != 1.0:
        upd.update(
            ram_total_bytes=int(d.ram_total_bytes * ram),
            ram_available_bytes=int(d.ram_available_bytes * ram),
            swap_total_bytes=int(d.swap_total_bytes * ram),
            swap_available_bytes=int(d.swap_available_bytes * ram),
            swappable_bytes=int(d.swappable_bytes * ram),
        )
        if d.gpu is not None and behaviour_of(d).gpu_memory_is_ram:  # the GPU's memory is this RAM
            g = d.gpu
            gu: dict[str, Any] = {
                "vram_total_bytes": int(g.vram_total_bytes * ram),
                "vram_free_bytes": int(g.vram_free_bytes * ram),
            }
            if g.working_set_limit_bytes is not None:
                gu["working_set_limit_bytes"] = int(g.working_set_limit_bytes * ram)
            upd["gpu"] = g.model_copy(update=gu)
    if disk != 1.0:
        upd.update(
            disk_seq_read_bps=d.disk_seq_read_bps * disk, disk_rand_read_bps=d.disk_rand_read_bps * disk
        )
    return d.model_copy(update=upd) if upd else d


def derive_cluster(base: Cluster, v: Variant) -> Cluster:
    """The cluster of variant ``v``: the first ``n_devices`` in ring order, with scaled fields."""
    names = list(base.ring_order)[: v.n_devices]
    c = base.subset(names) if v.n_devices < len(base.devices) else base
    devices = tuple(_scale_device(d, v.ram_scale, v.disk_scale) for d in c.devices)
    upd: dict[str, Any] = {"devices": devices, "name": f"{base.name}[{v.name}]"}
    if v.bandwidth_scale != 1.0:
        s = v.bandwidth_scale
        upd["default_link"] = c.default_link.model_copy(
            update={"bandwidth_bps": c.default_link.bandwidth_bps * s}
        )
        upd["links"] = tuple(lk.model_copy(update={"bandwidth_bps": lk.bandwidth_bps * s}) for lk in c.links)
        upd["media"] = tuple(m.model_copy(update={"capacity_bps": m.capacity_bps * s}) for m in c.media)
    return c.model_copy(update=upd)


def run_variant(v: Variant, base: Cluster, model: ModelProfile, workload: Workload, cfg: SimConfig,
                k: int | None = None, allow_drop: bool = True) -> dict[str, Any]:  # fmt: skip
    """Plan and simulate one variant; problems (nothing fits) become a row with ``status`` and ``error``."""
    row: dict[str, Any] = dict.fromkeys(SWEEP_COLUMNS, "")
    row.update(variant=v.name, n_devices=v.n_devices, ram_scale=v.ram_scale, disk_scale=v.disk_scale,
               bandwidth_scale=v.bandwidth_scale, scheduler=v.scheduler)  # fmt: skip
    try:
        cluster = derive_cluster(base, v)
        plan = make_plan(cluster, model, workload, v.scheduler, k, allow_drop=allow_drop)
        row.update(k=plan.k, windows=":".join(str(w) for w in plan.windows),
                   gpu_layers=":".join(str(d.gpu_layers) for d in plan.devices),
                   dropped=":".join(d.name for d in plan.dropped))  # fmt: skip
        res = simulate(plan, cluster, model, workload, cfg, analytic=plan.prediction)
    except PrimaSimError as exc:
        row.update(status="infeasible", error=str(exc).splitlines()[0][:300])
        return row
    pressure = res.memory_pressure
    dec = max(1, workload.decode_tokens)
    read = sum(v_ for (tok, _), v_ in res.disk_read.items() if tok >= 1) / dec
    row.update(
        status="ok", analytic_tpot_s=res.analytic.tpot_s if res.analytic else math.nan, sim_tpot_s=res.tpot_s,
        analytic_ttft_s=res.analytic.ttft_s if res.analytic else math.nan, sim_ttft_s=res.ttft_s,
        max_memory_pressure=max(pressure.values()),
        memory_pressure=";".join(f"{n}={p:.4f}" for n, p in pressure.items()),
        disk_read_bytes_per_token=read, events=res.events,
    )  # fmt: skip
    a = row["analytic_tpot_s"]
    row["sim_over_analytic"] = res.tpot_s / a if a and math.isfinite(a) and a > 0 else math.nan
    return row


# --- running in parallel -------------------------------------------------------------------------------------
_CTX: dict[str, Any] = {}


def _init(
    base: Cluster, model: ModelProfile, workload: Workload, cfg: SimConfig, k: int | None, allow_drop: bool
) -> None:
    _CTX.update(base=base, model=model, workload=workload, cfg=cfg, k=k, allow_drop=allow_drop)


def _work(v: Variant) -> dict[str, Any]:
    return run_variant(
        v, _CTX["base"], _CTX["model"], _CTX["workload"], _CTX["cfg"], _CTX["k"], _CTX["allow_drop"]
    )


def run_sweep(base: Cluster, model: ModelProfile, workload: Workload, variants: Sequence[Variant],
              cfg: SimConfig | None = None, jobs: int | None = None, k: int | None = None, allow_drop: bool = True,
              progress: Callable[[Iterable[dict[str, Any]], int], Iterable[dict[str, Any]]] | None = None,
              ) -> list[dict[str, Any]]:  # fmt: skip
    """Run every variant (``jobs`` processes; default: all cores) and return the rows in grid order.

    Args:
        progress: wraps the row iterator (e.g. a tqdm bar): called with the iterator and the total.
    """
    cfg = cfg or SimConfig(record_spans=False)
    jobs = max(1, jobs or os.cpu_count() or 1)
    wrap = progress or (lambda it, _n: it)
    if jobs == 1 or len(variants) <= 1:
        _init(base, model, workload, cfg, k, allow_drop)
        return list(wrap((_work(v) for v in variants), len(variants)))
    chunk = max(1, min(16, len(variants) // (jobs * 8)))
    ctx = multiprocessing.get_context(
        "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"
    )
    with ctx.Pool(jobs, initializer=_init, initargs=(base, model, workload, cfg, k, allow_drop)) as pool:
        return list(wrap(pool.imap(_work, variants, chunksize=chunk), len(variants)))


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return "" if math.isnan(v) else f"{v:.9g}"
    return str(v)


def write_sweep_csv(rows: Iterable[dict[str, Any]], path: str | Path) -> Path:
    """Write the rows with :data:`SWEEP_COLUMNS` (deterministic formatting)."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    with p.open("w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh, lineterminator="\n")
        w.writerow(SWEEP_COLUMNS)
        for r in rows:
            w.writerow([_fmt(r.get(c, "")) for c in SWEEP_COLUMNS])
    return p
