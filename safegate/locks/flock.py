"""flock(2) on lock files: open, probe, take, who holds them (/proc/locks), and the machine-wide admission lock."""

from __future__ import annotations

import fcntl
import os
import stat
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from safegate.errors import AdmissionStuck, LockDirError
from safegate.locks.backoff import Backoff, poll
from safegate.locks.directory import ADMISSION_FILE, O_NONBLOCK, open_nofollow

ADMISSION_TIMEOUT = 30.0
# A prober holds the flock for microseconds; a real holder for the job's lifetime. Retrying this long
# tells the two apart, so two safegates probing at once do not see each other as holders.
CONTENTION_GRACE = 0.05
CONTENTION = Backoff(first=0.005)
# Watching a lock for its release where inotify cannot be had (locks.watch): one non-blocking flock call a step.
RELEASE_WATCH = Backoff(first=0.01)
# Waiting for the admission lock: its holder's work is bounded (milliseconds), so a short, slowly growing step.
ADMISSION_WAIT = Backoff(first=0.002, factor=1.5, cap=0.05)


def flock_nb(fd: int) -> bool:
    """One non-blocking exclusive flock(2) attempt: True when taken."""
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    return True


def funlock(fd: int) -> None:
    fcntl.flock(fd, fcntl.LOCK_UN)


def try_flock(fd: int, grace: float = CONTENTION_GRACE) -> bool:
    """Take the exclusive flock without blocking, retrying briefly so a prober is not taken for a holder."""
    return poll(lambda: flock_nb(fd), grace, CONTENTION)


def open_lock_file(path: Path, *, create: bool) -> int | None:
    """An fd on the lock file (None when it does not exist and *create* is false)."""
    flags = os.O_RDWR | O_NONBLOCK
    if create:
        try:
            fd = open_nofollow(path, flags | os.O_CREAT | os.O_EXCL, 0o666)
        except FileExistsError:
            pass
        except OSError as exc:
            # Out of inodes or space, a read-only file system, no write access: one line, exit 3.
            raise LockDirError(f"cannot create lock file {path}: {exc.strerror or exc}") from None
        else:
            # 0666 whatever the umask: every user must be able to take the lock later.
            try:
                os.fchmod(fd, 0o666)
            except OSError:
                pass
            return fd
    try:
        return open_nofollow(path, flags)
    except FileNotFoundError:
        return None
    except PermissionError:
        pass
    except OSError as exc:
        raise LockDirError(f"lock file {path}: {exc.strerror or exc}; remove it") from None
    try:
        # Read access is enough for flock(2); a lock file another user left 0644 can still be probed.
        return open_nofollow(path, os.O_RDONLY | O_NONBLOCK)
    except FileNotFoundError:
        return None
    except PermissionError:
        st = os.lstat(path)
        raise LockDirError(
            f"lock file {path} is not accessible to you (mode {stat.S_IMODE(st.st_mode):04o}, owner uid "
            f"{st.st_uid}); its owner must remove it or chmod 0666 it"
        ) from None


def is_held(path: Path) -> bool:
    fd = open_lock_file(path, create=False)
    if fd is None:
        return False
    try:
        got = try_flock(fd)
        if got:
            funlock(fd)
        return not got
    finally:
        os.close(fd)


@contextmanager
def admission(directory: Path, timeout: float = ADMISSION_TIMEOUT) -> Iterator[None]:
    """The machine-wide admission lock: one safegate at a time checks and claims its lock.

    Held only for bounded work (the lock dir, memory, the claim: milliseconds, never the process table or a
    wait), so that two execs started in the same second cannot both pass a memory check only one of them fits.
    A busy admission lock is waited for; one still held after *timeout* seconds means its holder is stuck (or
    stopped), which is an error of its own naming that holder.
    """
    path = directory / ADMISSION_FILE
    fd = open_lock_file(path, create=True)
    assert fd is not None
    try:
        # flock(2) directly: check takes this lock on every pass, and filelock's import costs check's start-up.
        if not poll(lambda: flock_nb(fd), timeout, ADMISSION_WAIT):
            raise AdmissionStuck(f"admission lock {path} held for over {timeout:g}s by {_who_holds(path)}; "
                                 "that safegate is stuck or stopped (kill -CONT or end it)")
        yield
    finally:
        os.close(fd)  # closing drops the flock


