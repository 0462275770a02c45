"""The documented installs find the man page and completions: a wheel in a venv (as pip and pipx install it),
and the README's install by hand on a fresh home."""

from __future__ import annotations

import glob
import os
import re
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
from support import REPO, TIMEOUT

README = (REPO / "README.md").read_text()
DOCS = {
    "man/safegate.1": "share/man/man1/safegate.1",
    "completions/safegate.bash": "share/bash-completion/completions/safegate.bash",
    "completions/_safegate": "share/zsh/site-functions/_safegate",
    "completions/safegate.fish": "share/fish/vendor_completions.d/safegate.fish",
}


def test_install_by_hand_works_on_a_fresh_home(tmp_path: Path) -> None:
    block = README.split("Install by hand", 1)[1].split("```sh\n", 1)[1].split("```", 1)[0]
    home = tmp_path / "home"
    home.mkdir()
    done = subprocess.run(["sh", "-ec", block], cwd=REPO, env={"HOME": str(home), "PATH": "/usr/bin:/bin"},
                          capture_output=True, text=True, timeout=TIMEOUT)
    assert done.returncode == 0, done.stderr
    for source, target in (("man/safegate.1", ".local/share/man/man1/safegate.1"),
                           ("completions/safegate.bash", ".local/share/bash-completion/completions/safegate"),
                           ("completions/_safegate", ".zfunc/_safegate"),
                           ("completions/safegate.fish", ".config/fish/completions/safegate.fish")):
        assert (home / target).read_bytes() == (REPO / source).read_bytes(), target
    if shutil.which("man"):
        (home / ".local" / "bin").mkdir()
        found = subprocess.run(["man", "-w", "safegate"], capture_output=True, text=True, timeout=TIMEOUT,
                               env={"HOME": str(home), "PATH": f"{home}/.local/bin:/usr/bin:/bin"})
        assert found.stdout.strip() == str(home / ".local/share/man/man1/safegate.1"), found.stderr


def test_a_wheel_install_has_them_and_version_says_where(tmp_path: Path) -> None:
    # The wheel pip and pipx install, built from this tree, in a venv of its own (no network: --no-deps, and
    # the dependencies come from the test environment through PYTHONPATH).
    wheels = tmp_path / "wheels"
    build = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(wheels), str(REPO)],
                           capture_output=True, text=True, timeout=TIMEOUT * 3)
    if build.returncode != 0 and "Could not find a version that satisfies" in build.stderr:
        pytest.skip("no package index to fetch the build backend (setuptools) from")
    assert build.returncode == 0, build.stderr
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=TIMEOUT)
    # pip --python: installs into that venv, judging what is installed there; an install into a prefix judges
    # the test environment instead, and would uninstall its safegate to make room.
    # Without PYTHONPATH, from elsewhere: a source tree on sys.path (its safegate.egg-info) looks installed.
    clean = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    install = subprocess.run([sys.executable, "-m", "pip", "--python", str(venv / "bin" / "python"), "install", "-q",
                              "--no-deps", *glob.glob(str(wheels / "safegate-*.whl"))], capture_output=True,
                             text=True, timeout=TIMEOUT * 3, env=clean, cwd=tmp_path)
    assert install.returncode == 0, install.stderr
    for source, target in DOCS.items():
        assert (venv / target).read_bytes() == (REPO / source).read_bytes(), target
    deps = sysconfig.get_paths()["purelib"]
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "PYTHONPATH": deps}
    version = subprocess.run([str(venv / "bin" / "python"), "-m", "safegate", "--version"], cwd=tmp_path, env=env,
                             capture_output=True, text=True, timeout=TIMEOUT)
    assert version.returncode == 0, version.stderr
    lines = version.stdout.splitlines()
    assert re.fullmatch(r"safegate \S+", lines[0])
    assert f"man page: {venv / DOCS['man/safegate.1']}" in lines
    assert f"bash completion: {venv / DOCS['completions/safegate.bash']}" in lines
    hint = next(line for line in lines if line.startswith("read it with: "))
    if shutil.which("man"):
        found = subprocess.run(hint.removeprefix("read it with: ").replace("man ", "man -w ", 1).split(),
                               capture_output=True, text=True, timeout=TIMEOUT, env=env)
        assert found.stdout.strip() == str(venv / DOCS["man/safegate.1"]), found.stderr
    assert os.path.isdir(venv / "share" / "man")
