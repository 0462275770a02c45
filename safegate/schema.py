"""One schema for what safegate reads from files others can write: tickets, holder records (grants are
holder records too), history. Holder records and history runs decode straight into their own records
(probes.snapshots.HolderRecord, config.history.Run), typed with the bounded types here.

Every field has a type and a range, checked by msgspec while it decodes the JSON (in C, no intermediate
dict): pids and sizes are bounded non-negative integers, times finite numbers between the epoch and now
(plus a day of clock skew), names lock names, free text bounded (it is escaped where shown). A file that does
not fit raises nothing but `BadRecord`, which every reader turns into "ignored" (another user's file) or "set
aside" (the user's own); no number another user wrote can overflow, and no value is trusted by its type alone.

Records everywhere in safegate are msgspec Structs, so these checks cost no second library: the decoder of each
kind is built on its first use.
"""

from __future__ import annotations

import time
from typing import Annotated, Any

import msgspec

from safegate.errors import BadRecord
from safegate.units import validate_lock_name

__all__ = ["BadRecord", "TicketStateWire", "TicketWire", "decode", "encode", "lock_name", "not_future"]

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
Cmdline = Annotated[list[str], msgspec.Meta(max_length=CMDLINE_MAX)]


def not_future(*times: float | None) -> None:
    limit = time.time() + TIME_SKEW
    for t in times:
        if t is not None and t > limit:
            raise ValueError(f"time {t!r} is in the future")


def lock_name(name: str | None) -> None:
    if name is not None:
        validate_lock_name(name)  # a ValueError: msgspec reports it as a validation error of the record


class TicketWire(msgspec.Struct):
    """A waiter's ticket (.ticket.<pid>.<start>.json): written once, when the waiter takes its place. Its place
    in line is the kernel's time on the file, never a value in it."""

    user: Text
    lock: str | None
    profile: Text
    need: Size

    def __post_init__(self) -> None:
        lock_name(self.lock)


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
