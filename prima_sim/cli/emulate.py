"""``prima-sim emulate``: emulate a home cluster on this host (cgroups + network namespaces) and compare every
prediction with real runs.

Examples::

    sudo prima-sim emulate --scenario datasets/scenarios/fits-in-memory.toml
    sudo prima-sim emulate --scenario fits-in-memory --tokens 16 --out /tmp/em --json
    sudo prima-sim emulate --suite                     # every bundled scenario (a benchmark: tens of minutes)
    sudo prima-sim emulate --check                     # can this host emulate? (root, controllers, iproute2)
    sudo prima-sim emulate --cleanup                   # remove what a crashed run left behind

Each run appends one row per plan to ``reports/emulation.csv`` and writes PNGs there; everything else
(profiles, cluster, plans, simulations, measured tokens and traces, logs) goes to ``--out``. See
docs/emulation.md.
"""

from __future__ import annotations

import argparse
import datetime as dt
import shutil
import sys
import time
from pathlib import Path
from typing import Any

from prima_sim.cli.common import print_json
from prima_sim.errors import EmulationError, InputError


def register(sub: Any) -> None:
    """Add the ``emulate`` subcommand."""
    p = sub.add_parser(
        "emulate",
        help="emulate a home cluster on this host (cgroups, network namespaces) and measure predictions",
        description="Emulate the devices of a scenario on this Linux host (root): each device is a cgroup (memory "
        "with page cache, CPU quota or cpuset, disk read limit) and a network namespace (shaped links, user-space "
        "latency). Profiles each device inside its limits, builds the cluster, plans with every scheduler, "
        "simulates, runs each plan for real, and appends predicted-vs-measured rows to reports/emulation.csv.",
    )
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--scenario", help="scenario TOML (or the name of a bundled one, e.g. fits-in-memory)")
    what.add_argument("--suite", nargs="?", const="", metavar="DIR",
                      help="run every scenario of DIR (default: the bundled datasets/scenarios)")  # fmt: skip
    what.add_argument(
        "--cleanup", action="store_true", help="remove namespaces and cgroups left by crashed runs"
    )
    what.add_argument("--check", action="store_true", help="check that this host can emulate, create nothing")
    p.add_argument("--tokens", type=int, default=None, help="timed decode tokens (overrides the scenario)")
    p.add_argument("--reps", type=int, default=None, help="repetitions per plan (overrides the scenario)")
    p.add_argument("--scheduler", action="append", default=None, help="only these schedulers (repeatable)")
    p.add_argument(
        "--out", default=None, help="directory for every artefact (default: emulation/<scenario>-<time>)"
    )
    p.add_argument(
        "--reports", default="reports", help="directory of emulation.csv and the PNGs (default reports/)"
    )
    p.add_argument(
        "--csv", default="emulation.csv", help="CSV file name in --reports (default emulation.csv)"
    )
    p.add_argument(
        "--work-dir", default=None, help="where shards and the profiler's test file go (default: --out/work)"
    )
    p.add_argument("--reuse-profiles", nargs="?", const="", default=None, metavar="DIR",
                   help="reuse device profiles measured under the same limits on this host (cache DIR, default "
                   "~/.cache/prima-sim/profiles)")  # fmt: skip
    p.add_argument(
        "--quick-profile", action="store_true", help="prima-sim profile --quick (seconds instead of ~20 s)"
    )
    p.add_argument("--profile-repeats", type=int, default=3,
                   help="profiler runs per distinct device; the median of each rate is kept (default 3)")  # fmt: skip
    p.add_argument("--no-calibrate", action="store_true",
                   help="keep the profiler's memory bandwidth instead of llama.cpp's measured decode rate")  # fmt: skip
    p.add_argument("--no-run-calibration", action="store_true",
                   help="do not measure the streaming rates around every run (predict with the profiles only)")  # fmt: skip
    p.add_argument(
        "--keep-shards",
        action="store_true",
        help="keep the shards in the work directory (with [disk] emulated = false; an emulated disk goes with the run)",
    )
    p.add_argument("--no-plots", action="store_true", help="write no PNGs")
    p.add_argument("--no-run", action="store_true", help="profile, plan and simulate only (no real runs)")
    p.add_argument("--force", action="store_true", help="with --cleanup: also remove what live runs use")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=run)


