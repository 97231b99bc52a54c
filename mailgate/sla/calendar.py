"""Business-time arithmetic for SLA clocks.

One definition drives everything: an instant is business time iff its local wall time (in the
calendar's timezone) falls on a date that is not a holiday and inside one of that weekday's
[start, end) shifts. DST needs no special case: wall times in a spring-forward gap never occur,
and a repeated fall-back hour counts twice when it is open.

Time is always passed in; nothing here reads the clock.
"""

from __future__ import annotations

import functools
import re
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, time, timedelta, tzinfo

import holidays

WEEKDAYS = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")

# (start_minute, end_minute) of local wall time: 0 <= start < end <= 1440, sorted, non-overlapping.
Shifts = tuple[tuple[int, int], ...]

_DAY_MINUTES = 24 * 60
_ALL_DAY: Shifts = ((0, _DAY_MINUTES),)
_TIME = re.compile(r"(\d{1,2}):(\d{2})")
_ONE_DAY = timedelta(days=1)
_ONE_SECOND = timedelta(seconds=1)
# The UTC timeline is scanned in chunks of at most this length, assuming a timezone changes its
# offset at most once per chunk (true of every tzdata zone in living memory).
_CHUNK = timedelta(days=1)
# `add` gives up after this much timeline without any business time, instead of looping forever
# on a calendar that never opens (e.g. every day a holiday).
_GIVE_UP = timedelta(days=3653)


# --- opening hours ----------------------------------------------------------------------------


def parse_hours(value: str | Mapping[str, str | list[str] | None]) -> tuple[Shifts, ...]:
    """7 entries Monday..Sunday, from "24/7" or a mapping of weekdays/ranges to shifts.

    Keys: "mon", or a range "mon-fri" (ranges may wrap: "sun-thu"). Values: "09:00-18:00",
    "09:00-12:30, 13:30-18:00", a list of such strings, "24h" / "00:00-24:00", or
    null / "closed" (YAML's `off` / `no`, which load as False, also mean closed). Days not named
    are closed. Later keys override earlier ones for the days they name.
    Raises ValueError with a short message naming the bad part.
    """
    if isinstance(value, str):
        if value.strip().lower() == "24/7":
            return (_ALL_DAY,) * len(WEEKDAYS)
        raise ValueError(f"{value!r} is not '24/7' or a mapping of weekdays to hours")
    if not isinstance(value, Mapping):
        raise ValueError("hours must be '24/7' or a mapping of weekdays to hours")
    week: list[Shifts] = [() for _ in WEEKDAYS]
    for key, spec in value.items():
        days = _parse_days(key)
        shifts = _parse_shifts(spec, str(key).strip())
        for day in days:
            week[day] = shifts
    if not any(week):
        raise ValueError("no open hours in the week")
    return tuple(week)


def _parse_days(key: object) -> list[int]:
    """Weekday indexes (0 = Monday) named by a key: "tue" or a range "mon-fri"."""
    if not isinstance(key, str):
        raise ValueError(f"{key!r} is not a weekday (mon..sun)")
    parts = [part.strip() for part in key.split("-")]
    if len(parts) > 2:
        raise ValueError(f"{key!r} is not a weekday or a range like mon-fri")
    indexes = []
    for part in parts:
        if part.lower() not in WEEKDAYS:
            raise ValueError(f"{part!r} is not a weekday (mon..sun)")
        indexes.append(WEEKDAYS.index(part.lower()))
    first, last = indexes[0], indexes[-1]
    # Walk forward from the first day so that a range may wrap over the weekend ("sun-thu").
    return [(first + step) % 7 for step in range((last - first) % 7 + 1)]


