"""Issue 23: a passing check is a grant, not only an answer; a lock is re-entrant for the job that holds it.

Real shells, real GNU parallel, real flock(1), real concurrent callers: the README's own `check && job`,
launched several times at once, never runs two jobs together.
"""

from __future__ import annotations

import itertools
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from support import PY, REPO, TIMEOUT, Procs, Run, meminfo_available, neutral_config, wait_until

from safegate.exitcodes import ExitCode

JOB = """
import sys, time
start = time.time()
time.sleep(float(sys.argv[3]))
with open(sys.argv[1], "a") as fh:
    fh.write(f"{sys.argv[2]} {start} {time.time()}\\n")
"""


@pytest.fixture
def gate(tmp_path: Path, sensor: Path, env: dict[str, str]) -> dict[str, str]:
    """A profile with a lock and no need (the machine's memory stays out of the verdict), and `safegate` on PATH."""
    config = tmp_path / "config.toml"
    config.write_text(neutral_config(sensor, '[profiles.w]\nlock = "wl"\n'))
    (tmp_path / "job.py").write_text(JOB)
    return {**env, "SAFEGATE_CONFIG": str(config), "PATH": f"{Path(sys.executable).parent}:{env['PATH']}",
            "PYTHONPATH": str(REPO)}


def _spans(path: Path) -> list[tuple[str, float, float]]:
    if not path.exists():
        return []
    return sorted((n, float(a), float(b)) for n, a, b in (line.split() for line in path.read_text().splitlines()))


def _overlapping(spans: list[tuple[str, float, float]]) -> list[tuple[str, str]]:
    ordered = sorted(spans, key=lambda s: s[1])
    return [(a[0], b[0]) for a, b in itertools.pairwise(ordered) if b[1] < a[2]]


def _launch(procs: Procs, gate: dict[str, str], line: str, n: int) -> list[subprocess.Popen[bytes]]:
    return [procs.spawn(["sh", "-c", line.replace("{i}", str(i))], env=gate) for i in range(n)]


def _lock_state(run: Run, gate: dict[str, str], name: str = "wl") -> dict[str, object]:
    locks = json.loads(run("locks", "--json", env=gate).stdout)
    return next((lock for lock in locks if lock["name"] == name), {"held": False})


# --- the README's pattern, four at once -------------------------------------------------------------------------


def test_four_check_and_job_at_once_never_run_two(procs: Procs, gate: dict[str, str], tmp_path: Path,
                                                  run: Run) -> None:
    spans = tmp_path / "spans"
    line = f"safegate check -q -p w && {PY} {tmp_path / 'job.py'} {spans} {{i}} 1"
    shells = _launch(procs, gate, line, 4)
    codes = sorted(p.wait(timeout=TIMEOUT) for p in shells)
    ran = _spans(spans)
    assert len(ran) == 1 and codes == [0, 13, 13, 13], (codes, ran)
    # The pair has ended: nothing stays held, and the next check passes.
    wait_until(lambda: not _lock_state(run, gate)["held"], what="the grant to end with its job")
    assert run("check", "-q", "-p", "w", "--no-grant", env=gate).returncode == 0


def test_four_check_wait_and_job_at_once_run_one_at_a_time(procs: Procs, gate: dict[str, str],
                                                           tmp_path: Path) -> None:
    spans = tmp_path / "spans"
    line = f"safegate check -q -p w --wait && {PY} {tmp_path / 'job.py'} {spans} {{i}} 0.5"
    shells = _launch(procs, gate, line, 4)
    assert [p.wait(timeout=TIMEOUT) for p in shells] == [0, 0, 0, 0]
    ran = _spans(spans)
    assert len(ran) == 4 and not _overlapping(ran), ran


def test_two_jobs_whose_memory_fits_once_checked_at_once_start_one(procs: Procs, gate: dict[str, str],
                                                                   tmp_path: Path) -> None:
    # No lock: memory alone decides. Each needs 60% of what is available now; the grant of the first pass
    # reserves its need until its job has used it, so the second check cannot pass on the same memory.
    need = int(meminfo_available() * 0.6)
    spans = tmp_path / "spans"
    config = Path(gate["SAFEGATE_CONFIG"])
    config.write_text(config.read_text() + "[profiles.free]\nlock = false\n")
    line = f"safegate check -q -p free --mem {need} && {PY} {tmp_path / 'job.py'} {spans} {{i}} 2"
    shells = _launch(procs, gate, line, 2)
    codes = sorted(p.wait(timeout=TIMEOUT) for p in shells)
    assert codes == [0, ExitCode.MEMORY] and len(_spans(spans)) == 1, (codes, _spans(spans))


