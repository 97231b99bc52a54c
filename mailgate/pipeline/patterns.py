"""Operators' regular expressions, searched in text that strangers write.

Rule conditions and staff reply markers are written by operators, but they run
on mail: `(a|aa)+$`, fed forty characters built to make it backtrack, would
hold the pipeline for hours with the standard `re`. The `regex` library stops
a search at a time limit; a search stopped there counts as no match, and a
warning names the expression so the operator can rewrite it.
"""

from __future__ import annotations

import functools
import logging

import regex

log = logging.getLogger("mailgate.patterns")

SEARCH_SECONDS = 0.25  # per search of one expression in one text


@functools.lru_cache(maxsize=1024)
def compile_pattern(source: str) -> regex.Pattern[str]:
    """ValueError, naming the expression, when it is not a valid one."""
    try:
        return regex.compile(source, regex.IGNORECASE)
    except regex.error as exc:
        raise ValueError(f"{source!r} is not a valid regular expression: {exc}") from None


def found(pattern: regex.Pattern[str], text: str) -> bool:
    """Does `pattern` occur in `text`? False when the search runs out of time."""
    try:
        return pattern.search(text, timeout=SEARCH_SECONDS) is not None
    except TimeoutError:
        log.warning("regular expression %r gave up after %.2f s on this mail and counts as "
                    "not matching; rewrite it without nested repetition", pattern.pattern,
                    SEARCH_SECONDS)  # fmt: skip
        return False
