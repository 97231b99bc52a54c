"""Prepaid support credit: quarter-hours, urgent ×2, bugs free, oldest pack first,
expiry and rollover at their dates, a statement that reconciles, safe concurrent
spends, and what the customer is told (issue 8)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from collections.abc import Callable
from datetime import UTC, datetime

import pytest
from sqlalchemy import select

from mailgate.credits.rules import add_months, cost, periods
from mailgate.store.models import CreditEntry, OutboxMail, Ticket
from tests.conftest import ROOT, Clockwork, Installation, make_mail, staff_answer

ORG = "acme"


def balance(
    inst: Installation, capsys: pytest.CaptureFixture[str], now: str | None = None, org: str = ORG
) -> dict:
    capsys.readouterr()
    assert inst.cli("credits", "balance", org, "--json", *(["--now", now] if now else [])) == 0
    return json.loads(capsys.readouterr().out)


def printed(inst: Installation, capsys: pytest.CaptureFixture[str], *args: str) -> str:
    capsys.readouterr()
    assert inst.cli(*args) == 0
    return capsys.readouterr().out


def statement(inst: Installation, capsys, *now: str) -> dict:
    found = json.loads(printed(inst, capsys, "credits", "statement", ORG, "--json", *now))
    assert found["closing"] == sum(found["totals"].values())
    return found


def at(clock: Clockwork, moment: str) -> None:
    """Move the clock: what "now" is to the commands and mail that follow."""
    clock.now = datetime.fromisoformat(moment)


def open_ticket(inst: Installation, n: int = 1, subject: str = "Export question") -> str:
    result = inst.ingest(make_mail(subject=subject, message_id=f"t{n}@acme.example",
                                   body="How do I export?\n"))  # fmt: skip
    assert result.outcome == "created"
    return result.ticket


def spend(inst: Installation, capsys, ticket: str, duration: str) -> tuple[int, str]:
    capsys.readouterr()
    code = inst.cli("credits", "spend", ticket, duration)
    captured = capsys.readouterr()
    return code, captured.out + captured.err


# -- the arithmetic ---------------------------------------------------------------------


@pytest.mark.parametrize(("minutes", "expected"), [(1, 1), (15, 1), (16, 2), (90, 6), (0, 0)])
def test_started_quarter_hours(minutes: int, expected: int) -> None:
    assert periods(minutes) == expected


def test_urgent_costs_double_and_a_confirmed_bug_nothing_unless_urgent() -> None:
    assert cost(16, urgent=False, bug=False, urgent_multiplier=2) == 2
    assert cost(16, urgent=True, bug=False, urgent_multiplier=2) == 4
    assert cost(16, urgent=False, bug=True, urgent_multiplier=2) == 0
    assert cost(16, urgent=True, bug=True, urgent_multiplier=2) == 4


def test_months_are_calendar_months() -> None:
    assert add_months(datetime(2026, 1, 31, tzinfo=UTC), 1) == datetime(2026, 2, 28, tzinfo=UTC)
    assert add_months(datetime(2026, 11, 23, tzinfo=UTC), 12) == datetime(2027, 11, 23, tzinfo=UTC)


def test_a_pack_bought_late_in_a_month_keeps_its_whole_months(
    inst: Installation, capsys: pytest.CaptureFixture[str]
) -> None:
    """Only a day the later month lacks is cut to its last: a pack from 31 March is
    valid through 30 March a year on, one from 31 January 2028 for a month (a
    leap year) through 28 February. (Clamping every day to the 28th passed the
    tests and took up to three days of credit from such customers.)"""
    added = printed(inst, capsys, "credits", "add", ORG, "light", "--activated", "2026-03-31")
    assert "valid from 2026-03-31 until 2027-03-30 (pack #1)" in added
    leap = add_months(datetime(2028, 1, 31, tzinfo=UTC), 1)
    assert (leap, add_months(datetime(2026, 3, 30, tzinfo=UTC), 1)) == (
        datetime(2028, 2, 29, tzinfo=UTC), datetime(2026, 4, 30, tzinfo=UTC))  # fmt: skip


# -- spending ---------------------------------------------------------------------------


def test_spends_round_up_and_come_from_the_oldest_pack_first(inst: Installation, capsys) -> None:
    assert inst.cli("credits", "add", ORG, "light", "--activated", "2026-06-01") == 0
    assert (
        inst.cli("credits", "add", ORG, "10h", "--activated", "2026-11-01", "--reference", "INV-42")
        == 0
    )
    ticket = open_ticket(inst)
    for duration, charged in (("1m", 1), ("15m", 1), ("16m", 2), ("1h30", 6)):
        code, out = spend(inst, capsys, ticket, duration)
        assert code == 0 and f"{charged} credit(s) charged" in out, out
    found = balance(inst, capsys)
    assert found["balance"] == 20 + 40 - 10
    # light (20, valid until 2027-06-01) is used first; the 10h pack is untouched.
    assert [(p["pack"], p["remaining"]) for p in found["packs"]] == [("light", 10), ("10h", 40)]


def test_a_spend_larger_than_the_oldest_pack_continues_in_the_next(inst, capsys) -> None:
    inst.cli("credits", "add", ORG, "light", "--activated", "2026-06-01")
    inst.cli("credits", "add", ORG, "light", "--activated", "2026-11-01")
    ticket = open_ticket(inst)
    assert spend(inst, capsys, ticket, "6h")[0] == 0  # 24 credits: 20 + 4
    assert [(p["pack"], p["remaining"]) for p in balance(inst, capsys)["packs"]] == [("light", 16)]
    with inst.session() as session:
        spends = session.scalars(select(CreditEntry).where(CreditEntry.kind == "spend")).all()
        assert sorted(e.credits for e in spends) == [-20, -4]


def test_without_credit_or_overdraft_a_spend_is_refused_and_nothing_recorded(inst, capsys) -> None:
    inst.cli("credits", "add", ORG, "light", "--activated", "2026-11-01")
    ticket = open_ticket(inst)
    code, out = spend(inst, capsys, ticket, "5h15")  # 21 credits
    assert code == 1 and "21 credit(s) needed, 20 left" in out
    assert balance(inst, capsys)["balance"] == 20
    with inst.session() as session:
        assert session.scalars(select(CreditEntry.kind)).all() == ["purchase"]


def test_an_organisation_never_on_credit_is_not_charged(inst: Installation, capsys) -> None:
    ticket = open_ticket(inst)
    code, out = spend(inst, capsys, ticket, "2h")
    assert code == 0 and "0 credit(s) charged" in out
    assert balance(inst, capsys) == {
        "organisation": ORG, "balance": 0, "packs": [], "not_active_yet": [],
    }  # fmt: skip
    (ack,) = [m for m in inst.sent() if m["To"] == "alice@acme.example"]
    assert "crédit" not in ack.get_body(("plain",)).get_content()  # nothing said about credit


# -- staff by mail: /spend, /urgent, /bug ----------------------------------------------


def staff_mail(inst: Installation, body: str, n: int) -> str:
    return inst.ingest(staff_answer(inst, body, f"bob-{n}@support.example")).reason


def test_staff_spend_urgent_doubles_and_bug_gives_back(inst: Installation, capsys) -> None:
    inst.cli("credits", "add", ORG, "maxi", "--activated", "2026-11-01")
    ticket = open_ticket(inst)
    staff_mail(inst, "/spend 20m\n", 1)  # 2 credits
    assert balance(inst, capsys)["balance"] == 98
    staff_mail(inst, "/bug\n/spend 1h\n", 2)  # confirmed bug: the 20 min back, the hour free
    assert balance(inst, capsys)["balance"] == 100
    with inst.session() as session:
        (reversal,) = session.scalars(select(CreditEntry).where(CreditEntry.kind == "reversal"))
        assert reversal.credits == 2 and "confirmed bug" in reversal.note
        assert session.scalars(select(Ticket.bug)).one() is True
    urgent = open_ticket(inst, 2, subject="Other question")
    assert urgent != ticket
    with inst.session() as session:
        t = session.scalars(select(Ticket).where(Ticket.number == urgent)).one()
        t.urgent = True
        session.commit()
    assert spend(inst, capsys, urgent, "16m")[0] == 0
    assert balance(inst, capsys)["balance"] == 96  # 2 periods × 2
    inst.ingest(staff_answer(inst, "/bug\n", "bob-3@support.example", ticket=urgent))
    assert balance(inst, capsys)["balance"] == 96  # urgent handling stays charged


def test_urgent_work_costs_the_multiplier_of_the_settings(
    install: Callable[..., Installation], capsys
) -> None:
    inst = install(settings={"credits": {"urgent_multiplier": 3}})
    inst.cli("credits", "add", ORG, "light", "--activated", "2026-11-01")
    ticket = open_ticket(inst, subject="[URGENT] Export question")  # the subject marker
    code, out = spend(inst, capsys, ticket, "16m")
    assert code == 0 and "6 credit(s) charged" in out, out  # 2 quarter-hours × 3
    assert balance(inst, capsys)["balance"] == 14


def test_staff_spend_beyond_the_credit_refuses_the_whole_mail(inst: Installation, capsys) -> None:
    inst.cli("credits", "add", ORG, "light", "--activated", "2026-11-01")
    open_ticket(inst)
    reason = staff_mail(inst, "/priority P2\n/spend 6h\nDone.\n", 1)
    assert "commands refused, nothing applied" in reason and "needs 24 credit(s)" in reason
    assert balance(inst, capsys)["balance"] == 20
    with inst.session() as session:
        assert session.scalars(select(Ticket.priority)).one() != "P2"
    reason = staff_mail(inst, "/spend 5h\n", 2)  # 20 credits: exactly what is left
    assert "refused" not in reason, reason
    assert balance(inst, capsys)["balance"] == 0


# -- expiry and rollover at their dates -------------------------------------------------


def test_unused_credits_expire_at_the_end_of_validity(inst: Installation, clock, capsys) -> None:
    inst.cli("credits", "add", ORG, "light", "--activated", "2025-12-01")
    # Activated on 1 December 2025 in Brussels (the organisation's time zone): valid
    # until midnight there, twelve months later.
    at(clock, "2026-11-30T23:59:59+01:00")
    assert balance(inst, capsys)["balance"] == 20
    at(clock, "2026-12-01T00:00:00+01:00")
    assert balance(inst, capsys)["balance"] == 0
    with inst.session() as session:
        (expiry,) = session.scalars(select(CreditEntry).where(CreditEntry.kind == "expiry"))
        assert (expiry.credits, expiry.at) == (-20, datetime(2026, 11, 30, 23, tzinfo=UTC))


def test_a_pack_bought_during_the_day_is_valid_through_the_last_day_it_names(
    inst: Installation, clock, capsys
) -> None:
    """Bought at 16:03 in Brussels without --activated: balance, ack and notices say
    "valid until 4 December 2027", so the credits last until that day's midnight
    there, not until 16:03."""
    at(clock, AUDIT_DAY)
    assert inst.cli("credits", "add", ORG, "light") == 0
    assert [p["valid_until"] for p in balance(inst, capsys)["packs"]] == ["2027-12-04"]
    ticket = open_ticket(inst)
    at(clock, "2027-12-04T17:00:00+01:00")  # the last valid day, in the afternoon
    assert balance(inst, capsys)["balance"] == 20
    assert spend(inst, capsys, ticket, "15m")[0] == 0
    at(clock, "2027-12-05T00:00:00+01:00")
    assert inst.cli("credits", "sweep") == 0
    assert balance(inst, capsys)["balance"] == 0
    expiry = statement(inst, capsys)["entries"][-1]
    assert (expiry["kind"], expiry["credits"], expiry["at"]) == (
        "expiry", -19, "2027-12-04T23:00:00+00:00",  # midnight in Brussels
    )  # fmt: skip


@pytest.mark.parametrize("rollover", [True, False], ids=["rollover", "no-rollover"])
def test_credits_roll_over_into_a_pack_bought_before_they_expire(
    install: Callable[..., Installation], capsys, rollover: bool
) -> None:
    inst = install(settings={"credits": {"rollover": rollover}})
    inst.cli("credits", "add", ORG, "light", "--activated", "2025-12-01")
    inst.cli("credits", "add", ORG, "light", "--activated", "2026-11-01")
    found = balance(inst, capsys, "2026-12-01T00:00:00+00:00")
    assert found["balance"] == (40 if rollover else 20)
    # The carried-over credits end with the pack they moved into.
    assert [(p["remaining"], p["expires_at"][:16]) for p in found["packs"]] == [
        (40 if rollover else 20, "2027-10-31T23:00")  # midnight in Brussels
    ]


def test_a_correction_is_a_reversing_entry_and_only_one(inst: Installation, capsys) -> None:
    inst.cli("credits", "add", ORG, "light", "--activated", "2026-11-01")
    ticket = open_ticket(inst)
    spend(inst, capsys, ticket, "1h")
    with inst.session() as session:
        (spent,) = session.scalars(select(CreditEntry.id).where(CreditEntry.kind == "spend"))
    # The operator finds the id to reverse in the statement, as the README says.
    assert inst.cli("credits", "statement", ORG) == 0
    listed = capsys.readouterr().out.splitlines()
    assert listed[1].split()[0] == "ID"
    assert any(line.split()[:1] == [str(spent)] and " spend " in line for line in listed)
    assert inst.cli("credits", "reverse", str(spent), "--note", "logged twice") == 0
    assert f"spend #{spent} reversed" in capsys.readouterr().out
    assert inst.cli("credits", "reverse", str(spent)) == 1
    assert "already reversed" in capsys.readouterr().err
    assert balance(inst, capsys)["balance"] == 20
    with inst.session() as session:
        kinds = session.scalars(select(CreditEntry.kind).order_by(CreditEntry.id)).all()
    assert kinds == ["purchase", "spend", "reversal"]  # nothing rewritten


def test_a_bug_gives_back_only_what_was_not_corrected_already(inst: Installation, capsys) -> None:
    inst.cli("credits", "add", ORG, "maxi", "--activated", "2026-11-01")
    ticket = open_ticket(inst)
    spend(inst, capsys, ticket, "20m")  # 2 credits
    spend(inst, capsys, ticket, "1h")  # 4 credits
    with inst.session() as session:
        spends = session.scalars(select(CreditEntry.id).where(CreditEntry.kind == "spend"))
        first, second = sorted(spends)
    assert inst.cli("credits", "reverse", str(first), "--note", "logged twice") == 0
    staff_mail(inst, "/bug\n", 1)
    assert balance(inst, capsys)["balance"] == 100
    with inst.session() as session:
        reversals = session.execute(select(CreditEntry.credits, CreditEntry.reverses_id)
                                    .where(CreditEntry.kind == "reversal")
                                    .order_by(CreditEntry.id)).all()  # fmt: skip
    assert [tuple(r) for r in reversals] == [(2, first), (4, second)]


def test_a_correction_after_the_pack_ended_leaves_the_past_statements_alone(
    inst: Installation, clock: Clockwork, capsys
) -> None:
    """A spend reversed after its pack ended gives the credits back to that pack,
    where they end at once: that expiry was dated at the pack's end, in a month
    whose statement had been sent, and changed it."""
    inst.cli("credits", "add", ORG, "light", "--activated", "2025-12-01")
    ticket = open_ticket(inst)
    spend(inst, capsys, ticket, "1h")
    with inst.session() as session:
        (spent,) = session.scalars(select(CreditEntry.id).where(CreditEntry.kind == "spend"))
    at(clock, "2026-12-02T10:00:00+01:00")
    assert inst.cli("credits", "sweep") == 0

    def period(*dates: str) -> dict:
        return json.loads(printed(inst, capsys, "credits", "statement", ORG, "--json", *dates))

    sent_on_1_december = ("--from", "2026-11-01", "--to", "2026-12-02")
    sent = period(*sent_on_1_december)
    assert entries(sent)[-1] == ("expiry", -16)
    assert inst.cli("credits", "reverse", str(spent), "--note", "wrong ticket") == 0
    assert balance(inst, capsys)["balance"] == 0
    assert period(*sent_on_1_december) == sent
    later = period("--from", "2026-12-02")["entries"]
    assert [(e["kind"], e["credits"], e["at"]) for e in later] == [
        ("reversal", 4, "2026-12-02T09:00:00+00:00"),
        ("expiry", -4, "2026-12-02T09:00:00+00:00"),
    ]


def test_statement_reconciles_with_the_balance(inst: Installation, capsys) -> None:
    inst.cli("credits", "add", ORG, "light", "--activated", "2025-12-01")
    inst.cli("credits", "add", ORG, "10h", "--activated", "2026-11-01")
    ticket = open_ticket(inst)
    spend(inst, capsys, ticket, "45m")
    capsys.readouterr()
    assert inst.cli("credits", "statement", ORG, "--json", "--now", "2026-12-02T00:00+00:00") == 0
    found = json.loads(capsys.readouterr().out)
    assert found["closing"] == sum(found["totals"].values()) == found["entries"][-1]["balance"]
    assert found["closing"] == balance(inst, capsys, "2026-12-02T00:00+00:00")["balance"] == 57
    assert {k: v for k, v in found["totals"].items()} == {
        "purchase": 60, "spend": -3, "rollover_out": -17, "rollover_in": 17,
    }  # fmt: skip
    capsys.readouterr()
    assert inst.cli("credits", "statement", ORG, "--csv", "--from", "2026-11-02",
               "--to", "2026-11-30") == 0  # fmt: skip
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0] == "id,at,kind,credits,balance,pack,ticket,reverses,note"
    assert len(lines) == 2 and ",spend,-3,57," in lines[1] and ticket in lines[1]


# -- days as the customer is told them ---------------------------------------------


def test_a_statement_s_days_are_the_organisation_s(inst: Installation, clock, capsys) -> None:
    """November in Brussels: the pack activated on 1 November is in it, the time
    spent at midnight starting 1 December is not."""
    at(clock, AUDIT_DAY)
    assert inst.cli("credits", "add", ORG, "light", "--activated", "2026-11-01") == 0
    ticket = open_ticket(inst)
    at(clock, "2026-12-01T00:00:00+01:00")
    assert spend(inst, capsys, ticket, "15m")[0] == 0
    at(clock, AUDIT_DAY)
    november = json.loads(printed(inst, capsys, "credits", "statement", ORG, "--json",
                                  "--from", "2026-11-01", "--to", "2026-12-01"))  # fmt: skip
    assert (november["opening"], entries(november), november["closing"]) == (
        0, [("purchase", 20)], 20,
    )  # fmt: skip
    december = json.loads(printed(inst, capsys, "credits", "statement", ORG, "--json",
                                  "--from", "2026-12-01", "--to", "2027-01-01"))  # fmt: skip
    assert (december["opening"], entries(december), december["closing"]) == (
        20, [("spend", -1)], 19,
    )  # fmt: skip
    # The printed statement says so too: its times are Brussels', not UTC's
    # (the purchase read "2026-10-31T23:00", the spend "2026-11-30T23:00").
    table = printed(inst, capsys, "credits", "statement", ORG).splitlines()
    assert "AT (Europe/Brussels)" in table[1]
    assert [line.split("  ")[1].strip() for line in table[2:4]] == [
        "2026-11-01 00:00",
        "2026-12-01 00:00",
    ]


def test_balance_gives_the_last_valid_day_the_mails_give(
    inst: Installation, clock: Clockwork, capsys
) -> None:
    # At 23:30 UTC it is already 5 December in Brussels: valid through 5 December 2027.
    at(clock, "2026-12-04T23:30:00+00:00")
    added = printed(inst, capsys, "credits", "add", ORG, "light")
    assert (
        added
        == "acme: pack light (+20 credits), valid from 2026-12-05 until 2027-12-05 (pack #1)\n"
    )
    # Globex is in London: from its midnight on 10 January (00:00 UTC), through 9 January 2027.
    added = printed(inst, capsys, "credits", "add", "globex", "light", "--activated", "2026-01-10")
    assert "valid from 2026-01-10 until 2027-01-09 (pack #2)" in added
    open_ticket(inst)
    inst.ingest(make_mail(sender="Hank Scorpio <hank@globex.example>", subject="Export question",
                          message_id="g1@globex.example", body="How do I export?\n"))  # fmt: skip
    acks = {str(m["To"]): m.get_body(("plain",)).get_content() for m in inst.sent()
            if str(m["To"]) in ("alice@acme.example", "hank@globex.example")}  # fmt: skip
    assert "5 décembre 2027" in acks["alice@acme.example"]
    assert "January 9, 2027" in acks["hank@globex.example"]
    for org, day in ((ORG, "2027-12-05"), ("globex", "2027-01-09")):
        table = printed(inst, capsys, "credits", "balance", org).splitlines()
        assert table[2].split()[1:] == ["light", "20", day]
        assert table[1].split() == ["PACK", "NAME", "LEFT", "VALID", "UNTIL"]
        assert [p["valid_until"] for p in balance(inst, capsys, org=org)["packs"]] == [day]


# -- a pack activated later, a pretend time ----------------------------------------

AUDIT_DAY = "2026-12-04T15:03:00+00:00"


def entries(found: dict) -> list[tuple[str, int]]:
    return [(e["kind"], e["credits"]) for e in found["entries"]]


def test_a_pack_activated_later_ends_nothing_now_and_counts_from_its_day(
    inst: Installation, clock: Clockwork, capsys
) -> None:
    at(clock, AUDIT_DAY)  # the audit's sequence
    assert inst.cli("credits", "add", ORG, "light", "--activated", "2026-01-10",
                    "--reference", "A") == 0  # fmt: skip
    assert inst.cli("credits", "add", ORG, "maxi", "--activated", "2025-12-20",
                    "--reference", "B") == 0  # fmt: skip
    assert balance(inst, capsys)["balance"] == 120
    assert inst.cli("credits", "add", ORG, "light", "--activated", "2027-06-01",
                    "--reference", "FUT") == 0  # fmt: skip

    # Still 120 to spend until 9 January; the new pack is listed apart, not counted.
    found = balance(inst, capsys)
    assert found["balance"] == 120
    assert [(p["pack"], p["remaining"], p["valid_until"]) for p in found["packs"]] == [
        ("maxi", 100, "2026-12-19"), ("light", 20, "2027-01-09"),
    ]  # fmt: skip
    assert [(p["pack"], p["remaining"], p["valid_from"], p["valid_until"])
            for p in found["not_active_yet"]] == [
        ("light", 20, "2027-06-01", "2028-05-31"),
    ]  # fmt: skip
    text = printed(inst, capsys, "credits", "balance", ORG)
    assert text.startswith("acme: 120 credit(s)\n")
    assert "not active yet, not in the balance: 20 credit(s)" in text
    # Nothing ended: the statement has the two purchases, the third enters on its day.
    assert entries(statement(inst, capsys)) == [("purchase", 100), ("purchase", 20)]
    assert statement(inst, capsys)["closing"] == 120
    open_ticket(inst)
    (ack,) = [m for m in inst.sent() if m["To"] == "alice@acme.example"]
    assert "Il vous reste 120 crédits" in ack.get_body(("plain",)).get_content()

    # 20 December in Brussels: maxi ends, its 100 credits move into pack A.
    at(clock, "2026-12-20T00:00+01:00")
    assert inst.cli("credits", "sweep") == 0
    assert [(p["remaining"], p["valid_until"]) for p in balance(inst, capsys)["packs"]] == [
        (120, "2027-01-09")
    ]
    # 10 January: pack A ends; the pack of June was not active before, nothing rolls into it.
    at(clock, "2027-01-10T00:00+01:00")
    assert inst.cli("credits", "sweep") == 0
    found = balance(inst, capsys)
    assert (found["balance"], found["packs"]) == (0, [])
    assert [p["valid_from"] for p in found["not_active_yet"]] == ["2027-06-01"]
    (notice,) = [m for m in inst.sent() if m["To"] == "alice@acme.example"
                 and "120" in str(m["Subject"])]  # fmt: skip
    assert "9 janvier 2027" in notice.get_body(("plain",)).get_content()
    last = statement(inst, capsys)["entries"][-1]
    assert (last["kind"], last["credits"], last["at"][:16]) == ("expiry", -120, "2027-01-09T23:00")
    # 1 June 2027 in Brussels: the new pack counts.
    at(clock, "2027-06-01T00:00+02:00")
    found = balance(inst, capsys)
    assert found["balance"] == 20 and found["not_active_yet"] == []
    assert [(p["pack"], p["remaining"]) for p in found["packs"]] == [("light", 20)]
    assert entries(statement(inst, capsys))[-1] == ("purchase", 20)


OVERDRAFT = {"credits": {"organisations": {ORG: {"overdraft": True}}}}


def test_an_overdraft_is_paid_back_from_the_next_pack_once(
    install: Callable[..., Installation], capsys
) -> None:
    inst = install(settings=OVERDRAFT)
    at(inst.clock, AUDIT_DAY)
    assert inst.cli("credits", "add", ORG, "light", "--activated", "2026-11-01") == 0
    ticket = open_ticket(inst)
    assert spend(inst, capsys, ticket, "6h")[0] == 0  # 24 credits: 4 beyond the 20
    assert balance(inst, capsys)["balance"] == -4
    assert inst.cli("credits", "add", ORG, "maxi", "--reference", "PO-7") == 0
    found = balance(inst, capsys)
    assert (found["balance"], [p["remaining"] for p in found["packs"]]) == (96, [96])
    assert inst.cli("credits", "sweep") == 0  # and nothing is paid back twice
    assert entries(statement(inst, capsys))[-3:] == [
        ("purchase", 100), ("repayment", -4), ("repayment", 4),
    ]  # fmt: skip
    assert balance(inst, capsys)["balance"] == 96


def test_a_reversed_overdraft_already_paid_back_returns_to_the_pack_that_paid(
    install: Callable[..., Installation], capsys
) -> None:
    """The overdraft was a mistake, but the next pack had already paid it back: the
    credits go back into that pack, where they can be spent and where they expire."""
    inst = install(settings=OVERDRAFT)
    at(inst.clock, AUDIT_DAY)
    assert inst.cli("credits", "add", ORG, "light", "--activated", "2026-11-01") == 0
    ticket = open_ticket(inst)
    assert spend(inst, capsys, ticket, "6h")[0] == 0  # 24 credits: 4 beyond the 20
    assert inst.cli("credits", "add", ORG, "maxi") == 0  # pays the 4 back: 96 left
    with inst.session() as session:
        overdrawn = select(CreditEntry.id).where(CreditEntry.kind == "overdraft")
        (overdraft,) = session.scalars(overdrawn)
    assert inst.cli("credits", "reverse", str(overdraft), "--note", "logged twice") == 0
    found = balance(inst, capsys)
    assert (found["balance"], [(p["pack"], p["remaining"]) for p in found["packs"]]) == (
        100, [("maxi", 100)],
    )  # fmt: skip
    assert statement(inst, capsys)["closing"] == 100


def test_a_reversed_overdraft_goes_back_to_the_newest_repayment_first(
    install: Callable[..., Installation], capsys
) -> None:
    """Two packs paid overdrafts back (maxi 4, then light 1); the first overdraft
    is reversed: the newest repayment is undone first (ledger._give_back_repayments),
    so light gets its 1 back and maxi 3 of its 4, and each keeps its own end."""
    inst = install(settings=OVERDRAFT)
    at(inst.clock, AUDIT_DAY)
    assert inst.cli("credits", "add", ORG, "light", "--activated", "2026-11-01") == 0
    ticket = open_ticket(inst)
    assert spend(inst, capsys, ticket, "6h")[0] == 0  # 20, and 4 overdrawn
    assert inst.cli("credits", "add", ORG, "maxi", "--activated", "2026-11-20") == 0  # pays 4
    assert spend(inst, capsys, ticket, "24h")[0] == 0  # maxi's 96
    assert spend(inst, capsys, ticket, "15m")[0] == 0  # 1 overdrawn
    assert inst.cli("credits", "add", ORG, "light") == 0  # pays 1
    with inst.session() as session:
        overdrawn = select(CreditEntry.id).where(CreditEntry.kind == "overdraft")
        first = min(session.scalars(overdrawn))
    assert inst.cli("credits", "reverse", str(first), "--note", "logged twice") == 0
    found = balance(inst, capsys)
    assert [(p["pack"], p["remaining"], p["valid_until"]) for p in found["packs"]] == [
        ("maxi", 3, "2027-11-19"), ("light", 20, "2027-12-04"),
    ]  # fmt: skip
    assert found["balance"] == statement(inst, capsys)["closing"] == 23


def test_an_overdraft_run_up_before_a_later_pack_starts_is_paid_back_on_its_day(
    install: Callable[..., Installation], capsys
) -> None:
    """The pack was recorded first, with a later activation date; the overdraft came
    after. On the pack's day it pays the overdraft back, as a pack bought then would."""
    inst = install(settings=OVERDRAFT)
    at(inst.clock, AUDIT_DAY)
    assert inst.cli("credits", "add", ORG, "light", "--activated", "2026-11-01") == 0
    assert inst.cli("credits", "add", ORG, "maxi", "--activated", "2027-01-01") == 0
    ticket = open_ticket(inst)
    assert spend(inst, capsys, ticket, "6h")[0] == 0
    assert balance(inst, capsys)["balance"] == -4  # the later pack does not count yet

    at(inst.clock, "2027-01-01T09:00+01:00")
    assert inst.cli("credits", "sweep") == 0
    assert inst.cli("credits", "sweep") == 0
    found = balance(inst, capsys)
    assert (found["balance"], [p["remaining"] for p in found["packs"]]) == (96, [96])
    repaid = [e for e in statement(inst, capsys)["entries"] if e["kind"] == "repayment"]
    assert [(e["credits"], e["at"]) for e in repaid] == [
        (-4, "2026-12-31T23:00:00+00:00"), (4, "2026-12-31T23:00:00+00:00"),  # midnight in Paris
    ]  # fmt: skip


