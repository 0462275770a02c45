"""The kernel's OOM choice (issue 26, item 1): the job's oom_score_adj raised (--oom-score-adj, default 500, never
below the caller's), the supervisor's kept or lowered, a real kernel OOM in one cgroup v1 memory domain taking the
job and leaving its same-sized neighbour; and earlyoom (item 4) picking the job, never safegate, with the flags
docs/recipes.md gives (the real earlyoom binary, run in the foreground with --dryrun)."""

from __future__ import annotations

import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st
from support import (
    HELPERS,
    PY,
    REPO,
    TIMEOUT,
    Procs,
    Run,
    alive,
    descendants,
    neutral_config,
    rss_anon,
    stderr_of,
    wait_until,
)

from safegate.errors import ValueParseError
from safegate.exitcodes import ExitCode
from safegate.run.procctl import SUPERVISOR_FLOOR, supervisor_score
from safegate.settings import parse_oom_score_adj

# The job prints its own score and its parent's (safegate, which forked it: --cgroup off in the neutral config).
SHOW = 'echo "job=$(cat /proc/$$/oom_score_adj) supervisor=$(cat /proc/$PPID/oom_score_adj)"'
AS_CALLER = 'echo "$1" > /proc/self/oom_score_adj && shift && exec "$@"'  # a caller at a score of its own
MiB = 1 << 20


def _scores(stdout: str) -> dict[str, int]:
    found = re.findall(r"^job=(-?\d+) supervisor=(-?\d+)$", stdout, re.M)
    assert len(found) == 1, stdout
    return {"job": int(found[0][0]), "supervisor": int(found[0][1])}


def _own() -> int:
    return int(Path("/proc/self/oom_score_adj").read_text())


def _exec(config: Path, *args: str) -> list[str]:
    return [PY, "-m", "safegate", "exec", "--config", str(config), "--mem", "0", *args]


def _as_caller(score: int, argv: list[str], env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["sh", "-c", AS_CALLER, "sh", str(score), *argv], env=env, capture_output=True, text=True,
                          timeout=TIMEOUT, stdin=subprocess.DEVNULL)


def test_the_job_is_raised_to_500_and_the_supervisor_does_not_outrank_it(run: Run, config: Path) -> None:
    if _own() > 500:
        pytest.skip(f"this test runs at oom_score_adj {_own()}, above the default")
    result = run("exec", "--config", str(config), "--mem", "0", "--", "sh", "-c", SHOW)
    assert result.returncode == 0, result.stderr
    scores = _scores(result.stdout)
    assert scores["job"] == 500
    assert scores["supervisor"] <= _own() and scores["supervisor"] <= scores["job"]


def test_the_option_and_a_profile_set_the_jobs_score(run: Run, config: Path, tmp_path: Path, sensor: Path) -> None:
    if _own() > 300:
        pytest.skip(f"this test runs at oom_score_adj {_own()}, above 300")
    result = run("exec", "--config", str(config), "--mem", "0", "--oom-score-adj", "300", "--", "sh", "-c", SHOW)
    assert result.returncode == 0, result.stderr
    assert _scores(result.stdout)["job"] == 300
    profiled = tmp_path / "profiled.toml"
    profiled.write_text(neutral_config(sensor, "[profiles.night]\noom_score_adj = 800\n"))
    result = run("exec", "--config", str(profiled), "-p", "night", "--mem", "0", "--", "sh", "-c", SHOW)
    assert result.returncode == 0, result.stderr
    assert _scores(result.stdout)["job"] == 800
    # The option wins over the profile, as for every setting.
    result = run("exec", "--config", str(profiled), "-p", "night", "--mem", "0", "--oom-score-adj", "600", "--",
                 "sh", "-c", SHOW)
    assert _scores(result.stdout)["job"] == 600


