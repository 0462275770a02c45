"""The entry point (`safegate`, `python -m safegate`): `check` with its usual options runs without typer.

GNU parallel's --limit calls `safegate check` before every job start and Slurm on every node, so its start-up
is most of its cost, and typer (click, inspect, the whole app) was most of that. A plain `check` is parsed here by
hand; anything else (another command, --help, an unknown or repeated option, a value that starts with "-", a
shell asking for completions) goes to the typer app untouched, and typer says what it always says. Both ways run
cli.plain.check_command() under cli.plain.exit_status(): the same code, output and exit code (tests/test_fastpath.py
compares them).
"""

from __future__ import annotations

import os
import sys
from typing import Any

from safegate.cli.plain import COMPLETE_VAR, check_command, exit_status, fill_closed_stdio
from safegate.config.model import SETTINGS

PROFILE_ENV = "SAFEGATE_PROFILE"  # the --profile option's envvar, as typer reads it

# check's options: name on the command line -> parameter of check_command. The setting options come from the
# settings table, as cli.options declares them for typer; they go into check_command's `given`.
VALUE_OPTIONS = {"--profile": "profile", "-p": "profile", "--timeout": "timeout", "--config": "config",
                 "--grant-to": "grant_to"}
SETTING_OPTIONS = {s.option: s.param for s in SETTINGS if s.option is not None and "check" in s.commands}
FLAGS = {"--wait": "wait", "--json": "json_output", "--quiet": "quiet", "-q": "quiet", "--no-grant": "no_grant"}


def parse_check(args: list[str]) -> dict[str, Any] | None:
    """check_command's arguments for `check ...` as click would parse them; None for anything typer should see."""
    if not args or args[0] != "check" or os.environ.get(COMPLETE_VAR):
        return None
    values: dict[str, Any] = {}
    given: dict[str, Any] = {}
    rest = iter(args[1:])
    for arg in rest:
        value: str | bool | None
        option = arg
        if arg in FLAGS:
            option, value = arg, True
        elif arg.startswith("--") and "=" in arg:
            option, _, value = arg.partition("=")
            if option not in VALUE_OPTIONS and option not in SETTING_OPTIONS:
                return None  # a flag given a value, or an unknown option
        elif arg in VALUE_OPTIONS or arg in SETTING_OPTIONS:
            value = next(rest, None)
            if value is None or value.startswith("-"):
                return None  # missing; or one click reads as the value, which typer's messages may then be about
        elif arg.startswith("-p") and not arg.startswith("--"):
            option, value = "-p", arg[2:]  # -pNAME, as click reads a short option's attached value
        else:
            return None  # --help, --, a positional argument, an unknown or clustered option
        into, name = (given, SETTING_OPTIONS[option]) if option in SETTING_OPTIONS else (
            values, FLAGS.get(option) or VALUE_OPTIONS[option])
        if name in into:
            return None  # repeated: typer decides
        into[name] = value
    if "profile" not in values:
        values["profile"] = os.environ.get(PROFILE_ENV) or None  # click ignores an empty envvar
    values["given"] = given
    return values


def main(argv: list[str] | None = None) -> int:
    """Run the CLI: a plain check here, everything else through the typer app (cli.app.main)."""
    args = sys.argv[1:] if argv is None else list(argv)
    options = parse_check(args)
    if options is None:
        from safegate.cli.app import main as typer_main

        return typer_main(args)
    fill_closed_stdio()
    return exit_status(lambda: check_command(**options))
