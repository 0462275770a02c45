"""The gate: resolve settings, read the machine, run the five checks, and wait for them to pass.

evaluate() only reads: slots, slurm health and the asyncio Gate call it as it is, and leave the lock dir
as they found it. cleanup_stale() is the one step that writes (it creates the lock dir and removes stale
files); `check` (command line and API), hold and exec admission run it before each evaluation.
"""

from __future__ import annotations

import contextlib
import math
import os
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import msgspec
from msgspec.structs import replace

from safegate.config.model import DEFAULT_PROFILE, CompetingRule, Config, Profile, ThermalConfig
from safegate.gate.fairness import QUEUE, head_waiting, in_line
from safegate.gate.grant import owner_idle
from safegate.gate.policy import (
    blame_holder,
    check_competing,
    check_gpu,
    check_lock,
    check_memory,
    check_pressure,
    check_stale,
    check_thermal,
    encloses,
    match_competing,
    select_gpus,
    with_clock_reasons,
)
from safegate.gate.queue import HEAD_GRACE, Line, read_tickets, waiting_in_line
from safegate.gate.results import CheckResult, CompetingValues, GpuValues, MemoryValues, Status, Verdict
from safegate.locks.files import check_directory, dir_lockers, ensure_directory, lockers, names_in, resolve_lock_dir
from safegate.locks.holders import cleanup
from safegate.locks.legacy import legacy_removable, read_legacy, remove_legacy
from safegate.locks.store import LockStore, reservations
from safegate.probes.gpu import gpu_backend, read_gpus
from safegate.probes.memory import read_memory
from safegate.probes.pids import ancestry
from safegate.probes.processes import descendants, process_alive, read_processes, still_running, user_name
from safegate.probes.snapshots import (
    GpuSnapshot,
    LegacyState,
    LockState,
    ProcessSnapshot,
    Removal,
    Selection,
    ThermalSnapshot,
    Ticket,
)
from safegate.probes.thermal import read_thermal

if TYPE_CHECKING:
    from safegate.need.settle import Need


class Settings(msgspec.Struct, frozen=True):
    """Everything one evaluation needs: the profile as this caller runs it (its overrides applied, its need
    decided), and what the config and the machine add. *need*: how the need was decided (safegate.need.settle),
    for a caller that named a command or a profile with memory = "auto"; None otherwise."""

    profile: Profile
    thermal: ThermalConfig
    legacy_lock_files: tuple[Path, ...]
    lock_dir: Path
    gpu_backend: str
    need: Need | None = None  # safegate.need is imported only where it is used: a plain check stays fast


def resolve(config: Config, profile_name: str | None, overrides: Mapping[str, Any],
            env: Mapping[str, str] | None = None, *, command: Sequence[str] = ()) -> Settings:
    """The one way from a caller's config, command, profile and options to what the gate judges: exec, check,
    slots, need and the API all come here. *profile_name* None: the profile whose match finds *command* (as exec
    picks it), else `default`. *command*: the job's command line, never run; its need is predicted from it
    (safegate.need.settle says the precedence). *overrides*: config.model.parse_overrides(), by setting key
    (command line > environment > config > built-in)."""
    env = os.environ if env is None else env
    if profile_name is None:
        profile = config.profile_for_command(list(command)) if command else config.profile(DEFAULT_PROFILE)
    else:
        profile = config.profile(profile_name)
    backend = gpu_backend(config.gpu_backend, env)
    need = None
    if command or profile.memory_auto:
        from safegate.need.settle import settle

        need, changes = settle(profile, overrides, command, env=env, gpu_present=lambda: gpu_present(backend))
        overrides = {**changes, **overrides}
    return Settings(
        profile=replace(profile, **overrides),
        thermal=config.thermal,
        legacy_lock_files=config.legacy_lock_files,
        lock_dir=resolve_lock_dir(config.lock_dir, env),
        gpu_backend=backend,
        need=need,
    )


def gpu_present(backend: str) -> bool:
    """A GPU this job could use: the tools people run put their model on it when there is one."""
    return bool(read_gpus(backend).gpus)


def reserves(settings: Settings) -> bool:
    """A pass has something to hold for the job: a lock, or a memory or GPU memory need."""
    job, total = settings.profile, total_ram()
    return job.lock is not None or job.memory.resolve(total) > 0 or job.gpu_memory.resolve(total) > 0


def cleanup_stale(settings: Settings) -> list[Removal]:
    """Create the lock dir if missing, then remove stale holder metadata, dead waiters' tickets and dead legacy
    PID files."""
    ensure_directory(settings.lock_dir)
    names = names_in(settings.lock_dir)  # one listing for every reader: others' files may number in thousands
    removals = list(cleanup(settings.lock_dir, names))
    read_tickets(settings.lock_dir, sweep=True, names=names)
    legacy = [read_legacy(p) for p in settings.legacy_lock_files]
    return removals + [remove_legacy(s) for s in legacy if legacy_removable(s)]


