"""A waiter's turn at its lock (safegate.gate.watch; issue 23.3: woken by the release, not by a backoff)."""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Callable
from pathlib import Path

import psutil
import pytest
from support import TIMEOUT, Procs, hold_with_flock, post_ticket, store_at

from safegate.gate import watch
from safegate.locks.files import lock_path
from safegate.probes.snapshots import Ticket


def _me(lock: str = "heavy") -> Ticket:
    return Ticket(pid=os.getpid(), start_time=psutil.Process().create_time(), user="me", lock=lock, profile="p",
                  need=0, arrival=time.time_ns())


def _in_thread(call: Callable[[], bool]) -> Callable[[], bool | None]:
    """Run *call* in a thread; the returned function joins it (at the suite's deadline) and gives its result."""
    result: list[bool] = []
    thread = threading.Thread(target=lambda: result.append(call()), daemon=True)
    thread.start()

    def join() -> bool | None:
        thread.join(TIMEOUT)
        return result[0] if result else None

    return join


@pytest.mark.parametrize("inotify", [True, False], ids=["inotify", "no-inotify"])
def test_a_waiter_is_woken_by_the_release_of_its_lock(tmp_path: Path, procs: Procs, inotify: bool,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    if not inotify:
        def refused(directory: Path) -> None:
            raise OSError(24, "inotify_init1")
        monkeypatch.setattr(watch, "DirWatch", refused)
    store = store_at(tmp_path / "locks")
    # flock(1) opens it read-only: a close-nowrite
    holder = hold_with_flock(procs, lock_path(store.directory, "heavy"))
    me = _me()
    assert watch.wait_turn(store.directory, "heavy", me, 0.2) is False  # held all along: the deadline
    join = _in_thread(lambda: watch.wait_turn(store.directory, "heavy", me, TIMEOUT))
    os.killpg(holder.pid, signal.SIGKILL)
    holder.wait()
    assert join() is True


def test_a_released_lock_is_not_a_waiters_turn_while_an_earlier_waiter_for_it_is_in_line(
        tmp_path: Path, procs: Procs) -> None:
    store = store_at(tmp_path / "locks")
    earlier = procs.spawn(["sleep", "600"])
    path = post_ticket(store.directory, earlier.pid, need=0, lock="heavy")
    other_lock = _me("other")
    assert watch.wait_turn(store.directory, "other", other_lock, TIMEOUT) is True  # another lock's line: free now
    me = _me()
    assert watch.wait_turn(store.directory, "heavy", me, 0.2) is False  # free, but the earlier waiter goes first
    join = _in_thread(lambda: watch.wait_turn(store.directory, "heavy", me, TIMEOUT))
    path.unlink()  # admitted or gone: its ticket leaves the line
    assert join() is True
