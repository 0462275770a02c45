"""docs/recipes.md: every safegate command in it parses, and the parallel adapter works for real."""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import typer
from support import REPO, TIMEOUT, Procs, Run, hold_with_flock, neutral_config

from safegate.cli.app import app
from safegate.exitcodes import ExitCode
from safegate.units import parse_duration

RECIPES = (REPO / "docs" / "recipes.md").read_text()
ADAPTER = REPO / "docs" / "examples" / "safegate-parallel-limit"


def safegate_commands() -> list[list[str]]:
    found = []
    for block in re.findall(r"```(?:sh|ini)\n(.*?)```", RECIPES, re.DOTALL):
        for raw in block.splitlines():
            line = raw.split("  # ")[0]
            for match in re.finditer(r"(?:^|[\s=(\"])(?:\S*/)?safegate (\w+)([^\"`)&|]*)", line):
                found.append([match.group(1), *shlex.split(match.group(2))])
    return found


def test_recipes_have_commands() -> None:
    commands = {c[0] for c in safegate_commands()}
    assert {"check", "exec", "slots"} <= commands


@pytest.mark.parametrize("argv", safegate_commands(), ids=lambda a: " ".join(a)[:60])
def test_every_recipe_command_parses(argv: list[str]) -> None:
    root = typer.main.get_command(app)
    ctx = root.make_context("safegate", list(argv), resilient_parsing=False)
    sub = root.get_command(ctx, argv[0])
    assert sub is not None, argv
    sub.make_context(argv[0], argv[1:], parent=ctx)  # raises on an unknown option or a missing value


def test_parallel_adapter_maps_codes(run: Run, config: Path, lock_dir: Path, procs: Procs, env: dict[str, str]) -> None:
    assert os.access(ADAPTER, os.X_OK)
    path_env = {**env, "PATH": f"{Path(sys.executable).parent}:{env['PATH']}", "SAFEGATE_CONFIG": str(config)}
    # parallel appends numbers (running jobs, slots): they must not reach safegate.
    ok = subprocess.run([str(ADAPTER), "--mem", "0", "3", "4"], env=path_env)
    assert ok.returncode == 0
    hold_with_flock(procs, lock_dir / "heavy.lock")
    held = subprocess.run([str(ADAPTER), "--mem", "0", "3", "4"], env=path_env)
    assert held.returncode == 1


def test_parallel_adapter_with_gnu_parallel(config: Path, env: dict[str, str], tmp_path: Path) -> None:
    if shutil.which("parallel") is None:
        pytest.skip("GNU parallel is not installed here")
    path_env = {**env, "PATH": f"{Path(sys.executable).parent}:{env['PATH']}", "SAFEGATE_CONFIG": str(config)}
    out = subprocess.run(["parallel", "--limit", f"{ADAPTER} --mem 0", "echo", ":::", "a", "b"],
                         env=path_env, capture_output=True, text=True, timeout=TIMEOUT)
    assert sorted(out.stdout.split()) == ["a", "b"]


# --- slots feeding -j and -P: never more jobs than fit, none when slots is 0 ----------------------------------

SMALL_JOB = """#!/bin/sh
start=$(date +%s.%N)
sleep 0.5
echo "$start $(date +%s.%N)" >> "$SPANS"
"""


def _slots_recipes() -> list[str]:
    return [line for line in RECIPES.splitlines() if line.startswith("n=$(safegate slots")]


def _recipe_toml() -> str:
    blocks = re.findall(r"```toml\n(.*?)```", RECIPES, re.DOTALL)
    return next(b for b in blocks if "[profiles.small-model]" in b)


def _max_overlap(spans: list[tuple[float, float]]) -> int:
    events = sorted([(s, 1) for s, _ in spans] + [(e, -1) for _, e in spans])
    running = peak = 0
    for _, step in events:
        running += step
        peak = max(peak, running)
    return peak


