"""Holder metadata: who holds a lock, its JSON, and reading, writing, removing it.

Each holder writes a file of its own, <name>.holder-<token>.json, the token random: no other user can
plant a file at a name they cannot guess, so a stale or planted file of anyone else never stops a new holder
from recording itself. Any user can write a file that looks like one, so a record counts only when it is
the lock's holder's: the lock is held, /proc/locks names the record's pid as the flock's owner, and the file
belongs to the user that process runs as. `<name>.holder.json` (one file per lock, as safegate wrote it
before) is read the same way and trusted the same way.

Stale files are removed here too (cleanup): those of processes that are gone, and the per-job lock files of
safegates that are gone.
"""

from __future__ import annotations

import os
import re
import stat
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import msgspec
from msgspec.structs import asdict

from safegate.errors import LockDirError
from safegate.locks.files import (
    HOLDER_SUFFIX,
    O_NONBLOCK,
    flock_nb,
    holder_file_lock,
    holder_file_pid,
    holder_path,
    listing,
    lock_path,
    open_lock_file,
    open_nofollow,
    scan,
    try_flock,
)
from safegate.probes.pids import identity, live_pids
from safegate.probes.processes import process_alive
from safegate.probes.snapshots import HolderRecord, Removal
from safegate.units import printable, validate_lock_name

HOLDER_MAX_BYTES = 64 * 1024
# What a record stores of its command line and its strings, in JSON bytes: far below HOLDER_MAX_BYTES
# whatever the text (ensure_ascii turns one character into at most 12 bytes), so a record is never too big
# to be read back, and a job with 2,000 arguments keeps its reservation.
CMDLINE_MAX_JSON = 16 * 1024
FIELD_MAX = 256


class Holder(HolderRecord, frozen=True):
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
        import json  # only where a record is written: a plain check in an empty lock dir writes none

        return json.dumps(asdict(self), sort_keys=True, allow_nan=False)

    @classmethod
    def from_json(cls, raw: bytes | str) -> Holder:
        """The record in *raw*; schema.BadRecord (a ValueError) when any field is missing, mistyped or out of
        range."""
        from safegate import schema

        holder: Holder = schema.decode(raw.encode("utf-8", "surrogatepass") if isinstance(raw, str) else raw, cls)
        return holder

    @classmethod
    def for_current_process(
        cls, lock: str, profile: str, cmdline: Sequence[str] | None = None, need: int = 0
    ) -> Holder:
        me = identity(os.getpid())
        assert me is not None, "/proc/self/stat must be readable"
        return cls(
            pid=me.pid,
            start_time=me.start_time,  # what psutil's create_time gives, without importing psutil
            user=_bounded(_user_name()),
            host=_bounded(os.uname().nodename),  # what socket.gethostname() returns, without importing socket
            cmdline=bounded_cmdline(list(cmdline) if cmdline is not None else list(sys.argv)),
            started_at=time.time(),
            profile=_bounded(profile),
            lock=lock,
            need=need,
        )


def _bounded(text: str) -> str:
    return text if len(text) <= FIELD_MAX else text[: FIELD_MAX - 1] + "…"


def bounded_cmdline(argv: list[str], budget: int = CMDLINE_MAX_JSON) -> list[str]:
    """*argv* as stored: whole while it fits *budget* JSON bytes, else cut, with a marker saying how much."""
    import json

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


class HolderFile(msgspec.Struct, frozen=True):
    """One holder file as read: its record (None when unusable, with a note why) and the user who owns it."""

    path: Path
    holder: Holder | None
    note: str
    uid: int
    regular: bool = True

    @property
    def legacy(self) -> bool:
        return self.path.name.endswith(HOLDER_SUFFIX)


def new_holder_path(directory: Path, name: str, pid: int) -> Path:
    who = identity(pid)
    start = who.start if who is not None else 0
    return directory / f"{validate_lock_name(name)}.holder-{pid}.{start}-{os.urandom(8).hex()}.json"


