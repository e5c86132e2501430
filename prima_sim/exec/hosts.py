"""``hosts.toml``: where each device of a plan listens.

Example::

    base_port = 29500          # default 29500
    [devices.laptop]           # every field optional
    host = "192.168.1.20"
    port = 29510

A device not listed listens on 127.0.0.1; a device without a port gets ``base_port + <its index in ring
order>``. The head also listens for control messages (heartbeats, errors, measurements) on
``control_port``, by default the next port after the data ports (``base_port + number of devices``).
"""

from __future__ import annotations

import random
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from pydantic import Field

from prima_sim.errors import InputError
from prima_sim.exec.transport import endpoint
from prima_sim.plan import Plan
from prima_sim.schema import FrozenModel, load_model

DEFAULT_HOST = "127.0.0.1"
DEFAULT_BASE_PORT = 29500
LOCAL_PORT_MIN = 20000  # run --local draws its ports from [LOCAL_PORT_MIN, start of the ephemeral range)


class HostEntry(FrozenModel):
    """Address of one device."""

    host: str = Field(default=DEFAULT_HOST, min_length=1, description="address or host name it listens on")
    port: int | None = Field(
        default=None, ge=1, le=65535, description="its data port (default: base_port + ring index)"
    )


class HostsFile(FrozenModel):
    """The contents of ``hosts.toml``."""

    schema_version: Literal[1] = Field(default=1, description="hosts format version")
    base_port: int = Field(
        default=DEFAULT_BASE_PORT,
        ge=1,
        le=65535,
        description="data port of ring[i] is base_port + i unless the device gives its port",
    )
    control_port: int | None = Field(
        default=None,
        ge=1,
        le=65535,
        description="the head's control port (default: the port after the data ports)",
    )
    devices: dict[str, HostEntry] = Field(
        default_factory=dict, description="[devices.NAME] per device of the plan"
    )


@dataclass(frozen=True)
class Endpoints:
    """Resolved addresses: the data endpoint of every device and the head's control endpoint."""

    data: dict[str, tuple[str, int]]
    control: tuple[str, int]

    def url(self, device: str) -> str:
        """``tcp://host:port`` of ``device``'s data socket."""
        return endpoint(*self.data[device])

    @property
    def control_url(self) -> str:
        """``tcp://host:port`` of the head's control socket."""
        return endpoint(*self.control)


def load_hosts(path: str | Path | None) -> HostsFile:
    """Read ``hosts.toml`` (None: all defaults, loopback).

    Raises:
        InputError: the file is missing or invalid.
    """
    return HostsFile() if path is None else load_model(HostsFile, path)


def resolve(hosts: HostsFile, plan: Plan, source: str = "hosts.toml") -> Endpoints:
    """Endpoints of every device of ``plan``.

    A device the plan dropped may be listed (one hosts file serves every plan of a home).

    Raises:
        InputError: the file names a device the plan does not have, or two devices share an address.
    """
    names = [d.name for d in plan.devices]
    unknown = sorted(set(hosts.devices) - set(names) - {d.name for d in plan.dropped})
    if unknown:
        raise InputError(
            source, f"devices.{unknown[0]}", f"is not a device of the plan (devices: {', '.join(names)})"
        )
    data: dict[str, tuple[str, int]] = {}
    for i, name in enumerate(names):
        e = hosts.devices.get(name, HostEntry())
        data[name] = (e.host, e.port if e.port is not None else hosts.base_port + i)
    head_host = data[names[0]][0]
    control = (
        head_host,
        hosts.control_port if hosts.control_port is not None else hosts.base_port + len(names),
    )
    seen: dict[tuple[str, int], str] = {}
    for name, addr in [*data.items(), ("<control>", control)]:
        if addr in seen:
            raise InputError(
                source, f"devices.{name}", f"uses {addr[0]}:{addr[1]}, already used by {seen[addr]}"
            )
        seen[addr] = name
    return Endpoints(data, control)


def _ephemeral_low() -> int:
    """Lowest port the kernel hands out for outgoing connections (Linux; 32768 elsewhere)."""
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def free_base_port(n: int, host: str = DEFAULT_HOST, attempts: int = 200) -> int:
    """A base port such that ``n`` consecutive ports are free on ``host`` right now (for ``run --local``).

    Ports are drawn below the ephemeral range, so that the outgoing connections of the ring itself (whose local
    ports come from that range) cannot take a port before the device meant to listen on it binds it.

    Raises:
        OSError: no such range was found.
    """
    rng = random.Random()
    high = max(LOCAL_PORT_MIN + n, _ephemeral_low() - n)
    for _ in range(attempts):
        base = rng.randrange(LOCAL_PORT_MIN, high)
        socks = []
        try:
            for p in range(base, base + n):
                s = socket.socket()
                socks.append(s)
                s.bind((host, p))
            return base
        except OSError:
            continue
        finally:
            for s in socks:
                s.close()
    raise OSError(f"no {n} consecutive free ports on {host}")


def local_hosts(plan: Plan) -> HostsFile:
    """A loopback hosts file with free ports for every device of ``plan`` and the control socket."""
    return HostsFile(base_port=free_base_port(len(plan.devices) + 1))
