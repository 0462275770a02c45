"""One sample of the job and the machine, and what the watchers make of it.

The supervisor calls these in its loop and carries out the Actions they return. This reads (through the Job
and the Probes), paces the dearer reads, keeps the run's figures up to date, and decides nothing itself: the
decisions are the watchers' (safegate.run.watchers).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping

import msgspec

from safegate.config.model import ThermalConfig
from safegate.exitcodes import ExitCode
from safegate.probes.drm import DrmUsage, read_usage
from safegate.probes.gpu import GpuInfo, GpuSnapshot, host_pid_map, read_gpus
from safegate.probes.jobtree import read_available
from safegate.probes.memory import read_pressure
from safegate.probes.snapshots import ThermalSnapshot
from safegate.probes.thermal import read_thermal
from safegate.run.job import Job
from safegate.run.limits import FillRate, Level, Pace, WatchLimits, next_interval
from safegate.run.outcome import Event, StatsRecorder
from safegate.run.watchers import NOTHING, Action, FloorWatch, GpuWatch, JobMemoryWatch, ThermalWatch, breach, to_take
from safegate.units import format_bytes

TIMELINE_EVERY = (0.05, 1.0)  # seconds between `sample` events: as often as sampling near a limit, at most 20/s
THERMAL_EVERY = 1.0  # temperatures change slowly; reading sensors costs more than reading meminfo
GPU_EVERY = 0.1  # NVML calls cost more than /proc reads; a tenth of a second still catches a spike


class Probes(msgspec.Struct, frozen=True):
    """What a sample reads of the machine (the job's own figures come from its Job). Replaceable in tests."""

    available: Callable[[], int] = read_available
    gpus: Callable[[str], GpuSnapshot] = read_gpus
    thermal: Callable[[ThermalConfig], ThermalSnapshot] = read_thermal
    pid_map: Callable[[], Mapping[int, int]] = host_pid_map
    drm_usage: Callable[[Iterable[int]], DrmUsage] = read_usage  # the job's VRAM on AMD/Intel cards (fdinfo)
    pressure: Callable[[], float | None] = read_pressure


class Hooks(msgspec.Struct, frozen=True):
    """Who else hears of a sample: the job's memory and VRAM (for its reservation), --log's timeline, and the
    user (a warning about the job itself, told at once: the job may be being stopped, when no watcher is asked)."""

    on_sample: Callable[[int], None] | None = None
    on_gpu_sample: Callable[[int], None] | None = None
    on_timeline: Callable[[Event], None] | None = None  # `sample` events
    on_warning: Callable[[Event], None] | None = None  # `warning` events


NO_HOOKS = Hooks()

class MemorySample(msgspec.Struct, frozen=True):
    job_mem: int  # bytes
    available: int  # the machine's MemAvailable


class Sampler:
    def __init__(
        self,
        limits: WatchLimits,
        job: Job,
        stats: StatsRecorder,
        *,
        clock: Callable[[], float],
        probes: Probes,
        hooks: Hooks = NO_HOOKS,
    ) -> None:
        self.limits = limits
        self.job = job
        self.stats = stats
        self.clock = clock
        self.probes = probes
        self.on_sample, self.on_gpu_sample, self.on_timeline = hooks.on_sample, hooks.on_gpu_sample, hooks.on_timeline
        self.on_warning = hooks.on_warning
        self._fill = FillRate()
        self._job_mem = JobMemoryWatch(limits)
        self._floor = FloorWatch(limits)
        self._gpu = GpuWatch(limits.gpu) if limits.gpu is not None else None
        self._thermal = ThermalWatch(limits)
        self._gpu_pace, self._thermal_pace = Pace(GPU_EVERY), Pace(THERMAL_EVERY)
        self._cards: tuple[GpuInfo, ...] = ()  # the job's GPUs at the last GPU sample: their heat counts too
        self._job_vram: int | None = None  # the job's own VRAM at the last GPU read
        self._hottest: float | None = None
        self._gap, self._last_event = TIMELINE_EVERY[1], float("-inf")
        # The job's kernel cap in force (jobrun configures the cgroup with --max-mem before the job starts), the
        # OOM kills seen so far, and the limits the caps in force at those kills stood for.
        self._cap: int | None = limits.max_mem
        self._kills = 0
        self._hit: tuple[str, ...] = ()
        self._hit_cap: int | None = None

    def memory(self, now: float) -> MemorySample:
        job = self.job
        left = job.left_cgroup()  # first: this sample already counts what the job holds outside its cgroup
        if left is not None and self.on_warning is not None:
            self.on_warning(Event("warning", left, {"pid": job.leader, "left_cgroup": True}))
        job.refresh()
        job_mem = job.memory(precise=False)
        # RSS counts pages shared between the job's processes once per process; PSS counts them once.
        # PSS costs a page-table walk, so it is taken only where the difference could matter.
        if len(job.members()) > 1 and self._job_mem.level(job_mem) is not Level.OK:
            job_mem = job.memory(precise=True)
        sample = self._record(now, job_mem, self.probes.available())
        self._note_kills()  # before the cap moves: a kill seen now happened under the cap in force until now
        self._cap = job.cap(self.limits, sample.available)
        job_pressure = job.pressure()
        self.stats.job_pressure(job_pressure)
        if self.on_sample is not None:
            self.on_sample(job_mem)
        if self.on_timeline is not None and now - self._last_event >= self._gap:
            self._last_event = now
            self.on_timeline(self._timeline_event(sample, job_pressure))
        return sample

    def _timeline_event(self, sample: MemorySample, job_pressure: float | None) -> Event:
        gpus = [{"index": g.index, "used": g.used, "temp": g.temp} for g in self._cards]
        data = {"job_memory": sample.job_mem, "available": sample.available, "pressure": self.probes.pressure(),
                "job_pressure": job_pressure,
                "temp": self._hottest, "gpus": gpus, "job_gpu_memory": self._job_vram}
        return Event("sample", f"job {format_bytes(sample.job_mem)}, MemAvailable {format_bytes(sample.available)}",
                     data)

    def gpus(self, now: float, *, judge: bool) -> Action:
        """When due, read the job's GPUs; what GpuWatch says if *judge* (while the job is stopped, only figures)."""
        watch = self._gpu
        if watch is None or not self._gpu_pace.due(now):
            return NOTHING
        gpu = watch.limits
        cards = tuple(g for g in self.probes.gpus(gpu.backend).gpus if g.index in gpu.indexes)
        self._cards = cards
        job = self.job
        pids = {*job.members(), job.leader}
        drm = self.probes.drm_usage(pids) if any(g.vendor != "nvidia" for g in cards) else None
        job_vram = watch.job_vram(cards, pids, self.probes.pid_map(), drm)
        self._job_vram = job_vram
        self.stats.gpus(cards, job_vram)
        if self.on_gpu_sample is not None:
            self.on_gpu_sample(job_vram)
        return watch.check(cards, job_vram) if judge else NOTHING

    def thermal(self, now: float, *, judge: bool, paused: bool) -> Action:
        """When due, read the sensors (and the last GPU temperatures); what ThermalWatch says if *judge*."""
        if not self._thermal_pace.due(now):
            return NOTHING
        readings = self._thermal.readings(self.probes.thermal(self.limits.thermal).readings, self._cards)
        if readings:
            self._hottest = max(r.temp for r in readings)
            self.stats.temperature(self._hottest)
        return self._thermal.check(readings, paused=paused, gpus=self._cards) if judge else NOTHING

    def memory_actions(self, sample: MemorySample) -> list[Action]:
        """What the job's and the machine's memory watchers say; a breach is measured again before it counts."""
        if Level.BREACH in (self._job_mem.level(sample.job_mem), self._floor.level(sample.available)):
            # Re-check before acting: memory may have been freed since the sample (earlyoom does the same).
            self.job.refresh(now=True)
            job_mem = self.job.memory(precise=len(self.job.members()) > 1)
            sample = self._record(self.clock(), job_mem, self.probes.available())
        return to_take([self._job_mem.check(sample.job_mem), self._floor.check(sample.available, sample.job_mem),
                        self.kernel_breach(read=False)])

    def _note_kills(self) -> None:
        """Read the job's OOM kills; new ones happened under the cap in force: note which limit it stood for."""
        kills = self.job.oom_kills()
        if kills > self._kills:
            self._kills, self._hit_cap = kills, self._cap
            self._hit = tuple(dict.fromkeys((*self._hit, *self.limits.capped_by(self._cap))))

    def kernel_breach(self, *, read: bool = True) -> Action:
        """The kernel's cap on the job's cgroup (--max-mem, or lower, the headroom above --min-available)
        OOM-killed a process of the job: a memory breach the kernel enforced, naming the limit the cap stood for
        when it did. *read*: read the kills now (False: this sample's reading, in memory(), is the latest)."""
        if read:
            self._note_kills()
        limits, kills = self.limits, self._kills
        said = {"max_mem": f"--max-mem {format_bytes(limits.max_mem or 0)}",
                "min_available": f"--min-available {format_bytes(limits.min_available or 0)}"}
        held = [said[key] for key in self._hit]
        if not kills or not held:
            return NOTHING
        cap = (f" of {format_bytes(self._hit_cap)} (what the job used plus MemAvailable's headroom above the floor)"
               if self._hit == ("min_available",) and self._hit_cap is not None else "")
        data = {"oom_kills": kills, "max_mem": limits.max_mem, "min_available": limits.min_available,
                "enforced_by": "kernel"}
        if len(self._hit) == 1:
            data["limit"] = self._hit[0]
        return breach(ExitCode.KILLED_MEMORY, "memory", f"the kernel enforced {' and '.join(held)}: the job's "
                      f"cgroup hit its cap{cap} and {kills} process(es) of the job were OOM-killed", data)

    def interval(self, sample: MemorySample) -> float:
        seconds = next_interval(sample.job_mem, sample.available, self.limits, self._fill.rate)
        self._gap = min(max(seconds, TIMELINE_EVERY[0]), TIMELINE_EVERY[1])  # more `sample` events near a limit
        return seconds

    def _record(self, now: float, job_mem: int, available: int) -> MemorySample:
        self.stats.memory(job_mem, available)
        self._fill.update(now, job_mem, available)
        return MemorySample(job_mem, available)
