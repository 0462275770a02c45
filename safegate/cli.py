"""The command line: parse, call the core, render. Every failure becomes its exit code in main()."""

from __future__ import annotations

import os
import sys
from typing import Annotated

import typer

from safegate import __version__
from safegate.config import DEFAULT_PROFILE, load_config
from safegate.errors import SafegateError, UsageError, ValueParseError
from safegate.exitcodes import ExitCode, table_plain
from safegate.gate import Overrides, evaluate, resolve, wait_until_clear
from safegate.policy import Verdict
from safegate.render import blocking_summary, check_line, verdict_json, verdict_text
from safegate.units import Size, parse_duration, parse_size, parse_temp, validate_lock_name

# "\b" keeps click from re-wrapping the table into one paragraph.
EXIT_CODES_EPILOG = "\b\nExit codes:\n" + table_plain()

app = typer.Typer(
    name="safegate",
    help="Gate heavy ML jobs on memory, temperature, locks and competing processes.",
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
    context_settings={"help_option_names": ["-h", "--help"]},
)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"safegate {__version__}")
        raise typer.Exit(0)


@app.callback()
def _root(
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version and exit.")
    ] = False,
) -> None:
    """Gate heavy ML jobs on memory, temperature, locks and competing processes."""


def _parsed(option: str, parse: object, value: str | None) -> object:
    if value is None:
        return None
    try:
        return parse(value)  # type: ignore[operator]
    except ValueParseError as exc:
        raise UsageError(f"{option}: {exc}") from None


def _size_option(option: str, value: str | None) -> Size | None:
    size = _parsed(option, parse_size, value)
    assert size is None or isinstance(size, Size)
    return size


@app.command(epilog=EXIT_CODES_EPILOG)
def check(
    profile: Annotated[
        str, typer.Option("--profile", "-p", envvar="SAFEGATE_PROFILE", help="Profile to check for.")
    ] = DEFAULT_PROFILE,
    mem: Annotated[
        str | None, typer.Option(metavar="SIZE", help="Memory the job needs (default: the profile's memory).")
    ] = None,
    margin: Annotated[
        str | None,
        typer.Option(metavar="SIZE", help="RAM that must stay free after the job's need, e.g. 4G or 10% (default 4G)."),
    ] = None,
    max_temp: Annotated[
        str | None, typer.Option("--max-temp", metavar="C", help="Block at or above this temperature (default 80).")
    ] = None,
    lock: Annotated[
        str | None, typer.Option(metavar="NAME", help="Lock that must be free (default: the profile's lock).")
    ] = None,
    wait: Annotated[bool, typer.Option("--wait", help="Re-check until every check passes.")] = False,
    timeout: Annotated[
        str | None,
        typer.Option(metavar="DURATION", help="With --wait: give up after this long, e.g. 90s, 5m (default: never)."),
    ] = None,
    json_output: Annotated[bool, typer.Option("--json", help="Print one JSON object with every check.")] = False,
    quiet: Annotated[
        bool, typer.Option("--quiet", "-q", help="Print nothing on success; on a block, one line on stderr.")
    ] = False,
    config: Annotated[
        str | None,
        typer.Option(metavar="PATH", help="Config file (default: $SAFEGATE_CONFIG, ~/.config/safegate/config.toml, "
                     "/etc/safegate/config.toml)."),
    ] = None,
) -> None:
    """Is it safe to start this job now? Answer with the exit code.

    Runs five checks: memory margin (and memory pressure), temperature, the profile's lock,
    competing processes, and stale lock cleanup.
    """
    overrides = Overrides(
        mem=_size_option("--mem", mem),
        margin=_size_option("--margin", margin),
        max_temp=_parsed("--max-temp", parse_temp, max_temp),  # type: ignore[arg-type]
        lock=_parsed("--lock", validate_lock_name, lock),  # type: ignore[arg-type]
    )
    wait_for = _parsed("--timeout", parse_duration, timeout)
    if timeout is not None and not wait:
        raise UsageError("--timeout: only meaningful with --wait")
    settings = resolve(load_config(config), profile, overrides)

    if wait:
        last_shown: list[str] = []

        def progress(verdict: Verdict) -> None:
            line = blocking_summary(verdict)
            if not quiet and not json_output and line not in last_shown:
                last_shown[:] = [line]
                typer.echo(f"safegate: waiting: {line}", err=True)

        verdict = wait_until_clear(settings, wait_for, on_blocked=progress)  # type: ignore[arg-type]
    else:
        verdict = evaluate(settings)

    if json_output:
        typer.echo(verdict_json(verdict))
    elif quiet:
        for failure in verdict.failures:
            typer.echo(f"safegate: {check_line(failure)}", err=True)
    else:
        typer.echo(verdict_text(verdict))
    raise typer.Exit(int(verdict.exit_code))


def main(argv: list[str] | None = None) -> int:
    """Run the CLI; the one place where failures become exit codes and one-line messages."""
    args = sys.argv[1:] if argv is None else argv
    try:
        result = app(args=args, prog_name="safegate", standalone_mode=False)
    except SafegateError as exc:
        typer.echo(f"safegate: {exc}", err=True)
        return int(exc.exit_code)
    except typer.Exit as exc:
        return int(exc.exit_code)
    except (typer.Abort, KeyboardInterrupt):
        typer.echo("safegate: interrupted", err=True)
        return 130
    except typer.TyperException as exc:
        # click's usage errors (unknown option, missing value, no command): one line, exit 2.
        message = exc.format_message() if hasattr(exc, "format_message") else str(exc)
        ctx = getattr(exc, "ctx", None)
        if type(exc).__name__ == "NoArgsIsHelpError" and ctx is not None:
            typer.echo(ctx.get_help(), err=True)
            return int(ExitCode.USAGE)
        hint = f" (see '{ctx.command_path} --help')" if ctx is not None else ""
        typer.echo(f"safegate: {' '.join(message.split())}{hint}", err=True)
        return int(ExitCode.USAGE)
    except Exception as exc:
        if os.environ.get("SAFEGATE_DEBUG"):
            raise
        typer.echo(f"safegate: internal error: {type(exc).__name__}: {exc}", err=True)
        return int(ExitCode.INTERNAL)
    return int(result) if isinstance(result, int) else 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
