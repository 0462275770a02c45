#!/usr/bin/env python3
"""Benchmark `safegate exec`: how fast it stops a memory hog, against earlyoom, and what watching costs.

Run it as root with the Python that has safegate installed (the sampling is timed in-process):

    python bench/bench_exec.py [--quick] [--out FILE] [--raw FILE]

1. Fill rate: a tiny C hog (compiled with gcc at start) first-touches 64 MiB chunks as fast as it can;
   the time it takes alone to reach 1 GiB gives the machine's fill rate.
2. Reaction to `--max-mem 1G`: overshoot (the job's memory at the breach minus the limit) in MB and in
   milliseconds of filling, and the estimated time from crossing the limit to safegate's exit.
3. `--min-available F` against earlyoom on the same floor F, alternating run by run: how far MemAvailable
   fell below F before each one acted.
4. Overhead: safegate's own CPU time while a quiet job runs, as percent of one core, without and with
   --log (the timeline's samples).
5. Cost growth: JobTree.rescan/refresh/memory and read_available with 1 to 1,000 processes in the job.

Standard library only. Every figure is measured on the spot; nothing is hard-coded. Every process the
bench starts is killed in finally blocks, also on Ctrl-C, SIGTERM and SIGHUP.
"""

from __future__ import annotations

import argparse
import contextlib
import glob
import json
import math
import os
import re
import select
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from common import (
    AVOID_ALL_BUT_HOG,
    BenchError,
    DeferredStop,
    available,
    bench_env,
    bench_parser,
    compile_c,
    find_safegate,
    first_line,
    interrupt_on_signals,
    loadavg,
    log,
    machine_facts,
    machine_section,
    md_row,
    md_table,
    median,
    meminfo,
    publish,
    quick_defaults,
    read_text,
    safegate_missing,
    settle,
    signals_ignored,
    stamp,
    summarize,
    workdir,
)

if TYPE_CHECKING:
    from safegate.probes.jobtree import JobTree

MIB = 1 << 20
GIB = 1 << 30
MB = 10**6  # overshoots are reported in MB (10^6 bytes) and rates in GB/s (10^9 bytes/s)
GB = 10**9
RATE_CAP_MIB = 1024  # part 1: the hog alone, to 1 GiB
MAX_MEM = "1G"  # part 2
MAX_MEM_BYTES = GIB
MAX_MEM_HOG_MIB = 4096
FLOOR_DROP = GIB  # part 3: F = MemAvailable - 1 GiB
FLOOR_HOG_MIB = 3072
RUN_TIMEOUT = 60.0  # a hog run that has not ended by then failed (the killer never acted)
DEFAULT_RUNS = 20
QUICK_RUNS = 3
DEFAULT_RATE_RUNS = 10
QUICK_RATE_RUNS = 3
DEFAULT_GAP = 1.0
DEFAULT_OVERHEAD_RUNS = 5
QUICK_OVERHEAD_RUNS = 1
DEFAULT_OVERHEAD_SECONDS = 60
QUICK_OVERHEAD_SECONDS = 10
DEFAULT_STARTUP_RUNS = 10
QUICK_STARTUP_RUNS = 3
STEADY_SKIP = 3.0  # part 4, steady state: CPU readings from this many seconds after spawn on
DEFAULT_COUNTS = (1, 10, 100, 1000)
QUICK_COUNTS = (1, 10, 100)
DEFAULT_CALLS = 50
QUICK_CALLS = 20
TARGET_OVERSHOOT_MS = 50.0
TARGET_OVERHEAD_PCT = 1.0
CLK_TCK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100

HOG_C = r"""
/* bench_exec.py's memory hog: malloc 64 MiB chunks and memset them, up to argv[1] MiB, then sleep. */
#include <signal.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <unistd.h>
#define CHUNK ((size_t)64 << 20)
static char *volatile keep[1 << 16]; /* keeps the compiler from dropping the stores */
int main(int argc, char **argv) {
    size_t cap = (size_t)strtoull(argc > 1 ? argv[1] : "1024", 0, 10) << 20, done = 0, i = 0;
    prctl(PR_SET_PDEATHSIG, SIGKILL); /* dies with its parent, even a SIGKILLed bench */
    while (done < cap) {
        size_t n = cap - done < CHUNK ? cap - done : CHUNK;
        char *p = malloc(n);
        if (!p) break;
        memset(p, 0xa5, n); /* not 0: malloc+memset(0) may become calloc, which touches nothing */
        keep[i++ & 0xffff] = p;
        done += n;
    }
    for (;;) pause();
}
"""

# earlyoom is started through this, so it dies with the bench even when the bench is SIGKILLed: a stray
# earlyoom with the bench's high floor would go on killing the biggest process on the machine.
PDEATH_EXEC = (
    "import ctypes, os, signal, sys\n"
    "ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL, 0, 0, 0)  # PR_SET_PDEATHSIG\n"
    "if os.getppid() != int(sys.argv[1]):\n"
    "    sys.exit(1)\n"
    "os.execv(sys.argv[2], sys.argv[2:])\n"
)

# Part 5: a child that starts N `sleep 600` and waits; on EOF on stdin (the bench closed it, or died) or
# SIGTERM it kills and reaps them. The sleeps end by themselves after 600 s in any case.
SPAWNER = r"""
import signal, subprocess, sys
signal.signal(signal.SIGTERM, lambda *_: sys.exit(1))
signal.signal(signal.SIGINT, signal.SIG_IGN)
procs = []
try:
    for _ in range(int(sys.argv[1])):
        procs.append(subprocess.Popen(["sleep", "600"], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                      stderr=subprocess.DEVNULL))
    print("ready", flush=True)
    sys.stdin.read()
finally:
    for p in procs:
        p.kill()
    for p in procs:
        p.wait()
"""


# --- small helpers -----------------------------------------------------------------------------------


def num(value: float) -> str:
    magnitude = abs(value)
    if magnitude >= 100:
        return f"{value:.0f}"
    if magnitude >= 10:
        return f"{value:.1f}"
    return f"{value:.2f}" if magnitude >= 1 else f"{value:.3f}"


def stat_row(label: str, samples: Sequence[float], scale: float = 1.0) -> str:
    """| label | n | median | p10 | p90 | min | max |, each value multiplied by *scale*."""
    if not samples:
        return md_row(label, 0, *[""] * 5)
    s = summarize([x * scale for x in samples])
    return md_row(label, f"{s['n']:.0f}", f"**{num(s['median'])}**", *(num(s[k]) for k in ("p10", "p90", "min", "max")))


STAT_HEAD = md_table(["measure", "n", "median", "p10", "p90", "min", "max"])


def stat_fields(pid: int) -> list[str] | None:
    """Fields of /proc/PID/stat after comm (state first), or None when gone."""
    raw = read_text(f"/proc/{pid}/stat")
    end = raw.rfind(")")
    return raw[end + 2 :].split() if end >= 0 else None


def cpu_ticks(pid: int) -> int | None:
    """utime + stime of the process itself (not its children), in clock ticks."""
    fields = stat_fields(pid)
    return int(fields[11]) + int(fields[12]) if fields and len(fields) > 12 else None


def rss(pid: int) -> int:
    fields = read_text(f"/proc/{pid}/statm").split()
    return int(fields[1]) * os.sysconf("SC_PAGE_SIZE") if len(fields) > 1 else 0


