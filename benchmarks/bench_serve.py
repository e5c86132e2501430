"""``prima-sim serve`` under load, on loopback: a bounded load test and aggregate throughput against concurrency.

Starts ``prima-sim serve --local`` (SmolLM2-135M, bundled) on a ring of 3 processes (windows 10/12/8) and on one
process (the whole model on the head), each with ``--parallel 1`` (one sequence at a time) and ``--parallel P``
(continuous batching, default 8), and:

1. **Concurrency sweep**: 1, 2, 4, 8 concurrent streaming clients, each sending requests back to back
   (``--sweep-requests`` per client, ``--sweep-tokens`` greedy tokens each, end-of-generation ignored):
   aggregate generated tokens/s, per-request TPOT (time between streamed tokens, median) and latency, beside the
   cost model's prediction of each (``serving_curve`` on a profile of this host measured first, or ``--profile``,
   every process alike, loopback links of ``--hop-ms``) and its error. With one
   sequence at a time aggregate throughput stays flat and latency grows with the queue; with batching it grows
   with the number of streams.
2. **Load test** (the ring, ``--parallel P``): ``--clients`` concurrent streaming clients sending ``--requests``
   requests in all, with the server's queue limit at ``--queue``: every request must complete (``[DONE]`` after a finish
   reason) or be refused with a clear error (HTTP 429 with an OpenAI error body); ``lost`` (anything else: a
   dropped connection, a stream cut without its end, a 5xx) must be 0, and the server must still be healthy.

Every loop is bounded (requests and a wall-clock limit); traffic goes to 127.0.0.1 only. Run with the machine
as quiet as possible (``flock -x /tmp/prima-cpu.lock``); the numbers are printed side by side, not asserted.

    python benchmarks/bench_serve.py [--clients 32 --requests 256 --queue 16]
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
from loopback import add_host_args, host_profile, loopback_cluster

from prima_sim.devices.bundled import smollm2_path
from prima_sim.devices.model import model_profile_from_gguf
from prima_sim.halda.costmodel import serving_curve
from prima_sim.halda.planner import manual_plan
from prima_sim.plan import Plan, make_assignments
from prima_sim.workload import Workload

WALL_LIMIT_S = 900.0  # the whole load phase stops sending after this long


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Server:
    def __init__(
        self,
        tmp: Path,
        windows: tuple[int, ...],
        queue: int,
        threads: int,
        parallel: int,
        shards: Path | None,
    ) -> None:
        names = [f"D{i}" for i in range(len(windows))]
        plan = Plan(model_id="smollm2", n_layers=30, cluster_name="loopback", k=1, n_ctx=1024, n_seq=parallel,
                    devices=make_assignments(names, windows, [0] * len(windows), 30), scheduler="manual")  # fmt: skip
        plan.save(tmp / "plan.json")
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        cmd = [sys.executable, "-m", "prima_sim.cli.main", "serve", "--local", "--plan", str(tmp / "plan.json"),
               "--model", str(smollm2_path()), "--shards", str(shards or tmp / "shards"), "--threads", str(threads),
               "--port", str(self.port), "--queue", str(queue), "--parallel", str(parallel)]  # fmt: skip
        self.log = tmp / "serve.log"
        with self.log.open("wb") as f:
            self.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=f, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise SystemExit(f"the server exited: {self.log.read_text()[-1500:]}")
            try:
                if httpx.get(self.url + "/health", timeout=5).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        raise SystemExit("the server did not become ready")

    def health(self) -> dict[str, Any]:
        return dict(httpx.get(self.url + "/health", timeout=10).json())

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        self.proc.wait(timeout=60)


async def stream_one(c: httpx.AsyncClient, url: str, body: dict[str, Any]) -> dict[str, Any]:
    """One streaming completion: outcome, latency, token arrival times."""
    t0 = time.perf_counter()
    times: list[float] = []
    try:
        async with c.stream("POST", url + "/v1/completions", json=body) as r:
            if r.status_code != 200:
                await r.aread()
                try:
                    err = r.json()["error"]
                    clear = bool(err["message"]) and bool(err["type"])
                except (ValueError, KeyError, TypeError):
                    clear = False
                kind = "rejected" if r.status_code == 429 and clear else ("failed" if clear else "lost")
                return {"outcome": kind, "status": r.status_code, "latency": time.perf_counter() - t0}
            finish, done, n = None, False, 0
            async for line in r.aiter_lines():
                if line == "data: [DONE]":
                    done = True
                elif line.startswith("data: "):
                    obj = json.loads(line[6:])
                    if "error" in obj:
                        return {"outcome": "failed", "status": 500, "latency": time.perf_counter() - t0}
                    ch = obj["choices"][0]
                    if ch["text"]:
                        n += 1
                        times.append(time.perf_counter())
                    finish = ch["finish_reason"] or finish
            ok = done and finish in ("stop", "length")
            return {"outcome": "completed" if ok else "lost", "status": 200, "latency": time.perf_counter() - t0,
                    "times": times, "t0": t0, "pieces": n}  # fmt: skip
    except httpx.HTTPError as exc:
        return {"outcome": "lost", "status": 0, "latency": time.perf_counter() - t0, "error": repr(exc)}


async def run_clients(
    url: str, clients: int, requests: int, tokens: int
) -> tuple[list[dict[str, Any]], float]:
    todo = list(range(requests))
    results: list[dict[str, Any]] = []
    t_end = time.monotonic() + WALL_LIMIT_S

    async def client(c: httpx.AsyncClient) -> None:
        while todo and time.monotonic() < t_end:
            i = todo.pop()
            body = {"prompt": f"Request {i}: count slowly from one to fifty.", "max_tokens": tokens, "temperature": 0,
                    "ignore_eos": True, "stream": True}  # fmt: skip
            res = await stream_one(c, url, body)
            results.append(res)
            if (
                res["outcome"] == "rejected"
            ):  # as a client should: wait a little (Retry-After) before the next
                await asyncio.sleep(0.5)

    t0 = time.perf_counter()
    limits = httpx.Limits(max_connections=clients + 4, max_keepalive_connections=clients + 4)
    async with httpx.AsyncClient(timeout=httpx.Timeout(WALL_LIMIT_S), limits=limits) as c:
        await asyncio.gather(*(client(c) for _ in range(clients)))
    return results, time.perf_counter() - t0


def pct(xs: list[float], q: float) -> float:
    if not xs:
        return float("nan")
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))]


def tpot(r: dict[str, Any]) -> float:
    t = r.get("times") or []
    gaps = [b - a for a, b in itertools.pairwise(t)]
    return statistics.median(gaps) if gaps else float("nan")


PROMPT_TOKENS = 12  # "Request {i}: count slowly from one to fifty." with SmolLM2's tokenizer, about


def predictions(tmp: Path, args: argparse.Namespace, levels: list[int], parallels: tuple[int, ...]
                ) -> dict[tuple[str, int], tuple[float, float]]:  # fmt: skip
    """(label, streams) -> (predicted per-request TPOT s, aggregate tok/s) from the cost model, on a profile of this
    host (``--profile``, else measured now with ``prima-sim profile --model``, ``--quick-profile`` for a quick one)
    given to every process of the ring, with loopback links of ``--hop-ms`` one way. Each request generates
    ``--sweep-tokens`` tokens (``decode_tokens`` = one less, after the first)."""
    tokens = args.sweep_tokens
    prof = host_profile(args, smollm2_path(), tmp)
    model = model_profile_from_gguf(smollm2_path())
    out: dict[tuple[str, int], tuple[float, float]] = {}
    for what, windows in (("ring", (10, 12, 8)), ("single", (30,))):
        cluster = loopback_cluster(prof, len(windows), args.hop_ms)
        for par in parallels:
            wl = Workload(n_ctx=1024, prompt_tokens=PROMPT_TOKENS, decode_tokens=tokens - 1, n_seq=par)
            plan = manual_plan(cluster, model, wl, list(windows))
            pts = serving_curve(plan, cluster, model, wl, [min(n, par) for n in levels])
            for n, pt in zip(levels, pts, strict=True):
                out[(f"{what} --parallel {par}", n)] = (pt.tpot_s, pt.throughput_tps)
    return out


def load_test(tmp: Path, args: argparse.Namespace, shards: Path | None) -> dict[str, Any]:
    """The bounded load test on the ring (``--parallel``, ``--queue``): outcomes, wall time, latencies, health."""
    d = tmp / "load"
    d.mkdir()
    srv = Server(d, (10, 12, 8), args.queue, args.threads, args.parallel, shards)
    try:
        res, wall = asyncio.run(run_clients(srv.url, args.clients, args.requests, args.tokens))
        count = {k: sum(r["outcome"] == k for r in res) for k in ("completed", "rejected", "failed", "lost")}
        lat = [r["latency"] for r in res if r["outcome"] == "completed"]
        healthy = srv.health()["state"] == "ready"
    finally:
        srv.stop()
    return {"sent": len(res), "count": count, "wall": wall, "lat": lat, "healthy": healthy}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--clients", type=int, default=32)
    ap.add_argument("--requests", type=int, default=256)
    ap.add_argument("--tokens", type=int, default=8, help="tokens per load-test request")
    ap.add_argument("--queue", type=int, default=16, help="the server's queue limit in the load test")
    ap.add_argument(
        "--parallel", type=int, default=8, help="--parallel of the batched servers and the load test"
    )
    ap.add_argument("--sweep", default="1,2,4,8", help="concurrency levels of the sweep")
    ap.add_argument("--sweep-requests", type=int, default=3, help="requests per client in the sweep")
    ap.add_argument("--sweep-tokens", type=int, default=32)
    ap.add_argument("--threads", type=int, default=1, help="llama.cpp threads per process")
    ap.add_argument("--skip-sweep", action="store_true")
    ap.add_argument("--skip-load", action="store_true", help="leave the load test out")
    add_host_args(ap)
    args = ap.parse_args()
    os.environ.setdefault("OMP_WAIT_POLICY", "passive")
    levels = [int(x) for x in args.sweep.split(",") if x]
    configs = [] if args.skip_sweep else [
        (f"{what} --parallel {par}", windows, par)
        for par in (1, args.parallel) for what, windows in (("ring", (10, 12, 8)), ("single", (30,)))
    ]  # fmt: skip
    rows = []
    load: dict[str, Any] | None = None
    with tempfile.TemporaryDirectory(prefix="bench-serve-") as tmp:
        pred = {} if args.skip_sweep else predictions(Path(tmp), args, levels, (1, args.parallel))
        shards: dict[tuple[int, ...], Path] = {}
        for label, windows, par in configs:
            d = Path(tmp) / label.replace(" ", "_")
            d.mkdir()
            srv = Server(d, windows, max(args.queue, max(levels)), args.threads, par, shards.get(windows))
            shards[windows] = d / "shards"
            try:
                for n in levels:
                    res, wall = asyncio.run(
                        run_clients(srv.url, n, n * args.sweep_requests, args.sweep_tokens)
                    )
                    done = [r for r in res if r["outcome"] == "completed"]
                    toks = sum(r["pieces"] for r in done)
                    rows.append((label, n, len(res), len(done), toks / wall,
                                 statistics.median(tpot(r) for r in done) * 1e3,
                                 statistics.median(r["latency"] for r in done)))  # fmt: skip
            finally:
                srv.stop()
        if not args.skip_load:
            load = load_test(Path(tmp), args, shards.get((10, 12, 8)))
    if rows:
        print("\nconcurrency sweep (SmolLM2-135M, greedy, end-of-generation ignored; ring = 3 processes, windows "
              "10/12/8):")  # fmt: skip
        print(f"predicted: the cost model (serving_curve) on a profile of this host, every process alike, "
              f"loopback hops of {args.hop_ms:g} ms; aggregate = requests of {PROMPT_TOKENS} prompt and "
              f"{args.sweep_tokens} generated tokens back to back, prefill included (HTTP left out); "
              "err = (predicted - measured) / measured")  # fmt: skip
        print(f"{'server':<22} {'streams':>7} {'requests':>8} {'done':>5} {'agg tok/s':>10} {'pred':>7} {'err%':>6} "
              f"{'TPOT ms':>8} {'pred':>7} {'err%':>6} {'p50 latency s':>13}")  # fmt: skip
        worst = 0.0
        for label, n, sent, done_n, tps, tp, p50 in rows:
            p_tpot, p_tps = pred.get((label, n), (float("nan"), float("nan")))
            err = 100.0 * (p_tpot * 1e3 - tp) / tp if tp else float("nan")
            err_tps = 100.0 * (p_tps - tps) / tps if tps else float("nan")
            worst = max(worst, abs(err), abs(err_tps))
            print(f"{label:<22} {n:>7} {sent:>8} {done_n:>5} {tps:>10.1f} {p_tps:>7.1f} {err_tps:>+6.1f} {tp:>8.2f} "
                  f"{p_tpot * 1e3:>7.2f} {err:>+6.1f} {p50:>13.2f}")  # fmt: skip
        print(f"largest prediction error: {worst:.1f}%")
        by = {(lab, n): tps for lab, n, _, _, tps, _, _ in rows}
        for par in (1, args.parallel):
            print(f"ring/single aggregate tok/s at --parallel {par}: " + ", ".join(
                f"{n}: {by[(f'ring --parallel {par}', n)] / by[(f'single --parallel {par}', n)]:.2f}"
                for n in levels))  # fmt: skip
        for what in ("ring", "single"):
            print(f"{what}: --parallel {args.parallel} / --parallel 1 aggregate tok/s: " + ", ".join(
                f"{n}: {by[(f'{what} --parallel {args.parallel}', n)] / by[(f'{what} --parallel 1', n)]:.2f}"
                for n in levels))  # fmt: skip
    if load is None:
        return 0
    count, lat = load["count"], load["lat"]
    print(f"\nload test: {args.clients} concurrent streaming clients, {args.requests} requests of {args.tokens} "
          f"tokens, --parallel {args.parallel}, queue limit {args.queue}, ring of 3 processes")  # fmt: skip
    print(f"sent {load['sent']}  completed {count['completed']}  rejected-429 {count['rejected']}  "
          f"failed-with-error {count['failed']}  lost {count['lost']}  in {load['wall']:.1f} s")  # fmt: skip
    print(f"latency of completed requests: p50 {pct(lat, 0.5):.2f} s  p99 {pct(lat, 0.99):.2f} s; "
          f"server healthy afterwards: {load['healthy']}")  # fmt: skip
    return 1 if count["lost"] else 0


if __name__ == "__main__":
    sys.exit(main())
