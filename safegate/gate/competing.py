"""The competing check, pure: which processes the rules match, and the verdict on them.

Rules are RE2 patterns (safegate.regex), linear in a command line's length whatever the pattern, so matching
every process in full takes time proportional to the process table: a check under the admission lock never
holds it longer because of what others run.
"""

from __future__ import annotations

from collections.abc import Sequence

from safegate.config.model import CompetingRule
from safegate.exitcodes import ExitCode
from safegate.gate.results import CheckResult, CompetingMatch, CompetingValues, Status
from safegate.probes.snapshots import ProcessInfo, ProcessSnapshot
from safegate.regex import Regex, compiled
from safegate.units import format_bytes

_SHOWN = 200  # characters of a command line or a match a message quotes; --json has them in full


def _program_matches(regex: Regex, program: str) -> bool:
    """The whole program name, or the name without its extension (whisper.py is whisper)."""
    stem = program.rsplit(".", 1)[0] if "." in program[1:] else program
    return regex.fullmatch(program) or (stem != program and regex.fullmatch(stem))


def _try(rule: CompetingRule, proc: ProcessInfo) -> str | None:
    """What *rule* found in *proc*; None: no match."""
    if rule.program is None:
        assert rule.pattern is not None
        return compiled(rule.pattern).search(proc.cmdline)
    if not _program_matches(compiled(rule.program), proc.program):
        return None
    if rule.args is None:
        return proc.program
    found = compiled(rule.args).search(proc.args)
    return None if found is None else f"{proc.program} {found}"


def match_competing(procs: ProcessSnapshot, rules: Sequence[CompetingRule], total_ram: int) -> list[CompetingMatch]:
    """Each process with the first rule it matches, block rules before warn rules."""
    ordered = sorted(rules, key=lambda r: r.action != "block")
    floors = [r.min_rss.resolve(total_ram) if r.min_rss is not None else None for r in ordered]
    found: list[CompetingMatch] = []
    for proc in procs.processes:
        for rule, floor in zip(ordered, floors, strict=True):
            if floor is not None and proc.rss < floor:
                continue  # before the pattern: a rule no process is heavy enough for is never compiled
            matched = _try(rule, proc)
            if matched is not None:
                found.append(CompetingMatch(proc, rule, matched))
                break
    return found


def _quote(text: str) -> str:
    more = len(text) - _SHOWN
    return text if more <= 0 else f"{text[:_SHOWN]}... ({more} more characters; --json has all)"


def _who(proc: ProcessInfo, user: str) -> str:
    return f"pid {proc.pid}" + (f" of {user}" if user else "")


def _describe(match: CompetingMatch) -> str:
    p = match.process
    return (f"{_who(p, match.user)} ({format_bytes(p.rss)}), {match.rule.describe()} matched "
            f"{_quote(match.matched)!r} in: {_quote(p.cmdline)}")


def check_competing(matches: Sequence[CompetingMatch], rules: Sequence[CompetingRule]) -> CheckResult:
    blocking = [m for m in matches if m.rule.action == "block"]
    warning = [m for m in matches if m.rule.action == "warn"]
    values = CompetingValues(tuple(sorted(matches, key=lambda m: (m.rule.action != "block", -m.process.rss))))
    thresholds = {"rules": [rule_json(r) for r in rules]}
    if blocking:
        shown = "; ".join(_describe(m) for m in blocking[:3])
        more = f"; and {len(blocking) - 3} more" if len(blocking) > 3 else ""
        return CheckResult("competing", Status.FAIL, f"competing process running: {shown}{more}",
                           ExitCode.COMPETING, values, thresholds)
    if warning:
        top = sorted(warning, key=lambda m: -m.process.rss)
        shown = "; ".join(_describe(m) for m in top[:3])
        more = f"; and {len(warning) - 3} more" if len(warning) > 3 else ""
        return CheckResult("competing", Status.WARN, f"heavy process running (not blocking): {shown}{more}",
                           ExitCode.COMPETING, values, thresholds)
    return CheckResult("competing", Status.PASS, "no competing process", ExitCode.COMPETING, values, thresholds)


def rule_json(rule: CompetingRule) -> dict[str, str | None]:
    return {"pattern": rule.pattern, "program": rule.program, "args": rule.args, "action": rule.action,
            "min_rss": str(rule.min_rss) if rule.min_rss else None}
