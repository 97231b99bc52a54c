"""Operator commands: a filter that cannot match is refused with the reason, never
an empty listing that looks like news; a command that acts never acts ahead of time."""

from __future__ import annotations

import json
from datetime import timedelta
from pathlib import Path

import pytest
from sqlalchemy import select, text

from mailgate.store.db import head_revision
from mailgate.store.models import Ticket
from mailgate.tickets.changes import set_status
from tests.conftest import Installation, make_mail

Capsys = pytest.CaptureFixture[str]


def test_tickets_list_names_the_statuses_it_knows(inst: Installation, capsys: Capsys) -> None:
    inst.ingest(make_mail(subject="Export broken"))
    capsys.readouterr()
    assert inst.cli("tickets", "list", "--status", "new") == 0
    listing = capsys.readouterr().out
    assert "Export broken" in listing
    assert "UPDATED (UTC)" in listing  # the times are UTC's, not the reader's
    assert inst.cli("outbox", "list") == 0
    assert "NEXT (UTC)" in capsys.readouterr().out
    with pytest.raises(SystemExit) as refused:
        inst.cli("tickets", "list", "--status", "opened")  # a typo for "open"
    assert refused.value.code == 2
    err = capsys.readouterr().err
    assert "invalid choice: 'opened'" in err and "waiting_customer" in err


def test_tickets_list_filters_by_status_and_show_takes_any_case(
    inst: Installation, capsys: Capsys
) -> None:
    first = inst.ingest(make_mail()).ticket
    inst.ingest(make_mail(message_id="req-2@acme.example", subject="Printer jammed"))
    with inst.session() as s, s.begin():
        ticket = s.scalar(select(Ticket).where(Ticket.number == first))
        set_status(s, ticket, "closed", now=inst.clock(), actor_kind="staff",
                   actor="bob@support.example", reason="done")  # fmt: skip
    capsys.readouterr()
    assert inst.cli("tickets", "list", "--status", "closed", "--json") == 0
    assert [t["number"] for t in json.loads(capsys.readouterr().out)] == [first]
    assert inst.cli("tickets", "show", first.lower(), "--json") == 0  # typed by hand
    assert json.loads(capsys.readouterr().out)["number"] == first


def test_tickets_list_of_an_unknown_organisation_is_an_error(
    inst: Installation, capsys: Capsys
) -> None:
    inst.ingest(make_mail())
    capsys.readouterr()
    assert inst.cli("tickets", "list", "--org", "acme") == 0
    assert inst.cli("tickets", "list", "--org", "acmee") == 1
    captured = capsys.readouterr()
    assert "no organisation 'acmee' in the directory" in captured.err
    assert "Traceback" not in captured.err


def test_outbox_list_names_the_statuses_it_knows(inst: Installation, capsys: Capsys) -> None:
    with pytest.raises(SystemExit) as refused:
        inst.cli("outbox", "list", "--status", "pending")
    assert refused.value.code == 2
    assert "invalid choice: 'pending'" in capsys.readouterr().err


def test_outbox_retry_says_which_ids_it_did_not_queue(inst: Installation, capsys: Capsys) -> None:
    inst.ingest(make_mail())  # an acknowledgement and a staff notice, both queued
    capsys.readouterr()
    assert inst.cli("outbox", "retry", "99999", "1") == 1
    captured = capsys.readouterr()
    assert "0 mail(s) queued again" in captured.out
    assert "no outbound mail #99999" in captured.err
    assert "mail #1 is queued: only failed or dead mail is queued again" in captured.err


def test_outbox_retry_never_queues_delivered_mail_again(inst: Installation, capsys: Capsys) -> None:
    inst.ingest(make_mail())
    delivered = len(inst.sent())  # the acknowledgement and the staff notice, sent
    capsys.readouterr()
    assert inst.cli("outbox", "retry") == 0  # every failed or dead mail: none
    assert "0 mail(s) queued again" in capsys.readouterr().out
    assert inst.cli("outbox", "retry", "1") == 1
    assert "mail #1 is sent: only failed or dead mail is queued again" in capsys.readouterr().err
    assert len(inst.sent()) == delivered


