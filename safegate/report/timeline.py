"""The morning report's model: `exec --log` lines turned into jobs (their lane, figures, series and markers) and
jobs into nights. Text in, frozen records out; a line that is not of the log's shape (safegate.report.logschema checks
each field's type and range) is a `LogError` naming the log and the line.

Time and memory are linear in the log: a line is decoded, folded into its job and dropped; a job keeps its
figures, series thinned as they grow (at most about 2 * MAX_POINTS points each), at most MAX_MARKS markers of
each kind and shortened texts.

A log holds the jobs of one or more exec runs: an `admitted` event opens a job, its events follow, `summary`
closes it. `blocked` and `not_started` are jobs that never ran. Every line names the safegate that wrote it
(`safegate_pid`), so jobs that wrote one log at the same time are told apart; a log from before that field is
read as one job after another.
"""

from __future__ import annotations

import shlex
import time
from array import array
from collections.abc import Iterable, Sequence

import msgspec

from safegate.errors import LogError
from safegate.report.logschema import (
    Admitted,
    Cleanup,
    Exit,
    LineDecoder,
    Marked,
    NotAdmitted,
    NotStarted,
    Paused,
    Resumed,
    Sample,
    SignalSent,
    Summary,
)

Series = tuple[tuple[float, float], ...]  # (Unix time, value), in time order
MAX_POINTS = 1200  # per series: more than a chart's pixel columns, as min and max of each slice of time
NIGHT_GAP = 6 * 3600.0  # a job starting this long after the previous ones ended begins another night
MAX_MARKS = 100  # per job and kind of marker: drawn, the rest only counted (a hostile log may hold millions)
MAX_PAUSES = 400  # per job
MAX_TEXT = 2_000  # characters kept of a message; the page shows them in full
MAX_COMMAND = 10_000  # characters kept of a command line (ARG_MAX allows megabytes)


class Marker(msgspec.Struct, frozen=True):
    time: float
    kind: str  # warning, paused, resumed, breach
    message: str


class Job(msgspec.Struct, frozen=True):
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
    short: str = ""  # the same in a few words: what a table cell shows on one line
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
    left_out: int = 0  # markers and pauses past MAX_MARKS and MAX_PAUSES: counted, not drawn
    waited: float | None = None  # seconds in line before it was admitted (or gave up); None: not in the log

    @property
    def paused(self) -> float:
        return sum(max(0.0, end - start) for start, end in self.pauses)

    @property
    def duration(self) -> float:
        return max(0.0, self.end - self.start)


class Night(msgspec.Struct, frozen=True):
    start: float
    end: float
    jobs: tuple[Job, ...]


class MorningReport(msgspec.Struct, frozen=True):
    nights: tuple[Night, ...]
    sources: tuple[tuple[str, int], ...]  # each log and how many jobs it held

    @property
    def jobs(self) -> tuple[Job, ...]:
        return tuple(job for night in self.nights for job in night.jobs)


# --- reading lines -----------------------------------------------------------------------------------------


