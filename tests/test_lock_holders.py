"""Holder metadata (safegate.locks.holders) against real holders: written and read back, trusted only from the
lock's holder, removed once its process is gone; dead holders and hostile files."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import psutil
import pytest
from msgspec.structs import replace
from support import Procs, hold_with_flock, hold_with_safegate, holder_files, store_at, wait_until

from safegate.locks.files import ensure_directory, holder_path, is_held, lock_path
from safegate.locks.holders import Holder, cleanup, write_holder
from safegate.locks.store import reservations


def test_killed_holder_leaves_stale_metadata_that_cleanup_removes(tmp_path: Path, procs: Procs) -> None:
    lock_dir = tmp_path / "locks"
    holder = hold_with_safegate(procs, lock_dir, "whisper-large")
    store = store_at(lock_dir)
    assert list(cleanup(store.directory)) == []  # alive: nothing to remove
    os.kill(holder.pid, signal.SIGKILL)
    holder.wait()
    assert holder_files(lock_dir, "whisper-large")
    removals = list(cleanup(store.directory))
    assert len(removals) == 1 and removals[0].removed
    assert f"pid {holder.pid}" in removals[0].what
    assert not holder_files(lock_dir, "whisper-large")


def test_reused_pid_is_not_taken_for_the_holder(tmp_path: Path) -> None:
    store = store_at(tmp_path / "locks")
    # Metadata of a process that had our pid before us (another start time): the pid was reused, the holder
    # is gone. Its file's name says so (pid and start), and so does the record.
    fake = Holder.for_current_process("heavy", "p")
    start = int(Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()[19])
    ensure_directory(store.directory)
    write_holder(store.directory, replace(fake, start_time=fake.start_time - 1000),
                       store.directory / f"heavy.holder-{fake.pid}.{start + 1}-{'0' * 16}.json")
    removals = list(cleanup(store.directory))
    assert len(removals) == 1 and removals[0].removed


INHERIT = """
import os, sys, time
from pathlib import Path
from safegate.locks.store import LockStore
held = LockStore(Path(sys.argv[1])).try_acquire("heavy", "p", need=int(sys.argv[2]))
os.set_inheritable(held.fd, True)
if os.fork() == 0:
    os.execvp("sleep", ["sleep", "600"])  # the "job": inherits the lock's open file, so the flock
print("held", flush=True)
time.sleep(600)
"""


def test_metadata_of_a_held_lock_is_kept_while_a_job_that_inherited_it_lives(tmp_path: Path, procs: Procs) -> None:
    # A job that inherited the lock fd keeps the lock held after its writer is gone: its record still names
    # the holder (the kernel keeps the writer's pid as the flock's owner), and still reserves.
    lock_dir = tmp_path / "locks"
    store = store_at(lock_dir)
    writer = procs.spawn([sys.executable, "-c", INHERIT, str(lock_dir), str(2**40)], stdout=subprocess.PIPE)
    assert writer.stdout is not None and writer.stdout.readline().strip() == b"held"
    child = wait_until(lambda: [p for p in psutil.Process(writer.pid).children() if p.name() == "sleep"])[0]
    procs.orphans.append(child.pid)
    written = store.read_holder("heavy")[0]
    assert written is not None
    # The writer records its job as exec does.
    write_holder(store.directory, replace(written, job_pid=child.pid, job_start_time=child.create_time()),
                       holder_files(lock_dir)[0])
    os.kill(writer.pid, signal.SIGKILL)
    writer.wait()
    assert is_held(lock_path(store.directory, "heavy"))
    assert list(cleanup(store.directory)) == []
    state = store.state("heavy")
    assert state.holder is not None and state.holder.pid == writer.pid and state.holder.job_pid == child.pid
    assert [h.pid for h in reservations(store.directory)] == [writer.pid]


def test_dead_record_beside_a_lock_someone_else_holds_is_not_its_holder(tmp_path: Path, procs: Procs) -> None:
    store = store_at(tmp_path / "locks")
    dead = Holder(pid=2**22 + 7, start_time=1.0, user="u", host="h", cmdline=["x"], started_at=1.0,
                  profile="p", lock="heavy", need=2**40)
    write_holder(store.directory, dead)
    hold_with_flock(procs, lock_path(store.directory, "heavy"))
    state = store.state("heavy")
    assert state.held and state.holder is None
    assert reservations(store.directory) == []
    assert [r.removed for r in cleanup(store.directory)] == [True]


@pytest.mark.parametrize("content", [b"", b"{trunc", b"not json at all", b"[1,2]", b'{"pid": "x"}', b"\xff\xfe"])
def test_corrupt_metadata_is_reported_and_removed_when_free(tmp_path: Path, content: bytes) -> None:
    store = store_at(tmp_path / "locks")
    holder_path(store.directory, "heavy").write_bytes(content)
    holder, note = store.read_holder("heavy")
    assert holder is None and "corrupt" in note
    removals = list(cleanup(store.directory))
    assert len(removals) == 1 and removals[0].removed and "unusable" in removals[0].what


def test_huge_metadata_is_not_read_whole(tmp_path: Path) -> None:
    store = store_at(tmp_path / "locks")
    holder_path(store.directory, "heavy").write_bytes(b" " * (10 * 1024 * 1024))
    holder, note = store.read_holder("heavy")
    assert holder is None and "larger than" in note


def test_symlink_at_holder_path_is_not_followed(tmp_path: Path) -> None:
    store = store_at(tmp_path / "locks")
    victim = tmp_path / "victim"
    victim.write_text("precious")
    holder_path(store.directory, "heavy").symlink_to(victim)
    assert store.read_holder("heavy")[0] is None  # reading refuses to follow it
    held = store.try_acquire("heavy", "p")
    assert held is not None and held.holder is not None and held.metadata_path is not None
    assert store.read_holder("heavy")[0] == held.holder
    assert victim.read_text() == "precious"
    held.release()
    assert victim.read_text() == "precious"


def test_holder_json_round_trip() -> None:
    h = Holder.for_current_process("heavy", "default", ["a", "b c"])
    assert Holder.from_json(h.to_json()) == h
    assert json.loads(h.to_json())["pid"] == os.getpid()
