"""The lock store against real holders: flock(1), other safegate processes, dead holders, hostile files."""

from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import psutil
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from msgspec.structs import replace
from support import (
    TIMEOUT,
    Nobody,
    Procs,
    hold_with_flock,
    hold_with_safegate,
    holder_files,
    post_ticket,
    wait_until,
)

from safegate.errors import LockDirError
from safegate.gate import watch
from safegate.locks.files import dir_lockers, ensure_directory, holder_path, is_held, lock_path, lockers
from safegate.locks.holders import Holder, cleanup, write_holder
from safegate.locks.legacy import legacy_removable, read_legacy, remove_legacy
from safegate.locks.store import LockStore, reservations
from safegate.probes.snapshots import Ticket


def store_at(path: Path) -> LockStore:
    store = LockStore(path)
    ensure_directory(store.directory)
    return store


def test_directory_created_sticky_and_world_writable(tmp_path: Path) -> None:
    old = os.umask(0o077)
    try:
        store = store_at(tmp_path / "a" / "locks")
    finally:
        os.umask(old)
    assert stat.S_IMODE(os.stat(store.directory).st_mode) == 0o1777


def test_lock_file_is_0666_whatever_the_umask(tmp_path: Path) -> None:
    store = store_at(tmp_path / "locks")
    old = os.umask(0o077)
    try:
        held = store.try_acquire("heavy", "p")
    finally:
        os.umask(old)
    assert held is not None
    held.release()
    assert stat.S_IMODE(os.stat(lock_path(store.directory, "heavy")).st_mode) == 0o666


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


HAMMER = """
import sys
from pathlib import Path
from safegate.locks.files import is_held, lock_path
directory = Path(sys.argv[1])
print(sum(is_held(lock_path(directory, "heavy")) for _ in range(int(sys.argv[2]))))
"""


def test_probers_do_not_see_each_other_as_holders(tmp_path: Path, procs: Procs) -> None:
    # A probe takes the flock for an instant; four processes probing a free lock in a tight loop collide
    # often, and none of them may ever report it held.
    store = store_at(tmp_path / "locks")
    store.try_acquire("heavy", "p").release()  # type: ignore[union-attr]
    hammers = [procs.spawn([sys.executable, "-c", HAMMER, str(store.directory), "1500"], stdout=subprocess.PIPE)
               for _ in range(4)]
    counts = [int(h.communicate(timeout=TIMEOUT)[0]) for h in hammers]
    assert counts == [0, 0, 0, 0]


def test_flock1_holder_excludes(tmp_path: Path, procs: Procs) -> None:
    store = store_at(tmp_path / "locks")
    holder = hold_with_flock(procs, lock_path(store.directory, "heavy"))
    assert is_held(lock_path(store.directory, "heavy"))
    assert store.try_acquire("heavy", "p") is None
    os.killpg(holder.pid, signal.SIGKILL)  # flock and its sleep child, which shares the open lock file
    holder.wait()
    held = wait_until(lambda: store.try_acquire("heavy", "p"), what="the lock to become free")
    # And safegate's hold excludes flock(1) in turn.
    assert subprocess.run(["flock", "-n", str(lock_path(store.directory, "heavy")), "true"]).returncode != 0
    held.release()
    assert subprocess.run(["flock", "-n", str(lock_path(store.directory, "heavy")), "true"]).returncode == 0


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


def test_symlinked_lock_dir_is_refused(tmp_path: Path) -> None:
    real = tmp_path / "real"
    real.mkdir()
    (tmp_path / "link").symlink_to(real)
    with pytest.raises(LockDirError, match="symlink"):
        ensure_directory(tmp_path / "link")


def test_world_writable_dir_without_sticky_is_refused(tmp_path: Path) -> None:
    d = tmp_path / "open"
    d.mkdir()
    os.chmod(d, 0o777)
    with pytest.raises(LockDirError, match="chmod \\+t"):
        ensure_directory(d)


def test_lock_dir_that_is_a_file_is_refused(tmp_path: Path) -> None:
    f = tmp_path / "file"
    f.write_text("x")
    with pytest.raises(LockDirError, match="not a directory"):
        ensure_directory(f)
    with pytest.raises(LockDirError, match="Not a directory"):
        ensure_directory(f / "sub")


def test_symlink_at_lock_path_is_refused_and_target_untouched(tmp_path: Path) -> None:
    store = store_at(tmp_path / "locks")
    victim = tmp_path / "victim"
    victim.write_text("precious")
    lock_path(store.directory, "heavy").symlink_to(victim)
    with pytest.raises(LockDirError, match="symlink"):
        store.try_acquire("heavy", "p")
    with pytest.raises(LockDirError, match="symlink"):
        is_held(lock_path(store.directory, "heavy"))
    assert victim.read_text() == "precious"


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


def test_legacy_pid_files(tmp_path: Path, procs: Procs) -> None:
    live_proc = procs.spawn(["sleep", "600"])
    live, dead, junk = tmp_path / "live.lock", tmp_path / "dead.lock", tmp_path / "junk.lock"
    live.write_text(f"{live_proc.pid}\n")
    finished = subprocess.run(["sh", "-c", "echo $$"], capture_output=True, text=True, check=True)
    dead.write_text(finished.stdout)
    junk.write_text("hello\n")
    assert read_legacy(live).alive
    dead_state = read_legacy(dead)
    assert not dead_state.alive and legacy_removable(dead_state)
    assert remove_legacy(dead_state).removed and not dead.exists()
    junk_state = read_legacy(junk)
    assert junk_state.pid is None and "does not hold a pid" in junk_state.note and not legacy_removable(junk_state)
    assert not read_legacy(tmp_path / "absent.lock").alive


