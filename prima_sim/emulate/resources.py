"""What an emulation run creates, and how every piece of it is removed on every way out.

Every kernel object of a run is named with a recognizable prefix: network namespaces ``prima-<runid>-<what>``,
cgroups ``<mount>/prima-<runid>/<device>``. A :class:`Registry` records each object with the function that
undoes it; :meth:`Registry.teardown` undoes them in reverse order and is called from ``finally``, from an
``atexit`` hook, and (through SIGTERM/SIGHUP handlers that turn the signal into :class:`SystemExit`) when the
process is told to stop; Ctrl-C raises ``KeyboardInterrupt`` and takes the same path. A run also leaves a
pid file in :data:`STATE_DIR`, so ``prima-sim emulate --cleanup`` can tell the leftovers of a crashed run
(SIGKILL, power loss) from those of a run that is still going, and remove only the former.
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import os
import re
import secrets
import signal
import subprocess
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType

from prima_sim.emulate import cgroups

log = logging.getLogger(__name__)

PREFIX = "prima-"
STATE_DIR = Path(
    os.environ.get("PRIMA_SIM_EMULATE_STATE", "/run/prima-sim" if os.path.isdir("/run") else "/tmp/prima-sim")
)
"""One ``<runid>.pid`` file per live run."""
RUN_ID = re.compile(r"^[0-9a-f]{6}$")


def new_run_id() -> str:
    """A short random run id (6 hex digits): short because interface names have at most 15 characters."""
    return secrets.token_hex(3)


@dataclass
class _Item:
    kind: str
    ident: str
    undo: Callable[[], None]


@dataclass
class Registry:
    """Resources of one run, undone in reverse order of creation.

    Args:
        run_id: the run's id (part of every name).
    """

    run_id: str = field(default_factory=new_run_id)
    items: list[_Item] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)
    _handlers: dict[int, object] = field(default_factory=dict, repr=False)
    _pidfile: Path | None = field(default=None, repr=False)
    _done: bool = False

    @property
    def prefix(self) -> str:
        """``prima-<runid>``: the start of every name of this run."""
        return f"{PREFIX}{self.run_id}"

    def add(self, kind: str, ident: str, undo: Callable[[], None]) -> None:
        """Record a resource that now exists, and how to remove it."""
        with self._lock:
            self.items.append(_Item(kind, ident, undo))

    def describe(self) -> list[str]:
        """``kind ident`` of every live resource, oldest first."""
        return [f"{i.kind} {i.ident}" for i in self.items]

    def teardown(self) -> list[str]:
        """Undo every resource, newest first; never raises. Returns the problems (empty when all went)."""
        problems: list[str] = []
        while True:
            with self._lock:
                if not self.items:
                    break
                item = self.items.pop()
            try:
                item.undo()
            except BaseException as exc:  # teardown must go on whatever one step does
                problems.append(f"{item.kind} {item.ident}: {exc}")
                log.warning("cleanup of %s %s failed: %s", item.kind, item.ident, exc)
        if self._pidfile is not None:
            with contextlib.suppress(OSError):
                self._pidfile.unlink()
            self._pidfile = None
        return problems

    # --- process-level hooks -------------------------------------------------------------------------------------
    def install(self) -> None:
        """Write the run's pid file and make SIGTERM/SIGHUP end the program through ``finally`` blocks
        (an ``atexit`` hook tears down whatever is still registered)."""
        STATE_DIR.mkdir(parents=True, exist_ok=True)
        self._pidfile = STATE_DIR / f"{self.run_id}.pid"
        self._pidfile.write_text(f"{os.getpid()}\n")
        atexit.register(self.teardown)
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGHUP):
                self._handlers[sig] = signal.signal(sig, _raise_exit)

    def uninstall(self) -> None:
        """Restore the signal handlers (after :meth:`teardown`)."""
        with contextlib.suppress(Exception):
            atexit.unregister(self.teardown)
        if threading.current_thread() is threading.main_thread():
            for sig, h in self._handlers.items():
                with contextlib.suppress(Exception):
                    signal.signal(sig, h)  # type: ignore[arg-type]
        self._handlers.clear()

    def __enter__(self) -> Registry:
        self.install()
        return self

    def __exit__(self, *exc: object) -> None:
        # the run's own code already logged the error that brought us here; teardown problems are logged
        self.teardown()
        self.uninstall()


def _raise_exit(signum: int, _frame: FrameType | None) -> None:
    raise SystemExit(128 + signum)


# --- leftovers of crashed runs -----------------------------------------------------------------------------
def live_run_ids() -> set[str]:
    """Ids of runs whose pid file names a process that is still alive."""
    out: set[str] = set()
    if not STATE_DIR.is_dir():
        return out
    for f in STATE_DIR.glob("*.pid"):
        try:
            pid = int(f.read_text().strip())
        except (OSError, ValueError):
            continue
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            continue
        except PermissionError:
            pass
        out.add(f.stem)
    return out


def _run_id_of(name: str) -> str | None:
    if not name.startswith(PREFIX):
        return None
    rid = name[len(PREFIX) :].split("-", 1)[0]
    return rid if RUN_ID.match(rid) else None


def list_netns() -> list[str]:
    """Names of the named network namespaces (``ip netns list``)."""
    try:
        out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.TimeoutExpired):
        return []
    return [ln.split()[0] for ln in out.splitlines() if ln.strip()]


def netns_pids(ns: str) -> list[int]:
    """Processes whose network namespace is ``ns``."""
    try:
        out = subprocess.run(["ip", "netns", "pids", ns], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.TimeoutExpired):
        return []
    return [int(x) for x in out.split() if x.isdigit()]


def kill_netns_pids(ns: str) -> None:
    """SIGKILL every process living in namespace ``ns``."""
    for pid in netns_pids(ns):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signal.SIGKILL)


def delete_netns(ns: str) -> None:
    """Kill the namespace's processes and delete it (its veth ends go with it).

    Raises:
        RuntimeError: ``ip netns del`` failed.
    """
    kill_netns_pids(ns)
    r = subprocess.run(["ip", "netns", "del", ns], capture_output=True, text=True, timeout=30)
    if r.returncode != 0 and ns in list_netns():
        raise RuntimeError(f"ip netns del {ns}: {r.stderr.strip()}")


def find_leftovers(include_live: bool = False) -> dict[str, list[str]]:
    """Leftover cgroups and namespaces of prima-sim emulation runs (those of live runs unless asked)."""
    live = set() if include_live else live_run_ids()
    ns = [n for n in list_netns() if (rid := _run_id_of(n)) and rid not in live]
    cg = [str(p) for p in cgroups.leftover_dirs(PREFIX) if (rid := _run_id_of(p.name)) and rid not in live]
    return {"netns": ns, "cgroups": cg}


def kill_tree(d: Path) -> None:
    for procs in d.rglob("cgroup.procs"):
        with contextlib.suppress(OSError):
            for pid in procs.read_text().split():
                with contextlib.suppress(ProcessLookupError, PermissionError, ValueError):
                    os.kill(int(pid), signal.SIGKILL)
