"""Config and profiles: the dataclasses the rest of safegate reads, finding the config file, and loading it.

Precedence for every setting: command-line option > environment > config file > built-in default.
The whole file is validated when it is loaded, every profile included, so a typo in a profile that is
only used at night shows on the first run.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Literal

import msgspec
from msgspec import field

from safegate.errors import ConfigError
from safegate.regex import compiled
from safegate.settings import effective_resume_temp
from safegate.units import (
    Size,
    parse_size,
)

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

DEFAULT_MARGIN = "4G"
DEFAULT_MAX_TEMP = 80.0
DEFAULT_MAX_PRESSURE = 20.0
DEFAULT_LOCK = "heavy"
DEFAULT_PROFILE = "default"
# exec's system floor when nothing sets min_available: the seeds' "emergency brake" at 2 GB free,
# but never more than a tenth of RAM on a small machine.
DEFAULT_MIN_AVAILABLE = "2G"
DEFAULT_GPU_MARGIN = "10%"  # of the card
DEFAULT_MIN_AVAILABLE_FRACTION = 0.10

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


class Profile(msgspec.Struct, frozen=True):
    """One profile: a job's needs, limits and manners, from the built-ins or the config file."""

    name: str
    source: str
    description: str = ""
    match: tuple[str, ...] = ()
    memory: Size = field(default_factory=lambda: Size(bytes=0))
    memory_auto: bool = False
    lock: str | None = DEFAULT_LOCK  # None: no mutex
    memory_margin: Size = field(default_factory=lambda: parse_size(DEFAULT_MARGIN))
    max_temp: float = DEFAULT_MAX_TEMP
    resume_temp: float | None = None
    max_memory_pressure: float = DEFAULT_MAX_PRESSURE
    competing: tuple[CompetingRule, ...] = ()
    # exec: the supervisor's limits and manners
    max_mem: Size | None = None
    min_available: Size | None = None  # None: the built-in floor, DEFAULT_MIN_AVAILABLE
    on_hot: str = "pause"
    grace: float = 10.0
    interval: float = 0.02
    warn_signal: int | None = None
    nice: int | None = None
    log: str | None = None
    cgroup: str = "auto"
    max_swap: Size | None = None
    throttle: bool = False
    notify: str | None = None
    # GPUs
    gpu_memory: Size = field(default_factory=lambda: Size(bytes=0))
    gpu_margin: Size = field(default_factory=lambda: parse_size(DEFAULT_GPU_MARGIN))
    gpu: tuple[int, ...] | None = None  # None: auto
    max_gpu_mem: Size | None = None
    min_gpu_free: Size | None = None  # a percentage is of the card
    slurm_license: str | None = None  # inside a Slurm job, exec requires the job to hold this license

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
            raise ConfigError(f"unknown profile {name!r}: known profiles are {known}") from None


    def profile_for_command(self, argv: list[str]) -> Profile:
        """The profile whose `match` regexes find the command line: the config file's first, then built-ins."""
        command = " ".join(argv)
        ordered = sorted(self.profiles.values(), key=lambda p: p.source == "built-in")
        for profile in ordered:
            # RE2: linear in the command line, whatever the pattern.
            if any(compiled(pattern).search(command) is not None for pattern in profile.match):
                return profile
        return self.profile(DEFAULT_PROFILE)
