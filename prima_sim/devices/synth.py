"""Generated models: GGUF files with random weights of real shapes that llama.cpp loads and runs.

Timing a 70B-class model needs a 40 GB file with that model's tensor shapes and types, not its weights.
:func:`write_synth_model` writes one: the tensor table comes from llama.cpp's quantization recipe
(:mod:`prima_sim.devices.quant_recipe`) for a uniform quantization (``Q4_0``, ``Q4_K``, ``Q8_0`` or ``F16``;
norms F32; the output head or tied embedding as llama.cpp would store it for that type), the tokenizer is
copied from a small real GGUF (SmolLM2 by default), and the weights are random numbers written directly in the
quantized block format, block by block, with numpy:

* quantized integers are random bits (every bit pattern is a valid quant);
* per-block fp16 scales are chosen so that a weight of shape ``[n_in, n_out]`` has RMS ``1/sqrt(n_in)``;
  with RMS-normed inputs every matmul output then has unit scale, the residual stream grows only like
  ``sqrt(layers)``, attention scores stay near N(0, 1) and the logits stay finite through any depth;
* K-quant sub-block scales are drawn from narrow ranges (and ``dmin`` set to cancel the mean) so that even a
  29568-wide ``ffn_down`` gets normal, not subnormal, fp16 scales;
* norm weights are 1, biases small, ``rope_freqs`` 1.

The writer streams: header, metadata and tensor infos first (``gguf.GGUFWriter``), then each tensor's data in
chunks of about 64 MiB, generated while a background thread writes the previous chunk. Memory stays constant;
generating costs about a second per GB or less on this project's 2-core machine, and the disk bounds the rest
(3-4 s per GB end to end there; docs/models.md). Output is deterministic for a given
seed (each tensor has its own random stream, ``SeedSequence([seed, index])``).

``n_vocab`` is always the donor tokenizer's size: ``--like llama3-70b`` keeps the catalog entry's layer shapes
and head counts, but its embedding and output head have the donor's vocabulary (49152 rows for SmolLM2), so
the file is smaller than the real model by the difference in those two tensors.

Why one module of this size: the quantizers of every ggml block type the generator writes (each a few lines) and the
writer that uses them; nothing else uses them.
"""

from __future__ import annotations

import math
import os
import queue
import shutil
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from prima_sim.devices.ggml_types import block_geometry
from prima_sim.devices.model import Architecture, ModelProfile, TensorEntry, model_profile_from_gguf
from prima_sim.devices.quant_recipe import get_ftype, tensor_table
from prima_sim.errors import InputError, MissingDependencyError

SYNTH_QUANTS = ("Q4_0", "Q4_K", "Q8_0", "F16")
"""Uniform quantizations :func:`write_synth_model` writes."""

SYNTH_ARCHS = ("llama", "qwen2", "gemma3")
CHUNK_BYTES = 64 * 2**20
"""Target size of one generated chunk; fixed, so chunk boundaries (and the output) do not depend on anything else."""


@dataclass(frozen=True)
class SynthResult:
    """What :func:`write_synth_model` wrote."""

    path: Path
    file_bytes: int
    tensor_bytes: int
    seconds: float
    profile: ModelProfile

    @property
    def seconds_per_gb(self) -> float:
        """Generation time per 1e9 bytes of file."""
        return self.seconds / (self.file_bytes / 1e9) if self.file_bytes else 0.0


# --- random quantized blocks ----------------------------------------------------------------------------
_JITTER_STEPS = 1024


def _scale_table(base: float) -> np.ndarray:
    """fp16 bit patterns of ``base`` x [0.75, 1.25) in :data:`_JITTER_STEPS` even steps."""
    table = base * (0.75 + 0.5 * (np.arange(_JITTER_STEPS) + 0.5) / _JITTER_STEPS)
    return table.astype(np.float16).view(np.uint16)


def _scale_index(bitgen: np.random.SFC64, n: int) -> np.ndarray:
    """``n`` random indexes into a scale table."""
    return _random_u8(bitgen, 2 * n).view(np.uint16) & np.uint16(_JITTER_STEPS - 1)


