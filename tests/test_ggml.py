"""The ctypes binding of ggml: library discovery, type ids, quantization sizes, and numerically checked
matmul / copy results (a wrong signature or argument order would give wrong numbers, not just slow ones)."""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest

from prima_sim import ggml
from prima_sim.devices.ggml_types import tensor_nbytes
from prima_sim.errors import MissingDependencyError

pytestmark = pytest.mark.real

if importlib.util.find_spec("llama_cpp") is None:  # pragma: no cover - CI installs the real extra
    pytest.skip("llama-cpp-python (the real extra) is not installed", allow_module_level=True)


@pytest.fixture(scope="module")
def lib() -> ggml.Ggml:
    return ggml.load()


@pytest.fixture(scope="module")
def cpu(lib: ggml.Ggml):
    with ggml.Backend(lib, lib.cpu_device(), n_threads=2) as be:
        yield be


def test_library_dir_is_found_without_importing_llama_cpp() -> None:
    import sys

    had = "llama_cpp" in sys.modules
    folder = ggml.library_dir()
    assert (folder / "libggml-base.so").exists() or (folder / "libggml-base.dylib").exists()
    assert ("llama_cpp" in sys.modules) == had  # find_spec located it; nothing imported it


def test_missing_llama_cpp_is_a_one_line_dependency_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ggml.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(MissingDependencyError, match=r"pip install -e \.\[real\]"):
        ggml.library_dir()


def test_load_is_shared(lib: ggml.Ggml) -> None:
    assert ggml.load() is lib


@pytest.mark.parametrize(
    ("name", "tid"),
    [("f32", 0), ("f16", 1), ("q4_0", 2), ("q8_0", 8), ("q4_k", 12), ("q6_k", 14), ("bf16", 30)],
)
def test_type_ids_match_the_library(lib: ggml.Ggml, name: str, tid: int) -> None:
    assert lib.type_id(name) == tid


def test_unknown_type_is_rejected(lib: ggml.Ggml) -> None:
    with pytest.raises(ggml.GgmlError, match="unknown ggml type"):
        lib.type_id("q9_z")


@pytest.mark.parametrize(
    "name",
    [
        "f32",
        "f16",
        "bf16",
        "q4_0",
        "q4_1",
        "q5_0",
        "q5_1",
        "q8_0",
        "q2_k",
        "q3_k",
        "q4_k",
        "q5_k",
        "q6_k",
        "iq4_nl",
        "iq4_xs",
        "iq2_xxs",
    ],
)
def test_quantize_gives_the_gguf_byte_count(lib: ggml.Ggml, name: str) -> None:
    src = np.random.default_rng(0).standard_normal((4, 512)).astype(np.float32)
    q = lib.quantize(name, src)
    assert q.nbytes == tensor_nbytes(name, (512, 4))
    assert lib.row_size(name, 512) * 4 == q.nbytes


def test_quantize_rejects_a_ragged_row(lib: ggml.Ggml) -> None:
    with pytest.raises(ggml.GgmlError, match="block size"):
        lib.quantize("q4_k", np.zeros((2, 100), np.float32))


@pytest.mark.parametrize(
    ("name", "tol"),
    [("f32", 1e-5), ("f16", 5e-3), ("q8_0", 2e-2), ("q4_0", 0.15), ("q4_k", 0.15), ("q6_k", 0.05)],
)
def test_mul_mat_matches_numpy(lib: ggml.Ggml, cpu: ggml.Backend, name: str, tol: float) -> None:
    k, n, b = 512, 96, 5
    rng = np.random.default_rng(1)
    w = rng.standard_normal((n, k)).astype(np.float32)
    x = rng.standard_normal((b, k)).astype(np.float32)
    with ggml.Graph(lib) as g:
        tw, tx = g.tensor(name, k, n), g.tensor("f32", k, b)
        ty = g.mul_mat(tw, tx)
        g.build([ty])
        g.allocate(cpu)
        g.set(tw, lib.quantize(name, w))
        g.set(tx, x)
        g.compute()
        y = g.get(ty).reshape(b, n)
    ref = x @ w.T
    err = np.abs(y - ref).max() / np.abs(ref).max()
    assert err < tol, f"{name}: relative error {err}"
    if name != "f32":
        assert err > 0  # a quantized weight cannot be exact: the kernel really used the type


