"""What `status`, `locks`, `unlock` and `profiles` report: the machine and the lock store, read, not judged."""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path

import msgspec
import psutil

from safegate.config.model import Config
from safegate.errors import LockBusy, LockDirError
from safegate.gate.queue import read_tickets
from safegate.locks.files import dir_lockers, ensure_directory, lock_names, lockers
from safegate.locks.holders import cleanup, holder_files, remove_metadata_if_free
from safegate.locks.legacy import read_legacy
from safegate.locks.store import LockStore
from safegate.probes.gpu import read_gpus
from safegate.probes.memory import read_memory
from safegate.probes.processes import read_processes
from safegate.probes.snapshots import GpuSnapshot, HolderRecord, MemorySnapshot, ProcessInfo, ThermalSnapshot, Ticket
from safegate.probes.thermal import read_thermal


class LockInfo(msgspec.Struct, frozen=True):
    name: str  # a lock name, or for an old shell gate's pid file its path
    held: bool
    holder: HolderRecord | None
    alive: bool
    note: str
    usable: bool = True  # False: the lock file cannot be opened or locked (a directory, mode 000): note says why
    legacy_pid: int | None = None  # an old-style pid file naming a live process that is not safegate's


def legacy_locks(paths: Sequence[Path]) -> list[LockInfo]:
    """The configured old-style pid files that block every check now: a live pid, not one safegate wrote."""
    found = []
    for path in paths:
        state = read_legacy(path)
        if state.alive and not state.safegate and state.pid is not None:
            found.append(LockInfo(str(path), True, None, True, "legacy pid file", legacy_pid=state.pid))
    return found


def list_locks(store: LockStore) -> list[LockInfo]:
    out = []
    for name in lock_names(store.directory):
        try:
            state = store.state(name)
        except ValueError:
            continue  # a file whose name is not a valid lock name: not ours
        except LockDirError as exc:
            # Anyone can plant a directory or an unreadable file at a lock path: that one entry is unusable,
            # the listing goes on.
            out.append(LockInfo(name, False, None, False, str(exc), usable=False))
            continue
        out.append(LockInfo(name, state.held, state.holder, state.holder_alive, state.note))
    return out


def unlock(store: LockStore, name: str) -> list[str]:
    """Remove a free lock's stale leftovers (holder metadata); refuse while a live process holds it.

    The lock file itself stays: unlinking it would split waiters across two inodes.
    """
    ensure_directory(store.directory)
    state = store.state(name)
    if state.held:
        h = state.holder
        who = f"pid {h.job_pid or h.pid} ({h.user}: {' '.join(h.cmdline)[:80]})" if h else "a process without metadata"
        raise LockBusy(f"lock {name!r} is held by {who}; stop that job instead (there is no force)")
    mine = {f.path for f in holder_files(store.directory, name, None)[0]}
    removed = [r.what for r in cleanup(store.directory) if r.removed and r.path in mine]
    leftover = remove_metadata_if_free(store.directory, name)
    if leftover:
        removed.append(f"holder metadata of lock {name!r} (its process no longer holds the lock)")
    return removed


class StatusReport(msgspec.Struct, frozen=True):
    time: float
    memory: MemorySnapshot
    swap_total: int
    swap_used: int
    thermal: ThermalSnapshot
    gpus: GpuSnapshot
    locks: list[LockInfo]
    top: list[ProcessInfo]
    lock_dir: Path
    waiters: list[Ticket]


def collect_status(config: Config, lock_dir: Path, gpu_backend: str, top: int = 5) -> StatusReport:
    store = LockStore(lock_dir)
    swap = psutil.swap_memory()
    waiters = read_tickets(lock_dir)
    # The heaviest processes, left out as the competing check leaves them out (safegate the lock dir accounts for).
    procs = sorted(
        read_processes(accounted=lambda: {t.pid for t in waiters} | dir_lockers(lock_dir, lockers())).processes,
        key=lambda p: -p.rss)[:top]
    return StatusReport(
        time=time.time(), memory=read_memory(), swap_total=int(swap.total), swap_used=int(swap.used),
        thermal=read_thermal(config.thermal), gpus=read_gpus(gpu_backend),
        locks=(list_locks(store) if lock_dir.is_dir() else []) + legacy_locks(config.legacy_lock_files), top=procs,
        lock_dir=lock_dir, waiters=waiters,
    )
