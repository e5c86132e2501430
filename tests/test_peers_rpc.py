"""llama.cpp's RPC split of a plan (``prima_sim.peers.llamacpp_rpc_commands``): every device gets exactly its
window under llama.cpp's own layer mapping, the command lines say what the benchmark means, llama.cpp's timing
lines parse; and the pieces of ``benchmarks/bench_peers.py`` that do not need root (the star's links, the
listening-socket check)."""

from __future__ import annotations

import importlib.util
import itertools
import math
import os
import shlex
import socket
import sys
from pathlib import Path

import pytest

from prima_sim.devices.catalog import catalog_model
from prima_sim.errors import InputError
from prima_sim.halda.planner import manual_plan
from prima_sim.peers import OUTPUT_ON_HEAD, llamacpp_rpc_commands, llamacpp_rpc_layers, parse_llama_perf
from prima_sim.sim.toy import toy_cluster, toy_device
from prima_sim.workload import Workload

WL = Workload(n_ctx=256, prompt_tokens=13, decode_tokens=4, n_ubatch=64)
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def m8():
    return catalog_model("llama3-8b")


def cluster(n: int):
    return toy_cluster([toy_device(f"D{i}", ram_total_bytes=64 * 2**30) for i in range(n)])


def opt(argv: list[str], flag: str) -> str:
    return argv[argv.index(flag) + 1]


def windows_of_32():
    yield from (
        [16, 8, 8],
        [0, 16, 16],
        [30, 1, 1],
        [1, 1, 30],
        [8, 8, 8, 8],
        [5, 9, 3, 15],
        [31, 1],
        [0, 32],
    )
    for a, b in itertools.product(range(0, 33, 3), range(1, 33, 5)):
        if a + b < 32:
            yield [a, b, 32 - a - b]


@pytest.mark.parametrize("windows", list(windows_of_32()))
def test_llamacpp_gives_every_device_exactly_its_window(m8, windows):
    """Under llama.cpp's mapping (its float32 arithmetic) of the emitted -ngl and -ts, the head's process runs
    its window's worth of first layers and every server a contiguous range of exactly its window, in ring order;
    the output layer (its norm; -ot keeps the matrix on the head) goes to the last server."""
    plan = manual_plan(cluster(len(windows)), m8, WL, windows)
    rc = llamacpp_rpc_commands(plan, "m.gguf", {f"D{i}": f"10.0.0.{i + 1}" for i in range(len(windows))})
    c = rc.client
    ngl = int(opt(c, "-ngl"))
    ts = [int(x) for x in opt(c, "-ts").split(",")] if "-ts" in c else []
    layers = llamacpp_rpc_layers(32, ngl, ts)
    assert len(layers) == 33
    assert layers[: windows[0]] == [-1] * windows[0] and rc.head_layers == (0, windows[0])
    servers = [w for w in windows[1:] if w > 0]
    assert len(rc.servers) == len(servers) and rc.n_gpu_layers == sum(servers)
    expect = [j for j, w in enumerate(servers) for _ in range(w)]
    assert layers[windows[0] : 32] == expect
    if servers:
        assert layers[32] == len(servers) - 1
        assert opt(c, "--rpc") == ",".join(s.endpoint for s in rc.servers)
        assert [s.layers[1] - s.layers[0] for s in rc.servers] == servers
    else:
        assert ngl == 0 and "--rpc" not in c and layers == [-1] * 33


def test_rpc_command_lines(m8):
    plan = manual_plan(cluster(3), m8, WL, [12, 10, 10])
    rc = llamacpp_rpc_commands(plan, "/d/m.gguf", {"D1": "10.9.0.2", "D2": "10.9.0.3"}, port=50100,
                               prompt="Once upon", n_predict=7, threads={"D0": 1, "D1": 2, "D2": 3},
                               binary_dir="/b/bin/", extra=["--temp", "0"])  # fmt: skip
    assert rc.head == "D0" and [s.device for s in rc.servers] == ["D1", "D2"]
    assert rc.servers[0].argv == ["/b/bin/ggml-rpc-server", "-H", "10.9.0.2", "-p", "50100", "-t", "2"]
    assert rc.servers[1].argv[-2:] == ["-t", "3"] and rc.servers[1].layers == (22, 32)
    c = rc.client
    assert c[0] == "/b/bin/llama-completion" and opt(c, "-m") == "/d/m.gguf"
    assert opt(c, "--rpc") == "10.9.0.2:50100,10.9.0.3:50100"
    assert opt(c, "-ngl") == "21" and opt(c, "-ts") == "10,11"
    assert opt(c, "-ot") == OUTPUT_ON_HEAD
    assert opt(c, "-sm") == "layer" and opt(c, "-fit") == "off" and opt(c, "--load-mode") == "mmap"
    assert "--no-repack" in c and "-no-cnv" in c
    assert opt(c, "-c") == str(plan.n_ctx) and opt(c, "-n") == "7" and opt(c, "-p") == "Once upon"
    assert opt(c, "-t") == "1" and c[-2:] == ["--temp", "0"]
    assert shlex.split(rc.to_dict()["client_line"]) == c  # type: ignore[arg-type]


