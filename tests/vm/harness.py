"""Run commands inside the test VM (systemd as PID 1, cgroup v2) and get their output and exit codes back.

    from vm.harness import Scenario, vm_run
    results = vm_run(["cat /proc/1/comm", Scenario("id -u", user="tester")])

One boot runs every scenario given, in order (a boot costs about 8 s and code runs 10-60x slower under TCG, so
batch). The repo checkout is shared read-only over 9p at its own absolute path, so a venv made on the host with
/usr/bin/python3 runs inside as it is. Each boot starts from the same clean image (qemu -snapshot). Only one
QEMU of this harness runs at a time on the machine (a lock in the cache dir); it is killed if it outlives its
deadline, and its temporary output dir is removed.

`require_vm()` builds the VM (cached; see build.py) or skips the calling test with the reason it cannot be had;
it also skips unless SAFEGATE_VM_TESTS=1 (opt-in: a cold build takes minutes).
Run as a script for a manual look: `python3 tests/vm/harness.py 'cat /proc/self/cgroup' -u tester`.
"""

from __future__ import annotations

import argparse
import fcntl
import os
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

try:
    from . import build as _build
except ImportError:  # run as a script
    import build as _build  # type: ignore[no-redef]

REPO = Path(__file__).resolve().parents[2]
TESTER = _build.TESTER
# Opt-in: the suite's plain `pytest` (and so CI) runs the VM tests only with SAFEGATE_VM_TESTS=1, since a cold build
# takes minutes. Read at import: the suite's hermetic fixture clears SAFEGATE_* variables for each test.
ENABLED = os.environ.get("SAFEGATE_VM_TESTS", "") not in ("", "0")
BOOT_TIMEOUT = float(os.environ.get("SAFEGATE_VM_BOOT_TIMEOUT", "300"))  # boot + poweroff, beyond the scenarios


class VMError(Exception):
    """The VM booted but did not run the scenarios to the end (crash, timeout); carries the console's tail."""


@dataclass
class Scenario:
    command: str
    user: str | None = None  # None: root; else a user of the guest, e.g. TESTER (with its systemd user instance)
    timeout: float = 120.0
    cwd: str | None = None
    env: dict[str, str] = field(default_factory=dict)


@dataclass
class Result:
    command: str
    user: str | None
    rc: int | None  # None: never ran (the VM died first); 124/137: killed by the scenario's timeout
    stdout: str
    stderr: str
    seconds: float | None  # guest time the scenario took

    def check(self) -> Result:
        assert self.rc == 0, f"{self.command!r} as {self.user or 'root'}: rc {self.rc}\n{self.stdout}\n{self.stderr}"
        return self


@dataclass
class Boot:
    results: list[Result]
    console: str
    ready: float | None  # guest uptime when the first scenario could start
    wall: float  # host seconds from starting QEMU to its exit


def require_vm() -> _build.Artefacts:
    """The VM's artefacts (built or cached), or pytest.skip with the reason the VM cannot be had here."""
    import pytest

    if not ENABLED:
        pytest.skip("VM tests are opt-in: set SAFEGATE_VM_TESTS=1 (a cold VM build takes about 2 minutes)")
    if sys.platform != "linux":
        pytest.skip("the test VM needs a Linux host")
    try:
        return _build.build()
    except _build.Unavailable as e:
        pytest.skip(f"test VM unavailable: {e}")