def test_a_pack_recorded_after_an_overdraft_pays_it_back_when_it_was_run_up(
    install: Callable[..., Installation], capsys
) -> None:
    """Activated before the overdraft but recorded after it, the pack pays it back
    at the overdraft's time: never before the debt existed."""
    inst = install(settings=OVERDRAFT)
    at(inst.clock, AUDIT_DAY)
    assert inst.cli("credits", "add", ORG, "light", "--activated", "2026-11-01") == 0
    ticket = open_ticket(inst)
    assert spend(inst, capsys, ticket, "6h")[0] == 0  # 4 beyond the 20, at AUDIT_DAY
    assert inst.cli("credits", "add", ORG, "maxi", "--activated", "2026-11-15") == 0
    repaid = [e for e in statement(inst, capsys)["entries"] if e["kind"] == "repayment"]
    assert [(e["credits"], e["at"]) for e in repaid] == [
        (-4, "2026-12-04T15:03:00+00:00"), (4, "2026-12-04T15:03:00+00:00"),
    ]  # fmt: skip
    assert balance(inst, capsys)["balance"] == 96


def test_a_pack_that_ended_before_an_overdraft_does_not_pay_it_back(
    install: Callable[..., Installation], capsys
) -> None:
    """An old invoice recorded late: the pack ended on 1 January 2026, long before
    the overdraft; its credits expire, they pay nothing back."""
    inst = install(settings=OVERDRAFT)
    at(inst.clock, AUDIT_DAY)
    assert inst.cli("credits", "add", ORG, "light", "--activated", "2026-11-01") == 0
    ticket = open_ticket(inst)
    assert spend(inst, capsys, ticket, "6h")[0] == 0  # 4 beyond the 20
    assert inst.cli("credits", "add", ORG, "maxi", "--activated", "2025-01-01") == 0
    assert balance(inst, capsys)["balance"] == -4
    assert entries(statement(inst, capsys))[-2:] == [("spend", -20), ("overdraft", -4)]


