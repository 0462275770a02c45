"""The supervisor's lifecycle against a fake job, fake probes and an injected clock: the state machine, the
escalation timing (SIGTERM at a breach, SIGKILL exactly after the grace period or at the hard floor), pause and
resume, and what a warning sends. Real processes are the end-to-end tests' (test_exec.py, reliability/)."""

from __future__ import annotations

import os
import signal
from collections.abc import Iterator, Set
from dataclasses import dataclass, field

import pytest
from msgspec.structs import replace

from safegate.config.model import ThermalConfig
from safegate.probes.gpu import GpuInfo, GpuSnapshot
from safegate.probes.jobtree import JobTree
from safegate.probes.snapshots import SensorReading, ThermalSnapshot
from safegate.run.job import ProcessTreeJob
from safegate.run.limits import GpuLimits, WatchLimits
from safegate.run.outcome import Event
from safegate.run.sampler import Probes
from safegate.run.supervisor import State, Supervisor
from safegate.units import Size

MiB = 1024**2
GiB = 1024**3
TERM, CONT, KILL, STOP = signal.SIGTERM, signal.SIGCONT, signal.SIGKILL, signal.SIGSTOP


@dataclass
class FakeJob:
    """A job of two processes whose memory the test sets; records every signal."""

    mem: list[int] = field(default_factory=lambda: [0])  # successive memory() answers; the last one repeats
    pids: set[int] = field(default_factory=lambda: {100, 101})
    sent: list[tuple[str, int]] = field(default_factory=list)
    refreshes: list[bool] = field(default_factory=list)
    terminations: int = 0
    ooms: int = 0

    @property
    def leader(self) -> int:
        return 100

    def members(self) -> Set[int]:
        return self.pids

    def refresh(self, *, now: bool = False) -> None:
        self.refreshes.append(now)

    def memory(self, *, precise: bool) -> int:
        return self.mem.pop(0) if len(self.mem) > 1 else self.mem[0]

    def peak(self) -> int:
        return 0

    def ended(self, pid: int, maxrss: int) -> None:
        self.pids.discard(pid)

    def forward(self, signum: int) -> bool:
        self.sent.append(("group", signum))
        return True

    def signal_all(self, signum: int) -> None:
        self.sent.append(("all", signum))

    def cap(self, limits: WatchLimits, available: int) -> int | None:
        # As a cgroup's: the cap the kernel would hold until the next sample.
        return limits.kernel_cap(self.mem[0], available)

    def pause(self) -> None:
        self.signal_all(STOP)

    def resume(self) -> None:
        self.signal_all(CONT)

    def oom_kills(self) -> int:
        return self.ooms

    def pressure(self) -> float | None:
        return None

    def emptied(self) -> bool:
        return False

    def left_cgroup(self) -> str | None:
        return None

    def terminate_all(self) -> None:
        # As ProcessTreeJob: each process is asked once; later calls ask only those that appeared since (none here).
        # Its processes run: none is stopped, so none gets SIGCONT.
        self.terminations += 1
        if self.terminations == 1:
            self.signal_all(TERM)


class Clock:
    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


@dataclass
class Machine:
    available: int = 64 * GiB
    temps: tuple[float, ...] = ()
    gpus: tuple[GpuInfo, ...] = ()
    thermal_reads: int = 0

    def thermal(self, _cfg: ThermalConfig) -> ThermalSnapshot:
        self.thermal_reads += 1
        return ThermalSnapshot(tuple(SensorReading("chip", "t", t, "psutil") for t in self.temps))

    def probes(self) -> Probes:
        return Probes(available=lambda: self.available, gpus=lambda backend: GpuSnapshot(backend, "ok", self.gpus),
                      thermal=self.thermal, pid_map=dict)


@dataclass
class Rig:
    sup: Supervisor
    job: FakeJob
    clock: Clock
    machine: Machine
    events: list[Event]

    def step(self, at: float) -> float:
        self.clock.now = at
        return self.sup.step()

    def kinds(self) -> list[str]:
        return [e.kind for e in self.events]


def limits(**changes: object) -> WatchLimits:
    base = WatchLimits(max_mem=1000 * MiB, min_available=None, max_temp=80.0, resume_temp=70.0, on_hot="pause",
                       grace=2.0, interval=0.01, warn_signal=None, thermal=ThermalConfig())
    return replace(base, **changes)  # type: ignore[arg-type]


