"""What each limit makes of a sample: nothing, a warning, a pause, a resume or a breach.

One small object per limit, each owning its warned/rearm state. They read nothing, keep no clock and print
nothing: the supervisor measures, hands them plain values or frozen snapshots, and carries out the Action.
Once an Action is a breach the supervisor stops asking (the job is being stopped), so no watcher needs to
know about termination.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence, Set
from enum import Enum
from typing import Any

import msgspec
from msgspec import field

from safegate.exitcodes import ExitCode
from safegate.gate.policy import CLOCKS_BLOCK, CLOCKS_WARN, clock_trouble, gpu_temp_limit, hotspot_limit
from safegate.probes.drm import DrmUsage
from safegate.probes.gpu import GpuInfo
from safegate.probes.snapshots import SensorReading
from safegate.run.limits import (
    GpuLimits,
    Level,
    WatchLimits,
    floor_level,
    job_level,
    rearmed_floor,
    rearmed_job,
)
from safegate.units import format_bytes


class Kind(str, Enum):
    NONE = "none"
    WARN = "warn"
    PAUSE = "pause"
    RESUME = "resume"
    BREACH = "breach"


class Action(msgspec.Struct, frozen=True):
    kind: Kind
    message: str = ""
    data: Mapping[str, Any] = field(default_factory=dict)
    code: ExitCode | None = None  # a breach: safegate's exit status
    reason: str = ""  # a breach: memory, gpu or thermal
    # A warning --warn-signal goes with: memory (RAM or VRAM) the job could shed. Heat is not the job's to shed.
    warn_signal: bool = False


NOTHING = Action(Kind.NONE)


def breach(code: ExitCode, reason: str, message: str, data: Mapping[str, Any]) -> Action:
    return Action(Kind.BREACH, message, data, code=code, reason=reason)


def memory_warning(message: str, data: Mapping[str, Any]) -> Action:
    return Action(Kind.WARN, message, data, warn_signal=True)


def to_take(actions: Sequence[Action]) -> list[Action]:
    """The actions of one sample to carry out: a breach alone (the first one), else every other, in order.

    A breach stops the job, so a warning found in the same sample is not worth telling.
    """
    breaches = [a for a in actions if a.kind is Kind.BREACH]
    if breaches:
        return breaches[:1]
    return [a for a in actions if a.kind is not Kind.NONE]


class ThresholdWatch(ABC):
    """One memory limit: a breach at its level; a warning once from WARN_FRACTION of it, and again only after the
    value has come back past REARM_FRACTION (no warning every sample while it hovers at the threshold).

    A subclass says what its level and its rearm point are; its check builds the breach and the warning (only
    the one that is told is built) and hands them to judge.
    """

    def __init__(self, limits: WatchLimits) -> None:
        self.limits = limits
        self.warned = False

    @abstractmethod
    def level(self, value: int) -> Level: ...

    @abstractmethod
    def rearmed(self, value: int) -> bool: ...

    def judge(self, value: int, breach: Callable[[], Action], warning: Callable[[], Action]) -> Action:
        level = self.level(value)
        if level is Level.BREACH:
            return breach()
        if level is Level.WARN and not self.warned:
            self.warned = True
            return warning()
        if self.warned and self.rearmed(value):
            self.warned = False
        return NOTHING


class JobMemoryWatch(ThresholdWatch):
    """--max-mem: the job's own memory."""

    def level(self, value: int) -> Level:
        return job_level(value, self.limits)

    def rearmed(self, value: int) -> bool:
        return rearmed_job(value, self.limits)

    def check(self, job_mem: int) -> Action:
        limit = self.limits.max_mem
        if limit is None:
            return NOTHING
        data = {"job_memory": job_mem, "max_mem": limit}
        return self.judge(
            job_mem,
            lambda: breach(ExitCode.KILLED_MEMORY, "memory",
                           f"job memory {format_bytes(job_mem)} >= --max-mem {format_bytes(limit)}", data),
            lambda: memory_warning(f"job memory {format_bytes(job_mem)} is {job_mem / limit:.0%} of --max-mem "
                                   f"{format_bytes(limit)}", data))


class FloorWatch(ThresholdWatch):
    """--min-available: the machine's MemAvailable, whoever uses the memory."""

    def level(self, value: int) -> Level:
        return floor_level(value, self.limits)

    def rearmed(self, value: int) -> bool:
        return rearmed_floor(value, self.limits)

    def check(self, available: int, job_mem: int) -> Action:
        floor = self.limits.min_available
        if floor is None:
            return NOTHING
        return self.judge(
            available,
            lambda: breach(ExitCode.KILLED_MEMORY, "memory",
                           f"MemAvailable {format_bytes(available)} <= --min-available {format_bytes(floor)}",
                           {"available": available, "min_available": floor, "job_memory": job_mem}),
            lambda: memory_warning(f"MemAvailable {format_bytes(available)} is near --min-available "
                                   f"{format_bytes(floor)}", {"available": available, "min_available": floor}))


