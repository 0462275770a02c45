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
import json
import os
import platform
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path

HERE = Path(__file__).resolve().parent
BASH_GATE = HERE / "bash_gate.sh"
PROFILE = "whisper-large-v3"
PATTERN = "whisper.*large"  # what `pgrep -f` gets; checked against the profile's block rule at start
TEMP_MILLIDEGREES = 45000
WARMUP = 3
DEFAULT_RUNS = 30
QUICK_RUNS = 5
DEFAULT_COUNTS = (100, 1000, 5000)
QUICK_COUNTS = (100, 1000)
TARGET_CHECK_MS = 150.0
TARGET_SCAN_RATIO = 2.0
TARGET_SCAN_COUNT = 5000
SLEEP_SECONDS = "600"  # the extra processes end by themselves after this even if the bench is SIGKILLed
MEM_PER_EXTRA = 1 << 20  # a generous estimate of what one extra `sleep` costs (RSS is mostly shared)

# argv[0] of half the extra processes: command lines like a busy machine's, none matching PATTERN (some
# hold "whisper" or "large" in the wrong order, so the regex has work to do). The executable is sleep.
FAKE_COMMANDS = (
    "/usr/bin/python3 -m uvicorn api.server:app --host 127.0.0.1 --port 8080 --workers 2",
    "/usr/bin/python3 transcribe.py --input /srv/audio/large-files --model openai/whisper-small --language en",
    "/usr/lib/jvm/java-17-openjdk-amd64/bin/java -Xmx512m -cp /opt/app/lib/app.jar com.example.Worker --threads 4",
    "node /home/user/project/node_modules/.bin/vite --port 5173 --host",
    "/usr/bin/ffmpeg -hide_banner -i /srv/audio/in.wav -ar 16000 -ac 1 -f s16le -",
    "postgres: 15/main: checkpointer",
    "rsync -a --partial /srv/large/ backup:/srv/large/",
    "/usr/bin/python3 -m whisper_medium.server --batch 8",
)


class BenchError(Exception):
    pass


# --- small helpers -----------------------------------------------------------------------------------


def summarize(samples: Sequence[float]) -> dict[str, float]:
    xs = sorted(samples)
    if len(xs) >= 2:
        deciles = statistics.quantiles(xs, n=10, method="inclusive")
        p10, p90 = deciles[0], deciles[-1]
    else:
        p10 = p90 = xs[0]
    return {"n": len(xs), "median": statistics.median(xs), "p10": p10, "p90": p90, "min": xs[0], "max": xs[-1]}


def ms(seconds: float) -> str:
    value = seconds * 1000
    return f"{value:.1f}" if value >= 10 else f"{value:.2f}"


def read_text(path: str) -> str:
    try:
        with open(path, encoding="utf-8", errors="replace") as fh:
            return fh.read()
    except OSError:
        return ""


def meminfo(key: str) -> int:
    """A /proc/meminfo value in bytes (0 when absent)."""
    for line in read_text("/proc/meminfo").splitlines():
        name, _, rest = line.partition(":")
        if name == key:
            fields = rest.split()
            return int(fields[0]) * (1024 if len(fields) > 1 and fields[1] == "kB" else 1)
    return 0


def count_proc() -> int:
    return sum(1 for name in os.listdir("/proc") if name.isdigit())


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


