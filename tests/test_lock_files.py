"""The lock dir and its lock files (safegate.locks.files) against real holders: flock(1), other safegate
processes, other users, hostile files."""

from __future__ import annotations

import os
import signal
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from support import TIMEOUT, Nobody, Procs, hold_with_flock, store_at, wait_until

from safegate.errors import LockDirError
from safegate.locks.files import dir_lockers, ensure_directory, is_held, lock_path, lockers


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
