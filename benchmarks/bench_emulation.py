"""The emulation suite: every scenario of datasets/scenarios run on emulated devices, predictions vs measurements.

    sudo python benchmarks/bench_emulation.py [--scenarios fits-in-memory,paper-claim] [--tokens N] [--reps N]
                                              [--reports reports] [--append] [--reuse-profiles] [--out DIR]

For every scenario it calls :func:`prima_sim.emulate.emulator.emulate` (the library behind ``prima-sim emulate``):
devices as cgroups and network namespaces, profiles measured inside them, Halda and the baselines planned,
simulated and run for real. It writes, under ``--reports`` (default ``reports/``):

* ``emulation.csv``: one row per plan (replaced unless ``--append``);
* ``<scenario>-tpot.png`` and ``<scenario>-<scheduler>-gantt.png``;
* ``emulation-scatter.png``: predicted vs measured TPOT of the whole suite;
* ``emulation-summary.json`` and ``emulation-summary.txt``: the headline figures (``prima-sim report``'s
  summary: fidelity median/p90/max of the simulator and of the analytic model, single-device vs ring TPOT
  ratios, memory pressure), the host and how long the suite took.

Needs root. The whole suite takes about half an hour on this project's 2-core machine.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import shutil
import socket
import sys
import time
from pathlib import Path

from prima_sim.cli.common import _clean
from prima_sim.devices.cluster import datasets_root
from prima_sim.emulate.emulator import EmulateOptions, emulate
from prima_sim.emulate.scenario import load_scenario
from prima_sim.errors import PrimaSimError
from prima_sim.reports.emulation import format_summary, read_rows, scatter, summarize_rows


def say(msg: str) -> None:
    print(f"[{dt.datetime.now().strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--scenarios", default="", help="comma-separated scenario names (default: all bundled)")
    ap.add_argument("--tokens", type=int, default=None, help="override every scenario's decode tokens")
    ap.add_argument("--reps", type=int, default=None, help="override every scenario's repetitions")
    ap.add_argument("--reports", default="reports", help="output directory of the CSV, PNGs and summary")
    ap.add_argument("--out", default=None, help="artefacts directory (default: a temporary one, deleted)")
    ap.add_argument("--append", action="store_true", help="append to an existing emulation.csv")
    ap.add_argument(
        "--profile-cache",
        default=None,
        help="reuse profiles measured under the same limits from this directory (default: a fresh one "
        "for this suite run, so identical devices share one measurement taken during the run)",
    )
    ap.add_argument("--quick-profile", action="store_true", help="prima-sim profile --quick")
    ap.add_argument(
        "--profile-repeats", type=int, default=3, help="profiler runs per distinct device (median kept)"
    )
    args = ap.parse_args()

    root = datasets_root() / "scenarios"
    names = [s for s in args.scenarios.split(",") if s] or sorted(p.stem for p in root.glob("*.toml"))
    scenarios = [load_scenario(n) for n in names]
    reports = Path(args.reports)
    reports.mkdir(parents=True, exist_ok=True)
    csv_path = reports / "emulation.csv"
    if csv_path.exists() and not args.append:
        csv_path.unlink()
    out_root = (
        Path(args.out)
        if args.out
        else Path(f"/var/tmp/prima-sim-emulation-{dt.datetime.now():%Y%m%d-%H%M%S}")
    )
    t0 = time.monotonic()
    failures: list[str] = []
    timings: dict[str, float] = {}
    for sc in scenarios:
        say(f"=== {sc.name}")
        opts = EmulateOptions(
            out_dir=out_root / sc.name,
            reports_dir=reports,
            decode_tokens=args.tokens,
            repetitions=args.reps,
            profile_cache=Path(args.profile_cache) if args.profile_cache else out_root / "profiles",
            quick_profile=args.quick_profile,
            profile_repeats=args.profile_repeats,
            on_progress=say,
        )
        t = time.monotonic()
        try:
            emulate(sc, opts)
        except PrimaSimError as exc:
            failures.append(f"{sc.name}: {exc}")
            say(f"{sc.name} FAILED: {exc}")
        timings[sc.name] = round(time.monotonic() - t, 1)
    elapsed = time.monotonic() - t0
    if not csv_path.exists():
        say("no rows were written")
        return 1
    rows = read_rows(csv_path)
    summary = summarize_rows(rows)
    scatter(rows, reports / "emulation-scatter.png", "emulation suite: predicted vs measured TPOT")
    meta = {
        "host": socket.gethostname(),
        "date": dt.datetime.now(dt.UTC).replace(microsecond=0).isoformat(),
        "seconds": round(elapsed, 1),
        "scenario_seconds": timings,
        "failures": failures,
    }
    (reports / "emulation-summary.json").write_text(json.dumps(_clean(summary | meta), indent=2) + "\n")
    text = format_summary(summary)
    (reports / "emulation-summary.txt").write_text(
        f"emulation suite on {meta['host']}, {meta['date']}, {elapsed / 60:.1f} min\n\n{text}\n"
    )
    print(text)
    print(f"\nsuite took {elapsed / 60:.1f} min; reports in {reports}")
    if not args.out:
        shutil.rmtree(out_root, ignore_errors=True)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
