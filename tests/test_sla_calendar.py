"""Business-time arithmetic: examples, DST, holidays, hours parsing, and properties checked
against a brute-force minute-by-minute oracle."""

from __future__ import annotations

import functools
import pickle
from dataclasses import dataclass
from datetime import UTC, date, datetime, time, timedelta, tzinfo
from zoneinfo import ZoneInfo

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mailgate.sla.calendar import (
    WEEKDAYS,
    Calendar,
    Shifts,
    holiday_checker,
    no_holidays,
    parse_hours,
)

BRUSSELS = ZoneInfo("Europe/Brussels")
NEW_YORK = ZoneInfo("America/New_York")
MADRID = ZoneInfo("Europe/Madrid")
SANTIAGO = ZoneInfo("America/Santiago")
OFFICE = parse_hours({"mon-fri": "09:00-18:00"})
SPLIT = parse_hours({"mon-fri": "09:00-12:00, 14:00-18:00"})
MINUTE = timedelta(minutes=1)
HOUR = timedelta(hours=1)


def local(tz: tzinfo, *args: int) -> datetime:
    return datetime(*args, tzinfo=tz)


# --- examples ---------------------------------------------------------------------------------


def test_friday_evening_plus_an_hour_is_monday_morning() -> None:
    cal = Calendar(BRUSSELS, OFFICE)
    result = cal.add(local(BRUSSELS, 2026, 11, 27, 17, 30), HOUR)
    assert result == local(BRUSSELS, 2026, 11, 30, 9, 30)
    assert result.tzinfo is UTC


def test_a_span_that_uses_up_a_shift_ends_at_the_close() -> None:
    cal = Calendar(BRUSSELS, OFFICE)
    assert cal.add(local(BRUSSELS, 2026, 11, 27, 17), HOUR) == local(BRUSSELS, 2026, 11, 27, 18)


def test_adding_nothing_returns_start_in_utc_even_when_closed() -> None:
    cal = Calendar(BRUSSELS, OFFICE)
    saturday = local(BRUSSELS, 2026, 11, 28, 12, 0, 7)
    result = cal.add(saturday, timedelta(0))
    assert result == saturday
    assert result.tzinfo is UTC


@pytest.mark.parametrize(
    ("start", "expected"),
    [
        (local(BRUSSELS, 2026, 11, 28, 11), local(BRUSSELS, 2026, 11, 30, 10)),  # Saturday
        (local(BRUSSELS, 2026, 11, 24, 7), local(BRUSSELS, 2026, 11, 24, 10)),  # before opening
        (local(BRUSSELS, 2026, 11, 24, 12, 30), local(BRUSSELS, 2026, 11, 24, 15)),  # lunch
        (local(BRUSSELS, 2026, 11, 24, 19), local(BRUSSELS, 2026, 11, 25, 10)),  # after close
    ],
)
def test_start_outside_hours_adds_from_the_next_opening(
    start: datetime, expected: datetime
) -> None:
    assert Calendar(BRUSSELS, SPLIT).add(start, HOUR) == expected


def test_split_shifts() -> None:
    cal = Calendar(BRUSSELS, SPLIT)
    tuesday = functools.partial(local, BRUSSELS, 2026, 11, 24)
    assert cal.add(tuesday(11, 30), HOUR) == tuesday(14, 30)
    assert cal.between(tuesday(11), tuesday(15)) == 2 * HOUR
    assert cal.is_open(tuesday(11, 59, 59))
    assert not cal.is_open(tuesday(12))
    assert cal.is_open(tuesday(14))
    assert not cal.is_open(tuesday(18))


def test_between_is_zero_for_empty_or_reversed_ranges() -> None:
    cal = Calendar(BRUSSELS, OFFICE)
    a, b = local(BRUSSELS, 2026, 11, 24, 10), local(BRUSSELS, 2026, 11, 24, 12)
    assert cal.between(a, b) == 2 * HOUR
    assert cal.between(b, a) == timedelta(0)
    assert cal.between(a, a) == timedelta(0)


def test_microseconds_are_kept() -> None:
    cal = Calendar(BRUSSELS, OFFICE)
    start = local(BRUSSELS, 2026, 11, 24, 17, 59, 59, 999_999)
    assert cal.add(start, timedelta(microseconds=2)) == local(BRUSSELS, 2026, 11, 25, 9, 0, 0, 1)
    assert cal.between(start, local(BRUSSELS, 2026, 11, 25, 9, 0, 0, 1)) == timedelta(
        microseconds=2
    )


