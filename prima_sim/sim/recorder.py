"""Collecting the spans of a simulated run (contiguous pieces of the same activity are merged)."""

from __future__ import annotations

from typing import Any

from prima_sim.metrics import Span, SpanKind

_BACKGROUND = (SpanKind.PREFETCH, SpanKind.TRANSFER)
_VALUE = {k: k.value for k in SpanKind}


class SpanRecorder:
    """Appends spans; a span that continues the previous one of its lane (same device, kind, token and label,
    starting where it ended) extends it instead. A device has a foreground lane (what its compute thread
    does) and a background lane per kind (prefetch reads; transfers on a link)."""

    def __init__(self, enabled: bool = True) -> None:
        self.enabled = enabled
        self._spans: list[list[Any]] = []
        self._last: dict[tuple[str, SpanKind | None], list[Any]] = {}

    def add(self, device: str, kind: SpanKind, start: float, end: float, token: int, label: str = "") -> None:
        """Record ``[start, end)`` of ``kind`` on ``device`` for step ``token`` (empty spans are dropped)."""
        if end <= start or not self.enabled:
            return
        lane = (device, kind if kind in _BACKGROUND else None)
        last = self._last.get(lane)
        if (
            last is not None
            and last[1] is kind
            and last[3] == start
            and last[4] == token
            and last[5] == label
        ):
            last[3] = end
            return
        s = [device, kind, start, end, token, label]
        self._spans.append(s)
        self._last[lane] = s

    def __len__(self) -> int:
        return len(self._spans)

    def spans(self) -> list[Span]:
        """The spans, ordered by start time (then device, kind and label: deterministic)."""
        raw = sorted(self._spans, key=lambda s: (s[2], s[0], _VALUE[s[1]], s[4], s[5]))
        return [Span(d, k, a, b, t, lb) for d, k, a, b, t, lb in raw]
