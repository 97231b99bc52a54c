"""SLA clocks through the pipeline: deadlines, pauses, reminders, breaches, the report.

The shipped settings and directory: ACME (plan pro, Europe/Brussels, BE) on the
business calendar Mon-Fri 09:00-18:00. The test clock starts on Monday
23 November 2026 at 09:30 UTC, 10:30 in Brussels; "Cannot log in" is P1:
first response 1 h, workaround 2 h, resolution 8 business hours.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import threading
from datetime import UTC, datetime
from email.message import EmailMessage
from pathlib import Path

import pytest
import yaml
from sqlalchemy import func, select

from mailgate.app import App
from mailgate.config import load_settings
from mailgate.directory import sync_directory_if_changed
from mailgate.sla.clocks import clocks_of
from mailgate.sla.sweep import SlaSweepReport, sweep
from mailgate.store.models import OutboxMail, SlaClock, Ticket, TicketEvent
from tests.conftest import (
    NO_LOOP_LIMITS,
    Clockwork,
    Installation,
    make_mail,
    reply_to,
    staff_answer,
)

BOB = "Bob Durand <bob@support.example>"
LEAD = "lead@support.example"


def utc(day: int, hour: int, minute: int = 0) -> datetime:
    return datetime(2026, 11, day, hour, minute, tzinfo=UTC)


def clocks(inst: Installation, number: str) -> dict[str, SlaClock]:
    """The ticket's clocks for its priority now, as the sweep and the report see them."""
    with inst.session() as s:
        ticket = s.scalar(select(Ticket).where(Ticket.number == number))
        assert ticket is not None
        return {c.kind: c for c in clocks_of(s, ticket.id)}


def ticket(inst: Installation, number: str) -> Ticket:
    with inst.session() as s:
        found = s.scalar(select(Ticket).where(Ticket.number == number))
        assert found is not None
        return found


def staff_mail(inst: Installation) -> list[EmailMessage]:
    return [m for m in inst.sent() if "bob@support.example" in str(m["To"])]


def sla_mail(inst: Installation, kind: str) -> list[OutboxMail]:
    with inst.session() as s:
        return list(s.scalars(select(OutboxMail).where(OutboxMail.kind == kind)))


def bob_says(inst: Installation, body: str, message_id: str) -> None:
    result = inst.ingest(staff_answer(inst, body, message_id))
    assert result.outcome in ("threaded", "command"), result


@pytest.fixture
def escalating(install) -> Installation:  # noqa: ANN001 - the conftest factory
    return install({"sla": {"escalation_to": [LEAD]}})


def test_deadlines_are_computed_at_creation_in_business_hours(inst: Installation) -> None:
    number = inst.ingest(make_mail()).ticket
    got = clocks(inst, number)
    # 10:30 Brussels + 1 h; + 2 h; + 8 business hours = 7 h 30 on Monday, 30 min on Tuesday
    assert got["first_response"].due_at == utc(23, 10, 30)
    assert got["workaround"].due_at == utc(23, 11, 30)
    assert got["resolution"].due_at == utc(24, 8, 30)
    assert {c.calendar for c in got.values()} == {"business"}


def test_the_ack_states_the_targets_in_the_customers_language_and_zone(
    inst: Installation,
) -> None:
    inst.ingest(make_mail())
    ack = next(m for m in inst.sent() if m["To"] == "alice@acme.example")
    text = ack.get_body(("plain",)).get_content()
    assert "lundi 23 novembre à 11:30" in text  # first response, Brussels time, in French
    assert "mardi 24 novembre à 09:30" in text  # resolution
    html = ack.get_body(("html",)).get_content()
    assert "lundi 23 novembre à 11:30" in html


def test_enterprise_p1_is_answered_within_15_minutes_around_the_clock(
    inst: Installation, clock: Clockwork
) -> None:
    clock.now = datetime(2026, 11, 28, 22, 0, tzinfo=UTC)  # Saturday night
    mail = make_mail(sender="Hank Scorpio <hank@globex.example>", message_id="g1@globex.example")
    got = clocks(inst, inst.ingest(mail).ticket)
    assert got["first_response"].due_at == datetime(2026, 11, 28, 22, 15, tzinfo=UTC)
    assert got["first_response"].calendar == "24/7"
    # Only the first response runs around the clock (DESIGN.md's table): the
    # workaround and resolution wait for Monday 09:00 in London.
    assert got["workaround"].due_at == datetime(2026, 11, 30, 11, 0, tzinfo=UTC)
    assert got["resolution"].due_at == datetime(2026, 11, 30, 17, 0, tzinfo=UTC)
    assert got["workaround"].calendar == got["resolution"].calendar == "business"


