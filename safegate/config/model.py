"""The records of the config: every setting, declared once as a field of Profile; the settings table derived
from those fields; overrides parsed into what they change; the whole file (Config).

Precedence for every setting: command-line option (or API keyword) > environment > config file > built-in
default. config.file finds, reads and validates the file.

No `from __future__ import annotations` here: the settings table is read from Profile's annotations as objects.
"""

from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal

import msgspec
from msgspec.structs import replace

from safegate.errors import ConfigError, UsageError, ValueParseError
from safegate.regex import compiled
from safegate.settings import EXEC, GATE, LIMIT_FLOOR, NEED, RESUME_BELOW, Setting, check_limit, effective_resume_temp
from safegate.units import Size, did_you_mean, format_bytes

# The CPU sensors a machine usually has, as psutil names them; everything else (nvme, wifi, GPU, ...) is
# not a CPU and is ignored unless [thermal] sensors names it.
DEFAULT_CPU_SENSORS: tuple[str, ...] = (
    "coretemp:*",
    "k10temp:*",
    "zenpower:*",
    "cpu_thermal:*",
    "cpu-thermal:*",
    "soc_thermal:*",
    "x86_pkg_temp:*",
    "acpitz:*",
    "applesmc:*",
    "cpu*:*",
)

DEFAULT_PROFILE = "default"
# exec's system floor when nothing sets min_available: the seeds' "emergency brake" at 2 GB free,
# but never more than a tenth of RAM on a small machine.
DEFAULT_MIN_AVAILABLE = "2G"
DEFAULT_MIN_AVAILABLE_FRACTION = 0.10
# A profile that declares gpu_memory but no GPU limit: the seeds' anchors, warn at 80% and stop at 95% of the card.
DEFAULT_GPU_BREACH_FREE = Size(percent=5.0)
DEFAULT_GPU_WARN_FREE = Size(percent=20.0)

Action = Literal["block", "warn"]


class CompetingRule(msgspec.Struct, frozen=True):
    """A process competes when it matches: `program` (a regex over the whole program name, see
    probes.processes.program_of) and `args` (searched in its arguments), or `pattern` (searched in the whole
    command line, as pgrep -f does)."""

    pattern: str | None
    action: Action
    min_rss: Size | None = None
    program: str | None = None
    args: str | None = None

    def describe(self) -> str:
        """The rule as the config spells it, for messages."""
        if self.program is None:
            return f"pattern {self.pattern!r}"
        return f"program {self.program!r}" + (f" args {self.args!r}" if self.args is not None else "")


