"""The morning report as one self-contained HTML page: per night a timeline with a lane per job, charts of job
memory against its limit, MemAvailable against the floor, temperature against max-temp and VRAM per GPU with the
night's warnings, pauses, resumes and breaches marked, and a table of its jobs. Inline CSS and SVG only: no
script, font, image or URL, so it opens from a file:// path on a machine without network. Times are UTC."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from datetime import datetime, timezone

from safegate.report.charts import (
    BOTTOM,
    LEFT,
    MARK_COLOURS,
    TOP,
    WIDTH,
    Frame,
    Line,
    Mark,
    chart_parts,
    clock,
    esc,
    marks,
    time_axis,
)
from safegate.report.timeline import Job, MorningReport, Night, Series
from safegate.units import format_bytes, format_duration

JOB_COLOURS = ("#1f77b4", "#9467bd", "#17becf", "#e377c2", "#8c564b", "#bcbd22", "#7f7f7f", "#2ca02c")
OUTCOME_COLOURS = {"finished": "#1f9e4a", "failed": "#b8860b", "stopped": "#d0021b", "not_started": "#999999",
                   "unfinished": "#7b4fc9"}
LANE = 34

STYLE = """
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; margin: 24px auto; max-width: 1240px;
       color: #222; background: #fff; padding: 0 12px; }