@pytest.fixture
def rig() -> Iterator[Rig]:
    yield make_rig(limits())


def make_rig(lim: WatchLimits, job: FakeJob | None = None) -> Rig:
    clock, machine, events = Clock(), Machine(), []
    sup = Supervisor(["job"], lim, events.append, clock=clock, probes=machine.probes())
    job = job or FakeJob()
    assert sup.state is State.STARTING
    sup.attach(job)
    assert sup.state is State.RUNNING
    return Rig(sup, job, clock, machine, events)


def test_sigterm_at_the_breach_sigkill_exactly_after_the_grace_period(rig: Rig) -> None:
    rig.step(1000.0)
    assert rig.job.sent == [] and rig.events == []
    rig.job.mem = [1000 * MiB]
    assert rig.step(1000.5) == 0.01  # the floor interval while stopping
    assert rig.kinds() == ["breach"]
    assert rig.events[0].message == "job memory 1000.0 MiB >= --max-mem 1000.0 MiB; sending SIGTERM to the job " \
                                    "(SIGKILL in 2s)"
    assert rig.events[0].data["reason"] == "memory"
    assert rig.job.sent == [("all", TERM)]
    assert rig.sup.state is State.TERMINATING
    rig.step(1002.499)  # a millisecond before the deadline
    assert rig.job.sent == [("all", TERM)] and rig.kinds() == ["breach"]
    assert rig.job.terminations == 2  # during the grace period, what appeared since is asked too
    rig.step(1002.5)  # exactly the deadline
    assert rig.job.sent[-1] == ("all", KILL) and rig.sup.state is State.KILLING
    assert rig.events[-1] == Event("signal", "still running after 2s; sending SIGKILL", {"pids": [100, 101]},
                                   rig.events[-1].time)
    rig.step(1002.6)  # whatever appeared since is killed too, without another event
    assert rig.job.sent[-2:] == [("all", KILL), ("all", KILL)] and rig.kinds() == ["breach", "signal"]


def test_the_hard_floor_kills_at_once_but_not_in_the_breach_sample() -> None:
    rig = make_rig(limits(max_mem=None, min_available=1000 * MiB))  # hard floor: 500 MiB
    rig.machine.available = 400 * MiB
    rig.step(1000.0)
    assert rig.kinds() == ["breach"] and rig.job.sent == [("all", TERM)]  # SIGTERM gets a chance
    rig.step(1000.01)
    assert rig.events[-1].message == "MemAvailable 400.0 MiB fell to the hard floor 500.0 MiB; sending SIGKILL"
    assert rig.job.sent[-1] == ("all", KILL) and rig.sup.state is State.KILLING
    rig.step(1001.0)  # killed already; again only once the grace period is over
    assert rig.job.sent.count(("all", KILL)) == 1
    rig.step(1002.0)
    assert rig.job.sent.count(("all", KILL)) == 2 and rig.kinds() == ["breach", "signal"]


def test_the_hard_floor_boundary() -> None:
    rig = make_rig(limits(max_mem=None, min_available=1000 * MiB, grace=60.0))
    rig.machine.available = 900 * MiB
    rig.step(1000.0)
    assert rig.sup.state is State.TERMINATING
    rig.machine.available = 500 * MiB + 1
    rig.step(1001.0)
    assert rig.sup.state is State.TERMINATING
    rig.machine.available = 500 * MiB  # exactly half of --min-available
    rig.step(1002.0)
    assert rig.sup.state is State.KILLING


def test_a_breach_is_measured_again_before_it_counts(rig: Rig) -> None:
    rig.job.mem = [1000 * MiB, 1000 * MiB, 10 * MiB]  # rough, precise (two processes near the limit), re-check
    rig.step(1000.0)
    assert rig.events == [] and rig.job.sent == [] and rig.sup.state is State.RUNNING
    assert rig.job.refreshes == [False, True]  # the re-check looked for new processes at once


