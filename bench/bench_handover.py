#!/usr/bin/env python3
"""How fast a waiting `safegate exec --wait` takes over when the job before it ends (issue 23.3).

    python bench/bench_handover.py [--rounds N] [--waiters 8] [--baseline-src DIR] [--out FILE]

Per round: WAITERS `safegate exec --wait -p whisper-large-v3 -- python3 -S <tmp>/whisper --model large-v3 SPANS`
started at once, in a fresh lock dir; one is admitted, the others wait in line. Each job writes the monotonic
time it started and ended (CLOCK_MONOTONIC, the same clock in every process) and sleeps JOB seconds between. Its
command line matches the profile's own competing rule (program `whisper`, args `large`), so a waiter sees the
running job as the lock's holder and, before issue 23.5, as a competing process too. The hand-over gap is the
next job's start minus the previous job's end: it includes the job's own interpreter start-up (`python3 -S`), the
same for every variant. Jobs must never overlap (the bench stops if they do).

Variants are source trees run as `python -m safegate` with PYTHONPATH set to the tree (this checkout by default;
`--baseline-src DIR` adds another, e.g. `git worktree add /tmp/sg-main main`), alternating round by round, the
first swapping each round. The config takes the machine out of the verdict: memory need 0, margin 0, no pressure
limit, no system floor, the temperature from a file, jobs without a cgroup. Another process on the machine whose
command line matches the rule blocks every waiter: on a shared machine run the bench as root inside
`unshare --pid --fork --mount-proc`, where /proc holds only its own processes. Standard library only.
"""

from __future__ import annotations

import itertools
import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

from common import REPO, bench_env, bench_parser, md_row, md_table, median, publish, summarize, workdir

JOB = """import os, sys, time
start = time.monotonic()
time.sleep(float(sys.argv[4]))
fd = os.open(sys.argv[3], os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
os.write(fd, f"{start} {time.monotonic()} {os.getpid()}\\n".encode())
"""


def config_text(sensor: Path) -> str:
    return ("[defaults]\nmemory_margin = \"0\"\nmax_memory_pressure = 100\nmin_available = \"0\"\ncgroup = \"off\"\n"
            f"[thermal]\nsensors = []\nfiles = [{json.dumps(str(sensor))}]\n"
            "[profiles.whisper-large-v3]\nmemory = \"0\"\n")


def one_round(src: Path, base: Path, waiters: int, job_seconds: float, pycache: Path) -> tuple[list[float], float]:
    """The hand-over gaps of one round (seconds) and the CPU time its processes took."""
    work = Path(tempfile.mkdtemp(dir=base))
    (work / "locks").mkdir()
    os.chmod(work / "locks", 0o1777)
    sensor = work / "temp1_input"
    sensor.write_text("40000\n")
    cfg = work / "config.toml"
    cfg.write_text(config_text(sensor))
    job = work / "whisper"
    job.write_text(JOB)
    spans = work / "spans"
    env = bench_env(pycache=pycache, PYTHONPATH=str(src), SAFEGATE_LOCK_DIR=str(work / "locks"), SAFEGATE_GPU="none",
                    HOME=str(work), XDG_STATE_HOME=str(work / "state"), XDG_CONFIG_HOME=str(work / "config"))
    argv = [sys.executable, "-m", "safegate", "exec", "--wait", "--timeout", "600s", "-q", "--config", str(cfg),
            "-p", "whisper-large-v3", "--", sys.executable, "-S", str(job), "--model", "large-v3", str(spans),
            str(job_seconds)]
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    # cwd: `python -m` puts the working directory before PYTHONPATH, so a run from a checkout would import it.
    started = [subprocess.Popen(argv, env=env, cwd=work, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, start_new_session=True) for _ in range(waiters)]
    try:
        outputs = [p.communicate(timeout=600)[0] for p in started]
    finally:
        for p in started:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    failed = [(p.returncode, out) for p, out in zip(started, outputs, strict=True) if p.returncode != 0]
    if failed:
        raise SystemExit(f"{src}: a waiter exited {failed[0][0]}: {failed[0][1].decode(errors='replace')}")
    rows = sorted(tuple(map(float, line.split()[:2])) for line in spans.read_text().splitlines())
    if len(rows) != waiters:
        raise SystemExit(f"{src}: {len(rows)} jobs recorded, expected {waiters}")
    gaps = [b[0] - a[1] for a, b in itertools.pairwise(rows)]
    if min(gaps) < 0:
        raise SystemExit(f"{src}: two jobs overlapped: {rows}")
    shutil.rmtree(work, ignore_errors=True)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return gaps, cpu


def main() -> int:
    parser = bench_parser(__doc__)
    parser.add_argument("--rounds", type=int, default=4, help="rounds per variant (default 4)")
    parser.add_argument("--waiters", type=int, default=8)
    parser.add_argument("--job", type=float, default=0.5, help="seconds each job runs (default 0.5)")
    parser.add_argument("--src", default=str(REPO), help="the source tree measured (default: this checkout)")
    parser.add_argument("--baseline-src", help="another source tree, measured in turn with --src")
    args = parser.parse_args()
    variants = {"this tree": Path(args.src)}
    if args.baseline_src:
        variants = {"baseline": Path(args.baseline_src), **variants}
    gaps: dict[str, list[float]] = {name: [] for name in variants}
    cpu: dict[str, list[float]] = {name: [] for name in variants}
    load = os.getloadavg()[0]
    with workdir("safegate-handover-") as base:
        pycache = base / "pycache"
        order = list(variants)
        for name in order:  # one warm-up round each: bytecode compiled, page cache warm
            one_round(variants[name], base, 2, 0.05, pycache)
        for r in range(args.rounds):
            for name in order if r % 2 == 0 else order[::-1]:
                got, used = one_round(variants[name], base, args.waiters, args.job, pycache)
                gaps[name] += got
                cpu[name].append(used)
                print(f"round {r + 1} {name}: gaps ms {[round(g * 1000) for g in got]}", file=sys.stderr, flush=True)
    lines = [
        f"{args.rounds} rounds per variant of {args.waiters} waiters of a {args.job:g} s job (so "
        f"{args.waiters - 1} hand-overs a round), alternating; load average {load:.2f} at start, "
        f"{os.getloadavg()[0]:.2f} at the end; {len(os.listdir('/proc'))} entries in /proc at the end.",
        "",
        *md_table(["variant", "source", "hand-overs", "median gap", "p10", "p90", "max",
                   "CPU per round (all processes)"]),
    ]
    for name, src in variants.items():
        s = summarize(gaps[name])
        lines.append(md_row(name, f"`{src}`", s["n"], f"**{s['median'] * 1000:.0f} ms**", f"{s['p10'] * 1000:.0f}",
                            f"{s['p90'] * 1000:.0f}", f"{s['max'] * 1000:.0f}", f"{median(cpu[name]):.2f} s"))
    publish("\n".join(lines) + "\n", args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
