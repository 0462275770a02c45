"""Every exit code safegate returns, in one place.

README, the --help epilog and the man page are generated from or checked against this table.
"""

from __future__ import annotations

from enum import IntEnum


class ExitCode(IntEnum):
    OK = 0
    USAGE = 2
    CONFIG = 3
    BAD_LOG = 4
    ADMISSION_STUCK = 5
    MEMORY = 10
    GPU_MEMORY = 11
    THERMAL = 12
    LOCKED = 13
    COMPETING = 14
    KILLED_MEMORY = 20
    KILLED_GPU_MEMORY = 21
    KILLED_HOT = 22
    INTERNAL = 125
    NOT_EXECUTABLE = 126
    NOT_FOUND = 127
    SIGNALLED = 128  # 128+N: the job died of signal N

    @classmethod
    def for_signal(cls, signum: int) -> int:
        return int(cls.SIGNALLED) + signum

    @property
    def meaning(self) -> str:
        return _MEANINGS[self]


_MEANINGS: dict[ExitCode, str] = {
    ExitCode.OK: "every check passed: safe to start (exec: the job exited 0)",
    ExitCode.USAGE: "usage error: bad option or value (including a bad lock name)",
    ExitCode.CONFIG: "configuration error: unreadable or invalid config file, unknown profile, unusable lock dir",
    ExitCode.BAD_LOG: "report: a log that cannot be read or is not safegate exec --log output",
    ExitCode.ADMISSION_STUCK: "the machine-wide admission lock stayed held past its deadline: the safegate holding "
                              "it (named in the message) is stuck or stopped",
    ExitCode.MEMORY: "blocked: not enough RAM for need + margin (or memory pressure too high)",
    ExitCode.GPU_MEMORY: "blocked: not enough GPU memory",
    ExitCode.THERMAL: "blocked: too hot",
    ExitCode.LOCKED: "blocked: the lock is held by a live job",
    ExitCode.COMPETING: "blocked: a competing process is running",
    ExitCode.KILLED_MEMORY: "exec: safegate stopped the job for memory (--max-mem or --min-available)",
    ExitCode.KILLED_GPU_MEMORY: "exec: safegate stopped the job for GPU memory",
    ExitCode.KILLED_HOT: "exec: safegate stopped the job for temperature (--on-hot kill)",
    ExitCode.INTERNAL: "safegate itself failed (a bug or an unexpected system error)",
    ExitCode.NOT_EXECUTABLE: "exec: the command was found but could not be executed",
    ExitCode.NOT_FOUND: "exec: the command was not found",
    ExitCode.SIGNALLED: "exec: 128+N, the job died of signal N (also one safegate only forwarded)",
}


def _label(code: ExitCode) -> str:
    return "128+N" if code is ExitCode.SIGNALLED else str(code.value)


def table_markdown() -> str:
    """The exit-code table as Markdown, as README.md carries it."""
    rows = ["| code | meaning |", "|---|---|"]
    rows += [f"| {_label(code)} | {code.meaning} |" for code in ExitCode]
    return "\n".join(rows)


def table_plain() -> str:
    """The exit-code table as aligned plain text, for --help."""
    return "\n".join(f"{_label(code):>5}  {code.meaning}" for code in ExitCode)
