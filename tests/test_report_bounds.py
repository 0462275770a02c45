"""`safegate report` against logs it must refuse or survive (issue 22, finding 7): numbers and times out of range
are exit 4 naming the log and the line, never an internal error; any line at all is a model or a LogError; a
night of 32,000 jobs is read and drawn; what one job keeps does not grow with its lines."""

from __future__ import annotations

import json
import subprocess
import time
import tracemalloc
from collections.abc import Iterator
from datetime import datetime, timezone
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from support import Run

from safegate.errors import LogError
from safegate.exitcodes import ExitCode
from safegate.report import timeline
from safegate.report.page import page
from safegate.report.timeline import MAX_POINTS, build_report, jobs_from_lines

BIG = "9" * 400
NOW = time.time()


def _stamp(moment: float) -> str:
    return datetime.fromtimestamp(moment, tz=timezone.utc).isoformat(timespec="milliseconds")


def _line(event: str, moment: float, **fields: object) -> str:
    return json.dumps({"time": _stamp(moment), "event": event, "message": f"{event} line", "safegate_pid": 4242,
                       **fields}) + "\n"


def _job(start: float, number: int = 0, samples: int = 2) -> list[str]:
    """A small job's lines, as exec --log writes them."""
    argv = ["python", "train.py", "--shard", str(number)]
    lines = [_line("admitted", start, pid=1000 + number % 1000, profile="default", lock="heavy", argv=argv,
                   max_mem=2**31, min_available=2**30, max_temp=80.0, max_gpu_mem=None, cgroup=None)]
    lines += [_line("sample", start + i * 0.5, job_memory=300_000 + i, available=2**34, pressure=0.0,
                    job_pressure=None, temp=45.0, gpus=[], job_gpu_memory=None) for i in range(samples)]
    lines.append(_line("exit", start + 1.5, exit_code=0, reason="exited", status=0, signal=None))
    lines.append(_line("summary", start + 1.5, duration=1.5, peak_job_memory=331776, lowest_available=2**34,
                       highest_temp=45.0, peak_job_gpu_memory=None, highest_gpu_temp=None, highest_job_pressure=None,
                       reason="exited", exit_code=0))
    return lines


def _one_line_exit_4(result: subprocess.CompletedProcess[str], log: Path, *needles: str) -> None:
    assert result.returncode == ExitCode.BAD_LOG, (result.returncode, result.stderr)
    assert result.stderr.count("\n") == 1 and result.stderr.startswith("safegate: "), result.stderr
    assert "Traceback" not in result.stderr and "internal error" not in result.stderr and result.stdout == ""
    for needle in (str(log), *needles):
        assert needle in result.stderr, (needle, result.stderr)


START = NOW - 3600
ADMITTED = _job(START)[0]
# The line that is wrong is always line 2 (after a good admitted line), or line 1 where it is the admitted one.
FINDINGS = {
    "job_memory": ADMITTED + f'{_line("sample", START + 1, available=1)[:-2]}, "job_memory": {BIG}}}\n',
    "max_mem": _line("admitted", START, argv=["x"])[:-2] + f', "max_mem": {BIG}}}\n',
    "peak_job_memory": ADMITTED + _line("summary", START + 2, exit_code=0)[:-2] + f', "peak_job_memory": {BIG}}}\n',
    "safegate_pid": _line("admitted", START, argv=["x"]).replace('"safegate_pid": 4242', f'"safegate_pid": {BIG}'),
    "exit_code": ADMITTED + _line("exit", START + 2, reason="exited")[:-2] + f', "exit_code": {BIG}}}\n',
    "year 9999": _line("admitted", START, argv=["x"]).replace(_stamp(START), "9999-12-31T23:59:59.000+00:00"),
}


@pytest.mark.parametrize("field", sorted(FINDINGS))
def test_out_of_range_numbers_and_times_are_exit_4_naming_the_line(field: str, run: Run, tmp_path: Path) -> None:
    log = tmp_path / "night.jsonl"
    log.write_text(FINDINGS[field])
    line = "line 1" if field in ("max_mem", "safegate_pid", "year 9999") else "line 2"
    what = "time 9999-12-31T23:59:59" if field == "year 9999" else f"{field} is a 400-digit number"
    _one_line_exit_4(run("report", str(log), "-o", str(tmp_path / "r.html")), log, f"{line}: ", what)
    assert not (tmp_path / "r.html").exists()