def test_a_pretend_time_books_nothing(inst: Installation, clock: Clockwork, capsys) -> None:
    at(clock, AUDIT_DAY)
    assert inst.cli("credits", "add", ORG, "light") == 0  # valid until 4 December 2027
    ticket = open_ticket(inst)
    later = "2030-01-01T00:00+00:00"
    # Reading with a pretend time shows what would be then, and books nothing.
    assert balance(inst, capsys, later)["balance"] == 0
    assert entries(statement(inst, capsys, "--now", later)) == [("purchase", 20), ("expiry", -20)]
    found = balance(inst, capsys)
    assert (found["balance"], [p["remaining"] for p in found["packs"]]) == (20, [20])
    assert entries(statement(inst, capsys)) == [("purchase", 20)]
    with inst.session() as session:  # not even an entry dated later
        assert session.scalars(select(CreditEntry.kind)).all() == ["purchase"]
    # What books entries refuses a time still to come: they would stay.
    capsys.readouterr()
    assert inst.cli("credits", "sweep", "--now", later) == 1
    assert "later than now" in capsys.readouterr().err
    assert inst.cli("credits", "spend", ticket, "15m", "--now", later) == 1
    assert "later than now" in capsys.readouterr().err
    # Nothing was booked, and no expiry notice went out.
    assert balance(inst, capsys)["balance"] == 20
    assert entries(statement(inst, capsys)) == [("purchase", 20)]
    assert [m["To"] for m in inst.sent() if "alice" in str(m["To"])] == ["alice@acme.example"]
    # Its day comes: it expires for good, at its end (that day's midnight in Brussels).
    at(clock, "2027-12-05T00:00:00+01:00")
    assert inst.cli("credits", "sweep") == 0
    assert balance(inst, capsys)["balance"] == 0
    assert statement(inst, capsys)["entries"][-1]["at"] == "2027-12-04T23:00:00+00:00"


