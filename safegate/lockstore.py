"""Named locks in a shared directory: flock(2) on <dir>/<name>.lock, holder metadata beside it.

The lock file is locked with flock(2) through filelock's descriptor API, so `flock(1)` on the same
file excludes too. Only testing a lock (check, cleanup, waiting) calls flock(2) directly: the same lock,
without the ~12 ms it costs `check` to import filelock. safegate opens every file itself, with O_NOFOLLOW,
so a planted symlink is refused instead of followed, and never unlinks a lock file: unlinking splits
waiters across inodes.

Holder metadata (<name>.holder.json) is informational: it names who holds the lock. It is written
atomically (temp file + rename) after the flock is taken and removed before it is released; a copy
whose process is gone while the flock is free is stale and is removed by cleanup().
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import getpass
import json
import os
import socket
import stat
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import psutil

from safegate.errors import LockDirError
from safegate.units import validate_lock_name

LOCK_SUFFIX = ".lock"
ADMISSION_FILE = ".admission.lock"
ADMISSION_TIMEOUT = 30.0
HOLDER_SUFFIX = ".holder.json"
_HOLDER_MAX_BYTES = 64 * 1024
_LEGACY_MAX_BYTES = 4096
_O_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
_O_NONBLOCK = getattr(os, "O_NONBLOCK", 0)
# A prober holds the flock for microseconds; a real holder for the job's lifetime. Retrying this long
# tells the two apart, so two safegates probing at once do not see each other as holders.
CONTENTION_GRACE = 0.05
_CONTENTION_STEP = 0.005


def _valid_name(name: str) -> bool:
    try:
        validate_lock_name(name)
    except ValueError:
        return False
    return True


def default_lock_dir() -> Path:
    return Path("/run/lock/safegate") if Path("/run/lock").is_dir() else Path("/tmp/safegate")


def resolve_lock_dir(configured: Path | None, env: Mapping[str, str]) -> Path:
    """Environment beats config beats the built-in default."""
    if env.get("SAFEGATE_LOCK_DIR"):
        return Path(env["SAFEGATE_LOCK_DIR"])
    return configured if configured is not None else default_lock_dir()


@dataclass(frozen=True)
class Holder:
    """Who holds a lock, as recorded by the holder."""

    pid: int
    start_time: float  # psutil create_time of pid: together they name one process, even after pid reuse
    user: str
    host: str
    cmdline: list[str]
    started_at: float  # wall-clock time the lock was taken
    profile: str
    lock: str
    # Set by exec: the job it started, the memory the job declared it needs, and what it used when last
    # recorded. need - used is memory the job will still take: admission reserves it for the job.
    job_pid: int | None = None
    job_start_time: float | None = None
    need: int = 0
    used: int = 0
    gpu_index: int | None = None
    gpu_need: int = 0
    gpu_used: int = 0

    @property
    def gpu_reservation(self) -> int:
        return max(0, self.gpu_need - self.gpu_used) if self.gpu_index is not None else 0

    @property
    def reservation(self) -> int:
        return max(0, self.need - self.used)

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


def process_alive(pid: int, start_time: float | None) -> bool:
    """True when *pid* runs and, if *start_time* is given, is the same process that recorded it."""
    try:
        proc = psutil.Process(pid)
        if start_time is None:
            return proc.status() != psutil.STATUS_ZOMBIE
        # 1 s: psutil derives create_time from the boot time, which shifts a little when NTP steps the clock;
        # a pid reused within the same second is not a realistic case.
        return abs(proc.create_time() - start_time) < 1.0 and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False
    except psutil.AccessDenied:
        return True  # it exists; we are just not allowed to look closer


@dataclass(frozen=True)
class LockState:
    name: str
    path: Path
    held: bool
    holder: Holder | None  # metadata, when present and readable
    holder_alive: bool
    note: str = ""  # e.g. unreadable metadata


@dataclass(frozen=True)
class LegacyState:
    path: Path
    pid: int | None
    alive: bool
    note: str = ""


@dataclass(frozen=True)
class Removal:
    """One stale record that cleanup removed, or tried to."""

    path: Path
    what: str
    removed: bool
    error: str = ""


def _open_nofollow(path: Path, flags: int, mode: int = 0o644) -> int:
    try:
        return os.open(path, flags | _O_NOFOLLOW | os.O_CLOEXEC, mode)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise LockDirError(f"refusing {path}: it is a symlink (possible attack); remove it") from None
        raise


def _flock_nb(fd: int) -> bool:
    """One non-blocking exclusive flock(2) attempt: True when taken."""
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    return True


def _funlock(fd: int) -> None:
    fcntl.flock(fd, fcntl.LOCK_UN)


def _try_flock(fd: int, grace: float) -> bool:
    """Take the exclusive flock without blocking, retrying briefly so a prober is not taken for a holder."""
    deadline = time.monotonic() + grace
    while True:
        if _flock_nb(fd):
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(_CONTENTION_STEP)


def _take(fd: int, grace: float) -> bool:
    """Taking a lock goes through filelock's descriptor API (the same flock(2) as flock(1) and _flock_nb)."""
    from filelock import lock_descriptor

    deadline = time.monotonic() + grace
    while not lock_descriptor(fd, blocking=False):
        if time.monotonic() >= deadline:
            return False
        time.sleep(_CONTENTION_STEP)
    return True


