"""The morning report's model: `exec --log` lines turned into jobs (their lane, figures, series and markers) and
jobs into nights. Pure: text in, frozen records out; a line that is not of the log's shape is a `LogError` naming
the log and the line.

A log holds the jobs of one or more exec runs: an `admitted` event opens a job, its events follow, `summary`
closes it. `blocked` and `not_started` are jobs that never ran. Every line names the safegate that wrote it
(`safegate_pid`), so jobs that wrote one log at the same time are told apart; a log from before that field is
read as one job after another.
"""

from __future__ import annotations

import json
import math
import shlex
from array import array
from collections.abc import Iterable, Sequence
from datetime import datetime
from typing import Any

from safegate.errors import LogError
from safegate.records import dataclass, field

Series = tuple[tuple[float, float], ...]  # (Unix time, value), in time order
MAX_POINTS = 1200  # per series: more than a chart's pixel columns, as min and max of each slice of time
NIGHT_GAP = 6 * 3600.0  # a job starting this long after the previous ones ended begins another night
MARKED = ("warning", "paused", "resumed", "breach")
_WITHIN_JOB = {"sample", "signal", "cleanup", "exit", "summary", *MARKED}


@dataclass(frozen=True)
class Marker:
    time: float
    kind: str  # warning, paused, resumed, breach
    message: str


@dataclass(frozen=True)
class Job:
    source: str  # the log, as named on the command line
    line: int  # where its first event is
    command: str  # the command line, shell-quoted (unescaped: the renderer escapes it)
    profile: str
    lock: str | None
    start: float
    end: float
    exit_code: int | None  # None: the log ends before the job does
    outcome: str  # finished, failed, stopped, not_started, unfinished
    ended: str  # how it ended, in words, with the exit code
    max_mem: int | None = None
    min_available: int | None = None
    max_temp: float | None = None
    max_gpu_mem: int | None = None
    memory: Series = ()
    available: Series = ()
    temp: Series = ()
    vram: tuple[tuple[int, Series], ...] = ()  # per GPU index: the card's used VRAM (samples)
    job_vram: Series = ()  # the job's own VRAM on its GPUs
    markers: tuple[Marker, ...] = ()
    pauses: tuple[tuple[float, float], ...] = ()
    peak_memory: int | None = None
    peak_vram: int | None = None  # the job's own
    highest_temp: float | None = None

    @property
    def duration(self) -> float:
        return max(0.0, self.end - self.start)


@dataclass(frozen=True)
class Night:
    start: float
    end: float
    jobs: tuple[Job, ...]


@dataclass(frozen=True)
class MorningReport:
    nights: tuple[Night, ...]
    sources: tuple[tuple[str, int], ...]  # each log and how many jobs it held

    @property
    def jobs(self) -> tuple[Job, ...]:
        return tuple(job for night in self.nights for job in night.jobs)


# --- reading lines -----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Record:
    line: int
    time: float
    kind: str
    message: str
    data: dict[str, Any]


def parse_line(source: str, number: int, text: str) -> Record:
    where = f"{source} line {number}"
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise LogError(f"{where}: not JSON ({exc.msg} at column {exc.colno}); expected safegate exec --log "
                       "output") from None
    except (ValueError, RecursionError):
        raise LogError(f"{where}: not JSON (nested too deep); expected safegate exec --log output") from None
    if not isinstance(data, dict):
        raise LogError(f"{where}: a JSON {type(data).__name__}, not an object; expected safegate exec --log output")
    kind, stamp = data.get("event"), data.get("time")
    if not isinstance(kind, str) or not isinstance(stamp, str):
        raise LogError(f"{where}: no \"event\" and \"time\" strings; expected safegate exec --log output")
    try:
        moment = datetime.fromisoformat(stamp).timestamp()
    except (ValueError, OverflowError, OSError):
        raise LogError(f"{where}: time {stamp[:40]!r} is not an ISO 8601 time") from None
    message = data.get("message", "")
    return Record(number, moment, kind, message if isinstance(message, str) else str(message), data)


def _number(record: Record, key: str, where: str, *, integer: bool = False) -> float | None:
    value = record.data.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int if integer else (int, float)) or \
            not math.isfinite(value):
        kind = "an integer" if integer else "a finite number"
        raise LogError(f"{where}: {record.kind} event's {key} is {json.dumps(value)[:40]}, not {kind}")
    return float(value)


