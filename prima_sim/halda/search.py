"""Halda's exact search: the plan of lowest predicted TPOT over every k, window, GPU layer count and device set.

For a fixed number of rounds k the window total is W = L/k and the devices run their windows in ring order
(ring[1], ..., ring[M-1], then the head). A device's cost depends only on where its window starts in the
round (s), its size (w) and its GPU layers (n): which exact layers it runs, hence their compute time, bytes,
KV cache, and so its memory regime (fits, pages, can prefetch), all follow from (s, w, n). The cost of a plan
is then (:mod:`prima_sim.halda.costmodel`)::

    TPOT = max( sum over kept devices of chain_d(s_d, w_d, n_d) + k * hops between consecutive kept devices,
                max over prefetching devices of load_d(s_d, w_d, n_d) )

where ``chain_d`` is the device's compute, memory, overhead and any disk stall its own windows wait for
(the head's output head included), and ``load_d`` the disk time of reads it prefetches behind the others'
work. The first term is a sum over devices in ring order, so a dynamic program over devices with state "layers
of the round placed so far" (and "last device kept", when devices may be dropped) minimizes it exactly; the
second is handled by a threshold T on every device's load: the smallest T whose best chain is at most T is
found by bisection over the finite set of load values (the chain's optimum only falls as T grows).

The per-device tables come from prefix sums of per-layer times and bytes, so each (s, w, n) costs O(1), and
the whole search costs O(|K| * log(#loads) * M^2 * W^2) array operations. GPU layer counts are searched
exhaustively when W is small and otherwise restricted to the values where a device's regime can change (0,
the count that makes its RAM share fit, the count that lets it prefetch, the most that fit in VRAM, all of
the window), between which its cost is linear in n.

This replaces prima.cpp's fixed-point iteration over the sets M1-M4 (whose RAM rows can hold a device in a
poor regime) with a search that sees every regime at once. :mod:`prima_sim.halda.ilp` still states the
program of the regimes the optimum lies in, and HiGHS solves it as an independent check (docs/halda.md).

Why one module of this size: the per-device tables, the dynamic program and the bisection over loads are one
algorithm (above) whose parts share its array layout.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from prima_sim.devices.behaviour import (
    fit_limit,
    overflow_reread_bytes,
    paging_fraction,
    prefetch_start,
    streamed_count_prefix,
)
from prima_sim.devices.cluster import Cluster
from prima_sim.devices.model import ModelProfile
from prima_sim.halda.costmodel import DeviceCosts, head_extra_bytes, hop_time, stream_in_flight_bytes
from prima_sim.workload import Workload

SMALL_WINDOW_TOTAL = 24
"""Up to this window total W, every GPU layer count of every window is searched on devices whose layers are
not all faster (or all slower) on their GPU, where the candidate counts of :func:`_gpu_candidates` are exact
only up to differences between layers."""
INF = math.inf


@dataclass(frozen=True)
class Option:
    """One device's choice in a plan: window start s, window w, GPU layers n, and what it costs."""

    s: int
    w: int
    n: int
    chain_s: float
    load_s: float


@dataclass
class KTables:
    """Costs of every device of the ring (in execution order) for every window [s, e) of a round and every
    candidate GPU layer count, for one k.

    Arrays have shape (devices, candidates, W + 1, W + 1), indexed [p, c, s, e]; impossible entries (empty or
    reversed windows, memory that does not fit) are ``inf`` in ``chain``. Devices with fewer candidates
    repeat their first one.
    """

    names: list[str]
    n: np.ndarray  # GPU layers of each candidate
    chain: np.ndarray  # seconds on the ring's chain
    load: np.ndarray  # seconds of prefetched reads (0 when the device does not prefetch)
    _best: dict[float, np.ndarray] = field(default_factory=dict, repr=False)

    def _masked(self, threshold: float) -> np.ndarray:
        return self.chain if threshold == INF else np.where(self.load <= threshold, self.chain, INF)

    def best(self, threshold: float) -> np.ndarray:
        """Chain of the cheapest candidate per (device, s, e) whose load is at most ``threshold``."""
        hit = self._best.get(threshold)
        if hit is None:
            hit = self._best[threshold] = self._masked(threshold).min(axis=1)
        return hit

    def pick(self, threshold: float, p: int, s: int, e: int) -> int:
        """Index of the candidate :meth:`best` chose for device ``p`` and window [s, e)."""
        col = (
            self.chain[p, :, s, e]
            if threshold == INF
            else np.where(self.load[p, :, s, e] <= threshold, self.chain[p, :, s, e], INF)
        )
        return int(col.argmin())

    def loads(self) -> np.ndarray:
        """Every distinct positive load of a feasible option (the thresholds worth trying)."""
        return np.unique(self.load[np.isfinite(self.chain) & (self.load > 0)])