def test_slots_recipes_are_the_documented_ones() -> None:
    recipes = _slots_recipes()
    assert any("parallel -j" in r for r in recipes) and any("xargs -P" in r for r in recipes)
    shell = "\n".join(re.findall(r"```sh\n(.*?)```", RECIPES, re.DOTALL)).splitlines()
    # A count straight into -j or -P loses slots' exit status, and its 0 means "no limit" there.
    assert all('"$(safegate slots' not in line for line in shell)


@pytest.mark.parametrize("recipe", _slots_recipes(), ids=lambda r: "parallel" if "parallel" in r else "xargs")
def test_slots_recipe_runs_what_fits_and_nothing_when_blocked(recipe: str, tmp_path: Path, sensor: Path,
                                                              env: dict[str, str]) -> None:
    tool = "parallel" if "parallel -j" in recipe else "xargs"
    if shutil.which(tool) is None:
        pytest.skip(f"{tool} is not installed here")
    safegate = Path(sys.executable).parent / "safegate"
    if not safegate.exists():
        pytest.skip(f"no safegate console script beside {sys.executable}")
    bindir = tmp_path / "bin"
    bindir.mkdir()
    (bindir / "safegate").symlink_to(safegate)
    (bindir / "small-model").write_text(SMALL_JOB)
    (bindir / "small-model").chmod(0o755)
    work = tmp_path / "work"
    (work / "inputs").mkdir(parents=True)
    for i in range(6):
        (work / "inputs" / f"in{i}.wav").write_text("")
    spans = tmp_path / "spans"

    def run_recipe(profile_toml: str) -> tuple[int, list[tuple[float, float]]]:
        cfg = tmp_path / "config.toml"
        cfg.write_text(neutral_config(sensor, profile_toml))
        spans.write_text("")
        recipe_env = {**env, "PATH": f"{bindir}:/usr/bin:/bin", "SAFEGATE_CONFIG": str(cfg), "SPANS": str(spans)}
        done = subprocess.run(["sh", "-c", recipe], cwd=work, env=recipe_env, capture_output=True, text=True,
                              timeout=TIMEOUT * 2, stdin=subprocess.DEVNULL)
        return done.returncode, [tuple(map(float, line.split())) for line in spans.read_text().splitlines()]

    slots = int(subprocess.run([str(safegate), "slots", "-p", "small-model", "--max", "8"], capture_output=True,
                               text=True, env={**env, "SAFEGATE_CONFIG": str(_write(tmp_path, sensor))}).stdout)
    code, ran = run_recipe(_recipe_toml())
    assert code == 0 and len(ran) == 6
    assert 1 <= _max_overlap(ran) <= max(slots, 1), ran
    # Too hot, then not enough memory: slots says 0 with 12 or 10, and the recipe starts nothing.
    sensor.write_text("95000\n")
    code, ran = run_recipe(_recipe_toml())
    assert (code, ran) == (ExitCode.THERMAL, [])
    sensor.write_text("40000\n")
    code, ran = run_recipe(_recipe_toml().replace('memory = "2G"', 'memory = "1000T"'))
    assert (code, ran) == (ExitCode.MEMORY, [])


def _write(tmp_path: Path, sensor: Path) -> Path:
    cfg = tmp_path / "slots-config.toml"
    cfg.write_text(neutral_config(sensor, _recipe_toml()))
    return cfg


# --- cron and systemd, as written ---------------------------------------------------------------------------------


def _cron_line() -> str:
    block = RECIPES.split("## cron:", 1)[1].split("```sh\n", 1)[1].split("```", 1)[0]
    entry = next(line for line in block.splitlines() if line and not line.startswith("#"))
    return entry.split(None, 5)[5]  # after minute, hour, day of month, month, day of week


