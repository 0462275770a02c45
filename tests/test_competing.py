"""Competing rules match programs, not mentions; their cost is bounded; launchers of safegate never compete.

The pure tests build processes the way the probe does (program_of over a real argv); the others run real
processes, real `sh -c` launchers and cron's empty environment, with rules that match only what the test starts.
"""

from __future__ import annotations

import itertools
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
from support import PY, TIMEOUT, Procs, Run, cmdline, descendants, neutral_config, wait_until

from safegate.config import CompetingRule
from safegate.configfile import build_config
from safegate.exitcodes import ExitCode
from safegate.policy import check_competing, scan_competing
from safegate.probes.processes import program_of
from safegate.results import Status
from safegate.snapshots import ProcessInfo, ProcessSnapshot

GiB = 1024**3
SLEEPER = "import time\ntime.sleep(600)\n"


def info(pid: int, argv: list[str], rss: int = GiB) -> ProcessInfo:
    program, args = program_of(argv)
    return ProcessInfo(pid=pid, ppid=1, cmdline=" ".join(argv), rss=rss, program=program, args=" ".join(args))


def builtin_whisper_rules() -> tuple[CompetingRule, ...]:
    return build_config({}, "(built-in)", None).profile("whisper-large-v3").competing


def test_program_of_sees_through_interpreters() -> None:
    assert program_of(["python3", "/venv/bin/whisper", "--model", "large-v3", "a.mp3"]) == (
        "whisper", ["--model", "large-v3", "a.mp3"])
    assert program_of(["/usr/bin/python3.11", "-u", "-X", "dev", "-m", "whisper", "--model", "large"]) == (
        "whisper", ["--model", "large"])
    assert program_of(["bash", "-e", "-o", "pipefail", "/srv/run.sh", "x"]) == ("run.sh", ["x"])
    assert program_of(["sh", "-c", "whisper --model large a.mp3"])[0] == "sh"
    assert program_of(["/usr/bin/time", "-v", "whisper", "--model", "large"])[0] == "time"
    assert program_of(["whisper --model large-v3 x.mp3", "600"]) == ("whisper", ["--model", "large-v3", "x.mp3", "600"])


def test_builtin_whisper_rule_matches_the_job_not_mentions() -> None:
    rules = builtin_whisper_rules()
    procs = ProcessSnapshot((
        info(10, ["python3", "/home/a/.venv/bin/whisper", "--model", "large-v3", "ep1.mp3"]),
        info(11, ["python3", "-m", "whisper", "ep2.mp3", "--model", "large"]),
        info(20, ["python3", "make_ckpt.py", "large-v3", "whisper-large-v3.pt"]),
        info(21, ["/usr/bin/time", "-v", "whisper", "--model", "large-v3", "ep3.mp3"]),
        info(22, ["sh", "-c", "whisper --model large-v3 ep4.mp3; echo done"]),
        info(23, ["python3", "/home/a/.venv/bin/whisper", "--model", "small", "ep5.mp3"], rss=1024),
    ), frozenset())
    matches, unmatched = scan_competing(procs, rules, 16 * GiB)
    blocking = sorted(m.process.pid for m in matches if m.rule.action == "block")
    assert blocking == [10, 11]
    assert unmatched == []
    result = check_competing(matches, rules)
    assert result.status is Status.FAIL
    # What matched, in full: the rule and the whole (short) command line.
    assert "program 'whisper' args 'large' matched 'whisper large'" in result.reason
    assert "python3 /home/a/.venv/bin/whisper --model large-v3 ep1.mp3" in result.reason


