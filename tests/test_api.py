"""The Python API, used in-process as programs use it."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time
from pathlib import Path

import pytest
from support import TIMEOUT, Procs, hold_with_flock, holder_files, meminfo_available

import safegate
from safegate.api import Blocked
from safegate.errors import ConfigError, UsageError
from safegate.exitcodes import ExitCode


@pytest.fixture(autouse=True)
def _isolated(monkeypatch: pytest.MonkeyPatch, lock_dir: Path, config: Path) -> None:
    monkeypatch.setenv("SAFEGATE_LOCK_DIR", str(lock_dir))
    monkeypatch.setenv("SAFEGATE_CONFIG", str(config))


def test_check_returns_a_verdict(lock_dir: Path, procs: Procs) -> None:
    with safegate.check(mem=0) as verdict:  # a pass holds the lock for this process until the block ends
        assert verdict.ok and verdict.exit_code is ExitCode.OK
    hold_with_flock(procs, lock_dir / "heavy.lock")
    blocked = safegate.check(mem=0)
    assert not blocked.ok and blocked.exit_code is ExitCode.LOCKED
    assert safegate.check(mem="1000T").exit_code is ExitCode.MEMORY


def test_bad_values_raise_typed_errors() -> None:
    with pytest.raises(UsageError, match="invalid size '10GG'"):
        safegate.check(mem="10GG")
    with pytest.raises(UsageError, match="must not be negative"):
        safegate.check(mem=-1)
    with pytest.raises(ConfigError, match="unknown profile"):
        safegate.check("nope")


def test_hold_holds_the_lock_for_the_block(lock_dir: Path) -> None:
    lock = lock_dir / "whisper-large.lock"
    with safegate.hold("whisper-large", mem=0) as held:
        assert held.name == "whisper-large"
        assert subprocess.run(["flock", "-n", str(lock), "true"]).returncode != 0
        assert holder_files(lock_dir, "whisper-large")
    assert subprocess.run(["flock", "-n", str(lock), "true"]).returncode == 0
    assert not holder_files(lock_dir, "whisper-large")


def test_hold_raises_blocked_with_the_verdict(lock_dir: Path, procs: Procs) -> None:
    hold_with_flock(procs, lock_dir / "heavy.lock")
    with pytest.raises(Blocked) as info, safegate.hold(wait=False, mem=0):
        pytest.fail("must not enter")
    assert info.value.exit_code is ExitCode.LOCKED and info.value.verdict.result("lock") is not None
    started = time.monotonic()
    with pytest.raises(Blocked), safegate.hold(wait=True, timeout=0.5, mem=0):
        pass
    assert time.monotonic() - started >= 0.5


def test_slots(tmp_path: Path, sensor: Path) -> None:
    assert safegate.slots(mem="1M") == 1  # the default profile has a lock: a mutex
    assert safegate.slots(mem="1M", margin="100%") == 0


def test_gate_admits_coroutines_only_as_memory_allows(monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
                                                      sensor: Path) -> None:
    # Each admitted coroutine counts as loading for 30 s (its reservation stands, it allocates nothing), so
    # the coroutines inside at once must fit in MemAvailable as read at that moment; four of 40% each never
    # fit at once (unless the machine frees 60% more meanwhile).
    need = int(meminfo_available() * 0.4)
    gate = safegate.Gate(mem=need, settle=30, poll=0.05)
    running = 0
    peak = 0
    overcommitted: list[tuple[int, int]] = []

    async def job(second_in: asyncio.Event) -> None:
        nonlocal running, peak
        async with gate:
            running += 1
            peak = max(peak, running)
            if running * need > meminfo_available():
                overcommitted.append((running, meminfo_available()))
            if running >= 2:
                second_in.set()
            elif meminfo_available() >= 2.5 * need:
                # Room for a second one now, with a wide margin: hold the slot until the gate lets it in.
                await asyncio.wait_for(second_in.wait(), TIMEOUT)
            await asyncio.sleep(0.1)
            running -= 1

    async def main() -> None:
        second_in = asyncio.Event()
        await asyncio.gather(*(job(second_in) for _ in range(4)))

    asyncio.run(main())
    assert not overcommitted, overcommitted
    assert 2 <= peak < 4


def test_gate_timeout_raises_blocked() -> None:
    gate = safegate.Gate(mem="1000T", timeout=0.3, poll=0.05)

    async def main() -> None:
        async with gate:
            pytest.fail("must not enter")

    with pytest.raises(Blocked):
        asyncio.run(main())


def test_api_is_typed_and_lazy() -> None:
    assert (Path(safegate.__file__).parent / "py.typed").exists()
    code = "import sys, safegate; print('safegate.api' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


def test_every_exception_type_lives_in_errors_and_is_exported() -> None:
    import inspect

    from safegate import errors

    defined = {name for name, obj in inspect.getmembers(errors, inspect.isclass)
               if issubclass(obj, Exception) and obj.__module__ == errors.__name__}
    assert {"SafegateError", "UsageError", "ConfigError", "Blocked"} <= defined
    for name in defined:
        assert getattr(safegate, name) is getattr(errors, name), name
        assert name in safegate.__all__
    # No exception class is defined anywhere else in the package.
    root = Path(safegate.__file__).parent
    for path in root.rglob("*.py"):
        if path.name != "errors.py":
            text = path.read_text()
            assert not [line for line in text.splitlines() if line.startswith("class ") and
                        ("Error)" in line or "Exception)" in line or "Blocked" in line)], path


def test_check_values_read_as_attributes_and_by_documented_key() -> None:
    memory = safegate.check(mem=0).result("memory")
    assert memory is not None and memory.values is not None
    assert memory.values["available"] == memory.values.available > 0  # type: ignore[index,union-attr]
    with pytest.raises(KeyError):
        memory.values["no_such_field"]  # type: ignore[index]
