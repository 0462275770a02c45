"""safegate exec in a real terminal (issue 12, items 7 and 8): the job gets the foreground, Ctrl-C and Ctrl-Z
reach it, and the terminal comes back to the shell, as when the job runs without safegate."""

from __future__ import annotations

import os
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from support import HELPERS, PY, TIMEOUT, OpenWatch, Procs, Pty, job_pid, proc_state, set_temp, wait_until

SAFEGATE = [PY, "-m", "safegate", "exec", "-q", "--mem", "0"]


@pytest.fixture
def terminals(procs: Procs) -> Iterator[list[Pty]]:
    opened: list[Pty] = []
    yield opened
    for pty in opened:
        pty.close()


def _pty(procs: Procs, terminals: list[Pty], argv: list[str], env: dict[str, str]) -> Pty:
    pty = Pty(procs, argv, env)
    terminals.append(pty)
    return pty


def test_a_job_reading_the_terminal_gets_its_input(config: Path, env: dict[str, str], procs: Procs,
                                                   terminals: list[Pty]) -> None:
    pty = _pty(procs, terminals, [*SAFEGATE, "--config", str(config), "--", PY, "-c",
                                  "print('ready', flush=True); print('got', input())"], env)
    pty.expect("ready")
    pty.send("hello\n")  # without the foreground, the job's read would stop it with SIGTTIN, for ever
    pty.expect("got hello")
    assert pty.wait() == 0


INT_JOB = ("import signal, sys, time\n"
           "signal.signal(signal.SIGINT, lambda *a: (print('job got SIGINT', flush=True), sys.exit(7)))\n"
           "print('ready', flush=True)\n"
           "while True: time.sleep(1)\n")


def test_ctrl_c_reaches_the_job(config: Path, env: dict[str, str], procs: Procs, terminals: list[Pty]) -> None:
    pty = _pty(procs, terminals, [*SAFEGATE, "--config", str(config), "--", PY, "-c", INT_JOB], env)
    pty.expect("ready")
    pty.send("\x03")
    pty.expect("job got SIGINT")
    assert pty.wait() == 7


@pytest.mark.parametrize("shell", ["bash", "dash"])
def test_an_interactive_shell_as_the_job(config: Path, env: dict[str, str], procs: Procs, terminals: list[Pty],
                                         shell: str) -> None:
    argv = ["bash", "--norc", "--noprofile", "-i"] if shell == "bash" else ["dash", "-i"]
    if subprocess.run(["sh", "-c", f"command -v {shell}"], capture_output=True).returncode:
        pytest.skip(f"{shell} is not installed")
    pty = _pty(procs, terminals, [*SAFEGATE, "--config", str(config), "--", *argv], env | {"PS1": "PROMPT> "})
    pty.expect("PROMPT> ")
    pty.send("echo answer=$((6*7))\n")
    pty.expect("answer=42")
    pty.send("exit 5\n")
    assert pty.wait() == 5


def test_the_terminal_comes_back_to_the_callers_group(config: Path, env: dict[str, str], procs: Procs,
                                                      terminals: list[Pty]) -> None:
    # A script in the terminal runs safegate, then reads the terminal itself: it must be in the foreground again.
    check = "import os; print('foreground' if os.tcgetpgrp(0) == os.getpgrp() else 'background', flush=True)"
    script = '"$@"; echo "job=$?"; "$0" -c "$1"; read line; echo "read $line"'
    pty = _pty(procs, terminals, ["sh", "-c", f'{script}'.replace('"$0" -c "$1"', f'{PY} -c "{check}"'), "sh",
                                  *SAFEGATE, "--config", str(config), "--", "sh", "-c", "exit 3"], env)
    pty.expect("job=3")
    pty.expect("foreground")
    pty.send("typed\n")
    pty.expect("read typed")
    assert pty.wait() == 0


# --- item 8: job control ----------------------------------------------------------------------------------------

