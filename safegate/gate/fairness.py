"""Fair admission, pure: waiters are served in arrival order per lock, and machine-wide no later arrival
starts when that would delay an earlier waiter that waits only for memory (so a big job is not starved by a
stream of small ones). Tickets (snapshots.Ticket) say who waits since when and for what."""

from __future__ import annotations

import time
from collections.abc import Sequence

from safegate.exitcodes import ExitCode
from safegate.gate.results import CheckResult, MemoryValues, Status
from safegate.probes.snapshots import Ticket
from safegate.units import format_bytes, format_duration

QUEUE = "queue"  # CheckResult.caused_by of a check that fails only because earlier waiters go first


def blocked_by(checks: Sequence[CheckResult]) -> str:
    """What a waiter's ticket says it waits for: the failing checks, `queue` for those that are its place in line."""
    return ",".join(sorted({QUEUE if c.caused_by == QUEUE else c.name for c in checks if c.blocks}))


def waits_only_for_memory(checks: Sequence[CheckResult]) -> bool:
    """Whether memory is all a waiter waits for: short of it, or held back in line for an earlier waiter that
    waits for memory (still memory, only someone else's turn first). Later arrivals must not delay such a waiter
    either way: were a held-back waiter not counted, each small job admitted past it would start ahead of it."""
    failing = [c for c in checks if c.blocks]
    return bool(failing) and all(c.name == "memory" for c in failing)


def _ahead(me: Ticket, tickets: Sequence[Ticket]) -> list[Ticket]:
    return [t for t in tickets if (t.arrival, t.pid) < (me.arrival, me.pid) and t.pid != me.pid]


def first_for_lock(me: Ticket, tickets: Sequence[Ticket],
                   passed_over: frozenset[tuple[int, float]] = frozenset()) -> bool:
    """Whether no earlier waiter for *me*'s lock is in line (passed-over ones aside): in_line then lets no one
    else take it first."""
    return not any(t.lock == me.lock and (t.pid, t.start_time) not in passed_over for t in _ahead(me, tickets))


def _waited(t: Ticket, now: float) -> str:
    return format_duration(max(0.0, now - t.arrival / 1e9))


def head_waiting(checks: Sequence[CheckResult], me: Ticket, tickets: Sequence[Ticket],
                 passed_over: frozenset[tuple[int, float]] = frozenset()) -> tuple[bool, Ticket | None]:
    """(whether this caller's lock is free, the earlier waiter at the head of its line that could take it now:
    its memory is there). A real waiter then takes the lock within milliseconds (queue.HEAD_GRACE); one that
    waits for memory is not expected to."""
    lock = next((c for c in checks if c.name == "lock"), None)
    memory = next((c for c in checks if c.name == "memory"), None)
    if me.lock is None or lock is None or lock.blocks:
        return False, None
    head = next((t for t in _ahead(me, tickets) if t.lock == me.lock and (t.pid, t.start_time) not in passed_over),
                None)
    if head is None or memory is None or not isinstance(memory.values, MemoryValues):
        return True, head
    mem, margin = memory.values, memory.thresholds.get("margin", 0)
    return True, head if mem.available - mem.reserved - head.need >= margin else None


def in_line(checks: Sequence[CheckResult], me: Ticket, tickets: Sequence[Ticket],
            now: float | None = None, passed_over: frozenset[tuple[int, float]] = frozenset()) -> list[CheckResult]:
    """*checks* with the lock and memory checks failing where earlier waiters go first. *passed_over*: waiters
    (pid, start time) that lost their place (they stood at the head and did not take the lock)."""
    now = time.time() if now is None else now
    ahead = [t for t in _ahead(me, tickets) if (t.pid, t.start_time) not in passed_over]
    out = list(checks)
    for i, check in enumerate(out):
        if check.name == "lock" and not check.blocks and me.lock is not None:
            same = [t for t in ahead if t.lock == me.lock]
            if same:
                first = same[0]
                out[i] = CheckResult(
                    "lock", Status.FAIL,
                    f"waiting in line for lock {me.lock!r}: {len(same)} earlier waiter(s) go first, the first pid "
                    f"{first.pid} ({first.user}, profile {first.profile}, waiting for {_waited(first, now)})",
                    ExitCode.LOCKED, check.values, check.thresholds, caused_by=QUEUE)
        elif check.name == "memory" and not check.blocks and isinstance(check.values, MemoryValues):
            held = _held_back_by(check.values, check.thresholds.get("margin", 0), me, ahead)
            if held is not None:
                out[i] = CheckResult(
                    "memory", Status.FAIL,
                    f"held back for an earlier waiter that waits for memory: pid {held.pid} ({held.user}, profile "
                    f"{held.profile}) needs {format_bytes(held.need)}, waiting for {_waited(held, now)}; starting "
                    "now would delay it", ExitCode.MEMORY, check.values, check.thresholds, caused_by=QUEUE)
    return out


def _held_back_by(mem: MemoryValues, margin: int, me: Ticket, ahead: Sequence[Ticket]) -> Ticket | None:
    """The earliest waiter blocked only by memory whose start this job would delay, if any."""
    if mem.need <= 0:
        return None  # takes nothing: delays no one
    for t in ahead:
        # A need that never fits the machine (with the margin) holds back no one: it would stop everyone forever.
        waits_for_memory = t.memory_only and t.need > 0 and t.need + margin <= mem.total
        if waits_for_memory and (me.lock is None or t.lock != me.lock) and (
                mem.available - mem.reserved - mem.need - t.need < margin):
            return t
    return None