def test_always_open_is_plain_elapsed_time() -> None:
    cal = Calendar.always_open()
    assert cal == Calendar(UTC, parse_hours("24/7"))
    start = datetime(2026, 3, 29, 0, 50, 13, tzinfo=UTC)
    assert cal.add(start, 15 * MINUTE) == start + 15 * MINUTE
    assert cal.day_length() == timedelta(hours=24)


@settings(max_examples=200, deadline=None)
@given(
    tz=st.sampled_from([UTC, BRUSSELS, NEW_YORK, ZoneInfo("Australia/Lord_Howe"), SANTIAGO]),
    start=st.datetimes(datetime(2025, 1, 1), datetime(2027, 12, 31), timezones=st.just(UTC)),
    minutes=st.integers(0, 5000),
)
def test_always_open_adds_exactly(tz: tzinfo, start: datetime, minutes: int) -> None:
    cal = Calendar.always_open(tz)
    assert cal.add(start, 15 * MINUTE) == start + 15 * MINUTE
    assert cal.between(start, start + minutes * MINUTE) == minutes * MINUTE


def test_day_length_is_the_average_open_day() -> None:
    assert Calendar(BRUSSELS, OFFICE).day_length() == timedelta(hours=9)
    assert Calendar(BRUSSELS, SPLIT).day_length() == timedelta(hours=7)
    uneven = parse_hours({"mon-thu": "09:00-18:00", "fri": "09:00-13:00"})
    assert Calendar(BRUSSELS, uneven).day_length() == timedelta(hours=(4 * 9 + 4) / 5)


def test_negative_span_and_naive_datetimes_are_refused() -> None:
    cal = Calendar(BRUSSELS, OFFICE)
    aware = local(BRUSSELS, 2026, 11, 24, 10)
    with pytest.raises(ValueError, match="negative"):
        cal.add(aware, -MINUTE)
    with pytest.raises(ValueError, match="timezone-aware"):
        cal.add(datetime(2026, 11, 24, 10), HOUR)
    with pytest.raises(ValueError, match="timezone-aware"):
        cal.between(aware, datetime(2026, 11, 24, 12))
    with pytest.raises(ValueError, match="timezone-aware"):
        cal.is_open(datetime(2026, 11, 24, 12))


def test_a_calendar_that_never_opens_fails_instead_of_looping() -> None:
    cal = Calendar(BRUSSELS, OFFICE, lambda day: True)
    start = local(BRUSSELS, 2026, 11, 24, 10)
    with pytest.raises(ValueError, match="no business time"):
        cal.add(start, MINUTE)
    assert cal.between(start, start + timedelta(days=400)) == timedelta(0)
    assert cal.add(start, timedelta(0)) == start


def test_a_sparse_calendar_still_adds_far_ahead() -> None:
    # One hour a week, and a holiday-free year: 100 hours is nearly two years away, beyond
    # any one-year window but well inside the never-opens guard.
    cal = Calendar(UTC, parse_hours({"wed": "10:00-11:00"}))
    start = datetime(2026, 1, 1, tzinfo=UTC)
    result = cal.add(start, 100 * HOUR)
    hundredth_wednesday = date(2026, 1, 7) + timedelta(weeks=99)
    assert result == datetime.combine(hundredth_wednesday, time(11), UTC)
    assert cal.between(start, result) == 100 * HOUR


def test_calendars_are_values() -> None:
    one = Calendar(BRUSSELS, OFFICE, holiday_checker("BE", dates=[date(2026, 12, 24)]))
    two = Calendar(BRUSSELS, OFFICE, holiday_checker("be", dates=[date(2026, 12, 24)]))
    assert one == two
    assert hash(one) == hash(two)
    assert pickle.loads(pickle.dumps(one)) == one
    assert Calendar(BRUSSELS, OFFICE) != one
    assert Calendar(BRUSSELS, OFFICE).is_holiday is no_holidays