def clean_and_evaluate(settings: Settings, *, resuming: bool = False, line: Line | None = None) -> Verdict:
    """What `check` does each time: clean up, then evaluate, reporting the cleanup as stale_locks. Without a
    *line* (no --wait) it comes last in line: it passes only when no earlier waiter goes first. An earlier
    waiter that could take the lock now is given HEAD_GRACE to do so, and passed over when it does not."""
    removals = cleanup_stale(settings)
    line = line if line is not None else Line(walk_in(settings))
    verdict = evaluate(settings, resuming=resuming, removals=removals, line=line)
    if line.arrived:
        return verdict  # a --wait caller: its own loop re-checks
    deadline = time.monotonic() + HEAD_GRACE + 0.25
    while behind_head(verdict, line) and time.monotonic() < deadline:
        time.sleep(0.05)
        verdict = evaluate(settings, resuming=resuming, removals=removals, line=line)
    return verdict


def behind_head(verdict: Verdict, line: Line) -> bool:
    """Only the line blocks, behind a waiter that could take the lock now (and must, within HEAD_GRACE)."""
    return bool(verdict.failures) and line.head is not None and all(c.caused_by == QUEUE for c in verdict.failures)


def in_line_for(settings: Settings) -> contextlib.AbstractContextManager[Line]:
    """A ticket taken at arrival in the lock dir (created if missing), dropped when the wait ends."""
    ensure_directory(settings.lock_dir)
    return waiting_in_line(settings.lock_dir, settings.profile.lock, settings.profile.name,
                           settings.profile.memory.resolve(total_ram()))


def walk_in(settings: Settings) -> Ticket:
    """The place in line of a caller that does not wait: behind every waiter there is now."""
    return Ticket(pid=os.getpid(), start_time=0.0, user="", lock=settings.profile.lock, profile=settings.profile.name,
                  need=settings.profile.memory.resolve(total_ram()), arrival=time.time_ns())


class Machine(msgspec.Struct, frozen=True):
    """What an evaluation reads of the machine outside the admission lock: the slow part (the process table
    matched against the rules, sensors, NVML). Memory, the lock dir and the line are read under it."""

    legacy: tuple[LegacyState, ...]
    thermal: ThermalSnapshot
    gpus: GpuSnapshot
    selection: Selection
    competing: CheckResult
    processes: ProcessSnapshot  # what the competing check judged


def read_machine(settings: Settings) -> Machine:
    # Removed files are gone, so only live or unreadable legacy files are left to judge.
    legacy = tuple(s for s in (read_legacy(p) for p in settings.legacy_lock_files) if s.alive or s.note)
    gpus = read_gpus(settings.gpu_backend)
    lock_dir = settings.lock_dir
    # Another safegate is left out only for what the lock dir shows of it. Tickets before locks: a safegate takes
    # its lock before it drops its ticket, so one seen in the process table is found in one or the other.
    procs = read_processes(accounted=lambda: {t.pid for t in read_tickets(lock_dir)} | dir_lockers(lock_dir, lockers()))
    return Machine(legacy=legacy, thermal=read_thermal(settings.thermal), gpus=gpus,
                   selection=select_gpus(gpus, settings.profile.gpu, os.environ.get("CUDA_VISIBLE_DEVICES"),
                                         (os.environ.get("ROCR_VISIBLE_DEVICES"),
                                          os.environ.get("HIP_VISIBLE_DEVICES"))),
                   competing=_competing(procs, settings.profile.competing, total_ram()), processes=procs)


