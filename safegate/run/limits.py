"""The limits a job runs under, the levels a sample is at against them, and how often to sample.

Pure: no reads, no clock (a time is passed in), no printing. What each limit does about its level is in
safegate.run.watchers; the supervisor only measures and acts.
"""

from __future__ import annotations

from enum import Enum

import msgspec

from safegate.config.model import ThermalConfig
from safegate.units import Size

CEILING = 1.0  # far from every limit: one sample a second
# The fastest a job is assumed to fill memory when it has not been seen growing yet. A 2-core VM here
# first-touches about 0.45 GB/s; a workstation does several GB/s.
ASSUMED_FILL_RATE = 2 * 1024**3
# A burst of growth still counts at half its rate one sample later, a quarter two samples later, ...
FILL_RATE_DECAY = 0.5
WARN_FRACTION = 0.9
REARM_FRACTION = 0.85


class WatchLimits(msgspec.Struct, frozen=True):
    max_mem: int | None  # job memory (bytes) that is a breach
    min_available: int | None  # system MemAvailable at or below which is a breach
    max_temp: float
    resume_temp: float
    on_hot: str  # pause | kill | warn
    grace: float
    interval: float  # the shortest sampling interval (near a limit)
    warn_signal: int | None
    thermal: ThermalConfig
    gpu: GpuLimits | None = None  # None: the job's GPUs are not watched

    def kernel_cap(self, usage: int, available: int) -> int | None:
        """The job's cgroup cap after a sample: --max-mem, and no more than the job can take before MemAvailable
        reaches --min-available (what it uses plus the headroom above the floor), so the kernel holds the floor
        between two samples too. None: nothing to cap."""
        caps = [self.max_mem] if self.max_mem is not None else []
        if self.min_available:
            caps.append(usage + max(0, available - self.min_available))
        return min(caps) if caps else None

    def capped_by(self, cap: int | None) -> tuple[str, ...]:
        """The limits a kernel cap of *cap* bytes (kernel_cap's) stood for: max_mem when it was the cap, else
        min_available, whose headroom made it lower; both when the cap is not known."""
        by_max = self.max_mem is not None and (cap is None or cap >= self.max_mem)
        by_floor = bool(self.min_available) and (cap is None or self.max_mem is None or cap < self.max_mem)
        return tuple(key for key, held in (("max_mem", by_max), ("min_available", by_floor)) if held)

    @property
    def hard_floor(self) -> int | None:
        """During the grace period, MemAvailable at or below this means SIGKILL at once."""
        return self.min_available // 2 if self.min_available is not None else None


class Level(str, Enum):
    OK = "ok"
    WARN = "warn"
    BREACH = "breach"


class GpuLimits(msgspec.Struct, frozen=True):
    backend: str
    indexes: tuple[int, ...]  # the GPUs the job was given
    max_job: int | None  # the job's own VRAM (bytes) that is a breach
    min_free: Size | None  # a card's free VRAM at or below which is a breach (percent: of the card)
    warn_free: Size | None  # ... at or below which is a warning

    def card_level(self, free: int, total: int) -> Level:
        if self.min_free is not None and free <= self.min_free.resolve(total):
            return Level.BREACH
        if self.warn_free is not None and free <= self.warn_free.resolve(total):
            return Level.WARN
        return Level.OK

    def job_level(self, used: int) -> Level:
        return ceiling_level(used, self.max_job)


def ceiling_level(value: int, limit: int | None) -> Level:
    """A breach at *limit*, a warning from WARN_FRACTION of it."""
    if limit is None:
        return Level.OK
    if value >= limit:
        return Level.BREACH
    return Level.WARN if value >= WARN_FRACTION * limit else Level.OK


def job_level(job_mem: int, limits: WatchLimits) -> Level:
    return ceiling_level(job_mem, limits.max_mem)


def floor_level(available: int, limits: WatchLimits) -> Level:
    if limits.min_available is None:
        return Level.OK
    if available <= limits.min_available:
        return Level.BREACH
    return Level.WARN if available * WARN_FRACTION <= limits.min_available else Level.OK


def rearmed_job(job_mem: int, limits: WatchLimits) -> bool:
    return limits.max_mem is None or job_mem < REARM_FRACTION * limits.max_mem


def rearmed_floor(available: int, limits: WatchLimits) -> bool:
    return limits.min_available is None or available * REARM_FRACTION > limits.min_available


def next_interval(job_mem: int, available: int, limits: WatchLimits, fill_rate: float) -> float:
    """Sleep for half the time the job would need to reach the nearest memory limit at *fill_rate*
    (the larger of the rate seen and ASSUMED_FILL_RATE), between the floor and CEILING, as earlyoom does."""
    headrooms = []
    if limits.max_mem is not None:
        headrooms.append(limits.max_mem - job_mem)
    if limits.min_available is not None:
        headrooms.append(available - limits.min_available)
    if not headrooms:
        return CEILING
    rate = max(fill_rate, ASSUMED_FILL_RATE)
    seconds = max(0, min(headrooms)) / rate / 2
    return min(CEILING, max(limits.interval, seconds))


class FillRate:
    """How fast memory is filling (the job growing or MemAvailable falling), in bytes per second.

    The fastest recent rate, decayed by FILL_RATE_DECAY per sample: one burst keeps the next samples close together
    for a while instead of being forgotten at the first quiet sample.
    """

    def __init__(self) -> None:
        self.rate = 0.0
        self._last: tuple[float, int, int] | None = None  # (time, job memory, available)

    def update(self, now: float, job_mem: int, available: int) -> float:
        if self._last is not None:
            then, last_job, last_available = self._last
            if now > then:
                rate = max(job_mem - last_job, last_available - available, 0) / (now - then)
                self.rate = max(rate, self.rate * FILL_RATE_DECAY)
        self._last = (now, job_mem, available)
        return self.rate


class Pace:
    """A reading taken at most once per *period* seconds (sensors and NVML cost more than /proc): due at once."""

    def __init__(self, period: float) -> None:
        self.period = period
        self._next = float("-inf")

    def due(self, now: float) -> bool:
        if now < self._next:
            return False
        self._next = now + self.period
        return True
