"""Prefill throughput of llama.cpp against the batch size, and the cost of a fresh context's first decode
(issue 11, item 4).

    flock -x /tmp/prima-cpu.lock python benchmarks/bench_prefill.py [--shape 1b] [--threads 1,2]
        [--batches 1,2,4,8,16,32,64,128,256,512] [--reps 3] [--layers 4] [--csv reports/prefill-batch.csv]
        [--plot reports/prefill-batch.png] [--plot-only]

A vocabulary-free window of a generated model (its first ``--layers`` layers, cut by ``prima_sim.exec.shard``
exactly as a worker's shard) runs through the executor's ``prima_sim.exec.llamacpp.Window.run_hidden``, resident in the page
cache (loaded once, warm), on hidden-state batches of n tokens at positions 0..n-1 (the KV cache is cleared
between calls, as a new prompt does):

* ``prefill``: median seconds of a batch of n tokens over ``--reps`` calls after one warm-up call, its tokens per
  second and its matmul FLOP/s (2 x weight parameters x n; attention is negligible at these lengths);
* ``first``: a fresh context (``llama_init_from_model``) is created for each n and its very first
  ``llama_decode`` is timed against the second call of the same batch: the difference is the first-decode cost
  (graph allocation, buffer growth) that TTFT pays and the profile does not;
* ``process_first``: the same in a fresh process (n = 1, 16, 128, 512; median of ``--reps``): load, context, first
  and second decode, as a worker's or the head's first step after start-up.

One row per (threads, n). Needs llama-cpp-python and about 1 GB of page cache; no root.
"""

from __future__ import annotations

import argparse
import csv
import datetime as dt
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

SHAPES = {
    "1b": {"layers": 16, "embd": 2048, "ff": 8192, "heads": 32, "kv_heads": 8},
    "3b": {"layers": 28, "embd": 3072, "ff": 8192, "heads": 24, "kv_heads": 8},
}
N_CTX = 1024
FIELDS = ["shape", "threads", "n_tokens", "layers", "weight_params", "prefill_s", "prefill_min_s", "tokens_per_s",
          "flops", "per_token_ms", "first_call_s", "second_call_s", "first_extra_s", "context_create_s",
          "process_first_s", "process_second_s", "process_first_extra_s", "process_load_s", "process_context_s",
          "host", "date"]  # fmt: skip


