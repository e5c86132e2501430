"""Throughput measured through ggml, the library llama.cpp computes with (see docs/profiler.md).

* :func:`matmul_flops`: ``ggml_mul_mat`` of a [K, N] weight of a given type by an f32 [K, B] activation
  matrix (the compute-bound, prefill-like regime); FLOP/s = 2*K*N*B / median time.
* :func:`matvec_bandwidth`: the matrices of a transformer layer (a model's own, or a Llama-3-8B layer in
  Q4_0), repeated until they are several times larger than the last-level cache, each multiplied by one f32
  vector in one graph (the decode regime); weight bytes / median time is the rate at which llama.cpp's
  decode streams weights from memory.
* :func:`row_flops`: the rate of each further row of a small batch (serving several sequences): the same
  matrices by 1 and by 8 activation columns, FLOPs of the 7 extra rows / the difference of the times.
* :func:`numpy_read_bandwidth`: a plain read bandwidth for comparison (threads summing slices of an array).
* :func:`kv_copy_time`: ``ggml_cpy`` F32 -> F16 of one token's K and V for one layer, as graph nodes.

Weights are random normal values quantized with ``ggml_quantize_chunk`` (a few hundred rows quantized once,
then tiled: the kernels' speed does not depend on the values).
"""

from __future__ import annotations

import statistics
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from prima_sim.ggml import Backend, Ggml, GgmlError, Graph
from prima_sim.units import fmt_flop_rate


@dataclass
class Timing:
    """Median and spread of repeated runs of one measurement."""

    median_s: float
    min_s: float
    max_s: float
    runs: int

    def describe(self) -> str:
        """e.g. 'median 3.10 ms of 25 runs (2.95-4.02 ms)'."""
        return (
            f"median {self.median_s * 1e3:.3f} ms of {self.runs} runs "
            f"({self.min_s * 1e3:.3f}-{self.max_s * 1e3:.3f} ms)"
        )


def time_runs(
    fn: Callable[[], object], *, warmup: int = 1, min_runs: int = 5, max_runs: int = 50, budget_s: float = 0.3
) -> Timing:
    """Run ``fn`` ``warmup`` times untimed, then at least ``min_runs`` timed runs and more while the time spent
    stays under ``budget_s`` (at most ``max_runs``); returns the median and the range."""
    for _ in range(warmup):
        fn()
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < max_runs and (len(times) < min_runs or time.perf_counter() - start < budget_s):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return Timing(statistics.median(times), min(times), max(times), len(times))


