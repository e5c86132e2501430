"""Helpers for the test suite: the bundled small models (re-exported from :mod:`prima_sim.devices.bundled`) and
process utilities."""

from __future__ import annotations

from prima_sim.devices.bundled import SMOLLM2_FILE, gemma3_path, smollm2_path

__all__ = ["SMOLLM2_FILE", "gemma3_path", "interruptible", "smollm2_path"]


def interruptible() -> None:
    """``preexec_fn`` for a child a test will stop with SIGINT: restore SIGINT's default action.

    A shell that starts a job in the background without job control (``cmd &``, ``nohup``, some CI runners)
    makes it ignore SIGINT, every descendant inherits that, and Python then installs no KeyboardInterrupt
    handler, so the child would never see the test's Ctrl-C."""
    import signal

    signal.signal(signal.SIGINT, signal.SIG_DFL)
