"""Waiters' tickets in the lock dir: taken at arrival, kept current while waiting, dropped when admitted or
gone; what `safegate queue` lists and what fair admission reads.

The lock dir is shared by users who do not trust each other, so a ticket is judged by what its owner cannot
set, and costs nothing until it could count:

- Its name, `.ticket.<pid>.<start>.json` (start: the process's start in clock ticks since boot), says whose it
  is. One listing of the lock dir and one of /proc decide which names could count: a name whose pid is not a
  live process, or whose start is not that process's start, costs one directory entry and is never opened.
  So each live process has at most one ticket, whatever is planted.
- It counts only while that process lives and is owned by the user the process runs as.
- Its place in line is the kernel's time on the file: the file is created once with O_EXCL and never written
  again (its change time can only move later), and never earlier than its process's start. No value written
  in it orders anyone. What the waiter waits for now, which changes, is in `.ticket.<pid>.<start>.state`.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import re
import stat
import time
from collections.abc import Iterator
from pathlib import Path

from msgspec.structs import replace

from safegate.gate.fairness import blocked_by, waits_only_for_memory
from safegate.gate.results import Verdict
from safegate.locks.files import O_NOFOLLOW, O_NONBLOCK
from safegate.probes.pids import Identity, identity, live_pids
from safegate.probes.snapshots import Ticket

TICKET_PREFIX = ".ticket."
TICKET_SUFFIX = ".json"
STATE_SUFFIX = ".state"
TICKET_MAX_BYTES = 4096
SWEEP_MAX = 64  # dead tickets removed per call: another user's thousands cost the sweep a bounded amount
# A waiter at the head of its lock's line, with the lock free and its memory there, takes the lock within
# milliseconds (it watches the lock); one that has not after this long is asleep, or not a waiter at all.
HEAD_GRACE = 1.0


def ticket_name(pid: int, start: int) -> str:
    return f"{TICKET_PREFIX}{pid}.{start}{TICKET_SUFFIX}"


def _me() -> Identity:
    me = identity(os.getpid())
    assert me is not None, "/proc/self/stat must be readable"
    return me


def take_ticket(directory: Path, lock: str | None, profile: str, need: int) -> Ticket:
    """A new ticket, stamped now, not yet in the lock dir: Line posts it with its first judgement."""
    me = _me()
    return Ticket(pid=me.pid, start_time=me.start_time, user=_user(), lock=lock, profile=profile, need=need,
                  arrival=time.time_ns(), path=directory / ticket_name(me.pid, me.start))


def _state_path(place: Path) -> Path:
    return place.with_name(place.name[: -len(TICKET_SUFFIX)] + STATE_SUFFIX)


def drop_ticket(ticket: Ticket) -> None:
    if ticket.path is not None:
        for path in (_state_path(ticket.path), ticket.path):
            with contextlib.suppress(OSError):
                os.unlink(path)


class Line:
    """A waiter's ticket, kept current with what it waits for, and what this waiter saw of the line.

    Arriving and posting are one step for everyone else: arrive() stamps the arrival at the waiter's first
    evaluation (under the admission lock, for exec), and the first judged() writes the file already saying what
    the waiter waits for. Others never see it half-made: a ticket in the lock dir that did not yet say "memory"
    would let a later, smaller job start ahead of a big one that waits for memory.
    """

    def __init__(self, ticket: Ticket) -> None:
        self.ticket = ticket
        self.arrived = False
        self.posted = False
        # Earlier waiters seen at the head of the line with the lock free for them: since when (monotonic).
        self._heads: dict[tuple[int, float], float] = {}
        self.head: Ticket | None = None  # at the last evaluation: the earlier waiter that could take the lock

    def arrive(self) -> None:
        """Take the place in line now, at the first evaluation (not when the process started); once only."""
        if not self.arrived:
            self.ticket = replace(self.ticket, arrival=time.time_ns())
            self.arrived = True

    def passed_over(self) -> frozenset[tuple[int, float]]:
        """Waiters that stood at the head with the lock free past HEAD_GRACE: they lose their place."""
        now = time.monotonic()
        return frozenset(key for key, since in self._heads.items() if now - since > HEAD_GRACE)

    def saw_head(self, lock_free: bool, head: Ticket | None) -> None:
        """*head*: the earlier waiter that could take this caller's lock now (None: none such). Only an unbroken
        stretch of a free lock counts: once the lock is held again, a slow real waiter starts afresh."""
        self.head = head
        if not lock_free:
            self._heads.clear()
        elif head is not None:
            self._heads.setdefault((head.pid, head.start_time), time.monotonic())

    def judged(self, verdict: Verdict) -> Verdict:
        summary = "; ".join(f"{c.name}: {c.reason}" for c in verdict.failures)
        blocked, memory_only = blocked_by(verdict.checks), waits_only_for_memory(verdict.checks)
        changed = (blocked, summary[:500], memory_only) != (
            self.ticket.blocked_by, self.ticket.reason, self.ticket.memory_only)
        self.ticket = replace(self.ticket, blocked_by=blocked, reason=summary[:500], memory_only=memory_only)
        if self.posted:
            if changed and self.ticket.path is not None:
                _write_state(self.ticket)
        elif not verdict.ok:  # admitted at once: no one needs to see it in line
            arrival = _post(self.ticket) if self.ticket.path is not None else None
            if arrival is None:
                self.ticket = replace(self.ticket, path=None)  # it still orders this waiter (in memory)
            else:
                # Ordered as everyone else orders it: by the kernel's time on the file (a coarse clock, which may
                # read earlier than the stamp taken before it was made), never before the process started.
                self.ticket = replace(self.ticket, arrival=arrival)
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


# Every ticket-shaped name in a listing, found in one pass in C (a listing may hold tens of thousands of
# planted names; a Python loop over them would cost more than everything else check does).
_NAMES = re.compile(r"^\.ticket\.([0-9]{1,8})\.([0-9]{1,20})\.(?:json|state)$", re.M)


def read_tickets(directory: Path, *, sweep: bool = False, names: list[str] | None = None) -> list[Ticket]:
    """The live waiters' tickets in arrival order; with *sweep*, up to SWEEP_MAX dead waiters' files are removed
    (where we may). *names*: a listing of the lock dir just made (else one is made here)."""
    if names is None:
        try:
            names = os.listdir(directory)
        except OSError:
            return []
    found_names = _NAMES.findall("\n".join(names))
    if not found_names:
        return []
    named = {int(pid) for pid in {pid for pid, _ in found_names}}
    live = named & live_pids()
    found: list[Ticket] = []
    starts: dict[int, int] = {}
    for pid in live:
        who = identity(pid)
        if who is not None:
            starts[pid] = who.start
            ticket = _read(directory, who)
            if ticket is not None:
                found.append(ticket)
    if sweep:
        dead = (f"{TICKET_PREFIX}{pid}.{start}" for pid, start in found_names
                if starts.get(int(pid)) != int(start))
        for base in itertools.islice(dead, SWEEP_MAX):
            for suffix in (TICKET_SUFFIX, STATE_SUFFIX):
                with contextlib.suppress(OSError):
                    os.unlink(directory / (base + suffix))
    return sorted(found, key=lambda t: (t.arrival, t.pid))


def _read(directory: Path, who: Identity) -> Ticket | None:
    """The ticket of live process *who*, if its file is there (a state file alone: the waiter is between
    posting its state and its place, or gone) and is its user's."""
    from safegate import schema

    place = ticket_name(who.pid, who.start)
    raw, st = _read_owned(directory / place, who.uid)
    if raw is None or st is None:
        return None
    try:
        wire = schema.decode(raw, schema.TicketWire)
    except schema.BadRecord:
        return None  # another user's file, or a broken one: it orders no one
    state = schema.TicketStateWire()
    raw_state, _ = _read_owned(_state_path(directory / place), who.uid)
    if raw_state is not None:
        with contextlib.suppress(schema.BadRecord):
            state = schema.decode(raw_state, schema.TicketStateWire)
    return Ticket(pid=who.pid, start_time=who.start_time, user=wire.user, lock=wire.lock, profile=wire.profile,
                  need=wire.need, arrival=max(st.st_ctime_ns, who.start_ns), blocked_by=state.blocked_by,
                  reason=state.reason, memory_only=state.memory_only, path=directory / place)