def test_deadlines_skip_the_public_holidays_of_the_organisations_country(
    inst: Installation, clock: Clockwork
) -> None:
    """The business calendar names no country: each organisation brings its own.
    Wednesday 11 November is Armistice Day in Belgium (ACME), a working day in
    Great Britain (Globex)."""
    clock.now = datetime(2026, 11, 10, 16, 0, tzinfo=UTC)  # Tuesday 17:00 Brussels, 16:00 London
    acme = clocks(inst, inst.ingest(make_mail()).ticket)
    # 2 h: the last hour of Tuesday, then Thursday 09:00-10:00 Brussels.
    assert acme["workaround"].due_at == datetime(2026, 11, 12, 9, 0, tzinfo=UTC)
    mail = make_mail(sender="Hank Scorpio <hank@globex.example>", message_id="g1@globex.example")
    globex = clocks(inst, inst.ingest(mail).ticket)
    # 8 h: Tuesday 16:00-18:00, then Wednesday 09:00-15:00 London.
    assert globex["resolution"].due_at == datetime(2026, 11, 11, 15, 0, tzinfo=UTC)


def test_reminders_at_50_and_80_percent_then_breach_and_escalation(
    escalating: Installation, clock: Clockwork
) -> None:
    inst = escalating
    number = inst.ingest(make_mail()).ticket
    inst.sent()
    before = len(staff_mail(inst))

    def run(at: datetime) -> tuple[int, int]:
        clock.now = at  # the mail it queues is due at once
        report = sweep(inst.app, at)
        return report.reminders, report.breaches

    assert run(utc(23, 9, 59)) == (0, 0)  # before 50 % of the first response
    assert run(utc(23, 10, 0)) == (1, 0)  # 50 %: 30 min of 1 h
    assert run(utc(23, 10, 0)) == (0, 0)  # once
    assert run(utc(23, 10, 18)) == (1, 0)  # 80 %
    assert run(utc(23, 10, 30)) == (1, 1)  # first response breached; workaround at 50 %
    reminders = [m for m in staff_mail(inst)[before:] if "SLA" in str(m["Subject"])]
    # The share of the target used, and the deadline on the organisation's clock.
    assert sorted(str(m["Subject"]) for m in reminders) == [
        f"[{number}] SLA 50%: first response due Monday 23 November at 11:30 (Europe/Brussels)",
        f"[{number}] SLA 50%: workaround due Monday 23 November at 12:30 (Europe/Brussels)",
        f"[{number}] SLA 80%: first response due Monday 23 November at 11:30 (Europe/Brussels)",
        f"[{number}] SLA breached: first response – ACME Corp: Cannot log in",
    ]
    breach = next(m for m in reminders if "breach" in str(m["Subject"]).lower())
    assert number in str(breach["Subject"])
    assert breach["Auto-Submitted"] == "auto-generated"
    assert LEAD in str(breach["To"]), "the escalation list is told"
    # In the ticket's thread in staff's mail client, as the new-ticket notice is.
    for notice in reminders:
        assert notice["In-Reply-To"] == "<req-1@acme.example>"
        assert "<req-1@acme.example>" in notice["References"]
    assert ticket(inst, number).level == "L2"
    with inst.session() as s:
        event = s.scalar(select(TicketEvent).where(TicketEvent.field == "level"))
        assert event is not None and event.new == "L2" and "SLA breach" in event.reason
    assert clocks(inst, number)["first_response"].breached_at == utc(23, 10, 30)
    # the customer never hears about reminders
    assert not [m for m in inst.sent() if "SLA" in str(m["Subject"]) and "acme" in str(m["To"])]


def test_a_sweep_after_downtime_sends_only_the_most_serious_alert(inst: Installation) -> None:
    number = inst.ingest(make_mail()).ticket
    report = sweep(inst.app, utc(23, 10, 45))  # past 50 %, 80 % and 100 % of the first response
    assert report.breaches == 1
    kinds = [m.kind for m in sla_mail(inst, "sla_reminder") + sla_mail(inst, "sla_breach")]
    # the first response's breach, and the workaround's 50 % (1 h of 2 h at 10:30)
    assert sorted(kinds) == ["sla_breach", "sla_reminder"]
    assert clocks(inst, number)["first_response"].alerts_sent == 3