def test_gnu_parallel_limit_runs_four_jobs_one_at_a_time(procs: Procs, gate: dict[str, str], tmp_path: Path) -> None:
    if shutil.which("parallel") is None:
        pytest.skip("GNU parallel is not installed here (apt-get install parallel; .ci/run installs it)")
    spans = tmp_path / "spans"
    adapter = REPO / "docs" / "examples" / "safegate-parallel-limit"
    out = subprocess.run(["parallel", "-j4", "--limit", f"{adapter} -p w", PY, str(tmp_path / "job.py"), str(spans),
                          "{}", "0.5", ":::", "1", "2", "3", "4"], env=gate, capture_output=True, text=True,
                         timeout=TIMEOUT * 2)
    assert out.returncode == 0, out.stderr
    ran = _spans(spans)
    assert len(ran) == 4 and not _overlapping(ran), ran


# --- the shapes a grant must work for ----------------------------------------------------------------------------


def test_check_then_safegate_exec_runs_its_job(gate: dict[str, str], tmp_path: Path) -> None:
    spans = tmp_path / "spans"
    out = subprocess.run(["sh", "-c", f"safegate check -q -p w && safegate exec -p w -- {PY} {tmp_path / 'job.py'} "
                          f"{spans} x 0"], env=gate, capture_output=True, text=True, timeout=TIMEOUT)
    assert out.returncode == 0 and len(_spans(spans)) == 1, out.stderr


def test_check_then_flock_runs_its_job(gate: dict[str, str], tmp_path: Path, lock_dir: Path) -> None:
    # The job takes the flock itself: the keeper sees it waiting in /proc/locks and steps aside.
    spans = tmp_path / "spans"
    out = subprocess.run(["sh", "-c", f"safegate check -q -p w && flock {lock_dir / 'wl.lock'} {PY} "
                          f"{tmp_path / 'job.py'} {spans} x 0"], env=gate, capture_output=True, text=True,
                         timeout=TIMEOUT)
    assert out.returncode == 0 and len(_spans(spans)) == 1, out.stderr


def test_the_grant_names_its_job_and_others_see_the_lock_held(procs: Procs, gate: dict[str, str], run: Run,
                                                                tmp_path: Path) -> None:
    shell = procs.spawn(["bash", "-c", "safegate check -q -p w; sleep 600"], env=gate)
    held = wait_until(lambda: (s := _lock_state(run, gate))["held"] and s["holder"]["job_pid"] and s,
                      what="the grant bound to its job")
    sleep_pid = held["holder"]["job_pid"]
    assert Path(f"/proc/{sleep_pid}/cmdline").read_bytes().startswith(b"sleep")
    other = run("check", "-p", "w", env=gate)
    assert other.returncode == ExitCode.LOCKED and "grant" in other.stdout and str(shell.pid) in other.stdout
    os.kill(sleep_pid, 9)  # the job ends: so does the grant
    wait_until(lambda: not _lock_state(run, gate)["held"], what="the grant to end with its job")


def test_a_grant_no_job_takes_ends_after_its_lease(procs: Procs, gate: dict[str, str], run: Run) -> None:
    # The owner runs nothing after check (it waits on a pipe): the grant ends by itself.
    owner = procs.spawn(["sh", "-c", "safegate check -q -p w; read x"], env=gate, stdin=subprocess.PIPE)
    wait_until(lambda: _lock_state(run, gate)["held"], what="the grant")
    wait_until(lambda: not _lock_state(run, gate)["held"], what="the lease to pass")
    assert owner.poll() is None