def _measured(cards: Sequence[GpuInfo]) -> list[GpuInfo]:
    """The cards whose memory NVML reports (a failed card or unified memory has none)."""
    return [g for g in cards if g.used is not None and g.total is not None and g.free is not None]


class GpuWatch:
    """The job's GPUs: a failed card, the job's own VRAM (--max-gpu-mem) and each card's free memory
    (--min-gpu-free). One warning for all of them, again once none is at a warning level."""

    def __init__(self, limits: GpuLimits) -> None:
        self.limits = limits
        self.warned = False
        self.baseline: dict[int, int] | None = None  # each card's used memory at the first sample

    def job_vram(self, cards: Sequence[GpuInfo], job_pids: Set[int], pid_map: Mapping[int, int],
                 drm: DrmUsage | None = None) -> int:
        """The job's VRAM: on NVIDIA cards, per-process usage where NVML gives it; on AMD and Intel cards, what
        the job's DRM fdinfo records say (*drm*: probes.drm.read_usage of the job's processes, by PCI device);
        else the cards' growth since the first sample.

        *pid_map* turns NVML's host pids into ours (inside a PID namespace); the first call records the baseline.
        """
        measured = _measured(cards)
        if self.baseline is None:
            self.baseline = {g.index: g.used or 0 for g in measured}
        nvidia = [g for g in measured if g.vendor == "nvidia"]
        others = [g for g in measured if g.vendor != "nvidia"]
        return self._nvidia_vram(nvidia, job_pids, pid_map) + self._drm_vram(others, drm)

    def _growth(self, cards: Sequence[GpuInfo]) -> int:
        baseline = self.baseline or {}
        return sum(max(0, (g.used or 0) - baseline.get(g.index, 0)) for g in cards)

    def _nvidia_vram(self, cards: Sequence[GpuInfo], job_pids: Set[int], pid_map: Mapping[int, int]) -> int:
        procs = [p for g in cards for p in g.processes if pid_map.get(p.pid, p.pid) in job_pids]
        if procs and all(p.used is not None for p in procs):
            return sum(p.used or 0 for p in procs)
        return self._growth(cards)

    def _drm_vram(self, cards: Sequence[GpuInfo], drm: DrmUsage | None) -> int:
        """fdinfo's figure where the job's fds could be read and every DRM client of the job reports its VRAM
        (a record without drm-pdev counts for the only card, if one); else the cards' growth."""
        if not cards:
            return 0
        if drm is None or not drm.readable or drm.unmeasured:
            return self._growth(cards)
        buses = {g.bus_id for g in cards if g.bus_id}
        unnamed = drm.vram.get("", 0) if len(cards) == 1 else 0
        return unnamed + sum(used for pdev, used in drm.vram.items() if pdev in buses)

    def check(self, cards: Sequence[GpuInfo], job_vram: int) -> Action:
        gpu = self.limits
        failed = [g for g in cards if g.error is not None]
        if failed:
            g = failed[0]
            return breach(ExitCode.KILLED_GPU_MEMORY, "gpu", f"GPU {g.index} failed: {g.error}", {"gpu": g.index})
        job = gpu.job_level(job_vram)
        if job is Level.BREACH:
            assert gpu.max_job is not None
            return breach(ExitCode.KILLED_GPU_MEMORY, "gpu", f"job GPU memory {format_bytes(job_vram)} >= "
                          f"--max-gpu-mem {format_bytes(gpu.max_job)}",
                          {"job_gpu_memory": job_vram, "max_gpu_mem": gpu.max_job})
        levels = [(g, gpu.card_level(g.free or 0, g.total or 0)) for g in _measured(cards)]
        breached = [g for g, level in levels if level is Level.BREACH]
        if breached:
            g = breached[0]
            assert gpu.min_free is not None and g.total is not None
            floor = gpu.min_free.resolve(g.total)
            return breach(ExitCode.KILLED_GPU_MEMORY, "gpu",
                          f"GPU {g.index} free memory {format_bytes(g.free or 0)} <= {format_bytes(floor)}",
                          {"gpu": g.index, "free": g.free, "min_gpu_free": floor})
        card_warn = [g for g, level in levels if level is Level.WARN]
        if job is not Level.WARN and not card_warn:
            self.warned = False
            return NOTHING
        if self.warned:
            return NOTHING
        self.warned = True
        if job is Level.WARN:
            assert gpu.max_job is not None
            message = (f"job GPU memory {format_bytes(job_vram)} is {job_vram / gpu.max_job:.0%} of "
                       f"--max-gpu-mem {format_bytes(gpu.max_job)}")
        else:
            g = card_warn[0]
            message = f"GPU {g.index}: {format_bytes(g.free or 0)} free of {format_bytes(g.total or 0)}"
        return memory_warning(message, {"job_gpu_memory": job_vram})


class Reading(msgspec.Struct, frozen=True):
    """One temperature against its own limits (a GPU's may be below max_temp: see policy.gpu_temp_limit)."""

    key: str
    temp: float
    hot_at: float
    cool_at: float


