"""A cgroup of the job's own, so the kernel holds its memory cap, counts every byte and stops every process.

Which one, in this order: cgroup v1 (one per hierarchy below ours: safegate.cgroups.v1); cgroup v2 below ours
where our cgroup hands the memory controller down, or inside the systemd unit that delegated its cgroup to us
(Delegate=yes: safegate.cgroups.v2); a transient systemd scope, system or in the user's instance, delegated and
checked (safegate.cgroups.scope). None of these: the job is watched as its
process tree, and `available()` says why.
"""

from __future__ import annotations

import os

from safegate.cgroups import scope, v1, v2
from safegate.cgroups.base import PREFIX, ROOT, JobCgroup
from safegate.errors import CgroupError

__all__ = ["PREFIX", "ROOT", "JobCgroup", "available", "create", "kind", "sweep"]


def kind() -> tuple[str | None, str | None]:
    """The backend a job would get here ("v1", "v2", "scope", "user-scope"), or None and why not."""
    if v1.own_path("memory") is not None:
        reason = v1.available()
        return ("v1", None) if reason is None else (None, reason)
    if v2.direct_base() is not None:
        return "v2", None
    reason = scope.available()
    if reason is None:
        return ("scope" if os.getuid() == 0 else "user-scope"), None
    return None, reason


def available() -> str | None:
    """None when the job can have a cgroup here, else why not (one line, for the fallback message)."""
    return kind()[1]


def create(*, required: bool = False, max_swap: int | None = None, throttle: bool = False) -> JobCgroup:
    """The job's cgroup, made (v1, v2) or planned (a scope is made by systemd as the job starts)."""
    which, reason = kind()
    cgroup: JobCgroup
    if which == "v1":
        cgroup = v1.V1Cgroup.create()
    elif which == "v2":
        cgroup = v2.V2Cgroup.create()
    elif which is not None:
        cgroup = scope.ScopeCgroup(user=which == "user-scope")
    else:
        raise CgroupError(f"no cgroup for the job: {reason}")
    cgroup.required, cgroup.max_swap, cgroup.throttle = required, max_swap, throttle
    return cgroup


def sweep() -> list[str]:
    """Empty safegate-made cgroups beside ours whose safegate is gone (a scope's are systemd's to remove)."""
    if v1.own_path("memory") is not None:
        return v1.sweep()
    base = v2.direct_base()
    return v2.sweep(base) if base is not None else []
