"""``prima-sim serve``: the head as a long-running OpenAI-compatible server over a ring of persistent workers.

Examples::

    # every device on this host, over loopback (workers are spawned, and respawned after a failure)
    prima-sim serve --local --plan plan.json --model smollm2-135m --port 8000
    # real machines, each running 'prima-sim worker --persist --hosts hosts.toml --device NAME --shards DIR'
    prima-sim serve --real --plan plan.json --hosts hosts.toml --host 0.0.0.0 --api-key "$KEY"

Then point any OpenAI client at ``http://HOST:PORT/v1``. The shards load once; requests are served one at a
time, or ``--parallel N`` at once batched into one pass per window, from a bounded FIFO queue (``--queue``;
429 beyond it). docs/serve.md lists endpoints, options and errors.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path
from typing import Any

from prima_sim.cli.common import (
    add_draft_args,
    add_ring_runtime_args,
    apply_flash_attn,
    check_draft_args,
    check_number,
    check_threads,
    plan_gguf,
)
from prima_sim.errors import InputError, MissingDependencyError
from prima_sim.plan import Plan

DEFAULT_PORT = 8000


def add_ring_args(p: argparse.ArgumentParser, required: bool = True) -> None:
    """The options that say which ring to build (shared by ``serve`` and ``chat``)."""
    mode = p.add_mutually_exclusive_group(required=required)
    mode.add_argument(
        "--real", action="store_true", help="workers already run (with --persist) on the hosts in --hosts"
    )
    mode.add_argument("--local", action="store_true", help="spawn every worker on this host (loopback)")
    p.add_argument("--plan", default=None, help="plan JSON")
    p.add_argument(
        "--model",
        default=None,
        help="the model's GGUF, or smollm2-135m (default: the GGUF the plan was made from)",
    )
    p.add_argument("--shards", default=None, help="shard directory (one sub-directory per device)")
    p.add_argument("--hosts", default=None, help="hosts.toml (--real; default: loopback)")
    add_ring_runtime_args(p)
    add_draft_args(p)
    p.add_argument(
        "--log-level", default="WARNING", type=str.upper, choices=["DEBUG", "INFO", "WARNING", "ERROR"]
    )


def register(sub: Any) -> None:
    """Add the ``serve`` subcommand."""
    p = sub.add_parser(
        "serve",
        help="serve a plan's ring as an OpenAI-compatible HTTP API (/v1/chat/completions, ...)",
        description="Run the head as a long-running server: the ring's shards load once, and /v1/models, "
        "/v1/completions and /v1/chat/completions (streaming or not) serve requests (--parallel at once) from a "
        "bounded queue. Binds to 127.0.0.1 unless --host says otherwise (then --api-key is required).",
    )
    add_ring_args(p)
    p.add_argument(
        "--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)"
    )
    p.add_argument("--port", type=int, default=DEFAULT_PORT, help=f"port (default {DEFAULT_PORT})")
    p.add_argument(
        "--api-key",
        default=None,
        help="clients must send 'Authorization: Bearer KEY' (default: $PRIMA_SIM_API_KEY); required "
        "when --host is not a loopback address",
    )
    p.add_argument(
        "--parallel", type=int, default=1,
        help="sequences in flight at once, batched into one pass per window (default 1); every window's KV cache "
        "holds that many contexts",
    )  # fmt: skip
    p.add_argument(
        "--queue",
        type=int,
        default=32,
        help="requests that may wait while --parallel run (default 32; 429 beyond)",
    )
    p.add_argument(
        "--served-model-name", default=None, help="the model id clients see (default: the plan's model id)"
    )
    p.set_defaults(func=run)


def build_engine(args: argparse.Namespace, queue_limit: int, parallel: int = 1) -> Any:
    """An :class:`~prima_sim.exec.engine.Engine` for the ring the arguments describe (not started).

    Raises:
        InputError: a bad option, plan, model, shard directory or hosts file.
    """
    policy = None if args.omp_wait_policy == "default" else args.omp_wait_policy
    if args.local:  # before llama.cpp (libgomp) is loaded in this process
        os.environ.pop("OMP_WAIT_POLICY", None)
        if policy:
            os.environ["OMP_WAIT_POLICY"] = policy
    if not args.plan:
        raise InputError("--plan", "", "a plan is required")
    if args.batch < 1:
        raise InputError("--batch", "", f"must be at least 1, got {args.batch}")
    check_number("--timeout", args.timeout, above=0)
    check_number("--startup-timeout", args.startup_timeout, above=0)
    check_threads("--threads", args.threads)
    if not 1 <= parallel <= args.batch:
        raise InputError("--parallel", "", f"must be 1..--batch ({args.batch}), got {parallel}")
    draft = check_draft_args(args)
    apply_flash_attn(args)
    from prima_sim.cli.worker import threads_for
    from prima_sim.exec.engine import Engine, RingSpec
    from prima_sim.exec.hosts import load_hosts
    from prima_sim.exec.llamacpp import supports_gpu_offload
    from prima_sim.exec.runner import check_gpu, default_shard_dir, ensure_shards
    from prima_sim.exec.spec import DEFAULT_DRAFT_MAX

    plan = Plan.load(args.plan)
    if parallel > plan.n_seq:
        logging.getLogger("prima_sim.notes").warning(
            "the plan reserves KV cache for %d sequence(s) per window and --parallel %d needs %d times as much: its "
            "memory check does not cover this; re-plan with 'prima-sim plan --parallel %d'",
            plan.n_seq, parallel, parallel, parallel,
        )  # fmt: skip
    model = plan_gguf(plan, args.plan, args.model, required=args.shards is None)
    if args.local and any(d.gpu_layers for d in plan.devices) and not supports_gpu_offload():
        logging.getLogger("prima_sim.notes").info(
            "this llama.cpp build has no GPU backend: the plan's GPU layers run on the CPU"
        )
        plan = plan.on_cpus()
    check_gpu(plan, devices=None if args.local else [plan.head])
    names = [d.name for d in plan.devices]
    shard_dir = Path(args.shards) if args.shards else default_shard_dir(model, plan)  # type: ignore[arg-type]
    if model is not None:
        ensure_shards(model, plan, shard_dir, names if args.local else [plan.head], progress=True)
    threads = {d: threads_for(d, args.threads, args.cluster) for d in names}
    spec = RingSpec(plan, shard_dir, local=args.local, hosts=load_hosts(args.hosts) if args.hosts else None,
                    hosts_source=args.hosts or "hosts.toml", threads=threads, prefetch=not args.no_prefetch,
                    n_batch=args.batch, timeout_s=args.timeout, startup_timeout_s=args.startup_timeout,
                    omp_wait_policy=policy, n_seq=parallel, draft=draft,
                    draft_max=getattr(args, "draft_max", DEFAULT_DRAFT_MAX))  # fmt: skip
    return Engine(spec, queue_limit)


def run(args: argparse.Namespace) -> int:
    """Entry point of ``prima-sim serve``."""
    logging.basicConfig(level=args.log_level, format="%(asctime)s serve %(levelname)s %(message)s")
    from prima_sim.exec.server import api_key_from_env, is_loopback

    if not 0 < args.port < 65536:
        raise InputError("--port", "", f"must be 1..65535, got {args.port}")
    if args.queue < 0:
        raise InputError("--queue", "", f"must be at least 0, got {args.queue}")
    api_key = args.api_key or api_key_from_env()
    if not is_loopback(args.host) and not api_key:
        raise InputError("--host", "", f"{args.host} is reachable from other machines: give --api-key (or set "
                         "PRIMA_SIM_API_KEY), or bind 127.0.0.1")  # fmt: skip
    try:
        import uvicorn

        from prima_sim.exec.server import create_app
    except ImportError:
        raise MissingDependencyError(
            "the server needs Starlette and uvicorn: pip install 'prima-sim[serve]'"
        ) from None
    engine = build_engine(args, args.queue, args.parallel)
    model_id = args.served_model_name or engine.spec.plan.model_id
    app = create_app(engine, model_id, api_key)
    engine.start()
    print(f"prima-sim serve: {model_id} on a ring of {len(engine.spec.plan.devices)} device(s) at "
          f"http://{args.host}:{args.port}/v1 (GET /health says when the ring is ready)", file=sys.stderr, flush=True)  # fmt: skip

    class Server(uvicorn.Server):
        def handle_exit(self, sig: int, frame: Any) -> None:
            super().handle_exit(sig, frame)
            # uvicorn re-raises a captured SIGINT/SIGTERM after its shutdown, which would end this process
            # before the ring is stopped: forget it, return, stop the ring, exit 0
            self._captured_signals.clear()  # uvicorn >= 0.29 (pyproject) has it

    config = uvicorn.Config(app, host=args.host, port=args.port, log_level=args.log_level.lower(), lifespan="off",
                            timeout_graceful_shutdown=5)  # fmt: skip
    try:
        Server(config).run()
    finally:
        engine.close()
    if engine.error and engine.state != "ready" and engine.served == 0:
        print(f"prima-sim serve: the ring never became ready: {engine.error}", file=sys.stderr)
    return 0