def test_a_sweep_after_downtime_past_80_percent_says_80_percent(
    inst: Installation, clock: Clockwork
) -> None:
    """The one reminder sent for two thresholds passed names the later one."""
    number = inst.ingest(make_mail()).ticket
    clock.now = utc(23, 10, 20)  # 50 min of the 1 h
    assert sweep(inst.app, clock.now) == SlaSweepReport(1, 0)
    (reminder,) = [m for m in staff_mail(inst) if "SLA" in str(m["Subject"])]
    assert str(reminder["Subject"]) == (
        f"[{number}] SLA 80%: first response due Monday 23 November at 11:30 (Europe/Brussels)"
    )
    assert clocks(inst, number)["first_response"].alerts_sent == 2


def test_the_first_public_staff_reply_stops_the_first_response_clock(
    inst: Installation, clock: Clockwork
) -> None:
    number = inst.ingest(make_mail()).ticket
    clock.now = utc(23, 9, 50)
    bob_says(inst, "/internal\nLooking into it.\n", "note@support.example")
    assert clocks(inst, number)["first_response"].stopped_at is None  # an internal note
    clock.now = utc(23, 10, 0)
    bob_says(inst, "Please clear your cache.\n", "b1@support.example")
    first = clocks(inst, number)["first_response"]
    assert first.stopped_at == utc(23, 10, 0)
    assert first.elapsed_seconds == 30 * 60
    assert first.next_alert_at is None
    assert sweep(inst.app, utc(23, 12, 0)).breaches == 1  # the workaround, not the response
    assert clocks(inst, number)["first_response"].breached_at is None


def test_workaround_command_stops_the_workaround_clock(
    inst: Installation, clock: Clockwork
) -> None:
    number = inst.ingest(make_mail()).ticket
    clock.now = utc(23, 10, 15)
    bob_says(inst, "/workaround\nUse the backup login page meanwhile.\n", "w1@support.example")
    got = clocks(inst, number)
    assert got["workaround"].stopped_at == utc(23, 10, 15)
    assert got["resolution"].stopped_at is None
    with inst.session() as s:  # in the history that tickets show lists
        event = s.scalar(select(TicketEvent).where(TicketEvent.field == "workaround"))
        assert event is not None and (event.new, event.actor) == ("given", "bob@support.example")


def test_waiting_on_the_customer_pauses_the_clock_and_extends_the_deadline(
    inst: Installation, clock: Clockwork
) -> None:
    original = make_mail()
    number = inst.ingest(original).ticket
    clock.now = utc(23, 11, 0)  # 12:00 Brussels: 1 h 30 of business time used
    bob_says(inst, "/status waiting\nWhich browser do you use?\n", "b1@support.example")
    resolution = clocks(inst, number)["resolution"]
    assert resolution.paused_at == utc(23, 11, 0)
    assert resolution.next_alert_at is None  # nothing is due while paused
    assert sweep(inst.app, utc(24, 8, 45)) == SlaSweepReport(0, 0)  # old deadline: quiet
    clock.now = utc(24, 9, 0)  # Tuesday 10:00 Brussels: the customer answers
    answer = reply_to(original, sender="Alice Martin <alice@acme.example>", message_id="a2@acme")
    answer.replace_header("To", "support@example.com")
    answer.replace_header("Subject", f"Re: [{number}] Cannot log in")
    assert inst.ingest(answer).outcome == "threaded"
    resolution = clocks(inst, number)["resolution"]
    assert resolution.paused_at is None
    # paused Monday 12:00-18:00 and Tuesday 09:00-10:00: 7 business hours
    assert resolution.paused_seconds == 7 * 3600
    # started Monday 10:30; 8 h + 7 h of business time: Tuesday 16:30 Brussels
    assert resolution.due_at == utc(24, 15, 30)


def test_a_target_added_while_waiting_on_the_customer_counts_the_whole_pause(
    inst: Installation, clock: Clockwork
) -> None:
    """P3 has no workaround target; raised to P1 while the ticket waits on the
    customer, the new workaround clock is paused since the wait began, not since
    the priority changed, so the customer's answer brings no breach with it."""
    original = make_mail(subject="Export question", body="How do I export?\n")
    number = inst.ingest(original).ticket
    clock.now = utc(23, 10, 0)  # 11:00 Brussels: 30 min of business time used
    bob_says(inst, "/status waiting\n", "b1@support.example")
    clock.now = utc(23, 12, 0)
    bob_says(inst, "/priority P1\n", "b2@support.example")
    clock.now = utc(23, 14, 0)  # 15:00: the customer answers after 4 h of waiting
    answer = reply_to(original, sender="Alice Martin <alice@acme.example>", message_id="a2@acme")
    answer.replace_header("To", "support@example.com")
    answer.replace_header("Subject", f"Re: [{number}] Export question")
    assert inst.ingest(answer).outcome == "threaded"
    workaround = clocks(inst, number)["workaround"]
    assert workaround.paused_seconds == clocks(inst, number)["resolution"].paused_seconds
    assert workaround.due_at == utc(23, 15, 30)  # 09:30 + 2 h + the 4 h waited
    assert sweep(inst.app, clock.now).breaches == 0
    assert sla_mail(inst, "sla_breach") == []


