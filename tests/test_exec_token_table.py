"""The head's token table (prima_sim.exec.token_table) against llama.cpp's own embedding, bit for bit."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from prima_sim.devices.gguf_file import read_gguf
from prima_sim.exec import token_table
from prima_sim.exec.llamacpp import Model, Window
from prima_sim.exec.manifest import TokenTableRef
from prima_sim.exec.token_table import DECODERS, TokenTable, sample_tokens, verified_table


def ref_of(path: Path) -> TokenTableRef:
    t = read_gguf(path).tensor("token_embd.weight")
    assert t is not None
    return TokenTableRef(offset=t.offset, ggml_type=t.ggml_type, n_embd=t.shape[0], n_vocab=t.shape[1])


def synth(tmp_path: Path, quant: str) -> Path:
    from prima_sim.devices.synth import synth_architecture, write_synth_model

    path = tmp_path / f"synth-{quant}.gguf"
    arch = synth_architecture(n_layer=1, n_embd=256, n_ff=512, n_head=4, n_head_kv=2)
    write_synth_model(path, arch, quant, seed=3)
    return path


@pytest.fixture(params=["smollm2", "gemma3", "Q4_0", "Q8_0", "F16"])
def model_path(request, tmp_path) -> Path:
    """SmolLM2 (llama, Q8_0 table, no scale), Gemma 3 (Q8_0 table, scaled by sqrt(n_embd)) and generated llamas."""
    if request.param in ("smollm2", "gemma3"):
        return request.getfixturevalue(request.param)
    return synth(tmp_path, request.param)


def test_the_table_embeds_every_token_exactly_as_llama_cpp(model_path) -> None:
    """The verified table equals llama.cpp's embedding on token ids it was not verified on."""
    ref = ref_of(model_path)
    with Model(model_path) as m, Window(m, "embed", 32, 32, 1) as w:
        table = verified_table(model_path, ref, w)
        assert table is not None, f"the table ({ref.ggml_type}) should be exact here"
        try:
            rng = np.random.default_rng(0)
            for _ in range(3):
                toks = [int(t) for t in rng.integers(0, table.n_vocab, 32)]
                want = np.array(w.run_tokens(toks, 0), copy=True)
                got = table.rows(toks)
                assert got.dtype == np.float32 and got.shape == (32, m.n_embd)
                assert np.array_equal(got, want)
            assert (table.scale != 1) == (m.meta("general.architecture") == "gemma3")
        finally:
            table.close()


def test_a_table_that_differs_from_the_window_is_not_used(gemma3, monkeypatch) -> None:
    """Gemma scales its embedding: without that scale among the candidates the table is refused (the window
    embeds), rather than feeding the first layer unscaled rows."""
    monkeypatch.setattr(token_table, "candidate_scales", lambda meta, n_embd: [1.0])
    with Model(gemma3) as m, Window(m, "embed", 32, 32, 1) as w:
        assert verified_table(gemma3, ref_of(gemma3), w) is None


def test_a_type_not_decoded_here_or_no_table_leaves_the_window(tmp_path) -> None:
    """A Q4_K model's table is a k-quant, not decoded here; a manifest without the table's place (written before
    it) gives none: both embed with llama.cpp."""
    path = synth(tmp_path, "Q4_K")
    ref = ref_of(path)
    assert ref.ggml_type not in DECODERS
    with Model(path) as m, Window(m, "embed", 32, 32, 1) as w:
        assert verified_table(path, ref, w) is None
        assert verified_table(path, None, w) is None
    with pytest.raises(ValueError, match="decoded here"):
        TokenTable(path, ref)
    with pytest.raises(ValueError, match="past the end"):
        TokenTable(path, ref.model_copy(update={"ggml_type": "f32", "n_vocab": 10**9}))


def test_decoders_follow_the_block_layouts() -> None:
    """Hand-made blocks: q4_0 (d = 2: low nibbles first), q4_1 (d = 0.5, m = -1), q8_0, bf16."""
    d2 = np.float16(2).tobytes()
    qs = bytes([0x10 | i for i in range(16)])  # low nibble i, high nibble 1
    row = np.frombuffer(d2 + qs, np.uint8).reshape(1, -1)
    x = DECODERS["q4_0"][2](row)[0]
    assert list(x[:16]) == [2.0 * (i - 8) for i in range(16)] and set(x[16:]) == {2.0 * (1 - 8)}
    row = np.frombuffer(np.float16(0.5).tobytes() + np.float16(-1).tobytes() + qs, np.uint8).reshape(1, -1)
    x = DECODERS["q4_1"][2](row)[0]
    assert list(x[:16]) == [0.5 * i - 1 for i in range(16)] and set(x[16:]) == {-0.5}
    q = np.arange(-16, 16, dtype=np.int8)
    row = np.frombuffer(d2 + q.tobytes(), np.uint8).reshape(1, -1)
    assert list(DECODERS["q8_0"][2](row)[0]) == [2.0 * v for v in range(-16, 16)]
    bf = (np.array([1.5, -3.0], np.float32).view(np.uint32) >> 16).astype(np.uint16)
    assert list(DECODERS["bf16"][2](bf.view(np.uint8).reshape(1, -1))[0]) == [1.5, -3.0]


def test_sample_tokens_spread_over_the_vocabulary() -> None:
    assert sample_tokens(5, 16) == [0, 1, 2, 3, 4]
    s = sample_tokens(49152, 16)
    assert len(s) == 16 and s[0] == 0 and s[-1] == 49151 and s == sorted(set(s))
