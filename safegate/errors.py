"""Every exception type safegate raises, one per kind of failure; cli.main() turns each into its exit code.

This module imports nothing of safegate's but the exit codes (and, for type checking only, the verdict), so
any layer may raise these.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from safegate.exitcodes import ExitCode

if TYPE_CHECKING:
    from safegate.gate.results import Verdict


class SafegateError(Exception):
    """Base of every failure safegate reports to its user; the message is one line."""

    exit_code: ExitCode = ExitCode.INTERNAL


class UsageError(SafegateError):
    """A bad command-line option or value (including a bad lock name)."""

    exit_code = ExitCode.USAGE


class ConfigError(SafegateError):
    """A config file that cannot be read or is invalid, or an unknown profile."""

    exit_code = ExitCode.CONFIG


class LockDirError(SafegateError):
    """The lock directory is unusable or unsafe (a symlink, writable by others without sticky bit, ...)."""

    exit_code = ExitCode.CONFIG


class CgroupError(SafegateError):
    """`--cgroup on` where the job cannot get a cgroup of its own, or its cgroup cannot be set up."""

    exit_code = ExitCode.CONFIG


class AdmissionStuck(SafegateError):
    """The admission lock stayed held past its deadline: whoever holds it is stuck (its work is bounded)."""

    exit_code = ExitCode.ADMISSION_STUCK


class LogError(SafegateError):
    """`report`: a log that cannot be read, a line that is not JSON, or events not of exec --log's shape."""

    exit_code = ExitCode.BAD_LOG


class ValueParseError(ValueError):
    """A size, duration, temperature or name that does not parse.

    Raised by the pure parsers, which do not know whether the value came from the command line (exit 2)
    or from a config file (exit 3); the caller wraps it in UsageError or ConfigError.
    """


class BadRecord(ValueError):
    """A file another user (or an older safegate) wrote does not fit its schema (safegate.schema); the message
    names the field and the fault. Readers turn it into "ignored" or "set aside", never a failure."""


class BadModelFile(ValueError):
    """A model file (GGUF, safetensors, an index or config.json beside them) gives no prediction; the message is
    the one-line reason. safegate.need turns it into a note and no prediction, never a failure."""


class SpawnError(SafegateError):
    """The command could not be started: 127 not found, 126 not executable."""

    def __init__(self, message: str, code: ExitCode) -> None:
        super().__init__(message)
        self.exit_code = code


class LockBusy(SafegateError):
    """unlock refused: a live process holds the lock."""

    exit_code = ExitCode.LOCKED


class SlurmError(SafegateError):
    """scontrol is missing or failed."""

    exit_code = ExitCode.INTERNAL


class LicenseMissing(SafegateError):
    """The profile needs a Slurm license the job does not hold: licenses are advisory, so refuse."""

    exit_code = ExitCode.LOCKED


class Blocked(SafegateError):
    """A check blocks; .verdict holds every check's result and .exit_code the code the CLI would return."""

    def __init__(self, verdict: Verdict) -> None:
        reasons = "; ".join(f"{c.name}: {c.reason}" for c in verdict.failures)
        super().__init__(f"blocked: {reasons}")
        self.verdict = verdict
        self.exit_code = verdict.exit_code
