"""``prima-sim model-info``: print a model profile (from a GGUF file or the catalog), or list the catalog.

Examples::

    prima-sim model-info path/to/model.gguf
    prima-sim model-info llama3-70b            # catalog entry, Q4_K_M
    prima-sim model-info qwen2.5-72b-q6_k --json
    prima-sim model-info llama3-8b --tensors
    prima-sim model-info --list
"""

from __future__ import annotations

import argparse
from typing import Any

from prima_sim.cli.common import load_model_arg, print_json
from prima_sim.devices.model import ModelProfile
from prima_sim.errors import InputError

LIST_QUANTS = ("q4_k_m", "q6_k", "q8_0")


def register(sub: Any) -> None:
    """Add the ``model-info`` subcommand."""
    p = sub.add_parser(
        "model-info",
        help="print a model profile (GGUF file or catalog id)",
        description="Print the profile of a model: architecture numbers, bytes per tensor, layer and type, KV-cache "
        "bytes and FLOPs per token. MODEL is a GGUF file (only its header is read) or a catalog id such as "
        "llama3-70b or qwen2.5-72b-q6_k (see --list).",
    )
    p.add_argument("model", nargs="?", metavar="MODEL", help="GGUF path or catalog id (<entry>[-<quant>])")
    p.add_argument("--json", action="store_true", help="print the profile as one JSON object")
    p.add_argument(
        "--tensors", action="store_true", help="also print every tensor (name, type, shape, bytes)"
    )
    p.add_argument("--list", action="store_true", help="list the catalog's models and their sizes")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Entry point of ``prima-sim model-info``."""
    if args.list:
        return _list(args.json)
    if not args.model:
        raise InputError("MODEL", "", "is required (a GGUF file or a catalog id; --list shows the catalog)")
    profile = load_model_arg(args.model)
    if args.json:
        print_json(profile.summary())
    else:
        print(render(profile, tensors=args.tensors))
    return 0


def _gb(n: float) -> str:
    """Bytes as decimal GB (how model files are quoted) with the binary size beside it."""
    if n >= 1e9:
        return f"{n / 1e9:.3f} GB ({n / 2**30:.2f} GiB)"
    if n >= 1e6:
        return f"{n / 1e6:.2f} MB"
    return f"{n:,.0f} B"


def _flops(f: float) -> str:
    for unit, size in (("TFLOP", 1e12), ("GFLOP", 1e9), ("MFLOP", 1e6), ("kFLOP", 1e3)):
        if f >= size:
            return f"{f / size:.3g} {unit}"
    return f"{f:.0f} FLOP"


def render(m: ModelProfile, *, tensors: bool = False) -> str:
    """The human-readable summary ``model-info`` prints."""
    a = m.arch
    lb = m.layer_bytes
    lines = [
        f"model        {m.id}",
        f"source       {m.source}",
        f"quant        {m.quant}",
        f"arch         {a.arch}: {a.n_layer} layers, n_embd {a.n_embd}, n_ff {a.n_ff}, "
        f"heads {a.n_head}/{a.n_head_kv} kv (head dim {a.head_dim_k}/{a.head_dim_v}), vocab {a.n_vocab}, "
        f"context {a.n_ctx_train}, {'tied' if a.tied_embeddings else 'separate'} output head",
    ]
    if a.sliding_window:
        n_slide = sum(a.is_sliding(i) for i in range(a.n_layer))
        lines.append(
            f"             sliding window {a.sliding_window} tokens on {n_slide} of {a.n_layer} layers"
        )
    lines += [
        f"tensors      {len(m.tensors)}",
        f"total        {_gb(m.total_bytes)}",
        f"input        {_gb(m.input_bytes)}  (token_embd; {m.embedding_row_bytes:,.0f} B read per token)",
        f"output       {_gb(m.output_bytes)}  (output norm + head{', the tied embedding' if a.tied_embeddings else ''})",
        f"per layer    min {_gb(min(lb))}, mean {_gb(m.mean_layer_bytes)}, max {_gb(max(lb))}",
        f"KV cache     {m.kv_bytes_per_token_per_layer:,} B per token per layer (f16), "
        f"{_gb(m.kv_bytes_per_token_per_layer * a.n_layer)} per token for all layers",
    ]
    lf = m.layer_flops(0, 1, 1)
    lines.append(
        f"FLOPs/token  layer 0 (1 cached token): {_flops(sum(lf.values()))} = "
        + ", ".join(f"{k} {_flops(v)}" for k, v in sorted(lf.items(), key=lambda kv: -kv[1]))
    )
    of = m.output_flops(1)
    lines.append(
        f"             output head: {_flops(sum(of.values()))} = "
        + ", ".join(f"{k} {_flops(v)}" for k, v in sorted(of.items(), key=lambda kv: -kv[1]))
    )
    by_type: dict[str, tuple[int, int]] = {}
    for t in m.tensors:
        n, b = by_type.get(t.ggml_type, (0, 0))
        by_type[t.ggml_type] = (n + 1, b + t.n_bytes)
    lines.append("bytes by type")
    for ty, (n, b) in sorted(by_type.items(), key=lambda kv: -kv[1][1]):
        lines.append(f"  {ty:<8} {n:>5} tensors  {_gb(b):>26}  {100 * b / m.total_bytes:5.1f}%")
    if tensors:
        lines.append("tensors (ggml shape, ne0 first)")
        width = max(len(t.name) for t in m.tensors)
        for t in m.tensors:
            shape = " x ".join(str(d) for d in t.shape)
            lines.append(f"  {t.name:<{width}}  {t.ggml_type:<8} {shape:<16} {t.n_bytes:>14,}")
    return "\n".join(lines)


def _list(as_json: bool) -> int:
    from prima_sim.devices.catalog import catalog_entry, catalog_ids, catalog_model

    rows: list[dict[str, Any]] = []
    for e in catalog_ids():
        ent = catalog_entry(e)
        sizes = {q: catalog_model(f"{e}-{q}").total_bytes for q in LIST_QUANTS}
        rows.append({"id": e, "paper_name": ent.paper_name, "arch": ent.arch, "n_layer": ent.n_layer,
                     "bytes": sizes, "source": ent.source})  # fmt: skip
    if as_json:
        print_json({"models": rows, "quants": list(LIST_QUANTS), "default_quant": "q4_k_m"})
        return 0
    print(
        f"{'id':<32} {'paper name':<30} {'arch':<6} {'layers':>6} "
        + " ".join(f"{q + ' GB':>9}" for q in LIST_QUANTS)
    )
    for r in rows:
        gbs = " ".join(f"{r['bytes'][q] / 1e9:>9.2f}" for q in LIST_QUANTS)
        print(f"{r['id']:<32} {r['paper_name']:<30} {r['arch']:<6} {r['n_layer']:>6} {gbs}")
    print(
        "\nUse <id> (Q4_K_M) or <id>-<quant>, e.g. llama3-70b-q6_k; quants: any llama.cpp file type (q4_0 ... q8_0, f16)."
    )
    return 0
