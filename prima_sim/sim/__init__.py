"""The SimPy discrete-event simulator of prima.cpp's piped ring.

One class per physical thing: :class:`~prima_sim.sim.compute.ComputeUnit` (a CPU or GPU running layers at
the cost model's roofline time), :class:`~prima_sim.sim.pagecache.PageCache` (LRU page cache of weight
chunks), :class:`~prima_sim.sim.disk.Disk` (one queue of page faults, readahead and prefetch reads),
:class:`~prima_sim.sim.network.Link` and :class:`~prima_sim.sim.network.Medium` (latency, bandwidth, shared
Wi-Fi airtime) and :class:`~prima_sim.sim.device.SimDevice` (a device's loop: receive, run windows, send,
prefetch the next window; the head also embeds, runs the output head and samples).

Entry point: :func:`simulate` (``prima-sim simulate``). What is modelled and why: ``docs/sim.md``.
"""

from prima_sim.sim.config import DEFAULT_CHUNK_BYTES, SimConfig
from prima_sim.sim.engine import Simulation, Step, simulate, steps_for
from prima_sim.sim.result import SimResult

__all__ = ["DEFAULT_CHUNK_BYTES", "SimConfig", "SimResult", "Simulation", "Step", "simulate", "steps_for"]
