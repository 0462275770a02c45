"""One schema for what safegate reads from files others can write: tickets, holder records (grants are
holder records too), history (whose runs decode straight into config.history.Run, with the types here).

Every field has a type and a range, checked by msgspec while it decodes the JSON (in C, no intermediate
dict): pids and sizes are bounded non-negative integers, times finite numbers between the epoch and now
(plus a day of clock skew), names lock names, free text bounded (it is escaped where shown). A file that does
not fit raises nothing but `BadRecord`, which every reader turns into "ignored" (another user's file) or "set
aside" (the user's own); no number another user wrote can overflow, and no value is trusted by its type alone.

msgspec is imported with this module, and this module only where a file is actually read, so a check in an
empty lock dir pays nothing for it.
"""

from __future__ import annotations

import time
from typing import Annotated, Any

import msgspec

from safegate.errors import BadRecord
from safegate.units import validate_lock_name

__all__ = ["BadRecord", "HolderWire", "TicketStateWire", "TicketWire", "decode", "encode", "not_future"]

PID_MAX = 4_194_304  # PID_MAX_LIMIT on 64-bit Linux: no process has a larger pid
SIZE_MAX = 2**53  # bytes (8 PiB): past any machine, and every such size is exact as a float too
TIME_SKEW = 86_400.0  # seconds a clock may run ahead of ours and its times still count as "now"
TEXT_MAX = 512  # characters of a free-text field (a reason, a user or host name)
CMDLINE_MAX = 8192  # arguments of a recorded command line (holder records cut theirs below 16 KiB of JSON)

Pid = Annotated[int, msgspec.Meta(ge=1, le=PID_MAX)]
Size = Annotated[int, msgspec.Meta(ge=0, le=SIZE_MAX)]
Seconds = Annotated[float, msgspec.Meta(ge=0.0, le=10.0 * 365 * 86_400)]  # a duration: at most ten years
# Times since the epoch; the upper bound is checked against the clock in each record's __post_init__.
Timestamp = Annotated[float, msgspec.Meta(ge=0.0)]
Text = Annotated[str, msgspec.Meta(max_length=TEXT_MAX)]
ExitStatus = Annotated[int, msgspec.Meta(ge=-255, le=255 + 128)]
GpuIndex = Annotated[int, msgspec.Meta(ge=0, le=1023)]


def not_future(*times: float | None) -> None:
    limit = time.time() + TIME_SKEW
    for t in times:
        if t is not None and t > limit:
            raise ValueError(f"time {t!r} is in the future")


def _lock_name(name: str | None) -> None:
    if name is not None:
        validate_lock_name(name)  # a ValueError: msgspec reports it as a validation error of the record


class HolderWire(msgspec.Struct, forbid_unknown_fields=False):
    """A holder record (<name>.holder-<token>.json), as written by the process that holds the lock."""

    pid: Pid
    start_time: Timestamp
    user: Text
    host: Text
    cmdline: Annotated[list[str], msgspec.Meta(max_length=CMDLINE_MAX)]
    started_at: Timestamp
    profile: Text
    lock: str
    job_pid: Pid | None = None
    job_start_time: Timestamp | None = None
    need: Size = 0
    used: Size = 0
    gpu_index: GpuIndex | None = None
    gpu_need: Size = 0
    gpu_used: Size = 0
    owner: Pid | None = None  # a grant's: the process its check granted to
    owner_start: Timestamp | None = None

    def __post_init__(self) -> None:
        _lock_name(self.lock)
        not_future(self.start_time, self.started_at, self.job_start_time, self.owner_start)


class TicketWire(msgspec.Struct):
    """A waiter's ticket (.ticket.<pid>.<start>.json): written once, when the waiter takes its place. Its place
    in line is the kernel's time on the file, never a value in it."""

    user: Text
    lock: str | None
    profile: Text
    need: Size

    def __post_init__(self) -> None:
        _lock_name(self.lock)


class TicketStateWire(msgspec.Struct):
    """What a waiter waits for now (.ticket.<pid>.<start>.state), rewritten when that changes."""

    blocked_by: Text = ""
    reason: Text = ""
    memory_only: bool = False


# The history file: each run decoded on its own (msgspec.Raw), so a bad one costs that run, not the file.
HistoryWire = dict[Annotated[str, msgspec.Meta(max_length=TEXT_MAX)], list[msgspec.Raw]]

_decoders: dict[Any, msgspec.json.Decoder[Any]] = {}


def decode(raw: bytes, kind: Any) -> Any:
    """*raw* decoded as *kind* (a record above, or HistoryWire), or BadRecord naming the field and the fault."""
    decoder = _decoders.get(kind)
    if decoder is None:
        decoder = _decoders[kind] = msgspec.json.Decoder(kind)
    try:
        return decoder.decode(raw)
    except (msgspec.DecodeError, msgspec.ValidationError) as exc:
        raise BadRecord(str(exc)) from None
    except RecursionError:
        raise BadRecord("nested too deeply") from None


def encode(record: Any) -> bytes:
    return msgspec.json.encode(record)
