"""--log FILE: exec's events as JSON lines, one object per event, for night-shift queues to grep.

Writing the log must never be what fails a job: a full disk or an unwritable path is reported once
and the job goes on.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from datetime import datetime, timezone

from safegate.outcome import Event


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
            **event.data,
        }
        line = (json.dumps(record, default=str) + "\n").encode("utf-8")
        try:
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o644)
            try:
                os.write(fd, line)  # one write per line: concurrent writers do not interleave within it
            finally:
                os.close(fd)
        except OSError as exc:
            if not self.failed:
                self.failed = True
                self.on_error(f"cannot write --log {self.path}: {exc.strerror or exc}; going on without it")