def test_calendar_checks_hours_given_directly() -> None:
    listed = Calendar(UTC, [[(540, 1080)]] * 5 + [[], []])  # type: ignore[arg-type]
    assert listed.hours == OFFICE
    with pytest.raises(ValueError, match="7 entries"):
        Calendar(UTC, OFFICE[:6])
    with pytest.raises(ValueError, match="bad shifts on tue"):
        Calendar(UTC, ((), ((600, 700), (650, 800)), (), (), (), (), ()))
    with pytest.raises(ValueError, match="bad shifts on mon"):
        Calendar(UTC, (((0, 1441),), (), (), (), (), (), ()))
    with pytest.raises(ValueError, match="no open hours"):
        Calendar(UTC, ((),) * 7)


# --- DST --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("tz", "day", "length"),
    [
        (BRUSSELS, date(2026, 3, 29), 23),
        (BRUSSELS, date(2026, 10, 25), 25),
        (NEW_YORK, date(2026, 3, 8), 23),
        (NEW_YORK, date(2026, 11, 1), 25),
        # Santiago changes at local midnight: the repeated hour is Saturday's last.
        (SANTIAGO, date(2026, 4, 4), 25),
        (SANTIAGO, date(2026, 9, 6), 23),
    ],
)
def test_24_7_days_around_dst_changes(tz: ZoneInfo, day: date, length: int) -> None:
    cal = Calendar.always_open(tz)
    midnight = datetime(day.year, day.month, day.day, tzinfo=tz)
    next_midnight = datetime.combine(day + timedelta(days=1), midnight.time(), tz)
    assert cal.between(midnight, next_midnight) == timedelta(hours=length)
    assert cal.add(midnight, timedelta(hours=length)) == next_midnight
    # The same through a calendar whose only open day is that weekday, all day long.
    week: list[Shifts] = [()] * 7
    week[day.weekday()] = ((0, 1440),)
    one_day = Calendar(tz, tuple(week))
    start_of_week = midnight - timedelta(days=day.weekday())
    assert one_day.between(start_of_week, start_of_week + timedelta(days=7)) == timedelta(
        hours=length
    )


@pytest.mark.parametrize(
    ("tz", "friday", "monday", "new_offset"),
    [
        (BRUSSELS, date(2026, 3, 27), date(2026, 3, 30), 2),
        (BRUSSELS, date(2026, 10, 23), date(2026, 10, 26), 1),
        (NEW_YORK, date(2026, 3, 6), date(2026, 3, 9), -4),
        (NEW_YORK, date(2026, 10, 30), date(2026, 11, 2), -5),
    ],
)
def test_office_hours_over_a_dst_weekend(
    tz: ZoneInfo, friday: date, monday: date, new_offset: int
) -> None:
    cal = Calendar(tz, OFFICE)
    start = datetime(friday.year, friday.month, friday.day, 17, tzinfo=tz)
    result = cal.add(start, 2 * HOUR)
    expected = datetime(monday.year, monday.month, monday.day, 10, tzinfo=tz)
    assert result == expected
    assert result.astimezone(tz).utcoffset() == timedelta(hours=new_offset)
    utc_wall = datetime(monday.year, monday.month, monday.day, 10, tzinfo=UTC)
    assert result == utc_wall - timedelta(hours=new_offset)
    assert cal.between(start, result) == 2 * HOUR


def test_a_shift_inside_the_changed_hour() -> None:
    # Open only 02:00-03:00 on Sundays: that wall hour never happens in spring, twice in autumn.
    cal = Calendar(BRUSSELS, parse_hours({"sun": "02:00-03:00"}))
    spring = local(BRUSSELS, 2026, 3, 28)
    autumn = local(BRUSSELS, 2026, 10, 24)
    assert cal.between(spring, spring + timedelta(days=2)) == timedelta(0)
    assert cal.between(autumn, autumn + timedelta(days=2)) == 2 * HOUR
    # The first 90 minutes: all of the first pass (CEST) and half of the second (CET).
    assert cal.add(autumn, 90 * MINUTE) == datetime(2026, 10, 25, 1, 30, tzinfo=UTC)
    assert cal.add(spring, HOUR) == datetime(2026, 4, 5, 1, tzinfo=UTC)  # next Sunday, CEST


# --- holidays ---------------------------------------------------------------------------------