def _stopped(pid: int) -> bool:
    return proc_state(pid) in ("T", "t")


def test_ctrl_z_stops_the_job_and_fg_continues_it(config: Path, env: dict[str, str], lock_dir: Path, procs: Procs,
                                                  terminals: list[Pty], tmp_path: Path) -> None:
    bash = ["bash", "--norc", "--noprofile", "-i"]
    pty = _pty(procs, terminals, bash, env | {"PS1": "PROMPT> "})
    pty.expect("PROMPT> ")
    ticker = tmp_path / "ticker.py"
    ticker.write_text("import time\nfor i in range(100000):\n    print('tick', i, flush=True); time.sleep(0.05)\n")
    pty.send(f"{' '.join(SAFEGATE)} --config {config} -- {PY} {ticker}\n")
    pty.expect("tick 1")
    job = wait_until(lambda: job_pid(lock_dir), what="the job")
    gate = wait_until(lambda: int(Path(f"/proc/{job}/stat").read_text().rsplit(")", 1)[1].split()[1]), what="gate")
    pty.send("\x1a")  # Ctrl-Z
    pty.expect("PROMPT> ", "the shell's prompt after Ctrl-Z")  # the shell saw its job stop
    wait_until(lambda: _stopped(job) and _stopped(gate), what="the job and safegate stopped")
    pty.send("fg\n")
    wait_until(lambda: not _stopped(job) and not _stopped(gate), what="both running again")
    pty.expect("tick")  # the job runs again, in the foreground: Ctrl-C reaches it
    pty.send("\x03")
    pty.expect("PROMPT> ")
    pty.send("echo status=$?\n")
    pty.expect("status=130")
    pty.send("exit\n")
    pty.wait()


def test_tstp_from_outside_stops_both_and_cont_continues_both(config: Path, env: dict[str, str], lock_dir: Path,
                                                             procs: Procs) -> None:
    gate = procs.spawn([*SAFEGATE, "--config", str(config), "--", "sleep", "600"], env=env)
    job = wait_until(lambda: job_pid(lock_dir), what="the job")
    os.kill(gate.pid, signal.SIGTSTP)
    wait_until(lambda: _stopped(job) and _stopped(gate.pid), what="the job, then safegate, stopped")
    os.kill(gate.pid, signal.SIGCONT)
    wait_until(lambda: not _stopped(job) and not _stopped(gate.pid), what="both continued")
    os.kill(gate.pid, signal.SIGTERM)
    assert gate.wait(timeout=TIMEOUT) == 128 + signal.SIGTERM


LOGGER = str(HELPERS / "sig_logger.py")


def _lines(path: Path) -> list[str]:
    return path.read_text().split() if path.exists() else []


@pytest.mark.parametrize("stop", ["TSTP", "TTIN", "TTOU"])
def test_a_job_that_catches_a_stop_sent_to_safegate_runs_on_and_safegate_with_it(
        config: Path, env: dict[str, str], sensor: Path, procs: Procs, tmp_path: Path, stop: str) -> None:
    # The job catches the stop (to ignore it, or save its state first) and runs on: safegate must not stop, or the
    # job would run unwatched.
    log = tmp_path / "log"
    gate = procs.spawn([*SAFEGATE, "--config", str(config), "--", PY, LOGGER, str(log), f"{stop},TERM", "exit=TERM"],
                       env=env)
    wait_until(lambda: _lines(log) == ["ready"], what="the job's handlers")
    os.kill(gate.pid, getattr(signal, f"SIG{stop}"))
    wait_until(lambda: stop in _lines(log), what=f"the job to log SIG{stop}")  # safegate has acted on it by now
    with OpenWatch(sensor) as reads:
        wait_until(lambda: reads.opens() >= 2 or _stopped(gate.pid), what="safegate to sample twice, or to stop")
    assert not _stopped(gate.pid)
    os.kill(gate.pid, signal.SIGTERM)
    assert gate.wait(timeout=TIMEOUT) == 0


