"""Issue 13: one shared 1777 lock dir, two users who do not trust each other (root and nobody, both real).

Each test plants real files or runs real holders as one user and runs the real CLI as the other.
"""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import time
from pathlib import Path

import psutil
import pytest
from support import PY, Procs, Run, Shared, holder_files, meminfo_available, neutral_config, wait_until

from safegate.exitcodes import ExitCode
from safegate.gate.queue import read_tickets

TIB = 1024**4


def _record(pid: int, lock: str, **extra: object) -> dict[str, object]:
    proc = psutil.Process(pid)
    return {"pid": pid, "start_time": proc.create_time(), "user": "evil", "host": "h", "cmdline": ["x"],
            "started_at": 0.0, "profile": "p", "lock": lock, **extra}


def _token() -> str:
    return secrets.token_hex(8)


# --- item 1: a forged holder file reserves nothing ----------------------------------------------------------


def test_forged_holder_file_for_a_free_lock_reserves_nothing(shared: Shared) -> None:
    forged = json.dumps(_record(1, "zz", need=100 * TIB))
    shared.plant_as_nobody("zz.holder.json", forged)
    shared.plant_as_nobody(f"zz.holder-{_token()}.json", forged)
    for result in (shared.root("check", "--mem", "0"), shared.root("exec", "--mem", "0", "--", "true")):
        assert result.returncode == 0, result.stdout + result.stderr
        assert "reserved" not in result.stdout + result.stderr
    data = json.loads(shared.root("check", "--mem", "0", "--json").stdout)
    memory = next(c for c in data["checks"] if c["name"] == "memory")
    assert memory["values"]["reserved"] == 0
    locks = json.loads(shared.root("locks", "--json").stdout)
    assert [(lock["held"], lock["holder"]) for lock in locks if lock["name"] == "zz"] == [(False, None)]


def test_forged_record_for_someone_elses_held_lock_is_not_its_holder(shared: Shared, procs: Procs) -> None:
    # root holds "heavy" for real; nobody writes a newer record (an hour ahead: still a time the schema takes)
    # naming root's holder and 100 TiB.
    holder = procs.spawn([PY, "-c", _HOLD, str(shared.dir), "heavy", "0"], stdout=subprocess.PIPE)
    assert holder.stdout is not None and holder.stdout.readline().strip() == b"held"
    shared.plant_as_nobody(f"heavy.holder-{_token()}.json",
                           json.dumps(_record(holder.pid, "heavy", need=100 * TIB, started_at=time.time() + 3600,
                                                profile="forged")))
    result = shared.as_nobody("check", "--mem", "0", "--lock", "heavy", "--json")
    assert result.returncode == ExitCode.LOCKED, result.stdout + result.stderr
    checks = {c["name"]: c for c in json.loads(result.stdout)["checks"]}
    assert checks["memory"]["values"]["reserved"] == 0
    assert checks["lock"]["values"]["holder"]["profile"] == "real"
    locks = json.loads(shared.as_nobody("locks", "--json").stdout)
    assert locks[0]["holder"]["profile"] == "real" and "ignored" in locks[0]["note"]


_HOLD = """
import sys, time
from pathlib import Path
from safegate.locks.store import LockStore
held = LockStore(Path(sys.argv[1])).try_acquire(sys.argv[2], "real", sys.argv[4:] or None, need=int(sys.argv[3]))
print("held" if held and held.holder else "busy", flush=True)
time.sleep(600)
"""


# --- item 2: a long command line keeps its reservation ------------------------------------------------------


