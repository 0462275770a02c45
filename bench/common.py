"""What the bench scripts share: their options, the environment and temp dirs they run safegate in, timing one
command, the statistics and Markdown they report with, and the machine they ran on.

Each bench imports it as `common` (a script's own directory comes first on sys.path). Standard library only, like
the benches; nothing here measures anything by itself.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import json
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Container, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
# earlyoom's --avoid: every process name except exactly "hog" (POSIX ERE has no negative look-ahead).
AVOID_ALL_BUT_HOG = "^([^h].*|h|h[^o].*|ho|ho[^g].*|hog.+)$"


class BenchError(SystemExit):
    """A bench that cannot go on. Where nothing catches it, its message is one line on stderr and the exit status
    1, without a traceback; finally blocks still run, so every process started is still stopped."""


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# --- options -------------------------------------------------------------------------------------------------


def bench_parser(doc: str | None, *, runs: int | None = None, runs_help: str | None = None,
                 quick: str | None = None, raw: bool = False) -> argparse.ArgumentParser:
    """The options every bench has: --out FILE; --runs N where *runs* is its default; --quick where *quick* says
    what it does (--runs then defaults to None, for quick_defaults to settle); --raw FILE where *raw*."""
    parser = argparse.ArgumentParser(description=" ".join((doc or "").split("\n\n")[0].split()))
    if runs is not None:
        parser.add_argument("--runs", type=int, default=None if quick else runs,
                            help=runs_help or f"timed runs per figure (default {runs})")
    if quick is not None:
        parser.add_argument("--quick", action="store_true", help=quick)
    parser.add_argument("--out", metavar="FILE", help="also write the Markdown report to FILE")
    if raw:
        parser.add_argument("--raw", metavar="FILE", help="every measurement (seconds) as JSON in FILE")
    return parser


def quick_defaults(args: argparse.Namespace, **defaults: tuple[Any, Any]) -> None:
    """Each option left unset (None) gets its default, given as (normal, with --quick)."""
    for name, (normal, quick) in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, quick if args.quick else normal)


def publish(text: str, out: str | Path | None, raw: str | Path | None = None, data: object = None) -> None:
    """The report on stdout and in *out*; *data* as JSON in *raw*."""
    text = text if text.endswith("\n") else text + "\n"
    sys.stdout.write(text)
    sys.stdout.flush()
    if out:
        Path(out).write_text(text, encoding="utf-8")
    if raw:
        Path(raw).write_text(json.dumps(data, indent=1, default=str), encoding="utf-8")


# --- where safegate runs ---------------------------------------------------------------------------------------


@contextlib.contextmanager
def workdir(prefix: str, mode: int | None = None) -> Iterator[Path]:
    """A temp dir for one bench run (lock dirs, configs, logs, bytecode), removed with everything in it."""
    path = Path(tempfile.mkdtemp(prefix=prefix))
    try:
        if mode is not None:
            path.chmod(mode)
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def bench_env(*, pycache: Path | None = None, **settings: str) -> dict[str, str]:
    """The caller's environment without its SAFEGATE_* and SLURM_* variables (they change what safegate does),
    plus *settings*. With *pycache*, Python children cache their bytecode there, whatever PYTHONDONTWRITEBYTECODE
    says, as an installed safegate has it; without, bytecode is as the caller has it."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SAFEGATE_", "SLURM_"))}
    if pycache is not None:
        env.pop("PYTHONDONTWRITEBYTECODE", None)
        env["PYTHONPYCACHEPREFIX"] = str(pycache)
    env.update(settings)
    return env


def find_safegate(explicit: str | None) -> str:
    """The safegate executable: *explicit*, else the one beside this Python, else the one on PATH."""
    if explicit:
        return explicit
    beside = Path(sys.executable).parent / "safegate"
    if beside.is_file() and os.access(beside, os.X_OK):
        return str(beside)
    found = shutil.which("safegate")
    if found:
        return found
    raise BenchError("no safegate executable found (use --safegate PATH, or run with the venv's python)")


def safegate_missing() -> str | None:
    """Why this Python cannot import safegate (the benches time parts of it in-process), or None."""
    try:
        import safegate  # noqa: F401
    except ImportError:
        return (f"safegate is not importable by {sys.executable}; "
                "run this with the venv's python (e.g. . /tmp/sgenv/bin/activate)")
    return None


def compile_c(cc: str, source: str, exe: Path) -> None:
    """Build a small C helper (a memory hog) from *source* into *exe*."""
    c_file = exe.with_suffix(".c")
    c_file.write_text(source, encoding="ascii")
    out = subprocess.run([cc, "-O2", "-o", str(exe), str(c_file)], capture_output=True, text=True, check=False)
    if out.returncode != 0:
        raise BenchError(f"{cc} could not compile {c_file.name}: {out.stderr.strip()[:500]}")