def say(msg: str) -> None:
    print(f"[{dt.datetime.now().strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def shard(shape: str, n_layers: int) -> tuple[Path, int, int]:
    """The measured window (the first ``n_layers`` layers) of the generated model: (path, layers, weight params)."""
    from prima_sim.devices.gguf_file import read_gguf
    from prima_sim.emulate.models import cache_dir, ensure_model
    from prima_sim.emulate.scenario import ModelSpec
    from prima_sim.exec.shard import load_manifest, shard_path, write_shards
    from prima_sim.plan import Plan, make_assignments

    L = SHAPES[shape]["layers"]
    out = cache_dir() / "prefill-bench" / f"{shape}-{n_layers}L"
    if not (out / "D" / "manifest.json").exists():
        model = ensure_model(ModelSpec(**SHAPES[shape], quant="Q4_0"), log=say)
        plan = Plan(model_id=f"synth-{shape}", n_layers=L, cluster_name="prefill-bench", k=1, n_ctx=N_CTX,
                    devices=make_assignments(["H", "D"], [L - n_layers, n_layers], [0, 0], L),
                    scheduler="manual")  # fmt: skip
        say(f"cutting the {shape} window")
        write_shards(model, plan, out, devices=["D"])
    man = load_manifest(out / "D", "D")
    s = next(s for s in man.shards if s.window >= 0)
    path = shard_path(out / "D", man, s)
    g = read_gguf(path)
    params = sum(int(np.prod(t.shape)) for t in g.tensors if t.name.startswith("blk.") and len(t.shape) == 2)
    return path, s.layers[1] - s.layers[0], params


def first_in_process(path: str, n: int, threads: int) -> dict[str, float]:
    """In this (fresh) process: load the window, create a context, time its first and second decode of n tokens."""
    t0 = time.perf_counter()
    from prima_sim.exec.llamacpp import Model, Window

    t1 = time.perf_counter()
    with Model(path) as model:
        t2 = time.perf_counter()
        with Window(model, "hidden", N_CTX, 512, threads) as w:
            t3 = time.perf_counter()
            h = (np.random.default_rng(0).standard_normal((n, model.n_embd)) * 0.1).astype(np.float32)
            a = time.perf_counter()
            w.run_hidden(h, 0)
            b = time.perf_counter()
            w.run_hidden(h, 0)
            c = time.perf_counter()
    return {"import_s": t1 - t0, "load_s": t2 - t1, "context_s": t3 - t2, "first_s": b - a, "second_s": c - b}


def main() -> int:
    if len(sys.argv) == 5 and sys.argv[1] == "--child-first":
        import json

        print(json.dumps(first_in_process(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]))))
        return 0
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shape", default="1b", choices=sorted(SHAPES))
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--batches", default="1,2,4,8,16,32,64,128,256,512")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--layers", type=int, default=4, help="layers of the measured window")
    ap.add_argument("--csv", default=str(ROOT / "reports" / "prefill-batch.csv"))
    ap.add_argument("--plot", default=str(ROOT / "reports" / "prefill-batch.png"))
    ap.add_argument("--plot-only", action="store_true", help="redraw the PNG from the CSV")
    args = ap.parse_args()
    if args.plot_only:
        with open(args.csv) as fh:
            rows = [{k: (v if k in ("shape", "host", "date") else (float(v) if v else None)) for k, v in r.items()}
                    for r in csv.DictReader(fh)]  # fmt: skip
        for r in rows:
            for k in ("threads", "n_tokens", "layers"):
                v = r[k]
                assert isinstance(v, float), f"{args.csv}: empty {k}"  # parsed as a float above
                r[k] = int(v)
        plot(rows, Path(args.plot))
        return 0
    try:
        threads = [int(x) for x in args.threads.split(",")]
        batches = [int(x) for x in args.batches.split(",")]
    except ValueError:
        ap.error("--threads and --batches are comma-separated integers")
    if any(t < 1 for t in threads) or any(not 1 <= b <= 512 for b in batches) or args.reps < 1:
        ap.error("--threads >= 1, --batches in 1..512, --reps >= 1")
    from prima_sim.exec.llamacpp import Model, Window

    if not 1 <= args.layers < SHAPES[args.shape]["layers"]:
        ap.error(f"--layers must be in 1..{SHAPES[args.shape]['layers'] - 1}")
    path, layers, params = shard(args.shape, args.layers)
    say(f"{path.name}: {layers} layers, {params / 1e9:.3f} G weight parameters")
    rows = []
    host = os.uname().nodename
    with Model(path) as model:
        rng = np.random.default_rng(0)
        hidden = (rng.standard_normal((512, model.n_embd)) * 0.1).astype(np.float32)
        for th in threads:
            with Window(model, "hidden", N_CTX, 512, th) as w:
                w.run_hidden(hidden[:8], 0)  # pages in, threads up
                for n in batches:
                    w.run_hidden(hidden[:n], 0)  # warm-up of this shape
                    ts = []
                    for _ in range(args.reps):
                        t0 = time.perf_counter()
                        w.run_hidden(hidden[:n], 0)  # position 0: the KV cache is cleared first
                        ts.append(time.perf_counter() - t0)
                    # a fresh context: its first decode against its second
                    t0 = time.perf_counter()
                    fresh = Window(model, "hidden", N_CTX, 512, th)
                    t_ctx = time.perf_counter() - t0
                    with fresh:
                        t0 = time.perf_counter()
                        fresh.run_hidden(hidden[:n], 0)
                        first = time.perf_counter() - t0
                        t0 = time.perf_counter()
                        fresh.run_hidden(hidden[:n], 0)
                        second = time.perf_counter() - t0
                    med = statistics.median(ts)
                    row = {"shape": args.shape, "threads": th, "n_tokens": n, "layers": layers,
                           "weight_params": params, "prefill_s": med, "prefill_min_s": min(ts), "tokens_per_s": n / med,
                           "flops": 2.0 * params * n / med, "per_token_ms": 1e3 * med / n, "first_call_s": first,
                           "second_call_s": second, "first_extra_s": first - second, "context_create_s": t_ctx,
                           "host": host, "date": dt.date.today().isoformat()}  # fmt: skip
                    rows.append(row)
                    say(f"threads {th} n {n:4d}: {med * 1e3:8.1f} ms ({n / med:7.1f} tok/s, "
                        f"{row['flops'] / 1e9:6.1f} GFLOP/s); fresh context {t_ctx * 1e3:.1f} ms, first decode "
                        f"{first * 1e3:.1f} ms vs {second * 1e3:.1f} ms")  # fmt: skip
    # the first decode of a fresh process (what a worker's or the head's first step pays after loading)
    import json
    import subprocess

    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_WAIT_POLICY="passive")
    for th in threads:
        for r in rows:
            if r["threads"] != th or r["n_tokens"] not in (1, 16, 128, 512):
                continue
            outs = []
            for _ in range(args.reps):
                p = subprocess.run([sys.executable, __file__, "--child-first", str(path), str(r["n_tokens"]), str(th)],
                                   capture_output=True, text=True, env=env, timeout=600)  # fmt: skip
                if p.returncode != 0:
                    raise SystemExit(f"fresh-process probe failed: {p.stderr.strip()[-300:]}")
                outs.append(json.loads(p.stdout.strip().splitlines()[-1]))
            pm = {k: statistics.median(o[k] for o in outs) for k in outs[0]}
            r.update(process_first_s=pm["first_s"], process_second_s=pm["second_s"],
                     process_first_extra_s=pm["first_s"] - pm["second_s"], process_load_s=pm["load_s"],
                     process_context_s=pm["context_s"])  # fmt: skip
            say(f"threads {th} n {r['n_tokens']:4d}, fresh process: load {pm['load_s'] * 1e3:.0f} ms, context "
                f"{pm['context_s'] * 1e3:.0f} ms, first decode {pm['first_s'] * 1e3:.1f} ms vs second "
                f"{pm['second_s'] * 1e3:.1f} ms")  # fmt: skip
    Path(args.csv).parent.mkdir(parents=True, exist_ok=True)
    with open(args.csv, "w", newline="") as fh:
        wr = csv.DictWriter(fh, fieldnames=FIELDS)
        wr.writeheader()
        for r in rows:
            wr.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in r.items()})
    plot(rows, Path(args.plot))
    return 0


