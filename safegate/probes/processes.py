"""The process table: pid, parent, command line and RSS of every user-space process.

On Linux /proc is read directly: two small reads per process (stat and cmdline), which is what pgrep
does too, and several times cheaper than building a psutil.Process per pid. Elsewhere psutil is used.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterable

import psutil

from safegate.snapshots import ProcessInfo, ProcessSnapshot

_PAGE_SIZE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096
_CMDLINE_MAX = 1 << 20


def read_small(path: str, limit: int = 4096) -> bytes | None:
    """Up to *limit* bytes of a /proc file in one read; None when it is gone or hidden from us."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return None  # gone, or hidden from us (hidepid): not a process we can judge
    try:
        return os.read(fd, limit)
    except OSError:
        return None
    finally:
        os.close(fd)


def _parse_stat(raw: bytes) -> tuple[str, int, int] | None:
    """(state, ppid, rss in pages) from /proc/PID/stat; the comm field may hold spaces and ')'."""
    end = raw.rfind(b")")
    if end < 0:
        return None
    fields = raw[end + 2 :].split()
    if len(fields) < 22:
        return None
    # After comm: state ppid pgrp session tty tpgid flags minflt cminflt majflt cmajflt utime stime
    # cutime cstime priority nice num_threads itrealvalue starttime vsize rss
    return fields[0].decode("ascii", "replace"), int(fields[1]), int(fields[21])


def is_safegate(argv: list[str]) -> bool:
    """A safegate process (the console script, or python -m safegate), whatever job it gates.

    Another safegate waiting to start the same kind of job carries that job's command line in its own;
    matching it as a competitor would make waiting safegates block each other forever. Its job, once
    started, is a process of its own and is matched as usual.
    """
    if not argv:
        return False
    if os.path.basename(argv[0]) == "safegate":
        return True
    if len(argv) >= 2 and os.path.basename(argv[1]) == "safegate":
        return True
    return len(argv) >= 3 and argv[1] == "-m" and argv[2] == "safegate"


def _linux_processes(proc_root: str) -> list[ProcessInfo]:
    out = []
    for entry in os.scandir(proc_root):
        name = entry.name
        if not name.isdigit():
            continue
        base = f"{proc_root}/{name}/"
        raw_cmd = read_small(base + "cmdline", _CMDLINE_MAX)
        if not raw_cmd:
            continue  # kernel thread, zombie, or exited
        raw_stat = read_small(base + "stat", 4096)
        parsed = _parse_stat(raw_stat) if raw_stat else None
        if parsed is None or parsed[0] in ("Z", "X"):
            continue
        argv = raw_cmd.rstrip(b"\0").decode("utf-8", "replace").split("\0")
        out.append(
            ProcessInfo(
                pid=int(name), ppid=parsed[1], cmdline=" ".join(argv), rss=parsed[2] * _PAGE_SIZE,
                safegate=is_safegate(argv[:3]),
            )
        )
    return out


def _psutil_processes() -> list[ProcessInfo]:
    out = []
    for proc in psutil.process_iter(["pid", "ppid", "cmdline", "memory_info", "status"]):
        info = proc.info
        if not info.get("cmdline") or info.get("status") == psutil.STATUS_ZOMBIE:
            continue
        mem = info.get("memory_info")
        out.append(
            ProcessInfo(
                pid=int(info["pid"]),
                ppid=int(info.get("ppid") or 0),
                cmdline=" ".join(info["cmdline"]),
                rss=int(mem.rss) if mem is not None else 0,
                safegate=is_safegate(list(info["cmdline"][:3])),
            )
        )
    return out


def ancestors(pid: int, parents: dict[int, int]) -> set[int]:
    """Every ancestor of *pid* found in the pid -> ppid map."""
    found: set[int] = set()
    current = parents.get(pid, 0)
    while current > 0 and current not in found:
        found.add(current)
        current = parents.get(current, 0)
    return found


def descendants(roots: Iterable[int], parents: dict[int, int]) -> set[int]:
    """Every process whose chain of parents reaches one of *roots*."""
    children: dict[int, list[int]] = {}
    for child, parent in parents.items():
        children.setdefault(parent, []).append(child)
    found: set[int] = set()
    stack = list(roots)
    while stack:
        for child in children.get(stack.pop(), ()):
            if child not in found:
                found.add(child)
                stack.append(child)
    return found


def read_processes(started: Iterable[int] = (), proc_root: str = "/proc") -> ProcessSnapshot:
    """All processes except safegate itself, its ancestors and descendants, *started* with theirs, and
    other safegate processes (not their jobs)."""
    if sys.platform.startswith("linux") and os.path.isdir(proc_root):
        procs = _linux_processes(proc_root)
    else:
        procs = _psutil_processes()
    parents = {p.pid: p.ppid for p in procs}
    me = os.getpid()
    if me not in parents:
        # Our own cmdline is always readable, but keep the chain walk working if it was not.
        parents[me] = os.getppid()
    roots = {me, *started}
    excluded = frozenset(
        roots | ancestors(me, parents) | descendants(roots, parents) | {p.pid for p in procs if p.safegate}
    )
    kept = tuple(p for p in procs if p.pid not in excluded)
    return ProcessSnapshot(processes=kept, excluded=excluded)


def process_alive(pid: int, start_time: float | None) -> bool:
    """True when *pid* runs and, if *start_time* is given, is the same process that recorded it."""
    try:
        proc = psutil.Process(pid)
        if start_time is None:
            return proc.status() != psutil.STATUS_ZOMBIE
        # 1 s: psutil derives create_time from the boot time, which shifts a little when NTP steps the clock;
        # a pid reused within the same second is not a realistic case.
        return abs(proc.create_time() - start_time) < 1.0 and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False
    except psutil.AccessDenied:
        return True  # it exists; we are just not allowed to look closer