def test_belgian_armistice_day_is_skipped() -> None:
    cal = Calendar(BRUSSELS, OFFICE, holiday_checker("BE"))
    result = cal.add(local(BRUSSELS, 2026, 11, 10, 17), 2 * HOUR)
    assert result == local(BRUSSELS, 2026, 11, 12, 10)
    assert not cal.is_open(local(BRUSSELS, 2026, 11, 11, 10))
    assert cal.is_open(local(BRUSSELS, 2026, 11, 12, 10))
    # Without the holidays, Wednesday counts.
    plain = Calendar(BRUSSELS, OFFICE)
    assert plain.add(local(BRUSSELS, 2026, 11, 10, 17), 2 * HOUR) == local(
        BRUSSELS, 2026, 11, 11, 10
    )


def test_listed_dates_are_holidays_too() -> None:
    extra = holiday_checker(None, dates=[date(2026, 11, 30)])
    cal = Calendar(BRUSSELS, OFFICE, extra)
    assert cal.add(local(BRUSSELS, 2026, 11, 27, 17, 30), HOUR) == local(
        BRUSSELS, 2026, 12, 1, 9, 30
    )
    both = holiday_checker("BE", dates=[date(2026, 11, 12)])
    assert both(date(2026, 11, 11))
    assert both(date(2026, 11, 12))
    assert not both(date(2026, 11, 13))
    cal = Calendar(BRUSSELS, OFFICE, both)
    assert cal.add(local(BRUSSELS, 2026, 11, 10, 17), 2 * HOUR) == local(BRUSSELS, 2026, 11, 13, 10)


def test_subdivision_holidays() -> None:
    thursday = local(MADRID, 2026, 9, 10, 17)
    catalonia = Calendar(MADRID, OFFICE, holiday_checker("ES", "CT"))
    madrid = Calendar(MADRID, OFFICE, holiday_checker("ES", "MD"))
    assert catalonia.add(thursday, 2 * HOUR) == local(MADRID, 2026, 9, 14, 10)
    assert madrid.add(thursday, 2 * HOUR) == local(MADRID, 2026, 9, 11, 10)


def test_holidays_expand_to_any_year() -> None:
    belgium = holiday_checker("BE")
    assert belgium(date(2031, 7, 21))  # National Day
    assert belgium(date(2019, 11, 11))
    assert not belgium(date(2031, 7, 22))


def test_unknown_holiday_regions() -> None:
    with pytest.raises(ValueError, match="unknown holiday country 'XX'"):
        holiday_checker("XX")
    with pytest.raises(ValueError, match=r"unknown holiday subdivision 'ZZ' for country 'ES'.*CT"):
        holiday_checker("ES", "ZZ")
    # Without a country there are no public holidays to refine: only the listed dates count.
    assert holiday_checker(None, "CT") == holiday_checker(None)
    assert not holiday_checker(None, "CT")(date(2026, 9, 11))
    with pytest.raises(ValueError, match="is not a date"):
        holiday_checker(None, dates=[datetime(2026, 12, 24)])


# --- parse_hours ------------------------------------------------------------------------------


def week(**days: Shifts) -> tuple[Shifts, ...]:
    return tuple(days.get(name, ()) for name in WEEKDAYS)