@dataclass
class KResult:
    """The best plan for one k: ring order (head first), windows and GPU layers in that order, dropped
    devices, and its objective (the cost model's TPOT for it, up to per-round variation)."""

    k: int
    ring: list[str]
    w: tuple[int, ...]
    n: tuple[int, ...]
    objective_s: float
    chain_s: float
    load_s: float
    dropped: list[str] = field(default_factory=list)
    dps: int = 0


def _sum_rounds(prefix: np.ndarray, k: int, W: int) -> np.ndarray:
    """Q[x] = sum over rounds r of prefix[r*W + x], for x in [0, W]: a window [s, e) of every round sums to
    Q[e] - Q[s]."""
    out = np.empty(W + 1)
    out[:W] = prefix[: k * W].reshape(k, W).sum(axis=0)
    out[W] = prefix[W : k * W + 1 : W].sum()
    return out


@dataclass
class RingArrays:
    """What :func:`k_tables` needs of every device of a ring (execution order, head last), independent of k:
    prefix sums of per-layer times and bytes, and per-device constants, stacked as arrays."""

    costs: list[DeviceCosts]
    names: list[str]
    cpu: np.ndarray  # (M, L + 1) prefix sums of CPU layer times
    gpu: np.ndarray  # (M, L + 1) of GPU layer times (CPU ones without a GPU)
    nbytes: np.ndarray  # (M, L + 1) of layer weight bytes
    kv: np.ndarray  # (M, L + 1) of layer KV-cache bytes
    col: dict[str, np.ndarray]  # per-device constants, shape (M, 1, 1)

    @classmethod
    def of(cls, costs: list[DeviceCosts], names: list[str]) -> RingArrays:
        model = costs[0].model
        M = len(costs)
        head = M - 1
        mems = [c.memory for c in costs]

        def v(values: list[float]) -> np.ndarray:
            return np.asarray(values, dtype=float).reshape(M, 1, 1)

        col = {
            "head_b": v([head_extra_bytes(model) if p == head else 0.0 for p in range(M)]),
            "head_s": v([c.head_time().total_s if p == head else 0.0 for p, c in enumerate(costs)]),
            "emb": v([model.embedding_row_bytes if p == head else 0.0 for p in range(M)]),
            "ovh": v([c.window_overhead_s(1, 0) for c in costs]),
            "ovh_gpu": v([c.window_overhead_s(1, 1) for c in costs]),
            "swap_first": v([m.swap_out_first_bytes for m in mems]),
            "budget": v([m.ram_budget_bytes for m in mems]),
            "pinned_budget": v([m.pinned_budget_bytes for m in mems]),
            "vram": v([m.vram_bytes for m in mems]),
            "bps": v([m.fault_bps for m in mems]),
            "ram_gpu": np.array([m.gpu_memory_is_ram for m in mems]).reshape(M, 1, 1),
            "pages": np.array([m.gpu_layers_page for m in mems]).reshape(M, 1, 1),
            "kernel_lru": np.array([m.kernel_lru for m in mems]).reshape(M, 1, 1),
            "can_stream": np.array([m.can_stream for m in mems]).reshape(M, 1, 1),
        }
        return cls(costs, names, np.stack([c.layer_sums().cpu for c in costs]),
                   np.stack([c.layer_sums().gpu for c in costs]), np.stack([c.layer_bytes_prefix for c in costs]),
                   np.stack([c.layer_kv_prefix for c in costs]), col)  # fmt: skip