def test_job_with_a_huge_command_line_keeps_its_reservation(shared: Shared, procs: Procs) -> None:
    paths = [f"/data/recordings/2026/episode-{i:05d}-interview-with-a-guest.mp3" for i in range(2000)]
    assert len(" ".join(paths)) > 64 * 1024
    available = meminfo_available()
    need = available // 2
    job = procs.spawn([PY, "-m", "safegate", "exec", "--config", str(shared.config), "--lock", "big", "--mem",
                       str(need), "--", "sh", "-c", "sleep 600", "transcribe", *paths], env=shared.env,
                      stderr=subprocess.PIPE)
    wait_until(lambda: any(json.loads(p.read_text()).get("job_pid") for p in holder_files(shared.dir, "big")),
               what="the job to start")
    [record] = holder_files(shared.dir, "big")
    assert record.stat().st_size <= 64 * 1024
    stored = json.loads(record.read_text())["cmdline"]
    assert stored[:4] == ["sh", "-c", "sleep 600", "transcribe"] and "cut]" in stored[-1]
    # Another user's job that fits the machine, but not beside the first one's reservation, waits.
    result = shared.as_nobody("check", "--mem", str(int(available * 0.6)), "--json")
    assert result.returncode == ExitCode.MEMORY, result.stdout + result.stderr
    memory = next(c for c in json.loads(result.stdout)["checks"] if c["name"] == "memory")
    assert memory["values"]["reserved"] >= need - 64 * 1024 * 1024
    assert job.poll() is None


# --- item 3: another user's stale or planted file never stops a new holder -----------------------------------


@pytest.mark.parametrize("planted", ["stale-record", "directory", "fifo"])
def test_other_users_leftovers_never_stop_a_new_holder(shared: Shared, planted: str) -> None:
    legacy = shared.dir / "heavy.holder.json"
    if planted == "stale-record":
        legacy.write_text(json.dumps({**_record(1, "heavy"), "pid": 2**22 + 7, "user": "crashed"}))
        os.chmod(legacy, 0o644)
    elif planted == "directory":
        legacy.mkdir()
    else:
        os.mkfifo(legacy)
    # The job asks, from inside, who holds its lock: it must be the job's own safegate, as nobody.
    inside = f"{shared.nobody.python} -m safegate locks --json --config {shared.config}"
    result = shared.as_nobody("exec", "--mem", "0", "--lock", "heavy", "--", "sh", "-c", inside)
    assert result.returncode == 0, result.stderr
    assert "holder metadata not" not in result.stderr
    [lock] = json.loads(result.stdout)
    assert lock["held"] and lock["holder"] is not None and lock["holder"]["user"] == "nobody"
    assert lock["holder"]["pid"] != 2**22 + 7
    assert not [p for p in holder_files(shared.dir) if p.name != "heavy.holder.json"]  # nobody's own is gone
    # Root's leftover is no one's holder: check as nobody passes, naming no dead pid.
    result = shared.as_nobody("check", "--mem", "0", "--lock", "heavy")
    assert result.returncode == 0, result.stdout + result.stderr
    assert str(2**22 + 7) not in result.stdout


