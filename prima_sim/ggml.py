"""A thin ctypes binding of the few ggml C functions the device profiler needs.

ggml is the tensor library under llama.cpp. llama-cpp-python ships it as shared libraries in
``site-packages/llama_cpp/lib`` (``libggml-base.so``, ``libggml-cpu.so``, ``libggml.so``); this module finds
that folder with :func:`importlib.util.find_spec` *without importing* the ``llama_cpp`` Python package (the
layering rule of :mod:`prima_sim.devices`) and loads the libraries with :mod:`ctypes`.

Everything runs through ggml's backend interface, the same path llama.cpp takes: tensors live in a context
created with ``no_alloc``, :meth:`Graph.allocate` places them in a buffer of a backend (the CPU, or a GPU
found in the backend registry), :meth:`Graph.compute` runs ``ggml_backend_graph_compute``. Buffers come from
the backend's *default* buffer type, never from CPU "extra" buffer types, so the AMX and weight-repacking
kernels (SIGILL on some CPUs, see docs/profiler.md) are never reached.

Signatures were checked against the headers that llama-cpp-python 0.3.36 installs
(``site-packages/include/ggml.h``, ``ggml-cpu.h``, ``ggml-backend.h``, ``ggml-alloc.h``). Type ids are
ggml's ``enum ggml_type``; :func:`type_id` checks each one against ``ggml_type_name`` of the loaded library,
so a library whose numbering moved fails loudly instead of timing the wrong kernel.
"""

from __future__ import annotations

import ctypes
import importlib.util
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt
from gguf import GGMLQuantizationType

from prima_sim.errors import MissingDependencyError, PrimaSimError

_vp = ctypes.c_void_p
_sz = ctypes.c_size_t
_i64 = ctypes.c_int64

DEVICE_TYPES = {0: "cpu", 1: "gpu", 2: "igpu", 3: "accel", 4: "meta"}
"""``enum ggml_backend_dev_type`` as names."""

NOT_QUANTIZABLE = frozenset({"q8_1", "q8_k", "i8", "i16", "i32", "i64", "f64"})
"""Types ``ggml_quantize_chunk`` cannot produce: it aborts the process on them (checked on ggml 0.25), so
:meth:`Ggml.quantize` refuses them first. (q8_1 and q8_k are only the activations' side of dot products.)"""


class GgmlError(PrimaSimError):
    """A ggml call failed (allocation, computation) or the library does not match this binding."""


class _InitParams(ctypes.Structure):
    """``struct ggml_init_params``."""

    _fields_ = [("mem_size", _sz), ("mem_buffer", _vp), ("no_alloc", ctypes.c_bool)]


def library_dir() -> Path:
    """The folder holding llama-cpp-python's ggml and llama shared libraries.

    Raises:
        MissingDependencyError: llama-cpp-python is not installed, or ships no libraries.
    """
    spec = importlib.util.find_spec("llama_cpp")  # finds the package without importing it
    if spec is None or not spec.submodule_search_locations:
        raise MissingDependencyError(
            "llama-cpp-python is not installed; the profiler runs ggml from it: pip install -e .[real]"
        )
    for loc in spec.submodule_search_locations:
        lib = Path(loc) / "lib"
        if (
            (lib / "libggml-base.so").exists()
            or (lib / "libggml-base.dylib").exists()
            or (lib / "ggml-base.dll").exists()
        ):
            return lib
    raise MissingDependencyError(
        f"llama-cpp-python at {next(iter(spec.submodule_search_locations))} has no ggml libraries in lib/; "
        "reinstall it: pip install -e .[real]"
    )


def _lib_file(folder: Path, stem: str) -> Path:
    for name in (f"lib{stem}.so", f"lib{stem}.dylib", f"{stem}.dll"):
        if (folder / name).exists():
            return folder / name
    raise MissingDependencyError(
        f"{folder} lacks the {stem} library; reinstall llama-cpp-python: pip install -e .[real]"
    )


def _fn(lib: ctypes.CDLL, name: str, restype: object, argtypes: Sequence[object]) -> None:
    f = getattr(lib, name)
    f.restype = restype
    f.argtypes = list(argtypes)


