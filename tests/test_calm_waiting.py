"""Waiting stays calm off a terminal (issue 25): a line when the cause changes (which check, which lock, which
holder), not when its running figures do, one a minute otherwise, each line short; the --log records the wait
and `report` shows it."""

from __future__ import annotations

import json
import re
import subprocess
import time
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from support import PY, TIMEOUT, Procs, Run, hold_with_safegate, wait_until

from safegate.exitcodes import ExitCode
from safegate.gate.results import CheckResult, Status, Verdict

HOLD = 180.0  # seconds: the job ahead, as a night's job holds its lock
STEP = 2.0  # how often a waiter behind a held lock looks again (backoff.RECHECK's cap)


def _verdict(now: float, holder_pid: int, available: int) -> Verdict:
    """What a waiter sees behind *holder_pid*'s job with memory short: the real checks' words and figures (the
    hold's age, free memory, the holder's use), which change at every look."""
    from safegate.gate.policy import check_lock, check_memory
    from safegate.probes.snapshots import HolderRecord, LockState, MemorySnapshot

    holder = HolderRecord(pid=holder_pid, start_time=1000.0 + holder_pid, user="alice", host="gpu-box",
                          cmdline=["python", "-m", "whisper", "--model", "large-v3", "/data/in/a-long-talk.mp3"],
                          started_at=1_000_000.0, profile="whisper-large-v3", lock="heavy", job_pid=holder_pid + 1,
                          need=10 << 30, used=int(now) << 20)
    lock = LockState(name="heavy", path=Path("/run/lock/safegate/heavy.lock"), held=True, holder=holder,
                     holder_alive=True)
    memory = check_memory(MemorySnapshot(total=64 << 30, available=available, pressure_some_avg10=None),
                          need=12 << 30, margin=2 << 30)
    return Verdict("whisper-large-v3", (check_lock(lock, (), now=1_000_000.0 + now), memory))


def test_three_minutes_behind_a_job_with_changing_figures_is_at_most_five_short_lines(
        capsys: pytest.CaptureFixture[str]) -> None:
    from safegate.cli.plain import Progress

    now = [0.0]
    shown = Progress(silent=False, clock=lambda: now[0], live=False)
    seen = set()
    while now[0] <= HOLD:
        verdict = _verdict(now[0], 4242, (8 << 30) - int(now[0]) * 4096)
        seen.add(verdict.checks[0].reason)
        shown(verdict)
        now[0] += STEP
    assert len(seen) > 60  # the figures did change at every look
    lines = capsys.readouterr().err.splitlines()
    assert 1 <= len(lines) <= 5, lines
    assert all(len(line) <= 160 for line in lines), [len(line) for line in lines]
    # Cut, the longest reason first: every failing check is still named.
    assert lines[0].startswith("safegate: waiting: lock: lock 'heavy' is held by job pid 4243") and \
        "...; memory: available " in lines[0], lines[0]
    assert lines[1].endswith("(waited 1m00s)") and lines[-1].endswith("(waited 3m00s)"), lines

    # Another holder is another cause: said at once, not a minute later.
    now[0] += STEP
    shown(_verdict(now[0], 5151, 8 << 30))
    shown(_verdict(now[0] + STEP, 5151, 7 << 30))
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1 and "job pid 5152" in lines[0] and len(lines[0]) <= 160, lines


def test_the_cause_is_the_check_lock_and_holder_not_the_figures() -> None:
    from safegate.gate.results import blocking_cause

    assert blocking_cause(_verdict(10, 4242, 8 << 30)) == blocking_cause(_verdict(70, 4242, 5 << 30))
    assert blocking_cause(_verdict(10, 4242, 8 << 30)) != blocking_cause(_verdict(10, 4343, 8 << 30))
    only_memory = Verdict("p", (_verdict(10, 4242, 8 << 30).checks[1],))
    assert blocking_cause(only_memory) != blocking_cause(_verdict(10, 4242, 8 << 30))
    # Without figures, the words are all there is to tell causes apart.
    assert blocking_cause(Verdict("p", (CheckResult("lock", Status.FAIL, "held", ExitCode.LOCKED),))) != \
        blocking_cause(Verdict("p", (CheckResult("lock", Status.FAIL, "in line", ExitCode.LOCKED),)))


