"""The command line's shared options and how their values become overrides: part of the CLI layer (cli.py
declares the commands). Each setting's option name, metavar and help come from the settings table."""

from __future__ import annotations

import os
import re
import shutil
import sys
import time
from collections.abc import Callable
from typing import Annotated, Any

import typer
from typer.core import TyperCommand

from safegate.config import load_config
from safegate.errors import SafegateError, UsageError, ValueParseError
from safegate.preflight import Overrides
from safegate.render import blocking_summary
from safegate.results import Verdict
from safegate.settings import BY_KEY, parse_option
from safegate.units import format_duration, parse_duration, printable


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


REMIND_EVERY = 60.0  # seconds: off a terminal, an unchanged reason is said again this often


class Progress:
    """What waiting shows on stderr. On a terminal: one live line (time waited, the reason, which says the place
    in line when that is what blocks), rewritten in place. Elsewhere (a log, cron's mail): a line each time the
    reason changes, and one a minute while it does not. At the end, `timed out after D` when --timeout ran out."""

    def __init__(self, silent: bool, clock: Callable[[], float] = time.monotonic, live: bool | None = None) -> None:
        self.silent = silent
        self.clock = clock
        self.start = clock()
        self.live = _stderr_is_terminal() if live is None else live
        self.shown = ""
        self.shown_at = 0.0
        self.open_line = False

    def __call__(self, verdict: Verdict) -> None:
        if self.silent:
            return
        now = self.clock()
        line = blocking_summary(verdict)
        waited = format_duration(now - self.start)
        if self.live:
            width = shutil.get_terminal_size((100, 24)).columns
            _write_err(f"\r\x1b[Ksafegate: waiting {waited}: {line}"[: width + 4])
            self.open_line = True
        elif line != self.shown or now - self.shown_at >= REMIND_EVERY:
            echo(f"safegate: waiting: {line}" + (f" (waited {waited})" if self.shown else ""), err=True)
            self.shown, self.shown_at = line, now

    def end_line(self) -> None:
        """Before any other line: the live line is finished, not overwritten."""
        if self.open_line:
            _write_err("\n")
            self.open_line = False

    def finish(self, verdict: Verdict, timeout: float | None) -> None:
        """End the live line; say when the wait ended because --timeout ran out."""
        self.end_line()
        if timeout is not None and not verdict.ok:
            echo(f"safegate: timed out after {format_duration(timeout)}, still blocked "
                 f"(exit {int(verdict.exit_code)})", err=True)


def _stderr_is_terminal() -> bool:
    try:
        return sys.stderr.isatty() and os.environ.get("TERM", "") != "dumb"
    except (ValueError, AttributeError):
        return False


def _write_err(text: str) -> None:
    try:
        sys.stderr.write(text)
        sys.stderr.flush()
    except (OSError, ValueError):
        pass  # a hung-up terminal never changes the outcome


def progress(silent: bool) -> Progress:
    return Progress(silent)


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


def fill_closed_stdio() -> None:
    """A closed fd 0, 1 or 2 (cron, daemons: `>&- 2>&-`) becomes /dev/null before safegate opens anything, so
    no lock file or pipe of safegate's can land on it and be handed to the job as its stdin, stdout or stderr."""
    for fd in (0, 1, 2):
        try:
            os.fstat(fd)
        except OSError:
            opened = os.open(os.devnull, os.O_RDWR)
            if opened != fd:  # not the lowest free descriptor after all: move it there
                os.dup2(opened, fd)
                os.close(opened)
            os.set_inheritable(fd, True)  # os.open is close-on-exec: the job must keep its 0/1/2


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