def test_warnings_send_the_warn_signal_to_the_group_memory_only() -> None:
    rig = make_rig(limits(warn_signal=signal.SIGUSR1, on_hot="warn"))
    rig.job.mem = [950 * MiB]
    rig.machine.temps = (85.0,)
    rig.step(1000.0)
    thermal, memory = rig.events
    assert thermal.message == "chip:t at 85 C >= max_temp 80 C" and "signal" not in thermal.data
    assert memory.message == "job memory 950.0 MiB is 95% of --max-mem 1000.0 MiB; sending SIGUSR1 to the job"
    assert memory.data["signal"] == "SIGUSR1"
    assert rig.job.sent == [("group", signal.SIGUSR1)]


def test_no_warn_signal_once_the_main_process_ended() -> None:
    rig = make_rig(limits(warn_signal=signal.SIGUSR1))
    rig.sup.leader_status = 0
    rig.job.mem = [950 * MiB]
    rig.step(1000.0)
    assert rig.events[0].message == "job memory 950.0 MiB is 95% of --max-mem 1000.0 MiB" and rig.job.sent == []


def test_pause_and_resume_through_the_states(rig: Rig) -> None:
    rig.machine.temps = (80.0,)
    rig.step(1000.0)
    assert rig.sup.state is State.PAUSED and rig.job.sent == [("all", STOP)] and rig.kinds() == ["paused"]
    rig.machine.temps = (60.0,)
    rig.step(1000.5)  # sensors are read once a second
    assert rig.sup.state is State.PAUSED and rig.machine.thermal_reads == 1
    rig.step(1001.0)
    assert rig.sup.state is State.RUNNING and rig.job.sent[-1] == ("all", CONT) and rig.kinds() == ["paused", "resumed"]


def test_a_breach_while_paused_continues_the_job_and_nothing_pauses_it_again(rig: Rig) -> None:
    rig.machine.temps = (90.0,)
    rig.step(1000.0)
    rig.job.mem = [2000 * MiB]
    rig.step(1001.0)
    assert rig.sup.state is State.TERMINATING and rig.job.sent == [("all", STOP), ("all", TERM), ("all", CONT)]
    rig.step(1002.0)  # still hot: figures only, no decision
    assert rig.kinds() == ["paused", "breach"] and rig.sup.stats.highest_temp == 90.0


def test_a_gpu_breach_stops_the_job_and_gpu_figures_go_on() -> None:
    rig = make_rig(limits(gpu=GpuLimits("nvml", (0,), None, Size(percent=5.0), Size(percent=20.0))))
    total = 10000 * MiB
    rig.machine.gpus = (GpuInfo(0, "card", "u", total=total, used=total - 100 * MiB, free=100 * MiB, temp=50),)
    rig.step(1000.0)
    assert rig.kinds() == ["breach"] and rig.events[0].data["reason"] == "gpu"
    rig.machine.gpus = (GpuInfo(0, "card", "u", total=total, used=total, free=0, temp=60),)
    rig.step(1000.2)
    assert rig.kinds() == ["breach"] and rig.sup.stats.highest_gpu_temp == 60


def test_process_tree_job_no_killpg_once_its_group_is_empty(monkeypatch: pytest.MonkeyPatch) -> None:
    groups: list[tuple[int, int]] = []
    monkeypatch.setattr("os.killpg", lambda pgid, sig: groups.append((pgid, sig)))
    monkeypatch.setattr("os.getpgid", lambda pid: 4242 if pid == 4243 else 1)
    job = ProcessTreeJob(4242, JobTree(root=-1, proc_root="/nonexistent"))
    job.tree.add(4243)
    job.forward(TERM)
    assert groups == [(4242, TERM)]
    job.ended(4242, 300 * MiB)
    job.forward(TERM)  # the main process is gone but 4243 is still in its group: the id is still ours
    assert groups == [(4242, TERM)] * 2
    job.ended(4243, 100 * MiB)
    job.forward(TERM)  # nobody of ours left in the group: its number could be someone else's by now
    assert groups == [(4242, TERM)] * 2
    assert job.peak() == 300 * MiB and not job.members()


def test_leftovers_of_the_main_process_are_asked_once_then_killed(rig: Rig) -> None:
    # The reaping itself needs real children (test_exec.py); what it triggers is driven here directly.
    rig.sup._stop_leftovers()
    assert rig.kinds() == ["cleanup"] and rig.sup.state is State.TERMINATING
    assert rig.events[0].message == "the job's main process ended; stopping 2 leftover process(es)"
    rig.step(1001.0)  # during the grace period: what appeared since is asked, without another event
    assert rig.job.terminations == 2 and rig.kinds() == ["cleanup"]
    rig.step(1002.0)
    assert rig.sup.state is State.KILLING
    rig.step(1003.1)  # killing: whatever appeared since is killed at each sample
    assert rig.job.sent.count(("all", KILL)) == 2 and rig.kinds() == ["cleanup", "signal"]


