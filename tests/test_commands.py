"""status, slots, locks, unlock and profiles, run as users run them."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

from support import (
    PY,
    TIMEOUT,
    Procs,
    Run,
    hold_with_flock,
    hold_with_safegate,
    holder_files,
    meminfo_available,
    neutral_config,
    wait_until,
)

from safegate.exitcodes import ExitCode


def test_slots_counts_jobs_of_the_profile_size(run: Run, tmp_path: Path, sensor: Path) -> None:
    cfg = tmp_path / "c.toml"
    cfg.write_text(neutral_config(sensor) + '[profiles.small]\nlock = false\nmemory = "1M"\n')
    # With a 1 MiB need and no margin, far more than 7 fit; --max caps it.
    result = run("slots", "--config", str(cfg), "-p", "small", "--max", "7")
    assert (result.returncode, result.stdout.strip()) == (0, "7")
    # A margin of the whole RAM leaves room for none.
    assert run("slots", "--config", str(cfg), "-p", "small", "--margin", "100%").stdout.strip() == "0"


def test_slots_of_a_mutex_profile_is_0_or_1(run: Run, config: Path, lock_dir: Path, procs: Procs) -> None:
    assert run("slots", "--config", str(config), "--mem", "1M").stdout.strip() == "1"
    hold_with_flock(procs, lock_dir / "heavy.lock")
    assert run("slots", "--config", str(config), "--mem", "1M").stdout.strip() == "0"


def test_slots_counts_reservations(run: Run, tmp_path: Path, sensor: Path, procs: Procs) -> None:
    # Sizes relative to MemAvailable now, with wide margins: one job of 70% fits (while other processes take
    # up to 30% or free up to 40%), and once a job of that size is admitted and still loading (its
    # reservation stands, it has allocated nothing), none does.
    need = int(meminfo_available() * 0.7)
    cfg = tmp_path / "c.toml"
    cfg.write_text(neutral_config(sensor) + f'[profiles.q]\nlock = false\nmemory = "{need}"\n')
    assert run("slots", "--config", str(cfg), "-p", "q").stdout.strip() == "1"
    lock_dir = Path(run.env["SAFEGATE_LOCK_DIR"])
    procs.spawn([PY, "-m", "safegate", "exec", "--config", str(cfg), "-p", "q", "--", "sleep", "600"], env=run.env)
    wait_until(lambda: any(json.loads(p.read_text()).get("job_pid") for p in lock_dir.glob("job-*.holder-*.json")),
               what="the first job's reservation")
    assert run("slots", "--config", str(cfg), "-p", "q").stdout.strip() == "0"


def test_locks_and_unlock(run: Run, config: Path, lock_dir: Path, procs: Procs) -> None:
    holder = hold_with_safegate(procs, lock_dir, "whisper-large", profile="whisper-large-v3")
    result = run("locks", "--json", "--config", str(config))
    data = {lock["name"]: lock for lock in json.loads(result.stdout)}
    assert data["whisper-large"]["held"] and data["whisper-large"]["holder"]["pid"] == holder.pid
    text = run("locks", "--config", str(config)).stdout
    assert "whisper-large" in text and "HELD" in text and f"pid {holder.pid}" in text
    refused = run("unlock", "whisper-large", "--config", str(config))
    assert refused.returncode == ExitCode.LOCKED and f"pid {holder.pid}" in refused.stderr
    assert "no force" in refused.stderr
    os.kill(holder.pid, signal.SIGKILL)
    holder.wait()
    done = run("unlock", "whisper-large", "--config", str(config))
    assert done.returncode == 0 and "removed stale holder" in done.stdout
    assert not holder_files(lock_dir, "whisper-large")
    assert "nothing to remove" in run("unlock", "whisper-large", "--config", str(config)).stdout
    bad = run("unlock", "../etc", "--config", str(config))
    assert bad.returncode == ExitCode.USAGE and "invalid lock name" in bad.stderr


def test_profiles_lists_sources(run: Run, tmp_path: Path, sensor: Path) -> None:
    cfg = tmp_path / "p.toml"
    cfg.write_text(neutral_config(sensor) + '[profiles.llm]\nmemory = "20G"\nlock = "llm"\n')
    data = {p["name"]: p for p in json.loads(run("profiles", "--json", "--config", str(cfg)).stdout)}
    assert data["whisper-large-v3"]["source"] == "built-in"
    assert data["llm"]["source"] == str(cfg) and data["llm"]["memory"] == "20.0 GiB"
    assert "llm" in run("profiles", "--config", str(cfg)).stdout


def test_status_text_and_json(run: Run, config: Path, lock_dir: Path, procs: Procs, sensor: Path) -> None:
    hold_with_flock(procs, lock_dir / "heavy.lock")
    text = run("status", "--config", str(config))
    assert text.returncode == 0
    assert "RAM" in text.stdout and "heavy" in text.stdout and "HELD" in text.stdout
    assert "file:" in text.stdout and "40 C" in text.stdout  # the sensor file from the config
    data = json.loads(run("status", "--json", "--config", str(config)).stdout)
    assert {"memory", "swap", "temperatures", "gpus", "locks", "top_processes"} <= set(data)
    assert data["locks"][0]["name"] == "heavy" and data["locks"][0]["held"]
    assert data["gpus"]["status"] in ("none", "ok")


def test_status_watch_refreshes_until_interrupted(run: Run, config: Path, procs: Procs) -> None:
    import subprocess
    import sys

    from support import wait_until

    watcher = procs.spawn([sys.executable, "-m", "safegate", "status", "--watch", "--config", str(config)],
                          env=run.env, stdout=subprocess.PIPE)
    assert watcher.stdout is not None
    seen: list[bytes] = []
    wait_until(lambda: seen.append(watcher.stdout.readline()) or sum(b"RAM" in line for line in seen) >= 2,
               what="two refreshes")
    watcher.send_signal(signal.SIGINT)
    assert watcher.wait(timeout=TIMEOUT) == 130
