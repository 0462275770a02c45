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

from safegate.cgroups import JobCgroup
from safegate.limits import WatchLimits
from safegate.probes.jobtree import JobTree, stopped

SIGNAL_ROUNDS = 200  # scans per signalling; each costs one pass over /proc


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

    def forward(self, signum: int) -> bool:
        """*signum* to the job as a terminal would send it (the process group); whether the group got it."""
        ...

    def signal_all(self, signum: int) -> None:
        """*signum* to every process of the job, also those that left its group."""
        ...

    def pause(self) -> None:
        """Stop every process (too hot) until resume()."""
        ...

    def resume(self) -> None:
        ...

    def oom_kills(self) -> int:
        """Processes of the job the kernel's OOM killer ended at its memory cap (0 without a cap)."""
        ...

    def pressure(self) -> float | None:
        """The job's own memory pressure (PSI some avg10, percent), where the kernel keeps it (a v2 cgroup)."""
        ...

    def emptied(self) -> bool:
        """With the main process reaped and children still left: none of them is the job's (a cgroup knows)."""
        ...

    def cap(self, limits: WatchLimits, available: int) -> None:
        """Have the kernel hold the job's memory limits until the next sample, where it can (a cgroup)."""
        ...

    def terminate_all(self) -> None:
        """Ask every process not yet asked to end: SIGTERM, then SIGCONT to those stopped, which cannot act on
        SIGTERM until continued. Called again during the grace period for whatever appeared since."""
        ...


class ProcessTreeJob:
    def __init__(self, leader: int, tree: JobTree | None = None) -> None:
        self._leader = leader
        self.tree = JobTree() if tree is None else tree
        self.tree.add(leader)
        self._leader_ended = False
        self._peak = 0
        self._asked: set[int] = set()  # sent SIGTERM by terminate_all

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
        self._asked.discard(pid)  # its number may come back as a new process of the job
        self._peak = max(self._peak, maxrss)
        if pid == self._leader:
            self._leader_ended = True

    def forward(self, signum: int) -> bool:
        if self._leader_ended and not self._group_alive():
            return False  # the group is gone: its number could name someone else's group by now
        try:
            os.killpg(self._leader, signum)
        except (ProcessLookupError, PermissionError):  # gone, or a setuid job: nothing more we may do
            return False
        return True

    def _group_alive(self) -> bool:
        """Some process we track still belongs to the job's group (so its id cannot have been reused)."""
        for pid in self.tree.pids:
            with contextlib.suppress(OSError):
                if os.getpgid(pid) == self._leader:
                    return True
        return False

    def signal_all(self, signum: int) -> None:
        self._signal_each(signum, skip=frozenset(), group=True)

    def terminate_all(self) -> None:
        # Each process is asked once: a program may take a second SIGTERM as "force quit" and lose its graceful
        # shutdown. Later calls (the main process ended, processes appeared) ask only those not yet asked.
        asked = self._signal_each(signal.SIGTERM, skip=self._asked, group=not self._asked)
        self._asked |= asked
        continue_stopped(asked)

    def pause(self) -> None:
        self.signal_all(signal.SIGSTOP)

    def resume(self) -> None:
        self.signal_all(signal.SIGCONT)

    def oom_kills(self) -> int:
        return 0

    def pressure(self) -> float | None:
        return None

    def emptied(self) -> bool:
        return False  # as subreaper, every child left is the job's

    def cap(self, limits: WatchLimits, available: int) -> None:
        pass  # a process tree has no cap but the watch

    def _signal_each(self, signum: int, *, skip: Set[int], group: bool) -> set[int]:
        """*signum* once to every process of the job but *skip*; the pids it reached.

        The group gets it at once (also a process forked a moment ago); then /proc is scanned again and again,
        each process signalled as soon as the scan reads it, until a scan finds none new: a fork-and-exit chain
        (each generation forks, exits, and its child calls setsid) is re-parented to us, the subreaper, and the
        scan follows its trail to the live generation (JobTree.rescan). The rounds are bounded so that a chain
        outrunning them does not hold the loop; the next call goes on.
        """
        sent: set[int] = set()
        in_group = group and self.forward(signum)

        def hit(pid: int) -> None:
            if pid in sent or pid in skip:
                return
            sent.add(pid)
            if in_group and _pgid(pid) == self._leader:
                return  # reached through the group already
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signum)

        for _ in range(SIGNAL_ROUNDS):
            before = len(sent)
            self.tree.rescan(on_sight=hit)
            if len(sent) == before:
                break
        return sent


def continue_stopped(pids: Set[int]) -> None:
    """SIGCONT to those of *pids* that are stopped (just sent SIGTERM, they could not act on it). Not to the
    others: a running process sent both sees SIGCONT first (with both pending, the kernel sets up SIGTERM's
    handler, then SIGCONT's over it, which runs first), as a SIGCONT out of nowhere in a program's log."""
    for pid in pids:
        if stopped(pid):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGCONT)


def _pgid(pid: int) -> int | None:
    try:
        return os.getpgid(pid)
    except OSError:
        return None


class CgroupJob(ProcessTreeJob):
    """The job as the members of its own cgroup: the kernel counts its memory (also of processes that already
    ended), caps it, and no process can leave it, so stopping the cgroup's members stops all of the job."""

    def __init__(self, leader: int, cgroup: JobCgroup) -> None:
        super().__init__(leader)
        self.cgroup = cgroup
        self._cap: int | None = None  # the cap last written

    def members(self) -> Set[int]:
        return self.cgroup.procs()

    def refresh(self, *, now: bool = False) -> None:
        pass  # the kernel keeps the list

    def memory(self, *, precise: bool) -> int:
        return self.cgroup.working_set()

    def peak(self) -> int:
        # The kernel's count of the cgroup, where it keeps one: RSS would also count shared pages charged elsewhere.
        return self.cgroup.peak() or super().peak()

    def oom_kills(self) -> int:
        return self.cgroup.oom_kills()

    def pressure(self) -> float | None:
        return self.cgroup.pressure()

    def emptied(self) -> bool:
        return not self.cgroup.procs()

    def cap(self, limits: WatchLimits, available: int) -> None:
        cap = limits.kernel_cap(self.cgroup.usage(), available)
        if cap is not None and cap != self._cap:
            self._cap = cap
            self.cgroup.limit_memory(cap, strict=False)

    def _group_alive(self) -> bool:
        return any(_pgid(pid) == self.leader for pid in self.cgroup.procs())

    def pause(self) -> None:
        self.cgroup.freeze(True)  # a frozen job keeps its state and gets no stray SIGCONT

    def resume(self) -> None:
        self.cgroup.freeze(False)

    def signal_all(self, signum: int) -> None:
        if signum == signal.SIGKILL:
            self.cgroup.kill()  # none can fork meanwhile: cgroup.kill, or frozen while killed
            return
        self.forward(signum)
        for pid in self.cgroup.procs():
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signum)

    def terminate_all(self) -> None:
        asked = self.cgroup.procs() - self._asked
        for pid in asked:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGTERM)
        self._asked |= asked
        if asked:
            self.cgroup.freeze(False)
            continue_stopped(asked)
