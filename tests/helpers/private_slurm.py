"""A private single-node Slurm for the tests: its own munged, slurmctld and slurmd under one temp dir.

Nothing here reads or writes the machine's Slurm or MUNGE files (/etc/slurm, /etc/munge, /run/munge,
/var/lib/slurm, /var/log/slurm, /run/*.pid): the configuration, key, socket, state, spool, logs and pid files
all live in the temp dir, the ports are free ones picked at start, the cluster name is unique, and every client
command runs with SLURM_CONF pointing at the private slurm.conf, whose AuthInfo names the private munged's
socket. The daemons run in the foreground as our own children, so stop() signals exactly the processes that
start() started (and any slurmstepd of the private slurmd's jobs), never a daemon found by name.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable, Mapping
from pathlib import Path

# What the Slurm client commands read from the environment: inherited values (the suite may itself run in a
# Slurm job, or under a user's SQUEUE_FORMAT) must not steer the private cluster's commands.
SLURM_ENV_PREFIXES = ("SLURM", "SBATCH_", "SALLOC_", "SRUN_", "SQUEUE_", "SINFO_", "SCONTROL_", "SCANCEL_")
NODE = "sgtest"
PARTITION = "sgtest"
SUN_PATH_MAX = 107  # sockaddr_un.sun_path, less the terminating NUL

CONF = """# Written by tests/helpers/private_slurm.py; removed with its directory when the tests end.
ClusterName={cluster}
SlurmctldHost=localhost
SlurmctldPort={ctld_port}
SlurmdPort={slurmd_port}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
AuthInfo=socket={munge_socket}
CredType=cred/munge
StateSaveLocation={root}/state
SlurmdSpoolDir={root}/spool
SlurmctldPidFile={root}/run/slurmctld.pid
SlurmdPidFile={root}/run/slurmd.pid
SlurmctldLogFile={root}/log/slurmctld.log
SlurmdLogFile={root}/log/slurmd.log
PlugStackConfig={root}/etc/plugstack.conf
MailProg=/bin/true
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
ReturnToService=2
SchedulerType=sched/backfill
Licenses=whisper:1
NodeName={node} NodeHostname={host} NodeAddr=127.0.0.1 Port={slurmd_port} {hardware} RealMemory={memory} State=UNKNOWN
PartitionName={partition} Nodes={node} Default=YES MaxTime=INFINITE State=UP
"""


class StartError(Exception):
    """The private cluster did not come up; the message ends with the daemons' log tails."""


def clean_environ(environ: Mapping[str, str]) -> dict[str, str]:
    return {k: v for k, v in environ.items() if not k.startswith(SLURM_ENV_PREFIXES)}


