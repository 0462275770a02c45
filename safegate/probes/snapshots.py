"""Frozen snapshots of the machine and of the lock dir, as the probes and the lock store read them and the
policy functions judge them. Plain data only: no I/O, so policy.py can import it and stay pure."""

from __future__ import annotations

from pathlib import Path

import msgspec
from msgspec import field

from safegate import schema


class MemorySnapshot(msgspec.Struct, frozen=True):
    """RAM as /proc/meminfo and PSI report it."""

    total: int
    available: int  # MemAvailable: what can be allocated without swapping; swap is not counted
    pressure_some_avg10: float | None  # PSI "some avg10" in percent; None where /proc/pressure is absent


class SensorReading(msgspec.Struct, frozen=True):
    """One temperature sensor's reading."""

    chip: str
    label: str
    celsius: float
    source: str  # "psutil" or the path of a raw sysfs file

    @property
    def key(self) -> str:
        return f"{self.chip}:{self.label}"


class ThermalSnapshot(msgspec.Struct, frozen=True):
    """Every temperature read, and what could not be."""

    readings: tuple[SensorReading, ...]
    notes: tuple[str, ...] = ()  # sensors that could not be read or read implausible values

    @property
    def hottest(self) -> SensorReading | None:
        return max(self.readings, key=lambda r: r.celsius, default=None)


class ProcessInfo(msgspec.Struct, frozen=True):
    """One process of the process table."""

    pid: int
    ppid: int
    cmdline: str  # arguments joined by spaces, as pgrep -f matches them
    rss: int  # bytes
    safegate: bool = False  # a safegate process itself (see probes.processes.is_safegate)
    uid: int = -1  # -1: unknown
    program: str = ""  # what it runs: argv[0]'s basename, or an interpreter's script (probes.processes.program_of)
    args: str = ""  # the program's own arguments, joined by spaces


class ProcessSnapshot(msgspec.Struct, frozen=True):
    """The process table, and the pids left out of judging."""

    processes: tuple[ProcessInfo, ...]
    excluded: frozenset[int]  # safegate itself, its ancestors, and what it started


class GpuProcess(msgspec.Struct, frozen=True):
    """A process using a GPU, and how much of its memory."""

    pid: int
    used: int | None  # bytes; None where NVML cannot tell (no per-process accounting)
    kind: str  # compute, graphics, or both


class GpuSensor(msgspec.Struct, frozen=True):
    """A GPU's own sensor besides its main temperature (AMD junction or mem, Intel vram), with its critical limit."""

    label: str
    celsius: float
    crit: float | None  # the driver's temp*_crit; None: not reported, the sensor is only shown


class GpuInfo(msgspec.Struct, frozen=True):
    """One GPU as NVML (NVIDIA) or the kernel's DRM sysfs (AMD, Intel: probes.drm) reports it."""

    index: int
    name: str
    uuid: str
    total: int | None = None  # None: the card has no memory of its own to report (unified memory)
    used: int | None = None
    free: int | None = None
    temp: float | None = None
    slowdown: float | None = None  # NVML's slowdown threshold, where reported
    processes: tuple[GpuProcess, ...] = ()
    mig_mode: int | None = None
    error: str | None = None  # the device failed (e.g. "GPU is lost"): it blocks
    vendor: str = "nvidia"  # nvidia, amd or intel
    vendor_index: int | None = None  # its place among its vendor's cards (ROCR_VISIBLE_DEVICES); None: = index
    bus_id: str | None = None  # PCI address (DRM cards): what fdinfo's drm-pdev names
    hotspots: tuple[GpuSensor, ...] = ()  # AMD junction/mem, Intel vram: judged against their own crit
    # Why NVIDIA's card holds its clocks down now, by pynvml's name less its prefix (nvmlClocksEventReason
    # HwThermalSlowdown: "HwThermalSlowdown"; a bit pynvml does not name as "0x800"); None: the driver cannot say.
    clock_reasons: tuple[str, ...] | None = None

    @property
    def unified_memory(self) -> bool:
        return self.error is None and self.total is None


