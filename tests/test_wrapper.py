"""safegate exec as a process wrapper, as nohup, scripts, cron and shells use it (issue 12, first items)."""

from __future__ import annotations

import os
import signal
import subprocess
from pathlib import Path

from support import HELPERS, PY, TIMEOUT, Procs, Run, job_pid, wait_until

from safegate.exitcodes import ExitCode

SIGIGN_OF_JOB = "print([l for l in open('/proc/self/status') if l.startswith('SigIgn')][0].split()[1])"


def _exec(config: Path, *args: str) -> list[str]:
    return [PY, "-m", "safegate", "exec", "--config", str(config), "--mem", "0", *args]


def test_signals_the_caller_ignores_stay_ignored_in_the_job(config: Path, env: dict[str, str]) -> None:
    # As under nohup (HUP) or as a script's background job (INT, QUIT): the job inherits what is ignored.
    result = subprocess.run(["sh", "-c", 'trap "" HUP INT; exec "$@"', "sh",
                             *_exec(config, "-q", "--lock", "b1", "--", PY, "-c", SIGIGN_OF_JOB)],
                            env=env, capture_output=True, text=True, timeout=TIMEOUT, stdin=subprocess.DEVNULL)
    assert result.returncode == 0, result.stderr
    mask = int(result.stdout.strip(), 16)
    assert mask & (1 << (signal.SIGHUP - 1)) and mask & (1 << (signal.SIGINT - 1)), hex(mask)


def test_nohup_style_hup_neither_kills_nor_reaches_the_job(config: Path, env: dict[str, str], lock_dir: Path,
                                                           procs: Procs) -> None:
    gate = procs.spawn(["sh", "-c", 'trap "" HUP; exec "$@"', "sh", *_exec(config, "-q", "--", "sleep", "600")],
                       env=env, stderr=subprocess.PIPE)
    wait_until(lambda: job_pid(lock_dir), what="the job")
    wait_until(lambda: "safegate" in Path(f"/proc/{gate.pid}/cmdline").read_text(), what="safegate in place of sh")
    os.kill(gate.pid, signal.SIGHUP)  # ignored at delivery: gone once kill() returns
    os.kill(gate.pid, signal.SIGUSR1)  # forwarded: the job dies of it, so the HUP did not
    assert gate.wait(timeout=TIMEOUT) == 128 + signal.SIGUSR1


def test_real_time_signals_have_names_and_codes(run: Run, config: Path) -> None:
    rt = signal.SIGRTMIN + 6
    died = run("exec", "--config", str(config), "--mem", "0", "--", "sh", "-c", f"kill -{rt} $$")
    assert died.returncode == 128 + rt and "Traceback" not in died.stderr, died.stderr
    assert "died of SIGRTMIN+6" in died.stderr
    warned = run("exec", "--config", str(config), "--mem", "0", "--max-mem", "400M", "--warn-signal", str(rt),
                 "--", PY, str(HELPERS / "hog.py"), "376", "8", "0.01")
    assert warned.returncode == 128 + rt, warned.stderr  # the hog has no handler: the signal ends it
    assert "sending SIGRTMIN+6 to the job" in warned.stderr


def test_the_job_gets_exactly_the_callers_environment_in_the_c_locale(config: Path, env: dict[str, str]) -> None:
    # The job is env(1), not Python: a Python job would coerce its own locale.
    caller = {k: v for k, v in env.items() if not k.startswith(("LC_", "LANG"))} | {"LANG": "C"}
    result = subprocess.run(_exec(config, "-q", "--", "env", "-0"), env=caller, capture_output=True, timeout=TIMEOUT,
                            stdin=subprocess.DEVNULL)
    assert result.returncode == 0, result.stderr
    seen = dict(item.split("=", 1) for item in result.stdout.decode().split("\0") if item)
    assert seen == caller  # no LC_CTYPE=C.UTF-8 from Python's locale coercion in safegate


def test_closed_stdout_and_stderr_never_become_safegates_files(config: Path, env: dict[str, str],
                                                               lock_dir: Path) -> None:
    result = subprocess.run(["sh", "-c", 'exec "$@" >&- 2>&-', "sh",
                             *_exec(config, "--lock", "x", "--", "sh", "-c", "echo into-stdout; echo into-stderr >&2")],
                            env=env, capture_output=True, text=True, timeout=TIMEOUT, stdin=subprocess.DEVNULL)
    assert result.returncode == 0
    assert (lock_dir / "x.lock").read_bytes() == b""  # the job's fd 1/2 were /dev/null, not the lock file