def test_the_output_override_is_anchored():
    """llama.cpp matches -ot patterns with regex_search: an unanchored 'output.weight' would also keep every
    blk.N.attn_output.weight on the head."""
    import re

    pats = [p.split("=")[0] for p in OUTPUT_ON_HEAD.split(",")]
    names = ["output.weight", "token_embd.weight", "blk.3.attn_output.weight", "output_norm.weight"]
    hit = [n for n in names if any(re.search(p, n) for p in pats)]
    assert hit == ["output.weight", "token_embd.weight"]


def test_rpc_refuses_what_the_layer_split_cannot_run(m8):
    k2 = manual_plan(cluster(3), m8, WL, [8, 4, 4])
    assert k2.k == 2
    with pytest.raises(InputError, match="k = 2"):
        llamacpp_rpc_commands(k2, "m.gguf")
    ok = manual_plan(cluster(3), m8, WL, [12, 10, 10])
    with pytest.raises(InputError, match="65535"):
        llamacpp_rpc_commands(ok, "m.gguf", port=70000)


PERF_LOG = """\
llama_perf_sampler_print:    sampling time =       0.41 ms /    20 runs   (    0.02 ms per token, 48661.80 tokens per second)
llama_perf_context_print:        load time =    2237.45 ms
llama_perf_context_print: prompt eval time =     402.17 ms /    13 tokens (   30.94 ms per token,    32.32 tokens per second)
llama_perf_context_print:        eval time =     903.62 ms /     6 runs   (  150.60 ms per token,     6.64 tokens per second)
llama_perf_context_print:       total time =    1320.55 ms /    19 tokens
"""


def test_parse_llama_perf():
    tpot, ttft = parse_llama_perf("noise\n" + PERF_LOG)
    assert tpot == pytest.approx(0.90362 / 6) and ttft == pytest.approx(0.40217)
    t2, f2 = parse_llama_perf(PERF_LOG.replace("/     6 runs", "/     0 runs"))
    assert math.isnan(t2) and f2 == pytest.approx(0.40217)
    assert all(math.isnan(x) for x in parse_llama_perf("llama-completion: error: failed to load model\n"))


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_peers_mod", ROOT / "benchmarks" / "bench_peers.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules["bench_peers_mod"] = mod
    spec.loader.exec_module(mod)
    return mod


def test_star_links_route_server_to_server_hops_through_the_head(bench):
    c = toy_cluster([toy_device(f"D{i}") for i in range(4)], bandwidth_bps=10e6, latency_s=0.002)
    s = bench.star_links(c, ["D0", "D1", "D2", "D3"])
    for a, b in (("D1", "D2"), ("D2", "D3")):
        lk = s.link(a, b)
        assert lk.bandwidth_bps == pytest.approx(5e6) and lk.latency_s == pytest.approx(0.004)
    for a, b in (("D0", "D1"), ("D3", "D0"), ("D1", "D3")):
        assert s.link(a, b) == c.link(a, b)


def test_listening_sees_a_socket_in_this_process(bench):
    with socket.socket() as srv:
        srv.bind(("127.0.0.1", 0))
        port = srv.getsockname()[1]
        assert not bench.listening(os.getpid(), port)
        srv.listen()
        assert bench.listening(os.getpid(), port)


def scenario(memory: str):
    from prima_sim.emulate.scenario import Scenario

    return Scenario.model_validate({
        "name": "t", "model": {"layers": 16, "embd": 2048, "ff": 8192, "heads": 32, "kv_heads": 8, "quant": "Q4_0"},
        "devices": [{"name": f"D{i}", "memory": memory, "threads": 1} for i in range(3)],
        "network": {"bandwidth": "1 Gbit/s"},
    })  # fmt: skip