class Profile(msgspec.Struct, frozen=True, kw_only=True):
    """One profile: a job's needs, limits and manners, from the built-ins or the config file. Every field after
    the first four is a setting, declared here once: its type, and as its Setting its kind, help, option, the
    commands that take it, and its default. config.file builds a profile from every setting's initial value,
    [defaults] and the profile's table; the caller's overrides replace fields of it (resolved())."""

    name: str
    source: str
    memory_auto: bool = False  # memory = "auto": learned from recorded runs (config.history)
    # The need settings (memory, gpu_memory) a config file sets, in this profile or its [defaults]: the user's word,
    # which beats what safegate predicts from a command line (safegate.need); a built-in profile's figure does not.
    declared: frozenset[str] = frozenset()

    description: Annotated[str, Setting("text", "What the profile is for, shown by `safegate profiles`.")]
    match: Annotated[tuple[str, ...], Setting(
        "regexes", "exec picks this profile when one of these regular expressions (RE2 syntax) finds the command.",
        per_profile=True)]
    memory: Annotated[Size, Setting("memory", "Memory the job needs (default: the profile's memory).", "--mem",
                                    "SIZE", NEED, per_profile=True, default="0")]
    lock: Annotated[str | None, Setting("lock", "Lock that must be free (default: the profile's lock).", "--lock",
                                        "NAME", NEED, per_profile=True, default="heavy")]  # None: no mutex
    memory_margin: Annotated[Size, Setting(
        "size", "RAM that must stay free after the job's need, e.g. 4G or 10% (default {default}).", "--margin",
        "SIZE", GATE, default="4G")]
    max_temp: Annotated[float, Setting("temp", "Block at or above this temperature (default {default}).",
                                       "--max-temp", "C", GATE, default="80")]
    resume_temp: Annotated[float | None, Setting(
        "temp", f"A paused or waiting job resumes below this (default: max_temp - {RESUME_BELOW:g}).")]
    max_memory_pressure: Annotated[float, Setting(
        "percent", "Block while PSI memory some avg10 is above this percentage.", default="20")]
    competing: Annotated[tuple[CompetingRule, ...], Setting(
        "rules", "Processes that block (or only warn) while they run.")]
    max_mem: Annotated[Size | None, Setting(
        "limit", "Stop the job (exit 20) when its own memory reaches this, at least "
        f"{format_bytes(LIMIT_FLOOR)}. In the job's cgroup (--cgroup) its memory is the cgroup's usage less its "
        "inactive file cache, and the kernel holds the job to the limit as its cap; without a cgroup it is the RSS "
        "of the job's processes summed, or their PSS (shared pages counted once) from 90% of the limit when there "
        "are several.", "--max-mem", "SIZE", EXEC)]
    min_available: Annotated[Size | None, Setting(
        "size", f"Stop the job when MemAvailable falls to this (default: {DEFAULT_MIN_AVAILABLE} or "
        f"{DEFAULT_MIN_AVAILABLE_FRACTION:.0%} of RAM, whichever is smaller).", "--min-available", "SIZE", EXEC)]
    on_hot: Annotated[str, Setting(
        "on_hot", "Above max-temp: pause the job until below resume_temp (default), stop it (exit 22), or only "
        "warn.", "--on-hot", "pause|kill|warn", EXEC, default="pause")]
    grace: Annotated[float, Setting("duration", "SIGKILL this long after SIGTERM (default {default}).", "--grace",
                                    "DURATION", EXEC, default="10s")]
    interval: Annotated[float, Setting(
        "interval", "Shortest sampling interval, used near a limit (default {default}; far from every limit, 1s).",
        "--interval", "DURATION", EXEC, default="20ms")]
    warn_signal: Annotated[int | None, Setting(
        "signal", "Send this signal to the job at 90% of a memory limit, e.g. SIGUSR1.", "--warn-signal", "SIG",
        EXEC)]
    nice: Annotated[int | None, Setting(
        "nice", "Run the job at this niceness (0-19), with idle or best-effort I/O priority.", "--nice", "N", EXEC)]
    oom_score_adj: Annotated[int, Setting(
        "oom_score_adj", "The job's oom_score_adj (-1000..1000; default {default}): the kernel's OOM killer and "
        "earlyoom take the job before the desktop and before safegate. Never set below the caller's own (a job "
        "started at a higher one keeps it): an unprivileged process may only raise it.", "--oom-score-adj", "N",
        EXEC, default="500")]
    log: Annotated[str | None, Setting("path", "Append every event as a JSON line to FILE.", "--log", "FILE", EXEC)]
    cgroup: Annotated[str, Setting(
        "cgroup", "Run the job in a cgroup of its own, where the kernel caps its memory at --max-mem and stops every "
        "process: auto (when available; default), on (else exit 3) or off.", "--cgroup", "auto|on|off", EXEC,
        default="auto")]
    max_swap: Annotated[Size | None, Setting(
        "size", "With the job's cgroup (v2), let the job use at most this much swap, e.g. 0 or 1G (default: as "
        "without safegate).", "--max-swap", "SIZE", EXEC)]
    throttle: Annotated[bool, Setting(
        "switch", "With the job's cgroup (v2), have the kernel slow the job down at 90% of --max-mem (memory.high) "
        "instead of letting it race on: on or off (default).", "--throttle", "on|off", EXEC, default="off")]
    notify: Annotated[str | None, Setting(
        "command", "Run this shell command on a breach, a pause (at most once a minute each) and the end of the "
        "job, with SAFEGATE_EVENT, SAFEGATE_EXIT_CODE, SAFEGATE_REASON, ... in its environment.", "--notify", "CMD",
        EXEC)]
    gpu_memory: Annotated[Size, Setting(
        "size", "GPU memory the job needs (default: the profile's gpu_memory).", "--gpu-mem", "SIZE", NEED,
        default="0")]
    gpu_margin: Annotated[Size, Setting(
        "size", "VRAM that must stay free on the card after the job's need (default {default}).", default="10%")]
    gpu: Annotated[tuple[int, ...] | None, Setting(
        "gpu", "GPUs the job may use: auto (any one that fits; default) or indexes, all of which must fit "
        "(NVIDIA's first in NVML order, then AMD and Intel cards by DRM card number).", "--gpu",
        "auto|INDEX[,INDEX]", GATE)]  # None: auto
    max_gpu_mem: Annotated[Size | None, Setting(
        "limit", f"Stop the job (exit 21) when its own GPU memory reaches this, at least {format_bytes(LIMIT_FLOOR)}.",
        "--max-gpu-mem", "SIZE", EXEC)]
    min_gpu_free: Annotated[Size | None, Setting(
        "size", "Stop the job (exit 21) when its GPU's free memory falls to this; a percentage is of the card "
        f"(default with a gpu_memory profile: {DEFAULT_GPU_BREACH_FREE}, warning at {DEFAULT_GPU_WARN_FREE}).",
        "--min-gpu-free", "SIZE", EXEC)]
    slurm_license: Annotated[str | None, Setting(
        "license", "Inside a Slurm job, exec requires the job to hold this license.")]

    @property
    def effective_resume_temp(self) -> float:
        return effective_resume_temp(self.max_temp, self.resume_temp)


