"""Waiting for one's turn at a lock without polling: inotify on the lock dir says when the lock file is closed
(a holder's last close is what releases its flock) or a waiter's ticket leaves the line; a flock probe and the
tickets then say whether the turn has come. Where inotify cannot be had, the flock is probed on a short step.

What a wake costs is one flock(2) probe while the lock is held, and reading the tickets once it is free. The
probing itself makes no event this watch reacts to (the lock file stays open, tickets are only read, a waiter's
state is not its place), so waiters that watch each other never wake each other up.
"""

from __future__ import annotations

import os
import select
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from safegate.gate.fairness import QUEUE, first_for_lock
from safegate.gate.queue import TICKET_PREFIX, TICKET_SUFFIX, Line, read_tickets
from safegate.gate.results import LockValues, Verdict
from safegate.locks.backoff import RECHECK, Backoff, poll
from safegate.locks.files import RELEASE_WATCH, flock_nb, funlock, lock_path, open_lock_file
from safegate.probes.snapshots import Ticket

_IN_CLOSE_WRITE = 0x008
_IN_CLOSE_NOWRITE = 0x010
_IN_DELETE = 0x200
_IN_Q_OVERFLOW = 0x4000
_IN_NONBLOCK = 0o4000
_IN_CLOEXEC = 0o2000000
_MASK = _IN_CLOSE_WRITE | _IN_CLOSE_NOWRITE | _IN_DELETE  # not renames: a waiter's new state is one
# The kernel queues the close event just before it drops the flock (__fput: fsnotify_close, then
# locks_remove_file): a probe right after the event can still find it held for a moment.
_AFTER_CLOSE = Backoff(first=0.001, factor=2.0, cap=0.008)
_AFTER_CLOSE_FOR = 0.03
# Anyone may open and close the 0666 lock file or plant tickets in a loop: looking at the turn at most this often
# bounds what such a storm of events costs a waiter (what came meanwhile is read at the next look).
_MIN_STEP = 0.005
# While earlier waiters go first with the lock free, the line itself is re-judged this often (a head that does
# not take the lock within queue.HEAD_GRACE is passed over, which only an evaluation finds out).
QUEUE_RECHECK = 0.25


class DirWatch:
    """An inotify instance watching one directory's entries (libc through ctypes: no dependency)."""

    def __init__(self, directory: Path) -> None:
        import ctypes

        # The C library Python itself runs on (no ctypes.util.find_library: it runs ldconfig, tens of ms).
        libc = ctypes.CDLL(None, use_errno=True)
        fd = libc.inotify_init1(_IN_NONBLOCK | _IN_CLOEXEC)
        if fd < 0:
            raise OSError(ctypes.get_errno(), "inotify_init1")
        if libc.inotify_add_watch(fd, os.fsencode(directory), _MASK) < 0:
            err = ctypes.get_errno()
            os.close(fd)
            raise OSError(err, f"inotify_add_watch {directory}")
        self.fd = fd

    def events(self, seconds: float) -> Iterator[tuple[int, str]]:
        """(mask, name) of what happened, waiting up to *seconds* for the first; none at the deadline."""
        ready, _, _ = select.select([self.fd], [], [], max(0.0, seconds))
        if not ready:
            return
        try:
            data = os.read(self.fd, 65536)
        except (BlockingIOError, InterruptedError):
            return
        offset = 0
        while offset + 16 <= len(data):
            # struct inotify_event: int wd; uint32 mask, cookie, len; char name[len] (NUL-padded).
            mask = int.from_bytes(data[offset + 4: offset + 8], sys.byteorder)
            size = int.from_bytes(data[offset + 12: offset + 16], sys.byteorder)
            name = data[offset + 16: offset + 16 + size].split(b"\0", 1)[0]
            offset += 16 + size
            yield mask, os.fsdecode(name)

    def close(self) -> None:
        os.close(self.fd)


def _relevant(mask: int, name: str, lock_file: str) -> bool:
    """The lock file closed (maybe released) or removed, a waiter's place dropped or swept, or events lost."""
    if mask & _IN_Q_OVERFLOW:
        return True
    if name == lock_file:
        return True
    return name.startswith(TICKET_PREFIX) and name.endswith(TICKET_SUFFIX) and bool(mask & _IN_DELETE)


def wait_turn(directory: Path, lock: str, me: Ticket, seconds: float,
              passed_over: frozenset[tuple[int, float]] = frozenset(),
              clock: Callable[[], float] = time.monotonic) -> bool:
    """Wait up to *seconds* until lock *lock* is free and no earlier waiter for it is in line before *me*
    (fairness.first_for_lock, *passed_over* aside); True as soon as it is, False at the deadline."""
    path = lock_path(directory, lock)
    fd = open_lock_file(path, create=False)

    def free() -> bool:
        nonlocal fd
        if fd is None:
            fd = open_lock_file(path, create=False)  # the first to take the lock makes its file
            if fd is None:
                return True
        if not flock_nb(fd):
            return False
        funlock(fd)
        return True

    def turn() -> bool:
        return free() and first_for_lock(me, read_tickets(directory), passed_over)

    try:
        try:
            watch = DirWatch(directory)
        except (OSError, AttributeError):
            return poll(turn, seconds, RELEASE_WATCH, clock)  # no inotify here (or none left): probe the flock
        try:
            # Watching before the first look: a release between the two is then an event, not missed.
            return turn() or _watch(watch, path.name, turn, free, seconds, clock)
        finally:
            watch.close()
    finally:
        if fd is not None:
            os.close(fd)


def _watch(watch: DirWatch, lock_file: str, turn: Callable[[], bool], free: Callable[[], bool], seconds: float,
           clock: Callable[[], float]) -> bool:
    deadline = clock() + seconds
    looked = clock()
    while True:
        remaining = deadline - clock()
        if remaining <= 0:
            return False
        woken = [(mask, name) for mask, name in watch.events(remaining) if _relevant(mask, name, lock_file)]
        if not woken:
            continue
        if clock() - looked < _MIN_STEP:
            time.sleep(max(0.0, _MIN_STEP - (clock() - looked)))
        looked = clock()
        if any(name == lock_file for _, name in woken) and not free():
            poll(free, _AFTER_CLOSE_FOR, _AFTER_CLOSE, clock)  # closed just now: let the kernel drop the flock
        if turn():
            return True


def turn_pause(directory: Path, lock: str | None, line: Line,
               sleep: Callable[[float], None] = time.sleep) -> Callable[[Verdict, float], None]:
    """The pause between a waiter's re-checks: while its lock is held, or earlier waiters for it go first, wait for
    its turn at the lock (woken by the release, whatever else fails) instead of sleeping blind.

    A turn that came and still failed is followed by a blind pause of at most RECHECK's first step: a lock
    someone takes and drops in a loop cannot make the waiter re-check in a loop, and what still blocked it
    (a safegate that released its lock and is still exiting) is soon looked at again.
    """
    woke = False

    def pause(verdict: Verdict, seconds: float) -> None:
        nonlocal woke
        check = verdict.result("lock")
        held = check is not None and isinstance(check.values, LockValues) and check.values.held
        if woke:
            woke = False
            sleep(min(seconds, RECHECK.first))
        elif lock is not None and check is not None and check.blocks and held:
            woke = wait_turn(directory, lock, line.ticket, seconds, line.passed_over())
        elif lock is not None and check is not None and check.blocks and check.caused_by == QUEUE:
            woke = wait_turn(directory, lock, line.ticket, min(seconds, QUEUE_RECHECK), line.passed_over())
        else:
            sleep(seconds)

    return pause