@pytest.mark.parametrize("first", ["P3", "P1"], ids=["added", "back"])
def test_a_workaround_target_set_after_a_wait_counts_the_wait(
    inst: Installation, clock: Clockwork, first: str
) -> None:
    """The customer answered before the ticket became P1: the workaround clock,
    added then (P3 has none) or back then (P1 lowered to P3 before the wait),
    counts the business time waited, as the resolution clock does."""
    subject = "Export question" if first == "P3" else "Cannot log in"
    original = make_mail(subject=subject, body="How do I export?\n")
    number = inst.ingest(original).ticket
    if first == "P1":
        clock.now = utc(23, 9, 40)
        bob_says(inst, "/priority P3\n", "b0@support.example")
    clock.now = utc(23, 10, 0)
    bob_says(inst, "/status waiting\n", "b1@support.example")
    clock.now = utc(23, 12, 0)  # the customer answers after 2 h of waiting
    answer = reply_to(original, sender="Alice Martin <alice@acme.example>", message_id="a2@acme")
    answer.replace_header("To", "support@example.com")
    answer.replace_header("Subject", f"Re: [{number}] {subject}")
    assert inst.ingest(answer).outcome == "threaded"
    clock.now = utc(23, 12, 30)
    bob_says(inst, "/priority P1\n", "b2@support.example")
    workaround = clocks(inst, number)["workaround"]
    assert workaround.paused_seconds == 2 * 3600
    assert workaround.due_at == utc(23, 13, 30)  # 09:30 + 2 h + the 2 h waited


def test_resolution_stops_at_resolved_and_a_reopening_resumes_it(
    inst: Installation, clock: Clockwork
) -> None:
    original = make_mail()
    number = inst.ingest(original).ticket
    clock.now = utc(23, 11, 30)  # 12:30 Brussels: 2 business hours used
    bob_says(inst, "/resolve\nFixed: the certificate was renewed.\n", "b1@support.example")
    resolution = clocks(inst, number)["resolution"]
    assert (resolution.stopped_at, resolution.elapsed_seconds) == (utc(23, 11, 30), 2 * 3600)
    clock.now = utc(23, 13, 30)  # 14:30: it broke again
    answer = reply_to(original, sender="Alice Martin <alice@acme.example>", message_id="a2@acme")
    answer.replace_header("Subject", f"Re: [{number}] Cannot log in")
    answer.replace_header("To", "support@example.com")
    assert inst.ingest(answer).outcome == "threaded"
    assert ticket(inst, number).status == "open"
    resolution = clocks(inst, number)["resolution"]
    assert resolution.stopped_at is None and resolution.elapsed_seconds is None
    assert resolution.paused_seconds == 2 * 3600  # the two hours it stayed resolved
    assert resolution.due_at == utc(24, 10, 30)  # Tuesday 09:30 + 2 h, Brussels
    assert clocks(inst, number)["first_response"].stopped_at == utc(23, 11, 30)  # stays stopped


def test_a_new_priority_recomputes_the_deadlines(inst: Installation, clock: Clockwork) -> None:
    number = inst.ingest(make_mail()).ticket
    clock.now = utc(23, 9, 40)
    bob_says(inst, "/priority P3\n", "b1@support.example")  # commands only: not a reply
    got = clocks(inst, number)
    assert got["first_response"].due_at == utc(23, 13, 30)  # 4 h from 10:30 Brussels
    assert "workaround" not in got  # P3 has no workaround target
    # 5 business days of 9 h from Monday 10:30: the next Monday 10:30
    assert got["resolution"].due_at == utc(30, 9, 30)


