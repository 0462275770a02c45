"""Regular expressions over text other people control (command lines), on RE2: linear in the text, whatever the
pattern.

Python's re backtracks: `whisper(.|\\s)*large` takes exponential time on `whisper` and 30 spaces, and one search
cannot be interrupted, so a check under the admission lock would hold it as long as someone else's command line
says. RE2 (google-re2) runs every pattern it accepts in time linear in the text, and refuses what would need
backtracking (backreferences, lookaround, possessive repeats, ...): such a pattern is refused when the config is
read. The google-re2 module never falls back to re.

re2 is imported on the first compile only (about 3 ms), so a check whose rules are never tried does not pay it.
"""

from __future__ import annotations

from functools import cache
from typing import Any

from safegate.errors import ValueParseError

SYNTAX_URL = "https://github.com/google/re2/wiki/Syntax"

# What an RE2 error means for someone who wrote the pattern for Python's re (or PCRE).
_HINTS = (
    ("invalid escape sequence: \\k", "backreferences are not supported"),
    ("invalid escape sequence: \\Z", "write \\z for the end of the text"),
    ("invalid perl operator: (?=", "lookahead is not supported"),
    ("invalid perl operator: (?!", "lookahead is not supported"),
    ("invalid perl operator: (?<=", "lookbehind is not supported"),
    ("invalid perl operator: (?<!", "lookbehind is not supported"),
    ("invalid perl operator: (?>", "atomic groups are not supported"),
    ("invalid perl operator: (?(", "conditionals are not supported"),
    ("invalid perl operator: (?#", "comments are not supported"),
    ("bad repetition operator: *+", "possessive repeats are not supported"),
    ("bad repetition operator: ++", "possessive repeats are not supported"),
    ("bad repetition operator: ?+", "possessive repeats are not supported"),
    ("invalid repetition size", "a repeat count is at most 1000, nested repeats included"),
    ("pattern too large", "a pattern compiles into at most 8 MiB"),
)


def _hint(error: str, pattern: str) -> str:
    if error.startswith("invalid escape sequence: \\") and error[-1:].isdigit():
        return "backreferences are not supported"
    if error == "invalid perl operator: (?P":
        return "(?P=name) backreferences are not supported" if "(?P=" in pattern else ""
    if error.startswith("invalid perl operator: (?") and error[-1:].isalpha():
        return "the flags are i, m, s and U"
    return next((hint for start, hint in _HINTS if error.startswith(start)), "")


@cache
def _engine() -> tuple[Any, Any]:
    """The re2 module and the options every pattern is compiled with, on first use."""
    import re2  # type: ignore[import-untyped]

    options = re2.Options()  # the defaults otherwise: UTF-8, leftmost-first like re, 8 MiB of memory per pattern
    options.log_errors = False  # RE2 would print its own two lines to stderr; the caller says it in one
    options.never_capture = True  # only the whole match is shown: RE2 finds its bounds with the DFA alone
    return re2, options


class Regex:
    """A pattern compiled by RE2, matched against str (text that is not valid UTF-8 never raises)."""

    __slots__ = ("_regex", "pattern")

    def __init__(self, pattern: str) -> None:
        re2, options = _engine()
        self.pattern = pattern
        try:
            # As bytes: a lone surrogate is then RE2's "invalid UTF-8", not a UnicodeEncodeError.
            self._regex = re2.compile(_utf8(pattern), options)
        except re2.error as exc:
            raw = exc.args[0] if exc.args else ""
            error = raw.decode("utf-8", "replace") if isinstance(raw, bytes) else str(raw)
            hint = _hint(error, pattern)
            raise ValueParseError(f"{error}{f' ({hint})' if hint else ''}") from None

    def search(self, text: str) -> str | None:
        """The leftmost match anywhere in *text* (as Python's re.search finds it), or None."""
        found = self._regex.search(_utf8(text))
        return None if found is None else str(found.group(0).decode("utf-8", "replace"))

    def fullmatch(self, text: str) -> bool:
        return self._regex.fullmatch(_utf8(text)) is not None


def _utf8(text: str) -> bytes:
    # A command line psutil read may hold lone surrogates (undecodable bytes): encoded as they came.
    return text.encode("utf-8", "surrogatepass")


@cache
def compiled(pattern: str) -> Regex:
    """*pattern* compiled once per process; ValueParseError (RE2's reason, and a hint) when RE2 refuses it."""
    return Regex(pattern)