def _random_rows(rows: int, cols: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((rows, cols), dtype=np.float32)


def _weight_block(lib: Ggml, type_name: str, k: int, rows: int, seed: int = 0) -> np.ndarray:
    """``rows`` quantized rows of length ``k``: the block tiled into a larger weight."""
    return lib.quantize(type_name, _random_rows(rows, k, seed))


@dataclass
class MatmulResult:
    """FLOP/s of one weight type and how it was obtained."""

    type_name: str
    flops: float
    k: int
    n: int
    b: int
    timing: Timing

    def describe(self) -> str:
        """One line for a profile's ``sources``."""
        return f"ggml_mul_mat [{self.k}x{self.n}] {self.type_name} x [{self.k}x{self.b}] f32: {self.timing.describe()}"


def matmul_flops(
    lib: Ggml,
    backend: Backend,
    type_name: str,
    k: int = 2048,
    n: int = 2048,
    b: int = 128,
    budget_s: float = 0.3,
) -> MatmulResult:
    """Throughput of ``ggml_mul_mat`` with a [k, n] weight of ``type_name`` and an f32 [k, b] activation.

    Raises:
        GgmlError: the type is unknown to the loaded ggml, ``k`` is not a multiple of its block size, or the
            backend failed.
    """
    block_rows = min(n, 256)
    if n % block_rows:
        raise GgmlError(f"n={n} must be a multiple of {block_rows}")
    with Graph(lib, max_tensors=8) as g:
        w = g.tensor(type_name, k, n)
        x = g.tensor("f32", k, b)
        y = g.mul_mat(w, x)
        g.build([y])
        g.allocate(backend)
        g.fill(w, _weight_block(lib, type_name, k, block_rows))
        g.set(x, _random_rows(b, k, 1))
        timing = time_runs(g.compute, warmup=2, min_runs=7, budget_s=budget_s)
    return MatmulResult(type_name, 2.0 * k * n * b / timing.median_s, k, n, b, timing)


LayerShape = tuple[tuple[str, int, int], ...]
"""The weight matrices of one transformer layer as (ggml type, K = input width, N = output width)."""

LLAMA3_8B_Q4_0_LAYER: LayerShape = (
    ("q4_0", 4096, 4096),  # attn_q
    ("q4_0", 4096, 1024),  # attn_k
    ("q4_0", 4096, 1024),  # attn_v
    ("q4_0", 4096, 4096),  # attn_output
    ("q4_0", 4096, 14336),  # ffn_gate
    ("q4_0", 4096, 14336),  # ffn_up
    ("q4_0", 14336, 4096),  # ffn_down
)
"""One Llama-3-8B layer in Q4_0: the decode-bandwidth workload when no model is given."""


@dataclass
class MatvecResult:
    """Weight-streaming rate of decode-shaped matrix-vector products."""

    bandwidth_bps: float
    weight_bytes: int
    layers: int
    layer: LayerShape
    bytes_by_type: dict[str, int]
    timing: Timing

    def describe(self) -> str:
        """One line for a profile's ``sources``."""
        mats = ", ".join(f"{t} [{k}x{n}]" for t, k, n in self.layer)
        share = ", ".join(
            f"{t} {b / self.weight_bytes:.0%}"
            for t, b in sorted(self.bytes_by_type.items(), key=lambda x: -x[1])
        )
        return (
            f"one graph of {self.layers} x {len(self.layer)} ggml_mul_mat, each weight by one f32 vector (decode), "
            f"layer = {mats}; {self.weight_bytes / 2**20:.0f} MiB of weights ({share}) / {self.timing.describe()}"
        )


def _block_rows(n: int, most: int = 64) -> int:
    r = most
    while n % r:
        r //= 2
    return r


def _scaled_layer(lib: Ggml, layer: LayerShape, target_bytes: int) -> tuple[LayerShape, int]:
    """``layer`` with fewer rows when one layer alone exceeds ``target_bytes``; and its bytes."""
    per_layer = sum(lib.row_size(t, k) * n for t, k, n in layer)
    if per_layer > target_bytes:  # a layer of a very large model: keep the row lengths, use fewer rows
        scale = target_bytes / per_layer
        layer = tuple((t, k, max(64, int(n * scale) // 64 * 64)) for t, k, n in layer)
        per_layer = sum(lib.row_size(t, k) * n for t, k, n in layer)
    return layer, per_layer


def _layer_graph_timing(
    lib: Ggml, backend: Backend, layer: LayerShape, reps: int, n_tokens: int, budget_s: float, max_runs: int
) -> tuple[int, dict[str, int], Timing]:
    """Time one graph multiplying ``reps`` copies of ``layer``'s matrices (distinct tensors, like the layers of
    a model) by an f32 activation of ``n_tokens`` columns. Returns (weight bytes, bytes by type, timing)."""
    count = reps * len(layer)
    with Graph(lib, max_tensors=2 * count + 16, max_nodes=max(2048, 2 * count + 16)) as g:
        inputs = {k: g.tensor("f32", k, n_tokens) for k in sorted({k for _, k, _ in layer})}
        weights = []
        outs = []
        for _ in range(reps):
            for t, k, n in layer:
                w = g.tensor(t, k, n)
                weights.append((w, t, k, n))
                outs.append(g.mul_mat(w, inputs[k]))
        g.build(outs)
        g.allocate(backend)
        blocks: dict[tuple[str, int, int], np.ndarray] = {}
        by_type: dict[str, int] = {}
        for w, t, k, n in weights:
            rows = _block_rows(n)
            if (t, k, rows) not in blocks:
                blocks[(t, k, rows)] = _weight_block(lib, t, k, rows, seed=len(blocks))
            g.fill(w, blocks[(t, k, rows)])
            by_type[t] = by_type.get(t, 0) + g.nbytes(w)
        for k, x in inputs.items():
            g.set(x, _random_rows(n_tokens, k, 1))
        timing = time_runs(g.compute, warmup=1 if n_tokens > 1 else 2, min_runs=3 if n_tokens > 1 else 7,
                           max_runs=max_runs, budget_s=budget_s)  # fmt: skip
    return sum(by_type.values()), by_type, timing


def matvec_bandwidth(
    lib: Ggml,
    backend: Backend,
    layer: LayerShape = LLAMA3_8B_Q4_0_LAYER,
    target_bytes: int = 256 << 20,
    budget_s: float = 0.5,
) -> MatvecResult:
    """Bytes per second that decode-shaped ``ggml_mul_mat`` calls stream from weights in memory.

    The matrices of ``layer`` are repeated (as distinct tensors, like the layers of a model) until they hold at
    least ``target_bytes``, which should be several times the last-level cache so that every run reads them
    from RAM (VRAM); one graph multiplies each by one f32 vector, as a one-token decode does. The rate
    depends on the shapes (rows of 2048 stream faster than rows of 8192 on the machines tried) and types,
    which is why a model's own layer is used when one is known.
    """
    if not layer:
        raise GgmlError("matvec_bandwidth needs at least one matrix")
    layer, per_layer = _scaled_layer(lib, layer, target_bytes)
    reps = max(1, -(-target_bytes // per_layer))
    nbytes, by_type, timing = _layer_graph_timing(lib, backend, layer, reps, 1, budget_s, max_runs=40)
    return MatvecResult(nbytes / timing.median_s, nbytes, reps, tuple(layer), by_type, timing)


@dataclass
class BatchResult:
    """Throughput of a layer's matrix products on a batch of tokens (a prefill micro-batch)."""

    n_tokens: int
    flops: float
    layers: int
    layer: LayerShape
    timing: Timing

    def describe(self) -> str:
        """One line for a profile's ``sources``."""
        return (f"{self.layers} x {len(self.layer)} ggml_mul_mat of the layer's weights by an f32 "
                f"[K x {self.n_tokens}] activation: {fmt_flop_rate(self.flops)}, {self.timing.describe()}")  # fmt: skip


def batch_flops(
    lib: Ggml,
    backend: Backend,
    layer: LayerShape = LLAMA3_8B_Q4_0_LAYER,
    n_tokens: int = 16,
    target_bytes: int = 64 << 20,
    budget_s: float = 1.0,
) -> BatchResult:
    """FLOP/s of ``layer``'s matrices multiplied by ``n_tokens`` activation columns, as a prefill micro-batch
    of that many tokens runs them (weights repeated up to ``target_bytes``, as in :func:`matvec_bandwidth`).

    Small batches run below the large-batch matmul rate of ``cpu_flops`` (activation quantization and the
    vector-dot kernels dominate, and the weights stream from RAM once per batch): this is the rate a short
    prompt's prefill really gets.
    """
    if not layer:
        raise GgmlError("batch_flops needs at least one matrix")
    if n_tokens < 2:
        raise GgmlError(f"batch_flops needs at least 2 tokens, got {n_tokens}")
    layer, per_layer = _scaled_layer(lib, layer, target_bytes)
    reps = max(1, -(-target_bytes // per_layer))
    _nbytes, _by_type, timing = _layer_graph_timing(
        lib, backend, layer, reps, n_tokens, budget_s, max_runs=10
    )
    flops = 2.0 * reps * n_tokens * sum(k * n for _, k, n in layer)
    return BatchResult(n_tokens, flops / timing.median_s, reps, tuple(layer), timing)


@dataclass
class RowResult:
    """Throughput of each further row of a small batch through a set of matrices (weights in cache)."""

    flops: float
    rows: tuple[int, int]
    layers: int
    matrices: LayerShape
    timings: tuple[Timing, Timing]

    def describe(self) -> str:
        """One line for a profile's ``sources``."""
        mats = ", ".join(f"[{k}x{n}]" for _, k, n in self.matrices)
        (a, b), (ta, tb) = self.rows, self.timings
        return (f"{self.layers} x ({mats}) by {a} row(s): {ta.describe()}; by {b} rows: {tb.describe()}; "
                f"{fmt_flop_rate(self.flops)} = FLOPs of {b - a} rows / difference")  # fmt: skip


def row_flops(
    lib: Ggml,
    backend: Backend,
    matrices: LayerShape,
    rows: tuple[int, int] = (1, 8),
    target_bytes: int = 32 << 20,
    budget_s: float = 0.3,
) -> RowResult:
    """FLOP/s of each row beyond the first of a small batch through ``matrices`` (all of one weight type): the
    matrices (repeated up to ``target_bytes``, as in :func:`matvec_bandwidth`) multiplied by ``rows[0]`` and by
    ``rows[1]`` activation columns in one graph each; the rate is the FLOPs of the extra rows over the difference
    of the median times, so the weights' stream (paid once per batch) and the graph's start cancel.

    Raises:
        GgmlError: no matrices, rows not increasing, or more rows timed no slower (noise; measure again).
    """
    if not matrices:
        raise GgmlError("row_flops needs at least one matrix")
    lo, hi = rows
    if not 1 <= lo < hi:
        raise GgmlError(f"row_flops needs 1 <= rows[0] < rows[1], got {rows}")
    matrices, per = _scaled_layer(lib, matrices, target_bytes)
    reps = max(1, -(-target_bytes // per))
    _, _, t_lo = _layer_graph_timing(lib, backend, matrices, reps, lo, budget_s / 2, max_runs=30)
    _, _, t_hi = _layer_graph_timing(lib, backend, matrices, reps, hi, budget_s / 2, max_runs=30)
    dt = t_hi.median_s - t_lo.median_s
    if dt <= 0:
        raise GgmlError(f"{hi} rows timed no slower than {lo} ({t_hi.describe()} against {t_lo.describe()})")
    flops = 2.0 * reps * (hi - lo) * sum(k * n for _, k, n in matrices)
    return RowResult(flops / dt, rows, reps, tuple(matrices), (t_lo, t_hi))


@dataclass
class UploadResult:
    """Host-to-device copy bandwidth (``ggml_backend_tensor_set``)."""

    bandwidth_bps: float
    nbytes: int
    timing: Timing


def upload_bandwidth(
    lib: Ggml, backend: Backend, nbytes: int = 256 << 20, budget_s: float = 0.5
) -> UploadResult:
    """Bandwidth of copying a host buffer into a tensor of ``backend`` (RAM -> VRAM over PCIe on a GPU)."""
    n = max(1, nbytes // 4 // 4096) * 4096
    host = np.ones(n, dtype=np.float32)
    with Graph(lib, max_tensors=2) as g:
        t = g.tensor("f32", 4096, n // 4096)
        g.build([t])
        g.allocate(backend)

        def upload() -> None:
            g.set(t, host)
            lib.base.ggml_backend_synchronize(backend.handle)

        timing = time_runs(upload, warmup=1, min_runs=3, max_runs=20, budget_s=budget_s)
    return UploadResult(host.nbytes / timing.median_s, host.nbytes, timing)


@dataclass
class NumpyBandwidth:
    """Plain read bandwidth: threads summing slices of one large array."""

    bandwidth_bps: float
    nbytes: int
    threads: int
    timing: Timing

    def describe(self) -> str:
        """One line for a profile's ``sources``."""
        return (
            f"numpy: {self.threads} thread(s) each summing 1/{self.threads} of a {self.nbytes / 2**20:.0f} MiB float64 "
            f"array: bytes / {self.timing.describe()} = {self.bandwidth_bps / 1e9:.2f} GB/s"
        )


def numpy_read_bandwidth(nbytes: int = 256 << 20, threads: int = 1, budget_s: float = 0.5) -> NumpyBandwidth:
    """Read bandwidth of ``threads`` threads each summing its slice of one array (numpy releases the GIL)."""
    a = np.ones(max(threads, nbytes // 8), dtype=np.float64)
    parts = np.array_split(a, threads)
    results = [0.0] * threads

    def run() -> None:
        if threads == 1:
            results[0] = float(parts[0].sum())
            return
        workers = [
            threading.Thread(target=lambda i=i: results.__setitem__(i, float(parts[i].sum())))
            for i in range(threads)
        ]
        for w in workers:
            w.start()
        for w in workers:
            w.join()

    timing = time_runs(run, warmup=1, min_runs=5, max_runs=30, budget_s=budget_s)
    if abs(sum(results) - a.size) > 0.5:
        raise GgmlError(f"numpy bandwidth check summed {sum(results)}, expected {a.size}")
    return NumpyBandwidth(a.nbytes / timing.median_s, a.nbytes, threads, timing)


@dataclass
class KvCopyResult:
    """Time to append one token's K and V of one layer to an f16 cache."""

    seconds: float
    n_k: int
    n_v: int
    method: str


def _kv_graph(lib: Ggml, backend: Backend, n_k: int, n_v: int, layers: int) -> Graph:
    g = Graph(lib, max_tensors=6 * layers + 8, max_nodes=max(2048, 8 * layers))
    try:
        outs, srcs = [], []
        for _ in range(layers):
            for n in (n_k, n_v):
                src, dst = g.tensor("f32", n), g.tensor("f16", n)
                srcs.append((src, n))
                outs.append(g.cpy(src, dst))
        g.build(outs)
        g.allocate(backend)
        for src, n in srcs:
            g.set(src, _random_rows(1, n, 2))
        return g
    except BaseException:
        g.close()
        raise


def kv_copy_time(
    lib: Ggml,
    backend: Backend,
    n_k: int = 1024,
    n_v: int = 1024,
    layers: tuple[int, int] = (16, 80),
    budget_s: float = 0.4,
) -> KvCopyResult:
    """Per-layer time of ``ggml_cpy`` F32 -> F16 of ``n_k`` + ``n_v`` elements (one token's K and V).

    One copy takes about a microsecond, less than starting the graph's threads, so (unlike prima.cpp, which
    timed one graph) the copies run as nodes of two graphs of ``layers[0]`` and ``layers[1]`` layers and the
    cost per layer is the difference of their median times divided by the difference of layer counts: the
    graph's fixed start-up cost cancels, the per-node synchronisation a real decode also pays stays in.
    """
    lo, hi = layers
    with _kv_graph(lib, backend, n_k, n_v, lo) as g_lo, _kv_graph(lib, backend, n_k, n_v, hi) as g_hi:
        t_lo: list[float] = []
        t_hi: list[float] = []
        for g in (g_lo, g_hi):
            g.compute()
        start = time.perf_counter()
        while len(t_lo) < 60 and (len(t_lo) < 9 or time.perf_counter() - start < budget_s):
            for g, acc in ((g_lo, t_lo), (g_hi, t_hi)):  # interleaved, so drifts in machine load hit both
                t0 = time.perf_counter()
                g.compute()
                acc.append(time.perf_counter() - t0)
    m_lo, m_hi = statistics.median(t_lo), statistics.median(t_hi)
    slope = (m_hi - m_lo) / (hi - lo)
    if slope > 0:
        method = (
            f"ggml_cpy F32->F16 of {n_k}+{n_v} elements per layer, graphs of {lo} and {hi} layers: "
            f"(median {m_hi * 1e6:.1f} us - median {m_lo * 1e6:.1f} us) / {hi - lo} layers, {len(t_lo)} runs each"
        )
        return KvCopyResult(slope, n_k, n_v, method)
    method = (
        f"ggml_cpy F32->F16 of {n_k}+{n_v} elements per layer: the two-graph difference was not positive "
        f"(noise), so the upper bound median {m_hi * 1e6:.1f} us / {hi} layers is used"
    )
    return KvCopyResult(m_hi / hi, n_k, n_v, method)
