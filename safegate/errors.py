"""One exception type per kind of failure; cli.py turns each into its exit code."""

from __future__ import annotations

from safegate.exitcodes import ExitCode


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


class ValueParseError(ValueError):
    """A size, duration, temperature or name that does not parse.

    Raised by the pure parsers, which do not know whether the value came from the command line (exit 2)
    or from a config file (exit 3); the caller wraps it in UsageError or ConfigError.
    """
