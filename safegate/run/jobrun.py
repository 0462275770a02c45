"""safegate exec, end to end: admission, spawning under the lock, watching, releasing, summarising."""

from __future__ import annotations

import contextlib
import os
import shlex
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import psutil

from safegate import cgroups
from safegate.config.model import (
    DEFAULT_GPU_BREACH_FREE,
    DEFAULT_GPU_WARN_FREE,
    DEFAULT_MIN_AVAILABLE,
    DEFAULT_MIN_AVAILABLE_FRACTION,
)
from safegate.errors import CgroupError
from safegate.gate.admission import admit
from safegate.gate.preflight import Settings
from safegate.gate.results import GpuValues, Verdict
from safegate.locks.legacy import claim_legacy, release_legacy, update_legacy
from safegate.locks.store import HeldLock
from safegate.probes.memory import read_memory
from safegate.probes.snapshots import GpuInfo
from safegate.run.limits import WARN_FRACTION, GpuLimits, WatchLimits
from safegate.run.outcome import Event, Outcome
from safegate.run.ready import service_ready
from safegate.run.supervisor import Supervisor
from safegate.units import Size, format_bytes, format_duration, parse_size, printable, signal_name

# The holder metadata's `used` (for reservations) is rewritten at most this often, and only on change.
USED_UPDATE_EVERY = 0.5
USED_UPDATE_STEP = 64 * 1024**2




def gpu_limits(settings: Settings, gpu_indexes: tuple[int, ...], total_ram: int) -> GpuLimits | None:
    if not gpu_indexes:
        return None
    max_job, min_free = settings.profile.max_gpu_mem, settings.profile.min_gpu_free
    warn_free: Size | None = None
    if min_free is not None:
        warn_free = Size(percent=min_free.percent / WARN_FRACTION) if min_free.percent is not None else (
            Size(bytes=int((min_free.bytes or 0) / WARN_FRACTION)))
    elif max_job is None and settings.profile.gpu_memory.resolve(total_ram) > 0:
        min_free, warn_free = DEFAULT_GPU_BREACH_FREE, DEFAULT_GPU_WARN_FREE
    return GpuLimits(
        backend=settings.gpu_backend, indexes=gpu_indexes,
        max_job=max_job.resolve(total_ram) if max_job is not None else None,
        min_free=min_free, warn_free=warn_free,
    )


def watch_limits(settings: Settings, total_ram: int, gpu_indexes: tuple[int, ...] = ()) -> WatchLimits:
    max_mem, floor = settings.profile.max_mem, settings.profile.min_available
    if floor is None:
        min_available = min(parse_size(DEFAULT_MIN_AVAILABLE).resolve(total_ram),
                            int(total_ram * DEFAULT_MIN_AVAILABLE_FRACTION))
    else:
        min_available = floor.resolve(total_ram)
    return WatchLimits(
        max_mem=max_mem.resolve(total_ram) if max_mem is not None else None,
        min_available=min_available if min_available > 0 else None,
        max_temp=settings.profile.max_temp,
        resume_temp=settings.profile.effective_resume_temp,
        on_hot=settings.profile.on_hot,
        grace=settings.profile.grace,
        interval=settings.profile.interval,
        warn_signal=settings.profile.warn_signal,
        thermal=settings.thermal,
        gpu=gpu_limits(settings, gpu_indexes, total_ram),
    )


class _UsedReporter:
    """Keeps the holder metadata's `used` (or `gpu_used`) current while the job still grows toward its need."""

    def __init__(self, held: HeldLock, gpu: bool = False) -> None:
        self.held = held
        self.used_key, self.need_key = ("gpu_used", "gpu_need") if gpu else ("used", "need")
        self.last_time = 0.0
        self.last_value = 0

    def __call__(self, job_mem: int) -> None:
        holder = self.held.holder
        if holder is None:
            return
        used, need = getattr(holder, self.used_key), getattr(holder, self.need_key)
        if used >= need:
            return  # no reservation left to keep current
        now = time.monotonic()
        reached = job_mem >= need
        due = now - self.last_time >= USED_UPDATE_EVERY and abs(job_mem - self.last_value) >= USED_UPDATE_STEP
        if reached or due:
            self.held.update_holder(**{self.used_key: min(job_mem, need)})
            self.last_time, self.last_value = now, job_mem


