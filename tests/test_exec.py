"""safegate exec against real jobs: hogs, signal traps, double-forking trees, concurrent starts."""

from __future__ import annotations

import itertools
import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
from support import (
    HELPERS,
    PY,
    TIMEOUT,
    OpenWatch,
    Procs,
    Run,
    alive,
    holder_files,
    job_pid,
    lock_free,
    meminfo_available,
    neutral_config,
    proc_state,
    set_temp,
    wait_until,
)

from safegate.exitcodes import ExitCode


def exec_cmd(config: Path, *args: str) -> list[str]:
    return [PY, "-m", "safegate", "exec", "--config", str(config), "--mem", "0", *args]


NEED_SHARE = 0.7


def run_exec(run: Run, config: Path, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return run("exec", "--config", str(config), "--mem", "0", *args, timeout=timeout)


# --- exit status -------------------------------------------------------------------------------------


def test_exit_status_passes_through(run: Run, config: Path, lock_dir: Path) -> None:
    for code in (0, 1, 2, 42, 255):
        result = run_exec(run, config, "-q", "--", "sh", "-c", f"exit {code}")
        assert result.returncode == code, result.stderr
    assert lock_free(lock_dir / "heavy.lock")
    assert not holder_files(lock_dir)


def test_job_killed_by_a_signal_is_128_plus_n(run: Run, config: Path) -> None:
    assert run_exec(run, config, "-q", "--", "sh", "-c", "kill -TERM $$").returncode == 128 + signal.SIGTERM
    assert run_exec(run, config, "-q", "--", "sh", "-c", "kill -USR1 $$").returncode == 128 + signal.SIGUSR1


def test_job_killed_by_another_process(run: Run, config: Path, lock_dir: Path, procs: Procs) -> None:
    gate = procs.spawn(exec_cmd(config, "--", "sleep", "600"), env=run.env, stderr=subprocess.PIPE)
    pid = wait_until(lambda: job_pid(lock_dir), what="the job to start")
    os.kill(pid, signal.SIGKILL)
    assert gate.wait(timeout=TIMEOUT) == 128 + signal.SIGKILL


def test_command_not_found_and_not_executable(run: Run, config: Path, tmp_path: Path, lock_dir: Path) -> None:
    result = run_exec(run, config, "--", "no-such-command-here")
    assert result.returncode == ExitCode.NOT_FOUND and "command not found: no-such-command-here" in result.stderr
    script = tmp_path / "script.sh"
    script.write_text("#!/bin/sh\necho hi\n")
    script.chmod(0o644)
    result = run_exec(run, config, "--", str(script))
    assert result.returncode == ExitCode.NOT_EXECUTABLE and "not executable" in result.stderr
    assert lock_free(lock_dir / "heavy.lock") and not holder_files(lock_dir)
    assert "Traceback" not in result.stderr


# --- memory ------------------------------------------------------------------------------------------


def test_hog_over_max_mem_is_stopped_with_20(run: Run, config: Path, lock_dir: Path) -> None:
    result = run_exec(run, config, "--max-mem", "300M", "--grace", "5s", "--", PY, str(HELPERS / "hog.py"),
                      "2000", "16", "0.01")
    assert result.returncode == ExitCode.KILLED_MEMORY, result.stderr
    assert ">= --max-mem 300.0 MiB; sending SIGTERM" in result.stderr
    summary = [line for line in result.stderr.splitlines() if line.startswith("safegate: summary:")]
    assert len(summary) == 1 and "peak job memory" in summary[0] and "exit reason memory" in summary[0]
    peak = summary[0].split("peak job memory ")[1].split(",")[0]
    assert peak.endswith("MiB") and 300 <= float(peak.split()[0]) < 600
    assert lock_free(lock_dir / "heavy.lock")


def test_system_floor_stops_the_hog(run: Run, config: Path) -> None:
    # The hog itself takes MemAvailable 256 MiB below the floor, whatever other processes do meanwhile
    # (up to 6 GiB): only safegate can stop it.
    floor = meminfo_available() - 300 * 1024**2
    result = run_exec(run, config, "--min-available", str(floor), "--grace", "5s", "--", PY,
                      str(HELPERS / "hog.py"), "6000", "16", "0.01", f"until-available={floor - 256 * 1024**2}")
    assert result.returncode == ExitCode.KILLED_MEMORY, result.stderr
    assert "<= --min-available" in result.stderr


def test_job_ignoring_sigterm_is_killed_after_grace(run: Run, config: Path) -> None:
    started = time.monotonic()
    result = run_exec(run, config, "--max-mem", "100M", "--grace", "1s", "--", PY, str(HELPERS / "hog.py"),
                      "300", "16", "0.01", "ignore-term")
    assert result.returncode == ExitCode.KILLED_MEMORY
    assert "still running after 1s; sending SIGKILL" in result.stderr
    assert "killed by SIGKILL" in result.stderr
    assert time.monotonic() - started >= 1.0


def test_warn_signal_at_90_percent(run: Run, config: Path, tmp_path: Path) -> None:
    marker = tmp_path / "usr1"
    result = run_exec(run, config, "--max-mem", "400M", "--warn-signal", "USR1", "--", PY, str(HELPERS / "hog.py"),
                      "376", "8", "0.01", f"usr1-exit={marker}")
    assert result.returncode == 0, result.stderr
    assert marker.read_text() == "usr1\n"
    assert "sending SIGUSR1 to the job" in result.stderr


# --- signals and process trees -----------------------------------------------------------------------


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGUSR1])
def test_signals_to_safegate_reach_the_job(run: Run, config: Path, tmp_path: Path, procs: Procs,
                                           signum: int) -> None:
    got = tmp_path / "got"
    gate = procs.spawn(exec_cmd(config, "--", PY, str(HELPERS / "trap.py"), str(got)), env=run.env,
                       stderr=subprocess.PIPE)
    wait_until(lambda: got.exists() and "ready" in got.read_text(), what="the job's handlers")
    os.kill(gate.pid, signum)
    name = signal.Signals(signum).name
    wait_until(lambda: name in got.read_text(), what=f"{name} to reach the job")
    if signum in (signal.SIGTERM, signal.SIGINT):
        assert gate.wait(timeout=TIMEOUT) == 0  # the job handled it and exited 0: its own status
    else:
        os.kill(gate.pid, signal.SIGTERM)
        assert gate.wait(timeout=TIMEOUT) == 0


