"""The executor's own memory, in two steps another process measures from outside (its cgroup's anonymous memory).

``prima-sim emulate`` runs ``python -m prima_sim.exec.footprint_probe MODEL.gguf`` in a device's cgroup
(:func:`prima_sim.emulate.calibrate.Calibrator.runtime_footprint`), with pipes on stdin and stdout:

1. the probe imports what a worker and the head import (interpreter, numpy, ZeroMQ, the executor), loads and
   initialises llama.cpp, prints ``runtime`` and waits for a line on stdin: the runtime's footprint;
2. it loads the model's vocabulary only (llama.cpp's tokenizer structures, what the head holds on top), prints
   ``vocab`` (``failed`` if llama.cpp could not load it) and waits for a line again: the vocabulary's footprint;

then it exits. Neither is in the cost model's pinned memory (KV cache and compute buffers).
"""

from __future__ import annotations

import sys

# what a worker and the head import is part of their footprint: ZeroMQ and the executor
import zmq  # noqa: F401

import prima_sim.exec.head
import prima_sim.exec.worker  # noqa: F401
from prima_sim.errors import InputError
from prima_sim.exec.llamacpp import Model, load_runtime


def main(argv: list[str] | None = None) -> int:
    """``python -m prima_sim.exec.footprint_probe MODEL.gguf``."""
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python -m prima_sim.exec.footprint_probe MODEL.gguf", file=sys.stderr)
        return 2
    load_runtime()
    print("runtime", flush=True)
    sys.stdin.readline()
    try:
        vocab = Model(args[0], vocab_only=True)
    except InputError:
        print("failed", flush=True)
        return 1
    print("vocab", flush=True)
    sys.stdin.readline()
    vocab.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
