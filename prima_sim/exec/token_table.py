"""The head's token embedding as a table lookup: one ``llama_decode`` less per token.

llama.cpp embeds token ids with ``get_rows`` on ``token_embd.weight`` (each row dequantized to float32) and, in some
architectures, a constant scale (Gemma: ``sqrt(n_embd)``; Granite: ``<arch>.embedding_scale``). The head used to
run that as a 0-layer window (:class:`~prima_sim.exec.llamacpp.Window` in ``"embed"`` mode): a ``llama_decode`` of
its own per step, 0.25-0.7 ms of batch checks, scheduling and eval callbacks for a few microseconds of work
(docs/exec.md, "The embedding decision"). :class:`TokenTable` reads the same rows of the same shard, mapped
read-only (the same page-cache pages llama.cpp maps), where the shard writer recorded them
(:class:`~prima_sim.exec.manifest.TokenTableRef`), and dequantizes them in numpy (~20 us).

It is only used where it is exact: :func:`verified_table` embeds a sample of token ids both ways at load and keeps
the table only if every float is bit-identical to the window's, with no scale or with one of the known ones.
Anything else (a type this module does not decode, an architecture that does more than scale, a kernel that rounds
differently) keeps the window, which stays loaded either way.

Numpy only: the head does not import gguf-py (nor its yaml), whose anonymous memory would come out of a
memory-starved device's page cache (docs/exec.md, "Memory of the executor's processes").
"""

from __future__ import annotations

import logging
import mmap
from collections.abc import Callable, Sequence
from contextlib import suppress
from pathlib import Path
from typing import Any

import numpy as np

from prima_sim.exec.manifest import TokenTableRef

log = logging.getLogger(__name__)

SAMPLE = 16
"""Token ids compared with the window at load (spread over the vocabulary, both ends included)."""


def _f32(b: np.ndarray) -> np.ndarray:
    return b.view(np.float32)


def _f16(b: np.ndarray) -> np.ndarray:
    return b.view(np.float16).astype(np.float32)


def _bf16(b: np.ndarray) -> np.ndarray:
    return (b.view(np.uint16).astype(np.uint32) << 16).view(np.float32)


def _half(blk: np.ndarray, at: int) -> np.ndarray:
    """The f16 field at byte ``at`` of every block, as float32 [rows, blocks, 1]."""
    return blk[..., at : at + 2].copy().view(np.float16).astype(np.float32)


def _q8_0(b: np.ndarray) -> np.ndarray:
    """Blocks of 32: an f16 scale ``d``, then 32 int8; x = d * q."""
    blk = b.reshape(b.shape[0], -1, 34)
    return (blk[..., 2:].view(np.int8).astype(np.float32) * _half(blk, 0)).reshape(b.shape[0], -1)


def _nibbles(qs: np.ndarray) -> np.ndarray:
    """16 bytes per block -> 32 values: the low nibbles are elements 0-15, the high ones 16-31."""
    return np.concatenate([qs & 0x0F, qs >> 4], axis=-1).astype(np.int8)


def _q4_0(b: np.ndarray) -> np.ndarray:
    """Blocks of 32: an f16 scale ``d``, then 16 bytes of nibbles; x = d * (q - 8)."""
    blk = b.reshape(b.shape[0], -1, 18)
    return ((_nibbles(blk[..., 2:]) - 8).astype(np.float32) * _half(blk, 0)).reshape(b.shape[0], -1)


def _q4_1(b: np.ndarray) -> np.ndarray:
    """Blocks of 32: f16 ``d`` and ``m``, then 16 bytes of nibbles; x = d * q + m."""
    blk = b.reshape(b.shape[0], -1, 20)
    return (_nibbles(blk[..., 4:]).astype(np.float32) * _half(blk, 0) + _half(blk, 2)).reshape(b.shape[0], -1)


DECODERS: dict[str, tuple[int, int, Callable[[np.ndarray], np.ndarray]]] = {
    # ggml type: (elements per block, bytes per block, rows of bytes -> rows of float32)
    "f32": (1, 4, _f32), "f16": (1, 2, _f16), "bf16": (1, 2, _bf16),
    "q8_0": (32, 34, _q8_0), "q4_0": (32, 18, _q4_0), "q4_1": (32, 20, _q4_1),
}  # fmt: skip
"""The table types decoded here (what small and Q4/Q8 models use for their token table); other types embed
with the window."""


