"""Turning verdicts into text for people and JSON for programs."""

from __future__ import annotations

import json
from typing import Any

from safegate.policy import CheckResult, Status, Verdict


def verdict_json(verdict: Verdict) -> str:
    data: dict[str, Any] = {
        "verdict": "pass" if verdict.ok else "blocked",
        "exit_code": int(verdict.exit_code),
        "profile": verdict.profile,
        "checks": [
            {
                "name": c.name,
                "status": c.status.value,
                "reason": c.reason,
                "values": dict(c.values),
                "thresholds": dict(c.thresholds),
                "exit_code_if_failing": int(c.code),
            }
            for c in verdict.checks
        ],
    }
    return json.dumps(data, indent=2, sort_keys=False, default=str)


def check_line(check: CheckResult) -> str:
    return f"{check.status.value.upper():<8} {check.name:<16} {check.reason}"


def verdict_text(verdict: Verdict) -> str:
    head = (
        f"safe to start (profile {verdict.profile})"
        if verdict.ok
        else f"BLOCKED (exit {int(verdict.exit_code)}, profile {verdict.profile})"
    )
    return "\n".join([head, *(check_line(c) for c in verdict.checks)])


def blocking_summary(verdict: Verdict) -> str:
    """One line naming what blocks, for -q and for progress while waiting."""
    return "; ".join(f"{c.name}: {c.reason}" for c in verdict.checks if c.status is Status.FAIL)
