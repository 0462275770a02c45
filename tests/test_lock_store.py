"""Taking a lock (safegate.locks.store): the holder's record is written with it and removed on release, and a
lock another process holds is refused."""

from __future__ import annotations

import os
from pathlib import Path

from support import Procs, hold_with_safegate, holder_files, store_at

from safegate.locks.files import is_held, lock_path


def test_acquire_writes_holder_and_release_removes_it(tmp_path: Path) -> None:
    store = store_at(tmp_path / "locks")
    with store.try_acquire("heavy", "whisper-large-v3", ["whisper", "x.mp3"]) as held:
        assert held is not None
        holder, note = store.read_holder("heavy")
        assert note == "" and holder is not None
        assert holder.pid == os.getpid() and holder.profile == "whisper-large-v3"
        assert holder.cmdline == ["whisper", "x.mp3"]
        assert is_held(lock_path(store.directory, "heavy"))
    assert not is_held(lock_path(store.directory, "heavy"))
    assert not holder_files(store.directory)
    assert lock_path(store.directory, "heavy").exists()  # never unlinked: unlinking splits waiters across inodes


def test_second_acquire_in_other_process_is_refused(tmp_path: Path, procs: Procs) -> None:
    lock_dir = tmp_path / "locks"
    hold_with_safegate(procs, lock_dir, "heavy")
    store = store_at(lock_dir)
    assert store.try_acquire("heavy", "p") is None
    state = store.state("heavy")
    assert state.held and state.holder is not None and state.holder_alive
