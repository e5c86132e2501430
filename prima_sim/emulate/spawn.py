"""Start a process inside an emulated device: in its cgroup before it runs a single instruction of its own, and
in its network namespace.

The child joins the cgroup (writes its pid to every hierarchy's ``cgroup.procs``) and the namespace
(``setns(CLONE_NEWNET)`` on ``/run/netns/<ns>``) between ``fork`` and ``exec``, so every page the program
touches, the interpreter's included, is charged to the device, and every socket it opens is on the device's
network. ``ip netns exec`` is not used on purpose: it remounts ``/sys``, which hides ``/sys/fs/cgroup`` from
the program, and the profiler must read its own cgroup limits there. The child also asks to be killed if the
emulation process dies (``PR_SET_PDEATHSIG``), and starts a new session so that the emulation can signal its
whole process group.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import subprocess
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import IO, Any

import prima_sim
from prima_sim.errors import EmulationError

CLONE_NEWNET = 0x40000000
_PR_SET_PDEATHSIG = 1

_libc = ctypes.CDLL(None, use_errno=True)


def netns_path(ns: str) -> Path:
    """The bind-mounted namespace file ``ip netns add`` created."""
    for d in (Path("/run/netns"), Path("/var/run/netns")):
        if (d / ns).exists():
            return d / ns
    raise EmulationError(f"network namespace {ns} does not exist (was it removed?)")


def _preexec(procs_files: Sequence[str], ns_file: str | None) -> Any:
    pid_bytes = None

    def run() -> None:  # in the child, between fork and exec: no allocation-heavy work, no logging
        nonlocal pid_bytes
        pid = str(os.getpid()).encode()
        for f in procs_files:
            fd = os.open(f, os.O_WRONLY)
            try:
                os.write(fd, pid)
            finally:
                os.close(fd)
        if ns_file is not None:
            fd = os.open(ns_file, os.O_RDONLY)
            try:
                if _libc.setns(fd, CLONE_NEWNET) != 0:
                    err = ctypes.get_errno()
                    raise OSError(err, f"setns({ns_file}): {os.strerror(err)}")
            finally:
                os.close(fd)
        _libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)

    return run


def spawn(
    cmd: Sequence[str], *, procs_files: Sequence[Path] = (), netns: str | None = None,
    env: Mapping[str, str] | None = None, stdout: IO[Any] | int | None = None, stderr: IO[Any] | int | None = None,
    cwd: str | Path | None = None, stdin: IO[Any] | int | None = subprocess.DEVNULL,
) -> subprocess.Popen[bytes]:  # fmt: skip
    """Start ``cmd`` in the cgroup(s) whose ``cgroup.procs`` files are given and in network namespace ``netns``.

    Raises:
        EmulationError: the process could not be started or could not join its cgroup or namespace.
    """
    ns_file = str(netns_path(netns)) if netns else None
    try:
        return subprocess.Popen(
            list(cmd), env=dict(env) if env is not None else None, stdin=stdin, stdout=stdout,
            stderr=stderr, cwd=cwd, start_new_session=True,
            preexec_fn=_preexec([str(p) for p in procs_files], ns_file),
        )  # fmt: skip
    except (OSError, subprocess.SubprocessError) as exc:
        raise EmulationError(
            f"cannot start {' '.join(cmd[:3])}... in {netns or 'the host namespace'}: {exc}"
        ) from None


def stop(proc: subprocess.Popen[bytes], term_grace_s: float = 3.0) -> None:
    """SIGTERM the process's group, then SIGKILL it after ``term_grace_s``; wait for the process."""
    if proc.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=term_grace_s)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=term_grace_s)


def python_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """This process's environment for a Python child: this checkout of prima_sim first on ``PYTHONPATH``,
    unbuffered output, and ``extra`` on top."""
    env = dict(os.environ)
    root = str(Path(prima_sim.__file__).resolve().parent.parent)
    env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra or {})
    return env


def cli_command(*args: str) -> list[str]:
    """``prima-sim ARGS`` as a command line of this interpreter."""
    return [sys.executable, "-m", "prima_sim.cli.main", *args]


def module_command(module: str, *args: str) -> list[str]:
    """``python -m MODULE ARGS`` with this interpreter."""
    return [sys.executable, "-m", module, *args]


def log_tail(path: Path, n: int = 600) -> str:
    """The last four non-blank lines of a log, joined with `` | `` and cut to ``n`` characters ('' if unreadable)."""
    try:
        text = path.read_text(errors="replace").strip()
    except OSError:
        return ""
    lines = [ln for ln in text.splitlines() if ln.strip()]
    return " | ".join(lines[-4:])[-n:]