def evaluate(
    settings: Settings, *, resuming: bool = False, removals: Sequence[Removal] | None = None,
    line: Line | None = None, machine: Machine | None = None,
) -> Verdict:
    """One pass of every check, reading only. *resuming*: a thermal block was seen, so pass only below
    resume_temp. *removals*: what cleanup_stale() removed just before (None: it did not run). *line*: the
    caller's place in line (fairness.in_line); None: the order of waiters is not judged (slots, status).
    *machine*: what read_machine() read just before (None: read it now)."""
    machine = read_machine(settings) if machine is None else machine
    store = LockStore(settings.lock_dir)
    # An absent lock dir holds no locks; an unsafe one is refused as check refuses it.
    check_directory(store.directory)
    family = ancestry()
    names = names_in(store.directory)  # one listing for every reader of this evaluation
    # The reservation of a hold this caller runs inside is its own: never counted against it.
    holders = [h for h in reservations(store.directory, names) if not encloses(h, family)]
    reserved = sum(h.reservation for h in holders)
    gpu_reserved: dict[int, int] = {}
    for h in holders:
        if h.gpu_index is not None:
            gpu_reserved[h.gpu_index] = gpu_reserved.get(h.gpu_index, 0) + h.gpu_reservation
    mem = read_memory()
    lock_state = store.state(settings.profile.lock, names) if settings.profile.lock is not None else None

    need = settings.profile.memory.resolve(mem.total)
    gpu_need = settings.profile.gpu_memory.resolve(mem.total)
    selection = machine.selection
    if gpu_need and selection.gpus and all(g.unified_memory for g in selection.gpus):
        need += gpu_need  # the card shares system RAM (Jetson): its need is a RAM need
    limit = settings.profile.effective_resume_temp if resuming else settings.profile.max_temp
    margin = settings.profile.memory_margin.resolve(mem.total)
    checks: list[CheckResult] = [
        check_stale(removals),
        check_memory(mem, need, margin, reserved),
        check_pressure(mem, settings.profile.max_memory_pressure),
        check_gpu(machine.gpus, selection, gpu_need, settings.profile.gpu_margin, gpu_reserved),
        check_thermal(machine.thermal, limit, require=settings.thermal.require, resuming=resuming,
                      gpus=selection.gpus),
        check_lock(lock_state, list(machine.legacy), family=family,
                   owner_idle=owner_idle(lock_state.holder if lock_state else None, family)),
        _besides_the_lock(machine, lock_state, settings.profile.competing),
    ]
    checks[1] = blame_holder(checks[1], lock_state, holders, mem, need, margin)
    checks = [with_clock_reasons(c, selection.gpus) if c.name == "thermal" else c for c in checks]
    if line is not None:
        tickets = read_tickets(store.directory, names=names)
        line.saw_head(*head_waiting(checks, line.ticket, tickets, line.passed_over()))
        checks = in_line(checks, line.ticket, tickets, passed_over=line.passed_over())
    return Verdict(profile=settings.profile.name, checks=tuple(checks))


def _competing(procs: ProcessSnapshot, rules: tuple[CompetingRule, ...], total: int) -> CheckResult:
    """The competing check, with the owners of what it names looked up (only those: a lookup is not free)."""
    matches = [replace(m, user=user_name(m.process.uid)) for m in match_competing(procs, rules, total)]
    return check_competing(matches, rules)


def _besides_the_lock(machine: Machine, state: LockState | None, rules: tuple[CompetingRule, ...]) -> CheckResult:
    """The competing check as of the lock's state, read after the process table: without the processes of
    whoever holds the caller's lock (the flock's takers per /proc/locks, the job its holder record names, their
    descendants), which the lock check names already, and without what has ended since the table was read (the
    job whose end released the lock)."""
    values = machine.competing.values
    if not isinstance(values, CompetingValues) or not values.matches:
        return machine.competing
    jobs: set[int] = set()
    if state is not None and state.held:
        jobs = set(state.lockers)
        holder = state.holder
        if holder is not None and holder.job_pid is not None and process_alive(holder.job_pid,
                                                                               holder.job_start_time):
            jobs.add(holder.job_pid)  # also after its safegate is gone (the job keeps the flock it inherited)
        jobs |= descendants(jobs, {p.pid: p.ppid for p in machine.processes.processes})
    matches = [m for m in values.matches if m.process.pid not in jobs and still_running(m.process.pid)]
    return machine.competing if len(matches) == len(values.matches) else check_competing(matches, rules)


def total_ram() -> int:
    return read_memory().total


def count_slots(settings: Settings, verdict: Verdict, cap: int | None) -> int:
    """floor((available - reserved - margin) / need), and per GPU likewise, capped by *cap* and by the lock.

    Any other blocking check (heat, a competing process, a held lock) means 0. A job of unknown size
    (need 0) counts as one slot unless *cap* says more. A profile with a lock is a mutex: 0 or 1.
    """
    blocking = [c for c in verdict.failures if c.name not in ("memory",)]
    if blocking:
        return 0
    memory = verdict.values(MemoryValues)
    assert memory is not None
    margin = settings.profile.memory_margin.resolve(memory.total)
    count = math.inf if memory.need <= 0 else max(0, (memory.available - memory.reserved - margin) // memory.need)
    gpu = verdict.values(GpuValues)
    gpu_result = verdict.result("gpu")
    if gpu is not None and gpu_result is not None and gpu_result.status is Status.PASS and gpu.need > 0:
        per_card = [
            max(0, (g.free - gpu.reserved.get(g.index, 0) - settings.profile.gpu_margin.resolve(g.total or 0))
                // gpu.need)
            for g in gpu.gpus if g.index in gpu.candidates and g.free is not None
        ]
        if per_card:
            count = min(count, sum(per_card))
    if settings.profile.lock is not None:
        count = min(count, 1)
    if cap is not None:
        count = min(count, cap)
    return 1 if count == math.inf else int(count)
