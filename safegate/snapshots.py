"""Frozen snapshots of the machine, as the probes read it and the policy functions judge it."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class MemorySnapshot:
    total: int
    available: int  # MemAvailable: what can be allocated without swapping; swap is not counted
    pressure_some_avg10: float | None  # PSI "some avg10" in percent; None where /proc/pressure is absent


@dataclass(frozen=True)
class SensorReading:
    chip: str
    label: str
    celsius: float
    source: str  # "psutil" or the path of a raw sysfs file

    @property
    def key(self) -> str:
        return f"{self.chip}:{self.label}"


@dataclass(frozen=True)
class ThermalSnapshot:
    readings: tuple[SensorReading, ...]
    notes: tuple[str, ...] = ()  # sensors that could not be read or read implausible values

    @property
    def hottest(self) -> SensorReading | None:
        return max(self.readings, key=lambda r: r.celsius, default=None)


@dataclass(frozen=True)
class ProcessInfo:
    pid: int
    ppid: int
    cmdline: str  # arguments joined by spaces, as pgrep -f matches them
    rss: int  # bytes
    safegate: bool = False  # a safegate process itself (see probes.processes.is_safegate)


@dataclass(frozen=True)
class ProcessSnapshot:
    processes: tuple[ProcessInfo, ...]
    excluded: frozenset[int]  # safegate itself, its ancestors, and what it started
