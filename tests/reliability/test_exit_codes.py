"""Promise 4: every exit status 0-255 and the common signals come through exec as documented."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from support import HELPERS, TIMEOUT, Run

SIGNALS = [signal.SIGHUP, signal.SIGINT, signal.SIGQUIT, signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2,
           signal.SIGKILL]
# Statuses that take a path of their own through a safegate process's exit: success, plain failure, those
# equal to safegate's own codes (usage, config, blocked 10-14, stopped 20-22, internal, 126/127), the
# 128+N range of signals, and the top.
CHOSEN = [0, 1, 2, 3, 10, 11, 12, 13, 14, 20, 21, 22, 42, 124, 125, 126, 127, 128, 129, 130, 137, 143, 254, 255]


def _exec(run: Run, config: Path, lock: str, script: str) -> int:
    cmd = [sys.executable, "-m", "safegate", "exec", "--config", str(config), "--mem", "0", "--lock", lock, "-q",
           "--", "sh", "-c", script]
    return subprocess.run(cmd, env=run.env, stdin=subprocess.DEVNULL, capture_output=True,
                          timeout=TIMEOUT).returncode


def test_every_exit_status_passes_through(run: Run, config: Path) -> None:
    # All 256 through the CLI's entry point, in two interpreters side by side (one per core)...
    halves = [subprocess.Popen([sys.executable, str(HELPERS / "exec_many.py"), str(config), str(a), str(b)],
                               env=run.env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True) for a, b in ((0, 127), (128, 255))]
    codes = []
    for half in halves:
        out, err = half.communicate(timeout=TIMEOUT)
        assert half.returncode == 0, err
        codes += json.loads(out)
    assert codes == list(range(256))


def test_chosen_exit_statuses_pass_through_a_safegate_process(run: Run, config: Path) -> None:
    # ...and as the exit status of a safegate process of its own, for every kind of status.
    with ThreadPoolExecutor(max_workers=4) as pool:
        codes = list(pool.map(lambda c: _exec(run, config, f"code{c}", f"exit {c}"), CHOSEN))
    assert codes == CHOSEN


def test_death_by_signal_is_128_plus_n(run: Run, config: Path) -> None:
    with ThreadPoolExecutor(max_workers=4) as pool:
        codes = list(pool.map(lambda s: _exec(run, config, f"sig{int(s)}", f"kill -{int(s)} $$"), SIGNALS))
    assert codes == [128 + int(s) for s in SIGNALS]
