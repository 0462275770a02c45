#!/usr/bin/env python3
"""The true overshoot below a memory floor, seen by an independent sampler: safegate with the job in a cgroup,
safegate watching the process tree, and earlyoom, on the same floor, run after run in rotating order.

Run it as root (the job cgroup and earlyoom need it) with the Python that has safegate installed:

    python bench/bench_floor.py [--runs N] [--out FILE]

Each run: floor F = MemAvailable - 1 GiB; a C hog first-touches 1 MiB chunks as fast as it can towards 4 GiB;
a thread of this bench reads MemAvailable from /proc/meminfo every millisecond. The overshoot is F minus the
lowest MemAvailable that thread saw while the hog lived (what the machine went through, not what a tool says it
saw when it decided). Also `--max-mem 300M` with the cgroup: the hog's largest RssAnon minus the cap.

Standard library only; every figure is measured on the spot. Every process started is killed in finally blocks.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import threading
import time

from common import (
    AVOID_ALL_BUT_HOG,
    available,
    bench_env,
    bench_parser,
    compile_c,
    md_table,
    median,
    publish,
    settle,
    workdir,
)

MIB = 1 << 20
HEADROOM = 1 << 30
HOG_MIB = 4096
CAP_MIB = 300
HOG_C = r"""
#include <signal.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <unistd.h>
#define CHUNK ((size_t)1 << 20)
static char *volatile keep[1 << 16];
int main(int argc, char **argv) {
    size_t cap = (size_t)strtoull(argv[1], 0, 10) << 20, done = 0, i = 0;
    prctl(PR_SET_PDEATHSIG, SIGKILL);
    if (argc > 2) sleep((unsigned)atoi(argv[2])); /* time for the bench's sampler to find it */
    while (done < cap) {
        char *p = malloc(CHUNK);
        if (!p) break;
        memset(p, 0xa5, CHUNK);
        keep[i++ & 0xffff] = p;
        done += CHUNK;
    }
    for (;;) pause();
}
"""


def rss_anon(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/status", "rb") as fh:
            for line in fh:
                if line.startswith(b"RssAnon:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


class Sampler:
    """Every millisecond, in a thread: the lowest MemAvailable, and the largest RssAnon of *pid* once set."""

    def __init__(self) -> None:
        self.lowest = available()
        self.pid: int | None = None
        self.largest = 0
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while not self.stop.is_set():
            self.lowest = min(self.lowest, available())
            if self.pid is not None:
                self.largest = max(self.largest, rss_anon(self.pid))
            time.sleep(0.001)

    def close(self) -> None:
        self.stop.set()
        self.thread.join()


def hog_pid(root: int) -> int | None:
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                with open(f"/proc/{name}/stat") as fh:
                    fields = fh.read().rsplit(")", 1)
                comm = fields[0].split("(", 1)[1]
            except (OSError, IndexError):
                continue
            if comm == "hog" and int(fields[1].split()[1]) == root:
                return int(name)
    return None


def run(argv: list[str], env: dict[str, str], watch_rss: bool = False) -> tuple[int, int, int]:
    """(exit status, lowest MemAvailable, largest RssAnon of the hog) of one run of *argv*."""
    sampler = Sampler()
    proc = subprocess.Popen(argv, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        if watch_rss:
            deadline = time.monotonic() + 10
            while sampler.pid is None and time.monotonic() < deadline and proc.poll() is None:
                sampler.pid = hog_pid(proc.pid)
        proc.wait(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        sampler.close()
    return proc.returncode, sampler.lowest, sampler.largest


def main() -> int:
    args = bench_parser(__doc__, runs=15).parse_args()
    if os.geteuid() != 0:
        print("bench_floor: run as root (the job cgroup and earlyoom need it)", file=sys.stderr)
        return 2
    cc, earlyoom = shutil.which("cc") or shutil.which("gcc"), shutil.which("earlyoom")
    if cc is None or earlyoom is None:
        print("bench_floor: needs a C compiler and earlyoom (apt-get install gcc earlyoom)", file=sys.stderr)
        return 2
    tools = ["safegate --cgroup on", "safegate --cgroup off", "earlyoom 1.7"]
    overshoot: dict[str, list[int]] = {t: [] for t in tools}
    shown = subprocess.run([earlyoom, "-h"], capture_output=True, text=True)
    version = (shown.stdout + shown.stderr).splitlines()[0:1]
    with workdir("bench-floor-") as work:
        hog = work / "hog"
        compile_c(cc, HOG_C, hog)
        (work / "config.toml").write_text('[defaults]\nmemory_margin = "0"\nmax_memory_pressure = 100\n'
                                          'competing = []\n')
        env = bench_env(SAFEGATE_LOCK_DIR=str(work / "locks"), XDG_STATE_HOME=str(work / "state"),
                        SAFEGATE_GPU="none", SAFEGATE_CONFIG=str(work / "config.toml"))
        safegate = [sys.executable, "-m", "safegate", "exec", "-q", "--mem", "0"]
        for i in range(args.runs):
            for tool in tools[i % 3:] + tools[: i % 3]:
                baseline = available()
                floor = baseline - HEADROOM
                if tool.startswith("safegate"):
                    argv = [*safegate, "--cgroup", tool.split()[-1], "--min-available", f"{floor // 1024}K", "--",
                            str(hog), str(HOG_MIB)]
                    _, lowest, _ = run(argv, env)
                else:
                    eo = subprocess.Popen([earlyoom, "-M", str(floor // 1024), "-s", "100", "-r", "0", "--prefer",
                                           "^hog$", "--avoid", AVOID_ALL_BUT_HOG], stdout=subprocess.DEVNULL,
                                          stderr=subprocess.DEVNULL)
                    try:
                        time.sleep(0.5)  # its start-up
                        _, lowest, _ = run([str(hog), str(HOG_MIB)], env)
                    finally:
                        eo.kill()
                        eo.wait()
                overshoot[tool].append(floor - lowest)
                settle(baseline, timeout=20)
                time.sleep(0.5)
        caps = []
        for _ in range(args.runs):
            _, _, largest = run([*safegate, "--cgroup", "on", "--max-mem", f"{CAP_MIB}M", "--", str(hog), "1024",
                                 "1"], env, watch_rss=True)
            caps.append(largest - CAP_MIB * MIB)
    med = {t: median(v) for t, v in overshoot.items()}
    lines = [
        "## The true overshoot below a floor (bench/bench_floor.py)",
        "",
        f"Floor = MemAvailable - 1 GiB; a C hog first-touching 1 MiB chunks towards {HOG_MIB} MiB; MemAvailable "
        f"sampled every 1 ms by the bench; {args.runs} runs per tool, rotating order. {' '.join(version)}. "
        f"Kernel {os.uname().release}, cgroup v1.",
        "",
        *md_table(["tool", "median overshoot", "min", "max"],
                  [(t, f"{med[t] / MIB:.1f} MB", f"{min(v) / MIB:.1f} MB", f"{max(v) / MIB:.1f} MB")
                   for t, v in overshoot.items()]),
        "",
        f"safegate with the cgroup against earlyoom in the same runs: {med[tools[0]] / MIB:.1f} MB vs "
        f"{med[tools[2]] / MIB:.1f} MB. Negative: MemAvailable stayed above the floor.",
        "",
        f"`--max-mem {CAP_MIB}M` with the cgroup, the hog's largest RssAnon seen minus the cap, {args.runs} runs: "
        f"median {median(caps) / MIB:.1f} MB, max {max(caps) / MIB:.1f} MB.",
    ]
    publish("\n".join(lines) + "\n", args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
