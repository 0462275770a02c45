"""The caller's signals, as the supervisor's loop receives them: blocked, and taken in the loop's wait with
sigtimedwait (which also names the sender, so that a fault sent by another process is told from safegate's own),
with the signals the caller ignores left ignored and the caller's mask kept for the job."""

from __future__ import annotations

import os
import signal
from collections.abc import Sequence
from typing import Any

from safegate.run.procctl import FAULTS, FORWARDED, JOB_CONTROL, die_of


def ignored_by_caller() -> tuple[int, ...]:
    """The forwarded, fault and job-control signals the caller ignores (nohup's HUP; INT and QUIT for a script's
    background job): they stay ignored in the job, as they would without safegate, and are not forwarded, since
    safegate ignores them too."""
    return tuple(s for s in (*FORWARDED, *FAULTS, *JOB_CONTROL) if signal.getsignal(s) == signal.SIG_IGN)


class SignalInbox:
    """The caller's signals, in arrival order for the loop.

    While open, they are blocked: one arriving while the loop samples waits in the kernel, and the next wait
    returns at once, so none is lost between a check and the wait (the race a self-pipe otherwise closes). The
    faults are blocked only, never handled (see procctl.FAULTS). The others also get a handler that queues
    them: blocking is per thread, and a thread a C library started before open() (NVML's, say) would otherwise
    take a signal sent to safegate with its default action, killing safegate; there it is queued instead, and
    the loop finds it at its next wake-up."""

    def __init__(self) -> None:
        self.pending: list[int] = []
        self._taken: frozenset[int] = frozenset()  # what the wait takes; empty while closed
        self._old_handlers: dict[int, Any] = {}
        self.caller_mask: set[int] | None = None  # the mask before open(): the job's

    def open(self, signums: Sequence[int], faults: Sequence[int] = ()) -> None:
        """Take *signums* (handled and blocked) and *faults* (blocked only: forwarded when another process sent
        them). A signal blocked in the mask we inherited (tini's tests block SIGTERM so) is taken all the same."""
        for signum in signums:
            self._old_handlers[signum] = signal.signal(signum, self._on_signal)
        self._taken = frozenset((*signums, *faults))
        self.caller_mask = signal.pthread_sigmask(signal.SIG_BLOCK, self._taken)

    def _on_signal(self, signum: int, _frame: object) -> None:
        self.pending.append(signum)

    def pop(self) -> int | None:
        return self.pending.pop(0) if self.pending else None

    def wait(self, seconds: float) -> None:
        """Until a signal arrives or *seconds* pass; then every signal that is waiting is queued."""
        if not self._taken:
            return
        info = signal.sigtimedwait(self._taken, 0 if self.pending else max(seconds, 0.0))
        while info is not None:
            self._take(info)
            info = signal.sigtimedwait(self._taken, 0)

    def _take(self, info: signal.struct_siginfo) -> None:
        _end_on_own_fault(info)
        self.pending.append(info.si_signo)

    def close(self) -> None:
        if self._taken:
            # What came after the loop's last wait finds the job gone: dropped, not delivered by the mask's
            # restoring with its default action (a late SIGTERM would kill safegate before it reports).
            while (info := signal.sigtimedwait(self._taken, 0)) is not None:
                _end_on_own_fault(info)
            self._taken = frozenset()
        for signum, handler in self._old_handlers.items():
            signal.signal(signum, handler)
        self._old_handlers.clear()
        if self.caller_mask is not None:
            signal.pthread_sigmask(signal.SIG_SETMASK, self.caller_mask)
            self.caller_mask = None


def _end_on_own_fault(info: signal.struct_siginfo) -> None:
    """A fault that is safegate's own ends it: the kernel's (si_code > 0), or one it raised itself. si_code <= 0
    means sent by a process (kill, sigqueue, tgkill), si_pid says which; that one is the job's to get."""
    if info.si_signo in FAULTS and (info.si_code > 0 or info.si_pid == os.getpid()):
        die_of(info.si_signo)
