"""Run a job like a good init and stop it before it takes the machine down.

The job runs in its own process group with the lock's descriptor inherited, so the lock is held while
any process of the job lives. safegate is the job's subreaper: every descendant stays findable and is
reaped. Signals from the caller are forwarded to the job's group; limits are enforced in levels:
warn (and --warn-signal) at 90%, SIGTERM at a breach, SIGKILL after the grace period or at once when
MemAvailable keeps falling to the hard floor.

This module is the lifecycle only, one explicit State: spawn; then a loop of wait, forward signals, reap,
sample and act; escalate; report. Reading a sample is the Sampler's (safegate.sampler), what it means the
watchers' (safegate.watchers); the job's processes are behind safegate.job.Job.

    STARTING -> RUNNING <-> PAUSED                 (spawned; too hot / cool again)
    RUNNING | PAUSED -> TERMINATING -> KILLING     (breach or leftovers: SIGTERM; grace over or hard floor: SIGKILL)
    any -> DONE                                    (every process reaped)
"""

from __future__ import annotations

import contextlib
import errno
import os
import select
import signal
import time
from collections.abc import Callable, Mapping, Sequence
from enum import Enum
from typing import Any

from safegate.errors import SpawnError
from safegate.exitcodes import ExitCode
from safegate.job import Job, ProcessTreeJob
from safegate.limits import WatchLimits
from safegate.outcome import Event, JobStats, Outcome, StatsRecorder
from safegate.procctl import FORWARDED, become_subreaper, child_setup
from safegate.sampler import Probes, Sampler
from safegate.units import format_bytes, format_duration, signal_name
from safegate.watchers import Action, Kind

__all__ = ["Event", "JobStats", "Outcome", "Probes", "State", "Supervisor"]

ENDING = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT)  # a paused job must run to act on these


class State(str, Enum):
    STARTING = "starting"  # nothing spawned yet
    RUNNING = "running"
    PAUSED = "paused"  # SIGSTOPped until every sensor is below resume_temp
    TERMINATING = "terminating"  # SIGTERM sent (a breach, or leftovers of the ended main process); SIGKILL due
    KILLING = "killing"  # SIGKILL sent; sent again, after the deadline, to whatever appears
    DONE = "done"  # every process of the job reaped


def ignored_by_caller() -> tuple[int, ...]:
    """The forwarded signals the caller ignores (nohup's HUP; INT and QUIT for a script's background job): they
    stay ignored in the job, as they would without safegate, and are not forwarded, since safegate ignores them
    too."""
    return tuple(s for s in FORWARDED if signal.getsignal(s) == signal.SIG_IGN)


class SignalInbox:
    """The caller's signals, queued by their handlers; the loop's wait wakes on them through a self-pipe."""

    def __init__(self) -> None:
        self.pending: list[int] = []
        self._wake_r = self._wake_w = -1
        self._old_handlers: dict[int, Any] = {}

    def open(self, signums: Sequence[int]) -> None:
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        signal.set_wakeup_fd(self._wake_w, warn_on_full_buffer=False)
        for signum in signums:
            self._old_handlers[signum] = signal.signal(signum, self._on_signal)

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
        if self._wake_w >= 0:
            signal.set_wakeup_fd(-1)
        for fd in (self._wake_r, self._wake_w):
            if fd >= 0:
                os.close(fd)
        self._wake_r = self._wake_w = -1