def test_a_caller_above_the_setting_keeps_its_score_for_the_job(config: Path, env: dict[str, str]) -> None:
    # Never lowered: a caller at 700 (raising needs no privilege) gets a job at 700, not the 300 asked for.
    result = _as_caller(700, _exec(config, "--oom-score-adj", "300", "--", "sh", "-c", SHOW), env)
    assert result.returncode == 0, result.stderr
    scores = _scores(result.stdout)
    assert scores["job"] == 700
    # safegate lowers its own by 500 where the kernel lets it, else keeps the caller's. Without CAP_SYS_RESOURCE
    # the kernel still lets a process go back down to the lowest score a privileged ancestor set (0 for most):
    # ask it, with the same two writes, whether 700 -> 200 is allowed here.
    lowered = subprocess.run(["sh", "-c", "echo 700 > /proc/self/oom_score_adj && echo 200 > /proc/self/oom_score_adj"],
                             capture_output=True).returncode == 0
    assert scores["supervisor"] == (200 if lowered else 700), (lowered, scores)


@pytest.mark.parametrize("value", ["1001", "-5000", "abc", "5.5", ""])
def test_a_bad_value_is_exit_2_and_one_line(run: Run, config: Path, value: str) -> None:
    result = run("exec", "--config", str(config), "--mem", "0", "--oom-score-adj", value, "--", "true")
    assert result.returncode == ExitCode.USAGE, result
    assert result.stderr == (f"safegate: --oom-score-adj: invalid oom_score_adj {value!r}: expected an integer from "
                             "-1000 to 1000\n")


@pytest.mark.parametrize(("value", "said"), [
    ("1001", "invalid oom_score_adj '1001': expected an integer from -1000 to 1000"),
    ("-1001", "invalid oom_score_adj '-1001': expected an integer from -1000 to 1000"),
    ('"abc"', "invalid oom_score_adj 'abc': expected an integer from -1000 to 1000"),
    ("true", "expected a string or number, got bool True"),
])
def test_a_bad_value_in_the_config_is_a_config_error(run: Run, tmp_path: Path, sensor: Path, value: str,
                                                     said: str) -> None:
    path = tmp_path / "bad.toml"
    path.write_text(neutral_config(sensor, f"[profiles.night]\noom_score_adj = {value}\n"))
    result = run("exec", "--config", str(path), "-p", "night", "--", "true")
    assert result.returncode == ExitCode.CONFIG, result
    assert len(result.stderr.splitlines()) == 1 and "oom_score_adj" in result.stderr, result.stderr
    assert said in result.stderr, result.stderr


def test_a_score_that_cannot_be_written_is_one_notice_and_the_job_runs(config: Path, env: dict[str, str]) -> None:
    # /proc read-only in a mount namespace of the job's own: every write fails (EROFS), reading still works.
    if shutil.which("unshare") is None or os.geteuid() != 0:
        pytest.skip("needs root and unshare(1) for a private read-only /proc")
    inner = "mount --bind /proc /proc && mount -o remount,bind,ro /proc && exec \"$@\""
    result = subprocess.run(["unshare", "--mount", "--propagation", "private", "sh", "-c", inner, "sh",
                             *_exec(config, "--", "sh", "-c", f"{SHOW}; exit 3")],
                            env=env, capture_output=True, text=True, timeout=TIMEOUT, stdin=subprocess.DEVNULL)
    assert result.returncode == 3, result.stderr  # the job ran, and its own status is safegate's
    assert _scores(result.stdout)["job"] == _own()
    notes = [line for line in result.stderr.splitlines() if "oom_score_adj" in line and "started pid" not in line]
    assert notes == [f"safegate: cannot raise the job's oom_score_adj to {max(500, _own())} (Read-only file system); "
                     f"it runs with safegate's, {_own()}"], result.stderr


