"""Dates in mail, in the reader's language and time zone ("lundi 24 novembre à 11:00").

Babel (CLDR) knows the day and month names and their grammar; only the
sentence shape around them is ours.
"""

from __future__ import annotations

from datetime import datetime
from zoneinfo import ZoneInfo

from babel.dates import format_date, format_datetime

# CLDR patterns; quoted text is literal.
_PATTERNS = {
    "fr": "EEEE d MMMM 'à' HH:mm",
    "es": "EEEE d 'de' MMMM 'a las' HH:mm",
    "en": "EEEE d MMMM 'at' HH:mm",
}


def format_when(instant: datetime, timezone: str, language: str) -> str:
    """`instant` as the reader's wall clock shows it, in words of their language."""
    locale = _locale(language)
    return format_datetime(instant, _PATTERNS[locale], tzinfo=ZoneInfo(timezone), locale=locale)


def format_day(instant: datetime, timezone: str, language: str) -> str:
    """The reader's calendar day of `instant`: "23 novembre 2027", "23 November 2027"."""
    day = instant.astimezone(ZoneInfo(timezone)).date()
    return format_date(day, "long", locale=_locale(language))


def _locale(language: str) -> str:
    return language if language in _PATTERNS else "en"
