"""The lock dir and the lock files in it: where the dir is, whether it is safe to use, its files' names, the one
way to open them (O_NOFOLLOW), flock(2) on them, who holds them (/proc/locks), and the machine-wide admission lock."""

from __future__ import annotations

import errno
import fcntl
import functools
import os
import re
import stat
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

import msgspec
from msgspec import field

from safegate.errors import AdmissionStuck, LockDirError, UsageError
from safegate.locks.backoff import Backoff, poll
from safegate.units import validate_lock_name

LOCK_SUFFIX = ".lock"
HOLDER_SUFFIX = ".holder.json"
ADMISSION_FILE = ".admission.lock"
O_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
O_NONBLOCK = getattr(os, "O_NONBLOCK", 0)
# One file per holder: <name>.holder-<pid>.<start>-<16 hex digits>.json, the pid and start (clock ticks after
# boot) the holder's, so a reader opens only the files of the pids /proc/locks names as the lock's holders and the
# cleanup only those of processes that are gone; the token random, so no one can plant a file at a holder's name.
# Anchored at the end, so a lock whose own name looks like that still parses to its name. Files of older
# safegates have no pid: they count as another file of no live holder.
_HOLDER_FILE_RE = re.compile(
    r"^(?P<name>.+)\.holder-(?:(?P<pid>[1-9][0-9]{0,6})\.(?P<start>[0-9]{1,20})-)?[0-9a-f]{16}\.json$")


def default_lock_dir() -> Path:
    return Path("/run/lock/safegate") if Path("/run/lock").is_dir() else Path("/tmp/safegate")


def resolve_lock_dir(configured: Path | None, env: Mapping[str, str]) -> Path:
    """Environment beats config beats the built-in default."""
    if env.get("SAFEGATE_LOCK_DIR"):
        value = env["SAFEGATE_LOCK_DIR"]
        if not os.path.isabs(value):
            # Relative to each caller's working directory: two callers would get two locks and no exclusion.
            raise UsageError(f"SAFEGATE_LOCK_DIR: invalid lock dir {value!r}: expected an absolute directory path")
        return Path(value)
    return configured if configured is not None else default_lock_dir()


