"""Real rings of llama.cpp workers over ZeroMQ on loopback, checked against single-process llama.cpp.

Every configuration must give the same logits as the whole model in one llama.cpp context (max |diff| <=
1e-3, prefill and every decode step) and the same 32 greedy tokens.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("llama_cpp")
pytest.importorskip("zmq")

from prima_sim.exec.head import SamplingParams
from prima_sim.exec.llamacpp import Reference, Sampler
from prima_sim.exec.runner import RunOptions, run_ring
from prima_sim.metrics import TOKEN_COLUMNS, read_token_csv, spans_from_chrome_trace
from prima_sim.plan import Plan, make_assignments

pytestmark = pytest.mark.real

N_CTX = 256
N_NEW = 32
TOL = 1e-3
PROMPT = "The three primary colours are red, yellow and"


def make_plan(n_layers: int, windows: tuple[int, ...], model_id: str = "m") -> Plan:
    names = [f"D{i}" for i in range(len(windows))]
    k = -(-n_layers // sum(windows))
    devs = make_assignments(names, windows, [0] * len(windows), n_layers)
    return Plan(model_id=model_id, n_layers=n_layers, cluster_name="loopback", k=k, n_ctx=N_CTX, devices=devs,
                scheduler="manual")  # fmt: skip


def reference_run(
    model: Path, prompt_tokens: list[int], n_new: int, n_batch: int = N_CTX
) -> tuple[list[int], list[np.ndarray]]:
    """Greedy continuation and per-step logits of the whole model in one process."""
    with Reference(model, N_CTX, n_batch, 1) as ref:
        logits = [ref.logits(prompt_tokens, 0)]
        toks: list[int] = []
        pos = len(prompt_tokens)
        while True:
            toks.append(int(np.argmax(logits[-1])))
            if len(toks) == n_new:
                break
            logits.append(ref.logits([toks[-1]], pos))
            pos += 1
    return toks, logits


def opts(**kw: object) -> RunOptions:
    base = {
        "n_predict": N_NEW,
        "ignore_eos": True,
        "keep_logits": True,
        "timeout_s": 15.0,
        "startup_timeout_s": 120.0,
    }
    base.update(kw)
    o = RunOptions(**base)  # type: ignore[arg-type]
    return o


@pytest.fixture(scope="module")
def smol_prompt(smollm2: Path) -> list[int]:
    with Reference(smollm2, N_CTX, 64, 1) as ref:
        return ref.model.tokenize(PROMPT)


@pytest.fixture(scope="module")
def smol_ref(smollm2: Path, smol_prompt: list[int]) -> tuple[list[int], list[np.ndarray]]:
    return reference_run(smollm2, smol_prompt, N_NEW)


def _check(report, ref_toks: list[int], ref_logits: list[np.ndarray]) -> None:
    g = report.last
    assert g.token_ids == ref_toks
    assert len(g.logits) == len(ref_logits)
    worst = max(float(np.max(np.abs(a - b))) for a, b in zip(g.logits, ref_logits, strict=True))
    assert worst <= TOL, f"max |logit difference| {worst}"


@pytest.mark.parametrize(
    "windows",
    [
        (30,),  # one device: the head alone, k = 1
        (12, 18),  # 2 devices, uneven, k = 1
        (4, 7, 4),  # 3 devices, k = 2
        (3, 2, 4, 1),  # 4 devices, k = 3
        (4, 3, 5, 2),  # 4 devices, k = 3 with a partial last round: the last layer is not on the head
        (2, 3, 3, 2, 5),  # the head and 4 workers, k = 2
        (0, 6, 4),  # head window 0 (manual plan): the head runs only embedding and output head, k = 3
    ],
    ids=lambda w: "w" + "-".join(map(str, w)),
)
def test_smollm2_ring_matches_single_process(smollm2, smol_prompt, smol_ref, windows, tmp_path):
    plan = make_plan(30, windows, "smollm2")
    report = run_ring(plan, smollm2, smol_prompt, opts(threads={d.name: 1 for d in plan.devices}), local=True,
                      shard_dir=tmp_path / "shards")  # fmt: skip
    _check(report, *smol_ref)
    assert report.summary["n_decode"] == N_NEW - 1


def test_gemma3_ring_matches_single_process(gemma3, tmp_path):
    with Reference(gemma3, N_CTX, 64, 1) as ref:
        prompt = ref.model.tokenize(PROMPT)
    ref_toks, ref_logits = reference_run(gemma3, prompt, N_NEW)
    for windows in ((3, 4, 2), (0, 5, 4)):  # layer 6 and 12 (global attention) fall mid-window
        plan = make_plan(18, windows, "gemma3")
        report = run_ring(plan, gemma3, prompt, opts(threads={d.name: 1 for d in plan.devices}), local=True,
                          shard_dir=tmp_path / "-".join(map(str, windows)))  # fmt: skip
        _check(report, ref_toks, ref_logits)


def test_batched_prefill_and_kv_cleared_between_prompts(smollm2, tmp_path):
    """A prompt longer than the batch is prefilled in several messages; a second prompt starts clean."""
    with Reference(smollm2, N_CTX, 8, 1) as ref:
        long_prompt = ref.model.tokenize(
            "Once upon a time, in a small village by the sea, there lived an old fisherman"
        )
    assert len(long_prompt) > 8
    ref_toks, ref_logits = reference_run(smollm2, long_prompt, 8, n_batch=8)
    short = long_prompt[:5]
    short_toks, _ = reference_run(smollm2, short, 8, n_batch=8)
    plan = make_plan(30, (10, 12, 8))
    o = opts(
        n_predict=8, n_batch=8, threads={d.name: 1 for d in plan.devices}, extra_prompts=(short, long_prompt)
    )
    report = run_ring(plan, smollm2, long_prompt, o, local=True, shard_dir=tmp_path / "s")
    first, second, third = report.generations
    assert first.token_ids == ref_toks
    assert max(float(np.max(np.abs(a - b))) for a, b in zip(first.logits, ref_logits, strict=True)) <= TOL
    assert second.token_ids == short_toks
    assert third.token_ids == ref_toks  # nothing of the first two prompts is left in any KV cache


def test_seeded_sampling_matches_single_process(smollm2, smol_prompt, tmp_path):
    sp = SamplingParams(temperature=0.9, top_k=20, top_p=0.9, seed=1234)
    with Reference(smollm2, N_CTX, 64, 1) as ref:
        sampler = Sampler(sp.temperature, sp.top_k, sp.top_p, sp.seed)
        ref.logits(smol_prompt, 0)
        expected, pos = [], len(smol_prompt)
        for _ in range(16):
            expected.append(sampler.sample(ref.window))
            ref.logits([expected[-1]], pos)
            pos += 1
        sampler.close()
    plan = make_plan(30, (10, 20))
    report = run_ring(plan, smollm2, smol_prompt, opts(n_predict=16, sampling=sp, keep_logits=False,
                      threads={d.name: 1 for d in plan.devices}), local=True, shard_dir=tmp_path / "s")  # fmt: skip
    assert report.last.token_ids == expected
    assert report.last.token_ids != [int(t) for t in reference_run(smollm2, smol_prompt, 16)[0]]


def test_cli_run_local_json_and_measurements(smollm2, tmp_path, capsys):
    from prima_sim.cli.main import main

    plan = make_plan(30, (5, 5, 5))  # k = 2: every device has two windows and prefetches the other one
    plan.save(tmp_path / "plan.json")
    out = tmp_path / "out"
    rc = main(["run", "--local", "--plan", str(tmp_path / "plan.json"), "--model", str(smollm2), "--prompt", PROMPT,
               "-n", "8", "--ignore-eos", "--threads", "1", "--json", "--out", str(out),
               "--shards", str(tmp_path / "shards")])  # fmt: skip
    assert rc == 0
    res = json.loads(capsys.readouterr().out)
    for key in ("text", "token_ids", "ttft_s", "tpot_s", "per_device"):
        assert key in res
    assert len(res["token_ids"]) == 8 and res["text"]
    assert set(res["per_device"]) == {"D0", "D1", "D2"}
    assert res["ttft_s"] > 0 and res["tpot_s"] > 0
    rows = read_token_csv(out / "tokens.csv")
    assert (out / "tokens.csv").read_text().splitlines()[0] == ",".join(TOKEN_COLUMNS)
    assert {r.device for r in rows} == {"D0", "D1", "D2"} and len(rows) == 3 * 8
    for r in rows:  # every device computed in every step, the workers waited for their input and sent it on
        assert r.compute_s > 0
        if r.device != "D0":
            assert r.send_s > 0 and r.recv_wait_s >= 0
    kinds = {(s.device, s.kind.value) for s in spans_from_chrome_trace(out / "trace.json")}
    for dev in ("D1", "D2"):
        assert {(dev, "compute"), (dev, "send"), (dev, "recv_wait"), (dev, "prefetch")} <= kinds
    assert ("D0", "head") in kinds and ("D0", "prefetch") in kinds
    summary = json.loads((out / "summary.json").read_text())
    assert summary["token_ids"] == res["token_ids"]


def test_cli_run_local_adds_the_emulated_link_latency(smollm2, tmp_path, capsys):
    """--link-latency reaches the head and (as a worker flag) every local worker: each hold shows in TPOT."""
    from prima_sim.cli.main import main

    make_plan(30, (10, 10, 10)).save(tmp_path / "plan.json")
    table = {"D1": {"D0": 0.05}, "D0": {"D2": 0.05}}  # D0 -> D1 held by D1, D2 -> D0 held by the head
    rc = main(["run", "--local", "--plan", str(tmp_path / "plan.json"), "--model", str(smollm2), "--prompt", PROMPT,
               "-n", "4", "--ignore-eos", "--threads", "1", "--json", "--shards", str(tmp_path / "shards"),
               "--link-latency", json.dumps(table)])  # fmt: skip
    assert rc == 0
    res = json.loads(capsys.readouterr().out)
    assert res["tpot_s"] >= 0.1 and res["ttft_s"] >= 0.1
    assert main(["run", "--local", "--plan", str(tmp_path / "plan.json"), "--prompt", PROMPT,
                 "--link-latency", "[1]"]) != 0  # fmt: skip
    assert "--link-latency: must be a JSON object" in capsys.readouterr().err


def test_cli_run_real_with_workers_started_by_hand(smollm2, smol_prompt, smol_ref, tmp_path, capsys):
    """`prima-sim worker` on each device (here: this host), `prima-sim run --real --hosts` on the head."""
    import os
    import subprocess
    import sys

    from prima_sim.cli.main import main
    from prima_sim.exec.hosts import free_base_port

    plan = make_plan(30, (9, 11, 10))
    plan.save(tmp_path / "plan.json")
    assert main(["shard", "--plan", str(tmp_path / "plan.json"), "--model", str(smollm2), "--out",
                 str(tmp_path / "shards"), "--quiet"]) == 0  # fmt: skip
    capsys.readouterr()
    base = free_base_port(4)
    (tmp_path / "hosts.toml").write_text(
        f'base_port = {base}\n[devices.D2]\nhost = "127.0.0.1"\nport = {base + 2}\n'
    )
    root = str(Path(__file__).resolve().parents[1])
    env = dict(os.environ, PYTHONPATH=root + os.pathsep + os.environ.get("PYTHONPATH", ""))
    workers = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "prima_sim.cli.main",
                "worker",
                "--hosts",
                str(tmp_path / "hosts.toml"),
                "--device",
                d,
                "--shards",
                str(tmp_path / "shards"),
                "--threads",
                "1",
            ],
            env=env,
            stderr=subprocess.DEVNULL,
        )
        for d in ("D1", "D2")
    ]
    try:
        rc = main(["run", "--real", "--plan", str(tmp_path / "plan.json"), "--hosts", str(tmp_path / "hosts.toml"),
                   "--shards", str(tmp_path / "shards"), "--prompt", PROMPT, "-n", "32", "--ignore-eos", "--threads",
                   "1", "--json"])  # fmt: skip
        assert rc == 0
        assert json.loads(capsys.readouterr().out)["token_ids"] == smol_ref[0]
        assert [w.wait(timeout=15) for w in workers] == [0, 0]  # clean shutdown: both exit on the head's stop
    finally:
        for w in workers:
            w.kill()


@pytest.mark.parametrize(
    "windows,streamed", [((12, 18), (5, 18)), ((30,), (29,))], ids=["ring", "one-device"]
)
def test_streamed_layers_give_the_same_logits(smollm2, smol_prompt, smol_ref, windows, streamed, tmp_path):
    """Drop-behind streaming (exec/stream.py) splits each window's graph at its streamed layers and releases
    their pages in between: the logits and greedy tokens stay those of one process."""
    plan = make_plan(30, windows, "smollm2")
    devices = tuple(
        a.model_copy(update={"streamed_layers": s}) for a, s in zip(plan.devices, streamed, strict=True)
    )
    plan = plan.model_copy(update={"devices": devices})
    report = run_ring(plan, smollm2, smol_prompt, opts(threads={d.name: 1 for d in plan.devices}), local=True,
                      shard_dir=tmp_path / "shards")  # fmt: skip
    _check(report, *smol_ref)
