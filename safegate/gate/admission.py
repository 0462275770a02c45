"""Waiting and admission: re-checking until the gate passes, and checking and claiming as one step under the
machine-wide admission lock (exec's claim of its lock and reservation)."""

from __future__ import annotations

import contextlib
import os
import sys
import time
from collections.abc import Callable, Sequence
from typing import TypeVar

from safegate.exitcodes import ExitCode
from safegate.gate.grant import GRANT_LEASE, owner_idle, spawn_keeper
from safegate.gate.policy import encloses
from safegate.gate.preflight import (
    Settings,
    behind_head,
    cleanup_stale,
    evaluate,
    in_line_for,
    read_machine,
    total_ram,
    walk_in,
)
from safegate.gate.queue import HEAD_GRACE, Line
from safegate.gate.results import CheckResult, GpuValues, LockValues, Status, Verdict
from safegate.locks.backoff import RECHECK, poll
from safegate.locks.files import admission, ensure_directory
from safegate.locks.store import HeldLock, LockStore, reservations
from safegate.probes.pids import Identity, ancestry
from safegate.probes.snapshots import HolderRecord
from safegate.units import format_bytes


def wait_until_clear(
    settings: Settings,
    timeout: float | None,
    on_blocked: Callable[[Verdict], None] | None = None,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], None] = time.sleep,
) -> Verdict:
    """`check --wait`: clean up and re-check until every check passes or *timeout* seconds (None: forever) run
    out; the last verdict."""

    with in_line_for(settings) as line:

        def attempt(resuming: bool) -> tuple[Verdict, None]:
            removals = cleanup_stale(settings)
            machine = read_machine(settings)
            # Arriving is posting, as in admission: no job is admitted between the two (queue.Line).
            with contextlib.nullcontext() if line.arrived else admission(settings.lock_dir):
                line.arrive()
                return line.judged(evaluate(settings, resuming=resuming, removals=removals, line=line,
                                            machine=machine)), None

        return retry(attempt, timeout, on_blocked, clock, sleep, pause=_lock_pause(settings, line, sleep))[0]


def _lock_pause(settings: Settings, line: Line,
                sleep: Callable[[float], None] = time.sleep) -> Callable[[Verdict, float], None]:
    """Between re-checks: while the lock is held (whatever else blocks) or earlier waiters for it go first, wait
    for this waiter's turn at it (locks.watch) instead of sleeping blind."""
    from safegate.gate.watch import turn_pause  # only waiters need it: not on a plain check's path

    return turn_pause(settings.lock_dir, settings.profile.lock, line, sleep)


T = TypeVar("T")


def retry(
    attempt: Callable[[bool], tuple[Verdict, T | None]],
    timeout: float | None,
    on_blocked: Callable[[Verdict], None] | None = None,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], None] = time.sleep,
    pause: Callable[[Verdict, float], None] | None = None,
) -> tuple[Verdict, T | None]:
    """Call attempt(resuming) on the RECHECK backoff until its verdict is ok or *timeout* runs out.

    *pause(verdict, seconds)*, when given, replaces the plain sleep between attempts.
    """
    last: tuple[Verdict, T | None] | None = None
    resuming = False

    def once() -> bool:
        nonlocal last, resuming
        last = attempt(resuming)
        verdict = last[0]
        if verdict.ok or verdict.hopeless:
            return True  # passed, or never will: a need that can never fit is told so at once
        thermal = verdict.result("thermal")
        if thermal is not None and thermal.blocks:
            # Once too hot, wait for resume_temp, not just below max_temp, so the gate does not flap.
            resuming = True
        if on_blocked is not None:
            on_blocked(verdict)
        return False

    def wait(seconds: float) -> None:
        if pause is None:
            sleep(seconds)
        else:
            assert last is not None
            pause(last[0], seconds)

    passed = poll(once, timeout, RECHECK, clock, wait)
    assert last is not None
    return last if passed and last[0].ok else (last[0], None)


Claim = Callable[[Settings, LockStore, Verdict, Sequence[str]], "T | None"]


def admit(
    settings: Settings, argv: Sequence[str], *, wait: bool, timeout: float | None,
    on_blocked: Callable[[Verdict], None] | None = None, claim: Claim[T] | None = None,
) -> tuple[Verdict, T | None]:
    """Check and claim as one step under the machine-wide admission lock.

    *claim* (default: take the lock in this process, exec's and hold()'s way) runs only on a pass, still
    under the admission lock; None from it means the lock was taken meanwhile (by flock(1)). Exec's claim
    records the job's declared need in the holder metadata, so every later admission counts it as reserved
    until the job's own memory has grown to it; check's (grant_check) leaves a keeper that does the same.
    """
    take = claim if claim is not None else _take_lock
    store = LockStore(settings.lock_dir)
    ensure_directory(store.directory)
    with in_line_for(settings) if wait else contextlib.nullcontext(Line(walk_in(settings))) as line:

        def attempt(resuming: bool) -> tuple[Verdict, T | None]:
            return _admit_once(settings, store, argv, resuming, line, take)  # type: ignore[arg-type]

        if wait:
            return retry(attempt, timeout, on_blocked, pause=_lock_pause(settings, line))
        result = attempt(False)
        # Not waiting, it still gives an earlier waiter that could take the lock now its grace to do so.
        deadline = time.monotonic() + HEAD_GRACE + 0.25
        while result[1] is None and behind_head(result[0], line) and time.monotonic() < deadline:
            time.sleep(0.05)
            result = attempt(False)
        return result