def job_gpus(settings: Settings, verdict: Verdict, held: HeldLock) -> tuple[tuple[int, ...], dict[str, str]]:
    """The GPUs the job was given, and the environment that gives it exactly those.

    A CUDA_VISIBLE_DEVICES the caller set (a user, Slurm's GRES) is left alone. Otherwise an explicit --gpu
    list, or the GPU auto-selection chose for a job that declared a GPU memory need, is passed on by index,
    with CUDA_DEVICE_ORDER=PCI_BUS_ID so CUDA numbers the GPUs as NVML does.
    """
    gpu = verdict.values(GpuValues)
    candidates = gpu.candidates if gpu is not None else ()
    # The GPU the claim recorded; inside an outer hold (no record of its own) the one this verdict chose.
    chosen = held.holder.gpu_index if held.holder is not None else gpu.chosen if gpu is not None else None
    if settings.profile.gpu is not None:
        given = candidates
    elif chosen is not None:
        given = (chosen,)
    else:
        return candidates, {}
    return given, gpu_env(given, gpu.gpus if gpu is not None else ())


def gpu_env(given: Sequence[int], gpus: Sequence[GpuInfo]) -> dict[str, str]:
    """The environment that gives a job the GPUs *given* (indexes across vendors): CUDA_VISIBLE_DEVICES for the
    NVIDIA ones; for the AMD ones ROCR_VISIBLE_DEVICES (their places among the AMD cards) and HIP_VISIBLE_DEVICES
    (0..n-1: HIP counts what ROCR leaves). A preset CUDA_VISIBLE_DEVICES, or a preset ROCR_VISIBLE_DEVICES or
    HIP_VISIBLE_DEVICES, is left alone (the caller, or Slurm, chose already)."""
    by_index = {g.index: g for g in gpus}
    cards = [by_index.get(i) for i in given]
    nvidia = [i for i, g in zip(given, cards, strict=True) if g is None or g.vendor == "nvidia"]
    amd = [g.vendor_index if g.vendor_index is not None else g.index for g in cards if g and g.vendor == "amd"]
    env: dict[str, str] = {}
    if "CUDA_VISIBLE_DEVICES" not in os.environ and nvidia:
        env["CUDA_VISIBLE_DEVICES"] = ",".join(str(i) for i in nvidia)
        env.setdefault("CUDA_DEVICE_ORDER", os.environ.get("CUDA_DEVICE_ORDER", "PCI_BUS_ID"))
    if not {"ROCR_VISIBLE_DEVICES", "HIP_VISIBLE_DEVICES"} & os.environ.keys() and amd:
        env["ROCR_VISIBLE_DEVICES"] = ",".join(str(i) for i in amd)
        env["HIP_VISIBLE_DEVICES"] = ",".join(str(i) for i in range(len(amd)))
    return env


def caller_environment() -> dict[str, str]:
    """The environment safegate was started with: Python's locale coercion (PEP 538) adds LC_CTYPE=C.UTF-8 to
    os.environ under the C locale, and the job must get exactly the caller's environment."""
    env = dict(os.environ)
    coerced = env.get("LC_CTYPE")
    if coerced in ("C.UTF-8", "C.utf8", "UTF-8"):
        try:
            initial = Path("/proc/self/environ").read_bytes().split(b"\0")
        except OSError:
            return env
        if not any(item.startswith(b"LC_CTYPE=") for item in initial):
            del env["LC_CTYPE"]
    return env


