"""The Python API: the same gate for programs that run heavy work in-process.

    import safegate

    verdict = safegate.check("whisper-large-v3", mem="6G")
    if verdict.ok: ...                # a pass holds what it checked for this process until verdict.release()

    with safegate.check("whisper-large-v3") as verdict:   # ... or until the with-block ends
        if verdict.ok: transcribe()

    with safegate.hold("whisper-large", profile="whisper-large-v3", wait=True, timeout=600):
        model = load_model()          # the lock (and admission) is held for the block

    n = safegate.slots("whisper-large-v3")      # how many such jobs fit now

    gate = safegate.Gate(mem="1.5G")            # asyncio: admit coroutines one by one as memory allows
    async with gate:
        await transcribe(chunk)

Failures are typed: Blocked (with the verdict) when a check blocks, UsageError for a bad value,
ConfigError for a bad config; all are SafegateError.
"""

from __future__ import annotations

import asyncio
import dataclasses
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager

from safegate.config.file import load_config
from safegate.config.model import DEFAULT_PROFILE, parse_overrides
from safegate.errors import Blocked, SafegateError
from safegate.exitcodes import ExitCode
from safegate.gate.admission import admit, wait_until_clear
from safegate.gate.preflight import Settings, clean_and_evaluate, count_slots, evaluate, reserves, resolve
from safegate.gate.results import Verdict
from safegate.locks.backoff import RECHECK, Backoff, pauses
from safegate.locks.store import HeldLock, LockStore
from safegate.probes.memory import read_memory
from safegate.units import Size

# A setting's value, by its option's Python name (mem, margin, max_temp, lock, gpu, gpu_mem): text as on the command
# line, a size also as bytes (int), a temperature also as a number. The settings table says which exist.
Option = str | int | float | None


def _settings(profile: str | None, config: str | None, kind: str, options: Mapping[str, Option],
              command: Sequence[str] = ()) -> Settings:
    """*command*: the job's command line (never run), as `safegate check -- CMD` takes it: the profile (where
    *profile* is None) and the need are the ones exec would pick for it."""
    if isinstance(command, (str, bytes)):
        raise TypeError("command: a list of arguments, e.g. ['whisper', '--model', 'large-v3'], not one string")
    if not all(isinstance(arg, str) for arg in command):
        raise TypeError("command: every argument must be a str")
    return resolve(load_config(config), profile, parse_overrides(options, command=kind, api=True),
                   command=tuple(command))


class CheckVerdict(Verdict, frozen=True):
    """check()'s verdict. On a pass that reserves (the profile has a lock or a need), what was checked stays
    held for the calling process, as the command line's check grants it to the next job: until release(), the
    end of a with-block, a hold() of the same lock in this process (which takes it over), or the process's exit."""

    held: HeldLock | None = None

    def release(self) -> None:
        if self.held is not None:
            _GRANTS.pop(self.held.name, None)
            self.held.release()

    def __enter__(self) -> CheckVerdict:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


_GRANTS: dict[str, HeldLock] = {}  # this process's check() grants, by lock: a hold() takes its lock's over


def check(
    profile: str | None = None, *, config: str | None = None, wait: bool = False, timeout: float | None = None,
    reserve: bool = True, command: Sequence[str] = (), **options: Option,
) -> CheckVerdict:
    """Run the checks once (or, with wait, until they pass or timeout seconds run out); never raises Blocked.

    Like `safegate check`, each pass first removes stale lock files and reports them as stale_locks, and a pass
    holds what it checked (see CheckVerdict) unless *reserve* is False (monitoring, dashboards: only asking).
    *command*: the job's command line, never run: the profile (when none is named; else `default`) and the need
    are those exec would pick for it (`safegate check -- CMD`).
    """
    settings = _settings(profile, config, "check", options, command)
    if not (reserve and reserves(settings)):
        verdict = wait_until_clear(settings, timeout) if wait else clean_and_evaluate(settings)
        return CheckVerdict(verdict.profile, verdict.checks)
    verdict, held = admit(settings, sys.argv, wait=wait, timeout=timeout)
    if held is not None and held.fd >= 0:
        _GRANTS[held.name] = held
    return CheckVerdict(verdict.profile, verdict.checks, held=held if held is not None and held.fd >= 0 else None)


