"""The terminal's foreground process group, so a job run under safegate in a terminal behaves as run directly.

The job runs in a process group of its own (so signals reach all of it). A job that reads the terminal from a
background group is stopped by SIGTTIN, and Ctrl-C would go to safegate instead of the job: so, when safegate
is the terminal's foreground group, the job is handed the foreground (as tini does), and safegate takes it back
when the job ends or is stopped (Ctrl-Z), so the shell gets its terminal in the state it expects.

Job control goes through the job first: safegate stops once the job has stopped, never while it runs.
"""

from __future__ import annotations

import contextlib
import os
import signal
from typing import TYPE_CHECKING

from safegate.run.procctl import stop_self

if TYPE_CHECKING:
    from safegate.run.job import Job

STOPS = (signal.SIGTSTP, signal.SIGTTIN, signal.SIGTTOU)  # job-control stops


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


class JobControl:
    """Ctrl-Z and `fg`/`bg` passed through: the job stops, then safegate, so the shell sees its job stopped;
    SIGCONT continues both (a job paused for heat stays paused until it cools), with the terminal after `fg`.

    A stop sent to safegate goes to the job, and safegate stops only once the job's main process has stopped:
    safegate must never stop while its job runs, unwatched, and a job that catches SIGTSTP (to ignore it, or to
    save its state first, as vim does before it stops with SIGSTOP) runs on. dumb-init's setsid mode sends the
    job SIGSTOP instead, which overrules that choice of the job's: without safegate the job would not have
    stopped."""

    def __init__(self, tty: Foreground) -> None:
        self.tty = tty
        self.asked = False  # a stop was sent to safegate: it stops once the job has

    def sent(self, signum: int, job: Job, *, held: bool) -> None:
        """*signum*, a stop or SIGCONT, was sent to safegate; *held*: the job is paused for heat (not running)."""
        if signum == signal.SIGCONT:
            self.asked = False
            self.tty.hand_to(job.leader)
            if not held:
                job.signal_all(signal.SIGCONT)
        elif held:
            self._stop()
        else:
            job.forward(signum)
            self.asked = True

    def job_stopped(self, signum: int, *, held: bool) -> None:
        """The job's main process stopped with *signum*. Ctrl-Z in its foreground group, a read or write from the
        background, or after a stop sent to safegate: safegate stops too. Not after the pause for heat (*held*),
        nor, unasked, after someone's SIGSTOP, or without a terminal: no shell would continue safegate."""
        if (self.asked and not held) or (signum in STOPS and self.tty.fd is not None):
            self._stop()

    def _stop(self) -> None:
        self.asked = False
        self.tty.take_back()
        stop_self()


def _set_foreground(fd: int, pgid: int) -> None:
    # From a background group, tcsetpgrp is allowed while SIGTTOU is blocked (else it stops the caller).
    old = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTTOU})
    try:
        os.tcsetpgrp(fd, pgid)
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)
