"""README, --help and the code must not disagree."""

from __future__ import annotations

import re
import subprocess

import pytest
from conftest import REPO, Run

from safegate.config import _PROFILE_KEYS
from safegate.exitcodes import ExitCode, table_markdown, table_plain

README = (REPO / "README.md").read_text()


def test_readme_exit_code_table_is_the_enum() -> None:
    block = README.split("<!-- exit-codes:", 1)[1].split("-->", 1)[1].split("<!-- /exit-codes -->", 1)[0]
    assert block.strip() == table_markdown()


def test_help_epilog_lists_every_exit_code(run: Run) -> None:
    out = run("check", "--help").stdout
    help_lines = [" ".join(line.split()) for line in out.split("Exit codes:", 1)[1].strip().splitlines()]
    assert help_lines == [" ".join(line.split()) for line in table_plain().splitlines()]
    assert [line.split()[0] for line in help_lines] == [
        "128+N" if c is ExitCode.SIGNALLED else str(int(c)) for c in ExitCode
    ]


def _help_options(run: Run, command: str) -> set[str]:
    out = run(command, "--help").stdout
    return set(re.findall(r"(?<![\w-])(--[a-z][a-z-]+)", out.split("Exit codes")[0])) - {"--help"}


@pytest.mark.parametrize("command", ["check", "exec"])
def test_readme_option_table_matches_help(run: Run, command: str) -> None:
    table = README.split(f"<!-- options: {command} -->", 1)[1].split("\n\n", 1)[0]
    documented = set(re.findall(r"(--[a-z][a-z-]+)", table))
    assert documented == _help_options(run, command)


@pytest.mark.parametrize("command", ["check", "exec"])
def test_readme_synopsis_matches_help(run: Run, command: str) -> None:
    synopsis = README.split(f"safegate {command} [-p PROFILE]", 1)[1].split("```", 1)[0]
    assert set(re.findall(r"--[a-z-]+", synopsis)) | {"--profile", "--quiet"} == _help_options(run, command)


def test_readme_profile_keys_match_the_config_schema() -> None:
    line = README.split("Profile keys:", 1)[1].split(".", 1)[0]
    assert set(re.findall(r"`(\w+)`", line)) == _PROFILE_KEYS


def test_ci_runs_exactly_the_readme_test_command() -> None:
    ci = (REPO / ".ci" / "run").read_text()
    awk = re.search(r"cmd=\$\(awk '(.+)' README.md\)", ci)
    assert awk is not None
    extracted = subprocess.run(["awk", awk.group(1), str(REPO / "README.md")], capture_output=True, text=True,
                               check=True).stdout.strip()
    fenced = README.split("<!-- test-command -->", 1)[1].split("```sh\n", 1)[1].split("\n", 1)[0]
    assert extracted == fenced and "pytest" in extracted and "venv" in extracted
