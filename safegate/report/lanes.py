"""The night's timeline as HTML and CSS: a row per job with its label, its lane on the night's time axis and how
it ended. Boxes laid out by the browser, not SVG text: a label that does not fit is cut at its end with an
ellipsis (the whole text in its title), never wrapped mid-word or drawn past its lane, and a job of seconds in a
night of hours or a pause of one sample still gets MIN_BAR or MIN_PAUSE pixels (CSS min-width), however wide the
window. Positions are percentages of the lane, so the page scales without a script."""

from __future__ import annotations

from collections.abc import Iterator, Sequence

from safegate.report.charts import MARK_COLOURS, clock, esc, time_ticks
from safegate.report.timeline import Job, Night
from safegate.units import format_duration

# Twelve colours that differ in hue or lightness, none of them an outcome's or a marker's red, green or orange:
# a night of up to twelve jobs repeats none, and jobs next to each other never share one.
JOB_COLOURS = ("#1f77b4", "#9467bd", "#17becf", "#e377c2", "#8c564b", "#bcbd22", "#7f7f7f", "#2ca02c", "#393b79",
               "#8c6d31", "#7b4173", "#637939")
OUTCOME_COLOURS = {"finished": "#1f9e4a", "failed": "#b8860b", "stopped": "#d0021b", "not_started": "#999999",
                   "unfinished": "#7b4fc9"}
MIN_BAR = 6  # CSS pixels: the shortest job's bar
MIN_PAUSE = 4  # CSS pixels: the shortest pause's shading, drawn over the bar and taller than it
PAD = 0.02  # of the night's length, before its first start and after its last end

STYLE = f"""
.common code {{ font-size: 12px; }}
.tl {{ position: relative; margin: 6px 0 16px; font-size: 12px; }}
.tl .row {{ display: grid; grid-template-columns: 19em minmax(0, 1fr) 11.5em; align-items: center; min-height: 22px;
           border-top: 1px solid #f0f0f0; }}
.tl .row > * {{ min-width: 0; }}
.tl .who, .tl .end, .tl .who code {{ overflow: hidden; white-space: nowrap; text-overflow: ellipsis; }}
.tl .who {{ padding-right: 8px; display: flex; align-items: baseline; }} .tl .end {{ padding-left: 8px; }}
.tl .who code {{ font-size: 11px; min-width: 0; flex: 1 1 auto; }}
.tl .who .num {{ flex: none; }}
.tl .num {{ display: inline-block; min-width: 2.6em; padding: 0 3px; margin-right: 4px; border-radius: 3px;
           color: #fff; font-weight: 600; text-align: center; box-sizing: border-box; }}
.tl .track {{ position: relative; height: 20px; }}
.tl .bar {{ position: absolute; top: 4px; height: 12px; min-width: {MIN_BAR}px; border-radius: 3px;
           box-sizing: border-box; border: 2px solid; }}
.tl .pause {{ position: absolute; top: 0; height: 20px; min-width: {MIN_PAUSE}px; box-sizing: border-box;
             background: repeating-linear-gradient(135deg, #e07000 0 3px, #ffd6a8 3px 5px);
             border: 1px solid #a04e00; }}
.tl .wait {{ position: absolute; top: 9px; height: 2px; border-top: 2px dotted #999; box-sizing: border-box; }}
.tl .mk {{ position: absolute; top: -1px; width: 0; height: 0; border-left: 4px solid transparent;
          border-right: 4px solid transparent; border-top: 7px solid; margin-left: -4px; }}
.tl .axis {{ border-top: none; color: #666; font-size: 11px; position: sticky; top: 0; background: #fff; z-index: 1; }}
.tl .axis .track {{ height: 16px; }}
.tl .tick {{ position: absolute; top: 0; transform: translateX(-50%); white-space: nowrap; }}
.tl .grid {{ position: absolute; inset: 0; pointer-events: none; border: none; }}
.tl .grid .track {{ height: 100%; }}
.tl .gl {{ position: absolute; top: 0; bottom: 0; border-left: 1px solid #e6e6e6; }}
.tl .end.stopped {{ color: #d0021b; font-weight: 600; }} .tl .end.failed {{ color: #8a6400; }}
.tl .end.unfinished {{ color: #7b4fc9; }} .tl .end.not_started {{ color: #777; }}
"""


def colour(number: int) -> str:
    return JOB_COLOURS[(number - 1) % len(JOB_COLOURS)]


def brief(command: str) -> str:
    """The command with each path cut to its last part: in a lane's few characters "transcribe.py --model
    whisper-large-v3" tells jobs apart where "/srv/asr/transcribe.py" does not. The whole is in the title."""
    return " ".join(word.rstrip("/").rsplit("/", 1)[-1] or word if "/" in word else word for word in command.split(" "))


