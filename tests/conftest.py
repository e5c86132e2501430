"""Shared fixtures: the small real GGUF models shipped in PyPI packages, and scratch directories."""

from __future__ import annotations

from pathlib import Path

import pytest

from prima_sim.testing import gemma3_path, smollm2_path


@pytest.fixture(scope="session")
def smollm2() -> Path:
    """SmolLM2-135M-Instruct Q4_1 (llama architecture, 30 layers, tied embeddings)."""
    return smollm2_path()


@pytest.fixture(scope="session")
def gemma3(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Gemma 3 270M Q4_K_M (gemma3 architecture, 18 layers, sliding-window attention)."""
    return gemma3_path()