class Ggml:
    """The loaded libraries with their prototypes declared. Get the shared instance with :func:`load`."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        mode = getattr(ctypes, "RTLD_GLOBAL", 0)
        try:
            self.base = ctypes.CDLL(str(_lib_file(folder, "ggml-base")), mode=mode)
            self.cpu = ctypes.CDLL(str(_lib_file(folder, "ggml-cpu")), mode=mode)
            self.ggml = ctypes.CDLL(str(_lib_file(folder, "ggml")), mode=mode)
        except OSError as exc:
            raise MissingDependencyError(
                f"cannot load ggml from {folder}: {exc}; pip install -e .[real]"
            ) from None
        b, c, g = self.base, self.cpu, self.ggml
        try:
            # ggml.h
            _fn(b, "ggml_init", _vp, [_InitParams])
            _fn(b, "ggml_free", None, [_vp])
            _fn(b, "ggml_tensor_overhead", _sz, [])
            _fn(b, "ggml_graph_overhead_custom", _sz, [_sz, ctypes.c_bool])
            _fn(b, "ggml_new_tensor_1d", _vp, [_vp, ctypes.c_int, _i64])
            _fn(b, "ggml_new_tensor_2d", _vp, [_vp, ctypes.c_int, _i64, _i64])
            _fn(b, "ggml_mul_mat", _vp, [_vp, _vp, _vp])
            _fn(b, "ggml_cpy", _vp, [_vp, _vp, _vp])
            _fn(b, "ggml_new_graph_custom", _vp, [_vp, _sz, ctypes.c_bool])
            _fn(b, "ggml_build_forward_expand", None, [_vp, _vp])
            _fn(b, "ggml_nbytes", _sz, [_vp])
            _fn(b, "ggml_row_size", _sz, [ctypes.c_int, _i64])
            _fn(b, "ggml_blck_size", _i64, [ctypes.c_int])
            _fn(b, "ggml_type_name", ctypes.c_char_p, [ctypes.c_int])
            _fn(b, "ggml_quantize_requires_imatrix", ctypes.c_bool, [ctypes.c_int])
            _fn(b, "ggml_quantize_chunk", _sz, [ctypes.c_int, _vp, _vp, _i64, _i64, _i64, _vp])
            # ggml-alloc.h / ggml-backend.h (libggml-base)
            _fn(b, "ggml_backend_alloc_ctx_tensors", _vp, [_vp, _vp])
            _fn(b, "ggml_backend_buffer_free", None, [_vp])
            _fn(b, "ggml_backend_tensor_set", None, [_vp, _vp, _sz, _sz])
            _fn(b, "ggml_backend_tensor_get", None, [_vp, _vp, _sz, _sz])
            _fn(b, "ggml_backend_graph_compute", ctypes.c_int, [_vp, _vp])
            _fn(b, "ggml_backend_synchronize", None, [_vp])
            _fn(b, "ggml_backend_free", None, [_vp])
            _fn(b, "ggml_backend_name", ctypes.c_char_p, [_vp])
            _fn(b, "ggml_backend_dev_name", ctypes.c_char_p, [_vp])
            _fn(b, "ggml_backend_dev_description", ctypes.c_char_p, [_vp])
            _fn(b, "ggml_backend_dev_type", ctypes.c_int, [_vp])
            _fn(b, "ggml_backend_dev_memory", None, [_vp, ctypes.POINTER(_sz), ctypes.POINTER(_sz)])
            _fn(b, "ggml_backend_dev_init", _vp, [_vp, ctypes.c_char_p])
            _fn(b, "ggml_backend_dev_backend_reg", _vp, [_vp])
            _fn(b, "ggml_backend_dev_supports_op", ctypes.c_bool, [_vp, _vp])
            _fn(b, "ggml_backend_reg_name", ctypes.c_char_p, [_vp])
            # ggml-cpu.h
            _fn(c, "ggml_cpu_init", None, [])
            _fn(c, "ggml_backend_cpu_set_n_threads", None, [_vp, ctypes.c_int])
            # ggml-backend.h, registry (libggml)
            _fn(g, "ggml_backend_reg_count", _sz, [])
            _fn(g, "ggml_backend_dev_count", _sz, [])
            _fn(g, "ggml_backend_dev_get", _vp, [_sz])
            _fn(g, "ggml_backend_load_all_from_path", None, [ctypes.c_char_p])
        except AttributeError as exc:
            raise MissingDependencyError(
                f"the ggml in {folder} lacks a function this binding needs ({exc}); "
                "install a llama-cpp-python >= 0.3.30: pip install -e .[real]"
            ) from None
        c.ggml_cpu_init()  # fp16 conversion tables; idempotent
        if (
            g.ggml_backend_reg_count() == 0
        ):  # a GGML_BACKEND_DL build: backends are plug-ins beside the libraries
            g.ggml_backend_load_all_from_path(str(folder).encode())

    # --- types ------------------------------------------------------------------------------------------
    def type_id(self, name: str) -> int:
        """ggml's enum value for a type name ("q4_k"), checked against the loaded library's own name table."""
        try:
            tid = int(GGMLQuantizationType[name.upper()])
        except KeyError:
            raise GgmlError(f"unknown ggml type {name!r}") from None
        got = (self.base.ggml_type_name(tid) or b"").decode().lower()
        if got != name.lower():
            raise GgmlError(
                f"ggml type id {tid} is {got!r} in the loaded library, expected {name!r}: version mismatch"
            )
        return tid

    def block_size(self, name: str) -> int:
        """Elements per block of a type (1 for f32/f16)."""
        return int(self.base.ggml_blck_size(self.type_id(name)))

    def row_size(self, name: str, n: int) -> int:
        """Bytes of ``n`` consecutive elements of a type (``n`` a multiple of the block size)."""
        return int(self.base.ggml_row_size(self.type_id(name), n))

    def quantize(self, name: str, src: np.ndarray) -> np.ndarray:
        """Quantize a C-contiguous float32 matrix [rows, n_per_row] to ggml type ``name`` with
        ``ggml_quantize_chunk`` (f32, f16 and bf16 are converted the same way); returns the raw bytes.

        Types that need an importance matrix get a uniform one (all ones)."""
        if name.lower() in NOT_QUANTIZABLE:
            raise GgmlError(f"ggml cannot quantize to {name} (not a weight type)")
        src = np.ascontiguousarray(src, dtype=np.float32)
        if src.ndim != 2:
            raise GgmlError("quantize expects a 2-D float32 array [rows, n_per_row]")
        rows, n = src.shape
        if n % self.block_size(name):
            raise GgmlError(f"row of {n} is not a multiple of the {name} block size {self.block_size(name)}")
        tid = self.type_id(name)
        dst = np.empty(rows * self.row_size(name, n), dtype=np.uint8)
        imatrix = np.ones(n, dtype=np.float32) if self.base.ggml_quantize_requires_imatrix(tid) else None
        written = self.base.ggml_quantize_chunk(
            tid,
            src.ctypes.data,
            dst.ctypes.data,
            0,
            rows,
            n,
            imatrix.ctypes.data if imatrix is not None else None,
        )
        if written != dst.nbytes:
            raise GgmlError(f"ggml_quantize_chunk({name}) wrote {written} bytes, expected {dst.nbytes}")
        return dst

    # --- devices -----------------------------------------------------------------------------------------
    def devices(self) -> list[DeviceInfo]:
        """Every device in ggml's backend registry (the CPU, GPUs, accelerators)."""
        out = []
        for i in range(int(self.ggml.ggml_backend_dev_count())):
            dev = self.ggml.ggml_backend_dev_get(i)
            free, total = _sz(0), _sz(0)
            self.base.ggml_backend_dev_memory(dev, ctypes.byref(free), ctypes.byref(total))
            reg = self.base.ggml_backend_dev_backend_reg(dev)
            out.append(
                DeviceInfo(
                    index=i,
                    handle=int(dev),
                    name=(self.base.ggml_backend_dev_name(dev) or b"").decode(errors="replace"),
                    description=(self.base.ggml_backend_dev_description(dev) or b"").decode(errors="replace"),
                    type=DEVICE_TYPES.get(int(self.base.ggml_backend_dev_type(dev)), "unknown"),
                    backend=(self.base.ggml_backend_reg_name(reg) or b"").decode(errors="replace")
                    if reg
                    else "",
                    memory_free_bytes=int(free.value),
                    memory_total_bytes=int(total.value),
                )
            )
        return out

    def cpu_device(self) -> DeviceInfo:
        """The CPU device of the registry."""
        for d in self.devices():
            if d.type == "cpu":
                return d
        raise GgmlError("ggml's backend registry has no CPU device")

    def gpu_devices(self) -> list[DeviceInfo]:
        """GPU devices (discrete or integrated) of the registry."""
        return [d for d in self.devices() if d.type in ("gpu", "igpu")]