def _rms_q4_0() -> float:
    q = np.arange(16) - 8.0
    return float(np.sqrt((q**2).mean()))


def _rms_q5_0() -> float:
    q = np.arange(32) - 16.0
    return float(np.sqrt((q**2).mean()))


# Q8_0: the int8 quants are limited to [-64, 63] (one spare bit) so the scale stays far from fp16 subnormals
_Q8_LO = -64


def _rms_q8_0() -> float:
    q = np.arange(_Q8_LO, -_Q8_LO, dtype=np.float64)
    return float(np.sqrt((q**2).mean()))


# Q4_K: x = d*sc*q - dmin*m with sc in [8, 15], m in [0, 15], q in [0, 15] and dmin = mean(sc) * d, so the mean
# of a sub-block is zero on average over m.
_Q4K_SC = np.arange(8, 16, dtype=np.float64)
_Q4K_M = np.arange(0, 16, dtype=np.float64)
_Q4K_DMIN = float(_Q4K_SC.mean())


def _rms_q4_k() -> float:
    q = np.arange(16, dtype=np.float64)
    x = _Q4K_SC[:, None, None] * q[None, :, None] - _Q4K_DMIN * _Q4K_M[None, None, :]
    return float(np.sqrt((x**2).mean()))


# Q6_K: x = d * scale * (q - 32) with the int8 sub-block scales in [2, 5]
_Q6K_SC = np.arange(2, 6, dtype=np.float64)


def _rms_q6_k() -> float:
    q = np.arange(64, dtype=np.float64) - 32.0
    return float(np.sqrt((_Q6K_SC[:, None] ** 2 * q[None, :] ** 2).mean()))


_RMS = {
    "q4_0": _rms_q4_0(),
    "q5_0": _rms_q5_0(),
    "q8_0": _rms_q8_0(),
    "q4_k": _rms_q4_k(),
    "q6_k": _rms_q6_k(),
}
_JITTER_RMS = math.sqrt(0.75**2 + 0.75 * 0.5 + 0.5**2 / 3)  # RMS of the uniform [0.75, 1.25) multiplier


def _fill_blocks(ggml_type: str, raw: np.ndarray, sigma: float, bitgen: np.random.SFC64) -> None:
    """Turn random bytes ``raw`` (n_blocks x block bytes) into valid blocks of RMS ``sigma``, in place.

    Every field is edited through a 1-D strided view (one numpy inner loop over all blocks), never through a
    2-D view with a short inner axis, which would cost one inner loop per block.
    """
    base = sigma / (_RMS[ggml_type] * _JITTER_RMS)
    n = raw.shape[0]
    idx = _scale_index(bitgen, n)
    if ggml_type in ("q4_0", "q5_0"):  # fp16 d first; the nibbles (and q5_0's high bits) stay random
        raw.view(np.uint16)[:, 0] = _scale_table(base)[idx]
    elif ggml_type == "q8_0":
        flat = raw.reshape(-1)
        np.bitwise_and(flat, 0x7F, out=flat)
        np.add(
            flat, np.uint8(256 + _Q8_LO), out=flat
        )  # [0, 127] -> [-64, 63] as int8 (uint8 arithmetic wraps)
        raw.view(np.uint16)[:, 0] = _scale_table(base)[idx]  # then the fp16 d over the first two bytes
    elif ggml_type == "q4_k":  # d, dmin, 12 bytes of packed 6-bit scales and mins, 128 bytes of nibbles
        words = raw.view(np.uint16)
        words[:, 0] = _scale_table(base)[idx]
        words[:, 1] = _scale_table(base * _Q4K_DMIN)[idx]
        w32 = raw.view(np.uint32)  # the 12 scale bytes are 32-bit words 1, 2, 3 of the 144-byte block
        # word 1: sc[0..3] in 8..15 (their top 2 bits would hold sc[4..7] >> 4 = 0); word 2: m[0..3] in 0..15
        # (top bits m[4..7] >> 4 = 0); word 3: low nibbles sc[4..7] & 15 in 8..15, high nibbles m[4..7] & 15
        # (ggml's get_scale_min_k4)
        w32[:, 1] = (w32[:, 1] & np.uint32(0x07070707)) | np.uint32(0x08080808)
        w32[:, 2] &= np.uint32(0x0F0F0F0F)
        w32[:, 3] = (w32[:, 3] & np.uint32(0xF7F7F7F7)) | np.uint32(0x08080808)
    elif ggml_type == "q6_k":  # ql[128], qh[64], int8 scales[16], fp16 d last
        words = raw.view(np.uint16)
        for j in range(96, 104):  # the scale bytes, two per word: each in 2..5
            words[:, j] = (words[:, j] & np.uint16(0x0303)) + np.uint16(0x0202)
        words[:, 104] = _scale_table(base)[idx]
    else:  # pragma: no cover - guarded by _RMS
        raise ValueError(f"cannot generate {ggml_type} blocks")


