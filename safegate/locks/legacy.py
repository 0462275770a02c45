"""Old-style PID lock files, as shell gates write them: read, judged alive or stale, removed when stale."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import psutil

from safegate.locks.directory import O_NOFOLLOW, O_NONBLOCK
from safegate.probes.processes import process_alive
from safegate.snapshots import LegacyState, Removal

LEGACY_MAX_BYTES = 4096


def read_legacy(path: Path) -> LegacyState:
    """An old-style PID lockfile, as shell gates write them."""
    try:
        fd = os.open(path, os.O_RDONLY | O_NOFOLLOW | O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        return LegacyState(path=path, pid=None, alive=False)
    except OSError as exc:
        return LegacyState(path=path, pid=None, alive=False, note=f"unreadable: {exc.strerror}")
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            return LegacyState(path=path, pid=None, alive=False, note="not a regular file; ignored")
        raw = os.read(fd, LEGACY_MAX_BYTES)
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
