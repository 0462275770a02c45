"""Waiters' tickets in the lock dir (`.ticket.<arrival>.<pid>.json`): taken at arrival, kept current while
waiting, dropped when admitted or gone; what `safegate queue` lists and what fair admission reads.

The lock dir is shared by users who do not trust each other. A ticket counts only while the process it names
lives (pid and start time) and is owned by the same user as the file: a planted file cannot put someone else's
process, or a dead one, in line. Waiting in line in person is what anyone may do.
"""

from __future__ import annotations

import contextlib
import getpass
import json
import os
import stat
import time
from collections.abc import Iterator
from dataclasses import asdict, replace
from pathlib import Path

import psutil

from safegate.fairness import blocked_by
from safegate.locks.directory import O_NOFOLLOW, O_NONBLOCK
from safegate.probes.processes import process_alive
from safegate.results import Verdict
from safegate.snapshots import Ticket

TICKET_PREFIX = ".ticket."
TICKET_SUFFIX = ".json"
TICKET_MAX_BYTES = 4096


def take_ticket(directory: Path, lock: str | None, profile: str, need: int) -> Ticket:
    """A new ticket, written to the lock dir; one that cannot be written still orders this waiter (in memory)."""
    me = psutil.Process()
    ticket = Ticket(pid=me.pid, start_time=me.create_time(), user=_user(), lock=lock, profile=profile,
                    need=need, arrival=time.time_ns())
    path = directory / f"{TICKET_PREFIX}{ticket.arrival:020d}.{ticket.pid}{TICKET_SUFFIX}"
    ticket = replace(ticket, path=path)
    return ticket if _write(ticket, exclusive=True) else replace(ticket, path=None)


def update_ticket(ticket: Ticket, blocked_by: str, reason: str) -> Ticket:
    """The ticket with its current reason for waiting, rewritten only when that changed."""
    if ticket.blocked_by == blocked_by and ticket.reason == reason:
        return ticket
    ticket = replace(ticket, blocked_by=blocked_by, reason=reason[:500])
    if ticket.path is not None:
        _write(ticket, exclusive=False)
    return ticket


def drop_ticket(ticket: Ticket) -> None:
    if ticket.path is not None:
        with contextlib.suppress(OSError):
            os.unlink(ticket.path)


class Line:
    """A waiter's ticket, kept current with what it waits for."""

    def __init__(self, ticket: Ticket) -> None:
        self.ticket = ticket

    def judged(self, verdict: Verdict) -> Verdict:
        summary = "; ".join(f"{c.name}: {c.reason}" for c in verdict.failures)
        self.ticket = update_ticket(self.ticket, blocked_by(verdict.checks), summary)
        return verdict


@contextlib.contextmanager
def waiting_in_line(directory: Path, lock: str | None, profile: str, need: int) -> Iterator[Line]:
    """A ticket taken at arrival, dropped when the wait ends (admitted, timed out, or failed)."""
    line = Line(take_ticket(directory, lock, profile, need))
    try:
        yield line
    finally:
        drop_ticket(line.ticket)


def read_tickets(directory: Path, *, sweep: bool = False) -> list[Ticket]:
    """The live waiters' tickets in arrival order; with *sweep*, dead waiters' files are removed (where we may)."""
    try:
        entries = [e for e in os.scandir(directory) if e.name.startswith(TICKET_PREFIX)
                   and e.name.endswith(TICKET_SUFFIX)]
    except OSError:
        return []
    found = []
    for entry in entries:
        path = Path(entry.path)
        ticket, owner = _read(path)
        if ticket is None:
            continue  # a temporary file, or not a ticket at all
        if process_alive(ticket.pid, ticket.start_time) and _uid_of(ticket.pid) == owner:
            found.append(ticket)
        elif sweep and not process_alive(ticket.pid, ticket.start_time):
            with contextlib.suppress(OSError):
                os.unlink(path)
    return sorted(found, key=lambda t: (t.arrival, t.pid))


def _write(ticket: Ticket, *, exclusive: bool) -> bool:
    assert ticket.path is not None
    data = {k: v for k, v in asdict(ticket).items() if k != "path"}
    target = ticket.path if exclusive else ticket.path.with_name(ticket.path.name + f".{os.getpid()}.tmp")
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | O_NOFOLLOW | os.O_CLOEXEC
    try:
        fd = os.open(target, flags, 0o644)
    except OSError:
        return False
    try:
        os.write(fd, json.dumps(data).encode())
        os.fchmod(fd, 0o644)  # readable by everyone's `safegate queue`, whatever the umask
    finally:
        os.close(fd)
    if not exclusive:
        try:
            os.rename(target, ticket.path)
        except OSError:
            with contextlib.suppress(OSError):
                os.unlink(target)
            return False
    return True


def _read(path: Path) -> tuple[Ticket | None, int]:
    try:
        fd = os.open(path, os.O_RDONLY | O_NOFOLLOW | O_NONBLOCK | os.O_CLOEXEC)
    except OSError:
        return None, -1
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            return None, -1
        raw = os.read(fd, TICKET_MAX_BYTES + 1)
    except OSError:
        return None, -1
    finally:
        os.close(fd)
    if len(raw) > TICKET_MAX_BYTES:
        return None, -1
    try:
        data = json.loads(raw)
        lock = data["lock"]
        ticket = Ticket(pid=int(data["pid"]), start_time=float(data["start_time"]), user=str(data["user"]),
                        lock=None if lock is None else str(lock), profile=str(data["profile"]),
                        need=int(data["need"]), arrival=int(data["arrival"]), blocked_by=str(data["blocked_by"]),
                        reason=str(data["reason"]), path=path)
    except (ValueError, KeyError, TypeError, RecursionError):
        return None, -1
    if ticket.pid <= 0 or ticket.start_time != ticket.start_time or abs(ticket.start_time) == float("inf"):
        return None, -1
    return ticket, st.st_uid


def _uid_of(pid: int) -> int:
    try:
        return os.stat(f"/proc/{pid}").st_uid
    except OSError:
        try:
            return int(psutil.Process(pid).uids().real)
        except psutil.Error:
            return -2


def _user() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return str(os.getuid())
