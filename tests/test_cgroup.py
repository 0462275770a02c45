"""The job in a cgroup of its own (issue 15), on this machine's real cgroup v1 hierarchies (memory, freezer, pids)
as root. The kernel caps the job's memory at --max-mem, counts what ended processes used, freezes it when hot and
holds every process of it; safegate removes what it made, also after a SIGKILL (the next run sweeps it)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st
from support import (
    HELPERS,
    PY,
    TIMEOUT,
    Nobody,
    Procs,
    alive,
    job_pid,
    neutral_config,
    pids_with,
    rss_anon,
    set_temp,
    stderr_of,
    wait_until,
)

from safegate import cgroups
from safegate.cgroups.base import cgroup_in
from safegate.cgroups.v1 import V1Cgroup
from safegate.exitcodes import ExitCode

UNAVAILABLE = cgroups.available()
needs_cgroups = pytest.mark.skipif(UNAVAILABLE is not None, reason=f"no cgroup v1 job cgroups here: {UNAVAILABLE}")
MiB = 1 << 20


def _ours() -> set[str]:
    """Every safegate-made cgroup beside ours, on every hierarchy."""
    found = set()
    for controller in cgroups.v1.CONTROLLERS:
        own = cgroups.v1.own_path(controller)
        base = Path(f"{cgroups.ROOT}/{controller}{(own or '/').rstrip('/')}")
        if base.is_dir():
            found |= {str(p) for p in base.iterdir() if p.name.startswith(cgroups.PREFIX)}
    return found


@pytest.fixture(autouse=True)
def _no_cgroup_left() -> Iterator[None]:
    before = _ours()
    yield
    left = _ours() - before
    for path in left:  # cleanup first, then fail: no test leaves a cgroup behind
        wait_until(lambda p=path: _rmdir(p), what=f"{path} to empty")
    assert not left, f"cgroups left behind: {sorted(left)}"


def _rmdir(path: str) -> bool:
    try:
        os.rmdir(path)
    except FileNotFoundError:
        return True
    except OSError:
        return False
    return True


def _exec(config: Path, *args: str) -> list[str]:
    return [PY, "-m", "safegate", "exec", "--config", str(config), "--mem", "0", "--cgroup", "on", *args]


def _run(config: Path, env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(_exec(config, *args), env=env, capture_output=True, text=True, timeout=TIMEOUT,
                          stdin=subprocess.DEVNULL)


def _memory_cgroup(pid: int) -> str:
    for line in Path(f"/proc/{pid}/cgroup").read_text().splitlines():
        _, names, path = line.split(":", 2)
        if "memory" in names.split(","):
            return path
    raise AssertionError("no memory hierarchy")


@needs_cgroups
def test_the_job_runs_in_a_memory_cgroup_of_its_own_below_safegates(config: Path, env: dict[str, str],
                                                                    tmp_path: Path) -> None:
    log = tmp_path / "log.jsonl"
    result = _run(config, env, "--log", str(log), "--", "cat", "/proc/self/cgroup")
    assert result.returncode == 0, result.stderr
    job = {line.split(":", 2)[1]: line.split(":", 2)[2] for line in result.stdout.splitlines()}
    own = _memory_cgroup(os.getpid())  # safegate runs in ours: it is our child and moves only its job
    name = Path(job["memory"]).name
    assert job["memory"] == f"{own.rstrip('/')}/{name}" and name.startswith(cgroups.PREFIX)
    assert job["freezer"].endswith(f"/{name}") and job["pids"].endswith(f"/{name}")
    admitted = json.loads(log.read_text().splitlines()[0])
    assert admitted["cgroup"].endswith(f"/{name}") and not Path(admitted["cgroup"]).exists()  # removed after


FILL = ("import sys\nblocks = []\nwhile True:\n    block = bytearray(1 << 20)\n    block[::4096] = b'x' * 256\n"
        "    blocks.append(block)\n")


@needs_cgroups
def test_the_kernel_holds_max_mem_against_a_job_filling_memory_as_fast_as_it_can(config: Path, env: dict[str, str],
                                                                                  lock_dir: Path,
                                                                                  tmp_path: Path) -> None:
    log = tmp_path / "log.jsonl"
    gate = subprocess.Popen(_exec(config, "--max-mem", "300M", "--log", str(log), "--", PY, "-c", FILL), env=env,
                            stdin=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    seen: list[int] = []

    def sample() -> None:  # an independent sampler: the anonymous memory the job holds, every millisecond
        job = wait_until(lambda: job_pid(lock_dir), what="the job")
        while gate.poll() is None:
            seen.append(rss_anon(job))
            time.sleep(0.001)

    sampler = threading.Thread(target=sample)
    sampler.start()
    try:
        err = stderr_of(gate)
    finally:
        sampler.join()
    assert gate.returncode == ExitCode.KILLED_MEMORY, err
    assert seen and max(seen) <= 300 * MiB + 4 * MiB, f"the job held {max(seen) / MiB:.1f} MiB"
    events = [json.loads(line) for line in log.read_text().splitlines()]
    assert [e["reason"] for e in events if e["event"] == "exit"] == ["memory"]


@needs_cgroups
def test_an_oom_kill_by_the_cap_is_a_breach_the_kernel_enforced(config: Path, env: dict[str, str],
                                                                tmp_path: Path) -> None:
    # The job's shell survives; its child is what the kernel kills at the cap, between two samples.
    log = tmp_path / "log.jsonl"
    result = _run(config, env, "--max-mem", "100M", "--interval", "1s", "--log", str(log), "--",
                  "sh", "-c", f"{PY} -c \"{FILL}\"; sleep 0.5; exit 0")
    assert result.returncode == ExitCode.KILLED_MEMORY, result.stderr
    breaches = [json.loads(line) for line in log.read_text().splitlines() if '"breach"' in line]
    assert any(b.get("enforced_by") == "kernel" and b["oom_kills"] >= 1 for b in breaches), breaches
    assert "the kernel enforced --max-mem 100.0 MiB" in result.stderr


@needs_cgroups
def test_the_peak_counts_a_child_that_was_killed(config: Path, env: dict[str, str], tmp_path: Path) -> None:
    log, ready = tmp_path / "log.jsonl", tmp_path / "ready"
    big = f"b = bytearray(200 << 20); b[::4096] = b'x' * (len(b) // 4096); open('{ready}', 'w').close(); input()"
    script = f'{PY} -c "{big}" & until [ -e {ready} ]; do sleep 0.01; done; kill -9 $!; wait; sleep 0.2'
    result = _run(config, env, "--interval", "1s", "--log", str(log), "--", "sh", "-c", script)
    assert result.returncode == 0, result.stderr
    summary = json.loads(log.read_text().splitlines()[-1])
    assert summary["event"] == "summary" and summary["peak_job_memory"] >= 200 * MiB, summary


@needs_cgroups
def test_a_fork_and_exit_chain_is_stopped_within_the_grace(config: Path, env: dict[str, str],
                                                          tmp_path: Path) -> None:
    marker = tmp_path / "chain"
    chain = f'{PY} {HELPERS / "fork_chain.py"} "$1" 0 & until [ -s "$1" ]; do sleep 0.01; done; exit 3'
    try:
        result = _run(config, env, "--grace", "1s", "--", "sh", "-c", chain, "sh", str(marker))
    finally:
        wait_until(lambda: not [os.kill(p, signal.SIGKILL) for p in pids_with(str(marker))], what="no chain left")
    assert result.returncode == 3, result.stderr
    assert "leftover" in result.stderr


@needs_cgroups
def test_a_hot_job_is_frozen_and_thawed(config: Path, env: dict[str, str], sensor: Path, lock_dir: Path,
                                        procs: Procs, tmp_path: Path) -> None:
    ticks, stop = tmp_path / "ticks", tmp_path / "stop"
    gate = procs.spawn(_exec(config, "--", PY, str(HELPERS / "ticker.py"), str(ticks), "1000000", str(stop)),
                       env=env)
    job = wait_until(lambda: job_pid(lock_dir), what="the job")
    wait_until(ticks.exists, what="the first tick")
    name = Path(_memory_cgroup(job)).name
    state = Path(f"{cgroups.ROOT}/freezer/{name}/freezer.state")
    if not state.exists():  # the freezer cgroup lies below ours there, wherever that is
        state = next(Path(cgroups.ROOT, "freezer").rglob(f"{name}/freezer.state"))
    set_temp(sensor, 85)
    wait_until(lambda: state.read_text().strip() == "FROZEN", what="the job frozen")
    frozen = ticks.read_text()
    set_temp(sensor, 70)
    wait_until(lambda: ticks.read_text() != frozen, what="the job thawed and ticking")
    assert state.read_text().strip() == "THAWED"
    stop.touch()
    assert gate.wait(timeout=TIMEOUT) == 0


LOGGER = str(HELPERS / "sig_logger.py")


@needs_cgroups
@pytest.mark.parametrize("left", ["running", "stopped"])
def test_a_leftover_in_the_cgroup_gets_sigcont_only_when_stopped(config: Path, env: dict[str, str], tmp_path: Path,
                                                                left: str) -> None:
    # As in the process tree (test_wrapper_faults): a running leftover that logs its signals sees SIGTERM alone
    # (and is killed after --grace); a stopped one is continued, so that it can act on its SIGTERM and end.
    log = tmp_path / "log"
    logger = f'{PY} {LOGGER} "$1" ' + ("TERM stop exit=TERM" if left == "stopped" else "TERM,CONT")
    script = (f'{logger} & pid=$!; until [ -s "$1" ]; do sleep 0.01; done; '
              + ('until [ "$(cut -d " " -f 3 /proc/$pid/stat)" = T ]; do sleep 0.01; done; ' if left == "stopped"
                 else "") + "exit 3")
    result = _run(config, env, "--grace", "1s" if left == "running" else "60s", "--", "sh", "-c", script, "sh",
                  str(log))
    assert result.returncode == 3, result.stderr
    assert "stopping 1 leftover process(es)" in result.stderr
    assert ("SIGKILL" in result.stderr) == (left == "running"), result.stderr
    assert log.read_text().split() == ["ready", "TERM"]


@needs_cgroups
def test_a_cgroup_left_by_a_killed_safegate_is_swept_by_the_next_run(config: Path, env: dict[str, str],
                                                                     lock_dir: Path, procs: Procs) -> None:
    gate = procs.spawn(_exec(config, "--", "sleep", "600"), env=env)
    job = wait_until(lambda: job_pid(lock_dir), what="the job")
    name = Path(_memory_cgroup(job)).name
    os.kill(gate.pid, signal.SIGKILL)  # the job gets SIGTERM from the kernel and ends; its cgroup stays
    gate.wait()
    wait_until(lambda: not Path(f"/proc/{job}").exists() or Path(f"/proc/{job}/stat").read_text().split()[2] == "Z",
               what="the job to end")
    assert any(Path(p).name == name for p in _ours())
    assert _run(config, env, "--", "true").returncode == 0
    assert not any(Path(p).name == name for p in _ours())


def test_cgroup_on_without_cgroups_is_exit_3_with_the_reason(nobody: Nobody) -> None:
    # As nobody, the v1 hierarchies are root's: no cgroup can be made, and `on` says why before starting.
    sensor, config = nobody.workdir / "temp", nobody.workdir / "config.toml"
    set_temp(sensor, 40)
    config.write_text(neutral_config(sensor))
    for path in (sensor, config):
        path.chmod(0o644)
    locks = nobody.workdir / "locks"
    locks.mkdir()
    locks.chmod(0o1777)  # a shared lock dir, as /run/lock/safegate is
    result = nobody.run(["-m", "safegate", "exec", "--config", str(config), "--mem", "0", "--cgroup", "on", "--",
                         "true"], env={"SAFEGATE_LOCK_DIR": str(nobody.workdir / "locks")})
    assert result.returncode == ExitCode.CONFIG, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "--cgroup on: no cgroup for the job" in lines[0] and "Traceback" not in lines[0]
    fallback = nobody.run(["-m", "safegate", "exec", "--config", str(config), "--mem", "0", "--cgroup", "auto",
                           "--", "true"], env={"SAFEGATE_LOCK_DIR": str(nobody.workdir / "locks")})
    assert fallback.returncode == 0, fallback.stderr
    assert "no cgroup for the job (" in fallback.stderr and "watching its process tree instead" in fallback.stderr


@needs_cgroups
def test_throttle_and_swap_limits_say_they_need_cgroup_v2(config: Path, env: dict[str, str]) -> None:
    result = _run(config, env, "--throttle", "on", "--max-swap", "0", "--", "true")
    assert result.returncode == 0, result.stderr
    assert "--throttle and --max-swap need cgroup v2; this job's cgroup is v1" in result.stderr


@pytest.mark.parametrize(("option", "value"), [("--throttle", "maybe"), ("--max-swap", "lots")])
def test_bad_throttle_or_swap_values_are_one_line(config: Path, env: dict[str, str], option: str, value: str) -> None:
    result = _run(config, env, option, value, "--", "true")
    assert result.returncode == ExitCode.USAGE, result.stderr
    assert len(result.stderr.splitlines()) == 1 and option in result.stderr and repr(value) in result.stderr


ESCAPE = HELPERS / "cgroup_escape.py"
LEFT = "left the job's cgroup"


def _moved(marker: Path) -> dict[str, object]:
    """What the escaping job wrote once out of its cgroup; it must really have left on every hierarchy."""
    moved: dict[str, object] = json.loads(wait_until(lambda: marker.exists() and marker.read_text(),
                                                     what="the job to leave its cgroup"))
    assert any(cgroups.PREFIX in line for line in moved["before"]), moved  # type: ignore[attr-defined]
    assert not any(cgroups.PREFIX in line for line in moved["after"]), moved  # type: ignore[attr-defined]
    return moved


@needs_cgroups
def test_a_root_job_that_leaves_its_cgroup_is_still_held_to_max_mem(config: Path, env: dict[str, str],
                                                                    procs: Procs, tmp_path: Path) -> None:
    # As root the job may write itself into its parent cgroups, out of the kernel's cap and count: safegate sees
    # its main process outside at the next sample, says so once, and holds --max-mem on it by sampling.
    log, marker = tmp_path / "log.jsonl", tmp_path / "moved"
    gate = procs.spawn(_exec(config, "--max-mem", "64M", "--log", str(log), "--", PY, str(ESCAPE), str(marker),
                             "200"), env=env, stderr=subprocess.PIPE, text=True)
    job = int(_moved(marker)["pid"])  # type: ignore[call-overload]
    procs.orphans.append(job)  # out of safegate's reach if it fails to stop it: the fixture kills it
    wait_until(lambda: gate.poll() is not None, what="safegate to stop the job that left its cgroup")
    err = stderr_of(gate)
    assert gate.returncode == ExitCode.KILLED_MEMORY, err
    assert err.count(LEFT) == 1 and f"main process (pid {job}) {LEFT}" in err, err
    events = [json.loads(line) for line in log.read_text().splitlines()]
    assert [e["pid"] for e in events if e["event"] == "warning" and e.get("left_cgroup")] == [job]
    assert [e["reason"] for e in events if e["event"] == "exit"] == ["memory"]
    summary = events[-1]
    assert summary["event"] == "summary" and summary["peak_job_memory"] >= 64 * MiB, summary
    assert not alive(job)


@needs_cgroups
def test_a_child_left_outside_the_cgroup_by_an_ended_main_process_is_stopped(config: Path, env: dict[str, str],
                                                                            procs: Procs, tmp_path: Path) -> None:
    # The main process moves out, forks and exits at once, perhaps before any sample: its child, outside the
    # cgroup and so not among the cgroup's members, is still the job's, and is stopped as a leftover.
    marker = tmp_path / "moved"
    gate = procs.spawn(_exec(config, "--max-mem", "64M", "--", PY, str(ESCAPE), str(marker), "1", "fork"), env=env,
                       stderr=subprocess.PIPE, text=True)
    child = int(_moved(marker)["pid"])  # type: ignore[call-overload]
    procs.orphans.append(child)
    err = stderr_of(gate)
    assert gate.returncode == 0, err
    assert err.count(LEFT) == 1 and "leftover" in err, err
    assert not alive(child), "the job's child outside its cgroup outlived safegate"


@needs_cgroups
def test_a_job_that_stays_in_its_cgroup_gets_no_warning(config: Path, env: dict[str, str], tmp_path: Path) -> None:
    log, marker = tmp_path / "log.jsonl", tmp_path / "stayed"
    result = _run(config, env, "--max-mem", "64M", "--log", str(log), "--", PY, str(ESCAPE), str(marker), "16",
                  "stay")
    assert result.returncode == 0, result.stderr
    assert LEFT not in result.stderr, result.stderr
    assert not [line for line in log.read_text().splitlines() if '"left_cgroup"' in line]
    assert all(cgroups.PREFIX in line for line in json.loads(marker.read_text())["after"] if ":memory:" in line)


def test_a_job_that_ends_at_once_has_not_left_its_cgroup(config: Path, env: dict[str, str]) -> None:
    # A process on its way out reads as in the root cgroup (the kernel prints "/" for an exiting task): that is
    # an end, not an escape. Before, most `exec -- true` in a cgroup warned that the job had left it.
    for _ in range(20):
        result = _run(config, env, "--max-mem", "64M", "--", "true")
        assert result.returncode == 0, result.stderr
        assert LEFT not in result.stderr, result.stderr


HIERARCHIES = ["memory", "freezer", "pids", "cpu,cpuacct", "name=systemd", ""]
PATHS = st.text(st.characters(blacklist_characters="\n\r\x0b\x0c\x1c\x1d\x1e\x85\u2028\u2029"), max_size=40)


@given(st.text(max_size=300))
def test_any_proc_cgroup_text_reads_as_a_path_or_none(text: str) -> None:
    for controller in ("memory", "pids", None):
        found = cgroup_in(text, controller)
        assert found is None or found in text


@given(st.lists(st.tuples(st.sampled_from(HIERARCHIES), PATHS), unique_by=lambda line: line[0]))
def test_the_cgroup_on_each_hierarchy_is_read_from_its_line(lines: list[tuple[str, str]]) -> None:
    text = "".join(f"{0 if not names else i + 1}:{names}:{path}\n" for i, (names, path) in enumerate(lines))
    paths = dict(lines)
    assert cgroup_in(text, "memory") == paths.get("memory")
    assert cgroup_in(text, "cpuacct") == paths.get("cpu,cpuacct")
    assert cgroup_in(text, None) == paths.get("")


class _Placed(V1Cgroup):
    def __init__(self, where: str | None) -> None:
        super().__init__({"memory": "/sys/fs/cgroup/memory/a/safegate-1-2"})
        self._where = where

    def where(self, pid: int) -> str | None:
        return self._where


@pytest.mark.parametrize(("where", "held"), [
    ("/a/safegate-1-2", True), ("/a/safegate-1-2/sub", True), ("/a/safegate-1-23", False), ("/a", False),
    ("/", False), (None, None),
])
def test_a_process_is_held_in_the_job_cgroup_or_below_it(where: str | None, held: bool | None) -> None:
    assert _Placed(where).holds(1) is held


@needs_cgroups
def test_a_kernel_breach_names_only_the_limit_that_was_hit(config: Path, env: dict[str, str],
                                                           tmp_path: Path) -> None:
    # Issue 25: a --max-mem 600M OOM kill said "the kernel enforced --max-mem 600.0 MiB and --min-available 2.0 GiB"
    # with 22 GiB free. With a floor of 1 MiB, far below what this machine has free, the cap is --max-mem's.
    log = tmp_path / "log.jsonl"
    result = _run(config, env, "--max-mem", "100M", "--min-available", "1M", "--interval", "1s", "--log", str(log),
                  "--", "sh", "-c", f"{PY} -c \"{FILL}\"; sleep 0.5; exit 0")
    assert result.returncode == ExitCode.KILLED_MEMORY, result.stderr
    line = next(x for x in result.stderr.splitlines() if "the kernel enforced" in x)
    assert "the kernel enforced --max-mem 100.0 MiB: the job's cgroup hit its cap and" in line, line
    assert "--min-available" not in line, line
    breach = next(json.loads(x) for x in log.read_text().splitlines() if '"enforced_by"' in x)
    assert breach["limit"] == "max_mem", breach
