"""prima-sim: plan, simulate and really run LLM inference across the heterogeneous devices of a home.

Layers (lower never imports higher): :mod:`prima_sim.devices` (profiles of devices and models) <-
:mod:`prima_sim.halda` (the layer-to-device planner) <- :mod:`prima_sim.sim` (the SimPy simulator).
:mod:`prima_sim.exec` runs plans for real with llama.cpp and ZeroMQ; it reads plans and profiles, and nothing
in the planner or the simulator imports it. :class:`prima_sim.plan.Plan` is the contract between them.
"""

__version__ = "0.1.0"
