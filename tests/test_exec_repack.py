"""exec/llamacpp.py: a model loaded with its layers' matrices in the CPU repack buffer type (``Model(repack=True)``)
computes what llama.cpp computes with its own extra buffer types, and the layers leave the file mapping."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from prima_sim.exec.llamacpp import Model, Reference, Window, _Runtime


def _synth(tmp_path: Path, quant: str = "Q4_0", n_layer: int = 2) -> Path:
    from prima_sim.devices.synth import synth_architecture, write_synth_model

    path = tmp_path / f"synth-{quant}.gguf"
    write_synth_model(
        path, synth_architecture(n_layer=n_layer, n_embd=256, n_ff=512, n_head=4, n_head_kv=2), quant, seed=5
    )
    return path


def _logits_with_extra_bufts(path: Path, tokens: list[int]) -> np.ndarray:
    """The same model loaded with llama.cpp's own ``use_extra_bufts`` (what repack=True must equal)."""
    rt = _Runtime.get()
    lc = rt.lc
    params = lc.llama_model_default_params()
    params.use_extra_bufts = True
    params.load_mode = 1
    m = Model.__new__(Model)
    m._lc, m.path, m.repacked = lc, path, True
    m.ptr = lc.llama_model_load_from_file(str(path).encode(), params)
    assert m.ptr
    m.vocab = lc.llama_model_get_vocab(m.ptr)
    m.n_embd, m.n_layer = int(lc.llama_model_n_embd(m.ptr)), int(lc.llama_model_n_layer(m.ptr))
    m.n_vocab = int(lc.llama_vocab_n_tokens(m.vocab))
    try:
        with Window(m, "logits", 64, 16, 1, token_input=True) as w:
            return np.array(w.run_tokens_logits(tokens, 0))
    finally:
        m.close()


def test_repacked_layers_compute_what_llama_cpp_computes_with_its_extra_buffer_types(tmp_path: Path) -> None:
    assert (
        _Runtime.get().repack_buft() is not None
    )  # the pinned wheel's CPU backend has it on every x86-64 CPU
    path = _synth(tmp_path)
    tokens = [3, 17, 92, 150, 7, 44]
    ref = Reference(path, 64, 16, 1, repack=True)
    try:
        assert ref.model.repacked
        ours = np.array(ref.logits(tokens, 0))
    finally:
        ref.close()
    assert np.array_equal(ours, _logits_with_extra_bufts(path, tokens))  # bit for bit
    plain = Reference(path, 64, 16, 1)
    try:
        assert not plain.model.repacked
        other = np.array(plain.logits(tokens, 0))
    finally:
        plain.close()
    assert np.allclose(ours, other, atol=0.05)  # the same model, another kernel's rounding
    assert not np.array_equal(ours, other)  # and really another kernel


def test_a_vocabulary_only_load_is_never_repacked(tmp_path: Path) -> None:
    m = Model(_synth(tmp_path, n_layer=1), vocab_only=True, repack=True)
    try:
        assert not m.repacked
    finally:
        m.close()