def parents() -> dict[int, int]:
    out: dict[int, int] = {}
    for name in os.listdir("/proc"):
        if name.isdigit():
            fields = stat_fields(int(name))
            if fields and len(fields) > 1:
                out[int(name)] = int(fields[1])
    return out


def descendants_of(root: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for child, parent in parents().items():
        children.setdefault(parent, []).append(child)
    found: list[int] = []
    stack = [root]
    while stack:
        for child in children.get(stack.pop(), ()):
            if child not in found:
                found.append(child)
                stack.append(child)
    return found


def pids_running(exe: str) -> list[int]:
    """Live (not zombie) processes whose executable is *exe*."""
    out = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            if os.readlink(f"/proc/{name}/exe") != exe:
                continue
        except OSError:
            continue
        fields = stat_fields(int(name))
        if fields and fields[0] not in ("Z", "X"):
            out.append(int(name))
    return out


def wait_exit(proc: subprocess.Popen[Any], timeout: float) -> float | None:
    """time.time() when *proc* exits, or None after *timeout*. The process is left unreaped (a zombie), so
    its /proc/PID/stat still holds its final CPU times; reap it with proc.wait()."""
    try:
        fd = os.pidfd_open(proc.pid)
    except (AttributeError, OSError):
        fd = -1
    if fd >= 0:
        try:
            ready, _, _ = select.select([fd], [], [], timeout)
        finally:
            os.close(fd)
        return time.time() if ready else None
    deadline = time.monotonic() + timeout  # no pidfd: poll every millisecond
    while time.monotonic() < deadline:
        if os.waitid(os.P_PID, proc.pid, os.WEXITED | os.WNOWAIT | os.WNOHANG) is not None:
            return time.time()
        time.sleep(0.001)
    return None


def steady_available(timeout: float = 5.0) -> int:
    """MemAvailable once two readings 100 ms apart differ by less than 8 MiB (or after *timeout*)."""
    deadline = time.monotonic() + timeout
    last = available()
    while True:
        time.sleep(0.1)
        now = available()
        if abs(now - last) < 8 * MIB or time.monotonic() > deadline:
            return now
        last = now


def iso_time(text: str) -> float:
    return datetime.fromisoformat(text).timestamp()


def read_events(path: Path) -> list[dict[str, Any]]:
    events = []
    for line in read_text(str(path)).splitlines():
        with contextlib.suppress(ValueError):
            record = json.loads(line)
            if isinstance(record, dict):
                events.append(record)
    return events


def event(events: list[dict[str, Any]], kind: str) -> dict[str, Any] | None:
    return next((e for e in events if e.get("event") == kind), None)


# --- the processes the bench starts ---------------------------------------------------------------------

class Procs:
    """Every process the bench starts, by kind; stop() ends one with everything below it, stop_all() the rest.

    kinds: safegate (its job below it: the hog or sleep), hog, earlyoom, spawner (N sleeps below it).
    """

    def __init__(self, hog: Path) -> None:
        self.hog = str(hog)
        self.items: list[tuple[str, subprocess.Popen[Any]]] = []

    def start(self, kind: str, argv: list[str], **kwargs: Any) -> subprocess.Popen[Any]:
        with DeferredStop():
            proc: subprocess.Popen[Any] = subprocess.Popen(argv, **kwargs)
            self.items.append((kind, proc))
        return proc

    def stop(self, proc: subprocess.Popen[Any]) -> None:
        """End *proc* and what runs below it, reap it, forget it. Signals wait until this is done."""
        with signals_ignored():
            kind = next((k for k, p in self.items if p is proc), "")
            self._end(kind, proc)
            self.items = [(k, p) for k, p in self.items if p is not proc]

    def _end(self, kind: str, proc: subprocess.Popen[Any]) -> None:
        if kind == "spawner" and proc.poll() is None:
            with contextlib.suppress(OSError):
                if proc.stdin is not None:
                    proc.stdin.close()  # the spawner kills and reaps its sleeps on EOF
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=20)
            if proc.poll() is None:
                with contextlib.suppress(OSError):
                    os.killpg(proc.pid, signal.SIGKILL)  # its own session: the sleeps are in its group
        if proc.poll() is None:
            # Below safegate: the job (it is safegate's subreaped tree); below a spawner: its sleeps.
            for pid in reversed(descendants_of(proc.pid)):
                with contextlib.suppress(OSError):
                    os.kill(pid, signal.SIGKILL)
            with contextlib.suppress(OSError):
                proc.kill()
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=10)
        for stream in (proc.stdin, proc.stdout, proc.stderr):
            if stream is not None:
                with contextlib.suppress(OSError):
                    stream.close()

    def kill_hogs(self) -> int:
        """SIGKILL every live process running our hog binary, wherever it ended up; how many there were."""
        found = pids_running(self.hog)
        for pid in found:
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)
        return len(found)

    def stop_all(self) -> list[str]:
        """Stop everything still recorded and every stray hog; what had to be stopped, for the report."""
        left = [f"{kind} {proc.pid}" for kind, proc in self.items if proc.poll() is None]
        for _, proc in list(self.items):
            self.stop(proc)
        stray = self.kill_hogs()
        if stray:
            left.append(f"{stray} stray hog(s)")
        return left


# --- the test bed -----------------------------------------------------------------------------------------


class Bed:
    def __init__(self, tmp: Path, safegate_exe: str, *, cc: str | None) -> None:
        self.tmp = tmp
        self.safegate = safegate_exe
        (self.tmp / "locks").mkdir(mode=0o700)
        (self.tmp / "logs").mkdir()
        self.config = self.tmp / "config.toml"
        self.config.write_text('[defaults]\nmemory_margin = "0"\nmax_memory_pressure = 100\n'
                               "[thermal]\nsensors = []\n", encoding="utf-8")
        # exec records each run's history in XDG_STATE_HOME.
        self.env = bench_env(pycache=self.tmp / "pycache", SAFEGATE_LOCK_DIR=str(self.tmp / "locks"),
                             XDG_STATE_HOME=str(self.tmp / "state"))
        self.hog = self.tmp / "hog"
        self.cc_version = ""
        if cc is not None:
            compile_c(cc, HOG_C, self.hog)
            self.cc_version = first_line([cc, "--version"])
        self.runs = 0

    def log_path(self, name: str) -> Path:
        self.runs += 1
        return self.tmp / "logs" / f"{self.runs:04d}-{name}.jsonl"

    def exec_argv(self, options: list[str], job: list[str], log_file: Path | None = None) -> list[str]:
        argv = [self.safegate, "exec", *options, "--mem", "0", "--config", str(self.config), "-q"]
        if log_file is not None:
            argv += ["--log", str(log_file)]
        return [*argv, "--", *job]


def run_safegate(bed: Bed, procs: Procs, options: list[str], job: list[str], name: str,
                 timeout: float = RUN_TIMEOUT) -> dict[str, Any]:
    """One `safegate exec` run: exit code, spawn and exit times (time.time()), its log's events."""
    log_file = bed.log_path(name)
    err_file = log_file.with_suffix(".stderr")
    with open(err_file, "wb") as err:
        t0 = time.time()
        proc = procs.start("safegate", bed.exec_argv(options, job, log_file), env=bed.env,
                           stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=err)
        try:
            t_exit = wait_exit(proc, timeout)
        finally:
            procs.stop(proc)
    return {"rc": proc.returncode, "spawn": t0, "exit": t_exit, "events": read_events(log_file),
            "stderr": read_text(str(err_file)).strip()}