def _who_holds(path: Path) -> str:
    pids = locker_of(path, lockers()) or set()
    if not pids:
        return "an unknown process"
    from safegate.units import printable

    def named(pid: int) -> str:
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as fh:
                argv = fh.read(512).split(b"\0")
        except OSError:
            return f"pid {pid}"
        return f"pid {pid} ({printable(b' '.join(argv).decode(errors='replace').strip()[:120])})"

    return ", ".join(named(p) for p in sorted(pids))


def lockers() -> dict[tuple[int, int], set[int]] | None:
    """(st_dev, st_ino) of every file with a flock(2) taken -> the pids that took one, from /proc/locks; None
    where there is no /proc/locks to read. More than one pid: an unlinked lock file still locked by someone,
    whose inode number the file at hand got again.

    This is how a reader knows who holds a lock without trusting any file another user can write: the
    kernel keeps the locker's pid for as long as the flock lives, also when a job that inherited it holds it.
    """
    try:
        with open("/proc/locks", "rb") as fh:
            lines = fh.read().splitlines()
    except OSError:
        return None
    found: dict[tuple[int, int], set[int]] = {}
    for line in lines:
        # "1: FLOCK  ADVISORY  WRITE 1234 fe:00:5310756 0 EOF"; a waiter's line has "->" after the number.
        parts = line.split()
        if len(parts) < 6 or parts[1] != b"FLOCK":
            continue
        try:
            major, minor, inode = parts[5].split(b":")
            key = (os.makedev(int(major, 16), int(minor, 16)), int(inode))
            found.setdefault(key, set()).add(int(parts[4]))
        except ValueError:
            continue
    return found


def dir_lockers(directory: Path, table: dict[tuple[int, int], set[int]] | None) -> set[int]:
    """The pids holding a flock on a file in *directory*, per *table* (lockers()).

    One pass over the directory: a file's inode number comes with its entry, so only the files someone has
    locked are looked at closer (an lstat, for the device), however many files others plant there.
    """
    if not table:
        return set()
    inodes = {ino for _, ino in table}
    found: set[int] = set()
    try:
        with os.scandir(directory) as entries:
            for entry in entries:
                if entry.inode() not in inodes:
                    continue
                try:
                    st = entry.stat(follow_symlinks=False)
                except OSError:
                    continue
                found |= table.get((st.st_dev, st.st_ino), set())
    except OSError:
        return found
    return found


def locker_of(path: Path, table: dict[tuple[int, int], set[int]] | None) -> set[int] | None:
    """The pids holding a flock on *path* per *table* (empty: not held); None when unknown."""
    if table is None:
        return None
    try:
        st = os.lstat(path)
    except OSError:
        return set()
    return table.get((st.st_dev, st.st_ino), set())


def waiting_on(path: Path) -> set[int]:
    """The pids blocked in flock(2) on *path* (the "->" lines of /proc/locks), empty where unknown."""
    try:
        st = os.lstat(path)
        with open("/proc/locks", "rb") as fh:
            lines = fh.read().splitlines()
    except OSError:
        return set()
    found = set()
    for line in lines:
        # "1: -> FLOCK  ADVISORY  WRITE 1234 fe:00:5310756 0 EOF": a process waiting for the lock of line 1.
        parts = line.split()
        if len(parts) < 7 or parts[1] != b"->" or parts[2] != b"FLOCK":
            continue
        try:
            major, minor, inode = parts[6].split(b":")
            if (os.makedev(int(major, 16), int(minor, 16)), int(inode)) == (st.st_dev, st.st_ino):
                found.add(int(parts[5]))
        except ValueError:
            continue
    return found
