"""The one wait loop (safegate.locks.backoff) on a fake clock: no test here sleeps for real."""

from __future__ import annotations

import threading
from collections.abc import Callable
from itertools import islice
from pathlib import Path

import pytest
from support import TIMEOUT, set_temp

from safegate.config.file import load_config
from safegate.exitcodes import ExitCode
from safegate.gate import admission
from safegate.gate import preflight as gate
from safegate.gate.policy import CheckResult, Status, Verdict
from safegate.locks.backoff import RECHECK, Backoff, pauses, poll
from safegate.units import Size


class FakeClock:
    """A monotonic clock that only sleep() moves; each attempt may spend time too."""

    def __init__(self) -> None:
        self.now = 1000.0
        self.slept: list[float] = []

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)
        self.now += seconds


def attempts(*results: bool, clock: FakeClock | None = None, cost: float = 0.0) -> tuple[list[int], Callable[[], bool]]:
    """An attempt returning *results* in turn (then False), each spending *cost* seconds of the fake clock."""
    calls: list[int] = []
    answers = iter(results)

    def attempt() -> bool:
        calls.append(1)
        if clock is not None:
            clock.now += cost
        return next(answers, False)

    return calls, attempt


def test_backoff_grows_by_its_factor_and_stops_at_its_cap() -> None:
    assert list(islice(RECHECK.delays(), 9)) == pytest.approx([0.2, 0.3, 0.45, 0.675, 1.0125, 1.51875, 2.0, 2.0, 2.0])
    assert list(islice(Backoff(0.005).delays(), 3)) == [0.005, 0.005, 0.005]  # no factor: a constant step
    assert list(islice(Backoff(5.0, 1.5, 2.0).delays(), 3)) == [5.0, 2.0, 2.0]  # a first pause above the cap


def test_deadline_reached_gives_up_with_the_last_pause_cut_short() -> None:
    clock = FakeClock()
    calls, attempt = attempts(clock=clock)
    assert poll(attempt, 1.0, RECHECK, clock, clock.sleep) is False
    assert clock.slept == pytest.approx([0.2, 0.3, 0.45, 0.05])
    assert sum(clock.slept) == pytest.approx(1.0)
    assert len(calls) == 5  # one more attempt at the deadline itself, none after it


def test_success_on_a_later_attempt_stops_at_once() -> None:
    clock = FakeClock()
    calls, attempt = attempts(False, False, True, clock=clock)
    assert poll(attempt, 60.0, RECHECK, clock, clock.sleep) is True
    assert len(calls) == 3 and clock.slept == pytest.approx([0.2, 0.3])


def test_at_least_one_attempt_even_without_time() -> None:
    clock = FakeClock()
    calls, attempt = attempts(True)
    assert poll(attempt, 0.0, RECHECK, clock, clock.sleep) is True
    calls, attempt = attempts(False)
    assert poll(attempt, 0.0, RECHECK, clock, clock.sleep) is False
    assert len(calls) == 1 and clock.slept == []


def test_no_timeout_waits_as_long_as_it_takes_at_the_capped_pace() -> None:
    clock = FakeClock()
    calls, attempt = attempts(*[False] * 49, True)
    assert poll(attempt, None, RECHECK, clock, clock.sleep) is True
    assert len(calls) == 50 and max(clock.slept) == 2.0 and clock.slept[-1] == 2.0


def test_the_deadline_counts_from_before_the_first_attempt() -> None:
    # An attempt that itself takes 0.9 s leaves only 0.1 s of a 1 s timeout to pause.
    clock = FakeClock()
    _, attempt = attempts(clock=clock, cost=0.9)
    assert poll(attempt, 1.0, RECHECK, clock, clock.sleep) is False
    assert clock.slept == pytest.approx([0.1])
    schedule = pauses(5.0, Backoff(1.0), clock)
    clock.now += 4.5  # time spent before the first pause is asked for still counts
    assert next(schedule) == pytest.approx(0.5)
    clock.now += 0.5
    assert next(schedule, None) is None


def _blocked(name: str) -> Verdict:
    return Verdict("p", (CheckResult(name, Status.FAIL, "blocked", ExitCode.MEMORY),))


def test_retry_re_checks_on_the_recheck_schedule_and_resumes_after_heat() -> None:
    clock = FakeClock()
    seen: list[bool] = []
    blocked: list[Verdict] = []

    def attempt(resuming: bool) -> tuple[Verdict, str | None]:
        seen.append(resuming)
        return _blocked("thermal" if len(seen) == 2 else "memory"), "never"

    verdict, result = admission.retry(attempt, 1.0, blocked.append, clock, clock.sleep)
    assert result is None and not verdict.ok
    assert clock.slept == pytest.approx([0.2, 0.3, 0.45, 0.05])
    assert seen == [False, False, True, True, True]  # after a thermal block only resume_temp lets it pass
    assert len(blocked) == 5


def test_wait_until_clear_sleeps_through_the_injected_sleep(config: Path, sensor: Path) -> None:
    # Time passes only through the fake sleep: a wait that ignored the injected sleep would never reach its
    # deadline on this clock (the suite deadline ends it), and one that used it ends after exactly 3 fake seconds.
    offset = [0.0]
    slept: list[float] = []

    def sleep(seconds: float) -> None:
        slept.append(seconds)
        offset[0] += seconds

    set_temp(sensor, 99)  # too hot: thermal blocks every re-check (a need that can never fit would not wait)
    settings = gate.resolve(load_config(str(config)), "default", {"memory": Size(bytes=0)})
    result: list[object] = []
    waiter = threading.Thread(target=lambda: result.append(
        admission.wait_until_clear(settings, 3.0, clock=lambda: offset[0], sleep=sleep)), daemon=True)
    waiter.start()
    waiter.join(TIMEOUT)
    assert result, "the wait never reached its deadline: the injected sleep was not used"
    verdict = result[0]
    assert isinstance(verdict, gate.Verdict) and verdict.exit_code is ExitCode.THERMAL
    assert slept[:3] == pytest.approx([0.2, 0.3, 0.45]) and sum(slept) == pytest.approx(3.0)
