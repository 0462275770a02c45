"""What a setting is: its kind (how a value is parsed, from a command line and as the default), its option, the
commands that take it, its help and its default. Each setting is declared once, as one annotated field of
safegate.config.model.Profile; the settings table (config.model.SETTINGS), the CLI's options, the plain check's
parser, the API's keyword arguments, the config validation and the generated docs all come from those fields.

Names: code and config use the key (the field's name). The option's Python name (--max-mem: max_mem) is the typer
parameter and the API keyword; three options keep shorter historical names (--mem for memory, --margin for
memory_margin, --gpu-mem for gpu_memory), and --json calls the resolved memory need "need".
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

import msgspec

from safegate.errors import ValueParseError
from safegate.units import (
    CGROUP_CHOICES,
    GPU_AUTO,
    NICE_RANGE,
    ON_HOT_CHOICES,
    SWITCH_CHOICES,
    Size,
    format_bytes,
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
    signal_names,
    validate_lock_name,
)

GATE = frozenset({"check", "exec", "slots"})  # the commands that evaluate the gate
EXEC = frozenset({"exec"})
# The settings that are a job's need (and its lock): `need` takes them too, to show what they decide.
NEED = GATE | {"need"}

# exec samples at least this often, and never more often than INTERVAL_MIN.
INTERVAL_MIN, INTERVAL_MAX = 0.001, 1.0
# Without a resume_temp (or with one above max_temp), a paused or waiting job resumes this far below max_temp.
RESUME_BELOW = 5.0


class Setting(msgspec.Struct, frozen=True):
    """One setting, as metadata on its Profile field: `Annotated[Size, Setting("size", "help ...", "--margin",
    "SIZE", GATE, default="4G")]`. config.model fills in the key (the field's name)."""

    kind: str  # memory, size, limit, temp, percent, duration, interval, signal, nice, on_hot, gpu, lock, text, ...
    help: str  # "{default}" in it is replaced by the default, so the value is written once
    option: str | None = None  # None: config file only
    metavar: str = ""
    commands: frozenset[str] = frozenset()
    per_profile: bool = False  # only in [profiles.NAME], never in [defaults]
    default: str | None = None  # as a user writes it ("4G", "80", "pause"); None: unset
    key: str = ""

    @property
    def param(self) -> str:
        """The option's Python name: typer's parameter and the API's keyword (--max-mem: max_mem)."""
        return self.option.lstrip("-").replace("-", "_") if self.option is not None else self.key

    @property
    def help_text(self) -> str:
        return self.help.replace("{default}", self.default or "")

    def parse(self, text: str) -> Any:
        """A value from a command line (or the default's text); ValueParseError names what is accepted."""
        return CLI_PARSERS[self.kind](text)

    def choices(self) -> tuple[str, ...]:
        """The values of a kind that takes one of a fixed set, as its parser reads them (shell completion offers
        them); () for any other kind."""
        return CHOICES[self.kind]() if self.kind in CHOICES else ()

    def initial(self) -> Any:
        """The value when nothing sets it."""
        if self.default is None:
            return EMPTY.get(self.kind)
        return self.parse(self.default)


def parse_interval(text: str) -> float:
    seconds = parse_duration(text)
    if not INTERVAL_MIN <= seconds <= INTERVAL_MAX:
        raise ValueParseError(f"{text!r} is outside 1ms..1s")
    return seconds


# A memory limit (kind "limit": --max-mem, --max-gpu-mem) below this is a mistake, not a limit: `--max-mem 12`
# (bytes) or a unit that went missing would stop every job at once. Needs, margins and floors may be 0.
LIMIT_FLOOR = 1024**2


def check_limit(size: Size, text: str | None = None) -> Size:
    """*size* (written as *text*) as a memory limit: ValueParseError naming it and the floor when it is below
    LIMIT_FLOOR. A percentage must be above 0%; a positive one is of RAM or the card, whatever it comes to."""
    given = f"{text!r} ({size})" if text is not None and text.strip() != str(size) else str(size)
    if size.percent is not None:
        if size.percent <= 0:
            raise ValueParseError(f"{given} is below the floor of a memory limit: a percentage must be above 0%")
    elif size.bytes is not None and size.bytes < LIMIT_FLOOR:
        number = text.strip() if text is not None and text.strip().isdigit() else None
        hint = ("" if number is None else "; for no limit, leave it unset" if size.bytes == 0
                else f": a number without a unit is bytes; did you mean {number}M or {number}G?")
        raise ValueParseError(f"{given} is below the floor of a memory limit, {format_bytes(LIMIT_FLOOR)}{hint}")
    return size


def parse_limit(text: str) -> Size:
    return check_limit(parse_size(text), text)


OOM_SCORE_ADJ_RANGE = range(-1000, 1001)  # the kernel's: -1000 is never chosen, 1000 always first


def parse_oom_score_adj(text: str) -> int:
    raw = str(text).strip()
    value = int(raw) if re.fullmatch(r"[-+]?[0-9]{1,5}", raw) else None
    if value is None or value not in OOM_SCORE_ADJ_RANGE:
        raise ValueParseError(f"invalid oom_score_adj {raw!r}: expected an integer from -1000 to 1000")
    return value


# How a command-line string becomes a value, by kind (config.py reads TOML values of the same kinds).
CLI_PARSERS: dict[str, Callable[[str], Any]] = {
    "memory": parse_size,
    "size": parse_size,
    "limit": parse_limit,
    "temp": parse_temp,
    "duration": parse_duration,
    "interval": parse_interval,
    "signal": parse_signal,
    "nice": parse_nice,
    "oom_score_adj": parse_oom_score_adj,
    "on_hot": parse_on_hot,
    "cgroup": parse_cgroup,
    "switch": parse_switch,
    "command": parse_command,
    "gpu": parse_gpu_option,
    "lock": validate_lock_name,
    "path": str,
    # Kinds only a config file sets: their defaults are parsed here too.
    "text": str,
    "percent": float,
}
# The kinds whose values come from a fixed set: the very tuples their parsers check against. A function each, so
# nothing is computed (signal names) until a shell asks. gpu: auto, and the indexes the machine has (cli.options).
CHOICES: dict[str, Callable[[], tuple[str, ...]]] = {
    "on_hot": lambda: ON_HOT_CHOICES,
    "cgroup": lambda: CGROUP_CHOICES,
    "switch": lambda: SWITCH_CHOICES,
    "signal": signal_names,
    "nice": lambda: tuple(str(n) for n in NICE_RANGE),
    "gpu": lambda: (GPU_AUTO,),
}
# What an unset setting of these kinds holds (any other kind: None).
EMPTY: dict[str, Any] = {"regexes": (), "rules": (), "text": ""}


def effective_resume_temp(max_temp: float, resume_temp: float | None) -> float:
    """The one rule for where a pause ends: resume_temp, unless unset or above max_temp."""
    if resume_temp is None or resume_temp > max_temp:
        return max_temp - RESUME_BELOW
    return resume_temp
