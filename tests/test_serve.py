"""``prima-sim serve`` for real: a live server (the CLI, in its own process) over rings of 1, 2 and 3 llama.cpp
processes on loopback with SmolLM2-135M, driven by the official ``openai`` client and by plain HTTP (httpx).

Greedy output must equal one llama.cpp process on the same tokens (the chat template applied the same way),
also on a second turn that reuses the ring's KV caches (the reference replays the same batches). A worker
killed mid-stream ends that stream with an error event (HTTP 500 before a stream starts), the server stays up,
answers 503 while it respawns the ring, and serves the next request correctly once it is ready.
"""

from __future__ import annotations

import asyncio
import codecs
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import openai
import pytest

from prima_sim.exec.engine import Ring, RingSpec, apply_chat_template
from prima_sim.exec.llamacpp import Reference
from prima_sim.exec.runner import ensure_shards
from prima_sim.plan import Plan, make_assignments

pytestmark = pytest.mark.real

N_CTX = 512
PROMPT = "The three primary colours are red, yellow and"
QUESTION = [{"role": "user", "content": "What is the capital of France?"}]
READY_TIMEOUT_S = 240.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def write_plan(path: Path, windows: tuple[int, ...]) -> Path:
    names = [f"D{i}" for i in range(len(windows))]
    devs = make_assignments(names, windows, [0] * len(windows), 30)
    Plan(model_id="smollm2", n_layers=30, cluster_name="loopback", k=1, n_ctx=N_CTX, devices=devs,
         scheduler="manual").save(path)  # fmt: skip
    return path


class Server:
    """``prima-sim serve --local`` in a subprocess."""

    def __init__(self, tmp: Path, model: Path, windows: tuple[int, ...], *extra: str) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = tmp / "serve.log"
        plan = write_plan(tmp / "plan.json", windows)
        cmd = [sys.executable, "-m", "prima_sim.cli.main", "serve", "--local", "--plan", str(plan), "--model",
               str(model), "--shards", str(tmp / "shards"), "--threads", "1", "--port", str(self.port), *extra]  # fmt: skip
        with self.log.open("wb") as f:
            self.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=f, stderr=subprocess.STDOUT)
        self.pids: dict[str, int] = {}

    def health(self) -> tuple[int, dict[str, Any]]:
        r = httpx.get(self.url + "/health", timeout=10)
        return r.status_code, r.json()

    def wait_ready(self, rebuilds: int = 0) -> dict[str, Any]:
        deadline = time.monotonic() + READY_TIMEOUT_S
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, f"the server exited: {self.log.read_text()[-2000:]}"
            try:
                code, st = self.health()
                if code == 200 and st["rebuilds"] >= rebuilds:
                    self.pids.update(st["pids"])
                    return st
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        raise AssertionError(f"the server did not become ready: {self.log.read_text()[-2000:]}")

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        try:
            rc = self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            raise AssertionError("the server did not stop on SIGTERM") from None
        assert rc == 0, self.log.read_text()[-2000:]
        time.sleep(0.5)
        alive = [p for p in self.pids.values() if _alive(p)]
        assert not alive, f"processes left behind: {alive}"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie (not yet reaped by its parent) is dead too
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except OSError:
        return False


@pytest.fixture(scope="module")
def ring3(smollm2: Path, tmp_path_factory: pytest.TempPathFactory):
    s = Server(tmp_path_factory.mktemp("ring3"), smollm2, (10, 12, 8), "--queue", "4")
    try:
        s.wait_ready()
        yield s
    finally:
        s.stop()


@pytest.fixture(scope="module")
def ring3p(smollm2: Path, tmp_path_factory: pytest.TempPathFactory):
    """Three sequences in flight at once (--parallel 3), batched into one pass per window."""
    s = Server(tmp_path_factory.mktemp("ring3p"), smollm2, (10, 12, 8), "--queue", "4", "--parallel", "3")
    try:
        s.wait_ready()
        yield s
    finally:
        s.stop()