def run_exec(
    settings: Settings,
    argv: Sequence[str],
    *,
    wait: bool,
    timeout: float | None,
    on_event: Callable[[Event], None],
    on_blocked: Callable[[Verdict], None] | None = None,
) -> Verdict | Outcome:
    """The blocking verdict when preflight fails, else the job's outcome."""
    if settings.profile.cgroup == "on" and (reason := cgroups.available()) is not None:
        raise CgroupError(f"--cgroup on: no cgroup for the job: {reason}")  # before waiting in line for nothing
    arrived = time.monotonic()
    verdict, held = admit(settings, argv, wait=wait, timeout=timeout, on_blocked=on_blocked)
    waited = time.monotonic() - arrived
    if held is None:
        return verdict
    # The old shell gates' pid files name this job while it runs (a profile with a lock: a lock-less one is
    # no mutex, and must not make one of the files): safegate's own pid first, the job's once it runs.
    legacy: list[Path] = []
    owners = [os.getpid()]
    try:
        with held, _job_cgroup(settings, on_event) as cgroup:
            if settings.profile.lock is not None:
                legacy += claim_legacy(settings.legacy_lock_files, os.getpid())
            outcome = _supervise(settings, argv, verdict, held, on_event, legacy, owners, cgroup, waited)
    finally:
        release_legacy(legacy, owners)
    on_event(Event("exit", _exit_message(outcome), {"exit_code": outcome.exit_code, "reason": outcome.reason,
                                                  "status": outcome.status, "signal": outcome.signal}))
    on_event(Event("summary", summary_line(outcome), {**outcome.stats.as_json(), "reason": outcome.reason,
                                                       "exit_code": outcome.exit_code}))
    _record_history(settings, outcome, on_event)
    return outcome


@contextlib.contextmanager
def _job_cgroup(settings: Settings, on_event: Callable[[Event], None]) -> Iterator[cgroups.JobCgroup | None]:
    """The job's own cgroup (`--cgroup auto` when one can be had, `on`), removed once the job has ended."""
    cgroup = None
    if settings.profile.cgroup != "off":
        reason = cgroups.available()
        if reason is None:
            swap = settings.profile.max_swap
            max_swap = swap.resolve(read_memory().total) if swap is not None else None
            try:
                cgroup = cgroups.create(required=settings.profile.cgroup == "on", max_swap=max_swap,
                                        throttle=settings.profile.throttle)
            except CgroupError as exc:
                if settings.profile.cgroup == "on":
                    raise
                reason = str(exc)
        elif settings.profile.cgroup == "on":
            raise CgroupError(f"--cgroup on: no cgroup for the job: {reason}")
        if cgroup is None:
            on_event(Event("notice", f"no cgroup for the job ({reason}); watching its process tree instead",
                           {"cgroup": None, "reason": reason}))
        elif cgroup.version == 1 and (settings.profile.throttle or settings.profile.max_swap is not None):
            on_event(Event("notice", "--throttle and --max-swap need cgroup v2; this job's cgroup is v1",
                           {"cgroup": cgroup.path, "reason": "cgroup v1"}))
    try:
        yield cgroup
    finally:
        if cgroup is not None:
            cgroup.remove()


