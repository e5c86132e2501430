"""What a model needs: architecture numbers, bytes per tensor and layer, FLOPs per layer by weight type.

A :class:`ModelProfile` is built from a GGUF file's tensor table (:func:`model_profile_from_gguf`, no weights
read) or computed from architecture numbers and a quantization recipe for the catalog
(:mod:`prima_sim.devices.catalog`). Both paths produce the same tensor table, so everything downstream (the
planner's memory and disk terms, the simulator's page cache, the executor's shards) agrees on the bytes.

FLOPs follow prima.cpp's model profile (``llama_model_n_flops``): a weight of shape [n_in, n_out] costs
``2 * n_in * n_out`` FLOPs per token and is keyed by the weight's ggml type, because a device's throughput
depends on that type (dequantization is part of the matmul). Attention against the KV cache costs
``2 * head_dim * n_head`` per cached token for QK and again for V, in the cache's type (f16); norms, RoPE,
softmax and activations are f32 element-wise work. Unlike prima.cpp, which averages over layers and
estimates attention for a fixed 32-token history, FLOPs here are exact per layer and take the context
length as an argument.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable
from functools import cached_property
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, model_validator

from prima_sim.devices.ggml_types import TYPE_BY_NAME, tensor_nbytes
from prima_sim.devices.gguf_file import ArrayInfo, GGUFFile, read_gguf
from prima_sim.errors import InputError
from prima_sim.schema import FrozenModel
from prima_sim.workload import DEFAULT_UBATCH

KV_CACHE_TYPE = "f16"
"""Type of llama.cpp's default KV cache; attention FLOPs against the cache are counted under it."""
KV_BYTES_PER_ELEMENT = 2

_LAYER = re.compile(r"^blk\.(\d+)\.")
_INPUT_TENSORS = ("token_embd.weight", "token_embd_norm.weight", "token_types.weight", "position_embd.weight")
_OUTPUT_TENSORS = ("output_norm.weight", "output_norm.bias", "output.weight", "output.bias")


class TensorEntry(FrozenModel):
    """One tensor of the model: name, ggml type, ggml shape (ne0 first) and exact bytes."""

    name: str
    ggml_type: str
    shape: tuple[int, ...]
    n_bytes: int = Field(ge=0)

    @model_validator(mode="after")
    def _check_bytes(self) -> TensorEntry:
        if self.ggml_type not in TYPE_BY_NAME:
            raise ValueError(f"unknown ggml type {self.ggml_type!r}")
        expected = tensor_nbytes(self.ggml_type, self.shape)
        if expected != self.n_bytes:
            raise ValueError(
                f"tensor {self.name}: {self.n_bytes} bytes given, shape and type imply {expected}"
            )
        return self


class Architecture(FrozenModel):
    """Architecture numbers of a decoder-only transformer as llama.cpp names them."""

    arch: str = Field(description="general.architecture, e.g. llama, qwen2, gemma3")
    n_layer: int = Field(gt=0)
    n_embd: int = Field(gt=0)
    n_ff: int = Field(gt=0, description="feed-forward width (the largest, if it varies per layer)")
    n_head: int = Field(gt=0)
    n_head_kv: int = Field(gt=0)
    head_dim_k: int = Field(gt=0)
    head_dim_v: int = Field(gt=0)
    n_vocab: int = Field(gt=0)
    n_ctx_train: int = Field(default=0, ge=0)
    tied_embeddings: bool = Field(description="output head reuses token_embd.weight")
    n_expert: int = Field(default=0, ge=0)
    n_expert_used: int = Field(default=0, ge=0)
    sliding_window: int = Field(
        default=0, ge=0, description="tokens a sliding-window layer attends to; 0 = none"
    )
    sliding_layers: tuple[bool, ...] = Field(default=(), description="per layer: uses the sliding window")

    @property
    def n_embd_k_gqa(self) -> int:
        """Width of one token's K in the cache (head_dim_k * n_head_kv)."""
        return self.head_dim_k * self.n_head_kv

    @property
    def n_embd_v_gqa(self) -> int:
        """Width of one token's V in the cache (head_dim_v * n_head_kv)."""
        return self.head_dim_v * self.n_head_kv

    def is_sliding(self, layer: int) -> bool:
        """Whether ``layer`` attends only to the last ``sliding_window`` tokens."""
        return bool(self.sliding_window) and layer < len(self.sliding_layers) and self.sliding_layers[layer]


