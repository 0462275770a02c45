"""The job's cgroup on cgroup v1: one per hierarchy (memory, freezer, pids), writable by root.

Each is created below the cgroup safegate itself is in on that hierarchy, named after the safegate that made it.
Only the job enters it (the child writes itself into cgroup.procs before exec); nothing else is ever moved or
written to. Removed when the job ends; an empty one whose safegate is gone (SIGKILLed) is swept by the next run.
"""

from __future__ import annotations

import contextlib
import os

from safegate.cgroups.base import (
    PREFIX,
    ROOT,
    JobCgroup,
    cgroup_of,
    job_name,
    keyed,
    owner_gone,
    read,
    rmdir,
    to_int,
    write,
)
from safegate.errors import CgroupError

CONTROLLERS = ("memory", "freezer", "pids")
KILL_ROUNDS = 200  # freeze, kill every member, thaw: until none is left


def own_path(controller: str, proc_cgroup: str = "/proc/self/cgroup") -> str | None:
    """This process's cgroup on the v1 hierarchy of *controller*, e.g. /process_api/abc, or None."""
    for line in read(proc_cgroup).splitlines():
        _, names, path = line.split(":", 2)
        if controller in names.split(","):
            return path
    return None


def available(root: str = ROOT) -> str | None:
    """None when a v1 job cgroup can be made here, else why not (one line, for the fallback message)."""
    for controller in CONTROLLERS:
        own = own_path(controller)
        if own is None:
            return f"no cgroup v1 {controller} hierarchy"
        base = f"{root}/{controller}{own.rstrip('/')}"
        if not os.path.isdir(base):
            return f"{base} is not mounted here"
        if not os.access(base, os.W_OK):
            return f"{base} is not writable by this user"
    return None


class V1Cgroup(JobCgroup):
    """The job's cgroup on each v1 hierarchy: paths safegate created, and only those."""

    def __init__(self, paths: dict[str, str], root: str = ROOT) -> None:
        self.paths = paths
        self.root = root

    @classmethod
    def create(cls, root: str = ROOT) -> V1Cgroup:
        reason = available(root)
        if reason is not None:
            raise CgroupError(f"no cgroup for the job: {reason}")
        sweep(root)
        name = job_name()
        made: dict[str, str] = {}
        try:
            for controller in CONTROLLERS:
                own = own_path(controller) or "/"
                path = f"{root}/{controller}{own.rstrip('/')}/{name}"
                os.mkdir(path, 0o755)
                made[controller] = path
        except OSError as exc:
            V1Cgroup(made).remove()
            raise CgroupError(f"cannot create the job's cgroup: {exc.strerror} ({exc.filename})") from None
        return cls(made, root)

    @property
    def path(self) -> str:
        return self.paths["memory"]

    @property
    def version(self) -> int:
        return 1

    def _file(self, controller: str, name: str) -> str:
        return f"{self.paths[controller]}/{name}"

    def enter(self) -> None:
        """In the job, between fork and exec: move itself (and so all it will start) into every hierarchy."""
        for controller in self.paths:
            write(self._file(controller, "cgroup.procs"), "0")

    def limit_memory(self, limit: int, *, strict: bool = True) -> None:
        """The kernel's cap: past it, the job reclaims its own pages, then its biggest process is OOM-killed.
        Not *strict*: a cap the kernel refuses (EBUSY: below what it could reclaim at once) is left as it was."""
        try:
            write(self._file("memory", "memory.limit_in_bytes"), str(limit))
        except OSError as exc:
            if strict:
                raise CgroupError(f"cannot set the job's memory limit: {exc.strerror}") from None

    def usage(self) -> int:
        return to_int(read(self._file("memory", "memory.usage_in_bytes")))

    def procs(self) -> set[int]:
        return {int(p) for p in read(self._file("memory", "cgroup.procs")).split()}

    def where(self, pid: int) -> str | None:
        return cgroup_of(pid, "memory")

    @property
    def proc_path(self) -> str:
        return self.paths["memory"].removeprefix(f"{self.root}/memory")

    def working_set(self) -> int:
        """Usage minus inactive file pages, as kubelet counts it: what the job cannot give back at once."""
        return max(0, self.usage() - keyed(read(self._file("memory", "memory.stat")), "total_inactive_file"))

    def peak(self) -> int:
        return to_int(read(self._file("memory", "memory.max_usage_in_bytes")))

    def oom_kills(self) -> int:
        return keyed(read(self._file("memory", "memory.oom_control")), "oom_kill")

    def freeze(self, frozen: bool) -> None:
        with contextlib.suppress(OSError):
            write(self._file("freezer", "freezer.state"), "FROZEN" if frozen else "THAWED")

    def frozen(self) -> bool:
        return read(self._file("freezer", "freezer.state")).strip() == "FROZEN"

    def kill(self) -> None:
        # Repeated until the cgroup is empty of live ones.
        for _ in range(KILL_ROUNDS):
            if not self.kill_frozen():
                return

    def remove(self) -> None:
        """Remove what was made (each only once empty: the kernel refuses otherwise)."""
        for path in self.paths.values():
            rmdir(path)


def sweep(root: str = ROOT) -> list[str]:
    """Remove empty safegate-made cgroups beside ours whose safegate is gone (it was SIGKILLed)."""
    removed = []
    for controller in CONTROLLERS:
        own = own_path(controller)
        if own is None:
            continue
        base = f"{root}/{controller}{own.rstrip('/')}"
        try:
            names = [n for n in os.listdir(base) if n.startswith(PREFIX)]
        except OSError:
            continue
        removed += [f"{base}/{n}" for n in names if owner_gone(n) and rmdir(f"{base}/{n}")]
    return removed
