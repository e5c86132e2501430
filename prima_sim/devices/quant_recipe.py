"""llama.cpp's quantization recipe: which ggml type ``llama-quantize`` gives each tensor of a model.

A model's bytes are not ``parameters x bits / 8``: ``llama-quantize`` mixes types. A Q4_K_M file keeps the
output head in Q6_K, gives every third ``attn_v`` and ``ffn_down`` Q6_K, bumps ``attn_v`` of 70B models to
Q5_K, falls back to Q5_0/Q8_0 where a row is not a whole number of 256-element super-blocks, and leaves
norms and biases in F32. This module reproduces that decision exactly from architecture numbers alone, so a
catalog model's tensor table (names, ggml shapes, types, bytes) equals the table of the file llama.cpp
would write.

The code is a port of ``src/llama-quant.cpp`` in ggml-org/llama.cpp (read at commit 007dbbf3, 2026):

* :func:`_allows_quantization`  mirrors ``tensor_allows_quantization``;
* :func:`_category`             mirrors ``tensor_get_category``;
* :func:`_impl_type`            mirrors ``llama_tensor_get_type_impl`` (the per-ftype rules);
* :func:`_fallback`             mirrors ``tensor_type_fallback`` (row length not a multiple of the block);
* :func:`_target_type`          mirrors the wrapper ``llama_tensor_get_type``;
* :data:`FTYPES`                mirrors ``llama_ftype`` and ``llama_ftype_get_default_type``;
* the tensor order is ``llama_model_loader::weights_map`` (``weight_name_comparer``: non-layer tensors
  first, then by layer number, then by name), which is also the order the counters ``i_attention_wv`` and
  ``i_ffn_down`` advance in. (Files quantized by llama.cpp before the loader sorted its map walked tensors
  in file order, ``blk.0, blk.1, blk.10, ...``; that moves *which* layers get the extra bits, never how many,
  so totals agree but per-layer bytes of such old files can differ.)

Tensor names and ggml shapes (ne0 first) follow ``convert_hf_to_gguf.py`` and each architecture's
``load_arch_tensors`` in llama.cpp: :func:`tensor_shapes`.

Not modelled: user overrides (``--output-tensor-type``, ``--token-embedding-type``, ``--tensor-type``,
``--pure``), MoE expert tensors, and the MXFP4_MOE / TQ / NVFP4 ftypes.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from prima_sim.devices.ggml_types import block_geometry, tensor_nbytes
from prima_sim.devices.model import Architecture, TensorEntry

SUPPORTED_ARCHS = ("llama", "qwen2", "gemma3")


@dataclass(frozen=True)
class Ftype:
    """A llama.cpp file type (``llama_ftype``): its name, id and default tensor type."""

    name: str
    id: int | None  # None for prima-sim's own uniform types (not a llama.cpp ftype)
    default: str  # ggml type name, lower case
    uniform: bool = False  # every weight in ``default`` except the output rule (see "Q4_K")


# llama_ftype ids (include/llama.h) and llama_ftype_get_default_type (src/llama-quant.cpp).
FTYPES: dict[str, Ftype] = {
    f.name: f
    for f in (
        Ftype("F32", 0, "f32"),
        Ftype("F16", 1, "f16"),
        Ftype("Q4_0", 2, "q4_0"),
        Ftype("Q4_1", 3, "q4_1"),
        Ftype("Q8_0", 7, "q8_0"),
        Ftype("Q5_0", 8, "q5_0"),
        Ftype("Q5_1", 9, "q5_1"),
        Ftype("Q2_K", 10, "q2_k"),
        Ftype("Q3_K_S", 11, "q3_k"),
        Ftype("Q3_K_M", 12, "q3_k"),
        Ftype("Q3_K_L", 13, "q3_k"),
        Ftype("Q4_K_S", 14, "q4_k"),
        Ftype("Q4_K_M", 15, "q4_k"),
        Ftype("Q5_K_S", 16, "q5_k"),
        Ftype("Q5_K_M", 17, "q5_k"),
        Ftype("Q6_K", 18, "q6_k"),
        Ftype("IQ2_XXS", 19, "iq2_xxs"),
        Ftype("IQ2_XS", 20, "iq2_xs"),
        Ftype("Q2_K_S", 21, "q2_k"),
        Ftype("IQ3_XS", 22, "iq3_s"),
        Ftype("IQ3_XXS", 23, "iq3_xxs"),
        Ftype("IQ1_S", 24, "iq1_s"),
        Ftype("IQ4_NL", 25, "iq4_nl"),
        Ftype("IQ3_S", 26, "iq3_s"),
        Ftype("IQ3_M", 27, "iq3_s"),
        Ftype("IQ2_S", 28, "iq2_xs"),
        Ftype("IQ2_M", 29, "iq2_s"),
        Ftype("IQ4_XS", 30, "iq4_xs"),
        Ftype("IQ1_M", 31, "iq1_m"),
        Ftype("BF16", 32, "bf16"),
        # prima-sim's uniform K-quant for generated models: every weight Q4_K (llama-quantize --pure), but
        # the output head (or the tied embedding) still follows llama.cpp's output rule (Q6_K or Q8_0).
        Ftype("Q4_K", None, "q4_k", uniform=True),
    )
}
"""Known file types by upper-case name."""

_IQ_LOW = {"IQ2_XXS", "IQ2_XS", "IQ2_S", "IQ2_M", "IQ1_S", "IQ1_M"}
_NEEDS_IMATRIX = {"iq3_xxs", "iq2_xxs", "iq2_xs", "iq2_s", "iq1_m", "iq1_s"}


def get_ftype(name: str) -> Ftype:
    """The :class:`Ftype` called ``name`` (any case).

    Raises:
        ValueError: unknown name (the message lists the known ones).
    """
    key = name.strip().upper()
    if key not in FTYPES:
        raise ValueError(f"unknown quantization {name!r}; known: {', '.join(FTYPES)}")
    return FTYPES[key]


# --- tensor names and shapes ---------------------------------------------------------------------------
def tensor_shapes(arch: Architecture, *, rope_freqs: bool = False) -> list[tuple[str, tuple[int, ...]]]:
    """Names and ggml shapes (ne0 first) of a model's tensors, in ``llama-quantize``'s order.

    ``rope_freqs`` adds the F32 ``rope_freqs.weight`` that ``convert_hf_to_gguf.py`` writes for Llama 3.1-style
    ``rope_scaling`` (``rope_type = "llama3"``), as in Llama 3.1/3.3 and the DeepSeek-R1 Llama distills.

    Raises:
        ValueError: an architecture this module does not know.
    """
    a = arch
    if a.arch not in SUPPORTED_ARCHS:
        raise ValueError(f"architecture {a.arch!r} is not supported; known: {', '.join(SUPPORTED_ARCHS)}")
    e, f, v = a.n_embd, a.n_ff, a.n_vocab
    q_out = a.head_dim_k * a.n_head
    k_out = a.head_dim_k * a.n_head_kv
    v_out = a.head_dim_v * a.n_head_kv
    top: list[tuple[str, tuple[int, ...]]] = [
        ("token_embd.weight", (e, v)),
        ("output_norm.weight", (e,)),
    ]
    if not a.tied_embeddings:
        top.append(("output.weight", (e, v)))
    if rope_freqs:
        top.append(("rope_freqs.weight", (a.head_dim_k // 2,)))
    layer: list[tuple[str, tuple[int, ...]]] = [
        ("attn_norm.weight", (e,)),
        ("attn_q.weight", (e, q_out)),
        ("attn_k.weight", (e, k_out)),
        ("attn_v.weight", (e, v_out)),
        ("attn_output.weight", (q_out, e)),
        ("ffn_norm.weight", (e,)),
        ("ffn_gate.weight", (e, f)),
        ("ffn_up.weight", (e, f)),
        ("ffn_down.weight", (f, e)),
    ]
    if a.arch == "qwen2":  # Qwen2 has q/k/v projection biases
        layer += [("attn_q.bias", (q_out,)), ("attn_k.bias", (k_out,)), ("attn_v.bias", (v_out,))]
    if a.arch == "gemma3":  # per-head q/k norms and sandwich norms around attention and FFN
        layer += [
            ("attn_q_norm.weight", (a.head_dim_k,)),
            ("attn_k_norm.weight", (a.head_dim_k,)),
            ("post_attention_norm.weight", (e,)),
            ("post_ffw_norm.weight", (e,)),
        ]
    out = sorted(top)
    for i in range(a.n_layer):
        out += [(f"blk.{i}.{name}", shape) for name, shape in sorted(layer)]
    return out


# --- the decision logic (src/llama-quant.cpp) ------------------------------------------------------------
def _allows_quantization(name: str, shape: tuple[int, ...]) -> bool:
    """``tensor_allows_quantization``: 2-D+ weights only; never norms, positions or expert gates."""
    if len(shape) < 2:
        return False
    if not name.endswith("weight") or "_norm.weight" in name:
        return False
    return not any(s in name for s in ("ffn_gate_inp.weight", "position_embd", "token_types"))


def _category(name: str) -> str:
    """``tensor_get_category``: broad role of a tensor, by name."""
    if name == "output.weight":
        return "output"
    if name in ("token_embd.weight", "per_layer_token_embd.weight"):
        return "token_embd"
    for key, cat in (
        ("attn_qkv.weight", "attn_qkv"),
        ("attn_kv_b.weight", "attn_kv_b"),
        ("attn_v.weight", "attn_v"),
        ("attn_k.weight", "attn_k"),
        ("attn_q.weight", "attn_q"),
        ("attn_output.weight", "attn_output"),
        ("ffn_up", "ffn_up"),
        ("ffn_gate", "ffn_gate"),
        ("ffn_down", "ffn_down"),
    ):
        if key in name:
            return cat
    return "other"


def _use_more_bits(i_layer: int, n_layers: int) -> bool:
    """``use_more_bits``: the first and last eighth of the layers, and every third layer in between."""
    return i_layer < n_layers // 8 or i_layer >= 7 * n_layers // 8 or (i_layer - n_layers // 8) % 3 == 2


def is_type_70b(arch: Architecture) -> bool:
    """Whether llama.cpp's ``load_hparams`` labels the model ``LLM_TYPE_70B`` (the only type the recipe uses).

    llama: 80 layers with grouped-query attention (80 layers without GQA is Llama 1 65B); qwen2: 80 layers.
    """
    if arch.arch == "llama":
        return arch.n_expert != 8 and arch.n_layer == 80 and arch.n_head != arch.n_head_kv
    if arch.arch == "qwen2":
        return arch.n_layer == 80
    return False


@dataclass
class _State:
    """``quantize_state_impl``: counters that advance as tensors are visited in order."""

    n_attention_wv: int
    n_layer: int
    has_tied_embeddings: bool
    has_imatrix: bool
    i_attention_wv: int = 0
    i_ffn_down: int = 0
    i_ffn_gate: int = 0
    i_ffn_up: int = 0
    n_fallback: int = 0


def _impl_type(
    st: _State, a: Architecture, new_type: str, name: str, shape: tuple[int, ...], ft: str, cat: str
) -> str:
    """``llama_tensor_get_type_impl``: the per-ftype rules, in llama.cpp's order."""
    n_gqa = a.n_head // a.n_head_kv
    n_expert = a.n_expert
    falcon = a.arch == "falcon"
    if cat == "output" or (st.has_tied_embeddings and cat == "token_embd"):
        # the output head, or the token embedding when it doubles as the output head
        nx = shape[0]
        qk_k = block_geometry(new_type)[0]
        if falcon or nx % qk_k != 0:
            return "q8_0"
        if ft in _IQ_LOW | {"IQ3_XXS"}:
            return "q5_k"
        if new_type != "q8_0":
            return "q6_k"
        return new_type
    if cat == "token_embd":
        if ft in {"IQ2_XXS", "IQ2_XS", "IQ1_S", "IQ1_M"}:
            return "q2_k"
        if ft in {"IQ2_S", "IQ2_M", "IQ3_XXS"}:
            return "iq3_s"
        return new_type
    if ft in _IQ_LOW:
        if cat in ("attn_v", "attn_qkv", "attn_kv_b"):
            if n_gqa >= 4 or n_expert >= 4:
                new_type = "q4_k"
            else:
                new_type = "iq3_s" if ft in ("IQ2_S", "IQ2_M") else "q2_k"
            st.i_attention_wv += 1
        elif n_expert == 8 and cat == "attn_k":
            new_type = "q4_k"
        elif cat == "ffn_down":
            if st.i_ffn_down < st.n_layer // 8:
                new_type = "iq3_s" if ft in ("IQ2_S", "IQ2_M") else "q2_k"
            st.i_ffn_down += 1
        elif cat == "attn_output":
            if n_expert == 8:
                new_type = "q5_k"
            elif ft in ("IQ1_S", "IQ1_M"):
                new_type = "iq2_xxs"
            elif ft in ("IQ2_S", "IQ2_M"):
                new_type = "iq3_s"
        return new_type
    if cat in ("attn_v", "attn_qkv", "attn_kv_b"):
        i, n = st.i_attention_wv, st.n_attention_wv
        if ft == "Q2_K":
            new_type = "q4_k" if n_gqa >= 4 else "q3_k"
        elif ft == "Q2_K_S" and n_gqa >= 4:
            new_type = "q4_k"
        elif ft == "IQ3_XXS":
            new_type = "q4_k" if n_gqa >= 4 else ("iq3_s" if not st.has_imatrix else "iq3_xxs")
        elif (ft in ("IQ3_XS", "IQ3_S") and n_gqa >= 4) or ft == "IQ3_M":
            new_type = "q4_k"
        elif ft == "Q3_K_M":
            new_type = "q5_k" if i < 2 else "q4_k"
        elif ft == "Q3_K_L" or (ft in ("IQ4_NL", "IQ4_XS") and n_gqa >= 4):
            new_type = "q5_k"
        elif ft in ("Q4_K_M", "Q5_K_M") and _use_more_bits(i, n):
            new_type = "q6_k"
        elif ft == "Q4_K_S" and i < 4:
            new_type = "q5_k"
        if is_type_70b(a) and new_type in ("q3_k", "q4_k"):
            # 8 heads share attn_v in 70B models: a few more bits for a small tensor buy accuracy cheaply
            new_type = "q5_k"
        if n_expert == 8:
            new_type = "q8_0"
        st.i_attention_wv += 1
        return new_type
    if cat == "attn_k":
        if n_expert == 8:
            return "q8_0"
        if ft == "IQ3_XS":
            return "iq3_xxs"
        if ft == "IQ3_XXS":
            return "iq2_s"
        return new_type
    if cat == "attn_q":
        if ft == "IQ3_XS":
            return "iq3_xxs"
        if ft == "IQ3_XXS":
            return "iq2_s"
        return new_type
    if cat == "ffn_down":
        i, n = st.i_ffn_down, st.n_layer  # dense models: layer_info() returns the counter unchanged
        if ft == "Q2_K":
            new_type = "q3_k"
        elif ft == "Q2_K_S":
            if i < n // 8:
                new_type = "q4_k"
        elif ft == "IQ3_XXS" and not st.has_imatrix:
            new_type = "q4_k" if i < n // 8 else "q3_k"
        elif ft == "Q3_K_M":
            if i < n // 16:
                new_type = "q5_k"
            elif not falcon or _use_more_bits(i, n):
                new_type = "q4_k"
            else:
                new_type = "q3_k"
        elif ft == "IQ3_M" and (i < n // 8 or (n_expert == 8 and _use_more_bits(i, n))):
            new_type = "q4_k"
        elif ft == "Q3_K_L":
            new_type = "q4_k" if falcon else "q5_k"
        elif ft == "Q4_K_M":
            if falcon:
                new_type = "q6_k" if i < n // 16 else ("q5_k" if _use_more_bits(i, n) else "q4_k")
            elif _use_more_bits(i, n):
                new_type = "q6_k"
        elif i < n // 8 and ft in ("IQ4_NL", "IQ4_XS") and not st.has_imatrix:
            new_type = "q5_k"
        elif ft == "Q5_K_M" and _use_more_bits(i, n):
            new_type = "q6_k"
        elif ft == "Q4_K_S" and not falcon and i < n // 8:
            new_type = "q5_k"
        elif ft in ("Q4_0", "Q5_0") and st.has_imatrix and i < n // 8:
            # guard against the first ffn_down layers going wild, only with an imatrix
            new_type = "q4_1" if ft == "Q4_0" else "q5_1"
        st.i_ffn_down += 1
        return new_type
    if cat == "attn_output":
        if not falcon:
            if n_expert == 8:
                if ft in {"Q2_K", "IQ3_XS", "IQ3_XXS", "Q3_K_S", "Q3_K_M", "IQ4_NL", "Q4_K_S", "Q4_K_M",
                          "IQ3_S", "IQ3_M", "IQ4_XS"}:  # fmt: skip
                    new_type = "q5_k"
            else:
                new_type = {"Q2_K": "q3_k", "IQ3_XXS": "iq3_s", "Q3_K_M": "q4_k", "Q3_K_L": "q5_k",
                            "IQ3_M": "q4_k"}.get(ft, new_type)  # fmt: skip
        elif ft == "Q3_K_L":
            new_type = "q4_k"
        return new_type
    if cat == "attn_qkv":  # (reached only by fused-QKV architectures)
        if ft in ("Q3_K_M", "Q3_K_L", "IQ3_M"):
            return "q4_k"
        return {"Q4_K_M": "q5_k", "Q5_K_M": "q6_k"}.get(ft, new_type)
    if cat == "ffn_gate":
        n = st.n_layer
        if ft == "IQ3_XS" and n // 8 <= st.i_ffn_gate < 7 * n // 8:
            new_type = "iq3_xxs"
        st.i_ffn_gate += 1
        return new_type
    if cat == "ffn_up":
        n = st.n_layer
        if ft == "IQ3_XS" and n // 8 <= st.i_ffn_up < 7 * n // 8:
            new_type = "iq3_xxs"
        st.i_ffn_up += 1
        return new_type
    return new_type


# tensor_type_fallback: a type whose block does not divide the row length falls back to a 32-block type
_FALLBACK = {
    **dict.fromkeys(("iq1_s", "iq1_m", "iq2_xxs", "iq2_xs", "iq2_s", "iq3_xxs", "iq3_s", "iq4_xs"), "iq4_nl"),
    **dict.fromkeys(("q2_0", "q2_k", "q3_k", "tq1_0", "tq2_0"), "q4_0"),
    "q4_k": "q5_0",
    "q5_k": "q5_1",
    "q6_k": "q8_0",
}


def _fallback(st: _State, ncols: int, target: str) -> str:
    """``tensor_type_fallback``: replace a type whose block size does not divide ``ncols``."""
    if ncols % block_geometry(target)[0] == 0:
        return target
    st.n_fallback += 1
    if target not in _FALLBACK:
        raise ValueError(f"no fallback quantization for type {target} and a row of {ncols} elements")
    out = _FALLBACK[target]
    if ncols % block_geometry(out)[0] != 0:
        out = "f16"  # "must use F16 due to unusual shape"
    return out


def _target_type(st: _State, a: Architecture, name: str, shape: tuple[int, ...], ft: Ftype) -> str:
    """``llama_tensor_get_type``: the type of one tensor (source types: F32 for 1-D, F16 for the rest)."""
    if not _allows_quantization(name, shape):
        return "f32" if len(shape) < 2 else "f16"
    new_type = ft.default
    if new_type in ("f32", "f16", "bf16"):
        return new_type  # not a quantized ftype: no recipe
    cat = _category(name)
    if ft.uniform:
        if cat == "output" or (st.has_tied_embeddings and cat == "token_embd"):
            new_type = _impl_type(st, a, new_type, name, shape, ft.name, cat)
    else:
        new_type = _impl_type(st, a, new_type, name, shape, ft.name, cat)
    return _fallback(st, shape[0], new_type)


def tensor_types(
    arch: Architecture,
    ftype: str,
    names_shapes: Iterable[tuple[str, tuple[int, ...]]],
    *,
    imatrix: bool = False,
) -> list[str]:
    """ggml type of each (name, shape), visited in the given order, as ``llama-quantize`` chooses it."""
    ft = get_ftype(ftype)
    items = list(names_shapes)
    st = _State(
        n_attention_wv=sum(_category(n) in ("attn_v", "attn_qkv", "attn_kv_b") for n, _ in items),
        n_layer=arch.n_layer,
        has_tied_embeddings=not any(_category(n) == "output" for n, _ in items),
        has_imatrix=imatrix,
    )
    return [_target_type(st, arch, n, s, ft) for n, s in items]


def requires_imatrix(name: str, ggml_type: str, ftype: str) -> bool:
    """``tensor_requires_imatrix``: llama-quantize refuses these tensor types without an importance matrix."""
    if name in ("token_embd.weight", "per_layer_token_embd.weight", "output.weight"):
        return False
    if ggml_type in _NEEDS_IMATRIX:
        return True
    return ggml_type == "q2_k" and get_ftype(ftype).name == "Q2_K_S"


def tensor_table(
    arch: Architecture, ftype: str, *, rope_freqs: bool = False, imatrix: bool = False
) -> tuple[TensorEntry, ...]:
    """The tensor table of ``arch`` quantized as ``ftype``: names, ggml types, shapes and exact bytes.

    Args:
        arch: architecture numbers (``llama``, ``qwen2`` or ``gemma3``).
        ftype: a llama.cpp file type such as ``Q4_K_M``, ``Q6_K``, ``Q8_0``, ``F16`` (any case), or ``Q4_K``
            (uniform; see :data:`FTYPES`).
        rope_freqs: the model has a ``rope_freqs.weight`` tensor (Llama 3.1-style rope scaling).
        imatrix: quantized with an importance matrix (changes a few IQ and Q4_0/Q5_0 rules).

    Raises:
        ValueError: unknown ftype or architecture.
    """
    shapes = tensor_shapes(arch, rope_freqs=rope_freqs)
    types = tensor_types(arch, ftype, shapes, imatrix=imatrix)
    return tuple(
        TensorEntry(name=n, ggml_type=t, shape=s, n_bytes=tensor_nbytes(t, s))
        for (n, s), t in zip(shapes, types, strict=True)
    )