def tool_version(argv: list[str]) -> str:
    try:
        out = subprocess.run(argv, capture_output=True, text=True, timeout=10, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return "not found"
    lines = (out.stdout or out.stderr).strip().splitlines()
    return lines[0] if lines else "?"


def run_timed(argv: list[str], env: dict[str, str] | None, expect: Callable[[int], bool]) -> tuple[float, int]:
    """(wall time, exit code) of one whole command, from spawn to exit (output discarded)."""
    t0 = time.perf_counter()
    proc = subprocess.run(argv, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                          stderr=subprocess.DEVNULL, check=False)
    elapsed = time.perf_counter() - t0
    if not expect(proc.returncode):
        # Run it again with its output, to say why.
        again = subprocess.run(argv, env=env, stdin=subprocess.DEVNULL, capture_output=True, text=True, check=False)
        raise BenchError(
            f"{' '.join(argv)} exited {proc.returncode} (again: {again.returncode}); "
            f"stderr: {again.stderr.strip()[:500]!r}"
        )
    return elapsed, proc.returncode


# --- the test bed: temp lock dir, config, temperature file, stale records ------------------------------


class Bed:
    def __init__(self, safegate_exe: str) -> None:
        from safegate.config import load_config  # the bench runs in safegate's environment

        self.tmp = Path(tempfile.mkdtemp(prefix="safegate-bench-"))
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
        self.block_patterns = [r.pattern for r in profile.competing if r.action == "block"]
        # The lock file exists, so both gates really take (and release) the flock.
        self.lock_file = self.lock_dir / f"{self.lock_name}.lock"
        self.lock_file.touch()
        os.chmod(self.lock_file, 0o666)
        self.holder_file = self.lock_dir / f"{self.lock_name}.holder.json"
        self.pid_file = self.lock_dir / f"{self.lock_name}.pid"
        self.dead = dead_pid()

        self.safegate_argv = [safegate_exe, "check", "-p", PROFILE, "--mem", "0", "--margin", "0", "-q",
                              "--config", str(self.config)]
        self.safegate_env = dict(os.environ, SAFEGATE_LOCK_DIR=str(self.lock_dir))
        for var in ("SAFEGATE_CONFIG", "SAFEGATE_PROFILE", "SAFEGATE_DEBUG"):
            self.safegate_env.pop(var, None)
        self.bash_argv = ["bash", str(BASH_GATE)]
        # Through the environment, not argv: the lock name matches PATTERN and argv is what pgrep -f sees.
        self.bash_env = dict(
            os.environ,
            SG_LOCK_DIR=str(self.lock_dir),
            SG_LOCK_NAME=self.lock_name,
            SG_TEMP_FILE=str(self.temp_file),
            SG_PID_FILE=str(self.pid_file),
            SG_NEED_BYTES="0",
            SG_MARGIN_BYTES="0",
            SG_PATTERN=PATTERN,
        )
        self.worker_env = dict(self.safegate_env, SGBENCH_CONFIG=str(self.config),
                               SGBENCH_HOLDER=str(self.holder_file), SGBENCH_DEAD_PID=str(self.dead))

    def holder_json(self) -> str:
        return json.dumps({
            "pid": self.dead, "start_time": time.time() - 7200, "user": "bench", "host": socket.gethostname(),
            "cmdline": ["python3", "transcribe.py"], "started_at": time.time() - 3600, "profile": PROFILE,
            "lock": self.lock_name,
        })

    def plant(self) -> None:
        """Re-create the stale records each gate removes: safegate's holder metadata, bash's pid file."""
        if pid_alive(self.dead):  # pid reused meanwhile: take another dead one
            self.dead = dead_pid()
            self.worker_env["SGBENCH_DEAD_PID"] = str(self.dead)
            self.holder_file.unlink(missing_ok=True)
            self.pid_file.unlink(missing_ok=True)
        if not self.holder_file.exists():
            self.holder_file.write_text(self.holder_json(), encoding="utf-8")
        if not self.pid_file.exists():
            self.pid_file.write_text(f"{self.dead}\n", encoding="ascii")

    def cleanup(self) -> None:
        shutil.rmtree(self.tmp, ignore_errors=True)


def ok_zero(rc: int) -> bool:
    return rc == 0


def ok_pgrep(rc: int) -> bool:
    return rc in (0, 1)  # 1: nothing matched


# --- the extra processes -------------------------------------------------------------------------------


class Crowd:
    """Extra `sleep 600` processes; kill_all() ends every one of them (the caller runs it in finally)."""

    def __init__(self) -> None:
        self.sleep = shutil.which("sleep") or "/bin/sleep"
        self.procs: list[subprocess.Popen[bytes]] = []
        self.expected: dict[int, bytes] = {}
        for command in FAKE_COMMANDS:
            if re.search(PATTERN, command):
                raise BenchError(f"fake command matches {PATTERN!r}: {command}")

    def grow_to(self, count: int) -> None:
        while len(self.procs) < count:
            i = len(self.procs)
            argv = ["sleep", SLEEP_SECONDS] if i % 2 == 0 else [FAKE_COMMANDS[(i // 2) % len(FAKE_COMMANDS)],
                                                                  SLEEP_SECONDS]
            proc = subprocess.Popen(argv, executable=self.sleep, stdin=subprocess.DEVNULL,
                                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            self.procs.append(proc)
            self.expected[proc.pid] = b"\0".join(a.encode() for a in argv) + b"\0"
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
        """SIGKILL and reap every extra process; the number still visible afterwards (should be 0)."""
        for proc in self.procs:
            try:
                proc.kill()
            except (ProcessLookupError, OSError):
                pass
        for proc in self.procs:
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                pass
        left = sum(1 for p in self.procs if p.poll() is None)
        self.procs.clear()
        self.expected.clear()
        return left


# --- in-process timing, in a worker process ------------------------------------------------------------
# The scan runs in a child of the bench, not in the bench itself: read_processes() leaves out the
# caller's descendants, and the extra processes are the bench's children.


def worker(mode: str, runs: int, warmup: int) -> None:
    config_path = os.environ["SGBENCH_CONFIG"]
    out: dict[str, object] = {}
    if mode == "scan":
        from safegate.config import load_config
        from safegate.policy import match_competing
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
    elif mode == "evaluate":
        from safegate.config import load_config
        from safegate.gate import Overrides, evaluate, resolve
        from safegate.units import parse_size

        holder = Path(os.environ["SGBENCH_HOLDER"])
        holder_text = holder.read_text(encoding="utf-8") if holder.exists() else None
        overrides = Overrides(mem=parse_size("0"), margin=parse_size("0"))
        times, codes = [], set()
        for i in range(warmup + runs):
            if holder_text is not None and not holder.exists():
                holder.write_text(holder_text, encoding="utf-8")  # the stale record, as before each check
            t0 = time.perf_counter()
            verdict = evaluate(resolve(load_config(config_path), PROFILE, overrides))
            elapsed = time.perf_counter() - t0
            codes.add(int(verdict.exit_code))
            if i >= warmup:
                times.append(elapsed)
        out = {"evaluate": times, "exit_codes": sorted(codes)}
    json.dump(out, sys.stdout)


def run_worker(bed: Bed, mode: str, runs: int, warmup: int) -> dict:
    argv = [sys.executable, str(Path(__file__).resolve()), "--worker", mode, "--runs", str(runs),
            "--warmup", str(warmup)]
    proc = subprocess.run(argv, env=bed.worker_env, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise BenchError(f"worker {mode} failed ({proc.returncode}): {proc.stderr.strip()[-1000:]}")
    return json.loads(proc.stdout)


# --- the benchmarks ------------------------------------------------------------------------------------


def bench_gates(bed: Bed, runs: int, warmup: int, log: Callable[[str], None]) -> dict:
    """safegate check and the bash gate, alternating run by run (and which goes first, pair by pair)."""
    gates = {
        "safegate": (bed.safegate_argv, bed.safegate_env, bed.holder_file),
        "bash": (bed.bash_argv, bed.bash_env, bed.pid_file),
    }
    samples: dict[str, list[float]] = {name: [] for name in gates}
    for i in range(warmup + runs):
        order = ("safegate", "bash") if i % 2 == 0 else ("bash", "safegate")
        for name in order:
            argv, env, stale = gates[name]
            bed.plant()
            elapsed, _ = run_timed(argv, env, ok_zero)
            if stale.exists():
                raise BenchError(f"{name} gate did not remove the stale record {stale}")
            if i >= warmup:
                samples[name].append(elapsed)
        if i == warmup - 1:
            log(f"  warm-up done; {runs} alternating runs")
    return samples


def bench_breakdown(bed: Bed, runs: int, warmup: int) -> dict:
    """Where a check's time goes: interpreter start, imports, and the work itself (in-process)."""
    py = sys.executable
    steps = {
        "python -c pass": [py, "-c", "pass"],
        "python -c 'import safegate.cli'": [py, "-c", "import safegate.cli"],
    }
    samples: dict[str, list[float]] = {name: [] for name in steps}
    for i in range(warmup + runs):
        for name, argv in steps.items():
            elapsed, _ = run_timed(argv, bed.safegate_env, ok_zero)
            if i >= warmup:
                samples[name].append(elapsed)
    bed.plant()
    result = run_worker(bed, "evaluate", runs, warmup)
    samples["load_config + resolve + evaluate (in-process)"] = result["evaluate"]
    if result["exit_codes"] != [0]:
        raise BenchError(f"in-process evaluate gave exit codes {result['exit_codes']}")
    return samples


def bench_crowd(bed: Bed, crowd: Crowd, counts: Sequence[int], runs: int, warmup: int,
                log: Callable[[str], None]) -> list[dict]:
    rows = []
    pgrep_argv = ["pgrep", "-f", PATTERN]
    pid_max = int(read_text("/proc/sys/kernel/pid_max").strip() or "32768")
    for count in counts:
        need = (count - len(crowd.procs)) * MEM_PER_EXTRA
        available = meminfo("MemAvailable")
        if available and available - need < (512 << 20):
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
        in_proc = count_proc()
        scan = run_worker(bed, "scan", runs, warmup)

        commands = {
            "pgrep": (pgrep_argv, None, ok_pgrep),
            "safegate": (bed.safegate_argv, bed.safegate_env, ok_zero),
            "bash": (bed.bash_argv, bed.bash_env, ok_zero),
        }
        samples: dict[str, list[float]] = {name: [] for name in commands}
        pgrep_rcs = set()
        for i in range(warmup + runs):
            names = list(commands) if i % 2 == 0 else list(reversed(commands))
            for name in names:
                argv, env, expect = commands[name]
                bed.plant()
                elapsed, rc = run_timed(argv, env, expect)
                if name == "pgrep":
                    pgrep_rcs.add(rc)
                if i >= warmup:
                    samples[name].append(elapsed)
        rows.append({
            "count": count, "in_proc": in_proc, "scanned": scan["scanned"], "blocking": scan["blocking"],
            "scan": scan["scan"], "read": scan["read"], "match": scan["match"],
            "pgrep": samples["pgrep"], "safegate": samples["safegate"], "bash": samples["bash"],
            "pgrep_matched": 0 in pgrep_rcs,
        })
    return rows


# --- the report ----------------------------------------------------------------------------------------


def machine_facts() -> list[tuple[str, str]]:
    import safegate

    cpu = "?"
    for line in read_text("/proc/cpuinfo").splitlines():
        if line.startswith(("model name", "Model", "Hardware")):
            cpu = line.split(":", 1)[1].strip()
            break
    try:
        affinity = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        affinity = os.cpu_count() or 0
    commit = tool_version(["git", "-C", str(HERE.parent), "rev-parse", "--short", "HEAD"])
    dirty = tool_version(["git", "-C", str(HERE.parent), "status", "--porcelain", "--", "safegate"])
    return [
        ("nproc", f"{affinity} (os.cpu_count {os.cpu_count()})"),
        ("CPU", cpu),
        ("kernel", f"{platform.system()} {platform.release()}"),
        ("Python", f"{platform.python_version()} ({sys.executable})"),
        ("safegate", f"{safegate.__version__} ({Path(safegate.__file__).parent}), commit {commit}"
                     + (" + uncommitted changes in safegate/" if dirty not in ("?", "not found", "") else "")),
        ("RAM", f"{meminfo('MemTotal') / 2**30:.1f} GiB total, {meminfo('MemAvailable') / 2**30:.1f} GiB available"),
        ("tools", f"{tool_version(['pgrep', '--version'])}; {tool_version(['flock', '--version'])}; "
                  f"{tool_version(['bash', '--version'])}"),
        ("sensors (lm-sensors)", shutil.which("sensors") or "not installed: the bash gate reads the temperature file"),
        ("processes in /proc at start", str(count_proc())),
    ]


def stat_cells(samples: Sequence[float]) -> str:
    s = summarize(samples)
    return f"{ms(s['median'])} | {ms(s['p10'])} | {ms(s['p90'])} | {ms(s['min'])} | {ms(s['max'])}"


def report(args: argparse.Namespace, facts: list[tuple[str, str]], load: tuple[str, str], gates: dict,
           breakdown: dict, crowd_rows: list[dict], notes: list[str]) -> str:
    out = ["# safegate check benchmark", ""]
    out.append(f"Run {time.strftime('%Y-%m-%d %H:%M:%S %Z')}: `{' '.join(['python', *sys.argv])}`; "
               f"{args.runs} timed runs per figure after {args.warmup} warm-up runs"
               + (" (**--quick: a smoke test, not a measurement**)" if args.quick else "") + ".")
    if args.runs < 20:
        out.append("")
        out.append(f"**Only {args.runs} runs per figure: too few for the targets (>= 20 wanted).**")
    out += ["", "## Machine", "", "| | |", "|---|---|"]
    out += [f"| {k} | {v} |" for k, v in facts]
    out.append(f"| load average (1, 5, 15 min) | start {load[0]}; end {load[1]} |")

    sg, bash = summarize(gates["safegate"]), summarize(gates["bash"])
    out += [
        "",
        "## a. Whole gate: `safegate check` vs bash gate",
        "",
        f"`{' '.join(['safegate', *args.display_safegate_args])}` with `SAFEGATE_LOCK_DIR` on a temp dir and a "
        f"temp config (`[thermal] sensors = []`, `files = [<temp file holding {TEMP_MILLIDEGREES}>]`), against "
        "`bash bench/bash_gate.sh` on the same lock file and temperature file. A stale lock record is planted "
        "before every run (holder metadata with a dead pid for safegate, a pid file with the same dead pid for "
        "the bash gate); each run must remove it and exit 0. The two alternate run by run. "
        "Wall time from spawn to exit, in ms.",
        "",
        "| gate | runs | median | p10 | p90 | min | max |",
        "|---|---|---|---|---|---|---|",
        f"| safegate check | {sg['n']} | {stat_cells(gates['safegate'])} |",
        f"| bash gate | {bash['n']} | {stat_cells(gates['bash'])} |",
        "",
        f"Ratio safegate/bash: **{sg['median'] / bash['median']:.2f}x** at the median "
        f"(p10 {sg['p10'] / bash['p10']:.2f}x, p90 {sg['p90'] / bash['p90']:.2f}x).",
        "",
        f"Target: median <= {TARGET_CHECK_MS:g} ms on a 2-core machine: "
        f"**{'met' if sg['median'] * 1000 <= TARGET_CHECK_MS else 'NOT met'}** ({ms(sg['median'])} ms).",
        "",
        "### Where safegate's time goes",
        "",
        "| step | runs | median | p10 | p90 | min | max |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, samples in breakdown.items():
        out.append(f"| {name} | {len(samples)} | {stat_cells(samples)} |")
    out.append(f"| whole `safegate check` (from the table above) | {sg['n']} | {stat_cells(gates['safegate'])} |")
    out += [
        "",
        "The in-process row is one pass of the five checks with config loading, in an already-started Python "
        "with safegate imported; the rest of a check is interpreter start-up, imports, and typer/click.",
    ]

    out += [
        "",
        "## b. Competing-process scan vs `pgrep`",
        "",
        "Extra processes: `sleep 600`, half of them with argv[0] set to a realistic non-matching command line. "
        f"safegate scan: `match_competing(read_processes(), profile.competing, total_ram)` for profile {PROFILE}, "
        "timed in-process (in a Python process that is not the parent of the extra processes). "
        f"pgrep: the whole `pgrep -f '{PATTERN}'` process, spawn to exit. Medians in ms, p10-p90 in brackets.",
        "",
        "| extra processes | in /proc | scanned | safegate scan | of which read_processes | of which match "
        "| pgrep -f | scan/pgrep | whole safegate check | bash gate | check/pgrep |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    verdict_row = None
    for row in crowd_rows:
        if "skipped" in row:
            out.append(f"| {row['count']} | skipped: {row['skipped']} | | | | | | | | | |")
            continue
        scan, pgrep, check = summarize(row["scan"]), summarize(row["pgrep"]), summarize(row["safegate"])
        ratio = scan["median"] / pgrep["median"]

        def cell(s: dict[str, float]) -> str:
            return f"{ms(s['median'])} ({ms(s['p10'])}-{ms(s['p90'])})"

        out.append(
            f"| {row['count']} | {row['in_proc']} | {row['scanned']} | {cell(scan)} "
            f"| {ms(summarize(row['read'])['median'])} | {ms(summarize(row['match'])['median'])} "
            f"| {cell(pgrep)} | **{ratio:.2f}x** | {cell(check)} | {cell(summarize(row['bash']))} "
            f"| {check['median'] / pgrep['median']:.2f}x |"
        )
        if row["count"] == TARGET_SCAN_COUNT:
            verdict_row = ratio
        if row["blocking"] or row["pgrep_matched"]:
            notes.append(f"at {row['count']} extra processes a real process matched {PATTERN!r} "
                         f"(safegate: {row['blocking']} blocking match(es); pgrep matched: {row['pgrep_matched']})")
    out.append("")
    if verdict_row is not None:
        out.append(f"Target: scan <= {TARGET_SCAN_RATIO:g}x pgrep at {TARGET_SCAN_COUNT} processes: "
                   f"**{'met' if verdict_row <= TARGET_SCAN_RATIO else 'NOT met'}** ({verdict_row:.2f}x).")
    else:
        out.append(f"Target (scan <= {TARGET_SCAN_RATIO:g}x pgrep at {TARGET_SCAN_COUNT} processes): "
                   "not measured in this run.")
    out += ["", "Runs per cell: " + ", ".join(
        f"{r['count']}: {len(r['scan'])}" for r in crowd_rows if "skipped" not in r) + "."]
    if notes:
        out += ["", "## Notes", ""] + [f"- {n}" for n in notes]
    return "\n".join(out) + "\n"


def stop_crowd(crowd: Crowd, log: Callable[[str], None]) -> None:
    """Kill every extra process; a second Ctrl-C (or SIGTERM) meanwhile must not cut this short."""
    signals = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
    old = {s: signal.signal(s, signal.SIG_IGN) for s in signals}
    try:
        left = crowd.kill_all()
    finally:
        for s, handler in old.items():
            signal.signal(s, handler)
    if left:
        log(f"WARNING: {left} extra processes could not be reaped")


# --- main ----------------------------------------------------------------------------------------------


def find_safegate(explicit: str | None) -> str:
    if explicit:
        return explicit
    beside = Path(sys.executable).parent / "safegate"
    if beside.is_file() and os.access(beside, os.X_OK):
        return str(beside)
    found = shutil.which("safegate")
    if found:
        return found
    raise BenchError("no safegate executable found (use --safegate PATH, or run with the venv's python)")


def loadavg() -> str:
    return " ".join(read_text("/proc/loadavg").split()[:3]) or "?"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=None,
                        help=f"timed runs per figure (default {DEFAULT_RUNS}; {QUICK_RUNS} with --quick)")
    parser.add_argument("--quick", action="store_true",
                        help=f"smoke test: {QUICK_RUNS} runs, 1 warm-up, {'/'.join(map(str, QUICK_COUNTS))} processes")
    parser.add_argument("--counts", default=None,
                        help=f"extra process counts, comma-separated (default {','.join(map(str, DEFAULT_COUNTS))})")
    parser.add_argument("--out", metavar="FILE", help="also write the Markdown report here")
    parser.add_argument("--raw", metavar="FILE", help="write every sample (seconds) as JSON here")
    parser.add_argument("--safegate", metavar="PATH", help="the safegate executable (default: beside this python)")
    parser.add_argument("--worker", choices=("scan", "evaluate"), help=argparse.SUPPRESS)
    parser.add_argument("--warmup", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.runs is None:
        args.runs = QUICK_RUNS if args.quick else DEFAULT_RUNS
    if args.warmup is None:
        args.warmup = 1 if args.quick else WARMUP
    if args.runs < 2:
        parser.error("--runs must be at least 2")
    if args.worker:
        worker(args.worker, args.runs, args.warmup)
        return 0
    counts = (tuple(int(c) for c in args.counts.split(",")) if args.counts
              else QUICK_COUNTS if args.quick else DEFAULT_COUNTS)

    if not sys.platform.startswith("linux"):
        print("bench_check.py: Linux only (/proc, flock, pgrep)", file=sys.stderr)
        return 2
    try:
        import safegate  # noqa: F401
    except ImportError:
        print(f"bench_check.py: safegate is not importable by {sys.executable}; "
              "run it with the venv's python (e.g. . /tmp/sgenv/bin/activate)", file=sys.stderr)
        return 2
    for tool in ("bash", "pgrep", "flock", "free", "awk", "sleep"):
        if shutil.which(tool) is None:
            print(f"bench_check.py: {tool} not found", file=sys.stderr)
            return 2

    def log(message: str) -> None:
        print(message, file=sys.stderr, flush=True)

    # SIGTERM and SIGHUP end the run like Ctrl-C does, so the finally blocks below kill the extra processes.
    def interrupted(signum: int, _frame: object) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, interrupted)
    signal.signal(signal.SIGHUP, interrupted)

    notes: list[str] = []
    bed = Bed(find_safegate(args.safegate))
    args.display_safegate_args = bed.safegate_argv[1:-2]
    crowd = Crowd()
    try:
        if bed.block_patterns != [PATTERN]:
            notes.append(f"profile {PROFILE} blocks on {bed.block_patterns}, pgrep is given {PATTERN!r}")
        facts = machine_facts()
        load_start = loadavg()
        log(f"a. safegate check vs bash gate ({args.runs} runs each)")
        gates = bench_gates(bed, args.runs, args.warmup, log)
        log("   breakdown of safegate's time")
        breakdown = bench_breakdown(bed, args.runs, args.warmup)
        log(f"b. scan vs pgrep at {', '.join(map(str, counts))} extra processes")
        try:
            crowd_rows = bench_crowd(bed, crowd, counts, args.runs, args.warmup, log)
        finally:
            stop_crowd(crowd, log)
        log(f"   extra processes killed; {count_proc()} processes in /proc")
        load_end = loadavg()
        text = report(args, facts, (load_start, load_end), gates, breakdown, crowd_rows, notes)
    except BenchError as exc:
        log(f"bench_check.py: {exc}")
        return 1
    except KeyboardInterrupt:
        log("bench_check.py: interrupted; extra processes killed")
        return 130
    finally:
        if crowd.procs:  # interrupted before bench_crowd's own clean-up
            stop_crowd(crowd, log)
        bed.cleanup()

    sys.stdout.write(text)
    if args.out:
        Path(args.out).write_text(text, encoding="utf-8")
    if args.raw:
        raw = {"gates": gates, "breakdown": breakdown, "crowd": crowd_rows}
        Path(args.raw).write_text(json.dumps(raw, indent=1), encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
