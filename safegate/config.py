"""Config files and profiles: finding, parsing and validating them in full at load time.

Precedence for every setting: command-line option > environment > config file > built-in default.
The whole file is validated when it is loaded, every profile included, so a typo in a profile that is
only used at night shows on the first run.
"""

from __future__ import annotations

import os
import re
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from safegate.errors import ConfigError, ValueParseError
from safegate.units import (
    BACKENDS,
    Size,
    parse_duration,
    parse_gpu_option,
    parse_nice,
    parse_on_hot,
    parse_signal,
    parse_size,
    parse_temp,
    printable,
    validate_lock_name,
)

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on 3.10 only
    import tomli as tomllib

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


@dataclass(frozen=True)
class CompetingRule:
    pattern: str
    action: Action
    min_rss: Size | None = None

    @property
    def regex(self) -> re.Pattern[str]:
        return re.compile(self.pattern)


@dataclass(frozen=True)
class Profile:
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
    # GPUs
    gpu_memory: Size = field(default_factory=lambda: Size(bytes=0))
    gpu_margin: Size = field(default_factory=lambda: parse_size(DEFAULT_GPU_MARGIN))
    gpu: tuple[int, ...] | None = None  # None: auto
    max_gpu_mem: Size | None = None
    min_gpu_free: Size | None = None  # a percentage is of the card
    slurm_license: str | None = None  # inside a Slurm job, exec requires the job to hold this license

    @property
    def effective_resume_temp(self) -> float:
        return self.resume_temp if self.resume_temp is not None else self.max_temp - 5


@dataclass(frozen=True)
class ThermalConfig:
    sensors: tuple[str, ...] = DEFAULT_CPU_SENSORS
    ignore: tuple[str, ...] = ()
    files: tuple[str, ...] = ()
    require: bool = False


@dataclass(frozen=True)
class Config:
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
            if any(re.search(pattern, command) for pattern in profile.match):
                return profile
        return self.profile(DEFAULT_PROFILE)


# Keys a profile may set; [defaults] may set the same ones and profiles inherit them.
_PROFILE_KEYS = {
    "description",
    "match",
    "memory",
    "lock",
    "memory_margin",
    "max_temp",
    "resume_temp",
    "max_memory_pressure",
    "competing",
    "max_mem",
    "min_available",
    "on_hot",
    "grace",
    "interval",
    "warn_signal",
    "nice",
    "log",
    "gpu_memory",
    "gpu_margin",
    "gpu",
    "max_gpu_mem",
    "min_gpu_free",
    "slurm_license",
}
_TOP_KEYS = {"lock_dir", "legacy_lock_files", "defaults", "thermal", "gpu", "profiles"}
_GPU_KEYS = {"backend"}
_THERMAL_KEYS = {"sensors", "ignore", "files", "require"}
_RULE_KEYS = {"pattern", "action", "min_rss"}


class _Where:
    """Names the place of a value in a config file, for one-line error messages."""

    def __init__(self, source: str) -> None:
        self.source = source

    def fail(self, key: str, message: str) -> ConfigError:
        # Keys come from the file: a key holding a newline must not break the one-line message.
        text = f"config {self.source}: {key}: {message}"
        return ConfigError(printable(text))


def _expect(where: _Where, key: str, value: Any, kind: type | tuple[type, ...], what: str) -> Any:
    # bool is an int in Python; a temperature of `true` is a mistake, not 1 degree.
    if isinstance(value, bool) and bool not in (kind if isinstance(kind, tuple) else (kind,)):
        raise where.fail(key, f"expected {what}, got {value!r}")
    if not isinstance(value, kind):
        raise where.fail(key, f"expected {what}, got {type(value).__name__} {value!r}")
    return value


def _string_list(where: _Where, key: str, value: Any) -> tuple[str, ...]:
    _expect(where, key, value, list, "a list of strings")
    for item in value:
        _expect(where, key, item, str, "a list of strings")
    return tuple(value)