def guest_venv() -> Path:
    """A venv the guest's /usr/bin/python3 runs (the host's Debian python3 is the same), holding safegate's
    dependencies but not safegate (run it with PYTHONPATH at the shared checkout). Cached per pyproject.toml;
    pytest.skip with the reason when it cannot be made."""
    import hashlib

    import pytest

    py = Path("/usr/bin/python3")
    key = hashlib.sha256((REPO / "pyproject.toml").read_bytes()).hexdigest()[:12]
    venv = _build.CACHE / f"guest-venv-{key}"
    if (venv / "ready").exists():
        return venv
    if not py.exists():
        pytest.skip("no /usr/bin/python3 on the host to make the guest's venv with")
    shutil.rmtree(venv, ignore_errors=True)
    site = venv / "lib" / "python3.11" / "site-packages"
    try:
        subprocess.run([str(py), "-m", "venv", "--without-pip", str(venv)], check=True, capture_output=True,
                       timeout=120)
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--target", str(site), str(REPO)], check=True,
                       capture_output=True, timeout=600)
    except (subprocess.CalledProcessError, subprocess.TimeoutExpired) as e:
        shutil.rmtree(venv, ignore_errors=True)
        pytest.skip(f"cannot make the guest's venv: {e}")
    shutil.rmtree(site / "safegate", ignore_errors=True)  # the shared checkout's is the one under test
    for d in (venv, *venv.rglob("*")):
        if not d.is_symlink():  # bin/python points at the host's own interpreter
            d.chmod(d.stat().st_mode | 0o005 | (0o001 if d.is_dir() else 0))
    (venv / "ready").write_text("")
    return venv


