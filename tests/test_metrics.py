"""`safegate metrics` (issue 16, item 3): Prometheus text that Prometheus' own parser reads, for a real held lock,
a real sensor file and exec's real history; `--textfile DIR` written whole for node_exporter."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest
from support import PY, TIMEOUT, Procs, Run, hold_with_flock, hold_with_safegate, neutral_config, set_temp, wait_until

parser = pytest.importorskip("prometheus_client.parser", reason="prometheus_client (the test extra) is not installed")

MiB = 1 << 20


def _families(text: str) -> dict[str, list[tuple[dict[str, str], float]]]:
    return {family.name: [(dict(s.labels), s.value) for s in family.samples]
            for family in parser.text_string_to_metric_families(text)}


def test_metrics_parse_and_carry_the_machine_the_locks_and_the_last_run(run: Run, config: Path, sensor: Path,
                                                                        lock_dir: Path, procs: Procs) -> None:
    set_temp(sensor, 47)
    assert run("exec", "--config", str(config), "--mem", "0", "-p", "default", "--", "sh", "-c", "exit 7"
               ).returncode == 7
    hold_with_safegate(procs, lock_dir, "whisper-large", profile="whisper-large-v3", need=512 * MiB)
    result = run("metrics", "--config", str(config))
    assert result.returncode == 0, result.stderr
    families = _families(result.stdout)
    assert families["safegate_memory_available_bytes"][0][1] > 0
    assert families["safegate_temperature_celsius"] == [({"sensor": f"file:{sensor}"}, 47.0)]
    assert (({"lock": "whisper-large"}, 1.0) in families["safegate_lock_held"])
    assert ({"lock": "whisper-large", "profile": "whisper-large-v3"}, float(512 * MiB)) in \
        families["safegate_lock_holder_need_bytes"]
    assert ({"profile": "default"}, 7.0) in families["safegate_profile_last_exit_code"]


def test_outside_text_in_labels_is_escaped(run: Run, tmp_path: Path) -> None:
    # A sensor file's path is the label: quotes, a backslash and an escape sequence from the file system.
    sensor = tmp_path / 'we"ird\\name\x1b[2J'
    set_temp(sensor, 41)
    cfg = tmp_path / "weird.toml"
    cfg.write_text(neutral_config(sensor))
    result = run("metrics", "--config", str(cfg))
    assert result.returncode == 0, result.stderr
    assert "\x1b" not in result.stdout  # nothing reaches a terminal raw
    temps = _families(result.stdout)["safegate_temperature_celsius"]
    # printable() first, then the format's own escaping, which the parser undoes
    assert temps == [({"sensor": f"file:{tmp_path}/we\"ird\\name\\x1b[2J"}, 41.0)]


def test_textfile_is_written_whole_and_a_missing_directory_is_a_usage_error(run: Run, config: Path,
                                                                           tmp_path: Path) -> None:
    collector = tmp_path / "textfile"
    collector.mkdir()
    result = run("metrics", "--config", str(config), "--textfile", str(collector))
    assert result.returncode == 0 and result.stdout == "", result.stderr
    assert os.listdir(collector) == ["safegate.prom"]  # no temp file left
    assert "safegate_memory_available_bytes" in (collector / "safegate.prom").read_text()
    _families((collector / "safegate.prom").read_text())
    missing = run("metrics", "--config", str(config), "--textfile", str(tmp_path / "nope"))
    assert missing.returncode == 2
    assert missing.stderr.strip().count("\n") == 0 and "is not a directory" in missing.stderr


def test_waiters_in_line_per_lock_with_the_oldest_wait(run: Run, config: Path, lock_dir: Path, procs: Procs) -> None:
    # A real waiter: `check --wait` blocked by a flock(1) holder of the lock file, its ticket in the lock dir.
    hold_with_flock(procs, lock_dir / "heavy.lock")
    hold_with_safegate(procs, lock_dir, "whisper-large", profile="whisper-large-v3")
    waiter = procs.spawn([PY, "-m", "safegate", "check", "--config", str(config), "--mem", "0", "--lock", "heavy",
                          "--wait", "-q"], env=run.env)
    wait_until(lambda: list(lock_dir.glob(".ticket.*.json")), what="the waiter's ticket")
    time.sleep(0.3)  # so the oldest wait is measurably above 0
    families = _families(run("metrics", "--config", str(config)).stdout)
    waiters = dict((labels["lock"], value) for labels, value in families["safegate_lock_waiters"])
    assert waiters == {"heavy": 1.0, "whisper-large": 0.0}, waiters
    oldest = dict((labels["lock"], value) for labels, value in families["safegate_lock_oldest_wait_seconds"])
    assert oldest["whisper-large"] == 0.0 and 0.3 <= oldest["heavy"] < TIMEOUT + 60, oldest
    assert waiter.poll() is None  # still in line
