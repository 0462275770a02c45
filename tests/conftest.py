"""Shared fixtures: isolated environments, real child processes with guaranteed cleanup, deadline waits."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parent.parent


def wait_until(condition: Callable[[], Any], timeout: float = 10.0, interval: float = 0.02, what: str = "") -> Any:
    """Poll *condition* until it returns something truthy, or fail the test at the deadline."""
    deadline = time.monotonic() + timeout
    while True:
        result = condition()
        if result:
            return result
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout}s waiting for {what or condition}")
        time.sleep(interval)


class Procs:
    """Starts real processes for a test and kills every one of them (and their groups) afterwards."""

    def __init__(self) -> None:
        self.started: list[subprocess.Popen[bytes]] = []
        self.orphans: list[int] = []

    def spawn(self, argv: list[str], **kwargs: Any) -> subprocess.Popen[bytes]:
        kwargs.setdefault("stdin", subprocess.DEVNULL)
        kwargs.setdefault("start_new_session", True)
        proc = subprocess.Popen(argv, **kwargs)
        self.started.append(proc)
        return proc

    def spawn_named(self, cmdline: str, seconds: int = 600) -> subprocess.Popen[bytes]:
        """A sleeping process whose /proc cmdline reads '<cmdline> <seconds>' (argv[0] set by exec -a)."""
        proc = self.spawn(["bash", "-c", f'exec -a "$0" sleep {seconds}', cmdline])
        wait_until(lambda: _cmdline(proc.pid).startswith(cmdline), what=f"{cmdline!r} to appear in /proc")
        return proc

    def spawn_orphan(self, cmdline: str, seconds: int = 600) -> int:
        """Like spawn_named, but reparented away from this process, so it is not our descendant."""
        pid = self.spawn_orphan_argv(["bash", "-c", f'exec -a "$0" sleep {seconds}', cmdline])
        wait_until(lambda: _cmdline(pid).startswith(cmdline), what=f"{cmdline!r} to appear in /proc")
        return pid

    def spawn_orphan_argv(self, argv: list[str], env: dict[str, str] | None = None) -> int:
        """Start *argv* through a subshell that exits at once, so init (or a subreaper) adopts it."""
        out = subprocess.run(
            ["bash", "-c", '("$@" >/dev/null 2>&1 </dev/null & echo $!)', "orphan", *argv],
            capture_output=True, text=True, check=True, env=env,
        ).stdout
        pid = int(out.strip())
        self.orphans.append(pid)
        wait_until(lambda: _ppid(pid) not in (-1, os.getpid()), what="orphan to be adopted")
        return pid

    def kill_all(self) -> None:
        # A job runs in its own process group and outlives a SIGKILLed safegate by design: take every
        # descendant (and its group) of what the test started, before killing the roots.
        leftovers = _descendants([p.pid for p in self.started if p.poll() is None] + self.orphans)
        for pid in leftovers:
            for kill in (os.killpg, os.kill):
                try:
                    kill(pid, signal.SIGKILL)
                except (ProcessLookupError, PermissionError):
                    pass
        for pid in self.orphans:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        for proc in self.started:
            if proc.poll() is None:
                try:
                    os.killpg(proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                try:
                    proc.kill()
                except ProcessLookupError:
                    pass
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                pass


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


def _descendants(roots: list[int]) -> list[int]:
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            parent = _ppid(int(entry.name))
            children.setdefault(parent, []).append(int(entry.name))
    found: list[int] = []
    stack = list(roots)
    while stack:
        for child in children.get(stack.pop(), []):
            if child not in found:
                found.append(child)
                stack.append(child)
    return found


def _ppid(pid: int) -> int:
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
    except (OSError, IndexError, ValueError):
        return -1


@pytest.fixture
def procs() -> Iterator[Procs]:
    p = Procs()
    try:
        yield p
    finally:
        p.kill_all()


@pytest.fixture
def lock_dir(tmp_path: Path) -> Path:
    d = tmp_path / "locks"
    return d


@pytest.fixture
def sensor(tmp_path: Path) -> Path:
    """A fake sysfs temperature file in millidegrees, starting cool."""
    path = tmp_path / "temp1_input"
    path.write_text("40000\n")
    return path


def set_temp(path: Path, celsius: float) -> None:
    tmp = path.with_suffix(".new")
    tmp.write_text(f"{int(celsius * 1000)}\n")
    tmp.replace(path)


def neutral_config(sensor: Path, extra: str = "") -> str:
    """A config that takes the machine out of the verdict: no margin, no pressure limit, only our sensor."""
    return (
        "[defaults]\n"
        'memory_margin = "0"\n'
        "max_memory_pressure = 100\n"
        "[thermal]\n"
        "sensors = []\n"
        f"files = [{json.dumps(str(sensor))}]\n" + extra
    )


@pytest.fixture
def config(tmp_path: Path, sensor: Path) -> Path:
    path = tmp_path / "config.toml"
    path.write_text(neutral_config(sensor))
    return path


@pytest.fixture
def env(tmp_path: Path, lock_dir: Path) -> dict[str, str]:
    """An environment that shares nothing with the user's: own HOME, XDG dirs and lock dir."""
    e = {k: v for k, v in os.environ.items() if not k.startswith("SAFEGATE_")}
    home = tmp_path / "home"
    home.mkdir(exist_ok=True)
    e.update(
        HOME=str(home),
        XDG_CONFIG_HOME=str(home / ".config"),
        XDG_STATE_HOME=str(home / ".local/state"),
        SAFEGATE_LOCK_DIR=str(lock_dir),
        PYTHONDONTWRITEBYTECODE="1",
    )
    return e


