"""`safegate report` for a real night (issue 25, item 5): 8-12 hours, 10-200 jobs, several logs. The page is
opened in real headless Chromium, driven through the DevTools protocol (tests/cdp.py), and its layout measured
there: every lane at least its minimum width, every pause visible, every label inside its lane or table cell,
nothing wider than the page, a table row a line. The screenshots are written where SAFEGATE_REPORT_SHOTS says
(docs/ holds the ones of the last change to the page)."""

from __future__ import annotations

import itertools
import os
import shutil
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import msgspec
import pytest
from cdp import Browser, chromium_or_skip
from nightlogs import START, Log, write_night
from support import TIMEOUT, Procs, Run
from test_report import _night, _png_pixels

from safegate.report import lanes, page
from safegate.report.timeline import build_report, jobs_from_lines
from safegate.units import format_duration

# What the test measures in the page, in the browser: rectangles, not guesses about fonts.
MEASURE = """(() => {
  const r = e => e.getBoundingClientRect();
  const inside = (a, b) => a.left >= b.left - 0.5 && a.right <= b.right + 0.5 && a.top >= b.top - 0.5
                           && a.bottom <= b.bottom + 0.5;
  const width = document.documentElement.clientWidth;
  const out = {width, scroll: document.documentElement.scrollWidth, wide: [], bars: [], pauses: [],
               outside: [], rows: [], colours: [], resources: performance.getEntriesByType('resource').length,
               scripts: document.scripts.length};
  for (const e of document.querySelectorAll('body *')) {
    const b = r(e);
    if (b.width > 0 && (b.right > width + 0.5 || b.left < -0.5))
      out.wide.push(e.tagName + '.' + e.getAttribute('class'));
  }
  for (const lane of document.querySelectorAll('.lane')) {
    // Also measures the SVG lanes of earlier reports (a <g class="lane"> and its <rect>), for comparison.
    const row = r(lane), track = r(lane.querySelector('.track') || lane.closest('svg'));
    const bar = lane.querySelector('.bar, rect');
    out.bars.push([+lane.dataset.job, r(bar).width, inside(r(bar), track)]);
    out.colours.push(getComputedStyle(bar).backgroundColor);
    for (const p of lane.querySelectorAll('.pause')) out.pauses.push([+lane.dataset.job, r(p).width,
                                                                        inside(r(p), track)]);
    for (const label of lane.querySelectorAll('.who, .end, .num, code'))
      if (!inside(r(label), row) || (label.matches('.who, .end') && r(label).height > 24))
        out.outside.push(['lane', lane.dataset.job, label.className || label.tagName]);
  }
  const cells = shown => {
    for (const cell of document.querySelectorAll('table.jobs td, table.jobs th'))
      for (const label of cell.querySelectorAll('*'))
        if (r(label).width > 0 && !label.closest('details:not([open]) > :not(summary)')
            && !inside(r(label), r(cell))) out.outside.push(['cell', shown, cell.className, label.tagName]);
  };
  cells('closed');
  for (const tr of document.querySelectorAll('table.jobs tbody tr')) out.rows.push(r(tr).height);
  out.cut = [...document.querySelectorAll('td.ended summary, .tl .end')].filter(
    e => e.scrollWidth > e.clientWidth + 1).map(e => e.textContent);
  // Opened, a reason wraps inside its cell (at word boundaries where it can).
  for (const d of document.querySelectorAll('table.jobs details')) d.open = true;
  cells('open');
  out.opened = document.querySelectorAll('table.jobs details[open] p').length;
  out.wide2 = document.documentElement.scrollWidth;
  for (const d of document.querySelectorAll('table.jobs details')) d.open = false;
  return out;
})()"""


def _measure(browser: Browser, html: Path, width: int, scripts: bool = True) -> dict[str, Any]:
    browser.open(html.as_uri(), width, scripts=scripts)
    found: dict[str, Any] = browser.evaluate(MEASURE)
    return found


def _readable(found: dict[str, Any], jobs: int, pauses: int) -> None:
    """The layout rules of issue 25, as measured."""
    assert found["scroll"] <= found["width"] and found["wide"] == [], found["wide"][:10]
    assert found["resources"] == 0 and found["scripts"] == 0  # one self-contained file, no script needed
    assert len(found["bars"]) == jobs
    short = [(n, w) for n, w, _ in found["bars"] if w < lanes.MIN_BAR - 0.01]
    assert short == [], short
    assert all(inside for _, _, inside in found["bars"]), [n for n, _, i in found["bars"] if not i]
    assert len(found["pauses"]) == pauses
    assert all(w >= lanes.MIN_PAUSE - 0.01 and inside for _, w, inside in found["pauses"]), found["pauses"]
    assert found["outside"] == [], found["outside"][:10]
    assert found["wide2"] <= found["width"]
    # A row of the table is one line: no command or reason wrapped over lines.
    assert max(found["rows"]) < 2 * min(found["rows"]), (min(found["rows"]), max(found["rows"]))
    if found["width"] >= 1280:  # how each job ended fits its line, the whole reason a click away
        assert found["cut"] == [], found["cut"][:5]
    colours = found["colours"]
    assert all(a != b for a, b in itertools.pairwise(colours)), "neighbouring lanes share a colour"
    assert len(set(colours[:12])) == min(12, jobs), colours[:12]


