"""TPOT of a loopback ring of llama.cpp workers against one llama.cpp process, measured side by side.

Usage::

    python benchmarks/bench_ring.py                        # 1B-shape Q4_0 model (generated once), 4 devices
    python benchmarks/bench_ring.py --model m.gguf --devices 4 --k 2 --tokens 64 --rounds 3
    python benchmarks/bench_ring.py --omp-wait-policy default --threads 2
    python benchmarks/bench_ring.py --pin 0 --threads 1         # everything on one CPU (see --pin)

Side by side in one run: this process is the ring's head (its workers are separate ``prima-sim worker``
processes, spawned as ``run --local`` does) and also holds the whole model in one llama.cpp context; both
decode greedily, token by token in alternation (ring, single, single, ring, ...), so both see the same load
of a shared machine. TPOT is the median over decode tokens; the reported ratio is the median over rounds of
``ring TPOT / single TPOT``. From the ring's spans it also reports the per-hop cost (from the end of one
window's compute to the start of the next window's compute on the next device: serialisation, ZeroMQ over
loopback, wake-up, parsing), split into *send* (the sender, from its compute's end until ``send`` returns),
*transit* (until the receiver holds the message) and *dispatch* (until its compute starts), and where the rest of
the difference goes (the windows' compute against the whole model, head work, bookkeeping). Every process runs
with the same threads and ``OMP_WAIT_POLICY``. In the same run it measures a bare pyzmq PUSH/PULL message of
the same size between two processes of the same affinity, hot (back to back) and cold (both sides stream a
window's share of the model through the caches between messages, as the ring's compute does): the floor of a hop.
On one pinned CPU (``--pin``) the split is only indicative: the receiver may run before the sender's ``send``
returns.

Without ``--model`` it generates a random-weight model of Llama-3.2-1B's shape (16 layers, n_embd 2048,
n_ff 8192, 32/8 heads, Q4_0, SmolLM2's tokenizer) with ``prima-sim synth-model`` into ``~/.cache/prima-sim``
(``--model`` takes one generated before, e.g. under /var/tmp).
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

PROMPT = "The history of the printing press begins in"
SYNTH_ARGS = [
    "--layers",
    "16",
    "--embd",
    "2048",
    "--ff",
    "8192",
    "--heads",
    "32",
    "--kv-heads",
    "8",
    "--quant",
    "Q4_0",
]


def _env(policy: str | None) -> dict[str, str]:
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env.pop("OMP_WAIT_POLICY", None)
    if policy:
        env["OMP_WAIT_POLICY"] = policy
    return env


def hop_costs(spans: list[Any]) -> dict[str, Any]:
    """Per-hop cost (us) and per-token head/compute totals from a ring's spans (decode steps only)."""
    from prima_sim.metrics import SpanKind

    by_step: dict[int, list[Any]] = {}
    for s in spans:
        by_step.setdefault(s.token, []).append(s)
    hops: list[float] = []
    parts: dict[str, list[float]] = {"send": [], "transit": [], "dispatch": []}
    compute: list[float] = []
    head: list[float] = []
    for step, ss in by_step.items():
        if step == 0:
            continue
        comp = sorted((s for s in ss if s.kind == SpanKind.COMPUTE), key=lambda s: int(s.label[1:]))
        emb = [s for s in ss if s.kind == SpanKind.HEAD and s.label == "embed"]
        out = [s for s in ss if s.kind == SpanKind.HEAD and s.label == "output head"]
        chain = emb + comp + out
        for a, b in itertools.pairwise(chain):
            if a.device != b.device:
                hops.append((b.start_s - a.end_s) * 1e6)
                # the sender's send span starts where its compute ended; the receiver's receive-wait ends when
                # the message is in its hands (worker: just received; head: received and checked)
                send = next((s for s in ss if s.kind == SpanKind.SEND and s.device == a.device
                             and abs(s.start_s - a.end_s) < 1e-3), None)  # fmt: skip
                recv = next((s for s in ss if s.kind == SpanKind.RECV_WAIT and s.device == b.device
                             and send is not None and s.end_s >= send.end_s and s.end_s <= b.start_s), None)  # fmt: skip
                if send is not None and recv is not None:
                    parts["send"].append((send.end_s - a.end_s) * 1e6)
                    parts["transit"].append((recv.end_s - send.end_s) * 1e6)
                    parts["dispatch"].append((b.start_s - recv.end_s) * 1e6)
        compute.append(sum(s.duration_s for s in comp))
        head.append(sum(s.duration_s for s in ss if s.kind == SpanKind.HEAD))
    return {
        "hop_us_median": statistics.median(hops) if hops else 0.0,
        "hop_parts_us": {k: statistics.median(v) if v else 0.0 for k, v in parts.items()},
        "hops_per_token": len(hops) / max(1, len(by_step) - 1),
        "window_compute_s": statistics.median(compute) if compute else 0.0,
        "head_s": statistics.median(head) if head else 0.0,
    }


