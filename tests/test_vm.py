"""Smoke tests of the test VM (tests/vm/): it really boots systemd on the unified cgroup hierarchy, a normal user's
systemd instance delegates the memory controller, and a venv made on the host runs inside over 9p.

All scenarios run in ONE boot (module fixture): a boot costs about 8 s and code runs 10-60x slower under TCG.
Skipped with the reason where the VM cannot be built (no QEMU and not root to install it, no network).
"""

from __future__ import annotations

import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from support import REPO
from vm.build import Artefacts
from vm.harness import TESTER, Boot, Result, Scenario, boot, require_vm

GUEST_PYTHON = "3.11"  # bookworm's python3

SCOPE = (
    "systemd-run --user --scope --quiet -p MemoryMax=100M -- "
    'sh -c \'cg=$(cut -d: -f3 /proc/self/cgroup); echo "$cg"; cat /sys/fs/cgroup"$cg"/memory.max\''
)


@pytest.fixture(scope="module")
def artefacts() -> Artefacts:
    return require_vm()  # first: a skip costs nothing else


@pytest.fixture(scope="module")
def host_venv(artefacts: Artefacts) -> Iterator[Path]:
    """A venv made on the host with Debian's /usr/bin/python3 (the guest's python3 is the same one)."""
    py = Path("/usr/bin/python3")
    if not py.exists():
        pytest.skip("no /usr/bin/python3 on the host")
    version = subprocess.run(
        [str(py), "-c", "import sys; print('%d.%d' % sys.version_info[:2])"], capture_output=True, text=True
    ).stdout.strip()
    if version != GUEST_PYTHON:
        pytest.skip(f"host /usr/bin/python3 is {version}, the guest's is {GUEST_PYTHON}")
    # Not below pytest's basetemp: that is 0700, and 9p shows the guest's normal user the host's modes.
    share = Path(tempfile.mkdtemp(prefix="sgvm-venv-"))
    try:
        share.chmod(0o755)
        subprocess.run([str(py), "-m", "venv", "--without-pip", str(share / "venv")], check=True, timeout=120)
        yield share / "venv"
    finally:
        shutil.rmtree(share, ignore_errors=True)


@pytest.fixture(scope="module")
def vm(artefacts: Artefacts, host_venv: Path) -> tuple[Boot, dict[str, Result]]:
    py = f"{host_venv}/bin/python"
    scenarios = {
        "pid1": Scenario("cat /proc/1/comm; readlink /proc/1/exe"),
        "cgroupfs": Scenario(
            "stat -fc %T /sys/fs/cgroup; grep ' /sys/fs/cgroup ' /proc/mounts; cat /sys/fs/cgroup/cgroup.controllers"
        ),
        "user_delegated": Scenario(
            "cat /sys/fs/cgroup/user.slice/user-$(id -u).slice/user@$(id -u).service/cgroup.controllers", user=TESTER
        ),
        "user_scope": Scenario(SCOPE, user=TESTER),
        "whoami": Scenario("id -un; id -u; echo $XDG_RUNTIME_DIR; loginctl show-user $(id -un) -p Linger", user=TESTER),
        "venv": Scenario(f"{py} -c 'import sys; print(sys.version); print(sys.prefix)'", user=TESTER),
        "safegate": Scenario(
            f"{py} -c 'import safegate; print(safegate.__version__); print(safegate.__file__)'",
            user=TESTER,
            env={"PYTHONPATH": str(REPO), "PYTHONDONTWRITEBYTECODE": "1"},
        ),
        "fails": Scenario("echo out; echo err >&2; exit 7"),
        "repo_read_only": Scenario(f"touch {REPO}/sgvm-must-not-exist"),
    }
    b = boot(list(scenarios.values()), shares=(REPO, host_venv.parent), artefacts=artefacts)
    return b, dict(zip(scenarios, b.results, strict=True))


def test_pid1_is_systemd(vm: tuple[Boot, dict[str, Result]]) -> None:
    r = vm[1]["pid1"].check()
    comm, exe = r.stdout.split()
    assert comm == "systemd"
    assert exe.endswith("/systemd")


def test_unified_cgroup_hierarchy_with_memory_controller(vm: tuple[Boot, dict[str, Result]]) -> None:
    fstype, mount, controllers = vm[1]["cgroupfs"].check().stdout.splitlines()
    assert fstype == "cgroup2fs"
    assert mount.split()[2] == "cgroup2"
    assert "memory" in controllers.split()


def test_normal_user_has_a_systemd_instance_with_lingering(vm: tuple[Boot, dict[str, Result]]) -> None:
    name, uid, runtime, linger = vm[1]["whoami"].check().stdout.splitlines()
    assert (name, runtime, linger) == (TESTER, f"/run/user/{uid}", "Linger=yes")
    assert "memory" in vm[1]["user_delegated"].check().stdout.split()


def test_user_scope_memory_max_really_applies(vm: tuple[Boot, dict[str, Result]]) -> None:
    """systemd ignores -p MemoryMax silently without delegation (systemd#9641): read the scope's memory.max."""
    cgroup, memory_max = vm[1]["user_scope"].check().stdout.split()
    assert cgroup.startswith("/user.slice/") and "/user@" in cgroup and cgroup.endswith(".scope"), cgroup
    assert memory_max == "104857600"


def test_host_venv_runs_inside(vm: tuple[Boot, dict[str, Result]], host_venv: Path) -> None:
    version, prefix = vm[1]["venv"].check().stdout.splitlines()
    assert version.startswith(GUEST_PYTHON + ".")
    assert prefix == str(host_venv)
    version_line, path = vm[1]["safegate"].check().stdout.splitlines()
    assert path == str(REPO / "safegate" / "__init__.py")
    assert version_line


def test_exit_code_and_streams_come_back(vm: tuple[Boot, dict[str, Result]]) -> None:
    r = vm[1]["fails"]
    assert (r.rc, r.stdout, r.stderr) == (7, "out\n", "err\n")


def test_checkout_is_shared_read_only(vm: tuple[Boot, dict[str, Result]]) -> None:
    r = vm[1]["repo_read_only"]
    assert r.rc != 0 and "Read-only file system" in r.stderr, r
    assert not (REPO / "sgvm-must-not-exist").exists()


def test_boot_figures(vm: tuple[Boot, dict[str, Result]]) -> None:
    """Not a speed assertion (speed belongs to the README's figures): the guest reported when it was ready."""
    b = vm[0]
    assert b.ready is not None and 0 < b.ready < b.wall
    print(f"VM: first command at guest uptime {b.ready:.1f}s, full cycle {b.wall:.1f}s")
