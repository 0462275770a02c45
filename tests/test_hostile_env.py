"""Issue 13, items 9-13: environment, state and config files that are wrong, huge, hostile or odd.

Each answer is one line on stderr and a documented exit code; a job that ran keeps its exit status.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from support import Nobody, Run, neutral_config

from safegate.exitcodes import ExitCode


def _one_line(result: subprocess.CompletedProcess[str]) -> str:
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    return lines[0]


# --- item 9: a relative SAFEGATE_LOCK_DIR is refused ---------------------------------------------------------


def test_relative_lock_dir_from_the_environment_is_refused(run: Run, config: Path, env: dict[str, str],
                                                           nobody: Nobody, tmp_path: Path) -> None:
    rel = {**env, "SAFEGATE_LOCK_DIR": "rel/locks"}
    for args in (["check", "--mem", "0"], ["exec", "--mem", "0", "--", "true"], ["locks"], ["slots", "--mem", "1M"],
                 ["status"], ["unlock", "x"]):
        result = run(args[0], "--config", str(config), *args[1:], env=rel, cwd=tmp_path)
        assert result.returncode == ExitCode.USAGE, (args, result.stdout, result.stderr)
        assert "'rel/locks'" in _one_line(result) and "absolute" in result.stderr
    assert not (tmp_path / "rel").exists()
    cfg = nobody.workdir / "c.toml"
    cfg.write_text(config.read_text())
    os.chmod(cfg, 0o644)
    result = nobody.run(["-m", "safegate", "check", "--config", str(cfg)], env={"SAFEGATE_LOCK_DIR": "rel"})
    assert result.returncode == ExitCode.USAGE and "absolute" in _one_line(result)


# --- item 10: a broken history never fails a job, a check or profiles ----------------------------------------


@pytest.fixture
def history(env: dict[str, str]) -> Path:
    path = Path(env["XDG_STATE_HOME"]) / "safegate" / "history.json"
    path.parent.mkdir(parents=True)
    return path


@pytest.mark.parametrize("broken", ["nested", "fifo", "directory", "huge"])
def test_broken_history_is_set_aside_and_the_job_keeps_its_status(run: Run, config: Path, history: Path,
                                                                  broken: str, sensor: Path, tmp_path: Path) -> None:
    if broken == "nested":
        history.write_text("[" * 100_000)
    elif broken == "fifo":
        os.mkfifo(history)
    elif broken == "directory":
        history.mkdir()
    else:
        with history.open("wb") as fh:
            fh.truncate(64 * 1024 * 1024)  # sparse: 64 MiB of zeros
    auto = tmp_path / "auto.toml"
    auto.write_text(neutral_config(sensor) + '[profiles.auto]\nmemory = "auto"\nlock = "auto"\n')
    for args in (["check", "-p", "auto", "-q"],
                 ["profiles", "--json"], ["profiles"]):
        result = run(*args, "--config", str(auto))
        assert result.returncode == 0, (args, result.stdout, result.stderr)
    result = run("exec", "--config", str(config), "--mem", "0", "-q", "--", "sh", "-c", "exit 7")
    assert result.returncode == 7, result.stderr
    assert "set aside" in result.stderr and "Traceback" not in result.stderr
    aside = history.with_name("history.json.broken")
    assert os.path.lexists(aside)
    # The next run is recorded in a fresh history.
    assert run("exec", "--config", str(config), "--mem", "0", "-q", "--", "true").returncode == 0
    assert len(json.loads(history.read_text())["default"]) == 2


# --- item 11: --config is read bounded, from regular files only ----------------------------------------------


@pytest.mark.parametrize("kind", ["/dev/zero", "fifo", "empty", "directory", "huge"])
def test_config_that_is_no_regular_file_or_too_big_is_one_line(run: Run, env: dict[str, str], tmp_path: Path,
                                                               kind: str) -> None:
    if kind == "fifo":
        path = str(tmp_path / "fifo.toml")
        os.mkfifo(path)
    elif kind == "empty":
        path = ""
    elif kind == "directory":
        path = str(tmp_path)
    elif kind == "huge":
        huge = tmp_path / "huge.toml"
        huge.write_text("# " + "x" * (4 * 1024 * 1024) + "\n")
        path = str(huge)
    else:
        path = kind
    result = run("check", "--config", path)
    assert result.returncode == ExitCode.CONFIG, result.stderr
    line = _one_line(result)
    assert "config" in line and ("regular file" in line or "directory" in line or "empty path" in line
                                 or "larger than" in line)
    if kind in ("fifo", "/dev/zero"):
        via_env = run("profiles", env={**env, "SAFEGATE_CONFIG": path})
        assert via_env.returncode == ExitCode.CONFIG and "SAFEGATE_CONFIG" in _one_line(via_env)


# --- item 12: a lock dir out of inodes, lock names bounded in bytes ------------------------------------------


@pytest.fixture
def full_lock_dir(nobody: Nobody) -> Iterator[Path]:
    """A real tmpfs lock dir (1777) with no inode left, where user nobody reaches it too."""
    if shutil.which("mount") is None:
        pytest.skip("mount is not installed")
    mnt = nobody.workdir / "tiny"
    mnt.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m,nr_inodes=16,mode=1777", "tmpfs", str(mnt)],
                             capture_output=True, text=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.strip()}")
    try:
        i = 0
        while True:
            try:
                (mnt / f"filler{i}").touch()
            except OSError:
                break
            i += 1
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def test_lock_dir_out_of_inodes_is_exit_3(run: Run, config: Path, env: dict[str, str], full_lock_dir: Path,
                                          nobody: Nobody) -> None:
    full = {**env, "SAFEGATE_LOCK_DIR": str(full_lock_dir)}
    result = run("exec", "--config", str(config), "--mem", "0", "--lock", "heavy", "--", "true", env=full)
    assert result.returncode == ExitCode.CONFIG, result.stderr
    assert "No space left on device" in _one_line(result)
    cfg = nobody.workdir / "c.toml"
    cfg.write_text(config.read_text())
    os.chmod(cfg, 0o644)
    as_nobody = nobody.run(["-m", "safegate", "exec", "--config", str(cfg), "--mem", "0", "--", "true"],
                           env={"SAFEGATE_LOCK_DIR": str(full_lock_dir)})
    assert as_nobody.returncode == ExitCode.CONFIG and "No space left" in _one_line(as_nobody)


def test_lock_names_are_bounded_in_bytes(run: Run, config: Path) -> None:
    emoji = "\U0001f600" * 64  # 64 characters, 256 bytes: no file name can hold it with a suffix
    for args in (["check", "--lock", emoji], ["exec", "--lock", emoji, "--", "true"], ["unlock", emoji]):
        result = run(args[0], "--config", str(config), *args[1:])
        assert result.returncode == ExitCode.USAGE, (args, result.stderr)
        assert "invalid lock name" in _one_line(result) and "128 bytes" in result.stderr
    fits = "\U0001f600" * 32  # 128 bytes: taken, recorded and released like any other
    result = run("exec", "--config", str(config), "--mem", "0", "--lock", fits, "--", "true")
    assert result.returncode == 0 and "holder metadata" not in result.stderr, result.stderr


# --- item 13: odd digits in Slurm variables, an empty profile, an empty command ----------------------------


def test_slurm_values_with_non_ascii_digits_are_not_numbers(run: Run, config: Path, env: dict[str, str],
                                                            sensor: Path, tmp_path: Path) -> None:
    slurm = {**env, "SLURM_JOB_ID": "1", "SLURM_MEM_PER_NODE": "\u00b2", "SLURM_MEM_PER_CPU": "\u0663",
             "SLURM_CPUS_ON_NODE": "\u00b2"}
    result = run("exec", "--config", str(config), "--mem", "0", "-q", "--", "sh", "-c", "exit 4", env=slurm)
    assert result.returncode == 4, result.stderr
    licensed = tmp_path / "lic.toml"
    licensed.write_text(neutral_config(sensor) + '[profiles.w]\nslurm_license = "whisper"\nlock = false\n')
    result = run("exec", "--config", str(licensed), "-p", "w", "--mem", "0", "-q", "--", "true",
                 env={**slurm, "SLURM_JOB_LICENSES": "whisper:\u00b2"})
    assert result.returncode == 0, result.stderr
    result = run("check", "--config", str(config), "--gpu", "\u00b2")
    assert result.returncode == ExitCode.USAGE and "GPU" in _one_line(result)


def test_empty_profile_and_empty_command_are_refused_with_a_line(run: Run, config: Path) -> None:
    for args in (["check", "-p", ""], ["exec", "-p", "", "--", "true"], ["slots", "-p", ""]):
        result = run(args[0], "--config", str(config), *args[1:])
        assert result.returncode == ExitCode.CONFIG, (args, result.stdout, result.stderr)
        assert "unknown profile ''" in _one_line(result)
    result = run("exec", "--config", str(config), "--mem", "0", "--", "")
    assert result.returncode == ExitCode.USAGE and "empty" in _one_line(result)
