"""Old-style PID lock files, as shell gates write them: read, judged alive or stale, removed when stale, and
written while safegate runs a job, so the old gates see it too."""

from __future__ import annotations

import contextlib
import os
import stat
from collections.abc import Sequence
from pathlib import Path

from safegate.locks.files import O_NOFOLLOW, O_NONBLOCK
from safegate.probes.processes import is_safegate, process_alive, read_small
from safegate.probes.snapshots import LegacyState, Removal

LEGACY_MAX_BYTES = 4096
PID_MAX = 4_194_304  # PID_MAX_LIMIT on 64-bit Linux (as safegate.schema, which this reader needs not import)


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
    # A pid is at most 7 digits (PID_MAX_LIMIT): anything longer is not one, and is never turned into a number.
    if not text or not text[0].isdigit() or len(text[0]) > 7 or not 0 < int(text[0]) <= PID_MAX:
        return LegacyState(path=path, pid=None, alive=False, note="does not hold a pid; ignored")
    pid = int(text[0])
    alive = process_alive(pid, None)
    if alive:
        import psutil

        # A process started after the file was last written cannot be the one that wrote it: pid reuse.
        try:
            if psutil.Process(pid).create_time() > st.st_mtime + 1:
                alive = False
        except psutil.Error:
            pass
    return LegacyState(path=path, pid=pid, alive=alive, safegate=alive and _managed(pid))


def _managed(pid: int) -> bool:
    """*pid* is a safegate process, or the job of one (its parent is safegate exec)."""
    argv = _argv(pid)
    if is_safegate(argv):
        return True
    import psutil

    try:
        parent = psutil.Process(pid).ppid()
    except psutil.Error:
        return False
    return parent > 1 and is_safegate(_argv(parent))


def _argv(pid: int) -> list[str]:
    raw = read_small(f"/proc/{pid}/cmdline", 4096)
    return raw.rstrip(b"\0").decode("utf-8", "replace").split("\0")[:3] if raw else []


def claim_legacy(paths: Sequence[Path], pid: int) -> list[Path]:
    """Write *pid* into each old-style PID file that is absent or stale, so old shell gates (pid file and
    `kill -0`) see safegate's job; the files written, for update_legacy and release_legacy.

    Atomic and never over someone else's: the pid goes to a private temporary file beside it, which is then
    hard-linked to the name (link(2) fails when the name exists, and creates no file through a symlink).
    """
    written = []
    for path in paths:
        state = read_legacy(path)
        if state.alive or (state.note and state.pid is None and os.path.lexists(path)):
            continue  # a live old gate's (safegate blocks on it), or a file we do not understand: left alone
        if state.pid is not None:
            remove_legacy(state)
        if _link_pid(path, pid):
            written.append(path)
    return written


def _link_pid(path: Path, pid: int) -> bool:
    tmp = path.parent / f".{path.name}.safegate-{os.getpid()}"
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | O_NOFOLLOW | os.O_CLOEXEC, 0o644)
    except OSError:
        return False  # no such directory, or not ours to write: the old gate's business
    try:
        os.write(fd, f"{pid}\n".encode())
        os.fchmod(fd, 0o644)
    finally:
        os.close(fd)
    try:
        os.link(tmp, path, follow_symlinks=False)
        return True
    except OSError:
        return False  # taken meanwhile by an old gate: it holds the file, not us
    finally:
        with contextlib.suppress(OSError):
            os.unlink(tmp)


def update_legacy(paths: Sequence[Path], old: int, new: int) -> None:
    """Name the job (*new*) instead of safegate (*old*) in the files safegate wrote: the job can outlive a
    killed safegate, and the old gates must keep seeing it."""
    for path in paths:
        if read_legacy(path).pid != old:
            continue
        tmp = path.parent / f".{path.name}.safegate-{os.getpid()}"
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | O_NOFOLLOW | os.O_CLOEXEC, 0o644)
            try:
                os.write(fd, f"{new}\n".encode())
            finally:
                os.close(fd)
            os.rename(tmp, path)  # replaces the name itself, never a symlink's target
        except OSError:
            with contextlib.suppress(OSError):
                os.unlink(tmp)


def release_legacy(paths: Sequence[Path], pids: Sequence[int]) -> None:
    """Remove the files safegate wrote, if they still name one of its *pids*."""
    for path in paths:
        if read_legacy(path).pid in pids:
            with contextlib.suppress(OSError):
                os.unlink(path)


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
