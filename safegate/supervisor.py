"""Run a job like a good init and stop it before it takes the machine down.

The job runs in its own process group with the lock's descriptor inherited, so the lock is held while
any process of the job lives. safegate is the job's subreaper: every descendant stays findable and is
reaped. Signals from the caller are forwarded to the job's group; limits are enforced in levels:
warn (and --warn-signal) at 90%, SIGTERM at a breach, SIGKILL after the grace period or at once when
MemAvailable keeps falling to the hard floor.
"""

from __future__ import annotations

import contextlib
import errno
import os
import select
import signal
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from safegate.errors import SpawnError
from safegate.exitcodes import ExitCode
from safegate.policy import gpu_temp_limit
from safegate.probes.gpu import GpuInfo, host_pid_map, read_gpus
from safegate.probes.jobtree import JobTree, read_available
from safegate.probes.thermal import read_thermal
from safegate.procctl import become_subreaper, child_setup
from safegate.units import format_bytes, format_duration
from safegate.watch import (
    GpuLimits,
    Level,
    WatchLimits,
    floor_level,
    job_level,
    next_interval,
    rearmed_floor,
    rearmed_job,
)

FORWARDED = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT, signal.SIGUSR1, signal.SIGUSR2)
THERMAL_EVERY = 1.0  # temperatures change slowly; reading sensors costs more than reading meminfo
GPU_EVERY = 0.1  # NVML calls cost more than /proc reads; a tenth of a second still catches a spike
FILL_RATE_DECAY = 0.5


@dataclass(frozen=True)
class Event:
    kind: str  # admitted, warning, paused, resumed, breach, signal, exit, summary, ...
    message: str
    data: Mapping[str, Any] = field(default_factory=dict)
    time: float = field(default_factory=time.time)


@dataclass
class Stats:
    started: float = field(default_factory=time.monotonic)
    peak_job_mem: int = 0
    lowest_available: int | None = None
    highest_temp: float | None = None
    peak_job_gpu_mem: int | None = None
    highest_gpu_temp: float | None = None

    def as_dict(self, now: float) -> dict[str, Any]:
        return {
            "duration": round(now - self.started, 3),
            "peak_job_memory": self.peak_job_mem,
            "lowest_available": self.lowest_available,
            "highest_temp": self.highest_temp,
            "peak_job_gpu_memory": self.peak_job_gpu_mem,
            "highest_gpu_temp": self.highest_gpu_temp,
        }


@dataclass(frozen=True)
class Outcome:
    exit_code: int
    reason: str  # exited, signalled, memory, thermal
    status: int | None  # the job's exit status, when it exited
    signal: int | None  # the signal that ended the job, when one did
    stats: dict[str, Any]


