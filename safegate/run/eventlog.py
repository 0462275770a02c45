"""--log FILE: exec's events as JSON lines, one object per event, for night-shift queues to grep.

Writing the log must never be what fails a job: a full disk or an unwritable path is reported once
and the job goes on.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import stat
from collections.abc import Callable
from datetime import datetime, timezone

from safegate.errors import UsageError
from safegate.run.outcome import Event


def check_log_path(path: str) -> None:
    """Refuse, before the job starts, a --log that would block or that another user could point elsewhere.

    A FIFO (or socket) would block open() while the job runs unwatched. A symlink in a sticky, world-writable
    directory (/tmp) owned by neither us nor the directory's owner is refused, as the kernel's protected_symlinks
    refuses to follow it. Anything else (a directory, /dev/full, a read-only file) is only warned about when a
    write fails: the job runs on.
    """
    try:
        st = os.lstat(path)
    except OSError:
        return  # absent (created on the first event) or unreachable (warned about then)
    if stat.S_ISLNK(st.st_mode):
        try:
            parent = os.stat(os.path.dirname(os.path.abspath(path)))
        except OSError:
            return
        sticky_shared = parent.st_mode & stat.S_ISVTX and parent.st_mode & stat.S_IWOTH
        if sticky_shared and st.st_uid not in (os.geteuid(), parent.st_uid):
            raise UsageError(f"--log: {path!r} is a symlink of user {st.st_uid} in a shared sticky directory; "
                             "expected a regular file")
        try:
            st = os.stat(path)
        except OSError:
            return
    if stat.S_ISFIFO(st.st_mode) or stat.S_ISSOCK(st.st_mode):
        raise UsageError(f"--log: {path!r} is a FIFO or socket; expected a regular file")


class EventLog:
    def __init__(self, path: str, on_error: Callable[[str], None]) -> None:
        self.path = path
        self.on_error = on_error
        self.failed = False

    def write(self, event: Event) -> None:
        record = {
            "time": datetime.fromtimestamp(event.time, tz=timezone.utc).isoformat(timespec="milliseconds"),
            "event": event.kind,
            "message": event.message,
            "safegate_pid": os.getpid(),  # tells apart the jobs of concurrent execs logging to one file
            **event.data,
        }
        line = (json.dumps(record, default=str) + "\n").encode("utf-8")
        try:
            # Non-blocking: a FIFO put there after the start-up check fails at once (ENXIO) instead of blocking.
            flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC | os.O_NONBLOCK | os.O_NOCTTY
            fd = os.open(self.path, flags, 0o644)
            try:
                _append_whole(fd, line)
            finally:
                os.close(fd)
        except OSError as exc:
            if not self.failed:
                self.failed = True
                self.on_error(f"cannot write --log {self.path}: {exc.strerror or exc}; the job goes on, and events "
                              "that cannot be written are left out")


def _append_whole(fd: int, line: bytes) -> None:
    """One write per line, so concurrent writers do not interleave within one. A line the disk had room for only
    in part is cut off again: the log stays whole JSON lines for whoever reads it in the morning."""
    before = os.fstat(fd).st_size
    if os.write(fd, line) < len(line):  # a failed write raises, having written nothing
        with contextlib.suppress(OSError):
            os.ftruncate(fd, before)
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