OTHERS = {
    # JSON's own limits: NaN and Infinity are not JSON numbers, wherever they are (the old reader took them in
    # fields it did not check).
    "NaN pressure": (_line("sample", START + 1, job_memory=1, available=1).replace('"message"', '"pressure": NaN, '
                                                                                    '"message"'), "NaN at column"),
    "Infinity in a signal": (_line("signal", START + 1).replace('"message"', '"available": -Infinity, "message"'),
                             "-Infinity at column"),
    "a negative wait": (_line("blocked", START + 1, waited=-1), "waited is -1; expected float >= 0"),
    "a wait of 1e300 seconds": (_line("blocked", START + 1, waited=1e300), "waited is 1e+300; expected float <= "),
    "a check that is a number": (_line("waiting", START + 1, checks=["lock", 7]), "checks[1] is 7; expected str"),
    "a negative size": (_line("sample", START + 1, job_memory=-1, available=1), "job_memory is -1; expected int >= 0"),
    "exit code 256": (_line("exit", START + 1, exit_code=256), "exit_code is 256; expected int <= 255"),
    "pid past PID_MAX_LIMIT": (_line("exit", START + 1).replace("4242", "4194305"), "safegate_pid is 4194305"),
    "a float size": (_line("sample", START + 1, job_memory=1.5, available=1), "job_memory is 1.5; expected int"),
    "a GPU's used VRAM": (_line("sample", START + 1, job_memory=1, available=1, gpus=[{"index": 0, "used": 2**60}]),
                          "gpus[0].used is 1152921504606846976"),
    "a temperature of 1e300": (_line("sample", START + 1, job_memory=1, available=1, temp=1e300), "temp is 1e+300"),
    "an unknown reason": (_line("exit", START + 1, reason="bored"), "reason is 'bored'; expected one of exited"),
    "before the epoch": (_line("sample", START, job_memory=1, available=1).replace(_stamp(START),
                                                                                   "1969-12-31T23:59:59+00:00"),
                         "time 1969-12-31T23:59:59+00:00 is not between"),
    "no UTC offset": (_line("sample", START, job_memory=1, available=1).replace(_stamp(START), "2026-01-01T00:00:00"),
                      "time '2026-01-01T00:00:00' is not an RFC 3339 time"),
    "an unknown event in year 9999": (_line("later_kind", START).replace(_stamp(START), "9999-01-01T00:00:00Z"),
                                      "time 9999-01-01T00:00:00+00:00"),
}


@pytest.mark.parametrize("case", sorted(OTHERS))
def test_every_field_is_checked_by_type_and_range(case: str, run: Run, tmp_path: Path) -> None:
    log = tmp_path / "night.jsonl"
    bad, needle = OTHERS[case]
    log.write_text(ADMITTED + bad)
    _one_line_exit_4(run("report", str(log), "-o", "-"), log, "line 2: ", needle)


def test_an_unknown_event_is_skipped_and_a_line_longer_than_64_mib_refused(run: Run, tmp_path: Path) -> None:
    log = tmp_path / "later.jsonl"
    log.write_text("".join(_job(START)) + _line("later_kind", START + 2, whatever=[1, {"x": None}]))
    result = run("report", str(log), "-o", "-")
    assert result.returncode == 0 and result.stdout.count('class="row lane ') == 1, result.stderr
    huge = tmp_path / "huge.jsonl"
    with huge.open("w") as out:
        out.write(ADMITTED + '{"time": "' + "x" * (65 * 2**20))  # no newline: read no further than the limit
    _one_line_exit_4(run("report", str(huge), "-o", "-"), huge, "line 2: longer than 64 MiB")


# --- any line at all ---------------------------------------------------------------------------------------

FIELDS = ["job_memory", "available", "max_mem", "min_available", "max_temp", "max_gpu_mem", "peak_job_memory",
          "peak_job_gpu_memory", "highest_temp", "exit_code", "status", "signal", "reason", "safegate_pid", "pid",
          "temp", "pressure", "job_pressure", "gpus", "job_gpu_memory", "argv", "profile", "lock", "message",
          "duration", "lowest_available", "pids", "sensor", "gpu", "free", "oom_kills", "cgroup", "waited", "checks"]
EVENTS = ["admitted", "sample", "notice", "warning", "breach", "paused", "resumed", "signal", "cleanup", "exit",
          "summary", "blocked", "not_started", "waiting"]
EDGES = st.sampled_from([0, 1, -1, 255, 256, 2**22, 2**22 + 1, 2**53, 2**53 + 1, 2**64, 10**400, -10**400, 0.5,
                         1e300, -1e300, float("nan"), float("inf"), float("-inf"), -273.15, 1000.0, True, None,
                         "", "memory", "\x1b[31m\u202e<b>&", "\ud800"])
JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20) | EDGES,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.sampled_from(FIELDS) | st.text(max_size=8), inner,
                                                                max_size=3),
    max_leaves=10,
)
TIMES = st.one_of(
    st.floats(min_value=0.0, max_value=NOW + 2 * 86400).map(_stamp),
    st.sampled_from(["1970-01-01T00:00:00Z", "9999-12-31T23:59:59.999+00:00", "0001-01-01T00:00:00+23:59",
                     "2026-02-30T00:00:00Z", "2026-12-02T02:00:00", "yesterday", ""]),
    JSON,
)
EVENT = st.fixed_dictionaries(
    {"event": st.sampled_from(EVENTS) | st.text(max_size=8) | JSON, "time": TIMES},
    optional={name: JSON | EDGES for name in FIELDS},
)


SIZE = st.sampled_from([0, 2**53]) | st.integers(0, 2**53)
CELSIUS = st.sampled_from([-273.15, 1000.0]) | st.floats(-273.15, 1000.0)
TEXT = st.text(max_size=30) | st.just("\x1b]0;x\x07\u202e<script>&amp;\n")
WAITED = st.sampled_from([0, 1e10]) | st.floats(0.0, 1e10)
MAYBE = {"safegate_pid": st.sampled_from([1, 7, 2**22]), "message": TEXT}
VALID = st.one_of(  # the writer's own shapes, with values at the edges of what is accepted
    st.fixed_dictionaries({"event": st.just("admitted")}, optional={
        **MAYBE, "argv": st.lists(TEXT, max_size=3), "profile": TEXT, "lock": TEXT | st.none(), "max_mem": SIZE,
        "min_available": SIZE, "max_temp": CELSIUS, "max_gpu_mem": SIZE, "pid": st.integers(1, 2**22),
        "waited": WAITED}),
    st.fixed_dictionaries({"event": st.just("waiting")}, optional={
        **MAYBE, "exit_code": st.integers(0, 255), "checks": st.lists(TEXT, max_size=3)}),
    st.fixed_dictionaries({"event": st.just("sample"), "job_memory": SIZE, "available": SIZE}, optional={
        **MAYBE, "temp": CELSIUS, "pressure": st.floats(0, 100), "job_gpu_memory": SIZE,
        "gpus": st.lists(st.fixed_dictionaries({}, optional={"index": st.integers(0, 63), "used": SIZE,
                                                              "temp": CELSIUS}), max_size=3)}),
    st.fixed_dictionaries({"event": st.sampled_from(["warning", "breach", "paused", "resumed"])}, optional={
        **MAYBE, "job_memory": SIZE, "max_mem": SIZE, "min_available": SIZE, "max_temp": CELSIUS,
        "reason": st.sampled_from(["memory", "gpu", "thermal"])}),
    st.fixed_dictionaries({"event": st.sampled_from(["exit", "summary", "blocked", "not_started"])}, optional={
        **MAYBE, "exit_code": st.integers(0, 255), "reason": st.sampled_from(["exited", "memory", "thermal"]),
        "peak_job_memory": SIZE, "highest_temp": CELSIUS, "peak_job_gpu_memory": SIZE, "waited": WAITED}),
).flatmap(lambda event: st.floats(0.0, NOW).map(lambda moment: {**event, "time": _stamp(moment)}))


def _encoded(value: object) -> bytes:
    # The stdlib writes NaN and Infinity as literals, and lone surrogates as \ud800: all of them must be refused.
    return json.dumps(value).encode()


# A line of the writer's shape with one field made hostile: what a broken or forged log most often is.
HUGE = st.sampled_from([10**400, -10**400, 2**64, 2**53 + 1, 2**22 + 1, 256, -1, 1e300, float("nan"),
                        float("inf"), "9999-12-31T23:59:59+00:00", "0001-01-01T00:00:00+23:59"])
SPOILED = st.tuples(VALID, st.sampled_from([*FIELDS, "time", "event"]), st.one_of(HUGE, JSON, TIMES)).map(
    lambda spoil: {**spoil[0], spoil[1]: spoil[2]})
LINE = st.one_of(
    VALID.map(_encoded),
    SPOILED.map(_encoded),
    SPOILED.map(_encoded),
    EVENT.map(_encoded),
    JSON.map(_encoded),
    st.tuples(EVENT.map(_encoded), st.integers(0, 200)).map(lambda cut: cut[0][:cut[1]]),  # truncated
    st.binary(max_size=60),
    st.integers(1, 200_000).map(lambda depth: b"[" * depth + b"]" * depth),
    st.integers(1, 200_000).map(lambda depth: b'{"event": "sample", "time": "x", "gpus": ' + b"[" * depth),
    st.text(max_size=60).map(lambda text: text.encode("utf-8", "surrogatepass")),
)


