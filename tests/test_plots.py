"""Plots a person can read: token boundaries, short spans kept visible, a legend that says what each colour
means, measured compute labelled as including page-fault stalls, scatter labels that do not overlap."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from prima_sim.metrics import Span, SpanKind
from prima_sim.reports import plots


def _spans(tokens: int = 6) -> list[Span]:
    """Two devices, a long window and a very short one per token, a 2-us send and a tiny disk wait."""
    out: list[Span] = []
    t = 0.0
    for k in range(tokens):
        out.append(Span("A", SpanKind.COMPUTE, t, t + 0.050, k))
        out.append(Span("A", SpanKind.SEND, t + 0.050, t + 0.050002, k))
        out.append(Span("B", SpanKind.RECV_WAIT, t, t + 0.050003, k))
        out.append(Span("B", SpanKind.DISK_WAIT, t + 0.050003, t + 0.050006, k))
        out.append(Span("B", SpanKind.COMPUTE, t + 0.050006, t + 0.0505, k))
        t += 0.051
    return out


def _axes():  # type: ignore[no-untyped-def]
    plt = plots._plt()
    fig, ax = plt.subplots(figsize=(12, 2))
    return plt, fig, ax


def test_short_spans_are_drawn_at_least_the_minimum_width_and_under_real_work() -> None:
    plt, fig, ax = _axes()
    spans = _spans()
    drew_tokens = plots._draw(ax, spans, ["A", "B"], None, 1e3)
    width_ms = (spans[-1].end_s - spans[0].start_s) * 1e3
    min_w = width_ms * plots.MIN_WIDTH_FRACTION
    widths = {}
    for coll in ax.collections:  # one BrokenBarHCollection per (layer, kind, row)
        color = tuple(round(c, 3) for c in coll.get_facecolor()[0][:3])
        for path in coll.get_paths():
            xs = path.vertices[:, 0]
            widths.setdefault(color, []).append(xs.max() - xs.min())
    send = tuple(round(int(plots.COLORS[SpanKind.SEND][i : i + 2], 16) / 255, 3) for i in (1, 3, 5))
    disk = tuple(round(int(plots.COLORS[SpanKind.DISK_WAIT][i : i + 2], 16) / 255, 3) for i in (1, 3, 5))
    assert max(widths[send]) == pytest.approx(min_w)  # a 2-us send would be invisible at true width
    assert max(widths[disk]) == pytest.approx(min_w)
    assert min(widths[send]) < min_w  # and is also drawn at its true width, on top

    # widened spans are painted before the real work, so they never cover it
    def is_widened(coll) -> bool:  # type: ignore[no-untyped-def]
        xs = coll.get_paths()[0].vertices[:, 0]
        return bool(xs.max() - xs.min() == pytest.approx(min_w))

    order = [is_widened(c) for c in ax.collections]
    assert True in order and order.index(True) < len(order) - 1 - order[::-1].index(False)
    assert drew_tokens
    plt.close(fig)


def test_token_boundaries_are_numbered_and_thinned_when_many() -> None:
    plt, fig, ax = _axes()
    plots._draw(ax, _spans(6), ["A", "B"], None, 1e3)
    labels = sorted(int(t.get_text()) for t in ax.texts)
    assert labels == [0, 1, 2, 3, 4, 5]
    plt.close(fig)
    plt, fig, ax = _axes()
    plots._draw(ax, _spans(200), ["A", "B"], None, 1.0)
    labels = sorted(int(t.get_text()) for t in ax.texts)
    assert len(labels) <= plots.MAX_TOKEN_LINES and labels[:3] == [0, 5, 10]
    plt.close(fig)


def test_legend_explains_every_colour_and_the_measured_compute(tmp_path: Path) -> None:
    assert set(plots.MEANING) == set(SpanKind) == set(plots.COLORS)
    spans = _spans()
    path = plots.gantt_side_by_side(spans, spans, ["A", "B"], tmp_path / "g.png", "t")
    assert path.stat().st_size > 10_000
    plt = plots._plt()
    captured = {}
    real_save = plots._save

    def keep(fig, p):  # type: ignore[no-untyped-def]
        captured["fig"] = fig
        captured["texts"] = [t.get_text() for t in fig.legends[0].get_texts()]
        captured["titles"] = [ax.get_title(loc="left") for ax in fig.axes]
        return real_save(fig, p)

    plots._save = keep
    try:
        plots.gantt_side_by_side(spans, spans, ["A", "B"], tmp_path / "g2.png", "t")
    finally:
        plots._save = real_save
    texts = captured["texts"]
    assert plots.MEANING[SpanKind.DISK_WAIT] in texts and plots.MEASURED_COMPUTE in texts
    assert any("start of token" in t for t in texts)
    assert "page-fault stalls" in captured["titles"][1] and "page-fault" not in captured["titles"][0]
    plt.close("all")


def test_scatter_labels_never_overlap() -> None:
    from matplotlib.text import Text

    plt = plots._plt()
    rng = random.Random(3)
    fig, ax = plt.subplots(figsize=(6.2, 5.6))
    pts = [(80 + rng.random() * 30, 80 + rng.random() * 30) for _ in range(8)]
    pts += [(10 ** rng.uniform(2, 4), 10 ** rng.uniform(2, 4)) for _ in range(14)]
    ax.scatter(*zip(*pts, strict=True))
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlim(60, 14000)
    ax.set_ylim(60, 14000)
    texts = plots.place_labels(ax, pts, [f"scenario-{i}/scheduler" for i in range(len(pts))])
    renderer = fig.canvas.get_renderer()
    boxes = []
    frame = ax.get_window_extent(renderer)
    for t in texts:
        t.update_positions(renderer)
        boxes.append(Text.get_window_extent(t, renderer))
    for i, a in enumerate(boxes):
        assert frame.contains(a.x0, a.y0) and frame.contains(a.x1, a.y1), texts[i].get_text()
        for j in range(i):
            assert not a.overlaps(boxes[j]), (texts[i].get_text(), texts[j].get_text())
    plt.close(fig)