def _common_start(commands: Sequence[str]) -> str:
    """The words every command of the night starts with (when there are two or more), a lane's label the rest."""
    if len(commands) < 2:
        return ""
    first, last = min(commands), max(commands)  # the common prefix of all is that of these two
    words = 0
    for a, b in zip(first.split(" "), last.split(" "), strict=False):
        if a != b:
            break
        words += 1
    return " ".join(first.split(" ")[:words])


def span(night: Night) -> tuple[float, float]:
    start, end = night.start, max(night.end, night.start + 1.0)
    pad = (end - start) * PAD
    return start - pad, end + pad


def _at(t: float, t0: float, t1: float) -> float:
    return min(100.0, max(0.0, (t - t0) / ((t1 - t0) or 1.0) * 100.0))


def _box(left: float, right: float, least: int) -> str:
    """left and width in % of the lane, kept inside it when the minimum width is wider than the job."""
    return f"left:min({left:.3f}%, calc(100% - {least}px));width:{max(0.0, right - left):.3f}%"


def _axis(t0: float, t1: float, grid: bool) -> str:
    ticks, seconds = time_ticks(t0, t1, most=12)
    if grid:
        inner = "".join(f'<span class="gl" style="left:{_at(t, t0, t1):.3f}%"></span>' for t in ticks)
        return (f'<div class="row grid" aria-hidden="true"><span></span><div class="track">{inner}</div>'
                "<span></span></div>")
    inner = "".join(f'<span class="tick" style="left:{_at(t, t0, t1):.3f}%">{clock(t, seconds)}</span>'
                    for t in ticks)
    return f'<div class="row axis"><span>UTC</span><div class="track">{inner}</div><span></span></div>'


def lanes(night: Night, jobs: Sequence[tuple[int, Job]]) -> Iterator[str]:
    """The timeline, a row at a time (a night can hold tens of thousands of jobs)."""
    common = _common_start([job.command for _, job in jobs if job.command])
    if common:
        yield (f'<p class="meta common">Every command starts <code>{esc(common)}</code>: the lanes show the rest.'
               "</p>\n")
    t0, t1 = span(night)
    yield f'<div class="tl" role="list" aria-label="timeline of the jobs">\n{_axis(t0, t1, grid=True)}\n'
    yield _axis(t0, t1, grid=False) + "\n"
    for number, job in jobs:
        outcome = esc(job.outcome)
        what = job.command or "(never ran)"
        tip = (f"{esc(f'#{number} ' + what)}&#10;{clock(job.start, True)} to {clock(job.end, True)} "
               f"({format_duration(job.duration)}); {esc(job.ended)}")
        left, right = _at(job.start, t0, t1), _at(job.end, t0, t1)
        row = [f'<div class="row lane {outcome}" role="listitem" data-job="{number}" title="{tip}">',
               f'<div class="who"><span class="num" style="background:{colour(number)}">#{number}</span>'
               f"<code>{esc(brief(what.removeprefix(common).lstrip() or what))}</code></div>",
               '<div class="track">',
               f'<span class="bar" style="{_box(left, right, MIN_BAR)};background:{colour(number)};'
               f'border-color:{OUTCOME_COLOURS.get(job.outcome, "#555")}"></span>']
        if job.waited:  # the wait in line before it started, left of its bar (cut at the night's start)
            row.append(f'<span class="wait" style="{_box(_at(job.start - job.waited, t0, t1), left, 0)}" '
                       f'title="waited {format_duration(job.waited)} in line"></span>')
        for start, end in job.pauses:
            row.append(f'<span class="pause" style="{_box(_at(start, t0, t1), _at(end, t0, t1), MIN_PAUSE)}" '
                       f'title="paused for heat {clock(start, True)} to {clock(end, True)} '
                       f'({format_duration(max(0.0, end - start))})"></span>')
        row += (f'<span class="mk {esc(m.kind)}" style="left:{_at(m.time, t0, t1):.3f}%;'
                f'border-top-color:{MARK_COLOURS.get(m.kind, "#555")}" '
                f'title="{esc(clock(m.time, True))} {esc(m.kind)}: {esc(m.message)}"></span>' for m in job.markers)
        # The exit code is in the title and the table: the few characters here say what ended it.
        short = (job.short or job.ended).split(" (exit ")[0]
        row.append(f'</div><div class="end {outcome}">{esc(short)}</div></div>\n')
        yield "".join(row)
    yield "</div>\n"
