"""Predicting and driving prima.cpp: the simulator's model of prima.cpp's prefetch (one WILLNEED per window,
capped by Linux; ``--force``), and ``plan --emit prima.cpp`` (its command lines, checked against the plan)."""

from __future__ import annotations

import json
import shlex

import pytest

from prima_sim.cli.main import main
from prima_sim.devices.catalog import catalog_model
from prima_sim.errors import InputError
from prima_sim.halda.planner import manual_plan
from prima_sim.peers import primacpp_commands, primacpp_layers
from prima_sim.plan import Plan
from prima_sim.sim import SimConfig, simulate
from prima_sim.sim.config import DEFAULT_WILLNEED_CAP_BYTES
from tests.test_sim_mechanisms import WL, per_token, prefetch_toy

MiB = 2**20
CAP = DEFAULT_WILLNEED_CAP_BYTES


@pytest.fixture(scope="module")
def m8():
    return catalog_model("llama3-8b")


def prima(cap: int = CAP, force: bool = False) -> SimConfig:
    return SimConfig(page_cache="lru", prefetch=True, prefetch_own_window=True, willneed_cap_bytes=cap,
                     force_touch=force, stream=False)  # fmt: skip


# --- the capped advice --------------------------------------------------------------------------------------------
def test_one_capped_willneed_hides_nothing_where_advice_in_pieces_hides_the_window(m8):
    """k = 2, B's windows of 3 layers fit beside each other: advised in pieces (this project's executor), the
    next window is read while H computes and B never waits; one WILLNEED per window (prima.cpp --prefetch on
    current Linux) reads only the cap from each window's start, so B faults its windows in as without prefetch."""
    c = prefetch_toy(m8, [13, 3])
    plan = manual_plan(c, m8, WL, [13, 3], stream=False)
    assert plan.k == 2
    off = simulate(plan, c, m8, WL, SimConfig(page_cache="lru", prefetch=False))
    pieces = simulate(plan, c, m8, WL, SimConfig(page_cache="lru", prefetch=True))
    capped = simulate(plan, c, m8, WL, prima())
    assert per_token(pieces, "B", "disk_wait_s") < 0.05 * per_token(off, "B", "disk_wait_s")
    assert per_token(capped, "B", "disk_wait_s") == pytest.approx(
        per_token(off, "B", "disk_wait_s"), rel=0.02
    )
    assert capped.tpot_s == pytest.approx(off.tpot_s, rel=0.02) and capped.tpot_s > 1.15 * pieces.tpot_s
    # what the advice itself read: at most the cap per advice (two windows per token, one advice each)
    steps = WL.decode_tokens + 1
    advised = capped.device_stats["B"]["disk_prefetch_bytes"]
    assert 0 < advised <= 2 * steps * CAP + 1
    assert per_token(capped, "B", "disk_read_bytes") == pytest.approx(
        per_token(off, "B", "disk_read_bytes"), rel=0.01
    )


def test_an_uncapped_prima_advice_is_the_old_model_and_the_cap_ends_the_conflict(m8):
    """k = 1, window larger than the cache: prima.cpp advises its only window again after running it. Uncapped
    (``willneed_cap_bytes`` = 0: the earlier model) that reads every byte twice (the prefetch-release conflict);
    with the kernel's cap the advice reads one cap's worth and B pages as without prefetch."""
    c = prefetch_toy(m8, [26, 6])
    plan = manual_plan(c, m8, WL, [26, 6], stream=False)
    window = sum(m8.layer_bytes[0:6])
    off = simulate(plan, c, m8, WL, SimConfig(page_cache="lru", prefetch=False))
    uncapped = simulate(plan, c, m8, WL, prima(cap=0))
    capped = simulate(plan, c, m8, WL, prima())
    assert per_token(uncapped, "B", "disk_read_bytes") == pytest.approx(2 * window, rel=0.01)
    assert per_token(capped, "B", "disk_read_bytes") == pytest.approx(window + CAP, rel=0.01)
    assert capped.tpot_s == pytest.approx(off.tpot_s, rel=0.02)


def test_a_cap_larger_than_a_window_is_no_cap(m8):
    c = prefetch_toy(m8, [13, 3])
    plan = manual_plan(c, m8, WL, [13, 3], stream=False)
    big = simulate(plan, c, m8, WL, prima(cap=64 * 1024 * MiB))
    pieces = simulate(plan, c, m8, WL, SimConfig(page_cache="lru", prefetch=True, prefetch_own_window=True))
    assert big.tpot_s == pytest.approx(pieces.tpot_s, rel=1e-9)


