"""Error types of prima-sim.

Every error a user can cause (a bad file, an impossible request, a worker that died) is a subclass of
:class:`PrimaSimError`. The command line turns these into one line on stderr and a non-zero exit status;
anything else is a bug and keeps its traceback.
"""

from __future__ import annotations


class PrimaSimError(Exception):
    """Base class of every error prima-sim reports to its user without a traceback."""

    exit_code = 2


def one_line(text: str) -> str:
    """``text`` with control characters escaped (a key or value read from a file may hold a newline; an error
    message stays one line)."""
    return text if text.isprintable() else "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


class InputError(PrimaSimError):
    """A file or argument is malformed or inconsistent.

    Args:
        source: the file (or "--flag") the bad value came from.
        field: dotted path of the offending field, or "" when the whole input is bad.
        problem: what is wrong and what is expected instead.
    """

    def __init__(self, source: str, field: str, problem: str) -> None:
        self.source = str(source)
        self.field = field
        self.problem = problem
        where = f"{self.source}: field '{field}'" if field else self.source
        super().__init__(one_line(f"{where}: {problem}"))


class InfeasiblePlanError(PrimaSimError):
    """No layer assignment satisfies the request.

    Args:
        message: what was asked and why it cannot be done.
        resource: the binding resource (e.g. "RAM+VRAM of all devices", "VRAM of D2").
        shortfall_bytes: how many bytes are missing, when the cause is memory.
    """

    def __init__(self, message: str, resource: str = "", shortfall_bytes: int | None = None) -> None:
        self.resource = resource
        self.shortfall_bytes = shortfall_bytes
        super().__init__(message)


class MissingDependencyError(PrimaSimError):
    """An optional dependency (llama-cpp-python, a kernel feature) is not available."""


class WorkerError(PrimaSimError):
    """A worker of a real run failed, died or stopped answering."""

    exit_code = 3


class EmulationError(PrimaSimError):
    """The one-host emulation could not set up or tear down its cgroups and namespaces."""