@pytest.fixture(scope="module")
def ring1(smollm2: Path, tmp_path_factory: pytest.TempPathFactory):
    s = Server(tmp_path_factory.mktemp("ring1"), smollm2, (30,), "--queue", "0", "--api-key", "sekrit")
    try:
        s.wait_ready()
        yield s
    finally:
        s.stop()


def client(server: Server, key: str = "none") -> Any:
    return openai.OpenAI(base_url=server.url + "/v1", api_key=key, max_retries=0, timeout=120)


# --- the reference: one llama.cpp process -------------------------------------------------------------------------
class Ref:
    """The whole model in one context; greedy continuation with the server's stop rule (end of generation)."""

    def __init__(self, model: Path) -> None:
        self.r = Reference(model, N_CTX, N_CTX, 1)
        self.m = self.r.model
        self.pos = 0

    def chat_tokens(self, messages: list[dict[str, Any]]) -> list[int]:
        text = apply_chat_template(self.m.chat_template(), self.m.special_text("bos"), self.m.special_text("eos"),
                                   messages)  # fmt: skip
        return self.m.tokenize(text, add_special=False, parse_special=True)

    def feed(self, tokens: list[int], pos0: int) -> Any:
        out = self.r.logits(tokens, pos0)
        self.pos = pos0 + len(tokens)
        return out

    def greedy(self, logits: Any, n: int) -> tuple[list[int], str]:
        toks: list[int] = []
        utf8 = codecs.getincrementaldecoder("utf-8")("replace")
        text = ""
        while True:
            tok = int(np.argmax(logits))
            if self.m.is_eog(tok):
                break
            toks.append(tok)
            text += utf8.decode(self.m.piece(tok))
            if len(toks) == n:
                break
            logits = self.feed([tok], self.pos)
        return toks, text + utf8.decode(b"", final=True)

    def close(self) -> None:
        self.r.close()


@pytest.fixture(scope="module")
def ref(smollm2: Path):
    r = Ref(smollm2)
    yield r
    r.close()


# --- tests ----------------------------------------------------------------------------------------------------------
def test_models_and_auth(ring1: Server) -> None:
    models = client(ring1, "sekrit").models.list()
    assert [m.id for m in models.data] == ["smollm2"]
    with pytest.raises(openai.AuthenticationError):
        client(ring1, "wrong").models.list()
    r = httpx.post(ring1.url + "/v1/completions", json={"prompt": "x"}, timeout=10)
    assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"


@pytest.mark.parametrize("which", ["ring1", "ring3"])
def test_completion_greedy_matches_single_process(
    which: str, ref: Ref, request: pytest.FixtureRequest
) -> None:
    server: Server = request.getfixturevalue(which)
    prompt = ref.m.tokenize(PROMPT)
    want_toks, want = ref.greedy(ref.feed(prompt, 0), 24)
    c = client(server, "sekrit")
    got = c.completions.create(model="smollm2", prompt=PROMPT, max_tokens=24, temperature=0)
    assert got.choices[0].text == want
    assert got.usage.prompt_tokens == len(prompt) and got.usage.completion_tokens == len(want_toks)
    # token ids as the prompt, streamed: the same text
    pieces = [ch.choices[0].text for ch in c.completions.create(model="smollm2", prompt=prompt, max_tokens=24,
                                                                 temperature=0, stream=True)]  # fmt: skip
    assert "".join(pieces) == want


def test_chat_stream_and_not_match_single_process(ring3: Server, ref: Ref) -> None:
    want_toks, want = ref.greedy(ref.feed(ref.chat_tokens(QUESTION), 0), 40)
    c = client(ring3)
    full = c.chat.completions.create(model="smollm2", messages=QUESTION, max_tokens=40, temperature=0)
    assert full.choices[0].message.content == want
    assert full.choices[0].message.role == "assistant"
    assert full.choices[0].finish_reason == ("length" if len(want_toks) == 40 else "stop")
    chunks = list(c.chat.completions.create(model="smollm2", messages=QUESTION, max_tokens=40, temperature=0,
                                            stream=True, stream_options={"include_usage": True}))  # fmt: skip
    assert "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices) == want
    assert chunks[-1].usage.completion_tokens == len(want_toks)
    assert chunks[-2].choices[0].finish_reason == full.choices[0].finish_reason
    # the same prompt again: everything but its last token comes from the KV caches
    assert chunks[-1].usage.prompt_tokens_details.cached_tokens == chunks[-1].usage.prompt_tokens - 1