# --- timing one command ----------------------------------------------------------------------------------------

# Each command in a shell of its own, as users run check: since issue 23 a passing check grants its lock to its
# parent's next process, and a shell that starts nothing after it ends the grant by exiting. Before each call
# (untimed) the previous call's grant is let go: every lock of the bench's lock dir is free again.
ALONE = ["sh", "-c", '"$@"; exit $?', "sh"]


def lock_free(path: Path) -> bool:
    """No process holds a flock on *path* (or there is nothing to lock)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return True
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    finally:
        os.close(fd)
    return True


def wait_locks_free(paths: Iterable[Path], timeout: float = 30.0) -> None:
    end = time.monotonic() + timeout
    for path in paths:
        while not lock_free(path) and time.monotonic() < end:
            time.sleep(0.002)


def timed_run(argv: Sequence[str], env: Mapping[str, str] | None = None, *, cwd: Path | None = None,
              ok: Container[int] = (0,), timeout: float | None = None,
              locks: Iterable[Path] | None = None) -> tuple[float, int]:
    """(wall time from spawn to exit, exit status) of *argv*, run alone (see ALONE) once *locks* are free: by
    default every lock in *env*'s SAFEGATE_LOCK_DIR. Its output is kept only to say why when the status is not
    in *ok*, which stops the bench."""
    if locks is None:
        lock_dir = (env or {}).get("SAFEGATE_LOCK_DIR")
        locks = Path(lock_dir).glob("*.lock") if lock_dir else ()
    wait_locks_free(locks)
    start = time.perf_counter()
    done = subprocess.run([*ALONE, *argv], env=env, cwd=cwd, stdin=subprocess.DEVNULL, capture_output=True,
                          text=True, timeout=timeout, check=False)
    elapsed = time.perf_counter() - start
    if done.returncode not in ok:
        where = f" (lock dir {env['SAFEGATE_LOCK_DIR']})" if env and "SAFEGATE_LOCK_DIR" in env else ""
        raise BenchError(f"{' '.join(argv)} exited {done.returncode}{where}: "
                         f"{(done.stdout + done.stderr).strip()[-800:]}")
    return elapsed, done.returncode


# --- signals: no process the bench starts may outlive it ---------------------------------------------------------

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


def interrupt_on_signals() -> None:
    """SIGTERM and SIGHUP end the run as Ctrl-C does, so the finally blocks stop every process."""

    def interrupted(signum: int, _frame: object) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, interrupted)
    signal.signal(signal.SIGHUP, interrupted)


class DeferredStop:
    """Hold Ctrl-C/SIGTERM/SIGHUP while a process is started and recorded, so none escapes the record."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self.old: dict[int, Any] = {}

    def __enter__(self) -> DeferredStop:
        self.old = {s: signal.signal(s, self._note) for s in STOP_SIGNALS}
        return self

    def _note(self, signum: int, _frame: object) -> None:
        self.signum = signum

    def check(self) -> None:
        if self.signum is not None:
            raise KeyboardInterrupt(f"signal {self.signum}")

    def __exit__(self, *exc: object) -> None:
        for s, handler in self.old.items():
            signal.signal(s, handler)
        if exc[0] is None:
            self.check()


@contextlib.contextmanager
def signals_ignored() -> Iterator[None]:
    """A clean-up that a second Ctrl-C (or SIGTERM) must not cut short."""
    old = {s: signal.signal(s, signal.SIG_IGN) for s in STOP_SIGNALS}
    try:
        yield
    finally:
        for s, handler in old.items():
            signal.signal(s, handler)


# --- /proc -----------------------------------------------------------------------------------------------------


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


def available() -> int:
    """MemAvailable in bytes. Cheap (bytes, no decoding): bench_floor samples it every millisecond."""
    with open("/proc/meminfo", "rb") as fh:
        for line in fh:
            if line.startswith(b"MemAvailable:"):
                return int(line.split()[1]) * 1024
    return 0


def settle(baseline: int, timeout: float = 10.0) -> int:
    """Wait until MemAvailable is back within 64 MiB of *baseline* (or *timeout*); MemAvailable then."""
    deadline = time.monotonic() + timeout
    while True:
        now = available()
        if now >= baseline - (64 << 20) or time.monotonic() > deadline:
            return now
        time.sleep(0.05)


def count_proc() -> int:
    return sum(1 for name in os.listdir("/proc") if name.isdigit())


