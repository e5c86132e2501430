"""Timeline plots of runs: a Gantt chart of every device's activity, and two runs side by side.

Both the simulator (predicted spans) and the executor (measured spans) describe a run as
:class:`prima_sim.metrics.Span` records, so the same drawing serves both, and a simulated and a measured
timeline of the same plan can be laid one above the other on the same time axis.

Drawing uses matplotlib's Agg backend and writes PNGs without version or date metadata, so equal inputs give
equal bytes.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from prima_sim.metrics import Span, SpanKind

COLORS: dict[SpanKind, str] = {
    SpanKind.COMPUTE: "#2b6cb0",
    SpanKind.HEAD: "#6b46c1",
    SpanKind.DISK_WAIT: "#c53030",
    SpanKind.SEND: "#dd6b20",
    SpanKind.RECV_WAIT: "#e2e8f0",
    SpanKind.PREFETCH: "#38a169",
    SpanKind.TRANSFER: "#d69e2e",
}
"""Colour of each kind of span (the legend's order is this dict's)."""
_FOREGROUND = (SpanKind.RECV_WAIT, SpanKind.COMPUTE, SpanKind.HEAD, SpanKind.DISK_WAIT, SpanKind.SEND)
_DPI = 110


def _plt() -> Any:
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _clip(spans: Sequence[Span], t_range: tuple[float, float] | None) -> list[Span]:
    if t_range is None:
        return list(spans)
    a, b = t_range
    return [s for s in spans if s.end_s > a and s.start_s < b]


def _lanes(spans: Sequence[Span], devices: Sequence[str], links: bool) -> list[str]:
    lanes = list(devices)
    if links:
        lanes += sorted({s.device for s in spans if s.kind is SpanKind.TRANSFER and s.device not in devices})
    return lanes


def _draw(ax: Any, spans: Sequence[Span], lanes: list[str], t_range: tuple[float, float] | None, scale: float) -> None:
    row = {d: i for i, d in enumerate(lanes)}
    n = len(lanes)
    bars: dict[tuple[SpanKind, bool], dict[int, list[tuple[float, float]]]] = {}
    for s in spans:
        if s.device not in row:
            continue
        a, b = s.start_s, s.end_s
        if t_range is not None:
            a, b = max(a, t_range[0]), min(b, t_range[1])
        if b <= a:
            continue
        background = s.kind is SpanKind.PREFETCH
        bars.setdefault((s.kind, background), {}).setdefault(row[s.device], []).append((a * scale, (b - a) * scale))
    for kind in COLORS:
        for background in (False, True):
            per_row = bars.get((kind, background))
            if not per_row:
                continue
            for r in sorted(per_row):
                y = n - 1 - r
                ybox = (y - 0.42, 0.18) if background else (y - 0.2, 0.6)
                ax.broken_barh(per_row[r], ybox, facecolors=COLORS[kind], edgecolor="none", linewidth=0)
    ax.set_yticks(range(n))
    ax.set_yticklabels(list(reversed(lanes)))
    ax.set_ylim(-0.6, n - 0.4)
    if t_range is not None:
        ax.set_xlim(t_range[0] * scale, t_range[1] * scale)
    ax.grid(axis="x", color="#cbd5e0", linewidth=0.5)
    ax.set_axisbelow(True)


def _scale(t_range: tuple[float, float] | None, spans: Sequence[Span]) -> tuple[float, str]:
    if t_range is not None:
        width = t_range[1] - t_range[0]
    else:
        width = max((s.end_s for s in spans), default=0.0) - min((s.start_s for s in spans), default=0.0)
    return (1e3, "ms") if width < 2.0 else (1.0, "s")


def _legend(fig: Any, kinds: set[SpanKind]) -> None:
    from matplotlib.patches import Patch

    handles = [Patch(facecolor=COLORS[k], label=k.value + (" (background)" if k is SpanKind.PREFETCH else ""))
               for k in COLORS if k in kinds]  # fmt: skip
    if handles:
        fig.legend(handles=handles, loc="lower center", ncol=min(len(handles), 7), fontsize=8, frameon=False)


def _save(fig: Any, path: str | Path) -> Path:
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(p, dpi=_DPI, metadata={"Software": None})
    _plt().close(fig)
    return p


def gantt(
    spans: Sequence[Span],
    devices: Sequence[str],
    path: str | Path,
    title: str = "",
    t_range: tuple[float, float] | None = None,
    links: bool = True,
) -> Path:
    """Draw one run's timeline: a row per device (prefetch reads as a thin bar under it), then links.

    Args:
        spans: the run's spans (simulated or measured).
        devices: device rows, top to bottom (ring order).
        path: PNG to write.
        title: figure title.
        t_range: (start, end) seconds to show; None = everything.
        links: also draw a row per link carrying transfers (simulated runs).

    Returns:
        The path written.
    """
    plt = _plt()
    shown = _clip(spans, t_range)
    lanes = _lanes(shown, devices, links)
    scale, unit = _scale(t_range, shown)
    fig, ax = plt.subplots(figsize=(12, 1.2 + 0.45 * len(lanes)))
    _draw(ax, shown, lanes, t_range, scale)
    ax.set_xlabel(f"time ({unit})")
    ax.set_title(title, fontsize=10)
    _legend(fig, {s.kind for s in shown})
    fig.tight_layout(rect=(0, 0.06, 1, 1))
    return _save(fig, path)


def gantt_side_by_side(
    spans_a: Sequence[Span],
    spans_b: Sequence[Span],
    devices: Sequence[str],
    path: str | Path,
    title: str = "",
    labels: tuple[str, str] = ("simulated", "measured"),
    t_range_a: tuple[float, float] | None = None,
    t_range_b: tuple[float, float] | None = None,
    align: bool = True,
) -> Path:
    """Two timelines of the same devices one above the other (e.g. simulated and measured).

    Args:
        spans_a, spans_b: the two runs' spans.
        devices: device rows (ring order).
        path: PNG to write.
        title: figure title.
        labels: the two panels' names.
        t_range_a, t_range_b: the window of each run to show (e.g. the same decode tokens).
        align: shift each panel so its window starts at 0 and give both the same time axis.

    Returns:
        The path written.
    """
    plt = _plt()

    def prep(spans: Sequence[Span], tr: tuple[float, float] | None) -> tuple[list[Span], tuple[float, float] | None]:
        shown = _clip(spans, tr)
        if not align or not shown:
            return shown, tr
        t0 = tr[0] if tr is not None else min(s.start_s for s in shown)
        moved = [Span(s.device, s.kind, s.start_s - t0, s.end_s - t0, s.token, s.label) for s in shown]
        return moved, ((0.0, tr[1] - t0) if tr is not None else None)

    a, ra = prep(spans_a, t_range_a)
    b, rb = prep(spans_b, t_range_b)
    if align:
        end = max([r[1] for r in (ra, rb) if r is not None] + [s.end_s for s in a + b] + [0.0])
        ra = rb = (0.0, end)
    lanes = _lanes(a + b, devices, links=False)
    scale, unit = _scale(ra if align else None, a + b)
    fig, axes = plt.subplots(2, 1, figsize=(12, 2.2 + 0.9 * len(lanes)), sharex=align)
    for ax, sp, tr, lab in ((axes[0], a, ra, labels[0]), (axes[1], b, rb, labels[1])):
        _draw(ax, sp, lanes, tr, scale)
        ax.set_title(lab, fontsize=9, loc="left")
    axes[1].set_xlabel(f"time ({unit})" + (" from the start of the window shown" if align else ""))
    fig.suptitle(title, fontsize=10)
    _legend(fig, {s.kind for s in a + b})
    fig.tight_layout(rect=(0, 0.05, 1, 1))
    return _save(fig, path)