# Catchable signals beyond the classic six: each must reach the job (which dies of it: 128+N from safegate's own,
# normal exit) instead of killing safegate (which would show as a negative return code, the job left behind).
EXTRA = [signal.SIGALRM, signal.SIGVTALRM, signal.SIGPROF, signal.SIGIO, signal.SIGPWR, signal.SIGXCPU,
         signal.SIGRTMIN, signal.SIGRTMIN + 6, signal.SIGRTMAX]


def _forwarded(config: Path, env: dict[str, str], lock_dir: Path, signum: int) -> tuple[int, int | None]:
    lock = f"sig{int(signum)}"
    gate = subprocess.Popen(_exec(config, "-q", "--lock", lock, "--", "sleep", "600"), env=env,
                            stdin=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        job = wait_until(lambda: job_pid(lock_dir, lock), what=f"the job of {lock}")
        os.kill(gate.pid, signum)
        return gate.wait(timeout=TIMEOUT), job
    finally:
        if gate.poll() is None:
            os.killpg(gate.pid, signal.SIGKILL)
            gate.wait()


def test_every_catchable_signal_is_forwarded(config: Path, env: dict[str, str], lock_dir: Path) -> None:
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(max_workers=4) as pool:
        results = list(pool.map(lambda s: _forwarded(config, env, lock_dir, s), EXTRA))
    assert [code for code, _ in results] == [128 + int(s) for s in EXTRA]
    assert not [job for _, job in results if job is not None and Path(f"/proc/{job}").exists()]


def _blocked_check(config: Path, env: dict[str, str], *args: str, **streams: object) -> int:
    cmd = [PY, "-m", "safegate", args[0], "--config", str(config), "--mem", "1000T", *args[1:]]
    return subprocess.run(cmd, env=env, stdin=subprocess.DEVNULL, timeout=TIMEOUT, **streams).returncode  # type: ignore[call-overload]


def test_outcomes_do_not_depend_on_whether_the_report_could_be_printed(config: Path, env: dict[str, str]) -> None:
    with open("/dev/full", "w") as full:
        assert _blocked_check(config, env, "check", "-q", stderr=full) == ExitCode.MEMORY
        assert _blocked_check(config, env, "check", stdout=full) == ExitCode.MEMORY
        assert _blocked_check(config, env, "check", "--json", stdout=full) == ExitCode.MEMORY
        # --wait goes on waiting (and says so on a full stderr) until its timeout, then gives the blocking code.
        assert _blocked_check(config, env, "exec", "--wait", "--timeout", "1s", "--", "true",
                              stderr=full) == ExitCode.MEMORY
    # A reader that is gone (closed pipe): safegate's own status is still the blocking code.
    piped = subprocess.run(["bash", "-c", '"$@" | true; exit "${PIPESTATUS[0]}"', "bash", PY, "-m", "safegate",
                            "check", "--config", str(config), "--mem", "1000T"], env=env, stdin=subprocess.DEVNULL,
                           timeout=TIMEOUT)
    assert piped.returncode == ExitCode.MEMORY


def test_a_log_that_would_block_or_was_planted_is_refused_before_the_job_starts(run: Run, config: Path,
                                                                              tmp_path: Path) -> None:
    marker = tmp_path / "ran"
    fifo = tmp_path / "events.fifo"
    os.mkfifo(fifo)
    result = run("exec", "--config", str(config), "--mem", "0", "--log", str(fifo), "--", "touch", str(marker))
    assert result.returncode == ExitCode.USAGE and not marker.exists(), result.stderr
    assert "is a FIFO or socket" in result.stderr and len(result.stderr.strip().splitlines()) == 1
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o1777)
    target = tmp_path / "victim"
    planted = shared / "night.jsonl"
    planted.symlink_to(target)
    if os.geteuid() == 0:
        os.lchown(planted, 65534, 65534)  # another user's link (nobody's), as /tmp allows anyone to make
        result = run("exec", "--config", str(config), "--mem", "0", "--log", str(planted), "--", "touch", str(marker))
        assert result.returncode == ExitCode.USAGE and not marker.exists() and not target.exists(), result.stderr
        assert "symlink of user 65534" in result.stderr
        os.lchown(planted, os.geteuid(), os.getegid())
    # One's own link is followed, as the kernel follows it.
    result = run("exec", "--config", str(config), "--mem", "0", "-q", "--log", str(planted), "--", "true")
    assert result.returncode == 0, result.stderr
    assert '"event": "summary"' in target.read_text()
