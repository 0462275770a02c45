"""Waiting and admission: re-checking until the gate passes, and checking and claiming as one step under the
machine-wide admission lock (exec's claim of its lock and reservation)."""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Callable, Sequence
from typing import TypeVar

from safegate.backoff import RECHECK, poll
from safegate.exitcodes import ExitCode
from safegate.fairness import QUEUE
from safegate.locks.queue import Line
from safegate.locks.store import HeldLock, LockStore
from safegate.preflight import (
    Settings,
    cleanup_stale,
    evaluate,
    in_line_for,
    read_machine,
    total_ram,
    walk_in,
)
from safegate.results import CheckResult, GpuValues, LockValues, Status, Verdict

QUEUE_RECHECK = 0.25  # seconds between re-checks while earlier waiters go first


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
            with contextlib.nullcontext() if line.arrived else LockStore(settings.lock_dir).admission():
                line.arrive()
                return line.judged(evaluate(settings, resuming=resuming, removals=removals, line=line,
                                            machine=machine)), None

        return retry(attempt, timeout, on_blocked, clock, sleep, pause=_lock_pause(settings, sleep))[0]


def _lock_pause(settings: Settings, sleep: Callable[[float], None] = time.sleep) -> Callable[[Verdict, float], None]:
    """Between re-checks: when only the lock blocks, watch the lock itself instead of sleeping blind."""

    def pause(verdict: Verdict, seconds: float) -> None:
        lock = verdict.result("lock")
        if settings.lock is not None and [c.name for c in verdict.failures] == ["lock"] and (
                lock is not None and lock.caused_by != QUEUE):
            LockStore(settings.lock_dir).wait_free(settings.lock, seconds)
        elif lock is not None and lock.caused_by == QUEUE:
            # In line behind a waiter of the same lock about to take it: soon the lock is held, and watched.
            sleep(min(seconds, QUEUE_RECHECK))
        else:
            sleep(seconds)

    return pause


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


def admit(
    settings: Settings, argv: Sequence[str], *, wait: bool, timeout: float | None,
    on_blocked: Callable[[Verdict], None] | None = None,
) -> tuple[Verdict, HeldLock | None]:
    """Check and claim the lock as one step under the machine-wide admission lock.

    The claim records the job's declared need in the holder metadata, so every later admission counts
    it as reserved until the job's own memory has grown to it.
    """
    store = LockStore(settings.lock_dir)
    store.ensure_directory()
    with in_line_for(settings) if wait else contextlib.nullcontext(Line(walk_in(settings))) as line:

        def attempt(resuming: bool) -> tuple[Verdict, HeldLock | None]:
            return _admit_once(settings, store, argv, resuming, line)

        if wait:
            return retry(attempt, timeout, on_blocked, pause=_lock_pause(settings))
        return attempt(False)


def _admit_once(settings: Settings, store: LockStore, argv: Sequence[str], resuming: bool,
                line: Line) -> tuple[Verdict, HeldLock | None]:
    # The slow reading (the process table matched against the rules, sensors, NVML) and the cleanup are done
    # before the admission lock: it is held only for the lock dir, memory and the claim, whatever others run.
    removals = cleanup_stale(settings)
    machine = read_machine(settings)
    with store.admission():
        line.arrive()
        verdict = line.judged(evaluate(settings, resuming=resuming, removals=removals, line=line, machine=machine))
        if not verdict.ok:
            return verdict, None
        total = total_ram()
        gpu = verdict.values(GpuValues)
        chosen = gpu.chosen if gpu is not None else None
        # A profile without a mutex still gets a lock of its own job: its holder metadata carries the
        # reservation that later admissions count. The name is unique to this claim.
        name = settings.lock if settings.lock is not None else f"job-{os.getpid()}-{time.monotonic_ns()}"
        held = store.try_acquire(
            name, settings.profile.name, list(argv), need=settings.memory.resolve(total),
            gpu_index=chosen, gpu_need=settings.gpu_memory.resolve(total) if chosen is not None else 0,
        )
        if held is None:
            # Taken by something outside safegate (flock(1)) since the check. Never answer "ok" without
            # a lock: the caller would start nothing and report success.
            return _lock_lost(evaluate(settings, resuming=resuming, removals=removals, machine=machine), name), None
        held.unlink_after = settings.lock is None
        return verdict, held


def _lock_lost(verdict: Verdict, name: str) -> Verdict:
    if not verdict.ok:
        return verdict
    lost = CheckResult("lock", Status.FAIL, f"lock {name!r} was taken by another process during admission",
                       ExitCode.LOCKED, LockValues(lock=name, path=None, held=True, holder=None, holder_alive=False,
                                                   legacy=()))
    return Verdict(verdict.profile, tuple(lost if c.name == "lock" else c for c in verdict.checks))