def test_outbox_list_shows_the_status_asked_for(inst: Installation, capsys: Capsys) -> None:
    inst.ingest(make_mail())
    inst.send_outbox()
    inst.ingest(make_mail(message_id="req-2@acme.example", subject="Printer jammed"))
    capsys.readouterr()
    for status, count in (("sent", 2), ("queued", 2), ("dead", 0)):
        assert inst.cli("outbox", "list", "--status", status, "--json") == 0
        listed = json.loads(capsys.readouterr().out)
        assert [r["status"] for r in listed] == [status] * count


ACTING = [
    ("sla", "sweep"),
    ("tickets", "sweep"),
    ("credits", "sweep"),
    ("retention", "run"),
]


@pytest.mark.parametrize("command", ACTING, ids=" ".join)
def test_a_command_that_acts_refuses_a_time_still_to_come(
    inst: Installation, capsys: Capsys, command: tuple[str, str]
) -> None:
    """A breach notice for a deadline not reached, a ticket closed or anonymised
    early: what a sweep does at a future --now would stay done."""
    number = inst.ingest(make_mail()).ticket
    inst.send_outbox()
    sent = len(inst.sent())
    capsys.readouterr()
    later = (inst.clock() + timedelta(days=400)).isoformat()
    assert inst.cli(*command, "--now", later) == 1
    assert "is later than now" in capsys.readouterr().err
    assert inst.send_outbox() == 0 and len(inst.sent()) == sent  # nothing sent
    with inst.session() as s:
        ticket = s.scalar(select(Ticket).where(Ticket.number == number))
        assert ticket is not None
        assert (ticket.status, ticket.level, ticket.anonymised_at) == ("new", "L1", None)
    earlier = (inst.clock() - timedelta(minutes=1)).isoformat()
    assert inst.cli(*command, "--now", earlier) == 0  # a catch-up is fine


def test_a_retention_dry_run_may_look_ahead(inst: Installation, capsys: Capsys) -> None:
    inst.ingest(make_mail())
    later = (inst.clock() + timedelta(days=4000)).isoformat()
    assert inst.cli("retention", "run", "--dry-run", "--now", later) == 0
    assert "would anonymise" in capsys.readouterr().out


def test_a_schema_newer_than_this_version_is_named_so(inst: Installation, capsys: Capsys) -> None:
    """An old version on a database a newer one upgraded (a rolling upgrade, a
    rollback): told to install the newer version, not to run `db upgrade`, which
    knows no way there and used to end in an Alembic traceback."""
    with inst.app.engine.begin() as conn:
        conn.execute(text("UPDATE alembic_version SET version_num = '0099'"))
    inst.app.engine.dispose()
    newer = f"database schema is at 0099, newer than this mailgate ({head_revision()})"
    for command in (("db", "upgrade"), ("tickets", "list")):
        assert inst.cli(*command) == 1, command
        err = capsys.readouterr().err
        assert "Traceback" not in err
        assert err.startswith(f"error: {newer}"), err
        assert "db upgrade" not in err


def test_tickets_show_and_rules_test_print_values_not_python_reprs(
    inst: Installation, capsys: Capsys, tmp_path: Path
) -> None:
    # `tickets show` printed "urgent False", "assignee None", "tags ['login']" and
    # "45 min in 1 entries"; `rules test` printed "urgent False" and "tags ['login']".
    number = inst.ingest(make_mail(subject="Cannot log in", body="Nobody can log in.")).ticket
    assert inst.cli("credits", "spend", number, "45m") == 0
    capsys.readouterr()
    assert inst.cli("tickets", "show", number) == 0
    shown = dict(line.split(None, 1) for line in capsys.readouterr().out.split("\n\n")[0]
                 .splitlines() if not line.startswith((" ", "time spent")))  # fmt: skip
    assert (shown["urgent"], shown["assignee"], shown["group"]) == ("no", "-", "-")
    assert shown["tags"] == "outage, login"
    assert shown["cc"] == "-"
    capsys.readouterr()
    assert inst.cli("tickets", "show", number) == 0
    assert "time spent    45 min in 1 entry\n" in capsys.readouterr().out
    eml = tmp_path / "mail.eml"
    eml.write_bytes(make_mail(subject="Cannot log in", body="Nobody can log in.").as_bytes())
    assert inst.cli("rules", "test", str(eml)) == 0
    tested = capsys.readouterr().out
    assert "\nurgent    no\n" in tested and "\ntags      outage, login\n" in tested
