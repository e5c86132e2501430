"""One stock llama.cpp process over the whole, unsplit GGUF: the single-device baseline the paper compares with.

No shards, no ring, no eval callbacks: llama.cpp (through llama-cpp-python) loads the original file with mmap
(``use_extra_bufts = False``, so the weights stay file-backed page cache a memory limit can evict, as in
prima.cpp and in this project's executor; with repacked buffers the whole model would be anonymous memory)
and decodes greedily, one ``llama_decode`` per token. Timed: the load, the prefill (TTFT: prefill and the first
sample) and every decode step (decode and sample).

``python -m prima_sim.exec.stock --model M.gguf --prompt TEXT -n 8 --threads 1 --json`` prints one JSON object;
``benchmarks/bench_peers.py`` runs it inside an emulated device.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from prima_sim.errors import InputError
from prima_sim.exec.llamacpp import Reference, default_threads
from prima_sim.workload import DEFAULT_UBATCH


@dataclass
class StockRun:
    """What one stock run measured (seconds)."""

    model: str
    prompt_tokens: int
    prompt_ids: list[int] = field(default_factory=list)
    token_ids: list[int] = field(default_factory=list)
    load_s: float = 0.0
    ttft_s: float = 0.0
    step_s: list[float] = field(default_factory=list)

    @property
    def tpot_s(self) -> float:
        """Median decode step (NaN without decode steps)."""
        return statistics.median(self.step_s) if self.step_s else float("nan")

    def to_dict(self) -> dict[str, object]:
        """JSON-ready form (with ``tpot_s``)."""
        return asdict(self) | {"tpot_s": self.tpot_s}


def run_stock(model_path: str | Path, prompt: str | list[int], n_predict: int, n_ctx: int = 256,
              n_threads: int | None = None, n_batch: int = DEFAULT_UBATCH) -> StockRun:  # fmt: skip
    """Load ``model_path`` whole and generate ``n_predict`` tokens greedily after ``prompt``.

    Raises:
        InputError: a bad file, an empty prompt, or more tokens than the context holds.
    """
    if n_predict < 1:
        raise InputError("-n", "", f"must be >= 1, got {n_predict}")
    t0 = time.perf_counter()
    with Reference(model_path, n_ctx, n_batch, n_threads or default_threads()) as ref:
        load_s = time.perf_counter() - t0
        toks = ref.model.tokenize(prompt) if isinstance(prompt, str) else list(prompt)
        if not toks:
            raise InputError("--prompt", "", "tokenizes to nothing")
        if len(toks) + n_predict > n_ctx:
            raise InputError(
                "-n", "", f"{len(toks)} prompt + {n_predict} new tokens exceed the context of {n_ctx}"
            )
        run = StockRun(str(model_path), len(toks), list(toks), load_s=load_s)
        t = time.perf_counter()
        logits = ref.logits(toks, 0)
        run.token_ids.append(int(np.argmax(logits)))
        run.ttft_s = time.perf_counter() - t
        pos = len(toks)
        while len(run.token_ids) < n_predict:
            t = time.perf_counter()
            logits = ref.logits([run.token_ids[-1]], pos)
            run.token_ids.append(int(np.argmax(logits)))
            run.step_s.append(time.perf_counter() - t)
            pos += 1
    return run


def parse_json_output(text: str) -> dict[str, Any]:
    """The result of ``--json`` in a log that also holds llama.cpp's own output (the last JSON line it printed).

    Raises:
        ValueError: no result in ``text`` (the run failed before printing it).
    """
    obj = json.loads(text[text.rindex('{"model"') :].splitlines()[0])
    if not isinstance(obj, dict):
        raise ValueError("not a stock result")
    return obj


def main(argv: list[str] | None = None) -> int:
    """``python -m prima_sim.exec.stock``."""
    p = argparse.ArgumentParser(prog="python -m prima_sim.exec.stock", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="the whole GGUF")
    p.add_argument("--prompt", default="Hello", help="prompt text")
    p.add_argument(
        "-n", type=int, default=8, help="tokens to generate, the first from the prefill (default: 8)"
    )
    p.add_argument("--ctx", type=int, default=256, help="context (default: 256)")
    p.add_argument(
        "--threads", type=int, default=None, help="threads (default: the CPUs this process may use)"
    )
    p.add_argument("--json", action="store_true", help="print one JSON object")
    args = p.parse_args(argv)
    try:
        run = run_stock(args.model, args.prompt, args.n, args.ctx, args.threads)
    except InputError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(run.to_dict()))
    else:
        print(f"load {run.load_s:.2f} s, TTFT {run.ttft_s * 1e3:.0f} ms, TPOT {run.tpot_s * 1e3:.1f} ms "
              f"({len(run.step_s)} steps), tokens {run.token_ids}")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
