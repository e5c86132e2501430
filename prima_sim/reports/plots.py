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
MEANING: dict[SpanKind, str] = {
    SpanKind.COMPUTE: "compute: running its layers",
    SpanKind.HEAD: "head: embedding, output layer, sampling",
    SpanKind.DISK_WAIT: "disk wait: weights read from disk (page faults)",
    SpanKind.SEND: "send: activations to the next device",
    SpanKind.RECV_WAIT: "idle: waiting for the previous device",
    SpanKind.PREFETCH: "prefetch (thin bar): reading the next window in the background",
    SpanKind.TRANSFER: "link: activations in flight",
}
"""What each colour means, as the legend says it."""
MEASURED_COMPUTE = "measured compute (hatched) includes page-fault stalls: a process cannot tell them apart"
"""How a measured panel's compute is labelled: the simulated panel shows the same stalls as disk waits."""
_ORDER = (SpanKind.RECV_WAIT, SpanKind.COMPUTE, SpanKind.HEAD, SpanKind.DISK_WAIT, SpanKind.SEND, SpanKind.TRANSFER,
          SpanKind.PREFETCH)  # fmt: skip
"""Drawing order of the kinds within a layer (see :func:`_draw`)."""
MIN_WIDTH_FRACTION = 0.0015
"""Spans shorter than this fraction of the time axis are drawn this wide (about 2 pixels), never vanishing."""
MAX_TOKEN_LINES = 40
"""At most this many token boundaries are drawn; with more tokens shown, every n-th."""
_DPI = 110
_LEGEND_ROW_IN = 0.19
"""Height of one legend row, inches."""


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


def _extent(spans: Sequence[Span], t_range: tuple[float, float] | None) -> tuple[float, float]:
    if t_range is not None:
        return t_range
    if not spans:
        return (0.0, 1.0)
    return (min(s.start_s for s in spans), max(s.end_s for s in spans))


def token_starts(spans: Sequence[Span]) -> dict[int, float]:
    """When each token's work starts: its earliest span on any device (token 0 is the prompt)."""
    out: dict[int, float] = {}
    for s in spans:
        if s.kind is SpanKind.PREFETCH or s.token < 0:
            continue
        out[s.token] = min(out.get(s.token, s.start_s), s.start_s)
    return out


def _token_lines(ax: Any, spans: Sequence[Span], lo: float, hi: float, scale: float, top: float) -> bool:
    starts = sorted((t, x) for t, x in token_starts(spans).items() if lo <= x <= hi)
    if len(starts) < 2:
        return False
    step = next(
        s for s in (m * 10**e for e in range(9) for m in (1, 2, 5)) if len(starts) / s <= MAX_TOKEN_LINES
    )
    for t, x in starts:
        if t % step:
            continue
        ax.axvline(x * scale, color="#4a5568", linewidth=0.7, linestyle=(0, (2, 2)), zorder=0.5)
        ax.text(x * scale, top, f" {t}", fontsize=6, color="#4a5568", va="bottom", ha="left", clip_on=False)
    return True


