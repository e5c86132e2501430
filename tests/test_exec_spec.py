"""Speculative decoding on a real ring (SmolLM2-135M, loopback): a draft on the head proposes, the ring verifies.

The output must be the target's greedy output, token for token, whatever the draft proposes. The logits are not
compared: a verification pass computes its rows in one multi-row batch, and llama.cpp's batched kernels round
differently from single-token decoding from some KV length on (in one process as in the ring; docs/exec.md).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

pytest.importorskip("llama_cpp")
pytest.importorskip("zmq")

from prima_sim.errors import InputError
from prima_sim.exec import spec
from prima_sim.exec.llamacpp import Reference
from prima_sim.exec.runner import run_ring
from tests.test_exec_ring import N_CTX, N_NEW, PROMPT, make_plan, opts, reference_run

pytestmark = pytest.mark.real


@pytest.fixture(scope="module")
def smol_prompt(smollm2: Path) -> list[int]:
    with Reference(smollm2, N_CTX, 64, 1) as ref:
        return ref.model.tokenize(PROMPT)


@pytest.fixture(scope="module")
def smol_ref(smollm2: Path, smol_prompt: list[int]) -> tuple[list[int], list[np.ndarray]]:
    """Plain greedy decoding of the whole model in one process, one token per step."""
    return reference_run(smollm2, smol_prompt, N_NEW)


@pytest.mark.parametrize("windows", [(4, 7, 4), (0, 16, 14)], ids=lambda w: "w" + "-".join(map(str, w)))
def test_same_model_draft_gives_the_plain_greedy_output(smollm2, smol_prompt, smol_ref, windows, tmp_path):
    """Draft = the target itself: every draft is accepted (the upper bound) and the tokens are the plain ones."""
    plan = make_plan(30, windows, "smollm2")
    o = opts(threads={d.name: 1 for d in plan.devices}, keep_logits=False, draft=smollm2, draft_max=4)
    report = run_ring(plan, smollm2, smol_prompt, o, local=True, shard_dir=tmp_path / "s")
    g = report.last
    assert g.token_ids == smol_ref[0]
    st = g.spec
    assert st is not None and st.passes > 0 and st.rejections == 0 and st.accepted == st.drafted
    # 31 tokens after the first: six passes of 5 (4 drafts + the ring's own), then one of the last token alone
    assert (st.passes, st.tokens, st.tokens_per_pass) == (6, 30, 5.0)
    assert [n for _, phase, n, _, _ in g.steps if phase == "decode"] == [5] * 6 + [1]
    js = report.to_json()["speculation"]
    assert js["accept_rate"] == 1.0 and js["decode_tokens_per_s"] > 0


def test_rejected_drafts_leave_no_trace(smollm2, smol_prompt, smol_ref, tmp_path, monkeypatch):
    """A draft that is wrong at every third proposal: rejections happen in every position of a pass, the KV
    caches of every window and of the draft are cut back, and the output is still the plain greedy output."""
    real = spec.Draft.propose
    calls = {"n": 0}

    def wrong_sometimes(self: spec.Draft, context: list[int], n: int) -> list[int]:
        out = real(self, context, n)
        calls["n"] += 1
        k = calls["n"] % 4  # reject at draft 0, 1, 2, or not at all
        if k < len(out):
            out[k] = (out[k] + 1) % self.model.n_vocab
        return out

    monkeypatch.setattr(spec.Draft, "propose", wrong_sometimes)
    plan = make_plan(30, (12, 18), "smollm2")
    o = opts(threads={d.name: 1 for d in plan.devices}, keep_logits=False, draft=smollm2, draft_max=3,
             extra_prompts=(smol_prompt,))  # fmt: skip
    report = run_ring(plan, smollm2, smol_prompt, o, local=True, shard_dir=tmp_path / "s")
    for g in report.generations:  # the second prompt starts on caches that hold the first one's rejected rows
        assert g.token_ids == smol_ref[0]
        assert g.spec is not None and g.spec.rejections > 0 and 0 < g.spec.accept_rate < 1


def test_draft_with_another_vocabulary_is_refused(smollm2, gemma3, smol_prompt, tmp_path):
    plan = make_plan(30, (30,), "smollm2")
    with pytest.raises(
        InputError, match="--draft: the draft's vocabulary has 262144 tokens but the model's has 49152"
    ):
        run_ring(
            plan, smollm2, smol_prompt, opts(n_predict=4, draft=gemma3), local=True, shard_dir=tmp_path / "s"
        )


def test_cli_run_local_draft(smollm2, smol_ref, tmp_path, capsys, monkeypatch):
    import prima_sim.exec.llamacpp as llamacpp
    from prima_sim.cli.main import main

    monkeypatch.setattr(llamacpp, "_flash_attn", False)  # restored after the test: --flash-attn sets it here

    plan = make_plan(30, (15, 15))
    plan.save(tmp_path / "plan.json")
    base = ["run", "--local", "--plan", str(tmp_path / "plan.json"), "--model", str(smollm2), "--prompt", PROMPT,
            "--ignore-eos", "--threads", "1", "--shards", str(tmp_path / "shards")]  # fmt: skip
    assert main([*base, "-n", "12", "--json", "--draft", "smollm2-135m", "--draft-max", "2"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["token_ids"] == smol_ref[0][:12]
    assert res["speculation"]["draft_max"] == 2 and res["speculation"]["accepted"] > 0
    # every process of the ring with flash attention: every draft of the target itself is accepted
    assert main([*base, "-n", "12", "--json", "--draft", "smollm2-135m", "--flash-attn"]) == 0
    spec_fa = json.loads(capsys.readouterr().out)["speculation"]
    assert spec_fa["accept_rate"] == 1.0 and spec_fa["accepted"] == spec_fa["drafted"] > 0
    for extra, err in ((["--temperature", "0.7"], "--draft: speculative decoding verifies greedy choices only"),
                       (["--draft-max", "0"], "--draft-max: must be at least 1, got 0"),
                       (["--draft-max", "8", "--batch", "8"], "--draft-max: must be 1..7")):  # fmt: skip
        assert main([*base, "--draft", "smollm2-135m", *extra]) == 2
        assert err in capsys.readouterr().err


def test_engine_speculates_for_every_greedy_sequence(smollm2, smol_prompt, smol_ref, tmp_path, monkeypatch):
    """``serve --parallel 2 --draft``: two greedy requests in flight at once, each with its own draft cache, a
    draft wrong now and then: each gets the plain greedy text, and the engine counts what it drafted."""
    import threading

    from prima_sim.exec.engine import Engine, Event, Job, RingSpec
    from prima_sim.exec.head import SamplingParams
    from prima_sim.exec.runner import ensure_shards

    real = spec.Draft.propose
    calls = {"n": 0}

    def wrong_sometimes(self: spec.Draft, context: list[int], n: int, seq: int = 0) -> list[int]:
        out = real(self, context, n, seq)
        calls["n"] += 1
        if calls["n"] % 3 == 0:
            out[-1] = (out[-1] + 1) % self.model.n_vocab
        return out

    monkeypatch.setattr(spec.Draft, "propose", wrong_sometimes)
    plan = make_plan(30, (10, 12, 8), "smollm2")
    ensure_shards(smollm2, plan, tmp_path / "s", [d.name for d in plan.devices])
    engine = Engine(RingSpec(plan, tmp_path / "s", local=True, threads={d.name: 1 for d in plan.devices}, n_seq=2,
                             timeout_s=15.0, draft=smollm2, draft_max=3))  # fmt: skip
    with Reference(smollm2, N_CTX, 64, 1) as ref:
        want = b"".join(ref.model.piece(t) for t in smol_ref[0][:20]).decode("utf-8", "replace")
    try:
        engine.start()
        assert engine.wait_ready(120)
        texts: list[list[str]] = [[], []]
        done = [threading.Event(), threading.Event()]

        def deliver(i: int) -> Any:
            def cb(ev: Event) -> None:
                if ev.kind == "text":
                    texts[i].append(ev.text)
                else:
                    assert ev.kind == "done", ev.message
                    done[i].set()

            return cb

        for i in range(2):
            engine.submit(Job(list(smol_prompt), 20, SamplingParams(), (), deliver(i), ignore_eos=True))
        assert all(d.wait(120) for d in done)
        assert ["".join(t) for t in texts] == [want, want]
        st = engine.status()
        assert st["drafted"] > st["accepted"] > 0
    finally:
        engine.close()


def test_flash_attention_makes_verification_exact(smollm2, tmp_path, monkeypatch):
    """A prompt where, without flash attention, the verification batch's rounding changes a close greedy choice
    (docs/exec.md): with ``--flash-attn`` (every context of the ring, workers included) the draft = target is
    accepted at every position and the output is exactly the plain greedy output with the same option."""
    import prima_sim.exec.llamacpp as llamacpp

    monkeypatch.setattr(
        llamacpp, "_flash_attn", True
    )  # what --flash-attn does; the --local ring passes it on
    prompt = "Write a short story about a lighthouse keeper who finds a message in a bottle."
    plan = make_plan(30, (10, 12, 8), "smollm2")
    base = {"threads": {d.name: 1 for d in plan.devices}, "n_predict": 24}
    plain = run_ring(plan, smollm2, prompt, opts(**base), local=True, shard_dir=tmp_path / "s")
    fast = run_ring(plan, smollm2, prompt, opts(**base, draft=smollm2, draft_max=4), local=True,
                    shard_dir=tmp_path / "s")  # fmt: skip
    assert fast.last.token_ids == plain.last.token_ids
    assert fast.last.spec.rejections == 0 and fast.last.spec.accepted == fast.last.spec.drafted
    # and every verified row's logits are the single-token ones, bit for bit (max |diff| 0.0 measured)
    pairs = zip(fast.last.logits, plain.last.logits, strict=True)
    assert max(float(np.max(np.abs(a - b))) for a, b in pairs) <= 1e-3
