"""The real CLI in a subprocess: every exit code, --json, -q, --wait, bad input."""

from __future__ import annotations

import json
import os
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from support import (
    TIMEOUT,
    Procs,
    Run,
    hold_with_flock,
    hold_with_safegate,
    holder_files,
    neutral_config,
    set_temp,
)

from safegate.exitcodes import ExitCode

PASSING = ["--mem", "0"]  # with the neutral config, nothing about this machine's memory matters


def check(run: Run, config: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return run("check", "--config", str(config), *args)


def no_traceback(result: subprocess.CompletedProcess[str]) -> None:
    assert "Traceback" not in result.stderr and "Traceback" not in result.stdout


def test_exit_0_when_everything_passes(run: Run, config: Path) -> None:
    result = check(run, config, *PASSING)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.startswith("safe to start (profile default)")
    for name in ("stale_locks", "memory", "memory_pressure", "gpu", "thermal", "lock", "competing"):
        assert name in result.stdout


def test_quiet_prints_nothing_on_success(run: Run, config: Path) -> None:
    result = check(run, config, *PASSING, "-q")
    assert (result.returncode, result.stdout, result.stderr) == (0, "", "")


def test_exit_10_when_need_exceeds_memory(run: Run, config: Path) -> None:
    result = check(run, config, "--mem", "1000T", "-q")
    assert result.returncode == ExitCode.MEMORY
    assert result.stdout == "" and "memory" in result.stderr and "can never fit" in result.stderr


def test_exit_10_with_percentage_margin(run: Run, config: Path) -> None:
    assert check(run, config, "--mem", "0", "--margin", "100%").returncode == ExitCode.MEMORY


def test_exit_12_when_sensor_file_is_hot(run: Run, config: Path, sensor: Path) -> None:
    set_temp(sensor, 80)
    result = check(run, config, *PASSING)
    assert result.returncode == ExitCode.THERMAL
    assert "80 C >= max_temp 80 C" in result.stdout
    set_temp(sensor, 79.9)
    assert check(run, config, *PASSING).returncode == 0
    assert check(run, config, *PASSING, "--max-temp", "79").returncode == ExitCode.THERMAL


def test_no_sensor_is_unknown_unless_required(run: Run, tmp_path: Path) -> None:
    cfg = tmp_path / "nosensor.toml"
    cfg.write_text('[defaults]\nmemory_margin = "0"\nmax_memory_pressure = 100\n[thermal]\nsensors = []\n')
    result = check(run, cfg, *PASSING, "--json")
    assert result.returncode == 0
    thermal = next(c for c in json.loads(result.stdout)["checks"] if c["name"] == "thermal")
    assert thermal["status"] == "unknown"
    cfg.write_text(cfg.read_text() + "require = true\n")
    assert check(run, cfg, *PASSING).returncode == ExitCode.THERMAL


def test_exit_13_when_flock1_holds_the_lock(run: Run, config: Path, lock_dir: Path, procs: Procs) -> None:
    hold_with_flock(procs, lock_dir / "heavy.lock")
    result = check(run, config, *PASSING)
    assert result.returncode == ExitCode.LOCKED
    assert "lock 'heavy' is held" in result.stdout
    # Another lock name is unaffected.
    assert check(run, config, *PASSING, "--lock", "other").returncode == 0


def test_exit_13_names_the_safegate_holder(run: Run, config: Path, lock_dir: Path, procs: Procs) -> None:
    holder = hold_with_safegate(procs, lock_dir, "whisper-large", profile="whisper-large-v3")
    result = check(run, config, "-p", "whisper-large-v3", "--mem", "0", "--json")
    assert result.returncode == ExitCode.LOCKED
    lock = next(c for c in json.loads(result.stdout)["checks"] if c["name"] == "lock")
    assert lock["status"] == "fail" and lock["values"]["holder"]["pid"] == holder.pid
    assert lock["values"]["holder"]["profile"] == "whisper-large-v3"
    assert f"pid {holder.pid}" in lock["reason"]


def _competing_pids(result: subprocess.CompletedProcess[str]) -> list[int]:
    checks = json.loads(result.stdout)["checks"]
    return [m["pid"] for m in next(c for c in checks if c["name"] == "competing")["values"]["matches"]]


def test_exit_14_when_a_competing_whisper_runs(run: Run, config: Path, procs: Procs, sensor: Path,
                                               tmp_path: Path) -> None:
    # The built-in whisper-large-v3 rules: whatever else runs on the machine, our unmanaged job is among
    # the blocking matches, and the verdict is 14.
    whisper = procs.spawn_named("whisper --model large-v3 talk.mp3")
    result = check(run, config, "-p", "whisper-large-v3", "--mem", "0", "--json")
    assert result.returncode == ExitCode.COMPETING, result.stdout
    assert whisper.pid in _competing_pids(result)
    # The built-in default profile has no blocking rule for it (only a warning for processes over 25% of RAM).
    builtin_rules = tmp_path / "builtin-rules.toml"
    builtin_rules.write_text(neutral_config(sensor).replace("competing = []\n", ""))
    result = check(run, builtin_rules, *PASSING, "--json")
    assert result.returncode == 0, result.stdout
    assert whisper.pid not in _competing_pids(result)


def test_safegate_never_matches_its_caller(run: Run, config: Path, env: dict[str, str]) -> None:
    # A script whose own command line looks like Whisper large calls safegate: it must not block itself.
    # "; exit" keeps bash from exec'ing python in place of itself, so the launcher stays an ancestor.
    inner = '"$0" -m safegate check --config "$1" -p whisper-large-v3 --mem 0 --json; exit $?'
    script = f'exec -a "whisper large launcher" bash -c \'{inner}\' {sys.executable} {config}'
    launcher = subprocess.Popen(["bash", "-c", script], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True, stdin=subprocess.DEVNULL)
    out, err = launcher.communicate(timeout=TIMEOUT)
    result = subprocess.CompletedProcess(launcher.args, launcher.returncode, out, err)
    matched = _competing_pids(result)
    # Other processes on the machine may match and block (14); the launcher never does.
    assert launcher.pid not in matched, out
    assert result.returncode == (ExitCode.COMPETING if matched else 0), out + err


def test_first_failure_in_documented_order_wins(run: Run, config: Path, sensor: Path, lock_dir: Path,
                                                procs: Procs) -> None:
    set_temp(sensor, 95)
    hold_with_flock(procs, lock_dir / "whisper-large.lock")
    procs.spawn_named("whisper large-v3 x")
    result = check(run, config, "-p", "whisper-large-v3", "--mem", "1000T", "--json")
    data = json.loads(result.stdout)
    failing = [c["name"] for c in data["checks"] if c["status"] == "fail"]
    assert failing == ["memory", "thermal", "lock", "competing"]
    assert result.returncode == data["exit_code"] == ExitCode.MEMORY
    result = check(run, config, "-p", "whisper-large-v3", "--mem", "0")
    assert result.returncode == ExitCode.THERMAL
    set_temp(sensor, 40)
    assert check(run, config, "-p", "whisper-large-v3", "--mem", "0").returncode == ExitCode.LOCKED


def test_json_shape(run: Run, config: Path) -> None:
    result = check(run, config, "-p", "whisper-large-v3", "--mem", "2G", "--json")
    data = json.loads(result.stdout)
    assert set(data) == {"verdict", "exit_code", "profile", "checks"}
    assert data["profile"] == "whisper-large-v3" and data["verdict"] in ("pass", "blocked")
    names = [c["name"] for c in data["checks"]]
    assert names == ["stale_locks", "memory", "memory_pressure", "gpu", "thermal", "lock", "competing"]
    for c in data["checks"]:
        assert set(c) == {"name", "status", "reason", "values", "thresholds", "exit_code_if_failing"}
        assert c["status"] in ("pass", "fail", "warn", "unknown", "none")
    memory = data["checks"][1]
    assert memory["values"]["need"] == 2 * 1024**3 and memory["thresholds"]["margin"] == 0
    thermal = data["checks"][4]
    assert thermal["values"]["hottest"] == 40.0 and thermal["thresholds"]["max_temp"] == 80


def test_stale_holder_is_removed_and_reported(run: Run, config: Path, lock_dir: Path, procs: Procs) -> None:
    holder = hold_with_safegate(procs, lock_dir, "heavy")
    assert check(run, config, *PASSING).returncode == ExitCode.LOCKED
    os.kill(holder.pid, signal.SIGKILL)
    holder.wait()
    result = check(run, config, *PASSING, "--no-grant")  # only asking: no grant's record of its own beside
    assert result.returncode == 0
    assert f"removed stale holder of lock 'heavy': pid {holder.pid}" in result.stdout
    assert not holder_files(lock_dir)
    assert "no stale locks" in check(run, config, *PASSING).stdout


def test_legacy_lock_files(run: Run, tmp_path: Path, sensor: Path, procs: Procs) -> None:
    legacy = tmp_path / "j5a_locks" / "whisper_large.lock"
    legacy.parent.mkdir()
    cfg = tmp_path / "legacy.toml"
    cfg.write_text(f'legacy_lock_files = ["{legacy}"]\n' + neutral_config(sensor))
    live = procs.spawn(["sleep", "600"])
    legacy.write_text(f"{live.pid}\n")
    result = check(run, cfg, *PASSING)
    assert result.returncode == ExitCode.LOCKED and f"names live pid {live.pid}" in result.stdout
    live.kill()
    live.wait()
    result = check(run, cfg, *PASSING)
    assert result.returncode == 0 and "stale legacy lock file" in result.stdout
    assert not legacy.exists()


def test_wait_ends_when_lock_released(run: Run, config: Path, lock_dir: Path, procs: Procs) -> None:
    holder = hold_with_flock(procs, lock_dir / "heavy.lock")
    waiter = procs.spawn([sys.executable, "-m", "safegate", "check", "--config", str(config), *PASSING, "--wait"],
                         env=run.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=False)
    assert waiter.stderr is not None
    assert b"waiting: lock" in waiter.stderr.readline()
    assert waiter.poll() is None
    os.killpg(holder.pid, signal.SIGKILL)
    assert waiter.wait(timeout=TIMEOUT) == 0


def read_until(proc: subprocess.Popen[bytes], needle: bytes, timeout: float = TIMEOUT) -> bytes:
    """Read the waiter's stderr lines until one holds *needle*, failing at the deadline."""
    assert proc.stderr is not None
    deadline = time.monotonic() + timeout
    seen = b""
    while time.monotonic() < deadline:
        ready, _, _ = select.select([proc.stderr], [], [], 0.2)
        if ready:
            line = proc.stderr.readline()
            seen += line
            if needle in line:
                return line
            if not line:
                break
    pytest.fail(f"{needle!r} not seen on stderr within {timeout}s; saw {seen!r}")


def test_wait_resumes_only_below_resume_temp(run: Run, config: Path, sensor: Path, procs: Procs) -> None:
    set_temp(sensor, 85)
    waiter = procs.spawn([sys.executable, "-m", "safegate", "check", "--config", str(config), *PASSING, "--wait"],
                         env=run.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert waiter.stderr is not None
    assert b"at 85 C >= max_temp 80 C" in waiter.stderr.readline()
    set_temp(sensor, 77)  # below max_temp 80 but not below resume_temp 75: keep waiting
    read_until(waiter, b"at 77 C >= resume_temp 75 C")
    assert waiter.poll() is None
    set_temp(sensor, 74)
    assert waiter.wait(timeout=TIMEOUT) == 0


def test_wait_timeout_returns_the_blocking_code(run: Run, config: Path, lock_dir: Path, procs: Procs) -> None:
    hold_with_flock(procs, lock_dir / "heavy.lock")
    started = time.monotonic()
    result = check(run, config, *PASSING, "--wait", "--timeout", "1s", "-q")
    assert result.returncode == ExitCode.LOCKED
    assert time.monotonic() - started >= 1.0
    assert "lock" in result.stderr


@pytest.mark.parametrize(
    ("args", "code", "message"),
    [
        (["--mem", "10GG"], 2, "--mem: invalid size '10GG'"),
        (["--margin", "-1G"], 2, "--margin: invalid size '-1G'"),
        (["--max-temp", "abc"], 2, "--max-temp: invalid temperature 'abc'"),
        (["--lock", "../x"], 2, "--lock: invalid lock name '../x'"),
        (["--timeout", "soon", "--wait"], 2, "--timeout: invalid duration 'soon'"),
        (["--timeout", "5s"], 2, "--timeout: only meaningful with --wait"),
        (["--bogus"], 2, "No such option: --bogus"),
        (["--mem"], 2, "--mem"),
        (["-p", "nope"], 3, "unknown profile 'nope'"),
        (["--config", "/nonexistent/config.toml"], 3, "file not found"),
    ],
)
def test_bad_input_is_one_line_and_documented_code(run: Run, args: list[str], code: int, message: str) -> None:
    result = run("check", *args)
    assert result.returncode == code
    assert message in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert result.stdout == ""
    no_traceback(result)


@pytest.mark.parametrize(
    ("args", "code", "message"),
    [
        (["check", "-p", "whsiper-large-v3"], 3, "unknown profile 'whsiper-large-v3'"),  # the plain check
        (["slots", "-p", "whsiper-large-v3"], 3, "unknown profile 'whsiper-large-v3'"),  # through typer
        (["check", "--gpu", "atuo"], 2, "--gpu: invalid GPU selection 'atuo'"),
        (["exec", "--on-hot", "paus", "--", "true"], 2, "--on-hot: invalid --on-hot value 'paus'"),
        (["exec", "--cgroup", "of", "--", "true"], 2, "--cgroup: invalid --cgroup value 'of'"),
        (["exec", "--throttle", "onn", "--", "true"], 2, "--throttle: invalid value 'onn'"),
        (["exec", "--warn-signal", "SIGTREM", "--", "true"], 2, "--warn-signal: invalid signal 'SIGTREM'"),
    ],
)
def test_a_typo_gets_the_closest_value(run: Run, config: Path, args: list[str], code: int, message: str) -> None:
    result = run(*args[:1], "--config", str(config), *args[1:])
    expected = {"whsiper-large-v3": "whisper-large-v3", "atuo": "auto", "paus": "pause", "of": "off",
                "onn": "on", "SIGTREM": "SIGTERM"}[message.rsplit("'", 2)[1]]
    assert result.returncode == code, result.stderr
    assert message in result.stderr and result.stderr.endswith(f"; did you mean {expected!r}?\n"), result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    no_traceback(result)


def test_bad_config_content_is_exit_3(run: Run, tmp_path: Path) -> None:
    cfg = tmp_path / "bad.toml"
    cfg.write_text('[profiles.night]\nmemory = "10GG"\n')
    result = run("check", "--config", str(cfg))
    assert result.returncode == 3 and "profiles.night.memory" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    no_traceback(result)


def test_config_from_environment(run: Run, config: Path, env: dict[str, str], sensor: Path) -> None:
    set_temp(sensor, 90)
    result = run("check", *PASSING, env={**env, "SAFEGATE_CONFIG": str(config)})
    assert result.returncode == ExitCode.THERMAL


def test_profile_from_environment(run: Run, config: Path, env: dict[str, str]) -> None:
    result = run("check", "--config", str(config), "--mem", "0", "--json",
                 env={**env, "SAFEGATE_PROFILE": "whisper-large-v3"})
    assert json.loads(result.stdout)["profile"] == "whisper-large-v3"
    result = run("check", "--config", str(config), "-p", "default", "--mem", "0", "--json",
                 env={**env, "SAFEGATE_PROFILE": "whisper-large-v3"})
    assert json.loads(result.stdout)["profile"] == "default"  # the option beats the environment


def test_unsafe_lock_dir_is_exit_3(run: Run, config: Path, env: dict[str, str], tmp_path: Path) -> None:
    open_dir = tmp_path / "open"
    open_dir.mkdir()
    os.chmod(open_dir, 0o777)
    result = run("check", "--config", str(config), env={**env, "SAFEGATE_LOCK_DIR": str(open_dir)})
    assert result.returncode == 3 and "without the sticky bit" in result.stderr
    link = tmp_path / "link"
    link.symlink_to(tmp_path)
    result = run("check", "--config", str(config), env={**env, "SAFEGATE_LOCK_DIR": str(link)})
    assert result.returncode == 3 and "symlink" in result.stderr
    no_traceback(result)


def test_lock_dir_is_created_sticky(run: Run, config: Path, lock_dir: Path) -> None:
    assert not lock_dir.exists()
    assert check(run, config, *PASSING).returncode == 0
    assert oct(lock_dir.stat().st_mode & 0o7777) == oct(0o1777)


def test_unwritable_lock_dir_as_nobody_is_exit_3(nobody: object, config: Path) -> None:
    from support import Nobody

    assert isinstance(nobody, Nobody)
    ro = nobody.workdir / "root-only"
    ro.mkdir()
    os.chmod(ro, 0o755)
    cfg = nobody.workdir / "config.toml"
    cfg.write_text(config.read_text())
    os.chmod(cfg, 0o644)
    result = nobody.run(["-m", "safegate", "check", "--config", str(cfg)], env={"SAFEGATE_LOCK_DIR": str(ro)})
    assert result.returncode == 3, result.stderr
    assert "not writable by you" in result.stderr and len(result.stderr.strip().splitlines()) == 1


def test_version_and_module_entry(run: Run) -> None:
    result = run("--version")
    assert result.returncode == 0 and result.stdout.startswith("safegate ")
