"""Reading a config file and validating it in full: every table and key, with one-line errors naming the place.

Which keys a profile may set, and their kinds, come from the settings table (safegate.config.model.SETTINGS, read
from Profile's fields); this module knows how each kind is written in TOML.
"""

from __future__ import annotations

import os
import re
import stat
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from safegate.config.model import (
    BY_KEY,
    PROFILE_KEYS,
    SETTINGS,
    CompetingRule,
    Config,
    Profile,
    ThermalConfig,
    initial_values,
)
from safegate.errors import ConfigError, ValueParseError
from safegate.regex import SYNTAX_URL, compiled
from safegate.settings import CLI_PARSERS
from safegate.units import (
    BACKENDS,
    Size,
    did_you_mean,
    parse_gpu_option,
    parse_size,
    parse_temp,
    printable,
    validate_lock_name,
)

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on 3.10 only
    import tomli as tomllib

# Keys a profile may set come from the settings table; [defaults] may set the same ones, but per-profile ones.
_PROFILE_KEYS = set(PROFILE_KEYS)
_PER_PROFILE = {s.key for s in SETTINGS if s.per_profile}
_DEFAULTS_KEYS = _PROFILE_KEYS - _PER_PROFILE
_TOP_KEYS = {"lock_dir", "legacy_lock_files", "defaults", "thermal", "gpu", "profiles"}
_GPU_KEYS = {"backend"}
_THERMAL_KEYS = {"sensors", "ignore", "files", "require"}
_RULE_KEYS = {"pattern", "program", "args", "action", "min_rss"}


class _Where:
    """Names the place of a value in a config file, for one-line error messages."""

    def __init__(self, source: str, *, trusted: bool = False) -> None:
        self.source = source
        self.trusted = trusted  # safegate's own built-in profiles

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
    """Refuse a key *table* does not accept, listing the keys it does (only those) and the closest."""
    for key in data:
        if key not in allowed:
            accepted = ", ".join(sorted(allowed))
            raise where.fail(f"{table}{key}" if table else key,
                              f"unknown key; accepted keys: {accepted}{did_you_mean(str(key), sorted(allowed))}")


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
    if where.trusted:
        return str(value)  # the built-in profiles: tests/test_config.py compiles each; RE2 loads on first use
    try:
        compiled(value)
    except ValueParseError as exc:
        # Command lines are other people's text: only RE2, linear in the text, matches them.
        raise where.fail(key, f"invalid regular expression {value!r}: {exc}; patterns are RE2 syntax, "
                              f"which runs in linear time ({SYNTAX_URL})") from None
    return str(value)


def _rules(where: _Where, key: str, value: Any) -> tuple[CompetingRule, ...]:
    what = "a table with pattern, or program and optional args; action and optional min_rss"
    _expect(where, key, value, list, f"a list of tables, each {what}")
    rules = []
    for i, item in enumerate(value):
        item_key = f"{key}[{i}]"
        _expect(where, item_key, item, dict, what)
        _unknown_keys(where, f"{item_key}.", item, _RULE_KEYS)
        if "pattern" in item and ("program" in item or "args" in item):
            raise where.fail(item_key, "give either pattern (the whole command line) or program and args, not both")
        if "pattern" not in item and "program" not in item:
            raise where.fail(item_key, "missing key 'pattern' or 'program'")
        found = {k: _regex(where, f"{item_key}.{k}", item[k]) for k in ("pattern", "program", "args") if k in item}
        action = item.get("action", "block")
        if action not in ("block", "warn"):
            hint = did_you_mean(action, ("block", "warn")) if isinstance(action, str) else ""
            raise where.fail(f"{item_key}.action", f"invalid action {action!r}: expected 'block' or 'warn'{hint}")
        min_rss = _size(where, f"{item_key}.min_rss", item["min_rss"]) if "min_rss" in item else None
        rules.append(CompetingRule(pattern=found.get("pattern"), action=action, min_rss=min_rss,
                                   program=found.get("program"), args=found.get("args")))
    return tuple(rules)


