"""Old shell gates' PID files (safegate.locks.legacy): live, dead, junk, and a pid reused since the file was
written."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

from support import Procs

from safegate.locks.legacy import legacy_removable, read_legacy, remove_legacy


def test_legacy_pid_files(tmp_path: Path, procs: Procs) -> None:
    live_proc = procs.spawn(["sleep", "600"])
    live, dead, junk = tmp_path / "live.lock", tmp_path / "dead.lock", tmp_path / "junk.lock"
    live.write_text(f"{live_proc.pid}\n")
    finished = subprocess.run(["sh", "-c", "echo $$"], capture_output=True, text=True, check=True)
    dead.write_text(finished.stdout)
    junk.write_text("hello\n")
    assert read_legacy(live).alive
    dead_state = read_legacy(dead)
    assert not dead_state.alive and legacy_removable(dead_state)
    assert remove_legacy(dead_state).removed and not dead.exists()
    junk_state = read_legacy(junk)
    assert junk_state.pid is None and "does not hold a pid" in junk_state.note and not legacy_removable(junk_state)
    assert not read_legacy(tmp_path / "absent.lock").alive


def test_legacy_pid_reused_after_file_written_is_stale(tmp_path: Path, procs: Procs) -> None:
    path = tmp_path / "old.lock"
    path.write_text("1\n")  # pid 1 is alive, but started long before... so make the file older than it
    os.utime(path, (0, 0))
    assert not read_legacy(path).alive