def _supervise(settings: Settings, argv: Sequence[str], verdict: Verdict, held: HeldLock,
               on_event: Callable[[Event], None], legacy: list[Path], owners: list[int],
               cgroup: cgroups.JobCgroup | None, waited: float) -> Outcome:
    """Spawn and watch the job under the held lock (in *cgroup*, when it has one); *waited*: seconds from
    arrival to admission."""
    gpus, gpu_env = job_gpus(settings, verdict, held)
    limits = watch_limits(settings, read_memory().total, gpus)
    if cgroup is not None:
        cgroup.configure(limits.max_mem)
    supervisor = Supervisor(
        argv, limits, on_event, pass_fds=[held.fd] if held.fd >= 0 else [], nice=settings.profile.nice,
        oom_score_adj=settings.profile.oom_score_adj, on_sample=_UsedReporter(held),
        on_gpu_sample=_UsedReporter(held, gpu=True), env={**caller_environment(), **gpu_env}, cgroup=cgroup,
        timeline=bool(settings.profile.log),
    )
    pid = supervisor.start()
    owners.append(pid)
    update_legacy(legacy, os.getpid(), pid)
    try:
        start_time = psutil.Process(pid).create_time()
    except psutil.Error:
        start_time = None
    held.update_holder(job_pid=pid, job_start_time=start_time)
    gpu_note = f" on GPU {','.join(str(i) for i in gpus)}" if gpu_env else ""
    lock = settings.profile.lock or held.name
    on_event(Event("admitted", f"started pid {pid} (profile {settings.profile.name}, lock {lock}): "
                               f"{printable_command(argv)}{gpu_note}",
                   {"pid": pid, "profile": settings.profile.name, "lock": lock, "argv": list(argv),
                    "max_mem": limits.max_mem, "min_available": limits.min_available, "max_temp": limits.max_temp,
                    "max_gpu_mem": limits.gpu.max_job if limits.gpu is not None else None,
                    "cgroup": supervisor.cgroup.path if supervisor.cgroup is not None else None,
                    "waited": round(waited, 3), **gpu_env}))
    if held.metadata_error:
        on_event(Event("warning", held.metadata_error))
    # Type=notify: the unit was "activating" while safegate waited in line; it is up now that the job runs.
    if (not_ready := service_ready(f"running pid {pid} (profile {settings.profile.name}, lock {lock})")) is not None:
        on_event(Event("warning", not_ready))
    return supervisor.watch()


def _record_history(settings: Settings, outcome: Outcome, on_event: Callable[[Event], None]) -> None:
    from safegate.config import history

    s = outcome.stats
    need = settings.need
    predicted = need.prediction if need is not None else None
    run = history.Run(time=time.time(), peak_memory=s.peak_job_mem, peak_gpu_memory=s.peak_job_gpu_mem,
                      duration=s.duration, reason=outcome.reason[:500], exit_code=outcome.exit_code,
                      signature=need.signature if need is not None else None,
                      predicted_memory=predicted.ram if predicted is not None else None,
                      predicted_gpu_memory=predicted.gpu if predicted is not None else None)
    path = history.history_path()
    try:
        note = history.record(path, settings.profile.name, run)
    except OSError as exc:  # a full disk must never be what fails a job
        on_event(Event("warning", f"cannot record the run in {path}: {exc.strerror or exc}"))
        return
    if note:
        on_event(Event("warning", note))


def printable_command(argv: Sequence[str], limit: int = 200) -> str:
    """The command as a shell would quote it, on one line whatever its arguments hold."""
    text = shlex.join(argv)
    text = printable(text)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _exit_message(outcome: Outcome) -> str:

    if outcome.reason in ("memory", "thermal", "gpu"):
        how = f"killed by {signal_name(outcome.signal)}" if outcome.signal else f"exited {outcome.status}"
        return f"job stopped for {outcome.reason} ({how}); exit {outcome.exit_code}"
    if outcome.signal is not None:
        return f"job died of {signal_name(outcome.signal)}; exit {outcome.exit_code}"
    return f"job exited {outcome.status}"


def summary_line(outcome: Outcome) -> str:
    s = outcome.stats
    parts = [
        f"duration {format_duration(s.duration)}",
        f"peak job memory {format_bytes(s.peak_job_mem)}",
    ]
    if s.lowest_available is not None:
        parts.append(f"lowest MemAvailable {format_bytes(s.lowest_available)}")
    parts.append(f"highest temperature {s.highest_temp:g} C" if s.highest_temp is not None
                 else "highest temperature unknown")
    if s.peak_job_gpu_mem is not None:
        parts.append(f"peak job GPU memory {format_bytes(s.peak_job_gpu_mem)}")
    if s.highest_gpu_temp is not None:
        parts.append(f"highest GPU temperature {s.highest_gpu_temp:g} C")
    if s.highest_job_pressure is not None:
        parts.append(f"highest job memory pressure {s.highest_job_pressure:g}%")
    parts.append(f"exit reason {outcome.reason}")
    return ", ".join(parts)
