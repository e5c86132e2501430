"""``synth-model``: generated GGUFs have the recipe's tensor table, valid blocks, and run in llama.cpp."""

from __future__ import annotations

import ctypes
import hashlib
import json
from pathlib import Path

import numpy as np
import pytest

from prima_sim.cli.main import main
from prima_sim.devices import synth
from prima_sim.devices.gguf_file import read_gguf
from prima_sim.devices.quant_recipe import tensor_table
from prima_sim.devices.synth import read_vocab, synth_architecture, write_synth_model
from prima_sim.errors import InputError

TINY = {"n_layer": 2, "n_embd": 256, "n_ff": 512, "n_head": 4, "n_head_kv": 2}


def _sha(p: Path) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def tiny_q4_0(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("synth") / "tiny-q4_0.gguf"
    write_synth_model(out, synth_architecture(**TINY), "Q4_0", seed=7, progress=False)
    return out


@pytest.mark.parametrize(
    ("arch", "quant", "tied"),
    [("llama", "Q4_0", False), ("llama", "Q4_K", False), ("llama", "Q8_0", True), ("llama", "F16", False),
     ("qwen2", "Q4_K", False), ("gemma3", "Q8_0", True)],
)  # fmt: skip
def test_tensor_table_equals_the_recipe(
    tmp_path: Path, smollm2: Path, quant: str, arch: str, tied: bool
) -> None:
    a = synth_architecture(arch=arch, tied_embeddings=tied, **TINY)
    res = write_synth_model(tmp_path / "m.gguf", a, quant, progress=False)
    n_vocab, _ = read_vocab(smollm2)
    want = tensor_table(a.model_copy(update={"n_vocab": n_vocab}), quant)
    got = read_gguf(res.path).tensors
    assert [(t.name, t.ggml_type, t.shape, t.n_bytes) for t in got] == [
        (t.name, t.ggml_type, t.shape, t.n_bytes) for t in want
    ]
    assert res.profile.arch.n_vocab == n_vocab == 49152
    assert res.tensor_bytes == sum(t.n_bytes for t in want)


def test_metadata_and_tokenizer_are_copied(tiny_q4_0: Path, smollm2: Path) -> None:
    g, donor = read_gguf(tiny_q4_0), read_gguf(smollm2)
    md = g.metadata
    assert md["general.architecture"] == "llama"
    assert md["llama.block_count"] == 2 and md["llama.embedding_length"] == 256
    assert md["llama.attention.head_count_kv"] == 2 and md["llama.rope.dimension_count"] == 64
    assert md["general.file_type"] == 2  # LLAMA_FTYPE_MOSTLY_Q4_0
    assert md["prima_sim.synth.seed"] == 7
    for key, value in donor.metadata.items():
        if key.startswith("tokenizer."):
            assert md[key] == value, key
    types = {t.name: t.ggml_type for t in g.tensors}
    assert types["output.weight"] == "q6_k" and types["blk.0.attn_v.weight"] == "q4_0"


def test_same_seed_same_bytes_other_seed_other_bytes(tmp_path: Path, tiny_q4_0: Path) -> None:
    again = write_synth_model(tmp_path / "a.gguf", synth_architecture(**TINY), "Q4_0", seed=7, progress=False)
    other = write_synth_model(tmp_path / "b.gguf", synth_architecture(**TINY), "Q4_0", seed=8, progress=False)
    assert _sha(again.path) == _sha(tiny_q4_0)
    assert _sha(other.path) != _sha(tiny_q4_0)
    assert again.file_bytes == other.file_bytes


@pytest.mark.parametrize("ggml_type", ["q4_0", "q5_0", "q8_0", "q4_k", "q6_k"])
@pytest.mark.parametrize("n_in", [256, 29568])
def test_generated_blocks_dequantize_to_the_intended_scale(ggml_type: str, n_in: int) -> None:
    from gguf import GGMLQuantizationType, quants

    sigma = 1 / np.sqrt(n_in)
    raw = synth._chunk_quant(ggml_type, np.random.SFC64(0), 256 * 256, sigma)
    x = quants.dequantize(raw.reshape(256, -1), GGMLQuantizationType[ggml_type.upper()])
    assert np.isfinite(x).all()
    assert np.sqrt((x**2).mean()) == pytest.approx(sigma, rel=0.03)
    assert abs(x.mean()) < 0.15 * sigma
    if ggml_type in ("q4_0", "q5_0", "q8_0"):  # the fp16 scale is normal, not subnormal
        assert (
            np.abs(raw.reshape(-1, raw.size // (256 * 256 // 32))[:, :2].copy().view(np.float16)) > 6.1e-5
        ).all()


def test_f16_weights_are_finite_and_scaled() -> None:
    x = synth._chunk_f16(np.random.SFC64(1), 10_000, 0.01).view(np.float16).astype(np.float32)
    assert np.isfinite(x).all()
    assert 0.005 < np.sqrt((x**2).mean()) < 0.02


def test_errors(tmp_path: Path) -> None:
    with pytest.raises(InputError, match=r"--quant.*Q4_0, Q4_K, Q8_0, F16"):
        write_synth_model(tmp_path / "m.gguf", synth_architecture(**TINY), "Q5_K_M", progress=False)
    with pytest.raises(InputError, match=r"--kv-heads.*must divide --heads"):
        synth_architecture(n_layer=2, n_embd=256, n_ff=512, n_head=4, n_head_kv=3)
    text = tmp_path / "vocab.gguf"
    text.write_text("not a model")
    with pytest.raises(InputError, match="is not a GGUF file"):
        write_synth_model(
            tmp_path / "m.gguf", synth_architecture(**TINY), "Q4_0", vocab_from=text, progress=False
        )
    assert not (tmp_path / "m.gguf").exists()


def test_cli_like_and_errors(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # a tiny catalog entry of its own (PRIMA_SIM_DATASETS), so the test writes megabytes, not a 1.5B model
    models = tmp_path / "datasets" / "models"
    models.mkdir(parents=True)
    (models / "tiny-qwen.toml").write_text(
        'name = "tiny"\narch = "qwen2"\nn_layer = 3\nn_embd = 256\nn_ff = 640\nn_head = 4\nn_head_kv = 2\n'
        "n_vocab = 1000\ntied_embeddings = false\nn_ctx_train = 2048\nrope_theta = 1000000.0\n"
        'source = "https://example.invalid/config.json"\n'
    )
    monkeypatch.setenv("PRIMA_SIM_DATASETS", str(tmp_path / "datasets"))
    out = tmp_path / "like.gguf"
    rc = main(
        ["synth-model", "--like", "tiny-qwen", "--quant", "q4_k", "--out", str(out), "--quiet", "--json"]
    )
    info = json.loads(capsys.readouterr().out)
    assert rc == 0 and info["n_layer"] == 3 and info["n_vocab"] == 49152  # the donor's vocabulary, not 1000
    g = read_gguf(out)
    assert g.architecture == "qwen2" and g.tensor("blk.2.attn_q.bias") is not None
    assert g.metadata["qwen2.rope.freq_base"] == 1e6
    # 640 is not a multiple of 256: the uniform Q4_K falls back to Q5_0 on ffn_down, as llama.cpp would
    assert g.tensor("blk.0.ffn_down.weight").ggml_type == "q5_0"
    assert g.tensor("blk.0.ffn_up.weight").ggml_type == "q4_k"
    assert g.tensor("output.weight").ggml_type == "q6_k"
    for argv, fragment in [
        (["--like", "llama3-8b", "--layers", "2"], "--like: takes its shape from the catalog; drop --layers"),
        (["--layers", "2", "--embd", "256"], "--ff: is required without --like"),
        (["--like", "llama3-8b"], "not a catalog model"),  # not in the test's own catalog
    ]:
        rc = main(["synth-model", *argv, "--quant", "Q4_0", "--out", str(tmp_path / "x.gguf"), "--quiet"])
        err = capsys.readouterr().err
        assert rc == 2 and err.count("\n") == 1 and fragment in err, err


# --- llama.cpp ----------------------------------------------------------------------------------------------
def _llama_logits(path: Path, text: bytes = b"The quick brown fox", n_new: int = 3) -> np.ndarray:
    """Logits of every prompt token and of ``n_new`` greedy steps, from llama.cpp (CPU, no repacking)."""
    lc = pytest.importorskip("llama_cpp")
    lc.llama_log_set(_QUIET, ctypes.c_void_p())
    lc.llama_backend_init()
    mp = lc.llama_model_default_params()
    mp.use_extra_bufts = False  # AMX kernels die with SIGILL on these CPUs (environment.md)
    mp.n_gpu_layers = 0
    model = lc.llama_model_load_from_file(str(path).encode(), mp)
    assert model, "llama.cpp could not load the model"
    cp = lc.llama_context_default_params()
    cp.n_ctx, cp.n_batch, cp.n_threads, cp.n_threads_batch = 64, 64, 2, 2
    ctx = lc.llama_init_from_model(model, cp)
    vocab = lc.llama_model_get_vocab(model)
    n_vocab = lc.llama_vocab_n_tokens(vocab)
    toks = (lc.llama_token * 32)()
    n = lc.llama_tokenize(vocab, text, len(text), toks, 32, True, False)
    batch = lc.llama_batch_init(32, 0, 1)
    out, cur, pos = [], list(toks[:n]), 0
    try:
        for _ in range(n_new + 1):
            batch.n_tokens = len(cur)
            for i, t in enumerate(cur):
                batch.token[i], batch.pos[i], batch.n_seq_id[i], batch.logits[i] = t, pos + i, 1, 1
                batch.seq_id[i][0] = 0
            assert lc.llama_decode(ctx, batch) == 0
            for i in range(len(cur)):
                out.append(np.ctypeslib.as_array(lc.llama_get_logits_ith(ctx, i), shape=(n_vocab,)).copy())
            pos += len(cur)
            cur = [int(np.argmax(out[-1]))]
    finally:
        lc.llama_batch_free(batch)
        lc.llama_free(ctx)
        lc.llama_model_free(model)
    return np.stack(out)


try:
    import llama_cpp as _lc

    @_lc.llama_log_callback
    def _QUIET(level, text, user_data):  # type: ignore[no-untyped-def]
        pass
except ImportError:  # pragma: no cover
    _QUIET = None


@pytest.mark.real
@pytest.mark.parametrize(("arch", "quant", "tied"), [("llama", "Q4_0", False), ("qwen2", "Q4_K", False),
                                                     ("gemma3", "Q8_0", True)])  # fmt: skip
def test_llama_cpp_runs_a_generated_model(tmp_path: Path, arch: str, quant: str, tied: bool) -> None:
    a = synth_architecture(arch=arch, tied_embeddings=tied, **{**TINY, "n_layer": 4})
    res = write_synth_model(tmp_path / "m.gguf", a, quant, progress=False, rope_freqs=arch == "llama")
    logits = _llama_logits(res.path)
    assert logits.shape[1] == 49152
    assert np.isfinite(logits).all()
    assert 0.3 < logits.std() < 3  # unit-scale logits by construction