@settings(max_examples=300, deadline=None, derandomize=True)
@given(parts=st.lists(st.text(max_size=400), min_size=1, max_size=7), most=st.integers(60, 400))
def test_a_cut_line_fits_and_names_every_check(parts: list[str], most: int) -> None:
    from safegate.cli.plain import fitted

    line, whole = fitted(parts, most), "; ".join(parts)
    assert len(line) <= most
    if len(whole) <= most:
        assert line == whole  # never cut when it fits
    elif not any("; " in p for p in parts):
        # Each part keeps its start (at least a few characters of each of 7 checks in 60), cut ones end in "...".
        pieces = line.split("; ")
        assert len(pieces) == len(parts)
        assert all(p == q or (q.endswith("...") and p.startswith(q[:-3])) for p, q in zip(parts, pieces, strict=True))


def _held_for(lock_dir: Path) -> set[str]:
    """The hold's age as the waiter judged it last, from its ticket's state (rewritten when its reason changes)."""
    ages = set()
    for state in lock_dir.glob(".ticket.*.state"):
        try:
            reason = json.loads(state.read_text()).get("reason", "")
        except (OSError, ValueError):
            continue
        ages |= set(re.findall(r", for (\w+)", reason))
    return ages


def test_a_waiter_behind_a_running_holder_says_one_line_and_logs_the_wait(
        run: Run, config: Path, lock_dir: Path, tmp_path: Path, procs: Procs) -> None:
    holder = hold_with_safegate(procs, lock_dir, "heavy", profile="whisper-large-v3")
    log, err = tmp_path / "night.jsonl", tmp_path / "waiter.err"
    with err.open("wb") as stderr:
        waiter = procs.spawn([PY, "-m", "safegate", "exec", "--config", str(config), "--mem", "0", "--wait",
                              "--log", str(log), "--", "true"], env=run.env, stderr=stderr,
                             stdout=subprocess.DEVNULL)
    # The waiter has looked at the hold at least three times, its age different each time (0s, 1s, 2s, ...).
    ages: set[str] = set()

    def looked_three_times() -> bool:
        ages.update(_held_for(lock_dir))
        return len(ages) >= 3 or waiter.poll() is not None

    wait_until(looked_three_times, what="three looks at the hold")
    assert waiter.poll() is None, err.read_text()
    holder.kill()
    holder.wait(timeout=TIMEOUT)
    assert waiter.wait(timeout=TIMEOUT) == 0
    lines = err.read_text().splitlines()
    waiting = [line for line in lines if line.startswith("safegate: waiting")]
    assert len(waiting) == 1, (ages, lines)
    assert all(len(line) <= 160 for line in lines), lines
    assert f"pid {holder.pid}" in waiting[0], waiting

    events = [json.loads(line) for line in log.read_text().splitlines()]
    kinds = [e["event"] for e in events]
    assert kinds.count("waiting") == 1 and kinds.index("waiting") < kinds.index("admitted"), kinds
    said = next(e for e in events if e["event"] == "waiting")
    # In full in the log: the holder, its profile and command, where stderr's line is cut.
    assert said["exit_code"] == ExitCode.LOCKED and said["checks"] == ["lock"], said
    assert f"pid {holder.pid}" in said["message"] and "profile whisper-large-v3, for" in said["message"], said
    admitted = next(e for e in events if e["event"] == "admitted")
    assert admitted["waited"] >= 1.0, admitted  # three different ages in whole seconds: at least a second

    # The report reads it and shows it in the job's row.
    from safegate.report.page import page
    from safegate.report.timeline import build_report, jobs_from_lines

    (job,) = jobs_from_lines(str(log), log.read_text().splitlines())
    assert job.waited == admitted["waited"]
    html = page(build_report([(str(log), [job])]))
    assert ">waited</th>" in html
    result = run("report", str(log), "-o", str(tmp_path / "night.html"))
    assert result.returncode == 0, result.stderr


def test_a_wait_that_times_out_logs_how_long_it_waited(run: Run, config: Path, lock_dir: Path, tmp_path: Path,
                                                       procs: Procs) -> None:
    hold_with_safegate(procs, lock_dir, "heavy")
    log = tmp_path / "night.jsonl"
    started = time.monotonic()
    result = run("exec", "--config", str(config), "--mem", "0", "--wait", "--timeout", "1s", "--log", str(log),
                 "--", "true")
    assert result.returncode == ExitCode.LOCKED, result.stderr
    events = [json.loads(line) for line in log.read_text().splitlines()]
    assert [e["event"] for e in events] == ["waiting", "blocked"], events
    assert 1.0 <= events[1]["waited"] <= time.monotonic() - started, events

    from safegate.report.timeline import jobs_from_lines

    (job,) = jobs_from_lines(str(log), log.read_text().splitlines())
    assert job.outcome == "not_started" and job.waited == events[1]["waited"]
