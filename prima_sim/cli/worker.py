"""``prima-sim worker``: serve one device of a real ring.

Example::

    prima-sim worker --hosts hosts.toml --device laptop --shards shards/laptop --threads 8

The worker loads its shards (mmap), listens at its address from hosts.toml, runs each window as hidden states
arrive, passes them on, and prefetches its next window after each send. It exits after the head's ``stop``
(or keeps serving with ``--persist``); SIGTERM and Ctrl-C end it cleanly.
"""

from __future__ import annotations

import argparse
import logging
import signal
from typing import Any

from prima_sim.cli.common import (
    BATCH_HELP,
    LINK_LATENCY_HELP,
    add_flash_attn_arg,
    apply_flash_attn,
    check_number,
    check_threads,
)
from prima_sim.errors import InputError
from prima_sim.workload import DEFAULT_UBATCH


def register(sub: Any) -> None:
    """Add the ``worker`` subcommand."""
    p = sub.add_parser(
        "worker",
        help="run one device of a real ring (llama.cpp + ZeroMQ)",
        description="Serve one non-head device of a plan: load its layer-window shards with llama.cpp, receive "
        "hidden states from its predecessor, run its windows and send the results on.",
    )
    p.add_argument(
        "--hosts", default=None, help="hosts.toml (default: every device on 127.0.0.1, ports from 29500)"
    )
    p.add_argument("--device", required=True, help="this device's name in the plan")
    p.add_argument(
        "--shards", required=True, help="shard directory (this device's, or the one holding all devices')"
    )
    g = p.add_mutually_exclusive_group()
    g.add_argument(
        "--threads",
        type=int,
        default=None,
        help="llama.cpp threads (default: the device profile's, or all CPUs)",
    )
    g.add_argument("--cluster", default=None, help="cluster file whose device profile gives the thread count")
    p.add_argument("--no-prefetch", action="store_true", help="do not advise readahead of the next window")
    p.add_argument("--batch", type=int, default=DEFAULT_UBATCH,
                   help="largest " + BATCH_HELP + ", at least the head's --batch (default: %(default)s)")  # fmt: skip
    p.add_argument(
        "--no-verify", action="store_true", help="skip the SHA-256 check of the shards at start-up"
    )
    p.add_argument("--persist", action="store_true", help="keep serving after the head stops")
    p.add_argument("--link-latency", default="", metavar="JSON", help=LINK_LATENCY_HELP)
    add_flash_attn_arg(p)
    p.add_argument(
        "--parallel",
        type=int,
        default=1,
        help="sequences each window's KV cache holds (must match the head's 'serve --parallel')",
    )
    p.add_argument(
        "--log-level", default="INFO", type=str.upper, choices=["DEBUG", "INFO", "WARNING", "ERROR"]
    )
    p.set_defaults(func=run)


def threads_for(device: str, threads: int | None, cluster: str | None) -> int:
    """Threads from the flag, else the cluster's device profile, else every CPU of this host."""
    from prima_sim.exec.llamacpp import default_threads

    if threads is not None:
        check_threads("--threads", threads)
        return threads
    if cluster:
        from prima_sim.devices.cluster import load_cluster

        c = load_cluster(cluster)
        try:
            return c.device(device).n_threads
        except KeyError:
            raise InputError(cluster, "devices", f"has no device {device!r}") from None
    return default_threads()


def run(args: argparse.Namespace) -> int:
    """Entry point of ``prima-sim worker``."""
    logging.basicConfig(level=args.log_level, format=f"%(asctime)s {args.device} %(levelname)s %(message)s")
    check_threads("--threads", args.threads)
    check_number("--batch", args.batch, minimum=1)
    check_number("--parallel", args.parallel, minimum=1)
    apply_flash_attn(args)
    from prima_sim.exec.hosts import load_hosts, resolve
    from prima_sim.exec.manifest import load_manifest, shard_path
    from prima_sim.exec.ring import parse_latency_table
    from prima_sim.exec.worker import Worker

    link_latency = parse_latency_table(args.link_latency)
    man = load_manifest(args.shards, args.device, verify=not args.no_verify)
    shard_dir = shard_path(args.shards, man, man.shards[0]).parent
    plan = man.plan
    endpoints = resolve(load_hosts(args.hosts), plan, args.hosts or "hosts.toml")
    w = Worker(shard_dir, man, endpoints, threads_for(args.device, args.threads, args.cluster),
               prefetch=not args.no_prefetch, n_batch=args.batch, persist=args.persist,
               n_seq=args.parallel, link_latency=link_latency)  # fmt: skip
    signal.signal(signal.SIGTERM, lambda *_: w.stop())
    signal.signal(signal.SIGINT, lambda *_: w.stop())
    return w.run()
