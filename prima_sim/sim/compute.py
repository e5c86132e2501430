"""Compute units: a device's CPU and GPU, running layers at the cost model's roofline time.

A layer's time on a unit is exactly :meth:`DeviceCosts.layer_time` (the planner's roofline: matmul FLOPs at
the profiled throughput of each weight type, or streaming weights and KV cache through memory, whichever is
slower, plus the KV copy) for the batch size and the context the layer attends to at that moment. The
simulator adds only what happens *around* the arithmetic: waiting for pages, and optional jitter.
"""

from __future__ import annotations

from typing import Literal

from prima_sim.halda.costmodel import DeviceCosts
from prima_sim.sim.config import Jitter


class ComputeUnit:
    """One CPU or GPU of a device.

    Args:
        device: device name.
        kind: "cpu" or "gpu".
        costs: the cost model of the device for this model and workload.
        jitter: noise on its times (one factor per window it runs).

    Raises:
        ValueError: a GPU unit on a device without a GPU.
    """

    def __init__(self, device: str, kind: Literal["cpu", "gpu"], costs: DeviceCosts, jitter: Jitter) -> None:
        if kind == "gpu" and costs.device.gpu is None:
            raise ValueError(f"device {device} has no GPU")
        self.device = device
        self.kind = kind
        self.on_gpu = kind == "gpu"
        self.costs = costs
        self.jitter = jitter
        self.busy_s = 0.0
        self.layers_run = 0

    def layer_s(self, layer: int, n_tokens: int, n_kv: int, rows: bool = False) -> float:
        """Seconds to run ``layer`` for ``n_tokens`` tokens attending to ``n_kv`` cached tokens; with ``rows``, as
        a pass of rows of several sequences (:func:`prima_sim.halda.costmodel.pass_breakdown`: the first row's
        roofline, then each further row's arithmetic)."""
        if rows and n_tokens > 1:
            one = self.costs.layer_time(layer, self.on_gpu, 1, n_kv).total_s
            return one + (n_tokens - 1) * self.costs.row_s(layer, self.on_gpu, n_kv)
        return self.costs.layer_time(layer, self.on_gpu, n_tokens, n_kv).total_s
