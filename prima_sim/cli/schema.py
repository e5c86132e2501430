"""``prima-sim schema``: the JSON Schema of a file format, or the whole of docs/formats.md.

Examples::

    prima-sim schema device                 # JSON Schema of a device profile
    prima-sim schema cluster > cluster.schema.json
    prima-sim schema --markdown             # docs/formats.md (every format, field, unit and default)
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from prima_sim.cli.common import print_json
from prima_sim.errors import InputError
from prima_sim.formats import FORMATS, json_schema, markdown


def register(sub: Any) -> None:
    """Add the ``schema`` subcommand."""
    p = sub.add_parser(
        "schema",
        help="print the JSON Schema of a file format (device, cluster, hosts, scenario, plan)",
        description="Print the JSON Schema of a file format, generated from the models the loaders validate "
        "with (every field, its type, unit, default and description); --markdown prints docs/formats.md.",
    )
    p.add_argument("kind", nargs="?", type=str.lower, metavar="KIND", help=f"one of: {', '.join(FORMATS)}")
    p.add_argument("--markdown", action="store_true", help="print docs/formats.md (all formats) instead")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Entry point of ``prima-sim schema``."""
    if args.markdown:
        if args.kind:
            raise InputError("--markdown", "", "prints every format: give no KIND with it")
        sys.stdout.write(markdown())
        return 0
    if args.kind not in FORMATS:
        raise InputError(
            "KIND", "", f"give one of {', '.join(FORMATS)}" + (f", not {args.kind!r}" if args.kind else "")
        )
    print_json(json_schema(args.kind))
    return 0