def _unknown_keys(where: _Where, table: str, data: Mapping[str, Any], allowed: set[str]) -> None:
    for key in data:
        if key not in allowed:
            accepted = ", ".join(sorted(allowed))
            raise where.fail(f"{table}{key}" if table else key, f"unknown key; accepted keys: {accepted}")


def _size(where: _Where, key: str, value: Any, *, allow_percent: bool = True) -> Size:
    if isinstance(value, int) and not isinstance(value, bool):
        value = str(value)
    _expect(where, key, value, str, 'a size string like "10G"')
    try:
        return parse_size(value, allow_percent=allow_percent)
    except ValueParseError as exc:
        raise where.fail(key, str(exc)) from None


def _temp(where: _Where, key: str, value: Any) -> float:
    _expect(where, key, value, (int, float, str), "a temperature in degrees Celsius")
    try:
        return parse_temp(value)
    except ValueParseError as exc:
        raise where.fail(key, str(exc)) from None


def _regex(where: _Where, key: str, value: Any) -> str:
    _expect(where, key, value, str, "a regular expression string")
    try:
        re.compile(value)
    except re.error as exc:
        raise where.fail(key, f"invalid regular expression {value!r}: {exc}") from None
    return str(value)


def _rules(where: _Where, key: str, value: Any) -> tuple[CompetingRule, ...]:
    _expect(where, key, value, list, "a list of tables with pattern, action and optional min_rss")
    rules = []
    for i, item in enumerate(value):
        item_key = f"{key}[{i}]"
        _expect(where, item_key, item, dict, "a table with pattern, action and optional min_rss")
        _unknown_keys(where, f"{item_key}.", item, _RULE_KEYS)
        if "pattern" not in item:
            raise where.fail(item_key, "missing key 'pattern'")
        pattern = _regex(where, f"{item_key}.pattern", item["pattern"])
        action = item.get("action", "block")
        if action not in ("block", "warn"):
            raise where.fail(f"{item_key}.action", f"invalid action {action!r}: expected 'block' or 'warn'")
        min_rss = _size(where, f"{item_key}.min_rss", item["min_rss"]) if "min_rss" in item else None
        rules.append(CompetingRule(pattern=pattern, action=action, min_rss=min_rss))
    return tuple(rules)


def _profile_fields(where: _Where, table: str, data: Mapping[str, Any]) -> dict[str, Any]:
    """Validate one [profiles.X] or [defaults] table into Profile constructor arguments."""
    _unknown_keys(where, table, data, _PROFILE_KEYS)
    out: dict[str, Any] = {}
    for key, value in data.items():
        full = f"{table}{key}"
        if key == "description":
            out[key] = _expect(where, full, value, str, "a string")
        elif key == "match":
            out[key] = tuple(_regex(where, full, v) for v in _string_list(where, full, value))
        elif key == "memory" and value == "auto":
            out["memory_auto"] = True  # learned from past runs (safegate.history)
        elif key in ("memory", "memory_margin"):
            out[key] = _size(where, full, value)
        elif key == "lock" and value is False:
            out[key] = None  # no mutex: jobs of this profile run side by side, as memory allows
        elif key == "lock":
            _expect(where, full, value, str, "a lock name, or false for none")
            try:
                out[key] = validate_lock_name(value)
            except ValueParseError as exc:
                raise where.fail(full, str(exc)) from None
        elif key in ("max_temp", "resume_temp"):
            out[key] = _temp(where, full, value)
        elif key == "max_memory_pressure":
            _expect(where, full, value, (int, float), "a percentage between 0 and 100")
            if not 0 <= float(value) <= 100:
                raise where.fail(full, f"expected a percentage between 0 and 100, got {value!r}")
            out[key] = float(value)
        elif key == "competing":
            out[key] = _rules(where, full, value)
        elif key in ("max_mem", "min_available", "gpu_memory", "gpu_margin", "max_gpu_mem", "min_gpu_free"):
            out[key] = _size(where, full, value)
        elif key == "gpu":
            _expect(where, full, value, (str, int), 'auto or GPU indexes like "0,2"')
            try:
                out[key] = parse_gpu_option(str(value))
            except ValueParseError as exc:
                raise where.fail(full, str(exc)) from None
        else:
            out[key] = _exec_value(where, full, key, value)
    return out


