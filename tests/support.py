"""The one helper module of the suite: deadline waits, real processes with cleanup, /proc readers, lock probes.

Every deadline in the suite comes from TIMEOUT. A deadline only turns a hang into a failure with a message;
no test asserts that something was fast (speed belongs to bench/), so TIMEOUT is generous, and a slow or busy
machine can raise it with SAFEGATE_TEST_TIMEOUT.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import pytest

from safegate.locks.files import ensure_directory
from safegate.locks.store import LockStore
from safegate.probes.processes import descendants as _descendants_of

REPO = Path(__file__).resolve().parent.parent
HELPERS = Path(__file__).resolve().parent / "helpers"
PY = sys.executable
TIMEOUT = float(os.environ.get("SAFEGATE_TEST_TIMEOUT", "120"))


def rss_anon(pid: int) -> int:
    """A process's anonymous resident memory in bytes (0 once it is gone): what a hog really holds."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def wait_until(condition: Callable[[], Any], timeout: float = TIMEOUT, interval: float = 0.02, what: str = "") -> Any:
    """Poll *condition* until it returns something truthy, or fail the test at the deadline."""
    deadline = time.monotonic() + timeout
    while True:
        result = condition()
        if result:
            return result
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout}s waiting for {what or condition}")
        time.sleep(interval)


# --- /proc readers ---------------------------------------------------------------------------------------


def cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def _stat_fields(pid: int) -> list[str]:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return []


def ppid(pid: int) -> int:
    fields = _stat_fields(pid)
    return int(fields[1]) if len(fields) > 1 else -1


def proc_state(pid: int) -> str:
    """The one-letter state in /proc/PID/stat (R, S, T, Z, ...), or '?' when the process is gone."""
    fields = _stat_fields(pid)
    return fields[0] if fields else "?"


def alive(pid: int) -> bool:
    """Running, sleeping or stopped; a zombie is not alive."""
    return proc_state(pid) not in ("?", "Z", "X")


def parent_map() -> dict[int, int]:
    parents: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            parents[int(entry.name)] = ppid(int(entry.name))
    return parents


def descendants(roots: Iterable[int]) -> set[int]:
    """Every live descendant of *roots*, by safegate's own walk over a fresh pid -> ppid map."""
    return _descendants_of(roots, parent_map())


def pids_with(marker: str, roots: Iterable[int] | None = None) -> list[int]:
    """Live processes whose command line contains *marker* (a token unique to the test), optionally only
    those descending from *roots*."""
    scope = None if roots is None else descendants(roots)
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and (scope is None or int(entry.name) in scope):
            pid = int(entry.name)
            if pid != os.getpid() and marker in cmdline(pid):
                found.append(pid)
    return found


