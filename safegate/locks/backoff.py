"""The one way safegate waits: attempt, pause, attempt again until it works or a deadline passes.

Every waiting loop uses it: probing and taking a flock, the admission lock, watching a lock for its
release, `check --wait` and exec --wait re-checking, and the asyncio Gate's admissions. Deadlines are on the
monotonic clock, so a wall-clock jump neither ends a wait early nor makes it last for ever.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator

import msgspec


class Backoff(msgspec.Struct, frozen=True):
    """Pauses between attempts: *first*, then each *factor* times the one before, never above *cap*."""

    first: float
    factor: float = 1.0
    cap: float | None = None  # None: *first* (a constant step, unless factor < 1)

    def delays(self) -> Iterator[float]:
        cap = self.first if self.cap is None else self.cap
        delay = self.first
        while True:
            yield delay
            delay = min(delay * self.factor, cap)


# Re-checking a blocked verdict: quick at first (a lock is often released soon), then rarely enough that a
# long wait costs next to no CPU.
RECHECK = Backoff(first=0.2, factor=1.5, cap=2.0)


def pauses(timeout: float | None, backoff: Backoff, clock: Callable[[], float] = time.monotonic) -> Iterator[float]:
    """The pause to take after each failed attempt; exhausted once *timeout* seconds (None: never) have passed.

    The deadline starts now, not at the first pause, so the first attempt counts against it. The last pause
    is cut short to end at the deadline, so one more attempt runs there rather than after it.
    """
    deadline = None if timeout is None else clock() + timeout

    def schedule() -> Iterator[float]:
        for delay in backoff.delays():
            if deadline is None:
                yield delay
                continue
            remaining = deadline - clock()
            if remaining <= 0:
                return
            yield min(delay, remaining)

    return schedule()


def poll(
    attempt: Callable[[], bool],
    timeout: float | None,
    backoff: Backoff,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], None] = time.sleep,
) -> bool:
    """Call attempt() until it returns True (then True) or *timeout* runs out (then False); at least once."""
    schedule = pauses(timeout, backoff, clock)
    while not attempt():
        pause = next(schedule, None)
        if pause is None:
            return False
        sleep(pause)
    return True
