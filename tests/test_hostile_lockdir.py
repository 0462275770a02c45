"""Issue 22: every file another user can write into the shared lock dir, as a hostile second user writes it.

root and nobody (both real) share a real 1777 lock dir. nobody plants tickets naming its own live processes
(which is all anyone may do: a ticket names a process of the file's owner), with numbers that overflow,
forged arrivals, newlines, and in tens of thousands; root runs the real CLI and must neither crash, nor slow
down with the files, nor be put behind a line it really stands at the head of.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
from support import PY, TIMEOUT, Procs, Shared, hold_with_flock, meminfo, wait_until

from safegate.exitcodes import ExitCode


def _start_ticks(pid: int) -> int:
    return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19])


def _sleeper(procs: Procs) -> int:
    """A live process of nobody's: what nobody's tickets may name."""
    return int(procs.spawn_named("nobody-sleeper", user="nobody").named_pid)  # type: ignore[attr-defined]


def _old_style(pid: int, lock: str | None, **fields: object) -> dict[str, object]:
    """A ticket as safegate wrote them before: every value the old reader trusted, arrival included."""
    import psutil

    return {"pid": pid, "start_time": psutil.Process(pid).create_time(), "user": "nobody", "lock": lock,
            "profile": "forged", "need": 0, "arrival": 1, "blocked_by": "lock", "reason": "lock: held",
            "memory_only": False, **fields}


def _plant_ticket(shared: Shared, pid: int, content: str, state: str | None = None) -> None:
    base = f".ticket.{pid}.{_start_ticks(pid)}"
    if state is not None:
        shared.plant_as_nobody(f"{base}.state", state)
    shared.plant_as_nobody(f"{base}.json", content)


# --- finding 1: one file with a number that overflows breaks no one -----------------------------------------


@pytest.mark.parametrize("number", ["1e999", "9" * 400, "-1e999"])
def test_a_ticket_with_a_number_that_overflows_breaks_no_one(shared: Shared, procs: Procs, number: str) -> None:
    pid = _sleeper(procs)
    for field in ("need", "arrival", "start_time"):
        old = json.dumps(_old_style(pid, "night")).replace(f'"{field}": ', f'"{field}": {number}, "x{field}": ')
        shared.plant_as_nobody(f".ticket.{'1' * 20}.{pid}.{field}.json", old)  # the old name, any content
    _plant_ticket(shared, pid, old)  # and the new name, holding the same
    for args in (["check", "--mem", "0", "--lock", "night"], ["queue"], ["status"], ["metrics"]):
        result = shared.root(*args)
        assert result.returncode == 0, (args, result.stderr)
        assert "internal error" not in result.stderr and "Traceback" not in result.stderr
    api = subprocess.run([PY, "-c", "import safegate, sys; v = safegate.check(lock='night', mem=0, "
                          f"config={str(shared.config)!r}); sys.exit(0 if v.ok else 1)"],
                         env=shared.env, capture_output=True, text=True, timeout=TIMEOUT)
    assert api.returncode == 0, api.stderr


# --- finding 2: a flood of tickets costs names, not reads; admission never fails with 3 ---------------------


FLOOD = """
import os, sys
d, pid, start, n = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
body = b'{"user": "nobody", "lock": "night", "profile": "flood", "need": 1}'
for i in range(n):
    # Every start but the sleeper's own: none of these is its ticket, and none may cost a read.
    with open(os.path.join(d, f".ticket.{pid}.{start + 1 + i}.json"), "wb") as fh:
        fh.write(body)