def test_a_quadratic_pattern_reads_a_bounded_part_and_says_so() -> None:
    rule = (CompetingRule("whisper.*large", "block"),)
    long_line = ["python3", "/tmp/x", *(["whisper" * 100] * 100)]  # 70 KB: seconds of backtracking unbounded
    matches, unmatched = scan_competing(ProcessSnapshot((info(7, long_line),), frozenset()), rule, 16 * GiB)
    assert matches == []
    assert [u.process.pid for u in unmatched] == [7]
    assert "read the first 4.0 KiB of 68.5 KiB" in unmatched[0].why
    result = check_competing(matches, rule, unmatched)
    assert result.status is Status.WARN and "not fully matched: pid 7" in result.reason
    # A match within the part read is a match, however long the rest.
    found, _ = scan_competing(ProcessSnapshot((info(8, ["whisper", "--model", "large", *long_line]),), frozenset()),
                              rule, 16 * GiB)
    assert [m.process.pid for m in found] == [8]


def test_matching_stops_at_its_budget_heaviest_first() -> None:
    ticks = itertools.count()
    rule = (CompetingRule("nomatch", "block"),)
    procs = ProcessSnapshot(tuple(info(pid, ["job", str(pid)], rss=pid * GiB) for pid in range(1, 11)), frozenset())
    # Each clock reading is one second later: the 2.5 s budget covers the first two processes tried.
    _, unmatched = scan_competing(procs, rule, 16 * GiB, budget=2.5, clock=lambda: float(next(ticks)))
    assert [u.process.pid for u in unmatched] == [8, 7, 6, 5, 4, 3, 2, 1]
    assert all(u.rule is None and "budget" in u.why for u in unmatched)


@pytest.mark.parametrize(("table", "value"), [
    ("competing = [{ pattern = '(x+x+)+y', action = \"block\" }]", "(x+x+)+y"),
    ("match = ['(a+)+$']", "(a+)+$"),
    ("competing = [{ program = 'whisper', args = '(\\d*)*z' }]", "(\\d*)*z"),
])
def test_catastrophic_patterns_are_refused_in_one_line(run: Run, tmp_path: Path, sensor: Path, table: str,
                                                       value: str) -> None:
    cfg = tmp_path / "config.toml"
    cfg.write_text(neutral_config(sensor, f"[profiles.night]\n{table}\n"))
    result = run("check", "--config", str(cfg), "-p", "night", "--mem", "0")
    assert result.returncode == ExitCode.CONFIG, result.stdout + result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and repr(value) in lines[0] and "exponential" in lines[0], result.stderr


def test_rule_keys_are_validated(run: Run, tmp_path: Path, sensor: Path) -> None:
    cfg = tmp_path / "config.toml"
    cfg.write_text(neutral_config(sensor, "[profiles.night]\ncompeting = [{ pattern = 'x', program = 'y' }]\n"))
    result = run("check", "--config", str(cfg), "-p", "night", "--mem", "0")
    assert result.returncode == ExitCode.CONFIG and "not both" in result.stderr


# --- real processes ---------------------------------------------------------------------------------------


def _script(tmp_path: Path, name: str, body: str = SLEEPER) -> Path:
    path = tmp_path / "bin" / name
    path.parent.mkdir(exist_ok=True)
    path.write_text(body)
    path.chmod(0o755)
    return path


def _competing(result: subprocess.CompletedProcess[str]) -> dict[str, list[dict[str, object]]]:
    checks = json.loads(result.stdout)["checks"]
    return next(c for c in checks if c["name"] == "competing")["values"]