def plot(rows: list[dict], png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a1, a2) = plt.subplots(1, 2, figsize=(12, 4.2))
    for th in sorted({r["threads"] for r in rows}):
        rs = [r for r in rows if r["threads"] == th]
        x = [r["n_tokens"] for r in rs]
        a1.plot(x, [r["flops"] / 1e9 for r in rs], marker="o", label=f"{th} thread(s)")
        a2.plot(
            x,
            [r["first_extra_s"] * 1e3 for r in rs],
            marker="o",
            label=f"{th} thread(s): first - second call",
        )
        a2.plot(
            x,
            [r["context_create_s"] * 1e3 for r in rs],
            ls="--",
            marker="x",
            label=f"{th} thread(s): context creation",
        )
        rp = [r for r in rs if r.get("process_first_extra_s") not in (None, "")]
        a2.plot(
            [r["n_tokens"] for r in rp],
            [r["process_first_extra_s"] * 1e3 for r in rp],
            ls=":",
            marker="s",
            label=f"{th} thread(s): first - second call, fresh process",
        )
    a1.set_xscale("log", base=2)
    a1.set_xlabel("tokens per batch")
    a1.set_ylabel("matmul GFLOP/s (2 x params x tokens / time)")
    a1.set_title(
        f"llama.cpp prefill throughput ({rows[0]['shape']} shape, {rows[0]['layers']} layers, resident)"
    )
    a2.set_xscale("log", base=2)
    a2.set_xlabel("tokens in the first batch")
    a2.set_ylabel("ms")
    a2.set_title("extra cost of the first decode (noise: about 5% of the call)")
    for a in (a1, a2):
        a.grid(alpha=0.3)
        a.legend(fontsize=8)
    fig.tight_layout()
    png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png, dpi=110)
    say(f"wrote {png}")


if __name__ == "__main__":
    sys.exit(main())