@contextmanager
def _one_qemu() -> Iterator[None]:
    """Machine-wide: one harness QEMU at a time (the machine has 2 cores, other suites run beside)."""
    _build.CACHE.mkdir(parents=True, exist_ok=True)
    with open(_build.CACHE / ".qemu-lock", "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def qemu_command(a: _build.Artefacts, out: Path, shares: Sequence[tuple[Path, bool]]) -> list[str]:
    cmd = [
        "qemu-system-x86_64",
        "-accel", "tcg",
        "-cpu", "max",
        "-smp", "2",
        "-m", "2048",
        "-snapshot",
        "-nographic",
        "-no-reboot",
        "-nic", "none",
        "-kernel", str(a.kernel),
        "-initrd", str(a.initrd),
        "-append", "console=ttyS0 root=/dev/vda rw panic=-1 quiet loglevel=3 systemd.show_status=0",
        "-drive", f"file={a.rootfs},format=raw,if=virtio",
        "-device", "virtio-rng-pci",
        "-fsdev", f"local,id=sgvm-out,path={out},security_model=none",
        "-device", "virtio-9p-pci,fsdev=sgvm-out,mount_tag=sgvm-out",
    ]  # fmt: skip
    for i, (path, writable) in enumerate(shares):
        ro = "" if writable else ",readonly=on"
        cmd += [
            "-fsdev", f"local,id=share{i},path={path},security_model=none{ro}",
            "-device", f"virtio-9p-pci,fsdev=share{i},mount_tag=share{i}",
        ]  # fmt: skip
    return cmd


def _script(s: Scenario) -> str:
    lines = ["# generated by tests/vm/harness.py"]
    if s.cwd:
        lines.append(f"cd {shlex.quote(s.cwd)} || exit 125")
    lines += [f"export {k}={shlex.quote(v)}" for k, v in s.env.items()]
    lines.append(s.command)
    return "\n".join(lines) + "\n"


def boot(
    scenarios: Sequence[str | Scenario],
    user: str | None = None,
    shares: Sequence[Path] = (REPO,),
    writable: Sequence[Path] = (),
    artefacts: _build.Artefacts | None = None,
) -> Boot:
    """Boot once, run every scenario in order, power off. Strings are commands run as *user* (None: root)."""
    a = artefacts or _build.build()
    items = [s if isinstance(s, Scenario) else Scenario(s, user=user) for s in scenarios]
    all_shares = [(Path(p).resolve(), False) for p in shares] + [(Path(p).resolve(), True) for p in writable]
    for path, _ in all_shares:
        if not path.is_dir() or any(c.isspace() for c in str(path)):
            raise ValueError(f"share {path}: not a directory, or has white space")
        if any(s.user for s in items):
            closed = [str(d) for d in (path, *path.parents) if not os.stat(d).st_mode & 0o001]
            if closed:
                # 9p shows the host's modes: a guest user cannot pass a host directory that is not o+x.
                raise ValueError(f"share {path}: {', '.join(closed)} not searchable by other users (chmod o+x)")
    out = Path(tempfile.mkdtemp(prefix="sgvm-out-"))
    try:
        os.chmod(out, 0o755)
        (out / "shares").write_text(
            "".join(f"share{i} {p} {'rw' if w else 'ro'}\n" for i, (p, w) in enumerate(all_shares))
        )
        for i, s in enumerate(items):
            d = out / "s" / f"{i:03d}"
            d.mkdir(parents=True)
            (d / "script").write_text(_script(s))
            (d / "user").write_text(s.user or "")
            (d / "timeout").write_text(f"{int(s.timeout)}\n")
        deadline = BOOT_TIMEOUT + sum(s.timeout + 5 for s in items)
        console_path = out / "console.log"
        with _one_qemu(), open(console_path, "wb") as console:
            t0 = time.monotonic()
            # timeout(1) too: should this process be SIGKILLed, QEMU still dies at the deadline.
            proc = subprocess.Popen(
                ["timeout", "-s", "KILL", f"{int(deadline) + 10}", *qemu_command(a, out, all_shares)],
                stdin=subprocess.DEVNULL,
                stdout=console,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
            try:
                proc.wait(timeout=deadline)
            except subprocess.TimeoutExpired:
                pass
            finally:
                if proc.poll() is None:
                    os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait()
            wall = time.monotonic() - t0
        console_text = console_path.read_text(errors="replace")
        results = [_result(out / "s" / f"{i:03d}", s) for i, s in enumerate(items)]
        errors = (out / "errors").read_text() if (out / "errors").exists() else ""
        if not (out / "done").exists():
            ran = sum(r.rc is not None for r in results)
            raise VMError(
                f"the VM stopped after {wall:.0f}s (limit {deadline:.0f}s) having run {ran}/{len(items)} "
                f"scenarios; qemu rc {proc.returncode}; {errors}\n--- console tail ---\n{console_text[-4000:]}"
            )
        if errors:
            raise VMError(f"guest runner: {errors}\n--- console tail ---\n{console_text[-4000:]}")
        return Boot(results=results, console=console_text, ready=_float(out / "ready"), wall=wall)
    finally:
        shutil.rmtree(out, ignore_errors=True)


def vm_run(
    commands: Sequence[str | Scenario],
    user: str | None = None,
    shares: Sequence[Path] = (REPO,),
    artefacts: _build.Artefacts | None = None,
) -> list[Result]:
    """Run several scenarios in one boot; see boot()."""
    return boot(commands, user=user, shares=shares, artefacts=artefacts).results


def _float(path: Path) -> float | None:
    try:
        return float(path.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None


def _result(d: Path, s: Scenario) -> Result:
    def read(name: str) -> str:
        p = d / name
        return p.read_text(errors="replace") if p.exists() else ""

    rc_text = read("rc").strip()
    times = read("times").split()
    seconds = float(times[1]) - float(times[0]) if len(times) == 2 else None
    return Result(
        command=s.command,
        user=s.user,
        rc=int(rc_text) if rc_text.lstrip("-").isdigit() else None,
        stdout=read("stdout"),
        stderr=read("stderr"),
        seconds=seconds,
    )


def main() -> int:
    ap = argparse.ArgumentParser(description="Run commands in the safegate test VM (one boot for all).")
    ap.add_argument("commands", nargs="+")
    ap.add_argument("-u", "--user", default=None, help=f"run as this guest user (e.g. {TESTER}); default root")
    args = ap.parse_args()
    try:
        b = boot(args.commands, user=args.user)
    except (_build.Unavailable, VMError) as e:
        print(e, file=sys.stderr)
        return 2
    for r in b.results:
        print(f"$ {r.command}  [{r.user or 'root'}, rc {r.rc}, {r.seconds}s]\n{r.stdout}{r.stderr}", end="")
    print(f"ready at guest uptime {b.ready}s; wall {b.wall:.1f}s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
