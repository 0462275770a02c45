"""The process table: pid, parent, command line and RSS of every user-space process.

On Linux /proc is read directly: two small reads per process (stat and cmdline), which is what pgrep
does too, and several times cheaper than building a psutil.Process per pid. Elsewhere psutil is used.
"""

from __future__ import annotations

import os
import re
import sys
from collections.abc import Callable, Collection, Iterable

from safegate.probes.snapshots import ProcessInfo, ProcessSnapshot

_PAGE_SIZE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096
# Whole: execve takes at most 6 MiB of arguments and environment together (3/4 of the kernel's _STK_LIM, whatever
# the stack limit), and a process can rewrite its command line only within them (setproctitle). RE2 matches it
# in linear time; the bound is for a process whose CAP_SYS_RESOURCE moved its command line elsewhere.
_CMDLINE_MAX = 6 << 20


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
    """Whether a command line reads as a safegate process (the console script, or python -m safegate).

    Only a claim: anyone can set argv[0] (`exec -a safegate whisper ...`). read_processes() leaves a process out
    for it only where the lock dir accounts for the process (a lock it holds, a ticket it waits with).
    """
    if not argv:
        return False
    if os.path.basename(argv[0]) == "safegate":
        return True
    if len(argv) >= 2 and os.path.basename(argv[1]) == "safegate":
        return True
    return len(argv) >= 3 and argv[1] == "-m" and argv[2] == "safegate"


# Interpreters whose program is the script they run, and their options that take the next argument.
_SHELLS = frozenset({"sh", "bash", "dash", "zsh", "ksh", "mksh", "ash", "busybox"})
_OPTION_ARGS = {
    "python": frozenset({"-X", "-W", "--check-hash-based-pycs"}),
    "shell": frozenset({"-o", "-O", "+o", "+O"}),
    "node": frozenset({"-r", "--require", "--loader", "--import", "--experimental-loader"}),
    "perl": frozenset({"-I", "-M", "-m"}),
    "ruby": frozenset({"-I", "-r", "-C"}),
}
_INLINE = {"python": ("-c",), "shell": ("-c",), "node": ("-e", "--eval", "-p", "--print"),
           "perl": ("-e", "-E"), "ruby": ("-e",)}


_PYTHON = re.compile(r"(python|pypy)[0-9.]*")


def _interpreter(name: str) -> str | None:
    if _PYTHON.fullmatch(name):
        return "python"
    if name in _SHELLS:
        return "shell"
    if name in ("node", "nodejs"):
        return "node"
    if name in ("perl", "ruby"):
        return name
    return None


def program_of(argv: list[str]) -> tuple[str, list[str]]:
    """(the program a process runs, its own arguments).

    argv[0]'s basename, or for an interpreter the script it runs (`python3 /venv/bin/whisper --model large` is
    whisper with `--model large`; `python -m whisper` too). Inline code (`sh -c LINE`, `python -c CODE`) is
    the interpreter itself: what that code starts shows as processes of their own.
    """
    if argv and " " in argv[0]:
        # A title set in place of argv (setproctitle, `exec -a "whisper --model large"`) reads as one string.
        argv = argv[0].split() + argv[1:]
    if not argv:
        return "", []
    name = os.path.basename(argv[0])
    kind = _interpreter(name)
    if kind is None:
        return name, argv[1:]
    i = 1
    while i < len(argv):
        arg = argv[i]
        if arg in _INLINE[kind]:
            return name, argv[i + 1 :]
        if kind == "python" and arg == "-m":
            return (argv[i + 1], argv[i + 2 :]) if i + 1 < len(argv) else (name, [])
        if arg == "--":
            i += 1
            break
        if not arg.startswith(("-", "+")) or arg in ("-", "+"):
            break
        i += 2 if arg in _OPTION_ARGS[kind] else 1
    if i >= len(argv) or argv[i] == "-":
        return name, argv[i + 1 :]
    return os.path.basename(argv[i]), argv[i + 1 :]


