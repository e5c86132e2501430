"""What the CPU backend's weight repacking is worth to a device whose weights fit in memory (issue 15).

    python benchmarks/bench_repack.py [--model GGUF] [--tokens 30] [--threads 1] [--pin 0] [--json]

Loads the model twice in this process, side by side: as the executor loads every window today (the weights stay
file-backed page cache: ``Model()``), and with the layers' matrices in the CPU repack buffer type
(``Model(repack=True)``: copied at load into anonymous memory, laid out for the CPU's vector kernels; what current
llama.cpp does by default, and neither prima.cpp nor prima-sim's ring). Then decodes the same tokens with both,
one step each in turn, and prints the median time per token of each, their ratio, the anonymous memory the
repacked copy took, and the largest logit difference between the two (another kernel's rounding). Timing belongs
here, not in the tests; run it on a quiet machine (``flock -x /tmp/prima-cpu.lock`` on the project's).

Default model: the generated 1B shape of ``bench_ring.py`` (16 layers, n_embd 2048, Q4_0), made on first use.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_ring import SYNTH_ARGS
from bench_swap import read_kv


def rss_anon() -> int:
    """This process's anonymous resident bytes."""
    return read_kv(Path("/proc/self/status")).get("RssAnon", 0) * 1024


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=None, help="GGUF model (default: generated 1B-shape Q4_0)")
    ap.add_argument("--tokens", type=int, default=30, help="decode steps per model (default 30)")
    ap.add_argument("--threads", type=int, default=1, help="llama.cpp threads (default 1)")
    ap.add_argument("--pin", type=int, default=None, help="pin this process to one CPU")
    ap.add_argument("--json", action="store_true", help="print the result as JSON")
    args = ap.parse_args()
    if args.pin is not None:
        os.sched_setaffinity(0, {args.pin})
    if args.model is None:
        import subprocess

        args.model = str(Path.home() / ".cache" / "prima-sim" / "bench" / "synth-1b-q4_0.gguf")
        if not Path(args.model).exists():
            Path(args.model).parent.mkdir(parents=True, exist_ok=True)
            subprocess.run([sys.executable, "-m", "prima_sim.cli.main", "synth-model", *SYNTH_ARGS, "--out",
                            args.model, "--quiet"], check=True)  # fmt: skip
    import numpy as np

    from prima_sim.exec.llamacpp import Reference

    with open(args.model, "rb") as f:  # the file in the page cache, so that neither load waits on the disk
        while f.read(1 << 24):
            pass
    a0 = rss_anon()
    plain = Reference(args.model, 256, 64, args.threads)
    a1 = rss_anon()
    packed = Reference(args.model, 256, 64, args.threads, repack=True)
    a2 = rss_anon()
    refs = {"plain": plain, "repacked": packed}
    prompt = list(range(100, 116))
    last = {k: r.logits(prompt, 0) for k, r in refs.items()}
    diff = float(np.abs(last["plain"] - last["repacked"]).max())
    times: dict[str, list[float]] = {k: [] for k in refs}
    for i in range(args.tokens):
        for k, r in refs.items():
            t0 = time.perf_counter()
            r.logits([200 + i], len(prompt) + i)
            times[k].append(time.perf_counter() - t0)
    for r in refs.values():
        r.close()
    med = {k: statistics.median(v) for k, v in times.items()}
    out = {
        "model": args.model,
        "repacked": packed.model.repacked,
        "threads": args.threads,
        "tokens": args.tokens,
        "plain_s_per_token": med["plain"],
        "repacked_s_per_token": med["repacked"],
        "speedup": med["plain"] / med["repacked"],
        "plain_anon_bytes": a1 - a0,
        "repacked_anon_bytes": a2 - a1,
        "max_logit_difference": diff,
    }
    if args.json:
        print(json.dumps(out, indent=2))
    else:
        print(f"{Path(args.model).name}, {args.threads} thread(s), {args.tokens} decode steps each, interleaved"
              + ("" if packed.model.repacked else " (this build has no CPU_REPACK buffer type: both plain)"))  # fmt: skip
        print(
            f"  plain (page cache):   {med['plain'] * 1e3:7.1f} ms per token, {(a1 - a0) / 2**20:6.0f} MiB anonymous"
        )
        print(
            f"  repacked (anonymous): {med['repacked'] * 1e3:7.1f} ms per token, {(a2 - a1) / 2**20:6.0f} MiB anonymous"
        )
        print(f"  speed-up {out['speedup']:.2f}x; largest logit difference {diff:.3g}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
