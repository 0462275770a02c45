"""Run a job like a good init and stop it before it takes the machine down.

The job runs in its own process group with the lock's descriptor inherited, so the lock is held while
any process of the job lives. safegate is the job's subreaper: every descendant stays findable and is
reaped. Signals from the caller are forwarded to the job's group; limits are enforced in levels:
warn (and --warn-signal) at 90%, SIGTERM at a breach, SIGKILL after the grace period or at once when
MemAvailable keeps falling to the hard floor.

This module is the lifecycle only, one explicit State: spawn; then a loop of wait, forward signals, reap,
sample and act; escalate; report. Reading a sample is the Sampler's (safegate.run.sampler), what it means the
watchers' (safegate.run.watchers); the job's processes are behind safegate.run.job.Job.

    STARTING -> RUNNING <-> PAUSED                 (spawned; too hot / cool again)
    RUNNING | PAUSED -> TERMINATING -> KILLING     (breach or leftovers: SIGTERM; grace over or hard floor: SIGKILL)
    any -> DONE                                    (every process reaped)
"""

from __future__ import annotations

import contextlib
import os
import signal
import time
from collections.abc import Callable, Mapping, Sequence
from enum import Enum

from safegate.cgroups import JobCgroup
from safegate.exitcodes import ExitCode
from safegate.run.inbox import SignalInbox
from safegate.run.job import Job
from safegate.run.launch import launch
from safegate.run.limits import WatchLimits
from safegate.run.outcome import Event, JobStats, Outcome, StatsRecorder
from safegate.run.procctl import JOB_CONTROL
from safegate.run.sampler import Hooks, Probes, Sampler
from safegate.run.terminal import Foreground, JobControl
from safegate.run.watchers import Action, Kind
from safegate.units import format_bytes, format_duration, signal_name

__all__ = ["Event", "JobStats", "Outcome", "Probes", "State", "Supervisor"]

ENDING = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT)  # a paused job must run to act on these


class State(str, Enum):
    STARTING = "starting"  # nothing spawned yet
    RUNNING = "running"
    PAUSED = "paused"  # SIGSTOPped until every sensor is below resume_temp
    TERMINATING = "terminating"  # SIGTERM sent (a breach, or leftovers of the ended main process); SIGKILL due
    KILLING = "killing"  # SIGKILL sent; sent again, after the deadline, to whatever appears
    DONE = "done"  # every process of the job reaped


