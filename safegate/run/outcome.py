"""What supervising a job tells: events while it runs, and at the end its outcome with the run's figures."""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from typing import Any

import msgspec
from msgspec import field

from safegate.probes.gpu import GpuInfo


class Event(msgspec.Struct, frozen=True):
    kind: str  # admitted, warning, paused, resumed, breach, signal, exit, summary, ...
    message: str
    data: Mapping[str, Any] = field(default_factory=dict)
    time: float = field(default_factory=time.time)


class JobStats(msgspec.Struct, frozen=True):
    duration: float  # seconds, to the millisecond
    peak_job_mem: int  # bytes: the highest sample, or the kernel's peak RSS of a process if higher
    lowest_available: int | None  # MemAvailable; None before the first sample
    highest_temp: float | None  # any watched sensor, GPUs included; None without readings
    peak_job_gpu_mem: int | None  # None when the job's GPUs were not watched
    highest_gpu_temp: float | None
    highest_job_pressure: float | None = None  # the job's own memory pressure (a v2 cgroup), else None

    def as_json(self) -> dict[str, Any]:
        """The summary event's figures, under the keys docs/json.md promises."""
        return {
            "duration": self.duration,
            "peak_job_memory": self.peak_job_mem,
            "lowest_available": self.lowest_available,
            "highest_temp": self.highest_temp,
            "peak_job_gpu_memory": self.peak_job_gpu_mem,
            "highest_gpu_temp": self.highest_gpu_temp,
            "highest_job_pressure": self.highest_job_pressure,
        }


class StatsRecorder:
    """The figures of a run so far, updated from every sample."""

    def __init__(self, started: float) -> None:
        self.started = started
        self.peak_job_mem = 0
        self.lowest_available: int | None = None
        self.highest_temp: float | None = None
        self.peak_job_gpu_mem: int | None = None
        self.highest_gpu_temp: float | None = None
        self.highest_job_pressure: float | None = None

    def memory(self, job_mem: int, available: int) -> None:
        self.peak_job_mem = max(self.peak_job_mem, job_mem)
        if self.lowest_available is None or available < self.lowest_available:
            self.lowest_available = available

    def gpus(self, cards: Sequence[GpuInfo], job_vram: int) -> None:
        temps = [g.temp for g in cards if g.temp is not None]
        if temps:
            self.highest_gpu_temp = _highest(self.highest_gpu_temp, max(temps))
        self.peak_job_gpu_mem = job_vram if self.peak_job_gpu_mem is None else max(self.peak_job_gpu_mem, job_vram)

    def job_pressure(self, percent: float | None) -> None:
        if percent is not None:
            self.highest_job_pressure = _highest(self.highest_job_pressure, percent)

    def temperature(self, celsius: float) -> None:
        self.highest_temp = _highest(self.highest_temp, celsius)

    def result(self, now: float, kernel_peak: int) -> JobStats:
        """*kernel_peak*: the job's peak memory as the kernel counted it (Job.peak), which samples can miss."""
        return JobStats(
            duration=round(now - self.started, 3),
            peak_job_mem=max(self.peak_job_mem, kernel_peak),
            lowest_available=self.lowest_available,
            highest_temp=self.highest_temp,
            peak_job_gpu_mem=self.peak_job_gpu_mem,
            highest_gpu_temp=self.highest_gpu_temp,
            highest_job_pressure=self.highest_job_pressure,
        )


def _highest(current: float | None, value: float) -> float:
    return value if current is None else max(current, value)


class Outcome(msgspec.Struct, frozen=True):
    exit_code: int
    reason: str  # exited, signalled, memory, thermal, gpu
    status: int | None  # the job's exit status, when it exited
    signal: int | None  # the signal that ended the job, when one did
    stats: JobStats