def write_holder(directory: Path, holder: Holder, path: Path | None = None) -> Path:
    """Write *holder* atomically to *path* (a new file of its own when None); the path written."""
    final = path if path is not None else new_holder_path(directory, holder.lock, holder.pid)
    tmp = directory / f".{holder.lock}.{os.urandom(8).hex()}.tmp"  # os.urandom: what secrets uses, unimported
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
        return HolderFile(path, Holder.from_json(raw), "", st.st_uid)
    except ValueError as exc:
        return HolderFile(path, None, f"holder metadata {path} is corrupt ({printable(str(exc))[:200]})", st.st_uid)


def _owner(path: Path) -> int:
    try:
        return os.lstat(path).st_uid
    except OSError:
        return -1


# Files read for one lock when /proc/locks cannot say whose they are (no /proc/locks, or a free lock's record
# shown by `locks`): beyond this, planted files are not opened at all.
READ_UNKNOWN_MAX = 16


def read_files(directory: Path, name: str, filenames: Sequence[str], pids: set[int] | None) -> list[HolderFile]:
    """The holder files of lock *name* among *filenames* (one listing of the directory) that could be its
    holder's: those whose name carries a pid in *pids* (the flock's holders per /proc/locks), and the one
    older-style <name>.holder.json. *pids* None (unknown): at most READ_UNKNOWN_MAX of them."""
    legacy = holder_path(directory, name).name
    chosen = [f for f in filenames if f == legacy or (
        holder_file_lock(f) == name and (pids is None or (holder_file_pid(f) or (0, 0))[0] in pids))]
    if pids is None:
        chosen = chosen[:READ_UNKNOWN_MAX]
    return [read_file(directory / f) for f in chosen]


def holder_files(directory: Path, name: str, pids: set[int] | None,
                 listed: list[str] | None = None) -> tuple[list[HolderFile], int]:
    """The lock's holder files that could be its holder's (*pids*: the flock's holders; None: unknown), and how
    many others of the lock it left unopened (*listed*: a listing of the lock dir just made)."""
    names = listing(directory, listed).get(name, [])
    files = read_files(directory, name, names, pids)
    return files, len(names) - len(files)


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


# --- stale holder files and their removal ----------------------------------------------------------------------------

# The lock of one job of a profile without a mutex (preflight.admit): named after the safegate that took it.
_JOB_LOCK = re.compile(r"^job-(?P<pid>[0-9]+)-[0-9]+$")


# Holder files looked at per cleanup: those whose name says their writer is gone, in random order, so files
# others plant in thousands cost the cleanup a bounded amount and our own stale ones still go in time.
SWEEP_MAX = 64


def cleanup(directory: Path, names: list[str] | None = None) -> Iterator[Removal]:
    """Remove our own holder files whose process is gone (or that are unusable).

    Decided from the names first: a file whose name carries a live pid is not stale (its writer runs), and is
    never touched here. Of the rest, at most SWEEP_MAX are looked at (an lstat, then a read of our own only).
    Another user's file is no one's holder unless its writer holds the lock, and cannot be removed in the sticky
    dir anyway (root could, but leaves it to its owner too): it is never read here, and is not reported, so no
    one can make every check slower or warn by planting files.
    """
    me = os.geteuid()
    entries = scan(directory, names)
    live = live_pids()
    starts: dict[int, int | None] = {}

    def gone(filename: str) -> bool:
        named = holder_file_pid(filename)
        if named is None or named[0] not in live:
            return True
        if named[0] not in starts:  # one read per live pid named, however many files name it
            who = identity(named[0])
            starts[named[0]] = who.start if who is not None else None
        return starts[named[0]] != named[1]

    stale = [(name, f) for name, entry in entries.items() for f in entry.holders if gone(f)]
    if len(stale) > SWEEP_MAX:
        import random  # only with more than a sweep's worth: the usual cleanup has a few files, or none

        stale = random.sample(stale, SWEEP_MAX)  # so planted ones cannot always come first
    for name, filename in sorted(stale):  # in name order
        if not _mine(directory / filename, me):
            continue
        found = read_file(directory / filename)
        if not found.regular or found.uid != me:
            continue
        if found.holder is not None and found.holder.alive():
            continue  # its safegate is gone, its job lives on and holds the lock
        removal = _remove_stale(directory, name, found)
        if removal is not None:
            yield removal
    for name, entry in entries.items():
        if entry.lock_file and _JOB_LOCK.match(name):
            job_lock = _remove_job_lock(directory, name, me)
            if job_lock is not None:
                yield job_lock