def test_a_priority_changed_and_back_does_not_send_a_breach_again(
    inst: Installation, clock: Clockwork
) -> None:
    """P1 -> P3 -> P1: the workaround target goes and comes back with its deadline,
    and what staff were already told about that deadline is not told twice."""
    number = inst.ingest(make_mail()).ticket
    clock.now = utc(23, 11, 30)
    assert sweep(inst.app, clock.now).breaches == 2  # first response and workaround
    clock.now = utc(23, 11, 40)
    bob_says(inst, "/priority P3\n", "b1@support.example")
    assert "workaround" not in clocks(inst, number)
    clock.now = utc(23, 11, 45)
    bob_says(inst, "/priority P1\n", "b2@support.example")
    workaround = clocks(inst, number)["workaround"]
    assert (workaround.due_at, workaround.breached_at) == (utc(23, 11, 30), utc(23, 11, 30))
    clock.now = utc(23, 11, 50)
    report = sweep(inst.app, clock.now)
    assert (report.reminders, report.breaches) == (0, 0)
    assert len(sla_mail(inst, "sla_breach")) == 2
    assert ticket(inst, number).level == "L3"  # one level per breach, not three


def test_a_new_plan_in_the_directory_retargets_open_tickets(
    inst: Installation, clock: Clockwork
) -> None:
    number = inst.ingest(make_mail()).ticket
    directory = yaml.safe_load((inst.root / "directory.yaml").read_text())
    directory["organisations"][0]["plan"] = "enterprise"
    (inst.root / "directory.yaml").write_text(yaml.safe_dump(directory))
    clock.now = utc(23, 9, 35)
    sync_directory_if_changed(inst.app)
    first = clocks(inst, number)["first_response"]
    assert (first.calendar, first.due_at) == ("24/7", utc(23, 9, 45))


def test_per_organisation_override(install) -> None:  # noqa: ANN001
    inst = install({"sla": {"organisations": {"acme": {"P1": {"first_response": "30m"}}}}})
    got = clocks(inst, inst.ingest(make_mail()).ticket)
    assert got["first_response"].due_at == utc(23, 10, 0)
    assert got["resolution"].due_at == utc(24, 8, 30)  # not overridden: the plan's


def test_an_override_can_give_one_target_its_own_calendar(install) -> None:  # noqa: ANN001
    target = {"within": "4h", "calendar": "24/7"}
    inst = install({"sla": {"organisations": {"acme": {"P1": {"resolution": target}}}}})
    got = clocks(inst, inst.ingest(make_mail()).ticket)
    assert (got["resolution"].calendar, got["resolution"].due_at) == ("24/7", utc(23, 13, 30))
    assert (got["first_response"].calendar, got["first_response"].due_at) == (
        "business",
        utc(23, 10, 30),
    )


def test_an_organisations_priority_calendar_wins_over_its_plans(install, clock: Clockwork) -> None:  # noqa: ANN001
    """At the priority level too, the organisation's override names the calendar
    before its plan: ACME's P1 stays in business hours, the plan's P1 does not."""
    inst = install({"sla": {
        "plans": {"pro": {"P1": {"calendar": "24/7"}}},
        "organisations": {"acme": {"P1": {"calendar": "business"}}},
    }})  # fmt: skip
    clock.now = datetime(2026, 11, 28, 22, 0, tzinfo=UTC)  # Saturday night
    got = clocks(inst, inst.ingest(make_mail()).ticket)
    assert {c.calendar for c in got.values()} == {"business"}
    # Monday 09:00 Brussels + 1 h
    assert got["first_response"].due_at == datetime(2026, 11, 30, 9, 0, tzinfo=UTC)


def test_an_organisation_calendar_leaves_a_target_its_own(install, clock: Clockwork) -> None:  # noqa: ANN001
    """An enterprise customer with its own hours keeps P1's 24/7 first response."""
    hours = {"hours": {"mon-fri": "08:00-16:00"}, "holidays": False}
    own = {
        "calendars": {"globex-hours": hours},
        "organisations": {"globex": {"calendar": "globex-hours"}},
    }
    inst = install({"sla": own})
    clock.now = datetime(2026, 11, 28, 22, 0, tzinfo=UTC)  # Saturday night
    mail = make_mail(sender="Hank Scorpio <hank@globex.example>", message_id="g1@globex.example")
    got = clocks(inst, inst.ingest(mail).ticket)
    assert (got["first_response"].calendar, got["first_response"].due_at) == (
        "24/7",
        datetime(2026, 11, 28, 22, 15, tzinfo=UTC),
    )
    # The rest in the organisation's own hours: Monday 08:00 London + 2 h and + 8 h.
    assert got["workaround"].calendar == got["resolution"].calendar == "globex-hours"
    assert got["workaround"].due_at == datetime(2026, 11, 30, 10, 0, tzinfo=UTC)
    assert got["resolution"].due_at == datetime(2026, 11, 30, 16, 0, tzinfo=UTC)


