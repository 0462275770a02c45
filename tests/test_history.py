"""Learned needs: exec records its runs; memory = "auto" uses them; writers never lose each other's runs."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from support import TIMEOUT, Procs, Run, neutral_config

from safegate.config import history

HELPERS = Path(__file__).resolve().parent / "helpers"
MiB = 1024**2


def state_file(env: dict[str, str]) -> Path:
    return Path(env["XDG_STATE_HOME"]) / "safegate" / "history.json"


def test_exec_records_runs_and_auto_memory_learns(run: Run, tmp_path: Path, sensor: Path,
                                                   env: dict[str, str]) -> None:
    cfg = tmp_path / "auto.toml"
    cfg.write_text(neutral_config(sensor) + '[profiles.hog]\nmemory = "auto"\nlock = "hog"\n')
    check = run("check", "--config", str(cfg), "-p", "hog", "--json")
    memory = next(c for c in json.loads(check.stdout)["checks"] if c["name"] == "memory")
    assert memory["values"]["need"] == history.AUTO_FALLBACK  # fewer than 3 runs: the stated default
    for _ in range(3):
        result = run("exec", "--config", str(cfg), "-p", "hog", "-q", "--", sys.executable, "-c",
                     "import time; b = b'x' * (200 << 20); time.sleep(0.6)")
        assert result.returncode == 0, result.stderr
    runs = history.load(state_file(env))["hog"]
    assert len(runs) == 3 and all(r.reason == "exited" and r.exit_code == 0 for r in runs)
    assert all(200 * MiB <= r.peak_memory < 400 * MiB for r in runs)
    check = run("check", "--config", str(cfg), "-p", "hog", "--json")
    need = next(c for c in json.loads(check.stdout)["checks"] if c["name"] == "memory")["values"]["need"]
    assert need == int(history.percentile([r.peak_memory for r in runs], 95) * 1.10)
    shown = json.loads(run("profiles", "--json", "--config", str(cfg)).stdout)
    hog = next(p for p in shown if p["name"] == "hog")
    assert hog["memory"] == "auto" and hog["recorded"]["runs"] == 3 and hog["recorded"]["learned_need"] == need


def test_unwritable_state_dir_does_not_fail_the_job(run: Run, config: Path, env: dict[str, str],
                                                     tmp_path: Path) -> None:
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("")
    result = run("exec", "--config", str(config), "--mem", "0", "--", "sh", "-c", "exit 4",
                 env={**env, "XDG_STATE_HOME": str(blocker)})
    assert result.returncode == 4
    assert result.stderr.count("cannot record the run") == 1


WRITER = """
import sys, time
from pathlib import Path
from safegate.config import history
for i in range(int(sys.argv[3])):
    history.record(Path(sys.argv[1]), sys.argv[2], history.Run(time.time(), i + 1, None, 0.1, "exited", 0))
"""


def test_concurrent_writers_lose_nothing(tmp_path: Path, procs: Procs) -> None:
    path = tmp_path / "state" / "history.json"
    writers = [procs.spawn([sys.executable, "-c", WRITER, str(path), f"p{n}", "15"]) for n in range(6)]
    assert [w.wait(timeout=TIMEOUT) for w in writers] == [0] * 6
    data = history.load(path)
    assert sorted(data) == [f"p{n}" for n in range(6)]
    assert all([r.peak_memory for r in data[f"p{n}"]] == list(range(1, 16)) for n in range(6))
    assert not list(path.parent.glob(".history.*.tmp"))


def test_history_is_bounded_and_corruption_is_survived(tmp_path: Path) -> None:
    path = tmp_path / "h.json"
    for i in range(history.KEEP + 10):
        history.record(path, "p", history.Run(float(i), i, None, 1.0, "exited", 0))
    runs = history.load(path)["p"]
    assert len(runs) == history.KEEP and runs[0].peak_memory == 10
    path.write_text("{not json")
    assert history.load(path) == {}
    history.record(path, "p", history.Run(1.0, 5, None, 1.0, "exited", 0))
    assert [r.peak_memory for r in history.load(path)["p"]] == [5]


def test_learned_need_percentile() -> None:
    runs = [history.Run(0, peak, None, 1, "exited", 0) for peak in (100, 200, 300)]
    assert history.learned_need(runs[:2]) is None
    assert history.learned_need(runs) == int(300 * 1.10)
    assert history.percentile(list(range(1, 101)), 95) == 95


def test_git_tracks_no_state(tmp_path: Path, run: Run, config: Path, env: dict[str, str]) -> None:
    # The history lives under the user's state dir, never in the working directory: a job run from inside
    # a git checkout leaves the checkout clean.
    assert history.history_path({"XDG_STATE_HOME": str(tmp_path)}) == tmp_path / "safegate" / "history.json"
    assert history.history_path({"HOME": "/home/u"}) == Path("/home/u/.local/state/safegate/history.json")
    checkout = tmp_path / "checkout"
    checkout.mkdir()
    subprocess.run(["git", "init", "-q", str(checkout)], check=True)
    result = run("exec", "--config", str(config), "--mem", "0", "-q", "--", "true", cwd=checkout)
    assert result.returncode == 0, result.stderr
    assert state_file(env).exists()  # the run was recorded...
    status = subprocess.run(["git", "status", "--porcelain", "--ignored"], cwd=checkout, capture_output=True,
                            text=True, check=True)
    assert status.stdout == ""  # ...and nothing appeared in the checkout


def test_runs_stopped_at_a_cap_stay_out_of_the_learned_peak() -> None:
    # Two runs killed at a 1000-byte cap peaked at the cap: the need is learned from the three whole runs.
    runs = [history.Run(0, peak, None, 1, "exited", 0) for peak in (100, 200, 300)]
    capped = [history.Run(0, 1000, None, 1, reason, 20) for reason in ("memory", "gpu")]
    assert history.learned_need(runs + capped) == int(300 * 1.10)
    assert history.learned_need(runs[:2] + capped) is None  # two whole runs are not yet enough


def test_profiles_marks_capped_runs_and_use_above_the_declared_need(run: Run, tmp_path: Path, sensor: Path) -> None:
    cfg = tmp_path / "declared.toml"
    cfg.write_text(neutral_config(sensor) + '[profiles.small]\nmemory = "40M"\nlock = "small"\n')
    for _ in range(3):  # each uses ~60 MiB, more than the 40 MiB the profile declares
        result = run("exec", "--config", str(cfg), "-p", "small", "-q", "--", sys.executable, "-c",
                     "import time; b = b'x' * (60 << 20); time.sleep(0.4)")
        assert result.returncode == 0, result.stderr
    hog = run("exec", "--config", str(cfg), "-p", "small", "-q", "--max-mem", "120M", "--grace", "5s", "--",
              sys.executable, str(HELPERS / "hog.py"), "1000", "8", "0.05")
    assert hog.returncode == 20, hog.stderr  # stopped at --max-mem: its peak is the cap
    shown = json.loads(run("profiles", "--json", "--config", str(cfg)).stdout)
    rec = next(p for p in shown if p["name"] == "small")["recorded"]
    assert rec["runs"] == 4 and rec["stopped_at_cap"] == 1
    assert 60 * MiB <= rec["peak_memory_p95"] < 110 * MiB  # the whole runs only, not the ~120 MiB cap
    assert rec["exceeds_need"] is True and rec["peak_memory_any"] >= 110 * MiB
    line = next(x for x in run("profiles", "--config", str(cfg)).stdout.splitlines() if x.startswith("small "))
    assert "1 stopped at a cap (left out of the p95" in line and "exceeds the declared memory 40" in line
