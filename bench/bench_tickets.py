#!/usr/bin/env python3
"""Benchmark what a flood of forged tickets in the shared lock dir costs `check` and admission (issue 22, item 2).

    sudo .venv/bin/python bench/bench_tickets.py [--runs N] [--counts 1000,50000] [--old TREE] [--out FILE]

Run it as root (the hostile user is `nobody`, through runuser; the planting uses the system /usr/bin/python3),
with the Python that has safegate's dependencies installed. Standard library only; every figure is measured.

Two commands are timed, wall time from spawn to exit, each must exit 0:
  check: `python -m safegate check --mem 0 --lock night -q --config C`
  exec:  `python -m safegate exec --config C --mem 0 --lock night -- true`   (admission, then a job that ends)
against a private 1777 lock dir per configuration (SAFEGATE_LOCK_DIR):
  empty:   nothing in it;
  real:    one real ticket of nobody's live `sleep` (its real start, lock "other"), nothing else;
  N:       that real ticket plus N forged tickets planted by nobody (see `new_flood` and `old_flood`).
With --old TREE (a checkout of the code before issue 22, e.g. commit 1451ed1), the same commands run that code
too (PYTHONPATH=TREE, the same Python), against lock dirs holding the flood in its format (`old_flood`). Every
(code, lock dir, command) cell runs once per round; the order rotates each round and reverses every other one.
After every call nobody puts back what the call removed (root's cleanup may delete other users' dead tickets:
up to 64 per call in the new code), untimed, so each call faces the same files; the report says how many.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from common import (
    REPO,
    bench_env,
    bench_parser,
    commit,
    count_proc,
    md_row,
    md_table,
    median,
    publish,
    stamp,
    summarize,
    timed_run,
    tree,
    workdir,
)

COMMANDS = ("check", "exec")
PID_NEVER = 4_194_304  # 2**22: past every pid_max, so no process ever has it (or the pids above it)

# nobody's side: a loop that plants the files it is told to and, on request, puts back those that are gone.
PLANTER = r"""
import json, os, sys
planted = {}
def put(d, names):
    made = 0
    for name in names:
        try:
            fd = os.open(os.path.join(d, name), os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            continue
        os.write(fd, planted[d][name])
        os.close(fd)
        made += 1
    return made
for line in sys.stdin:
    req = json.loads(line)
    d = req["dir"]
    if req["op"] == "plant":
        planted.setdefault(d, {}).update((n, c.encode()) for n, c in req["files"])
        made = put(d, [n for n, _ in req["files"]])
    else:
        there = set(os.listdir(d))
        made = put(d, [n for n in planted.get(d, {}) if n not in there])
    print(made, flush=True)
"""


class Sleeper:
    """nobody's live `sleep`: the process every ticket names."""

    def __init__(self) -> None:
        self.proc = subprocess.Popen(["runuser", "-u", "nobody", "--", "sleep", "86400"], stdin=subprocess.DEVNULL,
                                     start_new_session=True)
        deadline = time.monotonic() + 30
        while True:
            found = [p for p in tree(self.proc.pid) if _comm(p) == "sleep"]
            if found:
                self.pid = found[0]
                break
            if time.monotonic() > deadline:
                raise SystemExit("nobody's sleep did not start")
            time.sleep(0.01)
        fields = Path(f"/proc/{self.pid}/stat").read_text().rsplit(")", 1)[1].split()
        self.start = int(fields[19])  # field 22: start in clock ticks since boot
        btime = next(int(line.split()[1]) for line in Path("/proc/stat").read_text().splitlines()
                     if line.startswith("btime"))
        self.start_time = btime + self.start / os.sysconf("SC_CLK_TCK")  # as psutil's create_time()


def new_flood(s: Sleeper, n: int) -> list[tuple[str, str]]:
    """The flood in the new format: 90% name the sleeper with every start but its real one (1 in 10 with a
    .state too), 5% name pids that never run, 5% are old-format names (valid old content). None may count."""
    body = json.dumps({"user": "nobody", "lock": "night", "profile": "flood", "need": 1})
    state = json.dumps({"blocked_by": "lock", "reason": "lock: held", "memory_only": False})
    files: list[tuple[str, str]] = []
    n_other = n // 20
    starts = (t for t in range(1, 10**9) if t != s.start)
    for i in range(n - 2 * n_other):
        base = f".ticket.{s.pid}.{next(starts)}"
        files.append((f"{base}.json", body))
        if i % 10 == 0:
            files.append((f"{base}.state", state))
    files += [(f".ticket.{PID_NEVER + i}.{i + 1}.json", body) for i in range(n_other)]
    old = old_flood(s, n_other)
    return files + [(name, content.replace('"other"', '"night"')) for name, content in old]


def old_flood(s: Sleeper, n: int, arrival0: int = 0) -> list[tuple[str, str]]:
    """The flood that made the old code slow: old names (`.ticket.<arrival>.<pid>.json`), valid content naming
    the sleeper (pid, start_time, user nobody), for lock "other": every one counts there, and blocks no one."""
    arrival0 = arrival0 or time.time_ns() - 10**12
    return [(f".ticket.{arrival0 + i:020d}.{s.pid}.json", json.dumps({
        "pid": s.pid, "start_time": s.start_time, "user": "nobody", "lock": "other", "profile": "flood", "need": 0,
        "arrival": arrival0 + i, "blocked_by": "lock", "reason": "lock: held", "memory_only": False}))
        for i in range(n)]


def real_ticket(s: Sleeper, code: str) -> tuple[str, str]:
    """The sleeper's one real ticket, in the format of *code*."""
    if code == "new":
        return (f".ticket.{s.pid}.{s.start}.json",
                json.dumps({"user": "nobody", "lock": "other", "profile": "one", "need": 0}))
    name, content = old_flood(s, 1, arrival0=time.time_ns() - 2 * 10**12)[0]  # before every forged one
    return name, content.replace('"flood"', '"one"')


class Planter:
    def __init__(self) -> None:
        self.proc = subprocess.Popen(["runuser", "-u", "nobody", "--", "/usr/bin/python3", "-c", PLANTER],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, start_new_session=True)

    def _ask(self, req: dict[str, object]) -> int:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(json.dumps(req) + "\n")
        self.proc.stdin.flush()
        answer = self.proc.stdout.readline()
        if not answer:
            raise SystemExit("the planter (nobody) died")
        return int(answer)

    def plant(self, d: Path, files: list[tuple[str, str]]) -> int:
        return self._ask({"op": "plant", "dir": str(d), "files": files})

    def refill(self, d: Path) -> int:
        return self._ask({"op": "refill", "dir": str(d)})


def timed(argv: list[str], env: dict[str, str], cwd: Path) -> float:
    """Each call in a shell of its own, once the previous call's grant of the lock is let go (common.ALONE)."""
    return timed_run(argv, env, cwd=cwd, timeout=600, locks=[Path(env["SAFEGATE_LOCK_DIR"]) / "night.lock"])[0]


def main() -> int:
    parser = bench_parser(__doc__, runs=20, runs_help="timed rounds (default 20), after --warmup rounds", raw=True)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--counts", default="1000,50000", help="forged tickets per flood lock dir")
    parser.add_argument("--old", help="a checkout of the code before issue 22 (e.g. `git worktree add T 1451ed1`)")
    parser.add_argument("--new", default=str(REPO), help="the checkout timed as the new code (default: this one)")
    args = parser.parse_args()
    if os.geteuid() != 0 or shutil.which("runuser") is None:
        raise SystemExit("run as root with runuser: the hostile user is nobody")
    counts = [int(c) for c in args.counts.split(",") if c]
    trees = {"new": Path(args.new).resolve()}
    if args.old:
        trees["old"] = Path(args.old).resolve()
    load_start = os.getloadavg()
    procs_start = count_proc()
    started = time.gmtime()
    with workdir("safegate-tickets-", mode=0o755) as base:
        run(args, base, trees, counts, started, load_start, procs_start)
    return 0


def run(args: argparse.Namespace, base: Path, trees: dict[str, Path], counts: list[int], started: time.struct_time,
        load_start: tuple[float, float, float], procs_start: int) -> None:
    sleeper = planter = None
    try:
        sensor = base / "temp"
        sensor.write_text("45000\n")
        config = base / "config.toml"
        # tests/support.py neutral_config: the machine's memory, pressure, sensors and processes decide nothing.
        config.write_text('[defaults]\nmemory_margin = "0"\ncgroup = "off"\nmin_available = "0"\n'
                          f'max_memory_pressure = 100\ncompeting = []\n[thermal]\nsensors = []\nfiles = ["{sensor}"]\n')
        sleeper, planter = Sleeper(), Planter()
        dirs: dict[tuple[str, str], Path] = {}
        planted: dict[tuple[str, str], int] = {}
        configs = ["empty", "real", *[str(n) for n in counts]]
        for code in trees:
            for conf in configs:
                d = base / f"{code}-{conf}"
                d.mkdir()
                os.chmod(d, 0o1777)
                dirs[code, conf] = d
                files = [] if conf == "empty" else [real_ticket(sleeper, code)]
                if conf not in ("empty", "real"):
                    n = int(conf)
                    files += new_flood(sleeper, n) if code == "new" else old_flood(sleeper, n)
                t0 = time.monotonic()
                planted[code, conf] = planter.plant(d, files)
                print(f"planted {planted[code, conf]} files for {code}/{conf} in {time.monotonic() - t0:.1f} s",
                      file=sys.stderr)

        def env_for(code: str, conf: str) -> dict[str, str]:
            # exec records its runs in XDG_STATE_HOME, not in root's history.
            return bench_env(pycache=base / f"pycache-{code}", SAFEGATE_GPU="none", XDG_STATE_HOME=str(base / "state"),
                             PYTHONPATH=str(trees[code]), SAFEGATE_LOCK_DIR=str(dirs[code, conf]))

        def argv(command: str) -> list[str]:
            if command == "check":
                return [sys.executable, "-m", "safegate", "check", "--config", str(config), "--mem", "0", "--lock",
                        "night", "-q"]
            return [sys.executable, "-m", "safegate", "exec", "--config", str(config), "--mem", "0", "--lock",
                    "night", "--", "true"]

        # What each side's reader finds (untimed): the waiters `queue --json` lists, and which code ran.
        seen: dict[tuple[str, str], str] = {}
        for code, tree in trees.items():
            where = subprocess.run([sys.executable, "-c", "import safegate; print(safegate.__file__)"],
                                   env=env_for(code, "empty"), cwd=base, capture_output=True, text=True, check=True)
            if not where.stdout.startswith(str(tree)):
                raise SystemExit(f"{code}: imported {where.stdout.strip()}, not from {tree}")
            for conf in configs:
                out = subprocess.run([sys.executable, "-m", "safegate", "queue", "--json", "--config", str(config)],
                                     env=env_for(code, conf), cwd=base, capture_output=True, text=True, timeout=600)
                if out.returncode != 0:
                    raise SystemExit(f"queue ({code}/{conf}) exited {out.returncode}: {out.stderr}")
                waiters = json.loads(out.stdout)
                mine = sum(1 for w in waiters if w.get("pid") == sleeper.pid)
                seen[code, conf] = f"{len(waiters)} listed ({mine} of the sleeper)"
                planter.refill(dirs[code, conf])

        cells = [(code, conf, command) for code in trees for conf in configs for command in COMMANDS]
        samples: dict[str, list[float]] = {"/".join(c): [] for c in cells}
        removed: dict[str, list[int]] = {"/".join(c): [] for c in cells}
        for rnd in range(args.warmup + args.runs):
            k = rnd % len(cells)
            order = cells[k:] + cells[:k]
            if rnd % 2:
                order.reverse()
            for code, conf, command in order:
                took = timed(argv(command), env_for(code, conf), base)
                back = planter.refill(dirs[code, conf])
                if rnd >= args.warmup:
                    samples[f"{code}/{conf}/{command}"].append(took)
                    removed[f"{code}/{conf}/{command}"].append(back)
            print(f"round {rnd + 1}/{args.warmup + args.runs} done, load {os.getloadavg()[0]:.2f}", file=sys.stderr)
        load_end = os.getloadavg()
        text = report(args, trees, configs, planted, seen, samples, removed, started, load_start, load_end,
                      procs_start)
        publish(text, args.out, args.raw, {"samples": samples, "removed": removed, "planted": {
            "/".join(k): v for k, v in planted.items()}, "queue": {"/".join(k): v for k, v in seen.items()}})
    finally:
        for holder in (planter, sleeper):
            if holder is not None and holder.proc.poll() is None:
                os.killpg(holder.proc.pid, 9)
                holder.proc.wait()


def report(args: argparse.Namespace, trees: dict[str, Path], configs: list[str], planted: dict[tuple[str, str], int],
           seen: dict[tuple[str, str], str], samples: dict[str, list[float]], removed: dict[str, list[int]],
           started: time.struct_time, load_start: tuple[float, float, float], load_end: tuple[float, float, float],
           procs_start: int) -> str:
    def med(key: str) -> float:
        return median(samples[key])

    def label(conf: str) -> str:
        names = {"empty": "empty lock dir", "real": "1 real ticket"}
        return names[conf] if conf in names else f"{int(conf):,} forged + 1 real"

    lines = [f"{stamp(started)}; {args.runs} timed rounds after {args.warmup} warm-up rounds; load average "
             f"(1, 5, 15 min) {' / '.join(f'{x:.2f}' for x in load_start)} at the start, "
             f"{' / '.join(f'{x:.2f}' for x in load_end)} at the end; {procs_start} processes in /proc at the start; "
             f"{os.cpu_count()} CPUs; Python {sys.version.split()[0]}.", "",
             "Median wall time per call (ratio to the empty lock dir of the same code and command, same run); "
             "p10-p90 below each.", "",
             *md_table(["command", "code", *(label(c) for c in configs)])]
    for command in COMMANDS:
        for code in trees:
            empty = med(f"{code}/empty/{command}")
            cells = []
            for conf in configs:
                s = summarize(samples[f"{code}/{conf}/{command}"])
                ms = s["median"] * 1000
                figure = f"{ms:.1f} ms" if ms < 1000 else f"{ms / 1000:.2f} s"
                cells.append(f"{figure} ({s['median'] / empty:.2f}x)<br>{s['p10'] * 1000:.0f}-{s['p90'] * 1000:.0f}")
            lines.append(md_row(command, code, *cells))
    if "old" in trees:
        lines += ["", "old/new (medians, same run): " + "; ".join(
            f"{command} {label(conf)} {med(f'old/{conf}/{command}') / med(f'new/{conf}/{command}'):.1f}x"
            for command in COMMANDS for conf in configs if conf != "empty") + "."]
    lines += ["", *md_table(["code", "lock dir", "files planted by nobody", "`queue --json` (untimed, before)",
                             "files each call removed (median, max; put back untimed)"])]
    for code, checkout in trees.items():
        for conf in configs:
            gone = [n for command in COMMANDS for n in removed[f"{code}/{conf}/{command}"]]
            lines.append(md_row(f"{code} ({checkout}, {commit(checkout)})", label(conf), f"{planted[code, conf]:,}",
                                seen[code, conf], f"{median(gone):g}, {max(gone)}"))
    return "\n".join(lines) + "\n"


def _comm(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return ""


if __name__ == "__main__":
    sys.exit(main())
