"""docs/recipes.md: every safegate command in it parses, and the parallel adapter works for real."""

from __future__ import annotations

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

from safegate.cli import app
from safegate.exitcodes import ExitCode

RECIPES = (REPO / "docs" / "recipes.md").read_text()
ADAPTER = REPO / "docs" / "examples" / "safegate-parallel-limit"


def safegate_commands() -> list[list[str]]:
    found = []
    for block in re.findall(r"```(?:sh|ini)\n(.*?)```", RECIPES, re.DOTALL):
        for raw in block.splitlines():
            line = raw.split("  # ")[0]
            for match in re.finditer(r"(?:^|[\s=(\"])(?:/usr/local/bin/)?safegate (\w+)([^\"`)&|]*)", line):
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
