"""The caller's signals, as the supervisor's loop receives them: queued by one handler, waking the loop's wait
through a self-pipe, with the signals the caller ignores left ignored and those it blocked unblocked."""

from __future__ import annotations

import os
import select
import signal
from collections.abc import Sequence
from typing import Any

from safegate.procctl import FORWARDED, JOB_CONTROL


def ignored_by_caller() -> tuple[int, ...]:
    """The forwarded and job-control signals the caller ignores (nohup's HUP; INT and QUIT for a script's
    background job): they stay ignored in the job, as they would without safegate, and are not forwarded, since
    safegate ignores them too."""
    return tuple(s for s in (*FORWARDED, *JOB_CONTROL) if signal.getsignal(s) == signal.SIG_IGN)


class SignalInbox:
    """The caller's signals, queued by their handlers; the loop's wait wakes on them through a self-pipe."""

    def __init__(self) -> None:
        self.pending: list[int] = []
        self._wake_r = self._wake_w = -1
        self._old_handlers: dict[int, Any] = {}
        self.caller_mask: set[int] | None = None  # the mask before open(): the job's

    def open(self, signums: Sequence[int]) -> None:
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        signal.set_wakeup_fd(self._wake_w, warn_on_full_buffer=False)
        for signum in signums:
            self._old_handlers[signum] = signal.signal(signum, self._on_signal)
        # A signal blocked in the mask we inherited (tini's tests block SIGTERM so) would never reach a handler.
        self.caller_mask = signal.pthread_sigmask(signal.SIG_UNBLOCK, signums)

    def _on_signal(self, signum: int, _frame: object) -> None:
        self.pending.append(signum)

    def pop(self) -> int | None:
        return self.pending.pop(0) if self.pending else None

    def wait(self, seconds: float) -> None:
        """Until a signal arrives or *seconds* pass."""
        if self.pending or self._wake_r < 0:
            return
        try:
            ready, _, _ = select.select([self._wake_r], [], [], seconds)
        except InterruptedError:  # pragma: no cover - PEP 475 retries, kept for clarity
            return
        if ready:
            try:
                while os.read(self._wake_r, 512):
                    pass
            except BlockingIOError:
                pass

    def close(self) -> None:
        for signum, handler in self._old_handlers.items():
            signal.signal(signum, handler)
        self._old_handlers.clear()
        if self.caller_mask is not None:
            signal.pthread_sigmask(signal.SIG_SETMASK, self.caller_mask)
            self.caller_mask = None
        if self._wake_w >= 0:
            signal.set_wakeup_fd(-1)
        for fd in (self._wake_r, self._wake_w):
            if fd >= 0:
                os.close(fd)
        self._wake_r = self._wake_w = -1
