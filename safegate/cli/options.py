"""The command line's shared typer options: part of the CLI layer (cli.py declares the commands). Each setting's
option name, metavar and help come from the settings table; how their values become overrides is in cli_plain."""

from __future__ import annotations

import os
import re
import sys
from collections.abc import Callable
from typing import Annotated, Any

import typer
from typer.core import TyperCommand

from safegate.cli.plain import echo
from safegate.config.file import load_config
from safegate.errors import SafegateError
from safegate.settings import BY_KEY
from safegate.units import printable


class PlainUsage(TyperCommand):
    """A command whose usage line names a required argument plainly (`NAME`, not typer's `{NAME}`)."""

    def collect_usage_pieces(self, ctx: Any) -> list[str]:
        return [re.sub(r"^\{(.*)\}$", r"\1", piece) for piece in super().collect_usage_pieces(ctx)]


REPORT_DEFAULT = "safegate-report.html"  # `report` without -o writes this, in the current directory

# Where pip, a venv or pipx put the man page and completions (pyproject's data-files), under a prefix.
INSTALLED_DOCS = (("man page", "share/man/man1/safegate.1"),
                  ("bash completion", "share/bash-completion/completions/safegate.bash"),
                  ("zsh completion", "share/zsh/site-functions/_safegate"),
                  ("fish completion", "share/fish/vendor_completions.d/safegate.fish"))


def version_text(version: str) -> str:
    """The version, and where this installation's man page and completions are (or that it has none: an
    editable or an old pipx install; README, "Completions and man page", says what to do then)."""
    import site

    prefixes = dict.fromkeys([sys.prefix, site.getuserbase()])
    lines = [f"safegate {version}"]
    for what, rel in INSTALLED_DOCS:
        found = next((os.path.join(p, rel) for p in prefixes if os.path.isfile(os.path.join(p, rel))), None)
        lines.append(f"{what}: {found or 'not installed with this package'}")
    man = next((p for p in prefixes if os.path.isfile(os.path.join(p, INSTALLED_DOCS[0][1]))), None)
    if man is not None and os.path.join(man, "bin") not in os.environ.get("PATH", "").split(os.pathsep):
        # man finds <prefix>/share/man only for a <prefix>/bin on PATH.
        lines.append(f"read it with: man -M {os.path.join(man, 'share', 'man')} safegate")
    return "\n".join(lines)


def setting_option(key: str, **extra: Any) -> Any:
    """The option of setting *key*, its name, metavar and help from the settings table."""
    setting = BY_KEY[key]
    return typer.Option(setting.option, metavar=setting.metavar, help=setting.help, **extra)


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


def event_printer(quiet: bool, shown: Any) -> Callable[[Any], None]:
    """exec's events as stderr lines: not the timeline's samples (those are for --log), and with -q only warnings,
    breaches and errors."""
    chatty = {"admitted", "exit", "summary", "cleanup", "notice"}

    def on_event(event: Any) -> None:
        if event.kind == "sample":
            return
        shown.end_line()
        if not (quiet and event.kind in chatty):
            prefix = f"{event.kind}: " if event.kind in ("summary", "warning", "breach") else ""
            # A closed terminal or pipe must not be what stops the watch: the job goes on, still watched.
            echo(f"safegate: {prefix}{printable(event.message)}", err=True)

    return on_event


def usage_failure(exc: Exception) -> int:
    """click's usage errors (unknown option, missing value, no command) as one line, exit 2; no arguments at all
    prints the help."""
    from safegate.exitcodes import ExitCode

    message = exc.format_message() if hasattr(exc, "format_message") else str(exc)
    ctx = getattr(exc, "ctx", None)
    if type(exc).__name__ == "NoArgsIsHelpError" and ctx is not None:
        echo(ctx.get_help(), err=True, controls=True)
        return int(ExitCode.USAGE)
    hint = f" (see '{ctx.command_path} --help')" if ctx is not None else ""
    echo(f"safegate: {printable(' '.join(message.split()))}{hint}", err=True)
    return int(ExitCode.USAGE)
