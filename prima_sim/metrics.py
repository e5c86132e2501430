"""Metric names and record types shared by the simulator (predicted) and the executor (measured).

Both sides describe a run the same way, so their outputs can be joined and laid side by side:

* :class:`Span` - one interval of one device's activity (compute, disk wait, send, receive wait, prefetch,
  head work), exported as Chrome/Perfetto trace JSON by :func:`write_chrome_trace`;
* :class:`TokenRow` - one row of the per-token CSV per (token, device), with the columns in
  :data:`TOKEN_COLUMNS`, written by :func:`write_token_csv`;
* :func:`summarize` - TTFT and median/mean/p90 TPOT from the token rows.

Definitions are in ``docs/metrics.md``; this module is their single implementation.
"""

from __future__ import annotations

import csv
import json
import math
import statistics
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, fields
from enum import StrEnum
from pathlib import Path
from typing import Any


class SpanKind(StrEnum):
    """What a device is doing during a span."""

    COMPUTE = "compute"  # running layers (measured: inside llama_decode, page-fault stalls included)
    DISK_WAIT = "disk_wait"  # stalled on page faults (simulated only; measured runs fold it into compute)
    SEND = "send"  # serializing and transmitting activations to the successor
    RECV_WAIT = "recv_wait"  # waiting for activations from the predecessor
    PREFETCH = "prefetch"  # background read of the next window's weights (off the critical path)
    HEAD = "head"  # head-only work: embedding lookup, output head, sampling
    TRANSFER = "transfer"  # activations in flight on a link (simulated links; tid = the link)


@dataclass(frozen=True)
class Span:
    """One interval of activity on one device (times in seconds from the start of the run)."""

    device: str
    kind: SpanKind
    start_s: float
    end_s: float
    token: int
    label: str = ""

    @property
    def duration_s(self) -> float:
        """Length of the span."""
        return self.end_s - self.start_s


TOKEN_COLUMNS: tuple[str, ...] = (
    "token",  # 0 = the prompt's prefill step (it yields the first token); 1.. = decode steps
    "phase",  # "prefill" or "decode"
    "batch_tokens",  # tokens processed in this step
    "t_start_s",  # start of the step, seconds from the start of the run
    "latency_s",  # wall time of the step: TTFT for token 0, time per output token after
    "device",
    "compute_s",  # time running layers (+ head work on the head)
    "disk_wait_s",  # time stalled on page faults (NaN where not separable, i.e. in measurements)
    "recv_wait_s",  # time waiting for the predecessor's activations
    "send_s",  # time sending activations
    "prefetch_s",  # background prefetch time (overlaps other work; not part of the step's critical path)
    "idle_s",  # latency_s - compute_s - disk_wait_s - send_s - recv_wait_s (never negative)
    "disk_read_bytes",  # bytes read from disk by this device during the step
)


@dataclass(frozen=True)
class TokenRow:
    """One (step, device) row of the per-token CSV; see :data:`TOKEN_COLUMNS`."""

    token: int
    phase: str
    batch_tokens: int
    t_start_s: float
    latency_s: float
    device: str
    compute_s: float
    disk_wait_s: float
    recv_wait_s: float
    send_s: float
    prefetch_s: float
    idle_s: float
    disk_read_bytes: float


assert tuple(f.name for f in fields(TokenRow)) == TOKEN_COLUMNS


def rows_from_spans(
    spans: Sequence[Span],
    steps: Sequence[tuple[int, str, int, float, float]],
    devices: Sequence[str],
    disk_read: dict[tuple[int, str], float] | None = None,
    measured: bool = False,
) -> list[TokenRow]:
    """Aggregate spans into per-(step, device) rows.

    Args:
        spans: all spans of the run.
        steps: (token, phase, batch_tokens, t_start_s, t_end_s) of every step.
        devices: device names in ring order.
        disk_read: bytes read per (token, device), when known.
        measured: True for executor measurements, whose disk waits are folded into compute (NaN column).
    """
    acc: dict[tuple[int, str], dict[str, float]] = {}
    for s in spans:
        key = (s.token, s.device)
        d = acc.setdefault(key, {})
        col = {
            SpanKind.COMPUTE: "compute_s", SpanKind.HEAD: "compute_s", SpanKind.DISK_WAIT: "disk_wait_s",
            SpanKind.RECV_WAIT: "recv_wait_s", SpanKind.SEND: "send_s", SpanKind.PREFETCH: "prefetch_s",
        }.get(s.kind)  # fmt: skip
        if col:
            d[col] = d.get(col, 0.0) + s.duration_s
    rows: list[TokenRow] = []
    for token, phase, batch, t0, t1 in steps:
        lat = t1 - t0
        for dev in devices:
            d = acc.get((token, dev), {})
            comp, disk = d.get("compute_s", 0.0), d.get("disk_wait_s", 0.0)
            recv, send = d.get("recv_wait_s", 0.0), d.get("send_s", 0.0)
            idle = max(0.0, lat - comp - disk - recv - send)
            rows.append(
                TokenRow(
                    token=token,
                    phase=phase,
                    batch_tokens=batch,
                    t_start_s=t0,
                    latency_s=lat,
                    device=dev,
                    compute_s=comp,
                    disk_wait_s=math.nan if measured else disk,
                    recv_wait_s=recv,
                    send_s=send,
                    prefetch_s=d.get("prefetch_s", 0.0),
                    idle_s=idle,
                    disk_read_bytes=(disk_read or {}).get((token, dev), math.nan if measured else 0.0),
                )
            )
    return rows


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        if math.isnan(v):
            return ""
        return f"{v:.9g}"
    return str(v)


