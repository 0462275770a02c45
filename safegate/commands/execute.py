"""exec: choose the profile, apply a Slurm job's limits, wire the event log, and run the job under the gate."""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import replace

from safegate.config import load_config
from safegate.eventlog import EventLog
from safegate.gate import Overrides, Settings, resolve
from safegate.render import blocking_summary
from safegate.results import Verdict
from safegate.runner import ExecOverrides, run_exec
from safegate.supervisor import Event, Outcome
from safegate.units import Size


def slurm_job_limits(settings: Settings, overrides: ExecOverrides, env: Mapping[str, str]) -> ExecOverrides:
    """Inside a Slurm job: refuse a licensed profile without its license, and stop the job a little before the
    job's memory allocation (the cgroup OOM killer would otherwise end it without a word)."""
    if not env.get("SLURM_JOB_ID"):
        return overrides
    from safegate import slurm

    if settings.profile.slurm_license:
        slurm.require_license(settings.profile.slurm_license, env)
    if overrides.max_mem is None and settings.profile.max_mem is None:
        job_limit = slurm.default_max_mem(env)
        if job_limit is not None:
            return replace(overrides, max_mem=Size(bytes=job_limit))
    return overrides


def execute(
    command: Sequence[str], *, config: str | None, profile: str | None, overrides: Overrides,
    exec_overrides: ExecOverrides, wait: bool, timeout: float | None, log: str | None,
    on_event: Callable[[Event], None], on_blocked: Callable[[Verdict], None] | None,
    on_log_error: Callable[[str], None],
) -> Verdict | Outcome:
    """The blocking verdict when the job could not start, else its outcome. Every event goes to *on_event* and,
    with --log (or the profile's log), to the log file."""
    cfg = load_config(config)
    settings = resolve(cfg, profile or cfg.profile_for_command(list(command)).name, overrides)
    exec_overrides = slurm_job_limits(settings, exec_overrides, os.environ)
    log_path = log or settings.profile.log
    event_log = EventLog(log_path, on_log_error) if log_path else None

    def emit(event: Event) -> None:
        on_event(event)
        if event_log is not None:
            event_log.write(event)

    nice = exec_overrides.nice if exec_overrides.nice is not None else settings.profile.nice
    result = run_exec(settings, exec_overrides, command, nice=nice, wait=wait, timeout=timeout, on_event=emit,
                      on_blocked=on_blocked)
    if isinstance(result, Verdict) and event_log is not None:
        event_log.write(Event("blocked", blocking_summary(result), {"exit_code": int(result.exit_code)}))
    return result
