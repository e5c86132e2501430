"""``prima-sim chat``: an interactive multi-turn chat in the terminal, on a plan's ring or a running server.

Examples::

    prima-sim chat --local --plan plan.json --model smollm2-135m     # spawns the ring here
    prima-sim chat --url http://127.0.0.1:8000/v1                     # a running 'prima-sim serve'

Type a message and Enter; the reply streams in. ``/reset`` starts a new conversation, ``/quit`` (or Ctrl-D)
ends. With a plan, the ring's KV caches are reused from turn to turn (only the new turn is prefilled).
"""

from __future__ import annotations

import argparse
import json
import logging
import queue
import sys
from collections.abc import Callable, Iterator
from typing import Any

from prima_sim.cli.common import check_number
from prima_sim.cli.serve import add_ring_args
from prima_sim.errors import InputError, MissingDependencyError, PrimaSimError, WorkerError

Turn = Callable[[list[dict[str, Any]]], Iterator[str]]


def register(sub: Any) -> None:
    """Add the ``chat`` subcommand."""
    p = sub.add_parser(
        "chat",
        help="chat in the terminal with a plan's ring (spawned here) or a running 'prima-sim serve'",
        description="Interactive multi-turn chat: --local/--real with --plan builds the ring in this process; "
        "--url talks to a running server's /v1/chat/completions.",
    )
    add_ring_args(p, required=False)
    p.add_argument("--url", default=None, help="base URL of a running server, e.g. http://127.0.0.1:8000/v1")
    p.add_argument("--api-key", default=None, help="API key for --url (default: $PRIMA_SIM_API_KEY)")
    p.add_argument("--system", default=None, help="a system message that opens the conversation")
    p.add_argument("-n", "--max-tokens", type=int, default=256, help="most tokens per reply (default 256)")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-p", type=float, default=0.95)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=run)


def _engine_turn(args: argparse.Namespace) -> tuple[Turn, Callable[[], None]]:
    from prima_sim.cli.serve import build_engine
    from prima_sim.exec.engine import Event, Job
    from prima_sim.exec.head import SamplingParams

    engine = build_engine(args, queue_limit=1)
    engine.start()
    print("prima-sim chat: starting the ring ...", file=sys.stderr, flush=True)
    if not engine.wait_ready(args.startup_timeout + 30):
        engine.close()
        raise WorkerError(f"the ring did not start: {engine.error or 'timed out'}")
    sampling = SamplingParams(args.temperature, 40, args.top_p, args.seed)

    def turn(messages: list[dict[str, Any]]) -> Iterator[str]:
        events: queue.Queue[Event] = queue.Queue()
        job = Job(list(messages), args.max_tokens, sampling, (), events.put, chat=True)
        engine.submit(job)
        try:
            while True:
                ev = events.get()
                if ev.kind == "text":
                    yield ev.text
                elif ev.kind == "error":
                    raise WorkerError(ev.message) if ev.status >= 500 else InputError("chat", "", ev.message)
                else:
                    return
        finally:
            job.cancel()

    return turn, engine.close


def _http_turn(args: argparse.Namespace) -> tuple[Turn, Callable[[], None]]:
    try:
        import httpx
    except ImportError:
        raise MissingDependencyError("chat --url needs httpx: pip install 'prima-sim[serve]'") from None
    from prima_sim.exec.server import api_key_from_env

    key = args.api_key or api_key_from_env()
    client = httpx.Client(base_url=args.url.rstrip("/"), timeout=httpx.Timeout(10.0, read=None),
                          headers={"Authorization": f"Bearer {key}"} if key else {})  # fmt: skip

    def turn(messages: list[dict[str, Any]]) -> Iterator[str]:
        body = {"model": "", "messages": messages, "stream": True, "max_tokens": args.max_tokens,
                "temperature": args.temperature, "top_p": args.top_p, "seed": args.seed}  # fmt: skip
        try:
            with client.stream("POST", "/chat/completions", json=body) as r:
                if r.status_code != 200:
                    r.read()
                    try:
                        msg = r.json()["error"]["message"]
                    except (ValueError, KeyError, TypeError):
                        msg = r.text[:200]
                    raise WorkerError(f"{args.url} answered {r.status_code}: {msg}")
                for line in r.iter_lines():
                    if not line.startswith("data: "):
                        continue
                    data = line[6:]
                    if data == "[DONE]":
                        return
                    obj = json.loads(data)
                    if "error" in obj:
                        raise WorkerError(f"{args.url}: {obj['error'].get('message')}")
                    for c in obj.get("choices", []):
                        piece = c.get("delta", {}).get("content")
                        if piece:
                            yield piece
        except httpx.HTTPError as exc:
            raise WorkerError(f"{args.url}: {exc}") from None

    return turn, client.close


def run(args: argparse.Namespace) -> int:
    """Entry point of ``prima-sim chat``."""
    logging.basicConfig(level=args.log_level, format="%(asctime)s chat %(levelname)s %(message)s")
    if args.max_tokens < 1:
        raise InputError("--max-tokens", "", f"must be at least 1, got {args.max_tokens}")
    check_number("--temperature", args.temperature, minimum=0)
    check_number("--top-p", args.top_p, above=0, maximum=1)
    check_number("--seed", args.seed, minimum=0)
    if args.url and (args.local or args.real or args.plan):
        raise InputError(
            "--url", "", "talk to a running server (--url) or build a ring (--local/--real --plan), not both"
        )
    if args.url and args.draft:
        raise InputError("--draft", "", "a server speculates with its own draft model ('prima-sim serve --draft'); "
                         "drop --draft with --url")  # fmt: skip
    if not args.url and not (args.local or args.real):
        raise InputError("--url", "", "give --url of a running server, or --local/--real with --plan")
    turn, close = _http_turn(args) if args.url else _engine_turn(args)
    history: list[dict[str, Any]] = [{"role": "system", "content": args.system}] if args.system else []
    interactive = sys.stdin.isatty()
    try:
        while True:
            if interactive:
                print("> ", end="", flush=True)
            line = sys.stdin.readline()
            if not line:
                break
            text = line.rstrip("\n")
            if text.strip() in ("/quit", "/exit"):
                break
            if text.strip() == "/reset":
                history = history[:1] if args.system else []
                print("(new conversation)", flush=True)
                continue
            if not text.strip():
                continue
            history.append({"role": "user", "content": text})
            reply = []
            try:
                for piece in turn(history):
                    reply.append(piece)
                    sys.stdout.write(piece)
                    sys.stdout.flush()
            except KeyboardInterrupt:
                print("\n(interrupted)", flush=True)
            except PrimaSimError as exc:
                history.pop()
                print(f"\nprima-sim chat: error: {exc}", file=sys.stderr, flush=True)
                continue
            print(flush=True)
            history.append({"role": "assistant", "content": "".join(reply)})
    finally:
        close()
    return 0