def test_second_turn_reuses_kv_and_matches_replayed_reference(ring3: Server, ref: Ref) -> None:
    c = client(ring3)
    first = [{"role": "user", "content": "Name a colour."}]
    t1 = c.chat.completions.create(model="smollm2", messages=first, max_tokens=12, temperature=0)
    conv = [*first, {"role": "assistant", "content": t1.choices[0].message.content},
            {"role": "user", "content": "And another one?"}]  # fmt: skip
    t2 = c.chat.completions.create(model="smollm2", messages=conv, max_tokens=16, temperature=0)
    cached = t2.usage.prompt_tokens_details.cached_tokens
    p1, p2 = ref.chat_tokens(first), ref.chat_tokens(conv)
    assert cached > len(p1), "the second turn should reuse the first turn's KV caches"
    assert t2.usage.prompt_tokens == len(p2)
    # replay what the ring computed: turn 1 (prefill, then one token at a time), then only turn 2's new tokens
    gen1, text1 = ref.greedy(ref.feed(p1, 0), 12)
    assert text1 == t1.choices[0].message.content
    kv = (p1 + gen1)[:cached]
    assert p2[:cached] == kv
    _, want = ref.greedy(ref.feed(p2[cached:], cached), 16)
    assert t2.choices[0].message.content == want


def test_stop_seed_and_usage(ring3: Server) -> None:
    c = client(ring3)
    base = c.completions.create(model="smollm2", prompt=PROMPT, max_tokens=24, temperature=0).choices[0].text
    stop = base.split()[3]
    cut = c.completions.create(
        model="smollm2", prompt=PROMPT, max_tokens=24, temperature=0, stop=[stop, "@@"]
    )
    assert cut.choices[0].text == base[: base.index(stop)]
    assert cut.choices[0].finish_reason == "stop"
    streamed = "".join(ch.choices[0].text for ch in c.completions.create(
        model="smollm2", prompt=PROMPT, max_tokens=24, temperature=0, stop=stop, stream=True))  # fmt: skip
    assert streamed == cut.choices[0].text
    kw: dict[str, Any] = {
        "model": "smollm2",
        "prompt": PROMPT,
        "max_tokens": 16,
        "temperature": 0.9,
        "top_p": 0.9,
    }
    a = c.completions.create(seed=7, **kw).choices[0].text
    b = c.completions.create(seed=7, **kw).choices[0].text
    assert a == b


def test_malformed_requests_get_400(ring3: Server) -> None:
    url = ring3.url + "/v1/chat/completions"
    cases = [
        b"{not json",
        b"[1, 2]",
        json.dumps({"model": "x"}).encode(),  # no messages
        json.dumps({"messages": []}).encode(),
        json.dumps({"messages": [{"role": "wizard", "content": "hi"}]}).encode(),
        json.dumps({"messages": QUESTION, "temperature": 5}).encode(),
        json.dumps({"messages": QUESTION, "n": 2}).encode(),
        json.dumps({"messages": QUESTION, "max_tokens": 0}).encode(),
        json.dumps({"messages": QUESTION, "max_tokens": 100000}).encode(),  # beyond the context
        json.dumps({"messages": QUESTION, "stop": ["a", "b", "c", "d", "e"]}).encode(),
    ]
    for body in cases:
        r = httpx.post(url, content=body, headers={"content-type": "application/json"}, timeout=60)
        assert r.status_code == 400, (body, r.text)
        err = r.json()["error"]
        assert err["type"] == "invalid_request_error" and err["message"] and "\n" not in err["message"]
    r = httpx.post(ring3.url + "/v1/completions", json={"prompt": [999999]}, timeout=60)
    assert r.status_code == 400 and "vocabulary" in r.json()["error"]["message"]
    r = httpx.get(ring3.url + "/v1/nothing", timeout=10)
    assert r.status_code == 404 and r.json()["error"]["type"] == "not_found_error"
    with pytest.raises(openai.BadRequestError):
        client(ring3).chat.completions.create(model="smollm2", messages=QUESTION, temperature=-1)
    assert ring3.health()[0] == 200