# --- --force ----------------------------------------------------------------------------------------------------
def test_force_reads_the_next_window_in_the_devices_own_thread(m8):
    """prima.cpp --force: after the (capped) advice B's thread touches every page of its next window, so the
    window is read at once, before B can take its next input, and its compute then finds it resident. With H
    computing longer than B's read, that read is hidden: TPOT as with advice in pieces, far below no prefetch."""
    c = prefetch_toy(m8, [13, 3])
    plan = manual_plan(c, m8, WL, [13, 3], stream=False)
    off = simulate(plan, c, m8, WL, SimConfig(page_cache="lru", prefetch=False))
    pieces = simulate(plan, c, m8, WL, SimConfig(page_cache="lru", prefetch=True))
    force = simulate(plan, c, m8, WL, prima(force=True))
    forced = [s for s in force.spans if s.device == "B" and s.label.startswith("force")]
    assert forced and all(s.kind.value == "disk_wait" for s in forced)
    compute_waits = [s for s in force.spans if s.device == "B" and s.kind.value == "disk_wait"
                     and not s.label.startswith("force") and s.token > 0]  # fmt: skip
    assert sum(s.end - s.start for s in compute_waits) < 1e-3, "the windows are resident when B's turn comes"
    assert force.tpot_s == pytest.approx(pieces.tpot_s, rel=0.05) and force.tpot_s < 0.9 * off.tpot_s
    assert per_token(force, "B", "disk_read_bytes") == pytest.approx(
        per_token(off, "B", "disk_read_bytes"), rel=0.02
    )


def test_force_with_a_window_larger_than_the_cache_reads_it_twice(m8):
    """k = 1 and a window larger than the cache: --force re-reads the window B has just run (its evicted
    start), which evicts its end, and compute faults it all in again: twice the reads, slower than no prefetch."""
    c = prefetch_toy(m8, [26, 6])
    plan = manual_plan(c, m8, WL, [26, 6], stream=False)
    off = simulate(plan, c, m8, WL, SimConfig(page_cache="lru", prefetch=False))
    force = simulate(plan, c, m8, WL, prima(force=True))
    window = sum(m8.layer_bytes[0:6])
    assert per_token(force, "B", "disk_read_bytes") == pytest.approx(2 * window, rel=0.02)
    assert force.tpot_s >= 0.99 * off.tpot_s, "no gain"


# --- the simulate flags -------------------------------------------------------------------------------------------
SIM = ["simulate", "--cluster", "prefetch-4x8g", "--model", "llama3-70b", "--windows", "10,10,10,10", "--tokens", "3",
       "--prompt-tokens", "4", "--json"]  # fmt: skip


def sim_json(capsys, *extra):
    assert main([*SIM, *extra]) == 0
    return json.loads(capsys.readouterr().out)


def test_simulate_flags_set_the_config(capsys):
    plain = sim_json(capsys)["config"]
    assert plain["willneed_cap_bytes"] == 0 and not plain["force_touch"] and not plain["prefetch_own_window"]
    pp = sim_json(capsys, "--prima-prefetch")["config"]
    assert pp["willneed_cap_bytes"] == CAP and pp["prefetch_own_window"] and not pp["force_touch"]
    pf = sim_json(capsys, "--prima-force", "--willneed-cap-kib", "256")["config"]
    assert pf["willneed_cap_bytes"] == 256 * 1024 and pf["force_touch"] and pf["prefetch_own_window"]
    assert (
        sim_json(capsys, "--prima-prefetch", "--willneed-cap-kib", "0")["config"]["willneed_cap_bytes"] == 0
    )


def test_prima_prefetch_on_a_paging_cluster_predicts_no_gain_from_prefetch(capsys):
    """prefetch-4x8g: 70B on four 8 GiB devices at k = 2, the paper's prefetch study. This project's advice in
    pieces hides part of the loads; prima.cpp's capped advice does not."""
    pieces = sim_json(capsys)["tpot_s"]
    none = sim_json(capsys, "--no-prefetch")["tpot_s"]
    capped = sim_json(capsys, "--prima-prefetch")["tpot_s"]
    assert pieces < 0.9 * none
    assert capped == pytest.approx(none, rel=0.05)


