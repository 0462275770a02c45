#!/usr/bin/env python3
"""Benchmark `safegate check` on a clean machine against one where another user runs a process whose command
line is 1 MiB of repeated "whisper" (issue 13 item 8: unbounded, `whisper.*large` took 100 s over it).

Run it with the Python that has safegate installed, as root to run the foreign process as `nobody`
(otherwise it runs as yourself, detached, which matches the same way):

    python bench/bench_long_cmdline.py [--runs N] [--out FILE]

Two rules are timed, each clean and with the foreign process, alternating run by run (the process is started
before and killed after each "foreign" run): the built-in whisper-large-v3 profile (program `whisper`, args
`large`) and a config rule `pattern = 'whisper.*large'` (quadratic under Python's re; linear on RE2). Wall time
of the whole command, spawn to exit. Standard library only; every figure is measured on the spot.
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

WARMUP = 3
SLEEPER = "import time\ntime.sleep(600)\n"


def foreign_process(bindir: Path) -> subprocess.Popen[bytes]:
    """`python3 BINDIR/whisper whisper...whisper` (1 MiB), as nobody when we are root."""
    python = shutil.which("python3", path="/usr/bin:/bin") or sys.executable
    argv = [python, str(bindir / "whisper"), *(["whisper" * 100] * 1500)]
    if os.geteuid() == 0 and shutil.which("runuser"):
        argv = ["runuser", "-u", "nobody", "--", *argv]
    proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        for pid in [proc.pid, *children(proc.pid)]:
            try:
                started = len(Path(f"/proc/{pid}/cmdline").read_bytes()) > 1 << 20
                # Asleep in time.sleep(): its start-up no longer competes for the CPU with the check timed.
                if started and Path(f"/proc/{pid}/wchan").read_text() == "hrtimer_nanosleep":
                    return proc
            except OSError:
                pass
        time.sleep(0.01)
    raise SystemExit("the foreign process did not start")


def children(pid: int) -> list[int]:
    try:
        return [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []


def stop(proc: subprocess.Popen[bytes]) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    for pid in children(proc.pid):
        try:
            os.kill(pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
    proc.wait()


def timed(argv: list[str], env: dict[str, str]) -> float:
    t0 = time.perf_counter()
    done = subprocess.run(argv, env=env, stdin=subprocess.DEVNULL, capture_output=True, text=True, check=False)
    elapsed = time.perf_counter() - t0
    # 14: someone else's whisper large job runs on this machine (a test suite's, say); the check did all its work.
    if done.returncode not in (0, 14):
        raise SystemExit(f"{' '.join(argv)} exited {done.returncode}: {done.stdout[-400:]} {done.stderr[-400:]}")
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=30)
    parser.add_argument("--out")
    opts = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="safegate-bench-"))
    work.chmod(0o755)
    bindir = work / "bin"
    bindir.mkdir(mode=0o755)
    (bindir / "whisper").write_text(SLEEPER)
    (bindir / "whisper").chmod(0o755)
    temp = work / "temp1_input"
    temp.write_text("45000\n")
    neutral = ('[defaults]\nmemory_margin = "0"\nmax_memory_pressure = 100\n'
               f'[thermal]\nsensors = []\nfiles = ["{temp}"]\n')
    configs = {
        "built-in rule (program whisper, args large)": neutral,
        "pattern 'whisper.*large'": neutral + "[profiles.whisper-large-v3]\n"
                                              "competing = [{ pattern = 'whisper.*large', action = \"block\" }]\n",
    }
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SAFEGATE_", "SLURM_"))}
    env.update(HOME=str(work), XDG_STATE_HOME=str(work / "state"), SAFEGATE_LOCK_DIR=str(work / "locks"),
               SAFEGATE_GPU="none")
    rows = []
    try:
        for label, text in configs.items():
            cfg = work / f"config-{len(rows)}.toml"
            cfg.write_text(text)
            argv = [sys.executable, "-m", "safegate", "check", "--config", str(cfg), "-p", "whisper-large-v3",
                    "--mem", "0", "-q"]
            clean: list[float] = []
            foreign: list[float] = []
            for i in range(WARMUP + opts.runs):
                c = timed(argv, env)
                proc = foreign_process(bindir)
                try:
                    f = timed(argv, env)
                finally:
                    stop(proc)
                if i >= WARMUP:
                    clean.append(c)
                    foreign.append(f)
                print(f"{label}: run {i + 1}: clean {c * 1000:.1f} ms, foreign {f * 1000:.1f} ms", file=sys.stderr)
            rows.append((label, statistics.median(clean), statistics.median(foreign), max(foreign)))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    lines = [
        f"Run {time.strftime('%Y-%m-%d %H:%M:%S UTC', time.gmtime())}: `python bench/bench_long_cmdline.py "
        f"--runs {opts.runs}`; {opts.runs} timed runs per figure after {WARMUP} warm-up runs, clean and foreign "
        f"alternating; {os.cpu_count()} cores, Python {platform.python_version()}, load average "
        f"{' '.join(Path('/proc/loadavg').read_text().split()[:3])} at the end.",
        "",
        "| rule | clean, median ms | foreign 1 MiB command line, median ms | foreign, max ms |",
        "|---|---|---|---|",
        *(f"| {label} | {c * 1000:.1f} | {f * 1000:.1f} | {m * 1000:.1f} |" for label, c, f, m in rows),
    ]
    report = "\n".join(lines) + "\n"
    print(report)
    if opts.out:
        Path(opts.out).write_text(report)


if __name__ == "__main__":
    main()
