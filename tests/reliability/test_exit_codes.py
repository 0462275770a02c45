"""Promise 4: every exit status 0-255 and the common signals come through exec as documented."""

from __future__ import annotations

import signal
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from conftest import Run

SIGNALS = [signal.SIGHUP, signal.SIGINT, signal.SIGQUIT, signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2,
           signal.SIGKILL]


def _exec(run: Run, config: Path, lock: str, script: str) -> int:
    cmd = [sys.executable, "-m", "safegate", "exec", "--config", str(config), "--mem", "0", "--lock", lock, "-q",
           "--", "sh", "-c", script]
    return subprocess.run(cmd, env=run.env, stdin=subprocess.DEVNULL, capture_output=True, timeout=120).returncode


def test_every_exit_status_passes_through(run: Run, config: Path) -> None:
    with ThreadPoolExecutor(max_workers=6) as pool:
        codes = list(pool.map(lambda c: _exec(run, config, f"code{c}", f"exit {c}"), range(256)))
    assert codes == list(range(256))


def test_death_by_signal_is_128_plus_n(run: Run, config: Path) -> None:
    with ThreadPoolExecutor(max_workers=6) as pool:
        codes = list(pool.map(lambda s: _exec(run, config, f"sig{int(s)}", f"kill -{int(s)} $$"), SIGNALS))
    assert codes == [128 + int(s) for s in SIGNALS]
