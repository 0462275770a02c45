"""Holder metadata: who holds a lock, its JSON, and reading, writing, removing it.

Each holder writes a file of its own, <name>.holder-<token>.json, the token random: no other user can
plant a file at a name they cannot guess, so a stale or planted file of anyone else never stops a new holder
from recording itself. Any user can write a file that looks like one, so a record counts only when it is
the lock's holder's: the lock is held, /proc/locks names the record's pid as the flock's owner, and the file
belongs to the user that process runs as. `<name>.holder.json` (one file per lock, as safegate wrote it
before) is read the same way and trusted the same way.
"""

from __future__ import annotations

import json
import math
import os
import stat
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from safegate.errors import LockDirError
from safegate.locks.directory import HOLDER_SUFFIX, O_NONBLOCK, holder_file_lock, holder_path, open_nofollow
from safegate.probes.processes import process_alive
from safegate.records import asdict, dataclass
from safegate.snapshots import HolderRecord
from safegate.units import validate_lock_name

HOLDER_MAX_BYTES = 64 * 1024
# What a record stores of its command line and its strings, in JSON bytes: far below HOLDER_MAX_BYTES
# whatever the text (ensure_ascii turns one character into at most 12 bytes), so a record is never too big
# to be read back, and a job with 2,000 arguments keeps its reservation.
CMDLINE_MAX_JSON = 16 * 1024
FIELD_MAX = 256


