"""safegate inside a real single-node Slurm (its own munged, slurmctld and slurmd), not mocks.

The session fixture installs Slurm's Debian packages when missing (as root on Debian), and skips these tests
with the reason otherwise. It then starts a private cluster under a temp dir (tests/helpers/private_slurm.py):
own slurm.conf (SLURM_CONF), key, munge socket, ports, cluster name, state, spool, logs and pid files. It never
touches the machine's own Slurm or MUNGE (/etc/slurm, /etc/munge, /run/munge, /var/lib/slurm), which may be
running meanwhile, and at the end it stops exactly the daemons it started and removes the dir.
"""

from __future__ import annotations

import itertools
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from helpers.private_slurm import SLURM_ENV_PREFIXES, PrivateSlurm, StartError, clean_environ
from support import HELPERS, TIMEOUT, Run, neutral_config, set_temp, wait_until

from safegate.commands import slurm
from safegate.exitcodes import ExitCode

PACKAGES = ["slurmctld", "slurmd", "slurm-client", "munge"]
BINARIES = ("slurmctld", "slurmd", "sbatch", "scontrol", "munged", "munge", "unmunge")


def _install() -> str | None:
    """Why Slurm cannot be had here, or None when it is installed."""
    if os.geteuid() != 0:
        return "needs root to install and run slurmctld, slurmd and munged"
    if not Path("/etc/debian_version").exists():
        return "the Slurm fixture knows Debian's packages only"
    if all(shutil.which(b) for b in BINARIES):
        return None
    if shutil.which("apt-get") is None:
        return "apt-get is not available"
    result = subprocess.run(["apt-get", "install", "-y", "-q", "--no-install-recommends", *PACKAGES],
                            capture_output=True, text=True, timeout=900,
                            env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"})
    if result.returncode != 0:
        return f"apt-get install failed: {result.stderr.strip()[-300:]}"
    return None


@pytest.fixture(scope="session")
def cluster() -> Iterator[PrivateSlurm]:
    reason = _install()
    if reason:
        pytest.skip(f"no Slurm here: {reason}")
    private: PrivateSlurm | None = None
    failed = ""
    try:
        private = PrivateSlurm()
        private.start(timeout=TIMEOUT)
    except BaseException as exc:
        if private is not None:
            private.stop()
        if not isinstance(exc, StartError):
            raise
        failed = str(exc)
    if failed or private is None:  # a failure with the daemons' log tails, never a silent skip
        pytest.fail(f"the private Slurm cluster did not come up: {failed}", pytrace=False)
    try:
        yield private
    finally:
        private.stop()


@pytest.fixture
def slurm_env(env: dict[str, str], cluster: PrivateSlurm) -> dict[str, str]:
    """conftest's isolated environment, without inherited SLURM_* variables, pointed at the private cluster."""
    return {**clean_environ(env), "SLURM_CONF": str(cluster.conf)}


@pytest.fixture
def run(slurm_env: dict[str, str]) -> Run:
    """The real CLI, talking to the private cluster (safegate runs scontrol from PATH)."""
    return Run(slurm_env)


@pytest.fixture
def resumed(cluster: PrivateSlurm, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """The private node idle and undrained before and after a test; in-process scontrol calls (slurm.read_node)
    go to the private cluster too."""
    for key in list(os.environ):
        if key.startswith(SLURM_ENV_PREFIXES):
            monkeypatch.delenv(key)
    monkeypatch.setenv("SLURM_CONF", str(cluster.conf))
    cluster.sh("scontrol", "update", f"NodeName={cluster.node}", "State=RESUME", check=False)
    yield cluster.node
    cluster.sh("scancel", "-u", "root", check=False)
    cluster.sh("scontrol", "update", f"NodeName={cluster.node}", "State=RESUME", check=False)


def _sbatch(cluster: PrivateSlurm, env: dict[str, str], script: Path, *args: str) -> int:
    """Submit to the private cluster; the job inherits *env* (sbatch exports the submitting environment)."""
    out = cluster.sh("sbatch", "--parsable", *args, str(script), env=env).stdout.strip()
    return int(out.split(";")[0])


def _job_state(cluster: PrivateSlurm, job: int) -> str:
    out = cluster.sh("scontrol", "show", "job", str(job), "-o", check=False).stdout
    return slurm.parse_fields(out).get("JobState", "GONE") if out else "GONE"


def _wait_done(cluster: PrivateSlurm, job: int, timeout: float = TIMEOUT) -> None:
    wait_until(lambda: _job_state(cluster, job) in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "GONE"),
               timeout=timeout, interval=0.5, what=f"job {job} to finish")


def _script(tmp_path: Path, name: str, body: str) -> Path:
    path = tmp_path / name
    path.write_text("#!/bin/bash\n" + body)
    path.chmod(0o755)
    return path


def _safegate(env: dict[str, str]) -> str:
    lines = [f"export {k}={json.dumps(v)}" for k, v in env.items() if k.startswith(("SAFEGATE_", "XDG_"))]
    return "\n".join(lines) + f"\n{sys.executable} -m safegate"


def test_two_licensed_jobs_never_overlap(resumed: str, cluster: PrivateSlurm, tmp_path: Path, sensor: Path,
                                        slurm_env: dict[str, str]) -> None:
    env = slurm_env
    cfg = tmp_path / "c.toml"
    cfg.write_text(neutral_config(sensor) + '[profiles.w]\nslurm_license = "whisper"\nlock = false\n')
    spans = tmp_path / "spans"
    body = (f"{_safegate(env)} exec --config {cfg} -p w --mem 0 -q -- {sys.executable} {HELPERS / 'record.py'} "
            f"{spans} 2\necho rc=$? >> {tmp_path}/rcs\n")
    script = _script(tmp_path, "job.sh", body)
    jobs = [_sbatch(cluster, env, script, "-L", "whisper:1", "--mem=100M", "-o", str(tmp_path / f"out{i}"))
            for i in range(2)]
    for job in jobs:
        _wait_done(cluster, job)
    assert (tmp_path / "rcs").read_text().split() == ["rc=0", "rc=0"]
    intervals = sorted(tuple(map(float, line.split())) for line in spans.read_text().splitlines())
    assert len(intervals) == 2
    assert all(b[0] >= a[1] for a, b in itertools.pairwise(intervals))


def test_exec_without_the_license_is_refused_with_13(resumed: str, cluster: PrivateSlurm, tmp_path: Path,
                                                      sensor: Path, slurm_env: dict[str, str]) -> None:
    env = slurm_env
    cfg = tmp_path / "c.toml"
    cfg.write_text(neutral_config(sensor) + '[profiles.w]\nslurm_license = "whisper"\nlock = false\n')
    marker = tmp_path / "ran"
    body = (f"{_safegate(env)} exec --config {cfg} -p w --mem 0 -- touch {marker}\n"
            f"echo rc=$? > {tmp_path}/rc\n")
    job = _sbatch(cluster, env, _script(tmp_path, "job.sh", body), "--mem=100M", "-o", str(tmp_path / "out"))
    _wait_done(cluster, job)
    assert (tmp_path / "rc").read_text().strip() == f"rc={ExitCode.LOCKED}"
    assert not marker.exists()
    assert "#SBATCH -L whisper:1" in (tmp_path / "out").read_text()


def test_job_memory_allocation_becomes_max_mem(resumed: str, cluster: PrivateSlurm, tmp_path: Path, config: Path,
                                               slurm_env: dict[str, str]) -> None:
    env = slurm_env
    body = (f"{_safegate(env)} exec --config {config} --mem 0 --grace 2s -- {sys.executable} "
            f"{HELPERS / 'hog.py'} 1500 16 0.01\necho rc=$? > {tmp_path}/rc\n")
    job = _sbatch(cluster, env, _script(tmp_path, "job.sh", body), "--mem=512M", "-o", str(tmp_path / "out"))
    _wait_done(cluster, job)
    assert (tmp_path / "rc").read_text().strip() == f"rc={ExitCode.KILLED_MEMORY}"
    assert "--max-mem 486.4 MiB" in (tmp_path / "out").read_text()


def _node(name: str) -> slurm.NodeState:
    return slurm.read_node(name)  # in-process: `resumed` has pointed os.environ's SLURM_CONF at the private cluster


def test_health_drains_when_hot_and_resumes_only_its_own_drain(resumed: str, cluster: PrivateSlurm, run: Run,
                                                                config: Path, sensor: Path) -> None:
    node = resumed
    set_temp(sensor, 90)
    hot = run("slurm", "health", "--config", str(config), "--node", node)
    assert hot.returncode == ExitCode.THERMAL, hot.stderr
    state = _node(node)
    assert state.drained and state.reason.startswith("safegate: thermal:")
    set_temp(sensor, 40)
    cool = run("slurm", "health", "--config", str(config), "--node", node)
    assert cool.returncode == 0 and "resuming" in cool.stderr
    wait_until(lambda: not _node(node).drained, what="the node to resume")
    # An admin's drain is never lifted by safegate.
    cluster.sh("scontrol", "update", f"NodeName={node}", "State=DRAIN", "Reason=admin: disk check")
    again = run("slurm", "health", "--config", str(config), "--node", node)
    assert again.returncode == 0 and "left" in again.stderr
    state = _node(node)
    assert state.drained and state.reason == "admin: disk check"


def test_health_dry_run_prints_the_command(env: dict[str, str], config: Path, sensor: Path, tmp_path: Path) -> None:
    # No cluster needed, and the machine's own Slurm is not asked: scontrol gets an empty slurm.conf, which it
    # rejects at once (a missing one it would retry for 60 s); the dry run still prints what it would do.
    empty = tmp_path / "slurm.conf"
    empty.write_text("")
    run = Run({**clean_environ(env), "SLURM_CONF": str(empty)})
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
