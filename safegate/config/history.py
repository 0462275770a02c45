"""What past exec runs used, per profile, so a profile can say `memory = "auto"`.

One small JSON file under the user's state dir ($XDG_STATE_HOME/safegate/history.json), at most
KEEP runs per profile. Writers take an flock on a side file, read, append, write a temp file and
rename it over: concurrent execs never lose each other's runs, and readers never see half a file.
"""

from __future__ import annotations

import fcntl
import json
import math
import os
import stat
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import msgspec
from msgspec.structs import asdict

from safegate import schema
from safegate.units import printable

KEEP = 50
# 50 runs of a profile are ~8 KiB; past this the file is not one safegate wrote, and is never read whole.
HISTORY_MAX_BYTES = 4 * 1024 * 1024
MIN_RUNS = 3
AUTO_FALLBACK = 4 * 1024**3  # a profile with memory = "auto" and fewer than MIN_RUNS recorded runs
AUTO_HEADROOM = 1.10


class Run(msgspec.Struct, frozen=True):
    """One recorded exec run: also how the history file's runs decode, every field typed and bounded."""

    time: schema.Timestamp
    peak_memory: schema.Size
    peak_gpu_memory: schema.Size | None
    duration: schema.Seconds
    reason: schema.Text
    exit_code: schema.ExitStatus
    # What the command was (safegate.need.command's signature: program, model, context, offload; never its full
    # arguments) and what was predicted for it then. Absent in files written before they were recorded.
    signature: schema.Text | None = None
    predicted_memory: schema.Size | None = None
    predicted_gpu_memory: schema.Size | None = None

    def __post_init__(self) -> None:
        schema.not_future(self.time)


def history_path(env: Mapping[str, str] | None = None) -> Path:
    env = os.environ if env is None else env
    base = env.get("XDG_STATE_HOME") or str(Path(env.get("HOME", "~")).expanduser() / ".local" / "state")
    return Path(base) / "safegate" / "history.json"


def load(path: Path) -> dict[str, list[Run]]:
    """The recorded runs; absent, unreadable or corrupt history is no history, never a failure."""
    return read(path)[0]


def read(path: Path) -> tuple[dict[str, list[Run]], str]:
    """(runs, note): the note says why the file is unusable ("" when it is fine or absent)."""
    try:
        # Non-blocking: a FIFO there must not hang exec after its job has ended.
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        return {}, ""
    except OSError as exc:
        return {}, f"unreadable: {exc.strerror or exc}"
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return {}, "not a regular file"
        raw = os.read(fd, HISTORY_MAX_BYTES + 1)
    except OSError as exc:
        return {}, f"unreadable: {exc.strerror or exc}"
    finally:
        os.close(fd)
    if len(raw) > HISTORY_MAX_BYTES:
        return {}, f"larger than {HISTORY_MAX_BYTES // 1024**2} MiB"

    try:
        data = schema.decode(raw, schema.HistoryWire)
    except schema.BadRecord as exc:
        return {}, f"corrupt ({printable(str(exc))[:200]})"
    runs: dict[str, list[Run]] = {}
    bad: list[str] = []
    for profile, items in data.items():
        kept = runs.setdefault(profile, [])
        for item in items:
            # Every field typed and bounded (a 400-digit peak, a time in year 9999, a wrong type): that run is
            # unusable, the others count, and the next record() sets the file aside, carrying the good ones over.
            try:
                kept.append(schema.decode(item, Run))
            except schema.BadRecord as exc:
                bad.append(printable(str(exc))[:200])
    return runs, (f"{len(bad)} unusable run(s) ignored (first: {bad[0]})" if bad else "")


def record(path: Path, profile: str, run: Run) -> str:
    """Append *run*; raises OSError (the caller warns and goes on). An unusable file is set aside (renamed to
    history.json.broken) and a new one started: the return says so ("" when the file was fine)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path.with_suffix(".lock"), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NONBLOCK, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)  # writers one at a time: none loses another's run
        data, broken = read(path)
        said = ""
        if broken:
            aside = path.with_name(path.name + ".broken")
            os.replace(path, aside)
            kept = sum(len(rs) for rs in data.values())
            said = (f"history {path} was unusable ({broken}); set aside as {aside}, starting a new one"
                    + (f" with its {kept} usable run(s)" if kept else ""))
        runs = [*data.get(profile, []), run][-KEEP:]
        data[profile] = runs
        payload: dict[str, Any] = {name: [asdict(r) for r in rs] for name, rs in data.items()}
        tmp_fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".history.", suffix=".tmp")
        try:
            with os.fdopen(tmp_fd, "w", encoding="utf-8") as fh:
                json.dump(payload, fh)
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        fcntl.flock(fd, fcntl.LOCK_UN)
        return said
    finally:
        os.close(fd)


def percentile(values: list[int], q: float) -> int:
    """Nearest-rank percentile."""
    ordered = sorted(values)
    rank = max(1, math.ceil(q / 100 * len(ordered)))
    return ordered[rank - 1]


# A run stopped at a memory or VRAM cap peaked at the cap, not at what it needed: its peak is a floor of the
# need, never the need itself, so it is kept out of the learned peak (and counted, so `profiles` can say so).
CAPPED = ("memory", "gpu")


def capped(run: Run) -> bool:
    return run.reason in CAPPED


def whole_runs(runs: list[Run]) -> list[Run]:
    """The runs whose peak is what the job used: not stopped at a cap, and with a peak recorded."""
    return [r for r in runs if r.peak_memory > 0 and not capped(r)]


def learned_need(runs: list[Run]) -> int | None:
    """The 95th percentile of the peaks of runs not stopped at a cap, plus 10%; None until MIN_RUNS such runs
    exist."""
    peaks = [r.peak_memory for r in whole_runs(runs)]
    if len(peaks) < MIN_RUNS:
        return None
    return int(percentile(peaks, 95) * AUTO_HEADROOM)


def learned_gpu_need(runs: list[Run]) -> int | None:
    """As learned_need, of the GPU memory peaks (runs that recorded one)."""
    peaks = [r.peak_gpu_memory for r in runs if r.peak_gpu_memory and not capped(r)]
    if len(peaks) < MIN_RUNS:
        return None
    return int(percentile(peaks, 95) * AUTO_HEADROOM)


def of_signature(data: Mapping[str, list[Run]], signature: str) -> list[Run]:
    """Every recorded run of the command *signature*, under whichever profile it ran."""
    return [r for runs in data.values() for r in runs if r.signature == signature]