def _say(msg: str) -> None:
    print(f"[{dt.datetime.now().strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def check_host() -> dict[str, Any]:
    """What the emulation needs and whether this host has it (creates nothing)."""
    import os

    from prima_sim.emulate import cgroups

    hier = cgroups.detect()
    out: dict[str, Any] = {"root": os.geteuid() == 0, "controllers": {}, "tools": {}}
    for c in cgroups.CONTROLLERS:
        h = hier.get(c)
        out["controllers"][c] = (
            None if h is None else {"version": h.version, "mount": str(h.mount), "read_only": h.read_only}
        )
    for tool in ("ip", "tc"):
        out["tools"][tool] = shutil.which(tool)
    try:
        out["netns_dir"] = (
            str(Path("/run/netns"))
            if Path("/run/netns").exists()
            else "(created by the first 'ip netns add')"
        )
    except OSError:
        out["netns_dir"] = None
    out["ok"] = bool(out["root"] and out["controllers"]["memory"] and all(out["tools"].values()))
    out["swap"] = swap_support(hier.get("memory"))
    return out


def swap_support(mem: Any) -> dict[str, Any]:
    """Whether devices with ``swap =`` can be emulated: per-cgroup swap accounting (v1 ``memsw``, v2
    ``memory.swap.max``), the swap tools, and whether zswap would compress swapped pages in RAM first."""
    from prima_sim.emulate.swap import zswap_enabled

    acct = False
    if mem is not None:
        probe = "memory.memsw.limit_in_bytes" if mem.version == 1 else "memory.swap.max"
        acct = (mem.mount / probe).exists() or any(p.name == probe for p in mem.mount.glob(f"*/{probe}"))
    tools = {t: shutil.which(t) for t in ("mkswap", "swapon", "swapoff")}
    return {"accounting": acct, "tools": tools, "zswap": zswap_enabled(), "ok": acct and all(tools.values())}


def run(args: argparse.Namespace) -> int:
    """Entry point of ``prima-sim emulate``."""
    if args.check:
        info = check_host()
        if args.json:
            print_json(info)
        else:
            print(f"root: {'yes' if info['root'] else 'NO (run as root)'}")
            for c, h in info["controllers"].items():
                print(f"cgroup {c}: " + (f"v{h['version']} at {h['mount']}" + (" (READ-ONLY)" if h["read_only"] else "")
                                         if h else "not available"))  # fmt: skip
            for t, path in info["tools"].items():
                print(f"{t}: {path or 'NOT FOUND (install iproute2)'}")
            sw = info["swap"]
            print("devices with swap: " + ("possible" if sw["ok"] else "NOT possible (" + (
                "no per-cgroup swap accounting: boot with swapaccount=1 or use cgroup v2" if not sw["accounting"]
                else "mkswap/swapon/swapoff missing: install util-linux") + ")")
                  + (" (zswap is on: swapped pages are compressed in RAM first)" if sw["zswap"] else ""))  # fmt: skip
            print("ok" if info["ok"] else "this host cannot emulate (see above)")
        return 0 if info["ok"] else 1
    if args.cleanup:
        from prima_sim.emulate.cgroups import check_root
        from prima_sim.emulate.cleanup import cleanup_leftovers

        check_root()
        found, problems = cleanup_leftovers(include_live=args.force)
        if args.json:
            print_json({"removed": found, "problems": problems})
        else:
            n = len(found["netns"]) + len(found["cgroups"]) + len(found["swap"]) + len(found["disks"])
            print(
                f"removed {len(found['netns'])} namespace(s), {len(found['cgroups'])} cgroup(s), "
                f"{len(found['swap'])} swap file(s) and {len(found['disks'])} disk(s)"
                if n
                else "nothing to remove"
            )
            for x in found["netns"] + found["cgroups"] + found["swap"] + found["disks"]:
                print(f"  {x}")
            for pr in problems:
                print(f"problem: {pr}", file=sys.stderr)
        return 1 if problems else 0
    for name, v in (
        ("--tokens", args.tokens),
        ("--reps", args.reps),
        ("--profile-repeats", args.profile_repeats),
    ):
        if v is not None and v < 1:
            raise InputError(name, "", f"must be at least 1, got {v}")
    if args.tokens is not None and args.tokens < 2:
        raise InputError("--tokens", "", "must be at least 2 (TPOT is a median over decode tokens)")
    from prima_sim.emulate.emulator import EmulateOptions, emulate
    from prima_sim.emulate.models import cache_dir
    from prima_sim.emulate.scenario import load_scenario

    if args.scheduler:
        from prima_sim.halda.planner import SCHEDULERS

        args.scheduler = [s.lower() for s in args.scheduler]
        bad = [s for s in args.scheduler if s not in SCHEDULERS]
        if bad:
            raise InputError(
                "--scheduler", "", f"unknown scheduler(s) {bad}; choose from {', '.join(SCHEDULERS)}"
            )
    if args.suite is not None:
        from prima_sim.devices.cluster import datasets_root

        d = Path(args.suite) if args.suite else datasets_root() / "scenarios"
        files = sorted(d.glob("*.toml"))
        if not files:
            raise InputError(str(d), "", "holds no scenario (*.toml)")
    else:
        files = [args.scenario]
    scenarios = [load_scenario(f) for f in files]  # validate every file before starting anything
    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    results = []
    failures = []
    t0 = time.monotonic()
    for sc in scenarios:
        out = (
            Path(args.out) / sc.name
            if args.out and len(scenarios) > 1
            else Path(args.out or f"emulation/{sc.name}-{stamp}")
        )
        opts = EmulateOptions(
            out_dir=out, reports_dir=Path(args.reports), csv_name=args.csv, decode_tokens=args.tokens,
            repetitions=args.reps, work_dir=Path(args.work_dir) if args.work_dir else None,
            profile_cache=(Path(args.reuse_profiles) if args.reuse_profiles else cache_dir() / "profiles")
            if args.reuse_profiles is not None else None,
            quick_profile=args.quick_profile, keep_shards=args.keep_shards,
            schedulers=tuple(args.scheduler) if args.scheduler else None, on_progress=_say, plots=not args.no_plots,
            run_real=not args.no_run,
            profile_repeats=args.profile_repeats,
            calibrate_decode=not args.no_calibrate,
            calibrate_runs=not args.no_calibrate and not args.no_run_calibration,
        )  # fmt: skip
        try:
            res = emulate(sc, opts)
        except EmulationError as exc:
            if len(scenarios) == 1:
                raise
            failures.append(f"{sc.name}: {exc}")
            _say(f"scenario {sc.name} failed: {exc}")
            continue
        results.append(res)
        if not args.json:
            _print_rows(res)
    if args.suite is not None and results and results[0].csv_path is not None:
        from prima_sim.reports.emulation import format_summary, read_rows, scatter, summarize_rows

        rows = read_rows(results[0].csv_path)
        if not args.no_plots:
            scatter(
                rows,
                Path(args.reports) / "emulation-scatter.png",
                "emulation suite: predicted vs measured TPOT",
            )
        if not args.json:
            print()
            print(format_summary(summarize_rows(rows)))
    if args.json:
        print_json({"scenarios": [r.to_json() for r in results], "failures": failures,
                    "seconds": round(time.monotonic() - t0, 1)})  # fmt: skip
    return 1 if failures else 0


def _print_rows(res: Any) -> None:
    def ms(v: Any) -> str:
        try:
            return f"{float(v) * 1e3:.1f}"
        except (TypeError, ValueError):
            return "-"

    print(
        f"scenario {res.scenario.name} ({res.seconds:.0f} s; artefacts in {res.out_dir}; rows appended to {res.csv_path})"
    )
    for r in res.rows:
        err = (
            f"{r['err_sim_pct']:+.1f}%"
            if isinstance(r["err_sim_pct"], float) and r["err_sim_pct"] == r["err_sim_pct"]
            else "-"
        )
        print(f"  {r['scheduler']:<14} k={r['k']!s:<3} analytic {ms(r['tpot_analytic_s']):>8} ms  simulated "
              f"{ms(r['tpot_sim_s']):>8} ms  measured {ms(r['tpot_meas_s']):>8} ms  sim error {err:>7}  "
              f"pressure {r['mem_pressure'] or '-'}" + (f"  [{r['status']}: {r['error'][:160]}]" if r["status"] != "ok" else ""))  # fmt: skip
    for n in res.notes:
        print(f"  note: {n}")
