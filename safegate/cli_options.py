"""The command line's shared options and how their values become overrides: part of the CLI layer (cli.py
declares the commands). Each setting's option name, metavar and help come from the settings table."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from typing import Annotated, Any

import typer

from safegate.config import load_config
from safegate.errors import SafegateError, UsageError, ValueParseError
from safegate.preflight import Overrides
from safegate.render import blocking_summary
from safegate.results import Verdict
from safegate.settings import BY_KEY, parse_option
from safegate.units import parse_duration, printable


def echo(message: str, err: bool = False, *, controls: bool = False) -> None:
    """Print a line for people. A full disk, a closed pipe or a hung-up terminal must never change an outcome or an
    exit code: on a write error the stream is pointed at /dev/null (so neither later lines nor Python's flush at
    exit fail) and the command goes on.

    Every line is escaped (unless *controls*: safegate's own screen redraw): render escapes what came from outside
    already, and this is the net under it, so no string another user wrote ever reaches a terminal raw."""
    if not controls:
        message = safe_lines(message)
    try:
        typer.echo(message, err=err)
    except OSError:
        stream = sys.stderr if err else sys.stdout
        try:
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, stream.fileno())
            os.close(devnull)
        except (OSError, ValueError, AttributeError):
            pass


def safe_lines(message: str) -> str:
    """*message* with every control character but its line breaks escaped."""
    return "\n".join(printable(line) for line in message.split("\n"))


def parsed(option: str, parse: object, value: str | None) -> object:
    if value is None:
        return None
    try:
        return parse(value)  # type: ignore[operator]
    except ValueParseError as exc:
        raise UsageError(f"{option}: {exc}") from None


def parse_overrides(**values: str | None) -> Overrides:
    """Parse each given option by its setting's kind; a bad value is a usage error naming the option."""
    parsed: dict[str, Any] = {}
    for key, text in values.items():
        if text is not None:
            try:
                parsed[key] = parse_option(key, text)
            except ValueParseError as exc:
                raise UsageError(f"{BY_KEY[key].option}: {exc}") from None
    return Overrides(**parsed, explicit_gpu=values.get("gpu") is not None)


def gate_overrides(mem: str | None, margin: str | None, max_temp: str | None, lock: str | None, gpu: str | None,
                    gpu_mem: str | None) -> Overrides:
    return parse_overrides(memory=mem, memory_margin=margin, max_temp=max_temp, lock=lock, gpu=gpu, gpu_memory=gpu_mem)


def setting_option(key: str, **extra: Any) -> Any:
    """The option of setting *key*, its name, metavar and help from the settings table."""
    setting = BY_KEY[key]
    return typer.Option(setting.option, metavar=setting.metavar, help=setting.help, **extra)


def wait_timeout(wait: bool, timeout: str | None) -> float | None:
    seconds = parsed("--timeout", parse_duration, timeout)
    if timeout is not None and not wait:
        raise UsageError("--timeout: only meaningful with --wait")
    return seconds if isinstance(seconds, float) else None


def progress(silent: bool) -> Callable[[Verdict], None]:
    """While waiting: one line on stderr each time the reason for waiting changes."""
    last_shown: list[str] = []

    def progress(verdict: Verdict) -> None:
        line = blocking_summary(verdict)
        if not silent and line not in last_shown:
            last_shown[:] = [line]
            echo(f"safegate: waiting: {line}", err=True)

    return progress


def complete_profiles(incomplete: str) -> list[str]:
    """Profile names for shell completion (from the config in effect; nothing when it is broken)."""
    try:
        names = load_config().profiles
    except SafegateError:
        return []
    return [n for n in names if n.startswith(incomplete)]


def complete_locks(incomplete: str) -> list[str]:
    from safegate.locks.directory import resolve_lock_dir
    from safegate.locks.store import LockStore

    try:
        store = LockStore(resolve_lock_dir(load_config().lock_dir, os.environ))
    except SafegateError:
        return []
    return [n for n in store.names() if n.startswith(incomplete)]


ProfileOpt = Annotated[
    str | None,
    typer.Option("--profile", "-p", envvar="SAFEGATE_PROFILE", metavar="PROFILE", autocompletion=complete_profiles,
                 help="Profile to use (default: default; exec: the profile whose match fits the command)."),
]
MemOpt = Annotated[str | None, setting_option("memory")]
MarginOpt = Annotated[str | None, setting_option("memory_margin")]
MaxTempOpt = Annotated[str | None, setting_option("max_temp")]
LockOpt = Annotated[str | None, setting_option("lock", autocompletion=complete_locks)]
GpuOpt = Annotated[str | None, setting_option("gpu")]
GpuMemOpt = Annotated[str | None, setting_option("gpu_memory")]
WaitOpt = Annotated[bool, typer.Option("--wait", help="Re-check until every check passes.")]
TimeoutOpt = Annotated[
    str | None,
    typer.Option(metavar="DURATION", help="With --wait: give up after this long, e.g. 90s, 5m (default: never)."),
]
ConfigOpt = Annotated[
    str | None,
    typer.Option(metavar="PATH", help="Config file (default: $SAFEGATE_CONFIG, ~/.config/safegate/config.toml, "
                 "/etc/safegate/config.toml)."),
]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print JSON instead of text.")]