def _admit_once(settings: Settings, store: LockStore, argv: Sequence[str], resuming: bool,
                line: Line, claim: Claim[T]) -> tuple[Verdict, T | None]:
    # The slow reading (the process table matched against the rules, sensors, NVML) and the cleanup are done
    # before the admission lock: it is held only for the lock dir, memory and the claim, whatever others run.
    removals = cleanup_stale(settings)
    machine = read_machine(settings)
    with admission(store.directory):
        line.arrive()
        verdict = line.judged(evaluate(settings, resuming=resuming, removals=removals, line=line, machine=machine))
        if not verdict.ok:
            return verdict, None
        claimed = claim(settings, store, verdict, argv)
        if claimed is None:
            # Taken by something outside safegate (flock(1)) since the check. Never answer "ok" without
            # a lock: the caller would start nothing and report success.
            name = settings.profile.lock or "of the job"
            return _lock_lost(evaluate(settings, resuming=resuming, removals=removals, machine=machine), name), None
        return verdict, claimed


def enclosing_hold(store: LockStore, settings: Settings) -> HolderRecord | None:
    """The hold this caller runs inside, if any: its lock's holder is it or an ancestor (or that holder's job
    is), or, for a profile without a lock, a grant whose job it runs in. It takes no second lock."""
    family = ancestry()
    if settings.profile.lock is not None:
        holder = store.state(settings.profile.lock).holder
        return holder if encloses(holder, family, owner_idle(holder, family)) else None
    return next((h for h in reservations(store.directory) if h.owner is not None and encloses(h, family)), None)


def _take_lock(settings: Settings, store: LockStore, verdict: Verdict, argv: Sequence[str]) -> HeldLock | None:
    """exec's and hold()'s claim: the lock, with the job's need in its record (nothing inside a hold)."""
    total = total_ram()
    if enclosing_hold(store, settings) is not None:
        return HeldLock(store, settings.profile.lock or "", -1, None)  # re-entrant: the outer hold covers this job
    gpu = verdict.values(GpuValues)
    chosen = gpu.chosen if gpu is not None else None
    # A profile without a mutex still gets a lock of its own job: its holder metadata carries the
    # reservation that later admissions count. The name is unique to this claim.
    name = settings.profile.lock if settings.profile.lock is not None else f"job-{os.getpid()}-{time.monotonic_ns()}"
    held = store.try_acquire(
        name, settings.profile.name, list(argv), need=settings.profile.memory.resolve(total),
        gpu_index=chosen, gpu_need=settings.profile.gpu_memory.resolve(total) if chosen is not None else 0,
    )
    if held is not None:
        held.unlink_after = settings.profile.lock is None
    return held


def grant_check(settings: Settings, owner: Identity, *, wait: bool, timeout: float | None,
                on_blocked: Callable[[Verdict], None] | None = None) -> tuple[Verdict, str]:
    """`check` that grants: on a pass, what it checked (the lock, the need) is held by a keeper for the owner's
    next process (safegate.gate.grant); the verdict and a note on what was granted."""

    def claim(settings: Settings, store: LockStore, verdict: Verdict, argv: Sequence[str]) -> str | None:
        held = enclosing_hold(store, settings)
        if held is not None:
            return f"inside the job that holds it (pid {held.job_pid or held.pid}): nothing more to grant"
        total = total_ram()
        gpu = verdict.values(GpuValues)
        chosen = gpu.chosen if gpu is not None else None
        job = settings.profile
        name = job.lock if job.lock is not None else f"job-{os.getpid()}-{time.monotonic_ns()}"
        need = job.memory.resolve(total)
        keeper = spawn_keeper(store, name, job.name, argv, need=need, gpu_index=chosen,
                              gpu_need=job.gpu_memory.resolve(total) if chosen is not None else 0, owner=owner)
        if keeper is None:
            return None
        what = f"lock {name!r}" if settings.profile.lock is not None else f"{format_bytes(need)} of memory"
        return (f"granted {what} to pid {owner.pid}'s next job (keeper pid {keeper}; released when that job ends, "
                f"or in {GRANT_LEASE:g}s if none starts)")

    verdict, note = admit(settings, sys.argv, wait=wait, timeout=timeout, on_blocked=on_blocked, claim=claim)
    return verdict, note or ""


def _lock_lost(verdict: Verdict, name: str) -> Verdict:
    if not verdict.ok:
        return verdict
    lost = CheckResult("lock", Status.FAIL, f"lock {name!r} was taken by another process during admission",
                       ExitCode.LOCKED, LockValues(lock=name, path=None, held=True, holder=None, holder_alive=False,
                                                   legacy=()))
    return Verdict(verdict.profile, tuple(lost if c.name == "lock" else c for c in verdict.checks))