def tree(pid: int) -> list[int]:
    """*pid* and every process below it, parents first (from /proc/PID/task/PID/children)."""
    try:
        kids = [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return [pid]
    return [pid, *[p for k in kids for p in tree(k)]]


# --- a job under `safegate exec --log`, and its peak memory (issue 27's predicted-vs-measured benches) -----------

JOB_STATUS_FIELDS = ("VmHWM", "VmRSS", "RssAnon", "RssFile")


def proc_status(pid: int, fields: Sequence[str] = JOB_STATUS_FIELDS) -> dict[str, int]:
    """*fields* of /proc/PID/status in bytes ({} once the process is gone)."""
    found: dict[str, int] = {}
    for line in read_text(f"/proc/{pid}/status").splitlines():
        name, _, rest = line.partition(":")
        if name in fields and rest.split():
            found[name] = int(rest.split()[0]) * 1024
    return found


def file_cached(path: Path) -> int:
    """Bytes of *path* in the page cache (util-linux fincore), -1 when fincore cannot tell."""
    out = first_line(["fincore", "--bytes", "--noheadings", "--output", "RES", str(path)])
    return int(out) if out.strip().isdigit() else -1


def evict(path: Path) -> None:
    """Drop *path*'s clean pages from the page cache (pages a process maps stay): the next reader reads the disk,
    and the page cache it fills is charged to its own cgroup, as at a user's first run after a reboot."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def warm(path: Path) -> None:
    """Read *path* once, so its pages are in the page cache, charged to the bench's cgroup, not to the job's."""
    with open(path, "rb") as fh:
        while fh.read(16 << 20):
            pass


def log_events(path: Path) -> list[dict[str, Any]]:
    """The JSON events of a `safegate exec --log` file (lines that are not JSON objects are left out)."""
    events = []
    for line in read_text(str(path)).splitlines():
        with contextlib.suppress(ValueError):
            event = json.loads(line)
            if isinstance(event, dict):
                events.append(event)
    return events


def exec_with_peak(safegate: str, argv: Sequence[str], env: Mapping[str, str], work: Path, name: str, *,
                   exec_options: Sequence[str] = (), poll: float = 0.05,
                   timeout: float | None = None) -> dict[str, Any]:
    """Run *argv* as `safegate exec --log WORK/NAME.log ... -- ARGV`; while it runs, poll the job's main process
    (the `admitted` event's pid) for its own high-water marks (VmHWM, and the highest RssAnon and RssFile seen), and
    the machine's lowest MemAvailable. Returns safegate's exit status, the `summary` event's peak_job_memory (what
    safegate records and learns from), those cross-checks, the wall time, and where the job's output went."""
    log_file, out_file, err_file = (work / f"{name}.{ext}" for ext in ("log", "out", "err"))
    log_file.unlink(missing_ok=True)
    start_available = available()
    highest: dict[str, int] = {}
    lowest_available = start_available
    pid: int | None = None
    start = time.monotonic()
    with open(out_file, "wb") as out, open(err_file, "wb") as err:
        with DeferredStop():  # only while starting it: once it runs, Ctrl-C lands in the loop and stops it
            proc = subprocess.Popen([safegate, "exec", "--log", str(log_file), *exec_options, "--", *argv],
                                    env=env, stdin=subprocess.DEVNULL, stdout=out, stderr=err)
        try:
            while proc.poll() is None:
                if timeout is not None and time.monotonic() - start > timeout:
                    raise BenchError(f"{name}: the job ran past {timeout:.0f} s")
                if pid is None:
                    pid = next((int(e["pid"]) for e in log_events(log_file)
                                if e.get("event") == "admitted" and isinstance(e.get("pid"), int)), None)
                if pid is not None:
                    for key, value in proc_status(pid).items():
                        highest[key] = max(highest.get(key, 0), value)
                lowest_available = min(lowest_available, available())
                time.sleep(poll)
        finally:
            if proc.poll() is None:
                with signals_ignored():
                    proc.terminate()
                    try:
                        proc.wait(30)
                    except subprocess.TimeoutExpired:
                        proc.kill()
                        proc.wait()
    summary = next((e for e in log_events(log_file) if e.get("event") == "summary"), {})
    return {
        "status": proc.returncode, "wall_s": time.monotonic() - start, "pid": pid,
        "peak_job_memory": summary.get("peak_job_memory"), "job_exit_code": summary.get("exit_code"),
        "polled": highest, "available_drop": start_available - lowest_available,
        "log": str(log_file), "stdout": str(out_file), "stderr": str(err_file),
    }


def need_json(safegate: str, argv: Sequence[str], env: Mapping[str, str]) -> dict[str, Any] | str:
    """`safegate need --json -- ARGV`'s answer, or why there is none (a safegate without `need`, bad JSON)."""
    done = subprocess.run([safegate, "need", "--json", "--", *argv], env=env, capture_output=True, text=True,
                          stdin=subprocess.DEVNULL, timeout=120, check=False)
    if done.returncode != 0:
        return f"`safegate need` exited {done.returncode}: {(done.stderr or done.stdout).strip()[-300:]}"
    try:
        answer = json.loads(done.stdout)
    except ValueError:
        return f"`safegate need --json` printed no JSON: {done.stdout.strip()[:300]}"
    return answer if isinstance(answer, dict) else f"`safegate need --json` printed {type(answer).__name__}"


def predicted_ram(answer: dict[str, Any] | str, *, detail: bool = False) -> tuple[int | None, str]:
    """The predicted RAM of a need_json() answer, and its source (with how it was derived where *detail*), or why
    there is none."""
    if isinstance(answer, str):
        return None, answer
    pred = answer.get("predicted")
    if isinstance(pred, dict) and isinstance(pred.get("memory"), int):
        how = f"{pred.get('source', '?')}: {pred.get('detail', '')}" if detail else f"{pred.get('source', '?')}"
        return pred["memory"], how
    return None, f"no prediction in `need --json`: {answer.get('notes')}"


# --- statistics and Markdown -------------------------------------------------------------------------------------


def summarize(samples: Sequence[float]) -> dict[str, float]:
    """n, median, p10, p90 (interpolated, statistics.quantiles' inclusive method), min and max."""
    xs = sorted(samples)
    if len(xs) >= 2:
        deciles = statistics.quantiles(xs, n=10, method="inclusive")
        p10, p90 = deciles[0], deciles[-1]
    else:
        p10 = p90 = xs[0]
    return {"n": len(xs), "median": statistics.median(xs), "p10": p10, "p90": p90, "min": xs[0], "max": xs[-1]}


def median(samples: Iterable[float]) -> float:
    return statistics.median(samples)


def md_row(*cells: object) -> str:
    """One row of a Markdown table; an empty cell is written `| |`."""
    return "|" + "|".join(f" {c} " if str(c) else " " for c in cells) + "|"


def md_table(head: Sequence[str], rows: Iterable[Sequence[object]] = ()) -> list[str]:
    """A Markdown table's lines: the head, its rule, the rows."""
    return [md_row(*head), "|" + "---|" * len(head), *(md_row(*row) for row in rows)]


# --- the machine ---------------------------------------------------------------------------------------------------


def first_line(argv: list[str]) -> str:
    try:
        out = subprocess.run(argv, capture_output=True, text=True, timeout=10, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return "not found"
    lines = (out.stdout or out.stderr).strip().splitlines()
    return lines[0] if lines else ""


def loadavg() -> str:
    return " ".join(read_text("/proc/loadavg").split()[:3]) or "?"


def stamp(when: time.struct_time | None = None) -> str:
    """`Run <UTC time>: `python <this command line>``, the first words of a report."""
    moment = time.strftime("%Y-%m-%d %H:%M:%S UTC", when or time.gmtime())
    return f"Run {moment}: `{' '.join(['python', *sys.argv])}`"


def commit(tree: Path) -> str:
    """The checkout's commit, and whether its safegate/ has changes not committed."""
    head = first_line(["git", "-C", str(tree), "rev-parse", "--short", "HEAD"])
    if not head or head == "not found" or head.startswith("fatal"):
        return "not a git checkout"
    dirty = first_line(["git", "-C", str(tree), "status", "--porcelain", "--", "safegate"])
    return f"{head} + uncommitted changes in safegate/" if dirty and dirty != "not found" else head


def machine_facts(safegate_note: str = "") -> list[tuple[str, str]]:
    """The rows of a report's "Machine" table that every bench can fill: CPUs, kernel, Python, the safegate timed."""
    import safegate

    cpu = "?"
    for line in read_text("/proc/cpuinfo").splitlines():
        if line.startswith(("model name", "Model", "Hardware")):
            cpu = line.split(":", 1)[1].strip()
            break
    try:
        usable = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        usable = os.cpu_count() or 0
    return [
        ("nproc", f"{usable} (os.cpu_count {os.cpu_count()})"),
        ("CPU", cpu),
        ("kernel", f"{platform.system()} {platform.release()}"),
        ("Python", f"{platform.python_version()} ({sys.executable})"),
        ("safegate", f"{safegate.__version__} ({Path(safegate.__file__).parent}), commit {commit(REPO)}"
                     + safegate_note),
    ]


def machine_section(facts: Sequence[tuple[str, str]], load: tuple[str, str]) -> list[str]:
    """The "Machine" section: *facts*, and the load average (1, 5, 15 min) at the start and at the end."""
    return ["", "## Machine", "", *md_table(["", ""], facts),
            md_row("load average (1, 5, 15 min)", f"start {load[0]}; end {load[1]}")]

