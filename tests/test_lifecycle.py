"""The lifecycle's decisions, as plain functions: commands planned, business days counted."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from mailgate.tickets.commands import read_commands
from mailgate.tickets.lifecycle import (
    TicketState,
    add_business_days,
    plan_commands,
    status_after_customer_reply,
    status_after_staff_reply,
)

STATE = TicketState("open", "P3", False, "L1", None, ())
STAFF = {"bob@support.example", "zoe@support.example"}
CONTACTS = {"carol@acme.example"}


def plan(text: str, state: TicketState = STATE):  # noqa: ANN201 - a Plan
    mail = read_commands(text)
    assert mail.problems == ()
    return plan_commands(state, mail.commands, actor="bob@support.example", staff=STAFF,
                         contacts=CONTACTS)  # fmt: skip


def test_commands_become_changes_with_their_lines() -> None:
    result = plan("/priority P1\n/assign me\n/cc carol@acme.example\n/spend 1h30\n/spend 15m\n")
    assert [(c.field, c.old, c.new, c.line) for c in result.changes] == [
        ("priority", "P3", "P1", 1),
        ("assignee", None, "bob@support.example", 2),
        ("cc", None, "carol@acme.example", 3),
    ]
    assert result.spent_minutes == (90, 15)
    assert result.problems == ()


def test_a_command_that_changes_nothing_records_nothing() -> None:
    assert plan("/status open\n/priority P3\n").changes == ()


def test_one_bad_value_refuses_the_whole_plan() -> None:
    result = plan("/priority P1\n/assign nobody@support.example\n/cc hank@globex.example\n")
    assert result.changes == () and result.spent_minutes == ()
    assert [(p.line, "staff" in p.reason or "contact" in p.reason) for p in result.problems] == [
        (2, True),
        (3, True),
    ]
    assert result.state == STATE


@pytest.mark.parametrize(
    ("status", "after"),
    [("waiting_customer", "open"), ("resolved", "open"), ("open", None), ("new", None),
     ("closed", None)],
)  # fmt: skip
def test_a_customer_reply_puts_the_ticket_back_in_front_of_staff(status: str, after: str) -> None:
    assert status_after_customer_reply(status) == after


@pytest.mark.parametrize(
    ("status", "configured", "after"),
    [("new", "open", "open"), ("open", "open", None), ("new", "waiting_customer",
     "waiting_customer"), ("open", "waiting_customer", "waiting_customer"),
     ("resolved", "open", None)],
)  # fmt: skip
def test_a_public_staff_reply(status: str, configured: str, after: str | None) -> None:
    assert status_after_staff_reply(status, configured) == after


@pytest.mark.parametrize(
    ("start", "days", "expected"),
    [
        ("2026-11-23T10:00", 3, "2026-11-26T10:00"),  # Monday + 3 = Thursday
        ("2026-11-26T10:00", 4, "2026-12-02T10:00"),  # Thursday + 4 skips the weekend
        ("2026-11-28T10:00", 1, "2026-12-01T00:00"),  # Saturday counts from Monday 00:00
        ("2026-11-27T23:30", 1, "2026-11-30T23:30"),  # Friday night, Brussels time
    ],
)
def test_business_days_skip_weekends_in_the_organisations_time_zone(
    start: str, days: int, expected: str
) -> None:
    from zoneinfo import ZoneInfo

    zone = ZoneInfo("Europe/Brussels")
    begin = datetime.fromisoformat(start).replace(tzinfo=zone).astimezone(UTC)
    result = add_business_days(begin, days, "Europe/Brussels")
    assert result.astimezone(zone).replace(tzinfo=None) == datetime.fromisoformat(expected)
    assert result.tzinfo == UTC


def test_business_days_across_a_daylight_saving_change_keep_the_local_time() -> None:
    # Friday 23 Oct 2026 09:00 in Brussels (UTC+2); the clocks go back on Sunday 25 Oct.
    begin = datetime(2026, 10, 23, 7, 0, tzinfo=UTC)
    assert add_business_days(begin, 1, "Europe/Brussels") == datetime(2026, 10, 26, 8, 0,
                                                                      tzinfo=UTC)  # fmt: skip