NINE_TO_SIX = ((540, 1080),)


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("24/7", (((0, 1440),),) * 7),
        (" 24/7 ", (((0, 1440),),) * 7),
        ({"mon-fri": "09:00-18:00"}, week(**dict.fromkeys(WEEKDAYS[:5], NINE_TO_SIX))),
        (
            {"mon-fri": "09:00-18:00", "fri": "09:00-16:00"},
            week(**dict.fromkeys(WEEKDAYS[:4], NINE_TO_SIX), fri=((540, 960),)),
        ),
        ({"tue": "09:00-12:30, 13:30-18:00"}, week(tue=((540, 750), (810, 1080)))),
        ({"tue": ["13:30-18:00", "9:00-12:30"]}, week(tue=((540, 750), (810, 1080)))),
        ({"wed": "24h"}, week(wed=((0, 1440),))),
        ({"wed": "00:00-24:00"}, week(wed=((0, 1440),))),
        ({"wed": "20:00-24:00"}, week(wed=((1200, 1440),))),
        ({"wed": "09:00-12:00,12:00-13:00"}, week(wed=((540, 780),))),  # touching: merged
        ({"mon-sun": "24h", "sat-sun": None}, week(**dict.fromkeys(WEEKDAYS[:5], ((0, 1440),)))),
        (
            {"mon-sun": "24h", "sat": "closed", "sun": False},
            week(**dict.fromkeys(WEEKDAYS[:5], ((0, 1440),))),
        ),
        (
            {"sun-thu": "08:00-17:00"},
            week(**dict.fromkeys(("sun", "mon", "tue", "wed", "thu"), ((480, 1020),))),
        ),
        ({" Mon ": "09:00 - 18:00"}, week(mon=NINE_TO_SIX)),
        ({"mon-mon": "09:00-18:00"}, week(mon=NINE_TO_SIX)),
    ],
)
def test_parse_hours(value: object, expected: tuple[Shifts, ...]) -> None:
    assert parse_hours(value) == expected  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ({"mon": "25:00-26:00"}, "'25:00' is not a time HH:MM"),
        ({"mon": "09:00-18:60"}, "'18:60' is not a time HH:MM"),
        ({"mon": "09:00-24:01"}, "'24:01' is not a time HH:MM"),
        ({"mon": "9h-18h"}, "'9h' is not a time HH:MM"),
        ({"mon": "09:00"}, "'09:00' is not a shift HH:MM-HH:MM"),
        ({"mon": "09:00-12:00-18:00"}, "'09:00-12:00-18:00' is not a shift HH:MM-HH:MM"),
        ({"mon": "22:00-06:00"}, "'22:00-06:00' must end after it starts"),
        ({"mon": "09:00-09:00"}, "'09:00-09:00' must end after it starts"),
        (
            {"tue": "09:00-13:00, 12:00-18:00"},
            "shifts overlap on tue: 09:00-13:00 and 12:00-18:00",
        ),
        ({"mon-fri": ["12:00-18:00", "9:00-13:00"]}, "shifts overlap on mon-fri: 09:00-13:00"),
        ({"mun": "09:00-18:00"}, "'mun' is not a weekday (mon..sun)"),
        ({"mon-fry": "09:00-18:00"}, "'fry' is not a weekday (mon..sun)"),
        ({"mon-wed-fri": "09:00-18:00"}, "'mon-wed-fri' is not a weekday or a range"),
        ({1: "09:00-18:00"}, "1 is not a weekday (mon..sun)"),
        ({"mon": 9}, "hours for mon must be like '09:00-18:00'"),
        ({"mon": True}, "hours for mon must be like '09:00-18:00'"),
        ({"mon": "closed", "tue": None}, "no open hours in the week"),
        ({}, "no open hours in the week"),
        ("24/5", "'24/5' is not '24/7'"),
        (["mon"], "hours must be '24/7' or a mapping"),
    ],
)
def test_parse_hours_errors(value: object, message: str) -> None:
    with pytest.raises(ValueError) as raised:
        parse_hours(value)  # type: ignore[arg-type]
    assert str(raised.value).startswith(message)


# --- properties against a brute-force oracle --------------------------------------------------

ZONES = [
    ZoneInfo(name)
    for name in (
        "Europe/Brussels",
        "America/New_York",
        "Australia/Lord_Howe",
        "Asia/Kolkata",
        "UTC",
        "America/Santiago",
        "Europe/London",
    )
]


@functools.cache
def transitions_2026(tz: ZoneInfo) -> list[datetime]:
    """UTC instants in 2026 where tz's offset changes, to the minute (a scan, not the engine)."""
    found = []
    step = timedelta(hours=1)
    t = datetime(2026, 1, 1, tzinfo=UTC)
    while t.year == 2026:
        if t.astimezone(tz).utcoffset() != (t + step).astimezone(tz).utcoffset():
            before = t.astimezone(tz).utcoffset()
            change = t + MINUTE
            while change.astimezone(tz).utcoffset() == before:
                change += MINUTE
            found.append(change)
        t += step
    return found


def test_the_oracle_zones_do_change_offset() -> None:
    # Guards the bias below: tzdata really has the 2026 transitions the properties aim at.
    assert len(transitions_2026(ZoneInfo("Australia/Lord_Howe"))) == 2
    assert transitions_2026(ZoneInfo("Europe/Brussels")) == [
        datetime(2026, 3, 29, 1, tzinfo=UTC),
        datetime(2026, 10, 25, 1, tzinfo=UTC),
    ]
    assert transitions_2026(ZoneInfo("Asia/Kolkata")) == []


