"""Settings of one simulation run and the deterministic random streams of its components.

A :class:`SimConfig` holds only what the simulator adds to the plan, the cluster, the model and the workload:
whether devices prefetch, whether the page cache starts warm, how finely weights are cut into page-cache
chunks, multiplicative jitter and the seed. Everything physical comes from the device profiles through the
cost model (:mod:`prima_sim.halda.costmodel`).
"""

from __future__ import annotations

import zlib
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from prima_sim.units import MiB

DEFAULT_CHUNK_BYTES = 32 * MiB
"""Largest page-cache unit of layer weights. A layer's tensors are contiguous in the GGUF file, so a layer is
one byte range cut into equal chunks of at most this size (a 70B Q4_K_M layer of 519 MiB -> 17 chunks). At
32 MiB a chunk is under 1% of any cache the planner deals with (GiBs), so residency is exact to one chunk per
window boundary, while a 70B token touches ~1,400 chunks instead of 130,000 4-KiB pages."""
PAGE_BYTES = 4096
"""The kernel's page size: small reads (an embedding row) are rounded out to whole pages."""
DEFAULT_WILLNEED_CAP_BYTES = 1280 * 1024
"""What one ``WILLNEED`` advice reads at most on current Linux (``force_page_cache_ra`` in mm/readahead.c caps
it at max(the device's ``max_sectors_kb``, the file's readahead window)): 1280 KiB, the ``max_sectors_kb`` of
the loop devices and of many SATA/NVMe disks on kernel 6.x (the file's window is 2 x ``read_ahead_kb`` =
256 KiB after llama.cpp's ``POSIX_FADV_SEQUENTIAL``). Used to predict prima.cpp, which advises each sub-graph's
weights with one ``posix_madvise`` per contiguous range."""