def _parse_shifts(spec: object, where: str) -> Shifts:
    """One day's shifts from a value of the hours mapping; `where` names the key in errors."""
    if spec is None or spec is False:
        return ()
    if isinstance(spec, str):
        items = [spec]
    elif isinstance(spec, list | tuple) and all(isinstance(item, str) for item in spec):
        items = list(spec)
    else:
        raise ValueError(f"hours for {where} must be like '09:00-18:00', '24h' or 'closed'")
    pieces = [piece.strip() for item in items for piece in item.split(",")]
    pieces = [piece for piece in pieces if piece]
    if [piece.lower() for piece in pieces] in ([], ["closed"]):
        return ()
    shifts = sorted(_parse_shift(piece) for piece in pieces)
    merged: list[tuple[int, int]] = [shifts[0]]
    for start, end in shifts[1:]:
        prev_start, prev_end = merged[-1]
        if start < prev_end:
            raise ValueError(
                f"shifts overlap on {where}: {_format_shift(merged[-1])} "
                f"and {_format_shift((start, end))}"
            )
        if start == prev_end:
            # Touching shifts are one shift; merging keeps equal calendars equal.
            merged[-1] = (prev_start, end)
        else:
            merged.append((start, end))
    return tuple(merged)


def _parse_shift(text: str) -> tuple[int, int]:
    if text.lower() == "24h":
        return (0, _DAY_MINUTES)
    ends = text.split("-")
    if len(ends) != 2:
        raise ValueError(f"{text!r} is not a shift HH:MM-HH:MM")
    start, end = (_parse_time(part.strip()) for part in ends)
    if start >= end:
        raise ValueError(f"{text!r} must end after it starts (split overnight hours at 24:00)")
    return (start, end)


def _parse_time(text: str) -> int:
    """Minutes since midnight; "24:00" is allowed so that a shift can run to the end of day."""
    match = _TIME.fullmatch(text)
    if match is None:
        raise ValueError(f"{text!r} is not a time HH:MM")
    hour, minute = int(match[1]), int(match[2])
    if minute > 59 or hour * 60 + minute > _DAY_MINUTES:
        raise ValueError(f"{text!r} is not a time HH:MM")
    return hour * 60 + minute


def _format_shift(shift: tuple[int, int]) -> str:
    return "-".join(f"{minute // 60:02d}:{minute % 60:02d}" for minute in shift)


def _check_week(hours: object) -> tuple[Shifts, ...]:
    """Validate hours handed to Calendar directly (parse_hours output always passes), and turn
    lists into tuples so the calendar stays hashable."""
    if not isinstance(hours, tuple | list) or len(hours) != len(WEEKDAYS):
        raise ValueError("hours must have 7 entries, Monday..Sunday")
    week = []
    for name, day in zip(WEEKDAYS, hours, strict=True):
        shifts = tuple((int(start), int(end)) for start, end in day)
        previous_end = 0
        for start, end in shifts:
            if not previous_end <= start < end <= _DAY_MINUTES:
                raise ValueError(f"bad shifts on {name}: {shifts!r}")
            previous_end = end
        week.append(shifts)
    if not any(week):
        raise ValueError("no open hours in the week")
    return tuple(week)


# --- holidays ---------------------------------------------------------------------------------


def holiday_checker(
    country: str | None, subdivision: str | None = None, dates: Iterable[date] = ()
) -> Callable[[date], bool]:
    """True on public holidays of the country (and subdivision), plus the listed dates.

    The country code is case-insensitive ("BE"); the subdivision is passed to the `holidays`
    package as given ("CT") and ignored without a country. An unknown country or subdivision
    raises ValueError now, not on the first lookup. The result is hashable, comparable and
    picklable, so calendars built from equal settings are equal.
    """
    extra = frozenset(dates)
    for day in extra:
        # A datetime is a date, but never equal to one: it would silently never match.
        if not isinstance(day, date) or isinstance(day, datetime):
            raise ValueError(f"holiday {day!r} is not a date")
    if country is None:
        # No country means no public holidays, so a subdivision has nothing to refine.
        return HolidayChecker(None, None, extra)
    code = country.strip().upper()
    _country_holidays(code, subdivision)  # fail early on unknown codes
    return HolidayChecker(code, subdivision, extra)


