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
from safegate.probes.jobtree import JobTree, processes_memory, stopped
from safegate.probes.pids import exiting
from safegate.run.limits import WatchLimits

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

    def cap(self, limits: WatchLimits, available: int) -> int | None:
        """Have the kernel hold the job's memory limits until the next sample, where it can (a cgroup); the cap in
        force from now on (None: none written)."""
        ...

    def terminate_all(self) -> None:
        """Ask every process not yet asked to end: SIGTERM, then SIGCONT to those stopped, which cannot act on
        SIGTERM until continued. Called again during the grace period for whatever appeared since."""
        ...

    def left_cgroup(self) -> str | None:
        """Checked every sample: once, when the main process (or, after it ended, another process of the job) is
        found outside the job's cgroup (a root job can move itself), what to tell; the job's processes outside
        it are watched as a process tree from then on."""
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

    def cap(self, limits: WatchLimits, available: int) -> int | None:
        return None  # a process tree has no cap but the watch

    def left_cgroup(self) -> str | None:
        return None

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
    ended), caps it, and no process can leave it unless it is root's: stopping the cgroup's members stops all of
    the job. A root job that moved its main process out is found at the next sample (left_cgroup); from then on
    its processes outside the cgroup (safegate's descendants the cgroup does not hold) are part of it too, found
    by scans as ProcessTreeJob finds them, counted, signalled and stopped with it."""

    def __init__(self, leader: int, cgroup: JobCgroup) -> None:
        super().__init__(leader)
        self.cgroup = cgroup
        self._cap: int | None = None  # the cap last written
        self._outside: set[int] | None = None  # once a process has left: the job's processes outside
        self._told = False

    def left_cgroup(self) -> str | None:
        # The main process only while it runs: once reaped, its number may name someone else's process.
        # A process on its way out reads as in the root cgroup: it left nothing, it is ending.
        if (self._outside is None and not self._leader_ended and self.cgroup.holds(self.leader) is False
                and not exiting(self.leader)):
            self._outside = set()
            self.refresh(now=True)
        if self._outside is None or self._told:
            return None
        self._told = True
        pids = sorted(self._outside)
        main = self.leader in pids or not pids
        who = (f"the job's main process (pid {self.leader})" if main
               else f"{len(pids)} process(es) of the job (pid {', '.join(map(str, pids[:5]))})")
        where = self.cgroup.where(self.leader if main else pids[0])
        return (f"{who} left the job's cgroup {self.cgroup.path}{f' for {where}' if where else ''}: the job's "
                "processes outside it are watched as a process tree from now on, and safegate's sampling, not the "
                "kernel's cap, holds the limits for them")

    def members(self) -> Set[int]:
        procs = self.cgroup.procs()
        return procs | self._outside if self._outside else procs

    def refresh(self, *, now: bool = False) -> None:
        if self._outside is None:
            return  # the kernel keeps the list
        self.tree.refresh(force_scan=now)
        self._outside = self._placed_outside()

    def _placed_outside(self) -> set[int]:
        """The processes of the last scan outside the cgroup, read every time (one may move out between scans);
        those gone are dropped, so that their numbers, once reused, are no one's of the job."""
        placed = {pid: self.cgroup.holds(pid) for pid in self.tree.pids}
        self.tree.pids.difference_update(pid for pid, held in placed.items() if held is None)
        return {pid for pid, held in placed.items() if held is False}

    def memory(self, *, precise: bool) -> int:
        counted = self.cgroup.working_set()
        if self._outside is None:
            return counted
        # What a process used before it left stays charged to the cgroup (the kernel does not move charges), so
        # adding its memory to the cgroup's could count those pages twice. The larger of the two counts each once:
        # the cgroup's figure, or the process tree's of every process of the job, inside the cgroup or not.
        return max(counted, processes_memory(set(self.members()), precise))

    def peak(self) -> int:
        # The kernel's count of the cgroup, where it keeps one: RSS would also count shared pages charged elsewhere.
        # A main process that left the cgroup used memory the cgroup did not count: its peak RSS counts too.
        if self._outside is not None:
            return max(self.cgroup.peak(), super().peak())
        return self.cgroup.peak() or super().peak()

    def ended(self, pid: int, maxrss: int) -> None:
        super().ended(pid, maxrss)
        if self._outside is not None:
            self._outside.discard(pid)

    def oom_kills(self) -> int:
        return self.cgroup.oom_kills()

    def pressure(self) -> float | None:
        return self.cgroup.pressure()

    def emptied(self) -> bool:
        if self.cgroup.procs():
            return False
        # The children left may have left the cgroup (a main process that moved out, then forked and exited, was
        # not seen outside by any sample): safegate's descendants the cgroup does not hold are the job's still.
        # A scope's anchor is held (it is in the scope, beside the job's leaf).
        self.tree.rescan()
        outside = self._placed_outside()
        if outside or self._outside is not None:
            self._outside = outside
        return not outside

    def cap(self, limits: WatchLimits, available: int) -> int | None:
        cap = limits.kernel_cap(self.cgroup.usage(), available)
        if cap is not None and cap != self._cap:
            self._cap = cap
            self.cgroup.limit_memory(cap, strict=False)
        return self._cap

    def _group_alive(self) -> bool:
        return any(_pgid(pid) == self.leader for pid in self.members())

    def pause(self) -> None:
        self.cgroup.freeze(True)  # a frozen job keeps its state and gets no stray SIGCONT
        self._signal_outside(signal.SIGSTOP)

    def resume(self) -> None:
        self.cgroup.freeze(False)
        self._signal_outside(signal.SIGCONT)

    def signal_all(self, signum: int) -> None:
        if signum == signal.SIGKILL:
            self.cgroup.kill()  # none can fork meanwhile: cgroup.kill, or frozen while killed
        else:
            self.forward(signum)
            for pid in self.cgroup.procs():
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.kill(pid, signum)
        self._signal_outside(signum)

    def _signal_outside(self, signum: int) -> None:
        """*signum* to the job's processes outside its cgroup, as a fresh scan finds them (none while none left)."""
        if self._outside is None:
            return
        self.refresh(now=True)
        for pid in self._outside:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signum)

    def terminate_all(self) -> None:
        self.refresh(now=True)
        asked = set(self.members()) - self._asked
        for pid in asked:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGTERM)
        self._asked |= asked
        if asked:
            self.cgroup.freeze(False)
            continue_stopped(asked)