def test_forwarded_sigterm_to_plain_job_is_143(run: Run, config: Path, lock_dir: Path, procs: Procs) -> None:
    gate = procs.spawn(exec_cmd(config, "--", "sleep", "600"), env=run.env, stderr=subprocess.PIPE)
    wait_until(lambda: job_pid(lock_dir), what="the job to start")
    os.kill(gate.pid, signal.SIGTERM)
    assert gate.wait(timeout=TIMEOUT) == 128 + signal.SIGTERM


TREE = """
setsid sleep 600 &
echo $! >> "$1"
( sleep 600 & echo $! >> "$1" ) &
( setsid sh -c 'sleep 600 & echo $! >> "$1"; wait' sh "$1" & )
sleep 600 &
echo $! >> "$1"
wait
"""


def test_double_forked_and_setsid_descendants_are_stopped(run: Run, config: Path, tmp_path: Path,
                                                          procs: Procs) -> None:
    pids_file = tmp_path / "pids"
    gate = procs.spawn(exec_cmd(config, "--grace", "2s", "--", "sh", "-c", TREE, "sh", str(pids_file)),
                       env=run.env, stderr=subprocess.PIPE)
    pids = wait_until(lambda: pids_file.exists() and len(pids_file.read_text().split()) == 4
                      and [int(p) for p in pids_file.read_text().split()], what="the tree")
    assert all(alive(p) for p in pids)
    os.kill(gate.pid, signal.SIGTERM)
    assert gate.wait(timeout=TIMEOUT) == 128 + signal.SIGTERM
    assert not [p for p in pids if alive(p) or Path(f"/proc/{p}").exists()]


def test_leftovers_of_an_exited_job_are_stopped(run: Run, config: Path, tmp_path: Path) -> None:
    pids_file = tmp_path / "pids"
    script = 'setsid sleep 600 & echo $! >> "$1"; ( sleep 600 & echo $! >> "$1" ) & wait $!; exit 7'
    result = run_exec(run, config, "--grace", "2s", "--", "sh", "-c", script, "sh", str(pids_file))
    assert result.returncode == 7
    pids = [int(p) for p in pids_file.read_text().split()]
    assert len(pids) == 2 and not [p for p in pids if Path(f"/proc/{p}").exists()]
    assert "stopping" in result.stderr and "leftover" in result.stderr


