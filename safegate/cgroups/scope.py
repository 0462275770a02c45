"""The job's cgroup as a transient systemd scope, on a systemd machine with cgroup v2.

A normal user cannot move a process into a cgroup of their systemd instance (the move needs write access to the
common ancestor), so the job enters its scope the way systemd allows: it execs `systemd-run [--user] --scope -p
Delegate=yes`, which has systemd move it, then a one-line sh that waits on a pipe. safegate meanwhile sees the
job land in the scope, checks that the memory controller and MemoryMax really took effect (without delegation
systemd accepts and ignores them, systemd#9641), moves the job into a leaf of the delegated scope (v2 puts
processes only in leaves of a cgroup that hands controllers down), sets the leaf's limits, and only then lets the
job exec. The scope's own files count all of the job's memory; the leaf is safegate's to cap, freeze and kill.
When the job ends, systemd removes the scope (--collect), with the leaf.
"""

from __future__ import annotations

import itertools
import os
import shutil
import time
from collections.abc import Mapping, Sequence

from safegate.cgroups.base import ROOT, job_name, read, to_int
from safegate.cgroups.v2 import V2Cgroup, controllers, empty_into, own_path, page_rounded
from safegate.errors import CgroupError, SpawnError
from safegate.exitcodes import ExitCode

LAND_TIMEOUT = 60.0  # for systemd to create the scope and move the job (slow on a loaded or emulated machine)
_serial = itertools.count(1)


def runtime_dir(env: Mapping[str, str]) -> str:
    return env.get("XDG_RUNTIME_DIR") or f"/run/user/{os.getuid()}"


def available(env: Mapping[str, str] | None = None) -> str | None:
    """None when the job can get a verified scope here, else why not (one line)."""
    env = os.environ if env is None else env
    if own_path() is None:
        return "no cgroup v2 hierarchy at /sys/fs/cgroup"
    if not os.path.isdir("/run/systemd/system"):
        return "systemd is not running here, and safegate's cgroup does not hand the memory controller down"
    if shutil.which("systemd-run") is None:
        return "no systemd-run on PATH"
    if os.getuid() == 0:
        if "memory" not in controllers(ROOT):
            return "the memory controller is not enabled on this machine"
        return None
    uid = os.getuid()
    if not os.path.exists(f"{runtime_dir(env)}/systemd/private"):
        return (f"no systemd user instance for uid {uid} (a login session, or `loginctl enable-linger`, starts one)")
    manager = f"{ROOT}/user.slice/user-{uid}.slice/user@{uid}.service"
    if "memory" not in controllers(manager):
        return f"the user's systemd instance is not delegated the memory controller ({manager})"
    return None


