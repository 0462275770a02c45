"""The command line's typer-free half, shared by the typer app (cli.app) and check's fast path (cli.fastpath): the
check command itself, lines out, what waiting shows, and the one place where failures become exit codes. Importing
it costs no typer: `safegate check` is called before every job start by GNU parallel's --limit and on every Slurm
node."""

from __future__ import annotations

import codecs
import errno
import io
import os
import signal
import sys
import time
from collections.abc import Callable, Mapping, Sequence

from safegate.errors import SafegateError, UsageError, ValueParseError
from safegate.exitcodes import ExitCode
from safegate.gate.results import Cause, Verdict, blocking_cause, blocking_summary
from safegate.units import format_duration, parse_duration, printable


def echo(message: str, err: bool = False, *, controls: bool = False) -> None:
    """Print a line for people. A full disk, a closed pipe or a hung-up terminal must never change an outcome or an
    exit code: on a write error the stream is pointed at /dev/null (so neither later lines nor Python's flush at
    exit fail) and the command goes on.

    Every line is escaped (unless *controls*: safegate's own screen redraw): render escapes what came from outside
    already, and this is the net under it, so no string another user wrote ever reaches a terminal raw."""
    if not controls:
        message = safe_lines(message)
    try:
        _write_line(message, err, controls)
    except OSError:
        _to_devnull(sys.stderr if err else sys.stdout)


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


def check_command(*, profile: str | None = None, wait: bool = False, timeout: str | None = None,
                  json_output: bool = False, quiet: bool = False, config: str | None = None, no_grant: bool = False,
                  grant_to: str | None = None, given: Mapping[str, str] | None = None,
                  command: Sequence[str] = ()) -> int:
    """`safegate check`, parsed (*given*: its setting options by Python name, as typed; *command*: the job after
    `--`, not run): evaluate (or wait), render, and the exit code. Both the plain path and the typer command call
    it."""
    from safegate.cli.render import check_line, verdict_json, verdict_text
    from safegate.commands.check import check as run_check
    from safegate.config.model import parse_overrides

    overrides = parse_overrides(given or {}, command="check")
    shown = progress(quiet or json_output)
    wait_for = wait_timeout(wait, timeout)
    verdict, note = run_check(config, profile, overrides, wait=wait, timeout=wait_for, on_blocked=shown,
                              grant=not no_grant, grant_to=grant_pid(grant_to), command=command)
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


def _write_line(message: str, err: bool, controls: bool) -> None:
    """What typer.echo does, without importing typer for the usual stream: a text stream with a real encoding
    gets the line and a flush, as from click. Anything else (ASCII, which click re-wraps as UTF-8; a replaced or
    binary stream; a line with controls, whose ANSI codes click strips off a terminal) goes to typer.echo."""
    stream = sys.stderr if err else sys.stdout
    if not controls and type(stream) is io.TextIOWrapper and _good_encoding(stream.encoding):
        stream.write(message + "\n")
        stream.flush()
        return
    import typer

    typer.echo(message, err=err)


def _good_encoding(encoding: str | None) -> bool:
    try:
        return encoding is not None and codecs.lookup(encoding).name != "ascii"
    except LookupError:
        return False


def wait_timeout(wait: bool, timeout: str | None) -> float | None:
    seconds = parsed("--timeout", parse_duration, timeout)
    if timeout is not None and not wait:
        raise UsageError("--timeout: only meaningful with --wait")
    return seconds if isinstance(seconds, float) else None


def grant_pid(value: str | None) -> int | None:
    """--grant-to PID: a positive decimal pid."""
    if value is None:
        return None
    if not (value.isascii() and value.isdigit()) or not 0 < int(value) <= 4_194_304:
        raise UsageError(f"--grant-to: invalid pid {value!r}: expected a process id, e.g. --grant-to $PPID")
    return int(value)


COMPLETE_VAR = "_SAFEGATE_COMPLETE"  # set by a shell asking for completions (cli.app answers it)
REMIND_EVERY = 60.0  # seconds: off a terminal, an unchanged cause is said again this often
LINE_MOST = 160  # characters of a waiting line off a terminal: cron mail and logs read at a glance


