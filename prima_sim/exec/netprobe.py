"""Network probe: latency and bandwidth between two hosts over ZeroMQ (prima.cpp never measured its network).

One host runs :func:`serve` (``prima-sim netprobe --serve``); another runs :func:`probe` against it
(``prima-sim netprobe HOST:PORT``). The transport is the one the real ring uses: ZeroMQ over TCP.

* **Latency.** ``pings`` round trips of a 64-byte message, one at a time; the median round-trip time (RTT) is
  reported with its minimum and 90th percentile, and the one-way latency is RTT / 2, the ``latency_s`` a
  cluster file's link takes.
* **Bandwidth.** ``count`` transfers of ``size`` bytes (default 8 MiB) in each direction, one warm-up first
  (TCP slow start). Upload: the client sends the bytes and the server acknowledges once it has them all.
  Download: the client asks and the server sends them. A transfer takes ``RTT + size / bandwidth`` (the same
  latency + bytes/bandwidth model as a cluster link), so ``bandwidth = size / (median time - median RTT)``.
  The link's ``bandwidth_bps`` is the slower direction.

Wire format (every message, both directions): ``[b"PSNP1", op, seq (8 bytes, little-endian), payload]``;
ops ``hello`` (server answers with a JSON object naming its host), ``ping`` (echo), ``up`` (answer ``ack``
with the byte count), ``down`` (payload = 8-byte size; answer ``data`` with that many bytes). The client is a
DEALER, the server a ROUTER, so a client that gives up never wedges the server, and replies to a request
that already timed out are told apart by ``seq`` and dropped.
"""

from __future__ import annotations

import contextlib
import json
import socket
import statistics
import struct
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import zmq

from prima_sim import __version__
from prima_sim.errors import InputError, PrimaSimError
from prima_sim.exec.transport import open_socket
from prima_sim.units import fmt_bandwidth, fmt_bytes, fmt_seconds

MAGIC = b"PSNP1"
DEFAULT_PORT = 5590
DEFAULT_SIZE = 8 << 20
MAX_TRANSFER = 1 << 30
PING_BYTES = 64
SLOWEST_LINK_BPS = 1.25e6
"""Bulk transfers get ``size / SLOWEST_LINK_BPS`` seconds (10 Mbit/s) on top of the timeout."""


class NetprobeError(PrimaSimError):
    """The other host did not answer in time, or answered something that is not a netprobe server."""

    exit_code = 3


# --- addresses ---------------------------------------------------------------------------------------------
def parse_address(
    text: str, *, default_port: int | None = None, source: str = "HOST:PORT"
) -> tuple[str, int]:
    """Split ``HOST:PORT`` (also ``[v6]:PORT`` and ``tcp://HOST:PORT``) into host and port.

    Raises:
        InputError: the text is not of that form or the port is out of range.
    """
    t = text.strip()
    if t.startswith("tcp://"):
        t = t[len("tcp://") :]
    if t.startswith("["):
        host, sep, rest = t[1:].partition("]")
        if not sep:
            raise InputError(source, "", f"{text!r}: unclosed '[' in an IPv6 address")
        port_s = rest[1:] if rest.startswith(":") else ""
    elif t.count(":") == 1:
        host, port_s = t.split(":")
    elif ":" in t:
        raise InputError(source, "", f"{text!r}: write IPv6 addresses as [ADDR]:PORT")
    else:
        host, port_s = t, ""
    if not host:
        raise InputError(
            source, "", f"{text!r}: missing host (expected HOST:PORT, e.g. 192.168.1.20:{DEFAULT_PORT})"
        )
    if not port_s:
        if default_port is None:
            raise InputError(
                source, "", f"{text!r}: missing port (expected HOST:PORT, e.g. {host}:{DEFAULT_PORT})"
            )
        return host, default_port
    if not port_s.isdigit() or not 0 <= int(port_s) <= 65535:
        raise InputError(source, "", f"{text!r}: port must be a number from 1 to 65535")
    return host, int(port_s)


def resolve(host: str, port: int, source: str = "HOST:PORT") -> str:
    """A numeric address for ``host`` (ZeroMQ connects to what it is given; a name that does not resolve would
    otherwise only show as a timeout).

    Raises:
        InputError: the name does not resolve.
    """
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        raise InputError(source, "", f"cannot resolve host {host!r}: {exc.strerror}") from None
    for family in (socket.AF_INET, socket.AF_INET6):
        for info in infos:
            if info[0] == family:
                return str(info[4][0])
    raise InputError(source, "", f"host {host!r} has no IPv4 or IPv6 address")


