"""A cgroup of the job's own, so the kernel holds its memory cap, counts every byte and stops every process.

cgroup v1 (memory, freezer and pids hierarchies, writable by root): one cgroup per controller, created below the
cgroup safegate itself is in on that hierarchy, named ``safegate-<pid>-<start time>`` after the safegate that
made it. Only the job enters it (the child writes itself into cgroup.procs before exec); nothing else is ever
moved or written to. Removed when the job ends; an empty one whose safegate is gone (SIGKILLed) is swept by the
next run. cgroup v2 (a delegated subtree, or a systemd scope) is not built yet: `available()` says so.
"""

from __future__ import annotations

import contextlib
import os
import time
from dataclasses import dataclass

from safegate.errors import CgroupError

ROOT = "/sys/fs/cgroup"
CONTROLLERS = ("memory", "freezer", "pids")
PREFIX = "safegate-"


def _own_path(controller: str, proc_cgroup: str = "/proc/self/cgroup") -> str | None:
    """This process's cgroup on the v1 hierarchy of *controller*, e.g. /process_api/abc, or None."""
    try:
        with open(proc_cgroup) as fh:
            lines = fh.read().splitlines()
    except OSError:
        return None
    for line in lines:
        _, names, path = line.split(":", 2)
        if controller in names.split(","):
            return path
    return None


def _start_time(pid: int) -> str | None:
    try:
        with open(f"/proc/{pid}/stat") as fh:
            raw = fh.read()
    except OSError:
        return None
    return raw.rsplit(")", 1)[1].split()[19]


def available(root: str = ROOT) -> str | None:
    """None when a v1 job cgroup can be made here, else why not (one line, for the fallback message)."""
    for controller in CONTROLLERS:
        own = _own_path(controller)
        if own is None:
            return f"no cgroup v1 {controller} hierarchy (cgroup v2 is not supported yet)"
        base = f"{root}/{controller}{own.rstrip('/')}"
        if not os.path.isdir(base):
            return f"{base} is not mounted here"
        if not os.access(base, os.W_OK):
            return f"{base} is not writable by this user"
    return None


@dataclass
class JobCgroup:
    """The job's cgroup on each v1 hierarchy: paths safegate created, and only those."""

    paths: dict[str, str]

    @classmethod
    def create(cls, root: str = ROOT) -> JobCgroup:
        reason = available(root)
        if reason is not None:
            raise CgroupError(f"no cgroup for the job: {reason}")
        sweep(root)
        name = f"{PREFIX}{os.getpid()}-{_start_time(os.getpid())}"
        made: dict[str, str] = {}
        try:
            for controller in CONTROLLERS:
                own = _own_path(controller) or "/"
                path = f"{root}/{controller}{own.rstrip('/')}/{name}"
                os.mkdir(path, 0o755)
                made[controller] = path
        except OSError as exc:
            JobCgroup(made).remove()
            raise CgroupError(f"cannot create the job's cgroup: {exc.strerror} ({exc.filename})") from None
        return cls(made)

    def _file(self, controller: str, name: str) -> str:
        return f"{self.paths[controller]}/{name}"

    def _read(self, controller: str, name: str) -> str:
        try:
            with open(self._file(controller, name)) as fh:
                return fh.read()
        except OSError:
            return ""

    def _write(self, controller: str, name: str, value: str) -> None:
        with open(self._file(controller, name), "w") as fh:
            fh.write(value)

    def enter(self) -> None:
        """In the job, between fork and exec: move itself (and so all it will start) into every hierarchy."""
        for controller in self.paths:
            self._write(controller, "cgroup.procs", "0")

    def limit_memory(self, limit: int, *, strict: bool = True) -> None:
        """The kernel's cap: past it, the job reclaims its own pages, then its biggest process is OOM-killed.
        Not *strict*: a cap the kernel refuses (EBUSY: below what it could reclaim at once) is left as it was."""
        try:
            self._write("memory", "memory.limit_in_bytes", str(limit))
        except OSError as exc:
            if strict:
                raise CgroupError(f"cannot set the job's memory limit: {exc.strerror}") from None

    def usage(self) -> int:
        return _int(self._read("memory", "memory.usage_in_bytes"))

    def procs(self) -> set[int]:
        return {int(p) for p in self._read("memory", "cgroup.procs").split()}

    def working_set(self) -> int:
        """Usage minus inactive file pages, as kubelet counts it: what the job cannot give back at once."""
        return max(0, self.usage() - self._stat("total_inactive_file"))

    def peak(self) -> int:
        return _int(self._read("memory", "memory.max_usage_in_bytes"))

    def oom_kills(self) -> int:
        for line in self._read("memory", "memory.oom_control").splitlines():
            if line.startswith("oom_kill "):
                return _int(line.split()[1])
        return 0

    def _stat(self, key: str) -> int:
        for line in self._read("memory", "memory.stat").splitlines():
            name, _, value = line.partition(" ")
            if name == key:
                return _int(value)
        return 0

    def freeze(self, frozen: bool) -> None:
        with contextlib.suppress(OSError):
            self._write("freezer", "freezer.state", "FROZEN" if frozen else "THAWED")

    def wait_frozen(self, timeout: float = 1.0) -> bool:
        deadline = time.monotonic() + timeout
        while self._read("freezer", "freezer.state").strip() != "FROZEN":
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.001)
        return True

    def remove(self) -> None:
        """Remove what was made (each only once empty: the kernel refuses otherwise)."""
        for path in self.paths.values():
            with contextlib.suppress(OSError):
                os.rmdir(path)


def sweep(root: str = ROOT) -> list[str]:
    """Remove empty safegate-made cgroups beside ours whose safegate is gone (it was SIGKILLed)."""
    removed = []
    for controller in CONTROLLERS:
        own = _own_path(controller)
        if own is None:
            continue
        base = f"{root}/{controller}{own.rstrip('/')}"
        try:
            names = [n for n in os.listdir(base) if n.startswith(PREFIX)]
        except OSError:
            continue
        for name in names:
            pid, _, start = name[len(PREFIX):].partition("-")
            if pid.isdigit() and _start_time(int(pid)) == start:
                continue  # its safegate still runs
            with contextlib.suppress(OSError):
                os.rmdir(f"{base}/{name}")  # fails while a process is in it: left for its job to end
                removed.append(f"{base}/{name}")
    return removed


def _int(text: str) -> int:
    try:
        return int(text.strip() or 0)
    except ValueError:
        return 0
