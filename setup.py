"""Package layout that pyproject.toml alone cannot express: the repository's ``datasets/`` ships inside the
package as ``prima_sim/_datasets`` (device, cluster, model and scenario files, and the examples), so that a
wheel, ``pip install .`` and pipx installs carry them. The repository's ``datasets/`` stays the only copy;
everything else about the package is in pyproject.toml.
"""

from pathlib import Path

from setuptools import find_packages, setup

HERE = Path(__file__).resolve().parent
DATASET_DIRS = sorted(
    p.name for p in (HERE / "datasets").iterdir() if p.is_dir() and not p.name.startswith(".")
)
DATASET_PACKAGES = ["prima_sim._datasets", *(f"prima_sim._datasets.{d}" for d in DATASET_DIRS)]

setup(
    packages=[*find_packages(include=["prima_sim", "prima_sim.*"]), *DATASET_PACKAGES],
    package_dir={"prima_sim._datasets": "datasets"},
    package_data={"prima_sim": ["py.typed"], **{p: ["*.toml", "*.md"] for p in DATASET_PACKAGES}},
)
