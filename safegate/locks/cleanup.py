"""Stale holder metadata and its removal; the reservations of the holders that hold their locks."""

from __future__ import annotations

import os
import random
import re
import stat
from collections.abc import Iterator
from pathlib import Path

from safegate.errors import LockDirError
from safegate.locks.directory import holder_file_pid, listing, lock_path, scan
from safegate.locks.flock import flock_nb, funlock, locker_of, lockers, open_lock_file, try_flock
from safegate.locks.holders import Holder, HolderFile, current_holder, read_file, read_files
from safegate.probes.pids import identity, live_pids
from safegate.probes.processes import process_alive
from safegate.probes.snapshots import Removal

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
    # Which ones at random when there are more (so planted ones cannot always come first); in name order.
    for name, filename in sorted(random.sample(stale, min(len(stale), SWEEP_MAX))):
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