# -- concurrency --------------------------------------------------------------------


def spend_in_processes(inst: Installation, ticket: str) -> list[subprocess.CompletedProcess]:
    command = [sys.executable, "-m", "mailgate", "--config", str(inst.settings_file),
               "credits", "spend", ticket, "15m", "--now", inst.clock.now.isoformat()]  # fmt: skip
    procs = [subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True, env={**os.environ}) for _ in range(2)]  # fmt: skip
    return [subprocess.CompletedProcess(p.args, p.wait(60), *p.communicate()) for p in procs]


@pytest.mark.parametrize("overdraft", [False, True], ids=["refused", "overdraft"])
def test_two_concurrent_spends_on_the_last_credit(
    install: Callable[..., Installation], capsys, overdraft: bool
) -> None:
    inst = install(settings={"credits": {"organisations": {ORG: {"overdraft": overdraft}}}})
    inst.cli("credits", "add", ORG, "light", "--activated", "2026-11-01")
    ticket = open_ticket(inst)
    spend(inst, capsys, ticket, "4h45")  # 19 of 20: one credit left
    results = spend_in_processes(inst, ticket)
    codes = sorted(r.returncode for r in results)
    if overdraft:
        assert codes == [0, 0]
        assert balance(inst, capsys)["balance"] == -1
        with inst.session() as session:
            kinds = session.scalars(select(CreditEntry.kind).order_by(CreditEntry.id)).all()
        assert kinds[-2:] == ["spend", "overdraft"]
    else:
        assert codes == [0, 1], [r.stderr for r in results]
        assert "1 credit(s) needed, 0 left" in next(r.stderr for r in results if r.returncode)
        assert balance(inst, capsys)["balance"] == 0