def _thin(times: Sequence[float], values: Sequence[float], limit: int = MAX_POINTS) -> Series:
    """At most about *limit* points: in each slice of time its first, lowest, highest and last point, so a peak
    or a dip between two pixels is still drawn."""
    if len(times) <= limit:
        return tuple(zip(times, values, strict=True))
    slices = max(1, limit // 4)
    span = (times[-1] - times[0]) or 1.0
    out: list[tuple[float, float]] = []
    start = 0
    while start < len(times):
        index = min(slices - 1, int((times[start] - times[0]) / span * slices))
        end = start
        while end < len(times) and min(slices - 1, int((times[end] - times[0]) / span * slices)) == index:
            end += 1
        chosen = {start, end - 1, min(range(start, end), key=values.__getitem__),
                  max(range(start, end), key=values.__getitem__)}
        out += [(times[i], values[i]) for i in sorted(chosen)]
        start = end
    return tuple(out)


@dataclass
class _Open:
    """A job while its events are read."""

    source: str
    line: int
    start: float
    data: dict[str, Any]
    last: float
    series: dict[str, tuple[array[float], array[float]]] = field(default_factory=dict)
    markers: list[Marker] = field(default_factory=list)
    exit: dict[str, Any] | None = None
    exit_message: str = ""
    summary: dict[str, Any] | None = None

    def add(self, name: str, moment: float, value: float | None) -> None:
        if value is not None:
            times, values = self.series.setdefault(name, (array("d"), array("d")))
            times.append(moment)
            values.append(value)

    def thinned(self, name: str) -> Series:
        times, values = self.series.get(name, (array("d"), array("d")))
        return _thin(times, values)

    def peak(self, name: str) -> float | None:
        values = self.series.get(name, (array("d"), array("d")))[1]
        return max(values) if values else None


def _sample(job: _Open, record: Record, where: str) -> None:
    memory = _number(record, "job_memory", where, integer=True)
    available = _number(record, "available", where, integer=True)
    if memory is None or available is None:
        raise LogError(f"{where}: sample event without job_memory and available")
    job.add("memory", record.time, memory)
    job.add("available", record.time, available)
    job.add("temp", record.time, _number(record, "temp", where))
    job.add("job_vram", record.time, _number(record, "job_gpu_memory", where, integer=True))
    gpus = record.data.get("gpus", [])
    if not isinstance(gpus, list) or not all(isinstance(g, dict) for g in gpus):
        raise LogError(f"{where}: sample event's gpus is not a list of objects")
    for gpu in gpus:
        item = Record(record.line, record.time, "sample gpu", "", gpu)
        index, used = _number(item, "index", where, integer=True), _number(item, "used", where, integer=True)
        if index is not None and used is not None:
            job.add(f"gpu{int(index)}", record.time, used)  # the card's used VRAM, not only the job's


def _ended(job: _Open) -> tuple[int | None, str, str]:
    """(exit code, outcome, how it ended in words)."""
    info = job.exit or job.summary
    if info is None:
        return None, "unfinished", "no end in the log (safegate was stopped, or the log was cut)"
    code, reason = info.get("exit_code"), info.get("reason")
    code = code if isinstance(code, int) and not isinstance(code, bool) else None
    if reason in ("memory", "gpu", "thermal"):
        breach = next((m.message for m in job.markers if m.kind == "breach"), "")
        why = breach.split("; sending", 1)[0]
        return code, "stopped", f"stopped for {reason} (exit {code})" + (f": {why}" if why else "")
    words = job.exit_message.removeprefix("job ") if job.exit_message else f"exited {code}"
    return code, "finished" if code == 0 else "failed", words


def _close(job: _Open, end: float) -> Job:
    data = job.data
    argv = data.get("argv")
    command = (shlex.join(argv) if isinstance(argv, list) and all(isinstance(a, str) for a in argv)
               else str(data.get("message", "")))
    code, outcome, ended = _ended(job)
    summary = job.summary or {}
    pauses, opened = [], None
    for marker in job.markers:
        if marker.kind == "paused" and opened is None:
            opened = marker.time
        elif marker.kind == "resumed" and opened is not None:
            pauses.append((opened, marker.time))
            opened = None
    if opened is not None:
        pauses.append((opened, end))

    def figure(key: str, series: str) -> float | None:
        value = summary.get(key)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        return job.peak(series)

    def whole(value: float | None) -> int | None:
        return None if value is None else int(value)

    gpus = sorted(int(name[3:]) for name in job.series if name.startswith("gpu"))
    return Job(
        source=job.source, line=job.line, command=command, profile=str(data.get("profile", "")),
        lock=None if data.get("lock") is None else str(data.get("lock")), start=job.start, end=max(end, job.start),
        exit_code=code, outcome=outcome, ended=ended, max_mem=whole(data.get("max_mem")),
        min_available=whole(data.get("min_available")),
        max_temp=None if data.get("max_temp") is None else float(data["max_temp"]),
        max_gpu_mem=whole(data.get("max_gpu_mem")), memory=job.thinned("memory"),
        available=job.thinned("available"), temp=job.thinned("temp"),
        vram=tuple((index, job.thinned(f"gpu{index}")) for index in gpus), job_vram=job.thinned("job_vram"),
        markers=tuple(job.markers),
        pauses=tuple(pauses), peak_memory=whole(figure("peak_job_memory", "memory")),
        peak_vram=whole(figure("peak_job_gpu_memory", "job_vram")), highest_temp=figure("highest_temp", "temp"),
    )


def _admitted(source: str, record: Record) -> _Open:
    where = f"{source} line {record.line}"
    for key in ("max_mem", "min_available", "max_gpu_mem"):
        _number(record, key, where, integer=True)
    _number(record, "max_temp", where)
    argv = record.data.get("argv")
    if argv is not None and not (isinstance(argv, list) and all(isinstance(a, str) for a in argv)):
        raise LogError(f"{where}: admitted event's argv is not a list of strings")
    return _Open(source, record.line, record.time, {**record.data, "message": record.message}, record.time)


def _never_ran(source: str, record: Record) -> Job:
    code = _number(record, "exit_code", f"{source} line {record.line}", integer=True)
    what = "blocked" if record.kind == "blocked" else "not started"
    return Job(source=source, line=record.line, command="", profile="", lock=None, start=record.time,
               end=record.time, exit_code=None if code is None else int(code), outcome="not_started",
               ended=f"{what}: {record.message}" + ("" if code is None else f" (exit {int(code)})"))


def _within(job: _Open, record: Record, where: str) -> None:
    """An event of a running job: a sample, a marker, its exit or its summary."""
    job.last = max(job.last, record.time)
    if record.kind == "sample":
        _sample(job, record, where)
    elif record.kind in MARKED:
        job.markers.append(Marker(record.time, record.kind, record.message))
        for key in ("max_mem", "min_available", "max_temp"):  # the limit, for a log without it at the start
            if job.data.get(key) is None and _number(record, key, where) is not None:
                job.data[key] = record.data[key]
    elif record.kind == "exit":
        _number(record, "exit_code", where, integer=True)
        job.exit, job.exit_message = record.data, record.message
    elif record.kind == "summary":
        _number(record, "exit_code", where, integer=True)
        for key in ("peak_job_memory", "peak_job_gpu_memory", "highest_temp"):
            _number(record, key, where)
        job.summary = record.data


def jobs_from_lines(source: str, lines: Iterable[str]) -> list[Job]:
    """Every job in one log, in the order they started. A log without any job is a `LogError` too."""
    jobs: list[Job] = []
    open_jobs: dict[int | None, _Open] = {}  # by the safegate that writes its lines (None: an older log)
    seen = 0
    for number, text in enumerate(lines, 1):
        if not text.strip():
            continue
        record = parse_line(source, number, text)
        seen += 1
        where = f"{source} line {number}"
        writer = _number(record, "safegate_pid", where, integer=True)
        key = None if writer is None else int(writer)
        job = open_jobs.get(key)
        if record.kind == "admitted":
            if job is not None:
                jobs.append(_close(job, job.last))
            open_jobs[key] = _admitted(source, record)
        elif record.kind in ("blocked", "not_started"):
            jobs.append(_never_ran(source, record))
        elif job is not None and record.kind in _WITHIN_JOB:
            _within(job, record, where)
            if record.kind == "summary":
                jobs.append(_close(job, record.time))
                del open_jobs[key]
    jobs += [_close(job, job.last) for job in open_jobs.values()]
    if not jobs:
        what = "no events" if not seen else "no admitted, blocked or not_started event"
        raise LogError(f"{source}: no job in it ({what}); expected safegate exec --log output")
    return sorted(jobs, key=lambda j: j.start)


def build_report(logs: Sequence[tuple[str, Sequence[Job]]]) -> MorningReport:
    """Every log's jobs, grouped into nights: a job starting NIGHT_GAP after the jobs before it ended opens one."""
    everything = sorted((job for _, jobs in logs for job in jobs), key=lambda j: (j.start, j.source, j.line))
    nights: list[list[Job]] = []
    for job in everything:
        if nights and job.start <= max(j.end for j in nights[-1]) + NIGHT_GAP:
            nights[-1].append(job)
        else:
            nights.append([job])
    return MorningReport(
        nights=tuple(Night(min(j.start for j in group), max(j.end for j in group), tuple(group))
                     for group in nights),
        sources=tuple((name, len(jobs)) for name, jobs in logs),
    )
