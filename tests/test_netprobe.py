"""``prima-sim netprobe`` over loopback: measurements, the [[links]] snippet, bad addresses, timeouts and
servers that answer wrongly."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import tomllib
from collections.abc import Iterator
from pathlib import Path

import pytest
import zmq

from prima_sim.devices.cluster import Link
from prima_sim.errors import InputError
from prima_sim.exec import netprobe as npb
from prima_sim.testing import interruptible

pytestmark = pytest.mark.real
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture()
def server() -> Iterator[npb.Server]:
    srv = npb.Server("127.0.0.1:0")
    t = threading.Thread(target=srv.serve_forever, kwargs={"poll_ms": 20}, daemon=True)
    t.start()
    try:
        yield srv
    finally:
        srv.stop()
        t.join(5)
        srv.close()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_probe_loopback(server: npb.Server) -> None:
    r = npb.probe(f"127.0.0.1:{server.port}", size=256 * 1024, count=3, pings=20, timeout_s=5)
    assert r.remote_host == socket.gethostname()
    assert 0 < r.rtt_min_s <= r.rtt_s <= r.rtt_p90_s < 1.0
    assert r.latency_s == pytest.approx(r.rtt_s / 2)
    assert r.up_bps > 1e6 and r.down_bps > 1e6  # loopback moves far more than 1 MB/s
    assert r.bandwidth_bps == min(r.up_bps, r.down_bps)
    assert len(r.up_times_s) == len(r.down_times_s) == 3
    # 1 hello + 1 warm-up ping + 20 pings + (1 warm-up + 3) per direction
    assert server.requests == 1 + 1 + 20 + 2 * 4


def test_link_snippet_is_a_valid_cluster_link(server: npb.Server) -> None:
    r = npb.probe(f"127.0.0.1:{server.port}", size=64 * 1024, count=1, pings=3)
    data = tomllib.loads(r.link_toml("laptop", "desk-pc"))
    (entry,) = data["links"]
    link = Link.model_validate(entry)
    assert (link.a, link.b) == ("laptop", "desk-pc")
    assert link.latency_s == pytest.approx(r.latency_s, rel=0.01, abs=1e-7)
    assert link.bandwidth_bps == pytest.approx(r.bandwidth_bps, rel=0.01)


def test_transfers_really_carry_the_bytes(server: npb.Server) -> None:
    with npb.Client(f"127.0.0.1:{server.port}", timeout_s=5) as c:
        got = c.request(b"down", npb._seq(300_000), expect=b"data")
        assert len(got) == 300_000
        ack = c.request(b"up", bytes(123_456), expect=b"ack")
        assert npb._u64(bytes(ack)) == 123_456
        assert bytes(c.request(b"ping", b"hello", expect=b"pong")) == b"hello"


def test_server_refuses_oversized_and_unknown_requests(server: npb.Server) -> None:
    with npb.Client(f"127.0.0.1:{server.port}", timeout_s=5) as c:
        with pytest.raises(npb.NetprobeError, match="at most"):
            c.request(b"down", npb._seq(npb.MAX_TRANSFER + 1))
        with pytest.raises(npb.NetprobeError, match="unknown op"):
            c.request(b"bogus")
        with pytest.raises(npb.NetprobeError, match="8-byte size"):
            c.request(b"down", b"123")


def test_server_answers_garbage_with_an_error(server: npb.Server) -> None:
    ctx = zmq.Context()
    s = ctx.socket(zmq.DEALER)
    s.setsockopt(zmq.LINGER, 0)
    s.setsockopt(zmq.RCVTIMEO, 3000)
    try:
        s.connect(f"tcp://127.0.0.1:{server.port}")
        s.send_multipart([b"HELLO", b"world"])
        frames = s.recv_multipart()
        assert frames[0] == npb.MAGIC and frames[1] == b"err"
    finally:
        s.close(0)
        ctx.term()


@pytest.mark.parametrize(
    ("text", "message"),
    [("onlyhost", "missing port"), (":5590", "missing host"), ("host:abc", "port must be"),
     ("host:70000", "port must be"), ("fe80::1:5590", "IPv6"), ("[::1:5590", "unclosed")],
)  # fmt: skip
def test_bad_addresses(text: str, message: str) -> None:
    with pytest.raises(InputError, match=message):
        npb.parse_address(text)


def test_good_addresses() -> None:
    assert npb.parse_address("10.0.0.2:6000") == ("10.0.0.2", 6000)
    assert npb.parse_address("tcp://box:7") == ("box", 7)
    assert npb.parse_address("[::1]:5590") == ("::1", 5590)
    assert npb.parse_address("box", default_port=5590) == ("box", 5590)


def test_unresolvable_host_fails_fast() -> None:
    t0 = time.perf_counter()
    with pytest.raises(InputError, match="cannot resolve host"):
        npb.probe("no-such-host.invalid:5590", timeout_s=5)
    assert time.perf_counter() - t0 < 10


def test_nothing_listening_times_out_with_a_clear_error() -> None:
    port = _free_port()
    t0 = time.perf_counter()
    with pytest.raises(npb.NetprobeError, match=r"no answer from 127\.0\.0\.1:\d+ within 0\.3 s.*--serve"):
        npb.probe(f"127.0.0.1:{port}", timeout_s=0.3)
    assert time.perf_counter() - t0 < 3  # bounded by the timeout, not by ZeroMQ's reconnect loop


def test_silent_server_times_out() -> None:
    ctx = zmq.Context()
    mute = ctx.socket(zmq.ROUTER)  # accepts the connection, reads, never answers
    mute.setsockopt(zmq.LINGER, 0)
    port = mute.bind_to_random_port("tcp://127.0.0.1")
    try:
        with pytest.raises(npb.NetprobeError, match=r"within 0\.3 s"):
            npb.probe(f"127.0.0.1:{port}", timeout_s=0.3)
    finally:
        mute.close(0)
        ctx.term()


def test_a_server_of_another_protocol_is_named() -> None:
    ctx = zmq.Context()
    other = ctx.socket(zmq.ROUTER)
    other.setsockopt(zmq.LINGER, 0)
    port = other.bind_to_random_port("tcp://127.0.0.1")

    def answer() -> None:
        if other.poll(3000):
            ident, *_ = other.recv_multipart()
            other.send_multipart([ident, b"something", b"else"])

    t = threading.Thread(target=answer, daemon=True)
    t.start()
    try:
        with pytest.raises(npb.NetprobeError, match="not a prima-sim netprobe reply"):
            npb.probe(f"127.0.0.1:{port}", timeout_s=3)
    finally:
        t.join(5)
        other.close(0)
        ctx.term()


@pytest.mark.parametrize(("kwargs", "flag"), [({"size": 0}, "--size"), ({"count": 0}, "--count"), ({"pings": 0}, "--pings"),
                                              ({"timeout_s": 0}, "--timeout")])  # fmt: skip
def test_bad_options(kwargs: dict[str, float], flag: str) -> None:
    with pytest.raises(InputError, match=flag):
        npb.probe("127.0.0.1:5590", **kwargs)  # type: ignore[arg-type]


def test_bind_conflict_is_an_input_error(server: npb.Server) -> None:
    with pytest.raises(InputError, match="cannot listen"):
        npb.Server(f"127.0.0.1:{server.port}")


def test_cli_probe_json_and_table(server: npb.Server, capsys: pytest.CaptureFixture[str]) -> None:
    from prima_sim.cli.main import main

    addr = f"127.0.0.1:{server.port}"
    assert (
        main(
            [
                "netprobe",
                addr,
                "--json",
                "--size",
                "64KiB",
                "--count",
                "1",
                "--pings",
                "3",
                "--local-name",
                "a1",
            ]
        )
        == 0
    )
    data = json.loads(capsys.readouterr().out)
    assert data["size_bytes"] == 65536 and data["local_name"] == "a1"
    assert tomllib.loads(data["links_toml"])["links"][0]["a"] == "a1"
    assert (
        main(["netprobe", addr, "--size", "64KiB", "--count", "1", "--pings", "3", "--remote-name", "b2"])
        == 0
    )
    out = capsys.readouterr().out
    assert "RTT" in out and "[[links]]" in out and 'b = "b2"' in out


def test_cli_errors_are_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    from prima_sim.cli.main import main

    port = _free_port()
    assert main(["netprobe", f"127.0.0.1:{port}", "--timeout", "0.2"]) == 3
    err = capsys.readouterr().err
    assert err.startswith("prima-sim netprobe: error: no answer") and err.count("\n") == 1
    assert main(["netprobe"]) == 2
    assert "missing HOST:PORT" in capsys.readouterr().err
    assert main(["netprobe", "127.0.0.1:1", "--size", "lots"]) == 2
    assert "--size" in capsys.readouterr().err
    assert main(["netprobe", "--serve", "127.0.0.1:5"]) == 2


def test_cli_serve_subprocess_until_interrupted() -> None:
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.Popen(
        [sys.executable, "-m", "prima_sim.cli.main", "netprobe", "--serve", "--bind", "127.0.0.1:0"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        preexec_fn=interruptible,
    )
    try:
        line = proc.stdout.readline() if proc.stdout else ""
        assert line.startswith("netprobe: serving on tcp://127.0.0.1:"), line
        port = int(line.split("tcp://127.0.0.1:")[1].split()[0])
        r = npb.probe(f"127.0.0.1:{port}", size=64 * 1024, count=1, pings=3, timeout_s=10)
        assert r.rtt_s > 0
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=10) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