def _random_u8(bitgen: np.random.SFC64, n: int) -> np.ndarray:
    """``n`` random bytes (the raw generator output: about 2-3 GB/s, against 0.5 GB/s for Generator.bytes)."""
    words = bitgen.random_raw((n + 7) // 8)
    return words.view(np.uint8)[:n]


def _chunk_quant(ggml_type: str, bitgen: np.random.SFC64, n_elems: int, sigma: float) -> np.ndarray:
    block, size = block_geometry(ggml_type)
    n_blocks = n_elems // block
    raw = _random_u8(bitgen, n_blocks * size).reshape(n_blocks, size)
    _fill_blocks(ggml_type, raw, sigma, bitgen)
    return raw.reshape(-1)


def _chunk_f16(bitgen: np.random.SFC64, n_elems: int, sigma: float) -> np.ndarray:
    # sign and mantissa random, exponent fixed: |x| uniform in [a, 2a) with a a power of two near sigma/1.53
    a_exp = int(np.clip(np.round(np.log2(sigma / math.sqrt(7 / 3))), -14, 15))
    u = _random_u8(bitgen, 2 * n_elems).view(np.uint16)
    np.bitwise_and(u, 0x83FF, out=u)
    np.bitwise_or(u, np.uint16((a_exp + 15) << 10), out=u)
    return u.view(np.uint8)


def _chunk_f32(bitgen: np.random.SFC64, n_elems: int, sigma: float) -> np.ndarray:
    x = np.random.Generator(bitgen).standard_normal(n_elems, dtype=np.float32) * np.float32(sigma)
    return x.view(np.uint8)


def _tensor_chunks(t: TensorEntry, seed: int, index: int) -> Iterator[np.ndarray]:
    """The bytes of tensor ``t``, in chunks of about :data:`CHUNK_BYTES` (whole rows)."""
    name, ty, shape = t.name, t.ggml_type, t.shape
    n_elems = math.prod(shape)
    if len(shape) == 1:  # norms 1, rope factors 1, biases small and random
        if name.endswith("bias"):
            bitgen = np.random.SFC64(np.random.SeedSequence([seed, index]))
            yield _chunk_f32(bitgen, n_elems, 0.02)
        else:
            yield np.ones(n_elems, dtype=np.float32).view(np.uint8)
        return
    sigma = 1.0 / math.sqrt(shape[0])
    bitgen = np.random.SFC64(np.random.SeedSequence([seed, index]))
    row_bytes = t.n_bytes // (n_elems // shape[0])
    rows_per_chunk = max(1, CHUNK_BYTES // row_bytes)
    n_rows = n_elems // shape[0]
    for start in range(0, n_rows, rows_per_chunk):
        n = min(rows_per_chunk, n_rows - start) * shape[0]
        if ty == "f16":
            yield _chunk_f16(bitgen, n, sigma)
        elif ty == "f32":
            yield _chunk_f32(bitgen, n, sigma)
        elif ty in _RMS:
            yield _chunk_quant(ty, bitgen, n, sigma)
        else:
            raise ValueError(f"tensor {name}: generating {ty} weights is not supported")


# --- vocabulary donor ------------------------------------------------------------------------------------
def _default_vocab_path() -> Path:
    from prima_sim.devices.bundled import smollm2_path

    return smollm2_path()


def read_vocab(path: str | Path) -> tuple[int, list[tuple[str, Any, Any, Any]]]:
    """Tokenizer metadata of a GGUF file: (vocabulary size, [(key, value, value type, element type), ...]).

    Only the ``tokenizer.*`` keys are decoded (strings kept as raw bytes, so they are copied unchanged); this
    takes a fraction of a second where ``gguf.GGUFReader`` takes several.

    Raises:
        InputError: the file is not a GGUF model with a tokenizer.
    """
    import mmap
    import struct

    from gguf import GGUFValueType

    from prima_sim.devices.gguf_file import read_gguf

    read_gguf(path)  # one-line errors for a missing, non-GGUF, truncated or corrupt file
    scalars = {
        0: "<B",
        1: "<b",
        2: "<H",
        3: "<h",
        4: "<I",
        5: "<i",
        6: "<f",
        7: "<?",
        10: "<Q",
        11: "<q",
        12: "<d",
    }
    fields: list[tuple[str, Any, Any, Any]] = []
    with open(path, "rb") as fh, mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as buf:
        pos = 16  # magic, version, tensor count
        (n_kv,) = struct.unpack_from("<Q", buf, pos)
        pos += 8

        def string() -> bytes:
            nonlocal pos
            (n,) = struct.unpack_from("<Q", buf, pos)
            out = buf[pos + 8 : pos + 8 + n]
            pos += 8 + n
            return out

        def value(vtype: int, keep: bool) -> Any:
            nonlocal pos
            if vtype in scalars:
                fmt = scalars[vtype]
                (v,) = struct.unpack_from(fmt, buf, pos)
                pos += struct.calcsize(fmt)
                return v
            if vtype == 8:
                return string()
            (etype, n) = struct.unpack_from("<IQ", buf, pos)
            pos += 12
            if etype in scalars:
                fmt = scalars[etype]
                size = struct.calcsize(fmt)
                arr = np.frombuffer(buf, dtype=np.dtype(fmt), count=n, offset=pos).tolist() if keep else None
                pos += size * n
                return arr
            if etype == 8:
                return [string() for _ in range(n)]
            return [value(etype, keep) for _ in range(n)]

        for _ in range(n_kv):
            key = string().decode("utf-8", errors="replace")
            (vtype,) = struct.unpack_from("<I", buf, pos)
            pos += 4
            start = pos
            v = value(vtype, key.startswith("tokenizer."))
            if not key.startswith("tokenizer."):
                continue
            sub = None
            if vtype == 9:
                (etype,) = struct.unpack_from("<I", buf, start)
                sub = GGUFValueType(etype)
            fields.append((key, v, GGUFValueType(vtype), sub))
    tokens = next((v for k, v, _, _ in fields if k == "tokenizer.ggml.tokens"), None)
    if not tokens:
        raise InputError(
            str(path), "tokenizer.ggml.tokens", "is missing: the vocabulary donor needs a tokenizer"
        )
    return len(tokens), fields


# --- the file ----------------------------------------------------------------------------------------------
def synth_architecture(
    *,
    arch: str = "llama",
    n_layer: int,
    n_embd: int,
    n_ff: int,
    n_head: int,
    n_head_kv: int,
    head_dim: int = 0,
    n_vocab: int = 1,
    tied_embeddings: bool = False,
    n_ctx_train: int = 4096,
    sliding_window: int = 0,
) -> Architecture:
    """An :class:`Architecture` from the numbers ``synth-model`` takes on its command line.

    Raises:
        InputError: inconsistent numbers (named after the command-line flag).
    """
    if arch not in SYNTH_ARCHS:
        raise InputError("--arch", "", f"must be one of {', '.join(SYNTH_ARCHS)}, got {arch!r}")
    for flag, v in (("--layers", n_layer), ("--embd", n_embd), ("--ff", n_ff), ("--heads", n_head),
                    ("--kv-heads", n_head_kv)):  # fmt: skip
        if v <= 0:
            raise InputError(flag, "", f"must be a positive integer, got {v}")
    if n_head % n_head_kv:
        raise InputError("--kv-heads", "", f"must divide --heads ({n_head}), got {n_head_kv}")
    hd = head_dim or n_embd // n_head
    if not head_dim and n_embd % n_head:
        raise InputError("--heads", "", f"must divide --embd ({n_embd}) unless --head-dim is given")
    if hd % 2:
        raise InputError("--head-dim", "", f"must be even (RoPE rotates pairs), got {hd}")
    if arch == "gemma3" and not sliding_window:
        sliding_window = 512
    sliding = tuple((i + 1) % 6 != 0 for i in range(n_layer)) if arch == "gemma3" else ()
    return Architecture(
        arch=arch, n_layer=n_layer, n_embd=n_embd, n_ff=n_ff, n_head=n_head, n_head_kv=n_head_kv,
        head_dim_k=hd, head_dim_v=hd, n_vocab=n_vocab, n_ctx_train=n_ctx_train, tied_embeddings=tied_embeddings,
        sliding_window=sliding_window, sliding_layers=sliding,
    )  # fmt: skip


def _metadata(w: Any, a: Architecture, ftype_id: int | None, rope_theta: float, norm_eps: float) -> None:
    p = a.arch
    w.add_type("model")
    if ftype_id is not None:
        w.add_file_type(ftype_id)
    w.add_quantization_version(2)
    w.add_uint32(f"{p}.context_length", a.n_ctx_train)
    w.add_uint32(f"{p}.embedding_length", a.n_embd)
    w.add_uint32(f"{p}.block_count", a.n_layer)
    w.add_uint32(f"{p}.feed_forward_length", a.n_ff)
    w.add_uint32(f"{p}.attention.head_count", a.n_head)
    w.add_uint32(f"{p}.attention.head_count_kv", a.n_head_kv)
    w.add_uint32(f"{p}.attention.key_length", a.head_dim_k)
    w.add_uint32(f"{p}.attention.value_length", a.head_dim_v)
    w.add_float32(f"{p}.attention.layer_norm_rms_epsilon", norm_eps)
    w.add_float32(f"{p}.rope.freq_base", rope_theta)
    if p == "llama":
        w.add_uint32(f"{p}.rope.dimension_count", a.head_dim_k)
        w.add_uint32(f"{p}.vocab_size", a.n_vocab)
    if p == "gemma3":
        w.add_uint32(f"{p}.attention.sliding_window", a.sliding_window)
        w.add_array(f"{p}.attention.sliding_window_pattern", list(a.sliding_layers))


def write_synth_model(
    out: str | Path,
    arch: Architecture,
    quant: str,
    *,
    vocab_from: str | Path | None = None,
    seed: int = 0,
    rope_freqs: bool = False,
    rope_theta: float = 10000.0,
    norm_eps: float = 1e-5,
    name: str = "",
    progress: bool = True,
    on_progress: Callable[[int], None] | None = None,
) -> SynthResult:
    """Write a GGUF model of ``arch``'s shapes with random weights quantized as ``quant``.

    ``arch.n_vocab`` is ignored: the vocabulary (and ``n_vocab``) comes from ``vocab_from`` (default SmolLM2).
    The file is written to a temporary name beside ``out`` and renamed when complete.

    Raises:
        InputError: unknown quant, unusable vocabulary donor, or not enough free disk space.
        MissingDependencyError: no vocabulary donor given and SmolLM2 is not installed.
    """
    from gguf import GGMLQuantizationType, GGUFWriter

    q = quant.strip().upper()
    if q not in SYNTH_QUANTS:
        raise InputError("--quant", "", f"must be one of {', '.join(SYNTH_QUANTS)}, got {quant!r}")
    if arch.arch not in SYNTH_ARCHS:
        raise InputError("--arch", "", f"must be one of {', '.join(SYNTH_ARCHS)}, got {arch.arch!r}")
    ft = get_ftype(q)
    try:
        donor = Path(vocab_from) if vocab_from is not None else _default_vocab_path()
    except MissingDependencyError as exc:
        raise MissingDependencyError(f"{exc}; or pass --vocab-from SMALL.gguf") from None
    n_vocab, tok_fields = read_vocab(donor)
    a = arch.model_copy(update={"n_vocab": n_vocab})
    try:
        table = tensor_table(a, q, rope_freqs=rope_freqs)
    except ValueError as exc:
        raise InputError("--quant", "", str(exc)) from None
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tensor_bytes = sum(t.n_bytes for t in table)
    free = shutil.disk_usage(out.parent).free
    if tensor_bytes + 64 * 2**20 > free:
        raise InputError(
            str(out), "", f"needs about {tensor_bytes / 1e9:.2f} GB but {free / 1e9:.2f} GB are free there"
        )

    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    t0 = time.perf_counter()
    w = GGUFWriter(str(tmp), a.arch)
    w.add_name(name or f"prima-sim synthetic {a.arch} {a.n_layer}x{a.n_embd} {q}")
    _metadata(w, a, ft.id, rope_theta, norm_eps)
    w.add_string("prima_sim.synth.quant", q)
    w.add_uint64("prima_sim.synth.seed", seed)
    w.add_string("prima_sim.synth.vocab_from", donor.name)
    for key, value, vtype, sub in tok_fields:
        w.add_key_value(key, value, vtype, sub)
    for t in table:
        w.add_tensor_info(t.name, tuple(reversed(t.shape)), np.dtype(np.float32), t.n_bytes,
                          raw_dtype=GGMLQuantizationType[t.ggml_type.upper()])  # fmt: skip
    try:
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_ti_data_to_file()
        assert w.fout is not None
        _write_data(w.fout[0], w.data_alignment, table, seed, progress, on_progress)
        w.close()
        os.replace(tmp, out)
    except BaseException:
        w.close()
        tmp.unlink(missing_ok=True)
        raise
    seconds = time.perf_counter() - t0
    profile = model_profile_from_gguf(out)
    return SynthResult(out, out.stat().st_size, tensor_bytes, seconds, profile)


def _write_data(
    fh: Any,
    alignment: int,
    table: tuple[TensorEntry, ...],
    seed: int,
    progress: bool,
    on_progress: Callable[[int], None] | None,
) -> None:
    """Generate and write every tensor's bytes, a background thread writing while the next chunk is made."""
    from prima_sim.progress import Progress

    q: queue.Queue[np.ndarray | bytes | None] = queue.Queue(maxsize=2)
    failure: list[BaseException] = []

    def writer() -> None:
        try:
            while (item := q.get()) is not None:
                fh.write(item if isinstance(item, bytes) else item.data)
        except BaseException as exc:  # surfaced in the main thread
            failure.append(exc)
            while q.get() is not None:  # drain so the producer never blocks
                pass

    th = threading.Thread(target=writer, name="synth-writer", daemon=True)
    th.start()
    bar = Progress(sum(t.n_bytes for t in table), "synth-model", "B", disable=not progress)
    try:
        pos = fh.tell()
        pad = -pos % alignment
        if pad:
            q.put(bytes(pad))
        for index, t in enumerate(table):
            written = 0
            for chunk in _tensor_chunks(t, seed, index):
                if failure:
                    raise failure[0]
                q.put(chunk)
                written += chunk.nbytes
                bar.update(chunk.nbytes)
                if on_progress:
                    on_progress(chunk.nbytes)
            if written != t.n_bytes:
                raise AssertionError(f"{t.name}: generated {written} bytes, expected {t.n_bytes}")
            pad = -written % alignment
            if pad:
                q.put(bytes(pad))
    finally:
        q.put(None)
        th.join()
        bar.close()
    if failure:
        raise failure[0]
    fh.flush()