def _profile_fields(where: _Where, table: str, data: Mapping[str, Any]) -> dict[str, Any]:
    """Validate one [profiles.X] or [defaults] table into Profile constructor arguments."""
    if table == "defaults.":
        for key in data:
            if key in _PER_PROFILE:
                raise where.fail(f"defaults.{key}", "is per profile; set it in [profiles.NAME]")
    _unknown_keys(where, table, data, _DEFAULTS_KEYS if table == "defaults." else _PROFILE_KEYS)
    out: dict[str, Any] = {}
    for key, value in data.items():
        kind = BY_KEY[key].kind
        if kind == "memory" and value == "auto":
            out["memory_auto"] = True  # learned from past runs (safegate.config.history)
        elif kind == "lock" and value is False:
            out[key] = None  # no mutex: jobs of this profile run side by side, as memory allows
        else:
            out[key] = _KINDS[kind](where, f"{table}{key}", value)
    return out


def _text(where: _Where, key: str, value: Any) -> str:
    return str(_expect(where, key, value, str, "a string"))


def _path(where: _Where, key: str, value: Any) -> str:
    return str(_expect(where, key, value, str, "a file path"))


def _regexes(where: _Where, key: str, value: Any) -> tuple[str, ...]:
    return tuple(_regex(where, key, v) for v in _string_list(where, key, value))


def _lock(where: _Where, key: str, value: Any) -> str:
    _expect(where, key, value, str, "a lock name, or false for none")
    return str(_parsed(where, key, validate_lock_name, value))


def _percent(where: _Where, key: str, value: Any) -> float:
    _expect(where, key, value, (int, float), "a percentage between 0 and 100")
    if not 0 <= float(value) <= 100:
        raise where.fail(key, f"expected a percentage between 0 and 100, got {value!r}")
    return float(value)


def _gpu(where: _Where, key: str, value: Any) -> tuple[int, ...] | None:
    _expect(where, key, value, (str, int), 'auto or GPU indexes like "0,2"')
    result: tuple[int, ...] | None = _parsed(where, key, parse_gpu_option, str(value))
    return result


def _license(where: _Where, key: str, value: Any) -> str:
    _expect(where, key, value, str, "a Slurm license name")
    if not re.fullmatch(r"[A-Za-z0-9_.-]{1,64}", value):
        raise where.fail(key, f"invalid license name {value!r}: letters, digits, '.', '_', '-'")
    return str(value)


def _cli_kind(kind: str) -> Any:
    """A kind whose values the command line parses too: a string or number, through the same parser."""

    def load(where: _Where, key: str, value: Any) -> Any:
        if isinstance(value, bool) or not isinstance(value, (str, int, float)):
            raise where.fail(key, f"expected a string or number, got {type(value).__name__} {value!r}")
        return _parsed(where, key, CLI_PARSERS[kind], str(value))

    return load


def _switch(where: _Where, key: str, value: Any) -> bool:
    if isinstance(value, bool):
        return value
    return bool(_cli_kind("switch")(where, key, value))


def _parsed(where: _Where, key: str, parse: Any, value: Any) -> Any:
    try:
        return parse(value)
    except ValueParseError as exc:
        raise where.fail(key, str(exc)) from None


_KINDS: dict[str, Any] = {
    "text": _text,
    "path": _path,
    "regexes": _regexes,
    "memory": _size,
    "size": _size,
    "lock": _lock,
    "temp": _temp,
    "percent": _percent,
    "rules": _rules,
    "gpu": _gpu,
    "license": _license,
    **{kind: _cli_kind(kind) for kind in ("limit", "duration", "interval", "signal", "nice", "on_hot", "cgroup",
                                          "command", "oom_score_adj")},
    "switch": _switch,
}


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


# A config is a few KiB; reading stops past this, so /dev/zero or a huge file is refused, never read whole.
CONFIG_MAX_BYTES = 1024 * 1024