def test_safegate_killed_lock_lives_with_the_job(run: Run, config: Path, lock_dir: Path, tmp_path: Path,
                                                 procs: Procs) -> None:
    got = tmp_path / "got"
    gate = procs.spawn(exec_cmd(config, "--", PY, str(HELPERS / "trap.py"), str(got), "1.5"), env=run.env,
                       stderr=subprocess.PIPE)
    wait_until(lambda: got.exists() and "ready" in got.read_text(), what="the job's handlers")
    job = job_pid(lock_dir)
    assert job is not None
    procs.orphans.append(job)  # in its own process group: cleanup must name it
    os.kill(gate.pid, signal.SIGKILL)
    gate.wait(timeout=TIMEOUT)
    # The job got SIGTERM from the kernel (parent-death signal) and lingers 1.5 s: the lock stays held.
    wait_until(lambda: got.exists() and "SIGTERM" in got.read_text(), what="the parent-death SIGTERM")
    assert alive(job)
    assert not lock_free(lock_dir / "heavy.lock")
    result = run("check", "--config", str(config), "--mem", "0", "--json")
    assert result.returncode == ExitCode.LOCKED
    lock = next(c for c in json.loads(result.stdout)["checks"] if c["name"] == "lock")
    assert f"job pid {job}" in lock["reason"]
    wait_until(lambda: not alive(job), what="the job to exit")
    wait_until(lambda: lock_free(lock_dir / "heavy.lock"), what="the lock to be free")
    assert run("check", "--config", str(config), "--mem", "0", "-q", "--no-grant").returncode == 0
    assert not holder_files(lock_dir)  # the stale metadata was cleaned up


# --- admission ---------------------------------------------------------------------------------------


def test_incident_replay_four_at_once_never_overlap(run: Run, tmp_path: Path, sensor: Path,
                                                    procs: Procs) -> None:
    # The built-in profile's lock; its competing rule left out, so Whisper jobs of others on this machine
    # (which that rule would rightly wait for) do not enter a test of the lock.
    config = tmp_path / "whisper.toml"
    config.write_text(neutral_config(sensor, "[profiles.whisper-large-v3]\ncompeting = []\n"))
    spans = tmp_path / "spans"
    cmd = exec_cmd(config, "-p", "whisper-large-v3", "--wait", "-q", "--", PY, str(HELPERS / "record.py"),
                   str(spans), "0.3")
    gates = [procs.spawn(cmd, env=run.env, stderr=subprocess.PIPE) for _ in range(4)]
    codes = [g.wait(timeout=TIMEOUT) for g in gates]
    assert codes == [0, 0, 0, 0], [g.stderr.read() for g in gates if g.stderr]
    intervals = sorted(tuple(map(float, line.split())) for line in spans.read_text().splitlines())
    assert len(intervals) == 4
    for (_, end), (start, _) in itertools.pairwise(intervals):
        assert start >= end, intervals


def test_admission_reserves_memory_of_a_job_still_loading(run: Run, tmp_path: Path, sensor: Path,
                                                          procs: Procs) -> None:
    # Two profiles with their own locks whose needs together exceed MemAvailable: the first job has not
    # allocated anything yet (it is "loading"), so only its reservation stands between them. At 70% of
    # MemAvailable each, the outcome holds while other processes take up to 30% of it or free up to 40% more.
    need = int(meminfo_available() * NEED_SHARE)
    cfg = tmp_path / "two.toml"
    cfg.write_text(neutral_config(sensor) + f'[profiles.a]\nmemory = "{need}"\nlock = "a"\n'
                   f'[profiles.b]\nmemory = "{need}"\nlock = "b"\n')
    first = procs.spawn([PY, "-m", "safegate", "exec", "--config", str(cfg), "-p", "a", "--", "sleep", "600"],
                        env=run.env, stderr=subprocess.PIPE)
    lock_dir = Path(run.env["SAFEGATE_LOCK_DIR"])
    wait_until(lambda: job_pid(lock_dir, "a"), what="the first job")
    blocked = run("exec", "--config", str(cfg), "-p", "b", "--", "true")
    assert blocked.returncode == ExitCode.MEMORY, blocked.stderr
    assert "reserved" in blocked.stderr and "not started" in blocked.stderr
    waiter = procs.spawn([PY, "-m", "safegate", "exec", "--config", str(cfg), "-p", "b", "--wait", "--", "true"],
                         env=run.env, stderr=subprocess.PIPE)
    assert waiter.stderr is not None
    # The waiter has evaluated the machine and decided to wait on memory (had it ignored the reservation,
    # it would have started its job and exited instead).
    line = waiter.stderr.readline().decode()
    assert line.startswith("safegate: waiting: memory:") and "reserved" in line, line
    assert waiter.poll() is None
    os.kill(first.pid, signal.SIGTERM)
    assert first.wait(timeout=TIMEOUT) == 128 + signal.SIGTERM
    assert waiter.wait(timeout=TIMEOUT) == 0