class ThermalConfig(msgspec.Struct, frozen=True):
    """Where temperatures come from: psutil sensors (by pattern) and raw sysfs files."""

    sensors: tuple[str, ...] = DEFAULT_CPU_SENSORS
    ignore: tuple[str, ...] = ()
    files: tuple[str, ...] = ()
    require: bool = False


class Config(msgspec.Struct, frozen=True):
    """The whole config file, validated, with the built-in profiles."""

    path: Path | None
    lock_dir: Path | None
    legacy_lock_files: tuple[Path, ...]
    thermal: ThermalConfig
    profiles: Mapping[str, Profile]
    gpu_backend: str = "auto"

    def profile(self, name: str) -> Profile:
        try:
            return self.profiles[name]
        except KeyError:
            known = ", ".join(sorted(self.profiles))
            hint = did_you_mean(name, sorted(self.profiles))
            raise ConfigError(f"unknown profile {name!r}: known profiles are {known}{hint}") from None


    def profile_for_command(self, argv: list[str]) -> Profile:
        """The profile whose `match` regexes find the command line: the config file's first, then built-ins."""
        command = " ".join(argv)
        ordered = sorted(self.profiles.values(), key=lambda p: p.source == "built-in")
        for profile in ordered:
            # RE2: linear in the command line, whatever the pattern.
            if any(compiled(pattern).search(command) is not None for pattern in profile.match):
                return profile
        return self.profile(DEFAULT_PROFILE)


# What the caller asked for explicitly, by setting key (parse_overrides()).
Overrides = Mapping[str, Any]


def _table() -> tuple[Setting, ...]:
    """Profile's settings, in field order, each with its key."""
    rows = []
    for key, hint in Profile.__annotations__.items():
        rows += [replace(meta, key=key) for meta in getattr(hint, "__metadata__", ()) if isinstance(meta, Setting)]
    return tuple(rows)


SETTINGS: tuple[Setting, ...] = _table()
BY_KEY: dict[str, Setting] = {s.key: s for s in SETTINGS}
BY_PARAM: dict[str, Setting] = {s.param: s for s in SETTINGS if s.option is not None}
PROFILE_KEYS: frozenset[str] = frozenset(BY_KEY)


def initial_values() -> dict[str, Any]:
    """Every setting's value when nothing sets it: what a profile starts from."""
    return {s.key: s.initial() for s in SETTINGS}


def parse_overrides(given: Mapping[str, object], *, command: str, api: bool = False) -> dict[str, Any]:
    """What the caller asked for explicitly, by setting key: the one parser of the command line (typer's and the
    plain check's) and the API. *given* maps an option's Python name (mem, max_mem: typer's parameter, the API's
    keyword) to its value as given: text from a command line; the API also takes numbers (an int size is bytes).
    None is "not given". A bad value is a UsageError naming the option (the keyword, for the API)."""
    out: dict[str, Any] = {}
    for param, value in given.items():
        setting = BY_PARAM.get(param)
        if setting is None or command not in setting.commands:
            raise TypeError(f"{command}() got an unexpected keyword argument {param!r}")
        if value is None or (setting.kind == "path" and value == ""):
            continue  # an empty --log falls back to the profile's, as it always has
        label = param if api else setting.option
        try:
            if isinstance(value, int) and not isinstance(value, bool) and setting.kind in ("memory", "size", "limit"):
                if value < 0:
                    raise UsageError(f"{label}: must not be negative, got {value}")
                size = Size(bytes=value)
                out[setting.key] = check_limit(size) if setting.kind == "limit" else size
                continue
            out[setting.key] = setting.parse(str(value))
        except ValueParseError as exc:
            raise UsageError(f"{label}: {exc}") from None
    return out