def test_sla_off_starts_no_clock_and_the_ack_says_no_deadline(install) -> None:  # noqa: ANN001
    inst = install({"sla": {"enabled": False}})
    number = inst.ingest(make_mail()).ticket
    assert clocks(inst, number) == {}
    ack = next(m for m in inst.sent() if m["To"] == "alice@acme.example")
    assert "novembre à" not in ack.get_body(("plain",)).get_content()


def test_a_restarted_daemon_sends_no_reminder_twice(inst: Installation, clock: Clockwork) -> None:
    inst.ingest(make_mail())
    assert sweep(inst.app, utc(23, 10, 0)).reminders == 1
    restarted = App(load_settings(inst.settings_file), clock=clock)
    assert sweep(restarted, utc(23, 10, 0)).reminders == 0
    assert sweep(restarted, utc(23, 10, 18)).reminders == 1  # the next one, once
    assert len(sla_mail(inst, "sla_reminder")) == 2


def test_reminders_moved_in_the_settings_send_nothing_at_the_old_time(
    inst: Installation, clock: Clockwork
) -> None:
    """The clock's next alert was planned at 50 %; the operator then sets the
    reminders at 90 % and restarts. At the old time nothing is due: no mail."""
    inst.ingest(make_mail())
    settings = yaml.safe_load(inst.settings_file.read_text())
    settings["sla"]["reminders"] = [0.9]
    inst.settings_file.write_text(yaml.safe_dump(settings))
    restarted = App(load_settings(inst.settings_file), clock=clock)
    clock.now = utc(23, 10, 0)  # the old 50 % of the first response
    assert sweep(restarted, clock.now) == SlaSweepReport(0, 0)
    clock.now = utc(23, 10, 24)  # 90 % of 1 h
    assert sweep(restarted, clock.now) == SlaSweepReport(1, 0)
    (reminder,) = [m for m in staff_mail(inst) if "SLA" in str(m["Subject"])]
    assert "SLA 90%: first response" in str(reminder["Subject"])


