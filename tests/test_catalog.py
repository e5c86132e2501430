"""The model catalog: every entry builds, and computed sizes match the GGUF files people publish."""

from __future__ import annotations

import pytest

from prima_sim.cli.common import load_model_arg
from prima_sim.devices.catalog import (
    CATALOG_QUANTS,
    catalog_entry,
    catalog_ids,
    catalog_model,
    split_ref,
)
from prima_sim.errors import InputError

PAPER_MODELS = {
    "llama3-8b", "llama3-14b", "llama1-30b", "llama3-45b", "llama3-60b", "llama1-65b", "llama3-70b",
    "qwen2.5-7b", "qwen2.5-14b", "qwen2.5-32b", "qwen2.5-72b", "qwq-32b",
    "deepseek-r1-distill-qwen-1.5b", "deepseek-r1-distill-qwen-7b", "deepseek-r1-distill-llama-8b",
    "deepseek-r1-distill-qwen-14b", "deepseek-r1-distill-qwen-32b", "deepseek-r1-distill-llama-70b",
}  # fmt: skip


def test_catalog_holds_the_papers_models() -> None:
    assert set(catalog_ids()) == PAPER_MODELS


@pytest.mark.parametrize("entry", sorted(PAPER_MODELS))
@pytest.mark.parametrize("quant", ["q4_k_m", "q6_k", "q8_0"])
def test_every_entry_builds(entry: str, quant: str) -> None:
    m = catalog_model(f"{entry}-{quant}")
    e = catalog_entry(entry)
    assert m.id == f"{entry}-{quant}"
    assert m.source == f"catalog:{entry}"
    assert m.quant == quant.upper()
    assert m.arch.n_layer == e.n_layer and len(m.layer_bytes) == e.n_layer
    assert e.source.startswith("https://")
    assert m.total_bytes == m.input_bytes + sum(m.layer_bytes) + m.output_bytes - (
        m.tensor("token_embd.weight").n_bytes if m.arch.tied_embeddings else 0
    ) + sum(t.n_bytes for t in m.tensors if t.name == "rope_freqs.weight")
    # bits per weight in the range llama.cpp reports for these mixes (Qwen2.5-72B's Q6_K is 7.1: its ffn_down rows
    # are 29568 long, not a multiple of 256, so they fall back to Q8_0)
    n_params = sum(t.shape[0] * (t.shape[1] if len(t.shape) > 1 else 1) for t in m.tensors)
    lo, hi = {"q4_k_m": (4.5, 5.3), "q6_k": (6.5, 7.2), "q8_0": (8.4, 8.6)}[quant]
    assert lo < 8 * m.total_bytes / n_params < hi


PUBLISHED = [(e, q, b) for e in sorted(PAPER_MODELS) for q, b in catalog_entry(e).published_sizes.items()]


@pytest.mark.parametrize(
    ("entry", "quant", "published"), PUBLISHED, ids=[f"{e}-{q}" for e, q, _ in PUBLISHED]
)
def test_computed_size_matches_the_published_file(entry: str, quant: str, published: int) -> None:
    # published sizes are rounded to 3 digits and include the tokenizer metadata (a few MB)
    m = catalog_model(f"{entry}-{quant}")
    assert m.total_bytes == pytest.approx(published, rel=0.005)


def test_published_sizes_cover_the_key_models() -> None:
    assert catalog_entry("llama3-70b").published_sizes["q4_k_m"] == pytest.approx(42.5e9)
    assert catalog_entry("llama3-8b").published_sizes["q4_k_m"] == pytest.approx(4.92e9)
    assert len(PUBLISHED) >= 25


def test_derived_entries_say_so() -> None:
    assert "DERIVED" in catalog_entry("llama3-60b").notes
    assert "60" in catalog_entry("llama3-14b").notes and "mergekit" in catalog_entry("llama3-14b").notes


def test_llama31_style_models_have_rope_freqs() -> None:
    assert catalog_model("deepseek-r1-distill-llama-70b").tensor("rope_freqs.weight") is not None
    assert catalog_model("llama3-70b").tensor("rope_freqs.weight") is None


@pytest.mark.parametrize(
    ("ref", "want"),
    [
        ("llama3-70b", ("llama3-70b", "q4_k_m")),
        ("llama3-70b-q6_k", ("llama3-70b", "q6_k")),
        ("LLAMA3-70B-Q8_0", ("llama3-70b", "q8_0")),
        ("qwen2.5-7b-q4_k_s", ("qwen2.5-7b", "q4_k_s")),
        ("deepseek-r1-distill-qwen-1.5b-iq4_xs", ("deepseek-r1-distill-qwen-1.5b", "iq4_xs")),
    ],
)
def test_split_ref(ref: str, want: tuple[str, str]) -> None:
    assert split_ref(ref) == want


@pytest.mark.parametrize("ref", ["llama3-71b", "llama3-70b-q9_k", "", "qwen2.5"])
def test_unknown_ref_lists_the_known_ids(ref: str) -> None:
    with pytest.raises(
        InputError, match=r"not a catalog model; expected <entry> or <entry>-<quant>.*llama3-70b"
    ):
        catalog_model(ref)


def test_load_model_arg_resolves_catalog_ids() -> None:
    assert load_model_arg("qwq-32b").id == "qwq-32b-q4_k_m"


def test_every_quant_suffix_builds_for_a_small_model() -> None:
    for q in CATALOG_QUANTS:
        m = catalog_model(f"deepseek-r1-distill-qwen-1.5b-{q}")
        assert m.total_bytes > 0