for i in range(n // 50):
    with open(os.path.join(d, f".ticket.{4000000 - i}.{i}.json"), "wb") as fh:  # pids that do not run
        fh.write(body)
"""


def test_a_flood_of_tickets_of_one_live_process_counts_once_and_fails_no_job(shared: Shared, procs: Procs) -> None:
    pid = _sleeper(procs)
    out = shared.nobody.run(["-c", FLOOD, str(shared.dir), str(pid), str(_start_ticks(pid)), "50000"])
    assert out.returncode == 0, out.stderr
    _plant_ticket(shared, pid, json.dumps({"user": "nobody", "lock": "other", "profile": "one", "need": 0}))
    # The sleeper's one real ticket, and only it, is in line.
    queue = json.loads(shared.root("queue", "--json").stdout)
    assert [(w["pid"], w["profile"]) for w in queue] == [(pid, "one")]
    # Eight execs at once through the admission lock: every one admitted and run, none "busy for 30s" (3).
    execs = [procs.spawn([PY, "-m", "safegate", "exec", "--config", str(shared.config), "--mem", "0", "--lock",
                          f"job{i}", "--", "true"], env=shared.env, stderr=subprocess.PIPE) for i in range(8)]
    for proc in execs:
        assert proc.wait(timeout=TIMEOUT) == 0, proc.stderr.read() if proc.stderr else ""


# --- finding 3: order comes from the kernel, and a sleeper at the head loses its place ----------------------


def test_a_forged_early_arrival_does_not_jump_the_line(shared: Shared, procs: Procs) -> None:
    holder = hold_with_flock(procs, shared.dir / "night.lock")
    waiter = procs.spawn([PY, "-m", "safegate", "check", "--config", str(shared.config), "--mem", "0", "--lock",
                          "night", "--wait", "--timeout", "60s", "-q"], env=shared.env, stderr=subprocess.PIPE)
    wait_until(lambda: any(p.name.startswith(f".ticket.{waiter.pid}.") for p in shared.dir.iterdir()),
               what="root's waiter in line")
    pid = _sleeper(procs)
    # nobody arrives later, and claims to have arrived in 1970, in the old format and the new.
    shared.plant_as_nobody(f".ticket.{'0' * 19}1.{pid}.json", json.dumps(_old_style(pid, "night")))
    _plant_ticket(shared, pid, json.dumps(_old_style(pid, "night")))
    os.killpg(holder.pid, signal.SIGKILL)  # flock(1) and its sleep, which holds the lock too
    holder.wait(timeout=TIMEOUT)
    assert waiter.wait(timeout=TIMEOUT) == 0, waiter.stderr.read() if waiter.stderr else ""


def test_a_sleeping_ticket_at_the_head_of_a_free_lock_loses_its_place(shared: Shared, procs: Procs) -> None:
    pid = _sleeper(procs)
    # nobody really arrived first (its file is older than root's waiter), but its process never takes the lock.
    _plant_ticket(shared, pid, json.dumps(_old_style(pid, "night", arrival=time.time_ns() - 10**10)),
                  state=json.dumps({"blocked_by": "lock", "reason": "lock: held", "memory_only": False}))
    waiter = shared.root("check", "--mem", "0", "--lock", "night", "--wait", "--timeout", "60s", "--json")
    assert waiter.returncode == 0, waiter.stderr
    # A plain check (no --wait) gives the head its grace too, then passes it.
    assert shared.root("check", "--mem", "0", "--lock", "night", "-q").returncode == 0
    # The line still shows nobody's ticket: passing it over is each waiter's own judgement.
    assert [w["pid"] for w in json.loads(shared.root("queue", "--json").stdout)] == [pid]


# --- finding 4: a need that can never fit is told so at once and holds back no one --------------------------


def test_a_need_that_can_never_fit_is_exit_10_at_once(shared: Shared) -> None:
    need = meminfo("MemTotal") - 2 * 1024**3  # fits the machine, not with the 4G margin
    for command in (["check"], ["exec"]):
        args = [*command, "--mem", str(need), "--margin", "4G", "--wait"]
        result = shared.root(*args, *(["--", "true"] if command == ["exec"] else []))
        said = result.stdout + result.stderr
        assert result.returncode == ExitCode.MEMORY, said
        assert "can never fit" in said and "waiting" not in said, said


def test_an_impossible_waiter_holds_back_no_one(shared: Shared, procs: Procs) -> None:
    pid = _sleeper(procs)
    need = meminfo("MemTotal") - 1024**2  # fits MemTotal alone; never with any margin
    _plant_ticket(shared, pid, json.dumps(_old_style(pid, None, profile="huge", need=need, blocked_by="memory",
                                                     memory_only=True)),
                  state=json.dumps({"blocked_by": "memory", "reason": "memory: short", "memory_only": True}))
    result = shared.root("check", "--mem", "1M", "--margin", "1G", "--json")
    assert result.returncode == 0, result.stdout + result.stderr


# --- finding 5: another user's text forges no line ----------------------------------------------------------


def test_a_newline_in_another_users_ticket_forges_no_line(shared: Shared, procs: Procs) -> None:
    pid = _sleeper(procs)
    forged = "night\nFORGED 1. pid 1 root lock night safe to start"
    _plant_ticket(shared, pid, json.dumps(_old_style(pid, forged, user="u\x1b[2J", profile="p\rFORGED")),
                  state=json.dumps({"blocked_by": "lock", "reason": "r\nFORGED", "memory_only": False}))
    for args in (["queue"], ["status"]):
        out = shared.root(*args).stdout
        assert not [line for line in out.splitlines() if "FORGED" in line and not line.startswith(" ")], out
        assert "\x1b" not in out and "\r" not in out


# --- finding 8: a history file with a number that overflows is set aside, not a crash -----------------------


def test_a_history_with_a_400_digit_peak_is_set_aside(shared: Shared, tmp_path: Path) -> None:
    state = Path(shared.env["XDG_STATE_HOME"]) / "safegate"
    state.mkdir(parents=True, exist_ok=True)
    history = state / "history.json"
    run = {"time": time.time(), "peak_memory": int("9" * 400), "peak_gpu_memory": None, "duration": 1.0,
           "reason": "exited", "exit_code": 0}
    history.write_text(json.dumps({"auto": [run, run, run]}))
    shared.config.write_text(shared.config.read_text() + '[profiles.auto]\nmemory = "auto"\nlock = false\n')
    for args in (["check", "-p", "auto", "-q"], ["profiles"], ["metrics"]):
        result = shared.root(*args)
        assert result.returncode == 0, (args, result.stderr)
        assert "internal error" not in result.stderr
    result = shared.root("exec", "-p", "auto", "--", "true")
    assert result.returncode == 0, result.stderr
    assert "set aside" in result.stderr and (state / "history.json.broken").exists()
    assert json.loads(history.read_text())["auto"][0]["peak_memory"] < 2**53