def test_one_sweep_drains_a_backlog_larger_than_its_batch(
    inst: Installation, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Clocks are claimed a batch per transaction (2 here instead of 200), and the
    sweep goes on until none is due: a backlog is not left for the next minutes."""
    from mailgate.sla import sweep as sla_sweep

    monkeypatch.setattr(sla_sweep, "BATCH", 2)
    for n in range(3):
        inst.ingest(make_mail(message_id=f"b{n}@acme.example", subject=f"Cannot log in {n}"))
    assert sweep(inst.app, utc(23, 10, 0)) == SlaSweepReport(3, 0)
    assert len(sla_mail(inst, "sla_reminder")) == 3


def test_two_racing_sweeps_send_each_reminder_once(install) -> None:
    """Checklist 27 on SQLite: two sweeps over the same due reminders at once."""
    inst = install(settings=NO_LOOP_LIMITS)
    for n in range(60):
        inst.ingest(make_mail(message_id=f"race-{n}@acme.example", subject=f"Cannot log in {n}"))
    apps = [App(load_settings(inst.settings_file)) for _ in range(2)]
    go = threading.Barrier(2)
    totals: list[int] = []

    def run(app: App) -> None:
        go.wait()
        totals.append(sweep(app, utc(23, 10, 0)).reminders)

    threads = [threading.Thread(target=run, args=(app,)) for app in apps]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert sum(totals) == 60
    with inst.session() as s:
        per_ticket = s.execute(
            select(OutboxMail.ticket_id, func.count())
            .where(OutboxMail.kind == "sla_reminder")
            .group_by(OutboxMail.ticket_id)
        ).all()
    assert len(per_ticket) == 60 and {n for _, n in per_ticket} == {1}


def mailgate(inst: Installation, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "mailgate", "--config", str(inst.settings_file), *args],
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_sla_sweep_command_in_two_racing_processes(install) -> None:
    inst = install(settings=NO_LOOP_LIMITS)
    for n in range(30):
        inst.ingest(make_mail(message_id=f"cli-{n}@acme.example", subject=f"Cannot log in {n}"))
    now = "2026-11-23T10:18:00+00:00"  # past 80 %: one reminder per ticket
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "mailgate",
                "--config",
                str(inst.settings_file),
                "sla",
                "sweep",
                "--now",
                now,
            ],
            stdout=subprocess.PIPE,
            text=True,
        )  # fmt: skip
        for _ in range(2)
    ]
    outputs = [p.communicate(timeout=60)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), outputs
    sent = sum(int(out.split()[0]) for out in outputs)  # "N reminders, M breaches"
    assert sent == 30, outputs
    assert len(sla_mail(inst, "sla_reminder")) == 30


def test_sla_report(inst: Installation, clock: Clockwork) -> None:
    first = make_mail(message_id="r1@acme.example", subject="Cannot log in")
    inst.ingest(first)
    inst.ingest(make_mail(message_id="r2@acme.example", subject="Cannot log in again"))
    clock.now = utc(23, 9, 50)
    inst.ingest(staff_answer(inst, "Looking.\n", "b1@support.example"))
    out = mailgate(inst, "sla", "report", "--json", "--now", "2026-11-23T12:00:00+00:00")
    assert out.returncode == 0, out.stderr
    rows = {r["priority"]: r for r in json.loads(out.stdout)}
    p1 = rows["P1"]
    assert p1["tickets"] == 2
    assert (p1["first_response"]["met"], p1["first_response"]["breached"]) == (1, 1)
    assert p1["first_response"]["median_minutes"] == 20.0
    assert p1["resolution"]["running"] == 2
    text = mailgate(inst, "sla", "report", "--org", "globex")
    assert text.returncode == 0 and "P1" in text.stdout
    bad = mailgate(inst, "sla", "report", "--from", "yesterday")
    assert bad.returncode != 0 and "--from yesterday" in bad.stderr


def test_sla_report_of_one_organisation_and_period(
    inst: Installation, clock: Clockwork, capsys: pytest.CaptureFixture[str]
) -> None:
    """Three ACME P1 tickets created at 09:30: one answered at its deadline to the
    second (met), one answered after the customer kept it waiting an hour (20
    minutes used, met), one still waiting (past its first deadline, but paused:
    running). Neither Globex's ticket nor the one created at the period's end count."""
    alice = "Alice Martin <alice@acme.example>"
    originals = [make_mail(message_id=f"r{n}@acme.example", subject=subject)
                 for n, subject in enumerate(("Cannot log in", "Cannot log in again",
                                              "Cannot log in at all"))]  # fmt: skip
    met, paused_then_met, waiting = (inst.ingest(m).ticket for m in originals)
    inst.ingest(make_mail(sender="Hank Scorpio <hank@globex.example>", message_id="g@globex"))
    clock.now = utc(23, 9, 40)
    for n, number in enumerate((paused_then_met, waiting)):
        inst.ingest(staff_answer(inst, "/status waiting\n", f"w{n}@support.example", ticket=number))
    clock.now = utc(23, 9, 45)
    inst.ingest(make_mail(message_id="late@acme.example", subject="Cannot log in since today"))
    clock.now = utc(23, 10, 30)  # the first response's deadline
    inst.ingest(staff_answer(inst, "Please clear your cache.\n", "b1@support.example", ticket=met))
    clock.now = utc(23, 10, 40)
    answer = reply_to(originals[1], sender=alice, body="Still failing.\n", message_id="a2@acme")
    answer.replace_header("To", "support@example.com")
    answer.replace_header("Subject", f"Re: [{paused_then_met}] Cannot log in again")
    assert inst.ingest(answer).outcome == "threaded"
    clock.now = utc(23, 10, 50)  # 80 minutes after creation, 60 of them waiting
    inst.ingest(staff_answer(inst, "Try now.\n", "b2@support.example", ticket=paused_then_met))
    capsys.readouterr()
    period = ("--from", "2026-11-23T09:30+00:00", "--to", "2026-11-23T09:45+00:00")
    assert inst.cli("sla", "report", "--json", "--org", "acme", *period,
                    "--now", "2026-11-23T12:00+00:00") == 0  # fmt: skip
    rows = {r["priority"]: r for r in json.loads(capsys.readouterr().out)}
    assert rows["P1"] == {
        "priority": "P1",
        "tickets": 3,
        "first_response": {"met": 2, "breached": 0, "running": 1, "median_minutes": 40.0},
        "resolution": {"met": 0, "breached": 0, "running": 3, "median_minutes": None},
    }
    assert rows["P2"]["tickets"] == rows["P3"]["tickets"] == 0


def test_sla_settings_errors_name_the_key(tmp_path: Path) -> None:
    from mailgate.config import ConfigError, settings_from_mapping

    bad = {
        "sla": {
            "plans": {
                "basic": {
                    "calendar": "nope",
                    "P1": {"first_response": "soon", "resolution": "8h"},
                    "P2": {"first_response": "1h", "resolution": {"within": "2x"}},
                    "P3": {"first_response": "4h", "resolution": "5d"},
                }
            },
            "calendars": {
                "x": {"hours": {"mun": "09:00-18:00"}},
                "y": {"hours": "24/7", "country": "ZZ"},
            },
        }
    }
    with pytest.raises(ConfigError) as caught:
        settings_from_mapping(bad, source="settings.yaml", base_dir=tmp_path)
    text = "\n".join(caught.value.problems)
    assert "sla.plans.basic.P1.first_response: 'soon' is not a duration" in text
    assert "sla.plans.basic.P2.resolution.within: '2x' is not a duration" in text
    assert "sla.calendars.x.hours" in text and "mun" in text
    assert "sla.calendars.y" in text and "'ZZ'" in text


def test_a_calendar_named_anywhere_must_exist(tmp_path: Path) -> None:
    from mailgate.config import ConfigError, settings_from_mapping

    targets = {"first_response": {"within": "15m", "calendar": "round-the-clock"}}
    bad = {"sla": {"organisations": {"acme": {"P1": targets}}}}
    with pytest.raises(ConfigError) as caught:
        settings_from_mapping(bad, source="settings.yaml", base_dir=tmp_path)
    assert "organisations.acme.P1.first_response.calendar: no calendar 'round-the-clock'" in (
        "\n".join(caught.value.problems)
    )


def test_check_names_an_organisation_whose_country_has_no_holidays(inst: Installation) -> None:
    directory = yaml.safe_load((inst.root / "directory.yaml").read_text())
    directory["organisations"][1]["country"] = "ZZ"
    (inst.root / "directory.yaml").write_text(yaml.safe_dump(directory))
    out = mailgate(inst, "check")
    assert out.returncode == 1
    assert "organisation globex: country: unknown holiday country 'ZZ'" in out.stdout, out.stdout


def test_explain_shows_the_deadlines_and_writes_none(inst: Installation, tmp_path: Path) -> None:
    from mailgate.pipeline.message import Envelope
    from mailgate.pipeline.process import process

    result = process(inst.app, make_mail().as_bytes(), Envelope(source="explain"), dry_run=True)
    assert result.sla == {
        "first_response": "2026-11-23T10:30:00+00:00",
        "workaround": "2026-11-23T11:30:00+00:00",
        "resolution": "2026-11-24T08:30:00+00:00",
    }
    with inst.session() as s:
        assert s.scalar(select(func.count()).select_from(SlaClock)) == 0
    mail = tmp_path / "request.eml"
    mail.write_bytes(make_mail().as_bytes())
    out = mailgate(inst, "explain", str(mail))
    assert out.returncode == 0, out.stderr
    assert re.search(r"first_response due \d{4}-", out.stdout) and "resolution due" in out.stdout


def test_reminders_go_to_the_assignee_when_there_is_one(install, clock: Clockwork) -> None:  # noqa: ANN001
    directory = yaml.safe_load((Path(__file__).parents[1] / "directory.yaml").read_text())
    directory["staff"].append({"email": "zoe@support.example", "name": "Zoé", "level": "L1"})
    inst = install(directory=directory)
    number = inst.ingest(make_mail()).ticket
    clock.now = utc(23, 9, 40)
    bob_says(inst, "/assign zoe@support.example\n", "b1@support.example")
    clock.now = utc(23, 10, 0)
    assert sweep(inst.app, clock.now).reminders == 1
    reminder = next(m for m in inst.sent() if "SLA" in str(m["Subject"]))
    assert reminder["To"] == "zoe@support.example" and number in str(reminder["Subject"])


@pytest.mark.sqlite_only  # EXPLAIN QUERY PLAN is SQLite's own
def test_the_sweep_reads_due_clocks_through_the_index(inst: Installation) -> None:
    """What keeps a sweep's cost to what is due (bench/sla.py measures it)."""
    from sqlalchemy import text

    with inst.app.engine.connect() as conn:
        plan = conn.execute(text(
            "EXPLAIN QUERY PLAN SELECT * FROM sla_clocks WHERE next_alert_at <= :now "
            "ORDER BY next_alert_at LIMIT 200"), {"now": "2026-11-23 10:00:00"}).all()  # fmt: skip
    detail = " ".join(str(row[-1]) for row in plan)
    # SEARCH (a range of the index), not SCAN (every row)
    assert "SEARCH sla_clocks USING INDEX ix_sla_clocks_next_alert_at" in detail, detail
