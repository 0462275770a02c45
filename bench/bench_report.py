#!/usr/bin/env python3
"""Benchmark `safegate report` on big logs (issue 22, finding 7): 32,000 small jobs in one night, and a log of
about 100 MB of small jobs, each timed spawn to exit with its peak memory (the child's maxrss).

    python bench/bench_report.py [--jobs N] [--size-mb M] [--runs N] [--baseline PATH] [--out FILE]

Run it with the Python that has safegate installed (or name the `safegate` to time with --safegate; --baseline
names another, e.g. a venv of the commit before, timed in the same run, alternating). The logs are generated
here, line for line as `exec --log` writes them for a 1.5 s job (admitted, two samples, exit, summary; every
100th job also a warning), jobs 3 s apart so that all of them make one night: the worst case for grouping
jobs into nights. Standard library only; every figure is measured on the spot.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

from common import BenchError, bench_parser, find_safegate, md_row, md_table, median, publish, workdir


def _stamp(moment: float) -> str:
    return datetime.fromtimestamp(moment, tz=timezone.utc).isoformat(timespec="milliseconds")


def job_lines(number: int, start: float) -> list[str]:
    """One small job's lines, as exec --log writes them."""
    writer, pid = 10_000 + number % 30_000, 50_000 + number % 100_000
    argv = ["python", "train.py", "--shard", str(number), "--epochs", "1"]
    head = {"safegate_pid": writer}
    events = [
        {"time": _stamp(start), "event": "admitted", "message": f"started pid {pid} (profile default, lock heavy): "
         + " ".join(argv), **head, "pid": pid, "profile": "default", "lock": "heavy", "argv": argv,
         "max_mem": None, "min_available": 2147483648, "max_temp": 80.0, "max_gpu_mem": None,
         "cgroup": f"/sys/fs/cgroup/safegate-{writer}-{number}"},
    ]
    for i in range(2):
        memory = 300_000 + 4096 * ((number * 7 + i) % 997)
        events.append({"time": _stamp(start + i), "event": "sample", "message": f"job {memory} B, MemAvailable 23 GiB",
                       **head, "job_memory": memory, "available": 24_516_517_888 - memory, "pressure": 0.0,
                       "job_pressure": None, "temp": 45.0 + (number % 20), "gpus": [], "job_gpu_memory": None})
    if number % 100 == 99:
        events.append({"time": _stamp(start + 1.2), "event": "warning", "message": "job memory 1.6 GiB is 80% of "
                       "--max-mem 2.0 GiB", **head, "job_memory": 1717986918, "max_mem": 2147483648})
    end = start + 1.5
    events.append({"time": _stamp(end), "event": "exit", "message": "job exited 0", **head, "exit_code": 0,
                   "reason": "exited", "status": 0, "signal": None})
    events.append({"time": _stamp(end), "event": "summary", "message": "duration 2s, peak job memory 324.0 KiB",
                   **head, "duration": 1.5, "peak_job_memory": 331776, "lowest_available": 24516517888,
                   "highest_temp": 64.0, "peak_job_gpu_memory": None, "highest_gpu_temp": None,
                   "highest_job_pressure": None, "reason": "exited", "exit_code": 0})
    return [json.dumps(event) + "\n" for event in events]


def write_log(path: Path, *, jobs: int | None = None, size: int | None = None) -> int:
    """*jobs* jobs, or as many as make *size* bytes; all of them ended by now. The number of jobs written."""
    estimate = jobs if jobs is not None else (size or 0) // 1500 + 1
    start = time.time() - 3 * estimate - 3600
    written = number = 0
    with path.open("w") as out:
        while (jobs is not None and number < jobs) or (size is not None and written < size):
            text = "".join(job_lines(number, start + 3 * number))
            out.write(text)
            written += len(text)
            number += 1
    return number


