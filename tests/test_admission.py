"""Issue 22 item 2: the machine-wide admission lock is held only for bounded work; a busy one is a wait, and one
held past its deadline names its holder with an exit code of its own (not 3, a configuration error)."""

from __future__ import annotations

import os
import signal
import subprocess
from pathlib import Path

import pytest
from support import PY, TIMEOUT, Procs, Run, wait_until

from safegate.errors import AdmissionStuck
from safegate.exitcodes import ExitCode
from safegate.locks.files import ADMISSION_FILE, admission, ensure_directory


def _hold_admission(procs: Procs, lock_dir: Path) -> subprocess.Popen[bytes]:
    ensure_directory(lock_dir)
    path = lock_dir / ADMISSION_FILE
    holder = procs.spawn(["flock", str(path), "sleep", "600"])
    wait_until(lambda: subprocess.run(["flock", "-n", str(path), "true"]).returncode != 0, what="admission held")
    return holder


def test_a_busy_admission_lock_is_waited_for(run: Run, config: Path, lock_dir: Path, procs: Procs) -> None:
    holder = _hold_admission(procs, lock_dir)
    job = procs.spawn([PY, "-m", "safegate", "exec", "--config", str(config), "--mem", "0", "--", "true"],
                      env=run.env, stderr=subprocess.PIPE)
    # It waits (and says nothing is wrong) for as long as the admission lock is busy; then it runs.
    wait_until(lambda: Path(f"/proc/{job.pid}/stat").exists(), what="the exec")
    assert job.poll() is None
    os.killpg(holder.pid, signal.SIGKILL)
    assert job.wait(timeout=TIMEOUT) == 0, job.stderr.read() if job.stderr else ""


def test_an_admission_lock_held_past_its_deadline_names_its_holder(lock_dir: Path, procs: Procs) -> None:
    holder = _hold_admission(procs, lock_dir)
    with pytest.raises(AdmissionStuck) as stuck, admission(lock_dir, timeout=0.5):
        pass
    message = str(stuck.value)
    assert stuck.value.exit_code == ExitCode.ADMISSION_STUCK == 5
    assert f"pid {holder.pid}" in message or "sleep 600" in message, message
