"""`safegate check` without typer (safegate.cli.fastpath) against the typer app: the same arguments, the same output and
exit code, for good and bad input; and what the fast path leaves to typer."""

from __future__ import annotations

import inspect
import re
import subprocess
from pathlib import Path
from typing import Any

import pytest
from support import ALONE, PY, TIMEOUT, Procs, Run, hold_with_flock

from safegate.cli import app as cli
from safegate.cli import plain
from safegate.cli.fastpath import FLAGS, PROFILE_ENV, SETTING_OPTIONS, VALUE_OPTIONS, parse_check

TYPER_MAIN = "import sys; from safegate.cli.app import main; sys.exit(main(sys.argv[1:]))"

EVERY_OPTION = ["--mem", "6G", "--margin", "10%", "--max-temp", "70", "--lock", "night", "--gpu", "auto",
                "--gpu-mem", "1G", "--wait", "--timeout", "30m", "--json", "-q", "--config", "/nonexistent/c.toml"]
# What the fast path parses itself: click's ways of giving a value, flags, empty values, odd values.
PARSED = [
    [], ["-p", "default"], ["-pdefault"], ["--profile=default"], ["--profile", "whisper-large-v3"], ["-p", ""],
    ["--profile="], ["-p=x"], ["--mem=6G", "--quiet"], ["--mem", ""], ["--mem=-5"], ["-p-x"], EVERY_OPTION,
    ["--json", "--wait", "--timeout=1s", "--lock=a b", "--config", "c.toml"], ["--max-temp", "1e3", "-q"],
    ["--mem", "caf\u00e9"], ["--lock", "\x1b[31mred"],
]
# What it leaves to typer: help, missing values, values starting with "-", flags with values, repeats, extra
# arguments, unknown or clustered options.
LEFT_TO_TYPER = [
    ["--help"], ["-h"], ["--mem"], ["-p"], ["--mem", "-1"], ["--profile", "--help"], ["--wait=1"], ["--json=no"],
    ["extra"], ["--", "x"], ["-q", "-q"], ["--mem", "1G", "--mem=2G"], ["-p", "a", "--profile", "b"], ["--bogus"],
    ["--mem6G"], ["-qp", "x"], ["-x"], ["-"], [""], ["--no-wait"], ["--prof", "x"],
]