class Supervisor:
    def __init__(
        self,
        argv: Sequence[str],
        limits: WatchLimits,
        on_event: Callable[[Event], None],
        *,
        pass_fds: Sequence[int] = (),
        nice: int | None = None,
        oom_score_adj: int | None = None,
        on_sample: Callable[[int], None] | None = None,
        on_gpu_sample: Callable[[int], None] | None = None,
        env: Mapping[str, str] | None = None,
        clock: Callable[[], float] = time.monotonic,
        probes: Probes | None = None,
        cgroup: JobCgroup | None = None,
        timeline: bool = False,
    ) -> None:
        self.argv = list(argv)
        self.limits = limits
        self.emit = on_event
        self.pass_fds = tuple(pass_fds)
        self.nice = nice
        self.oom_score_adj = oom_score_adj  # the job's (never below safegate's own); None: left as it is
        self._hooks = Hooks(on_sample, on_gpu_sample, on_event if timeline else None, on_event)  # for the Sampler
        self.env = dict(env) if env is not None else None
        self.clock = clock  # monotonic: deadlines must survive wall-clock jumps
        self.probes = probes or Probes()
        self.cgroup = cgroup  # the job's own, made by the caller; None: the job is its process tree
        self.state = State.STARTING
        self.leader_status: int | None = None  # raw wait status
        self.stats = StatsRecorder(clock())
        self._sampler: Sampler | None = None  # and with it the job, once started
        self._inbox = SignalInbox()
        self._tty = Foreground.detect()
        self._job_control = JobControl(self._tty)
        self._breach: Action | None = None
        self._kill_at: float | None = None  # TERMINATING and KILLING: when SIGKILL is (was) due

    @property
    def sampler(self) -> Sampler:
        assert self._sampler is not None, "the job was not started"
        return self._sampler

    @property
    def job(self) -> Job:
        return self.sampler.job

    def start(self) -> int:
        """Spawn the job; raises SpawnError (126/127) when it cannot be executed."""
        pid, job, self.cgroup = launch(self.argv, self.pass_fds, self.env, self.nice, self._inbox, self._tty,
                                       self.cgroup, self.emit, self.oom_score_adj)
        self.attach(job)
        return pid

    def attach(self, job: Job) -> None:
        """Supervise *job* from now on (start() attaches the process tree it spawned)."""
        self._sampler = Sampler(self.limits, job, self.stats, clock=self.clock, probes=self.probes, hooks=self._hooks)
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
                if self.leader_status is not None and not self._stopping:
                    self._stop_leftovers()  # also those a fork-and-exit chain left for us, its subreaper
                interval = self.step()
            if self._breach is None:  # the kernel's cap ended the job between two samples
                self._act(self.sampler.kernel_breach())
            self.state = State.DONE
            return self._outcome()
        except BaseException:
            # Whatever broke the watch (an event that could not be written, a bug), the job must not run on
            # unwatched with its lock freed: stop all of it before giving up.
            self._abandon()
            raise
        finally:
            self._tty.take_back()
            self._inbox.close()

    def _forward_signals(self) -> None:
        while (signum := self._inbox.pop()) is not None:
            if signum == signal.SIGCHLD:
                continue  # _reap runs after every wake-up
            if signum in JOB_CONTROL:
                self._job_control.sent(signum, self.job, held=self.state is State.PAUSED)
                continue
            # Forward first: telling about it may fail (a hung-up terminal) and must not stop the signal.
            self.job.forward(signum)
            if self.state is State.PAUSED and signum in ENDING:
                self.job.resume()
            if self.leader_status is None and signum != signal.SIGWINCH:  # a resized terminal is not news
                self.emit(Event("signal", f"forwarded {signal_name(signum)} to the job",
                                {"signal": signal_name(signum)}))

    def _reap(self) -> None:
        while True:
            try:
                pid, status, usage = os.wait4(-1, os.WNOHANG | os.WUNTRACED)
            except ChildProcessError:
                return
            if pid == 0:
                return
            if os.WIFSTOPPED(status):
                if pid == self.job.leader:
                    self._job_control.job_stopped(os.WSTOPSIG(status), held=self.state is State.PAUSED)
                continue
            # The kernel's own peak RSS of the process (KiB on Linux): a job shorter than one sampling
            # interval still reports what it used.
            self.job.ended(pid, int(usage.ru_maxrss) * 1024)
            if pid == self.job.leader and self.leader_status is None:  # not a later orphan reusing the pid
                self.leader_status = status
                self._tty.take_back()  # what the job left behind must not read the shell's input

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
        return pid == 0 and self.job.emptied()  # a child that is not the job's may be left: a scope's anchor

    def _stop_leftovers(self) -> None:
        # The job is its main command: what it leaves behind is stopped too, then the lock is freed. Until a scan
        # finds them, the loop calls this again (a fork-and-exit chain may be between two generations).
        self.job.refresh(now=True)
        if self.job.members():
            self.emit(Event("cleanup", f"the job's main process ended; stopping {len(self.job.members())} "
                                       "leftover process(es)", {"pids": sorted(self.job.members())}))
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
            if self.state is State.TERMINATING:
                self.job.terminate_all()  # what appeared since is asked too (a chain that forked on)
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
            self.job.pause()
        elif action.kind is Kind.RESUME:
            self.state = State.RUNNING
            self.emit(Event("resumed", action.message, action.data))
            self.job.resume()
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
        if self.state is State.PAUSED:
            self.job.resume()  # held for heat, all of it must run to act on SIGTERM (also one whose stop is in flight)
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
        with contextlib.suppress(BaseException):
            abandon(self.job, self.limits.grace, self._gone)

    def _gone(self) -> bool:
        self._reap()
        return self.leader_status is not None and self._all_gone()

    def _outcome(self) -> Outcome:
        assert self.leader_status is not None
        return outcome_of(self.leader_status, self._breach, self.stats.result(self.clock(), self.job.peak()))


def outcome_of(status: int, breach: Action | None, stats: JobStats) -> Outcome:
    """What the job's run comes to: a breach's code, or the main process's own status (128+N when signalled)."""
    sig = os.WTERMSIG(status) if os.WIFSIGNALED(status) else None
    exit_status = os.WEXITSTATUS(status) if os.WIFEXITED(status) else None
    if breach is not None:
        assert breach.code is not None
        return Outcome(int(breach.code), breach.reason, exit_status, sig, stats)
    if sig is not None:
        return Outcome(ExitCode.for_signal(sig), "signalled", None, sig, stats)
    assert exit_status is not None
    return Outcome(exit_status, "exited", exit_status, None, stats)


def abandon(job: Job, grace: float, gone: Callable[[], bool]) -> None:
    """Stop all of the job when the watch broke: SIGTERM, at most *grace* (5 s at most) to end, then SIGKILL until
    *gone*. Real time, not the supervisor's clock: this runs because something broke, and it must end."""
    job.terminate_all()
    deadline = time.monotonic() + min(grace, 5.0)
    while not gone():
        if time.monotonic() >= deadline:
            job.signal_all(signal.SIGKILL)
        time.sleep(0.05)
