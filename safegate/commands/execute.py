"""exec: choose the profile, apply a Slurm job's limits, wire the event log, and run the job under the gate."""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Mapping, Sequence

from msgspec.structs import replace

from safegate.config.file import load_config
from safegate.config.model import Overrides
from safegate.errors import SpawnError, UsageError
from safegate.gate.preflight import Settings, resolve
from safegate.gate.results import Cause, Verdict, blocking_cause, blocking_summary
from safegate.run.eventlog import EventLog, check_log_path
from safegate.run.jobrun import run_exec
from safegate.run.notify import Notifier
from safegate.run.outcome import Event, Outcome
from safegate.units import Size


def slurm_job_limits(settings: Settings, env: Mapping[str, str]) -> Settings:
    """Inside a Slurm job: refuse a licensed profile without its license, and stop the job a little before the
    job's memory allocation (the cgroup OOM killer would otherwise end it without a word)."""
    if not env.get("SLURM_JOB_ID"):
        return settings
    from safegate.commands import slurm

    if settings.profile.slurm_license:
        slurm.require_license(settings.profile.slurm_license, env)
    if settings.profile.max_mem is None:
        job_limit = slurm.default_max_mem(env)
        if job_limit is not None:
            return replace(settings, profile=replace(settings.profile, max_mem=Size(bytes=job_limit)))
    return settings


def execute(
    command: Sequence[str], *, config: str | None, profile: str | None, overrides: Overrides, wait: bool,
    timeout: float | None, on_event: Callable[[Event], None], on_blocked: Callable[[Verdict], None] | None,
    on_log_error: Callable[[str], None],
) -> Verdict | Outcome:
    """The blocking verdict when the job could not start, else its outcome. Every event goes to *on_event* and,
    with --log (or the profile's log), to the log file."""
    if command and not command[0]:
        # execvp("") fails with a bare EACCES or ENOENT; say what is wrong before anything starts.
        raise UsageError("exec: the command name is empty (''); expected a program to run, like: exec -- whisper ...")
    cfg = load_config(config)
    settings = resolve(cfg, profile, overrides, command=command)
    settings = slurm_job_limits(settings, os.environ)
    if settings.profile.log:
        check_log_path(settings.profile.log)
    event_log = EventLog(settings.profile.log, on_log_error) if settings.profile.log else None
    notifier: Notifier | None = None

    def emit(event: Event) -> None:
        on_event(event)
        if event_log is not None:
            event_log.write(event)
        if notifier is not None:
            notifier.notify(event)

    if settings.profile.notify:
        # Started before the lock is taken and the job spawned: its runner holds neither.
        notifier = Notifier(settings.profile.notify, lambda text: emit(Event("warning", text)), clock=time.monotonic)
    waiting: list[Cause] = []  # the cause the log last said

    def blocked(verdict: Verdict) -> None:
        # The log says when the wait starts and each time its cause changes, in full (stderr's lines are cut
        # short); not on stderr (the waiting line says it) nor to --notify.
        cause = blocking_cause(verdict)
        if event_log is not None and waiting[-1:] != [cause]:
            event_log.write(Event("waiting", blocking_summary(verdict), {
                "exit_code": int(verdict.exit_code), "checks": [c.name for c in verdict.failures]}))
            waiting[:] = [cause]
        if on_blocked is not None:
            on_blocked(verdict)

    arrived = time.monotonic()
    try:
        result = run_exec(settings, command, wait=wait, timeout=timeout, on_event=emit, on_blocked=blocked)
    except SpawnError as exc:
        # A night's log must say why nothing ran (a cron PATH without the job's command, say), not stay empty.
        if event_log is not None:
            event_log.write(Event("not_started", str(exc), {"exit_code": int(exc.exit_code)}))
        raise
    finally:
        if notifier is not None:
            notifier.close()
    if isinstance(result, Verdict) and event_log is not None:
        event_log.write(Event("blocked", blocking_summary(result), {
            "exit_code": int(result.exit_code), "waited": round(time.monotonic() - arrived, 3)}))
    return result