class ModelProfile(FrozenModel):
    """Everything the planner, the simulator and the executor need to know about a model."""

    schema_version: Literal[1] = 1
    id: str = Field(min_length=1)
    source: str = Field(description="'gguf:<path>' or 'catalog:<entry>'")
    quant: str = Field(description="quantization label, e.g. Q4_K_M")
    arch: Architecture
    tensors: tuple[TensorEntry, ...]

    @model_validator(mode="after")
    def _check_layers(self) -> ModelProfile:
        seen = {int(m.group(1)) for t in self.tensors if (m := _LAYER.match(t.name))}
        missing = sorted(set(range(self.arch.n_layer)) - seen)
        if missing:
            raise ValueError(f"no tensors for layers {missing[:5]} of n_layer={self.arch.n_layer}")
        extra = sorted(seen - set(range(self.arch.n_layer)))
        if extra:
            raise ValueError(f"tensors for layers {extra[:5]} beyond n_layer={self.arch.n_layer}")
        return self

    # --- bytes -------------------------------------------------------------------------------------------
    @cached_property
    def _layer_tensors(self) -> list[list[TensorEntry]]:
        out: list[list[TensorEntry]] = [[] for _ in range(self.arch.n_layer)]
        for t in self.tensors:
            if m := _LAYER.match(t.name):
                out[int(m.group(1))].append(t)
        return out

    def layer_tensors(self, layer: int) -> list[TensorEntry]:
        """Tensors of ``layer`` (``blk.<layer>.*``)."""
        return self._layer_tensors[layer]

    def tensor(self, name: str) -> TensorEntry | None:
        """The tensor called ``name``, or None."""
        return next((t for t in self.tensors if t.name == name), None)

    @cached_property
    def layer_bytes(self) -> tuple[int, ...]:
        """Bytes of each layer's weights."""
        return tuple(sum(t.n_bytes for t in ts) for ts in self._layer_tensors)

    @property
    def mean_layer_bytes(self) -> float:
        """Average bytes per layer (prima.cpp's ``nb_layer``; Halda assumes identical layers)."""
        return sum(self.layer_bytes) / self.arch.n_layer

    @cached_property
    def input_bytes(self) -> int:
        """Bytes of the input embedding table (``token_embd`` and friends)."""
        return sum(t.n_bytes for t in self.tensors if t.name in _INPUT_TENSORS)

    @cached_property
    def output_bytes(self) -> int:
        """Bytes of the output head: final norm plus ``output.weight`` (the embedding table when tied)."""
        own = sum(t.n_bytes for t in self.tensors if t.name in _OUTPUT_TENSORS)
        if self.tensor("output.weight") is None:
            emb = self.tensor("token_embd.weight")
            own += emb.n_bytes if emb else 0
        return own

    @property
    def embedding_row_bytes(self) -> float:
        """Bytes read from the embedding table per input token (one row: ``input_bytes / n_vocab``)."""
        emb = self.tensor("token_embd.weight")
        return emb.n_bytes / emb.shape[-1] if emb else 0.0

    @property
    def total_bytes(self) -> int:
        """Bytes of all tensors (a tied embedding is counted once)."""
        return sum(t.n_bytes for t in self.tensors)

    @cached_property
    def fingerprint(self) -> str:
        """Short hash of the tensor table (names, types, shapes, sizes): what plans and shards agree on."""
        h = hashlib.sha256()
        for t in self.tensors:
            h.update(f"{t.name}:{t.ggml_type}:{t.shape}:{t.n_bytes};".encode())
        return h.hexdigest()[:16]

    # --- KV cache ----------------------------------------------------------------------------------------
    @cached_property
    def kv_bytes_per_token_per_layer(self) -> int:
        """KV-cache bytes one token adds to one (full-attention) layer, f16 cache."""
        return (self.arch.n_embd_k_gqa + self.arch.n_embd_v_gqa) * KV_BYTES_PER_ELEMENT

    @cached_property
    def _sliding(self) -> tuple[bool, ...]:
        return tuple(self.arch.is_sliding(i) for i in range(self.arch.n_layer))

    def layer_kv_tokens(self, layer: int, n_ctx: int) -> int:
        """Tokens the KV cache of ``layer`` holds for a context of ``n_ctx`` (a sliding layer holds fewer)."""
        if self._sliding[layer]:
            return min(n_ctx, self.arch.sliding_window)
        return n_ctx

    def layer_kv_bytes(self, layer: int, n_ctx: int) -> int:
        """KV-cache bytes of ``layer`` for a context of ``n_ctx`` tokens."""
        return self.layer_kv_tokens(layer, n_ctx) * self.kv_bytes_per_token_per_layer

    @cached_property
    def _groups_cache(self) -> dict[int, tuple[tuple[int, ...], tuple[int, ...]]]:
        return {}

    def layer_groups(self, n_kv: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """Layers whose costs are equal when attending to ``n_kv`` cached tokens (same signature, same KV
        tokens): (group of each layer, one representative layer per group). Cached."""
        hit = self._groups_cache.get(n_kv)
        if hit is None:
            ids: dict[tuple[int, int], int] = {}
            reps: list[int] = []
            group = []
            for i in range(self.arch.n_layer):
                key = (self.layer_signatures[i], self.layer_kv_tokens(i, n_kv))
                if key not in ids:
                    ids[key] = len(reps)
                    reps.append(i)
                group.append(ids[key])
            hit = self._groups_cache[n_kv] = (tuple(group), tuple(reps))
        return hit

    # --- FLOPs -------------------------------------------------------------------------------------------
    @cached_property
    def layer_signatures(self) -> tuple[int, ...]:
        """Per layer, an id shared by layers of identical tensors (types, shapes) and attention kind.

        Costs of a layer depend only on its signature, so caches key on it: a 70B model has 80 layers but
        only a handful of distinct ones (Q4_K_M mixes Q4_K and Q6_K per layer).
        """
        ids: dict[tuple, int] = {}
        out = []
        for i, ts in enumerate(self._layer_tensors):
            key = (
                tuple(sorted((t.name.split(".", 2)[2], t.ggml_type, t.shape) for t in ts)),
                self.arch.is_sliding(i),
            )
            out.append(ids.setdefault(key, len(ids)))
        return tuple(out)

    @cached_property
    def _flops_cache(self) -> dict[tuple[int, int, int], dict[str, float]]:
        return {}

    def layer_flops(self, layer: int, n_tokens: int = 1, n_kv: int = 1) -> dict[str, float]:
        """FLOPs of one layer for a batch of ``n_tokens`` attending to ``n_kv`` cached tokens each, by type.

        Keys are ggml type names: the weight's type for matmuls, ``f16`` for attention against the cache,
        ``f32`` for element-wise work. The returned dict is shared (cached): do not modify it.
        """
        n_kv = self.layer_kv_tokens(layer, n_kv)
        key = (self.layer_signatures[layer], n_tokens, n_kv)
        hit = self._flops_cache.get(key)
        if hit is None:
            hit = self._flops_cache[key] = self._compute_layer_flops(layer, n_tokens, n_kv)
        return hit

    def _compute_layer_flops(self, layer: int, n_tokens: int, n_kv: int) -> dict[str, float]:
        a = self.arch
        out: dict[str, float] = {}

        def add(t: str, f: float) -> None:
            out[t] = out.get(t, 0.0) + f * n_tokens

        for t in self.layer_tensors(layer):
            if len(t.shape) == 1 or t.shape[1] == 1:
                add("f32", 5.0 * t.shape[0] + 1)  # norm (4e+1) times weight (e), or a bias add
            elif len(t.shape) == 3:  # MoE experts [n_in, n_out, n_expert]: only the used experts run
                used = a.n_expert_used or t.shape[2]
                add(t.ggml_type, 2.0 * t.shape[0] * t.shape[1] * used)
            else:
                add(t.ggml_type, 2.0 * t.shape[0] * t.shape[1])
        # attention against the cache: QK^T and softmax(QK^T) V, per head
        add(KV_CACHE_TYPE, 2.0 * a.head_dim_k * a.n_head * n_kv + 2.0 * a.head_dim_v * a.n_head * n_kv)
        # element-wise: RoPE on q and k, scale/mask/softmax, SiLU gate and product, residual adds
        rope = 2.5 * a.head_dim_k * (a.n_head + a.n_head_kv)
        add("f32", rope + 7.0 * a.n_head * n_kv + 9.0 * a.n_ff + 2.0 * a.n_embd)
        return out

    def output_flops(self, n_tokens: int = 1) -> dict[str, float]:
        """FLOPs of the output head (final norm, lm_head, softmax-ready logits), by type."""
        a = self.arch
        head = self.tensor("output.weight") or self.tensor("token_embd.weight")
        t = head.ggml_type if head else "f32"
        return {
            t: 2.0 * a.n_embd * a.n_vocab * n_tokens,
            "f32": (5.0 * a.n_embd + 1 + 5.0 * a.n_vocab) * n_tokens,
        }

    @cached_property
    def dominant_type(self) -> str:
        """The ggml type holding most of the model's bytes (what throughput-proportional splits rate)."""
        by_type: dict[str, int] = {}
        for t in self.tensors:
            by_type[t.ggml_type] = by_type.get(t.ggml_type, 0) + t.n_bytes
        return max(by_type, key=lambda k: by_type[k])

    def weight_types(self) -> set[str]:
        """ggml types whose throughput a device needs to run this model (weights, KV cache, f32)."""
        return {t.ggml_type for t in self.tensors} | {KV_CACHE_TYPE, "f32"}

    # --- compute buffer (llama_model_compute_buf_size, prima.cpp) -----------------------------------------
    def compute_buffer_bytes(self, n_ctx: int, n_ubatch: int = DEFAULT_UBATCH, n_logit_rows: int = 0) -> int:
        """Scratch memory llama.cpp's CPU backend reserves for one context (prima.cpp's estimate).

        ``(u + n_ctx*u + 2e*u)*4 + max(2f*u, 2e*u + n_ctx*u*h)*4`` bytes (``llama_model_compute_buf_size``),
        plus ``n_logit_rows`` rows of logits (``V*4`` bytes each) for a context that computes logits.
        prima.cpp reserves ``V*u*4`` on the head; our head asks llama.cpp for the last token's logits only.
        """
        a, u = self.arch, n_ubatch
        buf = (u + n_ctx * u + 2 * a.n_embd * u) * 4 + max(
            2 * a.n_ff * u, 2 * a.n_embd * u + n_ctx * u * a.n_head
        ) * 4
        return int(buf + n_logit_rows * a.n_vocab * 4)

    def summary(self) -> dict[str, Any]:
        """A flat dictionary of the figures ``prima-sim model-info --json`` prints."""
        a = self.arch
        by_type: dict[str, int] = {}
        for t in self.tensors:
            by_type[t.ggml_type] = by_type.get(t.ggml_type, 0) + t.n_bytes
        return {
            "id": self.id,
            "source": self.source,
            "quant": self.quant,
            "arch": a.model_dump(mode="json"),
            "total_bytes": self.total_bytes,
            "input_bytes": self.input_bytes,
            "output_bytes": self.output_bytes,
            "layer_bytes": list(self.layer_bytes),
            "mean_layer_bytes": self.mean_layer_bytes,
            "min_layer_bytes": min(self.layer_bytes),
            "max_layer_bytes": max(self.layer_bytes),
            "kv_bytes_per_token_per_layer": self.kv_bytes_per_token_per_layer,
            "bytes_by_type": dict(sorted(by_type.items())),
            "layer_flops_per_token_by_type": {
                k: round(v) for k, v in sorted(self.layer_flops(0, 1, 1).items())
            },
            "output_flops_per_token_by_type": {k: round(v) for k, v in sorted(self.output_flops(1).items())},
            "tensors": [t.model_dump(mode="json") for t in self.tensors],
        }


# --- from a GGUF file -----------------------------------------------------------------------------------
_FILE_TYPES = {
    0: "F32", 1: "F16", 2: "Q4_0", 3: "Q4_1", 7: "Q8_0", 8: "Q5_0", 9: "Q5_1", 10: "Q2_K", 11: "Q3_K_S",
    12: "Q3_K_M", 13: "Q3_K_L", 14: "Q4_K_S", 15: "Q4_K_M", 16: "Q5_K_S", 17: "Q5_K_M", 18: "Q6_K",
    19: "IQ2_XXS", 20: "IQ2_XS", 21: "Q2_K_S", 22: "IQ3_XS", 23: "IQ3_XXS", 24: "IQ1_S", 25: "IQ4_NL",
    26: "IQ3_S", 27: "IQ3_M", 28: "IQ2_S", 29: "IQ2_M", 30: "IQ4_XS", 31: "IQ1_M", 32: "BF16",
}  # fmt: skip
"""llama.cpp's ``llama_ftype`` ids (``general.file_type``) and their usual names."""


def _meta(g: GGUFFile, key: str, default: Any = None, *, required: bool = False) -> Any:
    full = f"{g.architecture}.{key}"
    if full in g.metadata:
        return g.metadata[full]
    if required:
        raise InputError(g.path, full, "is required in a GGUF model's metadata but missing")
    return default


def _scalar_or_max(v: Any) -> int:
    if isinstance(v, list):
        return int(max(v)) if v else 0
    return int(v)


def architecture_from_gguf(g: GGUFFile) -> Architecture:
    """Architecture numbers from a GGUF file's metadata (llama.cpp's key names)."""
    if not g.architecture:
        raise InputError(g.path, "general.architecture", "is missing: not a llama.cpp model file")
    n_layer = int(_meta(g, "block_count", required=True))
    n_embd = int(_meta(g, "embedding_length", required=True))
    n_head = _scalar_or_max(_meta(g, "attention.head_count", required=True))
    n_head_kv = _scalar_or_max(_meta(g, "attention.head_count_kv", n_head))
    head_k = int(_meta(g, "attention.key_length", n_embd // max(n_head, 1)))
    head_v = int(_meta(g, "attention.value_length", head_k))
    tokens = g.metadata.get("tokenizer.ggml.tokens")
    n_vocab_tok = tokens.length if isinstance(tokens, ArrayInfo) else len(tokens or [])
    emb = g.tensor("token_embd.weight")
    n_vocab = int(_meta(g, "vocab_size", 0) or n_vocab_tok or (emb.shape[1] if emb else 0))
    window = int(_meta(g, "attention.sliding_window", 0) or 0)
    pattern = _meta(g, "attention.sliding_window_pattern", None)
    sliding: tuple[bool, ...] = ()
    if window:
        if isinstance(pattern, list):
            sliding = tuple(bool(x) for x in pattern[:n_layer])
        elif isinstance(pattern, int) and pattern > 0:  # every pattern-th layer is global
            sliding = tuple((i + 1) % pattern != 0 for i in range(n_layer))
        elif g.architecture.startswith("gemma3"):  # llama.cpp's default for gemma3: 5 local, 1 global
            sliding = tuple((i + 1) % 6 != 0 for i in range(n_layer))
        else:
            sliding = (True,) * n_layer
    try:
        return Architecture(
            arch=g.architecture,
            n_layer=n_layer,
            n_embd=n_embd,
            n_ff=_scalar_or_max(_meta(g, "feed_forward_length", required=True)),
            n_head=n_head,
            n_head_kv=n_head_kv,
            head_dim_k=head_k,
            head_dim_v=head_v,
            n_vocab=n_vocab,
            n_ctx_train=int(_meta(g, "context_length", 0)),
            tied_embeddings=g.tensor("output.weight") is None,
            n_expert=int(_meta(g, "expert_count", 0)),
            n_expert_used=int(_meta(g, "expert_used_count", 0)),
            sliding_window=window,
            sliding_layers=sliding,
        )
    except ValueError as exc:
        raise InputError(
            g.path, f"{g.architecture}.*", f"inconsistent architecture metadata: {exc}"
        ) from None


def model_profile_from_gguf(path: str | Path, model_id: str | None = None) -> ModelProfile:
    """Build a model profile from a GGUF file's metadata and tensor table (no weights are read).

    Raises:
        InputError: the file is not a usable GGUF model.
    """
    g = read_gguf(path)
    arch = architecture_from_gguf(g)
    ftype = g.metadata.get("general.file_type")
    quant = _FILE_TYPES.get(int(ftype), f"ftype{ftype}") if ftype is not None else "unknown"
    tensors = tuple(
        TensorEntry(name=t.name, ggml_type=t.ggml_type, shape=t.shape, n_bytes=t.n_bytes) for t in g.tensors
    )
    try:
        return ModelProfile(
            id=model_id or Path(path).stem,
            source=f"gguf:{Path(path).resolve()}",
            quant=quant,
            arch=arch,
            tensors=tensors,
        )
    except ValueError as exc:
        raise InputError(str(path), "", f"inconsistent model: {exc}") from None


def sum_flops(parts: Iterable[dict[str, float]]) -> dict[str, float]:
    """Add FLOP dictionaries keyed by ggml type."""
    out: dict[str, float] = {}
    for p in parts:
        for k, v in p.items():
            out[k] = out.get(k, 0.0) + v
    return out