h1 { font-size: 24px; margin: 0 0 4px; } h2 { font-size: 19px; margin: 32px 0 8px; border-bottom: 2px solid #ddd; }
h3 { font-size: 15px; margin: 18px 0 4px; color: #444; }
p.meta { color: #555; margin: 2px 0; }
svg { width: 100%; height: auto; display: block; margin: 4px 0 10px; }
svg text { font-family: inherit; fill: #333; } svg .tick { font-size: 11px; fill: #666; }
svg .title { font-size: 13px; font-weight: 600; } svg .lane-label { font-size: 12px; }
svg .grid { stroke: #eee; stroke-width: 1; } svg .plot { fill: #fcfcfc; stroke: #ccc; }
table { border-collapse: collapse; width: 100%; font-size: 13px; }
th, td { border: 1px solid #ddd; padding: 4px 6px; text-align: left; vertical-align: top; }
th { background: #f3f3f3; } td.num { text-align: right; white-space: nowrap; }
td code { font-size: 12px; word-break: break-all; }
.swatch { display: inline-block; width: 11px; height: 11px; border-radius: 2px; margin-right: 4px;
          vertical-align: -1px; }
.legend span.item { margin-right: 14px; white-space: nowrap; font-size: 13px; }
tr.stopped td.ended { color: #d0021b; font-weight: 600; } tr.failed td.ended { color: #8a6400; }
tr.unfinished td.ended { color: #7b4fc9; } tr.not_started td { color: #777; }
"""


def _colour(number: int) -> str:
    return JOB_COLOURS[(number - 1) % len(JOB_COLOURS)]


def _numbered(night: Night, first: int) -> list[tuple[int, Job]]:
    return [(first + i, job) for i, job in enumerate(night.jobs)]


def _label(number: int, job: Job, width: int = 60) -> str:
    text = job.command or job.ended
    return f"#{number} " + (text if len(text) <= width else text[: width - 1] + "\u2026")


def _span(night: Night) -> tuple[float, float]:
    start, end = night.start, max(night.end, night.start + 1.0)
    pad = (end - start) * 0.02
    return start - pad, end + pad


def lanes(night: Night, jobs: Sequence[tuple[int, Job]]) -> Iterator[str]:
    """The timeline's SVG, a job at a time (a night can hold tens of thousands)."""
    t0, t1 = _span(night)
    height = TOP + LANE * len(jobs) + BOTTOM
    frame = Frame(t0, t1, 0.0, 1.0, height)
    yield "\n".join([f'<svg class="lanes" viewBox="0 0 {WIDTH} {height}" role="img" aria-label="timeline of the '
                     'jobs">', f'<text x="{LEFT}" y="16" class="title">Timeline: one lane per job (UTC)</text>',
                     *time_axis(frame), ""])
    for row, (number, job) in enumerate(jobs):
        y = TOP + row * LANE + 4
        x0, x1 = frame.x(job.start), max(frame.x(job.end), frame.x(job.start) + 3)
        outcome = OUTCOME_COLOURS.get(job.outcome, "#555")
        # Two lines: the command, then when and how it ended (&#10;, as a newline would be escaped like the
        # command's own control characters).
        tip = (f"{esc(f'#{number} ' + (job.command or '(never ran)'))}&#10;{clock(job.start, True)} to "
               f"{clock(job.end, True)} ({format_duration(job.duration)}); {esc(job.ended)}")
        body = [f'<g class="lane {esc(job.outcome)}" data-job="{number}"><title>{tip}</title>']
        body.append(f'<text x="{LEFT - 8}" y="{y + 12}" class="lane-label" text-anchor="end">#{number}</text>')
        body.append(f'<rect x="{x0:.1f}" y="{y}" width="{x1 - x0:.1f}" height="14" rx="3" fill="{_colour(number)}" '
                    f'stroke="{outcome}" stroke-width="2.5"/>')
        for start, end in job.pauses:
            px0, px1 = frame.x(start), max(frame.x(end), frame.x(start) + 2)
            body.append(f'<rect x="{px0:.1f}" y="{y}" width="{px1 - px0:.1f}" height="14" fill="#e07000" '
                        'fill-opacity="0.55"><title>paused for heat</title></rect>')
        body.append(f'<circle cx="{x1:.1f}" cy="{y + 7}" r="5" fill="{outcome}"/>')
        # The caption starts under the bar, or ends under it when the bar is far to the right.
        anchor = f'x="{x0:.1f}"' if x0 < WIDTH * 0.55 else f'x="{x1:.1f}" text-anchor="end"'
        ended = job.ended if len(job.ended) <= 60 else job.ended[:59] + "\u2026"  # in full in the tooltip and table
        body.append(f'<text {anchor} y="{y + 27}" class="tick">{esc(_label(number, job, 45))} \u2014 '
                    f"{esc(ended)}</text>")
        body += marks(frame, [Mark(m.time, m.kind, m.message) for m in job.markers], y - 2, y + 16)
        body.append("</g>\n")
        yield "\n".join(body)
    yield "</svg>\n"


def _limit(job: Job, value: float | None) -> Series:
    return () if value is None else ((job.start, value), (job.end, value))


def _celsius(value: float) -> str:
    return f"{value:.0f} \u00b0C"


def charts(night: Night, jobs: Sequence[tuple[int, Job]]) -> Iterator[str]:
    """The night's charts, in pieces of one line each."""
    t0, t1 = _span(night)
    found = [Mark(m.time, m.kind, f"#{n} {m.message}") for n, job in jobs for m in job.markers]

    def add(title: str, lines: list[Line], fmt: str, floor: float | None, empty: str) -> Iterator[str]:
        if not any(line.points for line in lines if not line.dashed):
            yield f'<p class="meta">{esc(title)}: {esc(empty)}</p>\n'
            return
        formatter = _celsius if fmt == "temp" else format_bytes
        yield from chart_parts(title, t0, t1, lines, found, formatter, binary=fmt == "bytes", floor=floor)

    memory, available, temps = [], [], []
    for n, job in jobs:
        colour = _colour(n)
        memory += [Line(job.memory, colour, f"#{n} job memory"),
                   Line(_limit(job, job.max_mem), colour, f"#{n} --max-mem", dashed=True)]
        available += [Line(job.available, colour, f"#{n} MemAvailable during the job"),
                      Line(_limit(job, job.min_available or None), colour, f"#{n} --min-available floor",
                           dashed=True)]
        temps += [Line(job.temp, colour, f"#{n} hottest sensor"),
                  Line(_limit(job, job.max_temp), colour, f"#{n} max-temp", dashed=True)]
    yield from add("Job memory (dashed: its --max-mem)", memory, "bytes", 0.0, "no samples in the log")
    yield from add("MemAvailable (dashed: the --min-available floor)", available, "bytes", 0.0,
                   "no samples in the log")
    yield from add("Temperature (dashed: max-temp)", temps, "temp", None, "no temperature readings in the log")
    gpus = sorted({index for _, job in jobs for index, _ in job.vram})
    if gpus:
        own = []
        for n, job in jobs:
            own += [Line(job.job_vram, _colour(n), f"#{n}: the job's own VRAM"),
                    Line(_limit(job, job.max_gpu_mem), _colour(n), f"#{n} --max-gpu-mem", dashed=True)]
        yield from add("The job's own VRAM (dashed: its --max-gpu-mem)", own, "bytes", 0.0, "no samples")
    cards: dict[int, list[Line]] = {}  # one pass over the jobs, not one per GPU
    for n, job in jobs:
        for index, series in job.vram:
            cards.setdefault(index, []).append(Line(series, _colour(n), f"#{n}: VRAM used on GPU {index}, by every "
                                                                        "process"))
    for index in gpus:
        yield from add(f"VRAM used on GPU {index} (the whole card, while each job ran)", cards[index], "bytes",
                       0.0, "no samples")
    if not gpus:
        yield '<p class="meta">VRAM: no GPU was watched in this night.</p>\n'


def _legend(jobs: Sequence[tuple[int, Job]]) -> Iterator[str]:
    yield '<p class="legend">'
    yield from (f'<span class="item"><span class="swatch" style="background:{_colour(n)}"></span>'
                f"{esc(_label(n, job, 50))}</span>" for n, job in jobs)
    yield from (f'<span class="item"><span class="swatch" style="background:{colour}"></span>{esc(kind)}</span>'
                for kind, colour in MARK_COLOURS.items())
    yield "</p>\n"


def _cell(value: str, css: str = "num") -> str:
    return f'<td class="{css}">{esc(value)}</td>'


def table(jobs: Sequence[tuple[int, Job]]) -> Iterator[str]:
    """The table of the jobs, a row at a time."""
    head = ("#", "command", "profile", "lock", "start (UTC)", "waited", "duration", "peak memory", "peak VRAM",
            "highest temp", "how it ended", "log")
    yield "<table class=\"jobs\"><thead><tr>" + "".join(f"<th>{h}</th>" for h in head) + "</tr></thead><tbody>\n"
    for n, job in jobs:
        start = datetime.fromtimestamp(job.start, tz=timezone.utc).strftime("%Y-%m-%d %H:%M:%S")
        yield (
            f'<tr class="{esc(job.outcome)}" data-job="{n}">' + _cell(f"#{n}")
            + f'<td class="command"><code>{esc(job.command or "(never ran)")}</code></td>'
            + _cell(job.profile or "-", "text") + _cell(job.lock or "-", "text") + _cell(start)
            + _cell("-" if job.waited is None else format_duration(job.waited))
            + _cell(format_duration(job.duration))
            + _cell("-" if job.peak_memory is None else format_bytes(job.peak_memory))
            + _cell("-" if job.peak_vram is None else format_bytes(job.peak_vram))
            + _cell("-" if job.highest_temp is None else _celsius(job.highest_temp))
            + _cell(job.ended + (f"; {job.left_out} more markers or pauses, not drawn" if job.left_out else ""),
                    "ended")
            + _cell(f"{job.source}:{job.line}", "text") + "</tr>\n")
    yield "</tbody></table>\n"


def _counts(jobs: Sequence[Job]) -> str:
    names = {"finished": "finished", "failed": "failed", "stopped": "stopped by safegate",
             "not_started": "never ran", "unfinished": "without an end in the log"}
    found = [f"{sum(1 for j in jobs if j.outcome == key)} {word}" for key, word in names.items()
             if any(j.outcome == key for j in jobs)]
    return ", ".join(found)


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
                     f'night{"s" if len(report.nights) != 1 else ""}: {esc(_counts(jobs))}.</p>',
                     f'<p class="meta">From {esc(logs)}. Times are UTC.</p>', ""])
    first = 1
    for night in report.nights:
        numbered = _numbered(night, first)
        first += len(night.jobs)
        when = datetime.fromtimestamp(night.start, tz=timezone.utc).strftime("%Y-%m-%d %H:%M")
        yield (f'<section class="night"><h2>Night from {esc(when)} UTC to {esc(clock(night.end))}, '
               f"{len(night.jobs)} job{'s' if len(night.jobs) != 1 else ''}</h2>\n")
        yield from _legend(numbered)
        yield from lanes(night, numbered)
        yield "<h3>Over time</h3>\n"
        yield from charts(night, numbered)
        yield "<h3>Jobs</h3>\n"
        yield from table(numbered)
        yield "</section>\n"
    yield "</body></html>\n"


def page(report: MorningReport) -> str:
    return "".join(page_parts(report))