def _sum_rounds_all(prefix: np.ndarray, k: int, W: int) -> np.ndarray:
    """:func:`_sum_rounds` of every row of ``prefix`` (shape (M, L + 1)) -> (M, W + 1)."""
    M = prefix.shape[0]
    out = np.empty((M, W + 1))
    out[:, :W] = prefix[:, : k * W].reshape(M, k, W).sum(axis=1)
    out[:, W] = prefix[:, W : k * W + 1 : W].sum(axis=1)
    return out


def k_tables(ra: RingArrays, k: int, prefetch: bool, stream: bool = True) -> KTables:
    """Every (s, e, n) option of every device of the ring for k rounds, with its chain and load (see the
    module text). All devices, candidates and windows are computed at once, then laid out as arrays of shape
    (devices, candidates, W + 1, W + 1)."""
    costs, col = ra.costs, ra.col
    L = ra.cpu.shape[1] - 1
    W = L // k
    M = len(costs)
    # the windows that exist (s < e) only: P pairs, arrays of shape (devices, candidates, P)
    si, ei = np.triu_indices(W + 1, 1)
    wi = ei - si
    Q = {"c": _sum_rounds_all(ra.cpu, k, W), "g": _sum_rounds_all(ra.gpu, k, W),
         "b": _sum_rounds_all(ra.nbytes, k, W), "kv": _sum_rounds_all(ra.kv, k, W)}  # fmt: skip
    bufs = np.array([c.buffers(k, p == M - 1) for p, c in enumerate(costs)])
    buf_cpu, buf_gpu = bufs[:, 0].reshape(M, 1, 1), bufs[:, 1].reshape(M, 1, 1)
    cands: list[list[np.ndarray]] = []
    for p, c in enumerate(costs):
        mem = c.memory
        if not mem.has_gpu:
            cands.append([np.zeros_like(wi)])
        elif W <= SMALL_WINDOW_TOTAL and gpu_counts_approximate(c):
            cands.append([np.minimum(x, wi) for x in range(W + 1)])
        else:
            cands.append(_gpu_candidates(c, Q["b"][p], Q["kv"][p], si, ei, k, float(bufs[p, 0]), float(bufs[p, 1]),
                                         float(col["head_b"][p, 0, 0]), prefetch and k >= 2))  # fmt: skip
    C = max(len(x) for x in cands)
    n = np.clip(np.array([cs + [cs[0]] * (C - len(cs)) for cs in cands]), 0, wi)
    dev = np.arange(M)[:, None, None]
    s3, e3 = si[None, None], ei[None, None]
    m = e3 - n
    flat = (dev * (W + 1) + m).ravel()

    def at_m(q: np.ndarray) -> np.ndarray:  # q[p, m[p, c, i]]
        out: np.ndarray = np.take(q.ravel(), flat).reshape(m.shape)
        return out

    def at_s(q: np.ndarray) -> np.ndarray:  # q[p, s_i]
        return q[:, si][:, None, :]

    def at_e(q: np.ndarray) -> np.ndarray:  # q[p, e_i]
        return q[:, ei][:, None, :]

    Qb, Qkv = Q["b"], Q["kv"]
    b_m, kv_m = at_m(Qb), at_m(Qkv)
    w_cpu, w_gpu = b_m - at_s(Qb), at_e(Qb) - b_m
    kv_cpu, kv_gpu = kv_m - at_s(Qkv), at_e(Qkv) - kv_m
    ram_gpu, pages = col["ram_gpu"], col["pages"]
    pinned = kv_cpu + buf_cpu + np.where(ram_gpu, kv_gpu + buf_gpu + np.where(pages, 0.0, w_gpu), 0.0)
    mapped = w_cpu + col["head_b"] + np.where(pages, w_gpu, 0.0)
    swap_first = col["swap_first"]
    base = col["budget"] - swap_first - pinned
    room = np.maximum(base, 0.0) + np.clip(swap_first + np.minimum(base, 0.0), 0.0, None)
    ok = pinned <= col["pinned_budget"]
    ok &= ram_gpu | (n == 0) | (w_gpu + kv_gpu + buf_gpu <= col["vram"])
    Qc, Qg = Q["c"], Q["g"]
    work = (at_m(Qc) - at_s(Qc)) + (at_e(Qg) - at_m(Qg)) + k * np.where(n > 0, col["ovh_gpu"], col["ovh"])
    work += col["head_s"]
    # paging (costmodel.device_paging): with several windows and another device to hand its activations to,
    # a device prefetches; the head alone never does, and the DP never lets it run k > 1
    prefetching = prefetch and k >= 2
    overflow = (_overflow_bytes(ra.nbytes, dev, s3, e3, np.where(pages, e3, m), k, W, col["head_b"], room,
                                col["kernel_lru"]) if prefetching else np.zeros_like(mapped))  # fmt: skip
    reread = paging_fraction(mapped, room, prefetching, overflow, col["kernel_lru"], col["bps"]) * mapped
    hidden = np.minimum(reread, mapped) if prefetching else np.zeros_like(reread)
    if stream and k == 1:
        # drop-behind streaming (costmodel.choose_streaming, device_paging) where it reads less than the page cache
        # would; a worker reads its first streamed layer while it waits for its input (the head, last here: not)
        flat_b, row = ra.nbytes.ravel(), dev * ra.nbytes.shape[1]
        fit = fit_limit(room, col["kernel_lru"])
        t = streamed_count_prefix(flat_b, row, s3, m, mapped, fit, stream_in_flight_bytes(costs[0].model))
        streamed = np.take(flat_b, row + m) - np.take(flat_b, row + m - t)
        first = np.take(flat_b, row + np.minimum(m - t + 1, m)) - np.take(flat_b, row + m - t)
        use = col["can_stream"] & (t > 0) & (streamed < reread)
        hides = use & (dev != M - 1)
        reread = np.where(use, streamed, reread)
        hidden = np.where(hides, first, hidden)
        # a streamed layer's read overlaps only its own layers' compute (those after a hidden first one)
        cpu_flat = Qc.ravel()
        crow = dev * Qc.shape[1]
        overlap = np.take(cpu_flat, crow + m) - np.take(cpu_flat, crow + m - t + hides.astype(int))
        stream_stall = np.where(use, np.maximum(0.0, (streamed - hidden) / col["bps"] - overlap), 0.0)
        faulted = np.where(use, 0.0, reread - hidden)
    else:
        stream_stall, faulted = np.zeros_like(reread), reread - hidden
    # one disk serves the advice and the faults (costmodel.step_breakdown)
    load = np.where(hidden > 0, (reread + col["emb"]) / col["bps"], 0.0)
    chain = work + np.maximum(0.0, (faulted + col["emb"]) / col["bps"] - work) + stream_stall
    full_chain = np.full((M, C, W + 1, W + 1), INF)
    full_chain[:, :, si, ei] = np.where(ok, chain, INF)
    full_load = np.zeros((M, C, W + 1, W + 1))
    full_load[:, :, si, ei] = np.where(ok, load, 0.0)
    full_n = np.zeros((M, C, W + 1, W + 1), dtype=int)
    full_n[:, :, si, ei] = n
    return KTables(ra.names, full_n, full_chain, full_load)