@given(st.one_of(st.text(max_size=12), st.integers(-3000, 3000).map(str)))
def test_any_text_is_a_score_in_the_kernels_range_or_one_parse_error(text: str) -> None:
    try:
        value = parse_oom_score_adj(text)
    except ValueParseError as exc:
        assert str(exc).endswith("expected an integer from -1000 to 1000")
        return
    assert -1000 <= value <= 1000 and value == int(text)


@given(st.integers(-1000, 1000))
def test_the_supervisor_never_goes_above_the_caller_nor_to_unkillable(caller: int) -> None:
    score = supervisor_score(caller)
    assert score <= caller
    assert score >= SUPERVISOR_FLOOR or score == caller  # -1000 only when the caller was there already
    assert score == caller or score >= caller - 500


# --- a real kernel OOM in one memory cgroup (v1, this machine's hierarchy) --------------------------------------


def _v1_memory_base() -> Path | None:
    for line in Path("/proc/self/cgroup").read_text().splitlines():
        _, names, path = line.split(":", 2)
        if "memory" in names.split(","):
            base = Path(f"/sys/fs/cgroup/memory{path.rstrip('/')}")
            return base if (base / "memory.limit_in_bytes").exists() else None
    return None


@pytest.fixture
def oom_domain() -> Iterator[Path]:
    """A cgroup v1 memory cgroup below ours, capped at 600 MiB (swap included, where swap is accounted): one OOM
    domain whose processes the kernel chooses among. Removed after, with every process the test put in it."""
    base = _v1_memory_base()
    if base is None:
        pytest.skip("no cgroup v1 memory hierarchy here (a cgroup v2 host: the VM tests cover v2)")
    if not os.access(base, os.W_OK):
        pytest.skip(f"{base} is not writable by this user (root owns the v1 hierarchy)")
    domain = base / f"oomtest-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    domain.mkdir()
    try:
        if (domain / "memory.use_hierarchy").exists() and (domain / "memory.use_hierarchy").read_text() != "1\n":
            (domain / "memory.use_hierarchy").write_text("1")
        (domain / "memory.limit_in_bytes").write_text(str(600 * MiB))
        if (domain / "memory.memsw.limit_in_bytes").exists():
            (domain / "memory.memsw.limit_in_bytes").write_text(str(600 * MiB))  # no escape into swap
        (domain / "memory.swappiness").write_text("0")
        yield domain
    finally:
        for pid in (domain / "cgroup.procs").read_text().split():
            os.kill(int(pid), signal.SIGKILL)  # only what the test itself put in it
        wait_until(lambda: not (domain / "cgroup.procs").read_text().split(), what="the OOM domain to empty")
        domain.rmdir()


def _oom_kills(domain: Path) -> int:
    for line in (domain / "memory.oom_control").read_text().splitlines():
        if line.startswith("oom_kill "):
            return int(line.split()[1])
    return -1


def test_a_real_kernel_oom_takes_the_job_and_leaves_its_neighbour(oom_domain: Path, config: Path,
                                                                   env: dict[str, str], procs: Procs,
                                                                   tmp_path: Path) -> None:
    """Done when: in one OOM domain, the job under safegate and a neighbour of the same program and size, the
    kernel kills the job. The neighbour holds its 350 MiB first; the job grows towards the same 350 MiB and meets
    the 600 MiB cap on the way, when it is the smaller of the two: by size alone (today's main, the job at the
    caller's score) the kernel would take the neighbour. With 500 the kernel counts the job half the domain's
    cap (300 MiB) larger than it is. safegate's own watch is out of the way (no --max-mem, no
    floor, no cgroup of the job's own), and safegate runs in the domain too: it must not be taken, and reports."""
    enter = f'echo $$ > {shlex.quote(str(oom_domain / "cgroup.procs"))} && exec "$@"'
    hog = [PY, str(HELPERS / "hog.py"), "350"]
    neighbour = procs.spawn(["sh", "-c", enter, "sh", *hog, "350", "0"])
    wait_until(lambda: rss_anon(neighbour.pid) >= 350 * MiB, what="the neighbour to hold its 350 MiB")
    log = tmp_path / "log.jsonl"
    gate = procs.spawn(["sh", "-c", enter, "sh",
                        *_exec(config, "--cgroup", "off", "--min-available", "0", "--log", str(log), "--",
                               *hog, "5", "0.01")],
                       env=env, stderr=subprocess.PIPE, text=True)
    # One of the two is taken: by size alone the neighbour, and the job would then idle at its 350 MiB.
    wait_until(lambda: gate.poll() is not None or not alive(neighbour.pid), what="the kernel's OOM kill")
    assert alive(neighbour.pid), f"the kernel took the neighbour; the job is {'gone' if gate.poll() else 'alive'}"
    err = stderr_of(gate)  # type: ignore[arg-type]
    assert gate.returncode == 128 + signal.SIGKILL, err
    assert "job died of SIGKILL; exit 137" in err, err
    assert alive(neighbour.pid) and rss_anon(neighbour.pid) >= 350 * MiB
    assert _oom_kills(oom_domain) >= 1  # the kernel's OOM killer, not a signal from anyone else
    assert not descendants([gate.pid])


