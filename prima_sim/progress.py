"""Progress of long operations on stderr: a tqdm bar on a terminal, plain periodic lines anywhere else.

A bar redraws one line with carriage returns; written to a log file, a CI console or a pipe, those redraws
pile up into one unreadable line (or thousands). When the stream is not a terminal, :class:`Progress` prints
one ordinary line when it starts, one every ``interval_s`` seconds, and one when it ends.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Iterable, Iterator
from typing import Any, TextIO, TypeVar

from prima_sim.units import fmt_bytes

PLAIN_INTERVAL_S = 10.0
"""Seconds between two plain progress lines."""

T = TypeVar("T")


def is_terminal(stream: TextIO) -> bool:
    """Whether ``stream`` is an interactive terminal."""
    try:
        return stream.isatty()
    except (AttributeError, ValueError):  # closed or replaced streams
        return False


class Progress:
    """A progress indicator with tqdm's small interface (``update``, ``set_description``, ``close``).

    Args:
        total: units of work in all (None: unknown).
        desc: what is being done, e.g. "shard".
        unit: the unit of ``total`` ("B" for bytes: shown as KiB/MiB/GiB).
        disable: show nothing.
        stream: where to write (default stderr).
        interval_s: seconds between plain lines when ``stream`` is not a terminal.
        force_plain: plain lines even on a terminal (tests).
    """

    def __init__(
        self, total: float | None, desc: str, unit: str = "", *, disable: bool = False, stream: TextIO | None = None,
        interval_s: float = PLAIN_INTERVAL_S, force_plain: bool = False,
    ) -> None:  # fmt: skip
        self.total, self.desc, self.unit = total, desc, unit
        self.stream = stream or sys.stderr
        self.interval_s = interval_s
        self.n = 0.0
        self.label = ""
        self._t0 = time.monotonic()
        self._last = self._t0
        self._bar: Any = None
        self._plain = False
        self._closed = disable
        if disable:
            return
        if is_terminal(self.stream) and not force_plain:
            from tqdm import tqdm

            byte_unit = unit == "B"
            self._bar = tqdm(total=total, desc=desc, unit=unit or "it", unit_scale=byte_unit,
                             unit_divisor=1024 if byte_unit else 1000, file=self.stream, dynamic_ncols=True)  # fmt: skip
        else:
            self._plain = True
            self._line("started" + (f", {self._amount(total)} to do" if total else ""))

    def _amount(self, n: float | None) -> str:
        if n is None:
            return "?"
        if self.unit == "B":
            return fmt_bytes(n)
        return f"{n:g}" + (f" {self.unit}" if self.unit else "")

    def _line(self, text: str) -> None:
        print(f"{self.desc}: {text}", file=self.stream, flush=True)

    def _status(self) -> str:
        elapsed = time.monotonic() - self._t0
        done = self._amount(self.n)
        if self.total:
            done = f"{100 * self.n / self.total:.0f}% ({done} of {self._amount(self.total)})"
        return f"{done}, {elapsed:.0f} s" + (f", {self.label}" if self.label else "")

    def update(self, n: float = 1) -> None:
        """Record ``n`` more units of work done."""
        self.n += n
        if self._bar is not None:
            self._bar.update(n)
        elif self._plain and not self._closed:
            now = time.monotonic()
            if now - self._last >= self.interval_s:
                self._last = now
                self._line(self._status())

    def set_description(self, label: str) -> None:
        """Say what is being done now (shown after the counts)."""
        self.label = label
        if self._bar is not None:
            self._bar.set_postfix_str(label[:40], refresh=False)

    set_postfix_str = set_description

    def close(self) -> None:
        """End the indicator (a last plain line says how much was done and how long it took)."""
        if self._closed:
            return
        self._closed = True
        if self._bar is not None:
            self._bar.close()
        elif self._plain:
            self.label = ""
            self._line("done, " + self._status())

    def wrap(self, items: Iterable[T]) -> Iterator[T]:
        """Iterate over ``items``, counting one unit per item, and close at the end."""
        try:
            for x in items:
                yield x
                self.update(1)
        finally:
            self.close()

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
