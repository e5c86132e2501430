"""The emulated home network: one network namespace per device, joined by a bridge, links shaped by the kernel.

Layout (all inside namespaces this run creates; the host's own interfaces are never touched)::

    prima-<runid>-net      a bridge ``br0``
    prima-<runid>-<dev>    ``lo`` and ``eth0`` (10.77.0.<i+1>/24), a veth whose other end is a port of br0

Bandwidth is shaped where a real link serializes: on the sender's ``eth0`` egress, by an HTB qdisc with one
class per peer (``rate`` = ``ceil`` = the pair's bandwidth) selected by a u32 filter on the destination
address, so every pair of devices can have its own bandwidth. Latency cannot be added by the kernel here
(``netem`` is not available on this project's machines), so it is added in user space by the receiving
process: :func:`latency_table` builds the table the emulation passes to the head and every worker as
``--link-latency`` (see :class:`prima_sim.exec.ring.LinkLatency`), and every received message is held for its
link's latency before it is processed.
"""

from __future__ import annotations

import json
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass, field

from prima_sim.emulate.resources import Registry, delete_netns
from prima_sim.errors import EmulationError

SUBNET = "10.77.0"
"""First three octets of the addresses of emulated devices (private; exists only inside our namespaces)."""
IFACE = "eth0"
BRIDGE = "br0"
MTU_BYTES = 1514


def _run(cmd: Sequence[str], what: str) -> str:
    try:
        r = subprocess.run(list(cmd), capture_output=True, text=True, timeout=30)
    except FileNotFoundError:
        raise EmulationError(
            f"{cmd[0]} is not installed: the emulation needs iproute2 ('ip' and 'tc')"
        ) from None
    except subprocess.TimeoutExpired:
        raise EmulationError(f"{what}: '{' '.join(cmd)}' did not finish in 30 s") from None
    if r.returncode != 0:
        err = (r.stderr or r.stdout).strip().splitlines()
        hint = ""
        text = " ".join(err).lower()
        if "operation not permitted" in text:
            hint = " (needs root / CAP_NET_ADMIN)"
        elif "unknown qdisc" in text or "specified qdisc kind is unknown" in text:
            hint = " (the kernel lacks this qdisc module)"
        raise EmulationError(f"{what}: '{' '.join(cmd)}' failed: {' | '.join(err[-2:])}{hint}")
    return r.stdout


@dataclass(frozen=True)
class NetNode:
    """One emulated device on the network."""

    device: str
    ns: str
    ip: str
    index: int


