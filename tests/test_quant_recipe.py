"""llama.cpp's quantization recipe, checked tensor by tensor against real GGUF files and rule by rule."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from prima_sim.devices.catalog import catalog_entry
from prima_sim.devices.gguf_file import read_gguf
from prima_sim.devices.model import Architecture, architecture_from_gguf
from prima_sim.devices.quant_recipe import FTYPES, get_ftype, is_type_70b, tensor_table


def _file_table(path: Path) -> list[tuple[str, str, tuple[int, ...], int]]:
    return [(t.name, t.ggml_type, t.shape, t.n_bytes) for t in read_gguf(path).tensors]


def _computed(path: Path, ftype: str) -> list[tuple[str, str, tuple[int, ...], int]]:
    g = read_gguf(path)
    arch = architecture_from_gguf(g)
    table = tensor_table(arch, ftype, rope_freqs=g.tensor("rope_freqs.weight") is not None)
    return [(t.name, t.ggml_type, t.shape, t.n_bytes) for t in table]


def test_smollm2_q4_1_matches_the_file_exactly(smollm2: Path) -> None:
    # Q4_1 everywhere, and the tied embedding falls under the output rule: Q6_K, whose 256-block does not
    # divide n_embd=576, so it falls back to Q8_0 (environment.md: "Q4_1 with a Q8_0 embedding").
    got, want = _computed(smollm2, "Q4_1"), _file_table(smollm2)
    assert {t[0]: t[1:] for t in got} == {t[0]: t[1:] for t in want}
    assert len(got) == len(want) == 272
    assert sum(t[3] for t in got) == sum(t[3] for t in want) == 96_576_768
    # the file was written in Hugging Face's tensor order (blk.0, blk.1, blk.10, ...); ours is llama-quantize's
    assert [t[0] for t in got] != [t[0] for t in want]


def test_gemma3_q4_k_m_matches_the_file_exactly_in_order(gemma3: Path) -> None:
    got, want = _computed(gemma3, "Q4_K_M"), _file_table(gemma3)
    assert got == want  # names, types, shapes, bytes and order
    types = {name: ty for name, ty, _, _ in got}
    # n_embd=640 is not a multiple of 256: Q4_K falls back to Q5_0, Q6_K to Q8_0
    assert types["blk.2.attn_q.weight"] == "q5_0"
    assert types["blk.0.attn_v.weight"] == "q8_0" and types["blk.2.attn_v.weight"] == "q5_0"
    assert types["blk.0.ffn_down.weight"] == "q6_k" and types["blk.2.ffn_down.weight"] == "q4_k"
    assert types["token_embd.weight"] == "q8_0"


def _arch(entry: str) -> Architecture:
    return catalog_entry(entry).architecture()


def _types(entry: str, ftype: str, **kw: bool) -> dict[str, str]:
    return {t.name: t.ggml_type for t in tensor_table(_arch(entry), ftype, **kw)}


MORE_BITS_32 = [0, 1, 2, 3, 6, 9, 12, 15, 18, 21, 24, 27, 28, 29, 30, 31]


def test_q4_k_m_gives_every_third_attn_v_and_ffn_down_q6_k() -> None:
    ty = _types("llama3-8b", "Q4_K_M")
    for i in range(32):
        want = "q6_k" if i in MORE_BITS_32 else "q4_k"
        assert ty[f"blk.{i}.attn_v.weight"] == want, i
        assert ty[f"blk.{i}.ffn_down.weight"] == want, i
        assert ty[f"blk.{i}.attn_q.weight"] == ty[f"blk.{i}.ffn_up.weight"] == "q4_k"
    assert ty["output.weight"] == "q6_k"
    assert ty["token_embd.weight"] == "q4_k"
    assert ty["blk.0.attn_norm.weight"] == ty["output_norm.weight"] == "f32"


def test_70b_attn_v_bump_applies_to_gqa_70b_and_qwen_72b_but_not_llama1_65b() -> None:
    assert is_type_70b(_arch("llama3-70b")) and is_type_70b(_arch("qwen2.5-72b"))
    assert not is_type_70b(_arch("llama1-65b")) and not is_type_70b(_arch("llama3-60b"))
    v70 = {_types("llama3-70b", "Q4_K_M")[f"blk.{i}.attn_v.weight"] for i in range(80)}
    v65 = {_types("llama1-65b", "Q4_K_M")[f"blk.{i}.attn_v.weight"] for i in range(80)}
    assert v70 == {"q5_k", "q6_k"}
    assert v65 == {"q4_k", "q6_k"}


def test_row_lengths_that_are_not_a_multiple_of_256_fall_back() -> None:
    ty = _types("qwen2.5-72b", "Q4_K_M")  # n_ff = 29568 = 115.5 x 256
    downs = {ty[f"blk.{i}.ffn_down.weight"] for i in range(80)}
    assert downs == {"q5_0", "q8_0"}  # Q4_K -> Q5_0, Q6_K -> Q8_0
    assert ty["blk.0.ffn_up.weight"] == "q4_k"  # its rows are n_embd = 8192 long
    # a row that is not even a multiple of 32 ends in F16 (attn_output rows are n_head x head_dim = 200 long)
    odd = Architecture(arch="llama", n_layer=1, n_embd=256, n_ff=512, n_head=4, n_head_kv=4, head_dim_k=50,
                       head_dim_v=50, n_vocab=1000, tied_embeddings=False)  # fmt: skip
    types = {t.name: t.ggml_type for t in tensor_table(odd, "Q4_K_M")}
    assert types["blk.0.attn_output.weight"] == "f16"
    assert types["blk.0.attn_q.weight"] == "q4_k"
    # ... but llama-quantize has no fallback for the output head's Q8_0, and neither do we
    bad = odd.model_copy(update={"n_embd": 200})
    with pytest.raises(ValueError, match="no fallback quantization for type q8_0 and a row of 200"):
        tensor_table(bad, "Q4_K_M")


def test_tied_embedding_follows_the_output_rule() -> None:
    def types(n_embd: int) -> dict[str, str]:
        a = Architecture(arch="llama", n_layer=2, n_embd=n_embd, n_ff=1024, n_head=8, n_head_kv=8,
                         head_dim_k=n_embd // 8, head_dim_v=n_embd // 8, n_vocab=1000, tied_embeddings=True)  # fmt: skip
        return {t.name: t.ggml_type for t in tensor_table(a, "Q4_K_M")}

    t576, t1024 = types(576), types(1024)
    assert "output.weight" not in t576
    assert t576["token_embd.weight"] == "q8_0"
    assert t1024["token_embd.weight"] == "q6_k"


def test_q8_0_f16_and_uniform_q4_k() -> None:
    q8 = _types("llama3-8b", "Q8_0")
    assert {t for n, t in q8.items() if not n.endswith("norm.weight")} == {"q8_0"}
    f16 = _types("llama3-8b", "F16")
    assert {t for n, t in f16.items() if not n.endswith("norm.weight")} == {"f16"}
    assert {t for n, t in f16.items() if n.endswith("norm.weight")} == {"f32"}
    uni = _types("llama3-8b", "Q4_K")
    assert uni["output.weight"] == "q6_k"
    assert {t for n, t in uni.items() if n.startswith("blk.") and not n.endswith("norm.weight")} == {"q4_k"}


def test_qwen2_biases_and_rope_freqs_are_f32() -> None:
    q = tensor_table(_arch("qwen2.5-7b"), "Q4_K_M")
    biases = [t for t in q if t.name.endswith(".bias")]
    assert len(biases) == 3 * 28 and {t.ggml_type for t in biases} == {"f32"}
    r = {t.name: t for t in tensor_table(_arch("deepseek-r1-distill-llama-8b"), "Q4_K_M", rope_freqs=True)}
    assert r["rope_freqs.weight"].shape == (64,) and r["rope_freqs.weight"].ggml_type == "f32"


def test_imatrix_guard_for_q4_0_ffn_down() -> None:
    plain = _types("llama3-8b", "Q4_0")
    imat = _types("llama3-8b", "Q4_0", imatrix=True)
    assert {plain[f"blk.{i}.ffn_down.weight"] for i in range(32)} == {"q4_0"}
    assert [imat[f"blk.{i}.ffn_down.weight"] for i in range(5)] == ["q4_1"] * 4 + ["q4_0"]


def test_unknown_ftype_and_architecture_are_rejected() -> None:
    with pytest.raises(ValueError, match=r"unknown quantization 'Q9_K'.*Q4_K_M"):
        get_ftype("Q9_K")
    bad = _arch("llama3-8b").model_copy(update={"arch": "mamba"})
    with pytest.raises(ValueError, match="architecture 'mamba' is not supported"):
        tensor_table(bad, "Q4_K_M")


@settings(max_examples=60, deadline=None)
@given(
    arch=st.sampled_from(["llama", "qwen2", "gemma3"]),
    n_layer=st.integers(1, 12),
    embd_32=st.integers(1, 96),
    ff_32=st.integers(1, 256),
    kv=st.sampled_from([1, 2, 4]),
    group=st.sampled_from([1, 2, 4]),
    tied=st.booleans(),
    ftype=st.sampled_from([f for f in FTYPES if f not in ("IQ1_S", "IQ1_M", "IQ2_XXS", "IQ2_XS")]),
)
def test_every_table_is_consistent(arch: str, n_layer: int, embd_32: int, ff_32: int, kv: int, group: int,
                                   tied: bool, ftype: str) -> None:  # fmt: skip
    n_embd, heads = 32 * embd_32, kv * group
    hd = 32 * max(
        1, embd_32 // heads
    )  # rows stay multiples of 32: legacy quants have no fallback (as in llama.cpp)
    a = Architecture(arch=arch, n_layer=n_layer, n_embd=n_embd, n_ff=32 * ff_32, n_head=heads, n_head_kv=kv,
                     head_dim_k=hd, head_dim_v=hd, n_vocab=1000, tied_embeddings=tied)  # fmt: skip
    table = tensor_table(a, ftype)  # TensorEntry checks that bytes agree with shape and type
    names = [t.name for t in table]
    assert len(names) == len(set(names))
    for t in table:
        if len(t.shape) == 1:
            assert t.ggml_type == "f32"
        else:
            assert (t.ggml_type == "f32") == (ftype == "F32")
    assert ("output.weight" in names) != tied