def test_queue_limit_429_and_cancel_on_disconnect(ring1: Server) -> None:
    """--queue 0: while one request runs, the next is refused with 429; closing a stream cancels it."""
    h = {"Authorization": "Bearer sekrit"}
    body = {"prompt": PROMPT, "max_tokens": 400, "temperature": 0, "ignore_eos": True, "stream": True}
    before = ring1.health()[1]["cancelled"]
    with (
        httpx.Client(timeout=60, headers=h) as c,
        c.stream("POST", ring1.url + "/v1/completions", json=body) as r,
    ):
        assert r.status_code == 200
        lines = r.iter_lines()
        assert next(line for line in lines if line.startswith("data: ")).startswith("data: {")
        busy = httpx.post(
            ring1.url + "/v1/completions", json={"prompt": "hi", "max_tokens": 2}, headers=h, timeout=60
        )
        assert busy.status_code == 429, busy.text
        assert busy.json()["error"]["type"] == "rate_limit_error" and busy.headers["retry-after"]
    # the client went away: the engine stops that request at its next token and serves the next one
    deadline = time.monotonic() + 60
    while ring1.health()[1]["cancelled"] == before and time.monotonic() < deadline:
        time.sleep(0.1)
    assert ring1.health()[1]["cancelled"] == before + 1
    ok = httpx.post(
        ring1.url + "/v1/completions", json={"prompt": "hi", "max_tokens": 2}, headers=h, timeout=60
    )
    assert ok.status_code == 200, ok.text


async def _load(url: str, clients: int, requests: int, max_tokens: int) -> dict[str, Any]:
    """``clients`` concurrent streaming clients sending ``requests`` in all; every outcome is accounted for."""
    out = {"sent": 0, "completed": 0, "rejected": 0, "lost": 0, "errors": []}
    todo = list(range(requests))

    async def one(c: Any) -> None:
        while todo:
            i = todo.pop()
            out["sent"] += 1
            body = {"prompt": f"Count from {i}:", "max_tokens": max_tokens, "temperature": 0, "stream": True}
            try:
                async with c.stream("POST", url + "/v1/completions", json=body) as r:
                    if r.status_code == 429:
                        await r.aread()
                        assert r.json()["error"]["type"] == "rate_limit_error"
                        out["rejected"] += 1
                        continue
                    assert r.status_code == 200, await r.aread()
                    finish, done = None, False
                    async for line in r.aiter_lines():
                        if line == "data: [DONE]":
                            done = True
                        elif line.startswith("data: "):
                            finish = json.loads(line[6:])["choices"][0]["finish_reason"] or finish
                    if done and finish in ("stop", "length"):
                        out["completed"] += 1
                    else:
                        out["lost"] += 1
            except (httpx.HTTPError, AssertionError) as exc:
                out["lost"] += 1
                out["errors"].append(repr(exc))

    async with httpx.AsyncClient(timeout=httpx.Timeout(300.0)) as c:
        await asyncio.gather(*(one(c) for _ in range(clients)))
    return out


@pytest.mark.parametrize("which", ["ring3", "ring3p"])
def test_bounded_load_every_request_accounted_for(which: str, request: pytest.FixtureRequest) -> None:
    server: Server = request.getfixturevalue(which)
    res = asyncio.run(_load(server.url, clients=12, requests=36, max_tokens=6))
    assert res["lost"] == 0, res
    assert res["sent"] == 36 and res["completed"] + res["rejected"] == 36, res
    assert res["completed"] >= 5  # those in flight and the four the queue holds, at least
    code, st = server.health()
    assert code == 200 and st["queued"] == 0


