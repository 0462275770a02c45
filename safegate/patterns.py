"""Regular expressions over text other people control (command lines): a bounded cost whatever the text.

Python's re backtracks. A pattern with a repeat inside a repeat (`(a+)+$`, `(x+x+)+y`) takes exponential time
on a crafted line, so it is refused when the config is read. Every other pattern is polynomial in the text's
length, of a degree that grows with its unbounded repeats (`whisper.*large` under search() is quadratic:
100 s on a 1 MiB line), so each pattern reads only as much of a text as keeps one search within about
WORK_PER_SEARCH steps, and says when it read less than all of it.
"""

from __future__ import annotations

import re
from typing import Any

try:  # the parser moved in 3.11; both expose the same parse tree
    import re._parser as _sre_parse  # type: ignore[import-not-found,unused-ignore]
except ImportError:  # pragma: no cover - Python 3.10
    import sre_parse as _sre_parse  # type: ignore[no-redef,unused-ignore]

try:
    from re._constants import (  # type: ignore[import-not-found,unused-ignore]
        MAXREPEAT as _MAXREPEAT,
    )
except ImportError:  # pragma: no cover - Python 3.10
    from sre_constants import MAXREPEAT as _MAXREPEAT  # type: ignore[no-redef,unused-ignore]

# About 16 M backtracking steps, some 15 ms of one core: a quadratic pattern reads 4 KiB, a cubic one 256 bytes.
WORK_PER_SEARCH = 1 << 24
# A pattern without unbounded repeats is linear: it still reads no more than this of a line.
LINEAR_LIMIT = 1 << 20
MIN_LIMIT = 64


def nested_repeat(pattern: str) -> str | None:
    """The part of *pattern* that repeats a repeat (exponential backtracking), or None when there is none."""
    try:
        tree = _sre_parse.parse(pattern)
    except re.error:
        return None  # the caller reports the syntax error itself
    found = _find_nested(tree, inside=False)
    return found


def _repeat_ops() -> set[str]:
    names = {"MAX_REPEAT", "MIN_REPEAT", "POSSESSIVE_REPEAT"}
    return {str(getattr(_sre_parse, n)) for n in names if hasattr(_sre_parse, n)}


_REPEATS = _repeat_ops()


def _children(op: str, av: Any) -> list[Any]:
    """The sub-patterns of one parse-tree node."""
    if op in _REPEATS:
        return [av[2]]
    if op == "SUBPATTERN":
        return [av[-1]]
    if op == "BRANCH":
        return list(av[1])
    if op in ("ASSERT", "ASSERT_NOT"):
        return [av[1]]
    if op == "ATOMIC_GROUP":
        return [av]
    if op == "GROUPREF_EXISTS":
        return [p for p in av[1:] if p is not None]
    return []


def _find_nested(tree: Any, *, inside: bool) -> str | None:
    for op, av in tree:
        name = str(op)
        if name in _REPEATS:
            low, high = av[0], av[1]
            varies = high != low
            unbounded = high == _MAXREPEAT or high > 16
            if inside and varies:
                return "a repeat inside a repeat"
            found = _find_nested(av[2], inside=inside or (unbounded and varies))
            if found:
                return found
            continue
        for child in _children(name, av):
            found = _find_nested(child, inside=inside)
            if found:
                return found
    return None


def _unbounded_repeats(tree: Any) -> int:
    count = 0
    for op, av in tree:
        name = str(op)
        if name in _REPEATS and (av[1] == _MAXREPEAT or av[1] > 16) and av[1] != av[0]:
            count += 1
        for child in _children(name, av):
            count += _unbounded_repeats(child)
    return count


def text_limit(pattern: str) -> int:
    """How many characters of a text one search of *pattern* reads: about WORK_PER_SEARCH steps at worst.

    search() tries every start, one degree; each unbounded repeat can backtrack over the rest, one more.
    """
    try:
        tree = _sre_parse.parse(pattern)
    except re.error:
        return MIN_LIMIT
    anchored = bool(pattern.startswith(("^", r"\A")))
    degree = _unbounded_repeats(tree) + (0 if anchored else 1)
    if degree <= 1:
        return LINEAR_LIMIT
    return max(MIN_LIMIT, int(WORK_PER_SEARCH ** (1.0 / degree)))


class BoundedRegex:
    """A compiled pattern that searches only the first text_limit() characters of a text."""

    def __init__(self, pattern: str) -> None:
        self.pattern = pattern
        self.regex = re.compile(pattern)
        self.limit = text_limit(pattern)

    def search(self, text: str) -> tuple[re.Match[str] | None, bool]:
        """(the match in the part read, whether the whole text was read)."""
        whole = len(text) <= self.limit
        found = self.regex.search(text, 0, self.limit)
        if found is not None and not whole and found.end() >= self.limit:
            # `$` and `\b` also match where the reading stopped, which is no end of the real text.
            return None, False
        return found, whole

    def fullmatch(self, text: str) -> bool:
        return len(text) <= self.limit and self.regex.fullmatch(text) is not None
