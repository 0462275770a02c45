"""Promise 8: degraded machines still get answers; promise 9: wall-clock jumps do not break waits."""

from __future__ import annotations

import json
import resource
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from support import TIMEOUT, Nobody, Procs, Run, hold_with_flock

from safegate.config.file import load_config
from safegate.config.model import ThermalConfig
from safegate.gate import admission
from safegate.gate import preflight as gate_module
from safegate.probes.memory import read_pressure
from safegate.probes.thermal import read_thermal


def test_no_pressure_file_no_sensors_garbage_sensors(tmp_path: Path) -> None:
    assert read_pressure(str(tmp_path / "absent")) is None
    garbage = tmp_path / "garbage"
    garbage.write_bytes(b"\xff\xfe not a number")
    error_dir = tmp_path / "a-directory"
    error_dir.mkdir()
    snap = read_thermal(ThermalConfig(sensors=(), files=(str(garbage), str(error_dir), str(tmp_path / "gone"))))
    assert snap.readings == () and len(snap.notes) == 3


def test_check_answers_with_unknowns(run: Run, tmp_path: Path) -> None:
    cfg = tmp_path / "c.toml"
    cfg.write_text('[defaults]\nmemory_margin = "0"\nmax_memory_pressure = 100\n'
                   f'[thermal]\nsensors = []\nfiles = ["{tmp_path / "broken"}"]\n')
    data = json.loads(run("check", "--config", str(cfg), "--mem", "0", "--json").stdout)
    thermal = next(c for c in data["checks"] if c["name"] == "thermal")
    assert data["exit_code"] == 0 and thermal["status"] == "unknown" and "unreadable" in thermal["reason"]


def test_other_users_processes_as_nobody(nobody: Nobody, config: Path, procs: Procs) -> None:
    whisper = procs.spawn_named("whisper --model large-v3 root-owned.mp3")
    cfg = nobody.workdir / "config.toml"
    cfg.write_text(config.read_text().replace(str(config.parent / "temp1_input"), str(nobody.workdir / "t")))
    (nobody.workdir / "t").write_text("40000")
    locks = nobody.workdir / "locks"
    locks.mkdir(mode=0o1777)
    locks.chmod(0o1777)
    result = nobody.run(["-m", "safegate", "check", "--config", str(cfg), "-p", "whisper-large-v3", "--mem", "0",
                         "--json"], env={"SAFEGATE_LOCK_DIR": str(locks)})
    assert "Traceback" not in result.stderr, result.stderr
    data = json.loads(result.stdout)
    competing = next(c for c in data["checks"] if c["name"] == "competing")
    # root's process is seen and matched from an unprivileged account (whatever else the machine runs).
    assert data["exit_code"] == 14 and whisper.pid in [m["pid"] for m in competing["values"]["matches"]]


def _limit_file_size() -> None:
    # Every file write beyond 0 bytes fails with EFBIG, as on a full disk (Python ignores SIGXFSZ).
    resource.setrlimit(resource.RLIMIT_FSIZE, (0, 0))


def test_full_disk_for_log_history_and_metadata(config: Path, env: dict[str, str], tmp_path: Path) -> None:
    log = tmp_path / "events.jsonl"
    result = subprocess.run([sys.executable, "-m", "safegate", "exec", "--config", str(config), "--mem", "0",
                             "--log", str(log), "--", "sh", "-c", "exit 5"], env=env, capture_output=True,
                            text=True, timeout=TIMEOUT, preexec_fn=_limit_file_size)
    assert result.returncode == 5, result.stderr
    assert "Traceback" not in result.stderr
    assert result.stderr.count("cannot write --log") == 1
    assert "cannot record the run" in result.stderr
    assert "holder metadata not written" in result.stderr
    # /dev/full: every write fails with ENOSPC.
    result = subprocess.run([sys.executable, "-m", "safegate", "exec", "--config", str(config), "--mem", "0",
                             "--log", "/dev/full", "--", "true"], env=env, capture_output=True, text=True,
                            timeout=TIMEOUT)
    assert result.returncode == 0 and result.stderr.count("cannot write --log /dev/full") == 1


def test_wall_clock_jumps_do_not_break_waits(monkeypatch: pytest.MonkeyPatch, config: Path, lock_dir: Path,
                                             procs: Procs) -> None:
    monkeypatch.setenv("SAFEGATE_LOCK_DIR", str(lock_dir))
    hold_with_flock(procs, lock_dir / "heavy.lock")
    real_time = time.time
    jumps = iter([0.0, 3.2e7, -3.2e7, 86400.0, -1e9] * 1000)
    monkeypatch.setattr(time, "time", lambda: real_time() + next(jumps))  # the wall clock jumps back and forth
    settings = gate_module.resolve(load_config(str(config)), "default", {})
    outcome: list[tuple[bool, float]] = []

    def wait() -> None:
        started = time.monotonic()
        verdict = admission.wait_until_clear(settings, timeout=1.0)
        outcome.append((verdict.ok, time.monotonic() - started))

    # A deadline on the wall clock would end at the +1 year jump (too early) or wait out the -1e9 s one
    # (for ever): the wait must last its 1 s and then return.
    waiter = threading.Thread(target=wait, daemon=True)
    waiter.start()
    waiter.join(TIMEOUT)
    assert outcome, f"the 1 s wait did not return within {TIMEOUT}s"
    ok, elapsed = outcome[0]
    assert not ok and elapsed >= 1.0


def test_deadlines_use_the_monotonic_clock() -> None:
    # Waits, grace periods and sampling deadlines must survive wall-clock jumps: none may read time.time().
    # (time.time is used only for timestamps shown to people: started_at, log lines, history.)
    import ast

    root = Path(gate_module.__file__).parent.parent
    for name in ("gate/preflight.py", "gate/admission.py", "gate/grant.py", "gate/queue.py", "run/supervisor.py",
                 "locks/backoff.py", "locks/files.py", "locks/holders.py", "locks/store.py", "gate/watch.py",
                 "run/limits.py", "run/watchers.py", "run/sampler.py", "run/job.py", "run/outcome.py", "api.py",
                 "run/jobrun.py"):
        tree = ast.parse((root / name).read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.Call) and getattr(node.func, "attr", "") == "time" and \
                    getattr(getattr(node.func, "value", None), "id", "") == "time":
                line = (root / name).read_text().splitlines()[node.lineno - 1]
                assert any(word in line for word in ("started_at", "time=", "Run(", "now = time.time() if now")), \
                    f"{name}:{node.lineno}: {line.strip()}"