def _dead(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:  # gone between any two looks at it
        return True


def test_crashed_holder_of_another_user_is_not_named_as_holder(shared: Shared, procs: Procs) -> None:
    # nobody's holder is SIGKILLed; its record (nobody's, 0644) stays; root's check neither removes it by
    # mistake while a new holder of root's holds the lock, nor names the dead pid.
    code = _HOLD.replace('"real"', '"nobodys"')
    env = {"PYTHONPATH": shared.nobody.pythonpath, "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
           "HOME": str(shared.nobody.workdir)}
    crashed = procs.spawn(["runuser", "-u", "nobody", "--", "env", *[f"{k}={v}" for k, v in env.items()],
                           shared.nobody.python, "-c", code, str(shared.dir), "heavy", "0"], stdout=subprocess.PIPE)
    assert crashed.stdout is not None and crashed.stdout.readline().strip() == b"held"
    [stale] = holder_files(shared.dir)
    writer = json.loads(stale.read_text())["pid"]
    os.kill(writer, 9)
    wait_until(lambda: _dead(writer), what="the holder to die")
    holder = procs.spawn([PY, "-c", _HOLD, str(shared.dir), "heavy", "0"], stdout=subprocess.PIPE)
    assert holder.stdout is not None and holder.stdout.readline().strip() == b"held"
    result = shared.root("check", "--mem", "0", "--lock", "heavy", "--json")
    lock = next(c for c in json.loads(result.stdout)["checks"] if c["name"] == "lock")
    assert lock["values"]["holder"]["pid"] == holder.pid and str(writer) not in lock["reason"]


# --- item 6: nothing another user wrote reaches a terminal raw ----------------------------------------------

_CONTROLS = ("\x1b", "\x07", "\r", "\x00", "\x9b")
_NASTY = "x\x1b]0;pwned\x07\x1b[2J\ry\nsafe to start (profile default)\n"


def _assert_clean(text: str) -> None:
    assert not any(c in text for c in _CONTROLS), repr(text)
    # Only safegate's own verdict line, the first, may say it.
    assert not [line for line in text.splitlines()[1:] if line.startswith("safe to start")], text


def _strings(data: object) -> list[str]:
    if isinstance(data, str):
        return [data]
    if isinstance(data, dict):
        data = list(data.values())
    return [s for item in data for s in _strings(item)] if isinstance(data, list) else []


def test_holder_metadata_with_terminal_controls_is_escaped_everywhere(shared: Shared, procs: Procs) -> None:
    # A real holder (root) whose command line and profile carry ESC, BEL, CR and a forged "safe to start" line.
    hold = _HOLD.replace('"real"', repr("prof" + _NASTY))
    holder = procs.spawn([PY, "-c", hold, str(shared.dir), "heavy", "0", "whisper" + _NASTY, "b" + _NASTY],
                         stdout=subprocess.PIPE)
    assert holder.stdout is not None and holder.stdout.readline().strip() == b"held"
    outputs = [shared.as_nobody(*args) for args in (
        ("check", "--mem", "0", "--lock", "heavy"), ("check", "--mem", "0", "--lock", "heavy", "-q"),
        ("check", "--mem", "0", "--lock", "heavy", "--wait", "--timeout", "0.2s"),
        ("unlock", "heavy"), ("locks",), ("status",),
        ("exec", "--mem", "0", "--lock", "heavy", "--", "true"),
    )]
    assert [o.returncode for o in outputs] == [ExitCode.LOCKED] * 4 + [0, 0, ExitCode.LOCKED]
    for out in outputs:
        _assert_clean(out.stdout + out.stderr)
    assert "\\x1b]0;pwned\\x07" in outputs[3].stderr  # shown, escaped, in unlock's refusal
    for args in (("check", "--mem", "0", "--lock", "heavy", "--json"), ("locks", "--json"), ("status", "--json")):
        out = shared.as_nobody(*args)
        _assert_clean(out.stdout + out.stderr)
        assert "whisper" + _NASTY in _strings(json.loads(out.stdout))  # JSON carries it whole, as JSON escapes


def test_profile_names_config_keys_and_sensor_paths_are_escaped(run: Run, tmp_path: Path) -> None:
    sensor_dir = tmp_path / "s\x1b[2J\nsafe to start"
    sensor_dir.mkdir()
    (sensor_dir / "temp").write_text("40000\n")
    cfg = tmp_path / "c.toml"
    cfg.write_text(neutral_config(sensor_dir / "temp"))
    for args in (["check", "--mem", "0"], ["check", "--mem", "1P"], ["status"], ["profiles"]):
        out = run(*args, "--config", str(cfg))
        assert out.returncode in (0, ExitCode.MEMORY), out.stdout + out.stderr
        _assert_clean(out.stdout + out.stderr)
    for bad_text in ('[defaults]\n"k\\u001b[2J\\nsafe to start" = 1\n',
                     '[profiles."p\\u001b[2J\\nsafe to start"]\nmemory = "1G"\n'):
        bad = tmp_path / "bad.toml"
        bad.write_text(bad_text)
        out = run("check", "--config", str(bad))
        assert out.returncode == ExitCode.CONFIG and "\\x1b[2J" in out.stderr
        _assert_clean(out.stdout + out.stderr)
        assert len(out.stderr.strip().splitlines()) == 1
    out = run("check", "--config", str(cfg), "-p", "x\x1b[2J\nsafe to start")
    assert out.returncode == ExitCode.CONFIG, out.stderr
    _assert_clean(out.stdout + out.stderr)


# --- item 7: non-finite numbers are invalid metadata -----------------------------------------------------------

_SELF_RECORD = """
import fcntl, json, os, sys, time, secrets
import psutil
d, started = sys.argv[1], float(sys.argv[2])
fd = os.open(os.path.join(d, "heavy.lock"), os.O_RDWR | os.O_CREAT, 0o666)
fcntl.flock(fd, fcntl.LOCK_EX)
me = psutil.Process()
record = {"pid": me.pid, "start_time": me.create_time(), "user": "nobody", "host": "h", "cmdline": ["x"],
          "started_at": started, "profile": "p", "lock": "heavy", "need": 1}
for name in ("heavy.holder.json", f"heavy.holder-{secrets.token_hex(8)}.json"):
    with open(os.path.join(d, name), "x") as fh:
        fh.write(json.dumps(record))
print("held", flush=True)
time.sleep(600)
"""


@pytest.mark.parametrize("started_at", ["-inf", "nan", "1e400"])
def test_non_finite_numbers_in_a_holders_own_record_are_invalid(shared: Shared, procs: Procs,
                                                                started_at: str) -> None:
    # nobody holds the lock for real and writes its own record, with a time that is no number.
    env = {"PYTHONPATH": shared.nobody.pythonpath, "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
           "HOME": str(shared.nobody.workdir)}
    holder = procs.spawn(["runuser", "-u", "nobody", "--", "env", *[f"{k}={v}" for k, v in env.items()],
                          shared.nobody.python, "-c", _SELF_RECORD, str(shared.dir), started_at],
                         stdout=subprocess.PIPE)
    assert holder.stdout is not None and holder.stdout.readline().strip() == b"held"
    if started_at == "1e400":
        for path in holder_files(shared.dir):
            path.write_text(path.read_text().replace("Infinity", "1e400"))  # as root: the file stays nobody's
    text = shared.root("check", "--mem", "0", "--lock", "heavy")
    assert text.returncode == ExitCode.LOCKED and "nanh" not in text.stdout and "corrupt" in text.stdout
    for args in (("check", "--mem", "0", "--lock", "heavy", "--json"), ("locks", "--json"), ("status", "--json")):
        out = shared.root(*args)
        json.loads(out.stdout, parse_constant=lambda c, a=args: pytest.fail(f"{c} in the JSON of {a}"))
    assert "nanh" not in shared.root("locks").stdout


# --- item 4: one planted file at a lock path does not break listing ------------------------------------------


def test_planted_directory_or_mode_000_lock_file_is_shown_unusable(shared: Shared) -> None:
    (shared.dir / "zz.lock").mkdir()
    (shared.dir / "yy.lock").write_text("")
    os.chmod(shared.dir / "yy.lock", 0)
    assert shared.as_nobody("exec", "--mem", "0", "--lock", "ok", "--", "true").returncode == 0
    for user in (shared.as_nobody, shared.root):
        listed = user("locks", "--json")
        assert listed.returncode == 0, listed.stderr
        by_name = {lock["name"]: lock for lock in json.loads(listed.stdout)}
        assert not by_name["zz"]["usable"] and "zz.lock" in by_name["zz"]["note"]
        assert by_name["ok"]["usable"] and not by_name["ok"]["held"]
        text = user("locks")
        assert text.returncode == 0 and "UNUSABLE" in text.stdout, text.stderr
        status = user("status", "--json")
        assert status.returncode == 0, status.stderr
        assert {lock["name"] for lock in json.loads(status.stdout)["locks"]} >= {"zz", "yy", "ok"}
        assert user("status").returncode == 0
    # root ignores modes; nobody cannot open the mode-000 file: unusable for nobody only.
    by_name = {lock["name"]: lock for lock in json.loads(shared.as_nobody("locks", "--json").stdout)}
    assert not by_name["yy"]["usable"] and "not accessible" in by_name["yy"]["note"]


# --- item 5: per-job lock files of killed lock-less execs are cleaned ------------------------------------------


def test_per_job_lock_of_a_killed_exec_is_cleaned(shared: Shared, procs: Procs) -> None:
    shared.config.write_text(shared.config.read_text() + "[profiles.free]\nlock = false\n")
    env = {"PYTHONPATH": shared.nobody.pythonpath, "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
           "HOME": str(shared.nobody.workdir), "SAFEGATE_LOCK_DIR": str(shared.dir), "SAFEGATE_GPU": "none"}
    procs.spawn(["runuser", "-u", "nobody", "--", "env", *[f"{k}={v}" for k, v in env.items()], shared.nobody.python,
                 "-m", "safegate", "exec", "--config", str(shared.config), "-p", "free", "-q", "--", "sleep", "600"])

    def started() -> dict[str, int] | None:
        for path in shared.dir.glob("job-*.holder*.json"):
            record = json.loads(path.read_text())
            if record.get("job_pid"):
                return {"gate": record["pid"], "job": record["job_pid"]}
        return None

    pids = wait_until(started, what="the lock-less job to start")
    procs.orphans.append(pids["job"])
    [lock] = shared.dir.glob("job-*.lock")
    assert lock.stat().st_uid != 0  # nobody's
    os.kill(pids["gate"], 9)
    # The job gets its parent-death SIGTERM and ends; its lock file is left behind.
    wait_until(lambda: not psutil.pid_exists(pids["job"]) or
               psutil.Process(pids["job"]).status() == psutil.STATUS_ZOMBIE, what="the job to end")
    assert lock.exists()
    listed = json.loads(shared.as_nobody("locks", "--json").stdout)
    assert [entry["name"] for entry in listed] == [lock.name[: -len(".lock")]]
    result = shared.as_nobody("check", "-p", "free", "--mem", "0")
    assert result.returncode == 0 and "stale per-job lock" in result.stdout, result.stdout + result.stderr
    assert not list(shared.dir.glob("job-*"))
    assert json.loads(shared.as_nobody("locks", "--json").stdout) == []


# --- issue 22.9: another user's process is left out as safegate only for what the lock dir shows ---------------


def test_another_users_process_dressed_up_as_safegate_competes_and_their_real_waiter_does_not(
        shared: Shared, procs: Procs) -> None:
    token = _token()
    shared.config.write_text(shared.config.read_text() + "[profiles.night]\nlock = \"night\"\ncompeting = [{ pattern "
                             f"= 'whisper --model large-v3 {token}', action = \"block\" }}]\n")
    # nobody's heavy process, argv[0] 'safegate', its command line naming the job.
    dressed = procs.spawn(["runuser", "-u", "nobody", "--", "bash", "-c",
                           f"exec -a safegate bash -c 'sleep 600; exit' whisper --model large-v3 {token}"])
    # And nobody's real safegate, waiting in line (a ticket in the lock dir) to start the same kind of job.
    holder = procs.spawn(["flock", str(shared.dir / "night.lock"), "sleep", "600"])
    env = {"PYTHONPATH": shared.nobody.pythonpath, "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
           "HOME": str(shared.nobody.workdir), "SAFEGATE_LOCK_DIR": str(shared.dir), "SAFEGATE_GPU": "none"}
    waiter = procs.spawn(["runuser", "-u", "nobody", "--", "env", *[f"{k}={v}" for k, v in env.items()],
                          shared.nobody.python, "-m", "safegate", "exec", "--config", str(shared.config), "-p", "night",
                          "--wait", "-q", "--", "sh", "-c", "sleep 600", "whisper", "--model", "large-v3", token])

    def nobodys(prefix: str, root: int) -> int:
        """The pid of nobody's process below *root* whose command line starts with *prefix* (0: none yet)."""
        try:
            found = psutil.Process(root).children(recursive=True)
        except psutil.Error:
            return 0
        for proc in found:
            try:
                if proc.uids().real != 0 and " ".join(proc.cmdline()).startswith(prefix):
                    return proc.pid
            except psutil.Error:
                continue
        return 0

    fake = wait_until(lambda: nobodys("safegate -c", dressed.pid), what="nobody's process dressed up as safegate")
    gate = wait_until(lambda: nobodys(shared.nobody.python, waiter.pid), what="nobody's waiting safegate")
    wait_until(lambda: any(t.pid == gate for t in read_tickets(shared.dir)), what="nobody's ticket")
    assert holder.poll() is None
    result = shared.root("check", "-p", "night", "--lock", "other", "--mem", "0", "--json")
    assert result.returncode == ExitCode.COMPETING, result.stdout + result.stderr
    competing = next(c for c in json.loads(result.stdout)["checks"] if c["name"] == "competing")
    matched = {m["pid"]: m for m in competing["values"]["matches"]}
    assert fake in matched and matched[fake]["user"] == "nobody", result.stdout
    # runuser's command line names the job too: no launcher of an accounted safegate, it competes as well.
    assert set(matched) == {fake, dressed.pid}, result.stdout
    # The waiter and its launcher (runuser, env: the same command line) are left out.
    assert gate not in matched and waiter.pid not in matched