def test_a_job_that_stops_itself_after_catching_tstp_stops_safegate_too(config: Path, env: dict[str, str],
                                                                        lock_dir: Path, procs: Procs,
                                                                        tmp_path: Path) -> None:
    # As vim does: the job's handler saves its state, then stops with SIGSTOP; safegate stops once it has.
    log = tmp_path / "log"
    gate = procs.spawn([*SAFEGATE, "--config", str(config), "--", PY, LOGGER, str(log), "TSTP,TERM", "stop-on=TSTP",
                        "exit=TERM"], env=env)
    job = wait_until(lambda: job_pid(lock_dir), what="the job")
    wait_until(lambda: _lines(log) == ["ready"], what="the job's handlers")
    os.kill(gate.pid, signal.SIGTSTP)
    wait_until(lambda: _stopped(job) and _stopped(gate.pid), what="the job, then safegate, stopped")
    os.kill(gate.pid, signal.SIGCONT)
    wait_until(lambda: not _stopped(job) and not _stopped(gate.pid), what="both continued")
    os.kill(gate.pid, signal.SIGTERM)
    assert gate.wait(timeout=TIMEOUT) == 0
    assert _lines(log) == ["ready", "TSTP", "TERM"]


def test_a_job_paused_for_heat_stays_paused_through_sigcont(config: Path, env: dict[str, str], sensor: Path,
                                                            lock_dir: Path, procs: Procs, tmp_path: Path) -> None:
    ticks, stop = tmp_path / "ticks", tmp_path / "stop"
    gate = procs.spawn([*SAFEGATE, "--config", str(config), "--", PY, str(HELPERS / "ticker.py"), str(ticks),
                        "1000000", str(stop)], env=env)
    job = wait_until(lambda: job_pid(lock_dir), what="the job")
    wait_until(ticks.exists, what="the first tick")
    set_temp(sensor, 85)
    wait_until(lambda: _stopped(job), what="the job paused for heat")
    os.kill(gate.pid, signal.SIGTSTP)
    wait_until(lambda: _stopped(gate.pid), what="safegate stopped")
    os.kill(gate.pid, signal.SIGCONT)  # `fg`: safegate runs again, the hot job does not
    wait_until(lambda: not _stopped(gate.pid), what="safegate continued")
    frozen = ticks.read_text()
    with OpenWatch(sensor) as reads:
        reads.wait_for(2, "safegate to read the sensor twice after SIGCONT")  # it acted on SIGCONT by then
    assert _stopped(job) and ticks.read_text() == frozen
    set_temp(sensor, 70)
    wait_until(lambda: ticks.read_text() != frozen, what="the job to tick again once cool")
    stop.touch()
    assert gate.wait(timeout=TIMEOUT) == 0


def test_without_a_terminal_a_job_stopped_from_outside_leaves_safegate_watching(config: Path, env: dict[str, str],
                                                                                sensor: Path, lock_dir: Path,
                                                                                procs: Procs) -> None:
    # No shell would continue a stopped safegate here (cron, setsid): the job alone stops, and SIGCONT to it alone
    # finds its watcher still running.
    gate = procs.spawn([*SAFEGATE, "--config", str(config), "--", "sleep", "600"], env=env)
    job = wait_until(lambda: job_pid(lock_dir), what="the job")
    os.kill(job, signal.SIGTSTP)
    wait_until(lambda: _stopped(job), what="the job stopped")
    with OpenWatch(sensor) as reads:
        reads.wait_for(2, "safegate to read the sensor twice while the job is stopped")  # it was not stopped
    assert not _stopped(gate.pid)
    os.kill(job, signal.SIGCONT)
    wait_until(lambda: not _stopped(job), what="the job continued")
    os.kill(gate.pid, signal.SIGTERM)
    assert gate.wait(timeout=TIMEOUT) == 128 + signal.SIGTERM