@dataclass
class Network:
    """The namespaces, bridge and veth pairs of one run (created by :meth:`create`).

    Args:
        registry: where every created object is recorded for teardown.
    """

    registry: Registry
    nodes: dict[str, NetNode] = field(default_factory=dict)
    bridge_ns: str = ""

    def _ns(self, what: str) -> str:
        return f"{self.registry.prefix}-{what}"

    def _add_ns(self, ns: str) -> None:
        _run(["ip", "netns", "add", ns], f"creating network namespace {ns}")
        self.registry.add("netns", ns, lambda: delete_netns(ns))
        _run(["ip", "-n", ns, "link", "set", "lo", "up"], f"bringing up lo in {ns}")

    def create(self, devices: Sequence[str]) -> dict[str, NetNode]:
        """A namespace per device, each with ``eth0`` on the shared bridge.

        Raises:
            EmulationError: a namespace, veth or address could not be set up (what has been created so far
                stays registered and is removed by the registry's teardown).
        """
        if len(devices) > 250:
            raise EmulationError(f"at most 250 emulated devices, got {len(devices)}")
        self.bridge_ns = self._ns("net")
        self._add_ns(self.bridge_ns)
        _run(["ip", "-n", self.bridge_ns, "link", "add", BRIDGE, "type", "bridge"], "creating the bridge")
        _run(["ip", "-n", self.bridge_ns, "link", "set", BRIDGE, "up"], "bringing up the bridge")
        for i, dev in enumerate(devices):
            ns = self._ns(f"d{i}")
            self._add_ns(ns)
            port = f"p{i}"
            # both ends are created directly in their namespaces: nothing ever appears in the host's namespace
            _run(["ip", "link", "add", IFACE, "netns", ns, "type", "veth", "peer", "name", port, "netns",
                  self.bridge_ns], f"creating the veth pair of {dev}")  # fmt: skip
            _run(
                ["ip", "-n", self.bridge_ns, "link", "set", port, "master", BRIDGE],
                f"attaching {dev} to the bridge",
            )
            _run(
                ["ip", "-n", self.bridge_ns, "link", "set", port, "up"],
                f"bringing up the bridge port of {dev}",
            )
            ip = f"{SUBNET}.{i + 1}"
            _run(["ip", "-n", ns, "addr", "add", f"{ip}/24", "dev", IFACE], f"addressing {dev}")
            _run(["ip", "-n", ns, "link", "set", IFACE, "up"], f"bringing up {IFACE} of {dev}")
            self.nodes[dev] = NetNode(dev, ns, ip, i)
        return dict(self.nodes)

    def shape(self, device: str, peer_bps: dict[str, float]) -> None:
        """Limit what ``device`` sends to each peer to ``peer_bps[peer]`` bytes per second (HTB on ``eth0``).

        Peers not listed are not shaped.

        Raises:
            EmulationError: ``tc`` refused the qdisc, a class or a filter.
        """
        node = self.nodes[device]
        ns = node.ns
        _run(["tc", "-n", ns, "qdisc", "replace", "dev", IFACE, "root", "handle", "1:", "htb", "default", "9999"],
             f"adding the HTB qdisc of {device}")  # fmt: skip
        for peer, bps in sorted(peer_bps.items(), key=lambda kv: self.nodes[kv[0]].index):
            p = self.nodes[peer]
            cls = f"1:{10 + p.index}"
            bits = max(8000, int(bps * 8))
            burst = htb_burst_bytes(bps)
            _run(["tc", "-n", ns, "class", "add", "dev", IFACE, "parent", "1:", "classid", cls, "htb",
                  "rate", f"{bits}bit", "ceil", f"{bits}bit", "burst", str(burst), "cburst", str(burst),
                  "quantum", str(MTU_BYTES)], f"shaping {device} -> {peer}")  # fmt: skip
            _run(["tc", "-n", ns, "qdisc", "add", "dev", IFACE, "parent", cls, "handle", f"{10 + p.index}:",
                  "pfifo", "limit", "10000"], f"queue of {device} -> {peer}")  # fmt: skip
            _run(["tc", "-n", ns, "filter", "add", "dev", IFACE, "parent", "1:", "protocol", "ip", "prio", "1",
                  "u32", "match", "ip", "dst", f"{p.ip}/32", "flowid", cls], f"filter {device} -> {peer}")  # fmt: skip

    def qdisc_stats(self, device: str) -> str:
        """``tc -s class show`` of a device's ``eth0`` (for the run's log)."""
        try:
            return _run(["tc", "-n", self.nodes[device].ns, "-s", "class", "show", "dev", IFACE], "tc stats")
        except EmulationError as exc:
            return str(exc)


def htb_burst_bytes(bps: float) -> int:
    """HTB bucket: 1 ms of the rate, at least two full frames. Small enough that a 16 KiB hidden state is
    paced at the link's rate (a bucket as large as the message would let it through at memory speed), large
    enough that the qdisc's timer granularity does not lower fast links."""
    return max(2 * MTU_BYTES, int(bps * 1e-3))


def latency_table(latency_s: dict[tuple[str, str], float]) -> str:
    """The JSON of ``--link-latency``: ``{receiver: {sender: seconds}}`` from per-(sender, receiver)
    latencies (zero entries left out)."""
    table: dict[str, dict[str, float]] = {}
    for (src, dst), s in sorted(latency_s.items()):
        if s > 0:
            table.setdefault(dst, {})[src] = round(float(s), 9)
    return json.dumps(table, sort_keys=True, separators=(",", ":"))
