"""The scenario's model: generated once with ``prima-sim synth-model`` and cached, or an existing GGUF."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from prima_sim.emulate.scenario import ModelSpec
from prima_sim.emulate.spawn import module_command, python_env
from prima_sim.errors import EmulationError, InputError


def cache_dir() -> Path:
    """Where generated models and reused profiles are kept (:func:`prima_sim.cache.cache_root`)."""
    from prima_sim.cache import cache_root

    return cache_root()


def ensure_model(spec: ModelSpec, models_dir: Path | None = None, log: object = None) -> Path:
    """The GGUF of ``spec``: its path, or a generated model (``synth-<label>-<hash>.gguf``, made on first use).

    Raises:
        InputError: the GGUF does not exist.
        EmulationError: ``prima-sim synth-model`` failed.
    """
    if spec.gguf:
        p = Path(spec.gguf)
        if not p.is_file():
            raise InputError(str(p), "", "model file not found")
        return p
    d = models_dir or cache_dir() / "models"
    d.mkdir(parents=True, exist_ok=True)
    out = d / f"synth-{spec.label()}-{spec.key()}.gguf"
    if out.is_file():
        return out
    cmd = [
        sys.executable,
        "-m",
        "prima_sim.cli.main",
        "synth-model",
        *spec.synth_args(),
        "--out",
        str(out),
        "--quiet",
    ]
    if callable(log):
        log(
            f"generating the model {out} (cached; 'prima-sim cache' lists it): prima-sim synth-model "
            f"{' '.join(spec.synth_args())}"
        )
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        raise EmulationError(f"prima-sim synth-model failed: {(r.stderr or r.stdout).strip()[-600:]}")
    return out


def count_prompt_tokens(gguf: Path, text: str) -> int:
    """Tokens ``prima-sim run`` will prefill for ``text`` (the head tokenizes with BOS, special tokens parsed).

    Loads only the vocabulary (``vocab_only``), in a child process so that this process never maps llama.cpp.

    Raises:
        EmulationError: llama.cpp could not read the vocabulary.
    """
    r = subprocess.run(module_command("prima_sim.exec.count_tokens", str(gguf)), input=text.encode(),
                       capture_output=True, env=python_env())  # fmt: skip
    try:
        return int(r.stdout.decode().strip().splitlines()[-1])
    except (ValueError, IndexError):
        raise EmulationError(f"cannot tokenize the prompt with {gguf}: {r.stderr.decode()[-400:]}") from None