def _exec_value(where: _Where, full: str, key: str, value: Any) -> Any:
    """The exec keys whose parsers the command line shares."""
    parsers: dict[str, Any] = {
        "on_hot": parse_on_hot,
        "grace": parse_duration,
        "interval": parse_duration,
        "warn_signal": parse_signal,
        "nice": parse_nice,
    }
    if key == "log":
        return _expect(where, full, value, str, "a file path")
    if key == "slurm_license":
        _expect(where, full, value, str, "a Slurm license name")
        if not re.fullmatch(r"[A-Za-z0-9_.-]{1,64}", value):
            raise where.fail(full, f"invalid license name {value!r}: letters, digits, '.', '_', '-'")
        return value
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        raise where.fail(full, f"expected a string or number, got {type(value).__name__} {value!r}")
    try:
        parsed = parsers[key](str(value))
    except ValueParseError as exc:
        raise where.fail(full, str(exc)) from None
    if key == "interval" and not 0.001 <= parsed <= 1.0:
        raise where.fail(full, f"{value!r} is outside 1ms..1s")
    return parsed


def _thermal(where: _Where, data: Any) -> ThermalConfig:
    _expect(where, "thermal", data, dict, "a table")
    _unknown_keys(where, "thermal.", data, _THERMAL_KEYS)
    kwargs: dict[str, Any] = {}
    for key in ("sensors", "ignore", "files"):
        if key in data:
            kwargs[key] = _string_list(where, f"thermal.{key}", data[key])
    for pattern in (*kwargs.get("sensors", ()), *kwargs.get("ignore", ())):
        if ":" not in pattern:
            raise where.fail("thermal", f"invalid sensor pattern {pattern!r}: expected 'chip:label' globs")
    if "require" in data:
        kwargs["require"] = _expect(where, "thermal.require", data["require"], bool, "true or false")
    return ThermalConfig(**kwargs)


def _read_toml(path: Path, source: str) -> dict[str, Any]:
    try:
        with open(path, "rb") as fh:
            return tomllib.load(fh)
    except FileNotFoundError:
        raise ConfigError(f"config {source}: file not found") from None
    except IsADirectoryError:
        raise ConfigError(f"config {source}: is a directory, expected a TOML file") from None
    except PermissionError:
        raise ConfigError(f"config {source}: permission denied") from None
    except OSError as exc:
        raise ConfigError(f"config {source}: cannot read: {exc.strerror}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"config {source}: not UTF-8 text") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config {source}: invalid TOML: {exc}") from None
    except RecursionError:
        raise ConfigError(f"config {source}: invalid TOML: nested too deeply") from None


def _builtin_data() -> dict[str, Any]:
    text = (Path(__file__).parent / "builtin_profiles.toml").read_text(encoding="utf-8")
    return tomllib.loads(text)