def test_cron_recipe_in_crons_environment(tmp_path: Path, sensor: Path) -> None:
    # As cron runs it: sh -c in an environment of PATH=/usr/bin:/bin, HOME and SHELL only (the lock dir and
    # the GPU switch added, so the test stays in its own sandbox), safegate where the recipe says it is.
    safegate = Path(sys.executable).parent / "safegate"
    if not safegate.exists():
        pytest.skip(f"no safegate console script beside {sys.executable}")
    home = tmp_path / "home"
    (home / ".local" / "bin").mkdir(parents=True)
    (home / ".local" / "bin" / "safegate").symlink_to(safegate)
    (home / ".config" / "safegate").mkdir(parents=True)
    (home / ".config" / "safegate" / "config.toml").write_text(
        neutral_config(sensor, '[profiles.whisper-large-v3]\nmemory = "0"\ncompeting = []\n'))
    cron_env = {"PATH": "/usr/bin:/bin", "HOME": str(home), "SHELL": "/bin/sh",
                "SAFEGATE_LOCK_DIR": str(tmp_path / "locks"), "SAFEGATE_GPU": "none"}
    line = _cron_line()
    assert line.startswith("$HOME/.local/bin/safegate exec ") and " -- /" in line  # absolute paths, both
    log = home / "night.jsonl"
    # The job's command is not there: nothing runs, and the log says so.
    done = subprocess.run(["sh", "-c", line], env=cron_env, capture_output=True, text=True, timeout=TIMEOUT)
    assert done.returncode == 127, done.stderr
    events = [json.loads(row) for row in log.read_text().splitlines()]
    assert [e["event"] for e in events] == ["not_started"] and events[0]["exit_code"] == 127
    assert "/opt/whisper/bin/whisper" in events[0]["message"]
    # With the job where the line says it is (here: a stand-in), it runs under the gate and is logged.
    job = tmp_path / "whisper"
    job.write_text("#!/bin/sh\necho transcribed \"$@\"\n")
    job.chmod(0o755)
    done = subprocess.run(["sh", "-c", line.replace("/opt/whisper/bin/whisper", str(job))], env=cron_env,
                          capture_output=True, text=True, timeout=TIMEOUT)
    assert done.returncode == 0, done.stderr
    assert "transcribed --model large-v3 /data/in/next.mp3" in done.stdout
    kinds = [json.loads(row)["event"] for row in log.read_text().splitlines()]
    kinds = [kind for kind in kinds if kind != "sample"]  # the timeline comes and goes with the job's length
    assert kinds[1:] == ["admitted", "exit", "summary"], kinds


def systemd_unit() -> str:
    """The systemd recipe's unit, verbatim, between its markers (tests/test_vm_cgroup.py runs it under systemd)."""
    block = RECIPES.split("<!-- systemd-unit:", 1)[1].split("<!-- /systemd-unit -->", 1)[0]
    return block.split("```ini\n", 1)[1].split("```", 1)[0]


def test_systemd_recipe_has_one_bounded_gate() -> None:
    unit = dict(line.split("=", 1) for line in systemd_unit().splitlines() if "=" in line)
    # An ExecStartPre= check would grant nothing (its caller is PID 1): exec alone gates, its wait bounded.
    assert "ExecStartPre" not in unit
    start = unit["ExecStart"]
    assert start.startswith("/usr/local/bin/safegate exec ") and "--wait" in start
    timeout = re.search(r"--timeout (\S+)", start)
    assert timeout is not None and parse_duration(timeout.group(1)) > 0
    # The wait is the unit's start (safegate says READY=1 once the job runs), so the start timeout covers it,
    # and safegate's own --timeout gives up first, with an exit status that says why.
    assert unit["Type"] == "notify"
    assert parse_duration(unit["TimeoutStartSec"]) > parse_duration(timeout.group(1))
    # The job in the service's own cgroup: its MemoryMax=, accounting and kill reach it.
    assert unit["Delegate"] == "yes" and unit["KillMode"] == "mixed"


def test_systemd_recipe_says_what_each_line_does_and_what_happens_without_delegation() -> None:
    text = " ".join(RECIPES.split("<!-- /systemd-unit -->", 1)[1].split("\n## ", 1)[0].split())
    for said in ("ExecStartPre=safegate check` would grant nothing", "`TimeoutStartSec=` covers the wait",
                 "`<service>/supervisor`", "Without `Delegate=yes`", "outside the unit", "`--cgroup off`"):
        assert said in text, said
    assert "/usr/local/bin/safegate" in RECIPES.split("## systemd:", 1)[1].split("## ", 1)[0].split("```")[2]