@dataclass(frozen=True)
class Scenario:
    tz: ZoneInfo
    hours: tuple[Shifts, ...]
    holidays: frozenset[date]
    start: datetime  # minute-aligned, UTC

    @property
    def calendar(self) -> Calendar:
        return Calendar(self.tz, self.hours, holiday_checker(None, dates=self.holidays))

    def oracle(self, a: datetime, b: datetime) -> timedelta:
        """Business time in [a, b), minute by minute, straight from the definition. Valid for
        minute-aligned a and b: every shift edge and 2026 offset in ZONES is whole minutes."""
        minutes = 0
        t = a
        while t < b:
            wall = t.astimezone(self.tz)
            if wall.date() not in self.holidays:
                minute_of_day = wall.hour * 60 + wall.minute + wall.second / 60
                shifts = self.hours[wall.weekday()]
                minutes += any(start <= minute_of_day < end for start, end in shifts)
            t += MINUTE
        return minutes * MINUTE


def _pairs(edges: list[int]) -> Shifts:
    edges = sorted(edges)[: len(edges) // 2 * 2]
    return tuple(zip(edges[::2], edges[1::2], strict=True))


# Edges at any minute, or on the half hour (where DST changes happen), including 0 and 24:00.
_edge = st.one_of(st.integers(0, 1440), st.integers(0, 48).map(lambda k: 30 * k))
day_shifts = st.one_of(
    st.just(()),
    st.just(((0, 1440),)),
    st.lists(_edge, min_size=2, max_size=10, unique=True).map(_pairs),
)


@st.composite
def scenarios(draw: st.DrawFn) -> Scenario:
    tz = draw(st.sampled_from(ZONES))
    hours = draw(st.tuples(*[day_shifts] * 7).filter(any))
    marks = transitions_2026(tz)
    if marks and draw(st.booleans()):
        # Up to a day before an offset change (or just after), so most spans cross it.
        start = draw(st.sampled_from(marks)) + draw(st.integers(-1440, 60)) * MINUTE
    else:
        start = datetime(2026, 1, 1, tzinfo=UTC) + draw(st.integers(0, 365 * 1440 - 1)) * MINUTE
    # Holidays near the start, where they matter.
    first_day = start.astimezone(tz).date()
    holidays = draw(st.frozensets(st.integers(-1, 12), max_size=5))
    return Scenario(
        tz, hours, frozenset(first_day + k * timedelta(days=1) for k in holidays), start
    )


PROPERTY = settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@PROPERTY
@given(scenario=scenarios(), minutes=st.integers(0, 3 * 1440))
def test_between_matches_the_oracle(scenario: Scenario, minutes: int) -> None:
    a = scenario.start
    b = a + minutes * MINUTE
    assert scenario.calendar.between(a, b) == scenario.oracle(a, b)


@PROPERTY
@given(scenario=scenarios(), minutes=st.integers(0, 3 * 1440))
def test_is_open_matches_the_oracle(scenario: Scenario, minutes: int) -> None:
    t = scenario.start + minutes * MINUTE
    assert scenario.calendar.is_open(t) == (scenario.oracle(t, t + MINUTE) == MINUTE)


@PROPERTY
@given(scenario=scenarios(), seconds=st.integers(0, 10 * 86400))
def test_add_is_exact_and_minimal(scenario: Scenario, seconds: int) -> None:
    cal = scenario.calendar
    a = scenario.start
    span = timedelta(seconds=seconds)
    u = cal.add(a, span)
    assert u >= a
    assert cal.between(a, u) == span
    if span:
        assert cal.between(a, u - timedelta(microseconds=1)) < span


@PROPERTY
@given(scenario=scenarios(), minutes=st.integers(1, 2 * 1440))
def test_add_matches_the_oracle(scenario: Scenario, minutes: int) -> None:
    cal = scenario.calendar
    a = scenario.start
    u = cal.add(a, minutes * MINUTE)
    if u - a <= timedelta(days=4):  # keep the brute force bounded
        assert scenario.oracle(a, u) == minutes * MINUTE
        assert scenario.oracle(a, u - MINUTE) == (minutes - 1) * MINUTE


@PROPERTY
@given(scenario=scenarios(), x=st.integers(0, 5 * 1440), y=st.integers(0, 5 * 1440))
def test_between_is_additive(scenario: Scenario, x: int, y: int) -> None:
    cal = scenario.calendar
    a = scenario.start
    b = a + x * MINUTE + timedelta(seconds=17)  # off the minute grid, for once
    c = b + y * MINUTE
    assert cal.between(a, b) + cal.between(b, c) == cal.between(a, c)
