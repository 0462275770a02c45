"""The read-only reports: locks, unlock, profiles and status."""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from pathlib import Path

from safegate.commands.reports import LockInfo, StatusReport
from safegate.config.file import load_config
from safegate.config.history import Run
from safegate.config.model import Profile
from safegate.probes.gpu import gpu_backend
from safegate.probes.snapshots import Ticket


def locks(config: str | None) -> tuple[Path, list[LockInfo]]:
    """The lock dir and its locks (none when the dir does not exist yet)."""
    from safegate.commands.reports import legacy_locks, list_locks
    from safegate.locks.files import resolve_lock_dir
    from safegate.locks.store import LockStore

    cfg = load_config(config)
    store = LockStore(resolve_lock_dir(cfg.lock_dir, os.environ))
    found = list_locks(store) if store.directory.is_dir() else []
    return store.directory, found + legacy_locks(cfg.legacy_lock_files)


def queue(config: str | None) -> tuple[list[Ticket], float]:
    """The waiters in the lock dir, in arrival order (the order each lock serves them), and the time now."""
    from safegate.gate.queue import read_tickets
    from safegate.locks.files import resolve_lock_dir

    return read_tickets(resolve_lock_dir(load_config(config).lock_dir, os.environ)), time.time()


def unlock(config: str | None, name: str) -> list[str]:
    """What was removed of a free lock's leftovers; raises LockBusy while a live process holds it."""
    from safegate.commands.reports import unlock as unlock_lock
    from safegate.locks.files import resolve_lock_dir
    from safegate.locks.store import LockStore

    return unlock_lock(LockStore(resolve_lock_dir(load_config(config).lock_dir, os.environ)), name)


def profiles(config: str | None) -> list[tuple[Profile, list[Run]]]:
    """Every profile, with what history recorded of its runs."""
    from safegate.config import history

    cfg = load_config(config)
    recorded = history.load(history.history_path())
    return [(p, recorded.get(p.name, [])) for p in cfg.profiles.values()]


STATUS_REFRESH = 2.0  # seconds between screens of status --watch


def status(config: str | None, watch: bool) -> Iterator[StatusReport]:
    """One report, or with *watch* a new one every STATUS_REFRESH seconds until interrupted."""
    from safegate.commands.reports import collect_status
    from safegate.locks.files import resolve_lock_dir

    cfg = load_config(config)
    backend = gpu_backend(cfg.gpu_backend, os.environ)
    lock_dir = resolve_lock_dir(cfg.lock_dir, os.environ)
    while True:
        yield collect_status(cfg, lock_dir, backend)
        if not watch:
            return
        time.sleep(STATUS_REFRESH)
