"""``prima-sim report``: summarise a predicted-vs-measured CSV written by ``prima-sim emulate``.

Examples::

    prima-sim report reports/emulation.csv
    prima-sim report reports/emulation.csv --json
    prima-sim report reports/emulation.csv --all --plot reports/emulation-scatter.png

Prints the distribution (median, p90, max) of ``|simulated - measured| / measured`` and of the analytic
model's error, TTFT errors, single-device vs ring TPOT ratios, memory pressure, and a per-scenario table. By
default only the latest run of each (scenario, scheduler) counts; ``--all`` uses every row.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from prima_sim.cli.common import print_json


def register(sub: Any) -> None:
    """Add the ``report`` subcommand."""
    p = sub.add_parser(
        "report",
        help="summarise an emulation CSV: prediction error distribution and a per-scenario table",
        description="Summarise reports/emulation.csv: error distribution of the simulator and of the analytic "
        "model against measurements, TTFT errors, single-device vs ring ratios, memory pressure, per-scenario table.",
    )
    p.add_argument(
        "csv", nargs="?", default="reports/emulation.csv", help="the CSV (default reports/emulation.csv)"
    )
    p.add_argument(
        "--all", action="store_true", help="use every row, not only the latest of each scenario/scheduler"
    )
    p.add_argument("--scenario", action="append", default=None, help="only these scenarios (repeatable)")
    p.add_argument(
        "--plot", default=None, metavar="PNG", help="also draw predicted vs measured TPOT (log-log scatter)"
    )
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Entry point of ``prima-sim report``."""
    from prima_sim.reports.emulation import format_summary, read_rows, scatter, summarize_rows

    rows = read_rows(args.csv)
    if args.scenario:
        rows = [r for r in rows if r["scenario"] in set(args.scenario)]
    s = summarize_rows(rows, all_rows=args.all)
    if args.plot:
        from prima_sim.reports.emulation import latest

        scatter(rows if args.all else latest(rows), Path(args.plot))
    if args.json:
        print_json(s | ({"plot": args.plot} if args.plot else {}))
    else:
        print(format_summary(s))
        if args.plot:
            print(f"wrote {args.plot}")
    return 0
