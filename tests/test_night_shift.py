"""Night-shift queues as people run them (issue 14): the exit code when the previous job still runs, slots that
never mean "no limit" to xargs or parallel, and the old shell gate's pid file written both ways."""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest
from support import (
    PY,
    TIMEOUT,
    Procs,
    Run,
    hold_with_flock,
    job_pid,
    meminfo_available,
    neutral_config,
    wait_until,
)

from safegate.exitcodes import ExitCode


def _failing(result: subprocess.CompletedProcess[str]) -> list[str]:
    return [c["name"] for c in json.loads(result.stdout)["checks"] if c["status"] == "fail"]


def test_13_when_the_previous_job_of_the_same_lock_runs(run: Run, config: Path, lock_dir: Path,
                                                         procs: Procs) -> None:
    # The running job's reservation makes memory short for a second job of the same model: the lock is
    # the cause, so 13 (what recipes tell cron users), and --json still lists both failures.
    need = str(int(meminfo_available() * 0.6))
    job = procs.spawn([PY, "-m", "safegate", "exec", "--config", str(config), "--lock", "night", "--mem", need,
                       "--", "sleep", "600"], env=run.env, stderr=subprocess.PIPE)
    wait_until(lambda: job_pid(lock_dir, "night"), what="the first job to start")
    result = run("check", "--config", str(config), "--lock", "night", "--mem", need, "--json")
    assert _failing(result) == ["memory", "lock"], result.stdout
    assert result.returncode == json.loads(result.stdout)["exit_code"] == ExitCode.LOCKED, result.stdout
    memory = next(c for c in json.loads(result.stdout)["checks"] if c["name"] == "memory")
    assert "lock 'night'" in memory["reason"]
    # Memory that would be short even without that job is a memory block: 10 goes first again.
    too_big = str(meminfo_available() * 4)
    result = run("check", "--config", str(config), "--lock", "night", "--mem", too_big)
    assert result.returncode == ExitCode.MEMORY, result.stdout
    assert job.poll() is None
    job.terminate()
    assert job.wait(timeout=TIMEOUT) is not None


def test_slots_is_never_a_silent_0(run: Run, config: Path, lock_dir: Path, procs: Procs) -> None:
    # To xargs -P and parallel -j, 0 means "no limit": when nothing fits, slots prints 0 and exits with the
    # code of what blocks, so `n=$(safegate slots ...) && xargs -P "$n"` starts nothing.
    # The default profile with the whisper lock: the built-in whisper profile's competing rule would see other
    # people's Whisper jobs on a busy machine.
    assert run("slots", "--config", str(config), "--lock", "whisper-large", "--mem", "0").stdout == "1\n"
    hold_with_flock(procs, lock_dir / "whisper-large.lock")
    result = run("slots", "--config", str(config), "--lock", "whisper-large", "--mem", "0")
    assert (result.stdout, result.returncode) == ("0\n", ExitCode.LOCKED), result.stderr
    result = run("slots", "--config", str(config), "--lock", "free-one", "--mem", "1000T")
    assert (result.stdout, result.returncode) == ("0\n", ExitCode.MEMORY), result.stderr
    # --max 0 would be a 0 that means nothing blocks: refused.
    result = run("slots", "--config", str(config), "--max", "0")
    assert result.returncode == ExitCode.USAGE and "--max" in result.stderr


OLD_GATE = """#!/bin/sh
# The shell gate safegate replaces: a pid file and kill -0.
f=$1; shift
if [ -f "$f" ] && kill -0 "$(cat "$f")" 2>/dev/null; then echo "busy: pid $(cat "$f")"; exit 13; fi
echo $$ > "$f"
"$@"
rm -f "$f"
"""


