"""LockStore, the lock dir as the rest of safegate sees it, and HeldLock, a lock this process holds.

Both only compose the modules beside them (directory, flock, holders, cleanup); the rules live there.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from msgspec.structs import replace

from safegate.errors import LockDirError
from safegate.locks import cleanup as stale
from safegate.locks import directory as lockdir
from safegate.locks import flock, holders
from safegate.locks.holders import Holder
from safegate.probes.snapshots import LockState, Removal


class HeldLock:
    """A lock this process holds; release() (or leaving the with-block) gives it up."""

    def __init__(self, store: LockStore, name: str, fd: int, holder: Holder | None) -> None:
        self.store = store
        self.name = name
        self.fd = fd
        self.holder = holder
        self.metadata_path: Path | None = None  # this holder's own file, once written
        self.metadata_error = ""
        # A per-job lock (a profile without a mutex) has no waiters: its file goes when the job does.
        self.unlink_after = False
        # The flock was handed on (a grant's job takes the lock itself): the record stays until release().
        self.stepped_aside = False

    def update_holder(self, **changes: Any) -> None:
        """Rewrite the metadata with *changes* (e.g. job_pid, used); never fails the job over it."""
        if self.holder is None:
            return
        updated = replace(self.holder, **changes)
        try:
            self.metadata_path = self.store.write_holder(updated, self.metadata_path)
        except (OSError, LockDirError) as exc:
            self.metadata_error = f"holder metadata not updated: {exc}"
            return
        self.holder = updated

    def step_aside(self) -> None:
        """Give up the flock for a job that waits for it itself (flock(1)), keeping the record and its
        reservation: the record names the job, which then holds the lock."""
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
            self.stepped_aside = True

    def release(self) -> None:
        if self.fd < 0 and not self.stepped_aside:
            return
        try:
            # Metadata first: a record left while the flock is free would name us as holder of nothing.
            if self.holder is not None and self.metadata_path is not None:
                holders.remove_holder_if(self.metadata_path, self.holder)
        except OSError as exc:
            self.metadata_error = f"holder metadata not removed: {exc.strerror or exc}"
        finally:
            # Closing, not LOCK_UN: a job that inherited this open file description keeps the lock held for
            # as long as any of its processes lives, and LOCK_UN would free it for them too.
            if self.fd >= 0:
                os.close(self.fd)
            self.fd = -1
            self.stepped_aside = False
            if self.unlink_after:
                with contextlib.suppress(OSError):
                    os.unlink(self.store.lock_path(self.name))

    def __enter__(self) -> HeldLock:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


class LockStore:
    """The locks in one lock dir. Reading (names, state, reservations, lockers, is_held) never writes."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory

    def ensure_directory(self) -> None:
        lockdir.ensure_directory(self.directory)

    def check_directory(self) -> bool:
        return lockdir.check_directory(self.directory)

    def lock_path(self, name: str) -> Path:
        return lockdir.lock_path(self.directory, name)

    def holder_path(self, name: str) -> Path:
        return lockdir.holder_path(self.directory, name)

    def names(self) -> list[str]:
        return lockdir.lock_names(self.directory)

    def is_held(self, name: str) -> bool:
        return flock.is_held(self.lock_path(name))

    def admission(self, timeout: float = flock.ADMISSION_TIMEOUT) -> contextlib.AbstractContextManager[None]:
        return flock.admission(self.directory, timeout)

    def try_acquire(
        self, name: str, profile: str, cmdline: Sequence[str] | None = None, need: int = 0,
        gpu_index: int | None = None, gpu_need: int = 0, owner: int | None = None, owner_start: float | None = None,
    ) -> HeldLock | None:
        """Take the lock without waiting (beyond the prober grace); None when another process holds it."""
        path = self.lock_path(name)
        for _ in range(10):
            fd = flock.open_lock_file(path, create=True)
            if fd is None:
                continue  # removed between create and open; try again
            if not flock.try_flock(fd):
                os.close(fd)
                return None
            if os.fstat(fd).st_nlink == 0:
                # Someone unlinked the file: our flock guards no name; start over on the new inode.
                flock.funlock(fd)
                os.close(fd)
                continue
            held = HeldLock(self, name, fd, None)
            holder = replace(Holder.for_current_process(name, profile, cmdline, need),
                             gpu_index=gpu_index, gpu_need=gpu_need, owner=owner, owner_start=owner_start)
            try:
                held.metadata_path = self.write_holder(holder)
                held.holder = holder
            except (OSError, LockDirError) as exc:
                held.metadata_error = f"holder metadata not written: {exc}"
            return held
        raise LockDirError(f"lock file {path} keeps disappearing; is something deleting it?")

    def write_holder(self, holder: Holder, path: Path | None = None) -> Path:
        """Write *holder* to *path*, or to a new file of its own; the path written."""
        return holders.write_holder(self.directory, holder, path)

    def holder_files(self, name: str, pids: set[int] | None) -> list[holders.HolderFile]:
        """The lock's holder files that could be its holder's (*pids*: the flock's holders; None: unknown)."""
        return self._holder_files(name, pids)[0]

    def _holder_files(self, name: str, pids: set[int] | None,
                      listed: list[str] | None = None) -> tuple[list[holders.HolderFile], int]:
        """The files holder_files() reads, and how many others of the lock it left unopened."""
        names = lockdir.listing(self.directory, listed).get(name, [])
        files = holders.read_files(self.directory, name, names, pids)
        return files, len(names) - len(files)

    def read_holder(self, name: str) -> tuple[Holder | None, str]:
        """The record of the lock's holder, if it wrote one (whether or not the lock is held now), and a note
        on the files that are not it."""
        locker = flock.locker_of(self.lock_path(name), flock.lockers())
        files, unread = self._holder_files(name, locker or None)
        holder = holders.current_holder(files, name, locker or None)
        return holder, _note(files, holder, unread)

    def state(self, name: str, names: list[str] | None = None) -> LockState:
        """*names*: a listing of the lock dir just made, shared with the other readers of one evaluation."""
        held = self.is_held(name)
        if not held:
            # Only the flock's holder's own record names the holder: a free lock has none, whatever files remain.
            return LockState(name=name, path=self.lock_path(name), held=False, holder=None, holder_alive=False)
        pids = flock.locker_of(self.lock_path(name), flock.lockers())
        files, unread = self._holder_files(name, pids, names)
        holder = holders.current_holder(files, name, pids)
        return LockState(name=name, path=self.lock_path(name), held=True, holder=holder,
                         holder_alive=holder is not None, note=_note(files, holder, unread),
                         lockers=frozenset(pids or ()))

    def lockers(self) -> set[int]:
        """The pids holding a flock on any file of the lock dir (/proc/locks; none where it cannot be read)."""
        return flock.dir_lockers(self.directory, flock.lockers())

    def reservations(self, names: list[str] | None = None) -> list[Holder]:
        return stale.reservations(self.directory, names)

    def cleanup(self, names: list[str] | None = None) -> Iterator[Removal]:
        return stale.cleanup(self.directory, names)

    def remove_metadata_if_free(self, name: str) -> bool:
        return stale.remove_metadata_if_free(self.directory, name)


def _note(files: Sequence[holders.HolderFile], holder: Holder | None, unread: int = 0) -> str:
    """What the lock's files that are not its holder's record come to (*unread*: those not even opened, their
    names naming no holder of the flock)."""
    others = [f for f in files if f.holder is None or f.holder != holder]
    unusable = [f.note for f in others if f.note]
    count = len(others) + unread
    if unusable:
        return unusable[0] + (f" (and {count - 1} other file(s) ignored)" if count > 1 else "")
    return f"{count} holder file(s) not written by the holder ignored" if count else ""
