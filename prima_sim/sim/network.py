"""The network: point-to-point links with latency and bandwidth, optionally on a shared Wi-Fi medium.

A message of ``n`` bytes from A to B is first *serialized* onto the link (``n / bandwidth``: the sender is
busy sending) and then *propagates* (the link's latency) before B has it, so one hop costs exactly the cost
model's ``latency + bytes / bandwidth`` when nothing else is on the air. Each direction of a link sends one
message at a time (full duplex).

Links that name the same ``medium`` (one Wi-Fi network) share its airtime: transfers that overlap in time
split the medium's capacity fairly (processor sharing), each never faster than its own link's rate, and a
rate freed by one transfer is redistributed to the others (water-filling). A lone transfer therefore runs at
its link's rate, as measured end to end.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import simpy

from prima_sim.devices.cluster import Cluster, LinkSpec
from prima_sim.sim.config import Jitter, component_rng

_DONE_EPS_S = 1e-9
"""A transfer whose remaining bytes would take less than this is finished (absorbs float rounding)."""


def water_fill(capacity: float, caps: list[float]) -> list[float]:
    """Max-min fair rates of flows sharing ``capacity``, each capped by its own rate.

    Raises:
        ValueError: the capacity or a cap is not positive.
    """
    if capacity <= 0 or any(c <= 0 for c in caps):
        raise ValueError('"capacity" and every cap must be > 0')
    order = sorted(range(len(caps)), key=lambda i: caps[i])
    rates = [0.0] * len(caps)
    left, n = capacity, len(caps)
    for pos, i in enumerate(order):
        share = left / (n - pos)
        rates[i] = min(caps[i], share)
        left -= rates[i]
    return rates


class _Flow:
    __slots__ = ("cap", "done", "rate", "remaining")

    def __init__(self, nbytes: float, cap: float, done: simpy.Event) -> None:
        self.remaining = nbytes
        self.cap = cap
        self.rate = 0.0
        self.done = done


class Medium:
    """A shared medium (one Wi-Fi network) whose capacity concurrent transfers share.

    Args:
        env: the simulation environment.
        name: the medium's name.
        capacity_bps: total throughput of the medium, bytes per second.

    Raises:
        ValueError: the capacity is not positive.
    """

    def __init__(self, env: simpy.Environment, name: str, capacity_bps: float) -> None:
        if capacity_bps <= 0:
            raise ValueError(f'"capacity_bps" must be > 0, got {capacity_bps}')
        self.env = env
        self.name = name
        self.capacity = float(capacity_bps)
        self._flows: list[_Flow] = []
        self._last = 0.0
        self._version = 0
        self.bytes_sent = 0.0
        self.max_concurrent = 0

    @property
    def active(self) -> int:
        """Transfers currently on the air."""
        return len(self._flows)

    def transfer(self, nbytes: float, cap_bps: float) -> simpy.Event:
        """Start sending ``nbytes`` at most at ``cap_bps``; the event fires when the last byte has been sent."""
        done = self.env.event()
        if nbytes <= 0:
            done.succeed()
            return done
        self._advance()
        self._flows.append(_Flow(float(nbytes), float(cap_bps), done))
        self.bytes_sent += nbytes
        self.max_concurrent = max(self.max_concurrent, len(self._flows))
        self._reschedule()
        return done

    def _advance(self) -> None:
        dt = self.env.now - self._last
        if dt > 0:
            for f in self._flows:
                f.remaining -= f.rate * dt
        self._last = self.env.now

    def _reschedule(self) -> None:
        self._version += 1
        if not self._flows:
            return
        for f, r in zip(self._flows, water_fill(self.capacity, [f.cap for f in self._flows]), strict=True):
            f.rate = r
        dt = min(max(f.remaining, 0.0) / f.rate for f in self._flows)
        version = self._version
        ev = self.env.timeout(dt)
        ev.callbacks.append(lambda _e: self._on_timer(version))

    def _on_timer(self, version: int) -> None:
        if version != self._version:
            return  # a transfer started or ended since: a newer timer is pending
        self._advance()
        finished = [f for f in self._flows if f.remaining <= f.rate * _DONE_EPS_S]
        self._flows = [f for f in self._flows if f not in finished]
        for f in finished:
            f.done.succeed()
        self._reschedule()


class Link:
    """One link between two devices: latency, bandwidth, optionally a shared medium.

    Args:
        env: the simulation environment.
        a, b: its two ends.
        spec: bandwidth, latency and medium name.
        medium: the shared medium object, or None for a dedicated link.
        jitter: noise on the latency.
    """

    def __init__(self, env: simpy.Environment, a: str, b: str, spec: LinkSpec, medium: Medium | None,
                 jitter: Jitter) -> None:  # fmt: skip
        self.env = env
        self.a, self.b = a, b
        self.bandwidth = float(spec.bandwidth_bps)
        self.latency_s = float(spec.latency_s)
        self.medium = medium
        self.jitter = jitter
        self._free_at: dict[str, float] = {a: 0.0, b: 0.0}  # per sending end: when its direction is free
        self.messages = 0
        self.bytes_sent = 0.0

    def serialize(self, src: str, nbytes: float):  # type: ignore[no-untyped-def]
        """Generator: put ``nbytes`` on the link from ``src`` (returns when the last byte is sent)."""
        env = self.env
        self.messages += 1
        self.bytes_sent += nbytes
        wait = self._free_at[src] - env.now
        if wait > 0:
            yield env.timeout(wait)
        if self.medium is not None:
            self._free_at[src] = float("inf")
            yield self.medium.transfer(nbytes, self.bandwidth)
        else:
            dt = nbytes / self.bandwidth
            self._free_at[src] = env.now + dt
            yield env.timeout(dt)
        self._free_at[src] = env.now

    def propagation_s(self) -> float:
        """This message's propagation latency (jittered)."""
        return self.latency_s * self.jitter.factor()


