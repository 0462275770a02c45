"""Taking a lock and reading what the held ones say: LockStore, HeldLock (a lock this process holds), and the
reservations of held locks.

They compose the modules beside them (files, holders); the rules live there.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from msgspec.structs import replace

from safegate.errors import LockDirError
from safegate.locks.files import (
    flock_nb,
    funlock,
    is_held,
    lock_path,
    locker_of,
    lockers,
    open_lock_file,
    scan,
    try_flock,
)
from safegate.locks.holders import (
    Holder,
    HolderFile,
    current_holder,
    holder_files,
    read_files,
    remove_holder_if,
    write_holder,
)
from safegate.probes.snapshots import LockState


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
            self.metadata_path = write_holder(self.store.directory, updated, self.metadata_path)
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
                remove_holder_if(self.metadata_path, self.holder)
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
                    os.unlink(lock_path(self.store.directory, self.name))

    def __enter__(self) -> HeldLock:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


class LockStore:
    """The locks in one lock dir: taking one, and reading one's holder (reading never writes).

    The rest is functions of the directory: files (ensure_directory, lock_path, admission, ...), holders
    (write_holder, cleanup, ...) and reservations() below.
    """

    def __init__(self, directory: Path) -> None:
        self.directory = directory

    def try_acquire(
        self, name: str, profile: str, cmdline: Sequence[str] | None = None, need: int = 0,
        gpu_index: int | None = None, gpu_need: int = 0, owner: int | None = None, owner_start: float | None = None,
    ) -> HeldLock | None:
        """Take the lock without waiting (beyond the prober grace); None when another process holds it."""
        path = lock_path(self.directory, name)
        for _ in range(10):
            fd = open_lock_file(path, create=True)
            if fd is None:
                continue  # removed between create and open; try again
            if not try_flock(fd):
                os.close(fd)
                return None
            if os.fstat(fd).st_nlink == 0:
                # Someone unlinked the file: our flock guards no name; start over on the new inode.
                funlock(fd)
                os.close(fd)
                continue
            held = HeldLock(self, name, fd, None)
            holder = replace(Holder.for_current_process(name, profile, cmdline, need),
                             gpu_index=gpu_index, gpu_need=gpu_need, owner=owner, owner_start=owner_start)
            try:
                held.metadata_path = write_holder(self.directory, holder)
                held.holder = holder
            except (OSError, LockDirError) as exc:
                held.metadata_error = f"holder metadata not written: {exc}"
            return held
        raise LockDirError(f"lock file {path} keeps disappearing; is something deleting it?")

    def read_holder(self, name: str) -> tuple[Holder | None, str]:
        """The record of the lock's holder, if it wrote one (whether or not the lock is held now), and a note
        on the files that are not it."""
        locker = locker_of(lock_path(self.directory, name), lockers())
        files, unread = holder_files(self.directory, name, locker or None)
        holder = current_holder(files, name, locker or None)
        return holder, _note(files, holder, unread)

    def state(self, name: str, names: list[str] | None = None) -> LockState:
        """*names*: a listing of the lock dir just made, shared with the other readers of one evaluation."""
        path = lock_path(self.directory, name)
        held = is_held(path)
        if not held:
            # Only the flock's holder's own record names the holder: a free lock has none, whatever files remain.
            return LockState(name=name, path=path, held=False, holder=None, holder_alive=False)
        pids = locker_of(path, lockers())
        files, unread = holder_files(self.directory, name, pids, names)
        holder = current_holder(files, name, pids)
        return LockState(name=name, path=path, held=True, holder=holder,
                         holder_alive=holder is not None, note=_note(files, holder, unread),
                         lockers=frozenset(pids or ()))


def _note(files: Sequence[HolderFile], holder: Holder | None, unread: int = 0) -> str:
    """What the lock's files that are not its holder's record come to (*unread*: those not even opened, their
    names naming no holder of the flock)."""
    others = [f for f in files if f.holder is None or f.holder != holder]
    unusable = [f.note for f in others if f.note]
    count = len(others) + unread
    if unusable:
        return unusable[0] + (f" (and {count - 1} other file(s) ignored)" if count > 1 else "")
    return f"{count} holder file(s) not written by the holder ignored" if count else ""


def reservations(directory: Path, names: list[str] | None = None) -> list[Holder]:
    """Holders of held locks that have not yet reached their declared need (RAM or VRAM).

    Only the record the lock's holder wrote counts, and only while its flock is held: a file anyone else
    writes (for a free lock, or naming someone else's process) reserves nothing.
    """
    found = []
    table: dict[tuple[int, int], set[int]] | None = None
    loaded = False
    for name, entry in scan(directory, names).items():
        if not entry.holders or not entry.lock_file:
            continue  # no record, or no lock file to hold: nothing reserved
        filenames = entry.holders
        path = lock_path(directory, name)
        # Whether the flock is held first: the files of a free lock, forged or stale, are never read.
        if not _held_now(path):
            continue
        if not loaded:
            # Read only when a held lock has records to judge: the first read of /proc/locks in a process
            # waits for an RCU grace period (~10 ms here), and a check with nothing held should not pay it.
            table, loaded = lockers(), True
        pids = locker_of(path, table)
        holder = current_holder(read_files(directory, name, filenames, pids), name, pids)
        if holder is not None and (holder.reservation > 0 or holder.gpu_reservation > 0):
            found.append(holder)
    return found


def _held_now(path: Path) -> bool:
    """One non-blocking flock attempt: a lock file that is missing or unusable holds no one's reservation."""
    try:
        fd = open_lock_file(path, create=False)
    except LockDirError:
        return False
    if fd is None:
        return False
    try:
        if flock_nb(fd):
            funlock(fd)
            return False
        return True
    finally:
        os.close(fd)