def test_real_mentions_do_not_match_and_a_real_job_does(run: Run, config: Path, procs: Procs,
                                                        tmp_path: Path) -> None:
    # The built-in rule, over the real machine: whatever else runs, our mentions never match, our job does.
    whisper, ckpt = _script(tmp_path, "whisper"), _script(tmp_path, "make_ckpt.py")
    escape = "talk\x1b]0;owned\x07.mp3"
    job = procs.spawn([PY, str(whisper), "--model", "large-v3", escape])
    mention = procs.spawn([PY, str(ckpt), "large-v3", "whisper-large-v3.pt"])
    if not Path("/usr/bin/time").exists():
        pytest.skip("GNU time is not installed (/usr/bin/time)")
    timed = procs.spawn(["/usr/bin/time", "-v", PY, str(whisper), "--model", "large-v3", "timed.mp3"],
                        stderr=subprocess.DEVNULL)
    timed_job = wait_until(lambda: next(iter(descendants([timed.pid])), 0), what="the job under time")
    wait_until(lambda: all(cmdline(p) for p in (job.pid, mention.pid, timed.pid, timed_job)))
    cfg = tmp_path / "builtin-rules.toml"
    cfg.write_text(config.read_text().replace("competing = []\n", ""))
    result = run("check", "--config", str(cfg), "-p", "whisper-large-v3", "--mem", "0", "--json")
    assert result.returncode == ExitCode.COMPETING, result.stdout
    matches = {m["pid"]: m for m in _competing(result)["matches"]}
    # time(1) only names the job; the job it runs is the one that competes.
    assert mention.pid not in matches and timed.pid not in matches and timed_job in matches
    mine = matches[job.pid]
    assert mine["program"] == "whisper" and mine["user"] == "root" and mine["action"] == "block"
    assert mine["rule"] == {"pattern": None, "program": "whisper", "args": "large", "action": "block",
                            "min_rss": None}
    # The full command line, escaped: no raw ESC or BEL reaches a terminal that prints the JSON.
    assert mine["cmdline"] == f"{PY} {whisper} --model large-v3 talk\\x1b]0;owned\\x07.mp3"
    text = run("check", "--config", str(cfg), "-p", "whisper-large-v3", "--mem", "0")
    assert f"pid {job.pid} of root" in text.stdout and "\x1b" not in text.stdout


def test_a_foreign_1mib_command_line_is_matched_within_the_budget(run: Run, tmp_path: Path, sensor: Path,
                                                                   procs: Procs, request: pytest.FixtureRequest
                                                                   ) -> None:
    # Another user's process whose arguments repeat "whisper" for 1 MiB: `whisper.*large` backtracks for
    # 100 s over it when read whole. Read in part, the check answers, and names it as not fully matched.
    if os.geteuid() != 0 or shutil.which("runuser") is None:
        pytest.skip("needs root and runuser to run a process as another user (nobody)")
    python = shutil.which("python3", path="/usr/bin:/bin")
    if python is None:
        pytest.skip("no system python3 for the other user's process")
    bindir = Path(tempfile.mkdtemp(prefix="safegate-nobody-"))  # pytest's tmp_path is 0700: not nobody's
    request.addfinalizer(lambda: shutil.rmtree(bindir, ignore_errors=True))
    bindir.chmod(0o755)
    script = _script(bindir, "transcode")
    token = f"sgtest{os.getpid()}x{tmp_path.name}"
    argv = [python, str(script), token, *(["whisper" * 100] * 1500)]
    runner = procs.spawn(["runuser", "-u", "nobody", "--", *argv], stderr=subprocess.PIPE)

    def started() -> int:
        if runner.poll() is not None:
            pytest.fail(f"nobody could not start the process: {runner.stderr.read()!r}")  # type: ignore[union-attr]
        return next((p for p in descendants([runner.pid]) if token in cmdline(p)[:300]), 0)

    pid = wait_until(started, what="nobody's 1 MiB process")
    procs.orphans.append(pid)
    cfg = tmp_path / "config.toml"
    cfg.write_text(neutral_config(sensor, f"[profiles.night]\ncompeting = [{{ pattern = '{token}whisper.*large', "
                                          'action = "block" }]\n'))
    result = run("check", "--config", str(cfg), "-p", "night", "--mem", "0", "--json")
    assert result.returncode == 0, result.stdout
    values = _competing(result)
    assert values["matches"] == []
    ours = [u for u in values["unmatched"] if u["pid"] == pid]
    assert ours and ours[0]["user"] == "nobody" and "read the first" in str(ours[0]["why"])


def _safegate_bin() -> str:
    exe = Path(PY).parent / "safegate"
    if not exe.exists():
        pytest.skip(f"no safegate console script beside {PY} (install the package into this environment)")
    return str(exe)