def _mine(path: Path, me: int) -> bool:
    try:
        st = os.lstat(path)
    except OSError:
        return False
    return stat.S_ISREG(st.st_mode) and st.st_uid == me


def _remove_job_lock(directory: Path, name: str, me: int) -> Removal | None:
    """A per-job lock file whose safegate is gone and whose flock is free: no one can ever wait for it (its
    name is unique to one job), so unlike a shared lock file it may go, or `locks` would list it forever."""
    match = _JOB_LOCK.match(name)
    if match is None or process_alive(int(match["pid"]), None):
        return None
    path = lock_path(directory, name)
    try:
        st = os.lstat(path)
        fd = open_lock_file(path, create=False) if stat.S_ISREG(st.st_mode) and st.st_uid == me else None
    except (OSError, LockDirError):
        return None
    if fd is None:
        return None
    try:
        if not flock_nb(fd):
            return None  # the job lives on and holds it
        what = f"stale per-job lock {name!r}: its safegate, pid {match['pid']}, is gone"
        try:
            os.unlink(path)
        except FileNotFoundError:
            return None
        except OSError as exc:
            return Removal(path, what, removed=False, error=exc.strerror or str(exc))
        return Removal(path, what, removed=True)
    finally:
        os.close(fd)


def _remove_stale(directory: Path, name: str, found: HolderFile) -> Removal | None:
    holder = found.holder
    what = (
        f"stale holder of lock {name!r}: pid {holder.pid} ({' '.join(holder.cmdline)[:80]}) is gone"
        if holder is not None
        else f"unusable holder metadata of lock {name!r}: {found.note}"
    )
    if not found.legacy:
        # A per-holder file is never rewritten by anyone but its dead (or never valid) writer: no race.
        return _unlink(found, what)
    # The one-file-per-lock name of older safegates: one of them may be about to rename its record over it.
    try:
        fd = open_lock_file(lock_path(directory, name), create=False)
    except LockDirError as exc:
        return Removal(found.path, what, removed=False, error=str(exc))
    try:
        if fd is not None and not try_flock(fd):
            return None  # held: its holder may be writing this very file
        if read_file(found.path).holder != holder:
            return None  # replaced meanwhile by a live holder
        return _unlink(found, what)
    finally:
        if fd is not None:
            os.close(fd)  # closing drops the flock


def _unlink(found: HolderFile, what: str) -> Removal | None:
    try:
        os.unlink(found.path)
    except FileNotFoundError:
        return None
    except OSError as exc:
        return Removal(found.path, what, removed=False, error=exc.strerror or str(exc))
    return Removal(found.path, what, removed=True)


def remove_metadata_if_free(directory: Path, name: str) -> bool:
    """Remove whatever of the lock's metadata we may remove, holding the flock so no holder arrives meanwhile."""
    filenames = listing(directory).get(name, [])
    if not filenames:
        return False
    fd = open_lock_file(lock_path(directory, name), create=False)
    removed = False
    try:
        if fd is not None and not try_flock(fd):
            return False  # a holder arrived meanwhile: its record stays
        for found in read_files(directory, name, filenames, None):
            if not found.regular:
                continue
            try:
                os.unlink(found.path)
            except FileNotFoundError:
                continue
            except PermissionError:
                continue  # another user's file in the sticky dir: ignored by everyone, removable by them
            except OSError as exc:
                raise LockDirError(f"cannot remove {found.path}: {exc.strerror or exc}") from None
            removed = True
        return removed
    finally:
        if fd is not None:
            os.close(fd)
