"""``prima-sim run --real | --local``: generate text on a real ring of llama.cpp workers and measure it.

Examples::

    # every device on this host, over loopback (workers are spawned and cleaned up)
    prima-sim run --local --plan plan.json --model model.gguf --prompt "Hello" -n 32 --json
    # real machines, each running 'prima-sim worker --hosts hosts.toml --device NAME --shards DIR'
    prima-sim run --real --plan plan.json --model model.gguf --hosts hosts.toml --prompt "Hello" -n 32 --out m/
    # speculative decoding: a small draft model with the same vocabulary proposes, the ring verifies
    prima-sim run --local --plan plan.json --model model.gguf --draft small.gguf --draft-max 4 --prompt "Hello"

This process is the head (ring[0]): it tokenizes, embeds, runs the last window of every round, the output
head and sampling. ``--out DIR`` writes tokens.csv, trace.json and summary.json in the simulator's formats.
A worker that dies or goes silent ends the run within ``--timeout`` seconds with exit status 3.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path
from typing import Any

from prima_sim.cli.common import (
    LINK_LATENCY_HELP,
    add_draft_args,
    add_ring_runtime_args,
    apply_flash_attn,
    check_draft_args,
    check_number,
    check_threads,
    plan_gguf,
    print_json,
)
from prima_sim.errors import InputError
from prima_sim.plan import Plan


def register(sub: Any) -> None:
    """Add the ``run`` subcommand."""
    p = sub.add_parser(
        "run",
        help="generate on a real ring of llama.cpp workers (--real) or on this host (--local)",
        description="Run a plan for real: this process is the head; the other devices run 'prima-sim worker' "
        "(--real, addresses from --hosts) or are spawned here over loopback (--local).",
    )
    mode = p.add_mutually_exclusive_group(required=True)
    mode.add_argument("--real", action="store_true", help="workers already run on the machines in --hosts")
    mode.add_argument("--local", action="store_true", help="spawn every worker on this host (loopback)")
    p.add_argument("--plan", required=True, help="plan JSON")
    p.add_argument(
        "--model",
        default=None,
        help="the model's GGUF, or smollm2-135m (default: the GGUF the plan was made from); shards are cut "
        "from it and cached ('prima-sim cache' lists them)",
    )
    p.add_argument("--shards", default=None, help="shard directory (one sub-directory per device)")
    p.add_argument("--hosts", default=None, help="hosts.toml (default: loopback; --local picks free ports)")
    p.add_argument("--prompt", required=True, help="prompt text")
    p.add_argument("-n", "--n-predict", type=int, default=32, help="tokens to generate (default 32)")
    p.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-k", type=int, default=40)
    p.add_argument("--top-p", type=float, default=0.95)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--ignore-eos", action="store_true", help="do not stop at end-of-generation tokens")
    add_ring_runtime_args(p)
    p.add_argument("--link-latency", default="", metavar="JSON", help=LINK_LATENCY_HELP)
    add_draft_args(p)
    p.add_argument("--out", default=None, help="directory for tokens.csv, trace.json, summary.json")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of streaming text")
    p.add_argument(
        "--log-level", default="WARNING", type=str.upper, choices=["DEBUG", "INFO", "WARNING", "ERROR"]
    )
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Entry point of ``prima-sim run``."""
    logging.basicConfig(level=args.log_level, format="%(asctime)s head %(levelname)s %(message)s")
    policy = None if args.omp_wait_policy == "default" else args.omp_wait_policy
    if args.local:  # before llama.cpp (libgomp) is loaded in this process
        os.environ.pop("OMP_WAIT_POLICY", None)
        if policy:
            os.environ["OMP_WAIT_POLICY"] = policy
    for name, v in (("--n-predict", args.n_predict), ("--batch", args.batch)):
        if v < 1:
            raise InputError(name, "", f"must be at least 1, got {v}")
    check_number("--timeout", args.timeout, above=0)
    check_number("--startup-timeout", args.startup_timeout, above=0)
    check_number("--temperature", args.temperature, minimum=0)
    check_number("--top-k", args.top_k, minimum=0)
    check_number("--top-p", args.top_p, above=0, maximum=1)
    check_number("--seed", args.seed, minimum=0)
    check_threads("--threads", args.threads)
    draft = check_draft_args(args)
    apply_flash_attn(args)
    from prima_sim.cli.worker import threads_for
    from prima_sim.exec.head import SamplingParams
    from prima_sim.exec.hosts import load_hosts
    from prima_sim.exec.llamacpp import supports_gpu_offload
    from prima_sim.exec.ring import parse_latency_table
    from prima_sim.exec.runner import RunOptions, run_ring

    link_latency = parse_latency_table(args.link_latency)

    plan = Plan.load(args.plan)
    if args.n_predict >= plan.n_ctx:
        raise InputError("-n/--n-predict", "", f"{args.n_predict} new tokens do not fit the plan's context of "
                         f"{plan.n_ctx} tokens (the prompt needs room too): lower -n or re-plan with a larger --ctx")  # fmt: skip
    model = plan_gguf(plan, args.plan, args.model, required=args.shards is None)
    if args.local and any(d.gpu_layers for d in plan.devices) and not supports_gpu_offload():
        gpu = ", ".join(f"{d.name} {d.gpu_layers}" for d in plan.devices if d.gpu_layers)
        logging.getLogger("prima_sim.notes").info(
            "this llama.cpp build has no GPU backend: the plan's GPU layers per window (%s) run on the CPU; "
            "'prima-sim plan --cpu-only' makes a plan (and a prediction) for CPUs only", gpu)  # fmt: skip
        plan = plan.on_cpus()
    threads = {d.name: threads_for(d.name, args.threads, args.cluster) for d in plan.devices}
    opts = RunOptions(
        n_predict=args.n_predict, chat=args.chat, ignore_eos=args.ignore_eos, threads=threads,
        sampling=SamplingParams(args.temperature, args.top_k, args.top_p, args.seed),
        prefetch=not args.no_prefetch, n_batch=args.batch, timeout_s=args.timeout,
        startup_timeout_s=args.startup_timeout, omp_wait_policy=policy, progress=True,
        link_latency=link_latency, draft=draft, draft_max=args.draft_max,
    )  # fmt: skip
    hosts = load_hosts(args.hosts) if args.hosts else None

    def stream(piece: str) -> None:
        sys.stdout.write(piece)
        sys.stdout.flush()

    report = run_ring(
        plan, model, args.prompt, opts, local=args.local, hosts=hosts,
        hosts_source=args.hosts or "hosts.toml", shard_dir=Path(args.shards) if args.shards else None,
        out_dir=Path(args.out) if args.out else None, on_text=None if args.json else stream,
    )  # fmt: skip
    if args.json:
        print_json(report.to_json())
    else:
        s = report.summary
        print(flush=True)
        print(f"[{len(report.last.token_ids) if report.last else 0} tokens; TTFT {s.get('ttft_s', 0) * 1e3:.1f} ms; "
              f"TPOT {s.get('tpot_s', float('nan')) * 1e3:.2f} ms]", file=sys.stderr)  # fmt: skip
        spec = report.to_json().get("speculation")
        if spec:
            print(f"[speculative decoding: {spec['accepted']} of {spec['drafted']} drafted tokens accepted "
                  f"(acceptance {spec['accept_rate']:.2f}), {spec['tokens_per_pass']:.2f} tokens per verification "
                  f"pass (TPOT above is per pass), {spec['decode_tokens_per_s']:.1f} tokens/s]", file=sys.stderr)  # fmt: skip
    return 0
