"""The morning report as one self-contained HTML page: at the top what a reader asks first (how many jobs ran,
waited, were stopped; the longest wait; the highest peak against its limit), then per night a timeline with a
lane per job (`lanes`), charts of job memory against its limit, MemAvailable against the floor, temperature
against max-temp and VRAM per GPU with the night's warnings, pauses, resumes and breaches marked, and a table of
its jobs, a line each. Inline CSS and SVG only: no script, font, image or URL, so it opens from a file:// path on
a machine without network and reads whole with scripts off. Times are UTC."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from datetime import datetime, timezone

from safegate.report.charts import MARK_COLOURS, Line, Mark, chart_parts, clock, esc
from safegate.report.lanes import STYLE as LANES_STYLE
from safegate.report.lanes import colour, lanes, span
from safegate.report.timeline import Job, MorningReport, Night, Series
from safegate.units import format_bytes, format_duration

STYLE = """
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; margin: 24px auto; max-width: 1240px;
       color: #222; background: #fff; padding: 0 12px; }
h1 { font-size: 24px; margin: 0 0 4px; } h2 { font-size: 19px; margin: 32px 0 8px; border-bottom: 2px solid #ddd; }
h3 { font-size: 15px; margin: 18px 0 4px; color: #444; }
p.meta { color: #555; margin: 2px 0; }
ul.summary { margin: 10px 0; padding-left: 20px; font-size: 15px; } ul.summary li { margin: 2px 0; }
svg { width: 100%; height: auto; display: block; margin: 4px 0 10px; }
svg text { font-family: inherit; fill: #333; } svg .tick { font-size: 11px; fill: #666; }
svg .title { font-size: 13px; font-weight: 600; }
svg .grid { stroke: #eee; stroke-width: 1; } svg .plot { fill: #fcfcfc; stroke: #ccc; }
table { border-collapse: collapse; width: 100%; font-size: 13px; table-layout: fixed; }
th, td { border: 1px solid #ddd; padding: 3px 5px; text-align: left; vertical-align: top; overflow: hidden;
         white-space: nowrap; text-overflow: ellipsis; }
th { background: #f3f3f3; font-weight: 600; } td.num { text-align: right; }
td code { font-size: 12px; display: block; overflow: hidden; text-overflow: ellipsis; }
td details { white-space: nowrap; } td details summary { overflow: hidden; text-overflow: ellipsis; }
td details[open] p { white-space: normal; overflow-wrap: anywhere; margin: 2px 0 0; color: #333; font-weight: 400; }
.swatch { display: inline-block; width: 11px; height: 11px; border-radius: 2px; margin-right: 4px;
          vertical-align: -1px; }
.legend span.item { margin-right: 14px; white-space: nowrap; font-size: 13px; }
tr.stopped td.ended { color: #d0021b; } tr.failed td.ended { color: #8a6400; }
tr.unfinished td.ended { color: #7b4fc9; } tr.not_started td { color: #777; }
""" + LANES_STYLE


def _numbered(night: Night, first: int) -> list[tuple[int, Job]]:
    return [(first + i, job) for i, job in enumerate(night.jobs)]


def _limit(job: Job, value: float | None) -> Series:
    return () if value is None else ((job.start, value), (job.end, value))


def _celsius(value: float) -> str:
    return f"{value:.0f} \u00b0C"


def charts(night: Night, jobs: Sequence[tuple[int, Job]]) -> Iterator[str]:
    """The night's charts, in pieces of one line each."""
    t0, t1 = span(night)
    found = [Mark(m.time, m.kind, f"#{n} {m.message}") for n, job in jobs for m in job.markers]

    def add(title: str, lines: list[Line], fmt: str, floor: float | None, empty: str) -> Iterator[str]:
        if not any(line.points for line in lines if not line.dashed):
            yield f'<p class="meta">{esc(title)}: {esc(empty)}</p>\n'
            return
        formatter = _celsius if fmt == "temp" else format_bytes
        yield from chart_parts(title, t0, t1, lines, found, formatter, binary=fmt == "bytes", floor=floor)

    memory, available, temps = [], [], []
    for n, job in jobs:
        hue = colour(n)
        memory += [Line(job.memory, hue, f"#{n} job memory"),
                   Line(_limit(job, job.max_mem), hue, f"#{n} --max-mem", dashed=True)]
        available += [Line(job.available, hue, f"#{n} MemAvailable during the job"),
                      Line(_limit(job, job.min_available or None), hue, f"#{n} --min-available floor",
                           dashed=True)]
        temps += [Line(job.temp, hue, f"#{n} hottest sensor"),
                  Line(_limit(job, job.max_temp), hue, f"#{n} max-temp", dashed=True)]
    yield from add("Job memory (dashed: its --max-mem)", memory, "bytes", 0.0, "no samples in the log")
    yield from add("MemAvailable (dashed: the --min-available floor)", available, "bytes", 0.0,
                   "no samples in the log")
    yield from add("Temperature (dashed: max-temp)", temps, "temp", None, "no temperature readings in the log")
    gpus = sorted({index for _, job in jobs for index, _ in job.vram})
    if gpus:
        own = []
        for n, job in jobs:
            own += [Line(job.job_vram, colour(n), f"#{n}: the job's own VRAM"),
                    Line(_limit(job, job.max_gpu_mem), colour(n), f"#{n} --max-gpu-mem", dashed=True)]
        yield from add("The job's own VRAM (dashed: its --max-gpu-mem)", own, "bytes", 0.0, "no samples")
    cards: dict[int, list[Line]] = {}  # one pass over the jobs, not one per GPU
    for n, job in jobs:
        for index, series in job.vram:
            cards.setdefault(index, []).append(Line(series, colour(n), f"#{n}: VRAM used on GPU {index}, by every "
                                                                        "process"))
    for index in gpus:
        yield from add(f"VRAM used on GPU {index} (the whole card, while each job ran)", cards[index], "bytes",
                       0.0, "no samples")
    if not gpus:
        yield '<p class="meta">VRAM: no GPU was watched in this night.</p>\n'


def _legend() -> str:
    items = "".join(f'<span class="item"><span class="swatch" style="background:{c}"></span>{esc(kind)}</span>'
                    for kind, c in MARK_COLOURS.items())
    return (f'<p class="legend">{items}<span class="item"><span class="swatch" style="background:'
            'repeating-linear-gradient(135deg, #e07000 0 3px, #ffd6a8 3px 5px)"></span>paused for heat</span>'
            '<span class="item"><span class="swatch" style="border-top: 2px dotted #999; height: 0; '
            'vertical-align: 3px"></span>waiting in line</span>'
            "<span class=\"item\">Each job's number and colour are the same in the lanes, the charts and the "
            "table.</span></p>\n")


def _cell(value: str, css: str = "num", full: str = "") -> str:
    title = f' title="{esc(full or value)}"'
    return f'<td class="{css}"{title}>{esc(value)}</td>'


def _seconds(value: float | None) -> str:
    return "-" if value is None else "0" if value < 0.5 else format_duration(value)


def _against(value: float | None, limit: float | None, fmt: str) -> str:
    """A peak and the limit it was watched against: "3.1 GiB / 4.0 GiB"."""
    show = _celsius if fmt == "temp" else format_bytes
    if value is None:
        return "-"
    return show(value) + ("" if limit is None else f" / {show(limit)}")


# Shares of the page's width, not ems: the table is never wider than the page, and a cell that does not fit
# ends in an ellipsis with its whole text in its title.
COLUMNS = (("#", "4%", "the job's number in the lanes and charts"), ("command", "", "the command line"),
           ("profile", "7%", "its profile (the title: also its lock)"), ("start", "6%", "when it started, UTC"),
           ("ran", "6%", "how long it ran"), ("waited", "5.5%", "how long it waited in line before it started"),
           ("paused", "5.5%", "how long it was paused for heat, in all"),
           ("memory / limit", "13%", "its peak memory / its --max-mem"), ("VRAM", "5%", "its peak VRAM"),
           ("temp / max", "8.5%", "the hottest reading while it ran / its max-temp"),
           ("how it ended", "17%", "how it ended (open for the whole reason)"), ("log", "6%", "log:line"))


def table(jobs: Sequence[tuple[int, Job]]) -> Iterator[str]:
    """The table of the jobs, a line per job: a cell that does not fit ends in an ellipsis and holds its whole
    text in its title; how a job ended opens to the whole reason (a <details>, which needs no script)."""
    cols = "".join(f'<col style="width:{w}">' if w else "<col>" for _, w, _ in COLUMNS)
    yield (f'<table class="jobs"><colgroup>{cols}</colgroup><thead><tr>'
           + "".join(f'<th title="{esc(t)}">{h}</th>' for h, _, t in COLUMNS) + "</tr></thead><tbody>\n")
    for n, job in jobs:
        start = datetime.fromtimestamp(job.start, tz=timezone.utc)
        command = job.command or "(never ran)"
        full = job.ended + (f"; {job.left_out} more markers or pauses, not drawn" if job.left_out else "")
        short = job.short or job.ended
        ended = (f"<details><summary>{esc(short)}</summary><p>{esc(full)}</p></details>" if full != short
                 else esc(short))
        yield (
            f'<tr class="{esc(job.outcome)}" data-job="{n}">' + _cell(f"#{n}")
            + f'<td class="command" title="{esc(command)}"><code>{esc(command)}</code></td>'
            + _cell(job.profile or "-", "text", f"profile {job.profile or '-'}, lock {job.lock or '-'}")
            + _cell(start.strftime("%H:%M:%S"), "num", start.strftime("%Y-%m-%d %H:%M:%S UTC"))
            + _cell(format_duration(job.duration) if job.outcome != "not_started" else "-")
            + _cell(_seconds(job.waited))
            + _cell(_seconds(job.paused) if job.pauses else "-")
            + _cell(_against(job.peak_memory, job.max_mem, "bytes"))
            + _cell(_against(job.peak_vram, job.max_gpu_mem, "bytes"))
            + _cell(_against(job.highest_temp, job.max_temp, "temp"))
            + f'<td class="ended" title="{esc(full)}">{ended}</td>'
            + _cell(f"{job.source}:{job.line}", "text") + "</tr>\n")
    yield "</tbody></table>\n"


def _count(n: int, what: str, plural: str = "") -> str:
    return f"{n} {what if n == 1 else plural or what + 's'}"


def summary(jobs: Sequence[tuple[int, Job]]) -> str:
    """What a reader asks first, in a few lines."""
    ran = [(n, j) for n, j in jobs if j.outcome != "not_started"]
    stopped = sum(1 for _, j in jobs if j.outcome == "stopped")
    failed = sum(1 for _, j in jobs if j.outcome == "failed")
    never = len(jobs) - len(ran)
    lines = [f"<b>{_count(len(ran), 'job')} ran</b>: {sum(1 for _, j in ran if j.outcome == 'finished')} finished, "
             f"{failed} failed, <b>{stopped} stopped by safegate</b>"
             + "".join(f", {sum(1 for _, j in ran if j.outcome == 'unfinished')} without an end in the log"
                       for _ in (1,) if any(j.outcome == "unfinished" for _, j in ran))
             + (f"; {_count(never, 'job')} never ran (blocked or not started)" if never else "") + "."]
    known = [(n, j, j.waited) for n, j in jobs if j.waited is not None]
    if known:
        waited = [(n, j, w) for n, j, w in known if w >= 1.0]
        longest = max(waited, key=lambda x: x[2], default=None)
        lines.append("No job waited before starting." if longest is None else
                     f"<b>{_count(len(waited), 'job')} waited</b> before starting; the longest wait: "
                     f"#{longest[0]}, {esc(format_duration(longest[2]))}.")
    else:
        lines.append("Waits: these logs do not record them.")
    paused = [(n, j) for n, j in ran if j.pauses]
    if paused:
        most = max(paused, key=lambda x: x[1].paused)
        lines.append(f"{_count(len(paused), 'job')} paused for heat; the longest paused #{most[0]} "
                     f"for {esc(format_duration(most[1].paused))} in all.")
    limited = [(j.peak_memory / j.max_mem, n, j) for n, j in ran
               if j.peak_memory is not None and j.max_mem]
    if limited:
        share, n, job = max(limited, key=lambda x: x[0])
        lines.append(f"Highest peak against its limit: <b>#{n}</b>, {esc(format_bytes(job.peak_memory or 0))} "
                     f"of --max-mem {esc(format_bytes(job.max_mem or 0))} ({share:.0%}).")
    else:
        peaks = [(j.peak_memory, n) for n, j in ran if j.peak_memory is not None]
        if peaks:
            peak, n = max(peaks)
            lines.append(f"Highest peak: #{n}, {esc(format_bytes(peak))} (no --max-mem was set).")
    hot = [(j.highest_temp - j.max_temp, n, j) for n, j in ran if j.highest_temp is not None and j.max_temp]
    if hot:
        _, n, job = max(hot, key=lambda x: x[0])
        lines.append(f"Hottest against its max-temp: #{n}, {esc(_celsius(job.highest_temp or 0.0))} of "
                     f"{esc(_celsius(job.max_temp or 0.0))}.")
    return '<ul class="summary">' + "".join(f"<li>{line}</li>" for line in lines) + "</ul>\n"


def page_parts(report: MorningReport) -> Iterator[str]:
    """The page in pieces, to be written as they come: a night of tens of thousands of jobs is a page of a
    hundred megabytes, which need not be in memory at once."""
    jobs = report.jobs
    logs = ", ".join(f"{name} ({count} job{'s' if count != 1 else ''})" for name, count in report.sources)
    yield "\n".join(["<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
                     '<meta name="viewport" content="width=device-width, initial-scale=1">',
                     f"<title>safegate report: {len(jobs)} job{'s' if len(jobs) != 1 else ''}</title>",
                     f"<style>{STYLE}</style></head><body>",
                     "<h1>safegate report</h1>",
                     f'<p class="meta">{len(jobs)} job{"s" if len(jobs) != 1 else ""} in {len(report.nights)} '
                     f'night{"s" if len(report.nights) != 1 else ""} from {esc(logs)}. Times are UTC.</p>', ""])
    yield summary(list(enumerate(jobs, 1)))
    first = 1
    for night in report.nights:
        numbered = _numbered(night, first)
        first += len(night.jobs)
        when = datetime.fromtimestamp(night.start, tz=timezone.utc).strftime("%Y-%m-%d %H:%M")
        yield (f'<section class="night"><h2>Night from {esc(when)} UTC to {esc(clock(night.end))}, '
               f"{len(night.jobs)} job{'s' if len(night.jobs) != 1 else ''}</h2>\n")
        if len(report.nights) > 1:
            yield summary(numbered)
        yield _legend()
        yield from lanes(night, numbered)
        yield "<h3>Over time</h3>\n"
        yield from charts(night, numbered)
        yield "<h3>Jobs</h3>\n"
        yield from table(numbered)
        yield "</section>\n"
    yield "</body></html>\n"


def page(report: MorningReport) -> str:
    return "".join(page_parts(report))