def gap(seconds: float) -> None:
    if seconds > 0:
        time.sleep(seconds)


# --- 1. fill rate -----------------------------------------------------------------------------------------


def time_fill(bed: Bed, procs: Procs, cap_mib: int) -> float:
    """Seconds from spawning the hog alone until it holds *cap_mib* MiB and sleeps (polled every 2 ms)."""
    cap = cap_mib * MIB
    t0 = time.perf_counter()
    proc = procs.start("hog", [str(bed.hog), str(cap_mib)], stdin=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + RUN_TIMEOUT
        while True:
            if rss(proc.pid) >= cap:
                fields = stat_fields(proc.pid)
                if fields and fields[0] == "S":
                    return time.perf_counter() - t0
            if proc.poll() is not None:
                raise BenchError(f"the hog exited {proc.returncode} before reaching {cap_mib} MiB")
            if time.monotonic() > deadline:
                raise BenchError(f"the hog did not reach {cap_mib} MiB in {RUN_TIMEOUT:g} s")
            time.sleep(0.002)
    finally:
        procs.stop(proc)


def bench_rate(bed: Bed, procs: Procs, runs: int, pause: float) -> dict[str, Any]:
    gap(pause)
    warmup = time_fill(bed, procs, RATE_CAP_MIB)
    times = []
    for i in range(runs):
        gap(pause)
        times.append(time_fill(bed, procs, RATE_CAP_MIB))
        log(f"   run {i + 1}/{runs}: {RATE_CAP_MIB * MIB / times[-1] / GB:.2f} GB/s")
    rates = [RATE_CAP_MIB * MIB / t for t in times]
    return {"warmup": warmup, "times": times, "rates": rates, "rate": median(rates)}


# --- 2. reaction to --max-mem ------------------------------------------------------------------------------


def bench_max_mem(bed: Bed, procs: Procs, runs: int, pause: float, rate: float) -> dict[str, Any]:
    rows: list[dict[str, Any]] = []
    failures: list[str] = []
    for i in range(runs):
        gap(pause)
        run = run_safegate(bed, procs, ["--max-mem", MAX_MEM, "--grace", "5s"],
                           [str(bed.hog), str(MAX_MEM_HOG_MIB)], "maxmem")
        stray = procs.kill_hogs()
        admitted, breach = event(run["events"], "admitted"), event(run["events"], "breach")
        row: dict[str, Any] = {"rc": run["rc"], "exited": run["exit"] is not None, "stray_hogs": stray}
        if run["exit"] is None:
            failures.append(f"run {i + 1}: safegate had not exited after {RUN_TIMEOUT:g} s (killed)")
        elif admitted is None or breach is None or "max_mem" not in breach:
            failures.append(f"run {i + 1}: exit {run['rc']}, no --max-mem breach in the log; "
                            f"stderr: {run['stderr'][:300]!r}")
        else:
            t_adm, t_breach, t_exit = iso_time(admitted["time"]), iso_time(breach["time"]), run["exit"]
            job_exit = event(run["events"], "exit")
            job_mem, limit = int(breach["job_memory"]), int(breach["max_mem"])
            own_rate = job_mem / (t_breach - t_adm) if t_breach > t_adm else float("nan")
            row.update({
                "admitted": t_adm, "breach": t_breach, "exit": t_exit, "job_memory": job_mem, "max_mem": limit,
                "overshoot": job_mem - limit, "own_rate": own_rate,
                "crossing_rate": t_adm + limit / rate, "crossing_own": t_adm + limit / own_rate,
                "job_gone": iso_time(job_exit["time"]) if job_exit is not None else None,
            })
            log(f"   run {i + 1}/{runs}: exit {run['rc']}, overshoot {(job_mem - limit) / MB:.1f} MB, "
                f"{own_rate / GB:.2f} GB/s")
        rows.append(row)
    return {"rows": rows, "failures": failures}


# --- 3. --min-available vs earlyoom -------------------------------------------------------------------------


def find_earlyoom(install: bool, notes: list[str]) -> str | None:
    found = shutil.which("earlyoom") or _install_earlyoom(install, notes)
    if found is None:
        return None
    usage = subprocess.run([found, "-h"], capture_output=True, text=True, check=False)
    missing = [flag for flag in ("-M", "-s", "-r", "--prefer", "--avoid") if flag not in usage.stdout + usage.stderr]
    if missing:
        notes.append(f"{found} -h does not list {', '.join(missing)}: part 3's comparison was skipped")
        return None
    return found


def _install_earlyoom(install: bool, notes: list[str]) -> str | None:
    if not install:
        notes.append("earlyoom is not installed and --no-install was given: part 3's comparison was skipped")
        return None
    apt = shutil.which("apt-get")
    if apt is None or os.geteuid() != 0:
        notes.append("earlyoom is not installed and cannot be installed here (needs apt-get and root): "
                     "part 3's comparison was skipped")
        return None
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    log("   earlyoom not found: apt-get install -y earlyoom")
    for attempt in ([], [[apt, "update"]]):
        for pre in attempt:
            subprocess.run(pre, env=env, stdin=subprocess.DEVNULL, stdout=sys.stderr, stderr=sys.stderr, check=False)
        out = subprocess.run([apt, "install", "-y", "earlyoom"], env=env, stdin=subprocess.DEVNULL,
                             stdout=sys.stderr, stderr=sys.stderr, check=False)
        if out.returncode == 0 and shutil.which("earlyoom"):
            notes.append("earlyoom was not installed; the bench installed it with `apt-get install -y earlyoom`"
                         + (" (after `apt-get update`)" if attempt else "")
                         + ". On a machine with systemd the package also enables its own earlyoom service.")
            return shutil.which("earlyoom")
    notes.append("earlyoom is not installed and `apt-get install -y earlyoom` failed: part 3's comparison "
                 "was skipped")
    return None


class Reader:
    """Collects a process's output lines, each with the time.time() it arrived and MemAvailable then."""

    def __init__(self, stream: Any) -> None:
        self.lines: list[tuple[float, int, str]] = []
        self.thread = threading.Thread(target=self._run, args=(stream,), daemon=True)
        self.thread.start()

    def _run(self, stream: Any) -> None:
        with contextlib.suppress(OSError, ValueError):
            for line in stream:
                self.lines.append((time.time(), available(), line.rstrip("\n")))

    def wait_for(self, pattern: str, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if any(re.search(pattern, text) for _, _, text in self.lines):
                return True
            time.sleep(0.01)
        return False


def earlyoom_run(eo_exe: str, procs: Procs, bed: Bed, floor_kib: int) -> dict[str, Any]:
    """earlyoom watching, the hog started alone as the bench's child; both stopped before returning."""
    argv = [eo_exe, "-M", str(floor_kib), "-s", "100", "-r", "0", "--prefer", "^hog$", "--avoid", AVOID_ALL_BUT_HOG]
    eo = procs.start("earlyoom", [sys.executable, "-c", PDEATH_EXEC, str(os.getpid()), *argv],
                     stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1)
    try:
        reader = Reader(eo.stdout)
        if not reader.wait_for(r"SIGKILL when", 10.0):
            raise BenchError("earlyoom did not print its start-up limits within 10 s: "
                             + " / ".join(t for _, _, t in reader.lines)[:500])
        avail_start = available()
        t_start = time.time()
        hog = procs.start("hog", [str(bed.hog), str(FLOOR_HOG_MIB)], stdin=subprocess.DEVNULL)
        try:
            t_exit = wait_exit(hog, RUN_TIMEOUT)
        finally:
            procs.stop(hog)
        time.sleep(0.2)  # its last lines ("process exited after ...")
    finally:
        procs.stop(eo)
    reader.thread.join(timeout=2)
    return {"lines": reader.lines, "avail_start": avail_start, "t_start": t_start, "t_exit": t_exit,
            "status": hog.returncode, "pid": hog.pid, "argv": argv}


def parse_earlyoom(run: dict[str, Any], floor: int) -> dict[str, Any]:
    """available-at-kill from earlyoom's own "mem avail" line before it acted; else MemAvailable sampled when
    its "sending SIG..." line arrived."""
    lines: list[tuple[float, int, str]] = run["lines"]
    kill_at = next((i for i, (_, _, t) in enumerate(lines) if re.search(r"sending SIG\w+ to process \d+", t)), None)
    out: dict[str, Any] = {"killed": kill_at is not None, "status": run["status"], "exited": run["t_exit"] is not None}
    banner = next((t for _, _, t in lines if "sending SIGTERM when mem" in t), "")
    out["banner"] = banner
    if kill_at is None:
        return out
    t_line, avail_line, text = lines[kill_at]
    victim = re.search(r"sending (SIG\w+) to process (\d+)", text)
    assert victim is not None
    out["victim_ok"] = int(victim.group(2)) == run["pid"]
    out["signal"] = victim.group(1)
    rss_match = re.search(r"VmRSS (\d+) MiB", text)
    mem = None
    for _, _, earlier in reversed(lines[:kill_at]):
        mem = re.search(r"mem avail:\s*(\d+) of\s*(\d+) MiB", earlier)
        if mem:
            break
    if mem:
        out["available"] = int(mem.group(1)) * MIB
        out["source"] = "earlyoom's line"
    else:
        out["available"] = avail_line
        out["source"] = "sampled by the bench"
    out["overshoot"] = floor - out["available"]
    if rss_match and t_line > run["t_start"]:
        out["own_rate"] = int(rss_match.group(1)) * MIB / (t_line - run["t_start"])
    out["headroom"] = run["avail_start"] - floor
    return out


def bench_floor(bed: Bed, procs: Procs, eo_exe: str | None, runs: int, pause: float) -> dict[str, Any]:
    sg: list[dict[str, Any]] = []
    eo: list[dict[str, Any]] = []
    failures: list[str] = []
    for i in range(runs):
        baseline = steady_available()
        floor_kib = (baseline - FLOOR_DROP) // 1024
        floor = floor_kib * 1024
        order = ["safegate", "earlyoom"] if i % 2 == 0 else ["earlyoom", "safegate"]
        for tool in order:
            if tool == "earlyoom" and eo_exe is None:
                continue
            settle(baseline)
            gap(pause)
            if tool == "safegate":
                avail_start = available()
                run = run_safegate(bed, procs, ["--min-available", f"{floor_kib}K"],
                                   [str(bed.hog), str(FLOOR_HOG_MIB)], "floor")
                stray = procs.kill_hogs()
                admitted, breach = event(run["events"], "admitted"), event(run["events"], "breach")
                row: dict[str, Any] = {"rc": run["rc"], "stray_hogs": stray, "headroom": avail_start - floor}
                if run["exit"] is None or admitted is None or breach is None or "available" not in breach:
                    failures.append(f"pair {i + 1}, safegate: exit {run['rc']}, no --min-available breach; "
                                    f"stderr: {run['stderr'][:300]!r}")
                else:
                    t_adm, t_breach = iso_time(admitted["time"]), iso_time(breach["time"])
                    row.update({"available": int(breach["available"]), "min_available": int(breach["min_available"]),
                                "overshoot": floor - int(breach["available"])})
                    if int(breach["min_available"]) != floor:
                        failures.append(f"pair {i + 1}: safegate's floor {breach['min_available']} != {floor}")
                    if t_breach > t_adm and breach.get("job_memory"):
                        row["own_rate"] = int(breach["job_memory"]) / (t_breach - t_adm)
                    log(f"   pair {i + 1}/{runs}, safegate: exit {run['rc']}, "
                        f"{row['overshoot'] / MB:.1f} MB below the floor")
                sg.append(row)
            else:
                assert eo_exe is not None
                result = parse_earlyoom(earlyoom_run(eo_exe, procs, bed, floor_kib), floor)
                result["stray_hogs"] = procs.kill_hogs()
                if not result["exited"]:
                    failures.append(f"pair {i + 1}, earlyoom: the hog still ran after {RUN_TIMEOUT:g} s (killed)")
                if not result["killed"]:
                    failures.append(f"pair {i + 1}, earlyoom: no kill in its output")
                elif not result["victim_ok"]:
                    raise BenchError(f"earlyoom killed a process other than the hog (pair {i + 1}); stopping")
                else:
                    log(f"   pair {i + 1}/{runs}, earlyoom: {result['overshoot'] / MB:.1f} MB below the floor "
                        f"({result['source']})")
                eo.append(result)
    return {"safegate": sg, "earlyoom": eo, "failures": failures}


# --- 4. overhead ---------------------------------------------------------------------------------------------


def overhead_run(bed: Bed, procs: Procs, job: list[str], poll: bool, limit: float,
                 timeline: bool = False) -> dict[str, Any]:
    """CPU ticks of the safegate process itself: every second while it runs (when *poll*), and at its exit
    (read from the zombie before it is reaped, so nothing is missed). With *timeline*, exec runs with --log, so
    it also writes its `sample` events (one a second far from every limit); the log's samples are counted."""
    log_file = bed.log_path("overhead-log" if timeline else "overhead")
    err_file = log_file.with_suffix(".stderr")
    with open(err_file, "wb") as err:
        t0 = time.monotonic()
        proc = procs.start("safegate", bed.exec_argv([], job, log_file if timeline else None), env=bed.env,
                           stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=err)
        readings: list[tuple[float, int]] = []
        final: int | None = None
        wall = 0.0
        try:
            deadline = t0 + limit
            while final is None and time.monotonic() < deadline:
                if wait_exit(proc, 1.0 if poll else deadline - time.monotonic()) is not None:
                    wall = time.monotonic() - t0
                    final = cpu_ticks(proc.pid)
                    break
                ticks = cpu_ticks(proc.pid)
                if ticks is not None:
                    readings.append((time.monotonic() - t0, ticks))
        finally:
            procs.stop(proc)
    if final is None:
        raise BenchError(f"safegate exec -- {' '.join(job)} did not end within {limit:g} s")
    if proc.returncode != 0:
        raise BenchError(f"safegate exec -- {' '.join(job)} exited {proc.returncode}: "
                         f"{read_text(str(err_file)).strip()[:300]!r}")
    samples = sum(1 for e in read_events(log_file) if e.get("event") == "sample") if timeline else 0
    return {"cpu": final / CLK_TCK, "wall": wall, "readings": readings, "samples": samples}


def bench_overhead(bed: Bed, procs: Procs, startup_runs: int, runs: int, seconds: int) -> dict[str, Any]:
    overhead_run(bed, procs, ["true"], poll=False, limit=RUN_TIMEOUT)  # warm-up: fills the temp bytecode cache
    startup = [overhead_run(bed, procs, ["true"], poll=False, limit=RUN_TIMEOUT) for _ in range(startup_runs)]
    cpu0, wall0 = median([r["cpu"] for r in startup]), median([r["wall"] for r in startup])
    log(f"   start-up alone: {cpu0 * 1000:.0f} ms CPU, {wall0 * 1000:.0f} ms wall (median of {startup_runs})")
    idle: list[dict[str, Any]] = []
    logged: list[dict[str, Any]] = []
    for i in range(runs):
        # Without and with --log alternate (the first of each pair swapping), so a drift in the machine's speed
        # or load falls on both alike.
        for timeline in ((False, True) if i % 2 == 0 else (True, False)):
            r = overhead_run(bed, procs, ["sleep", str(seconds)], poll=True, limit=seconds + RUN_TIMEOUT,
                             timeline=timeline)
            r["pct"] = (r["cpu"] - cpu0) / (r["wall"] - wall0) * 100
            steady = [(t, ticks) for t, ticks in r["readings"] if t >= STEADY_SKIP]
            if len(steady) >= 2 and steady[-1][0] > steady[0][0]:
                r["steady_pct"] = (steady[-1][1] - steady[0][1]) / CLK_TCK / (steady[-1][0] - steady[0][0]) * 100
            (logged if timeline else idle).append(r)
            what = f"with --log ({r['samples']} samples)" if timeline else "without --log"
            log(f"   run {i + 1}/{runs} {what}: {r['cpu'] * 1000:.0f} ms CPU in {r['wall']:.1f} s; "
                f"overhead {r['pct']:.3f}%")
    return {"startup": startup, "idle": idle, "logged": logged, "seconds": seconds}


# --- 5. cost growth ------------------------------------------------------------------------------------------


def timed(fn: Callable[[], object], calls: int, before: Callable[[], object] | None = None) -> list[float]:
    """Seconds per call of *fn*, each timed alone; *before* runs untimed ahead of each call."""
    for _ in range(2):
        if before is not None:
            before()
        fn()
    out = []
    for _ in range(calls):
        if before is not None:
            before()
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return out


def wait_line(proc: subprocess.Popen[Any], timeout: float) -> str:
    assert proc.stdout is not None
    ready, _, _ = select.select([proc.stdout], [], [], timeout)
    return proc.stdout.readline().strip() if ready else ""


def time_tree(tree: JobTree, calls: int) -> dict[str, list[float]]:
    """Seconds per call of each JobTree step, and of a whole sample, on *tree*."""
    from safegate.probes.jobtree import read_available

    def sample() -> None:
        tree.refresh()
        tree.memory(precise=False)
        read_available()

    def act() -> None:
        tree.refresh(force_scan=True)
        tree.memory(precise=True)
        read_available()

    return {
        "rescan": timed(tree.rescan, calls),
        "refresh": timed(tree.refresh, calls, before=tree.rescan),
        "rss": timed(lambda: tree.memory(precise=False), calls),
        "pss": timed(lambda: tree.memory(precise=True), calls),
        "available": timed(read_available, calls),
        "sample": timed(sample, calls, before=tree.rescan),
        "act": timed(act, calls),
    }


def bench_jobtree(bed: Bed, procs: Procs, counts: Sequence[int], calls: int, notes: list[str]) -> list[dict[str, Any]]:
    from safegate.probes.jobtree import JobTree

    rows: list[dict[str, Any]] = []
    for count in counts:
        need = count * MIB + GIB  # a generous guess per sleep; never leave less than 1 GiB
        if available() < need:
            rows.append({"count": count, "skipped": f"needs about {need / GIB:.1f} GiB available"})
            continue
        spawner = procs.start("spawner", [sys.executable, "-c", SPAWNER, str(count)], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, start_new_session=True)
        try:
            if wait_line(spawner, 60 + count * 0.05) != "ready":
                raise BenchError(f"the spawner did not start {count} sleeps in time")
            tree = JobTree(root=spawner.pid)
            deadline = time.monotonic() + 30
            while True:  # every sleep found, and each one has exec'd sleep
                tree.rescan()
                if len(tree.pids) == count and all(read_text(f"/proc/{p}/comm").strip() == "sleep"
                                                   for p in tree.pids):
                    break
                if time.monotonic() > deadline:
                    raise BenchError(f"{count} sleeps not all visible below the spawner")
                time.sleep(0.05)
            in_proc = sum(1 for name in os.listdir("/proc") if name.isdigit())
            row: dict[str, Any] = {"count": count, "in_proc": in_proc}
            row.update(time_tree(tree, calls))
            if len(tree.pids) != count:
                notes.append(f"part 5: {len(tree.pids)} of {count} sleeps left at the end of the timing")
            rows.append(row)
            log(f"   {count} processes: rescan {median(row['rescan']) * 1e6:.0f} us, "
                f"sample {median(row['sample']) * 1e6:.0f} us")
        finally:
            procs.stop(spawner)
    if bed.hog.exists():
        # PSS walks the page tables, so it grows with the memory mapped, not only with the process count.
        hog = procs.start("hog", [str(bed.hog), str(RATE_CAP_MIB)], stdin=subprocess.DEVNULL)
        try:
            deadline = time.monotonic() + RUN_TIMEOUT
            while not (rss(hog.pid) >= RATE_CAP_MIB * MIB and (stat_fields(hog.pid) or ["?"])[0] == "S"):
                if time.monotonic() > deadline or hog.poll() is not None:
                    raise BenchError("the hog did not reach 1 GiB for part 5")
                time.sleep(0.01)
            hog_tree = JobTree(root=hog.pid)
            hog_tree.add(hog.pid)
            rows.append({"count": 1, "label": f"1 (the hog, holding {RATE_CAP_MIB} MiB)", "in_proc": None,
                         "rss": timed(lambda: hog_tree.memory(precise=False), calls),
                         "pss": timed(lambda: hog_tree.memory(precise=True), calls)})
        finally:
            procs.stop(hog)
    return rows


# --- the report ------------------------------------------------------------------------------------------------


def page_reporting() -> str:
    """Whether a virtio balloon with free page reporting hands freed guest memory back to the host."""
    for dev in sorted(glob.glob("/sys/bus/virtio/devices/*")):
        if read_text(f"{dev}/device").strip() == "0x0005":
            features = read_text(f"{dev}/features").strip()
            if len(features) > 5 and features[5] == "1":
                return ("virtio balloon with free page reporting: freed memory can go back to the host, and "
                        "touching it again is then slower (see the notes)")
            return "virtio balloon without free page reporting"
    return "no virtio balloon"


def bench_facts(bed: Bed, earlyoom: str | None) -> list[tuple[str, str]]:
    thp = read_text("/sys/kernel/mm/transparent_hugepage/enabled").strip() or "?"
    others = [line for line in first_lines(["pgrep", "-a", "-x", "earlyoom"]) if line]
    return [
        *machine_facts("; bytecode cached in a temp PYTHONPYCACHEPREFIX"),
        ("RAM", f"{meminfo('MemTotal') / GIB:.1f} GiB total, {available() / GIB:.1f} GiB available at start; "
                f"swap {meminfo('SwapTotal') / GIB:.1f} GiB; vm.overcommit_memory "
                f"{read_text('/proc/sys/vm/overcommit_memory').strip() or '?'}"),
        ("transparent huge pages", thp),
        ("memory ballooning", page_reporting()),
        ("hog compiler", bed.cc_version or "none"),
        ("earlyoom", f"{first_line([earlyoom, '-v'])} ({earlyoom})" if earlyoom else "not used"),
        ("other earlyoom processes at start", "; ".join(others) if others else "none"),
    ]


def first_lines(argv: list[str]) -> list[str]:
    try:
        out = subprocess.run(argv, capture_output=True, text=True, timeout=10, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return []
    return out.stdout.strip().splitlines()


def verdict(ok: bool) -> str:
    return "**met**" if ok else "**NOT met**"


def fill_regime_note(results: dict[str, Any]) -> str:
    """Whether parts 2 and 3 filled memory at the rate part 1 measured (a VM may not, from run to run)."""
    base = results["rate"]["rate"]
    seen = [f"part 1 {base / GB:.2f}"]
    off = []
    groups = [("part 2", [r.get("own_rate") for r in results.get("max_mem", {}).get("rows", [])])]
    floor = results.get("floor", {})
    groups += [(f"part 3 {tool}", [r.get("own_rate") for r in floor.get(tool, [])])
               for tool in ("safegate", "earlyoom")]
    for name, values in groups:
        rates = [v for v in values if isinstance(v, float) and math.isfinite(v)]
        if rates:
            m = median(rates)
            seen.append(f"{name} {m / GB:.2f}")
            if abs(m - base) > 0.25 * base:
                off.append(name)
    text = "median fill rates, GB/s: " + ", ".join(seen) + ". "
    if off:
        text += (f"{', '.join(off)} filled more than 25% faster or slower than part 1: for those, the figures at "
                 "the run's own rate are the ones to read. ")
    return text + ("The fill rate of a VM can change between runs: with free page reporting, memory the host has "
                   "taken back is slower to touch again (0.45-0.65 against 1.6-1.9 GB/s were both seen on the 2-core "
                   "dev VM, minutes apart).")


def report(args: argparse.Namespace, facts: list[tuple[str, str]], results: dict[str, Any]) -> str:
    notes: list[str] = list(results["notes"])
    out = ["# safegate exec benchmark", ""]
    out.append(stamp() + (" (**--quick: a smoke test, not a measurement**)" if args.quick else "") + ".")
    out += machine_section(facts, results["load"])
    out += ["", f"Every hog run (parts 1 to 3) starts after a pause of {args.gap:g} s (`--gap`)."]

    rate = results.get("rate")
    if rate:
        r = rate["rate"]
        out += [
            "", "## 1. Fill rate", "",
            f"The hog alone, spawned by the bench, first-touching 64 MiB chunks up to {RATE_CAP_MIB} MiB; timed "
            "from spawn until its RSS holds all of it and it sleeps (/proc polled every 2 ms).", "",
            *STAT_HEAD,
            stat_row("fill rate, GB/s", rate["rates"], 1 / GB),
            stat_row(f"time to {RATE_CAP_MIB} MiB, ms", rate["times"], 1000),
            "",
            f"Rate used below: **{r / GB:.2f} GB/s** (the median); 1 ms of filling is {r / 1000 / MB:.2f} MB. "
            f"A warm-up run before these took {rate['warmup'] * 1000:.0f} ms "
            f"({RATE_CAP_MIB * MIB / rate['warmup'] / GB:.2f} GB/s).",
        ]

    mm = results.get("max_mem")
    if mm:
        ok = [row for row in mm["rows"] if "overshoot" in row]
        n = len(mm["rows"])
        twenty = sum(1 for row in mm["rows"] if row["rc"] == 20)
        r = results["rate"]["rate"]
        over = [row["overshoot"] for row in ok]
        over_ms = [row["overshoot"] / r * 1000 for row in ok]
        own_ms = [row["overshoot"] / row["own_rate"] * 1000 for row in ok]
        out += [
            "", f"## 2. Reaction to `--max-mem {MAX_MEM}`", "",
            f"`safegate exec --max-mem {MAX_MEM} --grace 5s --mem 0 --config <temp> -q --log L -- hog "
            f"{MAX_MEM_HOG_MIB}`. Overshoot = the breach event's `job_memory` - `max_mem` (what safegate measured "
            "when it decided). The crossing of the limit cannot be seen, so it is estimated: "
            "crossing = the `admitted` event's time + limit / fill rate. Two rates are used: part 1's median, and "
            "the run's own rate, `job_memory` / (breach time - admitted time). Exit = the moment the bench sees "
            "the safegate process exit (pidfd, `time.time()`). Event times have 1 ms resolution, and `admitted` is "
            "logged a few ms after the hog is spawned, so the crossing estimates are a little late and the "
            "crossing-to-exit figures a little short.", "",
            *STAT_HEAD,
            stat_row("overshoot, MB", over, 1 / MB),
            stat_row("overshoot, ms of filling at part 1's rate", over_ms),
            stat_row("overshoot, ms of filling at the run's own rate", own_ms),
            stat_row("crossing -> safegate exit, ms (part 1's rate)",
                     [row["exit"] - row["crossing_rate"] for row in ok], 1000),
            stat_row("crossing -> safegate exit, ms (the run's own rate)",
                     [row["exit"] - row["crossing_own"] for row in ok], 1000),
            stat_row("breach event -> safegate exit, ms", [row["exit"] - row["breach"] for row in ok], 1000),
            stat_row("of which breach event -> `exit` event (the job reaped), ms",
                     [row["job_gone"] - row["breach"] for row in ok if row["job_gone"] is not None], 1000),
            stat_row("admitted -> breach event, ms", [row["breach"] - row["admitted"] for row in ok], 1000),
            stat_row("fill rate during the run, GB/s", [row["own_rate"] for row in ok], 1 / GB),
            "",
            f"Exit code 20: **{twenty}/{n}** runs ({'all' if twenty == n else 'NOT all'}).",
        ]
        if ok:
            out += [
                "",
                f"Target: overshoot <= {TARGET_OVERSHOOT_MS:g} ms of filling (median): "
                f"{verdict(median(over_ms) <= TARGET_OVERSHOOT_MS)} at part 1's rate ({median(over_ms):.1f} ms), "
                f"{verdict(median(own_ms) <= TARGET_OVERSHOOT_MS)} at the run's own rate ({median(own_ms):.1f} ms). "
                f"Worst run: {max(over_ms):.1f} ms and {max(own_ms):.1f} ms.",
            ]
        notes += [f"part 2, {f}" for f in mm["failures"]]

    fl = results.get("floor")
    if fl:
        sg = [row for row in fl["safegate"] if "overshoot" in row]
        eo = [row for row in fl["earlyoom"] if "overshoot" in row]
        r = results["rate"]["rate"]
        out += [
            "", "## 3. `--min-available` vs earlyoom, same floor", "",
            f"Before each pair of runs: F = MemAvailable - 1 GiB (rounded down to a KiB). safegate: "
            f"`safegate exec --min-available <F in KiB>K --mem 0 --config <temp> -q --log L -- hog {FLOOR_HOG_MIB}`; "
            f"overshoot = F - the breach event's `available`. earlyoom: `earlyoom -M <F in KiB> -s 100 -r 0 "
            f"--prefer '^hog$' --avoid '<every name but hog>'` started first, then `hog {FLOOR_HOG_MIB}` as a "
            "plain child of the bench; overshoot = F - the MemAvailable earlyoom printed (`mem avail: N of M MiB`, "
            "1 MiB resolution) just before it acted. The two alternate, the first of each pair swapping every "
            "pair; earlyoom is started for each of its runs and stopped after it. Own rate: safegate "
            "`job_memory` / (breach - admitted); earlyoom the victim's VmRSS it printed / (its kill line - hog "
            "spawn).", "",
            *md_table(["measure", "tool", "n", "median", "p10", "p90", "min", "max"]),
        ]

        def both(label: str, get: Callable[[dict[str, Any]], float], scale: float, own: bool = False) -> None:
            for name, rows in (("safegate", sg), ("earlyoom", eo)):
                values = [get(row) for row in rows if "own_rate" in row or not own]
                line = stat_row(label, values, scale)
                out.append(line.replace(f"| {label} |", f"| {label} | {name} |", 1))

        both("overshoot below F, MB", lambda row: float(row["overshoot"]), 1 / MB)
        both("overshoot, ms of filling at part 1's rate", lambda row: row["overshoot"] / r * 1000, 1)
        both("overshoot, ms of filling at the run's own rate",
             lambda row: row["overshoot"] / row["own_rate"] * 1000, 1, own=True)
        both("fill rate during the run, GB/s", lambda row: float(row["own_rate"]), 1 / GB, own=True)
        both("headroom at the start (MemAvailable - F), MB", lambda row: float(row["headroom"]), 1 / MB)
        out.append("")
        if sg and eo:
            m_sg, m_eo = median([x["overshoot"] for x in sg]), median([x["overshoot"] for x in eo])
            pairs = list(zip(fl["safegate"], fl["earlyoom"], strict=False))
            wins = sum(1 for a, b in pairs if "overshoot" in a and "overshoot" in b and a["overshoot"] < b["overshoot"])
            ratio = f"{m_eo / m_sg:.1f}x" if m_sg > 0 else "n/a (safegate's median is 0)"
            out += [
                f"Ratio of the median overshoots, earlyoom/safegate: **{ratio}** "
                f"({m_eo / MB:.1f} MB vs {m_sg / MB:.1f} MB). safegate's was smaller in {wins} of {len(pairs)} pairs.",
                "",
                f"Target: smaller than earlyoom's on the same floor in the same run (medians): "
                f"{verdict(m_sg < m_eo)}.",
            ]
            sources = sorted({x["source"] for x in eo})
            notes.append(f"part 3: earlyoom's available-at-kill came from: {', '.join(sources)}")
            banners = sorted({x["banner"].strip() for x in fl["earlyoom"] if x.get("banner")})
            if banners:
                notes.append(f"part 3: earlyoom's start-up line(s): {'; '.join(banners[:3])}"
                             + (f" (and {len(banners) - 3} more)" if len(banners) > 3 else ""))
            statuses = sorted({str(x["status"]) for x in fl["earlyoom"]})
            notes.append(f"part 3: the hog's exit status(es) in earlyoom's runs: {', '.join(statuses)} "
                         "(-15: SIGTERM)")
        elif not eo:
            out.append("earlyoom: no run (see the notes).")
        codes = sorted({str(x["rc"]) for x in fl["safegate"]})
        out.append("")
        out.append(f"safegate's exit codes: {', '.join(codes)}.")
        notes += [f"part 3, {f}" for f in fl["failures"]]

    ov = results.get("overhead")
    if ov:
        idle, startup = ov["idle"], ov["startup"]
        pct = [x["pct"] for x in idle]
        steady = [x["steady_pct"] for x in idle if "steady_pct" in x]
        out += [
            "", "## 4. Overhead", "",
            f"safegate's own CPU time (utime + stime of the safegate process, from /proc/PID/stat, children not "
            f"included), read when it exits: the bench waits on a pidfd and reads the zombie's stat before reaping "
            f"it. Start-up: `safegate exec --mem 0 --config <temp> -q -- true`. Idle: the same with "
            f"`-- sleep {ov['seconds']}`, far from every limit, alternating without and with `--log L` (exec "
            f"then also writes the timeline's `sample` events, one a second far from every limit). "
            f"Overhead = (idle CPU - median start-up CPU) / "
            f"(idle wall - median start-up wall), percent of one core. Steady state: between the per-second "
            f"readings from {STEADY_SKIP:g} s after spawn and the last one before exit "
            f"({1000 / CLK_TCK:g} ms clock-tick resolution).", "",
            *STAT_HEAD,
            stat_row("start-up CPU (job `true`), ms", [x["cpu"] for x in startup], 1000),
            stat_row("start-up wall (job `true`), ms", [x["wall"] for x in startup], 1000),
            stat_row(f"CPU of a {ov['seconds']} s idle run, ms", [x["cpu"] for x in idle], 1000),
            stat_row("overhead, % of one core", pct),
            stat_row("steady state, % of one core", steady),
        ]
        logged = ov.get("logged") or []
        lpct = [x["pct"] for x in logged]
        if logged:
            out += [
                stat_row(f"with `--log`: CPU of a {ov['seconds']} s idle run, ms", [x["cpu"] for x in logged],
                         1000),
                stat_row("with `--log`: `sample` events written per second",
                         [x["samples"] / x["wall"] for x in logged]),
                stat_row("with `--log`: overhead, % of one core", lpct),
                stat_row("with `--log`: steady state, % of one core",
                         [x["steady_pct"] for x in logged if "steady_pct" in x]),
            ]
        out += [
            "",
            f"Target: idle overhead <= {TARGET_OVERHEAD_PCT:g}% of one core (median): "
            f"{verdict(median(pct) <= TARGET_OVERHEAD_PCT)} ({median(pct):.3f}%)"
            + (f"; with `--log` (the timeline's samples): {verdict(median(lpct) <= TARGET_OVERHEAD_PCT)} "
               f"({median(lpct):.3f}%)." if lpct else "."),
        ]

    jt = results.get("jobtree")
    if jt:
        out += [
            "", "## 5. Cost of a sample by job size", "",
            "In-process, in the bench: `JobTree(root=<spawner pid>)` over N `sleep 600` started by a Python "
            "spawner. Microseconds per call, median (p10-p90), each call timed alone. `refresh()` is the cheap "
            "path, timed right after an untimed `rescan()`. Sample = `refresh()` + `memory(precise=False)` + "
            "`read_available()` (a sample far from a limit); act = `refresh(force_scan=True)` + "
            "`memory(precise=True)` + `read_available()` (the re-check before acting). "
            "`rescan()` reads every /proc/PID/stat on the machine, so it also grows with the other processes.", "",
            *md_table(["processes in the job", "in /proc", "n", "rescan()", "refresh()", "memory(precise=False)",
                       "memory(precise=True)", "read_available()", "sample", "act"]),
        ]

        def us(samples: Sequence[float] | None) -> str:
            if not samples:
                return ""
            s = summarize([x * 1e6 for x in samples])
            return f"**{num(s['median'])}** ({num(s['p10'])}-{num(s['p90'])})"

        for row in jt:
            if "skipped" in row:
                out.append(md_row(row["count"], f"skipped: {row['skipped']}", *[""] * 8))
                continue
            calls = len(row["rss"])
            out.append(md_row(row.get("label", row["count"]), "" if row["in_proc"] is None else row["in_proc"], calls,
                              *(us(row.get(k)) for k in ("rescan", "refresh", "rss", "pss", "available", "sample",
                                                        "act"))))

    if rate:
        notes.append(fill_regime_note(results))
    notes.append("left behind at the end: " + (", ".join(results["left"]) if results["left"] else "nothing "
                 "(every process the bench started was stopped and reaped)"))
    out += ["", "## Notes", ""] + [f"- {n}" for n in notes]
    return "\n".join(out) + "\n"


# --- main ------------------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = bench_parser(__doc__, runs=DEFAULT_RUNS, raw=True,
                          runs_help=f"runs for parts 2 and 3, each tool (default {DEFAULT_RUNS}; {QUICK_RUNS} with "
                                    "--quick)",
                          quick=f"smoke test: {QUICK_RUNS} runs, {QUICK_OVERHEAD_SECONDS} s overhead run, "
                                f"{','.join(map(str, QUICK_COUNTS))} processes; its figures are not measurements")
    parser.add_argument("--rate-runs", type=int, default=None,
                        help=f"timed fill-rate runs for part 1 (default {DEFAULT_RATE_RUNS})")
    parser.add_argument("--gap", type=float, default=DEFAULT_GAP,
                        help=f"seconds of pause before every hog run (default {DEFAULT_GAP:g})")
    parser.add_argument("--overhead-runs", type=int, default=None,
                        help=f"idle runs for part 4 (default {DEFAULT_OVERHEAD_RUNS})")
    parser.add_argument("--overhead-seconds", type=int, default=None,
                        help=f"length of each idle run (default {DEFAULT_OVERHEAD_SECONDS})")
    parser.add_argument("--startup-runs", type=int, default=None,
                        help=f"start-up runs for part 4 (default {DEFAULT_STARTUP_RUNS})")
    parser.add_argument("--counts", default=None,
                        help=f"process counts for part 5 (default {','.join(map(str, DEFAULT_COUNTS))})")
    parser.add_argument("--calls", type=int, default=None, help=f"timed calls per figure in part 5 "
                                                                 f"(default {DEFAULT_CALLS})")
    parser.add_argument("--parts", default="1,2,3,4,5", help="which parts to run (default 1,2,3,4,5; 2 and 3 "
                                                             "need 1, which runs whenever they do)")
    parser.add_argument("--no-install", action="store_true", help="never apt-get install earlyoom")
    parser.add_argument("--safegate", metavar="PATH", help="the safegate executable (default: beside this python)")
    args = parser.parse_args(argv)
    quick_defaults(args, runs=(DEFAULT_RUNS, QUICK_RUNS), rate_runs=(DEFAULT_RATE_RUNS, QUICK_RATE_RUNS),
                   overhead_runs=(DEFAULT_OVERHEAD_RUNS, QUICK_OVERHEAD_RUNS),
                   overhead_seconds=(DEFAULT_OVERHEAD_SECONDS, QUICK_OVERHEAD_SECONDS),
                   startup_runs=(DEFAULT_STARTUP_RUNS, QUICK_STARTUP_RUNS), calls=(DEFAULT_CALLS, QUICK_CALLS))
    try:
        args.counts = (tuple(int(c) for c in args.counts.split(",")) if args.counts
                       else QUICK_COUNTS if args.quick else DEFAULT_COUNTS)
        args.parts = {int(p) for p in args.parts.split(",")}
    except ValueError:
        parser.error("--counts and --parts take numbers like 1,10,100")
    if not args.parts <= {1, 2, 3, 4, 5}:
        parser.error("--parts: 1 to 5")
    if args.parts & {2, 3}:
        args.parts.add(1)
    if min(args.runs, args.rate_runs, args.overhead_runs, args.startup_runs, args.calls) < 1:
        parser.error("run and call counts must be at least 1")
    if args.overhead_seconds <= STEADY_SKIP + 2:
        parser.error(f"--overhead-seconds must be more than {STEADY_SKIP + 2:g}")
    return args


def preflight(args: argparse.Namespace) -> str | None:
    if not sys.platform.startswith("linux"):
        return "Linux only (/proc, pidfd, earlyoom)"
    missing = safegate_missing()
    if missing:
        return missing
    for tool in ("sleep", "true"):
        if shutil.which(tool) is None:
            return f"{tool} not found"
    return None


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    problem = preflight(args)
    if problem:
        log(f"bench_exec.py: {problem}")
        return 2
    interrupt_on_signals()
    cc = shutil.which("gcc") or shutil.which("cc")
    if cc is None and args.parts & {1, 2, 3}:
        log("bench_exec.py: parts 1 to 3 need gcc (or cc) to build the hog")
        return 2
    with workdir("safegate-bench-exec-") as tmp:
        try:
            bed = Bed(tmp, find_safegate(args.safegate), cc=cc if args.parts & {1, 2, 3, 5} else None)
        except BenchError as exc:
            log(f"bench_exec.py: {exc}")
            return 1
        procs = Procs(bed.hog)
        results: dict[str, Any] = {"notes": [], "left": []}
        try:
            text = run_parts(args, bed, procs, results)
        except BenchError as exc:
            log(f"bench_exec.py: {exc}")
            return 1
        except KeyboardInterrupt:
            log("bench_exec.py: interrupted")
            return 130
        finally:
            left = procs.stop_all()
            if left:
                log(f"bench_exec.py: stopped at the end: {', '.join(left)}")
    publish(text, args.out, args.raw, results)
    return 0


def run_parts(args: argparse.Namespace, bed: Bed, procs: Procs, results: dict[str, Any]) -> str:
    """The parts asked for, and the report on them."""
    eo_exe = find_earlyoom(not args.no_install, results["notes"]) if 3 in args.parts else None
    facts = bench_facts(bed, eo_exe)
    load_start = loadavg()
    if args.parts & {2, 3} and available() < 6 * GIB:
        raise BenchError(f"parts 2 and 3 need 6 GiB available (hogs of up to {MAX_MEM_HOG_MIB} MiB, and "
                         f"safegate's default 2G floor); {available() / GIB:.1f} GiB is")
    if 1 in args.parts:
        log(f"1. fill rate: the hog alone to {RATE_CAP_MIB} MiB, {args.rate_runs} runs after a warm-up")
        results["rate"] = bench_rate(bed, procs, args.rate_runs, args.gap)
    if 2 in args.parts:
        log(f"2. --max-mem {MAX_MEM}: {args.runs} runs")
        results["max_mem"] = bench_max_mem(bed, procs, args.runs, args.gap, results["rate"]["rate"])
    if 3 in args.parts:
        log(f"3. --min-available vs earlyoom: {args.runs} pairs")
        results["floor"] = bench_floor(bed, procs, eo_exe, args.runs, args.gap)
    if 4 in args.parts:
        log(f"4. overhead: {args.startup_runs} start-up runs, {args.overhead_runs} idle runs of "
            f"{args.overhead_seconds} s")
        results["overhead"] = bench_overhead(bed, procs, args.startup_runs, args.overhead_runs,
                                             args.overhead_seconds)
    if 5 in args.parts:
        log(f"5. cost of a sample with {', '.join(map(str, args.counts))} processes in the job")
        results["jobtree"] = bench_jobtree(bed, procs, args.counts, args.calls, results["notes"])
    results["load"] = (load_start, loadavg())
    results["left"] = procs.stop_all()
    return report(args, facts, results)


if __name__ == "__main__":
    sys.exit(main())
