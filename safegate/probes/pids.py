"""Who a pid is, from what the kernel says and no one else can write: which pids live, each one's owner and
start time (in clock ticks since boot, exact, as /proc/<pid>/stat gives it). Read without psutil, so a
check in a lock dir full of other users' files pays a few small reads for them."""

from __future__ import annotations

import functools
import os

import msgspec


class Identity(msgspec.Struct, frozen=True):
    """One live process as the kernel names it: (pid, start) never names another process, even after reuse."""

    pid: int
    uid: int
    start: int  # clock ticks after boot at which it started
    ppid: int

    @property
    def start_time(self) -> float:
        """The start as seconds since the epoch (what psutil's create_time gives)."""
        return start_time_of(self.start)

    @property
    def start_ns(self) -> int:
        return int(boot_time() * 1_000_000_000) + self.start * (1_000_000_000 // clock_ticks())


def live_pids(proc_root: str = "/proc") -> set[int]:
    """Every pid /proc shows us (one directory listing): the set a pid named in a file is tested against."""
    try:
        return {int(name) for name in os.listdir(proc_root) if name.isdigit()}
    except OSError:
        return set()


def _stat_fields(pid: int) -> list[bytes] | None:
    """/proc/<pid>/stat's fields after the command name: state(0) ppid(1) pgrp(2) session(3) tty_nr(4) tpgid(5)
    flags(6) ... starttime(19); None when it cannot be read (gone, or hidden from us)."""
    try:
        fd = os.open(f"/proc/{pid}/stat", os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        raw = os.read(fd, 4096)
    except OSError:
        return None
    finally:
        os.close(fd)
    end = raw.rfind(b")")
    return raw[end + 2:].split() if end >= 0 else []


def identity(pid: int) -> Identity | None:
    """*pid*'s owner and start, or None when it is gone, a zombie, or hidden from us."""
    try:
        uid = os.stat(f"/proc/{pid}").st_uid
    except OSError:
        return None
    fields = _stat_fields(pid)
    if fields is None or len(fields) < 20 or fields[0] in (b"Z", b"X"):
        return None
    try:
        return Identity(pid=pid, uid=uid, start=int(fields[19]), ppid=int(fields[1]))
    except ValueError:
        return None


PF_EXITING = 0x4  # the kernel's flag on a task in do_exit(): from then on /proc/<pid>/cgroup may read "/"


def exiting(pid: int) -> bool:
    """*pid* is gone, a zombie, or on its way out (PF_EXITING in /proc/<pid>/stat's flags)."""
    fields = _stat_fields(pid)
    try:
        return fields is None or fields[0] in (b"Z", b"X") or bool(int(fields[6]) & PF_EXITING)
    except (IndexError, ValueError):
        return True


@functools.cache
def clock_ticks() -> int:
    return os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


@functools.cache
def boot_time() -> float:
    """The kernel's boot time (btime in /proc/stat), as psutil reads it."""
    try:
        with open("/proc/stat", "rb") as fh:
            for line in fh:
                if line.startswith(b"btime"):
                    return float(line.split()[1])
    except (OSError, IndexError, ValueError):
        pass
    return 0.0


def start_time_of(ticks: int) -> float:
    return boot_time() + ticks / clock_ticks()


def ancestry(pid: int | None = None) -> list[int]:
    """*pid* (default: this process) and its ancestors up to init, nearest first."""
    chain: list[int] = []
    current: int | None = os.getpid() if pid is None else pid
    while current is not None and current > 0 and current not in chain:
        chain.append(current)
        who = identity(current)
        current = who.ppid if who is not None else None
    return chain


def children(pid: int) -> set[int]:
    """*pid*'s children, from /proc/<pid>/task/*/children (every thread's), or by a scan of /proc without it."""
    found: set[int] = set()
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return found
    readable = False
    for task in tasks:
        try:
            with open(f"/proc/{pid}/task/{task}/children", "rb") as fh:
                found.update(int(p) for p in fh.read().split())
            readable = True
        except (OSError, ValueError):
            continue
    if not readable:  # a kernel without CONFIG_PROC_CHILDREN
        found = {p for p in live_pids() if (who := identity(p)) is not None and who.ppid == pid}
    return found


def cmdline(pid: int) -> bytes:
    """*pid*'s command line (NUL-separated, at most 64 KiB), b"" when gone or hidden."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as fh:
            return fh.read(65536)
    except OSError:
        return b""


def age(who: Identity) -> float:
    """Seconds since *who* started, from the kernel's uptime (exact to a clock tick; no wall clock involved)."""
    try:
        with open("/proc/uptime", "rb") as fh:
            uptime = float(fh.read().split()[0])
    except (OSError, ValueError, IndexError):
        return 0.0
    return max(0.0, uptime - who.start / clock_ticks())