def _overflow_bytes(lb: np.ndarray, dev: np.ndarray, s: np.ndarray, e: np.ndarray, m: np.ndarray, k: int, W: int,
                    head_b: np.ndarray, room: np.ndarray, kernel_lru: np.ndarray) -> np.ndarray:  # fmt: skip
    """Bytes every device re-reads per token because some of its k windows (layers [s, m) of each round, the
    head's last one with the output head) exceed its room (:func:`overflow_reread_bytes`, as
    :func:`prima_sim.halda.costmodel.device_paging`)."""
    shape = np.broadcast(dev, s, e, m).shape
    offs = (np.arange(k) * W).reshape((k,) + (1,) * len(shape))
    row = dev * lb.shape[1]
    flat = lb.ravel()
    per_round = np.take(flat, (row + offs + m).ravel()).reshape((k, *shape))
    per_round -= np.take(flat, np.broadcast_to(row + offs + s, (k, *shape)).ravel()).reshape((k, *shape))
    per_round[-1] += np.where(e == W, head_b, 0.0)
    out: np.ndarray = overflow_reread_bytes(per_round, room, kernel_lru).sum(axis=0)
    return out


def _gpu_candidates(
    costs: DeviceCosts,
    Qb: np.ndarray,
    Qkv: np.ndarray,
    s: np.ndarray,
    e: np.ndarray,
    k: int,
    buf_cpu: float,
    buf_gpu: float,
    head_b: float,
    prefetch: bool,
) -> list[np.ndarray]:
    """GPU layer counts worth trying for every window [s, e) (1-D arrays of window starts and ends), where a
    device's regime can change.

    * Metal (GPU layers stay mapped pages): the GPU changes only compute, so all of the window on the
      faster unit (both counts when layers differ).
    * Other unified memory (GPU layers are copies in RAM): none, or the most the pinned RAM holds (both
      change compute and reads linearly, but prefetch can favour a count between: approximate).
    * A discrete GPU: a GPU layer frees RAM, so it only shortens the device's reads and makes its windows
      easier to prefetch (and a prefetchable device never costs more: its reads leave the chain for the
      load bound, which they were part of). If no layer is slower on the GPU, more GPU layers are never
      worse: none (a GPU call has a fixed copy cost) or the most VRAM holds. Otherwise also the fewest with
      which its RAM share fits and the fewest with which every window fits its room (prefetch): between
      these counts its regime is constant and each GPU layer only costs, so these are the best of each.
    """
    mem = costs.memory
    w = e - s
    zero = np.zeros_like(w)
    if mem.gpu_layers_page:
        return [w] if costs.gpu_never_slower else [zero] if costs.gpu_never_faster else [zero, w]
    Qbk = Qb + Qkv
    if mem.gpu_memory_is_ram:
        # GPU layers are copies in RAM: each one moves its weights from the page cache to pinned memory, so it
        # shortens the reads of a device that pages; none, or the most the pinned RAM holds (approximate)
        # pinned(n) = KV of the window + buffers + the GPU layers' weights <= pinned budget
        cap = mem.pinned_budget_bytes - buf_cpu - buf_gpu - (Qkv[e] - Qkv[s])
        return [zero, e - np.searchsorted(Qb, Qb[e] - cap, side="left")]
    n_max = e - np.searchsorted(Qbk, Qbk[e] - (mem.vram_bytes - buf_gpu), side="left")
    if costs.gpu_never_slower:
        return [zero, n_max]
    cap = mem.ram_budget_bytes - buf_cpu - head_b
    n_fit = e - (np.searchsorted(Qbk, Qbk[s] + cap, side="right") - 1)
    out = [zero, n_max, n_fit]
    if prefetch:
        out.append(_fewest_for_prefetch(costs, s, e, k, buf_cpu, head_b, len(Qb) - 1))
    return out