def ensure_directory(path: Path) -> None:
    """Create the lock dir 1777 if missing; refuse one that is a symlink or unsafe."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        st = _create_directory(path)
    except OSError as exc:
        raise LockDirError(f"lock dir {path}: {exc.strerror}") from None
    _refuse_unsafe(path, st)


def check_directory(path: Path) -> bool:
    """Refuse an unsafe lock dir as ensure_directory does, but never create one: False when it is absent.

    Read-only commands judge an absent lock dir as an empty one; refusing an unsafe one keeps their answer
    (and exit code) the same as check's.
    """
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return False
    except OSError as exc:
        raise LockDirError(f"lock dir {path}: {exc.strerror}") from None
    _refuse_unsafe(path, st)
    return True


def _refuse_unsafe(path: Path, st: os.stat_result) -> None:
    if stat.S_ISLNK(st.st_mode):
        raise LockDirError(f"lock dir {path} is a symlink; refusing it (set lock_dir to a real directory)")
    if not stat.S_ISDIR(st.st_mode):
        raise LockDirError(f"lock dir {path} exists and is not a directory")
    if st.st_mode & stat.S_IWOTH and not st.st_mode & stat.S_ISVTX:
        raise LockDirError(
            f"lock dir {path} is writable by others without the sticky bit (mode {stat.S_IMODE(st.st_mode):04o});"
            f" run: chmod +t {path}"
        )
    if not os.access(path, os.W_OK | os.X_OK):
        raise LockDirError(
            f"lock dir {path} is not writable by you (mode {stat.S_IMODE(st.st_mode):04o}, "
            f"owner uid {st.st_uid}); set SAFEGATE_LOCK_DIR or lock_dir to a shared writable directory"
        )


def _create_directory(path: Path) -> os.stat_result:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.mkdir(path, 0o700)
            # Shared by every user of the machine (RAM is shared); sticky so no one removes others' files.
            os.chmod(path, 0o1777)
        except FileExistsError:
            pass  # another safegate made it first
        return os.lstat(path)
    except OSError as exc:
        raise LockDirError(f"cannot create lock dir {path}: {exc.strerror}") from None


def open_nofollow(path: Path, flags: int, mode: int = 0o644) -> int:
    """os.open that refuses a symlink at *path* (a planted one could point anywhere) with a LockDirError."""
    try:
        return os.open(path, flags | O_NOFOLLOW | os.O_CLOEXEC, mode)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise LockDirError(f"refusing {path}: it is a symlink (possible attack); remove it") from None
        raise


@functools.lru_cache(maxsize=4096)
def _checked(name: str) -> str:
    # Cached: a lock dir with thousands of planted names is validated once per name, not once per use.
    return validate_lock_name(name)


def lock_path(directory: Path, name: str) -> Path:
    return directory / f"{_checked(name)}{LOCK_SUFFIX}"


def holder_path(directory: Path, name: str) -> Path:
    return directory / f"{_checked(name)}{HOLDER_SUFFIX}"


def holder_file_lock(filename: str) -> str | None:
    """The lock a per-holder file belongs to, or None when *filename* is not one."""
    match = _HOLDER_FILE_RE.match(filename)
    return match.group("name") if match else None


def holder_file_pid(filename: str) -> tuple[int, int] | None:
    """(pid, start) a per-holder file's name says wrote it (None: not one, or an older safegate's without)."""
    match = _HOLDER_FILE_RE.match(filename)
    return (int(match.group("pid")), int(match.group("start"))) if match and match.group("pid") else None


class Entry(msgspec.Struct):
    """What one scan of the lock dir found for one lock name."""

    lock_file: bool = False  # <name>.lock exists (whatever it is)
    holders: list[str] = field(default_factory=list)  # its holder files' names


def names_in(directory: Path) -> list[str]:
    """One listing of the lock dir (empty when it is absent or unreadable), to hand to every reader of one pass."""
    try:
        return os.listdir(directory)
    except OSError:
        return []


def scan(directory: Path, names: list[str] | None = None) -> dict[str, Entry]:
    """Every lock name that has a lock file or holder metadata, in one listing of the directory (*names*, when
    just made): names only, nothing opened or stat'ed, so files others plant cost one directory entry each."""
    found: dict[str, Entry] = {}
    for filename in names_in(directory) if names is None else names:
        if filename.startswith("."):
            continue
        name = holder_file_lock(filename)
        if name is None and filename.endswith(HOLDER_SUFFIX):
            name = filename[: -len(HOLDER_SUFFIX)]
        if name is not None:
            found.setdefault(name, Entry()).holders.append(filename)
        elif filename.endswith(LOCK_SUFFIX):
            found.setdefault(filename[: -len(LOCK_SUFFIX)], Entry()).lock_file = True
    # Anyone can create files in the shared dir: a name safegate would refuse is not one of its locks.
    return {n: found[n] for n in sorted(found) if _valid_name(n)}


def listing(directory: Path, names: list[str] | None = None) -> dict[str, list[str]]:
    """Every lock name that has a lock file or holder metadata, with its holder files' names (one scan)."""
    return {name: sorted(entry.holders) for name, entry in scan(directory, names).items()}


def lock_names(directory: Path) -> list[str]:
    """Every lock name that has a lock file or holder metadata in the directory (none when it is absent)."""
    return list(listing(directory))


def _valid_name(name: str) -> bool:
    try:
        _checked(name)
    except ValueError:
        return False
    return True


# --- flock(2) on the lock files --------------------------------------------------------------------------------

ADMISSION_TIMEOUT = 30.0
# A prober holds the flock for microseconds; a real holder for the job's lifetime. Retrying this long
# tells the two apart, so two safegates probing at once do not see each other as holders.
CONTENTION_GRACE = 0.05
CONTENTION = Backoff(first=0.005)
# Watching a lock for its release where inotify cannot be had (gate.watch): one non-blocking flock call a step.
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
