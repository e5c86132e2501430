"""``prima-sim sweep``: plan and simulate a grid of cluster variants on all cores and write one CSV."""

from __future__ import annotations

import argparse
import time
from collections.abc import Iterable
from typing import Any

from prima_sim.cli.common import (
    add_workload_args,
    check_number,
    load_cluster_arg,
    load_model_arg,
    workload_from_args,
)
from prima_sim.cli.plan import DEFAULT_MODEL
from prima_sim.cli.simulate import MAX_CHUNK_MIB
from prima_sim.errors import InputError
from prima_sim.halda.planner import SCHEDULERS
from prima_sim.sim.config import PAGE_BYTES, SimConfig
from prima_sim.sim.sweep import grid, run_sweep, write_sweep_csv
from prima_sim.units import MiB

SWEEP_CHUNK_MIB = 64.0
"""Default page-cache chunk of sweeps: coarser than ``simulate``'s 32 MiB (half the events), still under 1% of
the caches that matter."""


def register(sub: argparse._SubParsersAction) -> None:
    """Add the ``sweep`` subcommand."""
    p = sub.add_parser(
        "sweep",
        help="simulate a grid of cluster variants (device counts, RAM, disk, bandwidth) and write a CSV",
        description="Derive clusters from a base cluster (its first N devices in ring order; RAM, disk and network "
        "bandwidth scaled on every device), plan each with each scheduler, simulate it, and write one CSV row per "
        "(variant, scheduler). Runs on all cores with a progress bar.",
    )
    p.add_argument("--cluster", required=True, help="base cluster: bundled name or TOML/JSON file")
    p.add_argument("--model", default=DEFAULT_MODEL, help="catalog id or GGUF path (default: %(default)s)")
    p.add_argument("--devices", help="device counts, e.g. 2,3,4,6 (default: all of the base cluster)")
    p.add_argument("--ram-scale", default="1", help="RAM scale factors, e.g. 0.5,1,2 (default: 1)")
    p.add_argument("--disk-scale", default="1", help="disk read bandwidth scale factors (default: 1)")
    p.add_argument("--bandwidth-scale", default="1", help="network bandwidth scale factors (default: 1)")
    p.add_argument(
        "--scheduler", default="halda", help=f"comma-separated schedulers among {', '.join(SCHEDULERS)}"
    )
    p.add_argument("--k", type=int, default=None, help="force Halda's number of rounds")
    p.add_argument("--no-drop", action="store_true", help="Halda without device selection")
    # small requests (a sweep simulates many variants), one sequence per KV cache
    add_workload_args(p, fields=("n_ctx", "prompt_tokens", "decode_tokens", "n_ubatch"), prompt_tokens=16,
                      decode_tokens=8)  # fmt: skip
    p.add_argument("--seed", type=int, default=0, help="root seed (default: %(default)s)")
    p.add_argument("--jitter", type=float, default=0.0, help="log-normal noise sigma (default: 0)")
    p.add_argument("--no-prefetch", action="store_true", help="simulate without prefetch")
    p.add_argument(
        "--page-cache",
        choices=("linux", "lru"),
        default="linux",
        help="page-cache model of Linux devices (see prima-sim simulate --help; default: %(default)s)",
    )
    p.add_argument("--cold", action="store_true", help="start every run with a cold page cache")
    p.add_argument(
        "--chunk-mib",
        type=float,
        default=SWEEP_CHUNK_MIB,
        help="page-cache chunk, MiB (default: %(default)g)",
    )
    p.add_argument("--jobs", type=int, default=None, help="processes (default: all cores)")
    p.add_argument("--out", required=True, help="CSV file to write")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=run)


def _floats(text: str, flag: str) -> list[float]:
    try:
        vals = [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise InputError(flag, "", f"expected comma-separated numbers like 0.5,1,2, got {text!r}") from None
    if not vals:
        raise InputError(flag, "", "give at least one value")
    for v in vals:
        check_number(flag, v, above=0)
    return vals


def _ints(text: str, flag: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise InputError(flag, "", f"expected comma-separated integers like 2,3,4, got {text!r}") from None


def run(args: argparse.Namespace) -> int:
    """Handler of ``prima-sim sweep``."""
    base = load_cluster_arg(args.cluster)
    model = load_model_arg(args.model)
    schedulers = [s.strip().lower() for s in args.scheduler.split(",") if s.strip()]
    bad = [s for s in schedulers if s not in SCHEDULERS]
    if bad or not schedulers:
        raise InputError(
            "--scheduler", "", f"unknown scheduler(s) {bad}; choose among {', '.join(SCHEDULERS)}"
        )
    check_number("--k", args.k, minimum=1, maximum=model.arch.n_layer)
    check_number("--chunk-mib", args.chunk_mib, minimum=PAGE_BYTES / MiB, maximum=MAX_CHUNK_MIB)
    check_number("--jitter", args.jitter, minimum=0, maximum=1)
    check_number("--seed", args.seed, minimum=0)
    check_number("--jobs", args.jobs, minimum=1)
    devices = _ints(args.devices, "--devices") if args.devices else None
    for n in devices or []:
        check_number("--devices", n, minimum=1, maximum=len(base.devices))
    wl = workload_from_args(args)
    try:
        cfg = SimConfig(prefetch=not args.no_prefetch, warm=not args.cold, chunk_bytes=int(args.chunk_mib * MiB),
                        jitter=args.jitter, seed=args.seed, record_spans=False, page_cache=args.page_cache)  # fmt: skip
        variants = grid(base, devices,
                        _floats(args.ram_scale, "--ram-scale"), _floats(args.disk_scale, "--disk-scale"),
                        _floats(args.bandwidth_scale, "--bandwidth-scale"), schedulers)  # fmt: skip
    except ValueError as exc:
        raise InputError("sweep", "", str(exc).replace('"', "")) from None

    def bar(it: Iterable[dict[str, Any]], total: int) -> Iterable[dict[str, Any]]:
        from prima_sim.progress import Progress

        return Progress(total, "sweep", "run", disable=args.quiet).wrap(it)

    t0 = time.perf_counter()
    rows = run_sweep(base, model, wl, variants, cfg, args.jobs, args.k, not args.no_drop, bar)
    path = write_sweep_csv(rows, args.out)
    ok = sum(1 for r in rows if r["status"] == "ok")
    print(
        f"{len(rows)} runs ({ok} ok, {len(rows) - ok} infeasible) in {time.perf_counter() - t0:.1f} s; wrote {path}"
    )
    return 0
