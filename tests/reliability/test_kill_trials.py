"""Promise 2: SIGKILL safegate at random moments; no lost lock, no stuck lock, no lying metadata."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from support import TIMEOUT, Procs, Run, holder_files, wait_until

import safegate

HELPERS = Path(__file__).resolve().parent.parent / "helpers"
TRIALS = 100
PARALLEL = 4


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state not in ("Z", "X")


def _lock_free(path: Path) -> bool:
    return subprocess.run(["flock", "-n", str(path), "true"]).returncode == 0


def _job_pids(marker: str) -> list[int]:
    out = subprocess.run(["pgrep", "-f", marker], capture_output=True, text=True).stdout.split()
    return [int(p) for p in out]


def test_sigkill_at_random_moments(run: Run, config: Path, lock_dir: Path, procs: Procs,
                                   monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SAFEGATE_LOCK_DIR", str(lock_dir))
    rng = random.Random(20261123)
    phases = {"preflight": 0, "running": 0, "escalation": 0}
    for round_start in range(0, TRIALS, PARALLEL):
        trials = []
        for n in range(round_start, round_start + PARALLEL):
            lock = f"t{n}"
            marker = f"sgtrial-{os.getpid()}-{n}"
            escalate = n % 4 == 3
            if escalate:
                # A hog past --max-mem that ignores SIGTERM: safegate is killed during the grace period.
                job = [sys.executable, str(HELPERS / "hog.py"), "200", "16", "0.005", "ignore-term", marker]
                extra = ["--max-mem", "50M", "--grace", "5s"]
            else:
                job = ["bash", "-c", f'exec -a "{marker}" sleep 0.8']
                extra = []
            gate = procs.spawn([sys.executable, "-m", "safegate", "exec", "--config", str(config), "--mem", "0",
                                "--lock", lock, *extra, "--", *job], env=run.env, stderr=subprocess.PIPE)
            delay = rng.uniform(0.0, 1.4)
            trials.append((gate, lock, marker, delay, escalate))
        started = time.monotonic()
        for gate, lock, _marker, delay, escalate in sorted(trials, key=lambda t: t[3]):
            time.sleep(max(0.0, started + delay - time.monotonic()))
            held_before = bool(holder_files(lock_dir, lock))
            os.kill(gate.pid, signal.SIGKILL)
            gate.wait(timeout=TIMEOUT)
            phases["escalation" if escalate and held_before else "running" if held_before else "preflight"] += 1
        for _gate, lock, marker, _delay, escalate in trials:
            lock_file = lock_dir / f"{lock}.lock"
            pids = _job_pids(marker)
            procs.orphans.extend(pids)
            if any(_alive(p) for p in pids) and lock_file.exists():
                # While a job process lives, the lock it inherited is held.
                assert not _lock_free(lock_file), (lock, pids)
            # The job got SIGTERM (parent-death signal); an escalation hog ignores it and is killed here,
            # as its user would: then nothing of the job lives and the lock must be free.
            for pid in pids:
                if escalate and _alive(pid):
                    os.kill(pid, signal.SIGKILL)
            wait_until(lambda m=marker: not [p for p in _job_pids(m) if _alive(p)],
                       what=f"job of {lock} to end")
            if lock_file.exists():
                wait_until(lambda f=lock_file: _lock_free(f), what=f"{lock} to be free")
            # In-process (the API runs the same checks and admission as the CLI) to keep 100 trials fast.
            verdict = safegate.check(mem=0, lock=lock, config=str(config), reserve=False)  # only asking
            assert verdict.ok, [c.reason for c in verdict.failures]
            left = holder_files(lock_dir, lock)
            assert not left, [json.loads(p.read_text()) for p in left]
            # Not waiting: a lock left held or metadata left lying would raise Blocked here.
            with safegate.hold(lock, wait=False, mem=0, config=str(config)):
                pass
    print(f"kill trials by phase: {phases}")
    assert sum(phases.values()) == TRIALS
    # The random delays must have hit every phase at least a few times, or the trial proves little.
    assert all(count >= 3 for count in phases.values()), phases