def _thin(times: Sequence[float], values: Sequence[float], limit: int = MAX_POINTS) -> Series:
    """At most *limit* points: in each slice of time its first, lowest, highest and last point, so a peak or a
    dip between two pixels is still drawn. Points out of time order (a hostile log) stay within the limit too."""
    if len(times) <= limit:
        return tuple(zip(times, values, strict=True))
    slices = max(1, limit // 4)
    low = min(times)
    span = (max(times) - low) or 1.0
    chosen: dict[int, list[int]] = {}  # per slice: its first, last, lowest and highest point
    for i, moment in enumerate(times):
        picked = chosen.get(index := min(slices - 1, int((moment - low) / span * slices)))
        if picked is None:
            chosen[index] = [i, i, i, i]
            continue
        picked[1] = i
        if values[i] < values[picked[2]]:
            picked[2] = i
        elif values[i] > values[picked[3]]:
            picked[3] = i
    return tuple((times[i], values[i]) for i in sorted({i for picked in chosen.values() for i in picked}))


class _Series:
    """One series of a job while it is read: thinned again whenever it doubles, so memory stays bounded."""

    __slots__ = ("peak", "times", "values")

    def __init__(self) -> None:
        self.times, self.values = array("d"), array("d")
        self.peak: float | None = None

    def add(self, moment: float, value: float) -> None:
        self.times.append(moment)
        self.values.append(value)
        if self.peak is None or value > self.peak:
            self.peak = value
        if len(self.times) >= 2 * MAX_POINTS:
            thin = _thin(self.times, self.values)
            self.times, self.values = array("d", (t for t, _ in thin)), array("d", (v for _, v in thin))

    def thinned(self) -> Series:
        return _thin(self.times, self.values)


def _kept(text: str, most: int = MAX_TEXT) -> str:
    return text if len(text) <= most else f"{text[:most]}... ({len(text) - most} more characters)"


class _Open:
    """A job while its events are read: its figures so far, never its lines."""

    __slots__ = ("breach", "command", "counts", "exit", "last", "left_out", "line", "lock", "markers", "max_gpu_mem",
                 "max_mem", "max_temp", "min_available", "paused_at", "pauses", "profile", "series", "source",
                 "start", "summary", "vram", "waited")

    def __init__(self, source: str, line: int, start: float, admitted: Admitted) -> None:
        self.source, self.line, self.start, self.last = source, line, start, start
        argv = admitted.argv
        self.command = _kept(admitted.message if argv is None else shlex.join(argv), MAX_COMMAND)
        self.profile = _kept(admitted.profile, 200)
        self.lock = None if admitted.lock is None else _kept(admitted.lock, 200)
        self.max_mem, self.min_available = admitted.max_mem, admitted.min_available
        self.max_temp, self.max_gpu_mem = admitted.max_temp, admitted.max_gpu_mem
        self.waited = admitted.waited
        self.series: dict[str, _Series] = {}  # made on the first point: a job is often only its admitted line
        self.vram: dict[int, _Series] = {}
        self.markers: list[Marker] = []
        self.counts = dict.fromkeys(("warning", "paused", "resumed", "breach"), 0)
        self.left_out = 0
        self.pauses: list[tuple[float, float]] = []
        self.paused_at: float | None = None
        self.breach = ""
        self.exit: Exit | None = None
        self.summary: Summary | None = None

    def take(self, moment: float, event: Sample | Marked | SignalSent | Cleanup | Exit | Summary) -> None:
        """An event of this running job: a sample, a marker, its exit or its summary."""
        self.last = max(self.last, moment)
        if isinstance(event, Sample):
            self._sample(moment, event)
        elif isinstance(event, Marked):
            self._mark(moment, event)
        elif isinstance(event, SignalSent):
            self._add("available", moment, event.available)  # the MemAvailable the signal was sent at
        elif isinstance(event, Exit):
            self.exit = event
        elif isinstance(event, Summary):
            self.summary = event

    def _add(self, name: str, moment: float, value: float | None) -> None:
        if value is not None:
            series = self.series.get(name)
            if series is None:
                series = self.series[name] = _Series()
            series.add(moment, value)

    def _sample(self, moment: float, sample: Sample) -> None:
        self._add("memory", moment, sample.job_memory)
        self._add("available", moment, sample.available)
        self._add("temp", moment, sample.temp)
        self._add("job_vram", moment, sample.job_gpu_memory)
        for gpu in sample.gpus:
            if gpu.index is not None and gpu.used is not None:  # the card's used VRAM, not only the job's
                self.vram.setdefault(gpu.index, _Series()).add(moment, gpu.used)

    def _mark(self, moment: float, event: Marked) -> None:
        kind = event.KIND
        # The reading the event was decided on is a point of its series: the 90 C that stopped a job, or the
        # first reading after a resume, is drawn even when no sample was logged near it.
        self._add("memory", moment, event.job_memory)
        self._add("available", moment, event.available)
        self._add("temp", moment, event.temp)
        self._add("job_vram", moment, event.job_gpu_memory)
        if kind == "breach" and not self.breach:
            self.breach = _kept(event.message)
        if self.counts[kind] < MAX_MARKS:
            self.counts[kind] += 1
            self.markers.append(Marker(moment, kind, _kept(event.message)))
        else:
            self.left_out += 1
        if isinstance(event, Paused) and self.paused_at is None:
            self.paused_at = moment
        elif isinstance(event, Resumed) and self.paused_at is not None:
            if len(self.pauses) < MAX_PAUSES:
                self.pauses.append((self.paused_at, moment))
            else:
                self.left_out += 1
            self.paused_at = None
        # The limits, for a log without them at the start.
        self.max_mem = event.max_mem if self.max_mem is None else self.max_mem
        self.min_available = event.min_available if self.min_available is None else self.min_available
        self.max_temp = event.max_temp if self.max_temp is None else self.max_temp

    def _ended(self) -> tuple[int | None, str, str, str]:
        """(exit code, outcome, how it ended in words, the same in a few words)."""
        info = self.exit if self.exit is not None else self.summary
        if info is None:
            return None, "unfinished", "no end in the log (safegate was stopped, or the log was cut)", "no end in log"
        code, reason = info.exit_code, info.reason
        if reason in ("memory", "gpu", "thermal"):
            why = self.breach.split("; sending", 1)[0]
            return (code, "stopped", f"stopped for {reason} (exit {code})" + (f": {why}" if why else ""),
                    f"stopped: {reason} (exit {code})")
        message = self.exit.message if self.exit is not None else ""
        words = _kept(message).removeprefix("job ") if message else f"exited {code}"
        signal = self.exit.signal if self.exit is not None else None
        short = f"signal {signal} (exit {code})" if reason == "signalled" and signal else f"exited {code}"
        return code, "finished" if code == 0 else "failed", words, short

    def close(self, end: float) -> Job:
        code, outcome, ended, short = self._ended()
        pauses = self.pauses if self.paused_at is None else [*self.pauses, (self.paused_at, end)]
        summary = self.summary
        series = self.series

        def figure(value: float | None, name: str) -> float | None:
            return float(value) if value is not None else series[name].peak if name in series else None

        def thinned(name: str) -> Series:
            return series[name].thinned() if name in series else ()

        def whole(value: float | None) -> int | None:
            return None if value is None else int(value)

        return Job(
            source=self.source, line=self.line, command=self.command, profile=self.profile, lock=self.lock,
            start=self.start, end=max(end, self.start), exit_code=code, outcome=outcome, ended=ended, short=short,
            max_mem=self.max_mem, min_available=self.min_available,
            max_temp=None if self.max_temp is None else float(self.max_temp), max_gpu_mem=self.max_gpu_mem,
            memory=thinned("memory"), available=thinned("available"), temp=thinned("temp"),
            vram=tuple((index, self.vram[index].thinned()) for index in sorted(self.vram)),
            job_vram=thinned("job_vram"), markers=tuple(self.markers), pauses=tuple(pauses),
            peak_memory=whole(figure(None if summary is None else summary.peak_job_memory, "memory")),
            peak_vram=whole(figure(None if summary is None else summary.peak_job_gpu_memory, "job_vram")),
            highest_temp=figure(None if summary is None else summary.highest_temp, "temp"), left_out=self.left_out,
            waited=self.waited,
        )


def _never_ran(source: str, line: int, moment: float, event: NotAdmitted | NotStarted) -> Job:
    code = event.exit_code
    what = "blocked" if isinstance(event, NotAdmitted) else "not started"
    exit_code = "" if code is None else f" (exit {code})"
    cause = event.message.split(":", 1)[0].strip()  # "thermal: 90 C >= ...": the check that refused it
    short = f"{what}: {cause}" if cause and len(cause) <= 24 and cause != event.message else what
    return Job(source=source, line=line, command="", profile="", lock=None, start=moment, end=moment,
               exit_code=code, outcome="not_started", ended=f"{what}: {_kept(event.message)}{exit_code}",
               short=short + exit_code, waited=event.waited if isinstance(event, NotAdmitted) else None)


def jobs_from_lines(source: str, lines: Iterable[str | bytes], *, now: float | None = None) -> list[Job]:
    """Every job in one log, in the order they started. A log without any job is a `LogError` too.

    *now*: the time the report is made (default: the clock); a line dated more than a day after it is refused.
    """
    decode = LineDecoder(source, time.time() if now is None else now)
    jobs: list[Job] = []
    open_jobs: dict[int | None, _Open] = {}  # by the safegate that writes its lines (None: an older log)
    seen = 0
    for number, text in enumerate(lines, 1):
        if not text or text.isspace():
            continue
        moment, event = decode(number, text)
        seen += 1
        key = event.safegate_pid
        job = open_jobs.get(key)
        if isinstance(event, Admitted):
            if job is not None:
                jobs.append(job.close(job.last))
            open_jobs[key] = _Open(source, number, moment, event)
        elif isinstance(event, (NotAdmitted, NotStarted)):
            jobs.append(_never_ran(source, number, moment, event))
        elif job is not None and isinstance(event, (Sample, Marked, SignalSent, Cleanup, Exit, Summary)):
            job.take(moment, event)
            if isinstance(event, Summary):
                jobs.append(job.close(moment))
                del open_jobs[key]
    jobs += [job.close(job.last) for job in open_jobs.values()]
    if not jobs:
        what = "no events" if not seen else "no admitted, blocked or not_started event"
        raise LogError(f"{source}: no job in it ({what}); expected safegate exec --log output")
    return sorted(jobs, key=lambda j: j.start)


def build_report(logs: Sequence[tuple[str, Sequence[Job]]]) -> MorningReport:
    """Every log's jobs, grouped into nights: a job starting NIGHT_GAP after the jobs before it ended opens one."""
    everything = sorted((job for _, jobs in logs for job in jobs), key=lambda j: (j.start, j.source, j.line))
    nights: list[list[Job]] = []
    night_end = 0.0  # the latest end of the night so far: kept, not searched for again per job
    for job in everything:
        if nights and job.start <= night_end + NIGHT_GAP:
            nights[-1].append(job)
            night_end = max(night_end, job.end)
        else:
            nights.append([job])
            night_end = job.end
    return MorningReport(
        nights=tuple(Night(group[0].start, max(j.end for j in group), tuple(group)) for group in nights),
        sources=tuple((name, len(jobs)) for name, jobs in logs),
    )