def test_two_settlements_at_once_book_an_expiry_once_on_postgresql(
    install: Callable[..., Installation], postgres, capsys
) -> None:
    """The first mails after a pack's end, arriving together on two instances (or
    with the hourly sweep, or a `credits balance`): each settles the ledger in its
    own transaction. The second waits for the first and finds the expiry booked."""
    from mailgate.credits.billing import balance_now

    inst = install(settings={"database_url": postgres.fresh_database()})
    at(inst.clock, AUDIT_DAY)
    assert inst.cli("credits", "add", ORG, "light", "--activated", "2025-12-01") == 0  # ended
    now = inst.clock.now

    def settle_in_another_transaction() -> None:
        with inst.app.sessions.begin() as other:
            balance_now(inst.app, other, ORG, now)

    with inst.app.sessions.begin() as first:
        assert balance_now(inst.app, first, ORG, now).total == 0
        second = threading.Thread(target=settle_in_another_transaction)
        second.start()
        second.join(1)  # without a lock it books its own expiry meanwhile
    second.join(30)
    assert entries(statement(inst, capsys)) == [("purchase", 20), ("expiry", -20)]
    assert balance(inst, capsys)["balance"] == 0


# -- what the customer is told ----------------------------------------------------------


def test_the_low_balance_notice_is_sent_once(inst: Installation, capsys) -> None:
    inst.cli("credits", "add", ORG, "light", "--activated", "2026-11-01")
    ticket = open_ticket(inst)
    spend(inst, capsys, ticket, "3h")  # 12 credits: 8 left, the threshold, not below it
    spend(inst, capsys, ticket, "15m")  # 1: 7 left, below
    spend(inst, capsys, ticket, "15m")  # 1: 6 left, still below: no second notice
    notices = [m for m in inst.sent() if "crédit" in str(m["Subject"]).lower()]
    assert len(notices) == 1, [m["Subject"] for m in inst.sent()]
    assert notices[0]["To"] == "alice@acme.example" and "7" in str(notices[0]["Subject"])


