"""Probes against real files and real processes (fake only what this machine lacks: sensors)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

from hypothesis import given
from hypothesis import strategies as st
from support import Procs, hold_with_flock, proc_state, set_temp, wait_until

from safegate.config.model import ThermalConfig
from safegate.gate.queue import read_tickets
from safegate.probes.jobtree import stopped
from safegate.probes.memory import read_memory, read_pressure
from safegate.probes.processes import _parse_stat, ancestors, descendants, is_safegate, read_processes
from safegate.probes.thermal import read_thermal


def test_pressure_parsed_from_psi_file(tmp_path: Path) -> None:
    psi = tmp_path / "memory"
    psi.write_text("some avg10=31.50 avg60=2.00 avg300=0.10 total=123\nfull avg10=1.00 avg60=0 avg300=0 total=1\n")
    assert read_pressure(str(psi)) == 31.5


def test_pressure_absent_or_garbage_is_none(tmp_path: Path) -> None:
    assert read_pressure(str(tmp_path / "missing")) is None
    bad = tmp_path / "bad"
    bad.write_text("some avg10=banana\n")
    assert read_pressure(str(bad)) is None
    assert read_pressure(str(tmp_path)) is None  # a directory: read fails like EOPNOTSUPP would


def test_memory_snapshot_is_consistent() -> None:
    snap = read_memory()
    assert 0 < snap.available <= snap.total


def test_sensor_files_read_in_millidegrees(tmp_path: Path) -> None:
    hot, cool = tmp_path / "hot", tmp_path / "cool"
    set_temp(hot, 81.5)
    set_temp(cool, 40)
    snap = read_thermal(ThermalConfig(sensors=(), files=(str(hot), str(cool))))
    assert snap.hottest is not None and snap.hottest.celsius == 81.5 and snap.hottest.source == str(hot)
    assert snap.notes == ()


def test_bad_sensor_files_become_notes(tmp_path: Path) -> None:
    garbage, crazy, good = tmp_path / "garbage", tmp_path / "crazy", tmp_path / "good"
    garbage.write_text("hot\n")
    crazy.write_text("255000\n")
    set_temp(good, 55)
    missing = tmp_path / "missing"
    snap = read_thermal(ThermalConfig(sensors=(), files=(str(garbage), str(crazy), str(missing), str(good))))
    assert [r.celsius for r in snap.readings] == [55]
    assert len(snap.notes) == 3
    assert any("implausible" in n for n in snap.notes) and any("unreadable" in n for n in snap.notes)


def test_empty_sensor_list_disables_psutil_sensors() -> None:
    assert read_thermal(ThermalConfig(sensors=(), files=())).readings == ()


def test_parse_stat_survives_hostile_comm() -> None:
    # The comm "evil) S 1 (x" contains ') ' and spaces; parsing starts after the last ')'.
    fields = b"S 456 1 1 0 -1 4194560 0 0 0 0 0 0 0 0 20 0 1 0 100 1000 321"
    parsed = _parse_stat(b"123 (evil) S 1 (x) " + fields)
    assert parsed == ("S", 456, 321)
    assert _parse_stat(b"garbage") is None


def test_stopped_reads_the_state_of_real_processes(procs: Procs) -> None:
    sleeper = procs.spawn(["sleep", "600"])
    wait_until(lambda: proc_state(sleeper.pid) == "S", what="the sleeper asleep")
    assert not stopped(sleeper.pid)
    os.kill(sleeper.pid, signal.SIGSTOP)
    wait_until(lambda: proc_state(sleeper.pid) == "T", what="the sleeper stopped")
    assert stopped(sleeper.pid)
    sleeper.kill()
    sleeper.wait()
    assert not stopped(sleeper.pid)  # gone


@given(comm=st.binary(max_size=40), state=st.binary(min_size=0, max_size=3), rest=st.binary(max_size=40))
def test_stopped_survives_any_stat_line(comm: bytes, state: bytes, rest: bytes) -> None:
    # /proc/PID/stat's comm is the process's own choice: ')', spaces, newlines. Only the state after the last ')'
    # counts, and nothing read there raises.
    with tempfile.TemporaryDirectory() as root:
        Path(root, "7").mkdir()
        Path(root, "7", "stat").write_bytes(b"7 (" + comm + b") " + state + b" " + rest)
        got = stopped(7, root)
    assert isinstance(got, bool)
    if state and b")" not in rest and not set(state) & set(b" \t\n\r\x0b\x0c)"):  # one token: the state
        assert got == (state in (b"T", b"t"))


def test_process_scan_sees_real_process_and_excludes_self(procs: Procs) -> None:
    other = procs.spawn_orphan("whisper --model large-v3 a.mp3")
    mine = procs.spawn_named("whisper --model large-v3 b.mp3")
    snap = read_processes()
    by_pid = {p.pid: p for p in snap.processes}
    assert other in by_pid
    assert by_pid[other].cmdline.startswith("whisper --model large-v3 a.mp3")
    assert by_pid[other].rss > 0
    assert mine.pid not in by_pid  # started by this process: never a competitor
    assert os.getpid() not in by_pid and os.getppid() not in by_pid
    assert os.getpid() in snap.excluded


def test_process_scan_excludes_started_and_their_children(procs: Procs) -> None:
    parent = procs.spawn(["bash", "-c", 'exec -a "whisper large parent" bash -c "sleep 600 & wait"'])
    def child_pid() -> int | None:
        out = subprocess.run(["pgrep", "-P", str(parent.pid)], capture_output=True, text=True).stdout.split()
        return int(out[0]) if out else None
    grandchild = wait_until(child_pid, what="the started job's child")
    snap = read_processes(started=[parent.pid])
    pids = {p.pid for p in snap.processes}
    assert parent.pid not in pids and grandchild not in pids
    assert {parent.pid, grandchild} <= snap.excluded


def test_process_scan_with_psutil_fallback_matches_proc_reader(procs: Procs, tmp_path: Path) -> None:
    other = procs.spawn_orphan("fallback-check large")
    mine = procs.spawn_named("fallback-check mine")
    snap = read_processes(proc_root=str(tmp_path / "no-proc-here"))  # forces the psutil path
    pids = {p.pid for p in snap.processes}
    assert other in pids and mine.pid not in pids


def test_ancestor_and_descendant_helpers() -> None:
    parents = {10: 1, 11: 10, 12: 11, 13: 10, 20: 1}
    assert ancestors(12, parents) == {11, 10, 1}
    assert descendants([10], parents) == {11, 12, 13}
    assert ancestors(5, {5: 5}) == {5}  # a self-parented entry ends the walk instead of looping


def test_scan_is_callable_from_a_fresh_interpreter(procs: Procs) -> None:
    other = procs.spawn_orphan("fresh-interpreter-target large")
    code = ("import json; from safegate.probes.processes import read_processes; "
            "print(json.dumps([p.pid for p in read_processes().processes]))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert other in json.loads(out)


def test_other_safegate_processes_are_not_competitors_but_their_jobs_are(
    procs: Procs, tmp_path: Path, env: dict[str, str]
) -> None:
    # A safegate waiting on a held lock for the whisper profile carries "whisper-large" in its argv.
    lock_dir = Path(env["SAFEGATE_LOCK_DIR"])
    hold_with_flock(procs, lock_dir / "whisper-large.lock")
    waiting = procs.spawn_orphan_argv(
        [sys.executable, "-m", "safegate", "check", "--wait", "-p", "whisper-large-v3"], env=env
    )
    job = procs.spawn_orphan("whisper --model large-v3 x.mp3")
    # Left out for the ticket it waits with in the lock dir (what anyone can read), not for its name.
    wait_until(lambda: any(t.pid == waiting for t in read_tickets(lock_dir)), what="the waiting safegate's ticket")
    snap = read_processes(accounted=lambda: {t.pid for t in read_tickets(lock_dir)})
    pids = {p.pid for p in snap.processes}
    assert waiting not in pids and waiting in snap.excluded
    assert job in pids
    assert waiting in {p.pid for p in read_processes().processes}  # its name alone: not accounted for


def test_is_safegate_recognises_its_launch_forms() -> None:
    assert is_safegate(["/venv/bin/safegate", "exec"])
    assert is_safegate(["/venv/bin/python3", "/venv/bin/safegate", "exec"])
    assert is_safegate(["python", "-m", "safegate"])
    assert not is_safegate(["whisper", "--model", "large"])
    assert not is_safegate(["python", "safegate_report.py"])
    assert not is_safegate([])