_ECHO = """
import struct, sys, time, numpy as np, zmq
ctx = zmq.Context.instance()
pull, push = ctx.socket(zmq.PULL), ctx.socket(zmq.PUSH)
pull.connect(sys.argv[1]); push.connect(sys.argv[2])
big = np.ones(int(sys.argv[3]) // 4, dtype=np.float32) if int(sys.argv[3]) else None
while True:
    m = pull.recv(copy=False)
    if len(m) == 1:
        break
    t = time.perf_counter()
    if big is not None:
        big.sum()  # stream a window's weights through the caches, as its compute does
    d = time.perf_counter() - t
    push.send(struct.pack("<d", d) + m.bytes[8:], copy=False)
"""


def bare_zmq_hop_us(nbytes: int, n: int = 2000, flush_bytes: int = 0) -> float:
    """One-way latency (us, median) of a bare pyzmq PUSH/PULL message of ``nbytes`` between two processes on
    loopback: half the round trip to an echo process (same CPU affinity as the ring: children inherit it).

    With ``flush_bytes`` both sides stream that many bytes through the caches before sending (what a window's
    compute does to the caches between two hops); the echo's streaming time is taken out of the round trip.
    """
    import struct

    import numpy as np
    import zmq

    ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context.instance()
    push, pull = ctx.socket(zmq.PUSH), ctx.socket(zmq.PULL)
    push.bind("tcp://127.0.0.1:*")
    pull.bind("tcp://127.0.0.1:*")
    child = subprocess.Popen([sys.executable, "-c", _ECHO, push.getsockopt_string(zmq.LAST_ENDPOINT),
                              pull.getsockopt_string(zmq.LAST_ENDPOINT), str(flush_bytes)])  # fmt: skip
    try:
        buf = bytes(nbytes)
        big = np.ones(flush_bytes // 4, dtype=np.float32) if flush_bytes else None
        rtt: list[float] = []
        for i in range(n + n // 10):
            if big is not None:
                big.sum()
            t = time.perf_counter()
            push.send(buf, copy=False)
            m = pull.recv(copy=False)
            if i >= n // 10:  # after a warm-up
                rtt.append(time.perf_counter() - t - struct.unpack_from("<d", m.buffer)[0])
        push.send(b"x")
        child.wait(10)
    finally:
        if child.poll() is None:
            child.kill()
        push.close(0)
        pull.close(0)
    return statistics.median(rtt) / 2 * 1e6


def interleaved(args: argparse.Namespace, plan: Any, shards: Path, tmp: Path) -> dict[str, Any]:
    """The ring and one llama.cpp process, decoding token by token in alternation in the same window of time.

    This process is both the ring's head (its workers are separate processes) and the single process (a second,
    unsplit llama.cpp model), so every ring token and every single-process token see the same machine load.
    """
    import tomli_w

    from prima_sim.exec.head import Head
    from prima_sim.exec.hosts import local_hosts, resolve
    from prima_sim.exec.llamacpp import Reference, Sampler
    from prima_sim.exec.local import LocalWorkers
    from prima_sim.exec.ring import now
    from prima_sim.exec.shard import load_manifest

    hosts = local_hosts(plan)
    tmp.mkdir(parents=True, exist_ok=True)
    (tmp / "hosts.toml").write_text(tomli_w.dumps(hosts.model_dump(mode="json", exclude_none=True)))
    names = [d.name for d in plan.devices]
    policy = None if args.omp_wait_policy == "default" else args.omp_wait_policy
    devs = [(d, shards / d, args.threads) for d in names[1:]]
    ring_t: list[float] = []
    single_t: list[float] = []
    with LocalWorkers(devs, tmp / "hosts.toml", tmp / "logs", not args.no_prefetch, 512, policy) as workers:
        head = Head(shards / names[0], load_manifest(shards / names[0], names[0]), resolve(hosts, plan), args.threads,
                    prefetch=not args.no_prefetch, check_alive=workers.check_alive)  # fmt: skip
        try:
            head.load()
            head.barrier()
            with Reference(args.model, plan.n_ctx, 512, args.threads) as ref:
                toks = head.tokenize(PROMPT)
                sr, ss = Sampler(), Sampler()
                t0 = now()
                tok_r = sr.sample(head._step(toks, 0, 0, t0))
                ref.logits(toks, 0)
                tok_s = ss.sample(ref.window)
                pos = len(toks)
                for i in range(1, args.tokens):
                    for what in ("ring", "single") if i % 2 else ("single", "ring"):
                        t = time.perf_counter()
                        if what == "ring":
                            tok_r = sr.sample(head._step([tok_r], pos, i, now()))
                            ring_t.append(time.perf_counter() - t)
                        else:
                            ref.logits([tok_s], pos)
                            tok_s = ss.sample(ref.window)
                            single_t.append(time.perf_counter() - t)
                    pos += 1
                sr.close()
                ss.close()
            head.close(graceful=True)
            spans = head.all_spans(t0)
        except BaseException:
            head.close(graceful=False)
            raise
    res = {"ring_tpot_s": statistics.median(ring_t), "single_tpot_s": statistics.median(single_t)}
    res.update(hop_costs(spans))
    return res


def _round(args: argparse.Namespace, plan: Any, tmp: Path, r: int) -> dict[str, Any]:
    got = interleaved(args, plan, tmp / "shards", tmp / f"r{r}")
    got["ratio"] = got["ring_tpot_s"] / got["single_tpot_s"]
    msg = 4 * int(plan_n_embd(args.model)) + 64
    got["bare_zmq_us"] = bare_zmq_hop_us(msg)
    got["bare_zmq_cold_us"] = bare_zmq_hop_us(msg, 100, Path(args.model).stat().st_size // args.devices)
    parts = ", ".join(f"{k} {v:.0f}" for k, v in got["hop_parts_us"].items())
    print(f"round {r}: single {got['single_tpot_s'] * 1e3:.2f} ms  ring {got['ring_tpot_s'] * 1e3:.2f} ms  "
          f"ratio {got['ratio']:.3f}  hop {got['hop_us_median']:.0f} us x {got['hops_per_token']:.0f} ({parts})  "
          f"bare pyzmq {got['bare_zmq_us']:.0f} us ({got['bare_zmq_cold_us']:.0f} cold)", file=sys.stderr)  # fmt: skip
    return got


def plan_n_embd(model: str) -> int:
    """The model's hidden width (floats per token on the wire)."""
    from prima_sim.devices.gguf_file import read_gguf

    g = read_gguf(model)
    return int(g.metadata[f"{g.architecture}.embedding_length"])


def main() -> int:
    """Run the benchmark and print its numbers."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=None, help="GGUF model (default: generated 1B-shape Q4_0)")
    ap.add_argument("--devices", type=int, default=4, help="devices in the ring, head included (default 4)")
    ap.add_argument("--k", type=int, default=1, help="rounds of the ring per token (default 1)")
    ap.add_argument("--tokens", type=int, default=64, help="tokens generated per run (default 64)")
    ap.add_argument("--rounds", type=int, default=3, help="single/ring pairs (default 3)")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="llama.cpp threads per process")
    ap.add_argument(
        "--omp-wait-policy",
        default="passive",
        choices=["passive", "active", "default"],
        help="OMP_WAIT_POLICY of every process, the single one included (default passive)",
    )
    ap.add_argument("--no-prefetch", action="store_true")
    ap.add_argument(
        "--pin",
        type=int,
        default=None,
        metavar="CPU",
        help="pin this process and every worker to one CPU (children inherit the affinity): on a small "
        "VM, processes migrating between vCPUs cost 12-17%% of compute, which is not the ring's cost",
    )
    ap.add_argument("--json", action="store_true", help="print the result as JSON")
    args = ap.parse_args()
    if args.pin is not None:
        os.sched_setaffinity(0, {args.pin})
    n_ctx = 512
    os.environ.pop("OMP_WAIT_POLICY", None)  # before llama.cpp (libgomp) is loaded in this process
    if args.omp_wait_policy != "default":
        os.environ["OMP_WAIT_POLICY"] = args.omp_wait_policy
    from prima_sim.devices.gguf_file import read_gguf
    from prima_sim.plan import Plan, make_assignments

    if args.model is None:
        args.model = str(Path.home() / ".cache" / "prima-sim" / "bench" / "synth-1b-q4_0.gguf")
        if not Path(args.model).exists():
            Path(args.model).parent.mkdir(parents=True, exist_ok=True)
            subprocess.run([sys.executable, "-m", "prima_sim.cli.main", "synth-model", *SYNTH_ARGS, "--out", args.model,
                            "--quiet"], check=True, env=_env(None))  # fmt: skip
    g = read_gguf(args.model)
    n_layers = int(g.metadata[f"{g.architecture}.block_count"])
    per_round = -(-n_layers // args.k)
    base, extra = divmod(per_round, args.devices)
    windows = [base + (1 if i < extra else 0) for i in range(args.devices)]
    names = [f"D{i}" for i in range(args.devices)]
    plan = Plan(model_id=Path(args.model).stem, n_layers=n_layers, cluster_name="loopback", k=args.k, n_ctx=n_ctx,
                devices=make_assignments(names, windows, [0] * args.devices, n_layers), scheduler="manual")  # fmt: skip
    tmp = Path(tempfile.mkdtemp(prefix="bench-ring-"))
    plan.save(tmp / "plan.json")
    from prima_sim.exec.shard import write_shards

    write_shards(args.model, plan, tmp / "shards")
    rows = []
    try:
        for r in range(args.rounds):
            rows.append(_round(args, plan, tmp, r))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    med = statistics.median
    single_tpot = med([x["single_tpot_s"] for x in rows])
    ring_tpot = med([x["ring_tpot_s"] for x in rows])
    hop = med([x["hop_us_median"] for x in rows])
    n_hops = rows[0]["hops_per_token"]
    comp = med([x["window_compute_s"] for x in rows])
    head = med([x["head_s"] for x in rows])
    result = {
        "model": args.model, "n_layers": n_layers, "windows": windows, "k": args.k, "threads": args.threads,
        "omp_wait_policy": args.omp_wait_policy, "prefetch": not args.no_prefetch, "tokens": args.tokens,
        "single_tpot_ms": single_tpot * 1e3, "ring_tpot_ms": ring_tpot * 1e3,
        "ratio_median": med([x["ratio"] for x in rows]), "ratios": [x["ratio"] for x in rows],
        "hop_us": hop, "hops_per_token": n_hops,
        "hop_parts_us": {k: med([x["hop_parts_us"][k] for x in rows]) for k in rows[0]["hop_parts_us"]},
        "bare_zmq_us": med([x["bare_zmq_us"] for x in rows]),
        "bare_zmq_cold_us": med([x["bare_zmq_cold_us"] for x in rows]),
        "breakdown_ms": {
            "windows_compute": comp * 1e3, "head_embed_output_sample": head * 1e3,
            "hops": hop * n_hops / 1e3, "rest": (ring_tpot - comp - head - hop * n_hops / 1e6) * 1e3,
            "windows_compute_minus_single": (comp - single_tpot) * 1e3,
        },
    }  # fmt: skip
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        b = result["breakdown_ms"]
        print(
            f"model {Path(args.model).name}: {n_layers} layers, windows {windows} x k={args.k}, "
            f"{args.threads} threads, ring OMP_WAIT_POLICY={args.omp_wait_policy}"
        )
        print(
            f"TPOT single {single_tpot * 1e3:.2f} ms, ring {ring_tpot * 1e3:.2f} ms, ratio {result['ratio_median']:.3f} "
            f"(rounds: {', '.join(f'{x:.3f}' for x in result['ratios'])})"
        )
        print(f"per hop {hop:.0f} us ({n_hops:.0f} hops/token = {b['hops']:.2f} ms); windows' compute {b['windows_compute']:.2f} ms "
              f"({b['windows_compute_minus_single']:+.2f} ms vs the whole model); head {b['head_embed_output_sample']:.2f} ms; "
              f"rest {b['rest']:.2f} ms")  # fmt: skip
        hp = result["hop_parts_us"]
        print(f"hop = send {hp['send']:.0f} + transit {hp['transit']:.0f} + dispatch {hp['dispatch']:.0f} us (medians); "
              f"a bare pyzmq PUSH/PULL message of the same size: {result['bare_zmq_us']:.0f} us, "
              f"{result['bare_zmq_cold_us']:.0f} us when both sides stream a window's weights between messages")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
