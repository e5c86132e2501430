"""``prima-sim shard``: cut a model into the per-device layer-window shards of a plan.

Examples::

    prima-sim shard --plan plan.json --model model.gguf --out shards/
    prima-sim shard --plan plan.json --model model.gguf --out shards/ --device phone   # only the phone's

Each device gets ``OUT/<device>/`` with one GGUF per window it runs and a ``manifest.json`` (plan fingerprint,
layer ranges, SHA-256 per file). Copy a device's directory to it and start ``prima-sim worker`` there.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from prima_sim.cli.common import plan_gguf, print_json
from prima_sim.plan import Plan


def register(sub: Any) -> None:
    """Add the ``shard`` subcommand."""
    p = sub.add_parser(
        "shard",
        help="write per-device layer-window GGUF shards of a plan",
        description="Write, per device of the plan, one GGUF per layer window it runs (the head also gets its "
        "token-embedding shard; its last window computes the logits) and a manifest with checksums. Tensor data "
        "is streamed: memory use does not depend on the model's size.",
    )
    p.add_argument("--plan", required=True, help="plan JSON (from 'prima-sim plan')")
    p.add_argument(
        "--model",
        default=None,
        help="the model's GGUF file, or smollm2-135m (default: the GGUF the plan was made from)",
    )
    p.add_argument("--out", required=True, help="output directory (one sub-directory per device)")
    p.add_argument(
        "--device", action="append", default=None, help="write only this device's shards (repeatable)"
    )
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--json", action="store_true", help="print the manifests as one JSON object")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Entry point of ``prima-sim shard``."""
    from prima_sim.exec.shard import write_shards
    from prima_sim.progress import Progress

    plan = Plan.load(args.plan)
    model = plan_gguf(plan, args.plan, args.model)
    bar: Progress | None = None

    def progress(n: int, total: int, label: str) -> None:
        nonlocal bar
        if args.quiet:
            return
        if bar is None:
            bar = Progress(total, "shard", "B")
        bar.set_description(label)
        bar.update(n)

    try:
        mans = write_shards(str(model), plan, Path(args.out), args.device, progress)
    finally:
        if bar is not None:
            bar.close()
    if args.json:
        print_json({d: m.model_dump(mode="json", exclude={"plan"}) for d, m in mans.items()})
    else:
        for d, m in mans.items():
            size = sum(s.n_bytes for s in m.shards)
            files = ", ".join(s.file for s in m.shards)
            print(f"{d}: {len(m.shards)} shard(s), {size / 1e6:.1f} MB in {Path(args.out) / d}: {files}")
    return 0
