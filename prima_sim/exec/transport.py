"""The executor's ZeroMQ sockets: the one place that creates, configures, binds and connects them.

The head, the workers (data ring and control channel) and netprobe all open their sockets here, so the options
every socket needs are set once: how long a closing socket may keep delivering (``linger``), IPv6 for an IPv6
address, a size limit on received messages where one is wanted, and the ``tcp://`` endpoint (an IPv6 address in
brackets). A socket that cannot bind or connect is closed before the :class:`zmq.ZMQError` reaches the caller,
which turns it into its own error (it knows what the address was for).
"""

from __future__ import annotations

import ipaddress
from typing import Any

import zmq


def is_v6(host: str) -> bool:
    """Whether ``host`` is a literal IPv6 address."""
    try:
        return isinstance(ipaddress.ip_address(host), ipaddress.IPv6Address)
    except ValueError:
        return False


def endpoint(host: str, port: int | str) -> str:
    """``tcp://host:port`` (``tcp://[addr]:port`` for an IPv6 address; ``port`` may be ``*``: any free one)."""
    return f"tcp://[{host}]:{port}" if is_v6(host) else f"tcp://{host}:{port}"


def open_socket(
    kind: int, host: str, port: int | str, *, bind: bool, linger_ms: int, max_msg_size: int | None = None,
    ctx: zmq.Context[Any] | None = None,
) -> zmq.Socket[Any]:  # fmt: skip
    """A socket of ``kind`` (``zmq.PUSH``, ``zmq.PULL``, ...) bound to or connected to ``host:port``.

    Args:
        kind: the ZeroMQ socket type.
        host: an IP address or name (``*``, ``0.0.0.0`` or ``::`` to bind every interface).
        port: the port (``*`` to bind any free one: read it from ``zmq.LAST_ENDPOINT``).
        bind: bind (listen) rather than connect.
        linger_ms: how long ``close()`` may keep trying to deliver queued messages (0: drop them).
        max_msg_size: refuse received messages larger than this many bytes.
        ctx: the context (default: the process-wide one).

    Raises:
        zmq.ZMQError: it cannot bind or connect (the socket is closed first).
    """
    sock = (ctx or zmq.Context.instance()).socket(kind)
    try:
        sock.setsockopt(zmq.LINGER, linger_ms)
        sock.setsockopt(zmq.IPV6, 1 if is_v6(host) else 0)
        if max_msg_size is not None:
            sock.setsockopt(zmq.MAXMSGSIZE, max_msg_size)
        url = endpoint(host, port)
        if bind:
            sock.bind(url)
        else:
            sock.connect(url)
    except BaseException:
        sock.close(0)
        raise
    return sock
