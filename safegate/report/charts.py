"""Inline SVG for the morning report, drawn here instead of by a plotting library: time axes in UTC, value axes
with round steps (binary ones for bytes), polylines, dashed limits, shaded spans and event markers, each with a
native tooltip (<title>). Every text from outside is made printable and HTML-escaped; nothing refers to a file,
a font or a URL."""

from __future__ import annotations

import html
import math
from collections.abc import Callable, Iterator, Sequence
from datetime import datetime, timezone

import msgspec

from safegate.units import printable

WIDTH = 1200  # the SVG's own units; it scales to the page's width
LEFT, RIGHT, TOP, BOTTOM = 90, 20, 26, 26
_TIME_STEPS = (1, 2, 5, 10, 15, 30, 60, 120, 300, 600, 900, 1800, 3600, 7200, 10800, 21600, 43200, 86400)
MARK_COLOURS = {"warning": "#d4a000", "paused": "#e07000", "resumed": "#1f9e4a", "breach": "#d0021b"}


def esc(text: object) -> str:
    """Outside text, safe inside HTML and SVG, in text and in attribute values."""
    return html.escape(printable(str(text)), quote=True)


class Line(msgspec.Struct, frozen=True):
    points: Sequence[tuple[float, float]]
    colour: str
    label: str
    dashed: bool = False


class Mark(msgspec.Struct, frozen=True):
    time: float
    kind: str  # a key of MARK_COLOURS
    label: str


class Frame(msgspec.Struct, frozen=True):
    """Maps (time, value) onto the plot area of a chart *height* units high."""

    t0: float
    t1: float
    v0: float
    v1: float
    height: int

    def x(self, t: float) -> float:
        span = (self.t1 - self.t0) or 1.0
        return LEFT + (t - self.t0) / span * (WIDTH - LEFT - RIGHT)

    def y(self, v: float) -> float:
        span = (self.v1 - self.v0) or 1.0
        return self.height - BOTTOM - (v - self.v0) / span * (self.height - TOP - BOTTOM)


def clock(t: float, seconds: bool = False) -> str:
    return datetime.fromtimestamp(t, tz=timezone.utc).strftime("%H:%M:%S" if seconds else "%H:%M")


def time_ticks(t0: float, t1: float, most: int = 10) -> tuple[list[float], bool]:
    """Round times to label between t0 and t1, and whether labels need seconds."""
    span = max(t1 - t0, 1.0)
    # Past the steps, whole days: a night of months (a log that spans them) still has about *most* ticks.
    step = next((s for s in _TIME_STEPS if span / s <= most), _TIME_STEPS[-1] * math.ceil(span / 86400 / most))
    first = math.ceil(t0 / step) * step
    return [first + i * step for i in range(int((t1 - first) / step) + 1)], step < 60


def value_step(span: float, binary: bool, most: int = 5) -> float:
    """A round step giving at most about *most* ticks: 1, 2 or 5 times a power of ten (of a power of 1024 first,
    for bytes: 256 MiB, not 268.4 MB)."""
    raw = max(span, 1e-9) / most
    unit = 1.0
    if binary:
        while raw / unit >= 1024:
            unit *= 1024
    scaled = raw / unit
    power = 10.0 ** math.floor(math.log10(scaled))
    for multiple in (1, 2, 5, 10):
        if multiple * power >= scaled:
            return multiple * power * unit
    return 10 * power * unit


def value_range(values: Sequence[float], floor: float | None = None) -> tuple[float, float]:
    low = min(values) if values else 0.0
    high = max(values) if values else 1.0
    if floor is not None:
        low = min(low, floor)
    if high <= low:
        high = low + (abs(low) * 0.1 or 1.0)
    pad = (high - low) * 0.08
    return (low - pad if floor is None else low), high + pad


def polyline(frame: Frame, points: Sequence[tuple[float, float]], colour: str, *, dashed: bool = False,
             width: float = 1.6) -> str:
    if not points:
        return ""
    coords = " ".join(f"{frame.x(t):.1f},{frame.y(v):.1f}" for t, v in points)
    dash = ' stroke-dasharray="6 4"' if dashed else ""
    if len(points) == 1:
        x, y = frame.x(points[0][0]), frame.y(points[0][1])
        return f'<circle cx="{x:.1f}" cy="{y:.1f}" r="2.5" fill="{colour}"/>'
    return (f'<polyline points="{coords}" fill="none" stroke="{colour}" stroke-width="{width}"{dash} '
            'stroke-linejoin="round"/>')


