"""The executor's one socket factory (prima_sim.exec.transport), on loopback."""

from __future__ import annotations

import pytest
import zmq

from prima_sim.exec.hosts import Endpoints
from prima_sim.exec.transport import endpoint, open_socket


def test_endpoints_put_ipv6_addresses_in_brackets() -> None:
    assert endpoint("127.0.0.1", 29500) == "tcp://127.0.0.1:29500"
    assert endpoint("::1", "*") == "tcp://[::1]:*"
    assert endpoint("laptop.local", 1) == "tcp://laptop.local:1"
    ep = Endpoints(data={"A": ("fe80::1", 29500)}, control=("::1", 29499))
    assert (ep.url("A"), ep.control_url) == ("tcp://[fe80::1]:29500", "tcp://[::1]:29499")


def test_a_bound_pull_receives_from_a_connected_push_with_the_options_set() -> None:
    with open_socket(zmq.PULL, "127.0.0.1", "*", bind=True, linger_ms=0, max_msg_size=1 << 20) as pull:
        port = int(pull.getsockopt_string(zmq.LAST_ENDPOINT).rsplit(":", 1)[1])
        assert pull.getsockopt(zmq.MAXMSGSIZE) == 1 << 20 and pull.getsockopt(zmq.LINGER) == 0
        with open_socket(zmq.PUSH, "127.0.0.1", port, bind=False, linger_ms=250) as push:
            assert push.getsockopt(zmq.LINGER) == 250 and push.getsockopt(zmq.IPV6) == 0
            push.send(b"x")
            assert pull.poll(5000) and pull.recv() == b"x"


def test_ipv6_loopback_sets_the_option() -> None:
    try:
        sock = open_socket(zmq.PULL, "::1", "*", bind=True, linger_ms=0)
    except zmq.ZMQError:
        pytest.skip("no IPv6 loopback here")
    with sock:
        assert sock.getsockopt(zmq.IPV6) == 1


def test_a_socket_that_cannot_bind_is_closed_and_the_error_raised() -> None:
    ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    with open_socket(zmq.PULL, "127.0.0.1", "*", bind=True, linger_ms=0) as taken:
        port = int(taken.getsockopt_string(zmq.LAST_ENDPOINT).rsplit(":", 1)[1])
        with pytest.raises(zmq.ZMQError):
            open_socket(zmq.PULL, "127.0.0.1", port, bind=True, linger_ms=0, ctx=ctx)
    ctx.term()  # would block for ever if the failed socket were still open