class TokenTable:
    """Rows of a shard's ``token_embd.weight``, dequantized and scaled: the layer-0 input of token ids.

    Args:
        path: the shard that holds the table.
        ref: where it lies in the shard, its type and shape (the shard's manifest).
        scale: the architecture's input scale (1.0: none).

    Raises:
        ValueError: the table's type is not decoded here, or it does not lie inside the file.
    """

    def __init__(self, path: str | Path, ref: TokenTableRef, scale: float = 1.0) -> None:
        if ref.ggml_type not in DECODERS:
            raise ValueError(f"{Path(path).name}: token table of type {ref.ggml_type} (decoded here: "
                             f"{', '.join(DECODERS)})")  # fmt: skip
        per_block, block_bytes, self._decode = DECODERS[ref.ggml_type]
        if ref.n_embd % per_block:
            raise ValueError(f"{Path(path).name}: n_embd {ref.n_embd} is not a multiple of {per_block}")
        self.n_embd, self.n_vocab = ref.n_embd, ref.n_vocab
        self.scale = np.float32(scale)
        row_bytes = ref.n_embd // per_block * block_bytes
        with open(path, "rb") as f:  # the mapping outlives the file object
            self._map = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        # a row's fault reads its page, not the 128 KiB around it (the head's load gives the table's pages back:
        # exec/head.py)
        if hasattr(mmap, "MADV_RANDOM"):
            self._map.madvise(mmap.MADV_RANDOM)
        if ref.offset + row_bytes * ref.n_vocab > len(self._map):
            self._map.close()
            raise ValueError(f"{Path(path).name}: the token table runs past the end of the file")
        self._rows = np.frombuffer(self._map, np.uint8, row_bytes * ref.n_vocab, ref.offset)
        self._rows = self._rows.reshape(ref.n_vocab, row_bytes)

    def rows(self, tokens: Sequence[int] | np.ndarray) -> np.ndarray:
        """The layer-0 input of ``tokens``: float32 [n, n_embd] (a new array)."""
        x = self._decode(self._rows[np.asarray(tokens, dtype=np.int64)])
        if self.scale != 1:
            x = x * self.scale
        return np.ascontiguousarray(x, dtype=np.float32)

    def close(self) -> None:
        """Unmap the shard (the table is unusable afterwards)."""
        self._rows = np.empty((0, 0), np.uint8)
        with suppress(BufferError):  # a caller still holds a view: the mapping goes with its last reference
            self._map.close()


def candidate_scales(meta: Callable[[str], str | None], n_embd: int) -> list[float]:
    """The input scales llama.cpp's architectures apply after ``get_rows``: none, the file's
    ``<arch>.embedding_scale`` if it has one, and ``sqrt(n_embd)`` (the Gemma family), in that order.

    Args:
        meta: the model's metadata by key (:meth:`prima_sim.exec.llamacpp.Model.meta`).
        n_embd: its embedding width.
    """
    out = [1.0]
    try:
        s = float(meta(f"{meta('general.architecture')}.embedding_scale") or "nan")
    except ValueError:
        s = float("nan")
    if np.isfinite(s) and s not in out:
        out.append(s)
    out.append(float(np.sqrt(np.float32(n_embd))))
    return out


def sample_tokens(n_vocab: int, n: int = SAMPLE) -> list[int]:
    """``n`` token ids spread evenly over the vocabulary, first and last included (fewer if it is smaller)."""
    if n_vocab <= n:
        return list(range(n_vocab))
    return sorted({round(i * (n_vocab - 1) / (n - 1)) for i in range(n)})


def verified_table(path: str | Path, ref: TokenTableRef | None, embed: Any) -> TokenTable | None:
    """A :class:`TokenTable` of the shard at ``path`` that embeds exactly as the window ``embed`` does, or None.

    Args:
        path: the shard the window runs.
        ref: where its token table lies (None: the manifest predates it; the window embeds).
        embed: an ``"embed"`` window over it (``run_tokens(tokens, pos0)`` returns [n, n_embd] float32; its
            ``model.meta`` gives the metadata).
    """
    if ref is None or ref.n_embd != embed.n_embd:
        return None
    try:
        table = TokenTable(path, ref)
    except (ValueError, OSError) as exc:
        log.info("token embedding by the window: %s", exc)
        return None
    toks = sample_tokens(table.n_vocab, min(SAMPLE, embed.n_batch))
    want = np.array(embed.run_tokens(toks, 0), dtype=np.float32, copy=True)
    for s in candidate_scales(embed.model.meta, table.n_embd):
        table.scale = np.float32(s)
        if np.array_equal(table.rows(toks), want):
            log.info(
                "token embedding by table lookup (%s, %s, scale %.6g)", Path(path).name, ref.ggml_type, s
            )
            return table
    table.close()
    log.info("token embedding by the window: the table differs from it on %s", Path(path).name)
    return None