class Supervisor:
    def __init__(
        self,
        argv: Sequence[str],
        limits: WatchLimits,
        on_event: Callable[[Event], None],
        *,
        pass_fds: Sequence[int] = (),
        nice: int | None = None,
        on_sample: Callable[[int], None] | None = None,
        on_gpu_sample: Callable[[int], None] | None = None,
        env: Mapping[str, str] | None = None,
        clock: Callable[[], float] = time.monotonic,
        probes: Probes | None = None,
    ) -> None:
        self.argv = list(argv)
        self.limits = limits
        self.emit = on_event
        self.pass_fds = tuple(pass_fds)
        self.nice = nice
        self.on_sample = on_sample  # told the job's memory after each sample (for the reservation)
        self.on_gpu_sample = on_gpu_sample
        self.env = dict(env) if env is not None else None
        self.clock = clock  # monotonic: deadlines must survive wall-clock jumps
        self.probes = probes or Probes()
        self.state = State.STARTING
        self.leader_status: int | None = None  # raw wait status
        self.stats = StatsRecorder(clock())
        self._sampler: Sampler | None = None  # and with it the job, once started
        self._inbox = SignalInbox()
        self._breach: Action | None = None
        self._kill_at: float | None = None  # TERMINATING and KILLING: when SIGKILL is (was) due

    @property
    def sampler(self) -> Sampler:
        assert self._sampler is not None, "the job was not started"
        return self._sampler

    @property
    def job(self) -> Job:
        return self.sampler.job

    # --- spawn ---------------------------------------------------------------------------------------

    def start(self) -> int:
        """Spawn the job; raises SpawnError (126/127) when it cannot be executed."""
        become_subreaper()
        ignored = ignored_by_caller()
        self._inbox.open((*(s for s in FORWARDED if s not in ignored), signal.SIGCHLD))
        parent, nice = os.getpid(), self.nice
        try:
            # fork+exec through os.posix_spawn is not enough: the child must set its group, its
            # parent-death signal and its priority itself before exec.
            pid = _fork_exec(self.argv, self.pass_fds, self.env, lambda: child_setup(parent, nice, ignored))
        except BaseException:
            self._inbox.close()
            raise
        self.attach(ProcessTreeJob(pid))
        return pid

    def attach(self, job: Job) -> None:
        """Supervise *job* from now on (start() attaches the process tree it spawned)."""
        self._sampler = Sampler(self.limits, job, self.stats, clock=self.clock, probes=self.probes,
                                on_sample=self.on_sample, on_gpu_sample=self.on_gpu_sample)
        self.state = State.RUNNING

    # --- the loop ------------------------------------------------------------------------------------

    def watch(self) -> Outcome:
        try:
            interval = self.step()  # at once: a job shorter than one interval still gets figures
            while True:
                self._inbox.wait(interval)
                self._forward_signals()
                self._reap()
                if self._all_gone():
                    break
                interval = self.step()
            self.state = State.DONE
            return self._outcome()
        except BaseException:
            # Whatever broke the watch (an event that could not be written, a bug), the job must not run on
            # unwatched with its lock freed: stop all of it before giving up.
            self._abandon()
            raise
        finally:
            self._inbox.close()

    def _forward_signals(self) -> None:
        while (signum := self._inbox.pop()) is not None:
            if signum == signal.SIGCHLD:
                continue  # _reap runs after every wake-up
            # Forward first: telling about it may fail (a hung-up terminal) and must not stop the signal.
            self.job.forward(signum)
            if self.state is State.PAUSED and signum in ENDING:
                self.job.signal_all(signal.SIGCONT)
            if self.leader_status is None and signum != signal.SIGWINCH:  # a resized terminal is not news
                self.emit(Event("signal", f"forwarded {signal_name(signum)} to the job",
                                {"signal": signal_name(signum)}))

    def _reap(self) -> None:
        while True:
            try:
                pid, status, usage = os.wait4(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            # The kernel's own peak RSS of the process (KiB on Linux): a job shorter than one sampling
            # interval still reports what it used.
            self.job.ended(pid, int(usage.ru_maxrss) * 1024)
            if pid == self.job.leader and self.leader_status is None:  # not a later orphan reusing the pid
                self.leader_status = status
                self._leader_ended()

    def _all_gone(self) -> bool:
        if self.leader_status is None:
            return False
        try:
            # Any child left (adopted orphans included)? As subreaper, no child means no descendant.
            pid, _, usage = os.wait4(-1, os.WNOHANG)
        except ChildProcessError:
            return True
        if pid != 0:
            self.job.ended(pid, int(usage.ru_maxrss) * 1024)
        return False

    def _leader_ended(self) -> None:
        job = self.job
        job.refresh(now=True)
        if job.members():
            # The job is its main command: what it leaves behind is stopped too, then the lock is freed.
            self.emit(Event("cleanup", f"the job's main process ended; stopping {len(job.members())} leftover"
                                       f" process(es)", {"pids": sorted(job.members())}))
            self._terminate()

    def step(self) -> float:
        """Sample the job and the machine and act on what the watchers say; the seconds until the next sample."""
        now = self.clock()
        sampler = self.sampler
        sample = sampler.memory(now)
        # While the job is being stopped, samples still count for the figures but nobody judges them.
        self._act(sampler.gpus(now, judge=not self._stopping))
        self._act(sampler.thermal(now, judge=not self._stopping, paused=self.state is State.PAUSED))
        if self._stopping:
            self._escalate(now, sample.available)
            return self.limits.interval
        for action in sampler.memory_actions(sample):
            self._act(action)
        # A memory breach escalates from the next sample on: the SIGTERM gets at least one interval.
        return self.limits.interval if self._stopping else sampler.interval(sample)

    # --- act -----------------------------------------------------------------------------------------

    def _act(self, action: Action) -> None:
        if action.kind is Kind.NONE:
            return
        if action.kind is Kind.WARN:
            self._warn(action)
        elif action.kind is Kind.PAUSE:
            self.state = State.PAUSED
            self.emit(Event("paused", action.message, action.data))
            self.job.signal_all(signal.SIGSTOP)
        elif action.kind is Kind.RESUME:
            self.state = State.RUNNING
            self.emit(Event("resumed", action.message, action.data))
            self.job.signal_all(signal.SIGCONT)
        elif action.kind is Kind.BREACH:
            self._breach = action
            self.emit(Event("breach", f"{action.message}; sending SIGTERM to the job (SIGKILL in "
                                      f"{format_duration(self.limits.grace)})",
                            {**action.data, "reason": action.reason}))
            self._terminate()

    def _warn(self, action: Action) -> None:
        signum = self.limits.warn_signal
        if action.warn_signal and signum is not None and self.leader_status is None:
            name = signal_name(signum)
            self.emit(Event("warning", f"{action.message}; sending {name} to the job", {**action.data, "signal": name}))
            self.job.forward(signum)
        else:
            self.emit(Event("warning", action.message, action.data))

    # --- escalate ------------------------------------------------------------------------------------

    @property
    def _stopping(self) -> bool:
        return self.state in (State.TERMINATING, State.KILLING)

    def _terminate(self) -> None:
        self.job.terminate_all()
        # Also called when the main process ends during the grace period and leaves processes behind: the
        # deadline starts over for them, and a job already being killed stays so.
        self._kill_at = self.clock() + self.limits.grace
        if self.state is not State.KILLING:
            self.state = State.TERMINATING

    def _escalate(self, now: float, available: int) -> None:
        assert self._kill_at is not None
        if self.state is State.KILLING:
            if now >= self._kill_at:
                self.job.signal_all(signal.SIGKILL)  # anything that appeared since
            return
        hard = self.limits.hard_floor
        if hard is not None and available <= hard:
            self.emit(Event("signal", f"MemAvailable {format_bytes(available)} fell to the hard floor "
                                      f"{format_bytes(hard)}; sending SIGKILL", {"available": available}))
            self._kill()
        elif now >= self._kill_at:
            self.emit(Event("signal", f"still running after {format_duration(self.limits.grace)}; sending SIGKILL",
                            {"pids": sorted(self.job.members())}))
            self._kill()

    def _kill(self) -> None:
        self.state = State.KILLING
        self.job.signal_all(signal.SIGKILL)

    def _abandon(self) -> None:
        # Real time, not self.clock: this runs because something broke, and it must end.
        with contextlib.suppress(BaseException):
            job = self.job
            job.terminate_all()
            deadline = time.monotonic() + min(self.limits.grace, 5.0)
            while time.monotonic() < deadline:
                self._reap()
                if self.leader_status is not None and self._all_gone():
                    return
                time.sleep(0.05)
            job.signal_all(signal.SIGKILL)
            while True:
                try:
                    os.wait4(-1, 0)
                except ChildProcessError:
                    return

    # --- report --------------------------------------------------------------------------------------

    def _outcome(self) -> Outcome:
        status = self.leader_status
        assert status is not None
        stats = self.stats.result(self.clock(), self.job.peak())
        sig = os.WTERMSIG(status) if os.WIFSIGNALED(status) else None
        exit_status = os.WEXITSTATUS(status) if os.WIFEXITED(status) else None
        if self._breach is not None:
            assert self._breach.code is not None
            return Outcome(int(self._breach.code), self._breach.reason, exit_status, sig, stats)
        if sig is not None:
            return Outcome(ExitCode.for_signal(sig), "signalled", None, sig, stats)
        assert exit_status is not None
        return Outcome(exit_status, "exited", exit_status, None, stats)


def _fork_exec(
    argv: Sequence[str], pass_fds: Sequence[int], env: Mapping[str, str] | None, setup: Callable[[], None]
) -> int:
    """Start *argv* through subprocess (which reports exec failures to the parent), keeping only the pid."""
    import subprocess

    try:
        proc = subprocess.Popen(
            list(argv), pass_fds=tuple(pass_fds), env=dict(env) if env is not None else None,
            preexec_fn=setup, close_fds=True,  # noqa: PLW1509 - safegate runs no threads
        )
    except FileNotFoundError:
        raise SpawnError(f"command not found: {argv[0]}", ExitCode.NOT_FOUND) from None
    except PermissionError:
        raise SpawnError(f"command not executable: {argv[0]} (permission denied)", ExitCode.NOT_EXECUTABLE) from None
    except OSError as exc:
        code = ExitCode.NOT_FOUND if exc.errno == errno.ENOENT else ExitCode.NOT_EXECUTABLE
        raise SpawnError(f"cannot execute {argv[0]}: {exc.strerror}", code) from None
    # We reap with waitpid(-1); the Popen object must not try to do it too.
    proc.returncode = 0
    return proc.pid