def meminfo(key: str) -> int:
    """A /proc/meminfo figure (MemTotal, MemAvailable, ...) now, in bytes."""
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith(f"{key}:"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no {key} in /proc/meminfo")


def meminfo_available() -> int:
    """MemAvailable now, in bytes. Read it at the moment a test sizes something, and leave wide margins."""
    return meminfo("MemAvailable")


# --- locks -----------------------------------------------------------------------------------------------


def lock_free(path: Path) -> bool:
    """Whether flock(1) could take *path* right now (it is released again at once)."""
    return subprocess.run(["flock", "-n", str(path), "true"]).returncode == 0


def holder_files(lock_dir: Path, lock: str = "heavy") -> list[Path]:
    """The holder metadata files of *lock*: one per holder (<lock>.holder-<token>.json), and the
    one-per-lock <lock>.holder.json older safegates wrote."""
    return sorted([*lock_dir.glob(f"{lock}.holder-*.json"), *lock_dir.glob(f"{lock}.holder.json")])


def job_pid(lock_dir: Path, lock: str = "heavy") -> int | None:
    """The job pid a safegate exec recorded for *lock*, once the job has started."""
    for path in holder_files(lock_dir, lock):
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        pid = data.get("job_pid") if isinstance(data, dict) else None
        if pid:
            return int(pid)
    return None


# --- processes a test starts -----------------------------------------------------------------------------


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

    def spawn_named(self, name: str, seconds: int = 600, user: str | None = None) -> subprocess.Popen[bytes]:
        """A sleeping process whose /proc cmdline reads '<name> <seconds>' (argv[0] set by exec -a),
        run as *user* when given (through runuser: the process itself is that user's)."""
        prefix = ["runuser", "-u", user, "--"] if user else []
        proc = self.spawn([*prefix, "bash", "-c", f'exec -a "$0" sleep {seconds}', name])
        if user:
            pid = wait_until(lambda: next((p for p in descendants([proc.pid]) if cmdline(p).startswith(name)), 0),
                             what=f"{name!r} to appear in /proc")
            self.orphans.append(pid)
            proc.named_pid = pid  # type: ignore[attr-defined]
        else:
            wait_until(lambda: cmdline(proc.pid).startswith(name), what=f"{name!r} to appear in /proc")
        return proc

    def spawn_orphan(self, name: str, seconds: int = 600) -> int:
        """Like spawn_named, but reparented away from this process, so it is not our descendant."""
        pid = self.spawn_orphan_argv(["bash", "-c", f'exec -a "$0" sleep {seconds}', name])
        wait_until(lambda: cmdline(pid).startswith(name), what=f"{name!r} to appear in /proc")
        return pid

    def spawn_orphan_argv(self, argv: list[str], env: dict[str, str] | None = None) -> int:
        """Start *argv* through a subshell that exits at once, so init (or a subreaper) adopts it."""
        out = subprocess.run(
            ["bash", "-c", '("$@" >/dev/null 2>&1 </dev/null & echo $!)', "orphan", *argv],
            capture_output=True, text=True, check=True, env=env,
        ).stdout
        pid = int(out.strip())
        self.orphans.append(pid)
        # The subshell has exited: the process is someone else's child now, not ours.
        assert alive(pid) and pid not in descendants([os.getpid()]), f"orphan {pid} not adopted"
        return pid

    def kill_all(self) -> None:
        # A job runs in its own process group and outlives a SIGKILLed safegate by design: take every
        # descendant (and its group) of what the test started, before killing the roots. Only pids this
        # test started or that descend from them are ever signalled.
        roots = [p.pid for p in self.started if p.poll() is None] + self.orphans
        leftovers = sorted(descendants(roots)) + [p for p in self.orphans if alive(p)]
        for pid in leftovers:
            for kill in (os.killpg, os.kill):
                try:
                    kill(pid, signal.SIGKILL)
                except (ProcessLookupError, PermissionError):
                    pass
        for proc in self.started:
            if proc.poll() is None:
                try:
                    os.killpg(proc.pid, signal.SIGKILL)
                except (ProcessLookupError, PermissionError):
                    pass
                try:
                    proc.kill()
                except ProcessLookupError:
                    pass
            try:
                proc.wait(timeout=TIMEOUT)
            except subprocess.TimeoutExpired:
                pass


def stderr_of(proc: subprocess.Popen[str]) -> str:
    """*proc*'s stderr once it has ended; at the deadline it is killed (and the test fails on TimeoutExpired)."""
    try:
        return proc.communicate(timeout=TIMEOUT)[1]
    finally:
        if proc.poll() is None:
            proc.kill()  # for an unshare(1) wrapper, its namespace goes with it
            proc.wait()


def hold_with_flock(procs: Procs, path: Path) -> subprocess.Popen[bytes]:
    """A real flock(1) holder of *path*; returns once the lock is observably held."""
    path.parent.mkdir(parents=True, exist_ok=True)
    proc = procs.spawn(["flock", str(path), "sleep", "600"])
    wait_until(lambda: not lock_free(path), what="flock holder")
    return proc


def store_at(path: Path) -> LockStore:
    """The lock store in *path*, the directory made as safegate makes it (1777)."""
    store = LockStore(path)
    ensure_directory(store.directory)
    return store


HOLDER_SCRIPT = """
import sys, time
from pathlib import Path
from safegate.locks.store import LockStore
need = int(sys.argv[4]) if len(sys.argv) > 4 else 0
held = LockStore(Path(sys.argv[1])).try_acquire(sys.argv[2], sys.argv[3], need=need)
print("held" if held else "busy", flush=True)
time.sleep(600)
"""


def hold_with_safegate(procs: Procs, lock_dir: Path, name: str, profile: str = "test",
                       need: int = 0) -> subprocess.Popen[bytes]:
    """A real process holding *name* through safegate's lock store (flock + holder metadata), reserving
    *need* bytes the way a job still loading its model does."""
    lock_dir.mkdir(parents=True, exist_ok=True)
    os.chmod(lock_dir, 0o1777)
    proc = procs.spawn([PY, "-c", HOLDER_SCRIPT, str(lock_dir), name, profile, str(need)],
                       stdout=subprocess.PIPE)
    assert proc.stdout is not None
    assert proc.stdout.readline().strip() == b"held"
    return proc


# --- configuration and the CLI ---------------------------------------------------------------------------


def post_ticket(lock_dir: Path, pid: int, *, need: int, lock: str | None = None, profile: str = "earlier",
                user: str = "root", blocked_by: str = "memory", reason: str = "memory: short",
                memory_only: bool = True) -> Path:
    """A ticket in line for live process *pid*, as a waiter (or anyone running as its user) writes it: the state
    first, then the place, created now (its place in line is the kernel's time on the file)."""
    start = _stat_fields(pid)[19]
    base = lock_dir / f".ticket.{pid}.{start}"
    lock_dir.mkdir(parents=True, exist_ok=True)
    Path(f"{base}.state").write_text(json.dumps({"blocked_by": blocked_by, "reason": reason,
                                                  "memory_only": memory_only}))
    place = Path(f"{base}.json")
    place.write_text(json.dumps({"user": user, "lock": lock, "profile": profile, "need": need}))
    return place


def set_temp(path: Path, celsius: float) -> None:
    tmp = path.with_suffix(".new")
    tmp.write_text(f"{int(celsius * 1000)}\n")
    tmp.replace(path)


def neutral_config(sensor: Path, extra: str = "") -> str:
    """A config that takes the machine out of the verdict: no margin, no pressure limit, no system floor for
    exec (tests of the floor set --min-available relative to MemAvailable), only our sensor, and no competing
    rule (a test that wants one writes a rule matching only processes it started). Jobs run as their process
    tree (cgroup off), whose behaviour these tests pin; tests/test_cgroup.py runs them in cgroups."""
    return (
        "[defaults]\n"
        'memory_margin = "0"\n'
        'cgroup = "off"\n'
        'min_available = "0"\n'
        "max_memory_pressure = 100\n"
        "competing = []\n"
        "[thermal]\n"
        "sensors = []\n"
        f"files = [{json.dumps(str(sensor))}]\n" + extra
    )


# A shell of its own for each command, as users run it: a passing check grants to its parent's next process
# (issue 23), and a parent that starts nothing after it ends the grant by exiting. Run straight from the test
# process, one check's grant would go to the test's next command, which then ran inside it.
ALONE = ["sh", "-c", '"$@"; exit $?', "sh"]


class Run:
    def __init__(self, env: dict[str, str]) -> None:
        self.env = env

    def __call__(self, *args: str, timeout: float = TIMEOUT, **kwargs: Any) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [*ALONE, PY, "-m", "safegate", *args],
            env=kwargs.pop("env", self.env),
            capture_output=True,
            text=True,
            timeout=timeout,
            stdin=kwargs.pop("stdin", subprocess.DEVNULL),
            **kwargs,
        )