def test_worker_killed_mid_stream(smollm2: Path, ref: Ref, tmp_path: Path) -> None:
    """The stream ends with an error event, the server stays up, answers 503 while it respawns the ring,
    then serves correctly again."""
    s = Server(tmp_path, smollm2, (12, 18), "--parallel", "2")
    try:
        st = s.wait_ready()
        victim = st["pids"]["D1"]
        c = client(s)
        stream = c.chat.completions.create(model="smollm2", messages=QUESTION, max_tokens=400, temperature=0,
                                           stream=True, extra_body={"ignore_eos": True})  # fmt: skip
        it = iter(stream)
        next(it)
        os.kill(victim, signal.SIGKILL)
        with pytest.raises(openai.APIError, match="worker"):
            for _ in it:
                pass
        r = httpx.post(s.url + "/v1/completions", json={"prompt": "hi", "max_tokens": 2}, timeout=120)
        assert r.status_code in (200, 503), r.text  # 503 while the ring is rebuilt (docs/serve.md)
        if r.status_code == 503:
            assert r.json()["error"]["type"] == "service_unavailable"
        st = s.wait_ready(rebuilds=1)
        assert st["pids"]["D1"] != victim
        _, want = ref.greedy(ref.feed(ref.chat_tokens(QUESTION), 0), 20)
        got = c.chat.completions.create(model="smollm2", messages=QUESTION, max_tokens=20, temperature=0)
        assert got.choices[0].message.content == want
    finally:
        s.stop()


def test_serve_refuses_public_bind_without_key(tmp_path: Path) -> None:
    plan = write_plan(tmp_path / "plan.json", (30,))
    r = subprocess.run([sys.executable, "-m", "prima_sim.cli.main", "serve", "--local", "--plan", str(plan),
                        "--host", "0.0.0.0"], capture_output=True, text=True, timeout=120,
                       env={k: v for k, v in os.environ.items() if k != "PRIMA_SIM_API_KEY"})  # fmt: skip
    assert r.returncode == 2
    assert "--api-key" in r.stderr and "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1


def test_chat_cli_against_server_and_plan(ring3: Server, smollm2: Path, ref: Ref, tmp_path: Path) -> None:
    _, want = ref.greedy(ref.feed(ref.chat_tokens(QUESTION), 0), 20)
    stdin = QUESTION[0]["content"] + "\n/quit\n"
    r = subprocess.run([sys.executable, "-m", "prima_sim.cli.main", "chat", "--url", ring3.url + "/v1", "-n", "20"],
                       input=stdin, capture_output=True, text=True, timeout=300)  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip().splitlines()[0] == want.strip().splitlines()[0]
    plan = write_plan(tmp_path / "plan.json", (30,))
    two_turns = "Name a colour.\nAnd another one?\n"
    r = subprocess.run([sys.executable, "-m", "prima_sim.cli.main", "chat", "--local", "--plan", str(plan), "--model",
                        str(smollm2), "--shards", str(tmp_path / "shards"), "--threads", "1", "-n", "12"],
                       input=two_turns, capture_output=True, text=True, timeout=300)  # fmt: skip
    assert r.returncode == 0, r.stderr
    lines = [ln for ln in r.stdout.splitlines() if ln.strip()]
    assert len(lines) >= 2, r.stdout


