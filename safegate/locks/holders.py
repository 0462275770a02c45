"""Holder metadata (<name>.holder.json): who holds a lock, its JSON, and reading, writing, removing it."""

from __future__ import annotations

import getpass
import json
import os
import socket
import stat
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path

import psutil

from safegate.errors import LockDirError
from safegate.locks.directory import O_NONBLOCK, holder_path, open_nofollow
from safegate.probes.processes import process_alive
from safegate.snapshots import HolderRecord

HOLDER_MAX_BYTES = 64 * 1024


class Holder(HolderRecord):
    """A holder record as the lock store reads and writes it: with its JSON form and a liveness test."""

    def job_alive(self) -> bool:
        return self.job_pid is not None and process_alive(self.job_pid, self.job_start_time)

    def alive(self) -> bool:
        """The process that took the lock, or the job it started, still runs."""
        return process_alive(self.pid, self.start_time) or self.job_alive()

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> Holder:
        data = json.loads(text)
        if not isinstance(data, dict):
            raise ValueError("not a JSON object")
        try:
            holder = cls(
                pid=int(data["pid"]),
                start_time=float(data["start_time"]),
                user=str(data["user"]),
                host=str(data["host"]),
                cmdline=[str(a) for a in data["cmdline"]],
                started_at=float(data["started_at"]),
                profile=str(data["profile"]),
                lock=str(data["lock"]),
                job_pid=int(data["job_pid"]) if data.get("job_pid") is not None else None,
                job_start_time=float(data["job_start_time"]) if data.get("job_start_time") is not None else None,
                need=int(data.get("need", 0)),
                used=int(data.get("used", 0)),
                gpu_index=int(data["gpu_index"]) if data.get("gpu_index") is not None else None,
                gpu_need=int(data.get("gpu_need", 0)),
                gpu_used=int(data.get("gpu_used", 0)),
            )
        except (KeyError, TypeError, OverflowError) as exc:
            raise ValueError(f"missing or bad field {exc}") from None
        if holder.pid <= 0:
            raise ValueError("pid must be positive")
        return holder

    @classmethod
    def for_current_process(
        cls, lock: str, profile: str, cmdline: Sequence[str] | None = None, need: int = 0
    ) -> Holder:
        me = psutil.Process()
        return cls(
            pid=me.pid,
            start_time=me.create_time(),
            user=_user_name(),
            host=socket.gethostname(),
            cmdline=list(cmdline) if cmdline is not None else list(sys.argv),
            started_at=time.time(),
            profile=profile,
            lock=lock,
            need=need,
        )


def _user_name() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return str(os.getuid())


def write_holder(directory: Path, holder: Holder) -> None:
    final = holder_path(directory, holder.lock)
    tmp = directory / f".{holder.lock}.{os.getpid()}.{time.monotonic_ns()}.tmp"
    fd = open_nofollow(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(holder.to_json())
        # rename replaces a symlink planted at the final path instead of writing through it.
        os.rename(tmp, final)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def read_holder(directory: Path, name: str) -> tuple[Holder | None, str]:
    """(metadata, note); note says why it is missing or unusable."""
    path = holder_path(directory, name)
    try:
        fd = open_nofollow(path, os.O_RDONLY | O_NONBLOCK)
    except FileNotFoundError:
        return None, ""
    except LockDirError as exc:
        return None, str(exc)
    except OSError as exc:
        return None, f"holder metadata {path} unreadable: {exc.strerror}"
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return None, f"holder metadata {path} is not a regular file"
        # One read past the cap: a huge file planted in the shared dir is refused, never read whole.
        raw = os.read(fd, HOLDER_MAX_BYTES + 1)
    finally:
        os.close(fd)
    if len(raw) > HOLDER_MAX_BYTES:
        return None, f"holder metadata {path} is larger than {HOLDER_MAX_BYTES} bytes; ignored"
    try:
        return Holder.from_json(raw.decode("utf-8")), ""
    except (ValueError, UnicodeDecodeError) as exc:
        return None, f"holder metadata {path} is corrupt ({exc})"


def remove_holder_if(directory: Path, name: str, expected: Holder | None) -> bool:
    """Remove the metadata if it still is *expected* (or is unreadable, when expected is None)."""
    current, _ = read_holder(directory, name)
    if expected is not None and current != expected:
        return False
    try:
        os.unlink(holder_path(directory, name))
    except FileNotFoundError:
        return False
    return True