class Run:
    def __init__(self, env: dict[str, str]) -> None:
        self.env = env

    def __call__(self, *args: str, timeout: float = 60, **kwargs: Any) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "safegate", *args],
            env=kwargs.pop("env", self.env),
            capture_output=True,
            text=True,
            timeout=timeout,
            stdin=subprocess.DEVNULL,
            **kwargs,
        )


@pytest.fixture
def run(env: dict[str, str]) -> Run:
    """Run the real CLI in a subprocess, as users and scripts do."""
    return Run(env)


def hold_with_flock(procs: Procs, path: Path) -> subprocess.Popen[bytes]:
    """A real flock(1) holder of *path*; returns once the lock is observably held."""
    path.parent.mkdir(parents=True, exist_ok=True)
    proc = procs.spawn(["flock", str(path), "sleep", "600"])
    wait_until(lambda: subprocess.run(["flock", "-n", str(path), "true"]).returncode != 0, what="flock holder")
    return proc


HOLDER_SCRIPT = """
import sys, time
from pathlib import Path
from safegate.lockstore import LockStore
held = LockStore(Path(sys.argv[1])).try_acquire(sys.argv[2], sys.argv[3])
print("held" if held else "busy", flush=True)
time.sleep(600)
"""


def hold_with_safegate(procs: Procs, lock_dir: Path, name: str, profile: str = "test") -> subprocess.Popen[bytes]:
    """A real process holding *name* through safegate's lock store (flock + holder metadata)."""
    lock_dir.mkdir(parents=True, exist_ok=True)
    os.chmod(lock_dir, 0o1777)
    proc = procs.spawn([sys.executable, "-c", HOLDER_SCRIPT, str(lock_dir), name, profile], stdout=subprocess.PIPE)
    assert proc.stdout is not None
    assert proc.stdout.readline().strip() == b"held"
    return proc


class Nobody:
    """Runs Python as the unprivileged user 'nobody' (root ignores file modes, so permission tests need it)."""

    def __init__(self, python: str, pythonpath: str, workdir: Path) -> None:
        self.python = python
        self.pythonpath = pythonpath
        self.workdir = workdir  # a directory nobody can reach, unlike pytest's 0700 tmp_path

    def run(self, args: list[str], env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
        full_env = dict(env or {})
        full_env.update(
            PYTHONPATH=self.pythonpath, PATH=os.environ.get("PATH", "/usr/bin:/bin"), HOME=str(self.workdir)
        )
        return subprocess.run(
            ["runuser", "-u", "nobody", "--", "env", *[f"{k}={v}" for k, v in full_env.items()], self.python, *args],
            capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL,
        )


@pytest.fixture
def nobody() -> Iterator[Nobody]:
    import shutil
    import sysconfig
    import tempfile

    if os.geteuid() != 0:
        pytest.skip("needs root to switch to user nobody (as a normal user, the plain permission test runs)")
    if shutil.which("runuser") is None:
        pytest.skip("runuser is not installed")
    paths = {str(REPO), sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]}
    pythonpath = os.pathsep.join(sorted(paths))
    workdir = Path(tempfile.mkdtemp(prefix="safegate-nobody-"))
    os.chmod(workdir, 0o755)
    try:
        last = ""
        for python in (os.path.realpath(sys.executable), f"/usr/bin/python{sys.version_info[0]}.{sys.version_info[1]}"):
            helper = Nobody(python, pythonpath, workdir)
            probe = helper.run(["-c", "import safegate.cli"])
            if probe.returncode == 0:
                yield helper
                return
            last = probe.stderr.strip().splitlines()[-1:] or [""]
            last = f"{python}: {last[0]}"
        pytest.skip(f"user nobody cannot run safegate from this checkout ({last[:200]})")
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
