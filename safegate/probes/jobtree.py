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

import psutil

from safegate.probes.processes import descendants, read_small

_PAGE_SIZE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096
RESCAN = 1.0


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


def rss_bytes(pid: int, proc_root: str = "/proc") -> int | None:
    """Resident memory of *pid*, None when it has exited (a zombie reads 0)."""
    raw = read_small(f"{proc_root}/{pid}/statm", 256)
    if not raw:
        return None
    fields = raw.split()
    return int(fields[1]) * _PAGE_SIZE if len(fields) > 1 else 0


def pss_bytes(pid: int, proc_root: str = "/proc") -> int | None:
    """Proportional set size: shared pages divided among their sharers. None when unreadable.

    The kernel walks the page tables to compute it (about 10 ms per GB here), so the watcher asks for it
    only when it matters: a job of several processes near a limit.
    """
    raw = read_small(f"{proc_root}/{pid}/smaps_rollup", 8192)
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

    def rescan(self) -> None:
        """Find every descendant of root by a full /proc scan."""
        parents: dict[int, int] = {}
        try:
            entries = os.listdir(self.proc_root)
        except OSError:
            entries = []
        for name in entries:
            if not name.isdigit():
                continue
            fields = _stat_fields(int(name), self.proc_root)
            if fields and len(fields) > 1 and fields[0] not in (b"Z", b"X"):
                parents[int(name)] = int(fields[1])
        self.pids = descendants([self.root], parents)
        self._last_scan = time.monotonic()

    def refresh(self, force_scan: bool = False) -> set[int]:
        """Rescan for new descendants when due (exited ones drop out in memory())."""
        if force_scan or time.monotonic() - self._last_scan >= RESCAN:
            self.rescan()
        return self.pids

    def memory(self, precise: bool) -> int:
        """The job's memory: RSS summed, or PSS summed (shared pages counted once) when *precise*."""
        total = 0
        gone = []
        for pid in self.pids:
            value = pss_bytes(pid, self.proc_root) if precise else None
            if value is None:
                value = rss_bytes(pid, self.proc_root)
                if value is None:
                    gone.append(pid)
                    continue
            total += value
        self.pids.difference_update(gone)
        return total
