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

import os
import platform
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

from common import bench_env, bench_parser, loadavg, md_table, median, publish, stamp, timed_run, tree, workdir

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
        for pid in tree(proc.pid):
            try:
                started = len(Path(f"/proc/{pid}/cmdline").read_bytes()) > 1 << 20
                # Asleep in time.sleep(): its start-up no longer competes for the CPU with the check timed.
                if started and Path(f"/proc/{pid}/wchan").read_text() == "hrtimer_nanosleep":
                    return proc
            except OSError:
                pass
        time.sleep(0.01)
    raise SystemExit("the foreign process did not start")


def stop(proc: subprocess.Popen[bytes]) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    for pid in tree(proc.pid)[1:]:
        try:
            os.kill(pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
    proc.wait()


def main() -> None:
    opts = bench_parser(__doc__, runs=30).parse_args()
    rows: list[tuple[str, float, float, float]] = []
    with workdir("safegate-bench-", mode=0o755) as work:
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
        env = bench_env(HOME=str(work), XDG_STATE_HOME=str(work / "state"), SAFEGATE_LOCK_DIR=str(work / "locks"),
                        SAFEGATE_GPU="none")
        # 14: someone else's whisper large job runs on this machine (a test suite's, say); the check did all its work.
        ok = (0, 14)
        for label, text in configs.items():
            cfg = work / f"config-{len(rows)}.toml"
            cfg.write_text(text)
            argv = [sys.executable, "-m", "safegate", "check", "--config", str(cfg), "-p", "whisper-large-v3",
                    "--mem", "0", "-q"]
            clean: list[float] = []
            foreign: list[float] = []
            for i in range(WARMUP + opts.runs):
                c, _ = timed_run(argv, env, ok=ok)
                proc = foreign_process(bindir)
                try:
                    f, _ = timed_run(argv, env, ok=ok)
                finally:
                    stop(proc)
                if i >= WARMUP:
                    clean.append(c)
                    foreign.append(f)
                print(f"{label}: run {i + 1}: clean {c * 1000:.1f} ms, foreign {f * 1000:.1f} ms", file=sys.stderr)
            rows.append((label, median(clean), median(foreign), max(foreign)))
    lines = [
        f"{stamp()}; {opts.runs} timed runs per figure after {WARMUP} warm-up runs, clean and foreign "
        f"alternating; {os.cpu_count()} cores, Python {platform.python_version()}, load average "
        f"{loadavg()} at the end.",
        "",
        *md_table(["rule", "clean, median ms", "foreign 1 MiB command line, median ms", "foreign, max ms"],
                  [(label, f"{c * 1000:.1f}", f"{f * 1000:.1f}", f"{m * 1000:.1f}") for label, c, f, m in rows]),
    ]
    publish("\n".join(lines) + "\n", opts.out)


if __name__ == "__main__":
    main()
