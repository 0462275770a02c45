"""Start the job: in a process group of its own, as our child, in its own cgroup when it has one.

A job entering a systemd scope is started through systemd-run, then waits on a pipe until safegate has checked
that the scope really got its controllers and limits (systemd ignores some silently, systemd#9641). If it did
not, or systemd-run failed, the job has not run yet: with `--cgroup auto` it is started again without a cgroup
(with one notice saying why), with `--cgroup on` that is an error.

The job's oom_score_adj is raised in the child before exec (procctl.OomScore), so the kernel's OOM killer and
earlyoom take it first; once it runs, safegate lowers its own where the kernel allows. Neither failing fails the
job: a job that could not be raised is one notice, a supervisor that may not lower itself keeps the caller's.
"""

from __future__ import annotations

import contextlib
import errno
import os
import signal
from collections.abc import Callable, Mapping, Sequence

from safegate.cgroups import JobCgroup
from safegate.errors import CgroupError, SpawnError
from safegate.exitcodes import ExitCode
from safegate.run.inbox import SignalInbox, ignored_by_caller
from safegate.run.job import CgroupJob, Job, ProcessTreeJob
from safegate.run.outcome import Event
from safegate.run.procctl import FAULTS, FORWARDED, JOB_CONTROL, OomScore, become_subreaper, child_setup, oom_score_adj
from safegate.run.terminal import Foreground


def launch(argv: Sequence[str], pass_fds: Sequence[int], env: Mapping[str, str] | None, nice: int | None,
           inbox: SignalInbox, tty: Foreground, cgroup: JobCgroup | None, emit: Callable[[Event], None],
           oom_score: int | None = None) -> tuple[int, Job, JobCgroup | None]:
    """The job's pid, the Job to watch, and the cgroup it really runs in (None: its process tree only).
    *oom_score*: the job's oom_score_adj (the caller's when that is higher; None: left as it is).
    Raises SpawnError (126/127) when it cannot be executed, CgroupError for `--cgroup on` without one."""
    become_subreaper()
    ignored = ignored_by_caller()
    oom = _oom(oom_score, emit)
    inbox.open((*(s for s in (*FORWARDED, *JOB_CONTROL) if s not in ignored), signal.SIGCHLD),
               tuple(s for s in FAULTS if s not in ignored))
    try:
        started: tuple[int, Job, JobCgroup | None] | None = None
        if cgroup is not None:
            try:
                pid = _start(argv, pass_fds, env, nice, ignored, inbox, tty, cgroup, oom)
                started = pid, CgroupJob(pid, cgroup), cgroup
            except CgroupError as exc:
                if cgroup.required:
                    raise
                emit(Event("notice", f"no cgroup for the job ({exc}); watching its process tree instead",
                           {"cgroup": None, "reason": str(exc)}))
        if started is None:
            pid = _start(argv, pass_fds, env, nice, ignored, inbox, tty, None, oom)
            started = pid, ProcessTreeJob(pid), None
    except BaseException:
        inbox.close()
        raise
    if oom is not None:
        if (why := oom.failure()) is not None:
            emit(Event("notice", f"cannot raise the job's oom_score_adj to {oom.job} ({why}); it runs with "
                                 f"safegate's, {oom.caller}", {"reason": why}))
        # After the fork: the job must not inherit the lowered score, even for the moment before it sets its own.
        oom.lower_supervisor()
    return started


def _oom(setting: int | None, emit: Callable[[Event], None]) -> OomScore | None:
    if setting is None:
        return None
    caller = oom_score_adj()
    if caller is None:
        emit(Event("notice", "cannot read safegate's own oom_score_adj (no /proc?); the job's is left as it is",
                   {"reason": "no /proc/self/oom_score_adj"}))
        return None
    return OomScore(setting, caller)


def _start(argv: Sequence[str], pass_fds: Sequence[int], env: Mapping[str, str] | None, nice: int | None,
           ignored: tuple[int, ...], inbox: SignalInbox, tty: Foreground, cgroup: JobCgroup | None,
           oom: OomScore | None) -> int:
    parent, mask = os.getpid(), inbox.caller_mask
    enter = None
    if cgroup is not None:
        argv, env = cgroup.wrap(argv, env)
        pass_fds = (*pass_fds, *cgroup.job_fds())
        enter = cgroup.enter
    # fork+exec through os.posix_spawn is not enough: the child must set its group, its parent-death
    # signal, its terminal and its priority itself before exec.
    try:
        pid = _fork_exec(argv, pass_fds, env,
                         lambda: child_setup(parent, nice, ignored, mask, tty.claim_in_child, enter, oom))
    except BaseException:
        if cgroup is not None:
            cgroup.release(go=False)
        raise
    tty.handed(pid)
    if cgroup is not None:
        try:
            cgroup.adopt(pid)
        except CgroupError:
            cgroup.release(go=False)  # the job has not run: it ends, and is started again or not at all
            _reap(pid)
            tty.take_back()
            raise
        cgroup.release(go=True)
    return pid


def _reap(pid: int) -> None:
    with contextlib.suppress(ChildProcessError):
        os.waitpid(pid, 0)


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
