"""Read-only entry points leave the lock dir byte for byte as they found it; only check and admission clean up.

slots, status, locks, slurm health and the asyncio Gate's polls only read. `check` (command line and
safegate.check) removes stale files and reports them, as the README promises.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable
from pathlib import Path

import pytest
from support import Run, neutral_config

import safegate
from safegate.api import Blocked
from safegate.locks.files import ensure_directory, holder_path, lock_path
from safegate.locks.holders import Holder, write_holder
from safegate.locks.store import LockStore

DEAD_PID = 2**22  # pid_max is at most 2**22, so pids end below it: no process has this one


def snapshot(*paths: Path) -> dict[str, tuple[int, int, bytes | None]]:
    """Every file under *paths* (and the directories themselves): mode, mtime in ns, and content."""
    seen: dict[str, tuple[int, int, bytes | None]] = {}
    for root in paths:
        if not os.path.lexists(root):
            continue
        entries = [root, *sorted(root.iterdir())] if root.is_dir() else [root]
        for path in entries:
            st = path.lstat()
            seen[str(path)] = (st.st_mode, st.st_mtime_ns, None if path.is_dir() else path.read_bytes())
    return seen


@pytest.fixture
def legacy(tmp_path: Path) -> Path:
    path = tmp_path / "legacy" / "whisper.pid"
    path.parent.mkdir()
    path.write_text(f"{DEAD_PID}\n")
    return path


@pytest.fixture
def cfg(tmp_path: Path, sensor: Path, legacy: Path) -> Path:
    path = tmp_path / "read-only.toml"
    # The built-in whisper profile's own competing rule is lifted too: another user's Whisper on the machine
    # must not decide these tests (slots exits with the blocking code then).
    path.write_text(f'legacy_lock_files = ["{legacy}"]\n' + neutral_config(sensor)
                    + '[profiles.whisper-large-v3]\ncompeting = []\n')
    return path


@pytest.fixture
def stale(lock_dir: Path) -> LockStore:
    """A lock dir holding what check would remove: a dead holder's metadata and corrupt metadata."""
    store = LockStore(lock_dir)
    ensure_directory(store.directory)
    held = store.try_acquire("heavy", "p")
    assert held is not None
    held.release()
    write_holder(store.directory, Holder(pid=DEAD_PID, start_time=1.0, user="u", host="h", cmdline=["whisper"],
                                         started_at=1.0, profile="p", lock="heavy"))
    holder_path(store.directory, "junk").write_bytes(b"{trunc")
    return store


def _env(env: dict[str, str], tmp_path: Path) -> dict[str, str]:
    # slurm health asks scontrol, which rejects an empty slurm.conf at once instead of looking for a cluster.
    (tmp_path / "slurm.conf").write_text("")
    return {**env, "SLURM_CONF": str(tmp_path / "slurm.conf")}


READ_ONLY_COMMANDS = [
    ["slots"],
    ["slots", "-p", "whisper-large-v3", "--mem", "0"],
    ["status"],
    ["status", "--json"],
    ["locks"],
    ["locks", "--json"],
    ["slurm", "health", "--dry-run", "--node", "n01"],
]


def _gate_enters() -> None:
    async def main() -> None:
        async with safegate.Gate(mem=0):
            pass

    asyncio.run(main())


def _gate_polls_until_timeout() -> None:
    async def main() -> None:
        async with safegate.Gate(mem="1000T", timeout=0.2, poll=0.02):
            pytest.fail("must not enter")

    with pytest.raises(Blocked) as info:
        asyncio.run(main())
    stale_locks = info.value.verdict.result("stale_locks")
    assert stale_locks is not None and stale_locks.values.removed == ()
    assert "read-only" in stale_locks.reason


READ_ONLY_CALLS: dict[str, Callable[[], object]] = {
    "safegate.slots": lambda: safegate.slots(mem=0),
    "safegate.slots with a lock": lambda: safegate.slots("whisper-large-v3", mem=0),
    "Gate entering": _gate_enters,
    "Gate polling": _gate_polls_until_timeout,
}