def test_legacy_pid_reused_after_file_written_is_stale(tmp_path: Path, procs: Procs) -> None:
    path = tmp_path / "old.lock"
    path.write_text("1\n")  # pid 1 is alive, but started long before... so make the file older than it
    os.utime(path, (0, 0))
    assert not read_legacy(path).alive


def test_unwritable_lock_dir_as_normal_user(tmp_path: Path) -> None:
    if os.geteuid() == 0:
        pytest.skip("root ignores file modes; test_unwritable_lock_dir_as_nobody covers this as root")
    d = tmp_path / "ro"
    d.mkdir()
    os.chmod(d, 0o555)
    with pytest.raises(LockDirError, match="not writable"):
        ensure_directory(d)


def test_unwritable_lock_dir_as_nobody(nobody: Nobody) -> None:
    d = nobody.workdir / "root-only"
    d.mkdir()
    os.chmod(d, 0o755)
    code = (
        "import sys; from pathlib import Path; from safegate.locks.files import ensure_directory\n"
        "from safegate.errors import LockDirError\n"
        "try:\n    ensure_directory(Path(sys.argv[1]))\n"
        "except LockDirError as e:\n    print(e)\n"
    )
    out = nobody.run(["-c", code, str(d)])
    assert "not writable by you" in out.stdout, out.stderr


def test_foreign_0600_lock_file_is_refused_clearly(nobody: Nobody) -> None:
    d = nobody.workdir / "locks"
    d.mkdir()
    os.chmod(d, 0o1777)
    lock = d / "heavy.lock"
    lock.write_text("")
    os.chmod(lock, 0o600)  # left by another user (root) with a tight umask
    code = (
        "import sys; from pathlib import Path; from safegate.locks.store import LockStore\n"
        "from safegate.errors import LockDirError\n"
        "try:\n    LockStore(Path(sys.argv[1])).try_acquire('heavy', 'p')\n"
        "except LockDirError as e:\n    print(e)\n"
    )
    out = nobody.run(["-c", code, str(d)])
    assert "not accessible to you" in out.stdout and "0600" in out.stdout, out.stderr


def test_lock_taken_by_one_user_can_be_taken_by_another(nobody: Nobody) -> None:
    # The lock dir is shared by all users (RAM is shared): a lock file root created must work for nobody.
    d = nobody.workdir / "shared"
    store = store_at(d)
    store.try_acquire("heavy", "p").release()  # type: ignore[union-attr]
    code = (
        "import sys; from pathlib import Path; from safegate.locks.store import LockStore\n"
        "h = LockStore(Path(sys.argv[1])).try_acquire('heavy', 'p'); print('held' if h else 'busy'); h.release()\n"
    )
    out = nobody.run(["-c", code, str(d)])
    assert out.stdout.strip() == "held", out.stderr


def test_holder_json_round_trip() -> None:
    h = Holder.for_current_process("heavy", "default", ["a", "b c"])
    assert Holder.from_json(h.to_json()) == h
    assert json.loads(h.to_json())["pid"] == os.getpid()


# --- who holds a flock in the lock dir (issue 22.9: what exempts a safegate process) ----------------------------


def test_lockers_are_the_takers_of_flocks_on_files_in_the_lock_dir(tmp_path: Path, procs: Procs) -> None:
    store = store_at(tmp_path / "locks")
    inside = hold_with_flock(procs, lock_path(store.directory, "heavy"))
    dotted = hold_with_flock(procs, store.directory / ".admission.lock")
    outside = hold_with_flock(procs, tmp_path / "elsewhere.lock")
    found = dir_lockers(store.directory, lockers())
    assert {inside.pid, dotted.pid} <= found and outside.pid not in found
    assert dir_lockers(tmp_path / "absent", lockers()) == set()


_KINDS = st.sampled_from(["file", "dir", "symlink", "fifo"])


@settings(max_examples=80, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(entries=st.lists(st.tuples(_KINDS, st.sampled_from(["held", "other device", "free"])), max_size=8),
       noise=st.dictionaries(st.tuples(st.integers(0, 2**32), st.integers(0, 2**40)),
                             st.sets(st.integers(1, 2**22), min_size=1, max_size=3), max_size=6))
def test_dir_lockers_names_exactly_the_takers_of_what_is_in_the_dir(
        entries: list[tuple[str, str]], noise: dict[tuple[int, int], set[int]],
        tmp_path_factory: pytest.TempPathFactory) -> None:
    # Whatever others plant (directories, symlinks, FIFOs) and whatever /proc/locks holds besides: the pids are
    # those whose (device, inode) is that of an entry of the lock dir, no more.
    directory = tmp_path_factory.mktemp("locks")
    table = {key: set(pids) for key, pids in noise.items()}
    for i, (kind, state) in enumerate(entries):
        path = directory / f"e{i}.lock"
        if kind == "file":
            path.write_text("")
        elif kind == "dir":
            path.mkdir()
        elif kind == "symlink":
            path.symlink_to("/etc/passwd")
        else:
            os.mkfifo(path)
        st_ = os.lstat(path)
        if state == "held":
            table.setdefault((st_.st_dev, st_.st_ino), set()).add(10_000_000 + i)
        elif state == "other device":
            table.setdefault((st_.st_dev + 1, st_.st_ino), set()).add(20_000_000 + i)
    expected: set[int] = set()
    for name in os.listdir(directory):
        st_ = os.lstat(directory / name)
        expected |= table.get((st_.st_dev, st_.st_ino), set())
    assert dir_lockers(directory, table) == expected
    assert dir_lockers(directory, None) == set() and dir_lockers(directory / "absent", table) == set()


# --- a waiter's turn at its lock (issue 23.3: woken by the release, not by a backoff) ---------------------------


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
