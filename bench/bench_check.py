#!/usr/bin/env python3
"""Benchmark `safegate check` against a plain bash gate, and its process scan against pgrep.

Run it with the Python that has safegate installed (the scan is timed in-process):

    python bench/bench_check.py [--runs N] [--quick] [--out FILE] [--raw FILE]

a. Wall time of `safegate check -p whisper-large-v3 --mem 0 --margin 0 -q` and of bench/bash_gate.sh,
   alternating run by run, on the same lock dir, temperature file and (re-planted) stale lock records.
b. The competing-process scan (read_processes + match_competing, in a Python process) against the
   whole `pgrep -f 'whisper.*large'` command, with 100, 1,000 and 5,000 extra `sleep 600` processes;
   the whole `safegate check` and the bash gate are timed there too.
c. A Markdown report on stdout, and in --out FILE when given.

Standard library only. Every figure is measured on the spot; nothing is hard-coded.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Container, Mapping, Sequence
from pathlib import Path
from typing import Any

from common import (
    BenchError,
    DeferredStop,
    bench_env,
    bench_parser,
    count_proc,
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
    signals_ignored,
    stamp,
    summarize,
    timed_run,
    workdir,
)

HERE = Path(__file__).resolve().parent
BASH_GATE = HERE / "bash_gate.sh"
PROFILE = "whisper-large-v3"
PATTERN = "whisper.*large"  # what `pgrep -f` gets; compared with the profile's block rule at start
TEMP_MILLIDEGREES = 45000
WARMUP = 3
DEFAULT_RUNS = 30
QUICK_RUNS = 5
DEFAULT_COUNTS = (100, 1000, 5000)
QUICK_COUNTS = (100, 1000)
# What a plain `safegate check` imports (safegate.cli.fastpath's path), and the typer app's way to the same check.
CHECK_IMPORTS = "import safegate.cli.fastpath, safegate.cli.plain, safegate.commands.check, safegate.config.file"
TYPER_MAIN = "import sys; from safegate.cli.app import main; sys.exit(main(sys.argv[1:]))"
TARGET_CHECK_MS = 60.0  # issue 14: GNU parallel's --limit and Slurm call check before every job
TARGET_SCAN_RATIO = 2.0
TARGET_SCAN_COUNT = 5000
SLEEP_SECONDS = "600"  # the extra processes end by themselves after this, even if the bench is SIGKILLed
MEM_PER_EXTRA = 1 << 20  # a generous guess at what one extra `sleep` costs, to refuse counts that won't fit
MEM_FLOOR = 1 << 30  # never leave less than this available when starting extra processes

# argv[0] of half the extra processes: command lines like a busy machine's, none matching PATTERN (some
# hold "whisper" and "large" in the wrong order, so the regex has work to do). The executable is sleep.
FAKE_COMMANDS = (
    "/usr/bin/python3 -m uvicorn api.server:app --host 127.0.0.1 --port 8080 --workers 2",
    "/usr/bin/python3 transcribe.py --input /srv/audio/large-files --model openai/whisper-small --lang en",
    "/usr/lib/jvm/java-17-openjdk-amd64/bin/java -Xmx512m -cp /opt/app/lib/app.jar com.example.Worker",
    "node /home/user/project/node_modules/.bin/vite --port 5173 --host",
    "/usr/bin/ffmpeg -hide_banner -i /srv/audio/in.wav -ar 16000 -ac 1 -f s16le -",
    "postgres: 15/main: checkpointer",
    "rsync -a --partial /srv/large/ backup:/srv/large/",
    "/usr/bin/python3 -m whisper_medium.server --batch 8",
)


# --- small helpers -----------------------------------------------------------------------------------


def ms(seconds: float) -> str:
    value = seconds * 1000
    return f"{value:.1f}" if value >= 10 else f"{value:.2f}"


def pid_alive(pid: int) -> bool:
    return os.path.exists(f"/proc/{pid}")


def dead_pid() -> int:
    """The pid of a process that has exited and been reaped (and not reused since)."""
    for _ in range(20):
        proc = subprocess.Popen(["true"], stdin=subprocess.DEVNULL)
        proc.wait()
        if not pid_alive(proc.pid):
            return proc.pid
    raise BenchError("could not find a dead pid")


OK = (0,)
OK_PGREP = (0, 1)  # 1: nothing matched


# --- the test bed: temp lock dir, config, temperature file, stale records ------------------------------


class Bed:
    def __init__(self, tmp: Path, safegate_exe: str, *, bytecode: str, baseline: str | None = None) -> None:
        from safegate.config.file import load_config  # the bench runs in safegate's environment

        self.tmp = tmp
        self.lock_dir = self.tmp / "locks"
        self.lock_dir.mkdir(mode=0o700)
        self.temp_file = self.tmp / "temp1_input"
        self.temp_file.write_text(f"{TEMP_MILLIDEGREES}\n", encoding="ascii")
        self.config = self.tmp / "config.toml"
        # json.dumps of a path is a valid TOML basic string.
        self.config.write_text(f"[thermal]\nsensors = []\nfiles = [{json.dumps(str(self.temp_file))}]\n",
                               encoding="utf-8")
        profile = load_config(str(self.config)).profile(PROFILE)
        self.lock_name = profile.lock
        self.block_rules = [r.describe() for r in profile.competing if r.action == "block"]
        # The lock file exists, so both gates really take (and release) the flock.
        self.lock_file = self.lock_dir / f"{self.lock_name}.lock"
        self.lock_file.touch()
        os.chmod(self.lock_file, 0o666)
        self.holder_file = self.lock_dir / f"{self.lock_name}.holder.json"
        self.pid_file = self.lock_dir / f"{self.lock_name}.pid"
        self.dead = dead_pid()

        # Python children: with --bytecode cached (default), bytecode is cached in a temp tree, as an
        # installed package has it, whatever PYTHONDONTWRITEBYTECODE says; as-is: the caller's environment.
        self.asis_env = bench_env(SAFEGATE_LOCK_DIR=str(self.lock_dir))
        base = bench_env(pycache=self.tmp / "pycache" if bytecode == "cached" else None,
                         SAFEGATE_LOCK_DIR=str(self.lock_dir))
        self.py_env = base
        self.worker_env = dict(base, SGBENCH_CONFIG=str(self.config), SGBENCH_HOLDER=str(self.holder_file))
        self.safegate_argv = [safegate_exe, "check", "-p", PROFILE, "--mem", "0", "--margin", "0", "-q",
                              "--config", str(self.config)]

        self.baseline_argv = [baseline, *self.safegate_argv[1:]] if baseline else None
        self.bash_argv = ["bash", str(BASH_GATE)]
        # Through the environment, not argv: the lock name matches PATTERN and argv is what pgrep -f sees.
        self.bash_env = dict(
            os.environ,
            SG_LOCK_DIR=str(self.lock_dir),
            SG_LOCK_NAME=str(self.lock_name),
            SG_TEMP_FILE=str(self.temp_file),
            SG_PID_FILE=str(self.pid_file),
            SG_NEED_BYTES="0",
            SG_MARGIN_BYTES="0",
            SG_PATTERN=PATTERN,
        )

    def holder_json(self) -> str:
        now = time.time()
        return json.dumps({
            "pid": self.dead, "start_time": now - 7200, "user": "bench", "host": socket.gethostname(),
            "cmdline": ["python3", "transcribe.py"], "started_at": now - 3600, "profile": PROFILE,
            "lock": self.lock_name,
        })

    def plant(self) -> None:
        """Re-create the stale records the gates remove: safegate's holder metadata, bash's pid file."""
        if pid_alive(self.dead):  # pid reused meanwhile: take another dead one
            self.dead = dead_pid()
            self.holder_file.unlink(missing_ok=True)
            self.pid_file.unlink(missing_ok=True)
        if not self.holder_file.exists():
            self.holder_file.write_text(self.holder_json(), encoding="utf-8")
        if not self.pid_file.exists():
            self.pid_file.write_text(f"{self.dead}\n", encoding="ascii")


# --- the extra processes -------------------------------------------------------------------------------

class Crowd:
    """Extra `sleep 600` processes; kill_all() ends every one of them (stop_crowd runs it in finally)."""

    def __init__(self) -> None:
        self.sleep = shutil.which("sleep") or "/bin/sleep"
        self.procs: list[subprocess.Popen[bytes]] = []
        self.expected: dict[int, bytes] = {}
        for command in FAKE_COMMANDS:
            if re.search(PATTERN, command):
                raise BenchError(f"fake command matches {PATTERN!r}: {command}")

    def grow_to(self, count: int) -> None:
        with DeferredStop() as stop:
            while len(self.procs) < count:
                i = len(self.procs)
                if i % 2 == 0:
                    argv = ["sleep", SLEEP_SECONDS]
                else:
                    argv = [FAKE_COMMANDS[(i // 2) % len(FAKE_COMMANDS)], SLEEP_SECONDS]
                proc = subprocess.Popen(argv, executable=self.sleep, stdin=subprocess.DEVNULL,
                                        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                self.procs.append(proc)
                self.expected[proc.pid] = b"\0".join(a.encode() for a in argv) + b"\0"
                stop.check()
        self.wait_visible(deadline=time.monotonic() + 60 + count * 0.01)

    def wait_visible(self, deadline: float) -> None:
        """Poll /proc until every extra process shows its own command line (its exec is done)."""
        pending = set(self.expected)
        while pending:
            for pid in list(pending):
                try:
                    with open(f"/proc/{pid}/cmdline", "rb") as fh:
                        if fh.read() == self.expected[pid]:
                            pending.discard(pid)
                except OSError:
                    pass
            if not pending:
                return
            if time.monotonic() > deadline:
                raise BenchError(f"{len(pending)} extra processes not visible in /proc before the deadline")
            time.sleep(0.05)

    def kill_all(self) -> int:
        """SIGKILL and reap every extra process; the number still running afterwards (should be 0)."""
        for proc in self.procs:
            with contextlib.suppress(OSError):
                proc.kill()
        for proc in self.procs:
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=10)
        left = sum(1 for p in self.procs if p.poll() is None)
        self.procs.clear()
        self.expected.clear()
        return left


def stop_crowd(crowd: Crowd, log: Callable[[str], None]) -> None:
    """Kill every extra process; a second Ctrl-C (or SIGTERM) meanwhile must not cut this short."""
    with signals_ignored():
        left = crowd.kill_all()
    if left:
        log(f"WARNING: {left} extra processes could not be reaped")


# --- in-process timing, in a worker process ------------------------------------------------------------
# The scan runs in a child of the bench, not in the bench itself: read_processes() leaves out the
# caller's descendants, and the extra processes are the bench's children.


def worker(mode: str, runs: int, warmup: int) -> None:
    from safegate.config.file import load_config

    config_path = os.environ["SGBENCH_CONFIG"]
    out: dict[str, Any]
    if mode == "scan":
        from safegate.gate.policy import match_competing
        from safegate.probes.processes import read_processes

        profile = load_config(config_path).profile(PROFILE)
        total_ram = meminfo("MemTotal")
        for _ in range(warmup):
            match_competing(read_processes(), profile.competing, total_ram)
        scan, read, match = [], [], []
        for _ in range(runs):
            t0 = time.perf_counter()
            found = match_competing(read_processes(), profile.competing, total_ram)
            scan.append(time.perf_counter() - t0)
        for _ in range(runs):
            t0 = time.perf_counter()
            snapshot = read_processes()
            t1 = time.perf_counter()
            match_competing(snapshot, profile.competing, total_ram)
            t2 = time.perf_counter()
            read.append(t1 - t0)
            match.append(t2 - t1)
        out = {"scan": scan, "read": read, "match": match, "scanned": len(snapshot.processes),
               "blocking": sum(1 for m in found if m.rule.action == "block")}
    else:  # evaluate: one whole pass of the checks, config loading included, as `safegate check` does it
        from safegate.gate.preflight import clean_and_evaluate, resolve
        from safegate.units import parse_size

        holder = Path(os.environ["SGBENCH_HOLDER"])
        holder_text = holder.read_text(encoding="utf-8") if holder.exists() else None
        overrides = {"memory": parse_size("0"), "memory_margin": parse_size("0")}
        times, codes = [], set()
        for i in range(warmup + runs):
            if holder_text is not None and not holder.exists():
                holder.write_text(holder_text, encoding="utf-8")  # the stale record, as before each check
            t0 = time.perf_counter()
            verdict = clean_and_evaluate(resolve(load_config(config_path), PROFILE, overrides))
            elapsed = time.perf_counter() - t0
            codes.add(int(verdict.exit_code))
            if i >= warmup:
                times.append(elapsed)
        out = {"evaluate": times, "exit_codes": sorted(codes)}
    json.dump(out, sys.stdout)


def run_worker(bed: Bed, mode: str, runs: int, warmup: int) -> dict[str, Any]:
    bed.plant()
    argv = [sys.executable, str(Path(__file__).resolve()), "--worker", mode, "--runs", str(runs),
            "--warmup", str(warmup)]
    proc = subprocess.run(argv, env=bed.worker_env, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise BenchError(f"worker {mode} failed ({proc.returncode}): {proc.stderr.strip()[-1000:]}")
    result: dict[str, Any] = json.loads(proc.stdout)
    if mode == "evaluate" and result["exit_codes"] != [0]:
        raise BenchError(f"in-process evaluate gave exit codes {result['exit_codes']}")
    return result


# --- the benchmarks ------------------------------------------------------------------------------------


def bench_gates(bed: Bed, runs: int, warmup: int, log: Callable[[str], None]) -> dict[str, list[float]]:
    """safegate check and the bash gate (and --baseline's safegate), alternating run by run, each first in turn."""
    gates: dict[str, tuple[list[str], Mapping[str, str], Path]] = {
        "safegate": (bed.safegate_argv, bed.py_env, bed.holder_file),
        "bash": (bed.bash_argv, bed.bash_env, bed.pid_file),
    }
    if bed.baseline_argv:
        gates["baseline"] = (bed.baseline_argv, bed.py_env, bed.holder_file)
    samples: dict[str, list[float]] = {name: [] for name in gates}
    names = list(gates)
    for i in range(warmup + runs):
        order = names[i % len(names):] + names[:i % len(names)]  # each goes first in turn
        for name in order:
            argv, env, stale = gates[name]
            bed.plant()
            elapsed, _ = timed_run(argv, env, ok=OK)
            if stale.exists():
                raise BenchError(f"{name} gate did not remove the stale record {stale}")
            if i >= warmup:
                samples[name].append(elapsed)
        if i == warmup - 1:
            log(f"  warm-up done; {runs} alternating runs")
    return samples


def bench_breakdown(bed: Bed, runs: int, warmup: int, *, bytecode: str) -> dict[str, list[float]]:
    """Where a check's time goes: interpreter start, imports, and the work itself (in-process)."""
    py = sys.executable
    steps: dict[str, tuple[list[str], Mapping[str, str]]] = {
        "`python -S -c pass` (interpreter start-up, no site)": ([py, "-S", "-c", "pass"], bed.py_env),
        "`python -c pass` (interpreter start-up, site, .pth files)": ([py, "-c", "pass"], bed.py_env),
        "`python -c 'import <what check imports>'` (start-up + imports)": ([py, "-c", CHECK_IMPORTS], bed.py_env),
        "`python -c 'import safegate.cli.app'` (start-up + the typer app)": (
            [py, "-c", "import safegate.cli.app"], bed.py_env),
        "whole check through the typer app (`cli.main`, as before the fast path)": (
            [py, "-c", TYPER_MAIN, *bed.safegate_argv[1:]], bed.py_env),
    }
    if bytecode == "cached":
        steps["whole `safegate check`, bytecode as the calling environment has it"] = (
            bed.safegate_argv, bed.asis_env)
    samples: dict[str, list[float]] = {name: [] for name in steps}
    for i in range(warmup + runs):
        for name, (argv, env) in steps.items():
            bed.plant()
            elapsed, _ = timed_run(argv, env, ok=OK)
            if i >= warmup:
                samples[name].append(elapsed)
    samples["load_config + resolve + evaluate, in-process"] = run_worker(bed, "evaluate", runs, warmup)["evaluate"]
    return samples


def bench_crowd(bed: Bed, crowd: Crowd, counts: Sequence[int], *, runs: int, warmup: int,
                log: Callable[[str], None]) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    pid_max = int(read_text("/proc/sys/kernel/pid_max").strip() or "32768")
    available_before = meminfo("MemAvailable")
    for count in counts:
        need = (count - len(crowd.procs)) * MEM_PER_EXTRA
        available = meminfo("MemAvailable")
        if available and available - need < MEM_FLOOR:
            rows.append({"count": count, "skipped": f"needs ~{need >> 20} MiB, {available >> 20} MiB available"})
            log(f"  {count}: skipped (memory)")
            continue
        if count_proc() + count - len(crowd.procs) > pid_max * 0.9:
            rows.append({"count": count, "skipped": f"pid_max is {pid_max}"})
            log(f"  {count}: skipped (pid_max)")
            continue
        t0 = time.monotonic()
        crowd.grow_to(count)
        log(f"  {count} extra processes running (started in {time.monotonic() - t0:.1f} s)")
        mem_used = available_before - meminfo("MemAvailable")
        in_proc = count_proc()
        scan = run_worker(bed, "scan", runs, warmup)
        evaluate = run_worker(bed, "evaluate", runs, warmup)["evaluate"]

        commands: dict[str, tuple[list[str], Mapping[str, str] | None, Container[int]]] = {
            "pgrep": (["pgrep", "-f", PATTERN], None, OK_PGREP),
            "safegate": (bed.safegate_argv, bed.py_env, OK),
            "bash": (bed.bash_argv, bed.bash_env, OK),
        }
        samples: dict[str, list[float]] = {name: [] for name in commands}
        pgrep_codes = set()
        for i in range(warmup + runs):
            names = list(commands) if i % 2 == 0 else list(reversed(commands))
            for name in names:
                argv, env, expect = commands[name]
                bed.plant()
                elapsed, rc = timed_run(argv, env, ok=expect)
                if name == "pgrep":
                    pgrep_codes.add(rc)
                if i >= warmup:
                    samples[name].append(elapsed)
        rows.append({
            "count": count, "in_proc": in_proc, "scanned": scan["scanned"], "blocking": scan["blocking"],
            "mem_used": mem_used, "scan": scan["scan"], "read": scan["read"], "match": scan["match"],
            "evaluate": evaluate, "pgrep_matched": 0 in pgrep_codes, **samples,
        })
    return rows


# --- the report ----------------------------------------------------------------------------------------


def bytecode_fact(bytecode: str) -> str:
    import safegate

    package = Path(safegate.__file__).parent
    has_cache = (package / "__pycache__").is_dir()
    env = "PYTHONDONTWRITEBYTECODE=" + os.environ.get("PYTHONDONTWRITEBYTECODE", "(unset)")
    asis = f"calling environment: {env}, {package}/__pycache__ {'present' if has_cache else 'absent'}"
    if bytecode == "cached":
        return f"cached in a temp PYTHONPYCACHEPREFIX for every Python child (--bytecode cached); {asis}"
    return f"as the calling environment has it (--bytecode as-is): {asis}"


def bench_facts(bytecode: str) -> list[tuple[str, str]]:
    return [
        *machine_facts(),
        ("bytecode", bytecode_fact(bytecode)),
        ("RAM", f"{meminfo('MemTotal') / 2**30:.1f} GiB total, {meminfo('MemAvailable') / 2**30:.1f} GiB available"),
        ("tools", f"{first_line(['pgrep', '--version'])}; {first_line(['flock', '--version'])}; "
                  f"{first_line(['bash', '--version'])}"),
        ("lm-sensors", shutil.which("sensors") or "not installed: the bash gate reads the temperature file"),
        ("processes in /proc at start", str(count_proc())),
    ]


STAT_HEAD = ["runs", "median", "p10", "p90", "min", "max"]


def stat_cells(samples: Sequence[float]) -> list[str]:
    s = summarize(samples)
    return [ms(s[k]) for k in ("median", "p10", "p90", "min", "max")]


def brief(samples: Sequence[float]) -> str:
    s = summarize(samples)
    return f"{ms(s['median'])} ({ms(s['p10'])}-{ms(s['p90'])})"


def baseline_lines(args: argparse.Namespace, gates: dict[str, list[float]]) -> list[str]:
    if "baseline" not in gates:
        return []
    base, sg = summarize(gates["baseline"]), summarize(gates["safegate"])
    return [f"Baseline `{args.baseline}`, the same arguments, in turn with the two above: median "
            f"{ms(base['median'])} ms (p10 {ms(base['p10'])}, p90 {ms(base['p90'])}, {base['n']} runs); "
            f"this safegate takes **{sg['median'] / base['median']:.2f}x** its time at the median.", ""]


def report(args: argparse.Namespace, facts: list[tuple[str, str]], results: dict[str, Any]) -> str:
    gates, breakdown, crowd_rows = results["gates"], results["breakdown"], results["crowd"]
    notes: list[str] = list(results["notes"])
    out = ["# safegate check benchmark", ""]
    out.append(f"{stamp()}; {args.runs} timed runs per figure after {args.warmup} warm-up "
               f"run{'' if args.warmup == 1 else 's'}"
               + (" (**--quick: a smoke test, not a measurement**)" if args.quick else "") + ".")
    if args.runs < 20:
        out += ["", f"**Only {args.runs} runs per figure: too few to judge the targets (>= 20 wanted).**"]
    out += machine_section(facts, results["load"])

    sg, bash = summarize(gates["safegate"]), summarize(gates["bash"])
    out += [
        "",
        "## a. Whole gate: `safegate check` vs bash gate",
        "",
        f"`safegate {' '.join(args.safegate_display)}` with `SAFEGATE_LOCK_DIR` on a temp dir and a temp "
        f"config (`[thermal] sensors = []`, `files = [<temp file holding {TEMP_MILLIDEGREES}>]`), against "
        "`bash bench/bash_gate.sh` on the same lock file and temperature file. A stale lock record is planted "
        "before every run (holder metadata naming a dead pid for safegate, a pid file with the same dead pid "
        "for the bash gate); every run must remove it and exit 0. They alternate run by run. "
        "Wall time from spawn to exit, in ms.",
        "",
        *md_table(["gate", *STAT_HEAD], [["safegate check", sg["n"], *stat_cells(gates["safegate"])],
                                         ["bash gate", bash["n"], *stat_cells(gates["bash"])]]),
        "",
        f"Ratio safegate/bash: **{sg['median'] / bash['median']:.2f}x** at the median "
        f"(p10 {sg['p10'] / bash['p10']:.2f}x, p90 {sg['p90'] / bash['p90']:.2f}x).",
        "",
        *baseline_lines(args, gates),
        f"Target: median <= {TARGET_CHECK_MS:g} ms on a 2-core machine: "
        f"**{'met' if sg['median'] * 1000 <= TARGET_CHECK_MS else 'NOT met'}** ({ms(sg['median'])} ms).",
        "",
        "### Where safegate's time goes",
        "",
        *md_table(["step", *STAT_HEAD], [[name, len(samples), *stat_cells(samples)]
                                         for name, samples in breakdown.items()]),
        md_row("whole `safegate check` (table above)", sg["n"], *stat_cells(gates["safegate"])),
    ]
    out += [
        "",
        "The in-process row is one pass of the five checks, config loading included, in a Python that has "
        "already imported safegate. A plain check is parsed by hand (safegate.cli.fastpath) and imports no typer; "
        "the typer row runs the same check through the typer app, as every check ran before. What a whole check "
        "costs beyond its imports and that pass is parsing, rendering and interpreter shutdown.",
        "",
        "## b. Competing-process scan vs `pgrep`",
        "",
        "Extra processes: `sleep 600`, half of them with argv[0] set to a realistic command line that does "
        f"not match. safegate scan: `match_competing(read_processes(), profile.competing, total_ram)` for "
        f"profile {PROFILE}, timed in-process (in a Python process that is not the parent of the extra "
        f"processes). pgrep: the whole `pgrep -f '{PATTERN}'` process, spawn to exit. "
        "ms, median (p10-p90).",
        "",
        *md_table(["extra processes", "in /proc", "safegate scan", "pgrep -f", "scan/pgrep", "whole safegate check",
                   "check/pgrep", "bash gate"]),
    ]
    target_ratio = None
    done = [r for r in crowd_rows if "skipped" not in r]
    for row in crowd_rows:
        if "skipped" in row:
            out.append(md_row(row["count"], f"skipped: {row['skipped']}", *[""] * 6))
            continue
        ratio = median(row["scan"]) / median(row["pgrep"])
        out.append(md_row(row["count"], row["in_proc"], brief(row["scan"]), brief(row["pgrep"]), f"**{ratio:.2f}x**",
                          brief(row["safegate"]), f"{median(row['safegate']) / median(row['pgrep']):.2f}x",
                          brief(row["bash"])))
        if row["count"] == TARGET_SCAN_COUNT:
            target_ratio = ratio
        if row["blocking"] or row["pgrep_matched"]:
            notes.append(f"at {row['count']} extra processes a real process matched {PATTERN!r} "
                         f"(safegate: {row['blocking']} blocking match(es); pgrep matched: {row['pgrep_matched']})")
    out.append("")
    if target_ratio is not None:
        out.append(f"Target: scan <= {TARGET_SCAN_RATIO:g}x pgrep at {TARGET_SCAN_COUNT} extra processes: "
                   f"**{'met' if target_ratio <= TARGET_SCAN_RATIO else 'NOT met'}** ({target_ratio:.2f}x).")
    else:
        out.append(f"Target (scan <= {TARGET_SCAN_RATIO:g}x pgrep at {TARGET_SCAN_COUNT} extra processes): "
                   "not measured in this run.")
    if done:
        out += [
            "",
            "Details (ms, medians; each scan part timed on its own):",
            "",
            *md_table(["extra processes", "processes scanned", "read_processes", "match_competing",
                       "load_config + resolve + evaluate, in-process", "MemAvailable used by the extra processes"],
                      [[row["count"], row["scanned"], ms(median(row["read"])), ms(median(row["match"])),
                        ms(median(row["evaluate"])), f"{row['mem_used'] / 2**20:.0f} MiB"] for row in done]),
        ]
        out += ["", "Runs per figure: " + ", ".join(f"{r['count']}: {len(r['scan'])}" for r in done) + "."]
    if notes:
        out += ["", "## Notes", ""] + [f"- {n}" for n in notes]
    return "\n".join(out) + "\n"


# --- main ----------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = bench_parser(__doc__, runs=DEFAULT_RUNS, raw=True,
                          runs_help=f"timed runs per figure (default {DEFAULT_RUNS}; {QUICK_RUNS} with --quick)",
                          quick=f"smoke test: {QUICK_RUNS} runs, 1 warm-up run, "
                                f"{' and '.join(map(str, QUICK_COUNTS))} extra processes")
    parser.add_argument("--counts", default=None,
                        help=f"extra process counts, comma-separated (default {','.join(map(str, DEFAULT_COUNTS))})")
    parser.add_argument("--bytecode", choices=("cached", "as-is"), default="cached",
                        help="cached (default): Python children cache bytecode in a temp dir, as an installed "
                             "safegate has it; as-is: leave PYTHONDONTWRITEBYTECODE etc. as they are")
    parser.add_argument("--safegate", metavar="PATH", help="the safegate executable (default: beside this python)")
    parser.add_argument("--baseline", metavar="PATH",
                        help="another safegate executable (say, an install of an older commit) timed in turn with "
                             "the same arguments, for a before/after in the same run")
    parser.add_argument("--worker", choices=("scan", "evaluate"), help=argparse.SUPPRESS)
    parser.add_argument("--warmup", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    quick_defaults(args, runs=(DEFAULT_RUNS, QUICK_RUNS), warmup=(WARMUP, 1))
    if args.runs < 2:
        parser.error("--runs must be at least 2")
    try:
        args.counts = (tuple(int(c) for c in args.counts.split(",")) if args.counts
                       else QUICK_COUNTS if args.quick else DEFAULT_COUNTS)
    except ValueError:
        parser.error("--counts: expected numbers like 100,1000,5000")
    return args


def preflight() -> str | None:
    if not sys.platform.startswith("linux"):
        return "Linux only (/proc, flock, pgrep)"
    missing = safegate_missing()
    if missing:
        return missing
    for tool in ("bash", "pgrep", "flock", "free", "awk", "sleep", "cat", "rm"):
        if shutil.which(tool) is None:
            return f"{tool} not found"
    return None


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.worker:
        worker(args.worker, args.runs, args.warmup)
        return 0
    problem = preflight()
    if problem:
        log(f"bench_check.py: {problem}")
        return 2
    interrupt_on_signals()
    with workdir("safegate-bench-") as tmp:
        try:
            crowd = Crowd()
            bed = Bed(tmp, find_safegate(args.safegate), bytecode=args.bytecode, baseline=args.baseline)
        except BenchError as exc:
            log(f"bench_check.py: {exc}")
            return 1
        args.safegate_display = bed.safegate_argv[1:-2]  # without --config <temp path>
        results: dict[str, Any] = {"notes": []}
        try:
            # The profile matches programs (program + args), pgrep -f the whole command line: pgrep's pattern is
            # the shell gate's usual one, which also matches mere mentions; both read every process's command line.
            results["notes"].append(f"profile {PROFILE} blocks on {', '.join(bed.block_rules)}; "
                                    f"pgrep gets {PATTERN!r}")
            facts = bench_facts(args.bytecode)
            load_start = loadavg()
            log(f"a. safegate check vs bash gate ({args.runs} runs each)")
            results["gates"] = bench_gates(bed, args.runs, args.warmup, log)
            log("   where safegate's time goes")
            results["breakdown"] = bench_breakdown(bed, args.runs, args.warmup, bytecode=args.bytecode)
            log(f"b. scan vs pgrep at {', '.join(map(str, args.counts))} extra processes")
            try:
                results["crowd"] = bench_crowd(bed, crowd, args.counts, runs=args.runs, warmup=args.warmup, log=log)
            finally:
                stop_crowd(crowd, log)
            log(f"   extra processes killed; {count_proc()} processes in /proc")
            results["load"] = (load_start, loadavg())
            text = report(args, facts, results)
        except BenchError as exc:
            log(f"bench_check.py: {exc}")
            return 1
        except KeyboardInterrupt:
            log("bench_check.py: interrupted")
            return 130
        finally:
            if crowd.procs:  # interrupted before bench_crowd's own clean-up
                stop_crowd(crowd, log)
    publish(text, args.out, args.raw, results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