def _typer_arguments(args: list[str], monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    """What the typer command hands to check_command for `check *args*`."""
    seen: list[dict[str, Any]] = []

    def record(**kwargs: Any) -> int:
        seen.append(kwargs)
        return 0

    monkeypatch.setattr(cli, "check_command", record)
    assert cli.main(["check", *args]) == 0
    assert len(seen) == 1
    return seen[0]


@pytest.mark.parametrize("args", PARSED, ids=repr)
@pytest.mark.parametrize("profile_env", [None, "", "from-env"])
def test_the_fast_path_parses_as_typer_does(args: list[str], profile_env: str | None,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    if profile_env is None:
        monkeypatch.delenv(PROFILE_ENV, raising=False)
    else:
        monkeypatch.setenv(PROFILE_ENV, profile_env)
    parsed = parse_check(["check", *args])
    assert parsed is not None
    defaults = {name: p.default for name, p in inspect.signature(plain.check_command).parameters.items()}
    assert {**defaults, **parsed} == _typer_arguments(args, monkeypatch)


@pytest.mark.parametrize("args", [["check", *a] for a in LEFT_TO_TYPER] + [[], ["status"], ["--version"],
                                                                            ["check-x"], ["exec", "--", "true"]],
                         ids=repr)
def test_anything_unusual_is_left_to_typer(args: list[str]) -> None:
    assert parse_check(args) is None


def test_a_shell_asking_for_completions_is_left_to_typer(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(plain.COMPLETE_VAR, "bash_complete")
    assert parse_check(["check", "-q"]) is None


def test_the_fast_path_knows_exactly_the_options_of_the_typer_command() -> None:
    import typer.main
    from typer.core import TyperGroup, TyperOption

    command = typer.main.get_command(cli.app)
    assert isinstance(command, TyperGroup)
    check = command.commands["check"]
    options = [p for p in check.params if isinstance(p, TyperOption)]
    # One argument: the job after --, which the fast path leaves to typer (check -- CMD).
    assert [p.name for p in check.params if not isinstance(p, TyperOption)] == ["command"]
    assert parse_check(["check", "--", "whisper"]) is None
    names = {name for p in options for name in (*p.opts, *p.secondary_opts)}
    assert names == set(VALUE_OPTIONS) | set(SETTING_OPTIONS) | set(FLAGS)
    for p in options:
        assert {FLAGS.get(n) or VALUE_OPTIONS.get(n) or SETTING_OPTIONS.get(n) for n in p.opts} == {p.name}, p.opts
        assert p.is_flag == all(n in FLAGS for n in p.opts) and not p.secondary_opts and not p.multiple
        assert not p.count and p.nargs == 1 and p.callback is None
        assert p.envvar == (PROFILE_ENV if p.name == "profile" else None)


# --- the real thing, in subprocesses ------------------------------------------------------------------------------


Result = subprocess.CompletedProcess[str]


def _both(run: Run, *args: str, **env: str) -> tuple[Result, Result]:
    fast = subprocess.run([*ALONE, PY, "-m", "safegate", *args], env={**run.env, **env}, capture_output=True,
                          text=True, errors="surrogateescape", timeout=TIMEOUT)
    slow = subprocess.run([*ALONE, PY, "-c", TYPER_MAIN, *args], env={**run.env, **env}, capture_output=True,
                          text=True, errors="surrogateescape", timeout=TIMEOUT)
    return fast, slow


def _same(fast: subprocess.CompletedProcess[str], slow: subprocess.CompletedProcess[str], *,
          figures: bool = False) -> None:
    def norm(text: str) -> str:
        # Two looks at the machine differ in its figures (free RAM, times, pids), never in anything else.
        return re.sub(r"\d+(\.\d+)?", "N", text) if figures else text

    assert (fast.returncode, norm(fast.stdout), norm(fast.stderr)) == (
        slow.returncode, norm(slow.stdout), norm(slow.stderr))
    assert "Traceback" not in fast.stderr


@pytest.mark.parametrize("args", [
    ["--mem", "lots"], ["--margin", "-"], ["--max-temp", "hot"], ["--lock", "no/slash"], ["--gpu", "first"],
    ["--gpu-mem", "1Q"], ["--timeout", "5m"], ["--wait", "--timeout", "soon"], ["-p", "no-such-profile"],
    ["-p", ""], ["--mem", ""], ["--mem", "caf\u00e9"], ["--lock", "\x1b[31mred"], ["--mem=-5"],
], ids=repr)
def test_bad_input_gets_the_same_message_and_code(run: Run, config: Path, args: list[str]) -> None:
    fast, slow = _both(run, "check", "--config", str(config), *args)
    assert fast.returncode in {2, 3}, fast.stderr
    _same(fast, slow)


@pytest.mark.parametrize("encoding", ["ascii", "latin-1", "utf-8"])
def test_a_stream_of_any_encoding_gets_the_same_bytes(run: Run, config: Path, encoding: str) -> None:
    # An ASCII stream is one click re-wraps as UTF-8: the fast path hands such streams to typer.echo.
    for args in (["--mem", "caf\u00e9"], ["-p", "\u00e9t\u00e9"], ["--lock", "\u00fc/x"]):
        fast, slow = _both(run, "check", "--config", str(config), *args, PYTHONIOENCODING=encoding)
        assert fast.returncode in {2, 3} and fast.stderr, fast
        _same(fast, slow)


def test_a_missing_or_broken_config_gets_the_same_message(run: Run, tmp_path: Path) -> None:
    broken = tmp_path / "broken.toml"
    broken.write_text("[defaults\n")
    for path in (tmp_path / "missing.toml", broken):
        _same(*_both(run, "check", "--config", str(path), "-q"))


# The repeated option's sizes make the outcome independent of the machine's free memory (which moves between the
# two runs): the last one wins (0 passes), where the first (1T) could never fit.
HERMETIC = [["--mem", "1T", "--mem=0"] if a == ["--mem", "1G", "--mem=2G"] else a for a in LEFT_TO_TYPER[:12]]


@pytest.mark.parametrize("args", HERMETIC, ids=repr)
def test_what_typer_answers_is_answered_by_typer(run: Run, config: Path, args: list[str]) -> None:
    # Two looks at the machine (a check that runs) differ in its figures and pids: compared without them.
    assert parse_check(["check", *args]) is None
    _same(*_both(run, "check", *args, "--config", str(config)), figures=True)


@pytest.mark.parametrize("args", [["--mem", "0"], ["--mem", "0", "-q"], ["--mem", "0", "--json"],
                                  ["--mem", "0", "--wait", "--timeout", "5s", "-q"]], ids=repr)
def test_a_passing_check_prints_the_same(run: Run, config: Path, args: list[str]) -> None:
    fast, slow = _both(run, "check", "--config", str(config), *args)
    assert fast.returncode == 0, fast.stderr
    _same(fast, slow, figures=True)


def test_a_blocked_check_prints_the_same(run: Run, config: Path, lock_dir: Path, procs: Procs) -> None:
    hold_with_flock(procs, lock_dir / "heavy.lock")
    for args in (["--mem", "0"], ["--mem", "0", "-q"], ["--mem", "0", "--json"],
                 ["--mem", "0", "--wait", "--timeout", "1s"], ["--mem", "0", "--wait", "--timeout", "1s", "-q"]):
        fast, slow = _both(run, "check", "--config", str(config), *args)
        assert fast.returncode == 13, fast.stderr
        _same(fast, slow, figures=True)


def test_a_plain_check_imports_no_typer_no_psutil_and_no_dataclasses(run: Run, config: Path) -> None:
    # typer (click, the whole app) and dataclasses (exec() per class) were most of check's start-up: its records
    # are msgspec Structs, its parsing is fastpath's.
    script = ("import sys; from safegate.cli.fastpath import main; code = main(sys.argv[1:]); "
              "print(sorted({m.split('.')[0] for m in sys.modules} & "
              "{'typer', 'click', 'rich', 'psutil', 'dataclasses'})); "
              "sys.exit(code)")
    result = subprocess.run([*ALONE, PY, "-c", script, "check", "--config", str(config), "--mem", "0", "-q"],
                            env=run.env,
                            capture_output=True, text=True, timeout=TIMEOUT)
    assert (result.returncode, result.stdout, result.stderr) == (0, "[]\n", "")
    # Anything else still goes through typer.
    script = script.replace("'psutil', 'dataclasses'", "'nothing'")
    result = subprocess.run([*ALONE, PY, "-c", script, "check", "--config", str(config), "--mem", "0", "-q", "-q"],
                            env=run.env, capture_output=True, text=True, timeout=TIMEOUT)
    assert (result.returncode, result.stdout) == (0, "['typer']\n"), result  # click takes a flag twice