class HeldLock:
    """A lock this process holds; release() (or leaving the with-block) gives it up."""

    def __init__(self, store: LockStore, name: str, fd: int, holder: Holder | None) -> None:
        self.store = store
        self.name = name
        self.fd = fd
        self.holder = holder
        self.metadata_error = ""
        # A per-job lock (a profile without a mutex) has no waiters: its file goes when the job does.
        self.unlink_after = False

    def update_holder(self, **changes: Any) -> None:
        """Rewrite the metadata with *changes* (e.g. job_pid, used); never fails the job over it."""
        if self.holder is None:
            return
        updated = replace(self.holder, **changes)
        try:
            self.store.write_holder(updated)
        except (OSError, LockDirError) as exc:
            self.metadata_error = f"holder metadata not updated: {exc}"
            return
        self.holder = updated

    def release(self) -> None:
        if self.fd < 0:
            return
        try:
            # Metadata first: once the flock is free a new holder may write its own. Only our own record
            # goes; one we could not replace (another user's stale file) is not ours to delete.
            if self.holder is not None:
                self.store._remove_holder_if(self.name, self.holder)
        except OSError as exc:
            self.metadata_error = f"holder metadata not removed: {exc.strerror or exc}"
        finally:
            # Closing, not LOCK_UN: a job that inherited this open file description keeps the lock held for
            # as long as any of its processes lives, and LOCK_UN would free it for them too.
            os.close(self.fd)
            self.fd = -1
            if self.unlink_after:
                with contextlib.suppress(OSError):
                    os.unlink(self.store.directory / f"{self.name}{LOCK_SUFFIX}")

    def __enter__(self) -> HeldLock:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