# --- messages ----------------------------------------------------------------------------------------------
def _seq(n: int) -> bytes:
    return struct.pack("<Q", n)


def _raw(msg: bytes | zmq.Frame) -> bytes:
    """The bytes of a received message (a frame when it was received without copying)."""
    return msg if isinstance(msg, bytes) else msg.bytes


def _u64(b: bytes) -> int:
    if len(b) != 8:
        raise ValueError("expected 8 bytes")
    return struct.unpack("<Q", b)[0]


# --- server ------------------------------------------------------------------------------------------------
class Server:
    """A netprobe server bound to ``bind`` (``HOST:PORT``; port 0 picks a free one). Call :meth:`serve_forever`
    (until :meth:`stop`) or use it as a context manager in a thread."""

    def __init__(self, bind: str = f"0.0.0.0:{DEFAULT_PORT}") -> None:
        host, port = parse_address(bind, default_port=DEFAULT_PORT, source="--bind")
        self.ctx = zmq.Context()
        try:
            self.sock = open_socket(zmq.ROUTER, host if host != "*6" else "::", port or "*", bind=True, linger_ms=0,
                                    max_msg_size=MAX_TRANSFER + 4096, ctx=self.ctx)  # fmt: skip
        except zmq.ZMQError as exc:
            self.ctx.term()
            raise InputError("--bind", "", f"cannot listen on {bind}: {exc}") from None
        self.endpoint = self.sock.getsockopt_string(zmq.LAST_ENDPOINT)
        self.port = int(self.endpoint.rsplit(":", 1)[1])
        self._stop = threading.Event()
        self._zeros = b""
        self.requests = 0

    def stop(self) -> None:
        """Ask :meth:`serve_forever` to return (within 0.1 s)."""
        self._stop.set()

    def close(self) -> None:
        """Close the socket and the context."""
        self.sock.close(0)
        self.ctx.term()

    def __enter__(self) -> Server:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
        self.close()

    def _reply(self, ident: bytes, op: bytes, seq: bytes, payload: bytes | memoryview) -> None:
        self.sock.send_multipart([ident, MAGIC, op, seq, payload], copy=len(payload) < 65536)

    def handle(self, frames: list[zmq.Frame]) -> None:
        """Answer one request (``frames`` as received by the ROUTER: identity first)."""
        if len(frames) != 5 or frames[1].bytes != MAGIC:
            if frames:
                self._reply(frames[0].bytes, b"err", _seq(0), b"not a prima-sim netprobe request")
            return
        ident, op, seq, payload = frames[0].bytes, frames[2].bytes, frames[3].bytes, frames[4]
        self.requests += 1
        if op == b"ping":
            self._reply(ident, b"pong", seq, payload.bytes)
        elif op == b"up":
            self._reply(ident, b"ack", seq, _seq(len(payload.buffer)))
        elif op == b"down":
            try:
                n = _u64(payload.bytes)
            except ValueError:
                self._reply(ident, b"err", seq, b"down needs an 8-byte size")
                return
            if n > MAX_TRANSFER:
                self._reply(ident, b"err", seq, f"at most {MAX_TRANSFER} bytes per transfer".encode())
                return
            if len(self._zeros) < n:
                self._zeros = bytes(n)
            self._reply(ident, b"data", seq, memoryview(self._zeros)[:n])
        elif op == b"hello":
            info = {"host": socket.gethostname(), "version": __version__, "protocol": MAGIC.decode()}
            self._reply(ident, b"hello", seq, json.dumps(info).encode())
        else:
            self._reply(ident, b"err", seq, b"unknown op " + op[:32])

    def serve_forever(self, poll_ms: int = 100) -> None:
        """Answer requests until :meth:`stop` is called."""
        poller = zmq.Poller()
        poller.register(self.sock, zmq.POLLIN)
        while not self._stop.is_set():
            if dict(poller.poll(poll_ms)).get(self.sock):
                self.handle(self.sock.recv_multipart(copy=False))