def test_the_expiry_notice_comes_thirty_days_before_and_once(inst: Installation, capsys) -> None:
    inst.cli("credits", "add", ORG, "light", "--activated", "2025-12-01")
    for day in ("2026-10-31T12:00+00:00", "2026-11-01T00:00+00:00", "2026-11-02T00:00+00:00"):
        assert inst.cli("credits", "sweep", "--now", day) == 0
    (notice,) = [m for m in inst.sent() if m["To"] == "alice@acme.example"
                 and "20" in str(m["Subject"])]  # fmt: skip
    assert "30 novembre 2026" in notice.get_body(("plain",)).get_content()


def test_the_expiry_notice_comes_the_configured_days_before(
    install: Callable[..., Installation],
) -> None:
    inst = install(settings={"credits": {"expiry_notice_days": 10}})
    inst.cli("credits", "add", ORG, "light", "--activated", "2025-12-01")  # ends 1 December
    for day in ("2026-11-20T12:00+00:00", "2026-11-21T00:00+00:00"):
        assert inst.cli("credits", "sweep", "--now", day) == 0
    with inst.session() as session:
        queued = session.scalars(select(OutboxMail.created_at).where(
            OutboxMail.kind == "credit_expiry")).all()  # fmt: skip
    assert queued == [datetime(2026, 11, 21, tzinfo=UTC)]  # ten days before, not thirty


