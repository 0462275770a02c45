#!/usr/bin/env python3
"""Benchmark `safegate check` on a clean machine against one where another user is hostile (issue 13).

    python bench/bench_hostile.py [--runs N] [--out FILE]

Run it as root (the hostile user is `nobody`, through runuser), with the Python that has safegate installed.
Per round, alternating: one check on a clean machine (empty lock dir, no extra process), one with another
user's planted lock dir, and one with that lock dir and a process of theirs whose command line is 1 MiB.
Every check must exit 0: nothing planted may reserve memory, block, hang or fail it. Standard library only;
every figure is measured.

What nobody plants in the hostile lock dir: 1,000 forged holder files (one per lock, naming pid 1, alive,
with its real start time, and a 100 TiB need), forged records for the profiles' own locks, a directory at a
lock path, a mode-000 lock file, a FIFO, a symlink to /etc/passwd and a 10 MiB file at holder paths. The
1 MiB command line is ~24,000 arguments like `/srv/audio/2026/interview-00042-with-a-guest.mp3`: long, but
not the pathological repeated "whisper" of issue 13 item 8 (the cost of matching the competing rules is
issue 14's; see docs/benchmarks.md).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from common import bench_env, bench_parser, md_row, md_table, median, publish, stamp, timed_run, tree, workdir

PLANT = r"""
import json, os, secrets, sys
d = sys.argv[1]
# pid 1's real start time, as the issue's attacker did: the records name a live process, so no cleanup removes
# them and every check has to judge them again.
btime = next(int(line.split()[1]) for line in open("/proc/stat") if line.startswith("btime"))
ticks = int(open("/proc/1/stat").read().rsplit(")", 1)[1].split()[19])
forged = {"pid": 1, "start_time": btime + ticks / os.sysconf("SC_CLK_TCK"), "user": "evil", "host": "h",
          "cmdline": ["x"], "started_at": 0.0, "profile": "p", "need": 100 * 1024**4}
for i in range(1000):
    with open(os.path.join(d, f"lk{i}.holder-{secrets.token_hex(8)}.json"), "x") as fh:
        fh.write(json.dumps({**forged, "lock": f"lk{i}"}))
for lock in ("heavy", "whisper-large"):
    for name in (f"{lock}.holder.json", f"{lock}.holder-{secrets.token_hex(8)}.json"):
        with open(os.path.join(d, name), "x") as fh:
            fh.write(json.dumps({**forged, "lock": lock}))
os.mkdir(os.path.join(d, "zz.lock"))
open(os.path.join(d, "yy.lock"), "x").close()
os.chmod(os.path.join(d, "yy.lock"), 0)
os.mkfifo(os.path.join(d, "ff.holder.json"))
os.symlink("/etc/passwd", os.path.join(d, "sl.holder.json"))
with open(os.path.join(d, "big.holder.json"), "xb") as fh:
    fh.truncate(10 * 1024 * 1024)
"""


def median_ms(samples: list[float]) -> str:
    return f"{median(samples) * 1000:.1f}"


def main() -> int:
    args = bench_parser(__doc__, runs=20).parse_args()
    if os.geteuid() != 0 or shutil.which("runuser") is None:
        raise SystemExit("run as root with runuser: the hostile user is nobody")
    procs: list[subprocess.Popen[bytes]] = []
    with workdir("safegate-hostile-", mode=0o755) as base:
        try:
            sensor = base / "temp"
            sensor.write_text("45000\n")
            config = base / "config.toml"
            config.write_text(f'[thermal]\nsensors = []\nfiles = ["{sensor}"]\n')
            clean, hostile = base / "clean", base / "hostile"
            for d in (clean, hostile):
                d.mkdir()
                os.chmod(d, 0o1777)
            # The planting needs only the standard library: the system Python, which nobody may run.
            subprocess.run(["runuser", "-u", "nobody", "--", "/usr/bin/python3", "-c", PLANT,
                            str(hostile)], check=True)
            paths = [f"/srv/audio/2026/interview-{i:05d}-with-a-guest.mp3" for i in range(30000)]
            argv, size = [], 0
            for p in paths:
                if size >= 1024 * 1024:
                    break
                argv.append(p)
                size += len(p) + 1
            env = bench_env(SAFEGATE_GPU="none")
            results: dict[str, dict[str, list[float]]] = {}
            for profile in ("default", "whisper-large-v3"):
                check = [sys.executable, "-m", "safegate", "check", "-p", profile, "--mem", "0", "--margin", "0",
                         "-q", "--config", str(config)]
                runs: dict[str, list[float]] = {"clean": [], "planted": [], "hostile": []}
                for i in range(args.runs + 2):
                    first, _ = timed_run(check, {**env, "SAFEGATE_LOCK_DIR": str(clean)}, timeout=120)
                    planted, _ = timed_run(check, {**env, "SAFEGATE_LOCK_DIR": str(hostile)}, timeout=120)
                    long_cmd = subprocess.Popen(["runuser", "-u", "nobody", "--", "bash", "-c", "sleep 600; :",
                                                 *argv], stdin=subprocess.DEVNULL, start_new_session=True)
                    procs.append(long_cmd)
                    deadline = time.monotonic() + 30
                    while not any(_cmdline_size(p) >= 1024 * 1024 for p in tree(long_cmd.pid)):
                        if time.monotonic() > deadline:
                            raise SystemExit("the 1 MiB command line did not appear")
                        time.sleep(0.01)
                    second, _ = timed_run(check, {**env, "SAFEGATE_LOCK_DIR": str(hostile)}, timeout=120)
                    os.killpg(long_cmd.pid, 9)
                    long_cmd.wait()
                    if i >= 2:  # two warm-up rounds
                        runs["clean"].append(first)
                        runs["planted"].append(planted)
                        runs["hostile"].append(second)
                results[profile] = runs
            lines = [f"{stamp()}; load average at the end {os.getloadavg()[0]:.2f}.", "",
                     *md_table(["profile", "clean machine", "planted lock dir",
                                "planted lock dir + 1 MiB command line"])]
            for profile, runs in results.items():
                clean_ms = median(runs["clean"])
                cells = [f"{median_ms(runs[k])} ms ({median(runs[k]) / clean_ms:.2f}x)" for k in ("planted", "hostile")]
                lines.append(md_row(profile, f"{median_ms(runs['clean'])} ms", *cells))
            publish("\n".join(lines) + "\n", args.out, Path(args.out).with_suffix(".json") if args.out else None,
                    results)
        finally:
            for proc in procs:
                if proc.poll() is None:
                    os.killpg(proc.pid, 9)
                    proc.wait()
    return 0


def _cmdline_size(pid: int) -> int:
    try:
        return len(Path(f"/proc/{pid}/cmdline").read_bytes())
    except OSError:
        return 0


if __name__ == "__main__":
    sys.exit(main())
