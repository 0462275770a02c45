"""The processes of a running job and the memory they use.

safegate is the job's subreaper, so every descendant (also one that double-forked or called setsid)
stays below it: the job is exactly the set of this process's descendants. Finding new descendants
takes a scan of every /proc/PID/stat (the kernel's children lists are not always built in), so it runs
at most once per RESCAN seconds and on demand before acting; between scans a sample reads only one
statm per known pid, and a pid whose statm is gone has left the job.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable

import psutil

from safegate.probes.processes import descendants, read_small

_PAGE_SIZE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096
RESCAN = 1.0
CHASE_GAP = 32  # free pid numbers in a row that end the chase past the listing
CHASE_LIMIT = 4096  # numbers the chase reads at most (a machine forking as fast as it reads)


def _stat_fields(pid: int, proc_root: str) -> list[bytes] | None:
    """Fields after comm in /proc/PID/stat (state first), or None when gone."""
    raw = read_small(f"{proc_root}/{pid}/stat")
    if not raw:
        return None
    end = raw.rfind(b")")
    return raw[end + 2 :].split() if end >= 0 else None


def read_available(path: str = "/proc/meminfo") -> int:
    """MemAvailable in bytes; one small read (psutil elsewhere)."""
    raw = read_small(path, 8192)
    if raw:
        for line in raw.splitlines():
            if line.startswith(b"MemAvailable:"):
                return int(line.split()[1]) * 1024
    return int(psutil.virtual_memory().available)


def _is_process(pid: int, proc_root: str) -> bool:
    """*pid* names a process (a thread group), not one of its other threads."""
    raw = read_small(f"{proc_root}/{pid}/status", 4096) or b""
    for line in raw.splitlines():
        if line.startswith(b"Tgid:"):
            return int(line.split()[1]) == pid
    return False


def live_thread(pid: int, proc_root: str = "/proc") -> int | None:
    """A thread of *pid* still running when its main thread has exited, else None.

    Such a process reads as a zombie (state Z, statm all 0) while its other threads run and allocate: it is
    alive, and its memory is read through one of them."""
    try:
        tids = os.listdir(f"{proc_root}/{pid}/task")
    except OSError:
        return None
    for name in tids:
        if name != str(pid) and name.isdigit():
            fields = _stat_fields(int(name), f"{proc_root}/{pid}/task")
            if fields and fields[0] not in (b"Z", b"X"):
                return int(name)
    return None


def stopped(pid: int, proc_root: str = "/proc") -> bool:
    """*pid* is stopped: state T (SIGSTOP, a job-control stop) or t (stopped by a tracer), read through a live
    thread when its main thread has exited."""
    fields = _stat_fields(pid, proc_root)
    if fields and fields[0] == b"Z":
        thread = live_thread(pid, proc_root)
        fields = _stat_fields(thread, f"{proc_root}/{pid}/task") if thread is not None else None
    return fields is not None and fields[:1] in ([b"T"], [b"t"])


def _task_dir(pid: int, proc_root: str) -> str:
    thread = live_thread(pid, proc_root)
    return f"{proc_root}/{pid}/task/{thread}" if thread is not None else f"{proc_root}/{pid}"


def rss_bytes(pid: int, proc_root: str = "/proc") -> int | None:
    """Resident memory of *pid*, None when it has exited (a zombie reads 0)."""
    raw = read_small(f"{proc_root}/{pid}/statm", 256)
    if not raw:
        return None
    fields = raw.split()
    if len(fields) > 1 and fields[0] == b"0":  # no memory map of its own: a zombie, or its main thread exited
        raw = read_small(f"{_task_dir(pid, proc_root)}/statm", 256) or raw
        fields = raw.split()
    return int(fields[1]) * _PAGE_SIZE if len(fields) > 1 else 0


def pss_bytes(pid: int, proc_root: str = "/proc") -> int | None:
    """Proportional set size: shared pages divided among their sharers. None when unreadable.

    The kernel walks the page tables to compute it (about 10 ms per GB here), so the watcher asks for it
    only when it matters: a job of several processes near a limit.
    """
    raw = read_small(f"{proc_root}/{pid}/smaps_rollup", 8192)
    if not raw:
        # Gone, or its main thread exited (reading the rollup through it fails): read it through a live thread.
        raw = read_small(f"{_task_dir(pid, proc_root)}/smaps_rollup", 8192)
        if not raw:
            return None
    for line in raw.splitlines():
        if line.startswith(b"Pss:"):
            return int(line.split()[1]) * 1024
    return None


class JobTree:
    def __init__(self, root: int | None = None, proc_root: str = "/proc") -> None:
        self.root = os.getpid() if root is None else root
        self.proc_root = proc_root
        self.pids: set[int] = set()
        self._last_scan = float("-inf")

    def add(self, pid: int) -> None:
        self.pids.add(pid)

    def rescan(self, on_sight: Callable[[int], None] | None = None) -> None:
        """Find every descendant of root by a full /proc scan; *on_sight* is called with each live one as soon as
        it is read, so that a signal reaches it before it can fork and exit.

        Pids are read in ascending order (a parent before its children), then the scan chases the pids created
        while it ran, past the last one listed, until CHASE_GAP numbers in a row are free: a fork-and-exit chain
        leaves a trail of zombies (re-parented to us, the subreaper, and not yet reaped) up to its one live
        generation, which is read microseconds after its parent instead of a whole /proc pass later.
        """
        try:
            listed = sorted(int(name) for name in os.listdir(self.proc_root) if name.isdigit())
        except OSError:
            listed = []
        parents: dict[int, int] = {}
        alive: set[int] = set()
        ours = {self.root}
        seen: set[int] = set()

        def found(pid: int) -> None:
            if pid in alive and pid not in seen:
                seen.add(pid)
                if on_sight is not None:
                    on_sight(pid)

        def visit(pid: int, chased: bool = False) -> bool:
            fields = _stat_fields(pid, self.proc_root)
            if not fields or len(fields) < 2:
                return False
            if chased and not _is_process(pid, self.proc_root):
                return True  # a thread's id: /proc/TID answers too, but it is part of its process, not one more
            parents[pid] = int(fields[1])
            if fields[0] != b"X" and (fields[0] != b"Z" or live_thread(pid, self.proc_root) is not None):
                alive.add(pid)
            if parents[pid] in ours:
                ours.add(pid)
                found(pid)
            return True

        for pid in listed:
            visit(pid)
        last = listed[-1] if listed else 0
        pid, free = last + 1, 0
        while free < CHASE_GAP and pid <= last + CHASE_LIMIT:
            free = 0 if visit(pid, chased=True) else free + 1
            pid += 1
        # After pid numbers wrap around, a child can have a lower number than its parent: found by a full walk.
        for pid in descendants([self.root], parents) - ours:
            found(pid)
        self.pids = seen
        self._last_scan = time.monotonic()

    def refresh(self, force_scan: bool = False) -> set[int]:
        """Rescan for new descendants when due (exited ones drop out in memory())."""
        if force_scan or time.monotonic() - self._last_scan >= RESCAN:
            self.rescan()
        return self.pids

    def memory(self, precise: bool) -> int:
        """The job's memory: RSS summed, or PSS summed (shared pages counted once) when *precise*."""
        return processes_memory(self.pids, precise, self.proc_root)


def processes_memory(pids: set[int], precise: bool, proc_root: str = "/proc") -> int:
    """RSS (or PSS when *precise*) of *pids* summed; those that have exited are taken out of *pids*."""
    total = 0
    gone = []
    for pid in pids:
        value = pss_bytes(pid, proc_root) if precise else None
        if value is None:
            value = rss_bytes(pid, proc_root)
            if value is None:
                gone.append(pid)
                continue
        total += value
    pids.difference_update(gone)
    return total
