"""Every default of a workload and of a real ring exists once: the CLI flags take theirs from the models and
constants (prima_sim.workload, prima_sim.exec.ring), so no two commands can drift apart."""

from __future__ import annotations

import argparse

from prima_sim.cli.main import build_parser
from prima_sim.exec.ring import DEFAULT_TIMEOUT_S, STARTUP_TIMEOUT_S
from prima_sim.workload import (
    DEFAULT_CTX,
    DEFAULT_DECODE_TOKENS,
    DEFAULT_PROMPT_TOKENS,
    DEFAULT_UBATCH,
    Workload,
)


def defaults(command: str) -> dict[str, object]:
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return {a.option_strings[-1]: a.default for a in sub.choices[command]._actions if a.option_strings}


def test_workload_defaults_are_the_constants() -> None:
    wl = Workload()
    assert (wl.n_ctx, wl.prompt_tokens, wl.decode_tokens, wl.n_ubatch, wl.n_seq) == (
        DEFAULT_CTX, DEFAULT_PROMPT_TOKENS, DEFAULT_DECODE_TOKENS, DEFAULT_UBATCH, 1)  # fmt: skip


def test_workload_flags_take_the_models_defaults() -> None:
    plan = defaults("plan")
    assert (plan["--ctx"], plan["--prompt-tokens"], plan["--tokens"], plan["--ubatch"], plan["--parallel"]) == (
        DEFAULT_CTX, DEFAULT_PROMPT_TOKENS, DEFAULT_DECODE_TOKENS, DEFAULT_UBATCH, 1)  # fmt: skip
    sim = defaults("simulate")
    assert sim["--ctx"] is None and sim["--parallel"] is None  # the plan's, else DEFAULT_CTX and 1
    assert (sim["--prompt-tokens"], sim["--tokens"], sim["--ubatch"]) == (
        DEFAULT_PROMPT_TOKENS, DEFAULT_DECODE_TOKENS, DEFAULT_UBATCH)  # fmt: skip
    sweep = defaults("sweep")
    assert (sweep["--ctx"], sweep["--ubatch"]) == (DEFAULT_CTX, DEFAULT_UBATCH)
    assert (sweep["--prompt-tokens"], sweep["--tokens"]) == (16, 8)  # a sweep's small requests, on purpose
    assert "--parallel" not in sweep


def test_ring_flags_share_one_batch_and_the_ring_timeouts() -> None:
    for command in ("run", "serve", "chat", "worker"):
        assert defaults(command)["--batch"] == DEFAULT_UBATCH, command
    for command in ("run", "serve", "chat"):
        d = defaults(command)
        assert (d["--timeout"], d["--startup-timeout"]) == (DEFAULT_TIMEOUT_S, STARTUP_TIMEOUT_S), command
