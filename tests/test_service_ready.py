"""exec in a systemd unit with Type=notify (docs/recipes.md): READY=1 goes to $NOTIFY_SOCKET once the job runs,
never while safegate waits in line or when it gives up, so the unit's TimeoutStartSec= covers the wait. A real
datagram socket stands in for systemd's; the VM (tests/test_vm_cgroup.py) runs the recipe's unit under systemd."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st
from support import PY, TIMEOUT, Procs, hold_with_flock, stderr_of, wait_until

from safegate.exitcodes import ExitCode
from safegate.run.ready import service_ready


@pytest.fixture
def notify(tmp_path: Path) -> Iterator[tuple[socket.socket, str]]:
    """A socket where systemd's would be, as safegate finds it: a path in NOTIFY_SOCKET."""
    path = str(tmp_path / "notify")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(path)
    try:
        yield sock, path
    finally:
        sock.close()


def _received(sock: socket.socket) -> list[str]:
    """What has arrived so far, without waiting."""
    got, timeout = [], sock.gettimeout()
    sock.setblocking(False)
    try:
        while True:
            got.append(sock.recv(4096).decode())
    except BlockingIOError:
        return got
    finally:
        sock.settimeout(timeout)


def _exec(config: Path, *args: str) -> list[str]:
    return [PY, "-m", "safegate", "exec", "--config", str(config), "--mem", "0", *args]


def test_ready_is_sent_once_the_job_runs_not_while_waiting_in_line(
        config: Path, env: dict[str, str], lock_dir: Path, procs: Procs, tmp_path: Path,
        notify: tuple[socket.socket, str]) -> None:
    sock, path = notify
    holder = hold_with_flock(procs, lock_dir / "heavy.lock")
    started = tmp_path / "started"
    gate = procs.spawn(_exec(config, "--wait", "--", "sh", "-c", f'echo $$ > "{started}"'),
                       env={**env, "NOTIFY_SOCKET": path}, stderr=subprocess.PIPE, text=True)
    assert gate.stderr is not None
    waiting = gate.stderr.readline()  # safegate says it waits (off a terminal: a line)
    assert "waiting" in waiting, waiting
    assert _received(sock) == []  # the unit is still starting: TimeoutStartSec= counts
    os.killpg(holder.pid, signal.SIGKILL)  # flock(1) and its sleep, which holds the lock too
    sock.settimeout(TIMEOUT)
    message = sock.recv(4096).decode()
    job = wait_until(lambda: started.read_text().strip() if started.exists() else None, what="the job's pid")
    assert message.splitlines() == ["READY=1", f"STATUS=running pid {job} (profile default, lock heavy)"], message
    assert gate.wait(timeout=TIMEOUT) == 0, stderr_of(gate)
    assert _received(sock) == []  # once


def test_no_ready_when_safegate_gives_up_in_line(config: Path, env: dict[str, str], lock_dir: Path, procs: Procs,
                                                 notify: tuple[socket.socket, str]) -> None:
    sock, path = notify
    hold_with_flock(procs, lock_dir / "heavy.lock")
    done = subprocess.run(_exec(config, "--", "true"), env={**env, "NOTIFY_SOCKET": path}, capture_output=True,
                          text=True, timeout=TIMEOUT)
    assert done.returncode == ExitCode.LOCKED, done.stderr
    assert _received(sock) == []  # the unit fails with 13, as systemd sees it


def test_only_the_process_systemd_started_says_ready(config: Path, env: dict[str, str],
                                                    notify: tuple[socket.socket, str]) -> None:
    """SYSTEMD_EXEC_PID names the process systemd started. A safegate run by the unit's own script (a child of
    it) says nothing: the script decides when the unit is up. The same safegate exec'd by it (same pid) tells."""
    sock, path = notify
    gate = f'{PY} -m safegate exec --config "{config}" --mem 0 -- true'
    for how, script, told in (("child", f"export SYSTEMD_EXEC_PID=$$; {gate}; :", False),
                              ("exec", f"export SYSTEMD_EXEC_PID=$$; exec {gate}", True)):
        done = subprocess.run(["sh", "-c", script], env={**env, "NOTIFY_SOCKET": path}, capture_output=True,
                              text=True, timeout=TIMEOUT)
        assert done.returncode == 0, done.stderr
        got = _received(sock)
        assert [m.split("\n")[0] for m in got] == (["READY=1"] if told else []), (how, got)


def test_an_abstract_notify_socket_is_reached(config: Path, env: dict[str, str]) -> None:
    name = f"safegate-test-{os.getpid()}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind("\0" + name)
        done = subprocess.run(_exec(config, "--", "true"), env={**env, "NOTIFY_SOCKET": f"@{name}"},
                              capture_output=True, text=True, timeout=TIMEOUT)
        assert done.returncode == 0, done.stderr
        assert _received(sock)[0].startswith("READY=1\n")


def test_an_unreachable_notify_socket_is_one_warning_and_the_job_runs(config: Path, env: dict[str, str],
                                                                      tmp_path: Path) -> None:
    missing = tmp_path / "no-such-socket"
    done = subprocess.run(_exec(config, "--", "sh", "-c", "echo ran"), env={**env, "NOTIFY_SOCKET": str(missing)},
                          capture_output=True, text=True, timeout=TIMEOUT)
    assert done.returncode == 0 and done.stdout == "ran\n", done.stderr
    lines = [line for line in done.stderr.splitlines() if "NOTIFY_SOCKET" in line]
    assert len(lines) == 1 and "cannot tell systemd the service is ready" in lines[0] and str(missing) in lines[0]
    assert "Traceback" not in done.stderr


@given(st.text(max_size=200))
def test_any_notify_socket_value_is_sent_to_or_one_line_why_not(value: str) -> None:
    why = service_ready("running", {"NOTIFY_SOCKET": value})
    assert why is None if value == "" else why is not None and "\n" not in why and why.isprintable()