@pytest.mark.parametrize("cron", [False, True], ids=["sh-c-launcher", "cron-env-i"])
def test_waiters_launched_through_sh_c_all_run_one_at_a_time(tmp_path: Path, sensor: Path, procs: Procs,
                                                             env: dict[str, str], cron: bool) -> None:
    # cron and pueue run each line as `sh -c LINE`; with a command after safegate, dash stays alive as its
    # parent, its command line naming the job. Four such waiters must not take each other's shells for jobs.
    # (pueue itself is not packaged here: this is its shape, a daemon's `sh -c` per task.)
    safegate = _safegate_bin()
    token = f"sgtest{os.getpid()}{tmp_path.name}"
    record = _script(tmp_path, "whisper", "import sys, time, os\nstart = time.monotonic()\ntime.sleep(0.3)\n"
                     "fd = os.open(sys.argv[-1], os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)\n"
                     "os.write(fd, f'{start} {time.monotonic()}\\n'.encode())\n")
    cfg = tmp_path / "config.toml"
    # A whole-command-line pattern, as configs written before program rules have: it sees the launchers too.
    cfg.write_text(neutral_config(sensor, f"[profiles.whisper-large-v3]\nmemory = \"0\"\n"
                                          f"competing = [{{ pattern = 'whisper --model large-v3 {token}', "
                                          'action = "block" }]\n'))
    spans, rcs = tmp_path / "spans", tmp_path / "rcs"
    line = (f"{safegate} exec --config {cfg} --wait --timeout {TIMEOUT:g}s -q -p whisper-large-v3 -- "
            f"{sys.executable} {record} --model large-v3 {token} {spans}; echo $? >> {rcs}")
    keep = ("HOME", "XDG_STATE_HOME", "XDG_CONFIG_HOME", "SAFEGATE_LOCK_DIR", "SAFEGATE_GPU")
    prefix = ["env", "-i", "PATH=/usr/bin:/bin", *(f"{k}={env[k]}" for k in keep)] if cron else []
    shells = [procs.spawn([*prefix, "sh", "-c", line], env=env) for _ in range(4)]
    assert [s.wait(timeout=TIMEOUT * 2) for s in shells] == [0, 0, 0, 0]
    assert rcs.read_text().split() == ["0", "0", "0", "0"]
    intervals = sorted(tuple(map(float, row.split())) for row in spans.read_text().splitlines())
    assert len(intervals) == 4
    assert all(b[0] >= a[1] for a, b in itertools.pairwise(intervals)), intervals


def test_an_unmanaged_job_still_blocks_a_launched_waiter(run: Run, tmp_path: Path, sensor: Path, procs: Procs,
                                                         env: dict[str, str]) -> None:
    # The launcher rule spares safegate's shells, not real jobs: a whisper started by a plain shell competes.
    token = f"sgtest{os.getpid()}{tmp_path.name}"
    whisper = _script(tmp_path, "whisper")
    job = procs.spawn(["sh", "-c", f"{PY} {whisper} --model large-v3 {token}; echo finished"])
    cfg = tmp_path / "config.toml"
    cfg.write_text(neutral_config(sensor, f"[profiles.whisper-large-v3]\ncompeting = [{{ program = 'whisper', "
                                          f"args = 'large-v3 {token}' }}]\n"))
    wait_until(lambda: any(token in cmdline(p) for p in descendants([job.pid])), what="the unmanaged job")
    inner = f"{PY} -m safegate check --config {cfg} -p whisper-large-v3 --mem 0 --json; exit $?"
    result = subprocess.run(["sh", "-c", inner], env=env, capture_output=True, text=True, timeout=TIMEOUT)
    assert result.returncode == ExitCode.COMPETING, result.stdout
    pids = [m["pid"] for m in _competing(result)["matches"]]
    assert job.pid not in pids and len(pids) == 1  # the job, not its shell
    assert token in str(_competing(result)["matches"][0]["cmdline"])
