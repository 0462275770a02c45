"""Promise 7: no growth in fds or threads over 1,000 checks; exec stays small watching 1,000 processes."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from support import TIMEOUT, Procs, Run, job_pid, wait_until

import safegate


def _fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def test_thousand_checks_leak_nothing(monkeypatch: pytest.MonkeyPatch, lock_dir: Path, config: Path) -> None:
    monkeypatch.setenv("SAFEGATE_LOCK_DIR", str(lock_dir))
    for _ in range(20):  # warm up caches (imports, the NVML probe) before measuring
        safegate.check(mem=0, config=str(config))
    fds, threads = _fds(), threading.active_count()
    for _ in range(1000):
        assert safegate.check(mem=0, config=str(config)).ok
    print(f"after 1,000 checks: {_fds()} fds (before {fds}), {threading.active_count()} threads (before {threads})")
    assert (_fds(), threading.active_count()) == (fds, threads)


SPAWNER = 'for i in $(seq "$1"); do sleep 600 & done; echo ready; wait'


def test_exec_rss_watching_a_thousand_process_job(run: Run, config: Path, lock_dir: Path, procs: Procs) -> None:
    gate = procs.spawn([sys.executable, "-m", "safegate", "exec", "--config", str(config), "--mem", "0",
                        "--max-mem", "100G", "--", "bash", "-c", SPAWNER, "spawner", "1000"],
                       env=run.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert gate.stdout is not None
    assert gate.stdout.readline().strip() == b"ready"

    def job_size() -> int:
        out = subprocess.run(["pgrep", "-c", "-g", str(_job_pgid(lock_dir))], capture_output=True, text=True)
        return int(out.stdout.strip() or 0)

    wait_until(lambda: job_size() >= 1001, what="1,001 job processes")
    # Let it sample and rescan the whole tree (RESCAN is 1 s) until it has spent real CPU on it.
    spent = _cpu(gate.pid)
    wait_until(lambda: _cpu(gate.pid) >= spent + 0.03, what="safegate to rescan the tree")
    rss = _rss(gate.pid)
    print(f"safegate exec RSS watching {job_size()} processes: {rss / 1024**2:.1f} MiB")
    assert rss < 60 * 1024**2, f"safegate uses {rss / 1024**2:.1f} MiB"
    gate.terminate()
    assert gate.wait(timeout=TIMEOUT) == 128 + 15


def _job_pgid(lock_dir: Path) -> int:
    pid = job_pid(lock_dir)
    assert pid is not None
    return pid


def _rss(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


def _cpu(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
