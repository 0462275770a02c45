"""The competing check, pure: which processes the rules match, at a bounded cost, and the verdict on them.

The cost is bounded twice. Each pattern reads only as much of a command line as keeps one search within a
fixed amount of work (safegate.patterns), and all the matching of one evaluation stops after MATCH_BUDGET
seconds, so a check under the admission lock never holds it longer because of what others run. Processes are
tried heaviest first, so what the budget leaves out is what takes the least memory. Whatever was not judged
in full is listed (Unmatched) rather than passed over in silence.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from functools import cache

from safegate.config import CompetingRule
from safegate.exitcodes import ExitCode
from safegate.patterns import BoundedRegex
from safegate.records import dataclass
from safegate.results import CheckResult, CompetingMatch, CompetingValues, Status, Unmatched
from safegate.snapshots import ProcessInfo, ProcessSnapshot
from safegate.units import format_bytes

MATCH_BUDGET = 0.25  # seconds of matching per evaluation, whatever the processes and the patterns
_SHOWN = 200  # characters of a command line or a match a message quotes; --json has them in full


@cache
def _compiled(pattern: str) -> BoundedRegex:
    return BoundedRegex(pattern)


def _program_matches(regex: BoundedRegex, program: str) -> bool:
    """The whole program name, or the name without its extension (whisper.py is whisper)."""
    stem = program.rsplit(".", 1)[0] if "." in program[1:] else program
    return regex.fullmatch(program) or (stem != program and regex.fullmatch(stem))


@dataclass(frozen=True)
class _Tried:
    """What one rule made of one process."""

    matched: str | None  # what the rule found; None: no match
    whole: bool  # the rule read everything it looks at


def _try(rule: CompetingRule, proc: ProcessInfo) -> _Tried:
    if rule.program is None:
        assert rule.pattern is not None
        found, whole = _compiled(rule.pattern).search(proc.cmdline)
        return _Tried(found.group(0) if found else None, whole)
    if not _program_matches(_compiled(rule.program), proc.program):
        return _Tried(None, True)
    if rule.args is None:
        return _Tried(proc.program, True)
    found, whole = _compiled(rule.args).search(proc.args)
    return _Tried(f"{proc.program} {found.group(0)}" if found else None, whole)


def scan_competing(
    procs: ProcessSnapshot, rules: Sequence[CompetingRule], total_ram: int, *,
    budget: float = MATCH_BUDGET, clock: Callable[[], float] = time.monotonic,
) -> tuple[list[CompetingMatch], list[Unmatched]]:
    """Each process with the first rule it matches (block rules before warn rules), and the processes that
    could have matched a rule that did not read them in full, or that the budget left unread."""
    ordered = sorted(rules, key=lambda r: r.action != "block")
    floors = [r.min_rss.resolve(total_ram) if r.min_rss is not None else None for r in ordered]
    found: list[CompetingMatch] = []
    unmatched: list[Unmatched] = []
    deadline = clock() + budget
    heaviest = sorted(procs.processes, key=lambda p: (-p.rss, p.pid))
    for n, proc in enumerate(heaviest):
        if ordered and clock() > deadline:
            why = f"not matched: the {budget:g} s matching budget ran out ({len(heaviest) - n} processes left)"
            unmatched += [Unmatched(p, None, why) for p in heaviest[n:]]
            break
        partial: list[Unmatched] = []
        for rule, floor in zip(ordered, floors, strict=True):
            if floor is not None and proc.rss < floor:
                continue
            tried = _try(rule, proc)
            if tried.matched is not None:
                found.append(CompetingMatch(proc, rule, tried.matched))
                if rule.action == "block":
                    partial = []
                break
            if not tried.whole:
                text = proc.cmdline if rule.program is None else proc.args
                limit = _compiled(rule.pattern or rule.args or "").limit
                partial.append(Unmatched(proc, rule, f"{rule.describe()} read the first {format_bytes(limit)} "
                                                     f"of {format_bytes(len(text))}"))
        unmatched += partial[:1]
    return found, unmatched


def match_competing(procs: ProcessSnapshot, rules: Sequence[CompetingRule], total_ram: int) -> list[CompetingMatch]:
    return scan_competing(procs, rules, total_ram)[0]


def _quote(text: str) -> str:
    more = len(text) - _SHOWN
    return text if more <= 0 else f"{text[:_SHOWN]}... ({more} more characters; --json has all)"


def _who(proc: ProcessInfo, user: str) -> str:
    return f"pid {proc.pid}" + (f" of {user}" if user else "")


def _describe(match: CompetingMatch) -> str:
    p = match.process
    return (f"{_who(p, match.user)} ({format_bytes(p.rss)}), {match.rule.describe()} matched "
            f"{_quote(match.matched)!r} in: {_quote(p.cmdline)}")


def check_competing(matches: Sequence[CompetingMatch], rules: Sequence[CompetingRule],
                    unmatched: Sequence[Unmatched] = ()) -> CheckResult:
    blocking = [m for m in matches if m.rule.action == "block"]
    warning = [m for m in matches if m.rule.action == "warn"]
    values = CompetingValues(tuple(sorted(matches, key=lambda m: (m.rule.action != "block", -m.process.rss))),
                             tuple(unmatched))
    thresholds = {"rules": [rule_json(r) for r in rules]}
    note = ""
    if unmatched:
        first = unmatched[0]
        others = f" and {len(unmatched) - 1} more" if len(unmatched) > 1 else ""
        note = f"; not fully matched: {_who(first.process, first.user)} ({first.process.program}): {first.why}{others}"
    if blocking:
        shown = "; ".join(_describe(m) for m in blocking[:3])
        more = f"; and {len(blocking) - 3} more" if len(blocking) > 3 else ""
        return CheckResult("competing", Status.FAIL, f"competing process running: {shown}{more}{note}",
                           ExitCode.COMPETING, values, thresholds)
    if warning:
        top = sorted(warning, key=lambda m: -m.process.rss)
        shown = "; ".join(_describe(m) for m in top[:3])
        more = f"; and {len(warning) - 3} more" if len(warning) > 3 else ""
        return CheckResult("competing", Status.WARN, f"heavy process running (not blocking): {shown}{more}{note}",
                           ExitCode.COMPETING, values, thresholds)
    if unmatched:
        return CheckResult("competing", Status.WARN, f"no competing process found{note}", ExitCode.COMPETING,
                           values, thresholds)
    return CheckResult("competing", Status.PASS, "no competing process", ExitCode.COMPETING, values, thresholds)


def rule_json(rule: CompetingRule) -> dict[str, str | None]:
    return {"pattern": rule.pattern, "program": rule.program, "args": rule.args, "action": rule.action,
            "min_rss": str(rule.min_rss) if rule.min_rss else None}
