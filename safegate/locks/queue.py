"""Waiters' tickets in the lock dir (`.ticket.<arrival>.<pid>.json`): taken at arrival, kept current while
waiting, dropped when admitted or gone; what `safegate queue` lists and what fair admission reads.

The lock dir is shared by users who do not trust each other. A ticket counts only while the process it names
lives (pid and start time) and is owned by the same user as the file: a planted file cannot put someone else's
process, or a dead one, in line. Waiting in line in person is what anyone may do.
"""

from __future__ import annotations

import contextlib
import json
import os
import stat
import time
from collections.abc import Iterator
from pathlib import Path

from safegate.fairness import blocked_by, waits_only_for_memory
from safegate.locks.directory import O_NOFOLLOW, O_NONBLOCK
from safegate.probes.processes import process_alive
from safegate.records import asdict, replace
from safegate.results import Verdict
from safegate.snapshots import Ticket

TICKET_PREFIX = ".ticket."
TICKET_SUFFIX = ".json"
TICKET_MAX_BYTES = 4096


def take_ticket(directory: Path, lock: str | None, profile: str, need: int) -> Ticket:
    """A new ticket, stamped now, not yet in the lock dir: Line posts it with its first judgement."""
    import psutil

    me = psutil.Process()
    arrival = time.time_ns()
    return Ticket(pid=me.pid, start_time=me.create_time(), user=_user(), lock=lock, profile=profile,
                  need=need, arrival=arrival, path=_ticket_path(directory, arrival, me.pid))


def _ticket_path(directory: Path, arrival: int, pid: int) -> Path:
    return directory / f"{TICKET_PREFIX}{arrival:020d}.{pid}{TICKET_SUFFIX}"


def _stamped(ticket: Ticket, arrival: int) -> Ticket:
    """*ticket* arriving at *arrival* (ns), its file named for it (a caller that does not wait has none)."""
    path = None if ticket.path is None else _ticket_path(ticket.path.parent, arrival, ticket.pid)
    return replace(ticket, arrival=arrival, path=path)


def update_ticket(ticket: Ticket, blocked_by: str, reason: str, memory_only: bool = False) -> Ticket:
    """The ticket with its current reason for waiting, rewritten only when that changed."""
    if ticket.blocked_by == blocked_by and ticket.reason == reason and ticket.memory_only == memory_only:
        return ticket
    ticket = replace(ticket, blocked_by=blocked_by, reason=reason[:500], memory_only=memory_only)
    if ticket.path is not None:
        _write(ticket, exclusive=False)
    return ticket


def drop_ticket(ticket: Ticket) -> None:
    if ticket.path is not None:
        with contextlib.suppress(OSError):
            os.unlink(ticket.path)


class Line:
    """A waiter's ticket, kept current with what it waits for.

    Arriving and posting are one step for everyone else: arrive() stamps the arrival at the waiter's first
    evaluation (under the admission lock, for exec), and the first judged() writes the file already saying what
    the waiter waits for. Others never see it half-made: a ticket in the lock dir that did not yet say "memory"
    would let a later, smaller job start ahead of a big one that waits for memory.
    """

    def __init__(self, ticket: Ticket) -> None:
        self.ticket = ticket
        self.arrived = False
        self.posted = False

    def arrive(self) -> None:
        """Take the place in line now, at the first evaluation (not when the process started); once only."""
        if not self.arrived:
            self.ticket = _stamped(self.ticket, time.time_ns())
            self.arrived = True

    def judged(self, verdict: Verdict) -> Verdict:
        summary = "; ".join(f"{c.name}: {c.reason}" for c in verdict.failures)
        blocked, memory_only = blocked_by(verdict.checks), waits_only_for_memory(verdict.checks)
        if self.posted:
            self.ticket = update_ticket(self.ticket, blocked, summary, memory_only)
        elif not verdict.ok:  # admitted at once: no one needs to see it in line
            self.ticket = replace(self.ticket, blocked_by=blocked, reason=summary[:500], memory_only=memory_only)
            if self.ticket.path is not None and not _write(self.ticket, exclusive=True):
                self.ticket = replace(self.ticket, path=None)  # it still orders this waiter (in memory)
            self.posted = True
        return verdict


@contextlib.contextmanager
def waiting_in_line(directory: Path, lock: str | None, profile: str, need: int) -> Iterator[Line]:
    """A ticket taken at arrival, dropped when the wait ends (admitted, timed out, or failed)."""
    line = Line(take_ticket(directory, lock, profile, need))
    try:
        yield line
    finally:
        if line.posted:
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
                        reason=str(data["reason"]), path=path,
                        # Written since memory_only existed; before, only "memory" meant memory alone.
                        memory_only=bool(data.get("memory_only", data["blocked_by"] == "memory")))
    except (ValueError, KeyError, TypeError, RecursionError):
        return None, -1
    if ticket.pid <= 0 or ticket.start_time != ticket.start_time or abs(ticket.start_time) == float("inf"):
        return None, -1
    return ticket, st.st_uid


def _uid_of(pid: int) -> int:
    try:
        return os.stat(f"/proc/{pid}").st_uid
    except OSError:
        import psutil

        try:
            return int(psutil.Process(pid).uids().real)
        except psutil.Error:
            return -2


def _user() -> str:
    import getpass

    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return str(os.getuid())