# --- earlyoom, as docs/recipes.md sets it up --------------------------------------------------------------------

RECIPES = (REPO / "docs" / "recipes.md").read_text()


def earlyoom_args() -> list[str]:
    """EARLYOOM_ARGS from the recipe's /etc/default/earlyoom, between its markers, as /bin/sh splits it."""
    block = RECIPES.split("<!-- earlyoom-args:", 1)[1].split("<!-- /earlyoom-args -->", 1)[0]
    line = next(line for line in block.splitlines() if line.startswith("EARLYOOM_ARGS="))
    return shlex.split(line.split("=", 1)[1])[0].split()  # the value, unquoted, then split as $EARLYOOM_ARGS is


def test_the_recipe_avoids_safegate_by_its_process_name() -> None:
    args = earlyoom_args()
    avoid = args[args.index("--avoid") + 1]
    assert re.search(avoid, "safegate") and not re.search(avoid, "python3") and not re.search(avoid, "safegate2")
    assert "--prefer" not in args and "-n" not in args  # the raised score picks the job; no notifier needed


def test_earlyoom_would_take_the_job_never_safegate(config: Path, env: dict[str, str], procs: Procs,
                                                    tmp_path: Path) -> None:
    """earlyoom picks by the kernel's oom_score, which counts oom_score_adj: with the recipe's flags it takes the
    job under safegate before its larger neighbour, and never the supervisor. Run in a PID namespace of its own,
    so only the test's processes are candidates (not other suites' on this machine), with thresholds at the
    machine's whole memory and swap, so it acts whatever is free, and --dryrun: it only says what it would do."""
    earlyoom = shutil.which("earlyoom")
    if earlyoom is None:
        pytest.skip("earlyoom is not installed here (apt-get install earlyoom)")
    if shutil.which("unshare") is None or os.geteuid() != 0:
        pytest.skip("needs root and unshare(1) for a PID namespace of the test's own")
    safegate = Path(sys.executable).parent / "safegate"
    if not safegate.exists():
        pytest.skip(f"no safegate console script beside {sys.executable}: its process name is what --avoid names")
    kib = {line.split(":")[0]: int(line.split()[1]) for line in Path("/proc/meminfo").read_text().splitlines()}
    thresholds = ["-M", f"{kib['MemTotal']},{kib['MemTotal']}"]
    if kib["SwapTotal"] > 0:
        thresholds += ["-S", f"{kib['SwapTotal']},{kib['SwapTotal']}"]
    ready = tmp_path / "ready"
    script = (
        f"{PY} {HELPERS}/hog.py 200 200 0 & echo neighbour=$!\n"
        f"{safegate} exec --config {config} --mem 0 -- {PY} {HELPERS}/hog.py 100 100 0 & echo supervisor=$!\n"
        f'until [ -e {ready} ]; do sleep 0.01; done\n'
        f'exec "$@"\n'
    )
    inside = procs.spawn(["unshare", "--pid", "--fork", "--kill-child", "--mount-proc", "sh", "-c", script, "sh",
                          earlyoom, *earlyoom_args(), *thresholds, "-r", "0", "-d", "--dryrun"],
                         env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    assert inside.stdout is not None
    deadline = threading.Timer(TIMEOUT, inside.kill)  # a silent earlyoom ends the reads below, not the suite
    deadline.daemon = True
    deadline.start()
    pids = {}
    for _ in range(2):
        name, pid = inside.stdout.readline().strip().split("=")
        pids[name] = int(pid)
    # The pids are the namespace's: map them to ours (NSpid), and wait until both hogs hold their memory.
    host = {p: _ns_pid(p) for p in descendants([inside.pid])}
    by_ns = {ns: p for p, ns in host.items() if ns is not None}
    neighbour, supervisor = by_ns[pids["neighbour"]], by_ns[pids["supervisor"]]
    job = wait_until(lambda: next((p for p in descendants([supervisor]) if rss_anon(p) >= 100 * MiB), 0),
                     what="the job to hold its 100 MiB")
    wait_until(lambda: rss_anon(neighbour) >= 200 * MiB, what="the neighbour to hold its 200 MiB")
    ns_job = _ns_pid(job)
    oom_score = int(Path(f"/proc/{supervisor}/oom_score").read_text())  # the kernel's, before earlyoom's --avoid
    ready.touch()
    seen: list[str] = []
    victims: list[int] = []
    try:
        while len(victims) < 3:  # three rounds of its choice, each over every candidate
            line = inside.stdout.readline()
            assert line, "earlyoom ended:\n" + "".join(seen[-40:])
            seen.append(line)
            if (sent := re.match(r"sending SIG\w+ to process (\d+) ", line)) is not None:
                victims.append(int(sent.group(1)))
    finally:
        deadline.cancel()
        inside.kill()  # unshare's --fork child is the namespace's init: its end takes every process in it
        inside.wait()
    text = "".join(seen)
    assert victims == [ns_job] * 3, text
    assert re.search(rf"pid +{ns_job}: .*oom_score_adj +500 ", text), text
    # The supervisor was a candidate each round, named safegate, and the recipe's --avoid took 300 off its score.
    badness = [int(b) for b in re.findall(rf"pid +{pids['supervisor']}: badness +(-?\d+) .*\"safegate\"", text)]
    assert len(badness) >= 3 and max(badness) <= oom_score - 290, (badness, oom_score, text)


def test_the_jobs_scope_asks_systemd_for_what_the_recipe_says_and_no_oomd_preference() -> None:
    """systemd-oomd must keep the job's scope a candidate: safegate asks for no ManagedOOM* property (no
    ManagedOOMPreference=avoid or omit), only those the recipe names."""
    if shutil.which("systemd-run") is None:
        pytest.skip("no systemd-run here: the scope's command line cannot be made")
    from safegate.cgroups.scope import ScopeCgroup

    scope = ScopeCgroup(user=False)
    scope.max_swap = 0
    scope.configure(100 * MiB)
    argv, _ = scope.wrap(["true"], None)
    scope.release(go=False)
    asked = {argv[i + 1].split("=", 1)[0] for i, word in enumerate(argv) if word == "-p"}
    assert asked == {"Delegate", "MemoryMax", "MemorySwapMax"}
    said = RECIPES.split("## earlyoom and systemd-oomd", 1)[1]
    assert all(f"-p {name}=" in said for name in asked) and "safegate sets no `ManagedOOM*` property" in said


def _ns_pid(pid: int) -> int | None:
    """*pid*'s number in its own (innermost) PID namespace, from NSpid in /proc/PID/status."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("NSpid:"):
                return int(line.split()[-1])
    except OSError:
        pass
    return None
