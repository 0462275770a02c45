"""Pure policy: (snapshot, thresholds) -> check result. No I/O here, so every boundary is unit-testable."""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

from safegate.config import CompetingRule
from safegate.exitcodes import ExitCode
from safegate.lockstore import LegacyState, LockState, Removal
from safegate.snapshots import MemorySnapshot, ProcessInfo, ProcessSnapshot, ThermalSnapshot
from safegate.units import format_bytes, format_duration


class Status(str, Enum):
    PASS = "pass"
    FAIL = "fail"
    WARN = "warn"
    UNKNOWN = "unknown"


@dataclass(frozen=True)
class CheckResult:
    name: str
    status: Status
    reason: str
    code: ExitCode  # returned when this check fails
    values: Mapping[str, Any] = field(default_factory=dict)
    thresholds: Mapping[str, Any] = field(default_factory=dict)

    @property
    def blocks(self) -> bool:
        return self.status is Status.FAIL


# Fixed order for the exit code when several checks fail: the lowest code wins, as listed in the table.
CHECK_ORDER = ("stale_locks", "memory", "memory_pressure", "thermal", "lock", "competing")


@dataclass(frozen=True)
class Verdict:
    profile: str
    checks: tuple[CheckResult, ...]

    @property
    def failures(self) -> tuple[CheckResult, ...]:
        return tuple(c for c in self.checks if c.blocks)

    @property
    def ok(self) -> bool:
        return not self.failures

    @property
    def exit_code(self) -> ExitCode:
        failures = self.failures
        return min((c.code for c in failures), default=ExitCode.OK)

    def result(self, name: str) -> CheckResult | None:
        return next((c for c in self.checks if c.name == name), None)


def check_memory(mem: MemorySnapshot, need: int, margin: int, reserved: int = 0) -> CheckResult:
    """available - reserved - need >= margin; *reserved* is what jobs still loading will take."""
    left = mem.available - reserved - need
    values = {"available": mem.available, "total": mem.total, "reserved": reserved, "need": need,
              "left_after_start": left}
    thresholds = {"margin": margin}
    held_back = f" - reserved {format_bytes(reserved)}" if reserved else ""
    summary = (
        f"available {format_bytes(mem.available)}{held_back} - need {format_bytes(need)} = {format_bytes(left)}"
    )
    if left >= margin:
        return CheckResult("memory", Status.PASS, f"{summary} >= margin {format_bytes(margin)}",
                           ExitCode.MEMORY, values, thresholds)
    return CheckResult("memory", Status.FAIL, f"{summary} < margin {format_bytes(margin)}",
                       ExitCode.MEMORY, values, thresholds)


def check_pressure(mem: MemorySnapshot, max_pressure: float) -> CheckResult:
    thresholds = {"max_some_avg10": max_pressure}
    value = mem.pressure_some_avg10
    if value is None:
        return CheckResult("memory_pressure", Status.UNKNOWN, "no /proc/pressure/memory on this system",
                           ExitCode.MEMORY, {"some_avg10": None}, thresholds)
    values = {"some_avg10": value}
    if value > max_pressure:
        return CheckResult("memory_pressure", Status.FAIL,
                           f"memory pressure some avg10 {value:g}% > {max_pressure:g}%: the machine is thrashing",
                           ExitCode.MEMORY, values, thresholds)
    return CheckResult("memory_pressure", Status.PASS, f"memory pressure some avg10 {value:g}% <= {max_pressure:g}%",
                       ExitCode.MEMORY, values, thresholds)


def check_thermal(thermal: ThermalSnapshot, limit: float, *, require: bool, resuming: bool = False) -> CheckResult:
    """The hottest sensor must be below *limit* (max_temp, or resume_temp while waiting after a thermal block)."""
    limit_name = "resume_temp" if resuming else "max_temp"
    thresholds = {limit_name: limit, "require": require}
    notes = "; ".join(thermal.notes)
    hottest = thermal.hottest
    if hottest is None:
        values: dict[str, Any] = {"hottest": None, "sensors": {}, "notes": list(thermal.notes)}
        why = "no readable temperature sensor" + (f" ({notes})" if notes else "")
        if require:
            return CheckResult("thermal", Status.FAIL, f"{why}, and [thermal] require = true",
                               ExitCode.THERMAL, values, thresholds)
        return CheckResult("thermal", Status.UNKNOWN, f"{why}; not blocking", ExitCode.THERMAL, values, thresholds)
    values = {
        "hottest": hottest.celsius,
        "sensor": hottest.key,
        "sensors": {r.key: r.celsius for r in thermal.readings},
        "notes": list(thermal.notes),
    }
    if hottest.celsius >= limit:
        return CheckResult("thermal", Status.FAIL,
                           f"{hottest.key} at {hottest.celsius:g} C >= {limit_name} {limit:g} C",
                           ExitCode.THERMAL, values, thresholds)
    return CheckResult("thermal", Status.PASS, f"hottest {hottest.key} at {hottest.celsius:g} C < {limit:g} C",
                       ExitCode.THERMAL, values, thresholds)


