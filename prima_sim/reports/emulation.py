"""Predicted-vs-measured reports of emulation runs: the CSV, its summary, and the plots.

Every plan an emulation runs becomes one row of ``reports/emulation.csv`` (columns :data:`COLUMNS`). Errors
are signed percentages of the measurement: ``err_sim_pct = 100 * (simulated - measured) / measured``
(positive = the prediction is slower than reality). :func:`summarize_csv` gives the distribution of their
absolute values and a per-scenario table (``prima-sim report``).

Why one module of this size: the CSV's columns, the summary and the plots read the same rows; kept together so that
a new column is added in one place.
"""

from __future__ import annotations

import csv
import math
import statistics
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from prima_sim.errors import InputError
from prima_sim.metrics import percentile

if TYPE_CHECKING:
    from prima_sim.metrics import Span
    from prima_sim.plan import Plan

COLUMNS: tuple[str, ...] = (
    "scenario", "model", "model_bytes", "n_layers", "scheduler", "status",
    "devices", "dropped", "k", "windows", "prefetch", "prompt_tokens", "decode_tokens", "repetitions",
    "tpot_analytic_s", "tpot_sim_s", "tpot_meas_s", "tpot_meas_min_s", "tpot_meas_max_s",
    "tpot_meas_p10_s", "tpot_meas_p90_s", "tpot_meas_spread_pct",
    "ttft_analytic_s", "ttft_sim_s", "ttft_meas_s",
    "err_sim_pct", "err_analytic_pct", "err_ttft_sim_pct", "err_ttft_analytic_pct",
    "tpot_sim_run_s", "tpot_analytic_run_s", "err_sim_run_pct", "err_analytic_run_pct", "ttft_sim_run_s",
    "err_ttft_sim_run_pct", "run_bw_gbps",
    "mem_limits_mib", "mem_pressure", "mem_pressure_max_pct", "mem_pressure_model_max_pct", "page_cache_mib",
    "sim_mem_pressure_max_pct", "runtime_anon_mib", "disk_read_mib_per_token", "sim_disk_read_mib_per_token",
    "disk_read_mib_per_token_reps", "disk_read_per_device_mib", "compute_sim_ms", "compute_meas_ms",
    "recv_wait_meas_ms", "cpu_throttled_ms_per_token", "host", "date", "run_id", "version", "error",
)  # fmt: skip
"""Columns of ``emulation.csv``, in order."""
PAGING_MIB_PER_TOKEN = 1.0
"""A plan pages when it reads (measured or simulated) at least this many MiB from disk per decode token."""
BYTES_TOLERANCE = 0.10
"""Issue 11's goal for simulated against measured bytes read per token on a paging plan."""
SINGLE_PREFIX = "single-"
"""Label prefix of a plan running the whole model on one device with prima-sim's executor."""
STOCK_PREFIX = "llama.cpp-"
"""Label prefix of stock llama.cpp over the original GGUF on that device (the paper's baseline)."""
ONE_DEVICE = (SINGLE_PREFIX, STOCK_PREFIX)
"""Scheduler labels of the one-device baselines: prima-sim's executor alone on a device (``single-<device>``) and
stock llama.cpp over the original GGUF there (``llama.cpp-<device>``, the paper's baseline)."""


class PlottedPrediction(Protocol):
    """What the plots read of a plan's prediction."""

    @property
    def analytic_tpot_s(self) -> float: ...
    @property
    def sim_tpot_s(self) -> float: ...
    @property
    def sim_spans(self) -> Sequence[Span]: ...
    @property
    def sim_steps(self) -> Sequence[tuple[int, str, int, float, float]]: ...


class PlottedPlan(Protocol):
    """What the plots read of one emulated plan (the emulation's records have it; reports never imports them)."""

    @property
    def label(self) -> str: ...
    @property
    def plan(self) -> Plan | None: ...
    @property
    def prediction(self) -> PlottedPrediction: ...
    @property
    def run_sim_tpot_s(self) -> float: ...
    @property
    def measured_tpot_s(self) -> float: ...
    @property
    def rep_tpot_s(self) -> Sequence[float]: ...
    @property
    def measured_spans(self) -> Sequence[Span]: ...
    @property
    def measured_steps(self) -> Sequence[tuple[int, str, int, float, float]]: ...


