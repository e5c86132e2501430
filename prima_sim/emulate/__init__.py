"""One-host emulation of a home cluster: cgroups (memory with page cache, CPU, disk), network namespaces
(shaped links, user-space latency), profiles measured inside the limits, and real runs of every plan.

Entry point: :func:`prima_sim.emulate.emulator.emulate` (``prima-sim emulate``). See docs/emulation.md.
"""