def test_the_old_shell_gate_sees_safegates_job(run: Run, tmp_path: Path, sensor: Path, lock_dir: Path,
                                               procs: Procs) -> None:
    legacy = tmp_path / "j5a_locks" / "whisper_large.lock"
    legacy.parent.mkdir()
    gate = tmp_path / "old-gate.sh"
    gate.write_text(OLD_GATE)
    gate.chmod(0o755)
    cfg = tmp_path / "config.toml"
    cfg.write_text(f'legacy_lock_files = ["{legacy}"]\n' + neutral_config(sensor))
    job = procs.spawn([PY, "-m", "safegate", "exec", "--config", str(cfg), "--lock", "whisper-large", "--mem", "0",
                       "--", "sleep", "600"], env=run.env, stderr=subprocess.PIPE)
    pid = wait_until(lambda: job_pid(lock_dir, "whisper-large"), what="the job to start")
    wait_until(lambda: legacy.exists() and legacy.read_text().strip() == str(pid), what="the job's pid file")
    old = subprocess.run([str(gate), str(legacy), "true"], capture_output=True, text=True, timeout=TIMEOUT)
    assert (old.returncode, old.stdout.strip()) == (13, f"busy: pid {pid}")
    # safegate's own file does not block another lock's jobs: the flock says who holds what.
    assert run("check", "--config", str(cfg), "--lock", "other", "--mem", "0").returncode == 0
    assert run("check", "--config", str(cfg), "--lock", "whisper-large", "--mem", "0").returncode == ExitCode.LOCKED
    job.terminate()
    job.wait(timeout=TIMEOUT)
    assert not legacy.exists()
    old = subprocess.run([str(gate), str(legacy), "true"], capture_output=True, text=True, timeout=TIMEOUT)
    assert old.returncode == 0, old.stdout


def test_locks_and_status_show_a_legacy_pid_as_held(run: Run, tmp_path: Path, sensor: Path, procs: Procs) -> None:
    legacy = tmp_path / "whisper_large.lock"
    sleeper = procs.spawn(["sleep", "600"])
    legacy.write_text(f"{sleeper.pid}\n")
    cfg = tmp_path / "config.toml"
    cfg.write_text(f'legacy_lock_files = ["{legacy}"]\n' + neutral_config(sensor))
    assert run("check", "--config", str(cfg), "--mem", "0").returncode == ExitCode.LOCKED
    data = json.loads(run("locks", "--config", str(cfg), "--json").stdout)
    assert [(d["name"], d["held"], d["legacy_pid"]) for d in data] == [(str(legacy), True, sleeper.pid)]
    text = run("locks", "--config", str(cfg)).stdout
    assert "HELD" in text and f"pid {sleeper.pid}" in text
    status = json.loads(run("status", "--config", str(cfg), "--json").stdout)
    assert any(d["legacy_pid"] == sleeper.pid and d["held"] for d in status["locks"])


# --- fair admission: arrival order per lock, and no starving a big job -----------------------------------------

RECORD = """import os, sys, time
start = time.monotonic()
time.sleep(float(sys.argv[3]))
fd = os.open(sys.argv[1], os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
os.write(fd, f"{sys.argv[2]} {start} {time.monotonic()}\\n".encode())
"""


def _tickets(lock_dir: Path) -> list[Path]:
    return sorted(lock_dir.glob(".ticket.*.json"))


def _spans(path: Path) -> list[tuple[str, float, float]]:
    rows = [line.split() for line in path.read_text().splitlines()] if path.exists() else []
    return [(r[0], float(r[1]), float(r[2])) for r in rows]


def test_waiters_through_sh_c_are_served_in_arrival_order(run: Run, config: Path, lock_dir: Path, tmp_path: Path,
                                                          procs: Procs) -> None:
    record = tmp_path / "record.py"
    record.write_text(RECORD)
    spans = tmp_path / "spans"
    holder = hold_with_flock(procs, lock_dir / "night.lock")  # every waiter arrives while the lock is taken
    shells = []
    for i in range(8):
        line = (f"{PY} -m safegate exec --config {config} --lock night --mem 0 --wait -q -- "
                f"{PY} {record} {spans} {i} 0.2; echo $? >> {tmp_path / 'rcs'}")
        shells.append(procs.spawn(["sh", "-c", line], env=run.env))
        wait_until(lambda n=i + 1: len(_tickets(lock_dir)) == n, what=f"waiter {i} to take its ticket")
    queue = json.loads(run("queue", "--config", str(config), "--json").stdout)
    assert [w["position"] for w in queue] == list(range(1, 9)) and {w["lock"] for w in queue} == {"night"}
    assert all(w["blocked_by"] in ("", "lock") for w in queue), queue
    os.killpg(holder.pid, signal.SIGKILL)  # flock(1) and the sleep that inherited its lock
    assert [s.wait(timeout=TIMEOUT * 2) for s in shells] == [0] * 8
    ran = _spans(spans)
    assert [r[0] for r in sorted(ran, key=lambda r: r[1])] == [str(i) for i in range(8)]
    ordered = sorted(ran, key=lambda r: r[1])
    assert all(b[1] >= a[2] for a, b in itertools.pairwise(ordered)), ordered
    assert _tickets(lock_dir) == []


