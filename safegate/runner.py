"""safegate exec, end to end: admission, spawning under the lock, watching, releasing, summarising."""

from __future__ import annotations

import shlex
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import psutil

from safegate.config import DEFAULT_MIN_AVAILABLE, DEFAULT_MIN_AVAILABLE_FRACTION
from safegate.gate import Settings, admit
from safegate.lockstore import HeldLock
from safegate.policy import Verdict
from safegate.supervisor import Event, Outcome, Supervisor
from safegate.units import Size, format_bytes, format_duration, parse_size
from safegate.watch import WatchLimits

# The holder metadata's `used` (for reservations) is rewritten at most this often, and only on change.
USED_UPDATE_EVERY = 0.5
USED_UPDATE_STEP = 64 * 1024**2


@dataclass(frozen=True)
class ExecOverrides:
    max_mem: Size | None = None
    min_available: Size | None = None
    on_hot: str | None = None
    grace: float | None = None
    interval: float | None = None
    warn_signal: int | None = None
    nice: int | None = None


def watch_limits(settings: Settings, overrides: ExecOverrides, total_ram: int) -> WatchLimits:
    profile = settings.profile
    max_mem = overrides.max_mem if overrides.max_mem is not None else profile.max_mem
    floor = overrides.min_available if overrides.min_available is not None else profile.min_available
    if floor is None:
        min_available = min(parse_size(DEFAULT_MIN_AVAILABLE).resolve(total_ram),
                            int(total_ram * DEFAULT_MIN_AVAILABLE_FRACTION))
    else:
        min_available = floor.resolve(total_ram)
    return WatchLimits(
        max_mem=max_mem.resolve(total_ram) if max_mem is not None else None,
        min_available=min_available if min_available > 0 else None,
        max_temp=settings.max_temp,
        resume_temp=settings.resume_temp,
        on_hot=overrides.on_hot or profile.on_hot,
        grace=overrides.grace if overrides.grace is not None else profile.grace,
        floor=overrides.interval if overrides.interval is not None else profile.interval,
        warn_signal=overrides.warn_signal if overrides.warn_signal is not None else profile.warn_signal,
        thermal=settings.thermal,
    )


class _UsedReporter:
    """Keeps the holder metadata's `used` current while the job is still growing toward its need."""

    def __init__(self, held: HeldLock) -> None:
        self.held = held
        self.last_time = 0.0
        self.last_value = 0

    def __call__(self, job_mem: int) -> None:
        holder = self.held.holder
        if holder is None or holder.used >= holder.need:
            return  # no reservation left to keep current
        now = time.monotonic()
        reached = job_mem >= holder.need
        due = now - self.last_time >= USED_UPDATE_EVERY and abs(job_mem - self.last_value) >= USED_UPDATE_STEP
        if reached or due:
            self.held.update_holder(used=min(job_mem, holder.need))
            self.last_time, self.last_value = now, job_mem


def run_exec(
    settings: Settings,
    limits: WatchLimits,
    argv: Sequence[str],
    *,
    nice: int | None,
    wait: bool,
    timeout: float | None,
    on_event: Callable[[Event], None],
    on_blocked: Callable[[Verdict], None] | None = None,
) -> Verdict | Outcome:
    """The blocking verdict when preflight fails, else the job's outcome."""
    verdict, held = admit(settings, argv, wait=wait, timeout=timeout, on_blocked=on_blocked)
    if held is None:
        return verdict
    with held:
        supervisor = Supervisor(argv, limits, on_event, pass_fds=[held.fd], nice=nice, on_sample=_UsedReporter(held))
        pid = supervisor.start()
        try:
            start_time = psutil.Process(pid).create_time()
        except psutil.Error:
            start_time = None
        held.update_holder(job_pid=pid, job_start_time=start_time)
        on_event(Event("admitted", f"started pid {pid} (profile {settings.profile.name}, lock {settings.lock}): "
                                   f"{printable_command(argv)}",
                       {"pid": pid, "profile": settings.profile.name, "lock": settings.lock, "argv": list(argv),
                        "max_mem": limits.max_mem, "min_available": limits.min_available}))
        if held.metadata_error:
            on_event(Event("warning", held.metadata_error))
        outcome = supervisor.watch()
    on_event(Event("exit", _exit_message(outcome), {"exit_code": outcome.exit_code, "reason": outcome.reason,
                                                  "status": outcome.status, "signal": outcome.signal}))
    on_event(Event("summary", summary_line(outcome), {**outcome.stats, "reason": outcome.reason,
                                                       "exit_code": outcome.exit_code}))
    return outcome


def printable_command(argv: Sequence[str], limit: int = 200) -> str:
    """The command as a shell would quote it, on one line whatever its arguments hold."""
    text = shlex.join(argv)
    text = "".join(ch if ch.isprintable() else repr(ch)[1:-1] for ch in text)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _exit_message(outcome: Outcome) -> str:
    import signal

    if outcome.reason in ("memory", "thermal"):
        how = f"killed by {signal.Signals(outcome.signal).name}" if outcome.signal else f"exited {outcome.status}"
        return f"job stopped for {outcome.reason} ({how}); exit {outcome.exit_code}"
    if outcome.signal is not None:
        return f"job died of {signal.Signals(outcome.signal).name}; exit {outcome.exit_code}"
    return f"job exited {outcome.status}"


def summary_line(outcome: Outcome) -> str:
    s = outcome.stats
    parts = [
        f"duration {format_duration(s['duration'])}",
        f"peak job memory {format_bytes(s['peak_job_memory'])}",
    ]
    if s["lowest_available"] is not None:
        parts.append(f"lowest MemAvailable {format_bytes(s['lowest_available'])}")
    parts.append(f"highest temperature {s['highest_temp']:g} C" if s["highest_temp"] is not None
                 else "highest temperature unknown")
    parts.append(f"exit reason {outcome.reason}")
    return ", ".join(parts)
