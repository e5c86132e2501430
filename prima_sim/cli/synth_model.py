"""``prima-sim synth-model``: write a GGUF with random weights of real shapes, a real tokenizer, llama.cpp-ready.

Examples::

    prima-sim synth-model --like llama3-8b --quant Q4_0 --out /tmp/llama3-8b-shape.gguf
    prima-sim synth-model --layers 16 --embd 2048 --ff 8192 --heads 32 --kv-heads 8 --quant Q4_K --out 1b.gguf

``--like`` keeps the catalog entry's architecture (layers, widths, heads, context, rope settings) but the
vocabulary, and with it the embedding and output-head rows, comes from the tokenizer donor (``--vocab-from``,
default SmolLM2-135M: 49152 tokens).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from prima_sim.cli.common import check_number
from prima_sim.devices.synth import SYNTH_ARCHS, SYNTH_QUANTS, synth_architecture, write_synth_model
from prima_sim.errors import InputError


def register(sub: Any) -> None:
    """Add the ``synth-model`` subcommand."""
    p = sub.add_parser(
        "synth-model",
        help="write a GGUF with random weights of real shapes (for timing without downloads)",
        description="Write a GGUF model that llama.cpp loads and runs: the tensor table of a catalog model (--like) "
        "or of the given shape, random finite weights in the chosen quantization, and a real tokenizer copied from "
        "a small GGUF. n_vocab is the donor tokenizer's size.",
    )
    shape = p.add_argument_group("shape (either --like or all of --layers --embd --ff --heads --kv-heads)")
    shape.add_argument(
        "--like",
        metavar="CATALOG_ID",
        help="copy the architecture of a catalog model (prima-sim model-info --list)",
    )
    shape.add_argument(
        "--arch", type=str.lower, choices=SYNTH_ARCHS, default=None, help="architecture (default llama)"
    )
    shape.add_argument("--layers", type=int, help="number of transformer blocks")
    shape.add_argument("--embd", type=int, help="hidden width n_embd")
    shape.add_argument("--ff", type=int, help="feed-forward width n_ff")
    shape.add_argument("--heads", type=int, help="attention heads")
    shape.add_argument("--kv-heads", type=int, help="key/value heads (grouped-query attention)")
    shape.add_argument("--head-dim", type=int, default=0, help="per-head width (default embd / heads)")
    shape.add_argument("--tied", action="store_true", help="tie the output head to the token embedding")
    shape.add_argument(
        "--ctx", type=int, default=4096, help="training context length written to the file (default 4096)"
    )
    p.add_argument(
        "--vocab-from", metavar="SMALL.gguf", help="GGUF whose tokenizer to copy (default: SmolLM2-135M)"
    )
    p.add_argument(
        "--quant",
        required=True,
        type=str.upper,
        choices=SYNTH_QUANTS,
        help="uniform quantization of the weights",
    )
    p.add_argument("--out", required=True, metavar="FILE.gguf", help="output file (written atomically)")
    p.add_argument("--seed", type=int, default=0, help="random seed (same seed, same bytes)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.set_defaults(func=run)


_SHAPE_FLAGS = ("layers", "embd", "ff", "heads", "kv_heads")
SHAPE_LIMITS = {
    "--layers": 1024,
    "--embd": 65536,
    "--ff": 262144,
    "--heads": 1024,
    "--kv-heads": 1024,
    "--head-dim": 1024,
}
"""Upper limits of a generated shape: several times the largest published models' (Llama 3.1 405B: 126 layers,
n_embd 16384, n_ff 53248, 128 heads), so that a typo is not taken for a terabyte model."""
MAX_SYNTH_CTX = 1 << 24


def run(args: argparse.Namespace) -> int:
    """Entry point of ``prima-sim synth-model``."""
    check_number("--ctx", args.ctx, minimum=1, maximum=MAX_SYNTH_CTX)
    check_number("--seed", args.seed, minimum=0)
    for flag, limit in SHAPE_LIMITS.items():
        check_number(flag, getattr(args, flag[2:].replace("-", "_")), maximum=limit)
    rope_freqs, rope_theta, norm_eps = False, 10000.0, 1e-5
    if args.like:
        given = [f"--{f.replace('_', '-')}" for f in (*_SHAPE_FLAGS, "arch") if getattr(args, f) is not None]
        if given or args.head_dim or args.tied:
            raise InputError(
                "--like",
                "",
                f"takes its shape from the catalog; drop {', '.join(given) or '--head-dim/--tied'}",
            )
        from prima_sim.devices.catalog import catalog_entry, split_ref

        entry_name, _ = split_ref(args.like)
        e = catalog_entry(entry_name)
        arch = synth_architecture(
            arch=e.arch, n_layer=e.n_layer, n_embd=e.n_embd, n_ff=e.n_ff, n_head=e.n_head, n_head_kv=e.n_head_kv,
            head_dim=e.head_dim, tied_embeddings=e.tied_embeddings, n_ctx_train=e.n_ctx_train,
            sliding_window=e.sliding_window,
        )  # fmt: skip
        rope_freqs, rope_theta, norm_eps = e.rope_freqs, e.rope_theta, e.norm_eps
        name = f"prima-sim synthetic, shape of {entry_name}"
    else:
        missing = [f"--{f.replace('_', '-')}" for f in _SHAPE_FLAGS if getattr(args, f) is None]
        if missing:
            raise InputError(missing[0], "", f"is required without --like (missing: {', '.join(missing)})")
        arch = synth_architecture(
            arch=args.arch or "llama", n_layer=args.layers, n_embd=args.embd, n_ff=args.ff, n_head=args.heads,
            n_head_kv=args.kv_heads, head_dim=args.head_dim, tied_embeddings=args.tied, n_ctx_train=args.ctx,
        )  # fmt: skip
        name = ""
    out = Path(args.out)
    if out.exists() and out.is_dir():
        raise InputError(args.out, "", "is a directory, expected a .gguf file name")
    res = write_synth_model(
        out, arch, args.quant, vocab_from=args.vocab_from, seed=args.seed, rope_freqs=rope_freqs,
        rope_theta=rope_theta, norm_eps=norm_eps, name=name, progress=not args.quiet,
    )  # fmt: skip
    info = {
        "path": str(res.path),
        "file_bytes": res.file_bytes,
        "tensor_bytes": res.tensor_bytes,
        "seconds": round(res.seconds, 3),
        "seconds_per_gb": round(res.seconds_per_gb, 3),
        "n_vocab": res.profile.arch.n_vocab,
        "n_layer": res.profile.arch.n_layer,
        "quant": args.quant,
        "seed": args.seed,
    }
    if args.json:
        print(json.dumps(info, indent=2))
    else:
        print(
            f"wrote {res.path}: {res.file_bytes / 1e9:.3f} GB, {res.profile.arch.n_layer} layers, "
            f"n_vocab {res.profile.arch.n_vocab}, {args.quant}, seed {args.seed} "
            f"in {res.seconds:.1f} s ({res.seconds_per_gb:.2f} s/GB)"
        )
    return 0