@dataclass(frozen=True)
class HolidayChecker:
    """Callable made by holiday_checker; a class rather than a closure so it pickles and
    compares by value."""

    country: str | None
    subdivision: str | None
    dates: frozenset[date]

    def __call__(self, day: date) -> bool:
        if day in self.dates:
            return True
        if self.country is None:
            return False
        table, lock = _country_holidays(self.country, self.subdivision)
        # The package fills in a year on its first lookup, marking the year done before filling
        # it: without the lock a concurrent lookup could miss a holiday.
        with lock:
            return day in table


@functools.cache  # lru_cache without a bound: one entry per configured region
def _country_holidays(
    country: str, subdivision: str | None
) -> tuple[holidays.HolidayBase, threading.Lock]:
    """One (lazily expanding) holiday table per country and subdivision, shared by calendars."""
    try:
        table = holidays.country_holidays(country, subdiv=subdivision)
    except NotImplementedError as error:
        known = holidays.list_supported_countries()
        if country not in known:
            raise ValueError(f"unknown holiday country {country!r}") from error
        raise ValueError(
            f"unknown holiday subdivision {subdivision!r} for country {country!r}"
            f" (known: {', '.join(known[country]) or 'none'})"
        ) from error
    return table, threading.Lock()


def no_holidays(day: date) -> bool:
    """The default holiday rule: there are none."""
    return False


