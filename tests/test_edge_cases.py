"""Edge cases found in review: odd files in the shared lock dir, broken stderr, lock-less profiles,
terminal escapes, relative paths, corrupt history."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from support import TIMEOUT, Procs, Run, neutral_config

from safegate.exitcodes import ExitCode
from safegate.locks.files import ensure_directory
from safegate.locks.store import LockStore


def test_foreign_files_with_invalid_lock_names_are_ignored(run: Run, config: Path, lock_dir: Path) -> None:
    lock_dir.mkdir(mode=0o1777, parents=True)
    lock_dir.chmod(0o1777)
    (lock_dir / "a b.lock").write_text("")
    (lock_dir / "x y.holder.json").write_text("{}")
    for command in (["check", "--mem", "0"], ["slots", "--mem", "1M"], ["locks"]):
        result = run(command[0], "--config", str(config), *command[1:])
        assert result.returncode == 0, result.stderr


def test_odd_files_at_lock_paths_are_one_clear_line(run: Run, config: Path, lock_dir: Path, tmp_path: Path,
                                                    sensor: Path) -> None:
    (lock_dir / "heavy.lock").mkdir(parents=True)
    lock_dir.chmod(0o1777)
    result = run("check", "--config", str(config), "--mem", "0")
    assert result.returncode == ExitCode.CONFIG and "heavy.lock" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    legacy_dir = tmp_path / "legacy-is-a-dir"
    legacy_dir.mkdir()
    cfg = tmp_path / "l.toml"
    cfg.write_text(f'legacy_lock_files = ["{legacy_dir}"]\n' + neutral_config(sensor))
    result = run("check", "--config", str(cfg), "--mem", "0", "--lock", "other")
    assert result.returncode == 0 and "not a regular file" in result.stdout


def test_broken_stderr_does_not_stop_the_watch(run: Run, config: Path, lock_dir: Path) -> None:
    # stderr is a pipe whose reader is gone: every event write fails with EPIPE.
    read_end, write_end = __import__("os").pipe()
    __import__("os").close(read_end)
    try:
        result = subprocess.run([sys.executable, "-m", "safegate", "exec", "--config", str(config), "--mem", "0",
                                 "--", "sh", "-c", "sleep 0.3; exit 3"], env=run.env, stderr=write_end,
                                stdout=subprocess.DEVNULL, timeout=TIMEOUT)
    finally:
        __import__("os").close(write_end)
    assert result.returncode == 3
    assert subprocess.run(["flock", "-n", str(lock_dir / "heavy.lock"), "true"]).returncode == 0


def test_lockless_profile_runs_side_by_side_and_cleans_up(run: Run, tmp_path: Path, sensor: Path,
                                                          lock_dir: Path, procs: Procs) -> None:
    cfg = tmp_path / "free.toml"
    cfg.write_text(neutral_config(sensor) + "[profiles.free]\nlock = false\n")
    spans = tmp_path / "spans"
    record = [sys.executable, str(Path(__file__).parent / "helpers" / "record.py"), str(spans), "0.8"]
    gates = [procs.spawn([sys.executable, "-m", "safegate", "exec", "--config", str(cfg), "-p", "free", "-q",
                          "--", *record], env=run.env) for _ in range(2)]
    assert [g.wait(timeout=TIMEOUT) for g in gates] == [0, 0]
    (_, a_end), (b_start, _) = sorted(tuple(map(float, line.split())) for line in
                                                spans.read_text().splitlines())
    assert b_start < a_end  # no mutex: they overlapped
    assert not list(lock_dir.glob("job-*"))  # per-job locks and their metadata are gone


def test_terminal_escapes_in_holders_are_not_printed(run: Run, config: Path, lock_dir: Path) -> None:
    store = LockStore(lock_dir)
    ensure_directory(store.directory)
    with store.try_acquire("evil", "p", ["\x1b[2J"]) as held:  # this test's process is the holder
        assert held is not None
        held.update_holder(user="u\x1b]0;pwned\x07")
        out = run("locks", "--config", str(config)).stdout + run("status", "--config", str(config)).stdout
    assert "\x1b" not in out and "\\x1b]0;pwned" in out


def test_relative_lock_dir_is_refused(run: Run, tmp_path: Path, sensor: Path) -> None:
    cfg = tmp_path / "rel.toml"
    cfg.write_text('lock_dir = "rel/dir"\n' + neutral_config(sensor))
    result = run("check", "--config", str(cfg))
    assert result.returncode == ExitCode.CONFIG and "expected an absolute directory path" in result.stderr


def test_corrupt_history_types_cost_a_record_not_a_command(run: Run, config: Path, env: dict[str, str]) -> None:
    path = Path(env["XDG_STATE_HOME"]) / "safegate" / "history.json"
    path.parent.mkdir(parents=True)
    good = {"time": 1.0, "peak_memory": 5, "peak_gpu_memory": None, "duration": 1.0, "reason": "exited",
            "exit_code": 0}
    path.write_text(json.dumps({"default": [good, {**good, "peak_memory": "x"}, {**good, "peak_memory": 1e400}]})
                    .replace("Infinity", "1e400"))
    result = run("profiles", "--json", "--config", str(config))
    assert result.returncode == 0, result.stderr
    default = next(p for p in json.loads(result.stdout) if p["name"] == "default")
    assert default["recorded"]["runs"] == 1