@contextmanager
def hold(
    lock: str | None = None, *, profile: str | None = None, wait: bool = True, timeout: float | None = None,
    config: str | None = None, command: Sequence[str] = (), **options: Option,
) -> Iterator[HeldLock]:
    """Pass admission and hold the lock (default: the profile's) for the with-block; Blocked if it cannot.
    *command*, *options*: check()'s."""
    settings = _settings(profile, config, "check", {**options, "lock": lock}, command)
    granted = _GRANTS.pop(settings.profile.lock, None) if settings.profile.lock is not None else None
    if granted is not None:
        with granted:  # this process's check() passed and holds it: the hold takes it over, and ends it
            yield granted
        return
    verdict, held = admit(settings, sys.argv, wait=wait, timeout=timeout)
    if held is None:
        raise Blocked(verdict)
    with held:
        yield held


def slots(
    profile: str | None = None, *, max: int | None = None, config: str | None = None, command: Sequence[str] = (),
    **options: Option,
) -> int:
    """How many jobs of the profile's size can start now (see count_slots); reads only. *command*, *options*:
    check()'s."""
    settings = _settings(profile, config, "slots", options, command)
    return count_slots(settings, evaluate(settings), max)


@dataclasses.dataclass  # a mutable public class: start-up does not matter here
class Gate:
    """Admit coroutines one by one, each only when memory allows, instead of a fixed concurrency limit.

    A coroutine admitted in the last *settle* seconds has not shown its memory yet (it is still loading),
    so each one counts as *mem* reserved until it has run that long or has left. Waiting re-checks with a
    backoff (from *poll* seconds, growing as RECHECK does); it never sleeps a fixed time once and hopes. Its
    checks only read: polling never writes to the lock dir.
    """

    mem: str | int
    profile: str = DEFAULT_PROFILE
    margin: str | int | None = None
    max_concurrent: int | None = None
    settle: float = 5.0
    poll: float = 0.2
    timeout: float | None = None
    config: str | None = None
    _entered: dict[asyncio.Task[object] | None, float] = dataclasses.field(default_factory=dict, init=False, repr=False)
    _lock: asyncio.Lock | None = dataclasses.field(default=None, init=False, repr=False)

    def _need(self) -> int:
        size: Size = parse_overrides({"mem": self.mem}, command="check", api=True)["memory"]
        return size.resolve(read_memory().total)

    def _admissible(self) -> Verdict:
        now = time.monotonic()
        loading = sum(1 for t in self._entered.values() if now - t < self.settle)
        need = self._need()
        settings = _settings(self.profile, self.config, "check", {"mem": need * (1 + loading), "margin": self.margin})
        return evaluate(settings)

    async def __aenter__(self) -> Gate:
        if self._lock is None:
            self._lock = asyncio.Lock()
        schedule = pauses(self.timeout, Backoff(self.poll, RECHECK.factor, RECHECK.cap))
        async with self._lock:  # one admission at a time, so each sees the one before it
            while True:
                full = self.max_concurrent is not None and len(self._entered) >= self.max_concurrent
                if not full:
                    verdict = await asyncio.get_running_loop().run_in_executor(None, self._admissible)
                    if _passes_ignoring_lock(verdict):
                        self._entered[asyncio.current_task()] = time.monotonic()
                        return self
                pause = next(schedule, None)
                if pause is None:
                    if full:
                        raise SafegateError(f"Gate: {self.max_concurrent} coroutines still running after timeout")
                    raise Blocked(verdict)
                await asyncio.sleep(pause)

    async def __aexit__(self, *exc: object) -> None:
        self._entered.pop(asyncio.current_task(), None)


def _passes_ignoring_lock(verdict: Verdict) -> bool:
    # In-process coroutines share one process; the profile's mutex is for separate jobs, not for them.
    return all(c.name == "lock" for c in verdict.failures)


__all__ = ["Blocked", "CheckVerdict", "ExitCode", "Gate", "LockStore", "check", "hold", "slots"]