class LockStore:
    def __init__(self, directory: Path) -> None:
        self.directory = directory

    # --- the directory -------------------------------------------------------------------------

    def ensure_directory(self) -> None:
        """Create the lock dir 1777 if missing; refuse one that is a symlink or unsafe."""
        path = self.directory
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            st = self._create_directory()
        except OSError as exc:
            raise LockDirError(f"lock dir {path}: {exc.strerror}") from None
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

    def _create_directory(self) -> os.stat_result:
        path = self.directory
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

    # --- paths ---------------------------------------------------------------------------------

    def lock_path(self, name: str) -> Path:
        return self.directory / f"{validate_lock_name(name)}{LOCK_SUFFIX}"

    def holder_path(self, name: str) -> Path:
        return self.directory / f"{validate_lock_name(name)}{HOLDER_SUFFIX}"

    def names(self) -> list[str]:
        """Every lock name that has a lock file or holder metadata in the directory."""
        found = set()
        try:
            entries = list(os.scandir(self.directory))
        except OSError:
            return []
        for entry in entries:
            for suffix in (LOCK_SUFFIX, HOLDER_SUFFIX):
                if entry.name.endswith(suffix) and not entry.name.startswith("."):
                    found.add(entry.name[: -len(suffix)])
        # Anyone can create files in the shared dir: a name safegate would refuse is not one of its locks.
        return sorted(n for n in found if _valid_name(n))

    # --- the flock -----------------------------------------------------------------------------

    def _open_lock_file(self, name: str, *, create: bool) -> int | None:
        """An fd on the lock file (None when it does not exist and *create* is false)."""
        return self._open_lock_path(self.lock_path(name), create=create)

    def _open_lock_path(self, path: Path, *, create: bool) -> int | None:
        flags = os.O_RDWR | _O_NONBLOCK
        if create:
            try:
                fd = _open_nofollow(path, flags | os.O_CREAT | os.O_EXCL, 0o666)
            except FileExistsError:
                pass
            else:
                # 0666 whatever the umask: every user must be able to take the lock later.
                try:
                    os.fchmod(fd, 0o666)
                except OSError:
                    pass
                return fd
        try:
            return _open_nofollow(path, flags)
        except FileNotFoundError:
            return None
        except PermissionError:
            pass
        except OSError as exc:
            raise LockDirError(f"lock file {path}: {exc.strerror or exc}; remove it") from None
        try:
            # Read access is enough for flock(2); a lock file another user left 0644 can still be probed.
            return _open_nofollow(path, os.O_RDONLY | _O_NONBLOCK)
        except FileNotFoundError:
            return None
        except PermissionError:
            st = os.lstat(path)
            raise LockDirError(
                f"lock file {path} is not accessible to you (mode {stat.S_IMODE(st.st_mode):04o}, owner uid "
                f"{st.st_uid}); its owner must remove it or chmod 0666 it"
            ) from None

    def is_held(self, name: str) -> bool:
        fd = self._open_lock_file(name, create=False)
        if fd is None:
            return False
        try:
            got = _try_flock(fd, CONTENTION_GRACE)
            if got:
                _funlock(fd)
            return not got
        finally:
            os.close(fd)

    def wait_free(self, name: str, seconds: float, step: float = 0.01) -> bool:
        """Poll the flock every *step* for up to *seconds*; True as soon as it is free.

        A waiter blocked only by the lock then starts within ~10 ms of its release instead of at its next
        backoff, which keeps a queue of waiting execs moving; each poll is one non-blocking flock call.
        """
        deadline = time.monotonic() + seconds
        fd = self._open_lock_file(name, create=False)
        if fd is None:
            return True
        try:
            while True:
                if _flock_nb(fd):
                    _funlock(fd)
                    return True
                if time.monotonic() >= deadline:
                    return False
                time.sleep(step)
        finally:
            os.close(fd)

    @contextmanager
    def admission(self, timeout: float = ADMISSION_TIMEOUT) -> Iterator[None]:
        """The machine-wide admission lock: one safegate at a time checks and claims its lock.

        Held only for the check-and-claim step (milliseconds), so that two execs started in the same
        second cannot both pass a memory check only one of them fits.
        """
        from filelock import lock_descriptor

        fd = self._open_lock_path(self.directory / ADMISSION_FILE, create=True)
        assert fd is not None
        try:
            deadline = time.monotonic() + timeout
            while not lock_descriptor(fd, blocking=False):
                if time.monotonic() >= deadline:
                    raise LockDirError(
                        f"admission lock {self.directory / ADMISSION_FILE} busy for {timeout:g}s; is a safegate stuck?"
                    )
                time.sleep(_CONTENTION_STEP)
            yield
        finally:
            os.close(fd)  # closing drops the flock

    def try_acquire(
        self, name: str, profile: str, cmdline: Sequence[str] | None = None, need: int = 0,
        gpu_index: int | None = None, gpu_need: int = 0,
    ) -> HeldLock | None:
        """Take the lock without waiting (beyond the prober grace); None when another process holds it."""
        for _ in range(10):
            fd = self._open_lock_file(name, create=True)
            if fd is None:
                continue  # removed between create and open; try again
            if not _take(fd, CONTENTION_GRACE):
                os.close(fd)
                return None
            if os.fstat(fd).st_nlink == 0:
                # Someone unlinked the file: our flock guards no name; start over on the new inode.
                _funlock(fd)
                os.close(fd)
                continue
            held = HeldLock(self, name, fd, None)
            holder = replace(Holder.for_current_process(name, profile, cmdline, need),
                             gpu_index=gpu_index, gpu_need=gpu_need)
            try:
                self.write_holder(holder)
                held.holder = holder
            except (OSError, LockDirError) as exc:
                held.metadata_error = f"holder metadata not written: {exc}"
            return held
        raise LockDirError(f"lock file {self.lock_path(name)} keeps disappearing; is something deleting it?")

    # --- holder metadata -----------------------------------------------------------------------

    def write_holder(self, holder: Holder) -> None:
        final = self.holder_path(holder.lock)
        tmp = self.directory / f".{holder.lock}.{os.getpid()}.{time.monotonic_ns()}.tmp"
        fd = _open_nofollow(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
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

    def read_holder(self, name: str) -> tuple[Holder | None, str]:
        """(metadata, note); note says why it is missing or unusable."""
        path = self.holder_path(name)
        try:
            fd = _open_nofollow(path, os.O_RDONLY | _O_NONBLOCK)
        except FileNotFoundError:
            return None, ""
        except LockDirError as exc:
            return None, str(exc)
        except OSError as exc:
            return None, f"holder metadata {path} unreadable: {exc.strerror}"
        try:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                return None, f"holder metadata {path} is not a regular file"
            raw = os.read(fd, _HOLDER_MAX_BYTES + 1)
        finally:
            os.close(fd)
        if len(raw) > _HOLDER_MAX_BYTES:
            return None, f"holder metadata {path} is larger than {_HOLDER_MAX_BYTES} bytes; ignored"
        try:
            return Holder.from_json(raw.decode("utf-8")), ""
        except (ValueError, UnicodeDecodeError) as exc:
            return None, f"holder metadata {path} is corrupt ({exc})"

    def _remove_holder_if(self, name: str, expected: Holder | None) -> bool:
        """Remove the metadata if it still is *expected* (or is unreadable, when expected is None)."""
        current, _ = self.read_holder(name)
        if expected is not None and current != expected:
            return False
        try:
            os.unlink(self.holder_path(name))
        except FileNotFoundError:
            return False
        return True

    def remove_metadata_if_free(self, name: str) -> bool:
        """Remove whatever metadata the lock has, holding the flock so no new holder's record is lost."""
        path = self.holder_path(name)
        if not os.path.lexists(path):
            return False
        fd = self._open_lock_file(name, create=False)
        try:
            if fd is not None and not _try_flock(fd, CONTENTION_GRACE):
                return False  # a holder arrived meanwhile: its record stays
            try:
                os.unlink(path)
            except FileNotFoundError:
                return False
            except OSError as exc:
                raise LockDirError(f"cannot remove {path}: {exc.strerror or exc}") from None
            return True
        finally:
            if fd is not None:
                os.close(fd)

    def reservations(self) -> list[Holder]:
        """Holders of running exec jobs that have not yet reached their declared need (RAM or VRAM)."""
        found = []
        for name in self.names():
            holder, _ = self.read_holder(name)
            if holder is None or (holder.reservation <= 0 and holder.gpu_reservation <= 0):
                continue
            if holder.alive():
                found.append(holder)
        return found

    # --- state and cleanup ---------------------------------------------------------------------

    def state(self, name: str) -> LockState:
        held = self.is_held(name)
        holder, note = self.read_holder(name)
        alive = holder is not None and holder.alive()
        return LockState(name=name, path=self.lock_path(name), held=held, holder=holder, holder_alive=alive, note=note)

    def cleanup(self) -> Iterator[Removal]:
        """Remove holder metadata whose process is gone while its flock is free."""
        for name in self.names():
            try:
                path = self.holder_path(name)
            except ValueError:
                continue  # a file we did not write; never touch it
            if not os.path.lexists(path):
                continue
            holder, note = self.read_holder(name)
            if holder is not None and holder.alive():
                continue
            removal = self._remove_stale_holder(name, holder, note)
            if removal is not None:
                yield removal

    def _remove_stale_holder(self, name: str, holder: Holder | None, note: str) -> Removal | None:
        path = self.holder_path(name)
        what = (
            f"stale holder of lock {name!r}: pid {holder.pid} ({' '.join(holder.cmdline)[:80]}) is gone"
            if holder is not None
            else f"unusable holder metadata of lock {name!r}: {note}"
        )
        try:
            fd = self._open_lock_file(name, create=False)
        except LockDirError as exc:
            return Removal(path, what, removed=False, error=str(exc))
        try:
            # Hold the flock while removing, so a new holder cannot write its metadata in between.
            if fd is not None and not _try_flock(fd, CONTENTION_GRACE):
                return None  # held: the job lives on in a child; the metadata still names it
            if self.read_holder(name)[0] != holder:
                return None  # replaced meanwhile by a live holder
            try:
                os.unlink(path)
            except FileNotFoundError:
                return None
            except OSError as exc:
                return Removal(path, what, removed=False, error=exc.strerror or str(exc))
            return Removal(path, what, removed=True)
        finally:
            if fd is not None:
                os.close(fd)  # closing drops the flock


def read_legacy(path: Path) -> LegacyState:
    """An old-style PID lockfile, as shell gates write them."""
    try:
        fd = os.open(path, os.O_RDONLY | _O_NOFOLLOW | _O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        return LegacyState(path=path, pid=None, alive=False)
    except OSError as exc:
        return LegacyState(path=path, pid=None, alive=False, note=f"unreadable: {exc.strerror}")
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            return LegacyState(path=path, pid=None, alive=False, note="not a regular file; ignored")
        raw = os.read(fd, _LEGACY_MAX_BYTES)
    except OSError as exc:
        return LegacyState(path=path, pid=None, alive=False, note=f"unreadable: {exc.strerror or exc}")
    finally:
        os.close(fd)
    text = raw.decode("ascii", "replace").split()
    if not text or not text[0].isdigit() or int(text[0]) <= 0:
        return LegacyState(path=path, pid=None, alive=False, note="does not hold a pid; ignored")
    pid = int(text[0])
    alive = process_alive(pid, None)
    if alive:
        # A process started after the file was last written cannot be the one that wrote it: pid reuse.
        try:
            if psutil.Process(pid).create_time() > st.st_mtime + 1:
                alive = False
        except psutil.Error:
            pass
    return LegacyState(path=path, pid=pid, alive=alive)


def remove_legacy(state: LegacyState) -> Removal:
    what = f"stale legacy lock file {state.path}: pid {state.pid} is gone"
    try:
        os.unlink(state.path)
    except FileNotFoundError:
        return Removal(state.path, what, removed=True)
    except OSError as exc:
        return Removal(state.path, what, removed=False, error=exc.strerror or str(exc))
    return Removal(state.path, what, removed=True)


def legacy_removable(state: LegacyState) -> bool:
    return state.pid is not None and not state.alive
