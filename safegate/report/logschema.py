"""The lines of `exec --log` as typed records, decoded and checked by msgspec in one pass (C code): every field
`safegate report` reads has its type and range here, so a broken or hostile log is refused at the line that is
wrong (a `LogError` naming the log and the line) instead of failing later where a number is drawn.

The bounds: sizes are bytes up to 2**53 (8 PiB, and every size up to it is exact as the float a chart draws),
pids up to Linux's PID_MAX_LIMIT, exit codes and statuses 0..255 as exec writes them, signals 1..64, GPU
indexes 0..63, temperatures -273.15..1000 C, percentages 0..100, times RFC 3339 with a UTC offset between the
epoch and a day (clock skew) after the report is made. Strings are bounded by the line (MAX_LINE); the model
shortens what it keeps. An event this version does not know is read for its time and otherwise skipped.
Imported only by `report` (msgspec is not on `check`'s path).
"""

from __future__ import annotations

import re
from datetime import datetime, timezone
from typing import Annotated, ClassVar, Literal, TypeAlias

import msgspec

from safegate.errors import LogError

MAX_SIZE = 2**53
PID_MAX = 4_194_304  # PID_MAX_LIMIT on 64-bit Linux
MAX_GPU_INDEX = 63  # more GPUs than one machine holds; each one is a chart
MAX_LINE = 64 * 1024 * 1024  # an admitted line with a whole ARG_MAX command line, escaped, fits
CLOCK_SKEW = 86_400.0
ENDINGS = ("exited", "signalled", "memory", "gpu", "thermal")

Size = Annotated[int, msgspec.Meta(ge=0, le=MAX_SIZE)]
Pid = Annotated[int, msgspec.Meta(ge=1, le=PID_MAX)]
Status = Annotated[int, msgspec.Meta(ge=0, le=255)]
SignalNumber = Annotated[int, msgspec.Meta(ge=1, le=64)]
GpuIndex = Annotated[int, msgspec.Meta(ge=0, le=MAX_GPU_INDEX)]
Celsius = Annotated[float, msgspec.Meta(ge=-273.15, le=1000.0)]
Percent = Annotated[float, msgspec.Meta(ge=0.0, le=100.0)]
Seconds = Annotated[float, msgspec.Meta(ge=0.0, le=1e10)]
Stamp = Annotated[datetime, msgspec.Meta(tz=True)]
Ending = Literal["exited", "signalled", "memory", "gpu", "thermal"]


class Line(msgspec.Struct, kw_only=True, gc=False):
    """What every line has."""

    time: Stamp
    message: str = ""
    safegate_pid: Pid | None = None  # None: a log from before the field


class Unknown(Line, gc=False):
    """An event this version does not know."""

    event: str


class Tagged(Line, tag_field="event", gc=False):
    KIND: ClassVar[str] = ""


class Admitted(Tagged, tag="admitted", gc=False):
    KIND = "admitted"
    pid: Pid | None = None
    profile: str = ""
    lock: str | None = None
    argv: list[str] | None = None
    max_mem: Size | None = None
    min_available: Size | None = None
    max_temp: Celsius | None = None
    max_gpu_mem: Size | None = None
    cgroup: str | None = None
    waited: Seconds | None = None  # from arrival to admission; None: a log from before the field


class Waiting(Tagged, tag="waiting", gc=False):
    """The wait starts, or what it waits for changes; the message says it in full."""

    KIND = "waiting"
    exit_code: Status | None = None
    checks: list[str] = []


class Gpu(msgspec.Struct, kw_only=True, gc=False):
    index: GpuIndex | None = None
    used: Size | None = None
    temp: Celsius | None = None


class Sample(Tagged, tag="sample", gc=False):
    KIND = "sample"
    job_memory: Size
    available: Size
    pressure: Percent | None = None
    job_pressure: Percent | None = None
    temp: Celsius | None = None
    gpus: list[Gpu] = []
    job_gpu_memory: Size | None = None


class Notice(Tagged, tag="notice", gc=False):
    KIND = "notice"
    cgroup: str | None = None
    reason: str | None = None