def _draw(ax: Any, spans: Sequence[Span], lanes: list[str], t_range: tuple[float, float] | None, scale: float,
          measured: bool = False) -> bool:  # fmt: skip
    """Draw the spans; returns whether token boundaries were drawn.

    Layers, bottom to top: idle spans; spans too short to see, widened to :data:`MIN_WIDTH_FRACTION` of the axis;
    every other span at its true width. A widened span thus shows where nothing else happens (a send after a
    window, a hop on a link, a tiny window) and never paints over real work.
    """
    row = {d: i for i, d in enumerate(lanes)}
    n = len(lanes)
    lo, hi = _extent(spans, t_range)
    min_w = (hi - lo) * MIN_WIDTH_FRACTION
    true: dict[SpanKind, dict[int, list[tuple[float, float]]]] = {}
    widened: dict[SpanKind, dict[int, list[tuple[float, float]]]] = {}
    for s in spans:
        if s.device not in row:
            continue
        a, b = s.start_s, s.end_s
        if t_range is not None:
            a, b = max(a, t_range[0]), min(b, t_range[1])
        if b <= a:
            continue
        true.setdefault(s.kind, {}).setdefault(row[s.device], []).append((a * scale, (b - a) * scale))
        if b - a < min_w and s.kind is not SpanKind.RECV_WAIT:
            widened.setdefault(s.kind, {}).setdefault(row[s.device], []).append((a * scale, min_w * scale))

    def paint(layer: dict[SpanKind, dict[int, list[tuple[float, float]]]], kinds: Sequence[SpanKind]) -> None:
        for kind in kinds:
            hatch = "////" if measured and kind is SpanKind.COMPUTE else None
            for r, xs in sorted(layer.get(kind, {}).items()):
                y = n - 1 - r
                ybox = (y - 0.42, 0.18) if kind is SpanKind.PREFETCH else (y - 0.2, 0.6)
                ax.broken_barh(xs, ybox, facecolors=COLORS[kind], edgecolor="#bee3f8" if hatch else "none",
                               linewidth=0, hatch=hatch)  # fmt: skip

    work = [k for k in _ORDER if k is not SpanKind.RECV_WAIT]
    paint(true, [SpanKind.RECV_WAIT])
    paint(widened, work)
    paint(true, work)
    ax.set_yticks(range(n))
    ax.set_yticklabels(list(reversed(lanes)))
    ax.set_ylim(-0.6, n - 0.4)
    ax.set_xlim(lo * scale, hi * scale)
    ax.grid(axis="x", color="#cbd5e0", linewidth=0.5)
    ax.set_axisbelow(True)
    return _token_lines(ax, spans, lo, hi, scale, n - 0.4)


def _scale(t_range: tuple[float, float] | None, spans: Sequence[Span]) -> tuple[float, str]:
    lo, hi = _extent(spans, t_range)
    return (1e3, "ms") if hi - lo < 2.0 else (1.0, "s")


def _legend(fig: Any, kinds: set[SpanKind], tokens: bool = False, measured: bool = False) -> None:
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

    handles: list[Any] = [Patch(facecolor=COLORS[k], label=MEANING[k]) for k in COLORS if k in kinds]
    if measured and SpanKind.COMPUTE in kinds:
        handles.append(Patch(facecolor=COLORS[SpanKind.COMPUTE], edgecolor="#bee3f8", hatch="////",
                             label=MEASURED_COMPUTE))  # fmt: skip
    if tokens:
        handles.append(Line2D([], [], color="#4a5568", linewidth=0.7, linestyle=(0, (2, 2)),
                              label="start of token N (0 = the prompt)"))  # fmt: skip
    if handles:
        fig.legend(
            handles=handles, loc="lower center", ncol=min(len(handles), 3), fontsize=7.5, frameon=False
        )


def _kinds_drawn(spans: Sequence[Span], lanes: Sequence[str]) -> set[SpanKind]:
    """The kinds of span that appear on the chart (a row is drawn for them and they last), for the legend."""
    rows = set(lanes)
    return {s.kind for s in spans if s.device in rows and s.end_s > s.start_s}