@pytest.mark.parametrize("args", READ_ONLY_COMMANDS, ids=" ".join)
def test_read_only_commands_leave_stale_files_alone(args: list[str], run: Run, cfg: Path, stale: LockStore,
                                                   legacy: Path, env: dict[str, str], tmp_path: Path) -> None:
    before = snapshot(stale.directory, legacy)
    result = run(*args, "--config", str(cfg), env=_env(env, tmp_path))
    assert "Traceback" not in result.stderr, result.stderr
    assert result.returncode == 0, result.stderr
    assert snapshot(stale.directory, legacy) == before


@pytest.mark.parametrize("args", READ_ONLY_COMMANDS, ids=" ".join)
def test_read_only_commands_do_not_create_the_lock_dir(args: list[str], run: Run, cfg: Path, lock_dir: Path,
                                                      env: dict[str, str], tmp_path: Path) -> None:
    assert not os.path.lexists(lock_dir)
    result = run(*args, "--config", str(cfg), env=_env(env, tmp_path))
    assert "Traceback" not in result.stderr, result.stderr
    assert result.returncode == 0, result.stderr  # an absent lock dir reads as an empty one
    assert not os.path.lexists(lock_dir)


@pytest.mark.parametrize("call", READ_ONLY_CALLS.values(), ids=READ_ONLY_CALLS.keys())
def test_read_only_api_leaves_stale_files_alone(call: Callable[[], object], monkeypatch: pytest.MonkeyPatch,
                                                cfg: Path, stale: LockStore, legacy: Path) -> None:
    monkeypatch.setenv("SAFEGATE_CONFIG", str(cfg))
    before = snapshot(stale.directory, legacy)
    call()
    assert snapshot(stale.directory, legacy) == before


@pytest.mark.parametrize("call", READ_ONLY_CALLS.values(), ids=READ_ONLY_CALLS.keys())
def test_read_only_api_does_not_create_the_lock_dir(call: Callable[[], object], monkeypatch: pytest.MonkeyPatch,
                                                    cfg: Path, lock_dir: Path) -> None:
    monkeypatch.setenv("SAFEGATE_CONFIG", str(cfg))
    call()
    assert not os.path.lexists(lock_dir)


def test_read_only_commands_still_refuse_an_unsafe_lock_dir(run: Run, cfg: Path, env: dict[str, str],
                                                             tmp_path: Path) -> None:
    open_dir = tmp_path / "open"
    open_dir.mkdir()
    os.chmod(open_dir, 0o777)
    result = run("slots", "--config", str(cfg), env={**env, "SAFEGATE_LOCK_DIR": str(open_dir)})
    assert result.returncode == 3 and "without the sticky bit" in result.stderr


def test_check_cleans_what_read_only_commands_left(run: Run, cfg: Path, stale: LockStore, legacy: Path) -> None:
    result = run("check", "--config", str(cfg), "--mem", "0")
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"removed stale holder of lock 'heavy': pid {DEAD_PID}" in result.stdout
    assert "unusable holder metadata of lock 'junk'" in result.stdout
    assert "stale legacy lock file" in result.stdout
    assert not holder_path(stale.directory, "heavy").exists() and not holder_path(stale.directory, "junk").exists()
    assert not legacy.exists()
    assert lock_path(stale.directory, "heavy").exists()  # never the lock file itself


def test_api_check_cleans_and_reports(monkeypatch: pytest.MonkeyPatch, cfg: Path, stale: LockStore,
                                      legacy: Path) -> None:
    monkeypatch.setenv("SAFEGATE_CONFIG", str(cfg))
    verdict = safegate.check(mem=0)
    stale_locks = verdict.result("stale_locks")
    assert verdict.ok and stale_locks is not None
    assert sorted(r.removed for r in stale_locks.values.removed) == [True, True, True]
    assert not holder_path(stale.directory, "heavy").exists() and not legacy.exists()


def test_check_creates_an_absent_lock_dir(monkeypatch: pytest.MonkeyPatch, cfg: Path, lock_dir: Path) -> None:
    monkeypatch.setenv("SAFEGATE_CONFIG", str(cfg))
    assert safegate.check(mem=0).ok
    assert lock_dir.is_dir()
