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
from support import REPO, TIMEOUT, Procs, Run, hold_with_flock

from safegate.cli import app

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
