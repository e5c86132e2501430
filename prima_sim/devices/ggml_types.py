"""ggml tensor types: names, block geometry and the exact byte size of a tensor.

Type names are ggml's, lower-cased ("f32", "q4_k", "q6_k", ...): the same keys are used for per-type
throughput in device profiles and for per-type FLOPs in model profiles. Block sizes come from the ``gguf``
package (the Python side of ggml), so a tensor's size computed here equals the bytes in a GGUF file exactly.
"""

from __future__ import annotations

from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

TYPE_BY_NAME: dict[str, GGMLQuantizationType] = {t.name.lower(): t for t in GGMLQuantizationType}
"""ggml type name (lower case) -> gguf enum."""

# Quantization types prima.cpp profiles (cpu_props.flops_<q>_f32) plus the ones stock quantizations use.
COMMON_TYPES: tuple[str, ...] = (
    "f32", "f16", "bf16", "q4_0", "q4_1", "q5_0", "q5_1", "q8_0",
    "q2_k", "q3_k", "q4_k", "q5_k", "q6_k", "iq4_nl", "iq4_xs", "iq2_xxs", "iq1_s", "iq1_m",
)  # fmt: skip


def type_name(t: GGMLQuantizationType | int | str) -> str:
    """Canonical lower-case ggml type name of an enum, its integer id or a name in any case."""
    if isinstance(t, str):
        name = t.lower()
        if name not in TYPE_BY_NAME:
            raise ValueError(f"unknown ggml type {t!r}; known: {', '.join(sorted(TYPE_BY_NAME))}")
        return name
    return GGMLQuantizationType(int(t)).name.lower()


def block_geometry(t: str) -> tuple[int, int]:
    """(elements per block, bytes per block) of a ggml type."""
    return GGML_QUANT_SIZES[TYPE_BY_NAME[type_name(t)]]


def tensor_nbytes(t: str, shape: tuple[int, ...] | list[int]) -> int:
    """Exact bytes of a tensor of ggml type ``t`` and ggml shape ``shape`` (ne0 first, contiguous).

    Raises:
        ValueError: when the row length (ne0) is not a whole number of the type's blocks.
    """
    block, size = block_geometry(t)
    n = 1
    for d in shape:
        n *= int(d)
    ne0 = int(shape[0]) if shape else 1
    if ne0 % block:
        raise ValueError(f"row of {ne0} elements is not a multiple of the {t} block size {block}")
    return n // block * size


def bits_per_weight(t: str) -> float:
    """Average storage bits per element of a ggml type (for example 4.5 for q4_k)."""
    block, size = block_geometry(t)
    return size * 8 / block