def build_config(data: Mapping[str, Any], source: str, path: Path | None) -> Config:
    """Validate parsed TOML *data* (from *source*) on top of the built-in profiles."""
    where = _Where(source)
    _expect(where, "(top level)", data, dict, "a table")
    _unknown_keys(where, "", data, _TOP_KEYS)

    lock_dir = None
    if "lock_dir" in data:
        value = _expect(where, "lock_dir", data["lock_dir"], str, "a directory path")
        if not value or "\0" in value or not value.startswith("/"):
            # A relative path would resolve per working directory and split the locks between callers.
            raise where.fail("lock_dir", f"expected an absolute directory path, got {value!r}")
        lock_dir = Path(value)
    legacy_paths = _string_list(where, "legacy_lock_files", data.get("legacy_lock_files", []))
    for item in legacy_paths:
        if not item or "\0" in item:
            raise where.fail("legacy_lock_files", f"invalid path {item!r}")
    legacy = tuple(Path(p) for p in legacy_paths)
    thermal = _thermal(where, data["thermal"]) if "thermal" in data else ThermalConfig()
    gpu_backend = "auto"
    if "gpu" in data:
        gpu_table = _expect(where, "gpu", data["gpu"], dict, "a table")
        _unknown_keys(where, "gpu.", gpu_table, _GPU_KEYS)
        if "backend" in gpu_table:
            backend = gpu_table["backend"]
            if backend not in BACKENDS:
                raise where.fail("gpu.backend", f"invalid GPU backend {backend!r}: expected auto, nvml or none")
            gpu_backend = backend

    builtin_where = _Where("(built-in)")
    builtin = _builtin_data()
    defaults = _profile_fields(builtin_where, "defaults.", builtin.get("defaults", {}))
    user_defaults = _expect(where, "defaults", data.get("defaults", {}), dict, "a table")
    defaults.update(_profile_fields(where, "defaults.", user_defaults))
    for key in ("match", "lock", "memory"):
        if key in defaults:
            raise where.fail(f"defaults.{key}", "is per profile; set it in [profiles.NAME]")

    builtin_tables: dict[str, Any] = builtin["profiles"]
    user_tables = _expect(where, "profiles", data.get("profiles", {}), dict, "a table of profiles")

    profiles: dict[str, Profile] = {}
    for name in [*builtin_tables, *(n for n in user_tables if n not in builtin_tables)]:
        fields: dict[str, Any] = dict(defaults)
        src = "built-in"
        if name in builtin_tables:
            fields.update(_profile_fields(builtin_where, f"profiles.{name}.", builtin_tables[name]))
        if name in user_tables:
            if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}", name):
                raise where.fail(f"profiles.{name}", "invalid profile name: letters, digits, '.', '_', '-'")
            table = _expect(where, f"profiles.{name}", user_tables[name], dict, "a table")
            fields.update(_profile_fields(where, f"profiles.{name}.", table))
            src = source
        profile = Profile(name=name, source=src, **fields)
        if profile.effective_resume_temp > profile.max_temp:
            raise where.fail(
                f"profiles.{name}.resume_temp",
                f"{profile.effective_resume_temp:g} is above max_temp {profile.max_temp:g}",
            )
        profiles[name] = profile
    return Config(path=path, lock_dir=lock_dir, legacy_lock_files=legacy, thermal=thermal, profiles=profiles,
                  gpu_backend=gpu_backend)


SYSTEM_CONFIG = Path("/etc/safegate/config.toml")


def find_config_path(explicit: str | None, env: Mapping[str, str]) -> tuple[Path | None, str]:
    """The config file to use and how it was found; (None, ...) when there is none."""
    if explicit is not None:
        return Path(explicit), explicit
    if env.get("SAFEGATE_CONFIG"):
        value = env["SAFEGATE_CONFIG"]
        return Path(value), f"{value} (from SAFEGATE_CONFIG)"
    xdg = env.get("XDG_CONFIG_HOME") or str(Path(env.get("HOME", "~")).expanduser() / ".config")
    for candidate in (Path(xdg) / "safegate" / "config.toml", SYSTEM_CONFIG):
        if candidate.is_file():
            return candidate, str(candidate)
    return None, "(none)"


def load_config(explicit: str | None = None, env: Mapping[str, str] | None = None) -> Config:
    """Find, read and validate the config; built-in profiles only when no file exists."""
    env = os.environ if env is None else env
    path, source = find_config_path(explicit, env)
    if path is None:
        return build_config({}, "(built-in)", None)
    return build_config(_read_toml(path, source), source, path)
