"""safegate inside a real single-node Slurm (slurmctld + slurmd + munge on this machine), not mocks.

The session fixture installs and starts Slurm when running as root on Debian with the packages installable,
and skips these tests with the reason otherwise. Everything it starts is shut down at the end.
"""

from __future__ import annotations

import itertools
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import Run, neutral_config, set_temp, wait_until

from safegate import slurm
from safegate.exitcodes import ExitCode

HELPERS = Path(__file__).resolve().parent / "helpers"
PACKAGES = ["slurmctld", "slurmd", "slurm-client", "munge"]


def _sh(*args: str, timeout: float = 60, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(list(args), capture_output=True, text=True, timeout=timeout, check=check)


def _install() -> str | None:
    """Why Slurm cannot be had here, or None when it is installed."""
    if os.geteuid() != 0:
        return "needs root to install and run slurmctld, slurmd and munged"
    if not Path("/etc/debian_version").exists():
        return "the Slurm fixture knows Debian's packages only"
    if all(shutil.which(b) for b in ("slurmctld", "slurmd", "sbatch", "munged")):
        return None
    if shutil.which("apt-get") is None:
        return "apt-get is not available"
    result = subprocess.run(["apt-get", "install", "-y", "-q", "--no-install-recommends", *PACKAGES],
                            capture_output=True, text=True, timeout=900,
                            env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"})
    if result.returncode != 0:
        return f"apt-get install failed: {result.stderr.strip()[-300:]}"
    return None


SLURM_CONF = """ClusterName=safegate-test
SlurmctldHost=localhost
SlurmUser=slurm
AuthType=auth/munge
StateSaveLocation=/var/lib/slurm/slurmctld
SlurmdSpoolDir=/var/lib/slurm/slurmd
SlurmctldPidFile=/run/slurmctld.pid
SlurmdPidFile=/run/slurmd.pid
SlurmctldLogFile=/var/log/slurm/slurmctld.log
SlurmdLogFile=/var/log/slurm/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
ReturnToService=2
SchedulerType=sched/backfill
Licenses=whisper:1
NodeName=localhost NodeHostname={host} CPUs={cpus} RealMemory={memory} State=UNKNOWN
PartitionName=debug Nodes=localhost Default=YES MaxTime=INFINITE State=UP
"""


@pytest.fixture(scope="session")
def cluster() -> Iterator[str]:
    reason = _install()
    if reason:
        pytest.skip(f"no Slurm here: {reason}")
    for d in ("/var/lib/slurm/slurmctld", "/var/lib/slurm/slurmd", "/var/log/slurm"):
        Path(d).mkdir(parents=True, exist_ok=True)
        shutil.chown(d, "slurm", "slurm")
    if not Path("/etc/munge/munge.key").exists():
        _sh("mungekey", "--create")
        shutil.chown("/etc/munge/munge.key", "munge", "munge")
    Path("/run/munge").mkdir(exist_ok=True)
    shutil.chown("/run/munge", "munge", "munge")
    _sh("runuser", "-u", "munge", "--", "munged", "--force")
    probe = _sh("slurmd", "-C").stdout
    fields = dict(item.split("=", 1) for item in probe.split() if "=" in item)
    memory = max(512, int(int(fields.get("RealMemory", "2048")) * 0.8))
    conf = Path("/etc/slurm/slurm.conf")
    conf.parent.mkdir(parents=True, exist_ok=True)
    conf.write_text(SLURM_CONF.format(host=socket.gethostname(), cpus=fields.get("CPUs", "2"), memory=memory))
    _sh("slurmctld")
    _sh("slurmd")
    try:
        wait_until(lambda: _sh("sinfo", "-h", "-o", "%T", check=False).stdout.strip() in ("idle", "mixed"),
                   timeout=60, interval=0.5, what="slurm to become idle")
    except BaseException:
        _shutdown()
        raise
    yield "localhost"
    _shutdown()


def _shutdown() -> None:
    subprocess.run(["scontrol", "shutdown"], capture_output=True, timeout=30)
    pid_file = Path("/run/munge/munged.pid")
    if pid_file.exists():
        try:
            os.kill(int(pid_file.read_text().strip()), 15)
        except (ProcessLookupError, ValueError):
            pass
    deadline = time.monotonic() + 20
    def running() -> bool:
        return any(subprocess.run(["pgrep", "-x", n], capture_output=True).returncode == 0
                   for n in ("slurmctld", "slurmd"))

    while time.monotonic() < deadline and running():
        time.sleep(0.2)


@pytest.fixture
def resumed(cluster: str) -> Iterator[str]:
    """The node idle and undrained before and after a test."""
    subprocess.run(["scontrol", "update", f"NodeName={cluster}", "State=RESUME"], capture_output=True)
    yield cluster
    subprocess.run(["scancel", "-u", "root"], capture_output=True)
    subprocess.run(["scontrol", "update", f"NodeName={cluster}", "State=RESUME"], capture_output=True)


def _sbatch(script: Path, *args: str) -> int:
    out = _sh("sbatch", "--parsable", *args, str(script)).stdout.strip()
    return int(out.split(";")[0])


def _job_state(job: int) -> str:
    out = _sh("scontrol", "show", "job", str(job), "-o", check=False).stdout
    return slurm.parse_fields(out).get("JobState", "GONE") if out else "GONE"


def _wait_done(job: int, timeout: float = 90) -> None:
    wait_until(lambda: _job_state(job) in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "GONE"),
               timeout=timeout, interval=0.5, what=f"job {job} to finish")


def _script(tmp_path: Path, name: str, body: str) -> Path:
    path = tmp_path / name
    path.write_text("#!/bin/bash\n" + body)
    path.chmod(0o755)
    return path


def _safegate(env: dict[str, str]) -> str:
    lines = [f"export {k}={json.dumps(v)}" for k, v in env.items() if k.startswith(("SAFEGATE_", "XDG_"))]
    return "\n".join(lines) + f"\n{sys.executable} -m safegate"


def test_two_licensed_jobs_never_overlap(resumed: str, tmp_path: Path, sensor: Path, env: dict[str, str]) -> None:
    cfg = tmp_path / "c.toml"
    cfg.write_text(neutral_config(sensor) + '[profiles.w]\nslurm_license = "whisper"\nlock = false\n')
    spans = tmp_path / "spans"
    body = (f"{_safegate(env)} exec --config {cfg} -p w --mem 0 -q -- {sys.executable} {HELPERS / 'record.py'} "
            f"{spans} 2\necho rc=$? >> {tmp_path}/rcs\n")
    script = _script(tmp_path, "job.sh", body)
    jobs = [_sbatch(script, "-L", "whisper:1", "--mem=100M", "-o", str(tmp_path / f"out{i}")) for i in range(2)]
    wait_until(lambda: "Licenses" in _sh("squeue", "-h", "-o", "%r", "-j", str(jobs[1]), check=False).stdout
               or _job_state(jobs[1]) != "PENDING", timeout=30, interval=0.3, what="the second job's state")
    for job in jobs:
        _wait_done(job)
    assert (tmp_path / "rcs").read_text().split() == ["rc=0", "rc=0"]
    intervals = sorted(tuple(map(float, line.split())) for line in spans.read_text().splitlines())
    assert len(intervals) == 2
    assert all(b[0] >= a[1] for a, b in itertools.pairwise(intervals))


def test_exec_without_the_license_is_refused_with_13(resumed: str, tmp_path: Path, sensor: Path,
                                                      env: dict[str, str]) -> None:
    cfg = tmp_path / "c.toml"
    cfg.write_text(neutral_config(sensor) + '[profiles.w]\nslurm_license = "whisper"\nlock = false\n')
    marker = tmp_path / "ran"
    body = (f"{_safegate(env)} exec --config {cfg} -p w --mem 0 -- touch {marker}\n"
            f"echo rc=$? > {tmp_path}/rc\n")
    job = _sbatch(_script(tmp_path, "job.sh", body), "--mem=100M", "-o", str(tmp_path / "out"))
    _wait_done(job)
    assert (tmp_path / "rc").read_text().strip() == f"rc={ExitCode.LOCKED}"
    assert not marker.exists()
    assert "#SBATCH -L whisper:1" in (tmp_path / "out").read_text()


def test_job_memory_allocation_becomes_max_mem(resumed: str, tmp_path: Path, config: Path,
                                               env: dict[str, str]) -> None:
    body = (f"{_safegate(env)} exec --config {config} --mem 0 --grace 2s -- {sys.executable} "
            f"{HELPERS / 'hog.py'} 1500 16 0.01\necho rc=$? > {tmp_path}/rc\n")
    job = _sbatch(_script(tmp_path, "job.sh", body), "--mem=512M", "-o", str(tmp_path / "out"))
    _wait_done(job, timeout=120)
    assert (tmp_path / "rc").read_text().strip() == f"rc={ExitCode.KILLED_MEMORY}"
    assert "--max-mem 486.4 MiB" in (tmp_path / "out").read_text()


def _node(name: str) -> slurm.NodeState:
    return slurm.read_node(name)


def test_health_drains_when_hot_and_resumes_only_its_own_drain(resumed: str, run: Run, config: Path,
                                                                sensor: Path) -> None:
    node = resumed
    set_temp(sensor, 90)
    hot = run("slurm", "health", "--config", str(config), "--node", node)
    assert hot.returncode == ExitCode.THERMAL, hot.stderr
    state = _node(node)
    assert state.drained and state.reason.startswith("safegate: thermal:")
    set_temp(sensor, 40)
    cool = run("slurm", "health", "--config", str(config), "--node", node)
    assert cool.returncode == 0 and "resuming" in cool.stderr
    wait_until(lambda: not _node(node).drained, timeout=10, what="the node to resume")
    # An admin's drain is never lifted by safegate.
    _sh("scontrol", "update", f"NodeName={node}", "State=DRAIN", "Reason=admin: disk check")
    again = run("slurm", "health", "--config", str(config), "--node", node)
    assert again.returncode == 0 and "left" in again.stderr
    state = _node(node)
    assert state.drained and state.reason == "admin: disk check"


def test_health_dry_run_prints_the_command(run: Run, config: Path, sensor: Path) -> None:
    set_temp(sensor, 95)
    result = run("slurm", "health", "--config", str(config), "--node", "n01", "--dry-run",
                 "--reason-prefix", "sg:")
    assert result.returncode == ExitCode.THERMAL, result.stderr
    assert result.stdout.startswith("scontrol update NodeName=n01 State=DRAIN 'Reason=sg: thermal:")


def test_decide_is_pure_and_conservative() -> None:
    idle = slurm.NodeState("n", "IDLE", "")
    assert slurm.decide(idle, [], "safegate:").command is None
    drain = slurm.decide(idle, ["thermal: too hot"], "safegate:")
    assert drain.command == ["update", "NodeName=n", "State=DRAIN", "Reason=safegate: thermal: too hot"]
    ours = slurm.NodeState("n", "IDLE+DRAIN", "safegate: thermal: too hot")
    assert slurm.decide(ours, [], "safegate:").command == ["update", "NodeName=n", "State=RESUME"]
    admin = slurm.NodeState("n", "IDLE+DRAIN", "admin: broken fan")
    assert slurm.decide(admin, [], "safegate:").command is None
    assert slurm.decide(admin, ["thermal: hot"], "safegate:").command is None


def test_job_environment_parsing() -> None:
    assert slurm.job_memory_limit({"SLURM_MEM_PER_NODE": "512"}) == 512 * 1024**2
    assert slurm.job_memory_limit({"SLURM_MEM_PER_CPU": "100", "SLURM_CPUS_ON_NODE": "4"}) == 400 * 1024**2
    assert slurm.job_memory_limit({}) is None
    assert slurm.job_licenses({"SLURM_JOB_ID": "1", "SLURM_JOB_LICENSES": "whisper:1,gpu@db:2"}) == {
        "whisper": 1, "gpu": 2}
    fields = slurm.parse_fields("NodeName=n State=IDLE+DRAIN Reason=safegate: too hot [root@2026-11-23T10:00:00]")
    assert fields["State"] == "IDLE+DRAIN" and fields["Reason"].startswith("safegate: too hot")
