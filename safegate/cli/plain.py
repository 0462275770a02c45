"""The command line's typer-free half, shared by the typer app (cli.py) and check's fast path (fastpath.py): lines
out, option values into overrides, what waiting shows, and failures into exit codes. Importing it costs no typer:
`safegate check` is called before every job start by GNU parallel's --limit and on every Slurm node."""

from __future__ import annotations

import codecs
import io
import os
import signal
import sys
import time
from collections.abc import Callable
from typing import Any

from safegate.errors import SafegateError, UsageError, ValueParseError
from safegate.exitcodes import ExitCode
from safegate.gate.preflight import Overrides
from safegate.gate.results import Verdict, blocking_summary
from safegate.settings import BY_KEY, parse_option
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
            import shutil

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