def gpu_counts_approximate(costs: DeviceCosts) -> bool:
    """Whether :func:`_gpu_candidates` may miss a device's best GPU layer count (its layers are not all faster,
    or all slower, on its GPU; or its GPU layers are copies in RAM): small window totals then search every
    count, and the planner polishes the plan by local search."""
    mem = costs.memory
    if not mem.has_gpu:
        return False
    if mem.gpu_layers_page:  # Metal: the count only moves compute between units
        return not (costs.gpu_never_slower or costs.gpu_never_faster)
    # a discrete GPU whose layers are never slower: none or the most (exact); otherwise the prefetch cascade
    # between regimes makes the cost non-linear in n, and unified copies trade compute against reads
    return mem.gpu_memory_is_ram or not costs.gpu_never_slower


def _fewest_for_prefetch(costs: DeviceCosts, s: np.ndarray, e: np.ndarray, k: int, buf_cpu: float,
                         head_b: float, W: int) -> np.ndarray:  # fmt: skip
    """Per window [s, e) of a discrete-GPU device: the fewest GPU layers with which every one of its k windows
    fits the page cache left for it well enough to be prefetched with one read per byte (``prefetch_start`` of
    it; bisection: both sides only improve as layers move to the GPU)."""
    mem = costs.memory
    w = e - s
    lb, lkv = costs.layer_bytes_prefix, costs.layer_kv_prefix
    Qkv = _sum_rounds(lkv, k, W)
    offs = (np.arange(k) * W)[:, None]
    head_last = np.where(e == W, head_b, 0.0)

    def fits(n: np.ndarray) -> np.ndarray:
        m = e - n
        pinned = Qkv[m] - Qkv[s] + buf_cpu
        base = mem.ram_budget_bytes - mem.swap_out_first_bytes - pinned
        room = np.maximum(base, 0.0) + np.clip(mem.swap_out_first_bytes + np.minimum(base, 0.0), 0.0, None)
        per_round = lb[offs + m] - lb[offs + s]
        per_round[-1] += head_last
        ok: np.ndarray = per_round.max(axis=0) <= prefetch_start(mem.kernel_lru) * room
        return ok

    lo, hi = np.zeros_like(w), w + 1
    while (lo < hi).any():
        mid = (lo + hi) // 2
        ok = fits(np.minimum(mid, w))
        hi = np.where((lo < hi) & ok, mid, hi)
        lo = np.where((lo < hi) & ~ok, mid + 1, lo)
    out: np.ndarray = np.minimum(lo, w)
    return out


