"""The job's processes behind one small interface, so the supervisor's loop does not care how they are found.

ProcessTreeJob is the job as a process tree: its process group, plus every descendant found in /proc (safegate
is the subreaper, so also those that double-forked or called setsid stay below it). Another way to hold a job
(a cgroup, say) implements Job beside it, and the loop stays as it is.
"""

from __future__ import annotations

import contextlib
import os
import signal
from collections.abc import Set
from typing import Protocol

from safegate.probes.jobtree import JobTree


class Job(Protocol):
    @property
    def leader(self) -> int:
        """The job's main process: the command safegate started, whose exit status is the job's."""
        ...

    def members(self) -> Set[int]:
        """The job's processes as known now (read before the next refresh: it may change then)."""
        ...

    def refresh(self, *, now: bool = False) -> None:
        """Look for processes the job started: when due, or at once with *now* (before acting on a sample)."""
        ...

    def memory(self, *, precise: bool) -> int:
        """Bytes the job uses; *precise* counts pages its processes share once (dearer to read)."""
        ...

    def peak(self) -> int:
        """The kernel's own peak memory of the job's ended processes (it sees what sampling can miss)."""
        ...

    def ended(self, pid: int, maxrss: int) -> None:
        """*pid* was reaped, having used at most *maxrss* bytes."""
        ...

    def forward(self, signum: int) -> None:
        """*signum* to the job as a terminal would send it (the process group)."""
        ...

    def signal_all(self, signum: int) -> None:
        """*signum* to every process of the job, also those that left its group."""
        ...

    def terminate_all(self) -> None:
        """Ask every process to end: SIGTERM, then SIGCONT, since a stopped process cannot act on SIGTERM."""
        ...


class ProcessTreeJob:
    def __init__(self, leader: int, tree: JobTree | None = None) -> None:
        self._leader = leader
        self.tree = JobTree() if tree is None else tree
        self.tree.add(leader)
        self._leader_ended = False
        self._peak = 0

    @property
    def leader(self) -> int:
        return self._leader

    def members(self) -> Set[int]:
        return self.tree.pids

    def refresh(self, *, now: bool = False) -> None:
        self.tree.refresh(force_scan=now)

    def memory(self, *, precise: bool) -> int:
        return self.tree.memory(precise=precise)

    def peak(self) -> int:
        return self._peak

    def ended(self, pid: int, maxrss: int) -> None:
        self.tree.pids.discard(pid)
        self._peak = max(self._peak, maxrss)
        if pid == self._leader:
            self._leader_ended = True

    def forward(self, signum: int) -> None:
        if self._leader_ended and not self._group_alive():
            return  # the group is gone: its number could name someone else's group by now
        try:
            os.killpg(self._leader, signum)
        except ProcessLookupError:
            pass
        except PermissionError:  # pragma: no cover - a setuid job; nothing more we may do
            pass

    def _group_alive(self) -> bool:
        """Some process we track still belongs to the job's group (so its id cannot have been reused)."""
        for pid in self.tree.pids:
            with contextlib.suppress(OSError):
                if os.getpgid(pid) == self._leader:
                    return True
        return False

    def signal_all(self, signum: int) -> None:
        self.forward(signum)
        self.tree.refresh(force_scan=True)
        for pid in self.tree.pids:
            try:
                os.kill(pid, signum)
            except (ProcessLookupError, PermissionError):
                pass

    def terminate_all(self) -> None:
        self.signal_all(signal.SIGTERM)
        self.signal_all(signal.SIGCONT)