class Progress:
    """What waiting shows on stderr. On a terminal: one live line (time waited, the reason, which says the place
    in line when that is what blocks), rewritten in place. Elsewhere (a log, cron's mail): a line each time the
    cause changes (which check, which lock, which holder: results.blocking_cause, never the running figures in
    its words), and one a minute while it does not, each cut to LINE_MOST characters (the whole reason is in
    `exec --log` and `safegate queue`). At the end, `timed out after D` when --timeout ran out."""

    def __init__(self, silent: bool, clock: Callable[[], float] = time.monotonic, live: bool | None = None) -> None:
        self.silent = silent
        self.clock = clock
        self.start = clock()
        self.live = _stderr_is_terminal() if live is None else live
        self.cause: Cause | None = None
        self.shown_at = 0.0
        self.open_line = False

    def __call__(self, verdict: Verdict) -> None:
        if self.silent:
            return
        now = self.clock()
        waited = format_duration(now - self.start)
        if self.live:
            import shutil

            width = shutil.get_terminal_size((100, 24)).columns
            _write_err(f"\r\x1b[Ksafegate: waiting {waited}: {blocking_summary(verdict)}"[: width + 4])
            self.open_line = True
            return
        cause = blocking_cause(verdict)
        if cause != self.cause or now - self.shown_at >= REMIND_EVERY:
            after = f" (waited {waited})" if self.cause is not None else ""
            head = "safegate: waiting: "
            parts = [f"{c.name}: {printable(c.reason)}" for c in verdict.failures]
            echo(head + fitted(parts, LINE_MOST - len(head) - len(after)) + after, err=True)
            self.cause, self.shown_at = cause, now

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


def fitted(parts: list[str], most: int, sep: str = "; ") -> str:
    """*parts* joined by *sep* in at most *most* characters: each keeps its start (every failing check is still
    named), the longest are cut first, ending in "..."."""
    room = most - len(sep) * max(0, len(parts) - 1)
    share: dict[int, int] = {}
    for left, i in enumerate(sorted(range(len(parts)), key=lambda i: len(parts[i]))):
        share[i] = min(len(parts[i]), max(0, room) // (len(parts) - left))
        room -= share[i]
    return sep.join(p if share[i] >= len(p) else p[: max(0, share[i] - 3)] + "..." for i, p in enumerate(parts))


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


def exit_status(command: Callable[[], object]) -> int:
    """Run *command* (the plain check, or the typer app): the one place where failures become exit codes and
    one-line messages. A command's own result is its code (None: 0)."""
    try:
        result = command()
    except SafegateError as exc:
        return reported(exc)
    except KeyboardInterrupt:
        return ExitCode.for_signal(signal.SIGINT)  # as click's Exit(130): nothing more to say
    except EOFError:
        echo("", err=True)  # click's Abort: an empty line, then our word
        return interrupted()
    except Exception as exc:
        code = _click_code(exc) if "typer" in sys.modules else None  # typer's exceptions exist only once loaded
        if code is not None:
            return code
        if isinstance(exc, OSError) and exc.errno == errno.EPIPE:
            # The reader went away (`safegate status | head`): nothing more can be said, and Python's flush at
            # exit must not fail either.
            _to_devnull(sys.stdout)
            _to_devnull(sys.stderr)
            return 1
        code = failure_code(exc)
        if code is None:
            raise
        return code
    return int(result) if isinstance(result, int) else 0


def _click_code(exc: Exception) -> int | None:
    import typer

    if isinstance(exc, typer.Exit):
        return int(exc.exit_code)
    if isinstance(exc, typer.Abort):
        return interrupted()
    if isinstance(exc, typer.TyperException):
        return usage_failure(exc)
    return None


def _to_devnull(stream: object) -> None:
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, stream.fileno())  # type: ignore[attr-defined]
        os.close(devnull)
    except (OSError, ValueError, AttributeError):
        pass


def reported(exc: SafegateError) -> int:
    echo(f"safegate: {printable(str(exc))}", err=True)  # the last word; unwritable, the code still tells
    return int(exc.exit_code)


def failure_code(exc: BaseException) -> int | None:
    """The exit code of a failure inside a command, said on stderr as the typer app's main() says it; None for
    what is not a failure of ours to report (it propagates)."""
    if isinstance(exc, SafegateError):
        return reported(exc)
    if isinstance(exc, Exception) and not os.environ.get("SAFEGATE_DEBUG"):
        echo(f"safegate: internal error: {type(exc).__name__}: {printable(str(exc))}", err=True)
        return int(ExitCode.INTERNAL)
    return None


def interrupted() -> int:
    echo("safegate: interrupted", err=True)
    return ExitCode.for_signal(signal.SIGINT)


def usage_failure(exc: Exception) -> int:
    """click's usage errors (unknown option, missing value, no command) as one line, exit 2; no arguments at all
    prints the help."""
    message = exc.format_message() if hasattr(exc, "format_message") else str(exc)
    ctx = getattr(exc, "ctx", None)
    if type(exc).__name__ == "NoArgsIsHelpError" and ctx is not None:
        echo(ctx.get_help(), err=True, controls=True)
        return int(ExitCode.USAGE)
    hint = f" (see '{ctx.command_path} --help')" if ctx is not None else ""
    echo(f"safegate: {printable(' '.join(message.split()))}{hint}", err=True)
    return int(ExitCode.USAGE)