def free_ports(count: int) -> list[int]:
    """Ports nothing listens on now (bound to port 0 together, so they differ, then released)."""
    socks = [socket.socket(socket.AF_INET, socket.SOCK_STREAM) for _ in range(count)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _tail(path: Path, lines: int = 25) -> str:
    try:
        text = path.read_text(errors="replace").rstrip().splitlines()
    except OSError:
        return f"--- {path.name}: (none)"
    return f"--- {path.name} (last {min(lines, len(text))} lines):\n" + "\n".join(text[-lines:])


def _make_root() -> Path:
    """A fresh 0755 root-owned dir with a short path: munged wants every directory above its socket
    searchable by all, and a socket path must fit sun_path."""
    for parent in (None, "/tmp"):
        root = Path(tempfile.mkdtemp(prefix="safegate-slurm-", dir=parent))
        root.chmod(0o755)
        ancestors_ok = all(os.stat(p).st_mode & 0o001 for p in root.parents)
        if len(str(root / "munge" / "munge.socket")) <= SUN_PATH_MAX and ancestors_ok:
            return root
        shutil.rmtree(root, ignore_errors=True)
    raise StartError("no temp dir fit for a munge socket (too long a path, or a parent not searchable by all)")


class PrivateSlurm:
    def __init__(self) -> None:
        self.root = _make_root()
        self.cluster = f"safegate-test-{secrets.token_hex(4)}"
        self.conf = self.root / "etc" / "slurm.conf"
        self.munge_socket = self.root / "munge" / "munge.socket"
        self.node = NODE
        self.env = clean_environ(os.environ)
        self.env["SLURM_CONF"] = str(self.conf)
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self.ctld_port = self.slurmd_port = 0

    # --- running client commands against this cluster ---------------------------------------------------

    def sh(self, *args: str, timeout: float = 60, check: bool = True,
           env: Mapping[str, str] | None = None) -> subprocess.CompletedProcess[str]:
        """A Slurm client command (or any command) with SLURM_CONF set to the private cluster's."""
        full = {**clean_environ(env), "SLURM_CONF": str(self.conf)} if env is not None else self.env
        return subprocess.run(list(args), capture_output=True, text=True, timeout=timeout, check=check, env=full,
                              stdin=subprocess.DEVNULL)

    # --- start and stop -------------------------------------------------------------------------------

    def start(self, timeout: float = 60) -> None:
        for d in ("etc", "munge", "state", "spool", "log", "run"):
            (self.root / d).mkdir(mode=0o755)
        self._start_munged(timeout)
        self._write_conf()
        self._spawn("slurmctld", ["slurmctld", "-D", "-f", str(self.conf)])
        self._spawn("slurmd", ["slurmd", "-D", "-N", self.node, "-f", str(self.conf)])
        self._wait(lambda: self.sh("sinfo", "-h", "-n", self.node, "-o", "%T", check=False).stdout.strip()
                   in ("idle", "mixed"), timeout, f"node {self.node} of the private cluster to become idle")

    def _start_munged(self, timeout: float) -> None:
        key = self.root / "munge" / "munge.key"
        fd = os.open(key, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(secrets.token_bytes(1024))
        munge_dir = self.root / "munge"
        # As root with a root-owned 0600 key munged needs no --force; in the foreground it logs to stderr.
        self._spawn("munged", ["munged", "--foreground", f"--socket={self.munge_socket}", f"--key-file={key}",
                               f"--pid-file={munge_dir / 'munged.pid'}", f"--log-file={munge_dir / 'munged.log'}",
                               f"--seed-file={munge_dir / 'munged.seed'}"])

        def round_trip() -> bool:
            cred = subprocess.run(["munge", "-n", "-S", str(self.munge_socket)], capture_output=True, timeout=10)
            if cred.returncode != 0:
                return False
            back = subprocess.run(["unmunge", "-S", str(self.munge_socket)], input=cred.stdout,
                                  capture_output=True, timeout=10)
            return back.returncode == 0

        self._wait(round_trip, timeout, "the private munged to answer on its socket")

    def _write_conf(self) -> None:
        probe = subprocess.run(["slurmd", "-C"], capture_output=True, text=True, timeout=30, env=self.env)
        fields = dict(item.split("=", 1) for item in probe.stdout.split() if "=" in item)
        hardware = " ".join(f"{k}={fields[k]}" for k in
                            ("CPUs", "Boards", "SocketsPerBoard", "CoresPerSocket", "ThreadsPerCore") if k in fields)
        memory = max(512, int(int(fields.get("RealMemory", "2048")) * 0.8))
        self.ctld_port, self.slurmd_port = free_ports(2)
        (self.root / "etc" / "plugstack.conf").write_text("")
        self.conf.write_text(CONF.format(
            cluster=self.cluster, ctld_port=self.ctld_port, slurmd_port=self.slurmd_port,
            munge_socket=self.munge_socket, root=self.root, node=self.node, partition=PARTITION,
            host=socket.gethostname(), hardware=hardware or "CPUs=1", memory=memory))

    def _spawn(self, name: str, argv: list[str]) -> None:
        # setpriv --pdeathsig (util-linux) execs the daemon with PR_SET_PDEATHSIG, keeping its pid: a test run
        # that is killed outright still takes its daemons with it.
        if shutil.which("setpriv"):
            argv = ["setpriv", "--pdeathsig", "TERM", "--", *argv]
        with open(self.root / "log" / f"{name}.out", "wb") as out:
            self.procs[name] = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                                env=self.env, cwd=self.root, start_new_session=True)

    def _wait(self, condition: Callable[[], bool], timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while True:
            dead = [f"{n} exited with {p.returncode}" for n, p in self.procs.items() if p.poll() is not None]
            if dead or time.monotonic() > deadline:
                why = "; ".join(dead) if dead else f"timed out after {timeout:g}s"
                raise StartError(f"waiting for {what}: {why}\n{self.logs()}")
            if condition():
                return
            time.sleep(0.2)

    def logs(self) -> str:
        names = ["munged.out", "slurmctld.log", "slurmctld.out", "slurmd.log", "slurmd.out"]
        return "\n".join(_tail(self.root / "log" / n) for n in names)

    def stop(self) -> None:
        """Cancel the private cluster's jobs, then stop exactly the daemons start() started; remove the dir."""
        try:
            if self.procs.get("slurmctld") and self.procs["slurmctld"].poll() is None:
                self.sh("scancel", "-u", "root", timeout=30, check=False)
                deadline = time.monotonic() + 20
                while time.monotonic() < deadline and (self._stepds() or self.sh(
                        "squeue", "-h", "-o", "%i", timeout=30, check=False).stdout.strip()):
                    time.sleep(0.2)
            # Steps left over (none, normally): the private slurmd's slurmstepds and what they run.
            for pid in self._stepds():
                for victim in [*_descendants(pid), pid]:
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(victim, signal.SIGKILL)
            # slurmd and slurmctld before munged: they use it until they exit.
            for name in ("slurmd", "slurmctld", "munged"):
                proc = self.procs.get(name)
                if proc is None or proc.poll() is not None:
                    continue
                proc.terminate()
                try:
                    proc.wait(timeout=20)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait(timeout=10)
        finally:
            shutil.rmtree(self.root, ignore_errors=True)

    def _stepds(self) -> list[int]:
        """slurmstepd processes of this cluster: they hold its slurmd log open (slurmd forks them detached,
        so they are not its children)."""
        found = []
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                if Path(entry, "comm").read_text().strip() != "slurmstepd":
                    continue
                fds = [os.readlink(fd) for fd in Path(entry, "fd").iterdir()]
            except OSError:
                continue
            if any(fd.startswith(f"{self.root}/") for fd in fds):
                found.append(int(entry.name))
        return found


def _descendants(root: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int(Path(entry, "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry.name))
    found: list[int] = []
    stack = [root]
    while stack:
        for child in children.get(stack.pop(), []):
            found.append(child)
            stack.append(child)
    return found