def test_an_ending_signal_to_a_paused_job_continues_it(rig: Rig) -> None:
    rig.machine.temps = (90.0,)
    rig.step(1000.0)
    rig.sup._inbox.pending.extend([signal.SIGUSR1, signal.SIGCHLD, signal.SIGINT])
    rig.sup._forward_signals()
    assert rig.job.sent == [("all", STOP), ("group", signal.SIGUSR1), ("group", signal.SIGINT), ("all", CONT)]
    assert [e.message for e in rig.events[1:]] == ["forwarded SIGUSR1 to the job", "forwarded SIGINT to the job"]


def test_job_stats_take_the_kernel_peak_and_keep_the_summary_keys() -> None:
    from safegate.run.outcome import StatsRecorder

    stats = StatsRecorder(started=10.0)
    stats.memory(200 * MiB, 8 * GiB)
    stats.memory(100 * MiB, 6 * GiB)
    stats.memory(100 * MiB, 7 * GiB)
    stats.temperature(55.0)
    stats.temperature(50.0)
    stats.job_pressure(None)  # a process tree has none
    stats.job_pressure(3.5)
    stats.job_pressure(1.25)
    result = stats.result(now=12.34567, kernel_peak=300 * MiB)  # a process peaked between samples
    assert result.as_json() == {"duration": 2.346, "peak_job_memory": 300 * MiB, "lowest_available": 6 * GiB,
                                "highest_temp": 55.0, "peak_job_gpu_memory": None, "highest_gpu_temp": None,
                                "highest_job_pressure": 3.5}
    assert stats.result(now=12.0, kernel_peak=0).peak_job_mem == 200 * MiB


def test_the_leaders_status_is_taken_once_even_if_its_pid_is_reused(monkeypatch: pytest.MonkeyPatch,
                                                                     rig: Rig) -> None:
    # An orphan that gets the leader's pid later (pid reuse) and is reaped too must not replace the job's status.
    exit3, exit0 = 3 << 8, 0
    usage = type("Usage", (), {"ru_maxrss": 0})()
    reaped = iter([(rig.job.leader, exit3, usage), (rig.job.leader, exit0, usage), (0, 0, usage)])
    monkeypatch.setattr(os, "wait4", lambda _pid, _flags: next(reaped))
    rig.sup._reap()
    assert rig.sup.leader_status == exit3


def test_a_kernel_breach_names_the_limit_the_cap_stood_for() -> None:
    # The cap is --max-mem, or lower where the headroom above --min-available is less: an OOM kill names the one
    # the cap held when the kill happened (the cap in force until the sample that sees it), never both.
    rig = make_rig(limits(max_mem=1000 * MiB, min_available=GiB), FakeJob(mem=[100 * MiB]))
    rig.machine.available = GiB + 200 * MiB  # cap: 100 MiB used + 200 MiB of headroom, below --max-mem
    rig.step(1000.0)
    rig.job.ooms = 1
    rig.step(1000.5)
    breach = next(e for e in rig.events if e.kind == "breach")
    assert breach.message.startswith("the kernel enforced --min-available 1.0 GiB: the job's cgroup hit its cap of "
                                     "300.0 MiB"), breach.message
    assert "--max-mem" not in breach.message and breach.data["limit"] == "min_available"

    rig = make_rig(limits(max_mem=1000 * MiB, min_available=GiB), FakeJob(mem=[100 * MiB]))
    rig.step(1000.0)  # 64 GiB free: the cap is --max-mem
    rig.machine.available = GiB + 200 * MiB  # the cap is lowered at this sample, after the kill it sees
    rig.job.ooms = 2
    rig.step(1000.5)
    breach = next(e for e in rig.events if e.kind == "breach")
    assert breach.message.startswith("the kernel enforced --max-mem 1000.0 MiB: the job's cgroup hit its cap and 2 "
                                     "process(es)"), breach.message
    assert "--min-available" not in breach.message and breach.data["limit"] == "max_mem"