def _legend_rows(kinds: set[SpanKind], extra: int) -> int:
    return -(-(sum(1 for k in COLORS if k in kinds) + extra) // 3)


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
    measured: bool = False,
) -> Path:
    """Draw one run's timeline: a row per device (prefetch reads as a thin bar under it), then links.

    Token boundaries are dotted lines numbered with the token; spans too short to see are drawn a little wider.

    Args:
        spans: the run's spans (simulated or measured).
        devices: device rows, top to bottom (ring order).
        path: PNG to write.
        title: figure title.
        t_range: (start, end) seconds to show; None = everything.
        links: also draw a row per link carrying transfers (simulated runs).
        measured: the spans were measured (compute then includes page-fault stalls, and says so).

    Returns:
        The path written.
    """
    plt = _plt()
    shown = _clip(spans, t_range)
    lanes = _lanes(shown, devices, links)
    scale, unit = _scale(t_range, shown)
    kinds = _kinds_drawn(shown, lanes)
    legend_in = _LEGEND_ROW_IN * _legend_rows(kinds, 2 if measured else 1) + 0.1
    height = 1.6 + 0.45 * len(lanes) + legend_in
    fig, ax = plt.subplots(figsize=(12, height))
    tokens = _draw(ax, shown, lanes, t_range, scale, measured)
    ax.set_xlabel(f"time ({unit})")
    ax.set_title(title, fontsize=10, pad=12)
    _legend(fig, kinds, tokens, measured)
    fig.tight_layout(rect=(0, legend_in / height, 1, 1))
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
    measured: tuple[bool, bool] = (False, True),
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
        measured: which panels were measured (their compute includes page-fault stalls: drawn hatched and said
            in the legend and the panel's title).

    Returns:
        The path written.
    """
    plt = _plt()

    def prep(
        spans: Sequence[Span], tr: tuple[float, float] | None
    ) -> tuple[list[Span], tuple[float, float] | None]:
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
    kinds = _kinds_drawn(a + b, lanes)
    legend_in = _LEGEND_ROW_IN * _legend_rows(kinds, 2 if any(measured) else 1) + 0.1
    height = 2.6 + 0.9 * len(lanes) + legend_in
    fig, axes = plt.subplots(2, 1, figsize=(12, height), sharex=align)
    tokens = False
    for ax, sp, tr, lab, meas in (
        (axes[0], a, ra, labels[0], measured[0]),
        (axes[1], b, rb, labels[1], measured[1]),
    ):
        tokens = _draw(ax, sp, lanes, tr, scale, meas) or tokens
        ax.set_title(
            lab + (": compute includes page-fault stalls" if meas else ""), fontsize=9, loc="left", pad=10
        )
    axes[1].set_xlabel(f"time ({unit})" + (" from the start of the window shown" if align else ""))
    fig.suptitle(title, fontsize=10)
    _legend(fig, kinds, tokens, any(measured))
    fig.tight_layout(rect=(0, legend_in / height, 1, 1))
    return _save(fig, path)


def place_labels(ax: Any, points: Sequence[tuple[float, float]], texts: Sequence[str], fontsize: float = 6.0,
                 color: str = "#2d3748", avoid: Sequence[tuple[float, float]] = ()) -> list[Any]:  # fmt: skip
    """Label points without labels overlapping each other or the points: each label takes the first free spot
    on rings of growing distance around its point (a thin leader line joins it to a distant point).

    Call it after the axes' limits and scales are final; ``avoid`` are other markers to keep clear of. Returns
    the text artists (a label that finds no free spot within the search is placed beside its point anyway: the
    only case where labels may overlap).
    """
    import math as _math

    from matplotlib.text import Text
    from matplotlib.transforms import Bbox

    fig = ax.figure
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    frame = ax.get_window_extent(renderer)
    disp = ax.transData.transform(list(points)) if points else []
    others = ax.transData.transform(list(avoid)) if avoid else []
    taken = [Bbox.from_bounds(x - 4, y - 4, 8, 8) for x, y in [*disp, *others]]
    legend = ax.get_legend()
    if legend is not None:
        taken.append(legend.get_window_extent(renderer))
    out: list[Any] = []
    angles = [a for k in range(0, 181, 15) for a in ((k, -k) if 0 < k < 180 else (k,))]
    for i in sorted(range(len(points)), key=lambda j: (disp[j][0], disp[j][1])):
        chosen = None
        for dist in (3, 8, 14, 22, 32, 44, 58, 75, 95, 120, 150, 185):
            for ang in angles:
                dx, dy = dist * _math.cos(_math.radians(ang)), dist * _math.sin(_math.radians(ang))
                ha = "left" if dx > 1 else "right" if dx < -1 else "center"
                va = "bottom" if dy > 1 else "top" if dy < -1 else "center"
                arrow = {"arrowstyle": "-", "color": "#a0aec0", "lw": 0.5} if dist > 10 else None
                t = ax.annotate(texts[i], points[i], xytext=(dx, dy), textcoords="offset points", ha=ha, va=va,
                                fontsize=fontsize, color=color, arrowprops=arrow)  # fmt: skip
                t.update_positions(renderer)
                bb = Text.get_window_extent(t, renderer).expanded(1.04, 1.1)  # the text, not its leader line
                inside = frame.contains(bb.x0, bb.y0) and frame.contains(bb.x1, bb.y1)
                if inside and not any(bb.overlaps(o) for o in taken):
                    chosen = (t, bb)
                    break
                t.remove()
            if chosen:
                break
        if chosen is None:  # nowhere free: beside its point
            t = ax.annotate(texts[i], points[i], xytext=(3, 3), textcoords="offset points", fontsize=fontsize,
                            color=color)  # fmt: skip
            t.update_positions(renderer)
            chosen = (t, Text.get_window_extent(t, renderer))
        taken.append(chosen[1])
        out.append(chosen[0])
    return out