def _read_owned(path: Path, uid: int) -> tuple[bytes | None, os.stat_result | None]:
    """The content of *path* if it is a regular file of user *uid* no larger than TICKET_MAX_BYTES."""
    try:
        fd = os.open(path, os.O_RDONLY | O_NOFOLLOW | O_NONBLOCK | os.O_CLOEXEC)
    except OSError:
        return None, None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_uid != uid:
            return None, None
        raw = os.read(fd, TICKET_MAX_BYTES + 1)
    except OSError:
        return None, None
    finally:
        os.close(fd)
    return (raw, st) if len(raw) <= TICKET_MAX_BYTES else (None, None)


def _post(ticket: Ticket) -> int | None:
    """Create the ticket's file, once, and its state; the kernel's time on it (ns), or None where it cannot be."""
    from safegate import schema

    assert ticket.path is not None
    # The state first: a place that appeared before it would not yet say "memory", and a later, smaller job
    # could start ahead of this one. A state file without its place orders no one.
    _write_state(ticket)
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | O_NOFOLLOW | os.O_CLOEXEC
    try:
        fd = os.open(ticket.path, flags, 0o644)
    except OSError:
        drop_ticket(ticket)
        return None
    try:
        os.write(fd, schema.encode(schema.TicketWire(user=ticket.user[:schema.TEXT_MAX], lock=ticket.lock,
                                                     profile=ticket.profile[:schema.TEXT_MAX], need=ticket.need)))
        os.fchmod(fd, 0o644)  # readable by everyone's `safegate queue`, whatever the umask
        arrival = os.fstat(fd).st_ctime_ns
    except OSError:
        os.close(fd)
        drop_ticket(ticket)
        return None
    os.close(fd)
    return max(arrival, _me().start_ns)


def _write_state(ticket: Ticket) -> None:
    """What the waiter waits for now: written aside and renamed, so a reader sees the old state or the new."""
    from safegate import schema

    assert ticket.path is not None
    final = _state_path(ticket.path)
    tmp = final.with_name(f"{final.name}.{os.getpid()}.tmp")
    data = schema.encode(schema.TicketStateWire(blocked_by=ticket.blocked_by[:schema.TEXT_MAX],
                                                reason=ticket.reason[:schema.TEXT_MAX],
                                                memory_only=ticket.memory_only))
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | O_NOFOLLOW | os.O_CLOEXEC, 0o644)
    except OSError:
        return
    try:
        os.write(fd, data)
        os.fchmod(fd, 0o644)
    except OSError:
        os.close(fd)
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        return
    os.close(fd)
    try:
        os.replace(tmp, final)
    except OSError:
        with contextlib.suppress(OSError):
            os.unlink(tmp)


def _user() -> str:
    import getpass

    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return str(os.getuid())
