"""How many tokens the head prefills for a prompt: ``python -m prima_sim.exec.count_tokens MODEL.gguf < prompt``.

Loads the model's vocabulary only and tokenizes stdin exactly as the head does (BOS when the model asks for it,
special tokens parsed), printing the count. ``prima-sim emulate`` runs it in a child process
(:func:`prima_sim.emulate.models.count_prompt_tokens`) so that the emulator itself never maps llama.cpp.
"""

from __future__ import annotations

import sys

from prima_sim.errors import InputError
from prima_sim.exec.llamacpp import Model


def main(argv: list[str] | None = None) -> int:
    """``python -m prima_sim.exec.count_tokens MODEL.gguf`` (the prompt on stdin)."""
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python -m prima_sim.exec.count_tokens MODEL.gguf < prompt.txt", file=sys.stderr)
        return 2
    text = sys.stdin.buffer.read().decode("utf-8", errors="replace")
    try:
        with Model(args[0], vocab_only=True) as vocab:
            print(len(vocab.tokenize(text)))
    except InputError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