# Read at import: the suite's hermetic environment takes SAFEGATE_* variables away from each test.
SHOTS = os.environ.get("SAFEGATE_REPORT_SHOTS")


def _keep(shot: Path, name: str) -> None:
    if SHOTS:
        shutil.copyfile(shot, Path(SHOTS) / name)


def _screenshot(browser: Browser, html: Path, shot: Path, width: int) -> None:
    browser.open(html.as_uri(), width)
    height = int(browser.evaluate("document.documentElement.scrollHeight"))
    browser.screenshot(shot, width, height)
    w, h, pixels = _png_pixels(shot)
    assert (w, h) == (width, height)
    assert len({row[i:i + 3] for row in pixels[::7] for i in range(0, len(row), 15)}) > 30  # drawn, not blank


def test_a_200_job_10_hour_night_reads_in_chromium(run: Run, tmp_path: Path) -> None:
    logs = write_night(tmp_path)
    html = tmp_path / "night.html"
    result = run("report", *map(str, logs), "-o", str(html))
    assert result.returncode == 0, result.stderr
    model = build_report([(str(p), jobs_from_lines(str(p), p.read_text().splitlines())) for p in logs])
    (night,) = model.nights
    assert len(night.jobs) == 200 and 9.5 * 3600 <= night.end - night.start <= 10.5 * 3600
    pauses = sum(len(job.pauses) for job in night.jobs)
    assert pauses >= 5 and min(job.duration for job in night.jobs if job.command) < 60
    with Browser(chromium_or_skip(), tmp_path / "profile", TIMEOUT) as browser:
        for width in (1280, 900):
            _readable(_measure(browser, html, width), 200, pauses)
        _readable(_measure(browser, html, 1280, scripts=False), 200, pauses)
        _screenshot(browser, html, tmp_path / "night.png", 1280)
    _keep(tmp_path / "night.png", "report-night.png")


def test_the_three_job_night_reads_in_chromium(run: Run, config: Path, sensor: Path, tmp_path: Path,
                                               lock_dir: Path, procs: Procs) -> None:
    chromium = chromium_or_skip()
    logs = _night(run, config, sensor, tmp_path, lock_dir, procs)
    html = tmp_path / "three.html"
    assert run("report", *map(str, logs), "-o", str(html)).returncode == 0
    with Browser(chromium, tmp_path / "profile", TIMEOUT) as browser:
        _readable(_measure(browser, html, 1280), 3, 1)
        _screenshot(browser, html, tmp_path / "three.png", 1280)
    _keep(tmp_path / "three.png", "report-three-jobs.png")


