"""safegate: stop heavy ML jobs from freezing the machine.

The Python API (check, hold, slots, Gate) lives in safegate.api and is re-exported here lazily, so the command
line does not pay for importing it. Every exception type (all in safegate.errors, a module of its own that
imports nothing heavy) is exported here directly.
"""

from __future__ import annotations

from typing import Any

from safegate.errors import (
    AdmissionStuck,
    BadModelFile,
    BadRecord,
    Blocked,
    CgroupError,
    ConfigError,
    LicenseMissing,
    LockBusy,
    LockDirError,
    LogError,
    SafegateError,
    SlurmError,
    SpawnError,
    UsageError,
    ValueParseError,
)

__version__ = "0.1.0"

_API = ("Gate", "check", "hold", "slots")
__all__ = [
    "AdmissionStuck",
    "BadModelFile",
    "BadRecord",
    "Blocked",
    "CgroupError",
    "ConfigError",
    "Gate",
    "LicenseMissing",
    "LockBusy",
    "LockDirError",
    "LogError",
    "SafegateError",
    "SlurmError",
    "SpawnError",
    "UsageError",
    "ValueParseError",
    "__version__",
    "check",
    "hold",
    "slots",
]


def __getattr__(name: str) -> Any:
    if name in _API:
        from safegate import api

        return getattr(api, name)
    raise AttributeError(f"module 'safegate' has no attribute {name!r}")