def serve(bind: str = f"0.0.0.0:{DEFAULT_PORT}", on_ready: Callable[[str], None] | None = None) -> None:
    """Run a netprobe server until interrupted (Ctrl-C); ``on_ready(endpoint)`` once it listens."""
    with Server(bind) as server:
        if on_ready is not None:
            on_ready(server.endpoint)
        with contextlib.suppress(KeyboardInterrupt):
            server.serve_forever()


# --- client ------------------------------------------------------------------------------------------------
@dataclass
class NetprobeResult:
    """What :func:`probe` measured."""

    address: str
    remote_host: str
    rtt_s: float
    rtt_min_s: float
    rtt_p90_s: float
    latency_s: float
    up_bps: float
    down_bps: float
    bandwidth_bps: float
    size_bytes: int
    count: int
    pings: int
    up_times_s: list[float] = field(default_factory=list)
    down_times_s: list[float] = field(default_factory=list)

    def to_dict(self) -> dict[str, object]:
        """A JSON-ready dictionary."""
        return asdict(self)

    def link_toml(self, a: str, b: str) -> str:
        """A ``[[links]]`` table for a cluster file, ready to paste."""
        return (
            "[[links]]\n"
            f"a = {json.dumps(a)}\n"
            f"b = {json.dumps(b)}\n"
            f'bandwidth_bps = "{_mbps(self.bandwidth_bps)}"  # the slower direction: '
            f"up {_mbps(self.up_bps)}, down {_mbps(self.down_bps)}\n"
            f'latency_s = "{_duration(self.latency_s)}"  # one-way = median RTT / 2 '
            f"(RTT {_duration(self.rtt_s)} over {self.pings} pings)\n"
        )


def _mbps(bps: float) -> str:
    return f"{bps * 8 / 1e6:.1f} Mbps"


def _duration(s: float) -> str:
    return f"{s * 1e6:.1f} us" if s < 1e-3 else f"{s * 1e3:.3f} ms"


class Client:
    """A connection to a netprobe server; requests are answered within ``timeout_s`` or raise."""

    def __init__(self, address: str, timeout_s: float = 5.0) -> None:
        if timeout_s <= 0:
            raise InputError("--timeout", "", f"must be positive, got {timeout_s}")
        host, port = parse_address(address)
        if port == 0:
            raise InputError("HOST:PORT", "", f"{address!r}: port must be a number from 1 to 65535")
        ip = resolve(host, port)
        self.address = address
        self.timeout_s = timeout_s
        self.ctx = zmq.Context()
        self.sock = open_socket(zmq.DEALER, ip, port, bind=False, linger_ms=0, ctx=self.ctx)
        self.poller = zmq.Poller()
        self.poller.register(self.sock, zmq.POLLIN)
        self._seq = 0

    def close(self) -> None:
        """Close the socket and the context."""
        self.sock.close(0)
        self.ctx.term()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def request(
        self, op: bytes, payload: bytes | memoryview = b"", expect: bytes = b"", extra_s: float = 0.0
    ) -> bytes | zmq.Frame:
        """Send one request and return the payload of its answer (a Frame for large answers); the answer must
        come within the client's timeout plus ``extra_s`` (the time a bulk transfer may take).

        Raises:
            NetprobeError: no answer within the timeout, or an error or malformed answer.
        """
        self._seq += 1
        seq = _seq(self._seq)
        self.sock.send_multipart([MAGIC, op, seq, payload], copy=len(payload) < 65536)
        limit = self.timeout_s + extra_s
        deadline = time.perf_counter() + limit
        while True:
            left = deadline - time.perf_counter()
            if left <= 0 or not dict(self.poller.poll(max(1, round(left * 1000)))).get(self.sock):
                raise NetprobeError(
                    f"no answer from {self.address} within {limit:g} s "
                    "(is `prima-sim netprobe --serve` running there, and is the port reachable?)"
                )
            frames = self.sock.recv_multipart(copy=False)
            if len(frames) != 4 or frames[0].bytes != MAGIC:
                raise NetprobeError(
                    f"{self.address} answered something that is not a prima-sim netprobe reply"
                )
            r_op, r_seq = frames[1].bytes, frames[2].bytes
            if r_op == b"err":
                raise NetprobeError(
                    f"{self.address} refused the request: {frames[3].bytes.decode(errors='replace')}"
                )
            if r_seq != seq:
                continue  # a late answer to a request that timed out
            if expect and r_op != expect:
                raise NetprobeError(f"{self.address} answered {r_op!r} to {op!r}")
            return frames[3] if len(frames[3]) >= 65536 else frames[3].bytes