def _info(pid: int, ppid: int, argv: list[str], rss: int, uid: int) -> ProcessInfo:
    program, args = program_of(argv)
    return ProcessInfo(pid=pid, ppid=ppid, cmdline=" ".join(argv), rss=rss, safegate=is_safegate(argv[:3]),
                       uid=uid, program=program, args=" ".join(args))


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
        try:
            uid = entry.stat(follow_symlinks=False).st_uid
        except OSError:
            continue  # exited meanwhile
        out.append(_info(int(name), parsed[1], argv, parsed[2] * _PAGE_SIZE, uid))
    return out


def _psutil_processes() -> list[ProcessInfo]:
    import psutil

    out = []
    for proc in psutil.process_iter(["pid", "ppid", "cmdline", "memory_info", "status", "uids"]):
        info = proc.info
        if not info.get("cmdline") or info.get("status") == psutil.STATUS_ZOMBIE:
            continue
        mem = info.get("memory_info")
        uids = info.get("uids")
        out.append(_info(int(info["pid"]), int(info.get("ppid") or 0), list(info["cmdline"]),
                         int(mem.rss) if mem is not None else 0, int(uids.real) if uids is not None else -1))
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


def read_processes(started: Iterable[int] = (), proc_root: str = "/proc",
                   accounted: Callable[[], Collection[int]] | None = None) -> ProcessSnapshot:
    """All processes except safegate itself, its ancestors and descendants, *started* with theirs, the other
    safegate processes whose job the lock dir accounts for (not their jobs), and their launchers.

    Another safegate waiting to start the same kind of job carries that job's command line in its own; matching
    it as a competitor would make waiting safegates block each other forever. But a command line is anyone's to
    write, so a process that reads as safegate is left out only where *accounted()* (the pids holding a flock on
    a file in the lock dir, or waiting there with a live ticket: what every user can read and only the process
    itself can make) names it. It is called only when such a process runs outside our own family. Without it,
    no other safegate process is left out.

    A launcher is any ancestor of such a safegate: cron and pueue run each line as `sh -c LINE`, and the shell
    stays alive as the parent of `safegate exec --wait ... -- whisper ...`, its command line naming the job.
    Counting it as that job made every waiter block on the others' shells, none ever starting. The parent of a
    child that only calls itself safegate (holding nothing) is no launcher: it competes.
    """
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
    family = roots | ancestors(me, parents) | descendants(roots, parents)
    claims = {p.pid for p in procs if p.safegate and p.pid not in family}
    gates: set[int] = set()
    if claims and accounted is not None:
        # Read after the scan: a safegate takes its lock before it drops its ticket, so one seen in the scan is
        # found holding one or the other.
        gates = claims & set(accounted())
    launchers: set[int] = set()
    for pid in gates:
        if pid not in launchers:
            launchers |= ancestors(pid, parents)
    excluded = frozenset(family | gates | launchers)
    kept = tuple(p for p in procs if p.pid not in excluded)
    return ProcessSnapshot(processes=kept, excluded=excluded)


_USERS: dict[int, str] = {}


def user_name(uid: int) -> str:
    """The login name of *uid*, or the number when it has none."""
    if uid < 0:
        return ""
    if uid not in _USERS:
        import pwd

        try:
            _USERS[uid] = pwd.getpwuid(uid).pw_name
        except KeyError:
            _USERS[uid] = str(uid)
    return _USERS[uid]


def still_running(pid: int, proc_root: str = "/proc") -> bool:
    """Whether *pid* still runs (neither gone nor a zombie): one read of its stat. True where there is no /proc
    to tell (the caller keeps what it saw)."""
    if not os.path.isdir(f"{proc_root}/self"):
        return True
    raw = read_small(f"{proc_root}/{pid}/stat")
    parsed = _parse_stat(raw) if raw else None
    return parsed is not None and parsed[0] not in ("Z", "X")


def process_alive(pid: int, start_time: float | None) -> bool:
    """True when *pid* runs and, if *start_time* is given, is the same process that recorded it."""
    if pid > 0 and not os.path.exists(f"/proc/{pid}") and os.path.isdir("/proc/self"):
        return False  # what psutil would find (no such process), without importing it for a dead holder
    import psutil

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