@dataclass(frozen=True)
class DeviceInfo:
    """One device of ggml's backend registry."""

    index: int
    handle: int
    name: str
    description: str
    type: str  # cpu, gpu, igpu, accel, meta
    backend: str  # name of its backend registry: CPU, CUDA, Metal, Vulkan, ROCm, SYCL, ...
    memory_free_bytes: int
    memory_total_bytes: int


_LOCK = threading.Lock()
_LOADED: Ggml | None = None


def load() -> Ggml:
    """Load ggml from llama-cpp-python once per process.

    Raises:
        MissingDependencyError: llama-cpp-python (the ``real`` extra) is not installed or too old.
    """
    global _LOADED
    with _LOCK:
        if _LOADED is None:
            _LOADED = Ggml(library_dir())
        return _LOADED


class Backend:
    """An initialized ggml backend (a compute stream) on one device; a context manager."""

    def __init__(self, lib: Ggml, device: DeviceInfo, n_threads: int | None = None) -> None:
        self.lib = lib
        self.device = device
        self.handle = lib.base.ggml_backend_dev_init(device.handle, None)
        if not self.handle:
            raise GgmlError(f"cannot initialize ggml backend for device {device.name} ({device.description})")
        self.is_cpu = device.type == "cpu"
        if self.is_cpu and n_threads:
            lib.cpu.ggml_backend_cpu_set_n_threads(self.handle, int(n_threads))

    def supports(self, op: int) -> bool:
        """Whether the device can compute the operation tensor ``op`` (``ggml_backend_dev_supports_op``)."""
        return bool(self.lib.base.ggml_backend_dev_supports_op(self.device.handle, op))

    @property
    def name(self) -> str:
        """The backend's name (``CPU``, ``CUDA0``, ...)."""
        return (self.lib.base.ggml_backend_name(self.handle) or b"").decode()

    def close(self) -> None:
        """Free the backend."""
        if self.handle:
            self.lib.base.ggml_backend_free(self.handle)
            self.handle = None

    def __enter__(self) -> Backend:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class Graph:
    """A ggml context of tensors and one compute graph over them, allocated on a backend.

    Create tensors and operations, call :meth:`build` with the outputs, :meth:`allocate` on a backend, fill
    inputs with :meth:`set`, then :meth:`compute` as often as needed. A context manager; :meth:`close`
    frees the buffer and the context.
    """

    def __init__(self, lib: Ggml, max_tensors: int = 64, max_nodes: int = 2048) -> None:
        self.lib = lib
        self.max_nodes = max_nodes
        mem = max_tensors * lib.base.ggml_tensor_overhead() + lib.base.ggml_graph_overhead_custom(
            max_nodes, False
        )
        self.ctx = lib.base.ggml_init(_InitParams(mem + 4096, None, True))
        if not self.ctx:
            raise GgmlError("ggml_init failed")
        self.max_tensors = max_tensors
        self.n_tensors = 0
        self.graph: int | None = None
        self.ops: dict[int, str] = {}  # operation tensors and what they compute, checked in allocate()
        self.types: dict[int, str] = {}
        self.buffer: int | None = None
        self.backend: Backend | None = None

    def _count(self, n: int = 1) -> None:
        self.n_tensors += n
        if self.n_tensors > self.max_tensors:
            raise GgmlError(f"more than {self.max_tensors} tensors in one ggml context; raise max_tensors")

    def _type_of(self, t: int) -> str:
        return self.types.get(t, "?")

    def tensor(self, type_name: str, ne0: int, ne1: int = 1) -> int:
        """A new 2-D tensor (ne0 = row length, ne1 = rows; ggml's order)."""
        if self.graph is not None:
            raise GgmlError("tensors must be created before build()")
        tid = self.lib.type_id(type_name)
        if ne0 % self.lib.block_size(type_name):
            raise GgmlError(f"row of {ne0} is not a multiple of the {type_name} block size")
        self._count()
        t = int(self.lib.base.ggml_new_tensor_2d(self.ctx, tid, ne0, ne1))
        self.types[t] = type_name
        return t

    def mul_mat(self, a: int, b: int) -> int:
        """``ggml_mul_mat(a, b)``: a [K, N] (weights, any type) times b [K, B] (f32) gives [N, B] f32."""
        self._count()
        op = int(self.lib.base.ggml_mul_mat(self.ctx, a, b))
        self.ops[op] = f"mul_mat of {self._type_of(a)} by {self._type_of(b)}"
        return op

    def cpy(self, a: int, b: int) -> int:
        """``ggml_cpy(a, b)``: copy a into b, converting to b's type."""
        self._count()
        op = int(self.lib.base.ggml_cpy(self.ctx, a, b))
        self.ops[op] = f"cpy from {self._type_of(a)} to {self._type_of(b)}"
        return op

    def build(self, outputs: Sequence[int]) -> None:
        """Build the forward graph that computes ``outputs``."""
        self.graph = int(self.lib.base.ggml_new_graph_custom(self.ctx, self.max_nodes, False))
        for t in outputs:
            self.lib.base.ggml_build_forward_expand(self.graph, t)

    def allocate(self, backend: Backend) -> None:
        """Allocate every tensor of the context in one buffer of ``backend``'s default buffer type.

        Raises:
            GgmlError: the graph is not built, the backend cannot run one of its operations, or out of memory.
        """
        if self.graph is None:
            raise GgmlError("build() the graph before allocate()")
        for op in self.ops:
            if not backend.supports(op):
                raise GgmlError(f"{backend.name} cannot compute {self.ops[op]}")
        buf = self.lib.base.ggml_backend_alloc_ctx_tensors(self.ctx, backend.handle)
        if not buf:
            raise GgmlError(f"cannot allocate ggml tensors on {backend.name} (out of memory?)")
        self.buffer = int(buf)
        self.backend = backend

    def nbytes(self, t: int) -> int:
        """Bytes of a tensor's data."""
        return int(self.lib.base.ggml_nbytes(t))

    def set(self, t: int, data: np.ndarray, offset: int = 0) -> None:
        """Copy ``data`` (any C-contiguous array, as raw bytes) into tensor ``t`` at byte ``offset``."""
        data = np.ascontiguousarray(data)
        if offset + data.nbytes > self.nbytes(t):
            raise GgmlError(
                f"{data.nbytes} bytes at offset {offset} overflow a tensor of {self.nbytes(t)} bytes"
            )
        self.lib.base.ggml_backend_tensor_set(t, data.ctypes.data, offset, data.nbytes)

    def fill(self, t: int, block: np.ndarray) -> None:
        """Fill tensor ``t`` by repeating ``block`` (raw bytes); its size must divide the tensor's."""
        block = np.ascontiguousarray(block).view(np.uint8).reshape(-1)
        total = self.nbytes(t)
        if total % block.nbytes:
            raise GgmlError(f"a block of {block.nbytes} bytes does not tile a tensor of {total} bytes")
        for off in range(0, total, block.nbytes):
            self.lib.base.ggml_backend_tensor_set(t, block.ctypes.data, off, block.nbytes)

    def get(self, t: int, dtype: npt.DTypeLike = np.float32) -> np.ndarray:
        """A copy of tensor ``t``'s data as a flat array of ``dtype``."""
        out = np.empty(self.nbytes(t), dtype=np.uint8)
        self.lib.base.ggml_backend_tensor_get(t, out.ctypes.data, 0, out.nbytes)
        return out.view(dtype)

    def compute(self) -> None:
        """Run the graph on the backend and wait for it."""
        if self.backend is None or self.graph is None:
            raise GgmlError("allocate() the graph on a backend before compute()")
        status = self.lib.base.ggml_backend_graph_compute(self.backend.handle, self.graph)
        self.lib.base.ggml_backend_synchronize(self.backend.handle)
        if status != 0:
            raise GgmlError(f"ggml_backend_graph_compute on {self.backend.name} failed with status {status}")

    def close(self) -> None:
        """Free the buffer and the context."""
        if self.buffer:
            self.lib.base.ggml_backend_buffer_free(self.buffer)
            self.buffer = None
        if self.ctx:
            self.lib.base.ggml_free(self.ctx)
            self.ctx = None

    def __enter__(self) -> Graph:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