def _dp(tables: KTables, hops: np.ndarray, k: int, W: int, threshold: float, allow_drop: bool
        ) -> tuple[float, list[tuple[int, int, int, int]] | None]:  # fmt: skip
    """Minimum chain over plans whose every device's load is at most ``threshold``.

    ``tables`` are in execution order (the head last); ``hops[p, q]`` is the hop time from position p to q.
    Returns (chain seconds, [(position, s, e, candidate index) of every kept device in order]) or (inf, None).
    """
    M = len(tables.names)
    head = M - 1
    best = tables.best(threshold)
    F = np.full((M, W + 1), INF)  # F[q, e]: cheapest prefix whose last kept device is q, covering [0, e)
    prev = np.full((M, W + 1), -1, dtype=int)  # previous kept device (-1: q is the first)
    start = np.zeros((M, W + 1), dtype=int)  # where q's window starts
    cols = np.arange(W + 1)
    for q in range(M):
        f = best[q]
        # q first: its window starts at 0 and the head hops to it. The head alone only with k = 1: alone it
        # sends nothing, so it cannot prefetch, and more rounds only add calls and buffers.
        if (q == 0 or allow_drop) and (q != head or k == 1):
            F[q] = f[0] + (k * hops[head, q] if q != head else 0.0)
        preds = np.arange(q) if allow_drop else (np.array([q - 1]) if q else np.zeros(0, dtype=int))
        if len(preds) == 0:
            continue
        # cand[p, s, e] = F[p, s] + hop(p -> q) + f[s, e], minimized over (p, s) at once
        cand = (F[preds][:, :, None] + (k * hops[preds, q])[:, None, None] + f[None]).reshape(-1, W + 1)
        arg = cand.argmin(axis=0)
        val = cand[arg, cols]
        better = val < F[q]
        if better.any():
            F[q] = np.where(better, val, F[q])
            prev[q] = np.where(better, preds[arg // (W + 1)], prev[q])
            start[q] = np.where(better, arg % (W + 1), start[q])
    value = float(F[head, W])
    if not math.isfinite(value):
        return INF, None
    picks: list[tuple[int, int, int, int]] = []
    q, e = head, W
    while q >= 0:
        s = int(start[q, e])
        picks.append((q, s, e, tables.pick(threshold, q, s, e)))
        q, e = int(prev[q, e]), s
    picks.reverse()
    return value, picks


@dataclass
class _KState:
    """One k's tables, hops and unconstrained optimum, kept between the two passes of :func:`search`."""

    k: int
    tables: KTables
    hops: np.ndarray
    chain: float
    picks: list[tuple[int, int, int, int]]
    dps: int = 1

    def max_load(self, picks: list[tuple[int, int, int, int]]) -> float:
        return max((float(self.tables.load[p, c, s, e]) for p, s, e, c in picks), default=0.0)


def _first_pass(hops: np.ndarray, ra: RingArrays, k: int, prefetch: bool, allow_drop: bool,
                stream: bool = True) -> _KState | None:  # fmt: skip
    """Tables of k and the best chain ignoring prefetched loads (a lower bound of k's objective)."""
    W = (ra.cpu.shape[1] - 1) // k
    if W < 1 or (len(ra.names) > W and not allow_drop) or (W == 1 and k > 1):
        return None
    tables = k_tables(ra, k, prefetch, stream)
    chain, picks = _dp(tables, hops, k, W, INF, allow_drop)
    return None if picks is None else _KState(k, tables, hops, chain, picks)


Picks = list[tuple[int, int, int, int]]
"""The kept devices of a plan found by :func:`_dp`: (position, window start, window end, candidate)."""


def _second_pass(st: _KState, W: int, allow_drop: bool, incumbent: float) -> tuple[float, float, Picks]:
    """(objective, chain, picks) of k: the smallest load threshold T whose best chain is at most T, found by
    bisection over the devices' load values below ``incumbent``."""
    best_obj = max(st.chain, st.max_load(st.picks))
    best = (best_obj, st.chain, st.picks)
    if st.max_load(st.picks) <= st.chain:
        return best
    cand = np.unique(np.concatenate([st.tables.loads(), np.zeros(1)]))
    cand = cand[cand < min(best_obj, incumbent)]
    if incumbent < best_obj and len(cand):  # one DP says whether k can beat the incumbent at all
        chain_T, pk = _dp(st.tables, st.hops, st.k, W, float(cand[-1]), allow_drop)
        st.dps += 1
        if pk is None or chain_T >= incumbent:
            return best
    lo, hi = 0, len(cand) - 1
    while lo <= hi:
        mid = (lo + hi) // 2
        T = float(cand[mid])
        chain_T, pk = _dp(st.tables, st.hops, st.k, W, T, allow_drop)
        st.dps += 1
        if pk is not None:
            obj = max(chain_T, st.max_load(pk))
            if obj < best[0]:
                best = (obj, chain_T, pk)
        if pk is not None and chain_T <= T:
            hi = mid - 1
        else:
            lo = mid + 1
    return best


def _result(st: _KState, ring: list[str], obj: float, chain: float, picks: Picks) -> KResult:
    order = [*ring[1:], ring[0]]
    kept = {p: (s, e, c) for p, s, e, c in picks}
    names = [ring[0]] + [name for p, name in enumerate(order[:-1]) if p in kept]
    dropped = [name for p, name in enumerate(order[:-1]) if p not in kept]
    ws, ns = [], []
    for name in names:
        p = order.index(name)
        s, e, c = kept[p]
        ws.append(e - s)
        ns.append(int(st.tables.n[p, c, s, e]))
    return KResult(st.k, names, tuple(ws), tuple(ns), obj, chain, st.max_load(picks), dropped, st.dps)


def search(cluster: Cluster, ring: list[str], model: ModelProfile, workload: Workload, ks: Sequence[int],
           prefetch: bool = True, allow_drop: bool = True, costs: dict[str, DeviceCosts] | None = None,
           stream: bool = True) -> tuple[KResult | None, list[KResult]]:  # fmt: skip
    """The best plan over every k in ``ks`` (and, with ``allow_drop``, every subset of devices that keeps
    the head), and the best plan found for each k.

    Two passes: every k's best chain ignoring prefetched loads (a lower bound of its objective), then, from
    the lowest bound up, the load-threshold bisection of the k values whose bound can still beat the best
    objective found so far. A k cut off by its bound reports its unconstrained plan's objective.
    """
    if costs is None:
        costs = {}
    for name in ring:
        if name not in costs:
            costs[name] = DeviceCosts(cluster.device(name), model, workload)
    L = model.arch.n_layer
    order = [*ring[1:], ring[0]]  # execution order: the head runs the last window of each round
    hops = np.array([[hop_time(cluster, a, b, model.arch.n_embd) for b in order] for a in order])
    ra = RingArrays.of([costs[name] for name in order], order)
    states = [st for k in ks if (st := _first_pass(hops, ra, k, prefetch, allow_drop, stream))]
    best: KResult | None = None
    per_k: list[KResult] = []
    for st in sorted(states, key=lambda x: x.chain):
        incumbent = best.objective_s if best is not None else INF
        if st.chain >= incumbent:
            obj = max(st.chain, st.max_load(st.picks))
            per_k.append(_result(st, ring, obj, st.chain, st.picks))
            continue
        obj, chain, picks = _second_pass(st, L // st.k, allow_drop, incumbent)
        res = _result(st, ring, obj, chain, picks)
        per_k.append(res)
        if best is None or res.objective_s < best.objective_s - 1e-12:
            best = res
    per_k.sort(key=lambda r: r.k)
    return best, per_k
