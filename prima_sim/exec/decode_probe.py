"""The fixed cost of one ``llama_decode`` call on this host (the profile's ``decode_overhead_s``).

A llama.cpp decode pays, besides the layers' arithmetic, a cost that does not depend on the model's size:
building the graph, scheduling it, waking the compute threads, bookkeeping the KV cache. prima.cpp folded it
into its other terms; prima-sim measures it directly. It lives here, not in :mod:`prima_sim.devices.profiler`,
because it drives llama.cpp through llama-cpp-python's ``llama_cpp`` module, which ``devices`` must not import;
``prima-sim profile`` passes :func:`measure_decode_overhead` to the profiler.

Method: write a tiny one-layer llama-architecture GGUF (n_embd 64, n_ff 128, one head, f32 weights, no
vocabulary: ``tokenizer.ggml.model = "none"``, ``llama.vocab_size = 1`` and a [64, 1] ``token_embd`` of
zeros), load it with ``use_extra_bufts = False`` (no AMX or repacked buffers), and decode one token at a time
from an embeddings batch; the median time of a one-token decode is the overhead (its arithmetic is a few
hundred kFLOP, well under a microsecond).
"""

from __future__ import annotations

import ctypes
import logging
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from prima_sim.errors import WorkerError
from prima_sim.exec.llamacpp import bindings

log = logging.getLogger(__name__)

N_EMBD = 64
N_FF = 128
N_CTX = 256
LOG_LEVEL_ERROR = 4
_LOG_SINK: Any = None  # the ctypes callback must outlive every llama.cpp call


def write_tiny_model(path: str | Path, n_embd: int = N_EMBD, n_ff: int = N_FF, n_layer: int = 1) -> Path:
    """Write a vocabulary-free llama-architecture GGUF with ``n_layer`` small f32 layers to ``path``."""
    import gguf

    path = Path(path)
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(n_layer)
    w.add_context_length(N_CTX)
    w.add_embedding_length(n_embd)
    w.add_feed_forward_length(n_ff)
    w.add_head_count(1)
    w.add_head_count_kv(1)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_dimension_count(n_embd)
    w.add_vocab_size(1)
    w.add_tokenizer_model("none")
    w.add_file_type(0)  # all f32
    rng = np.random.default_rng(0)

    def weight(name: str, rows: int, cols: int) -> None:  # numpy shape (rows, cols) = ggml [cols, rows]
        w.add_tensor(name, (rng.standard_normal((rows, cols)) * 0.02).astype(np.float32))

    w.add_tensor("token_embd.weight", np.zeros((1, n_embd), np.float32))
    w.add_tensor("output_norm.weight", np.ones(n_embd, np.float32))
    for i in range(n_layer):
        w.add_tensor(f"blk.{i}.attn_norm.weight", np.ones(n_embd, np.float32))
        w.add_tensor(f"blk.{i}.ffn_norm.weight", np.ones(n_embd, np.float32))
        for name in ("attn_q", "attn_k", "attn_v", "attn_output"):
            weight(f"blk.{i}.{name}.weight", n_embd, n_embd)
        weight(f"blk.{i}.ffn_gate.weight", n_ff, n_embd)
        weight(f"blk.{i}.ffn_up.weight", n_ff, n_embd)
        weight(f"blk.{i}.ffn_down.weight", n_embd, n_ff)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def _quiet(lc: Any) -> None:
    global _LOG_SINK
    if _LOG_SINK is None:

        def sink(level: int, text: bytes, _user: Any) -> None:
            if level == LOG_LEVEL_ERROR and text:
                log.warning("llama.cpp: %s", text.decode("utf-8", "replace").rstrip())

        _LOG_SINK = lc.llama_log_callback(sink)
        lc.llama_log_set(_LOG_SINK, None)


def measure_decode_overhead(n_threads: int, runs: int = 40, warmup: int = 5) -> tuple[float, str]:
    """Median seconds of one one-token ``llama_decode`` of a tiny model, and a line describing the method.

    Raises:
        MissingDependencyError: llama-cpp-python is not installed.
        WorkerError: llama.cpp could not load the tiny model or a decode failed.
    """
    lc = bindings()
    _quiet(lc)
    lc.llama_backend_init()
    with tempfile.TemporaryDirectory(prefix="prima-sim-decode-") as tmp:
        path = write_tiny_model(Path(tmp) / "tiny.gguf")
        mp = lc.llama_model_default_params()
        mp.n_gpu_layers = 0
        mp.use_extra_bufts = False  # no AMX / repacked buffers (SIGILL on some CPUs)
        model = lc.llama_model_load_from_file(str(path).encode(), mp)
        if not model:
            raise WorkerError("llama.cpp could not load the decode-overhead probe model")
        ctx = batch = None
        try:
            cp = lc.llama_context_default_params()
            cp.n_ctx = N_CTX
            cp.n_batch = 1
            cp.n_ubatch = 1
            cp.n_seq_max = 1
            cp.n_threads = n_threads
            cp.n_threads_batch = n_threads
            cp.no_perf = True
            ctx = lc.llama_init_from_model(model, cp)
            if not ctx:
                raise WorkerError("llama.cpp could not create a context for the decode-overhead probe")
            batch = lc.llama_batch_init(1, N_EMBD, 1)
            x = np.full(N_EMBD, 0.1, dtype=np.float32)  # named: the copy must read live memory
            ctypes.memmove(batch.embd, x.ctypes.data, x.nbytes)
            batch.n_tokens = 1
            batch.n_seq_id[0] = 1
            batch.seq_id[0][0] = 0
            batch.logits[0] = 1
            mem = lc.llama_get_memory(ctx)
            times: list[float] = []
            pos = 0
            for i in range(warmup + runs):
                if pos >= N_CTX - 1:
                    lc.llama_memory_clear(mem, True)
                    pos = 0
                batch.pos[0] = pos
                t0 = time.perf_counter()
                rc = lc.llama_decode(ctx, batch)
                dt = time.perf_counter() - t0
                if rc != 0:
                    raise WorkerError(f"llama_decode of the decode-overhead probe failed with status {rc}")
                pos += 1
                if i >= warmup:
                    times.append(dt)
        finally:
            if batch is not None:
                lc.llama_batch_free(batch)
            if ctx:
                lc.llama_free(ctx)
            lc.llama_model_free(model)
    med = statistics.median(times)
    note = (
        f"llama_decode of one token (embeddings batch) through a 1-layer, n_embd {N_EMBD}, f32, vocabulary-free llama "
        f"GGUF, use_extra_bufts=False, {n_threads} thread(s): median {med * 1e6:.1f} us of {len(times)} runs "
        f"({min(times) * 1e6:.1f}-{max(times) * 1e6:.1f} us) after {warmup} warm-up"
    )
    return med, note