class ScopeCgroup(V2Cgroup):
    """A transient scope (system, or the user's instance) with a leaf safegate made in it."""

    def __init__(self, *, user: bool) -> None:
        super().__init__("", "")
        self.user = user
        self.unit = f"{job_name()}-{next(_serial)}.scope"
        self.max_mem: int | None = None
        self._gate_r = self._gate_w = -1
        self._life_r = self._life_w = -1  # the anchor's lifeline: safegate holds the write end to the end

    @property
    def path(self) -> str:
        return self.control or self.unit

    def configure(self, max_mem: int | None) -> None:
        self.max_mem = max_mem  # asked of systemd at the start (the kernel holds it from the job's first step)

    def wrap(self, argv: Sequence[str], env: Mapping[str, str] | None) -> tuple[list[str], dict[str, str] | None]:
        environ = dict(os.environ if env is None else env)
        exe = argv[0] if "/" in argv[0] else shutil.which(argv[0], path=environ.get("PATH", os.defpath))
        if exe is None or not os.path.exists(exe):
            raise SpawnError(f"command not found: {argv[0]}", ExitCode.NOT_FOUND)
        if not os.access(exe, os.X_OK) or os.path.isdir(exe):
            raise SpawnError(f"command not executable: {argv[0]} (permission denied)", ExitCode.NOT_EXECUTABLE)
        systemd_run = shutil.which("systemd-run")
        if systemd_run is None:
            raise CgroupError("no systemd-run on PATH")
        unset = ""
        if self.user and "XDG_RUNTIME_DIR" not in environ:  # cron: systemd-run finds the instance by it
            environ["XDG_RUNTIME_DIR"] = runtime_dir(environ)
            unset = "unset XDG_RUNTIME_DIR; "
        self._gate_r, self._gate_w = os.pipe()
        self._life_r, self._life_w = os.pipe()
        fd, life = self._gate_r, self._life_r
        props = ["-p", "Delegate=yes"]
        if self.max_mem is not None:
            props += ["-p", f"MemoryMax={self.max_mem}"]
        if self.max_swap is not None:
            props += ["-p", f"MemorySwapMax={self.max_swap}"]
        # The job runs only after "go": with the pipe closed first (safegate gone, or the scope refused), never.
        # The anchor (a cat reading the lifeline) keeps the scope, and with it the kernel's figures of the job,
        # until safegate has read them: systemd removes a scope once it is empty. It ends with safegate.
        # In a session of its own, it gets none of the signals safegate forwards to the job's group.
        anchor = f"(exec setsid cat <&{life} >/dev/null 2>&1 {fd}<&-) & "
        script = f'{unset}{anchor}read -r go <&{fd} && [ "$go" = go ] && exec "$0" "$@" {fd}<&- {life}<&-; exit 125'
        wrapped = [systemd_run, *(["--user"] if self.user else []), "--scope", "--quiet", "--collect",
                   f"--unit={self.unit}", *props, "--", "/bin/sh", "-c", script, exe, *argv[1:]]
        return wrapped, environ

    def enter(self) -> None:
        pass  # systemd moves the job into its scope

    def job_fds(self) -> tuple[int, ...]:
        return (self._gate_r, self._life_r)

    def adopt(self, pid: int) -> None:
        for fd in (self._gate_r, self._life_r):
            os.close(fd)
        self._gate_r = self._life_r = -1
        scope = self._landed(pid)
        if "memory" not in controllers(scope):
            raise CgroupError(f"systemd did not delegate the memory controller to {self.unit}")
        if self.max_mem is not None:
            got = read(f"{scope}/memory.max").strip()
            if got != str(page_rounded(self.max_mem)):
                raise CgroupError(f"systemd did not apply MemoryMax to {self.unit} (memory.max reads {got or '?'})")
        leaf = f"{scope}/job"
        try:
            os.mkdir(leaf, 0o755)
            os.mkdir(f"{scope}/anchor", 0o755)
            self._move_all(scope, leaf, pid)
        except OSError as exc:
            raise CgroupError(f"cannot make the job's cgroup in {self.unit}: {exc.strerror}") from None
        self.account, self.control = scope, leaf
        self.apply_limits(self.max_mem)

    def _landed(self, pid: int) -> str:
        """The scope's directory, once systemd has moved the job there and the job's sh has started the anchor
        (systemd moves systemd-run, which only then execs the sh)."""
        deadline = time.monotonic() + LAND_TIMEOUT
        while True:
            path = next((line[3:] for line in read(f"/proc/{pid}/cgroup").splitlines() if line.startswith("0::")), "")
            if path.endswith(f"/{self.unit}") and read(f"{ROOT}{path}/cgroup.procs").split() not in ([], [str(pid)]):
                return f"{ROOT}{path}"
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                code = os.waitstatus_to_exitcode(status)
                raise CgroupError(f"systemd-run could not start {self.unit} (exit status {code})")
            if time.monotonic() >= deadline:
                raise CgroupError(f"systemd did not start {self.unit} within {LAND_TIMEOUT:.0f} s")
            time.sleep(0.002)

    @staticmethod
    def _move_all(scope: str, leaf: str, job: int) -> None:
        """The job into the leaf and the anchor beside it (nothing else is in the scope: the job waits on the
        gate), then the scope hands memory (and pids) down: v2 refuses that while it holds a process itself."""
        wanted = " ".join(f"+{c}" for c in ("memory", "pids") if c in controllers(scope))
        empty_into(scope, lambda pid: leaf if pid == job else f"{scope}/anchor", wanted, "the scope")

    def holds(self, pid: int) -> bool | None:
        # The anchor is not the job's, but it is where it belongs: it did not leave.
        if self.account and self.where(pid) == f"{self.account.removeprefix(ROOT)}/anchor":
            return True
        return super().holds(pid)

    def release(self, go: bool) -> None:
        for fd in (self._gate_r, self._life_r):
            if fd >= 0:
                os.close(fd)
        self._gate_r = self._life_r = -1
        if not go:
            self._end_anchor()
        if self._gate_w >= 0:
            if go:
                os.write(self._gate_w, b"go\n")
            os.close(self._gate_w)
            self._gate_w = -1

    def _end_anchor(self) -> None:
        if self._life_w >= 0:
            os.close(self._life_w)
            self._life_w = -1

    def remove(self) -> None:
        """The job has ended and its figures are read: the anchor ends, and systemd removes the emptied scope."""
        self._end_anchor()
        super().remove()

    def peak(self) -> int:
        return to_int(read(f"{self.account}/memory.peak")) if self.account else 0
