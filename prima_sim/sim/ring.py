"""What the devices of a simulated ring share, and nothing more.

A :class:`~prima_sim.sim.device.SimDevice` receives a :class:`Ring`, never the
:class:`~prima_sim.sim.engine.Simulation` that drives it (Vidur's rule: an entity gets its collaborators, not the
simulator): the clock, the settings, the span recorder, the network, the route (which device runs which window and
which window a device advises next, the executor's :class:`prima_sim.plan` rules), the step in progress, the disk
reads counted per step, and the event that tells the driver a batch has come out of the output head.
"""

from __future__ import annotations

from typing import Protocol

import simpy

from prima_sim.plan import Plan
from prima_sim.route import Route
from prima_sim.sim.config import SimConfig
from prima_sim.sim.network import Network
from prima_sim.sim.recorder import SpanRecorder


class Message:
    """A hidden state on its way to the owner of ``window``."""

    __slots__ = ("n_kv", "n_tokens", "step", "window")

    def __init__(self, step: int, window: int, n_tokens: int, n_kv: int) -> None:
        self.step = step
        self.window = window
        self.n_tokens = n_tokens
        self.n_kv = n_kv


class Member(Protocol):
    """What the ring needs of a device: somewhere to deliver a hidden state."""

    def deliver(self, msg: Message) -> None:
        """A hidden state arrives."""


class Ring:
    """The shared state of one simulated ring.

    Args:
        env: the simulation's clock.
        cfg: simulator settings.
        rec: where spans go.
        net: the links between devices.
        plan: the plan (its execution order is the route).

    Attributes:
        devices: the ring's devices by name (filled in by the simulation as it builds them).
        step, step_start: the step in progress and when it began.
        disk_read: bytes read from disk per (step, device).
    """

    def __init__(
        self, env: simpy.Environment, cfg: SimConfig, rec: SpanRecorder, net: Network, plan: Plan
    ) -> None:
        self.env, self.cfg, self.rec, self.net = env, cfg, rec, net
        self.route = Route.of(plan)
        self.order = list(self.route.order)
        self.n_windows = self.route.n_windows
        self.n_devices = len(plan.devices)
        self.head = plan.head
        self.devices: dict[str, Member] = {}
        self.step = 0
        self.step_start = 0.0
        self.disk_read: dict[tuple[int, str], float] = {}
        self._batch_done: simpy.Event | None = None
        self.row_passes = cfg.concurrency > 1 or cfg.draft_max > 0
        """Windows are charged passes of rows (several sequences, or a draft's tokens verified together)."""

    def logit_rows(self, msg: Message) -> int:
        """Rows of logits the output head computes for ``msg``: one per sequence, or one per verified token of a
        speculative decode pass."""
        if self.cfg.draft_max > 0 and msg.step > 0:
            return msg.n_tokens
        return min(self.cfg.concurrency, msg.n_tokens)

    # --- the route (the executor's, prima_sim.route.Route) ---------------------------------------------------
    def owner(self, window: int) -> str:
        """Device that runs ``window``; the head for ``window == n_windows`` (the output head)."""
        return self.route.owner(window)

    def next_own_window(self, device: str, after: int) -> int | None:
        """The window ``device`` runs next after window ``after`` (wrapping to the next token), or None."""
        return self.route.next_own_window(device, after)

    def prefetch_window(self, device: str, after: int, ran: set[int]) -> int | None:
        """The window ``device`` advises after sending the output of window ``after``: the executor's rule
        (``SimConfig.prefetch_own_window``: prima.cpp's)."""
        return self.route.prefetch_window(device, after, ran, self.cfg.prefetch_own_window)

    def deliver(self, dest: str, msg: Message) -> None:
        """Hand a hidden state that has crossed the link to ``dest``."""
        self.devices[dest].deliver(msg)

    # --- steps ----------------------------------------------------------------------------------------------
    def begin_step(self, index: int) -> None:
        """Step ``index`` starts now."""
        self.step, self.step_start = index, self.env.now

    def count_disk_read(self, device: str, nbytes: float) -> None:
        """Attribute ``nbytes`` read by ``device`` to the step in progress (or the last one)."""
        key = (self.step, device)
        self.disk_read[key] = self.disk_read.get(key, 0.0) + nbytes

    def expect_batch(self) -> simpy.Event:
        """The event :meth:`batch_done` triggers for the batch now entering the ring."""
        self._batch_done = self.env.event()
        return self._batch_done

    def batch_done(self) -> None:
        """The output head has run on the batch's last token."""
        if self._batch_done is not None and not self._batch_done.triggered:
            self._batch_done.succeed()