class Marked(Tagged, gc=False):
    """A warning, breach, pause or resume: the measure and its limit."""

    job_memory: Size | None = None
    max_mem: Size | None = None
    available: Size | None = None
    min_available: Size | None = None
    job_gpu_memory: Size | None = None
    max_gpu_mem: Size | None = None
    gpu: GpuIndex | None = None
    free: Size | None = None
    min_gpu_free: Size | None = None
    sensor: str | None = None
    temp: Celsius | None = None
    max_temp: Celsius | None = None
    resume_temp: Celsius | None = None
    signal: str | None = None  # the --warn-signal sent, by name
    oom_kills: Size | None = None
    enforced_by: str | None = None
    reason: Literal["memory", "gpu", "thermal"] | None = None


class Warning_(Marked, tag="warning", gc=False):
    KIND = "warning"


class Breach(Marked, tag="breach", gc=False):
    KIND = "breach"


class Paused(Marked, tag="paused", gc=False):
    KIND = "paused"


class Resumed(Marked, tag="resumed", gc=False):
    KIND = "resumed"


class SignalSent(Tagged, tag="signal", gc=False):
    KIND = "signal"
    signal: str | None = None
    available: Size | None = None
    pids: list[Pid] = []


class Cleanup(Tagged, tag="cleanup", gc=False):
    KIND = "cleanup"
    pids: list[Pid] = []


class Exit(Tagged, tag="exit", gc=False):
    KIND = "exit"
    exit_code: Status | None = None
    reason: Ending | None = None
    status: Status | None = None
    signal: SignalNumber | None = None


class Summary(Tagged, tag="summary", gc=False):
    KIND = "summary"
    duration: Seconds | None = None
    peak_job_memory: Size | None = None
    lowest_available: Size | None = None
    highest_temp: Celsius | None = None
    peak_job_gpu_memory: Size | None = None
    highest_gpu_temp: Celsius | None = None
    highest_job_pressure: Percent | None = None
    reason: Ending | None = None
    exit_code: Status | None = None


class NotAdmitted(Tagged, tag="blocked", gc=False):
    KIND = "blocked"
    exit_code: Status | None = None
    waited: Seconds | None = None


class NotStarted(Tagged, tag="not_started", gc=False):
    KIND = "not_started"
    exit_code: Status | None = None


Event: TypeAlias = (Admitted | Waiting | Sample | Notice | Warning_ | Breach | Paused | Resumed | SignalSent | Cleanup
                    | Exit | Summary | NotAdmitted | NotStarted)
_PATH = re.compile(r"(.*) - at `\$(.*)`$", re.DOTALL)
_STEP = re.compile(r"\.(\w+)|\[(\d+)\]")
_BYTE = re.compile(r"\(byte (\d+)\)")
_NOT_JSON_NUMBERS = (b"NaN", b"Infinity")


class LineDecoder:
    """Decodes the lines of one log: (Unix time, event) or a LogError naming *source* and the line."""

    def __init__(self, source: str, now: float) -> None:
        self.source = source
        self.latest = now + CLOCK_SKEW
        self._event = msgspec.json.Decoder(Event).decode
        self._unknown = msgspec.json.Decoder(Unknown).decode

    def __call__(self, number: int, text: bytes | str) -> tuple[float, Event | Unknown]:
        where = f"{self.source} line {number}"
        if len(text) > MAX_LINE:
            raise LogError(f"{where}: longer than {MAX_LINE // 2**20} MiB; expected safegate exec --log output")
        try:
            try:
                event: Event | Unknown = self._event(text)
            except msgspec.ValidationError as exc:
                if not str(exc).endswith(" - at `$.event`") or str(exc).startswith("Expected"):
                    raise
                event = self._unknown(text)  # an event of a later safegate: its time is still checked
        except msgspec.ValidationError as exc:
            raise _refused(where, text, str(exc)) from None
        except msgspec.DecodeError as exc:
            raise _not_json(where, text, str(exc)) from None
        except RecursionError:
            raise _too_deep(where) from None
        moment = event.time.timestamp()
        if not 0.0 <= moment <= self.latest:
            latest = datetime.fromtimestamp(self.latest, tz=timezone.utc).isoformat(timespec="seconds")
            raise LogError(f"{where}: time {event.time.isoformat()} is not between 1970-01-01T00:00:00+00:00 and "
                           f"{latest} (a day after now); expected the time exec wrote the line")
        return moment, event