class Nobody:
    """Runs Python as the unprivileged user 'nobody' (root ignores file modes, so permission tests need it)."""

    def __init__(self, python: str, pythonpath: str, workdir: Path) -> None:
        self.python = python
        self.pythonpath = pythonpath
        self.workdir = workdir  # a directory nobody can reach, unlike pytest's 0700 tmp_path

    def run(self, args: list[str], env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
        full_env = dict(env or {})
        full_env.update(
            PYTHONPATH=self.pythonpath, PATH=os.environ.get("PATH", "/usr/bin:/bin"), HOME=str(self.workdir),
            SAFEGATE_GPU="none",  # as for every test: a real GPU must not enter the verdict
        )
        return subprocess.run(
            ["runuser", "-u", "nobody", "--", "env", *[f"{k}={v}" for k, v in full_env.items()], self.python, *args],
            capture_output=True, text=True, timeout=TIMEOUT, stdin=subprocess.DEVNULL,
        )


# --- observing reads -------------------------------------------------------------------------------------


class OpenWatch:
    """Counts the times a file is opened from now on (inotify IN_OPEN), so a negative check can wait for a
    positive event: "safegate has read the sensor twice since it changed" instead of a bare sleep.

    Watch the path after the content it must see is in place: set_temp and write_state replace the file, and
    the watch follows the inode it was added on."""

    _IN_OPEN = 0x20
    _IN_NONBLOCK = 0o4000

    def __init__(self, path: Path) -> None:
        import ctypes
        import ctypes.util

        self._libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        self._fd = self._libc.inotify_init1(self._IN_NONBLOCK)
        if self._fd < 0:
            raise OSError(ctypes.get_errno(), "inotify_init1")
        if self._libc.inotify_add_watch(self._fd, os.fsencode(path), self._IN_OPEN) < 0:
            err = ctypes.get_errno()
            os.close(self._fd)
            raise OSError(err, f"inotify_add_watch {path}")
        self.count = 0

    def opens(self) -> int:
        """How many opens have been seen so far."""
        while True:
            try:
                data = os.read(self._fd, 4096)
            except BlockingIOError:
                return self.count
            # struct inotify_event: wd, mask, cookie, len (4 x 4 bytes), then len bytes of name (0 here).
            offset = 0
            while offset + 16 <= len(data):
                name_len = int.from_bytes(data[offset + 12: offset + 16], sys.byteorder)
                self.count += 1
                offset += 16 + name_len

    def wait_for(self, opens: int, what: str) -> None:
        wait_until(lambda: self.opens() >= opens, what=f"{what} ({opens} opens)")

    def close(self) -> None:
        os.close(self._fd)

    def __enter__(self) -> OpenWatch:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class Pty:
    """A real terminal: *argv* runs as the session leader with a new pty as its controlling terminal, as a login
    shell does; the test types into the master side and reads what the terminal shows."""

    def __init__(self, procs: Procs, argv: list[str], env: dict[str, str]) -> None:
        import fcntl
        import termios

        self.master, slave = os.openpty()
        self.seen = b""

        def take_terminal() -> None:  # in the child, after setsid: the pty becomes its controlling terminal
            fcntl.ioctl(0, termios.TIOCSCTTY, 0)

        self.proc = procs.spawn(argv, env=env, stdin=slave, stdout=slave, stderr=slave, start_new_session=True,
                                preexec_fn=take_terminal)
        os.close(slave)

    def send(self, text: str) -> None:
        os.write(self.master, text.encode())

    def _read(self) -> bool:
        import select

        ready, _, _ = select.select([self.master], [], [], 0.05)
        if ready:
            try:
                chunk = os.read(self.master, 65536)
            except OSError:  # EIO: every process of the terminal is gone
                return False
            self.seen += chunk
            return bool(chunk)
        return True

    def expect(self, text: str, what: str = "") -> str:
        """Read until *text* has appeared since the last expect(); what the terminal showed up to it."""
        needle = text.encode()

        def shown() -> bool:
            if needle not in self.seen:
                self._read()
            return needle in self.seen

        wait_until(shown, what=what or f"{text!r} on the terminal (so far: {self.seen[-400:]!r})")
        before, _, self.seen = self.seen.partition(needle)
        return (before + needle).decode(errors="replace")

    def wait(self) -> int:
        """The session leader's exit status, reading the terminal meanwhile so nothing blocks on a full pty."""
        wait_until(lambda: self._read() is not None and self.proc.poll() is not None, what="the terminal's process")
        return self.proc.wait()

    def close(self) -> None:
        os.close(self.master)


class Shared:
    """A real 1777 lock dir both users reach, a config both can read, and the CLI as either user."""

    def __init__(self, nobody: Nobody, run: Run) -> None:
        self.nobody = nobody
        self.root_run = run
        self.dir = nobody.workdir / "locks"
        self.dir.mkdir()
        os.chmod(self.dir, 0o1777)
        sensor = nobody.workdir / "temp1_input"
        sensor.write_text("40000\n")
        self.config = nobody.workdir / "config.toml"
        self.config.write_text(neutral_config(sensor))
        os.chmod(self.config, 0o644)
        self.env = {**run.env, "SAFEGATE_LOCK_DIR": str(self.dir)}

    def root(self, *args: str) -> subprocess.CompletedProcess[str]:
        return self.root_run(*args, "--config", str(self.config), env=self.env) if args[0] != "exec" else \
            self.root_run("exec", "--config", str(self.config), *args[1:], env=self.env)

    def as_nobody(self, *args: str) -> subprocess.CompletedProcess[str]:
        argv = [*args, "--config", str(self.config)] if args[0] != "exec" else \
            ["exec", "--config", str(self.config), *args[1:]]
        return self.nobody.run(["-m", "safegate", *argv], env={"SAFEGATE_LOCK_DIR": str(self.dir)})

    def plant_as_nobody(self, name: str, content: str) -> None:
        code = "import sys; open(sys.argv[1], 'x').write(sys.argv[2])"
        out = self.nobody.run(["-c", code, str(self.dir / name), content])
        assert out.returncode == 0, out.stderr
