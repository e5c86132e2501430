"""Speculative decoding on a real loopback ring: measured against the cost model's ``speculation`` prediction.

SmolLM2-135M (bundled) on a ring of ``--windows`` (default 10/12/8: three processes, one thread each), greedy,
end-of-generation ignored. Per round it runs, interleaved so that every configuration sees the same load:

* ``plain``: one token per ring pass;
* ``draft = target``: ``--draft SmolLM2-135M --draft-max N``, the target itself as the draft: every draft is
  accepted, so this is the **upper bound** of speculation (a real draft is smaller, faster and wrong sometimes);
* ``draft, p wrong``: the same draft with each proposal replaced by a wrong token with probability ``p``
  (``--wrong``, seeded): acceptance about ``1 - p``, a real draft's acceptance at the draft's cost.

Each of them runs twice: with llama.cpp's default attention and with flash attention in every process
(``--flash-attn``): only with the latter is a verification row bit for bit the single-token result (docs/exec.md),
so only there does draft = target accept everything and give exactly the plain output (``same ids``).

For each it prints the measured decode tokens/s (tokens after the first over the decode steps' time), the
acceptance rate a (accepted / (accepted + first rejections), the cost model's meaning) and tokens per pass, next to
``halda.costmodel.speculation(...)`` for the measured a: tokens per pass ``expected_tokens(a, N)``, TPOT, and the
speed-up over plain decoding. The cost model needs this host's profile: ``--profile FILE`` (a device TOML from
``prima-sim profile``), else one is measured first (``--quick-profile``: a quick one); the ring's links are loopback
(``--hop-ms``, default 0.5 ms one way, as measured per hop by bench_ring for one thread per process, unpinned, wire v3).

Run it on a quiet machine (``flock -x /tmp/prima-cpu.lock``); the numbers are printed, not asserted.

    python benchmarks/bench_spec.py [--tokens 64 --rounds 3 --draft-max 4 --wrong 0.3]
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any

from loopback import add_host_args, host_profile, loopback_cluster

from prima_sim.devices.bundled import smollm2_path
from prima_sim.devices.model import model_profile_from_gguf
from prima_sim.exec import spec
from prima_sim.exec.llamacpp import use_flash_attn
from prima_sim.exec.runner import RunOptions, decode_rate, run_ring
from prima_sim.halda.costmodel import expected_tokens, speculation
from prima_sim.plan import Plan, make_assignments
from prima_sim.workload import Workload

PROMPT = "Write a short story about a lighthouse keeper who finds a message in a bottle."
N_CTX = 512


def wrong_drafts(p: float, seed: int) -> Any:
    """A ``Draft.propose`` that replaces each proposed token by another with probability ``p``."""
    real = spec.Draft.propose
    rng = random.Random(seed)

    def propose(self: spec.Draft, context: list[int], n: int) -> list[int]:
        return [(t + 1) % self.model.n_vocab if rng.random() < p else t for t in real(self, context, n)]

    return propose


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--windows", default="10,12,8", help="layers per device (SmolLM2 has 30)")
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--draft-max", type=int, default=4)
    ap.add_argument("--wrong", type=float, default=0.3, help="probability that a proposal is made wrong")
    ap.add_argument("--threads", type=int, default=1)
    add_host_args(ap)
    args = ap.parse_args()
    model = smollm2_path()
    mp = model_profile_from_gguf(model)
    windows = tuple(int(w) for w in args.windows.split(","))
    names = [f"D{i}" for i in range(len(windows))]
    k = -(-mp.arch.n_layer // sum(windows))
    plan = Plan(model_id="smollm2", n_layers=mp.arch.n_layer, cluster_name="loopback", k=k, n_ctx=N_CTX,
                devices=make_assignments(names, windows, [0] * len(windows), mp.arch.n_layer), scheduler="manual")  # fmt: skip

    with tempfile.TemporaryDirectory(prefix="bench-spec-profile-") as ptmp:
        host = host_profile(args, model, Path(ptmp))
    cluster = loopback_cluster(host, len(names), args.hop_ms)

    kinds: list[tuple[str, bool, float]] = [("plain", False, 0.0), ("draft = target", True, 0.0)]
    if args.wrong > 0:
        kinds.append((f"draft, {args.wrong:g} wrong", True, args.wrong))
    configs = [(f"{n}{', FA' if fa else ''}", d, w, fa) for fa in (False, True) for n, d, w in kinds]
    measured: dict[str, list[dict[str, float]]] = {c[0]: [] for c in configs}
    measured_ids: dict[bool, list[int]] = {}
    n_prompt = 1
    with tempfile.TemporaryDirectory(prefix="bench-spec-") as tmp:
        for r in range(args.rounds):
            for name, draft, wrong, fa in configs:
                use_flash_attn(fa)  # every process of the ring: the --local ring passes --flash-attn on
                opts = RunOptions(n_predict=args.tokens, ignore_eos=True, threads=dict.fromkeys(names, args.threads),
                                  draft=model if draft else None, draft_max=args.draft_max)  # fmt: skip
                saved = spec.Draft.propose
                if wrong > 0:
                    spec.Draft.propose = wrong_drafts(wrong, 1000 + r)  # type: ignore[method-assign]
                try:
                    rep = run_ring(plan, model, PROMPT, opts, local=True, shard_dir=Path(tmp) / "shards")
                finally:
                    spec.Draft.propose = saved  # type: ignore[method-assign]
                g = rep.last
                assert g is not None
                row = {"tps": decode_rate(g)}
                if g.spec is not None:
                    row |= {"a": g.spec.accept_rate, "tpp": g.spec.tokens_per_pass,
                            "draft_ms": 1e3 * g.spec.draft_s / max(g.spec.drafted, 1)}  # fmt: skip
                    row["ids_equal"] = float(g.token_ids == measured_ids.get(fa, g.token_ids))
                else:
                    measured_ids[fa], n_prompt = g.token_ids, len(g.prompt_tokens)
                measured[name].append(row)
                print(f"round {r + 1} {name}: {row}", file=sys.stderr, flush=True)

    wl = Workload(n_ctx=N_CTX, prompt_tokens=n_prompt, decode_tokens=args.tokens - 1)
    print(f"\nSmolLM2-135M Q4_1, ring {args.windows} (k = {k}), {args.threads} thread(s) per process, {args.tokens} "
          f"tokens, greedy, draft-max {args.draft_max}, median of {args.rounds} rounds; cost model on this host's "
          f"profile with {args.hop_ms:g} ms loopback hops")  # fmt: skip
    hdr = (f"{'config':<22} {'accept a':>8} {'tok/pass':>8} {'model tok/pass':>14} {'tok/s':>7} {'model tok/s':>11} "
           f"{'err%':>6} {'speed-up':>8} {'model speed-up':>14} {'same ids':>8}")  # fmt: skip
    print(hdr)
    print("-" * len(hdr))
    for name, draft, _, fa in configs:
        xs = measured[name]
        tps = statistics.median(x["tps"] for x in xs)
        plain_tps = statistics.median(x["tps"] for x in measured["plain, FA" if fa else "plain"])
        if not draft:
            p = speculation(plan, cluster, mp, wl, mp, 1.0, args.draft_max)
            err = 100 * (1 / p.plain_tpot_s - tps) / tps
            print(f"{name:<22} {'-':>8} {1.0:>8.2f} {1.0:>14.2f} {tps:>7.1f} {1 / p.plain_tpot_s:>11.1f} {err:>+6.1f} "
                  f"{1.0:>8.2f} {1.0:>14.2f} {'-':>8}")  # fmt: skip
            continue
        a = statistics.median(x["a"] for x in xs)
        tpp = statistics.median(x["tpp"] for x in xs)
        p = speculation(plan, cluster, mp, wl, mp, a, args.draft_max)
        same = "yes" if all(x["ids_equal"] == 1.0 for x in xs) else "NO"
        err = 100 * (1 / p.tpot_s - tps) / tps
        print(f"{name:<22} {a:>8.3f} {tpp:>8.2f} {expected_tokens(a, args.draft_max):>14.2f} {tps:>7.1f} "
              f"{1 / p.tpot_s:>11.1f} {err:>+6.1f} {tps / plain_tps:>8.2f} {p.speedup:>14.2f} {same:>8}")  # fmt: skip
    p = speculation(plan, cluster, mp, wl, mp, 1.0, args.draft_max)
    drafts = [x["draft_ms"] for c in configs if c[1] for x in measured[c[0]]]
    print(
        "(FA: flash attention in every process; err: (model - measured) / measured tokens/s; speed-up: over plain "
        "decoding with the same attention; same ids: the plain decoding's tokens with the same attention)"
    )
    print(f"\ndraft (the target itself on the head): measured {statistics.median(drafts):.2f} ms per drafted token "
          f"(its catch-up decodes included), model {p.draft_s * 1e3:.2f} ms; one verification pass of "
          f"{args.draft_max + 1} rows, model {p.verify_s * 1e3:.1f} ms against {p.plain_tpot_s * 1e3:.1f} ms plain")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
