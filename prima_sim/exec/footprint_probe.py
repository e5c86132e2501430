"""The executor's own memory, in two steps another process measures from outside (its cgroup's anonymous memory).

``prima-sim emulate`` runs ``python -m prima_sim.exec.footprint_probe --role ROLE MODEL.gguf`` in a device's cgroup
(:func:`prima_sim.emulate.calibrate.Calibrator.runtime_footprint`), with pipes on stdin and stdout, once per role
(``worker``: ``prima-sim worker``; ``head``: ``prima-sim run --real``):

1. the probe imports what that role's process imports (:data:`ROLE_IMPORTS`: the command's module as the command
   line loads it, and the modules its ``run`` imports), loads and initialises llama.cpp, prints ``runtime`` and
   waits for a line on stdin: the runtime's footprint;
2. it loads the model's vocabulary only (llama.cpp's tokenizer structures, what the head holds on top), prints
   ``vocab`` (``failed`` if llama.cpp could not load it) and waits for a line again: the vocabulary's footprint;

then it exits. Neither is in the cost model's pinned memory (KV cache and compute buffers).
"""

from __future__ import annotations

import argparse
import importlib
import sys

ROLE_IMPORTS: dict[str, tuple[str, tuple[str, ...]]] = {
    "worker": ("worker", ("prima_sim.exec.hosts", "prima_sim.exec.ring", "prima_sim.exec.manifest",
                          "prima_sim.exec.worker")),
    "head": ("run", ("prima_sim.cli.worker", "prima_sim.exec.head", "prima_sim.exec.hosts",
                     "prima_sim.exec.llamacpp", "prima_sim.exec.ring", "prima_sim.exec.runner")),
}  # fmt: skip
"""role -> (its ``prima-sim`` command, the modules that command's ``run`` imports): what the process holds before
it loads a model. tests/test_emulate_probes.py checks them against the commands' own imports."""


def import_role(role: str) -> None:
    """Import what the process of ``role`` imports, as its command line does (one command's parser)."""
    from prima_sim.cli.main import build_parser

    command, modules = ROLE_IMPORTS[role]
    build_parser((command,))
    for m in modules:
        importlib.import_module(m)


def main(argv: list[str] | None = None) -> int:
    """``python -m prima_sim.exec.footprint_probe [--role worker|head] MODEL.gguf``."""
    ap = argparse.ArgumentParser(prog="python -m prima_sim.exec.footprint_probe")
    ap.add_argument("--role", choices=sorted(ROLE_IMPORTS), default="worker")
    ap.add_argument("model")
    args = ap.parse_args(sys.argv[1:] if argv is None else argv)
    import_role(args.role)
    from prima_sim.errors import InputError
    from prima_sim.exec.llamacpp import Model, load_runtime

    load_runtime()
    print("runtime", flush=True)
    sys.stdin.readline()
    try:
        vocab = Model(args.model, vocab_only=True)
    except InputError:
        print("failed", flush=True)
        return 1
    print("vocab", flush=True)
    sys.stdin.readline()
    vocab.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
