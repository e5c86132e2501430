"""The wire protocol, hosts.toml and ring routing (no llama.cpp, no sockets)."""

from __future__ import annotations

import numpy as np
import pytest

from prima_sim.errors import InputError
from prima_sim.exec import wire
from prima_sim.exec.hosts import HostsFile, load_hosts, resolve
from prima_sim.exec.ring import WorkerFailed, WorkerIdle, WorkerLoading, WorkerReady, WorkerRunning
from prima_sim.plan import Plan, make_assignments
from prima_sim.route import Route

FP = "0123456789abcdef"


def make_plan(windows: tuple[int, ...], n_layers: int = 30) -> Plan:
    names = [f"D{i}" for i in range(len(windows))]
    return Plan(model_id="m", n_layers=n_layers, cluster_name="c", k=-(-n_layers // sum(windows)), n_ctx=256,
                devices=make_assignments(names, windows, [0] * len(windows), n_layers), scheduler="manual")  # fmt: skip


def data_msg(n: int = 3, width: int = 8, **kw: object) -> list[object]:
    h = wire.Header(type="data", fp=FP, seq=5, step=2, window=1, n_tokens=n, shape=(n, width), **kw)  # type: ignore[arg-type]
    return wire.encode(
        h, np.arange(10, 10 + n, dtype=np.int32), np.arange(n * width, dtype=np.float32).reshape(n, width)
    )


def test_data_round_trip() -> None:
    frames = [bytes(memoryview(f)) for f in data_msg()]
    h, pos, hid = wire.decode(frames, FP, 8)
    assert (h.type, h.seq, h.step, h.window, h.n_tokens, h.shape, h.dtype) == (
        "data",
        5,
        2,
        1,
        3,
        (3, 8),
        "f32",
    )
    assert pos.tolist() == [10, 11, 12]
    assert hid.shape == (3, 8) and hid[2, 7] == 23.0


def test_a_worker_decodes_and_forwards_memoryviews_without_numpy() -> None:
    """decode_rows(arrays=False) gives memoryviews (a worker imports no numpy); encode takes them back as they are,
    and the frames are the same bytes an array's encoding gives."""
    n, width = 3, 8
    pos, seqs = np.array([7, 8, 4], np.int32), np.array([0, 0, 1], np.int32)
    hid = np.arange(n * width, dtype=np.float32).reshape(n, width)
    h = wire.Header(type="data", fp=FP, seq=5, window=1, n_tokens=n, shape=(n, width), rows=True)
    frames = [bytes(memoryview(f)) for f in wire.encode(h, pos, hid, seqs)]
    hdr, p, q, x = wire.decode_rows(frames, FP, width, arrays=False)
    assert all(isinstance(v, memoryview) for v in (p, q, x))
    assert (p.format, q.format, x.format) == ("i", "i", "f")
    assert (p.tolist(), q.tolist(), x.tolist()) == (pos.tolist(), seqs.tolist(), hid.ravel().tolist())
    again = wire.encode(hdr, p, x, q)
    assert again[1] is x and [bytes(memoryview(f)) for f in again] == frames
    with pytest.raises(wire.WireError, match="positions of sequence 0 are not consecutive"):
        wire.decode_rows([frames[0][:-24] + np.array([7, 9, 4, 0, 0, 1], np.int32).tobytes(), frames[1]], FP, width,
                         arrays=False)  # fmt: skip


def test_control_messages_round_trip() -> None:
    h, pos, hid = wire.decode(wire.encode(wire.Header(type="stop", fp=FP, seq=9)), FP, 8)
    assert h.type == "stop" and pos is None and hid is None
    for state in (WorkerIdle(), WorkerLoading(loaded=1, total=3), WorkerReady(), WorkerRunning(step=4, window=2),
                  WorkerFailed(reason="out of memory")):  # fmt: skip
        st = wire.Status(
            type="status", device="D1", pid=1, fp=FP, state=state, spans=(("compute", 1.0, 2.0, 0, "w0"),)
        )
        back = wire.decode_status(wire.encode_status(st))
        assert back == st and type(back.state) is type(state)


def status_json(state: str) -> bytes:
    return (
        wire.MAGIC
        + b'{"v": %d, "type": "status", "device": "D1", "pid": 1, "fp": "x", "state": ' % wire.WIRE_VERSION
        + state.encode()
        + b"}"
    )


@pytest.mark.parametrize(
    ("state", "reason"),
    [
        (
            '"ready"',
            r"^bad status field state: Input should be .*object",
        ),  # the bare string of wire version 1
        (
            '{"name": "dancing"}',
            r"^bad status field state: Input tag 'dancing' .* expected tags: 'idle', 'loading'",
        ),
        ('{"step": 1}', r"^bad status field state: Unable to extract tag using discriminator 'name'"),
        ('{"name": "running", "step": 1}', r"^bad status field state\.running\.window: Field required"),
        (
            '{"name": "loading", "loaded": -1, "total": 2}',
            r"^bad status field state\.loading\.loaded: .*greater than",
        ),
        ('{"name": "ready", "detail": "x"}', r"^bad status field state\.ready\.detail: Extra inputs"),
    ],
)
def test_malformed_worker_state_is_rejected_naming_the_field(state: str, reason: str) -> None:
    with pytest.raises(wire.WireError, match=reason):
        wire.decode_status(status_json(state))
    assert wire.decode_status(status_json('{"name": "ready"}')).state == WorkerReady()


def test_status_of_another_protocol_version_says_so() -> None:
    old = wire.MAGIC + b'{"v": 1, "type": "status", "device": "D1", "pid": 1, "fp": "x", "state": "ready"}'
    with pytest.raises(
        wire.WireError,
        match=rf"^bad status message: protocol version 1, this side speaks {wire.WIRE_VERSION}$",
    ):
        wire.decode_status(old)
    with pytest.raises(wire.VersionError) as err:  # the head names the device (WorkerError)
        wire.decode_status(old)
    assert (err.value.version, err.value.device) == (1, "D1")


def _hdr(**kw: object) -> bytes:
    """A binary header with some fields replaced (for malformed messages)."""
    f: dict[str, object] = {"magic": wire.MAGIC, "v": wire.WIRE_VERSION, "type": 2, "flags": 0, "dtype": 1,
                            "seq": 1, "step": 0, "window": 0, "n": 1, "width": 8, "t": 0.0, "fp": FP.encode(),
                            "n_origin": 0}  # fmt: skip
    f.update(kw)
    return wire.HEADER.pack(*f.values())


@pytest.mark.parametrize(
    ("frames", "reason"),
    [
        ([], "empty message"),
        ([b"hello"], "not a prima-sim message"),
        ([wire.MAGIC + b"{oops"], "not JSON"),
        (
            [wire.MAGIC + b'{"v": 1, "type": "data"}'],
            rf"protocol version 1, this side speaks {wire.WIRE_VERSION}",
        ),
        (  # a peer of wire version 2 (JSON headers) is told the versions
            [wire.MAGIC + b'{"v": 2, "type": "data", "fp": "x", "seq": 1}'],
            rf"protocol version 2, this side speaks {wire.WIRE_VERSION}$",
        ),
        ([_hdr(v=9)], rf"protocol version 9, this side speaks {wire.WIRE_VERSION}$"),
        ([_hdr()[:20]], "truncated"),
        ([_hdr(type=7)], "bad header field type"),
        ([_hdr(flags=6)], "bad header field flags"),
        ([_hdr(dtype=3)], "bad header field dtype"),
        ([_hdr(n_origin=3) + b"\xff\xfe\xfd"], "bad header field origin: not UTF-8"),
        ([_hdr(type=1) + b"xx"], "'hello' header of"),
        ([wire.MAGIC + b"x" * wire.MAX_HEADER_BYTES], "exceeds"),
    ],
)
def test_malformed_messages_are_rejected_with_a_reason(frames: list[bytes], reason: str) -> None:
    with pytest.raises(wire.WireError, match=reason):
        wire.decode(frames, FP, 8)


def test_fields_that_do_not_fit_the_wire_are_refused_by_the_sender() -> None:
    bad: list[dict[str, object]] = [
        {"seq": -1},
        {"fp": "x" * 17},
        {"fp": ""},
        {"origin": "d" * 256},
        {"fp": "é"},
    ]
    for b in bad:
        h = wire.Header(type="hello", fp=FP, seq=1)._replace(**b)  # type: ignore[arg-type]
        with pytest.raises(ValueError, match=r"does not fit|fingerprint"):
            wire.encode(h)


def test_foreign_and_inconsistent_data_is_rejected() -> None:
    with pytest.raises(wire.WireError, match="for plan"):
        wire.decode(data_msg(), "ffffffffffffffff", 8)
    with pytest.raises(wire.WireError, match=r"expected \[n_tokens >= 1, 16\]"):
        wire.decode(data_msg(), FP, 16)
    frames = [bytes(memoryview(f)) for f in data_msg()]
    with pytest.raises(wire.WireError, match="payload has"):
        wire.decode([frames[0], b"\0" * 12], FP, 8)
    with pytest.raises(wire.WireError, match="expected 2"):
        wire.decode(frames[:1], FP, 8)
    with pytest.raises(wire.WireError, match="positions: header of"):
        wire.decode([frames[0][:-2], frames[1]], FP, 8)
    with pytest.raises(wire.WireError, match="not consecutive"):
        wire.decode([frames[0][:-12] + np.array([1, 5, 6], np.int32).tobytes(), frames[1]], FP, 8)
    with pytest.raises(wire.WireError, match="negative position"):
        wire.decode([frames[0][:-12] + np.array([-3, -2, -1], np.int32).tobytes(), frames[1]], FP, 8)
    one = [bytes(memoryview(f)) for f in data_msg(n=1)]
    with pytest.raises(wire.WireError, match="negative position"):
        wire.decode([one[0][:-4] + np.array([-1], np.int32).tobytes(), one[1]], FP, 8)
    with pytest.raises(wire.WireError, match="expected 1"):
        wire.decode([wire.encode(wire.Header(type="hello", fp=FP, seq=1))[0], b"x"], FP, 8)


def test_hosts_defaults_are_loopback_and_consecutive_ports() -> None:
    ep = resolve(HostsFile(), make_plan((10, 10, 10)))
    assert ep.data == {"D0": ("127.0.0.1", 29500), "D1": ("127.0.0.1", 29501), "D2": ("127.0.0.1", 29502)}
    assert ep.control == ("127.0.0.1", 29503) and ep.url("D1") == "tcp://127.0.0.1:29501"


def test_hosts_file_overrides_and_errors(tmp_path) -> None:
    p = tmp_path / "hosts.toml"
    p.write_text(
        'base_port = 7000\n[devices.D1]\nhost = "10.0.0.2"\n[devices.D2]\nhost = "10.0.0.3"\nport = 9000\n'
    )
    ep = resolve(load_hosts(p), make_plan((10, 10, 10)), str(p))
    assert ep.data["D1"] == ("10.0.0.2", 7001) and ep.data["D2"] == ("10.0.0.3", 9000)
    p.write_text("[devices.D9]\nport = 1\n")
    with pytest.raises(InputError, match=r"field 'devices.D9': is not a device of the plan"):
        resolve(load_hosts(p), make_plan((10, 10, 10)), str(p))
    p.write_text("[devices.D1]\nport = 70000\n")
    with pytest.raises(InputError, match=r"hosts.toml: field 'devices.D1.port'"):
        load_hosts(p)
    p.write_text("[devices.D1]\nportt = 1\n")
    with pytest.raises(InputError, match="not a known field"):
        load_hosts(p)
    p.write_text("[devices.D2]\nport = 29501\n")
    with pytest.raises(InputError, match="already used by D1"):
        resolve(load_hosts(p), make_plan((10, 10, 10)), str(p))


def test_route_follows_the_plan_order() -> None:
    r = Route.of(make_plan((2, 3, 5)))  # rounds: D1 [0,3), D2 [3,8), D0 [8,10), D1 [10,13) ...
    assert r.order[:3] == (("D1", (0, 3)), ("D2", (3, 8)), ("D0", (8, 10)))
    assert r.n_windows == 9 and r.owner(9) == "D0"
    assert r.windows_of("D0") == [2, 5, 8]
    assert r.destinations("D0") == {"D1"} and r.destinations("D2") == {"D0"}
    assert (
        r.next_own_window("D1", 0) == 3
        and r.next_own_window("D1", 6) == 0
        and r.next_own_window("D0", -1) == 2
    )
    assert r.prefetch_window("D1", 0, {0}) == 3 and r.prefetch_window("D1", 6, {0, 3, 6}) == 0


def test_a_device_with_one_window_does_not_prefetch_it_again() -> None:
    r = Route.of(make_plan((4, 3, 3), n_layers=10))  # k = 1: every device has one window
    assert all(len(r.windows_of(d)) == 1 for d in ("D0", "D1", "D2"))
    assert [r.next_own_window(d, r.windows_of(d)[0]) == r.windows_of(d)[0] for d in ("D0", "D1", "D2")] == [
        True
    ] * 3
    assert [r.prefetch_window(d, r.windows_of(d)[0], set(r.windows_of(d))) for d in ("D0", "D1", "D2")] == [
        None
    ] * 3
    assert r.prefetch_window("D0", -1, set()) == r.windows_of("D0")[0], "before its first run (cold) it does"


def test_route_with_head_window_zero_and_partial_round() -> None:
    r = Route.of(make_plan((0, 6, 4)))  # D1 [0,6), D2 [6,10), D1 [10,16), ... D1 [20,26), D2 [26,30)
    assert "D0" not in {d for d, _ in r.order}
    assert r.destinations("D2") == {"D1", "D0"}  # next round's window, and the head after the last window
    r = Route.of(make_plan((4, 3, 5, 2)))  # 14 per round; the 3rd round ends on D1's [28, 30)
    assert r.order[-1] == ("D1", (28, 30)) and r.owner(r.n_windows) == "D0"
    assert "D0" in r.destinations("D1")
    solo = Route.of(make_plan((30,)))
    assert solo.destinations("D0") == set() and solo.owner(0) == "D0"


def test_prefetch_advises_the_tensor_data_of_the_shard(tmp_path, monkeypatch) -> None:
    import os

    from prima_sim.exec.ring import Prefetcher

    f = tmp_path / "w.gguf"
    f.write_bytes(b"\0" * 10000)
    calls: list[tuple[int, int, int]] = []
    monkeypatch.setattr(os, "posix_fadvise", lambda fd, off, n, adv: calls.append((off, n, adv)))
    p = Prefetcher(True)
    p.register(f, 4096)
    p.advise(f)
    p.advise(tmp_path / "unknown.gguf")  # not registered: nothing
    assert calls == [(4096, 10000 - 4096, os.POSIX_FADV_WILLNEED)]
    p.close()
    off = Prefetcher(False)  # --no-prefetch
    off.register(f, 0)
    off.advise(f)
    assert len(calls) == 1


def test_the_simulator_routes_with_the_executors_route() -> None:
    """One routing for both: the simulator's ring answers every routing question with prima_sim.route.Route."""
    import simpy

    from prima_sim.sim.config import SimConfig
    from prima_sim.sim.ring import Ring

    plan = Plan(model_id="m", n_layers=8, cluster_name="c", k=2, n_ctx=64, scheduler="manual",
                devices=make_assignments(["A", "B"], [2, 2], [0, 0], 8))  # fmt: skip
    route = Route.of(plan)
    assert [route.owner(j) for j in range(5)] == ["B", "A", "B", "A", "A"]  # the head ends each round
    assert route.windows_of("B") == [0, 2] and route.destinations("A") == {"B"}
    assert route.next_own_window("B", 0) == 2 and route.next_own_window("B", 2) == 0
    assert route.prefetch_window("A", 1, {1}) == 3
    env = simpy.Environment()
    ring = Ring(env, SimConfig(), None, None, plan)  # type: ignore[arg-type]
    assert ring.route == route
    assert all(ring.owner(j) == route.owner(j) for j in range(route.n_windows + 1))


def test_the_head_names_a_device_of_another_release() -> None:
    """A worker of another wire version stops the head at once, naming the device and both versions."""
    from prima_sim.errors import WorkerError
    from prima_sim.exec.head import Head, _Peer

    head = Head.__new__(Head)  # only what _on_status reads
    head.peers, head.fp, head.closing = {"D1": _Peer()}, FP, False
    old = (
        wire.MAGIC
        + b'{"v": 2, "type": "status", "device": "D1", "pid": 1, "fp": "x", "state": {"name": "ready"}}'
    )
    with pytest.raises(
        WorkerError, match=rf"device D1 speaks wire protocol version 2, this head speaks {wire.WIRE_VERSION}"
    ):
        head._on_status(old)
    head._on_status(old.replace(b'"D1"', b'"D9"'))  # not a device of this ring: stray traffic, ignored