@settings(max_examples=400, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(lines=st.lists(LINE, max_size=10), lead=st.booleans())
def test_any_lines_are_a_model_or_a_log_error(lines: list[bytes], lead: bool) -> None:
    text = ([ADMITTED.encode()] if lead else []) + [line + b"\n" for line in lines]
    try:
        jobs = jobs_from_lines("fuzz.jsonl", text)
    except LogError as exc:
        assert "\n" not in str(exc) and str(exc).startswith("fuzz.jsonl")
        return
    html = page(build_report([("fuzz.jsonl", jobs)]))
    html.encode("utf-8")  # what is written: no lone surrogate reaches it
    assert "<script" not in html and "\x1b" not in html


@settings(max_examples=200, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(events=st.lists(VALID, min_size=1, max_size=12))
def test_values_at_the_edges_of_the_accepted_ranges_are_drawn(events: list[dict[str, object]]) -> None:
    # Every line valid: times from the epoch to now, sizes to 2**53, -273.15 to 1000 C, GPU 63, any text. The
    # page is made (or the log holds no job); nothing in between overflows.
    lines = [_encoded(event) + b"\n" for event in events]
    try:
        jobs = jobs_from_lines("edges.jsonl", lines)
    except LogError as exc:
        assert "no job in it" in str(exc), exc
        return
    html = page(build_report([("edges.jsonl", jobs)]))
    assert html.count('class="row lane ') == len(jobs) and "\x1b" not in html and "<script>" not in html


# --- scale -------------------------------------------------------------------------------------------------


def test_a_night_of_32000_small_jobs_is_read_and_drawn(run: Run, tmp_path: Path) -> None:
    log = tmp_path / "many.jsonl"
    first = NOW - 32_000 * 3 - 3600
    with log.open("w") as out:
        for number in range(32_000):
            out.writelines(_job(first + 3 * number, number))
    out_file = tmp_path / "many.html"
    result = run("report", str(log), "-o", str(out_file), timeout=1800)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"wrote {out_file}: 32000 jobs in 1 night from 1 log"
    text = out_file.read_text()
    assert text.count('<div class="row lane finished"') == 32_000 and text.count('<tr class="finished"') == 32_000
    assert text.endswith("</body></html>\n")


def _long_job(samples: int) -> Iterator[str]:
    yield ADMITTED
    for i in range(samples):
        yield _line("sample", START + i * 0.01, job_memory=i % 5000, available=2**34 - i, temp=40.0 + i % 7,
                    gpus=[{"index": 0, "used": i}], job_gpu_memory=i)


def test_what_a_job_keeps_does_not_grow_with_its_lines() -> None:
    # 60,000 samples of one job, read from a generator: its series are thinned as they grow, so the memory the
    # reader holds stays about the same as for a few thousand (the old reader kept every point until the end).
    tracemalloc.start()
    try:
        jobs = jobs_from_lines("long.jsonl", _long_job(60_000))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    (job,) = jobs
    assert peak < 2_000_000, peak
    for series in (job.memory, job.available, job.temp, job.job_vram, job.vram[0][1]):
        assert len(series) <= MAX_POINTS
    assert max(v for _, v in job.memory) == 4999 and min(v for _, v in job.available) == 2**34 - 59_999


def test_markers_past_the_cap_are_counted_not_drawn(run: Run, tmp_path: Path) -> None:
    log = tmp_path / "noisy.jsonl"
    lines = [ADMITTED]
    for i in range(3000):
        lines.append(_line("warning", START + i * 0.1, job_memory=i, max_mem=2**31))
        lines.append(_line("paused" if i % 2 == 0 else "resumed", START + i * 0.1 + 0.05, temp=85.0))
    log.write_text("".join(lines))
    result = run("report", str(log), "-o", "-")
    assert result.returncode == 0, result.stderr
    # 3000 warnings: the lane draws the first 100, and each of the three charts (memory, MemAvailable,
    # temperature) at most those; the table says how many were left out.
    assert 0 < result.stdout.count('<g class="mark warning">') <= 4 * 100
    (job,) = jobs_from_lines(str(log), log.read_text().splitlines())
    assert timeline.MAX_MARKS == 100 and len(job.markers) == 3 * 100
    assert job.left_out == 2900 + 1400 + 1400 + (1500 - timeline.MAX_PAUSES) and len(job.pauses) == 400
    assert f"{job.left_out} more markers or pauses, not drawn" in result.stdout