@pytest.mark.parametrize(("argv", "flag"), [
    (["--willneed-cap-kib", "128"], "--willneed-cap-kib"),
    (["--prima-force", "--no-prefetch"], "--no-prefetch"),
    (["--prima-prefetch", "--willneed-cap-kib", "-1"], "--willneed-cap-kib"),
])  # fmt: skip
def test_simulate_flag_errors_are_one_line(capsys, argv, flag):
    assert main([*SIM, *argv]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and flag in err[0]


# --- plan --emit prima.cpp ----------------------------------------------------------------------------------------
def parse(argv: list[str]) -> dict[str, str | bool]:
    """A prima.cpp argv as {flag: value} (flags without a value: True)."""
    out: dict[str, str | bool] = {}
    i = 1
    while i < len(argv):
        a = argv[i]
        if i + 1 < len(argv) and not argv[i + 1].startswith("--") and a not in ("--prefetch", "--force"):
            out[a] = argv[i + 1]
            i += 2
        else:
            out[a] = True
            i += 1
    return out


def check_against_plan(plan: Plan, devices: list[dict], hosts: dict[str, str]) -> None:
    """Every emitted command means the plan: rank order, ring addresses, windows, GPU layers, and the layers
    prima.cpp's own mapping gives each rank equal the plan's."""
    m = len(plan.devices)
    assert [d["device"] for d in devices] == [a.name for a in plan.devices]
    head = parse(devices[0]["llama_cli"])
    windows = [int(x) for x in str(head["-lw"]).split(",")]
    assert windows == list(plan.windows)
    assert head["-c"] == str(plan.n_ctx)
    mapping = primacpp_layers(windows, sum(b - a for d in plan.devices for a, b in d.layers))
    for r, (a, d) in enumerate(zip(plan.devices, devices, strict=True)):
        args = parse(d["llama_cli"])
        assert d["llama_cli"][0].endswith("llama-cli")
        assert args["--world"] == str(m) and args["--rank"] == str(r)
        assert args["--master"] == hosts.get(plan.devices[0].name, "127.0.0.1")
        assert args["--next"] == hosts.get(plan.devices[(r + 1) % m].name, "127.0.0.1")
        assert args["-ngl"] == str(a.gpu_layers)
        assert ("-lw" in args) == (r == 0) and ("-p" in args) == (r == 0)
        assert args["--prefetch"] is True
        assert mapping[r] == [i for lo, hi in a.layers for i in range(lo, hi)]
        assert shlex.split(d["llama_cli_line"]) == d["llama_cli"]
    server = parse(devices[0]["llama_server"])
    assert devices[0]["llama_server"][0].endswith("llama-server") and server["-lw"] == head["-lw"]
    assert all(not d["llama_server"] for d in devices[1:])


def test_primacpp_mapping_matches_the_reference_example():
    """prima.cpp's README/code: L = 32, -lw 16,16 -> rank 1 runs 0-15 and rank 0 runs 16-31."""
    assert primacpp_layers([16, 16], 32) == [list(range(16, 32)), list(range(16))]
    assert primacpp_layers([1, 2, 3], 12) == [[5, 11], [0, 1, 6, 7], [2, 3, 4, 8, 9, 10]]


@pytest.mark.parametrize("k", [1, 2, 4])
def test_emit_for_halda_plans_matches_the_plan(tmp_path, capsys, k):
    hosts = tmp_path / "hosts.toml"
    hosts.write_text('[devices.D1]\nhost = "192.168.1.2"\n[devices.D3]\nhost = "192.168.1.4"\n')
    plan_file = tmp_path / "plan.json"
    assert main(["plan", "--cluster", "paper-d1-d4", "--model", "llama3-8b", "--k", str(k), "--no-drop",
                 "--out", str(plan_file), "--emit", "prima.cpp", "--hosts", str(hosts), "--gguf", "/m/l8b.gguf",
                 "--json"]) == 0  # fmt: skip
    obj = json.loads(capsys.readouterr().out)
    plan = Plan.load(plan_file)
    assert plan.k == k
    check_against_plan(plan, obj["devices"], {"D1": "192.168.1.2", "D3": "192.168.1.4"})
    assert all(parse(d["llama_cli"])["-m"] == "/m/l8b.gguf" for d in obj["devices"])


def test_emit_text_is_shell_ready(capsys):
    assert main(["plan", "--cluster", "paper-d1-d4", "--model", "llama3-8b", "--windows", "8,8,8,8", "--gpu-layers",
                 "0,4,4,0", "--emit", "prima.cpp", "--data-port", "9100", "--signal-port", "9200"]) == 0  # fmt: skip
    text = capsys.readouterr().out
    lines = [ln for ln in text.splitlines() if ln and not ln.startswith("#")]
    clis = [shlex.split(ln) for ln in lines if "llama-cli" in ln.split()[0]]
    assert len(clis) == 4 and any("llama-server" in ln.split()[0] for ln in lines)
    by_rank = {int(parse(c)["--rank"]): parse(c) for c in clis}
    assert by_rank[0]["-lw"] == "8,8,8,8" and [by_rank[r]["-ngl"] for r in range(4)] == ["0", "4", "4", "0"]
    assert all(a["--data-port"] == "9100" and a["--signal-port"] == "9200" for a in by_rank.values())
    assert "replace llama3-8b.gguf" in text  # a catalog id is not a file


def test_emit_refuses_what_primacpp_cannot_run():
    c = prefetch_toy(catalog_model("llama3-8b"), [16, 16])
    plan = manual_plan(c, catalog_model("llama3-8b"), WL, [0, 32])
    with pytest.raises(InputError, match="positive windows"):
        primacpp_commands(plan, "m.gguf")
    ok = manual_plan(c, catalog_model("llama3-8b"), WL, [16, 16])
    with pytest.raises(InputError, match="overlap"):
        primacpp_commands(ok, "m.gguf", data_port=9000, signal_port=9001)
    with pytest.raises(InputError, match="ring port"):
        primacpp_commands(ok, "m.gguf", server_port=9001)
    with pytest.raises(InputError, match="not a device"):
        primacpp_commands(ok, "m.gguf", {"nope": "10.0.0.1"})


def test_emit_plans_for_the_peers_executor(tmp_path, capsys):
    """A plan for prima.cpp or llama.cpp's RPC split streams nothing (drop-behind is this project's executor), and
    prima.cpp's prefetch counts only with --force (its WILLNEED is capped by Linux): Llama 3 70B on D1-D4, where
    Halda's own plan streams the head's last layers."""
    base = ["plan", "--cluster", "paper-d1-d4", "--model", "llama3-70b", "--json"]
    own, peer, forced, same = (tmp_path / f"{n}.json" for n in ("own", "peer", "forced", "same"))
    assert main([*base, "--out", str(own)]) == 0
    assert main([*base, "--out", str(peer), "--emit", "prima.cpp", "--gguf", "m.gguf"]) == 0
    assert main([*base, "--out", str(forced), "--emit", "prima.cpp", "--force", "--gguf", "m.gguf"]) == 0
    assert main([*base, "--out", str(same), "--no-stream", "--no-prefetch"]) == 0
    capsys.readouterr()
    assert any(d.streamed_layers for d in Plan.load(own).devices)
    for p in (peer, forced):
        assert not any(d.streamed_layers for d in Plan.load(p).devices)
    assert Plan.load(peer).windows == Plan.load(same).windows
    assert Plan.load(peer).prediction == Plan.load(same).prediction
    rpc = tmp_path / "rpc.json"
    rpc_args = ["--cpu-only", "--k", "1", "--out", str(rpc), "--emit", "llama.cpp-rpc", "--gguf", "m.gguf"]
    assert main([*base, *rpc_args]) == 0
    assert json.loads(capsys.readouterr().out)["plan"]
    assert not any(d.streamed_layers for d in Plan.load(rpc).devices)
    assert main([*base, "--emit", "prima.cpp", "--sim-k"]) == 2
    assert "--sim-k" in capsys.readouterr().err


def test_emit_flags_need_emit(capsys):
    assert main(["plan", "--cluster", "paper-d1-d4", "--model", "llama3-8b", "--gguf", "x.gguf"]) == 2
    assert "--gguf" in capsys.readouterr().err


# --- the stock llama.cpp baseline ---------------------------------------------------------------------------------
def test_stock_llamacpp_over_the_whole_gguf_matches_the_ring(smollm2, tmp_path, capsys):
    """The baseline of bench_peers.py: one stock llama.cpp process over the unsplit GGUF generates, greedily,
    exactly the tokens of this project's ring over shards of the same file (and times each step)."""
    from prima_sim.exec.runner import RunOptions, run_ring
    from prima_sim.exec.stock import main as stock_main
    from prima_sim.exec.stock import run_stock
    from tests.test_exec_ring import PROMPT, make_plan

    stock = run_stock(smollm2, PROMPT, 6, n_ctx=256, n_threads=1)
    assert len(stock.token_ids) == 6 and len(stock.step_s) == 5
    assert stock.ttft_s > 0 and all(s > 0 for s in stock.step_s) and stock.tpot_s > 0
    plan = make_plan(30, (12, 18), "smollm2")
    o = RunOptions(
        n_predict=6, ignore_eos=True, timeout_s=15.0, startup_timeout_s=120.0, threads={"D0": 1, "D1": 1}
    )
    report = run_ring(plan, smollm2, stock.prompt_ids, o, local=True, shard_dir=tmp_path / "shards")
    assert report.last.token_ids == stock.token_ids
    assert (
        stock_main(["--model", str(smollm2), "--prompt", PROMPT, "-n", "3", "--threads", "1", "--json"]) == 0
    )
    obj = json.loads(capsys.readouterr().out)
    assert obj["token_ids"] == stock.token_ids[:3] and len(obj["step_s"]) == 2
    assert stock_main(["--model", str(tmp_path / "missing.gguf"), "-n", "3"]) == 2
    assert len(capsys.readouterr().err.strip().splitlines()) == 1