def test_a_big_waiter_is_not_starved_by_streams_of_small_jobs(run: Run, tmp_path: Path, sensor: Path,
                                                               lock_dir: Path, procs: Procs) -> None:
    # Seven streams keep lock-less small jobs (a fifth of MemAvailable each, reserved while they run) going,
    # five at a time; a big job (70%) fits only when at most one runs. Arriving, it waits for memory; later
    # small arrivals must then hold back, so it starts once the small jobs ahead of it finish.
    avail = meminfo_available()
    small, big = avail // 5, int(avail * 0.7)
    cfg = tmp_path / "config.toml"
    cfg.write_text(neutral_config(sensor, f'[profiles.small]\nmemory = "{small}"\nlock = false\ninterval = 0.5\n'
                                          f'[profiles.big]\nmemory = "{big}"\nlock = false\n'))
    record = tmp_path / "record.py"
    record.write_text(RECORD)
    spans, stop = tmp_path / "spans", tmp_path / "stop"
    stream = (f'while [ ! -e {stop} ]; do {PY} -m safegate exec --config {cfg} -p small --wait -q -- '
              f'{PY} {record} {spans} small 2; done')
    for _ in range(7):
        procs.spawn(["sh", "-c", stream], env=run.env)
    wait_until(lambda: len(_spans(spans)) >= 5, what="the small jobs to run")
    arrived = time.monotonic()
    big_job = procs.spawn([PY, "-m", "safegate", "exec", "--config", str(cfg), "-p", "big", "--wait", "-q", "--",
                           PY, str(record), str(spans), "big", "0.1"], env=run.env)
    # It arrives when its ticket is taken, after its own start-up: small jobs admitted meanwhile were ahead of it.
    ticket = wait_until(lambda: next((t for t in _tickets(lock_dir) if t.name.startswith(f".ticket.{big_job.pid}.")),
                                     None) or big_job.poll() is not None, what="the big job's ticket")
    if isinstance(ticket, Path):
        with contextlib.suppress(FileNotFoundError):  # its place in line: the kernel's time on the file
            arrived = ticket.stat().st_ctime_ns / 1e9 - (time.time() - time.monotonic())
    assert big_job.wait(timeout=TIMEOUT) == 0
    stop.touch()
    ran = _spans(spans)
    started = next(r for r in ran if r[0] == "big")
    # Only waiters already in line when it arrived (one per stream at most) may start before it.
    ahead = [r for r in ran if r[0] == "small" and arrived < r[1] < started[1]]
    assert len(ahead) <= 7, ahead


# --- waiting says what it waits for, how long, and when it gave up ---------------------------------------------


def test_timeout_says_timed_out_with_the_blocking_code(run: Run, config: Path, lock_dir: Path, procs: Procs) -> None:
    hold_with_flock(procs, lock_dir / "heavy.lock")
    for command in (["check"], ["exec"]):
        args = [*command, "--config", str(config), "--mem", "0", "--wait", "--timeout", "1s"]
        result = run(*args, *(["--", "true"] if command == ["exec"] else []))
        assert result.returncode == ExitCode.LOCKED, result.stderr
        lines = result.stderr.splitlines()
        assert lines[0].startswith("safegate: waiting: lock:"), result.stderr
        assert "safegate: timed out after 1s, still blocked (exit 13)" in lines, result.stderr
    # Not waiting, or passing: no such line.
    assert "timed out" not in run("check", "--config", str(config), "--mem", "0").stderr


