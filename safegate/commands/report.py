"""`report`: read exec --log files, build the morning report, write it as one HTML file, whole or not at all."""

from __future__ import annotations

import contextlib
import os
import stat
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import BinaryIO

import msgspec

from safegate.errors import LogError, UsageError
from safegate.report.logschema import MAX_LINE
from safegate.report.timeline import Job, build_report, jobs_from_lines

STDOUT = "-"


class Written(msgspec.Struct, frozen=True):
    path: str  # "-" for stdout
    jobs: int
    nights: int
    logs: int
    html: str  # the page itself when path is "-" (it is printed), else "" (it was written as it was made)

    @property
    def summary(self) -> str:
        def count(n: int, what: str) -> str:
            return f"{n} {what}{'' if n == 1 else 's'}"

        return f"{count(self.jobs, 'job')} in {count(self.nights, 'night')} from {count(self.logs, 'log')}"


def read_log(path: str) -> list[Job]:
    """One log's jobs; any failure to read it, or a line not of its shape, is a LogError naming it."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK | os.O_NOCTTY)
    except OSError as exc:
        raise LogError(f"cannot read log {path}: {exc.strerror or exc}") from None
    try:
        if stat.S_ISDIR(os.fstat(fd).st_mode):
            raise LogError(f"cannot read log {path}: it is a directory")
        os.set_blocking(fd, True)
        with os.fdopen(fd, "rb", closefd=False) as raw:
            return jobs_from_lines(path, _lines(raw))
    except OSError as exc:
        raise LogError(f"cannot read log {path}: {exc.strerror or exc}") from None
    finally:
        os.close(fd)


def _lines(raw: BinaryIO) -> Iterator[bytes]:
    """The log's lines as bytes (msgspec checks their UTF-8), none longer than MAX_LINE + 1 bytes: a log without
    newlines is not read whole into memory (the decoder refuses such a line)."""
    while line := raw.readline(MAX_LINE + 1):
        yield line


def report(logs: Sequence[str], target: str) -> Written:
    """The report of *logs*, written to *target* ("-": not written; the caller prints it)."""
    from safegate.report.page import page_parts

    if not logs:
        raise UsageError("report: no log given; usage: safegate report LOG... [-o FILE]")
    if target != STDOUT:
        _check_target(target)
    model = build_report([(path, read_log(path)) for path in logs])
    jobs, nights = len(model.jobs), len(model.nights)
    if target == STDOUT:
        return Written(target, jobs, nights, len(logs), "".join(page_parts(model)))
    write_whole(target, page_parts(model))
    return Written(target, jobs, nights, len(logs), "")


def _check_target(target: str) -> None:
    """Refuse at once what cannot be written, before the logs are read (a night's logs can be large)."""
    path = Path(target)
    if path.is_dir():
        raise UsageError(f"-o: {target!r} is a directory; expected a file name")
    parent = path.parent
    if not parent.is_dir():
        raise UsageError(f"-o: cannot write {target}: no directory {str(parent)!r}")


def write_whole(target: str, parts: Iterable[str]) -> None:
    """*parts*, as they come, into *target* through a temp file beside it and a rename: a reader never sees half
    a report, and a failure (also one while the parts are made) leaves neither a half-written file nor the temp
    file."""
    path = Path(target)
    temp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o666)
        with os.fdopen(fd, "w", encoding="utf-8") as out:
            out.writelines(parts)
            out.flush()
            os.fsync(out.fileno())
        os.replace(temp, path)
    except BaseException as exc:
        with contextlib.suppress(OSError):
            temp.unlink()
        if isinstance(exc, OSError):
            raise UsageError(f"-o: cannot write {target}: {exc.strerror or exc}") from None
        raise
