"""Parsers for the values users type: sizes, durations, temperatures, lock names.

Pure functions; they raise ValueParseError with a message naming the value and what is accepted.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable

import msgspec

from safegate.errors import ValueParseError

_SIZE_RE = re.compile(r"^\s*([0-9]+(?:\.[0-9]+)?|\.[0-9]+)\s*([A-Za-z]*)\s*$")
_BINARY = {"": 1, "b": 1, "k": 1024, "m": 1024**2, "g": 1024**3, "t": 1024**4, "p": 1024**5}
_DECIMAL = {"kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12, "pb": 10**15}
SIZE_ACCEPTED = "a size like 512M, 1.5G, 10GiB (powers of 1024), 10GB (powers of 1000), or a percentage like 10%"
DURATION_ACCEPTED = "a duration like 30 (seconds), 250ms, 90s, 5m, 2h"
TEMP_ACCEPTED = "a temperature in degrees Celsius between -50 and 200, like 80"
LOCK_NAME_ACCEPTED = (
    "1-64 printable characters (at most 128 bytes in UTF-8) without '/', '\\', '..', spaces, or a leading '.' or '-'"
)
LOCK_NAME_MAX = 64
# File names are bounded in bytes (NAME_MAX, 255): <name>.holder-<pid>.<start>-<16 hex>.json adds up to 58.
LOCK_NAME_MAX_BYTES = 128


class Size(msgspec.Struct, frozen=True):
    """A size in bytes, or a percentage of total RAM resolved later against the machine."""

    bytes: int | None = None
    percent: float | None = None

    def resolve(self, total: int) -> int:
        if self.percent is not None:
            return int(total * self.percent / 100)
        assert self.bytes is not None
        return self.bytes

    def __str__(self) -> str:
        if self.percent is not None:
            return f"{self.percent:g}%"
        assert self.bytes is not None
        return format_bytes(self.bytes)


def parse_size(text: str, *, allow_percent: bool = True) -> Size:
    """Parse '512M', '1.5G', '10GiB', '10GB', '4096', '10%'."""
    raw = str(text)
    stripped = raw.strip()
    if allow_percent and stripped.endswith("%"):
        number = stripped[:-1].strip()
        try:
            pct = float(number)
        except ValueError:
            raise ValueParseError(f"invalid size {raw!r}: expected {SIZE_ACCEPTED}") from None
        if not math.isfinite(pct) or not 0 <= pct <= 100:
            raise ValueParseError(f"invalid size {raw!r}: a percentage must be between 0% and 100%")
        return Size(percent=pct)
    match = _SIZE_RE.match(raw)
    if match is None:
        accepted = SIZE_ACCEPTED if allow_percent else SIZE_ACCEPTED.split(", or a percentage", maxsplit=1)[0]
        raise ValueParseError(f"invalid size {raw!r}: expected {accepted}")
    number, unit = match.group(1), match.group(2).lower()
    if unit in _DECIMAL:
        factor = _DECIMAL[unit]
    else:
        # "G", "GiB", "Gi" and "GB"-less spellings are binary; strip the optional "ib"/"i".
        key = unit[:-2] if unit.endswith("ib") else unit[:-1] if unit.endswith("i") else unit
        if key not in _BINARY or (unit.endswith(("ib", "i")) and key in ("", "b")):
            raise ValueParseError(f"invalid size {raw!r}: unknown unit {match.group(2)!r}; expected {SIZE_ACCEPTED}")
        factor = _BINARY[key]
    value = float(number) * factor
    if not math.isfinite(value) or value > 2**63:
        raise ValueParseError(f"invalid size {raw!r}: too large")
    return Size(bytes=int(value))


_DURATION_RE = re.compile(r"^\s*([0-9]+(?:\.[0-9]+)?|\.[0-9]+)\s*(ms|s|m|h|d)?\s*$", re.IGNORECASE)
_DURATION_FACTORS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}


def parse_duration(text: str) -> float:
    """Parse '30', '250ms', '90s', '5m', '2h' into seconds."""
    raw = str(text)
    match = _DURATION_RE.match(raw)
    if match is None:
        raise ValueParseError(f"invalid duration {raw!r}: expected {DURATION_ACCEPTED}")
    seconds = float(match.group(1)) * _DURATION_FACTORS[(match.group(2) or "s").lower()]
    if not math.isfinite(seconds) or seconds > 10 * 365 * 86400:
        raise ValueParseError(f"invalid duration {raw!r}: longer than 10 years")
    return seconds


def parse_temp(text: str | float) -> float:
    """Parse '80', '80C', '72.5' (degrees Celsius)."""
    raw = str(text)
    cleaned = raw.strip().removesuffix("C").removesuffix("c").removesuffix("°").strip()
    try:
        value = float(cleaned)
    except ValueError:
        raise ValueParseError(f"invalid temperature {raw!r}: expected {TEMP_ACCEPTED}") from None
    if not math.isfinite(value) or not -50 <= value <= 200:
        raise ValueParseError(f"invalid temperature {raw!r}: expected {TEMP_ACCEPTED}")
    return value


SIGNAL_ACCEPTED = "a signal name or number like SIGUSR1, USR1 or 10"
ON_HOT_CHOICES = ("pause", "kill", "warn")
# Longer than any choice by this much, a word is not a typo of one: difflib is not even asked (hostile input).
_TYPO_SLACK = 8
_TYPO_CUTOFF = 0.6  # difflib.get_close_matches' own


def did_you_mean(given: str, choices: Iterable[str]) -> str:
    """The one wording of a suggestion for a mistyped name: "; did you mean 'max_mem'?" when some of *choices*
    are close to *given* (difflib's ratio; the same letters swapped count as close), else "". Appended to the
    message that names the value and what is accepted. Only the best match is named, or the two that tie for
    best (SIGUSR: SIGUSR1 or SIGUSR2): a shared prefix such as SIG makes many names look alike."""
    names = list(dict.fromkeys(choices))
    if not names or len(given) > max(map(len, names)) + _TYPO_SLACK:
        return ""
    import difflib  # only on the way to an error message

    def score(name: str) -> float:
        swapped = len(name) == len(given) and sorted(name) == sorted(given)
        return max(difflib.SequenceMatcher(None, given, name).ratio(), 0.9 if swapped else 0.0)

    scores = {name: score(name) for name in names}
    best = max(scores.values())
    if best < _TYPO_CUTOFF:
        return ""
    close = [name for name in names if scores[name] >= best - 0.02][:2]
    return f"; did you mean {' or '.join(repr(c) for c in close)}?"


def signal_names() -> tuple[str, ...]:
    """The signals --warn-signal takes by name, as parse_signal reads them (SIGUSR1), for completion and
    suggestions."""
    import signal

    return tuple(s.name for s in signal.Signals)


def parse_signal(text: str | int) -> int:
    """Parse 'SIGUSR1', 'usr1' or '10' into a signal number."""
    import signal

    raw = str(text).strip()
    if raw.isascii() and raw.isdigit():
        number = int(raw)
        if 0 < number < signal.NSIG:
            return number
        raise ValueParseError(f"invalid signal {raw!r}: expected {SIGNAL_ACCEPTED}")
    name = raw.upper()
    if not name.startswith("SIG"):
        name = "SIG" + name
    value = getattr(signal.Signals, name, None) if name.isidentifier() else None
    if value is None:
        hint = did_you_mean(name, signal_names()) if name.isidentifier() else ""
        raise ValueParseError(f"invalid signal {raw!r}: expected {SIGNAL_ACCEPTED}{hint}")
    return int(value)


def signal_name(signum: int) -> str:
    """SIGTERM, SIGRTMIN+6, or "signal N": every number a process can die of or be sent has a name to show."""
    import signal

    try:
        return signal.Signals(signum).name
    except ValueError:
        if signal.SIGRTMIN <= signum <= signal.SIGRTMAX:
            return f"SIGRTMIN+{signum - signal.SIGRTMIN}"
        return f"signal {signum}"


def parse_on_hot(text: str) -> str:
    value = str(text).strip().lower()
    if value not in ON_HOT_CHOICES:
        raise ValueParseError(f"invalid --on-hot value {text!r}: expected one of pause, kill, warn"
                              f"{did_you_mean(value, ON_HOT_CHOICES)}")
    return value


def parse_command(text: str) -> str:
    """A shell command line (run through sh -c): anything but empty."""
    value = str(text)
    if not value.strip() or "\0" in value:
        raise ValueParseError(f"invalid command {text!r}: expected a shell command line, e.g. 'notify-send safegate'")
    return value


CGROUP_CHOICES = ("auto", "on", "off")


def parse_cgroup(text: str) -> str:
    value = str(text).strip().lower()
    if value not in CGROUP_CHOICES:
        raise ValueParseError(f"invalid --cgroup value {text!r}: expected one of auto, on, off"
                              f"{did_you_mean(value, CGROUP_CHOICES)}")
    return value


SWITCH_CHOICES = ("on", "off")  # what completion offers; true and false are read too (TOML's own spelling)


def parse_switch(text: str) -> bool:
    value = str(text).strip().lower()
    if value not in (*SWITCH_CHOICES, "true", "false"):
        raise ValueParseError(f"invalid value {text!r}: expected on or off{did_you_mean(value, SWITCH_CHOICES)}")
    return value in ("on", "true")


NICE_RANGE = range(20)  # what --nice takes, and what completion offers


def parse_nice(text: str | int) -> int:
    raw = str(text).strip()
    try:
        value = int(raw)
    except ValueError:
        raise ValueParseError(f"invalid nice value {raw!r}: expected an integer from 0 to 19") from None
    if value not in NICE_RANGE:
        raise ValueParseError(f"invalid nice value {raw!r}: expected an integer from 0 to 19")
    return value


GPU_AUTO = "auto"


def parse_gpu_option(text: str) -> tuple[int, ...] | None:
    """'auto' -> None; '0' or '0,2' -> indexes. ValueParseError otherwise."""
    value = text.strip().lower()
    if value == GPU_AUTO:
        return None
    parts = [p.strip() for p in value.split(",")]
    if not parts or not all(p.isascii() and p.isdigit() for p in parts):
        hint = did_you_mean(value, (GPU_AUTO,))
        raise ValueParseError(f"invalid GPU selection {text!r}: expected auto or indexes like 0 or 0,2{hint}")
    return tuple(int(p) for p in parts)


BACKENDS = ("auto", "nvml", "drm", "none")


def validate_lock_name(name: str) -> str:
    """Return *name* if it is safe as a file name inside the lock dir, else raise."""
    ok = (
        0 < len(name) <= LOCK_NAME_MAX
        and _utf8_size(name) <= LOCK_NAME_MAX_BYTES
        and name.isprintable()
        and not any(ch.isspace() for ch in name)
        and "/" not in name
        and "\\" not in name
        and ".." not in name
        and not name.startswith((".", "-"))
    )
    if not ok:
        raise ValueParseError(f"invalid lock name {name!r}: expected {LOCK_NAME_ACCEPTED}")
    return name


def _utf8_size(text: str) -> int:
    try:
        return len(text.encode("utf-8"))
    except UnicodeEncodeError:
        return LOCK_NAME_MAX_BYTES + 1  # a lone surrogate (undecodable bytes in argv): no file name of ours


def printable(text: str) -> str:
    """*text* on one line and safe for a terminal: control characters shown as escapes (\\n, \\x1b)."""
    if text.isprintable():  # most text, checked in C: the report escapes hundreds of thousands of strings
        return text
    return "".join(ch if ch.isprintable() else repr(ch)[1:-1] for ch in text)


def format_bytes(n: int | float) -> str:
    """Human size in binary units, e.g. '9.8 GiB'."""
    value = float(n)
    sign = "-" if value < 0 else ""
    value = abs(value)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            return f"{sign}{value:.0f} {unit}" if unit == "B" else f"{sign}{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


def format_duration(seconds: float) -> str:
    if seconds < 60:
        return f"{seconds:.0f}s"
    if seconds < 3600:
        return f"{seconds // 60:.0f}m{seconds % 60:02.0f}s"
    return f"{seconds // 3600:.0f}h{(seconds % 3600) // 60:02.0f}m"