class GpuSnapshot(msgspec.Struct, frozen=True):
    """Every GPU, or why there are none to check."""

    backend: str  # the backend asked for: auto, nvml, drm, none
    status: str  # none (nothing to check), ok, error (nvml asked for and unusable)
    gpus: tuple[GpuInfo, ...] = ()
    driver: str | None = None
    notes: tuple[str, ...] = ()


class Selection(msgspec.Struct, frozen=True):
    """The GPUs a job may use (CUDA_VISIBLE_DEVICES and HIP/ROCR_VISIBLE_DEVICES give it exactly those)."""

    gpus: tuple[GpuInfo, ...]
    explicit: bool  # the user named them: the job uses all of them
    cuda_visible: str | None = None  # None: the user's own CUDA_VISIBLE_DEVICES stands
    notes: tuple[str, ...] = field(default_factory=tuple)


class HolderRecord(msgspec.Struct, frozen=True):
    """Who holds a lock, as the holder recorded it (<name>.holder-<token>.json; the lock store's Holder adds
    reading and liveness). A file another user wrote decodes straight into it: every field typed and bounded."""

    pid: schema.Pid
    start_time: schema.Timestamp  # create_time of pid: together they name one process, even after pid reuse
    user: schema.Text
    host: schema.Text
    cmdline: schema.Cmdline
    started_at: schema.Timestamp  # wall-clock time the lock was taken
    profile: schema.Text
    lock: str
    # Set by exec: the job it started, the memory the job declared it needs, and what it used when last
    # recorded. need - used is memory the job will still take: admission reserves it for the job.
    job_pid: schema.Pid | None = None
    job_start_time: schema.Timestamp | None = None
    need: schema.Size = 0
    used: schema.Size = 0
    gpu_index: schema.GpuIndex | None = None
    gpu_need: schema.Size = 0
    gpu_used: schema.Size = 0
    # A grant (a passing check's keeper): the process the check granted to, until it has started its job.
    owner: schema.Pid | None = None
    owner_start: schema.Timestamp | None = None

    def __post_init__(self) -> None:
        schema.lock_name(self.lock)
        schema.not_future(self.start_time, self.started_at, self.job_start_time, self.owner_start)

    @property
    def gpu_reservation(self) -> int:
        return max(0, self.gpu_need - self.gpu_used) if self.gpu_index is not None else 0

    @property
    def reservation(self) -> int:
        return max(0, self.need - self.used)


class LockState(msgspec.Struct, frozen=True):
    """One lock as the lock dir shows it: held or not, and by whom."""

    name: str
    path: Path
    held: bool
    holder: HolderRecord | None  # metadata, when present and readable
    holder_alive: bool
    note: str = ""  # e.g. unreadable metadata
    # The pids /proc/locks names as the flock's takers (empty: free, or no /proc/locks): the kernel's word, which
    # no file in the lock dir can change. A job safegate started is their descendant, holding the same flock.
    lockers: frozenset[int] = frozenset()


class LegacyState(msgspec.Struct, frozen=True):
    """An old shell gate's PID file, read and judged."""

    path: Path
    pid: int | None
    alive: bool
    note: str = ""
    # The pid is a safegate exec or the job it supervises: safegate wrote the file for the old gates, and its
    # own flock already says who holds what.
    safegate: bool = False


class Removal(msgspec.Struct, frozen=True):
    """One stale record that cleanup removed, or tried to."""

    path: Path
    what: str
    removed: bool
    error: str = ""


class Ticket(msgspec.Struct, frozen=True):
    """A waiter's place in line (locks.queue): taken at arrival, served in arrival order."""

    pid: int
    start_time: float  # with pid, names one process (a reused pid is not the waiter)
    user: str
    lock: str | None  # None: a profile without a lock
    profile: str
    need: int  # bytes of RAM the job declared
    arrival: int  # time.time_ns() at arrival: the order of service
    blocked_by: str = ""  # the failing checks of its last evaluation, comma-separated; "queue" when held in line
    reason: str = ""  # its last blocking summary, for `safegate queue`
    memory_only: bool = False  # at its last evaluation only memory blocked it (short, or held back in line for it)
    path: Path | None = None  # its file in the lock dir; None for a caller that does not wait (no file)