def test_waiting_on_a_terminal_is_one_live_line(config: Path, lock_dir: Path, procs: Procs,
                                               env: dict[str, str]) -> None:
    hold_with_flock(procs, lock_dir / "heavy.lock")
    primary, secondary = os.openpty()
    try:
        proc = subprocess.Popen([PY, "-m", "safegate", "check", "--config", str(config), "--mem", "0", "--wait",
                                 "--timeout", "3s", "-q"], env={**env, "TERM": "xterm"}, stdin=subprocess.DEVNULL,
                                stdout=subprocess.DEVNULL, stderr=secondary)
        os.close(secondary)
        secondary = -1
        out = b""
        while True:
            try:
                chunk = os.read(primary, 4096)
            except OSError:  # EIO: the child closed the terminal
                break
            if not chunk:
                break
            out += chunk
        assert proc.wait(timeout=TIMEOUT) == ExitCode.LOCKED
    finally:
        os.close(primary)
        if secondary >= 0:
            os.close(secondary)
    text = out.decode()
    # -q silences the waiting line, but not the end of the wait.
    assert "timed out after 3s" in text and "waiting" not in text, text
    out = b""
    primary, secondary = os.openpty()
    proc = subprocess.Popen([PY, "-m", "safegate", "check", "--config", str(config), "--mem", "0", "--wait",
                             "--timeout", "3s"], env={**env, "TERM": "xterm"}, stdin=subprocess.DEVNULL,
                            stdout=subprocess.DEVNULL, stderr=secondary)
    os.close(secondary)
    try:
        while True:
            try:
                chunk = os.read(primary, 4096)
            except OSError:
                break
            if not chunk:
                break
            out += chunk
    finally:
        os.close(primary)
    assert proc.wait(timeout=TIMEOUT) == ExitCode.LOCKED
    text = out.decode()
    updates = text.split("\r\x1b[K")[1:]
    # Rewritten in place: several updates of one line, each with the time waited, then the end on a new line.
    assert len(updates) >= 2 and all(u.startswith("safegate: waiting ") and "lock 'heavy'" in u for u in updates)
    assert text.count("\n") <= 3 and "timed out after 3s" in text, text


def test_off_a_terminal_an_unchanged_reason_is_said_once_a_minute(capsys: pytest.CaptureFixture[str]) -> None:
    from safegate.cli.plain import Progress
    from safegate.gate.results import CheckResult, Status, Verdict

    now = [0.0]
    shown = Progress(silent=False, clock=lambda: now[0], live=False)

    def blocked(reason: str) -> Verdict:
        return Verdict("p", (CheckResult("lock", Status.FAIL, reason, ExitCode.LOCKED),))

    for t, reason in ((0, "held"), (5, "held"), (30, "held"), (61, "held"), (62, "in line"), (70, "in line")):
        now[0] = t
        shown(blocked(reason))
    lines = capsys.readouterr().err.splitlines()
    assert lines == ["safegate: waiting: lock: held", "safegate: waiting: lock: held (waited 1m01s)",
                     "safegate: waiting: lock: in line (waited 1m02s)"]


def test_task_spooler_with_four_slots_runs_the_jobs_one_at_a_time(run: Run, config: Path, tmp_path: Path,
                                                                  lock_dir: Path) -> None:
    # The recipe: `tsp -S 4` and each job queued as `tsp safegate exec --wait ...`. The queue starts four at
    # once; safegate lets them run one at a time.
    if shutil.which("tsp") is None:
        pytest.skip("task-spooler (tsp) is not installed: apt-get install task-spooler")
    record = tmp_path / "record.py"
    record.write_text(RECORD)
    spans = tmp_path / "spans"
    env = {**run.env, "TS_SOCKET": str(tmp_path / "tsp.socket"), "TMPDIR": str(tmp_path)}
    try:
        subprocess.run(["tsp", "-S", "4"], env=env, check=True, timeout=TIMEOUT)
        ids = [subprocess.run(["tsp", PY, "-m", "safegate", "exec", "--config", str(config), "--lock", "night",
                               "--mem", "0", "--wait", "-q", "--", PY, str(record), str(spans), str(i), "0.3"],
                              env=env, capture_output=True, text=True, check=True, timeout=TIMEOUT).stdout.strip()
               for i in range(4)]
        codes = [subprocess.run(["tsp", "-w", job], env=env, timeout=TIMEOUT * 2).returncode for job in ids]
    finally:
        subprocess.run(["tsp", "-K"], env=env, capture_output=True, timeout=TIMEOUT)
    assert codes == [0, 0, 0, 0]
    ordered = sorted(_spans(spans), key=lambda r: r[1])
    assert len(ordered) == 4 and all(b[1] >= a[2] for a, b in itertools.pairwise(ordered)), ordered
    assert _tickets(lock_dir) == []