def run_once(safegate: str, log: Path, out: Path, timeout: float) -> tuple[float, int, int, str]:
    """(wall seconds, peak RSS in bytes, exit code, first line of output) of `SAFEGATE report LOG -o OUT`; the
    peak RSS is the child's own, from wait4()."""
    started = time.perf_counter()
    proc = subprocess.Popen([safegate, "report", str(log), "-o", str(out)], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT)
    deadline = started + timeout
    assert proc.stdout is not None
    output = b""
    os.set_blocking(proc.stdout.fileno(), False)
    while True:
        pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
        chunk = proc.stdout.read() or b""
        output += chunk
        if pid:
            break
        if time.perf_counter() > deadline:
            proc.kill()
            os.wait4(proc.pid, 0)
            return float("inf"), 0, -9, f"killed after {timeout:.0f} s"
        time.sleep(0.01)
    elapsed = time.perf_counter() - started
    proc.returncode = os.waitstatus_to_exitcode(status)
    output += proc.stdout.read() or b""
    first = output.decode(errors="replace").strip().splitlines()
    return elapsed, usage.ru_maxrss * 1024, proc.returncode, first[0] if first else ""


def main() -> int:
    parser = bench_parser(__doc__, runs=3, runs_help="timed runs per log and safegate (default 3)")
    parser.add_argument("--jobs", type=int, default=32_000, help="jobs in the first log (default 32,000)")
    parser.add_argument("--size-mb", type=float, default=100.0, help="size of the second log in MB (default 100)")
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds before a run is killed")
    parser.add_argument("--safegate", help="the safegate to time (default: the one beside this python)")
    parser.add_argument("--baseline", help="another safegate to time in the same run, alternating")
    args = parser.parse_args()
    tools = [("now", find_safegate(args.safegate))] + ([("baseline", args.baseline)] if args.baseline else [])
    for _, path in tools:
        if shutil.which(path) is None:
            raise BenchError(f"no safegate at {path}")
    with workdir("safegate-bench-report-") as work:
        logs = []
        small = work / "small.jsonl"
        count = write_log(small, jobs=args.jobs)
        logs.append((f"{count:,} jobs ({small.stat().st_size / 1e6:.1f} MB)", small))
        big = work / "big.jsonl"
        count = write_log(big, size=int(args.size_mb * 1e6))
        logs.append((f"{big.stat().st_size / 1e6:.1f} MB ({count:,} jobs)", big))
        results: dict[tuple[str, str], list[tuple[float, int]]] = {}
        notes = []
        for label, log in logs:
            for run in range(args.runs):
                order = tools if run % 2 == 0 else tools[::-1]
                for name, path in order:
                    out = work / f"{name}.html"
                    elapsed, rss, code, first = run_once(path, log, out, args.timeout)
                    print(f"{label} {name} run {run + 1}: {elapsed:.2f} s, {rss / 2**20:.0f} MiB, exit {code}: "
                          f"{first}", file=sys.stderr)
                    if code != 0:
                        notes.append(f"{name} on {label}: exit {code}: {first}")
                    results.setdefault((label, name), []).append((elapsed, rss))
                    if run == 0 and code == 0:
                        notes.append(f"{name} on {label}: {first}; page {out.stat().st_size / 1e6:.1f} MB")
    lines = [f"`bench/bench_report.py --jobs {args.jobs} --size-mb {args.size_mb:g} --runs {args.runs}`, "
             f"{datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC, {platform.node()}, {os.cpu_count()} CPUs, "
             f"Python {platform.python_version()}; medians of {args.runs} runs, wall time spawn to exit, "
             "peak RSS of the report process.", "",
             *md_table(["log", "safegate", "wall time", "peak RSS"])]
    for label, _ in logs:
        for name, _ in tools:
            samples = results[(label, name)]
            wall = median(s[0] for s in samples)
            peak = median(s[1] for s in samples)
            lines.append(md_row(label, name, f"{wall:.2f} s", f"{peak / 2**20:.0f} MiB"))
    lines += ["", *[f"- {note}" for note in notes]]
    publish("\n".join(lines) + "\n", args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