@dataclass(frozen=True)
class SimConfig:
    """How to simulate (everything else comes from the plan, the profiles and the workload).

    Attributes:
        prefetch: after sending its activations a device advises the kernel to load its next window
            (prima.cpp's ``--prefetch``); False = pages come in only by demand faults.
        prefetch_own_window: also advise a device's only window after it has run it (prima.cpp does; this
            project's executor does not, see ``prima_sim.route.Route.prefetch_window``): True predicts
            prima.cpp itself, with its k = 1 prefetch-release conflict.
        willneed_cap_bytes: 0: an advice reads its whole range (this project's executor advises a window in
            pieces the kernel does not cap); > 0: one advice reads at most this many bytes from the start of
            each contiguous range it covers (a window; the head's output head), as Linux does for prima.cpp's
            single ``posix_madvise`` per range (:data:`DEFAULT_WILLNEED_CAP_BYTES`).
        force_touch: prima.cpp's ``--force``: right after the advice the device's own thread reads one byte of
            every page of the advised window, so it faults the window in synchronously (at the fault rate, with
            readahead) before it can take its next input.
        warm: the page cache starts as llama.cpp's mmap load leaves it (every device's weights read in load
            order through its LRU cache, so the last-loaded bytes that fit stay resident); False = cold (all
            weights on disk).
        chunk_bytes: largest page-cache unit of a layer (see :data:`DEFAULT_CHUNK_BYTES`).
        jitter: standard deviation of multiplicative log-normal noise on compute times and link latencies
            (0 = deterministic physics; the mean factor is 1).
        seed: root seed of every random stream.
        readahead: Linux/Android page faults also queue an asynchronous read of the next chunk (the
            kernel's sequential readahead); macOS and Windows never do.
        record_spans: keep every span (needed for the per-token CSV's per-device columns, the trace and the
            Gantt chart); sweeps turn it off and use only the steps' latencies.
        page_cache: ``"linux"``: on Linux and Android devices that do not prefetch, the part of a paging
            share that Linux's two-list LRU keeps resident for good after the first token (its frozen active
            list, :func:`prima_sim.devices.behaviour.frozen_active_bytes`) is protected and the rest cycles
            through an LRU; ``"lru"``: a plain LRU everywhere.
        concurrency: sequences generated together (``prima-sim serve --parallel``, continuous batching): their
            prompts are prefilled together and every decode step is one pass of one row per sequence, each row
            attending to every sequence's cache (one unified KV cache). At 1 (the default) a step is one
            sequence's token, as always; above 1 every window is charged the cost model's pass of rows
            (:func:`prima_sim.halda.costmodel.pass_breakdown`: one row's roofline plus each further row's
            arithmetic), the output head one row of logits per sequence, the head one sampling per sequence.
        draft_max: speculative decoding (``prima-sim serve --draft``; 0 = none; needs ``simulate(..., draft=)``):
            before each decode pass the head runs the draft model ``draft_max`` times, then the ring verifies the
            ``draft_max + 1`` rows in one pass (a pass of rows, as with ``concurrency``, with a row of logits each)
            and the pass yields the drafts accepted before the first rejection plus the ring's own token.
        accept: the draft's acceptance rate per token (0..1): each pass's acceptances are drawn from the
            ``"speculation"`` stream, so runs of the same seed accept the same tokens.
        stream: devices stream the layers the plan says (``DeviceAssignment.streamed_layers``: drop-behind, this
            project's executor); False: every window is left to the page cache (prima.cpp, stock llama.cpp).
    """

    prefetch: bool = True
    prefetch_own_window: bool = False
    willneed_cap_bytes: int = 0
    force_touch: bool = False
    warm: bool = True
    chunk_bytes: int = DEFAULT_CHUNK_BYTES
    jitter: float = 0.0
    seed: int = 0
    readahead: bool = True
    record_spans: bool = True
    page_cache: str = "linux"
    concurrency: int = 1
    draft_max: int = 0
    accept: float = 1.0
    stream: bool = True

    def __post_init__(self) -> None:
        if self.concurrency < 1:
            raise ValueError(f'"concurrency" must be >= 1, got {self.concurrency}')
        if self.draft_max < 0:
            raise ValueError(f'"draft_max" must be >= 0, got {self.draft_max}')
        if not 0.0 <= self.accept <= 1.0:
            raise ValueError(f'"accept" must be in [0, 1], got {self.accept}')
        if self.draft_max and self.concurrency > 1:
            raise ValueError(
                '"draft_max" (speculative decoding) works with one sequence: set "concurrency" to 1'
            )
        if self.chunk_bytes < PAGE_BYTES:
            raise ValueError(f'"chunk_bytes" must be >= {PAGE_BYTES}, got {self.chunk_bytes}')
        if not 0.0 <= self.jitter <= 1.0:
            raise ValueError(f'"jitter" must be in [0, 1], got {self.jitter}')
        if self.willneed_cap_bytes < 0:
            raise ValueError(f'"willneed_cap_bytes" must be >= 0, got {self.willneed_cap_bytes}')
        if self.seed < 0:
            raise ValueError(f'"seed" must be >= 0, got {self.seed}')
        if self.page_cache not in ("linux", "lru"):
            raise ValueError(f'"page_cache" must be "linux" or "lru", got {self.page_cache!r}')

    def to_dict(self) -> dict[str, Any]:
        """Plain dictionary (for summaries; ``concurrency`` only above 1 and the speculation settings only with a
        draft, so summaries of one plain sequence read as before they existed)."""
        out = asdict(self)
        if self.concurrency == 1:
            del out["concurrency"]
        if self.draft_max == 0:
            del out["draft_max"], out["accept"]
        if self.stream:
            del out["stream"]
        return out


def component_rng(seed: int, component: str) -> np.random.Generator:
    """The random stream of one named component (``"D1/cpu"``, ``"link D1->D2"``, ``"D1/sampler"``).

    Every stream is a child of the root ``SeedSequence(seed)`` whose spawn key is the CRC-32 of the
    component's name, so a component's stream depends only on the seed and its own name: adding a device or
    a link never shifts the draws of the others.
    """
    key = zlib.crc32(component.encode("utf-8"))
    return np.random.Generator(np.random.PCG64(np.random.SeedSequence(seed, spawn_key=(key,))))


class Jitter:
    """Multiplicative noise of one component: log-normal factors with mean 1 (none when ``sigma`` is 0)."""

    __slots__ = ("_rng", "sigma")

    def __init__(self, sigma: float, rng: np.random.Generator) -> None:
        if sigma < 0:
            raise ValueError(f'"sigma" must be >= 0, got {sigma}')
        self.sigma = sigma
        self._rng = rng

    def factor(self) -> float:
        """One factor (exactly 1.0 without jitter, so deterministic runs never touch the stream)."""
        if self.sigma == 0.0:
            return 1.0
        s = self.sigma
        return float(np.exp(s * self._rng.standard_normal() - 0.5 * s * s))