def test_command_substitution_returns_when_check_exits(procs: Procs, gate: dict[str, str], run: Run,
                                                       tmp_path: Path) -> None:
    # The keeper holds none of check's descriptors: $(...) reads EOF when check exits, before the owner has
    # started its job (which it does only after that). Had the keeper kept stdout, EOF would come only when the
    # grant ended, and the job would have found the lock free, not granted to it.
    fifo = tmp_path / "go"
    os.mkfifo(fifo)
    owner = procs.spawn(["bash", "-c", f"read x < {fifo}; sleep 600"], env=gate)
    wait_until(lambda: Path(f"/proc/{owner.pid}/wchan").read_text() not in ("", "0"), what="the owner to block")
    out = subprocess.run(["safegate", "check", "--json", "-p", "w", "--grant-to", str(owner.pid)], env=gate,
                         capture_output=True, text=True, timeout=TIMEOUT)
    assert out.returncode == 0 and json.loads(out.stdout)["exit_code"] == 0
    fifo.write_text("go\n")
    state = wait_until(lambda: (s := _lock_state(run, gate))["held"] and s["holder"]["job_pid"] and s,
                       what="the grant bound to the owner's job")
    assert Path(f"/proc/{state['holder']['job_pid']}/cmdline").read_bytes().startswith(b"sleep")


def test_no_grant_to_pid_1_or_when_only_asking(gate: dict[str, str], run: Run) -> None:
    out = run("check", "-p", "w", "--grant-to", "1", env=gate)
    assert out.returncode == 0 and "no grant" in out.stderr and "safegate exec" in out.stderr
    assert run("check", "-p", "w", "--no-grant", env=gate).returncode == 0
    assert not _lock_state(run, gate)["held"]
    bad = run("check", "-p", "w", "--grant-to", "x1", env=gate)
    assert bad.returncode == ExitCode.USAGE and "--grant-to" in bad.stderr


# --- never wait on yourself ----------------------------------------------------------------------------------------


def test_nested_exec_of_the_same_lock_runs_inside_the_outer(gate: dict[str, str], tmp_path: Path) -> None:
    spans = tmp_path / "spans"
    out = subprocess.run(["safegate", "exec", "--lock", "n1", "--", "safegate", "exec", "--wait", "--timeout", "60s",
                          "--lock", "n1", "--", PY, str(tmp_path / "job.py"), str(spans), "inner", "0"],
                         env=gate, capture_output=True, text=True, timeout=TIMEOUT)
    assert out.returncode == 0, out.stderr
    assert len(_spans(spans)) == 1


NESTED_HOLD = """
import safegate, sys
with safegate.hold("x", config=sys.argv[1], mem=0) as outer:
    with safegate.hold("x", config=sys.argv[1], mem=0, wait=True, timeout=60) as inner:
        print("inside", inner.fd < 0, flush=True)
    v = safegate.check(lock="x", config=sys.argv[1], mem=0)
    print("check", v.ok, [c.reason for c in v.checks if c.name == "lock"], flush=True)
"""


def test_nested_hold_and_check_run_inside_the_outer_hold(gate: dict[str, str]) -> None:
    out = subprocess.run([PY, "-c", NESTED_HOLD, gate["SAFEGATE_CONFIG"]], env=gate, capture_output=True, text=True,
                         timeout=TIMEOUT)
    assert out.returncode == 0, out.stderr
    assert "inside True" in out.stdout and "check True" in out.stdout and "inside the job" in out.stdout


API_GRANT = """
import safegate, subprocess, sys
v = safegate.check(lock="g1", config=sys.argv[1], mem=0)
assert v.ok
# Another process, not this one's child: a sibling through a double fork would do; a new session is simpler.
other = subprocess.run(["setsid", "-w", sys.executable, "-m", "safegate", "check", "--lock", "g1", "--mem", "0", "-q",
                        "--no-grant", "--config", sys.argv[1]])
print("while", other.returncode, flush=True)
with safegate.hold("g1", config=sys.argv[1], mem=0) as held:  # takes the grant over
    print("hold", held.fd >= 0, flush=True)
v.release()
"""


def test_api_check_holds_until_release_or_a_hold_takes_it_over(gate: dict[str, str], run: Run) -> None:
    out = subprocess.run([PY, "-c", API_GRANT, gate["SAFEGATE_CONFIG"]], env=gate, capture_output=True, text=True,
                         timeout=TIMEOUT)
    assert out.returncode == 0, out.stderr
    assert "hold True" in out.stdout
    assert not _lock_state(run, gate, "g1")["held"]
