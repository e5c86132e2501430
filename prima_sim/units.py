"""Physical quantities: one SI unit inside, human units only at the edges.

Inside prima-sim every quantity is a plain number in one unit: seconds, bytes, bytes per second, FLOP per
second. Files may give a quantity either as that plain number or as a string with a unit
("8 GiB", "2.98 GB/s", "610 Mbps", "5 ms", "1.2 TFLOPS"); the string is converted here, and a string of the
wrong dimension ("2 GB" where a bandwidth is expected) is an error that names what was expected.

The pydantic ``Annotated`` types at the bottom (:data:`Bytes`, :data:`Bandwidth`, :data:`Seconds`,
:data:`FlopRate`) apply this parsing where data enters the typed models.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from typing import Annotated

from pydantic import BeforeValidator, Field, WithJsonSchema

KiB = 1024
MiB = 1024**2
GiB = 1024**3
TiB = 1024**4

_BYTE_UNITS = {
    "b": 1, "byte": 1, "bytes": 1,
    "kb": 1e3, "mb": 1e6, "gb": 1e9, "tb": 1e12,
    "kib": KiB, "mib": MiB, "gib": GiB, "tib": TiB,
}  # fmt: skip
_BANDWIDTH_UNITS = {
    # bytes per second
    "b/s": 1, "kb/s": 1e3, "mb/s": 1e6, "gb/s": 1e9, "tb/s": 1e12,
    "kib/s": KiB, "mib/s": MiB, "gib/s": GiB,
    # bits per second (network links are quoted in bits)
    "bps": 1 / 8, "kbps": 1e3 / 8, "mbps": 1e6 / 8, "gbps": 1e9 / 8,
    "kbit/s": 1e3 / 8, "mbit/s": 1e6 / 8, "gbit/s": 1e9 / 8,
}  # fmt: skip
_TIME_UNITS = {"s": 1, "sec": 1, "ms": 1e-3, "us": 1e-6, "µs": 1e-6, "ns": 1e-9, "min": 60}
_FLOP_UNITS = {
    "flops": 1, "flop/s": 1,
    "kflops": 1e3, "mflops": 1e6, "gflops": 1e9, "tflops": 1e12,
    "kflop/s": 1e3, "mflop/s": 1e6, "gflop/s": 1e9, "tflop/s": 1e12,
}  # fmt: skip

_QUANTITY = re.compile(r"^\s*([-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?)\s*([A-Za-zµ/]+)?\s*$")


class UnitError(ValueError):
    """A quantity string could not be read as the expected dimension."""


def _parse(value: object, units: dict[str, float], dimension: str, example: str) -> float:
    if isinstance(value, bool):
        raise UnitError(f"expected {dimension} like {example!r} or a plain number in SI units, got a boolean")
    if isinstance(value, (int, float)):
        number = float(value)
    elif isinstance(value, str):
        match = _QUANTITY.match(value)
        if not match:
            raise UnitError(f"expected {dimension} like {example!r}, got {value!r}")
        unit = (match.group(2) or "").lower()
        if unit and unit not in units:
            raise UnitError(
                f"unit {match.group(2)!r} is not {dimension}: expected one of "
                f"{', '.join(sorted(units))} (for example {example!r})"
            )
        number = float(match.group(1)) * (units[unit] if unit else 1.0)
    else:
        raise UnitError(f"expected {dimension} like {example!r}, got {type(value).__name__}")
    if not math.isfinite(number):
        raise UnitError(f"expected a finite {dimension}, got {value!r}")
    if number < 0:
        raise UnitError(f"{dimension} cannot be negative, got {value!r}")
    return number


def parse_bytes(value: object) -> int:
    """Read a size ("8 GiB", "512 MB", 1234) as a whole number of bytes."""
    return round(_parse(value, _BYTE_UNITS, "a size", "8 GiB"))


def parse_bandwidth(value: object) -> float:
    """Read a bandwidth ("2.98 GB/s", "610 Mbps", 1e9) as bytes per second."""
    return _parse(value, _BANDWIDTH_UNITS, "a bandwidth", "2 GB/s")


def parse_seconds(value: object) -> float:
    """Read a duration ("5 ms", "0.2 s", 0.005) as seconds."""
    return _parse(value, _TIME_UNITS, "a duration", "5 ms")


def parse_flop_rate(value: object) -> float:
    """Read a compute throughput ("1.2 TFLOPS", "350 GFLOPS", 3.5e11) as FLOP per second."""
    return _parse(value, _FLOP_UNITS, "a throughput", "350 GFLOPS")


def fmt_bytes(n: float) -> str:
    """Format a byte count for people (binary prefixes, as operating systems report memory)."""
    for unit, size in (("TiB", TiB), ("GiB", GiB), ("MiB", MiB), ("KiB", KiB)):
        if abs(n) >= size:
            return f"{n / size:.2f} {unit}"
    return f"{n:.0f} B"


def fmt_bandwidth(bps: float) -> str:
    """Format bytes per second for people (decimal prefixes, as disks and links are quoted)."""
    for unit, size in (("TB/s", 1e12), ("GB/s", 1e9), ("MB/s", 1e6), ("kB/s", 1e3)):
        if abs(bps) >= size:
            return f"{bps / size:.2f} {unit}"
    return f"{bps:.0f} B/s"


def fmt_bitrate(bps: float) -> str:
    """Format bytes per second as a link rate in bits per second, as network links are quoted."""
    bits = bps * 8
    for unit, size in (("Gbit/s", 1e9), ("Mbit/s", 1e6), ("kbit/s", 1e3)):
        if abs(bits) >= size:
            return f"{bits / size:.4g} {unit}"
    return f"{bits:.0f} bit/s"


def fmt_seconds(s: float) -> str:
    """Format a duration for people."""
    if abs(s) >= 1:
        return f"{s:.3f} s"
    if abs(s) >= 1e-3:
        return f"{s * 1e3:.2f} ms"
    return f"{s * 1e6:.1f} us"


def fmt_flop_rate(f: float) -> str:
    """Format FLOP/s for people."""
    for unit, size in (("TFLOPS", 1e12), ("GFLOPS", 1e9), ("MFLOPS", 1e6)):
        if abs(f) >= size:
            return f"{f / size:.1f} {unit}"
    return f"{f:.0f} FLOPS"


def _wrap(parser: Callable[[object], float]) -> Callable[[object], object]:
    def validate(value: object) -> object:
        try:
            return parser(value)
        except UnitError as exc:  # pydantic reports ValueError text with the field path
            raise ValueError(str(exc)) from None

    return validate


def _schema(unit: str, minimum: str, example: str, number: str = "number") -> WithJsonSchema:
    """JSON Schema of a quantity: a plain number in the SI unit, or a string with a unit."""
    bound = {"exclusiveMinimum": 0} if minimum == "> 0" else {"minimum": 0}
    return WithJsonSchema({
        "anyOf": [{"type": number, **bound}, {"type": "string", "pattern": _QUANTITY.pattern}],
        "x-unit": unit,
        "examples": [example],
    })  # fmt: skip


Bytes = Annotated[
    int, BeforeValidator(_wrap(parse_bytes)), Field(ge=0), _schema("bytes", ">= 0", "8 GiB", "integer")
]
"""A size in bytes; files may write "8 GiB"."""
Bandwidth = Annotated[
    float, BeforeValidator(_wrap(parse_bandwidth)), Field(ge=0), _schema("bytes/s", ">= 0", "2 GB/s")
]
"""Bytes per second; files may write "2 GB/s" or "610 Mbps"."""
PositiveBandwidth = Annotated[
    float, BeforeValidator(_wrap(parse_bandwidth)), Field(gt=0), _schema("bytes/s", "> 0", "610 Mbps")
]
"""A bandwidth that must be above zero (a disk or link that moves no data cannot be planned with)."""
Seconds = Annotated[float, BeforeValidator(_wrap(parse_seconds)), Field(ge=0), _schema("s", ">= 0", "5 ms")]
"""A duration in seconds; files may write "5 ms"."""
FlopRate = Annotated[
    float, BeforeValidator(_wrap(parse_flop_rate)), Field(gt=0), _schema("FLOP/s", "> 0", "350 GFLOPS")
]
"""FLOP per second; files may write "350 GFLOPS"."""
