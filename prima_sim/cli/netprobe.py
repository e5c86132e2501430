"""``prima-sim netprobe``: measure latency and bandwidth to another host over ZeroMQ, or serve such probes."""

from __future__ import annotations

import argparse
import socket
import sys

from prima_sim.cli.common import check_number, print_json
from prima_sim.devices.profiler import host_profile_name
from prima_sim.errors import InputError
from prima_sim.units import UnitError, fmt_bytes, parse_bytes


def register(sub: argparse._SubParsersAction) -> None:
    """Add the ``netprobe`` subcommand."""
    p = sub.add_parser(
        "netprobe",
        help="measure RTT latency and bandwidth to a host running `prima-sim netprobe --serve`",
        description="Measure the network between this host and another over ZeroMQ (the transport of the real "
        "ring): median round-trip time of small messages (one-way latency = RTT/2) and the bandwidth of bulk "
        "transfers in both directions. Prints a [[links]] table ready to paste into a cluster file. "
        "On the other host run `prima-sim netprobe --serve`.",
    )
    p.add_argument("address", nargs="?", help="HOST:PORT of a netprobe server (default port 5590)")
    p.add_argument("--serve", action="store_true", help="answer probes until interrupted (Ctrl-C)")
    p.add_argument(
        "--bind",
        default="0.0.0.0:5590",
        help="with --serve: HOST:PORT to listen on; port 0 picks a free one (default: %(default)s)",
    )
    p.add_argument("--size", default="8MiB", help="bytes per bulk transfer (default: %(default)s)")
    p.add_argument(
        "--count", type=int, default=5, help="timed bulk transfers per direction (default: %(default)s)"
    )
    p.add_argument("--pings", type=int, default=50, help="round trips for the latency (default: %(default)s)")
    p.add_argument(
        "--timeout",
        type=float,
        default=5.0,
        help="seconds to wait for any answer (default: %(default)s); bulk transfers get size/10 Mbit/s more",
    )
    p.add_argument(
        "--local-name", help="device name of this host in the [[links]] snippet (default: host name)"
    )
    p.add_argument(
        "--remote-name", help="device name of the other host in the snippet (default: its host name)"
    )
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Serve or probe."""
    from prima_sim.exec import netprobe as np_

    if args.serve:
        if args.address:
            raise InputError(
                "netprobe", "", "give either --serve (with --bind) or HOST:PORT to probe, not both"
            )

        def ready(endpoint: str) -> None:
            print(
                f"netprobe: serving on {endpoint} (host {socket.gethostname()}); Ctrl-C to stop", flush=True
            )

        np_.serve(args.bind, on_ready=ready)
        return 0
    if not args.address:
        raise InputError(
            "netprobe", "", "missing HOST:PORT of a `prima-sim netprobe --serve` host (or give --serve)"
        )
    try:
        size = parse_bytes(args.size)
    except UnitError as exc:
        raise InputError("--size", "", str(exc)) from None
    if not 1 <= size <= np_.MAX_TRANSFER:
        raise InputError("--size", "", f"must be between 1 B and {fmt_bytes(np_.MAX_TRANSFER)} (it is held in memory), "
                         f"got {args.size!r}")  # fmt: skip
    check_number("--count", args.count, minimum=1)
    check_number("--pings", args.pings, minimum=1)
    check_number("--timeout", args.timeout, above=0)
    host, port = np_.parse_address(args.address, default_port=np_.DEFAULT_PORT)
    address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    result = np_.probe(address, size=size, count=args.count, pings=args.pings, timeout_s=args.timeout)
    local = args.local_name or host_profile_name()
    remote = args.remote_name or host_profile_name(result.remote_host or host)
    snippet = result.link_toml(local, remote)
    if args.json:
        print_json(result.to_dict() | {"local_name": local, "remote_name": remote, "links_toml": snippet})
    else:
        print(np_.format_result(result))
        print()
        print("# paste into the cluster file:")
        sys.stdout.write(snippet)
    return 0