class Holder(HolderRecord):
    """A holder record as the lock store reads and writes it: with its JSON form and a liveness test."""

    def job_alive(self) -> bool:
        return self.job_pid is not None and process_alive(self.job_pid, self.job_start_time)

    def alive(self) -> bool:
        """The process that took the lock, or the job it started, still runs."""
        return process_alive(self.pid, self.start_time) or self.job_alive()

    def runs_as(self, uid: int) -> bool:
        """The process that took the lock, or its job, runs and runs as *uid*: it may have written the file."""
        return _runs_as(self.pid, self.start_time, uid) or (
            self.job_pid is not None and _runs_as(self.job_pid, self.job_start_time, uid))

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True, allow_nan=False)

    @classmethod
    def from_json(cls, text: str) -> Holder:
        data = json.loads(text, parse_constant=_refuse_constant)
        if not isinstance(data, dict):
            raise ValueError("not a JSON object")
        try:
            holder = cls(
                pid=int(data["pid"]),
                start_time=_finite(data["start_time"]),
                user=str(data["user"]),
                host=str(data["host"]),
                cmdline=[str(a) for a in data["cmdline"]],
                started_at=_finite(data["started_at"]),
                profile=str(data["profile"]),
                lock=str(data["lock"]),
                job_pid=int(data["job_pid"]) if data.get("job_pid") is not None else None,
                job_start_time=_finite(data["job_start_time"]) if data.get("job_start_time") is not None else None,
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
        if min(holder.need, holder.used, holder.gpu_need, holder.gpu_used) < 0:
            raise ValueError("sizes must not be negative")
        return holder

    @classmethod
    def for_current_process(
        cls, lock: str, profile: str, cmdline: Sequence[str] | None = None, need: int = 0
    ) -> Holder:
        import socket

        import psutil

        me = psutil.Process()
        return cls(
            pid=me.pid,
            start_time=me.create_time(),
            user=_bounded(_user_name()),
            host=_bounded(socket.gethostname()),
            cmdline=bounded_cmdline(list(cmdline) if cmdline is not None else list(sys.argv)),
            started_at=time.time(),
            profile=_bounded(profile),
            lock=lock,
            need=need,
        )


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a number")


def _finite(value: object) -> float:
    number = float(value)  # type: ignore[arg-type]
    if not math.isfinite(number):
        raise ValueError(f"{value!r} is not a finite number")
    return number


def _bounded(text: str) -> str:
    return text if len(text) <= FIELD_MAX else text[: FIELD_MAX - 1] + "…"


def bounded_cmdline(argv: list[str], budget: int = CMDLINE_MAX_JSON) -> list[str]:
    """*argv* as stored: whole while it fits *budget* JSON bytes, else cut, with a marker saying how much."""
    kept: list[str] = []
    used = 0
    for i, arg in enumerate(argv):
        size = len(json.dumps(arg)) + 2
        if used + size <= budget:
            kept.append(arg)
            used += size
            continue
        room = max(0, budget - used - 2) // 12  # a character is at most 12 bytes of JSON (a surrogate pair)
        if room:
            kept.append(arg[:room])
        kept.append(f"[... {len(argv) - i} argument(s) and {sum(len(a) for a in argv[i:]) - room} characters cut]")
        return kept
    return kept


def _runs_as(pid: int, start_time: float | None, uid: int) -> bool:
    import psutil

    try:
        proc = psutil.Process(pid)
        if start_time is not None and abs(proc.create_time() - start_time) >= 1.0:
            return False  # the pid was reused
        uids = proc.uids()
        return proc.status() != psutil.STATUS_ZOMBIE and uid in (uids.real, uids.effective)
    except psutil.Error:
        return False


def _user_name() -> str:
    try:
        import getpass

        return getpass.getuser()
    except (KeyError, OSError):
        return str(os.getuid())


@dataclass(frozen=True)
class HolderFile:
    """One holder file as read: its record (None when unusable, with a note why) and the user who owns it."""

    path: Path
    holder: Holder | None
    note: str
    uid: int
    regular: bool = True

    @property
    def legacy(self) -> bool:
        return self.path.name.endswith(HOLDER_SUFFIX)


def new_holder_path(directory: Path, name: str) -> Path:
    import secrets

    return directory / f"{validate_lock_name(name)}.holder-{secrets.token_hex(8)}.json"


def write_holder(directory: Path, holder: Holder, path: Path | None = None) -> Path:
    """Write *holder* atomically to *path* (a new file of its own when None); the path written."""
    final = path if path is not None else new_holder_path(directory, holder.lock)
    import secrets

    tmp = directory / f".{holder.lock}.{secrets.token_hex(8)}.tmp"
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
    return final


def read_file(path: Path) -> HolderFile:
    """One holder file; never follows a symlink, never blocks on a FIFO, never reads past the cap."""
    try:
        fd = open_nofollow(path, os.O_RDONLY | O_NONBLOCK)
    except FileNotFoundError:
        return HolderFile(path, None, "", -1, regular=False)
    except LockDirError as exc:
        return HolderFile(path, None, str(exc), _owner(path), regular=False)
    except OSError as exc:
        return HolderFile(path, None, f"holder metadata {path} unreadable: {exc.strerror}", _owner(path),
                          regular=False)
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            return HolderFile(path, None, f"holder metadata {path} is not a regular file", st.st_uid, regular=False)
        # One read past the cap: a huge file planted in the shared dir is refused, never read whole.
        raw = os.read(fd, HOLDER_MAX_BYTES + 1)
    except OSError as exc:
        return HolderFile(path, None, f"holder metadata {path} unreadable: {exc.strerror}", -1)
    finally:
        os.close(fd)
    if len(raw) > HOLDER_MAX_BYTES:
        return HolderFile(path, None, f"holder metadata {path} is larger than {HOLDER_MAX_BYTES} bytes; ignored",
                          st.st_uid)
    try:
        return HolderFile(path, Holder.from_json(raw.decode("utf-8")), "", st.st_uid)
    except (ValueError, UnicodeDecodeError, RecursionError) as exc:
        return HolderFile(path, None, f"holder metadata {path} is corrupt ({exc})", st.st_uid)


def _owner(path: Path) -> int:
    try:
        return os.lstat(path).st_uid
    except OSError:
        return -1


def read_files(directory: Path, name: str, filenames: Sequence[str]) -> list[HolderFile]:
    """The holder files of lock *name* among *filenames* (one listing of the directory)."""
    legacy = holder_path(directory, name).name
    return [read_file(directory / f) for f in filenames if f == legacy or holder_file_lock(f) == name]


def is_holders(found: HolderFile, name: str, lockers: set[int] | None) -> bool:
    """Whether *found* was written by the lock's holder: the record names a process that took the flock
    (*lockers*; None: unknown here, no /proc/locks), and the file belongs to the user that process runs as."""
    h = found.holder
    if h is None or h.lock != name:
        return False
    if lockers is not None and h.pid not in lockers and h.job_pid not in lockers:
        return False
    return h.runs_as(found.uid) or (found.uid == 0 and h.alive())


def current_holder(files: Sequence[HolderFile], name: str, lockers: set[int] | None) -> Holder | None:
    """The newest record the lock's holder wrote; another user's stale or planted file never is it."""
    own = [f.holder for f in files if f.holder is not None and is_holders(f, name, lockers)]
    return max(own, key=lambda h: h.started_at, default=None)


def remove_holder_if(path: Path, expected: Holder | None) -> bool:
    """Remove the file at *path* if it still holds *expected* (or is unreadable, when expected is None)."""
    if expected is not None and read_file(path).holder != expected:
        return False
    try:
        os.unlink(path)
    except FileNotFoundError:
        return False
    return True
