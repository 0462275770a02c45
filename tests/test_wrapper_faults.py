"""safegate exec's own outputs failing under it (issue 12, item 13): a full disk under --log never fails the job."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
from support import PY, TIMEOUT


def _private_mount() -> list[str]:
    """A mount namespace of our own, so a tiny tmpfs can be mounted without touching the machine's mounts."""
    if shutil.which("unshare") is None:
        pytest.skip("unshare(1) is not installed")
    prefix = ["unshare", "--mount", "--propagation", "private"]
    if os.geteuid() != 0:
        prefix.insert(1, "--map-root-user")  # a user namespace may mount a tmpfs of its own
    probe = subprocess.run([*prefix, "true"], capture_output=True, timeout=TIMEOUT)
    if probe.returncode != 0:
        pytest.skip(f"no private mount namespace here: {probe.stderr.decode().strip()}")
    return prefix


def _exec_on_full_disk(config: Path, env: dict[str, str], disk: Path, size: str, *job: str,
                       fill: bool) -> subprocess.CompletedProcess[str]:
    disk.mkdir()
    # A full disk: a one-page tmpfs, filled to the last byte before the job starts (or left with one page).
    script = (f'mount -t tmpfs -o size={size} tmpfs "$1" || exit 99; '
              + ('head -c 1048576 /dev/zero > "$1/filler" 2>/dev/null; ' if fill else "")
              + 'shift; exec "$@"')
    cmd = [*_private_mount(), "sh", "-c", script, "sh", str(disk),
           PY, "-m", "safegate", "exec", "--config", str(config), "--mem", "0", "--log", str(disk / "night.log"),
           "--", *job]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=TIMEOUT, stdin=subprocess.DEVNULL)


@pytest.mark.parametrize("job", [
    ["sh", "-c", "exit 3"],
    # A job that ignores SIGTERM: a failed event write must not leave it running unwatched, nor kill it.
    ["sh", "-c", "trap '' TERM; sleep 0.3; exit 3"],
], ids=["plain", "ignores-term"])
def test_a_full_disk_under_the_log_keeps_the_jobs_status(config: Path, env: dict[str, str], tmp_path: Path,
                                                         job: list[str]) -> None:
    result = _exec_on_full_disk(config, env, tmp_path / "disk", "4k", *job, fill=True)
    assert result.returncode != 99, result.stderr
    assert result.returncode == 3, result.stderr
    warnings = [line for line in result.stderr.splitlines() if "cannot write --log" in line]
    assert len(warnings) == 1, result.stderr  # said once, not per event
    assert "No space left on device" in warnings[0]
    assert "job exited 3" in result.stderr


def test_the_log_on_a_full_disk_holds_only_whole_lines(config: Path, env: dict[str, str], tmp_path: Path) -> None:
    disk = tmp_path / "disk"
    disk.mkdir()
    copy = tmp_path / "copy.log"
    # One page of disk: the first event, with the job's long command line, fits; a later one only in part.
    long_arg = "x" * 3600
    script = ('mount -t tmpfs -o size=4k tmpfs "$1" || exit 99; d=$1; c=$2; shift 2; '
              '"$@"; rc=$?; cp "$d/night.log" "$c"; exit $rc')
    cmd = [*_private_mount(), "sh", "-c", script, "sh", str(disk), str(copy),
           PY, "-m", "safegate", "exec", "--config", str(config), "--mem", "0", "--log", str(disk / "night.log"),
           "--", "sh", "-c", "exit 4", "sh", long_arg]
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=TIMEOUT, stdin=subprocess.DEVNULL)
    assert result.returncode == 4, result.stderr
    assert "cannot write --log" in result.stderr  # the disk did run full
    text = copy.read_text()
    assert text.endswith("\n")
    events = [json.loads(line)["event"] for line in text.splitlines()]  # every line whole JSON
    assert events[0] == "admitted" and "summary" not in events
