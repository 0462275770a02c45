"""What the checks return: one typed record of figures per check, the check result, and the verdict.

Code that decides (admission, slots, GPU choice) reads these fields; only the rendering layer turns them into
JSON (render.values_json) or text, so a renamed field is a type error, not a silently missing key.
"""

from __future__ import annotations

from collections.abc import Mapping
from enum import Enum
from typing import Any, TypeVar

import msgspec
from msgspec import field

from safegate.config.model import CompetingRule
from safegate.exitcodes import ExitCode
from safegate.probes.snapshots import GpuInfo, HolderRecord, LegacyState, ProcessInfo, Removal
from safegate.units import printable


class Status(str, Enum):
    PASS = "pass"
    FAIL = "fail"
    WARN = "warn"
    UNKNOWN = "unknown"
    NONE = "none"  # nothing to check (no GPU): passes


class _Keyed:
    """Reading a field by its documented key (values["available"]) as the API allowed before the figures were
    typed; new code reads the attribute."""

    def __getitem__(self, key: str) -> Any:
        try:
            return getattr(self, key)
        except AttributeError:
            raise KeyError(key) from None


class MemoryValues(_Keyed, msgspec.Struct, frozen=True):
    """The memory check's figures, in bytes."""

    available: int
    total: int
    reserved: int  # what admitted jobs still loading will take
    need: int
    left_after_start: int


class PressureValues(_Keyed, msgspec.Struct, frozen=True):
    """The pressure check's figure: PSI memory 'some avg10', in percent."""

    some_avg10: float | None


class GpuTemp(msgspec.Struct, frozen=True):
    """One GPU's temperature and the limit it was judged by."""

    temp: float
    limit: float


class ThermalValues(_Keyed, msgspec.Struct, frozen=True):
    """The thermal check's figures: the hottest reading, every sensor's, the GPUs'."""

    hottest: float | None
    sensor: str | None
    sensors: Mapping[str, float]
    gpus: Mapping[int, GpuTemp]  # by GPU index
    notes: tuple[str, ...]


class GpuValues(_Keyed, msgspec.Struct, frozen=True):
    """The GPU check's figures: what NVML reported and which GPUs the job may use."""

    backend: str
    driver: str | None
    need: int
    gpus: tuple[GpuInfo, ...]
    candidates: tuple[int, ...]  # indexes the job may use
    reserved: Mapping[int, int]  # VRAM admitted jobs will still take, by GPU index
    chosen: int | None
    notes: tuple[str, ...]


class LockValues(_Keyed, msgspec.Struct, frozen=True):
    """The lock check's figures: the lock, its holder, the legacy PID files."""

    lock: str | None
    path: str | None
    held: bool
    holder: HolderRecord | None
    holder_alive: bool
    legacy: tuple[LegacyState, ...]


class CompetingMatch(msgspec.Struct, frozen=True):
    """A process a competing rule matched, and what it matched."""

    process: ProcessInfo
    rule: CompetingRule
    matched: str = ""  # the text the rule found: the program name, and what its args or pattern matched
    user: str = ""  # the process's owner; "" until the caller looked it up


class CompetingValues(_Keyed, msgspec.Struct, frozen=True):
    """The competing check's figures: the matches."""

    matches: tuple[CompetingMatch, ...]  # blocking first, then by RSS


class StaleValues(_Keyed, msgspec.Struct, frozen=True):
    """The stale check's figures: what cleanup removed."""

    removed: tuple[Removal, ...]


CheckValues = (MemoryValues | PressureValues | ThermalValues | GpuValues | LockValues | CompetingValues
               | StaleValues)
V = TypeVar("V", MemoryValues, PressureValues, ThermalValues, GpuValues, LockValues, CompetingValues, StaleValues)


class CheckResult(msgspec.Struct, frozen=True):
    """One check's outcome: passed, warned or failed, why, with its figures and thresholds."""

    name: str
    status: Status
    reason: str
    code: ExitCode  # returned when this check fails
    values: CheckValues | None = None
    thresholds: Mapping[str, Any] = field(default_factory=dict)  # the limits applied, for people and --json
    # The name of another failing check this one fails only because of (memory short only by what the holder
    # of the job's own lock takes): that check's code goes first.
    caused_by: str | None = None
    # It can never pass on this machine (a need larger than the memory there is): waiting is pointless.
    never: bool = False

    @property
    def blocks(self) -> bool:
        return self.status is Status.FAIL


class Verdict(msgspec.Struct, frozen=True):
    """Every check of one evaluation, and the exit code they make."""

    profile: str
    checks: tuple[CheckResult, ...]

    @property
    def failures(self) -> tuple[CheckResult, ...]:
        return tuple(c for c in self.checks if c.blocks)

    @property
    def hopeless(self) -> bool:
        """Some failing check can never pass here: a wait ends at once."""
        return any(c.never for c in self.failures)

    @property
    def ok(self) -> bool:
        return not self.failures

    @property
    def exit_code(self) -> ExitCode:
        # When several checks fail, the lowest code wins, but a failure caused by another failing check
        # (caused_by) gives way to it: the cause is what the caller must wait for.
        failing = {c.name for c in self.failures}
        primary = [c for c in self.failures if c.caused_by not in failing]
        return min((c.code for c in primary or self.failures), default=ExitCode.OK)

    def result(self, name: str) -> CheckResult | None:
        return next((c for c in self.checks if c.name == name), None)

    def values(self, kind: type[V]) -> V | None:
        """The figures of the check that produced *kind* (MemoryValues, GpuValues, ...), if it ran."""
        return next((c.values for c in self.checks if isinstance(c.values, kind)), None)


def blocking_summary(verdict: Verdict) -> str:
    """One line naming what blocks, for -q and for progress while waiting."""
    return "; ".join(f"{c.name}: {printable(c.reason)}" for c in verdict.checks if c.status is Status.FAIL)


Cause = tuple[tuple[str, int, str | None, object], ...]


def blocking_cause(verdict: Verdict) -> Cause:
    """What blocks, by identity only: each failing check's name, code and cause, and whom it waits for (the
    lock and its holder, the competing pids). Never its running figures (how long held, bytes free, degrees):
    those change at every look, and a waiter says a line when the cause changes, not when it is measured again."""
    return tuple((c.name, int(c.code), c.caused_by, _identity(c)) for c in verdict.failures)


def _identity(check: CheckResult) -> object:
    values = check.values
    if isinstance(values, LockValues):
        holder = values.holder
        # The holder's own process (pid and start time: one process, even after pid reuse) and its grant's owner;
        # not its job pid, which the holder fills in once its job starts: the same hold.
        who = None if holder is None else (holder.pid, holder.start_time, holder.owner)
        legacy = tuple(sorted(s.pid for s in values.legacy if s.alive and not s.safegate and s.pid is not None))
        return values.lock, values.held, who, values.holder_alive, legacy
    if isinstance(values, CompetingValues):
        return tuple(sorted(m.process.pid for m in values.matches if m.rule.action == "block"))
    if values is None:
        return check.reason  # no figures to tell apart: its words are all there is
    return None  # memory, pressure, temperature, GPU: the check itself is the cause; its numbers are figures
