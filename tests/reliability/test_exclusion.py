"""Promise 1: mutual exclusion under load, with flock(1) holders mixed in."""

from __future__ import annotations

import itertools
import subprocess
import sys
from pathlib import Path

from support import TIMEOUT, Procs, Run

HELPERS = Path(__file__).resolve().parent.parent / "helpers"


def test_fifty_concurrent_execs_and_flock_holders_never_overlap(run: Run, config: Path, lock_dir: Path,
                                                                 tmp_path: Path, procs: Procs) -> None:
    spans = tmp_path / "spans"
    lock_dir.mkdir(parents=True, exist_ok=True)
    record = [sys.executable, str(HELPERS / "record.py"), str(spans), "0.2"]
    execs = [procs.spawn([sys.executable, "-m", "safegate", "exec", "--config", str(config), "--mem", "0",
                          "--lock", "L", "--wait", "-q", "--", *record], env=run.env, stderr=subprocess.PIPE)
             for _ in range(50)]
    flocks = [procs.spawn(["flock", str(lock_dir / "L.lock"), *record]) for _ in range(5)]
    codes = [p.wait(timeout=TIMEOUT) for p in execs + flocks]
    assert codes == [0] * 55, [p.stderr.read() for p in execs if p.stderr and p.returncode]
    intervals = sorted(tuple(map(float, line.split())) for line in spans.read_text().splitlines())
    assert len(intervals) == 55
    overlaps = [(a, b) for a, b in itertools.pairwise(intervals) if b[0] < a[1]]
    assert not overlaps
