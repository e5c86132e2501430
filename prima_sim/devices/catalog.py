"""The model catalog: profiles of the models the prima.cpp paper ran, computed from architecture numbers.

Each ``datasets/models/<entry>.toml`` holds only architecture numbers (layers, widths, heads, vocabulary, tied
embeddings, context) and where they come from. A profile is computed from them: tensor names, shapes and
ggml types follow llama.cpp's quantization recipe (:mod:`prima_sim.devices.quant_recipe`) and bytes follow
the GGUF block sizes (:func:`~prima_sim.devices.ggml_types.tensor_nbytes`). No size is typed in by hand; the
``published_sizes`` table in an entry records the file sizes shown on the GGUF page, for the tests to compare
against.

A reference is ``<entry>`` (Q4_K_M, the quantization the paper used) or ``<entry>-<quant>``, for example
``llama3-70b``, ``llama3-70b-q6_k`` or ``qwen2.5-7b-q8_0``. The profile's id is ``<entry>-<quant>`` and its
source ``catalog:<entry>``.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

from pydantic import Field, model_validator

from prima_sim.devices.cluster import bundled_names, datasets_root
from prima_sim.devices.model import Architecture, ModelProfile
from prima_sim.devices.quant_recipe import FTYPES, get_ftype, requires_imatrix, tensor_table
from prima_sim.errors import InputError
from prima_sim.schema import FrozenModel, read_structured, validate_model
from prima_sim.units import Bytes

DEFAULT_QUANT = "q4_k_m"
CATALOG_QUANTS: tuple[str, ...] = tuple(name.lower() for name, f in FTYPES.items() if f.id is not None)
"""Quantization suffixes a catalog reference may carry (llama.cpp's file types, lower case)."""


class CatalogEntry(FrozenModel):
    """One ``datasets/models/<entry>.toml``: architecture numbers and their provenance."""

    name: str = Field(description="the model's name on its model card")
    paper_name: str = Field(default="", description="how the prima.cpp paper or README calls it")
    arch: str = Field(description="llama.cpp architecture: llama, qwen2 or gemma3")
    n_layer: int = Field(gt=0)
    n_embd: int = Field(gt=0)
    n_ff: int = Field(gt=0)
    n_head: int = Field(gt=0)
    n_head_kv: int = Field(gt=0)
    head_dim: int = Field(default=0, ge=0, description="per-head width; 0 = n_embd / n_head")
    n_vocab: int = Field(gt=0)
    tied_embeddings: bool
    n_ctx_train: int = Field(gt=0)
    rope_freqs: bool = Field(default=False, description="has rope_freqs.weight (Llama 3.1 rope scaling)")
    rope_theta: float = Field(default=10000.0, gt=0)
    norm_eps: float = Field(default=1e-5, gt=0)
    sliding_window: int = Field(default=0, ge=0)
    source: str = Field(min_length=1, description="URL of the config.json / model card the numbers come from")
    gguf: str = Field(default="", description="URL of the GGUF files the paper's README links")
    notes: str = ""
    published_sizes: dict[str, Bytes] = Field(
        default_factory=dict, description='file sizes shown on a GGUF page, by quant ("4.92 GB"); tests only'
    )
    published_source: str = ""

    @model_validator(mode="after")
    def _check(self) -> CatalogEntry:
        if self.n_head % self.n_head_kv:
            raise ValueError(f"n_head={self.n_head} is not a multiple of n_head_kv={self.n_head_kv}")
        if not self.head_dim and self.n_embd % self.n_head:
            raise ValueError(f"n_embd={self.n_embd} is not a multiple of n_head={self.n_head}; give head_dim")
        for q in self.published_sizes:
            if q not in CATALOG_QUANTS:
                raise ValueError(f"published_sizes: unknown quant {q!r}; known: {', '.join(CATALOG_QUANTS)}")
        return self

    def architecture(self) -> Architecture:
        """The :class:`Architecture` these numbers describe."""
        hd = self.head_dim or self.n_embd // self.n_head
        return Architecture(
            arch=self.arch,
            n_layer=self.n_layer,
            n_embd=self.n_embd,
            n_ff=self.n_ff,
            n_head=self.n_head,
            n_head_kv=self.n_head_kv,
            head_dim_k=hd,
            head_dim_v=hd,
            n_vocab=self.n_vocab,
            n_ctx_train=self.n_ctx_train,
            tied_embeddings=self.tied_embeddings,
            sliding_window=self.sliding_window,
        )


def _models_dir() -> Path:
    return datasets_root() / "models"


def catalog_ids() -> list[str]:
    """Names of the catalog entries (``datasets/models/*.toml``), sorted."""
    return bundled_names("models")


@lru_cache(maxsize=64)
def _load_entry(path: str, mtime: float) -> CatalogEntry:
    return validate_model(CatalogEntry, read_structured(path), path)


def catalog_entry(entry: str) -> CatalogEntry:
    """The catalog entry called ``entry``.

    Raises:
        InputError: no such entry, or the entry file is malformed.
    """
    p = _models_dir() / f"{entry}.toml"
    if not p.is_file():
        raise InputError(entry, "", f"not a catalog model; known: {', '.join(catalog_ids()) or 'none'}")
    return _load_entry(str(p), p.stat().st_mtime)


def split_ref(ref: str) -> tuple[str, str]:
    """Split ``<entry>[-<quant>]`` into (entry, quant); the quant defaults to Q4_K_M.

    Raises:
        InputError: the entry is unknown.
    """
    low = ref.strip().lower()
    ids = catalog_ids()
    if low in ids:
        return low, DEFAULT_QUANT
    for q in sorted(CATALOG_QUANTS, key=len, reverse=True):
        if low.endswith("-" + q) and low[: -len(q) - 1] in ids:
            return low[: -len(q) - 1], q
    known = ", ".join(ids) or "none"
    raise InputError(
        ref,
        "",
        f"not a GGUF file and not a catalog model; expected <entry> or <entry>-<quant> "
        f"with entry one of: {known}; quant one of: {', '.join(CATALOG_QUANTS)}",
    )


def catalog_model(ref: str) -> ModelProfile:
    """The profile of catalog model ``ref`` (``<entry>`` or ``<entry>-<quant>``), computed, never typed in.

    Raises:
        InputError: unknown entry or quant, or a malformed entry file.
    """
    entry_name, quant = split_ref(ref)
    e = catalog_entry(entry_name)
    ft = get_ftype(quant)
    arch = e.architecture()
    try:
        tensors = tensor_table(arch, ft.name, rope_freqs=e.rope_freqs)
        if any(requires_imatrix(t.name, t.ggml_type, ft.name) for t in tensors):
            # llama-quantize refuses these types without an importance matrix, so such files always had one
            tensors = tensor_table(arch, ft.name, rope_freqs=e.rope_freqs, imatrix=True)
        return ModelProfile(
            id=f"{entry_name}-{quant}",
            source=f"catalog:{entry_name}",
            quant=ft.name,
            arch=arch,
            tensors=tensors,
        )
    except ValueError as exc:
        raise InputError(str(_models_dir() / f"{entry_name}.toml"), "", str(exc)) from None
