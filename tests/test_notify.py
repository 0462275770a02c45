"""exec --notify CMD (issue 16, item 4): a real command run on a breach and at the end with the facts in its
environment; a hanging notifier holds neither the job, nor the lock, nor safegate's own exit."""

from __future__ import annotations

import os
import signal
import subprocess
from pathlib import Path

from support import HELPERS, PY, TIMEOUT, lock_free, pids_with, wait_until

from safegate.exitcodes import ExitCode


def _exec(config: Path, *args: str) -> list[str]:
    return [PY, "-m", "safegate", "exec", "--config", str(config), "--mem", "0", *args]


def _facts(path: Path) -> dict[str, str]:
    return dict(line.split("=", 1) for line in path.read_text().splitlines() if line.startswith("SAFEGATE_"))


def test_a_breach_and_the_end_are_told_with_their_facts(config: Path, env: dict[str, str], tmp_path: Path) -> None:
    out = tmp_path / "told"
    out.mkdir()
    notifier = f'env > "{out}/$SAFEGATE_EVENT"'
    result = subprocess.run(_exec(config, "-p", "default", "--max-mem", "100M", "--notify", notifier, "--",
                                  PY, str(HELPERS / "hog.py"), "300", "16", "0.01"),
                            env=env, capture_output=True, text=True, timeout=TIMEOUT, stdin=subprocess.DEVNULL)
    assert result.returncode == ExitCode.KILLED_MEMORY, result.stderr
    wait_until(lambda: (out / "breach").exists() and (out / "end").exists(), what="both notifications")
    breach, end = _facts(out / "breach"), _facts(out / "end")
    assert breach["SAFEGATE_EVENT"] == "breach" and breach["SAFEGATE_REASON"] == "memory"
    assert breach["SAFEGATE_PROFILE"] == "default" and "--max-mem" in breach["SAFEGATE_MESSAGE"]
    assert end["SAFEGATE_EXIT_CODE"] == "20" and end["SAFEGATE_REASON"] == "memory"
    assert int(end["SAFEGATE_PEAK_MEMORY"]) > 50 << 20


def test_a_hanging_notifier_holds_neither_the_job_the_lock_nor_safegate(config: Path, env: dict[str, str],
                                                                      lock_dir: Path, tmp_path: Path) -> None:
    marker = f"notifier-{tmp_path.name}"
    try:
        # The caller reads safegate's stderr to its end, as cron and $(...) do: the notifier must not keep it open.
        hang = f"exec bash -c 'exec -a {marker} sleep 600'"
        result = subprocess.run(_exec(config, "--lock", "n1", "--notify", hang, "--", "sh", "-c", "exit 4"),
                                env=env, capture_output=True, text=True, timeout=TIMEOUT, stdin=subprocess.DEVNULL)
        assert result.returncode == 4, result.stderr
        assert lock_free(lock_dir / "n1.lock")
        wait_until(lambda: pids_with(marker), what="the notifier running on its own")
        assert not set(pids_with(marker)) & {os.getpid()}
    finally:
        wait_until(lambda: not [os.kill(p, signal.SIGKILL) for p in pids_with(marker)], what="no notifier left")


def test_a_failing_notifier_is_a_warning_not_a_failure(config: Path, env: dict[str, str]) -> None:
    result = subprocess.run(_exec(config, "--notify", "exit 3", "--", "sh", "-c", "exit 5"), env=env,
                            capture_output=True, text=True, timeout=TIMEOUT, stdin=subprocess.DEVNULL)
    assert result.returncode == 5, result.stderr  # the job's status, whatever the notifier did
    assert "warning: --notify: 'exit 3' exited 3" in result.stderr


def test_an_empty_notify_is_a_usage_error(config: Path, env: dict[str, str]) -> None:
    result = subprocess.run(_exec(config, "--notify", " ", "--", "true"), env=env, capture_output=True, text=True,
                            timeout=TIMEOUT, stdin=subprocess.DEVNULL)
    assert result.returncode == ExitCode.USAGE
    assert result.stderr.count("\n") == 1 and "--notify" in result.stderr
    assert "expected a shell command" in result.stderr
