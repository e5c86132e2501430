"""How fast llama.cpp's decode streams a shard's weights: the median time of a one-token decode of a window.

``prima-sim emulate`` calibrates every emulated device with it (:mod:`prima_sim.emulate.calibrate`): it runs

    python -m prima_sim.exec.stream_probe LAYERS.gguf HEAD.gguf --threads N --tokens K

inside the device's CPU limits, where ``LAYERS.gguf`` is a vocabulary-free shard of the model's first layers
(what a worker's window runs, mode ``hidden``) and ``HEAD.gguf`` a logits shard of the last layer and the output
head (what the head runs, mode ``logits``). Each window is prefilled with 8 positions, then decodes ``K`` tokens
one by one, with a 30 ms pause before each (a ring device idles between its windows: it is probed the same
way). The last line of the output is one JSON object: ``{"layers_s": ..., "head_s": ...}``, the median seconds
of one token of each window.

With ``--prefill 16,128`` it also times the layers' window prefilling a prompt of each of those sizes from
position 0 (the median of :data:`PREFILL_REPS` calls, each after the same pause): ``"prefill_s": {"16": ...}``.
A prompt's micro-batch is compute-bound, and the rate a host computes at drifts by ~10% within an hour on a
shared machine while its memory bandwidth does not; the emulation measures it beside the decode for that reason.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np

from prima_sim.exec.llamacpp import Model, Window

N_CTX = 256
PREFILL = 8
IDLE_S = 0.03
PREFILL_REPS = 3  # timed prefills per size (the median is kept)


def time_window(path: str | Path, mode: str, n_threads: int, tokens: int,
                prefill: tuple[int, ...] = ()) -> tuple[float, dict[int, float]]:  # fmt: skip
    """(median seconds of one one-token decode, {n: median seconds of an n-token prefill from position 0}) of the
    shard at ``path`` as a ``mode`` window."""
    m = Model(path)
    w = Window(m, mode, N_CTX, max((PREFILL, *prefill)), n_threads)
    try:
        rng = np.random.default_rng(0)
        h = rng.standard_normal((1, m.n_embd)).astype(np.float32)
        w.run_hidden(np.repeat(h, PREFILL, 0), 0)
        ts = []
        for i in range(tokens):
            time.sleep(IDLE_S)
            t = time.perf_counter()
            w.run_hidden(h, PREFILL + i)
            ts.append(time.perf_counter() - t)
        pre: dict[int, float] = {}
        for n in prefill:
            hn = rng.standard_normal((n, m.n_embd)).astype(np.float32)
            tp = []
            for _ in range(PREFILL_REPS):
                time.sleep(IDLE_S)
                t = time.perf_counter()
                w.run_hidden(hn, 0)  # position 0: the window's cache is cut there first
                tp.append(time.perf_counter() - t)
            pre[n] = statistics.median(tp)
    finally:
        w.close()
        m.close()
    return statistics.median(ts), pre


def _sizes(text: str) -> tuple[int, ...]:
    try:
        out = tuple(sorted({int(x) for x in text.split(",") if x.strip()}))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: give token counts such as 16,128") from None
    if any(n < 1 or n > N_CTX for n in out):
        raise argparse.ArgumentTypeError(f"prefill sizes must be between 1 and {N_CTX}")
    return out


def main(argv: list[str] | None = None) -> int:
    """``python -m prima_sim.exec.stream_probe``."""
    p = argparse.ArgumentParser(
        prog="python -m prima_sim.exec.stream_probe", description=__doc__.split("\n\n")[0]
    )
    p.add_argument("layers", help="a vocabulary-free shard of layers (run as a 'hidden' window)")
    p.add_argument("head", help="a logits shard (run as a 'logits' window)")
    p.add_argument("--threads", type=int, required=True, help="llama.cpp threads")
    p.add_argument("--tokens", type=int, required=True, help="timed one-token decodes per window")
    p.add_argument(
        "--prefill", type=_sizes, default=(), help="also time prefills of these sizes (e.g. 16,128)"
    )
    args = p.parse_args(argv)
    if args.tokens < 1 or args.tokens > N_CTX - PREFILL:
        p.error(f"--tokens must be between 1 and {N_CTX - PREFILL}")
    layers_s, pre = time_window(args.layers, "hidden", args.threads, args.tokens, args.prefill)
    head_s, _ = time_window(args.head, "logits", args.threads, args.tokens)
    out: dict[str, object] = {"layers_s": layers_s, "head_s": head_s}
    if pre:
        out["prefill_s"] = {str(n): t for n, t in pre.items()}
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