# --- calendar ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Calendar:
    """Weekly opening hours in a timezone, minus holidays."""

    timezone: tzinfo
    hours: tuple[Shifts, ...]  # 7 entries, Monday..Sunday
    is_holiday: Callable[[date], bool] = no_holidays
    # The shifts as offsets from local midnight, computed once for the hot loop.
    _windows: tuple[tuple[tuple[timedelta, timedelta], ...], ...] = field(
        init=False, repr=False, compare=False
    )

    def __post_init__(self) -> None:
        if not isinstance(self.timezone, tzinfo):
            raise TypeError(f"timezone must be a tzinfo, not {self.timezone!r}")
        hours = _check_week(self.hours)
        windows = tuple(
            tuple((timedelta(minutes=start), timedelta(minutes=end)) for start, end in day)
            for day in hours
        )
        # Frozen dataclass: assigning through object is the documented way in __post_init__.
        object.__setattr__(self, "hours", hours)
        object.__setattr__(self, "_windows", windows)

    @classmethod
    def always_open(cls, timezone: tzinfo = UTC) -> Calendar:
        """24/7, no holidays: business time is plain elapsed time."""
        return cls(timezone, (_ALL_DAY,) * len(WEEKDAYS))

    def add(self, start: datetime, span: timedelta) -> datetime:
        """The earliest instant u >= start with between(start, u) == span, in UTC.

        So a span that uses up a shift exactly ends at its close, not at the next opening.
        Raises ValueError if span < 0, or if the calendar has no business time for ~10 years.
        """
        if span < timedelta(0):
            raise ValueError(f"cannot add a negative span {span}")
        remaining = span
        begin = _naive_utc(start, "start")
        if not remaining:
            return begin.replace(tzinfo=UTC)
        for open_, close in self._spans(begin, None):
            if remaining <= close - open_:
                return (open_ + remaining).replace(tzinfo=UTC)
            remaining -= close - open_
        raise AssertionError("unreachable: _spans without a stop never ends")

    def between(self, start: datetime, end: datetime) -> timedelta:
        """Business time in [start, end); timedelta(0) if end <= start."""
        begin, stop = _naive_utc(start, "start"), _naive_utc(end, "end")
        total = timedelta(0)
        if stop <= begin:
            return total
        for open_, close in self._spans(begin, stop):
            if open_ >= stop:
                break
            total += min(close, stop) - open_
        return total

    def is_open(self, instant: datetime) -> bool:
        """Whether instant (aware) is business time; the definition, applied directly."""
        _naive_utc(instant, "instant")  # only for the aware check
        local = instant.astimezone(self.timezone)
        if self.is_holiday(local.date()):
            return False
        since_midnight = local - datetime.combine(local.date(), time(), local.tzinfo)
        shifts = self._windows[local.weekday()]
        return any(open_ <= since_midnight < close for open_, close in shifts)

    def day_length(self) -> timedelta:
        """Average open time of the weekdays that have hours (9 h for Mon-Fri 09:00-18:00,
        24 h for 24/7): what a 'business day' means in SLA targets. Ignores DST and holidays."""
        open_days = [day for day in self.hours if day]
        minutes = sum(end - start for day in open_days for start, end in day)
        return timedelta(minutes=minutes) / len(open_days)

    # The engine. Instants are naive UTC datetimes internally: cheaper arithmetic, no ambiguity.

    def _spans(self, begin: datetime, stop: datetime | None) -> Iterator[tuple[datetime, datetime]]:
        """Business spans [open, close), in order, none starting before begin.

        With stop, the scan ends once past stop. Without, it goes on forever, unless it finds no
        business time for _GIVE_UP, which raises ValueError.
        """
        last_found = begin
        for seg_begin, seg_end, offset in self._segments(begin):
            if stop is not None and seg_begin >= stop:
                return
            # Within the segment wall time is utc + offset: intersect each local day's shifts
            # with the segment's wall range and shift back to UTC.
            wall_begin, wall_end = seg_begin + offset, seg_end + offset
            day = wall_begin.date()
            midnight = datetime.combine(day, time())
            while midnight < wall_end:
                if not self.is_holiday(day):
                    for open_, close in self._windows[day.weekday()]:
                        lo = max(midnight + open_, wall_begin)
                        hi = min(midnight + close, wall_end)
                        if lo < hi:
                            last_found = hi - offset
                            yield lo - offset, hi - offset
                day += _ONE_DAY
                midnight += _ONE_DAY
            if stop is None and seg_end - last_found > _GIVE_UP:
                raise ValueError(
                    f"no business time in the 10 years after {last_found:%Y-%m-%d %H:%M} UTC:"
                    " check the calendar's hours and holidays"
                )

    def _segments(self, begin: datetime) -> Iterator[tuple[datetime, datetime, timedelta]]:
        """Consecutive [begin, end) pieces of the UTC timeline from begin on, each with one UTC
        offset, each at most _CHUNK long."""
        offset = self._offset(begin)
        # Chunk ends fall on whole seconds, as tzdata transitions do, so that the bisection
        # below lands exactly on a transition.
        end = begin.replace(microsecond=0) + _CHUNK
        while True:
            end_offset = self._offset(end)
            if end_offset != offset:
                # Bisect for the transition: offset(lo) is the old offset, offset(hi) the new.
                lo, hi = begin.replace(microsecond=0), end
                while hi - lo > _ONE_SECOND:
                    middle = lo + (hi - lo) // _ONE_SECOND // 2 * _ONE_SECOND
                    if self._offset(middle) == offset:
                        lo = middle
                    else:
                        hi = middle
                end = hi
                end_offset = self._offset(end)
            yield begin, end, offset
            begin, offset = end, end_offset
            end = begin + _CHUNK

    def _offset(self, utc: datetime) -> timedelta:
        """UTC offset of the calendar's timezone at a naive UTC instant."""
        offset = utc.replace(tzinfo=UTC).astimezone(self.timezone).utcoffset()
        if offset is None:
            raise ValueError(f"timezone {self.timezone!r} gives no UTC offset")
        return offset


def _naive_utc(instant: datetime, name: str) -> datetime:
    if instant.tzinfo is None or instant.utcoffset() is None:
        raise ValueError(f"{name} must be a timezone-aware datetime, got {instant!r}")
    return instant.astimezone(UTC).replace(tzinfo=None)