def test_the_expiry_notice_comes_the_moment_the_configured_days_remain(
    install: Callable[..., Installation],
) -> None:
    inst = install(settings={"credits": {"expiry_notice_days": 10}})
    inst.cli("credits", "add", ORG, "light", "--activated", "2025-12-01")
    # The pack ends at midnight on 1 December in Brussels, 23:00 UTC the day before:
    # ten days before that instant, not an hour (a sweep) later.
    assert inst.cli("credits", "sweep", "--now", "2026-11-20T22:59+00:00") == 0
    assert inst.cli("credits", "sweep", "--now", "2026-11-20T23:00+00:00") == 0
    with inst.session() as session:
        queued = session.scalars(select(OutboxMail.created_at).where(
            OutboxMail.kind == "credit_expiry")).all()  # fmt: skip
    assert queued == [datetime(2026, 11, 20, 23, tzinfo=UTC)]


def test_the_ack_tells_the_balance(inst: Installation) -> None:
    inst.cli("credits", "add", ORG, "light", "--activated", "2026-11-01")
    open_ticket(inst)
    (ack,) = [m for m in inst.sent() if m["To"] == "alice@acme.example"]
    text = ack.get_body(("plain",)).get_content()
    assert "20" in text and "31 octobre 2027" in text


@pytest.mark.parametrize("policy", ["flag", "reject"])
def test_an_exhausted_organisation_gets_new_tickets_flagged_or_refused(install, policy) -> None:
    inst = install(settings={"credits": {"when_exhausted": policy}})
    inst.cli("credits", "add", ORG, "light", "--activated", "2025-01-01")  # long expired
    result = inst.ingest(make_mail(subject="Export question", body="How do I export?\n"))
    if policy == "flag":
        assert result.outcome == "created" and "no support credit left" in result.reason
        with inst.session() as session:
            assert "credit-exhausted" in session.scalars(select(Ticket.tags)).one()
    else:
        assert result.outcome == "rejected" and "no support credit left" in result.reason
        (notice,) = inst.sent()
        assert "crédit" in notice.get_body(("plain",)).get_content()
    # A P1 is always taken.
    urgent = inst.ingest(make_mail(subject="Production down", message_id="p1@acme.example",
                                   body="Nobody can log in, production is down.\n"))  # fmt: skip
    assert urgent.outcome == "created" and "credit" not in urgent.reason
    with inst.session() as session:
        assert (
            session.scalars(select(Ticket.priority).where(Ticket.number == urgent.ticket)).one()
            == "P1"
        )
