"""The job's cgroup on cgroup v2 (the unified hierarchy), where safegate may make one directly.

v2 lets a cgroup hand memory to its children only while it holds no process itself, so a child of the cgroup
safegate runs in gets the memory controller only where that cgroup already distributes it (the root cgroup, or
one delegated that way). A systemd service with `Delegate=yes` owns its cgroup's subtree: there safegate first
moves itself (and whatever else runs in the service's own cgroup) into a leaf `supervisor`, then hands memory
down and makes the job's cgroup beside it, inside the service, where the unit's MemoryMax=, accounting and
final SIGKILL reach the job. Elsewhere (a systemd machine) the job gets a scope: safegate.cgroups.scope.
The files: memory.max (the cap), memory.high (throttling), memory.swap.max, memory.current/peak/stat/events,
memory.pressure, cgroup.freeze/events (pausing), cgroup.kill (kernel >= 5.14).
"""

from __future__ import annotations

import contextlib
import errno
import os
import time
from collections.abc import Callable

from safegate.cgroups.base import (
    PAGE,
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

KILL_ROUNDS = 200
MOVE_ROUNDS = 100
SUPERVISOR = "supervisor"  # safegate's own leaf in a delegated cgroup
# The cgroups systemd makes for units; a subgroup named otherwise is one made inside a delegated unit.
UNIT_SUFFIXES = (".service", ".scope", ".slice", ".socket", ".mount", ".swap")


def own_path(proc_cgroup: str = "/proc/self/cgroup") -> str | None:
    """This process's cgroup on the unified hierarchy (the "0::" line), when /sys/fs/cgroup is that hierarchy."""
    if not os.path.exists(f"{ROOT}/cgroup.controllers"):
        return None  # /sys/fs/cgroup is v1 (or hybrid: the v2 mount elsewhere lacks controllers that matter)
    for line in read(proc_cgroup).splitlines():
        if line.startswith("0::"):
            return line[3:]
    return None


def controllers(path: str, name: str = "cgroup.controllers") -> set[str]:
    return set(read(f"{path}/{name}").split())


def direct_base() -> str | None:
    """The cgroup below which safegate can make the job's own one itself, or None."""
    own = own_path()
    if own is None:
        return None
    base = f"{ROOT}{own.rstrip('/')}"
    if "memory" in controllers(base, "cgroup.subtree_control") and os.access(base, os.W_OK):
        return base
    return delegated_base(base)


def delegated(path: str) -> bool:
    """Whether systemd delegated *path* to its unit (Delegate=yes): systemd marks such a cgroup with the xattr
    user.delegate (readable by anyone) and trusted.delegate. Without the mark the cgroup is systemd's to
    manage, even where root could write to it."""
    for name in ("user.delegate", "trusted.delegate"):
        try:
            if os.getxattr(path, name) == b"1":
                return True
        except OSError:
            continue
    return False


def delegated_base(own: str) -> str | None:
    """The delegated cgroup safegate runs in (a unit with Delegate=yes), or in a subgroup of (its `supervisor`
    leaf, or systemd's DelegateSubgroup=), when it can hand the memory controller down; else None.
    Only a subgroup that is no unit of its own counts: a unit below a delegated one (the user's services below
    user@UID.service) belongs to that manager, not to safegate."""
    parent, name = os.path.split(own)
    if delegated(own):
        base = own
    elif ROOT not in (own, parent) and not name.endswith(UNIT_SUFFIXES) and delegated(parent):
        base = parent
    else:
        return None
    if "memory" not in controllers(base) or not os.access(f"{base}/cgroup.subtree_control", os.W_OK):
        return None
    return base


def hand_memory_down(base: str) -> None:
    """Make *base* (a delegated cgroup) hand the memory controller to its children: v2 allows that only while it
    holds no process, so every process in it (safegate, and the service's other processes) first moves into its
    leaf `supervisor`. A no-op when another safegate (or systemd's DelegateSubgroup=) did it before."""
    if "memory" in controllers(base, "cgroup.subtree_control"):
        return
    leaf = f"{base}/{SUPERVISOR}"
    with contextlib.suppress(FileExistsError):
        os.mkdir(leaf, 0o755)
    empty_into(base, lambda pid: leaf, "+memory", "the delegated cgroup")


def empty_into(base: str, where: Callable[[int], str], wanted: str, what: str) -> None:
    """Move every process of *base* into the cgroup where(pid) says, then have *base* hand the *wanted*
    controllers down: v2 allows that only while it holds no process. A process forked into it meanwhile is moved
    too (subtree_control says EBUSY, and the round repeats)."""
    for _ in range(MOVE_ROUNDS):
        for pid in read(f"{base}/cgroup.procs").split():
            try:
                write(f"{where(int(pid))}/cgroup.procs", pid)
            except OSError as exc:
                if exc.errno != errno.ESRCH:
                    raise
        try:
            write(f"{base}/cgroup.subtree_control", wanted)
            return
        except OSError as exc:
            if exc.errno != errno.EBUSY:
                raise
    raise OSError(errno.EBUSY, f"{what} kept gaining processes")


class V2Cgroup(JobCgroup):
    """*account*: where the job's memory is counted (all of it); *control*: the cgroup safegate made for the job,
    where its cap, freezing and killing are written. The same directory when safegate made it directly."""

    def __init__(self, account: str, control: str) -> None:
        self.account = account
        self.control = control

    @classmethod
    def create(cls) -> V2Cgroup:
        base = direct_base()
        if base is None:
            raise CgroupError("no cgroup for the job: safegate's cgroup does not hand the memory controller down")
        sweep(base)
        path = f"{base}/{job_name()}"
        try:
            hand_memory_down(base)
            os.mkdir(path, 0o755)
        except OSError as exc:
            raise CgroupError(f"cannot create the job's cgroup: {exc.strerror} ({path})") from None
        return cls(path, path)

    @property
    def path(self) -> str:
        return self.control

    @property
    def version(self) -> int:
        return 2

    def enter(self) -> None:
        write(f"{self.control}/cgroup.procs", "0")

    def configure(self, max_mem: int | None) -> None:
        self.apply_limits(max_mem)

    def apply_limits(self, max_mem: int | None) -> None:
        """The cap, the warning level when throttling, and the swap limit, on the cgroup safegate made."""
        if max_mem is not None:
            self.limit_memory(max_mem)
            if self.throttle:
                self.set_high(int(max_mem * 0.9))
        if self.max_swap is not None:
            try:
                write(f"{self.control}/memory.swap.max", str(self.max_swap))
            except OSError as exc:
                raise CgroupError(f"cannot limit the job's swap: {exc.strerror} (memory.swap.max)") from None

    def limit_memory(self, limit: int, *, strict: bool = True) -> None:
        try:
            write(f"{self.control}/memory.max", str(limit))
        except OSError as exc:
            if strict:
                raise CgroupError(f"cannot set the job's memory limit: {exc.strerror}") from None

    def set_high(self, high: int) -> None:
        with contextlib.suppress(OSError):
            write(f"{self.control}/memory.high", str(high))

    def limit_in_effect(self) -> int | None:
        text = read(f"{self.control}/memory.max").strip()
        return None if text in ("", "max") else to_int(text)

    def usage(self) -> int:
        return to_int(read(f"{self.account}/memory.current"))

    def working_set(self) -> int:
        """memory.current minus inactive file pages, as kubelet counts it."""
        return max(0, self.usage() - keyed(read(f"{self.account}/memory.stat"), "inactive_file"))

    def peak(self) -> int:
        return to_int(read(f"{self.account}/memory.peak"))  # kernel >= 5.19; else 0 and the sampled peak stands

    def oom_kills(self) -> int:
        return keyed(read(f"{self.account}/memory.events"), "oom_kill")

    def pressure(self) -> float | None:
        line = read(f"{self.account}/memory.pressure").partition("\n")[0]
        for field in line.split()[1:]:
            key, _, value = field.partition("=")
            if key == "avg10":
                with contextlib.suppress(ValueError):
                    return float(value)
        return None

    def procs(self) -> set[int]:
        return {int(p) for p in read(f"{self.control}/cgroup.procs").split()}

    def where(self, pid: int) -> str | None:
        return cgroup_of(pid, None)

    @property
    def proc_path(self) -> str:
        return self.control.removeprefix(ROOT) if self.control else ""

    def freeze(self, frozen: bool) -> None:
        with contextlib.suppress(OSError):
            write(f"{self.control}/cgroup.freeze", "1" if frozen else "0")

    def frozen(self) -> bool:
        return keyed(read(f"{self.control}/cgroup.events"), "frozen") == 1

    def kill(self) -> None:
        for _ in range(KILL_ROUNDS):
            members = self.procs()
            if not members:
                return
            try:
                write(f"{self.control}/cgroup.kill", "1")  # the kernel kills all, forks included
            except OSError:  # before 5.14: the v1 way, frozen so none can fork meanwhile
                self.kill_frozen()
            time.sleep(0.001)

    def remove(self) -> None:
        rmdir(self.control)


def page_rounded(size: int) -> int:
    """What memory.max reads back after *size* was written (the kernel keeps whole pages)."""
    return size // PAGE * PAGE


def sweep(base: str) -> list[str]:
    """Remove empty safegate-made cgroups below *base* whose safegate is gone."""
    try:
        names = [n for n in os.listdir(base) if n.startswith(PREFIX)]
    except OSError:
        return []
    return [f"{base}/{n}" for n in names if owner_gone(n) and rmdir(f"{base}/{n}")]
