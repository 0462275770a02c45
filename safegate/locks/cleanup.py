"""Stale holder metadata and its removal; the reservations of jobs whose metadata is live."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

from safegate.errors import LockDirError
from safegate.locks.directory import holder_path, lock_names, lock_path
from safegate.locks.flock import open_lock_file, try_flock
from safegate.locks.holders import Holder, read_holder
from safegate.snapshots import Removal


def cleanup(directory: Path) -> Iterator[Removal]:
    """Remove holder metadata whose process is gone while its flock is free."""
    for name in lock_names(directory):
        try:
            path = holder_path(directory, name)
        except ValueError:
            continue  # a file we did not write; never touch it
        if not os.path.lexists(path):
            continue
        holder, note = read_holder(directory, name)
        if holder is not None and holder.alive():
            continue
        removal = _remove_stale_holder(directory, name, holder, note)
        if removal is not None:
            yield removal


def _remove_stale_holder(directory: Path, name: str, holder: Holder | None, note: str) -> Removal | None:
    path = holder_path(directory, name)
    what = (
        f"stale holder of lock {name!r}: pid {holder.pid} ({' '.join(holder.cmdline)[:80]}) is gone"
        if holder is not None
        else f"unusable holder metadata of lock {name!r}: {note}"
    )
    try:
        fd = open_lock_file(lock_path(directory, name), create=False)
    except LockDirError as exc:
        return Removal(path, what, removed=False, error=str(exc))
    try:
        # Hold the flock while removing, so a new holder cannot write its metadata in between.
        if fd is not None and not try_flock(fd):
            return None  # held: the job lives on in a child; the metadata still names it
        if read_holder(directory, name)[0] != holder:
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


def remove_metadata_if_free(directory: Path, name: str) -> bool:
    """Remove whatever metadata the lock has, holding the flock so no new holder's record is lost."""
    path = holder_path(directory, name)
    if not os.path.lexists(path):
        return False
    fd = open_lock_file(lock_path(directory, name), create=False)
    try:
        if fd is not None and not try_flock(fd):
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


def reservations(directory: Path) -> list[Holder]:
    """Holders of running exec jobs that have not yet reached their declared need (RAM or VRAM)."""
    found = []
    for name in lock_names(directory):
        holder, _ = read_holder(directory, name)
        if holder is None or (holder.reservation <= 0 and holder.gpu_reservation <= 0):
            continue
        if holder.alive():
            found.append(holder)
    return found