def write_token_csv(rows: Iterable[TokenRow], path: str | Path) -> Path:
    """Write the per-token CSV (deterministic formatting, so equal inputs give equal bytes)."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    with p.open("w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh, lineterminator="\n")
        w.writerow(TOKEN_COLUMNS)
        for r in rows:
            w.writerow([_fmt(v) for v in asdict(r).values()])
    return p


def read_token_csv(path: str | Path) -> list[TokenRow]:
    """Read a per-token CSV written by :func:`write_token_csv`."""
    out: list[TokenRow] = []
    with Path(path).open(newline="", encoding="utf-8") as fh:
        for rec in csv.DictReader(fh):
            vals: dict[str, Any] = {}
            for f in fields(TokenRow):
                raw = rec[f.name]
                if f.type in ("int", int):
                    vals[f.name] = int(raw)
                elif f.type in ("str", str):
                    vals[f.name] = raw
                else:
                    vals[f.name] = float(raw) if raw != "" else math.nan
            out.append(TokenRow(**vals))
    return out


def percentile(values: Sequence[float], q: float) -> float:
    """Linear-interpolated percentile (q in [0, 100]) of a non-empty sequence."""
    s = sorted(values)
    if not s:
        return math.nan
    pos = (len(s) - 1) * q / 100.0
    lo, hi = math.floor(pos), math.ceil(pos)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


def summarize(rows: Sequence[TokenRow]) -> dict[str, Any]:
    """TTFT, TPOT statistics (over decode steps) and per-device mean times per decode token.

    Returns a dict with ``ttft_s``, ``tpot_s`` (median), ``tpot_mean_s``, ``tpot_p90_s``, ``tpot_min_s``,
    ``tpot_max_s``, ``n_decode`` and ``per_device`` (mean seconds per decode token by column).
    """
    steps: dict[int, TokenRow] = {}
    for r in rows:
        steps.setdefault(r.token, r)
    prefill = [r.latency_s for r in steps.values() if r.phase == "prefill"]
    decode = [r.latency_s for r in steps.values() if r.phase == "decode"]
    per_device: dict[str, dict[str, float]] = {}
    n_dec = max(len(decode), 1)
    for r in rows:
        if r.phase != "decode":
            continue
        d = per_device.setdefault(r.device, dict.fromkeys(TOKEN_COLUMNS[6:], 0.0))
        for c in TOKEN_COLUMNS[6:]:
            v = getattr(r, c)
            if not math.isnan(v):
                d[c] += v / n_dec
    return {
        "ttft_s": sum(prefill) if prefill else math.nan,
        "tpot_s": statistics.median(decode) if decode else math.nan,
        "tpot_mean_s": statistics.fmean(decode) if decode else math.nan,
        "tpot_p90_s": percentile(decode, 90) if decode else math.nan,
        "tpot_min_s": min(decode) if decode else math.nan,
        "tpot_max_s": max(decode) if decode else math.nan,
        "n_decode": len(decode),
        "per_device": per_device,
    }


def chrome_trace(spans: Iterable[Span], devices: Sequence[str], process: str = "prima-sim") -> dict[str, Any]:
    """Chrome/Perfetto trace (JSON object format): one thread per device, one complete event per span."""
    tid = {d: i for i, d in enumerate(devices)}
    events: list[dict[str, Any]] = [
        {"name": "process_name", "ph": "M", "pid": 1, "tid": 0, "args": {"name": process}},
    ]
    for d, i in tid.items():
        events.append({"name": "thread_name", "ph": "M", "pid": 1, "tid": i, "args": {"name": d}})
        events.append({"name": "thread_sort_index", "ph": "M", "pid": 1, "tid": i, "args": {"sort_index": i}})
    for s in sorted(spans, key=lambda s: (s.start_s, tid.get(s.device, 0), s.kind.value)):
        if s.device not in tid:
            tid[s.device] = len(tid)
            events.append(
                {"name": "thread_name", "ph": "M", "pid": 1, "tid": tid[s.device], "args": {"name": s.device}}
            )
        events.append(
            {
                "name": s.label or s.kind.value,
                "cat": s.kind.value,
                "ph": "X",
                "pid": 1,
                "tid": tid[s.device],
                "ts": round(s.start_s * 1e6, 3),
                "dur": round(max(s.duration_s, 0.0) * 1e6, 3),
                "args": {"token": s.token},
            }
        )
    return {"traceEvents": events, "displayTimeUnit": "ms"}


def write_chrome_trace(
    spans: Iterable[Span], devices: Sequence[str], path: str | Path, process: str = "prima-sim"
) -> Path:
    """Write :func:`chrome_trace` to ``path`` (open it in https://ui.perfetto.dev or chrome://tracing)."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(
        json.dumps(chrome_trace(spans, devices, process), separators=(",", ":")) + "\n", encoding="utf-8"
    )
    return p


def spans_from_chrome_trace(path: str | Path) -> list[Span]:
    """Read spans back from a trace written by :func:`write_chrome_trace`."""
    data = json.loads(Path(path).read_text(encoding="utf-8"))
    names: dict[int, str] = {}
    out: list[Span] = []
    for e in data["traceEvents"]:
        if e.get("ph") == "M" and e.get("name") == "thread_name":
            names[e["tid"]] = e["args"]["name"]
    for e in data["traceEvents"]:
        if e.get("ph") == "X":
            start = e["ts"] / 1e6
            out.append(Span(names.get(e["tid"], str(e["tid"])), SpanKind(e["cat"]), start, start + e["dur"] / 1e6,
                            int(e.get("args", {}).get("token", 0)), e.get("name", "")))  # fmt: skip
    return out