def _p90(xs: list[float]) -> float:
    s = sorted(xs)
    return s[min(len(s) - 1, round(0.9 * (len(s) - 1)))]


def probe(
    address: str,
    size: int = DEFAULT_SIZE,
    count: int = 5,
    pings: int = 50,
    timeout_s: float = 5.0,
    progress: Callable[[str], None] | None = None,
) -> NetprobeResult:
    """Measure RTT latency and bandwidth to a netprobe server at ``address`` (``HOST:PORT``).

    Raises:
        InputError: a malformed address or option, or a host name that does not resolve.
        NetprobeError: the server does not answer within ``timeout_s`` or is not a netprobe server.
    """
    if not 1 <= size <= MAX_TRANSFER:
        raise InputError(
            "--size", "", f"must be from 1 byte to {fmt_bytes(MAX_TRANSFER)}, got {fmt_bytes(size)}"
        )
    if count < 1:
        raise InputError("--count", "", f"must be at least 1, got {count}")
    if pings < 1:
        raise InputError("--pings", "", f"must be at least 1, got {pings}")
    with Client(address, timeout_s) as c:
        if progress:
            progress("hello")
        hello = c.request(b"hello", expect=b"hello")
        try:
            remote = str(json.loads(_raw(hello)).get("host", ""))
        except (ValueError, AttributeError):
            raise NetprobeError(f"{address} sent a malformed hello") from None
        if progress:
            progress("latency")
        payload = bytes(PING_BYTES)
        c.request(b"ping", payload, expect=b"pong")  # warm-up: connection set up
        rtts = []
        for _ in range(pings):
            t0 = time.perf_counter()
            c.request(b"ping", payload, expect=b"pong")
            rtts.append(time.perf_counter() - t0)
        rtt = statistics.median(rtts)

        data = bytes(size)
        size_req = _seq(size)
        bulk_s = size / SLOWEST_LINK_BPS  # a bulk transfer may take this much longer than a ping

        def up() -> None:
            ack = c.request(b"up", data, expect=b"ack", extra_s=bulk_s)
            if _u64(_raw(ack)) != size:
                raise NetprobeError(f"{address} acknowledged {_u64(_raw(ack))} bytes, {size} were sent")

        def down() -> None:
            got = c.request(b"down", size_req, expect=b"data", extra_s=bulk_s)
            if len(got) != size:
                raise NetprobeError(f"{address} sent {len(got)} bytes, {size} were asked for")

        times: dict[str, list[float]] = {"up": [], "down": []}
        for name, fn in (("up", up), ("down", down)):
            if progress:
                progress(f"bandwidth {name}")
            fn()  # warm-up (TCP slow start, buffers)
            for _ in range(count):
                t0 = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - t0)

    def rate(ts: list[float]) -> float:
        med = statistics.median(ts)
        transfer = med - rtt if med - rtt > 0.1 * med else med  # the RTT term, unless it is most of the time
        return size / transfer

    up_bps, down_bps = rate(times["up"]), rate(times["down"])
    return NetprobeResult(
        address=address,
        remote_host=remote,
        rtt_s=rtt,
        rtt_min_s=min(rtts),
        rtt_p90_s=_p90(rtts),
        latency_s=rtt / 2,
        up_bps=up_bps,
        down_bps=down_bps,
        bandwidth_bps=min(up_bps, down_bps),
        size_bytes=size,
        count=count,
        pings=pings,
        up_times_s=times["up"],
        down_times_s=times["down"],
    )


def format_result(r: NetprobeResult) -> str:
    """A readable summary."""
    return "\n".join(
        [
            f"netprobe {r.address} ({r.remote_host or 'unknown host'}):",
            f"  RTT          {fmt_seconds(r.rtt_s)} median, {fmt_seconds(r.rtt_min_s)} min, {fmt_seconds(r.rtt_p90_s)} p90 "
            f"({r.pings} pings of {PING_BYTES} B)",
            f"  latency      {fmt_seconds(r.latency_s)} one-way (RTT / 2)",
            f"  upload       {fmt_bandwidth(r.up_bps)} ({_mbps(r.up_bps)}; median of {r.count} x {r.size_bytes} B)",
            f"  download     {fmt_bandwidth(r.down_bps)} ({_mbps(r.down_bps)}; median of {r.count} x {r.size_bytes} B)",
        ]
    )