def time_axis(frame: Frame) -> list[str]:
    ticks, seconds = time_ticks(frame.t0, frame.t1)
    out = []
    for t in ticks:
        x = frame.x(t)
        out.append(f'<line x1="{x:.1f}" y1="{TOP}" x2="{x:.1f}" y2="{frame.height - BOTTOM}" class="grid"/>')
        out.append(f'<text x="{x:.1f}" y="{frame.height - 8}" class="tick" text-anchor="middle">'
                   f"{clock(t, seconds)}</text>")
    return out


def value_axis(frame: Frame, fmt: Callable[[float], str], binary: bool) -> list[str]:
    step = value_step(frame.v1 - frame.v0, binary)
    out = []
    v = math.ceil(frame.v0 / step) * step
    while v <= frame.v1 + 1e-9:
        y = frame.y(v)
        out.append(f'<line x1="{LEFT}" y1="{y:.1f}" x2="{WIDTH - RIGHT}" y2="{y:.1f}" class="grid"/>')
        out.append(f'<text x="{LEFT - 6}" y="{y + 4:.1f}" class="tick" text-anchor="end">{esc(fmt(v))}</text>')
        v += step
    return out


def marks(frame: Frame, found: Sequence[Mark], top: float, bottom: float) -> list[str]:
    out = []
    for mark in found:
        x = frame.x(mark.time)
        colour = MARK_COLOURS.get(mark.kind, "#555")
        out.append(f'<g class="mark {esc(mark.kind)}"><title>{esc(clock(mark.time, True))} {esc(mark.kind)}: '
                   f'{esc(mark.label)}</title><line x1="{x:.1f}" y1="{top:.1f}" x2="{x:.1f}" y2="{bottom:.1f}" '
                   f'stroke="{colour}" stroke-width="1.5" stroke-dasharray="2 2"/>'
                   f'<path d="M{x - 5:.1f},{top:.1f} h10 l-5,8 z" fill="{colour}"/></g>')
    return out


def _one_per_pixel(frame: Frame, found: Sequence[Mark]) -> list[Mark]:
    """The first marker of each kind in each pixel column: more would be drawn over it, and a night of many
    jobs would repeat every one of them in every chart."""
    seen: set[tuple[str, int]] = set()
    kept = []
    for mark in found:
        key = (mark.kind, round(frame.x(mark.time)))
        if key not in seen:
            seen.add(key)
            kept.append(mark)
    return kept


def chart_parts(title: str, t0: float, t1: float, lines: Sequence[Line], found: Sequence[Mark],
                fmt: Callable[[float], str], *, binary: bool = False, floor: float | None = None,
                height: int = 210) -> Iterator[str]:
    """One chart: its lines (limits dashed), the events as markers, the axes; an SVG element, in pieces of one
    line each (a night's chart may hold a line for each of tens of thousands of jobs)."""
    values = [v for line in lines for _, v in line.points]
    v0, v1 = value_range(values, floor)
    del values
    frame = Frame(t0, t1, v0, v1, height)
    yield "\n".join([f'<svg class="chart" viewBox="0 0 {WIDTH} {height}" role="img" aria-label="{esc(title)}">',
                     f'<text x="{LEFT}" y="16" class="title">{esc(title)}</text>',
                     f'<rect x="{LEFT}" y="{TOP}" width="{WIDTH - LEFT - RIGHT}" height="{height - TOP - BOTTOM}" '
                     'class="plot"/>', *time_axis(frame), *value_axis(frame, fmt, binary), ""])
    for line in lines:
        yield (f'<g class="series"><title>{esc(line.label)}</title>'
               f"{polyline(frame, line.points, line.colour, dashed=line.dashed)}</g>\n")
    yield "\n".join([*marks(frame, _one_per_pixel(frame, found), TOP, height - BOTTOM), "</svg>\n"])