class _PR:
    def __init__(self, plan):
        self.plan = plan


def test_rpc_prediction_is_the_resident_star_or_infeasible(bench, m8):
    """Windows that fit their servers: a finite prediction, no disk reads on the servers, one more hop than the
    ring (a server-to-server hop through the head); a window larger than its server's limit: no prediction,
    and the row says which server would be killed."""
    import argparse

    c = toy_cluster([toy_device(f"D{i}", ram_total_bytes=64 * 2**30) for i in range(3)], bandwidth_bps=2e6,
                    latency_s=0.001)  # fmt: skip
    wl = WL
    plan = manual_plan(c, m8, wl, [12, 10, 10])
    b = bench.Bench(argparse.Namespace(prima_build=None, rpc_build=None))
    row = bench.Row("x", bench.RPC_SYSTEM, "", [12, 10, 10], 1)
    b.predict_rpc(row, scenario("4 GiB"), _PR(plan), c, m8, wl)
    assert (
        not row.errors and math.isfinite(row.tpot_pred) and row.read_pred < 2**20
    )  # an embedding row at most
    from prima_sim.sim import SimConfig, simulate

    ring = simulate(plan, c, m8, wl, SimConfig(prefetch=False, warm=True))
    hop = 1e-3 + 4 * m8.arch.n_embd / 2e6  # the extra head hop, about
    assert row.tpot_pred == pytest.approx(ring.tpot_s + hop, rel=0.05)
    starved = bench.Row("x", bench.RPC_SYSTEM, "", [12, 10, 10], 1)
    b.predict_rpc(starved, scenario("1 GiB"), _PR(plan), c, m8, wl)
    assert math.isnan(starved.tpot_pred) and starved.predicted_as.startswith("infeasible")
    assert "D1 needs" in starved.predicted_as and "D2 needs" in starved.predicted_as


def test_emit_llamacpp_rpc(capsys, tmp_path):
    """``plan --emit llama.cpp-rpc``: servers first, each with its layers; servers sharing an address take the
    next ports; the client's -ngl/-ts give every device its window; --json carries the same argv."""
    from prima_sim.cli.main import main

    args = ["plan", "--cluster", "paper-d1-d4", "--model", "llama3-8b", "--windows", "8,8,8,8", "--cpu-only",
            "--gguf", "l8.gguf", "--emit", "llama.cpp-rpc", "--rpc-port", "50100"]  # fmt: skip
    assert main(args) == 0
    text = capsys.readouterr().out
    lines = [ln for ln in text.splitlines() if ln and not ln.startswith("#")]
    assert [shlex.split(ln)[0] for ln in lines] == ["ggml-rpc-server"] * 3 + ["llama-completion"]
    assert [opt(shlex.split(ln), "-p") for ln in lines[:3]] == ["50100", "50101", "50102"]
    client = shlex.split(lines[3])
    assert opt(client, "--rpc") == "127.0.0.1:50100,127.0.0.1:50101,127.0.0.1:50102"
    layers = llamacpp_rpc_layers(
        32, int(opt(client, "-ngl")), [int(x) for x in opt(client, "-ts").split(",")]
    )
    assert layers[:32] == [-1] * 8 + [0] * 8 + [1] * 8 + [2] * 8
    hosts = tmp_path / "hosts.toml"
    hosts.write_text(
        '[devices.D1]\nhost = "10.0.0.2"\n[devices.D2]\nhost = "10.0.0.3"\n[devices.D4]\nhost = "10.0.0.4"\n'
    )
    assert main([*args[:-2], "--hosts", str(hosts), "--json"]) == 0
    obj = __import__("json").loads(capsys.readouterr().out)
    assert obj["emit"] == "llama.cpp-rpc"
    assert [s["endpoint"] for s in obj["servers"]] == ["10.0.0.2:50052", "10.0.0.3:50052", "10.0.0.4:50052"]
    assert shlex.split(obj["client_line"]) == obj["client"]
    k2 = ["plan", "--cluster", "paper-d1-d4", "--model", "llama3-8b", "--windows", "4,4,4,4", "--cpu-only",
          "--emit", "llama.cpp-rpc"]  # fmt: skip
    assert main(k2) == 2 and "k = 2" in capsys.readouterr().err
    assert main(["plan", "--cluster", "paper-d1-d4", "--model", "llama3-8b", "--rpc-port", "5"]) == 2
    assert "--rpc-port" in capsys.readouterr().err