def test_admission_two_started_together_exactly_one_runs(run: Run, tmp_path: Path, sensor: Path,
                                                         procs: Procs) -> None:
    # Started in the same instant, both see enough memory for themselves; the admission lock makes the
    # second one see the first one's reservation.
    need = int(meminfo_available() * NEED_SHARE)
    cfg = tmp_path / "two.toml"
    cfg.write_text(neutral_config(sensor) + f'[profiles.a]\nmemory = "{need}"\nlock = "a"\n'
                   f'[profiles.b]\nmemory = "{need}"\nlock = "b"\n')
    for _ in range(4):
        # The jobs run until the test stops them, so the outcome cannot depend on how fast the second
        # safegate gets to admission: the loser is refused while the winner's job still runs.
        gates = [procs.spawn([PY, "-m", "safegate", "exec", "--config", str(cfg), "-p", name, "-q", "--",
                              "sleep", "600"], env=run.env, stderr=subprocess.PIPE) for name in ("a", "b")]
        loser = wait_until(lambda gates=gates: next((g for g in gates if g.poll() is not None), None),
                           what="one refusal")
        winner = next(g for g in gates if g is not loser)
        assert loser.returncode == ExitCode.MEMORY, [g.stderr.read() for g in gates if g.stderr]
        assert winner.poll() is None
        os.kill(winner.pid, signal.SIGTERM)
        assert winner.wait(timeout=TIMEOUT) == 128 + signal.SIGTERM


def test_profile_keys_carry_exec_limits(run: Run, tmp_path: Path, sensor: Path) -> None:
    cfg = tmp_path / "limits.toml"
    cfg.write_text(neutral_config(sensor) + '[profiles.small]\nmax_mem = "150M"\ngrace = "1s"\n')
    result = run("exec", "--config", str(cfg), "-p", "small", "--", PY, str(HELPERS / "hog.py"), "400", "16", "0.01")
    assert result.returncode == ExitCode.KILLED_MEMORY and ">= --max-mem 150.0 MiB" in result.stderr


def test_preflight_block_starts_nothing(run: Run, config: Path, tmp_path: Path, sensor: Path) -> None:
    set_temp(sensor, 90)
    marker = tmp_path / "ran"
    result = run_exec(run, config, "--", "touch", str(marker))
    assert result.returncode == ExitCode.THERMAL and not marker.exists()
    assert "not started" in result.stderr


def test_profile_chosen_by_match(run: Run, tmp_path: Path, sensor: Path) -> None:
    cfg = tmp_path / "m.toml"
    cfg.write_text(neutral_config(sensor) + '[profiles.whisper-large-v3]\nmemory = "0"\ncompeting = []\n')
    result = run("exec", "--config", str(cfg), "--", "sh", "-c", "exit 0", "whisper", "--model", "large-v3")
    assert result.returncode == 0 and "(profile whisper-large-v3, lock whisper-large)" in result.stderr
    result = run("exec", "--config", str(cfg), "--", "true")
    assert "(profile default, lock heavy)" in result.stderr


# --- temperature -------------------------------------------------------------------------------------


