"""The built-in whisper-large-v3 profile end to end on a busy machine: another user runs unmanaged Whisper large
jobs and a program with a 1 MiB command line, as on a shared workstation. Verdicts about those processes are
what the rules say; verdicts about the test's own jobs must not change because of them."""

from __future__ import annotations

import itertools
import json
import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from support import HELPERS, PY, TIMEOUT, Procs, Run, cmdline, descendants, neutral_config, wait_until

from safegate.exitcodes import ExitCode

MiB = 1024**2
SLEEPER = "import time\ntime.sleep(600)\n"


@dataclass(frozen=True)
class OtherUser:
    name: str
    whisper: int  # pid of an unmanaged `whisper --model large-v3 <1 MiB of paths>`
    big: int  # pid of a program with a 1 MiB command line that names no model


def _huge_args(prefix: str) -> list[str]:
    """About 1 MiB of arguments (each far below the kernel's 128 KiB per-argument limit)."""
    return [f"/data/{prefix}/episode-{i:05d}-{'x' * 480}.mp3" for i in range(2100)]


def _start_as(procs: Procs, user: str, argv: list[str]) -> int:
    proc = procs.spawn(["runuser", "-u", user, "--", *argv], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)

    def started() -> int:
        if proc.poll() is not None:
            assert proc.stderr is not None
            pytest.fail(f"{user} could not start {argv[1]}: {proc.stderr.read().decode()[-300:]}")
        return next((p for p in descendants([proc.pid]) | {proc.pid}
                     if cmdline(p).startswith(argv[0]) and Path(f"/proc/{p}").stat().st_uid != 0), 0)

    pid = wait_until(started, what=f"{user}'s {Path(argv[1]).name}")
    procs.orphans.append(pid)
    return pid


@pytest.fixture
def other_user(procs: Procs) -> Iterator[OtherUser]:
    if os.geteuid() != 0:
        pytest.skip("needs root to run processes as another user (runuser -u nobody)")
    if shutil.which("runuser") is None:
        pytest.skip("runuser is not installed")
    python = shutil.which("python3", path="/usr/bin:/bin")  # one the other user can run (not a venv under /root)
    if python is None:
        pytest.skip("no system python3 for the other user's processes")
    bindir = Path(tempfile.mkdtemp(prefix="safegate-other-user-"))
    try:
        os.chmod(bindir, 0o755)
        # Shaped like the real openai-whisper console script: `python .../bin/whisper --model large-v3 ...`.
        for name in ("whisper", "transcode"):
            (bindir / name).write_text(SLEEPER)
            (bindir / name).chmod(0o755)
        whisper = _start_as(procs, "nobody", [python, str(bindir / "whisper"), "--model", "large-v3",
                                              *_huge_args("whisper")])
        big = _start_as(procs, "nobody", [python, str(bindir / "transcode"), *_huge_args("plain")])
        assert len(cmdline(whisper)) > MiB and len(cmdline(big)) > MiB
        yield OtherUser("nobody", whisper, big)
    finally:
        shutil.rmtree(bindir, ignore_errors=True)


def _matches(result: subprocess.CompletedProcess[str]) -> list[dict[str, object]]:
    checks = json.loads(result.stdout)["checks"]
    return next(c for c in checks if c["name"] == "competing")["values"]["matches"]


def test_the_other_users_whisper_blocks_the_builtin_profile(run: Run, config: Path, other_user: OtherUser) -> None:
    # An unmanaged Whisper large job of another user competes for the same machine: the built-in rule sees
    # it (across users, through a 1 MiB command line) and says 14; the plain 1 MiB program is no Whisper.
    result = run("check", "--config", str(config), "-p", "whisper-large-v3", "--mem", "0", "--json")
    assert result.returncode == ExitCode.COMPETING, result.stdout
    pids = [m["pid"] for m in _matches(result)]
    assert other_user.whisper in pids and other_user.big not in pids


def test_whisper_profile_with_the_tests_own_rule_is_not_blocked_by_others(
        run: Run, tmp_path: Path, sensor: Path, procs: Procs, other_user: OtherUser) -> None:
    # The profile's match, lock and limits stay built-in; the competing rule names only what this test starts.
    token = f"sgtest-{os.getpid()}-{tmp_path.name}"
    cfg = tmp_path / "own-rule.toml"
    cfg.write_text(neutral_config(sensor, f"[profiles.whisper-large-v3]\ncompeting = [{{ pattern = '{token}', "
                                          'action = "block" }]\n'))
    result = run("check", "--config", str(cfg), "-p", "whisper-large-v3", "--mem", "0", "--json")
    assert result.returncode == 0, result.stdout
    mine = procs.spawn_named(f"whisper --model large-v3 {token}.mp3")
    result = run("check", "--config", str(cfg), "-p", "whisper-large-v3", "--mem", "0", "--json")
    assert result.returncode == ExitCode.COMPETING
    assert [m["pid"] for m in _matches(result)] == [mine.pid]


def test_exec_picks_the_whisper_profile_and_runs_one_at_a_time(run: Run, tmp_path: Path, sensor: Path,
                                                                procs: Procs, other_user: OtherUser) -> None:
    cfg = tmp_path / "own-rule.toml"
    cfg.write_text(neutral_config(sensor, "[profiles.whisper-large-v3]\ncompeting = []\n"))
    result = run("exec", "--config", str(cfg), "--mem", "0", "--", "sh", "-c", "exit 0", "whisper", "--model",
                 "large-v3")
    assert result.returncode == 0, result.stderr
    assert "(profile whisper-large-v3, lock whisper-large)" in result.stderr
    spans = tmp_path / "spans"
    cmd = [PY, "-m", "safegate", "exec", "--config", str(cfg), "-p", "whisper-large-v3", "--mem", "0", "--wait",
           "-q", "--", PY, str(HELPERS / "record.py"), str(spans), "0.2"]
    gates = [procs.spawn(cmd, env=run.env, stderr=subprocess.PIPE) for _ in range(3)]
    assert [g.wait(timeout=TIMEOUT) for g in gates] == [0, 0, 0]
    intervals = sorted(tuple(map(float, line.split())) for line in spans.read_text().splitlines())
    assert len(intervals) == 3
    assert all(b[0] >= a[1] for a, b in itertools.pairwise(intervals)), intervals