class Network:
    """Every link of a cluster (created on first use) and the media they share.

    Args:
        env: the simulation environment.
        cluster: devices, links and media.
        seed: root seed (each link gets its own stream).
        jitter: log-normal sigma on latencies.
        use_media: False treats every link as dedicated even if it names a medium.
    """

    def __init__(self, env: simpy.Environment, cluster: Cluster, seed: int = 0, jitter: float = 0.0,
                 use_media: bool = True) -> None:  # fmt: skip
        self.env = env
        self.cluster = cluster
        self.seed = seed
        self.jitter = jitter
        self.media = {m.name: Medium(env, m.name, m.capacity_bps) for m in cluster.media} if use_media else {}
        self._links: dict[tuple[str, str], Link] = {}

    def link(self, src: str, dst: str) -> Link:
        """The link between ``src`` and ``dst``."""
        key = (src, dst) if src <= dst else (dst, src)
        lk = self._links.get(key)
        if lk is None:
            spec = self.cluster.link(src, dst)
            medium = self.media.get(spec.medium) if spec.medium else None
            name = f"link {key[0]}<->{key[1]}"
            lk = Link(
                self.env, key[0], key[1], spec, medium, Jitter(self.jitter, component_rng(self.seed, name))
            )
            self._links[key] = lk
        return lk

    def send(self, src: str, dst: str, nbytes: float, deliver: Callable[[float], None]):  # type: ignore[no-untyped-def]
        """Generator: serialize a message from ``src``; ``deliver(sent_at)`` runs when it reaches ``dst``."""
        lk = self.link(src, dst)
        yield from lk.serialize(src, nbytes)
        sent = self.env.now
        ev = self.env.timeout(lk.propagation_s())
        ev.callbacks.append(lambda _e: deliver(sent))

    @property
    def links(self) -> list[Link]:
        """Links used so far, sorted by name."""
        return [self._links[k] for k in sorted(self._links)]

    def stats(self) -> dict[str, Any]:
        """A snapshot of the counters after the run: messages and bytes per link, bytes and peak concurrency
        per shared medium (the result's ``network``)."""
        links = {f"{lk.a}<->{lk.b}": {"messages": lk.messages, "bytes": lk.bytes_sent,
                                       "medium": lk.medium.name if lk.medium else None} for lk in self.links}  # fmt: skip
        media = {m.name: {"bytes": m.bytes_sent, "max_concurrent_transfers": m.max_concurrent}
                 for m in self.media.values()}  # fmt: skip
        return {"links": links, "media": media}
