"""The entry point (`safegate`, `python -m safegate`): `check` with its usual options runs without typer.

GNU parallel's --limit calls `safegate check` before every job start and Slurm on every node, so its start-up
is most of its cost, and typer (click, inspect, the whole app) was most of that. A plain `check` is parsed here by
hand; anything else (another command, --help, an unknown or repeated option, a value that starts with "-", a
shell asking for completions) goes to the typer app untouched, and typer says what it always says. Both ways run
check_command(): the same code, the same output, the same exit code (tests/test_fastpath.py compares them).
"""

from __future__ import annotations

import errno
import os
import signal
import sys
from typing import Any, TextIO, cast

from safegate.exitcodes import ExitCode
from safegate.settings import BY_KEY

COMPLETE_VAR = "_SAFEGATE_COMPLETE"  # set by a shell asking for completions (cli.py answers it)
PROFILE_ENV = "SAFEGATE_PROFILE"  # the --profile option's envvar, as typer reads it

# check's options: name on the command line -> parameter of check_command. The setting options are named by the
# settings table, as cli_options names them for typer.
VALUE_OPTIONS = {"--profile": "profile", "-p": "profile", "--timeout": "timeout", "--config": "config",
                 "--grant-to": "grant_to",
                 **{BY_KEY[key].option: name for key, name in (
                     ("memory", "mem"), ("memory_margin", "margin"), ("max_temp", "max_temp"), ("lock", "lock"),
                     ("gpu", "gpu"), ("gpu_memory", "gpu_mem"))}}
FLAGS = {"--wait": "wait", "--json": "json_output", "--quiet": "quiet", "-q": "quiet", "--no-grant": "no_grant"}


def parse_check(args: list[str]) -> dict[str, Any] | None:
    """check_command's arguments for `check ...` as click would parse them; None for anything typer should see."""
    if not args or args[0] != "check" or os.environ.get(COMPLETE_VAR):
        return None
    values: dict[str, Any] = {}
    rest = iter(args[1:])
    for arg in rest:
        value: str | bool | None
        if arg in FLAGS:
            name, value = FLAGS[arg], True
        elif arg.startswith("--") and "=" in arg:
            option, _, value = arg.partition("=")
            if option not in VALUE_OPTIONS:
                return None  # a flag given a value, or an unknown option
            name = VALUE_OPTIONS[option]
        elif arg in VALUE_OPTIONS:
            value = next(rest, None)
            if value is None or value.startswith("-"):
                return None  # missing; or one click reads as the value, which typer's messages may then be about
            name = VALUE_OPTIONS[arg]
        elif arg.startswith("-p") and not arg.startswith("--"):
            name, value = "profile", arg[2:]  # -pNAME, as click reads a short option's attached value
        else:
            return None  # --help, --, a positional argument, an unknown or clustered option
        if name in values:
            return None  # repeated: typer decides
        values[name] = value
    if "profile" not in values:
        values["profile"] = os.environ.get(PROFILE_ENV) or None  # click ignores an empty envvar
    return values


def check_command(*, profile: str | None = None, mem: str | None = None, margin: str | None = None,
                  max_temp: str | None = None, lock: str | None = None, gpu: str | None = None,
                  gpu_mem: str | None = None, wait: bool = False, timeout: str | None = None,
                  json_output: bool = False, quiet: bool = False, config: str | None = None,
                  no_grant: bool = False, grant_to: str | None = None) -> int:
    """`safegate check`, parsed: evaluate (or wait), render, and the exit code. The typer command calls it too."""
    from safegate.cli.plain import echo, gate_overrides, grant_pid, progress, wait_timeout
    from safegate.cli.render import check_line, verdict_json, verdict_text
    from safegate.commands.check import check as run_check

    shown = progress(quiet or json_output)
    wait_for = wait_timeout(wait, timeout)
    verdict, note = run_check(config, profile, gate_overrides(mem, margin, max_temp, lock, gpu, gpu_mem), wait=wait,
                              timeout=wait_for, on_blocked=shown, grant=not no_grant, grant_to=grant_pid(grant_to))
    shown.finish(verdict, wait_for if wait else None)
    if note and verdict.ok and not quiet:
        echo(f"safegate: {note}", err=True)
    if json_output:
        echo(verdict_json(verdict))
    elif quiet:
        for failure in verdict.failures:
            echo(f"safegate: {check_line(failure)}", err=True)
    else:
        echo(verdict_text(verdict))
    return int(verdict.exit_code)


def main(argv: list[str] | None = None) -> int:
    """Run the CLI: a plain check here, everything else through the typer app (cli.main)."""
    args = sys.argv[1:] if argv is None else list(argv)
    options = parse_check(args)
    if options is None:
        from safegate.cli.app import main as typer_main

        return typer_main(args)
    from safegate.cli.plain import echo, failure_code, fill_closed_stdio, interrupted

    fill_closed_stdio()
    # What typer's main and cli.main make of each way a command can end, in their order.
    try:
        return check_command(**options)
    except KeyboardInterrupt:
        return ExitCode.for_signal(signal.SIGINT)  # typer: Exit(130), nothing said
    except EOFError:
        echo("", err=True)  # click's Abort: an empty line, then cli.main's word
        return interrupted()
    except Exception as exc:
        if isinstance(exc, OSError) and exc.errno == errno.EPIPE:
            from typer._click.utils import PacifyFlushWrapper

            sys.stdout = cast(TextIO, PacifyFlushWrapper(sys.stdout))
            sys.stderr = cast(TextIO, PacifyFlushWrapper(sys.stderr))
            return 1
        code = failure_code(exc)
        if code is None:
            raise
        return code
