"""The route of a plan: who runs which window and where each hidden state goes next, for the simulator and the
real executor alike (one routing, so the two cannot disagree about the ring).

Routing is a pure function of the plan: windows run in the plan's execution order; after window ``j`` the
hidden state goes to the owner of window ``j + 1``, or to the head after the last window (then the head runs
only the output head). Control messages (``hello``, ``stop``) go round the ring in ring order. Which window a
device prefetches follows :func:`prima_sim.plan.prefetch_window`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from prima_sim.plan import LayerRange, Plan, next_own_window, prefetch_window


@dataclass(frozen=True)
class Route:
    """Who runs which window, and where each message goes next.

    Attributes:
        head: the head device.
        ring: devices in ring order, head first.
        order: every window of one token in execution order: (device, layer range).
    """

    head: str
    ring: tuple[str, ...]
    order: tuple[tuple[str, LayerRange], ...]
    _own: dict[str, tuple[int, ...]] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        own: dict[str, list[int]] = {d: [] for d in self.ring}
        for j, (d, _) in enumerate(self.order):
            own.setdefault(d, []).append(j)
        object.__setattr__(self, "_own", {d: tuple(js) for d, js in own.items()})

    @classmethod
    def of(cls, plan: Plan) -> Route:
        """The route of ``plan``."""
        return cls(plan.head, tuple(d.name for d in plan.devices), tuple(plan.execution_order()))

    @property
    def n_windows(self) -> int:
        """Windows per token."""
        return len(self.order)

    def owner(self, window: int) -> str:
        """Device that runs ``window``; the head for ``window == n_windows`` (the output head)."""
        return self.head if window >= self.n_windows else self.order[window][0]

    def windows_of(self, device: str) -> list[int]:
        """Indices of the windows ``device`` runs, in execution order."""
        return list(self._own.get(device, ()))

    def successor(self, device: str) -> str:
        """Next device in ring order (the head after the last)."""
        i = self.ring.index(device)
        return self.ring[(i + 1) % len(self.ring)]

    def destinations(self, device: str) -> set[str]:
        """Every device ``device`` ever sends to: owners of the windows after its own, and its successor."""
        out = {self.owner(j + 1) for j in self.windows_of(device)}
        out.add(self.successor(device))
        out.discard(device)
        return out

    def next_own_window(self, device: str, after: int) -> int | None:
        """The window ``device`` runs next after window ``after`` (wrapping to the next token), or None."""
        return next_own_window(self._own.get(device, ()), after)

    def prefetch_window(
        self, device: str, after: int, ran: set[int], own_window_again: bool = False
    ) -> int | None:
        """The window ``device`` advises after sending the output of window ``after``
        (:func:`prima_sim.plan.prefetch_window`: not its only window once it has run it, unless
        ``own_window_again``, prima.cpp's rule)."""
        return prefetch_window(self._own.get(device, ()), after, ran, own_window_again)
