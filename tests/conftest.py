"""Fixtures: a hermetic environment for every test, real child processes with guaranteed cleanup.

The helpers themselves live in support.py; this file only wires them into fixtures.
"""

from __future__ import annotations

import os
import shutil
import sys
import sysconfig
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from support import REPO, Nobody, Procs, Run, Shared, neutral_config

# Variables from the caller's environment that would change what safegate sees: its own settings, a Slurm job
# the suite may run inside, a GPU selection, colour. Every test starts without them.
_FOREIGN_PREFIXES = ("SAFEGATE_", "SLURM_", "SLURMD_")
_FOREIGN = ("CUDA_VISIBLE_DEVICES", "CUDA_DEVICE_ORDER", "HIP_VISIBLE_DEVICES", "ROCR_VISIBLE_DEVICES", "NO_COLOR",
            "MUNGE_SOCKET")


@pytest.fixture(autouse=True)
def _hermetic(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, tmp_path_factory: pytest.TempPathFactory) -> None:
    """In-process code (the API, the lock store) and every subprocess get a private HOME, XDG dirs and lock
    dir, no real GPU, and none of the caller's safegate or Slurm settings: nothing of the user's is read or
    written."""
    for key in list(os.environ):
        if key.startswith(_FOREIGN_PREFIXES) or key in _FOREIGN:
            monkeypatch.delenv(key)
    home = tmp_path_factory.mktemp("home")  # beside tmp_path, which some tests expect to hold only their files
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setenv("XDG_CONFIG_HOME", str(home / ".config"))
    # An empty user config: found before /etc/safegate/config.toml, so the machine's config is never read.
    (home / ".config" / "safegate").mkdir(parents=True)
    (home / ".config" / "safegate" / "config.toml").write_text("")
    monkeypatch.setenv("XDG_STATE_HOME", str(home / ".local/state"))
    monkeypatch.setenv("SAFEGATE_LOCK_DIR", str(tmp_path / "locks"))
    # A real GPU on the test machine must not enter any verdict; GPU tests bring the fake NVML and unset this.
    monkeypatch.setenv("SAFEGATE_GPU", "none")
    monkeypatch.setenv("PYTHONDONTWRITEBYTECODE", "1")


@pytest.fixture(autouse=True)
def _api_grants_released() -> Iterator[None]:
    """What an in-process safegate.check() passed holds for this process (issue 23) ends with its test."""
    yield
    from safegate import api

    for held in list(api._GRANTS.values()):
        held.release()
    api._GRANTS.clear()


@pytest.fixture
def procs() -> Iterator[Procs]:
    p = Procs()
    try:
        yield p
    finally:
        p.kill_all()


@pytest.fixture
def lock_dir(tmp_path: Path) -> Path:
    return tmp_path / "locks"


@pytest.fixture
def sensor(tmp_path: Path) -> Path:
    """A fake sysfs temperature file in millidegrees, starting cool."""
    path = tmp_path / "temp1_input"
    path.write_text("40000\n")
    return path


@pytest.fixture
def config(tmp_path: Path, sensor: Path) -> Path:
    path = tmp_path / "config.toml"
    path.write_text(neutral_config(sensor))
    return path


@pytest.fixture
def env(_hermetic: None) -> dict[str, str]:
    """The hermetic environment as a dict for subprocesses: own HOME, XDG dirs and lock dir."""
    return dict(os.environ)


@pytest.fixture
def run(env: dict[str, str]) -> Run:
    """Run the real CLI in a subprocess, as users and scripts do."""
    return Run(env)


@pytest.fixture
def nobody() -> Iterator[Nobody]:
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
            probe = helper.run(["-c", "import safegate.cli.app"])
            if probe.returncode == 0:
                yield helper
                return
            last = probe.stderr.strip().splitlines()[-1:] or [""]
            last = f"{python}: {last[0]}"
        pytest.skip(f"user nobody cannot run safegate from this checkout ({last[:200]})")
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


@pytest.fixture
def shared(nobody: Nobody, run: Run) -> Iterator[Shared]:
    yield Shared(nobody, run)


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """Job cgroups a SIGKILLed safegate left behind (its job ended after it) are swept, as the next exec would."""
    from safegate import cgroups

    if cgroups.available() is None:
        cgroups.sweep()