def test_batched_ring_matches_single_process_on_the_same_batches(smollm2: Path, tmp_path: Path) -> None:
    """Several sequences in one batch per window pass (sequence ids, one KV cache with room for three, a
    sequence joining mid-way, one rewinding): the ring of three processes gives the logits of one llama.cpp
    process running the same batches, and sequences do not disturb each other (each stays close to its
    own single-sequence run)."""
    plan_path = write_plan(tmp_path / "plan.json", (10, 12, 8))
    plan = Plan.load(plan_path)
    ensure_shards(smollm2, plan, tmp_path / "shards", [d.name for d in plan.devices])
    spec = RingSpec(plan, tmp_path / "shards", local=True, threads={d.name: 1 for d in plan.devices}, n_seq=3,
                    timeout_s=15.0)  # fmt: skip
    ring = Ring(spec)
    ref = Reference(smollm2, N_CTX, 64, 1, n_seq=3)
    try:
        head = ring.head
        assert head is not None
        m = ref.model
        prompts = [m.tokenize(t) for t in (PROMPT, "Once upon a time, there was", "def fibonacci(n):")]
        pos = [0, 0, 0]
        nxt: dict[int, int] = {}
        worst = 0.0
        outs_by_seq: dict[int, list[int]] = {0: [], 1: [], 2: []}
        first_logits: dict[int, np.ndarray] = {}

        def step(feed: dict[int, list[int]]) -> None:
            nonlocal worst
            tokens, positions, seqs, outs = [], [], [], {}
            for sq, toks in feed.items():
                tokens += toks
                positions += range(pos[sq], pos[sq] + len(toks))
                seqs += [sq] * len(toks)
                outs[len(tokens) - 1] = sq
                pos[sq] += len(toks)
            p_arr, s_arr = np.array(positions, dtype=np.int32), np.array(seqs, dtype=np.int32)
            ctx = head.step_rows(tokens, p_arr, s_arr, set(outs))
            ref.window.run_rows(np.array(tokens, dtype=np.int32), p_arr, s_arr, set(outs))
            for row, sq in outs.items():
                got, want = ctx.logits_at(row), ref.window.logits_at(row)
                worst = max(worst, float(np.max(np.abs(got - want))))
                first_logits.setdefault(sq, got)
                nxt[sq] = int(np.argmax(got))
                outs_by_seq[sq].append(nxt[sq])

        step({0: prompts[0], 1: prompts[1]})
        for _ in range(5):
            step({0: [nxt[0]], 1: [nxt[1]]})
        step({0: [nxt[0]], 1: [nxt[1]], 2: prompts[2]})  # a sequence joins while two decode
        for _ in range(5):
            step({0: [nxt[0]], 1: [nxt[1]], 2: [nxt[2]]})
        pos[0] = 3  # sequence 0 rewinds: a new prompt sharing its first three tokens
        step({1: [nxt[1]], 0: prompts[2][1:4], 2: [nxt[2]]})
        for _ in range(4):
            step({0: [nxt[0]], 1: [nxt[1]], 2: [nxt[2]]})
        assert worst <= 1e-3, f"max |logit difference| ring vs single process {worst}"
    finally:
        ring.close()
        ref.close()
    # each sequence alone, in its own single-sequence context: the same first tokens
    with Reference(smollm2, N_CTX, 64, 1) as single:
        for sq in (1, 2):
            logits = single.logits(prompts[sq], 0)
            assert float(np.max(np.abs(logits - first_logits[sq]))) < 0.05
            toks = [int(np.argmax(logits))]
            for i in range(5):
                toks.append(int(np.argmax(single.logits([toks[-1]], len(prompts[sq]) + i))))
            assert toks == outs_by_seq[sq][:6]


def test_parallel_requests_are_batched(ring3p: Server) -> None:
    """--parallel 3: three concurrent streams share the ring's passes (the server counts batched rows), each
    complete. (Their text is not compared with a single process: with other sequences in the unified KV cache
    the attention sums run over more, masked, cells, which changes float rounding; the batches themselves are
    checked against one process in the test above.)"""
    prompts = [PROMPT, "Once upon a time, there was", "The capital of France is"]
    before = ring3p.health()[1]["batched_rows"]

    async def together() -> list[tuple[str, int]]:
        ac = openai.AsyncOpenAI(base_url=ring3p.url + "/v1", api_key="none", max_retries=0, timeout=120)

        async def one(p: str) -> tuple[str, int]:
            parts, n = [], 0
            stream = await ac.completions.create(model="smollm2", prompt=p, max_tokens=24, temperature=0, stream=True,
                                                 stream_options={"include_usage": True},
                                                 extra_body={"ignore_eos": True})  # fmt: skip
            async for ch in stream:
                if ch.choices:
                    parts.append(ch.choices[0].text)
                if ch.usage:
                    n = ch.usage.completion_tokens
            return "".join(parts), n

        try:
            return list(await asyncio.gather(*(one(p) for p in prompts)))
        finally:
            await ac.close()

    got = asyncio.run(together())
    assert [n for _, n in got] == [24, 24, 24]
    assert all(text for text, _ in got)
    st = ring3p.health()[1]
    assert st["batched_rows"] > before and st["running"] == 0 and st["parallel"] == 3
