"""Helpers shared by subcommands: resolving a model or cluster argument, printing JSON."""

from __future__ import annotations

import json
import math
import os
import sys
from pathlib import Path
from typing import Any

from prima_sim.devices.cluster import Cluster, load_cluster
from prima_sim.devices.model import ModelProfile, model_profile_from_gguf


def load_model_arg(ref: str) -> ModelProfile:
    """A ``--model`` argument: a GGUF path, or a catalog id such as ``llama3-70b`` or ``llama3-70b-q6_k``."""
    p = Path(ref)
    if p.suffix.lower() == ".gguf" or p.exists():
        return model_profile_from_gguf(p)
    from prima_sim.devices.catalog import catalog_model

    return catalog_model(ref)


def load_cluster_arg(ref: str) -> Cluster:
    """A ``--cluster`` argument: a bundled cluster name or a TOML/JSON file."""
    return load_cluster(ref)


def quiet_solver_banner() -> None:
    """Keep HiGHS's start-up banner off stdout.

    highspy (1.16) prints "Running HiGHS ..." on the C-level stdout the first time a solver is created in a
    process, whatever PuLP's ``msg=False`` says, and those lines would corrupt ``--json`` output. Creating that
    first instance here, with file descriptor 1 pointed at /dev/null, spends the banner where it does no harm.
    """
    try:
        import highspy
    except ImportError:  # PuLP then fails with its own message when a plan is solved
        return
    sys.stdout.flush()
    saved = os.dup(1)
    null = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(null, 1)
        highspy.Highs()
    finally:
        os.dup2(saved, 1)
        os.close(saved)
        os.close(null)


def _clean(obj: Any) -> Any:
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_clean(v) for v in obj]
    return obj


def print_json(obj: Any) -> None:
    """Print one JSON object on stdout (NaN/inf become null, so the output is strict JSON)."""
    json.dump(_clean(obj), sys.stdout, indent=2)
    sys.stdout.write("\n")
