"""Size, duration, temperature and lock-name parsers: examples, boundaries and properties."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from safegate.errors import ValueParseError
from safegate.units import (
    Size,
    did_you_mean,
    format_bytes,
    parse_duration,
    parse_size,
    parse_temp,
    validate_lock_name,
)

GiB = 1024**3


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("512M", 512 * 1024**2),
        ("10G", 10 * GiB),
        ("1.5G", int(1.5 * GiB)),
        ("10GiB", 10 * GiB),
        ("10Gi", 10 * GiB),
        ("10gib", 10 * GiB),
        ("10GB", 10 * 10**9),
        ("500MB", 500 * 10**6),
        ("4096", 4096),
        ("0", 0),
        ("1K", 1024),
        ("2T", 2 * 1024**4),
        (" 3G ", 3 * GiB),
        ("7B", 7),
    ],
)
def test_size_examples(text: str, expected: int) -> None:
    assert parse_size(text) == Size(bytes=expected)


def test_size_percent_resolves_against_total() -> None:
    size = parse_size("10%")
    assert size.percent == 10
    assert size.resolve(1000) == 100
    assert str(size) == "10%"


@pytest.mark.parametrize(
    "text", ["10GG", "-1G", "abc", "", "G", "1.2.3G", "10 G B", "10iB", "101%", "-5%", "x%", "nan"]
)
def test_size_rejects(text: str) -> None:
    with pytest.raises(ValueParseError, match="invalid size"):
        parse_size(text)


def test_size_without_percent() -> None:
    with pytest.raises(ValueParseError):
        parse_size("10%", allow_percent=False)


UNITS = {"": 1, "K": 1024, "M": 1024**2, "G": 1024**3, "T": 1024**4, "MiB": 1024**2, "GiB": 1024**3,
         "KB": 1000, "MB": 10**6, "GB": 10**9, "TB": 10**12}


@given(n=st.integers(min_value=0, max_value=100_000), unit=st.sampled_from(sorted(UNITS)))
def test_size_integer_round_trip(n: int, unit: str) -> None:
    assert parse_size(f"{n}{unit}").bytes == n * UNITS[unit]


@given(st.text(max_size=30))
def test_size_never_fails_otherwise(text: str) -> None:
    try:
        size = parse_size(text)
    except ValueParseError as exc:
        assert repr(text) in str(exc)  # the message names the value
    else:
        assert (size.bytes is not None and size.bytes >= 0) or (size.percent is not None and 0 <= size.percent <= 100)


@given(st.floats(min_value=0, max_value=100, allow_nan=False))
def test_percent_in_range(pct: float) -> None:
    assert parse_size(f"{pct}%").percent == pytest.approx(pct)


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("30", 30), ("90s", 90), ("5m", 300), ("2h", 7200), ("250ms", 0.25), ("1.5s", 1.5), ("1d", 86400), ("0", 0)],
)
def test_duration_examples(text: str, seconds: float) -> None:
    assert parse_duration(text) == pytest.approx(seconds)


@pytest.mark.parametrize("text", ["", "-1", "-1s", "5 minutes", "abc", "1w", "1e3", "inf"])
def test_duration_rejects(text: str) -> None:
    with pytest.raises(ValueParseError, match="invalid duration"):
        parse_duration(text)


@given(n=st.integers(min_value=0, max_value=10**5), unit=st.sampled_from(["", "s", "m", "h", "ms"]))
def test_duration_round_trip(n: int, unit: str) -> None:
    seconds = n * {"": 1, "s": 1, "m": 60, "h": 3600, "ms": 0.001}[unit]
    if seconds > 10 * 365 * 86400:
        with pytest.raises(ValueParseError, match="longer than 10 years"):
            parse_duration(f"{n}{unit}")
    else:
        assert parse_duration(f"{n}{unit}") == pytest.approx(seconds)


@given(st.text(max_size=20))
def test_duration_never_fails_otherwise(text: str) -> None:
    try:
        assert parse_duration(text) >= 0
    except ValueParseError as exc:
        assert repr(text) in str(exc)


@pytest.mark.parametrize(("text", "value"), [("80", 80), ("80C", 80), ("72.5", 72.5), ("-10", -10), ("200", 200)])
def test_temp_examples(text: str, value: float) -> None:
    assert parse_temp(text) == value


@pytest.mark.parametrize("text", ["abc", "", "201", "-51", "nan", "inf"])
def test_temp_rejects(text: str) -> None:
    with pytest.raises(ValueParseError, match="invalid temperature"):
        parse_temp(text)


@pytest.mark.parametrize("name", ["heavy", "whisper-large", "llm_7b", "a.b", "größe", "x" * 64])
def test_lock_names_accepted(name: str) -> None:
    assert validate_lock_name(name) == name


@pytest.mark.parametrize("name", ["", "../x", "a/b", "..", ".hidden", "-rf", "a b", "a\nb", "a\0b", "x" * 65, "a\\b"])
def test_lock_names_rejected(name: str) -> None:
    with pytest.raises(ValueParseError, match="invalid lock name"):
        validate_lock_name(name)


@given(st.text(max_size=80))
def test_accepted_lock_names_are_safe_file_names(name: str) -> None:
    try:
        validate_lock_name(name)
    except ValueParseError:
        return
    assert "/" not in name and ".." not in name and name.isprintable() and 0 < len(name) <= 64


def test_format_bytes() -> None:
    assert format_bytes(0) == "0 B"
    assert format_bytes(10 * GiB) == "10.0 GiB"
    assert format_bytes(-1536) == "-1.5 KiB"


@pytest.mark.parametrize(
    ("given", "choices", "expected"),
    [
        ("max_memm", ["max_mem", "max_temp", "memory"], "; did you mean 'max_mem'?"),
        ("atuo", ["auto", "on", "off"], "; did you mean 'auto'?"),  # letters swapped
        ("SIGUSR", ["SIGTERM", "SIGUSR1", "SIGURG", "SIGUSR2"], "; did you mean 'SIGUSR1' or 'SIGUSR2'?"),
        ("explode", ["pause", "kill", "warn"], ""),
        ("x" * 10_000, ["pause"], ""),
        ("anything", [], ""),
    ],
)
def test_did_you_mean(given: str, choices: list[str], expected: str) -> None:
    assert did_you_mean(given, choices) == expected


@given(st.text(max_size=200), st.lists(st.text(min_size=1, max_size=20), max_size=30))
def test_did_you_mean_names_only_choices_on_one_line(given_text: str, choices: list[str]) -> None:
    # The given text is another user's (a config key, a command line): never echoed, never a crash.
    hint = did_you_mean(given_text, choices)
    forms = {f"; did you mean {a!r}?" for a in choices} | {
        f"; did you mean {a!r} or {b!r}?" for i, a in enumerate(choices) for b in choices[i + 1:]}
    assert hint == "" or hint in forms
    assert hint.isprintable()