def error_pct(pred: float, meas: float) -> float:
    """``100 * (pred - meas) / meas`` (positive: the prediction is slower than reality); NaN without a measurement."""
    if not (math.isfinite(pred) and math.isfinite(meas)) or meas <= 0:
        return math.nan
    return 100.0 * (pred - meas) / meas


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        if math.isnan(v):
            return ""
        return f"{v:.6g}"
    return "" if v is None else str(v)


def append_rows(path: str | Path, rows: Iterable[dict[str, Any]]) -> Path:
    """Append rows to the CSV (created with a header if new; rewritten under the current header if its header
    is older)."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    new = [{c: _fmt(r.get(c)) for c in COLUMNS} for r in rows]
    if p.exists():
        with p.open(newline="", encoding="utf-8") as fh:
            reader = csv.DictReader(fh)
            header = tuple(reader.fieldnames or ())
            old = list(reader) if header != COLUMNS else None
        if old is not None:  # an older layout: rewrite under the current columns
            tmp = p.with_suffix(".tmp")
            with tmp.open("w", newline="", encoding="utf-8") as fh:
                w = csv.DictWriter(fh, COLUMNS, lineterminator="\n", extrasaction="ignore")
                w.writeheader()
                for r in old:
                    w.writerow({c: r.get(c, "") for c in COLUMNS})
            tmp.replace(p)
        with p.open("a", newline="", encoding="utf-8") as fh:
            csv.DictWriter(fh, COLUMNS, lineterminator="\n").writerows(new)
    else:
        with p.open("w", newline="", encoding="utf-8") as fh:
            w = csv.DictWriter(fh, COLUMNS, lineterminator="\n")
            w.writeheader()
            w.writerows(new)
    return p


def read_rows(path: str | Path) -> list[dict[str, str]]:
    """Rows of an emulation CSV.

    Raises:
        InputError: missing file or not an emulation CSV.
    """
    p = Path(path)
    if not p.is_file():
        raise InputError(str(p), "", "file not found")
    with p.open(newline="", encoding="utf-8") as fh:
        reader = csv.DictReader(fh)
        missing = [
            c
            for c in ("scenario", "scheduler", "tpot_sim_s", "tpot_meas_s")
            if c not in (reader.fieldnames or [])
        ]
        if missing:
            raise InputError(str(p), "", f"is not an emulation report (columns {missing} missing)")
        return list(reader)


def _f(v: str | None) -> float:
    try:
        return float(v) if v not in (None, "") else math.nan
    except ValueError:
        return math.nan


def latest(rows: Sequence[dict[str, str]]) -> list[dict[str, str]]:
    """The last row of every (scenario, scheduler), in first-appearance order."""
    keep: dict[tuple[str, str], dict[str, str]] = {}
    for r in rows:
        keep[(r["scenario"], r["scheduler"])] = r
    return list(keep.values())


def _dist(values: list[float]) -> dict[str, float]:
    a = [abs(v) for v in values if math.isfinite(v)]
    if not a:
        return {
            "n": 0,
            "median_pct": math.nan,
            "p90_pct": math.nan,
            "max_pct": math.nan,
            "mean_pct": math.nan,
        }
    return {"n": len(a), "median_pct": statistics.median(a), "p90_pct": percentile(a, 90), "max_pct": max(a),
            "mean_pct": statistics.fmean(a)}  # fmt: skip


def summarize_rows(rows: Sequence[dict[str, str]], all_rows: bool = False) -> dict[str, Any]:
    """Error distributions, a per-scenario table, the paper-claim ratios and memory pressure.

    Args:
        rows: CSV rows.
        all_rows: use every row (default: only the latest run of each scenario and scheduler).
    """
    use = list(rows) if all_rows else latest(rows)
    ok = [r for r in use if r.get("status") == "ok" and math.isfinite(_f(r.get("tpot_meas_s")))]
    table = []
    for r in use:
        table.append({
            "scenario": r["scenario"], "scheduler": r["scheduler"], "status": r.get("status", ""),
            "devices": r.get("devices", ""), "k": r.get("k", ""), "windows": r.get("windows", ""),
            "tpot_analytic_s": _f(r.get("tpot_analytic_s")), "tpot_sim_s": _f(r.get("tpot_sim_s")),
            "tpot_meas_s": _f(r.get("tpot_meas_s")), "tpot_meas_spread_pct": _f(r.get("tpot_meas_spread_pct")),
            "err_sim_pct": _f(r.get("err_sim_pct")), "err_analytic_pct": _f(r.get("err_analytic_pct")),
            "ttft_sim_s": _f(r.get("ttft_sim_s")), "ttft_meas_s": _f(r.get("ttft_meas_s")),
            "mem_pressure_max_pct": _f(r.get("mem_pressure_max_pct")),
            "mem_pressure_model_max_pct": _f(r.get("mem_pressure_model_max_pct")),
        })  # fmt: skip
    ratios = []
    by_sc: dict[str, dict[str, dict[str, str]]] = {}
    for r in ok:
        by_sc.setdefault(r["scenario"], {})[r["scheduler"]] = r
    for scn, plans in by_sc.items():
        singles = {k: v for k, v in plans.items() if k.startswith(ONE_DEVICE)}
        rings = {k: v for k, v in plans.items() if not k.startswith(ONE_DEVICE)}
        for sk, sv in singles.items():
            for rk, rv in rings.items():
                ms, mr = _f(sv["tpot_meas_s"]), _f(rv["tpot_meas_s"])
                ss, sr = _f(sv["tpot_sim_s"]), _f(rv["tpot_sim_s"])
                ratios.append({"scenario": scn, "single": sk, "ring": rk, "measured_ratio": ms / mr if mr > 0 else math.nan,
                               "simulated_ratio": ss / sr if sr > 0 else math.nan})  # fmt: skip
    paging = []
    for r in ok:
        meas, sim = _f(r.get("disk_read_mib_per_token")), _f(r.get("sim_disk_read_mib_per_token"))
        if not (math.isfinite(meas) and math.isfinite(sim)) or max(meas, sim) < PAGING_MIB_PER_TOKEN:
            continue
        reps = [_f(v) for v in r.get("disk_read_mib_per_token_reps", "").split(";") if v]
        reps = [v for v in reps if math.isfinite(v)]
        paging.append({"scenario": r["scenario"], "scheduler": r["scheduler"], "meas_mib": meas, "sim_mib": sim,
                       "err_pct": error_pct(sim, meas) if meas > 0 else math.inf, "reps_mib": reps,
                       "in_reps": bool(reps) and min(reps) * (1 - BYTES_TOLERANCE) <= sim <= max(reps) * (1 + BYTES_TOLERANCE)})  # fmt: skip
    pressure = [_f(r.get("mem_pressure_max_pct")) for r in ok if not r["scheduler"].startswith(ONE_DEVICE)]
    mpress = [
        _f(r.get("mem_pressure_model_max_pct")) for r in ok if not r["scheduler"].startswith(ONE_DEVICE)
    ]
    pressure = [p for p in pressure if math.isfinite(p)]
    mpress = [p for p in mpress if math.isfinite(p)]
    return {
        "rows": len(use),
        "measured": len(ok),
        "failed": [
            f"{r['scenario']}/{r['scheduler']}: {r.get('error', '')[:200]}"
            for r in use
            if r.get("status") != "ok"
        ],
        "tpot_sim_error": _dist([_f(r.get("err_sim_pct")) for r in ok]),
        "tpot_analytic_error": _dist([_f(r.get("err_analytic_pct")) for r in ok]),
        "ttft_sim_error": _dist([_f(r.get("err_ttft_sim_pct")) for r in ok]),
        "ttft_analytic_error": _dist([_f(r.get("err_ttft_analytic_pct")) for r in ok]),
        "tpot_sim_run_error": _dist([_f(r.get("err_sim_run_pct")) for r in ok]),
        "tpot_analytic_run_error": _dist([_f(r.get("err_analytic_run_pct")) for r in ok]),
        "ttft_sim_run_error": _dist([_f(r.get("err_ttft_sim_run_pct")) for r in ok]),
        "single_vs_ring": ratios,
        "paging_bytes": paging,
        "memory_pressure_max_pct": max(pressure) if pressure else math.nan,
        "memory_pressure_median_pct": statistics.median(pressure) if pressure else math.nan,
        "model_memory_pressure_max_pct": max(mpress) if mpress else math.nan,
        "table": table,
    }


def summarize_csv(path: str | Path, all_rows: bool = False) -> dict[str, Any]:
    """:func:`summarize_rows` of a CSV file."""
    return summarize_rows(read_rows(path), all_rows)


def format_summary(s: dict[str, Any]) -> str:
    """The summary as text: error distributions, then the per-scenario table."""

    def ms(v: float) -> str:
        return f"{v * 1e3:.1f}" if math.isfinite(v) else "-"

    def pc(v: float) -> str:
        return f"{v:+.1f}" if math.isfinite(v) else "-"

    lines = [f"{s['measured']} measured plan(s) of {s['rows']} row(s)"]
    for key, label in (("tpot_sim_error", "TPOT simulated"), ("tpot_analytic_error", "TPOT analytic"),
                       ("tpot_sim_run_error", "TPOT simulated with rates measured during the runs"),
                       ("tpot_analytic_run_error", "TPOT analytic with rates measured during the runs"),
                       ("ttft_sim_error", "TTFT simulated"), ("ttft_analytic_error", "TTFT analytic"),
                       ("ttft_sim_run_error", "TTFT simulated with rates and prefill measured during the runs")
                       ):  # fmt: skip
        d = s[key]
        if d["n"]:
            lines.append(f"  |{label} - measured| / measured: median {d['median_pct']:.1f}%, p90 {d['p90_pct']:.1f}%, "
                         f"max {d['max_pct']:.1f}% (n={d['n']})")  # fmt: skip
    pg = s.get("paging_bytes", [])
    if pg:
        near = [p for p in pg if abs(p["err_pct"]) <= 100 * BYTES_TOLERANCE]
        with_reps = [p for p in pg if p["reps_mib"]]
        lines.append(f"  disk bytes read per decode token, simulated vs measured (median of the repetitions), paging plans: "
                     f"within {100 * BYTES_TOLERANCE:.0f}% on {len(near)} of {len(pg)}, median |error| "
                     f"{statistics.median(abs(p['err_pct']) for p in pg):.1f}%"
                     + (f"; within {100 * BYTES_TOLERANCE:.0f}% of the repetitions' range on "
                        f"{sum(p['in_reps'] for p in with_reps)} of {len(with_reps)}" if with_reps else ""))  # fmt: skip
        for p in pg:
            if abs(p["err_pct"]) > 100 * BYTES_TOLERANCE:
                reps = ", ".join(f"{v:.0f}" for v in p["reps_mib"])
                lines.append(f"    outside: {p['scenario']}/{p['scheduler']}: {p['meas_mib']:.0f} MiB measured"
                             + (f" (repetitions {reps})" if reps else "")
                             + f", {p['sim_mib']:.0f} simulated ({p['err_pct']:+.1f}%)")  # fmt: skip
    if math.isfinite(s["memory_pressure_max_pct"]):
        lines.append(f"  memory pressure (peak anonymous / limit), rings: median {s['memory_pressure_median_pct']:.1f}%, "
                     f"max {s['memory_pressure_max_pct']:.1f}%; without the Python runtime: max "
                     f"{s['model_memory_pressure_max_pct']:.1f}%")  # fmt: skip
    for r in s["single_vs_ring"]:
        lines.append(f"  {r['scenario']}: {r['single']} / {r['ring']} TPOT = {r['measured_ratio']:.2f}x measured, "
                     f"{r['simulated_ratio']:.2f}x simulated")  # fmt: skip
    head = (
        "scenario",
        "scheduler",
        "k",
        "analytic ms",
        "sim ms",
        "meas ms",
        "spread%",
        "sim err%",
        "ana err%",
    )
    body = [(t["scenario"], t["scheduler"], str(t["k"]), ms(t["tpot_analytic_s"]), ms(t["tpot_sim_s"]),
             ms(t["tpot_meas_s"]), f"{t['tpot_meas_spread_pct']:.0f}" if math.isfinite(t["tpot_meas_spread_pct"]) else "-",
             pc(t["err_sim_pct"]), pc(t["err_analytic_pct"])) for t in s["table"]]  # fmt: skip
    widths = [max(len(x) for x in col) for col in zip(head, *body, strict=False)]
    lines.append("")
    lines.append("  ".join(h.ljust(w) for h, w in zip(head, widths, strict=False)))
    for row in body:
        lines.append("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=False)))
    for f in s["failed"]:
        lines.append(f"not measured: {f}")
    return "\n".join(lines)


# --- plots ---------------------------------------------------------------------------------------------------
def _plt() -> Any:
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _save(fig: Any, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110, metadata={"Software": None})
    _plt().close(fig)
    return path


def tpot_bars(scenario: str, plans: Sequence[PlottedPlan], path: Path) -> Path:
    """Analytic, simulated and measured TPOT of every plan of one scenario (measured: median of the
    repetitions, whiskers from the fastest to the slowest repetition)."""
    plt = _plt()
    labels = [p.label for p in plans]
    fig, ax = plt.subplots(figsize=(max(7.5, 1.6 * len(plans) + 2), 4.8))
    x = list(range(len(plans)))
    w = 0.26
    ana = [p.prediction.analytic_tpot_s * 1e3 for p in plans]
    sim = [p.prediction.sim_tpot_s * 1e3 for p in plans]
    run = [p.run_sim_tpot_s * 1e3 for p in plans]
    meas = [p.measured_tpot_s * 1e3 for p in plans]
    lo = [
        max(0.0, m - min(p.rep_tpot_s) * 1e3) if p.rep_tpot_s else 0.0
        for m, p in zip(meas, plans, strict=False)
    ]
    hi = [
        max(0.0, max(p.rep_tpot_s) * 1e3 - m) if p.rep_tpot_s else 0.0
        for m, p in zip(meas, plans, strict=False)
    ]
    ax.bar([i - w for i in x], ana, w, label="analytic (planner)", color="#a0aec0")
    ax.bar(x, sim, w, label="simulated", color="#2b6cb0")
    if any(math.isfinite(v) for v in run):
        ax.scatter(
            x, run, marker="_", s=200, color="#1a202c", zorder=3, label="simulated, rates during the runs"
        )
    ax.bar(
        [i + w for i in x], meas, w, yerr=[lo, hi], capsize=3, label="measured (emulated)", color="#dd6b20"
    )
    for i, (s, m) in enumerate(zip(sim, meas, strict=False)):
        if math.isfinite(s) and math.isfinite(m) and m > 0:
            ax.annotate(f"{100 * (s - m) / m:+.0f}%", (i, s), ha="center", va="bottom", fontsize=7)
    ax.set_xticks(x)
    ax.set_xticklabels(labels, rotation=15, fontsize=8)
    ax.set_ylabel("TPOT (ms)")
    ax.set_title(f"{scenario}: predicted vs measured time per output token", fontsize=10)
    from matplotlib.patches import Patch

    handles, _ = ax.get_legend_handles_labels()
    handles.append(
        Patch(facecolor="none", edgecolor="none", label="+n% over a blue bar: simulated vs measured")
    )
    ax.legend(
        handles=handles, fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.16), ncol=3, frameon=False
    )
    ax.set_ylim(top=ax.get_ylim()[1] * 1.08)  # room for the +n% labels
    fig.tight_layout()
    return _save(fig, path)


def _decode_window(
    steps: Sequence[tuple[int, str, int, float, float]], n: int = 3
) -> tuple[float, float] | None:
    dec = [s for s in steps if s[1] == "decode"]
    if not dec:
        return None
    mid = max(0, len(dec) // 2 - n // 2)
    part = dec[mid : mid + n]
    return (part[0][3], part[-1][4])


def scenario_plots(scenario: str, plans: Sequence[PlottedPlan], out_dir: Path) -> list[Path]:
    """The scenario's TPOT bar chart and, per measured plan, the side-by-side Gantt chart of the simulated and
    the measured timeline (three decode tokens from the middle of each run)."""
    from prima_sim.reports.plots import gantt_side_by_side

    out: list[Path] = []
    shown = [p for p in plans if p.plan is not None]
    if shown:
        out.append(tpot_bars(scenario, shown, out_dir / f"{scenario}-tpot.png"))
    for p in shown:
        pred, plan = p.prediction, p.plan
        if not p.measured_spans or not pred.sim_spans or plan is None:
            continue
        devices = [d.name for d in plan.devices]
        out.append(gantt_side_by_side(
            pred.sim_spans, p.measured_spans, devices, out_dir / f"{scenario}-{p.label}-gantt.png",
            f"{scenario}, {p.label} (k={plan.k}): simulated {pred.sim_tpot_s * 1e3:.0f} ms (profile) vs measured "
            f"{p.measured_tpot_s * 1e3:.0f} ms per token",
            labels=("simulated", "measured (emulated devices, first repetition)"),
            t_range_a=_decode_window(pred.sim_steps), t_range_b=_decode_window(p.measured_steps),
        ))  # fmt: skip
    return out


def scatter(rows: Sequence[dict[str, str]], path: Path, title: str = "") -> Path:
    """Predicted (simulated and analytic) against measured TPOT of every measured row, log-log, with the
    y = x line and a +-15% band."""
    plt = _plt()
    ok = [r for r in rows if r.get("status") == "ok" and math.isfinite(_f(r.get("tpot_meas_s")))]
    fig, ax = plt.subplots(figsize=(6.2, 5.6))
    meas = [_f(r["tpot_meas_s"]) * 1e3 for r in ok]
    sim = [_f(r["tpot_sim_s"]) * 1e3 for r in ok]
    ana = [_f(r["tpot_analytic_s"]) * 1e3 for r in ok]
    vals = [v for v in meas + sim + ana if math.isfinite(v) and v > 0]
    if vals:
        lo, hi = min(vals) / 1.3, max(vals) * 1.3
        ax.plot([lo, hi], [lo, hi], color="#4a5568", lw=1, label="y = x")
        ax.fill_between(
            [lo, hi], [lo * 0.85, hi * 0.85], [lo * 1.15, hi * 1.15], color="#e2e8f0", label="+-15%"
        )
        ax.set_xlim(lo, hi)
        ax.set_ylim(lo, hi)
    ax.scatter(meas, ana, marker="x", color="#a0aec0", label="analytic (planner)")
    ax.scatter(meas, sim, marker="o", color="#2b6cb0", label="simulated")
    if vals:
        ax.set_xscale("log")
        ax.set_yscale("log")
    else:
        ax.text(0.5, 0.5, "no measured rows", ha="center", va="center", transform=ax.transAxes)
    ax.set_xlabel("measured TPOT on emulated devices (ms)")
    ax.set_ylabel("predicted TPOT (ms)")
    ax.set_title(title or "predicted vs measured TPOT", fontsize=10)
    ax.legend(fontsize=8, loc="upper left")
    fig.tight_layout()
    labelled = [(m, s, f"{r['scenario']}/{r['scheduler']}") for r, m, s in zip(ok, meas, sim, strict=True)
                if math.isfinite(s) and s > 0]  # fmt: skip
    if labelled:
        from prima_sim.reports.plots import place_labels

        marks = [(m, a) for m, a in zip(meas, ana, strict=True) if math.isfinite(a) and a > 0]
        place_labels(
            ax, [(m, s) for m, s, _ in labelled], [t for _, _, t in labelled], fontsize=5.5, avoid=marks
        )
    return _save(fig, path)
