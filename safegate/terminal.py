"""The terminal's foreground process group, so a job run under safegate in a terminal behaves as run directly.

The job runs in a process group of its own (so signals reach all of it). A job that reads the terminal from a
background group is stopped by SIGTTIN, and Ctrl-C would go to safegate instead of the job: so, when safegate
is the terminal's foreground group, the job is handed the foreground (as tini does), and safegate takes it back
when the job ends or is stopped (Ctrl-Z), so the shell gets its terminal in the state it expects.
"""

from __future__ import annotations

import contextlib
import os
import signal


class Foreground:
    """The controlling terminal safegate runs in the foreground of, or none (cron, a pipe, a background job)."""

    def __init__(self, fd: int | None, *, ours: bool) -> None:
        self.fd = fd
        self.ours = ours  # safegate was in the foreground when the job started
        self.given_to: int | None = None  # the job's group, while it has the foreground

    @classmethod
    def detect(cls) -> Foreground:
        """The first of stdin, stdout and stderr that is our controlling terminal (tcgetpgrp fails on any other
        terminal), and whether safegate is in its foreground now. A job started in the background (`&`) gets
        the terminal later, when the shell brings safegate to the foreground (`fg`)."""
        for fd in (0, 1, 2):
            with contextlib.suppress(OSError):
                if os.isatty(fd):
                    return cls(fd, ours=os.tcgetpgrp(fd) == os.getpgrp())
        return cls(None, ours=False)

    def claim_in_child(self) -> None:
        """In the job, after setpgid and before exec: take the foreground for the job's new group.

        A background group's tcsetpgrp raises SIGTTOU, which would stop the child: it is ignored for the call."""
        if self.fd is None or not self.ours:
            return
        previous = signal.signal(signal.SIGTTOU, signal.SIG_IGN)
        with contextlib.suppress(OSError):
            os.tcsetpgrp(self.fd, os.getpgrp())
        signal.signal(signal.SIGTTOU, previous)

    def handed(self, pgid: int) -> None:
        """The job's group *pgid* got the foreground from claim_in_child."""
        if self.fd is not None and self.ours:
            self.given_to = pgid

    def hand_to(self, pgid: int) -> None:
        """Give the foreground (back) to the job, if safegate has it now (after `fg`, not after `bg`)."""
        if self.fd is None:
            return
        with contextlib.suppress(OSError):
            if os.tcgetpgrp(self.fd) == os.getpgrp():
                _set_foreground(self.fd, pgid)
                self.given_to = pgid

    def take_back(self) -> None:
        """The foreground back to safegate's group, unless the shell has taken it meanwhile (after `bg`)."""
        if self.fd is None or self.given_to is None:
            return
        self.given_to = None
        with contextlib.suppress(OSError):
            now = os.tcgetpgrp(self.fd)
            if now not in (os.getpgrp(), os.getpgid(os.getppid())):
                _set_foreground(self.fd, os.getpgrp())


def _set_foreground(fd: int, pgid: int) -> None:
    # From a background group, tcsetpgrp is allowed while SIGTTOU is blocked (else it stops the caller).
    old = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTTOU})
    try:
        os.tcsetpgrp(fd, pgid)
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)