class Supervisor:
    def __init__(
        self,
        argv: Sequence[str],
        limits: WatchLimits,
        on_event: Callable[[Event], None],
        *,
        pass_fds: Sequence[int] = (),
        nice: int | None = None,
        on_sample: Callable[[int], None] | None = None,
        on_gpu_sample: Callable[[int], None] | None = None,
        env: Mapping[str, str] | None = None,
    ) -> None:
        self.argv = list(argv)
        self.limits = limits
        self.emit = on_event
        self.pass_fds = tuple(pass_fds)
        self.nice = nice
        self.on_sample = on_sample  # told the job's memory after each sample (for the reservation)
        self.on_gpu_sample = on_gpu_sample
        self.env = dict(env) if env is not None else None
        self.tree = JobTree()
        self.stats = Stats()
        self.leader = -1
        self.leader_status: int | None = None  # raw wait status
        self.pending: list[int] = []
        self._wake_r = self._wake_w = -1
        self._old_handlers: dict[int, Any] = {}
        self._breach_code: ExitCode | None = None
        self._breach_reason = ""
        self._kill_deadline: float | None = None
        self._killed = False
        self._paused = False
        self._warned_job = False
        self._warned_floor = False
        self._hot_warned = False
        self._next_thermal = 0.0
        self._last_mem: tuple[float, int, int] | None = None  # (time, job_mem, available)
        self._fill_rate = 0.0
        self._next_gpu = 0.0
        self._gpu_baseline: dict[int, int] | None = None  # card used memory when the job started
        self._warned_gpu = False
        self._hot_gpus: list[GpuInfo] = []

    # --- setup and teardown ------------------------------------------------------------------------

    def _install_signals(self) -> None:
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        signal.set_wakeup_fd(self._wake_w, warn_on_full_buffer=False)
        for signum in (*FORWARDED, signal.SIGCHLD):
            self._old_handlers[signum] = signal.signal(signum, self._on_signal)

    def _on_signal(self, signum: int, _frame: object) -> None:
        self.pending.append(signum)

    def _restore_signals(self) -> None:
        for signum, handler in self._old_handlers.items():
            signal.signal(signum, handler)
        signal.set_wakeup_fd(-1)
        for fd in (self._wake_r, self._wake_w):
            if fd >= 0:
                os.close(fd)

    def start(self) -> int:
        """Spawn the job; raises SpawnError (126/127) when it cannot be executed."""
        become_subreaper()
        self._install_signals()
        parent = os.getpid()
        nice = self.nice
        try:
            # fork+exec through os.posix_spawn is not enough: the child must set its group, its
            # parent-death signal and its priority itself before exec.
            pid = _fork_exec(self.argv, self.pass_fds, self.env, lambda: child_setup(parent, nice))
        except BaseException:
            self._restore_signals()
            raise
        self.leader = pid
        self.tree.add(pid)
        return pid

    # --- the loop ----------------------------------------------------------------------------------

    def watch(self) -> Outcome:
        try:
            interval = self._sample()  # at once: a job shorter than one interval still gets figures
            while True:
                self._sleep(interval)
                self._handle_signals()
                self._reap()
                if self._all_gone():
                    break
                interval = self._sample()
            return self._outcome()
        except BaseException:
            # Whatever broke the watch (an event that could not be written, a bug), the job must not run on
            # unwatched with its lock freed: stop all of it before giving up.
            self._abandon()
            raise
        finally:
            self._restore_signals()

    def _abandon(self) -> None:
        with contextlib.suppress(BaseException):
            self._signal_all(signal.SIGTERM)
            self._signal_all(signal.SIGCONT)
            deadline = time.monotonic() + min(self.limits.grace, 5.0)
            while time.monotonic() < deadline:
                self._reap()
                if self.leader_status is not None and self._all_gone():
                    return
                time.sleep(0.05)
            self._signal_all(signal.SIGKILL)
            while True:
                try:
                    os.wait4(-1, 0)
                except ChildProcessError:
                    return

    def _sleep(self, seconds: float) -> None:
        if self.pending:
            return
        try:
            ready, _, _ = select.select([self._wake_r], [], [], seconds)
        except InterruptedError:  # pragma: no cover - PEP 475 retries, kept for clarity
            return
        if ready:
            try:
                while os.read(self._wake_r, 512):
                    pass
            except BlockingIOError:
                pass

    def _handle_signals(self) -> None:
        while self.pending:
            signum = self.pending.pop(0)
            if signum == signal.SIGCHLD:
                continue  # _reap runs after every wake-up
            # Forward first: telling about it may fail (a hung-up terminal) and must not stop the signal.
            self._signal_group(signum)
            if self._paused and signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT):
                self._signal_all(signal.SIGCONT)  # a paused job cannot act on it until it runs again
            if self.leader_status is None:
                self.emit(Event("signal", f"forwarded {signal.Signals(signum).name} to the job",
                                {"signal": signal.Signals(signum).name}))

    def _reap(self) -> None:
        while True:
            try:
                pid, status, usage = os.wait4(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            self.tree.pids.discard(pid)
            # The kernel's own peak RSS of the process: a job shorter than one sampling interval still
            # reports what it used (ru_maxrss is in KiB on Linux).
            self.stats.peak_job_mem = max(self.stats.peak_job_mem, int(usage.ru_maxrss) * 1024)
            if pid == self.leader:
                self.leader_status = status
                self._on_leader_exit()

    def _all_gone(self) -> bool:
        if self.leader_status is None:
            return False
        try:
            # Any child left (adopted orphans included)? As subreaper, no child means no descendant.
            pid, _, usage = os.wait4(-1, os.WNOHANG)
        except ChildProcessError:
            return True
        if pid != 0:
            self.tree.pids.discard(pid)
            self.stats.peak_job_mem = max(self.stats.peak_job_mem, int(usage.ru_maxrss) * 1024)
        return False

    def _on_leader_exit(self) -> None:
        self.tree.refresh(force_scan=True)
        if self.tree.pids:
            # The job is its main command: what it leaves behind is stopped too, then the lock is freed.
            self.emit(Event("cleanup", f"the job's main process ended; stopping {len(self.tree.pids)} leftover"
                                       f" process(es)", {"pids": sorted(self.tree.pids)}))
            self._terminate()

    # --- sampling and acting -----------------------------------------------------------------------

    def _sample(self) -> float:
        now = time.monotonic()
        self.tree.refresh()
        limits = self.limits
        rough = self.tree.memory(precise=False)
        # RSS counts pages shared between the job's processes once per process; PSS counts them once.
        # PSS costs a page-table walk, so it is taken only where the difference could matter.
        precise = len(self.tree.pids) > 1 and job_level(rough, limits) is not Level.OK
        job_mem = self.tree.memory(precise=True) if precise else rough
        available = read_available()
        self._record(now, job_mem, available)
        if self.on_sample is not None:
            self.on_sample(job_mem)
        if limits.gpu is not None and now >= self._next_gpu:
            self._next_gpu = now + GPU_EVERY
            self._check_gpus(limits.gpu)
        if now >= self._next_thermal:
            self._next_thermal = now + THERMAL_EVERY
            self._check_thermal()
        if self._kill_deadline is not None:
            self._during_grace(now, available)
            return limits.floor
        self._check_memory(job_mem, available)
        if self._kill_deadline is not None:
            return limits.floor
        return next_interval(job_mem, available, limits, self._fill_rate)

    def _record(self, now: float, job_mem: int, available: int) -> None:
        stats = self.stats
        stats.peak_job_mem = max(stats.peak_job_mem, job_mem)
        if stats.lowest_available is None or available < stats.lowest_available:
            stats.lowest_available = available
        if self._last_mem is not None:
            then, last_job, last_avail = self._last_mem
            if now > then:
                rate = max(job_mem - last_job, last_avail - available, 0) / (now - then)
                self._fill_rate = max(rate, self._fill_rate * FILL_RATE_DECAY)
        self._last_mem = (now, job_mem, available)

    def _check_memory(self, job_mem: int, available: int) -> None:
        limits = self.limits
        jl, fl = job_level(job_mem, limits), floor_level(available, limits)
        if jl is Level.BREACH or fl is Level.BREACH:
            # Re-check before acting: memory may have been freed since the sample (earlyoom does the same).
            self.tree.refresh(force_scan=True)
            job_mem = self.tree.memory(precise=len(self.tree.pids) > 1)
            available = read_available()
            jl, fl = job_level(job_mem, limits), floor_level(available, limits)
            self._record(time.monotonic(), job_mem, available)
        if jl is Level.BREACH:
            assert limits.max_mem is not None
            self._breach(ExitCode.KILLED_MEMORY, "memory",
                         f"job memory {format_bytes(job_mem)} >= --max-mem {format_bytes(limits.max_mem)}",
                         {"job_memory": job_mem, "max_mem": limits.max_mem})
            return
        if fl is Level.BREACH:
            assert limits.min_available is not None
            self._breach(ExitCode.KILLED_MEMORY, "memory",
                         f"MemAvailable {format_bytes(available)} <= --min-available "
                         f"{format_bytes(limits.min_available)}",
                         {"available": available, "min_available": limits.min_available, "job_memory": job_mem})
            return
        if jl is Level.WARN and not self._warned_job:
            assert limits.max_mem is not None
            self._warned_job = True
            self._warn(f"job memory {format_bytes(job_mem)} is {job_mem / limits.max_mem:.0%} of --max-mem "
                       f"{format_bytes(limits.max_mem)}", {"job_memory": job_mem, "max_mem": limits.max_mem})
        elif self._warned_job and rearmed_job(job_mem, limits):
            self._warned_job = False
        if fl is Level.WARN and not self._warned_floor:
            assert limits.min_available is not None
            self._warned_floor = True
            self._warn(f"MemAvailable {format_bytes(available)} is near --min-available "
                       f"{format_bytes(limits.min_available)}",
                       {"available": available, "min_available": limits.min_available})
        elif self._warned_floor and rearmed_floor(available, limits):
            self._warned_floor = False

    def _warn(self, message: str, data: dict[str, Any]) -> None:
        signum = self.limits.warn_signal
        if signum is not None and self.leader_status is None:
            name = signal.Signals(signum).name
            self.emit(Event("warning", f"{message}; sending {name} to the job", {**data, "signal": name}))
            self._signal_group(signum)
        else:
            self.emit(Event("warning", message, data))

    def _check_gpus(self, gpu: GpuLimits) -> None:
        snapshot = read_gpus(gpu.backend)
        cards = [g for g in snapshot.gpus if g.index in gpu.indexes]
        self._hot_gpus = cards
        temps = [g.temp for g in cards if g.temp is not None]
        if temps:
            top = max(temps)
            self.stats.highest_gpu_temp = top if self.stats.highest_gpu_temp is None else max(
                self.stats.highest_gpu_temp, top)
        measured = [g for g in cards if g.used is not None and g.total is not None and g.free is not None]
        if self._gpu_baseline is None:
            self._gpu_baseline = {g.index: g.used or 0 for g in measured}
        job_vram = self._job_vram(measured)
        stats = self.stats
        stats.peak_job_gpu_mem = job_vram if stats.peak_job_gpu_mem is None else max(stats.peak_job_gpu_mem, job_vram)
        if self.on_gpu_sample is not None:
            self.on_gpu_sample(job_vram)
        if self._kill_deadline is not None:
            return
        failed = [g for g in cards if g.error is not None]
        if failed:
            g = failed[0]
            self._breach(ExitCode.KILLED_GPU_MEMORY, "gpu", f"GPU {g.index} failed: {g.error}", {"gpu": g.index})
            return
        if gpu.job_level(job_vram) is Level.BREACH:
            assert gpu.max_job is not None
            self._breach(ExitCode.KILLED_GPU_MEMORY, "gpu", f"job GPU memory {format_bytes(job_vram)} >= "
                         f"--max-gpu-mem {format_bytes(gpu.max_job)}", {"job_gpu_memory": job_vram,
                                                                       "max_gpu_mem": gpu.max_job})
            return
        levels = [(g, gpu.card_level(g.free or 0, g.total or 0)) for g in measured]
        breached = [g for g, level in levels if level is Level.BREACH]
        if breached:
            g = breached[0]
            assert gpu.min_free is not None and g.total is not None
            self._breach(ExitCode.KILLED_GPU_MEMORY, "gpu", f"GPU {g.index} free memory {format_bytes(g.free or 0)} "
                         f"<= {format_bytes(gpu.min_free.resolve(g.total))}",
                         {"gpu": g.index, "free": g.free, "min_gpu_free": gpu.min_free.resolve(g.total)})
            return
        job_warn = gpu.job_level(job_vram) is Level.WARN
        card_warn = [g for g, level in levels if level is Level.WARN]
        if (job_warn or card_warn) and not self._warned_gpu:
            self._warned_gpu = True
            if job_warn:
                assert gpu.max_job is not None
                message = (f"job GPU memory {format_bytes(job_vram)} is {job_vram / gpu.max_job:.0%} of "
                           f"--max-gpu-mem {format_bytes(gpu.max_job)}")
            else:
                g = card_warn[0]
                message = f"GPU {g.index}: {format_bytes(g.free or 0)} free of {format_bytes(g.total or 0)}"
            self._warn(message, {"job_gpu_memory": job_vram})
        elif not (job_warn or card_warn):
            self._warned_gpu = False

    def _job_vram(self, cards: list[GpuInfo]) -> int:
        """The job's VRAM: per-process usage where NVML gives it, else the cards' growth since the job began."""
        pids = self.tree.pids | {self.leader}
        mapping = host_pid_map()
        procs = [p for g in cards for p in g.processes if mapping.get(p.pid, p.pid) in pids]
        if procs and all(p.used is not None for p in procs):
            return sum(p.used or 0 for p in procs)
        baseline = self._gpu_baseline or {}
        return sum(max(0, (g.used or 0) - baseline.get(g.index, 0)) for g in cards)

    def _check_thermal(self) -> None:
        snapshot = read_thermal(self.limits.thermal)
        limits = self.limits
        readings = [(r.key, r.celsius, limits.max_temp, limits.resume_temp) for r in snapshot.readings]
        readings += [(f"GPU {g.index}", g.temp, gpu_temp_limit(g, limits.max_temp, resuming=False),
                      gpu_temp_limit(g, limits.resume_temp, resuming=True))
                     for g in self._hot_gpus if g.temp is not None]
        if not readings:
            return
        stats = self.stats
        top = max(r[1] for r in readings if r[1] is not None)
        stats.highest_temp = top if stats.highest_temp is None else max(stats.highest_temp, top)
        over = [r for r in readings if r[1] is not None and r[1] >= r[2]]
        key, temp, hot_at, cool_at = over[0] if over else max(readings, key=lambda r: (r[1] or 0) - r[3])
        assert temp is not None
        cool = all(r[1] is not None and r[1] < r[3] for r in readings)
        data = {"sensor": key, "temp": temp, "max_temp": hot_at, "resume_temp": cool_at}
        if self._kill_deadline is not None:
            return
        if over:
            if limits.on_hot == "kill":
                self._breach(ExitCode.KILLED_HOT, "thermal", f"{key} at {temp:g} C >= max_temp {hot_at:g} C", data)
            elif limits.on_hot == "pause" and not self._paused:
                self._paused = True
                self.emit(Event("paused", f"{key} at {temp:g} C >= max_temp {hot_at:g} C; "
                                          f"pausing the job until below {cool_at:g} C", data))
                self._signal_all(signal.SIGSTOP)
            elif limits.on_hot == "warn" and not self._hot_warned:
                self._hot_warned = True
                self.emit(Event("warning", f"{key} at {temp:g} C >= max_temp {hot_at:g} C", data))
        elif cool:
            if self._paused:
                self._paused = False
                self.emit(Event("resumed", f"{key} at {temp:g} C < resume_temp {cool_at:g} C; "
                                           f"resuming the job", data))
                self._signal_all(signal.SIGCONT)
            self._hot_warned = False

    def _breach(self, code: ExitCode, reason: str, message: str, data: dict[str, Any]) -> None:
        self._breach_code = code
        self._breach_reason = reason
        self.emit(Event("breach", f"{message}; sending SIGTERM to the job (SIGKILL in "
                                  f"{format_duration(self.limits.grace)})", {**data, "reason": reason}))
        self._terminate()

    def _terminate(self) -> None:
        self._signal_all(signal.SIGTERM)
        self._signal_all(signal.SIGCONT)  # a paused job cannot act on SIGTERM
        self._kill_deadline = time.monotonic() + self.limits.grace

    def _during_grace(self, now: float, available: int) -> None:
        hard = self.limits.hard_floor
        if hard is not None and available <= hard and not self._killed:
            self.emit(Event("signal", f"MemAvailable {format_bytes(available)} fell to the hard floor "
                                      f"{format_bytes(hard)}; sending SIGKILL", {"available": available}))
            self._kill()
        elif self._kill_deadline is not None and now >= self._kill_deadline and not self._killed:
            self.emit(Event("signal", f"still running after {format_duration(self.limits.grace)}; sending SIGKILL",
                            {"pids": sorted(self.tree.pids)}))
            self._kill()
        elif self._killed and now >= (self._kill_deadline or now):
            self._signal_all(signal.SIGKILL)  # anything that appeared since

    def _kill(self) -> None:
        self._killed = True
        self._signal_all(signal.SIGKILL)

    # --- signals to the job ------------------------------------------------------------------------

    def _signal_group(self, signum: int) -> None:
        if self.leader_status is not None and not self._group_alive():
            return  # the group is gone: its number could name someone else's group by now
        try:
            os.killpg(self.leader, signum)
        except ProcessLookupError:
            pass
        except PermissionError:  # pragma: no cover - a setuid job; nothing more we may do
            pass

    def _group_alive(self) -> bool:
        """Some process we track still belongs to the job's group (so its id cannot have been reused)."""
        for pid in self.tree.pids:
            with contextlib.suppress(OSError):
                if os.getpgid(pid) == self.leader:
                    return True
        return False

    def _signal_all(self, signum: int) -> None:
        """The job's group and every descendant outside it (double-forked, setsid)."""
        self._signal_group(signum)
        self.tree.refresh(force_scan=True)
        for pid in self.tree.pids:
            try:
                os.kill(pid, signum)
            except (ProcessLookupError, PermissionError):
                pass

    # --- the end -----------------------------------------------------------------------------------

    def _outcome(self) -> Outcome:
        status = self.leader_status
        assert status is not None
        stats = self.stats.as_dict(time.monotonic())
        sig = os.WTERMSIG(status) if os.WIFSIGNALED(status) else None
        exit_status = os.WEXITSTATUS(status) if os.WIFEXITED(status) else None
        if self._breach_code is not None:
            return Outcome(int(self._breach_code), self._breach_reason, exit_status, sig, stats)
        if sig is not None:
            return Outcome(ExitCode.for_signal(sig), "signalled", None, sig, stats)
        assert exit_status is not None
        return Outcome(exit_status, "exited", exit_status, None, stats)


def _fork_exec(
    argv: Sequence[str], pass_fds: Sequence[int], env: Mapping[str, str] | None, setup: Callable[[], None]
) -> int:
    """Start *argv* through subprocess (which reports exec failures to the parent), keeping only the pid."""
    import subprocess

    try:
        proc = subprocess.Popen(
            list(argv), pass_fds=tuple(pass_fds), env=dict(env) if env is not None else None,
            preexec_fn=setup, close_fds=True,  # noqa: PLW1509 - safegate runs no threads
        )
    except FileNotFoundError:
        raise SpawnError(f"command not found: {argv[0]}", ExitCode.NOT_FOUND) from None
    except PermissionError:
        raise SpawnError(f"command not executable: {argv[0]} (permission denied)", ExitCode.NOT_EXECUTABLE) from None
    except OSError as exc:
        code = ExitCode.NOT_FOUND if exc.errno == errno.ENOENT else ExitCode.NOT_EXECUTABLE
        raise SpawnError(f"cannot execute {argv[0]}: {exc.strerror}", code) from None
    # We reap with waitpid(-1); the Popen object must not try to do it too.
    proc.returncode = 0
    return proc.pid