def test_fill_tiles_a_block(lib: ggml.Ggml, cpu: ggml.Backend) -> None:
    k, rows, reps = 256, 4, 3
    w = np.random.default_rng(2).standard_normal((rows, k)).astype(np.float32)
    x = np.ones((1, k), np.float32)
    with ggml.Graph(lib) as g:
        tw, tx = g.tensor("q8_0", k, rows * reps), g.tensor("f32", k, 1)
        ty = g.mul_mat(tw, tx)
        g.build([ty])
        g.allocate(cpu)
        g.fill(tw, lib.quantize("q8_0", w))
        g.set(tx, x)
        g.compute()
        y = g.get(ty)
    assert y.shape == (rows * reps,)
    np.testing.assert_allclose(y[:rows], y[rows : 2 * rows])
    np.testing.assert_allclose(y[:rows], w.sum(axis=1), rtol=0.05, atol=0.2)


def test_cpy_converts_f32_to_f16(lib: ggml.Ggml, cpu: ggml.Backend) -> None:
    src = np.random.default_rng(3).standard_normal(1000).astype(np.float32)
    with ggml.Graph(lib) as g:
        a, b = g.tensor("f32", 1000), g.tensor("f16", 1000)
        c = g.cpy(a, b)
        g.build([c])
        g.allocate(cpu)
        g.set(a, src)
        g.compute()
        out = g.get(b, np.float16)
    np.testing.assert_array_equal(out, src.astype(np.float16))


def test_set_refuses_to_overflow_a_tensor(lib: ggml.Ggml, cpu: ggml.Backend) -> None:
    with ggml.Graph(lib) as g:
        a = g.tensor("f32", 16)
        g.build([a])
        g.allocate(cpu)
        with pytest.raises(ggml.GgmlError, match="overflow"):
            g.set(a, np.zeros(17, np.float32))


def test_compute_needs_an_allocated_graph(lib: ggml.Ggml) -> None:
    with ggml.Graph(lib) as g:
        a = g.tensor("f32", 16)
        with pytest.raises(ggml.GgmlError, match="build"):
            g.allocate(None)  # type: ignore[arg-type]
        g.build([a])
        with pytest.raises(ggml.GgmlError, match="allocate"):
            g.compute()


def test_too_many_tensors_is_an_error_not_a_crash(lib: ggml.Ggml) -> None:
    with ggml.Graph(lib, max_tensors=2) as g:
        g.tensor("f32", 8)
        g.tensor("f32", 8)
        with pytest.raises(ggml.GgmlError, match="max_tensors"):
            g.tensor("f32", 8)


def test_registry_lists_the_cpu(lib: ggml.Ggml) -> None:
    devs = lib.devices()
    cpu = lib.cpu_device()
    assert cpu in devs
    assert cpu.backend == "CPU"
    assert cpu.memory_total_bytes > 0
    assert all(d.type in ("gpu", "igpu") for d in lib.gpu_devices())


@pytest.mark.parametrize("name", sorted(ggml.NOT_QUANTIZABLE))
def test_types_ggml_cannot_quantize_are_refused_not_aborted(lib: ggml.Ggml, name: str) -> None:
    # ggml_quantize_chunk would abort the whole process on these
    with pytest.raises(ggml.GgmlError, match="cannot quantize"):
        lib.quantize(name, np.zeros((1, 256), np.float32))


def test_backend_supports_what_it_computes(lib: ggml.Ggml, cpu: ggml.Backend) -> None:
    with ggml.Graph(lib) as g:
        y = g.mul_mat(g.tensor("q4_k", 256, 4), g.tensor("f32", 256, 1))
        c = g.cpy(g.tensor("f32", 8), g.tensor("f16", 8))
        assert cpu.supports(y) and cpu.supports(c)
        assert "q4_k" in g.ops[y] and "f16" in g.ops[c]