def test_thermal_pause_and_resume(run: Run, config: Path, sensor: Path, tmp_path: Path, lock_dir: Path,
                                  procs: Procs) -> None:
    ticks, stop = tmp_path / "ticks", tmp_path / "stop"
    gate = procs.spawn(exec_cmd(config, "--", PY, str(HELPERS / "ticker.py"), str(ticks), "1000000", str(stop)),
                       env=run.env, stderr=subprocess.PIPE)
    pid = wait_until(lambda: job_pid(lock_dir), what="the job to start")
    wait_until(ticks.exists, what="the first tick")
    set_temp(sensor, 85)
    wait_until(lambda: proc_state(pid) == "T", what="the job to be paused")
    frozen = ticks.read_text()
    set_temp(sensor, 77)  # below max_temp, not below resume_temp 75: stays paused
    with OpenWatch(sensor) as reads:
        # The second read of 77 C comes after safegate acted on the first one.
        reads.wait_for(2, "safegate to read 77 C twice")
    assert proc_state(pid) == "T" and ticks.read_text() == frozen
    set_temp(sensor, 70)
    wait_until(lambda: ticks.read_text() != frozen, what="the job to tick again")
    stop.touch()  # the job ends on its own: exit 0
    assert gate.wait(timeout=TIMEOUT) == 0
    assert gate.stderr is not None
    err = gate.stderr.read().decode()
    assert "pausing the job" in err and "resuming the job" in err and "highest temperature 85 C" in err


def test_on_hot_kill_is_22(run: Run, config: Path, sensor: Path, lock_dir: Path, procs: Procs) -> None:
    gate = procs.spawn(exec_cmd(config, "--on-hot", "kill", "--", "sleep", "600"), env=run.env,
                       stderr=subprocess.PIPE)
    wait_until(lambda: job_pid(lock_dir), what="the job to start")
    set_temp(sensor, 85)
    assert gate.wait(timeout=TIMEOUT) == ExitCode.KILLED_HOT


# --- telling what happened ---------------------------------------------------------------------------


def test_log_file_gets_json_lines(run: Run, config: Path, tmp_path: Path) -> None:
    log = tmp_path / "events.jsonl"
    assert run_exec(run, config, "--log", str(log), "--", "sh", "-c", "exit 3").returncode == 3
    events = [json.loads(line) for line in log.read_text().splitlines()]
    kinds = [e["event"] for e in events]
    assert kinds[0] == "admitted" and kinds[-2:] == ["exit", "summary"]
    assert all("time" in e and "message" in e for e in events)
    assert events[-1]["exit_code"] == 3


def test_unwritable_log_does_not_fail_the_job(run: Run, config: Path, tmp_path: Path) -> None:
    result = run_exec(run, config, "--log", str(tmp_path), "--", "sh", "-c", "exit 0")  # a directory
    assert result.returncode == 0
    assert result.stderr.count("cannot write --log") == 1


def test_arguments_reach_the_job_byte_for_byte(run: Run, config: Path, tmp_path: Path) -> None:
    out = tmp_path / "argv"
    args = ["a b", "naïve ✓", "line1\nline2", "--max-mem", "-q", "", "$HOME"]
    code = "import sys, json; open(sys.argv[1], 'w').write(json.dumps(sys.argv[2:]))"
    result = run_exec(run, config, "-q", "--", PY, "-c", code, str(out), *args)
    assert result.returncode == 0, result.stderr
    assert json.loads(out.read_text()) == args


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ([], "no command given"),
        (["--max-mem", "abc", "--", "true"], "--max-mem: invalid size 'abc'"),
        (["--grace", "-1", "--", "true"], "--grace: invalid duration '-1'"),
        (["--on-hot", "melt", "--", "true"], "--on-hot: invalid --on-hot value 'melt'"),
        (["--warn-signal", "SIGNOPE", "--", "true"], "--warn-signal: invalid signal 'SIGNOPE'"),
        (["--nice", "40", "--", "true"], "--nice: invalid nice value '40'"),
        (["--interval", "5s", "--", "true"], "--interval: '5s' is outside 1ms..1s"),
    ],
)
def test_exec_bad_input(run: Run, config: Path, args: list[str], message: str) -> None:
    result = run("exec", "--config", str(config), *args)
    assert result.returncode == ExitCode.USAGE
    assert message in result.stderr and len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert "Traceback" not in result.stderr


def test_nice(run: Run, config: Path, tmp_path: Path) -> None:
    out = tmp_path / "nice"
    result = run_exec(run, config, "--nice", "7", "--", PY, "-c",
                      f"import os; open({str(out)!r}, 'w').write(str(os.nice(0)))")
    assert result.returncode == 0 and out.read_text() == "7"