def _describe_holder(state: LockState, now: float) -> str:
    holder = state.holder
    if holder is None:
        note = f"; {state.note}" if state.note else ""
        return f"lock {state.name!r} is held, with no holder metadata (by flock(1) or another tool?){note}"
    since = format_duration(max(0.0, now - holder.started_at))
    command = " ".join(holder.cmdline)[:100]
    if state.holder_alive and holder.job_pid is not None:
        who = f"job pid {holder.job_pid} ({holder.user}@{holder.host}: {command})"
    elif state.holder_alive:
        who = f"pid {holder.pid} ({holder.user}@{holder.host}: {command})"
    else:
        who = f"the job of pid {holder.pid}, which is gone ({command})"
    return f"lock {state.name!r} is held by {who}, profile {holder.profile}, for {since}"


def check_lock(state: LockState, legacy: Sequence[LegacyState], now: float | None = None) -> CheckResult:
    now = time.time() if now is None else now
    values: dict[str, Any] = {
        "lock": state.name,
        "path": str(state.path),
        "held": state.held,
        "holder": None,
        "legacy": [{"path": str(s.path), "pid": s.pid, "alive": s.alive, "note": s.note} for s in legacy],
    }
    if state.holder is not None:
        h = state.holder
        values["holder"] = {"pid": h.pid, "user": h.user, "host": h.host, "cmdline": h.cmdline,
                            "started_at": h.started_at, "profile": h.profile, "alive": state.holder_alive}
    if state.held:
        return CheckResult("lock", Status.FAIL, _describe_holder(state, now), ExitCode.LOCKED, values)
    live = [s for s in legacy if s.alive]
    if live:
        first = live[0]
        return CheckResult("lock", Status.FAIL,
                           f"legacy lock file {first.path} names live pid {first.pid}", ExitCode.LOCKED, values)
    notes = [f"legacy lock file {s.path}: {s.note}" for s in legacy if s.note]
    if notes:
        return CheckResult("lock", Status.WARN, f"lock {state.name!r} is free; " + "; ".join(notes),
                           ExitCode.LOCKED, values)
    return CheckResult("lock", Status.PASS, f"lock {state.name!r} is free", ExitCode.LOCKED, values)


@dataclass(frozen=True)
class CompetingMatch:
    process: ProcessInfo
    rule: CompetingRule


def match_competing(procs: ProcessSnapshot, rules: Sequence[CompetingRule], total_ram: int) -> list[CompetingMatch]:
    """Each process with the first rule it matches; block rules are tried before warn rules."""
    ordered = sorted(rules, key=lambda r: r.action != "block")
    compiled = [(r, r.regex, r.min_rss.resolve(total_ram) if r.min_rss is not None else None) for r in ordered]
    found = []
    for proc in procs.processes:
        for rule, regex, min_rss in compiled:
            if (min_rss is None or proc.rss >= min_rss) and regex.search(proc.cmdline):
                found.append(CompetingMatch(proc, rule))
                break
    return found


def _describe(match: CompetingMatch) -> str:
    p = match.process
    return f"pid {p.pid} ({p.cmdline[:80]}, {format_bytes(p.rss)})"


def check_competing(matches: Sequence[CompetingMatch], rules: Sequence[CompetingRule]) -> CheckResult:
    blocking = [m for m in matches if m.rule.action == "block"]
    warning = [m for m in matches if m.rule.action == "warn"]
    values = {
        "matches": [
            {"pid": m.process.pid, "cmdline": m.process.cmdline, "rss": m.process.rss,
             "pattern": m.rule.pattern, "action": m.rule.action}
            for m in sorted(matches, key=lambda m: (m.rule.action != "block", -m.process.rss))
        ]
    }
    thresholds = {
        "rules": [{"pattern": r.pattern, "action": r.action, "min_rss": str(r.min_rss) if r.min_rss else None}
                  for r in rules]
    }
    if blocking:
        shown = ", ".join(_describe(m) for m in blocking[:3])
        more = f" and {len(blocking) - 3} more" if len(blocking) > 3 else ""
        return CheckResult("competing", Status.FAIL, f"competing process running: {shown}{more}",
                           ExitCode.COMPETING, values, thresholds)
    if warning:
        top = sorted(warning, key=lambda m: -m.process.rss)
        shown = ", ".join(_describe(m) for m in top[:3])
        more = f" and {len(warning) - 3} more" if len(warning) > 3 else ""
        return CheckResult("competing", Status.WARN, f"heavy process running (not blocking): {shown}{more}",
                           ExitCode.COMPETING, values, thresholds)
    return CheckResult("competing", Status.PASS, "no competing process", ExitCode.COMPETING, values, thresholds)


def check_stale(removals: Sequence[Removal]) -> CheckResult:
    values = {"removed": [{"path": str(r.path), "what": r.what, "removed": r.removed, "error": r.error}
                          for r in removals]}
    failed = [r for r in removals if not r.removed]
    if failed:
        return CheckResult("stale_locks", Status.WARN,
                           "; ".join(f"could not remove {r.what}: {r.error}" for r in failed),
                           ExitCode.LOCKED, values)
    if removals:
        return CheckResult("stale_locks", Status.PASS, "removed " + "; ".join(r.what for r in removals),
                           ExitCode.LOCKED, values)
    return CheckResult("stale_locks", Status.PASS, "no stale locks", ExitCode.LOCKED, values)
