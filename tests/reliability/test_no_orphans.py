"""Promise 3: after a breach or a forwarded SIGTERM, nothing of the job remains, and no zombie."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
from support import TIMEOUT, Procs, Run, wait_until

HELPERS = Path(__file__).resolve().parent.parent / "helpers"


def _marked(marker: str) -> list[int]:
    # The job's processes are named by exec -a: their command line starts with the marker (safegate's own
    # `--lock MARKER` only contains it, and must not count as the job having started).
    out = subprocess.run(["pgrep", "-f", f"^{marker}"], capture_output=True, text=True).stdout.split()
    return [int(p) for p in out]


def _states(pids: list[int]) -> list[str]:
    states = []
    for pid in pids:
        try:
            states.append(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0])
        except (OSError, IndexError):
            pass
    return states


JOBS = {
    # 200 children, each ignoring SIGTERM
    "fork200": 'for i in $(seq 200); do (trap "" TERM; exec -a "$M" sleep 600) & done; wait',
    # a grandchild that double-forks and setsids
    "doublefork": '( (setsid bash -c "exec -a \\"$M\\" sleep 600" &) & ); exec -a "$M" sleep 600',
    # the main process ignores SIGTERM, its child does too
    "ignoreterm": 'trap "" TERM; (trap "" TERM; exec -a "$M" sleep 600) & exec -a "$M" sleep 600',
    # the main process exits while its children live on
    "exitearly": '(exec -a "$M" sleep 600) & (setsid bash -c "exec -a \\"$M\\" sleep 600" &) ; sleep 0.5; exit 0',
}


@pytest.mark.parametrize("how", ["forwarded-sigterm", "breach"])
@pytest.mark.parametrize("job", sorted(JOBS))
def test_nothing_of_the_job_remains(run: Run, config: Path, procs: Procs, job: str, how: str) -> None:
    marker = f"sgorphan-{uuid.uuid4().hex[:12]}"
    # MemAvailable is always at or below all of RAM: a breach at the first sample, whatever the job holds (a
    # --max-mem at its floor, 1 MiB, is more than a small job holds in a cgroup).
    extra = ["--min-available", "100%"] if how == "breach" else []
    gate = procs.spawn([sys.executable, "-m", "safegate", "exec", "--config", str(config), "--mem", "0",
                        "--lock", marker, "--grace", "1s", "--interval", "50ms", *extra, "--",
                        "bash", "-c", JOBS[job]], env={**run.env, "M": marker}, stderr=subprocess.PIPE)
    try:
        if how == "forwarded-sigterm":
            wait_until(lambda: len(_marked(marker)) >= (200 if job == "fork200" else 1),
                       what="the job's processes")
            os.kill(gate.pid, signal.SIGTERM)
            if job == "ignoreterm":
                # Forwarded and ignored, as without safegate; the job does not ignore SIGINT.
                os.kill(gate.pid, signal.SIGINT)
        gate.wait(timeout=TIMEOUT)
        left = _marked(marker)
        assert not left, (left, _states(left))
    finally:
        for pid in _marked(marker):
            os.kill(pid, signal.SIGKILL)
