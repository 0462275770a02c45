"""Every exit code safegate returns, in one place.

README, the --help epilog and the man page are generated from or checked against this table.
"""

from __future__ import annotations

from enum import IntEnum


class ExitCode(IntEnum):
    OK = 0
    USAGE = 2
    CONFIG = 3
    MEMORY = 10
    GPU_MEMORY = 11
    THERMAL = 12
    LOCKED = 13
    COMPETING = 14
    INTERNAL = 125

    @property
    def meaning(self) -> str:
        return _MEANINGS[self]


_MEANINGS: dict[ExitCode, str] = {
    ExitCode.OK: "every check passed: safe to start",
    ExitCode.USAGE: "usage error: bad option or value (including a bad lock name)",
    ExitCode.CONFIG: "configuration error: unreadable or invalid config file, unknown profile, unusable lock dir",
    ExitCode.MEMORY: "blocked: not enough RAM for need + margin (or memory pressure too high)",
    ExitCode.GPU_MEMORY: "blocked: not enough GPU memory (reserved for GPU support)",
    ExitCode.THERMAL: "blocked: too hot",
    ExitCode.LOCKED: "blocked: the lock is held by a live job",
    ExitCode.COMPETING: "blocked: a competing process is running",
    ExitCode.INTERNAL: "safegate itself failed (a bug or an unexpected system error)",
}


def table_markdown() -> str:
    """The exit-code table as Markdown, as README.md carries it."""
    rows = ["| code | meaning |", "|---|---|"]
    rows += [f"| {code.value} | {code.meaning} |" for code in ExitCode]
    return "\n".join(rows)


def table_plain() -> str:
    """The exit-code table as aligned plain text, for --help."""
    return "\n".join(f"{code.value:>4}  {code.meaning}" for code in ExitCode)