def _not_json(where: str, text: bytes | str, detail: str) -> LogError:
    raw = text.encode("utf-8", "surrogatepass") if isinstance(text, str) else text
    try:
        raw.decode("utf-8")
    except UnicodeDecodeError:
        return LogError(f"{where}: not UTF-8 text; expected safegate exec --log output")
    found = _BYTE.search(detail)
    if found is not None:
        at = int(found.group(1))
        literal = next((word for word in _NOT_JSON_NUMBERS if raw.startswith(word, at)), None)
        detail = _BYTE.sub(f"at column {at + 1}", detail.removeprefix("JSON is malformed: "))
        if literal is not None:  # what Python's json module writes for float("nan") and float("inf")
            sign = "-" if raw[at - 1:at] == b"-" else ""
            return LogError(f"{where}: not JSON ({sign}{literal.decode()} at column {at + 1 - len(sign)} is not a "
                            "JSON number); expected safegate exec --log output")
    return LogError(f"{where}: not JSON ({detail[:1].lower()}{detail[1:]}); expected safegate exec --log output")


def _refused(where: str, text: bytes | str, message: str) -> LogError:
    """The ValidationError *message* as one line naming the field, its value (as written) and what is accepted."""
    try:
        msgspec.json.decode(text, type=msgspec.Raw)  # the typed decoder stops at the first wrong field
    except msgspec.DecodeError as exc:
        return _not_json(where, text, str(exc))
    except RecursionError:
        return _too_deep(where)
    found = _PATH.match(message)
    detail, path = (found.group(1), found.group(2)) if found else (message, "")
    got = re.match(r"Expected `object`, got `(\w+)`", detail)
    if not path and got is not None:
        name = {"int": "number", "float": "number", "str": "string", "bool": "boolean"}.get(got.group(1), got.group(1))
        return LogError(f"{where}: a JSON {name}, not an object; expected safegate exec --log output")
    value = _raw_at(text, path)
    missing = re.match(r"Object missing required field `(\w+)`", detail)
    if path == ".time" and value is not None and value.startswith(b'"'):
        return LogError(f"{where}: time {_shown(value)} is not an RFC 3339 time with a UTC offset (as exec --log "
                        "writes: 2026-12-02T02:00:00.000+00:00)")
    if path in (".event", ".time") or (missing is not None and not path and missing.group(1) in ("event", "time")):
        return LogError(f"{where}: no \"event\" and \"time\" strings; expected safegate exec --log output")
    kind = _raw_at(text, ".event")
    try:
        event = f"{msgspec.json.decode(kind, type=str)[:40]} event" if kind is not None else "event"
    except ValueError:
        event = "event"
    if missing is not None:
        return LogError(f"{where}: {event} without {path[1:] + '.' if path else ''}{missing.group(1)}; expected "
                        "safegate exec --log output")
    accepted = f"expected one of {', '.join(ENDINGS)}" if path == ".reason" else detail.replace("`", "")
    accepted = accepted[:1].lower() + accepted[1:]
    shown = "" if value is None else f" is {_shown(value)}"
    return LogError(f"{where}: {event}'s {path[1:] or 'line'}{shown}; {accepted}")


def _too_deep(where: str) -> LogError:
    return LogError(f"{where}: not JSON this reader takes (nested too deep); expected safegate exec --log output")


def _raw_at(text: bytes | str, path: str) -> bytes | None:
    """The JSON text at *path* (`.gpus[0].used`) of the line, as written: numbers are never converted (a
    100,000-digit one is past Python's int-to-str limit)."""
    raw = text.encode("utf-8", "surrogatepass") if isinstance(text, str) else text
    for key, index in _STEP.findall(path):
        try:
            if index:
                raw = bytes(msgspec.json.decode(raw, type=list[msgspec.Raw])[int(index)])
            else:
                raw = bytes(msgspec.json.decode(raw, type=dict[str, msgspec.Raw])[key])
        except (ValueError, RecursionError, LookupError):
            return None
    return raw


def _shown(raw: bytes) -> str:
    """A value as written in the log, short: a string quoted, a long number by its digits, a list or object by
    its kind."""
    text = raw.decode("utf-8", "replace")
    if text.startswith('"'):
        try:
            value = msgspec.json.decode(raw, type=str)
        except ValueError:
            return text[:40]
        return repr(value[:40] + ("..." if len(value) > 40 else ""))
    if re.fullmatch(r"-?\d{21,}", text):
        return f"a {len(text.lstrip('-'))}-digit number"
    if text[:1] in ("[", "{"):
        return "a JSON array" if text[:1] == "[" else "a JSON object"
    return text[:40]