class ThermalWatch:
    """max_temp and on_hot: at or above max_temp, pause (until every sensor is below resume_temp), kill, or warn
    once (again after everything cooled below resume_temp). A HW clock-event reason on one of the job's GPUs
    (policy.CLOCKS_BLOCK) is heat too, until the card clears it; SW thermal slowdown warns once while it lasts."""

    def __init__(self, limits: WatchLimits) -> None:
        self.limits = limits
        self.warned = False
        self.soft_warned = False  # SW thermal slowdown told, until it clears
        self.held: str | None = None  # the card ("GPU 0") whose HW reason was last seen, until it clears

    def readings(self, sensors: Sequence[SensorReading], gpus: Sequence[GpuInfo]) -> list[Reading]:
        limits = self.limits
        readings = [Reading(r.key, r.celsius, limits.max_temp, limits.resume_temp) for r in sensors]
        readings += [Reading(f"GPU {g.index}", g.temp, gpu_temp_limit(g, limits.max_temp, resuming=False),
                             gpu_temp_limit(g, limits.resume_temp, resuming=True))
                     for g in gpus if g.temp is not None]
        # A junction or memory sensor against its own crit (policy.hotspot_limit); one without crit is not judged.
        for g in gpus:
            for sensor in g.hotspots:
                hot_at = hotspot_limit(sensor, resuming=False)
                cool_at = hotspot_limit(sensor, resuming=True)
                if hot_at is not None and cool_at is not None:
                    readings.append(Reading(f"GPU {g.index} {sensor.label}", sensor.celsius, hot_at, cool_at))
        return readings

    def check(self, readings: Sequence[Reading], *, paused: bool, gpus: Sequence[GpuInfo] = ()) -> Action:
        """*paused*: the job is stopped for heat now (so a hot sample does not pause it twice). *gpus*: the job's
        cards at the last GPU sample, for their clock-event reasons."""
        action = self._heat(readings, [(g, why) for g in gpus if (why := clock_trouble(g, CLOCKS_BLOCK))],
                            paused=paused)
        soft = [(g, why) for g in gpus if (why := clock_trouble(g, CLOCKS_WARN))]
        if not soft:
            self.soft_warned = False
        elif action.kind is Kind.NONE and not self.soft_warned:
            self.soft_warned = True
            g, why = soft[0]
            return Action(Kind.WARN, f"{why} (at its temperature target: normal under load; the job runs on)",
                          _clock_data(g))
        return action

    def _heat(self, readings: Sequence[Reading], hw: Sequence[tuple[GpuInfo, str]], *, paused: bool) -> Action:
        over = [r for r in readings if r.temp >= r.hot_at]
        on_hot = self.limits.on_hot
        if over or hw:
            if over:
                # Name the sensor that decides: the first one too hot.
                r = over[0]
                data: dict[str, Any] = {"sensor": r.key, "temp": r.temp, "max_temp": r.hot_at,
                                        "resume_temp": r.cool_at}
                hot, until = f"{r.key} at {r.temp:g} C >= max_temp {r.hot_at:g} C", f"below {r.cool_at:g} C"
            else:
                g, why = hw[0]
                data = _clock_data(g)
                hot, until = f"{why} (the card is throttling itself)", "the card clears it"
            if hw:
                self.held = f"GPU {hw[0][0].index}"
            if on_hot == "kill":
                return breach(ExitCode.KILLED_HOT, "thermal", hot, data)
            if on_hot == "pause" and not paused:
                return Action(Kind.PAUSE, f"{hot}; pausing the job until {until}", data)
            if on_hot == "warn" and not self.warned:
                self.warned = True
                return Action(Kind.WARN, hot, data)
            return NOTHING
        # No readings is not "cooled down"; a card's clearing reason is the end of its own episode.
        if (readings or self.held) and all(x.temp < x.cool_at for x in readings):
            self.warned = False
            held, self.held = self.held, None
            if paused:
                cleared = f"{held}: its clocks are no longer held down; " if held else ""
                if not readings:
                    return Action(Kind.RESUME, f"{cleared}resuming the job", {})
                # Named: the sensor closest to its resume_temp.
                r = max(readings, key=lambda x: x.temp - x.cool_at)
                data = {"sensor": r.key, "temp": r.temp, "max_temp": r.hot_at, "resume_temp": r.cool_at}
                return Action(Kind.RESUME, f"{cleared}{r.key} at {r.temp:g} C < resume_temp {r.cool_at:g} C; "
                              "resuming the job", data)
        return NOTHING


def _clock_data(g: GpuInfo) -> dict[str, Any]:
    """An event's figures for a card's clock-event reasons."""
    data: dict[str, Any] = {"sensor": f"GPU {g.index}", "gpu": g.index, "clock_reasons": list(g.clock_reasons or ())}
    if g.temp is not None:
        data["temp"] = g.temp
    return data
