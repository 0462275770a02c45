"""What every job cgroup offers the supervisor, whatever makes it (cgroup v1, v2 below ours, a systemd scope).

The job's side: `wrap` (a scope is entered through systemd-run), `enter` (between fork and exec, the child moves
itself in), `adopt` (in safegate, once the job runs: wait for it to land, check the limits took effect, then let
it go). Then the figures and the acts. Nothing here moves a process other than the job's, or writes to a cgroup
safegate did not create.
"""

from __future__ import annotations

import contextlib
import os
import signal
import time
from collections.abc import Mapping, Sequence

ROOT = "/sys/fs/cgroup"
PREFIX = "safegate-"
PAGE = os.sysconf("SC_PAGE_SIZE")


class JobCgroup:
    """The interface; the v1 and v2 classes implement it (the defaults fit a cgroup the child enters itself)."""

    required = False  # `--cgroup on`: a cgroup that cannot be had is an error, not a fallback
    max_swap: int | None = None  # swap the job may use (cgroup v2); None: as without a cgroup
    throttle: bool = False  # memory.high at the warning level (cgroup v2)

    @property
    def path(self) -> str:
        """The job's cgroup, as the log shows it."""
        raise NotImplementedError

    @property
    def version(self) -> int:
        raise NotImplementedError

    def configure(self, max_mem: int | None) -> None:
        """The limits, before the job starts: the cap (--max-mem), and where supported swap and throttling."""
        if max_mem is not None:
            self.limit_memory(max_mem)

    def wrap(self, argv: Sequence[str], env: Mapping[str, str] | None) -> tuple[list[str], dict[str, str] | None]:
        return list(argv), dict(env) if env is not None else None

    def job_fds(self) -> tuple[int, ...]:
        """The fds the wrapped job inherits (the pipe it waits on until adopted)."""
        return ()

    def enter(self) -> None:
        """In the job, between fork and exec."""

    def adopt(self, pid: int) -> None:
        """In safegate, once the job runs; raises CgroupError when the cgroup is not what was asked for."""

    def release(self, go: bool) -> None:
        """After adopt: let the waiting job run (go), or end it before it starts (not go)."""

    def limit_memory(self, limit: int, *, strict: bool = True) -> None:
        raise NotImplementedError

    def set_high(self, high: int) -> None:
        """Throttle above *high* (cgroup v2's memory.high); v1 has no such level."""

    def usage(self) -> int:
        raise NotImplementedError

    def working_set(self) -> int:
        raise NotImplementedError

    def peak(self) -> int:
        raise NotImplementedError

    def oom_kills(self) -> int:
        raise NotImplementedError

    def pressure(self) -> float | None:
        """The job's own memory pressure (some, avg10, percent): cgroup v2 only."""
        return None

    def procs(self) -> set[int]:
        raise NotImplementedError

    def where(self, pid: int) -> str | None:
        """*pid*'s cgroup on the hierarchy of memory (v1's memory controller, v2's unified one), as
        /proc/PID/cgroup names it; None when it is gone."""
        raise NotImplementedError

    @property
    def proc_path(self) -> str:
        """The job's cgroup (where it is capped, frozen and killed) as where() names it; "" before it is entered."""
        raise NotImplementedError

    def holds(self, pid: int) -> bool | None:
        """Whether *pid* is in the job's cgroup or below it (a root job can move itself out); None when that
        cannot be told (the process is gone, or the cgroup not yet entered)."""
        where, ours = self.where(pid), self.proc_path
        if where is None or not ours:
            return None
        return where == ours or where.startswith(ours.rstrip("/") + "/")

    def freeze(self, frozen: bool) -> None:
        raise NotImplementedError

    def frozen(self) -> bool:
        raise NotImplementedError

    def wait_frozen(self, timeout: float = 1.0) -> bool:
        deadline = time.monotonic() + timeout
        while not self.frozen():
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.001)
        return True

    def kill_frozen(self) -> set[int]:
        """SIGKILL every member while the cgroup is frozen, so none can fork meanwhile; the members it found."""
        self.freeze(True)
        self.wait_frozen()
        members = self.procs()
        for pid in members:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)
        self.freeze(False)
        return members

    def kill(self) -> None:
        """SIGKILL every member, none able to fork meanwhile."""
        raise NotImplementedError

    def remove(self) -> None:
        raise NotImplementedError


def start_time(pid: int) -> str | None:
    try:
        with open(f"/proc/{pid}/stat") as fh:
            raw = fh.read()
    except OSError:
        return None
    return raw.rsplit(")", 1)[1].split()[19]


def cgroup_of(pid: int, controller: str | None) -> str | None:
    """*pid*'s cgroup on the v1 hierarchy of *controller*, or (None) on the unified one; None when it is gone."""
    return cgroup_in(read(f"/proc/{pid}/cgroup"), controller)


def cgroup_in(text: str, controller: str | None) -> str | None:
    """The cgroup on that hierarchy in a /proc/PID/cgroup text ("ID:CONTROLLERS:PATH" lines), or None."""
    for line in text.splitlines():
        number, _, rest = line.partition(":")
        names, colon, path = rest.partition(":")
        if colon and (controller in names.split(",") if controller is not None else number == "0" and not names):
            return path
    return None


def read(path: str) -> str:
    try:
        with open(path) as fh:
            return fh.read()
    except OSError:
        return ""


def write(path: str, value: str) -> None:
    with open(path, "w") as fh:
        fh.write(value)


def to_int(text: str) -> int:
    try:
        return int(text.strip() or 0)
    except ValueError:
        return 0


def keyed(text: str, key: str) -> int:
    """The value of *key* in a "key value" file (memory.stat, memory.events)."""
    for line in text.splitlines():
        name, _, value = line.partition(" ")
        if name == key:
            return to_int(value)
    return 0


def rmdir(path: str) -> bool:
    with contextlib.suppress(OSError):
        os.rmdir(path)  # refused while a process is in it: left for its job to end
        return True
    return False


def job_name() -> str:
    """safegate-<pid>-<start time>, after the safegate that made it: the sweep knows when its owner is gone."""
    return f"{PREFIX}{os.getpid()}-{start_time(os.getpid())}"


def owner_gone(name: str) -> bool:
    pid, start, *_ = (*name.removesuffix(".scope")[len(PREFIX):].split("-"), "")
    return not (pid.isdigit() and start_time(int(pid)) == start)
