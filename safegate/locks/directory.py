"""The lock dir: where it is, whether it is safe to use, the files in it, and the one way to open them."""

from __future__ import annotations

import errno
import functools
import os
import re
import stat
from collections.abc import Mapping
from pathlib import Path

import msgspec
from msgspec import field

from safegate.errors import LockDirError, UsageError
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