def read_toml(path: Path, source: str) -> dict[str, Any]:
    try:
        # Non-blocking: a FIFO is refused below instead of waiting for a writer that never comes.
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
        try:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                kind = "a directory" if stat.S_ISDIR(os.fstat(fd).st_mode) else "not a regular file"
                raise ConfigError(f"config {source}: is {kind}, expected a TOML file")
            raw = _read_at_most(fd, CONFIG_MAX_BYTES + 1)
        finally:
            os.close(fd)
        if len(raw) > CONFIG_MAX_BYTES:
            raise ConfigError(f"config {source}: larger than {CONFIG_MAX_BYTES // 1024} KiB; not a config file")
        return tomllib.loads(raw.decode("utf-8"))
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


def _read_at_most(fd: int, limit: int) -> bytes:
    chunks: list[bytes] = []
    size = 0
    while size < limit:
        chunk = os.read(fd, min(65536, limit - size))
        if not chunk:
            break
        chunks.append(chunk)
        size += len(chunk)
    return b"".join(chunks)


def _builtin_data() -> dict[str, Any]:
    text = (Path(__file__).parent / "builtin_profiles.toml").read_text(encoding="utf-8")
    return tomllib.loads(text)


_NEED_KEYS = frozenset({"memory", "gpu_memory"})


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
                hint = did_you_mean(backend, BACKENDS) if isinstance(backend, str) else ""
                raise where.fail("gpu.backend",
                                 f"invalid GPU backend {backend!r}: expected auto, nvml, drm or none{hint}")
            gpu_backend = backend

    builtin_where = _Where("(built-in)", trusted=True)
    builtin = _builtin_data()
    defaults = _profile_fields(builtin_where, "defaults.", builtin.get("defaults", {}))
    user_defaults = _expect(where, "defaults", data.get("defaults", {}), dict, "a table")
    defaults.update(_profile_fields(where, "defaults.", user_defaults))

    builtin_tables: dict[str, Any] = builtin["profiles"]
    user_tables = _expect(where, "profiles", data.get("profiles", {}), dict, "a table of profiles")

    profiles: dict[str, Profile] = {}
    for name in [*builtin_tables, *(n for n in user_tables if n not in builtin_tables)]:
        fields: dict[str, Any] = {**initial_values(), **defaults}
        src = "built-in"
        declared = _NEED_KEYS & set(user_defaults)
        if name in builtin_tables:
            fields.update(_profile_fields(builtin_where, f"profiles.{name}.", builtin_tables[name]))
        if name in user_tables:
            if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}", name):
                raise where.fail(f"profiles.{name}", "invalid profile name: letters, digits, '.', '_', '-'")
            table = _expect(where, f"profiles.{name}", user_tables[name], dict, "a table")
            fields.update(_profile_fields(where, f"profiles.{name}.", table))
            src = source
            declared |= _NEED_KEYS & set(table)
        profile = Profile(name=name, source=src, declared=frozenset(declared), **fields)
        if profile.resume_temp is not None and profile.resume_temp > profile.max_temp:
            raise where.fail(
                f"profiles.{name}.resume_temp",
                f"{profile.resume_temp:g} is above max_temp {profile.max_temp:g}",
            )
        profiles[name] = profile
    return Config(path=path, lock_dir=lock_dir, legacy_lock_files=legacy, thermal=thermal, profiles=profiles,
                  gpu_backend=gpu_backend)


SYSTEM_CONFIG = Path("/etc/safegate/config.toml")


def find_config_path(explicit: str | None, env: Mapping[str, str]) -> tuple[Path | None, str]:
    """The config file to use and how it was found; (None, ...) when there is none."""
    if explicit is not None:
        if not explicit:
            # Path("") is ".", the working directory: say what was given instead.
            raise ConfigError("config '': an empty path; expected a TOML file")
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
    return build_config(read_toml(path, source), source, path)