class _Tags(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.found: list[tuple[str, dict[str, str]]] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.found.append((tag, {k: v or "" for k, v in attrs}))


def _tags(html: str) -> list[tuple[str, dict[str, str]]]:
    parser = _Tags()
    parser.feed(html)
    return parser.found


def test_ten_jobs_have_ten_colours_and_every_pause_is_drawn(tmp_path: Path) -> None:
    # The night: ten jobs in fifteen minutes, some of them seconds long, one paused for two seconds.
    log = Log(77)
    for n in range(10):
        t = START + n * 90
        log.add(t, "admitted", "admitted", argv=["whisper", f"/data/take-{n}.flac"], max_mem=2**30)
        if n == 4:
            log.add(t + 1, "paused", "paused", temp=86.0)
            log.add(t + 3, "resumed", "resumed", temp=70.0)
        log.add(t + (4 if n % 2 else 80), "summary", "summary", reason="exited", exit_code=0)
    text = page.page(build_report([("night", jobs_from_lines("night", log.lines))]))
    bars = [a["style"] for tag, a in _tags(text) if tag == "span" and a.get("class") == "bar"]
    colours = [style.split("background:")[1].split(";")[0] for style in bars]
    assert len(colours) == 10 and len(set(colours)) == 10
    pauses = [a for tag, a in _tags(text) if tag == "span" and a.get("class") == "pause"]
    assert len(pauses) == 1 and f"{lanes.MIN_PAUSE}px" in pauses[0]["style"]


def test_the_readings_that_decided_an_event_are_charted(tmp_path: Path) -> None:
    # Samples at 60 C a minute apart; the 90 C that stopped the job (--on-hot kill) and the 70 C read at the
    # resume are only in the events' lines.
    log = Log(78)
    log.add(START, "admitted", "admitted", argv=["hot"], max_temp=85.0, max_mem=2**30)
    log.add(START + 60, "sample", "sample", job_memory=2**20, available=2**33, temp=60.0)
    log.add(START + 70, "paused", "paused", temp=87.0, max_temp=85.0)
    log.add(START + 100, "resumed", "resumed", temp=70.0, max_temp=85.0)
    log.add(START + 115, "breach", "hottest sensor 90 C >= max-temp 85 C", temp=90.0, max_temp=85.0,
            job_memory=2**21, reason="thermal")
    log.add(START + 115.5, "signal", "sending SIGTERM", signal="SIGTERM", available=2**32, pids=[5])
    log.add(START + 116, "exit", "job killed", exit_code=21, reason="thermal")
    log.add(START + 116, "summary", "summary", reason="thermal", exit_code=21, highest_temp=90.0)
    (job,) = jobs_from_lines("hot", log.lines)
    assert job.temp == ((START + 60, 60.0), (START + 70, 87.0), (START + 100, 70.0), (START + 115, 90.0))
    assert (START + 115, float(2**21)) in job.memory and job.available[-1] == (START + 115.5, float(2**32))
    assert job.short == "stopped: thermal (exit 21)" and job.ended.startswith("stopped for thermal (exit 21): ")


def test_the_summary_says_what_a_reader_asks_first(tmp_path: Path) -> None:
    logs = write_night(tmp_path, jobs=40, hours=8.0)
    model = build_report([(str(p), jobs_from_lines(str(p), p.read_text().splitlines())) for p in logs])
    jobs = list(enumerate(model.jobs, 1))
    text = page.summary(jobs)
    ran = [j for _, j in jobs if j.outcome != "not_started"]
    stopped = sum(1 for j in ran if j.outcome == "stopped")
    assert f"<b>{len(ran)} jobs ran</b>" in text and f"<b>{stopped} stopped by safegate</b>" in text
    waits = [(j.waited, n) for n, j in jobs if j.waited is not None and j.waited >= 1.0]
    longest, n_longest = max(waits, key=lambda found: found[0])
    assert (f"<b>{len(waits)} jobs waited</b> before starting; the longest wait: #{n_longest}, "
            f"{format_duration(longest)}.") in text
    assert "Waits: these logs do not record them." in page.summary([(n, msgspec.structs.replace(j, waited=None))
                                                                    for n, j in jobs])
    share, n = max(((j.peak_memory / j.max_mem, n) for n, j in jobs if j.peak_memory is not None and j.max_mem),
                   key=lambda found: found[0])  # the first of equals
    assert f"Highest peak against its limit: <b>#{n}</b>" in text and f"({share:.0%})" in text
    # A log that records waits (a field of admitted): the longest one is named, and the table shows each.
    waited = [(n, msgspec.structs.replace(j, waited=float(n * 10))) for n, j in jobs]
    text = page.summary(waited)
    assert "<b>40 jobs waited</b>" in text and "the longest wait: #40, 6m40s" in text
    row = "".join(page.table([waited[3]]))
    assert "<td class=\"num\" title=\"40s\">40s</td>" in row
    assert "No job waited before starting." in page.summary([(n, msgspec.structs.replace(j, waited=0.0))
                                                             for n, j in jobs])
    assert '"num" title="-">-</td>' in "".join(page.table([(1, msgspec.structs.replace(jobs[0][1], waited=None))]))


@pytest.mark.parametrize("width", [1280])
def test_a_label_never_breaks_a_command_mid_word(width: int, tmp_path: Path) -> None:
    # A command of one 300-character word: cut with an ellipsis in the lane and the table, whole in titles.
    log = Log(79)
    word = "/data/" + "x" * 300 + ".flac"
    log.add(START, "admitted", "admitted", argv=["whisper", word])
    log.add(START + 30, "summary", "summary", reason="exited", exit_code=0)
    log.add(START + 60, "admitted", "admitted", argv=["whisper", "short"])
    log.add(START + 90, "summary", "summary", reason="exited", exit_code=0)
    html = tmp_path / "word.html"
    html.write_text(page.page(build_report([("word", jobs_from_lines("word", log.lines))])))
    assert "break-all" not in html.read_text() and f'title="whisper {word}"' in html.read_text()
    with Browser(chromium_or_skip(), tmp_path / "profile", TIMEOUT) as browser:
        _readable(_measure(browser, html, width), 2, 0)
