"""``prima-sim init DIR``: copy the example home (four device profiles, a cluster, a hosts file) into DIR.

The copies are the starting point for describing your own home (docs/tutorial.md): edit the figures, or
replace a device file with ``prima-sim profile --out DIR/NAME.toml`` measured on that device.
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path
from typing import Any

from prima_sim.devices.cluster import datasets_root
from prima_sim.errors import InputError


def register(sub: Any) -> None:
    """Add the ``init`` subcommand."""
    p = sub.add_parser(
        "init",
        help="copy the example home (device profiles, cluster, hosts.toml) into a folder to edit",
        description="Copy the bundled example home into DIR: desktop.toml, mac.toml, laptop.toml, phone.toml "
        "(device profiles), home.toml (the cluster: ring order and network) and hosts.toml (addresses for a real "
        "run). Existing files are never overwritten.",
    )
    p.add_argument("dir", metavar="DIR", help="folder to create or fill")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Entry point of ``prima-sim init``."""
    src = datasets_root() / "examples"
    files = sorted(src.glob("*.toml"))
    if not files:
        raise InputError(str(src), "", "the bundled examples are missing from this installation")
    dest = Path(args.dir)
    if dest.exists() and not dest.is_dir():
        raise InputError(args.dir, "", "exists and is not a folder")
    clash = [f.name for f in files if (dest / f.name).exists()]
    if clash:
        raise InputError(
            args.dir, "", f"already has {', '.join(clash)}: nothing copied (choose another folder)"
        )
    dest.mkdir(parents=True, exist_ok=True)
    for f in files:
        shutil.copyfile(f, dest / f.name)
    print(f"wrote {', '.join(f.name for f in files)} to {dest}")
    print(f"next: edit them (docs/formats.md lists every field), then: prima-sim plan --cluster {dest / 'home.toml'} "
          "--model qwen2.5-32b")  # fmt: skip
    return 0
