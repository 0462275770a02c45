"""The one table of settings: every key a profile (or [defaults]) may set, and the command-line option that
overrides it.

Each row names the key (also its name in code: Profile, Overrides, Settings), its kind (which says how a value
is parsed, from a command line here and from TOML in config.py), the option and the commands that take it,
and the help text. The CLI's options, config validation and, through --help, the README tables and the man
page come from this table; tests check that Profile and Overrides have exactly these fields. Adding a setting
is one row here, a field in Profile and in Settings, and its use.

Names: code and config use the key. Three options keep shorter historical names (--mem for memory, --margin
for memory_margin, --gpu-mem for gpu_memory) and --json calls the resolved memory need "need".
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import msgspec

from safegate.errors import ValueParseError
from safegate.units import (
    parse_cgroup,
    parse_command,
    parse_duration,
    parse_gpu_option,
    parse_nice,
    parse_on_hot,
    parse_signal,
    parse_size,
    parse_switch,
    parse_temp,
    validate_lock_name,
)

GATE = frozenset({"check", "exec", "slots"})  # the commands that evaluate the gate
EXEC = frozenset({"exec"})

# exec samples at least this often, and never more often than INTERVAL_MIN.
INTERVAL_MIN, INTERVAL_MAX = 0.001, 1.0
# Without a resume_temp (or with one above max_temp), a paused or waiting job resumes this far below max_temp.
RESUME_BELOW = 5.0


class Setting(msgspec.Struct, frozen=True):
    """One setting: its profile key, kind, command-line option and help."""

    key: str
    kind: str  # memory, size, temp, percent, duration, interval, signal, nice, on_hot, gpu, lock, text, ...
    help: str
    option: str | None = None  # None: config file only
    metavar: str = ""
    commands: frozenset[str] = frozenset()
    per_profile: bool = False  # only in [profiles.NAME], never in [defaults]


SETTINGS: tuple[Setting, ...] = (
    Setting("description", "text", "What the profile is for, shown by `safegate profiles`."),
    Setting("match", "regexes",
            "exec picks this profile when one of these regular expressions (RE2 syntax) finds the command.",
            per_profile=True),
    Setting("memory", "memory", "Memory the job needs (default: the profile's memory).", "--mem", "SIZE", GATE,
            per_profile=True),
    Setting("lock", "lock", "Lock that must be free (default: the profile's lock).", "--lock", "NAME", GATE,
            per_profile=True),
    Setting("memory_margin", "size", "RAM that must stay free after the job's need, e.g. 4G or 10% (default 4G).",
            "--margin", "SIZE", GATE),
    Setting("max_temp", "temp", "Block at or above this temperature (default 80).", "--max-temp", "C", GATE),
    Setting("resume_temp", "temp", "A paused or waiting job resumes below this (default: max_temp - 5)."),
    Setting("max_memory_pressure", "percent", "Block while PSI memory some avg10 is above this percentage."),
    Setting("competing", "rules", "Processes that block (or only warn) while they run."),
    Setting("max_mem", "size", "Stop the job when its own memory (PSS of its process tree) reaches this.",
            "--max-mem", "SIZE", EXEC),
    Setting("min_available", "size", "Stop the job when MemAvailable falls to this (default: 2G or 10% of RAM, "
            "whichever is smaller).", "--min-available", "SIZE", EXEC),
    Setting("on_hot", "on_hot", "Above max-temp: pause the job until below resume_temp (default), stop it "
            "(exit 22), or only warn.", "--on-hot", "pause|kill|warn", EXEC),
    Setting("grace", "duration", "SIGKILL this long after SIGTERM (default 10s).", "--grace", "DURATION", EXEC),
    Setting("interval", "interval", "Shortest sampling interval, used near a limit (default 20ms; far from every "
            "limit, 1s).", "--interval", "DURATION", EXEC),
    Setting("warn_signal", "signal", "Send this signal to the job at 90% of a memory limit, e.g. SIGUSR1.",
            "--warn-signal", "SIG", EXEC),
    Setting("nice", "nice", "Run the job at this niceness (0-19), with idle or best-effort I/O priority.",
            "--nice", "N", EXEC),
    Setting("log", "path", "Append every event as a JSON line to FILE.", "--log", "FILE", EXEC),
    Setting("cgroup", "cgroup", "Run the job in a cgroup of its own, where the kernel caps its memory at --max-mem "
            "and stops every process: auto (when available; default), on (else exit 3) or off.", "--cgroup",
            "auto|on|off", EXEC),
    Setting("max_swap", "size", "With the job's cgroup (v2), let the job use at most this much swap, e.g. 0 or "
            "1G (default: as without safegate).", "--max-swap", "SIZE", EXEC),
    Setting("throttle", "switch", "With the job's cgroup (v2), have the kernel slow the job down at 90% of "
            "--max-mem (memory.high) instead of letting it race on: on or off (default).", "--throttle", "on|off",
            EXEC),
    Setting("notify", "command", "Run this shell command on a breach, a pause (at most once a minute each) and the "
            "end of the job, with SAFEGATE_EVENT, SAFEGATE_EXIT_CODE, SAFEGATE_REASON, ... in its environment.",
            "--notify", "CMD", EXEC),
    Setting("gpu_memory", "size", "GPU memory the job needs (default: the profile's gpu_memory).", "--gpu-mem",
            "SIZE", GATE),
    Setting("gpu_margin", "size", "VRAM that must stay free on the card after the job's need (default 10%)."),
    Setting("gpu", "gpu", "GPUs the job may use: auto (any one that fits; default) or indexes, all of which must "
            "fit.", "--gpu", "auto|INDEX[,INDEX]", GATE),
    Setting("max_gpu_mem", "size", "Stop the job (exit 21) when its own GPU memory reaches this.", "--max-gpu-mem",
            "SIZE", EXEC),
    Setting("min_gpu_free", "size", "Stop the job (exit 21) when its GPU's free memory falls to this; a "
            "percentage is of the card (default with a gpu_memory profile: 5%, warning at 20%).", "--min-gpu-free",
            "SIZE", EXEC),
    Setting("slurm_license", "license", "Inside a Slurm job, exec requires the job to hold this license."),
)
BY_KEY: dict[str, Setting] = {s.key: s for s in SETTINGS}
PROFILE_KEYS: frozenset[str] = frozenset(BY_KEY)
OPTION_KEYS: tuple[str, ...] = tuple(s.key for s in SETTINGS if s.option is not None)


def parse_interval(text: str) -> float:
    seconds = parse_duration(text)
    if not INTERVAL_MIN <= seconds <= INTERVAL_MAX:
        raise ValueParseError(f"{text!r} is outside 1ms..1s")
    return seconds


# How a command-line string becomes a value, by kind (config.py reads TOML values of the same kinds).
CLI_PARSERS: dict[str, Callable[[str], Any]] = {
    "memory": parse_size,
    "size": parse_size,
    "temp": parse_temp,
    "duration": parse_duration,
    "interval": parse_interval,
    "signal": parse_signal,
    "nice": parse_nice,
    "on_hot": parse_on_hot,
    "cgroup": parse_cgroup,
    "switch": parse_switch,
    "command": parse_command,
    "gpu": parse_gpu_option,
    "lock": validate_lock_name,
    "path": str,
}


def parse_option(key: str, text: str) -> Any:
    """The value of *key*'s option; ValueParseError names what is accepted."""
    return CLI_PARSERS[BY_KEY[key].kind](text)


def effective_resume_temp(max_temp: float, resume_temp: float | None) -> float:
    """The one rule for where a pause ends: resume_temp, unless unset or above max_temp."""
    if resume_temp is None or resume_temp > max_temp:
        return max_temp - RESUME_BELOW
    return resume_temp
