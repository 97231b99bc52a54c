"""Data protection: retention, export and erasure (RELIABILITY §6, checklist 42 and 43).

The proof is a search: after retention or an erasure, the bytes of the
database file and of everything under data_dir (and the daemon's log) hold
neither the person's address nor their name. Outbound mail goes to a Maildir
outside data_dir here: it is the hand-over to delivery, like a relay's queue.
"""

from __future__ import annotations

import io
import json
import re
import subprocess
import sys
import time
import zipfile
from collections.abc import Callable
from datetime import timedelta
from email.message import EmailMessage
from pathlib import Path
from typing import Any

import pytest
import yaml
from sqlalchemy import func, select, text
from sqlalchemy.orm import Session

from mailgate.cli import main
from mailgate.observability import TextFormatter, address_hasher, set_log_key, setup_logging
from mailgate.outbound.mailer import alert_key
from mailgate.privacy import retention
from mailgate.privacy.pseudonyms import Pseudonyms
from mailgate.sla.report import sla_report
from mailgate.store.models import (
    Article,
    AttachmentRow,
    Contact,
    Erasure,
    IngestRecord,
    OutboxMail,
    SlaClock,
    State,
    Ticket,
    TicketEvent,
)
from mailgate.tickets.changes import set_status
from tests.conftest import (
    NOW,
    ROOT,
    Clockwork,
    Installation,
    deep_update,
    install_at,
    make_mail,
    reply_to,
    staff_answer,
)

ALICE = ("alice@acme.example", "Alice Martin")
CAROL = ("carol@acme.example", "Carol Petit")
OUTSIDE = {"outbound": {"maildir": "outgoing"}}  # not under data_dir (var/)


def traces(inst: Installation, *needles: str, log: Path | None = None) -> list[str]:
    """Files (database, data_dir, log) whose bytes contain any needle, any case.
    On PostgreSQL, the database's part is a data dump and every bytea value."""
    contents = {}
    if inst.app.engine.dialect.name == "postgresql":
        contents["pg_dump"] = pg_dump(inst.app.settings.database_url)
        with inst.app.engine.connect() as conn:
            for table, column in (("blobs", "data"), ("outbox", "data")):
                rows = conn.execute(text(f"SELECT {column} FROM {table}"))
                contents[f"{table}.{column}"] = b"\n".join(bytes(r[0] or b"") for r in rows)
    inst.app.engine.dispose()  # SQLite checkpoints its WAL into the file
    files = [p for p in (inst.root / "var").rglob("*") if p.is_file()]
    files += [log] if log is not None else []
    contents |= {str(p.relative_to(inst.root.parent)): p.read_bytes() for p in files}
    return [f"{where}: {n}" for where, data in contents.items() for n in needles
            if n.lower().encode() in data.lower()]  # fmt: skip


def pg_dump(url: str) -> bytes:
    from tests.postgres import _bin

    dsn = url.replace("postgresql+psycopg://", "postgresql://")
    return subprocess.run([_bin("pg_dump"), "--data-only", dsn], check=True,
                          capture_output=True, timeout=60).stdout  # fmt: skip


def with_attachment(**kwargs: Any) -> EmailMessage:
    mail = make_mail(**kwargs)
    mail.add_alternative("<p>Hello, <b>Alice Martin</b> here</p>", subtype="html")
    mail.add_attachment(b"%PDF-1.4 Alice Martin's invoice", maintype="application",
                        subtype="pdf", filename="alice-invoice.pdf")  # fmt: skip
    return mail


def two_froms(message_id: str) -> bytes:
    raw = make_mail(message_id=message_id).as_bytes()
    return raw.replace(b"From: ", b"From: Mallory <mallory@evil.example>\nFrom: ", 1)


def close(inst: Installation, number: str) -> None:
    with inst.session() as s, s.begin():
        ticket = s.scalar(select(Ticket).where(Ticket.number == number))
        set_status(s, ticket, "closed", now=inst.clock(), actor_kind="staff",
                   actor="bob@support.example", reason="done")  # fmt: skip


def totals(inst: Installation, capsys: pytest.CaptureFixture[str]) -> tuple[Any, Any]:
    """What reporting and accounting see: the SLA report and the credit statement."""
    with inst.session() as s:
        report = [r.as_dict() for r in sla_report(s, inst.clock(), organisation="acme")]
    capsys.readouterr()
    assert inst.cli("credits", "statement", "acme", "--json", "--now",
               inst.clock().isoformat()) == 0  # fmt: skip
    statement = json.loads(capsys.readouterr().out)
    return report, {k: statement[k] for k in ("opening", "closing", "totals")}


def everyone_but_dave_leaves_acme(inst: Installation) -> None:
    """Alice and Carol have left ACME: a directory sync makes them inactive."""
    directory = yaml.safe_load((ROOT / "directory.yaml").read_text())
    directory["organisations"][0]["contacts"] = [
        {"email": "dave@acme.example", "name": "Dave Roux", "role": "admin"}
    ]
    (inst.root / "directory.yaml").write_text(yaml.safe_dump(directory))
    assert inst.cli("directory", "sync") == 0


def a_year_of_support(inst: Installation, clock: Clockwork) -> str:
    """Alice opens a ticket with HTML and an attachment, copies Carol, and names
    herself in its subject; Bob answers, spends time and waits on the customer;
    Carol's reply opens it again (an event naming her); the ticket is closed.
    Returns its tracking number."""
    assert inst.cli("credits", "add", "acme", "10h", "--activated", "2026-11-01") == 0
    first = with_attachment(to="support@example.com, Carol Petit <carol@acme.example>",
                            subject="Alice Martin cannot log in")  # fmt: skip
    number = inst.ingest(first).ticket
    clock.now += timedelta(minutes=30)
    answer = "/spend 45m\n/status waiting\nHello Alice, fixed.\n"
    inst.ingest(staff_answer(inst, answer, "bob-1@support.example"))
    carol = reply_to(first, sender="Carol Petit <carol@acme.example>", body="Thanks Alice!\n",
                     message_id="carol-1@acme.example")  # fmt: skip
    assert inst.ingest(carol).ticket == number
    inst.send_outbox()
    close(inst, number)
    return number


# --- pseudonyms ---------------------------------------------------------------------


def test_pseudonyms_replace_addresses_and_names_but_keep_staff_and_ours() -> None:
    names = Pseudonyms(keep=frozenset({"bob@support.example"}), keep_domain="example.com")
    names.forget("Alice@Acme.example", "Alice Martin")
    text = names.text(
        "Alice Martin <alice@acme.example> wrote to bob@support.example and "
        "support@example.com, cc dan@other.example. Regards, Alice. (Malice is a word.)"
    )
    assert text == (
        "Person 1 <person-1@anonymised.invalid> wrote to bob@support.example and "
        "support@example.com, cc person-2@anonymised.invalid. Regards, Person 1. "
        "(Malice is a word.)"
    )
    only = Pseudonyms(forget_everyone=False)
    only.forget("carol@acme.example", "Carol Petit")
    assert only.text("Carol Petit and dan@other.example") == ("Person 1 and dan@other.example")


def test_pseudonyms_read_a_megabyte_without_an_address_in_linear_time() -> None:
    """Ticket text is written by strangers: a megabyte of letters with no "@" cost the
    address search about an hour (quadratic); it is one pass now. The address found
    after such a run is still the whole address."""
    names = Pseudonyms()
    text = "a" * 1_000_000 + " then eve@evil.example, x.y@z" + "-" * 1_000_000
    started = time.monotonic()
    out = names.text(text)
    assert time.monotonic() - started < 5  # quadratic: about an hour
    assert out == "a" * 1_000_000 + " then person-1@anonymised.invalid, x.y@z" + "-" * 1_000_000


# --- retention (checklist 42) -------------------------------------------------------


def test_a_ticket_past_retention_keeps_its_figures_and_loses_its_people(
    install: Any, clock: Clockwork, capsys: pytest.CaptureFixture[str]
) -> None:
    inst = install(settings=OUTSIDE)
    number = a_year_of_support(inst, clock)
    clock.now = NOW + timedelta(days=366)  # a year and a day later
    everyone_but_dave_leaves_acme(inst)
    before = totals(inst, capsys)

    capsys.readouterr()
    assert inst.cli("retention", "run", "--dry-run", "--now", clock.now.isoformat()) == 0
    assert f"would anonymise 1 ticket(s): {number}" in capsys.readouterr().out
    with inst.session() as s:
        assert s.scalar(select(Ticket.anonymised_at).where(Ticket.number == number)) is None

    assert inst.cli("retention", "run", "--now", clock.now.isoformat()) == 0
    assert "1 ticket(s) anonymised" in capsys.readouterr().out
    with inst.session() as s:
        ticket = s.scalar(select(Ticket).where(Ticket.number == number))
        articles = list(s.scalars(select(Article).where(Article.ticket_id == ticket.id)))
        assert (ticket.organisation_id, ticket.priority) == ("acme", "P1")
        assert ticket.anonymised_at == clock.now and ticket.closed_at is not None
        assert all(a.raw_sha256 is None and a.html is None for a in articles)
        assert s.scalar(select(func.count()).select_from(AttachmentRow)) == 0
        sent = s.scalars(select(OutboxMail.data).where(OutboxMail.ticket_id == ticket.id))
        assert list(sent) and all(data is None for data in sent)
        assert s.scalar(select(func.count()).where(SlaClock.ticket_id == ticket.id)) > 0
        customer = next(a for a in articles if a.direction == "in" and "Carol" not in a.text)
        assert customer.author_email == "person-1@anonymised.invalid"
        carol = next(a for a in articles if "Thanks" in a.text)
        assert (carol.author_email, carol.text) == ("person-2@anonymised.invalid",
                                                    "Thanks Person 1!\n")  # fmt: skip
        # Bob stays named: staff are needed for the time and credit reports.
        assert any(a.author_email == "bob@support.example" for a in articles)
    assert totals(inst, capsys) == before
    assert traces(inst, *ALICE, *CAROL, "alice-invoice") == []


def test_an_anonymised_ticket_no_longer_points_at_a_customer_still_in_the_directory(
    install: Any, clock: Clockwork, capsys: pytest.CaptureFixture[str]
) -> None:
    inst = install(settings=OUTSIDE)
    number = a_year_of_support(inst, clock)
    clock.now = NOW + timedelta(days=366)  # Alice is still ACME's admin
    assert inst.cli("retention", "run", "--now", clock.now.isoformat()) == 0
    capsys.readouterr()
    assert inst.cli("tickets", "show", number, "--json") == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["requester"] is None
    assert all(a.endswith("@anonymised.invalid") for a in shown["cc"])
    assert inst.cli("gdpr", "export", ALICE[0]) == 0
    assert number not in capsys.readouterr().out  # not hers any more: nobody's


def test_a_contact_the_directory_lists_as_inactive_keeps_their_record(
    install: Any, clock: Clockwork, capsys: pytest.CaptureFixture[str]
) -> None:
    # Dave is suspended (listed, `active: false`); Alice and Carol have left ACME.
    inst = install(settings=OUTSIDE)
    a_year_of_support(inst, clock)
    clock.now = NOW + timedelta(days=366)
    directory = yaml.safe_load((ROOT / "directory.yaml").read_text())
    directory["organisations"][0]["contacts"] = [
        {"email": "dave@acme.example", "name": "Dave Roux", "role": "admin", "active": False}
    ]
    (inst.root / "directory.yaml").write_text(yaml.safe_dump(directory))
    assert inst.cli("directory", "sync") == 0

    counts = []
    for _ in range(3):  # hourly runs, with a sync (a reload) between them
        assert inst.cli("retention", "run", "--now", clock.now.isoformat()) == 0
        assert inst.cli("directory", "sync") == 0
        with inst.session() as s:
            counts.append(s.scalar(select(func.count()).select_from(Contact)))
            contacts = {c.email: (c.name, c.active) for c in s.scalars(select(Contact))}
        assert contacts["dave@acme.example"] == ("Dave Roux", False)
        assert ALICE[0] not in contacts and CAROL[0] not in contacts  # gone: forgotten
    assert counts[0] == counts[-1]  # no new record of Dave at every sync


def test_a_retention_run_killed_half_way_finishes_without_doing_anything_twice(
    install: Any, clock: Clockwork, monkeypatch: pytest.MonkeyPatch
) -> None:
    inst = install(settings=OUTSIDE)
    numbers = []
    for n in range(5):
        mail = with_attachment(message_id=f"old-{n}@acme.example", subject=f"Old {n}")
        numbers.append(inst.ingest(mail).ticket)
        close(inst, numbers[-1])
    clock.now = NOW + timedelta(days=400)
    real, calls = retention.drop_unreferenced, []

    def killed_on_the_third(*args: Any) -> int:
        calls.append(1)
        dropped = real(*args)  # the files are gone...
        if len(calls) == 3:
            raise KeyboardInterrupt  # ...and the run dies before that ticket commits
        return dropped

    monkeypatch.setattr(retention, "drop_unreferenced", killed_on_the_third)
    with pytest.raises(KeyboardInterrupt):
        retention.run(inst.app, clock.now)
    monkeypatch.setattr(retention, "drop_unreferenced", real)
    with inst.session() as s:
        done = set(s.scalars(select(Ticket.number).where(Ticket.anonymised_at.is_not(None))))
    assert done == set(numbers[:2])

    second = retention.run(inst.app, clock.now)
    assert second.tickets == numbers[2:]  # the interrupted one again, then the rest
    assert retention.run(inst.app, clock.now).tickets == []
    with inst.session() as s:
        marks = s.execute(
            select(TicketEvent.ticket_id, func.count())
            .where(TicketEvent.field == "anonymised")
            .group_by(TicketEvent.ticket_id)
        ).all()
        assert len(marks) == 5 and {n for _, n in marks} == {1}
        assert s.scalar(select(func.count()).where(Article.raw_sha256.is_not(None))) == 0
    assert not [p for p in (inst.root / "var" / "blobs").rglob("*") if p.is_file()]


def test_an_organisation_may_keep_tickets_for_less_time_and_open_tickets_stay(
    install: Any, clock: Clockwork
) -> None:
    inst = install(settings={**OUTSIDE, "retention": {"organisations": {"globex": {
        "closed_days": 30}}}})  # fmt: skip
    acme = inst.ingest(make_mail(message_id="a@acme.example")).ticket
    globex = inst.ingest(make_mail(sender="Hank Scorpio <hank@globex.example>",
                                   message_id="g@globex.example")).ticket  # fmt: skip
    inst.ingest(make_mail(sender="Hank Scorpio <hank@globex.example>",  # open: never touched
                          message_id="g2@globex.example", subject="Still open"))  # fmt: skip
    close(inst, acme)
    close(inst, globex)
    clock.now = NOW + timedelta(days=400)
    assert retention.run(inst.app, NOW + timedelta(days=31)).tickets == [globex]
    assert retention.run(inst.app, clock.now).tickets == [acme]
    with inst.session() as s:
        still = s.scalar(select(Ticket).where(Ticket.subject == "Still open"))
        assert still.anonymised_at is None and still.requester.email == "hank@globex.example"


def someone_waits(
    session: Session, seconds: float = 20, unless: Callable[[], bool] = lambda: False
) -> bool:
    """Wait until another PostgreSQL session waits for a lock this one holds."""
    waiting = text("SELECT count(*) FROM pg_locks WHERE NOT granted")
    deadline = time.monotonic() + seconds
    while not session.scalar(waiting) and not unless() and time.monotonic() < deadline:
        time.sleep(0.05)
    return bool(session.scalar(waiting))


def test_tickets_reopened_while_retention_waits_for_them_are_left_alone(
    tmp_path: Path, clock: Clockwork, postgres: Any
) -> None:
    """Two instances: retention lists the tickets due, then takes each one's row
    lock. Staff change them in between (the rows locked by their transaction):
    one reopened, one reopened and closed again today. Once it holds the locks,
    retention must judge the tickets as they are, not as it listed them."""
    import threading

    inst = install_at(tmp_path, clock, {**OUTSIDE, "database_url": postgres.fresh_database()})
    numbers = [inst.ingest(make_mail(message_id=f"reopen-{n}@acme.example",
                                     subject=f"Old {n}")).ticket for n in range(2)]  # fmt: skip
    for number in numbers:
        close(inst, number)
    clock.now = NOW + timedelta(days=400)
    found: list[retention.RetentionReport] = []
    with inst.session() as staff, staff.begin():
        tickets = list(staff.scalars(select(Ticket).order_by(Ticket.id).with_for_update()))
        run = threading.Thread(target=lambda: found.append(retention.run(inst.app, clock.now)))
        run.start()
        assert someone_waits(staff), "retention never waited for a ticket's lock"
        by_bob = {"now": clock.now, "actor_kind": "staff", "actor": "bob@support.example"}
        set_status(staff, tickets[0], "open", reason="/status open", **by_bob)
        set_status(staff, tickets[1], "open", reason="/status open", **by_bob)
        set_status(staff, tickets[1], "closed", reason="/status closed", **by_bob)
    run.join(30)
    assert found and found[0].tickets == []
    with inst.session() as s:
        kept = list(s.scalars(select(Ticket).order_by(Ticket.id)))
        assert [(t.status, t.anonymised_at) for t in kept] == [("open", None), ("closed", None)]
        assert all(t.requester is not None and t.requester.email == ALICE[0] for t in kept)


LOGO = b"\x89PNG ACME logo, in every signature"


def with_logo(**kwargs: Any) -> EmailMessage:
    mail = make_mail(**kwargs)
    mail.add_attachment(LOGO, maintype="image", subtype="png", filename="logo.png")
    return mail


def test_retention_never_deletes_an_attachment_a_mail_in_progress_stores_again(
    tmp_path: Path, clock: Clockwork, postgres: Any
) -> None:
    """Attachments are stored by content, so the logo in everyone's signature is
    one blob. Retention anonymises an old ticket that holds it while another
    instance stores a reply carrying the same logo: the reply's blob was
    written (already there), its row not yet committed. Retention saw no row
    and deleted the bytes, and the reply was answered 250 without them."""
    import hashlib
    import threading

    inst = install_at(tmp_path, clock, {**OUTSIDE, "database_url": postgres.fresh_database()})
    old = inst.ingest(with_logo(message_id="old@acme.example", subject="Old")).ticket
    close(inst, old)
    clock.now = NOW + timedelta(days=400)
    current = make_mail(message_id="current@acme.example", subject="Current")
    number = inst.ingest(current).ticket
    reply = reply_to(current, sender="Alice Martin <alice@acme.example>",
                     message_id="reply@acme.example")  # fmt: skip
    reply.add_attachment(LOGO, maintype="image", subtype="png", filename="logo.png")
    stored: list[str] = []
    with inst.session() as staff, staff.begin():
        # Staff hold the current ticket: the reply waits with its logo written
        # and its rows not committed, as a slow unit of work on another instance.
        staff.scalar(select(Ticket).where(Ticket.number == number).with_for_update())
        intake = threading.Thread(target=lambda: stored.append(inst.ingest(reply).outcome))
        intake.start()
        assert someone_waits(staff), "the reply never waited"
        assert retention.run(inst.app, clock.now).tickets == [old]
    intake.join(30)
    assert stored == ["threaded"]
    assert inst.app.blobs.get(hashlib.sha256(LOGO).hexdigest()) == LOGO


def test_retention_keeps_an_attachment_a_newer_ticket_holds_too(
    install: Any, clock: Clockwork
) -> None:
    """The logo in everyone's signature is one blob: anonymising the old ticket
    that holds it leaves the bytes to the newer ticket that holds them too."""
    inst = install(settings=OUTSIDE)
    old = inst.ingest(with_logo(message_id="old@acme.example", subject="Old")).ticket
    close(inst, old)
    clock.now = NOW + timedelta(days=400)
    current = inst.ingest(with_logo(message_id="now@acme.example", subject="Current")).ticket
    assert retention.run(inst.app, clock.now).tickets == [old]
    with inst.session() as s:
        (logo,) = s.scalars(
            select(AttachmentRow).join(Article).join(Ticket).where(Ticket.number == current)
        )
    assert logo.filename == "logo.png"
    assert inst.app.blobs.get(logo.sha256) == LOGO


def test_old_quarantined_and_rejected_mail_is_deleted(install: Any, clock: Clockwork) -> None:
    inst = install(settings={**OUTSIDE, "retention": {"quarantine_days": 30}})
    stranger = make_mail(sender="Eve <eve@stranger.example>", message_id="e1@stranger.example")
    assert inst.ingest(stranger).outcome == "rejected"
    assert inst.ingest(two_froms("q1@acme.example")).outcome == "quarantined"
    clock.now = NOW + timedelta(days=20)
    recent = make_mail(sender="Eve <eve@stranger.example>", message_id="e2@stranger.example")
    inst.ingest(recent)
    # quarantine_days is 30: a minute before, nothing has expired yet.
    assert retention.run(inst.app, NOW + timedelta(days=30, minutes=-1)).records == 0
    report = retention.run(inst.app, NOW + timedelta(days=31))
    assert report.records == 2
    with inst.session() as s:
        left = list(s.scalars(select(IngestRecord.message_id)))
    assert left == ["e2@stranger.example"]


def test_a_quarantined_mail_delivered_twice_goes_with_its_copy(
    install: Any, clock: Clockwork
) -> None:
    """An MTA that lost our 250 delivers the held mail again: the copy is recorded
    as a duplicate holding the same raw bytes, and must expire with the original."""
    inst = install(settings={**OUTSIDE, "retention": {"quarantine_days": 30}})
    assert inst.ingest(two_froms("q1@acme.example")).outcome == "quarantined"
    assert inst.ingest(two_froms("q1@acme.example")).outcome == "duplicate"
    assert retention.run(inst.app, NOW + timedelta(days=31), dry_run=True).records == 2
    report = retention.run(inst.app, NOW + timedelta(days=31))
    assert report.records == 2 and report.blobs == 1
    with inst.session() as s:
        assert s.scalar(select(func.count()).select_from(IngestRecord)) == 0
    assert traces(inst, "q1@acme.example") == []  # its bytes, anywhere


def test_two_retention_runs_at_once_never_count_a_mail_twice(
    tmp_path: Path, clock: Clockwork, postgres: Any
) -> None:
    """The leader's hourly run and an operator's `mailgate retention run`: while
    one deletes a held mail (its row locked), the other must pass over it, not
    wait and then count a row that is gone (SQLAlchemy's "expected to delete 1
    row(s); 0 were matched")."""
    import threading
    import warnings

    from mailgate.privacy.forget import Forgotten, delete_record

    url = postgres.fresh_database()
    inst = install_at(tmp_path, clock, {**OUTSIDE, "database_url": url})
    for n in range(3):
        assert inst.ingest(two_froms(f"held-{n}@acme.example")).outcome == "quarantined"
    later = NOW + timedelta(days=31)
    found: list[retention.RetentionReport] = []
    caught: list[warnings.WarningMessage] = []

    def other_run() -> None:
        with warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always")
            found.append(retention.run(inst.app, later))
        caught.extend(seen)

    with inst.session() as first, first.begin():
        oldest = select(IngestRecord).order_by(IngestRecord.id).limit(1)
        record = first.scalar(oldest.with_for_update())
        run = threading.Thread(target=other_run)
        run.start()
        someone_waits(first, seconds=5, unless=lambda: not run.is_alive())
        delete_record(first, record, Forgotten())  # the first run deletes it
    run.join(30)
    assert found and found[0].records == 2
    assert [str(w.message) for w in caught] == []
    with inst.session() as s:
        assert s.scalar(select(func.count()).select_from(IngestRecord)) == 0


def test_mail_on_no_ticket_and_notices_to_strangers_expire_too(
    install: Any, clock: Clockwork, capsys: pytest.CaptureFixture[str]
) -> None:
    """Checklist 42 for what never became part of a ticket: Alice's out-of-office
    answer to her acknowledgement (ignored, on no ticket) and the rejection
    notice sent to a stranger. After `quarantine_days`, neither the mail nor
    the notice may still hold an address, a phone number or bytes."""
    inst = install(settings={**OUTSIDE, "retention": {"quarantine_days": 30}})
    first = make_mail()
    number = inst.ingest(first).ticket
    inst.send_outbox()
    ack = next(m for m in inst.sent() if ALICE[0] in str(m["To"]))
    away = reply_to(ack, sender="Alice Martin <alice@acme.example>", message_id="away@acme.example",
                    body="Out of the office until Monday; mobile +33 6 12 34 56 78\n")  # fmt: skip
    away["Auto-Submitted"] = "auto-replied"
    assert inst.ingest(away).outcome == "ignored"
    stranger = make_mail(sender="Eve <eve@stranger.example>", message_id="e1@stranger.example")
    assert inst.ingest(stranger).outcome == "rejected"
    inst.send_outbox()
    close(inst, number)
    clock.now = NOW + timedelta(days=366)
    everyone_but_dave_leaves_acme(inst)
    assert inst.cli("retention", "run", "--now", clock.now.isoformat()) == 0
    assert "1 ticket(s) anonymised" in capsys.readouterr().out
    assert traces(inst, ALICE[0], "+33 6 12", "eve@stranger.example") == []


# --- export ---------------------------------------------------------------------


def test_export_has_both_tickets_the_attachment_and_the_cc_and_nobody_else(
    install: Any, clock: Clockwork, capsys: pytest.CaptureFixture[str]
) -> None:
    inst = install(settings=OUTSIDE)
    # Alice's own ticket, which copies Carol; Carol answers on it.
    mine = make_mail(to="support@example.com, Carol Petit <carol@acme.example>",
                     message_id="mine@acme.example", subject="Export fails",
                     body="Nobody can log in; carol sees it too.\n")  # fmt: skip
    first = inst.ingest(mine).ticket
    inst.ingest(reply_to(mine, sender="Carol Petit <carol@acme.example>",
                         body="Carol here: same for me, call me on 0470 12 34 56.\n",
                         message_id="carol-2@acme.example"))  # fmt: skip
    # Hank's ticket (Globex) is nothing of Alice's.
    inst.ingest(make_mail(sender="Hank Scorpio <hank@globex.example>", message_id="h@g.example"))
    # Alice's second ticket, with an attachment.
    second = inst.ingest(with_attachment(message_id="att@acme.example", subject="Invoice")).ticket
    out = inst.root / "alice.zip"
    assert inst.cli("gdpr", "export", ALICE[0], "--format", "zip", "-o", str(out)) == 0
    archive = zipfile.ZipFile(io.BytesIO(out.read_bytes()))
    data = json.loads(archive.read("export.json"))
    assert data["contact"]["name"] == ALICE[1]
    assert (data["contact"]["role"], data["contact"]["referent"]) == ("admin", False)
    assert [t["number"] for t in data["tickets"]] == [first, second]
    assert data["tickets"][0]["role"] == "requester"
    assert data["other_mail"] == []  # every mail of hers is on one of those tickets
    texts = [a["text"] for t in data["tickets"] for a in t["articles"]]
    assert "Nobody can log in; someone else sees it too.\n" in texts  # her first name, any case
    attachment = data["tickets"][1]["articles"][0]["attachments"][0]
    assert archive.read(attachment["file"]) == b"%PDF-1.4 Alice Martin's invoice"
    everything = b"".join(archive.read(name) for name in archive.namelist()).lower()
    for other in ("carol", "petit", "0470 12 34 56", "hank", "globex"):
        assert other.encode() not in everything, other

    # Carol's own export: copied on Alice's ticket; her article is there, Alice's name is not.
    capsys.readouterr()
    assert inst.cli("gdpr", "export", CAROL[0]) == 0
    carol = json.loads(capsys.readouterr().out)
    assert [(t["number"], t["role"]) for t in carol["tickets"]] == [(first, "copied")]
    assert any("0470 12 34 56" in a["text"] for a in carol["tickets"][0]["articles"])
    assert "alice" not in json.dumps(carol).lower()


# --- erasure (checklist 43) -------------------------------------------------------


def test_erase_leaves_no_trace_in_database_data_dir_quarantine_or_log(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from tests.daemon import start_daemon
    from tests.smtp_sink import Sink

    sink = Sink().start()
    try:
        daemon = start_daemon(tmp_path, sink)
        # Bought today: the daemon runs on the wall clock.
        config = str(daemon.inst.settings_file)
        assert main(["--config", config, "credits", "add", "acme", "10h"]) == 0
        with daemon.smtp() as smtp:
            for mail in (with_attachment(message_id="e1@acme.example", subject="Broken export"),
                         make_mail(message_id="e2@acme.example", subject="Second question",
                                   to="support@example.com, carol@acme.example")):  # fmt: skip
                smtp.send_message(mail)
            # Two From fields: held as "ambiguous sender", with no sender recorded.
            smtp.sendmail(ALICE[0], ["support@example.com"], two_froms("e3@acme.example"))
        inst = daemon.inst
        inst.app.send_outbox()
        daemon.stop()
    finally:
        sink.stop()
    with inst.session() as s:
        outcomes = sorted(s.scalars(select(IngestRecord.outcome)))
    assert outcomes == ["created", "created", "quarantined"]
    log = daemon.log_file
    assert ALICE[0] not in log.read_text()  # hashed from the start (no -v)
    set_log_key(inst.app.log_key)
    assert address_hasher(inst.app.log_key)(ALICE[0]) in log.read_text()
    assert traces(inst, ALICE[0], log=log), "the test would prove nothing"
    before = totals(inst, capsys)

    capsys.readouterr()
    assert inst.cli("gdpr", "erase", ALICE[0]) == 1  # without --yes: only what it would do
    assert "would erase: 2 ticket(s)" in capsys.readouterr().out
    assert inst.cli("gdpr", "erase", ALICE[0], "--yes") == 0
    out = capsys.readouterr()
    assert "erased: 2 ticket(s)" in out.out and "still lists this address" in out.err
    with inst.session() as s:
        assert s.scalar(select(func.count()).select_from(Ticket)) == 2  # kept for ACME
        assert s.scalar(select(func.count()).where(IngestRecord.outcome == "quarantined")) == 0
        erasure = s.scalar(select(Erasure))
        assert (erasure.tickets, erasure.records) == (2, 1)
        carol = s.scalar(select(Contact).where(Contact.email == CAROL[0]))
        assert carol is not None and carol.name == CAROL[1]  # Carol is not erased
        # The sending host (a home server can name a person) is not kept either.
        assert all("client_address" not in e for e in s.scalars(select(IngestRecord.envelope)))
    assert traces(inst, *ALICE, "alice-invoice", log=log) == []
    assert totals(inst, capsys) == before
    assert inst.cli("gdpr", "export", ALICE[0]) == 1  # nothing left to export


def test_erasing_carol_keeps_alice_s_html_and_attachment(
    inst: Installation, clock: Clockwork
) -> None:
    """Only the erased person's files and HTML go: Alice's invoice stays on the ticket
    she opened when Carol, copied on it, is erased."""
    a_year_of_support(inst, clock)
    assert inst.cli("gdpr", "erase", CAROL[0], "--yes") == 0
    with inst.session() as s:
        (first,) = s.scalars(select(Article).where(Article.message_id == "req-1@acme.example"))
        assert first.html is not None and "Alice Martin" in first.html
        (invoice,) = first.attachments
        assert invoice.filename == "alice-invoice.pdf"
        assert inst.app.blobs.get(invoice.sha256) == b"%PDF-1.4 Alice Martin's invoice"


def test_erase_reaches_every_copy_of_held_mail_that_names_the_person(
    install: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    """Held as "ambiguous sender" (no sender recorded), then delivered again by an
    MTA that lost our 250: the copy is a duplicate record with the same bytes."""
    inst = install()
    assert inst.ingest(two_froms("q2@acme.example")).outcome == "quarantined"
    assert inst.ingest(two_froms("q2@acme.example")).outcome == "duplicate"
    assert inst.cli("gdpr", "erase", ALICE[0], "--yes") == 0
    assert "2 received mail(s) rewritten or deleted" in capsys.readouterr().out
    assert traces(inst, ALICE[0]) == []


def test_erase_reaches_the_operator_alert_about_the_person(
    install: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    """The circuit breaker tells staff about Alice: that mail is to staff, on no
    ticket, and its bytes and the alert's once-a-day mark name her."""
    loops = {"hygiene": {"loops": {"tickets_per_sender_per_hour": 1}}}
    inst = install(settings=deep_update(loops, OUTSIDE))
    assert inst.ingest(make_mail(message_id="b1@acme.example")).outcome == "created"
    tripped = inst.ingest(make_mail(message_id="b2@acme.example", subject="Again"))
    assert tripped.reason.startswith("circuit breaker")
    inst.send_outbox()
    with inst.session() as s:
        alert = s.scalar(select(OutboxMail).where(OutboxMail.kind == "operator_alert"))
        assert alert is not None and ALICE[0].encode() in alert.data
    assert inst.cli("gdpr", "erase", ALICE[0], "--yes") == 0
    assert traces(inst, ALICE[0]) == []
    with inst.session() as s:
        keys = list(s.scalars(select(State.key)))
    assert alert_key(ALICE[0]) not in keys  # a plain hash of her address, reversible


def test_mail_still_queued_that_names_the_person_is_not_sent_after_the_erasure(
    install: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    """Bob's answer to Alice, copying Carol, waits in the outbox (a relay down)
    when Alice is erased: it must not reach her, nor carry her to Carol."""
    inst = install(settings=OUTSIDE)
    first = make_mail(to="support@example.com, Carol Petit <carol@acme.example>")
    number = inst.ingest(first).ticket
    delivered = len(inst.sent())  # the ack and the staff notice, before the erasure
    inst.ingest(staff_answer(inst, "Hello Alice Martin, fixed.\n", "bob-2@support.example"))
    with inst.session() as s:
        queued = s.scalar(select(OutboxMail).where(OutboxMail.status == "queued"))
        assert queued is not None and ALICE[0] in queued.recipients, "nothing would be tested"
        assert CAROL[0] in queued.recipients and number in queued.data.decode()
    assert inst.cli("gdpr", "erase", ALICE[0], "--yes") == 0
    assert "erased: 1 ticket(s)" in capsys.readouterr().out
    after = inst.sent()[delivered:]
    assert [m for m in after if "alice" in m.as_string().lower()] == []
    with inst.session() as s:
        assert s.scalar(select(func.count()).where(OutboxMail.status == "queued")) == 0
    assert traces(inst, ALICE[0], "Martin") == []


def test_erase_keeps_a_change_staff_make_meanwhile_on_another_instance(
    tmp_path: Path, clock: Clockwork, postgres: Any
) -> None:
    """Alice's ticket copies Carol. While Carol is being erased, staff copy Dave
    on it (their transaction holds the row). The erasure must rewrite the ticket
    as it is after that change, not write back the list it read before."""
    import threading

    inst = install_at(tmp_path, clock, {**OUTSIDE, "database_url": postgres.fresh_database()})
    mail = make_mail(message_id="cc@acme.example", to="support@example.com, " + CAROL[0])
    result = inst.ingest(mail)
    assert result.outcome == "created", result.reason
    number = result.ticket
    done: list[int] = []
    with inst.session() as staff, staff.begin():
        ticket = staff.scalar(select(Ticket).where(Ticket.number == number).with_for_update())
        assert ticket.cc == [CAROL[0]]
        erase = threading.Thread(
            target=lambda: done.append(inst.cli("gdpr", "erase", CAROL[0], "--yes"))
        )
        erase.start()
        someone_waits(staff)
        ticket.cc = [*ticket.cc, "dave@acme.example"]  # /cc dave@acme.example
    erase.join(30)
    assert done == [0]
    with inst.session() as s:
        cc = s.scalar(select(Ticket.cc).where(Ticket.number == number))
    assert cc == ["person-1@anonymised.invalid", "dave@acme.example"]


def test_a_contact_at_an_internationalised_domain_is_found_and_erased(
    tmp_path: Path, clock: Clockwork, capsys: pytest.CaptureFixture[str]
) -> None:
    """The directory lists jurgen@bücher.example; his mail arrives from
    jurgen@xn--bcher-kva.example (IDNA, what MTAs carry). The directory kept the
    Unicode form and intake compares the ASCII one: his mail was rejected as
    "not in the directory", and `gdpr erase` with the address as listed left
    that mail behind."""
    directory = yaml.safe_load((ROOT / "directory.yaml").read_text())
    directory["organisations"][0]["contacts"].append(
        {"email": "jurgen@bücher.example", "name": "Jürgen Koch", "role": "admin"}
    )
    inst = install_at(tmp_path, clock, OUTSIDE, directory)
    mail = make_mail(sender="Jurgen Koch <jurgen@xn--bcher-kva.example>", message_id="j@x.example")
    result = inst.ingest(mail)
    assert result.outcome == "created", result.reason
    capsys.readouterr()
    assert inst.cli("gdpr", "erase", "jurgen@bücher.example", "--yes") == 0
    assert "erased: 1 ticket(s)" in capsys.readouterr().out
    assert traces(inst, "xn--bcher-kva", "bücher") == []


def test_the_first_start_after_the_upgrade_stores_an_idn_contact_as_intake_reads_it(
    tmp_path: Path, clock: Clockwork
) -> None:
    """A directory synced by an earlier version kept jurgen@bücher.example in
    Unicode; the file did not change, yet the new version must sync it again, or
    his mail stays rejected until an operator thinks of `directory sync`."""
    import hashlib

    from mailgate.directory import sync_directory_if_changed
    from mailgate.store.state import set_state

    directory = yaml.safe_load((ROOT / "directory.yaml").read_text())
    directory["organisations"][0]["contacts"].append(
        {"email": "jurgen@bücher.example", "name": "Jürgen Koch", "role": "admin"}
    )
    inst = install_at(tmp_path, clock, OUTSIDE, directory)
    path = inst.app.settings.path(inst.app.settings.directory)
    with inst.session() as s, s.begin():  # as the earlier version left it
        s.scalar(
            select(Contact).where(Contact.email == "jurgen@xn--bcher-kva.example")
        ).email = "jurgen@bücher.example"
        set_state(s, "directory.sha256", hashlib.sha256(path.read_bytes()).hexdigest())
    assert sync_directory_if_changed(inst.app) is not None  # the start after the upgrade
    mail = make_mail(sender="Jurgen Koch <jurgen@xn--bcher-kva.example>", message_id="j@x.example")
    assert inst.ingest(mail).outcome == "created"
    assert sync_directory_if_changed(inst.app) is None  # and only once


def test_log_lines_carry_a_keyed_hash_unless_debugging(tmp_path: Path) -> None:
    import logging

    record = logging.LogRecord("mailgate.x", logging.INFO, __file__, 1,
                               "rejected %s", ("alice@acme.example",), None)  # fmt: skip
    record.mailgate = {"sender": "Alice@Acme.example"}
    setup_logging("text", verbose=False)
    set_log_key(b"k" * 32)
    line = TextFormatter().format(record)
    hashed = address_hasher(b"k" * 32)("alice@acme.example")
    assert "alice@acme.example" not in line.lower() and line.count(hashed) == 2
    setup_logging("text", verbose=True)
    assert "alice@acme.example" in TextFormatter().format(record)
    setup_logging("text", verbose=False)  # the rest of the suite as before
    inst = install_at(tmp_path, Clockwork())
    out = subprocess.run(
        [sys.executable, "-m", "mailgate", "--config", str(inst.settings_file), "gdpr",
         "log-hash", "Alice@acme.example"], capture_output=True, text=True,
    )  # fmt: skip
    assert out.stdout.strip() == address_hasher(inst.app.log_key)("alice@acme.example")


def test_a_refused_reload_keeps_hashing_log_addresses_with_the_running_key(
    inst: Installation,
) -> None:
    """A reload refused for a broken template, with a new secret in the same edit,
    changed the log hashes anyway: the lines after it no longer matched
    `gdpr log-hash` for the secret still in use."""
    import logging

    from mailgate.config import ConfigError, load_settings
    from mailgate.daemon import build_app

    running = build_app(load_settings(inst.settings_file))
    (inst.root / "new.key").write_text("ab" * 32)
    (inst.root / "templates-broken").mkdir()
    data = yaml.safe_load(inst.settings_file.read_text())
    data["tickets"]["secret_file"] = "new.key"
    data["templates_dir"] = "templates-broken"
    inst.settings_file.write_text(yaml.safe_dump(data))
    with pytest.raises(ConfigError):
        build_app(load_settings(inst.settings_file), reuse=running)
    record = logging.LogRecord("mailgate.x", logging.INFO, __file__, 1,
                               "rejected %s", ("alice@acme.example",), None)  # fmt: skip
    setup_logging("text", verbose=False)
    assert address_hasher(running.log_key)("alice@acme.example") in TextFormatter().format(record)


def test_erasing_someone_unknown_or_staff_is_refused(
    inst: Installation, capsys: pytest.CaptureFixture[str]
) -> None:
    assert inst.cli("gdpr", "erase", "nobody@nowhere.example", "--yes") == 1
    # Bob answered a ticket, so something is stored about him: refused as staff.
    inst.ingest(make_mail())
    inst.ingest(staff_answer(inst, "Hello Alice, fixed.\n", "bob-1@support.example"))
    capsys.readouterr()
    assert inst.cli("gdpr", "erase", "bob@support.example", "--yes") == 1
    assert "bob@support.example is staff" in capsys.readouterr().err
    with inst.session() as s:
        (answer,) = s.scalars(select(Article).where(Article.message_id == "bob-1@support.example"))
        assert (answer.author_email, answer.author_name) == ("bob@support.example", "Bob Durand")


def test_settings_name_an_unknown_organisation_in_retention(tmp_path: Path) -> None:
    inst = install_at(tmp_path, Clockwork(), deep_update(
        {"retention": {"organisations": {"acmee": {"closed_days": 10}}}}, {}))  # fmt: skip
    out = subprocess.run(
        [sys.executable, "-m", "mailgate", "--config", str(inst.settings_file), "check"],
        capture_output=True, text=True,
    )  # fmt: skip
    assert out.returncode == 1 and "retention.organisations: acmee" in out.stdout + out.stderr


def test_an_export_that_cannot_be_written_is_one_error_line(
    inst: Installation, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    inst.ingest(make_mail())
    assert inst.cli("gdpr", "export", "alice@acme.example", "-o", str(tmp_path)) == 1
    assert capsys.readouterr().err == f"error: cannot write {tmp_path}: Is a directory\n"


def test_an_export_is_owner_only_and_never_written_through_a_link(
    inst: Installation, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    inst.ingest(make_mail())
    out = tmp_path / "alice.json"
    assert inst.cli("gdpr", "export", "alice@acme.example", "-o", str(out)) == 0
    assert out.stat().st_mode & 0o777 == 0o600 and b"alice@acme.example" in out.read_bytes()
    elsewhere = tmp_path / "elsewhere"
    elsewhere.write_text("untouched")
    link = tmp_path / "planted.json"
    link.symlink_to(elsewhere)
    assert inst.cli("gdpr", "export", "alice@acme.example", "-o", str(link)) == 1
    assert "cannot write" in capsys.readouterr().err
    assert elsewhere.read_text() == "untouched"


def test_erase_reaches_mail_released_from_the_quarantine(
    install: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    """A mail too large to parse (no sender recorded) is held, then released once
    an operator raised the limit: its first record keeps the bytes the release
    used, and an erasure must take them too. The dry run counts them."""
    padding = {"X-Padding": "x" * 3000}
    held = install(settings={"hygiene": {"limits": {"max_header_bytes": 2048}}})
    assert held.ingest(make_mail(headers=padding)).outcome == "quarantined"
    inst = install(settings={"hygiene": {"limits": {"max_header_bytes": 65536}}})
    with inst.session() as s:
        first = s.scalar(select(IngestRecord).where(IngestRecord.outcome == "quarantined"))
        assert first is not None and first.sender is None
    assert inst.cli("quarantine", "release", "--no-send", str(first.id)) == 0
    assert inst.cli("gdpr", "erase", ALICE[0]) == 1  # the dry run
    would = capsys.readouterr().out
    assert inst.cli("gdpr", "erase", ALICE[0], "--yes") == 0
    did = capsys.readouterr().out
    removed = re.search(r"(\d+) stored file\(s\) removed", did)
    assert removed and int(removed.group(1)) >= 1
    assert f"{removed.group(1)} stored file(s) removed" in would  # counted alike
    assert traces(inst, ALICE[0]) == []


def test_retention_reaches_mail_released_from_the_quarantine(
    install: Any, clock: Clockwork, capsys: pytest.CaptureFixture[str]
) -> None:
    held = install(settings={"hygiene": {"limits": {"max_header_bytes": 2048}}, **OUTSIDE})
    assert held.ingest(make_mail(headers={"X-Padding": "x" * 3000})).outcome == "quarantined"
    inst = install(settings={"hygiene": {"limits": {"max_header_bytes": 65536}}, **OUTSIDE})
    with inst.session() as s:
        first = s.scalar(select(IngestRecord.id).where(IngestRecord.outcome == "quarantined"))
    assert inst.cli("quarantine", "release", "--no-send", str(first)) == 0
    number = re.search(r"SUP-\d{4}-\d{6}", capsys.readouterr().out).group(0)
    close(inst, number)
    clock.now = NOW + timedelta(days=366)
    everyone_but_dave_leaves_acme(inst)
    assert inst.cli("retention", "run", "--now", clock.now.isoformat()) == 0
    assert traces(inst, ALICE[0]) == []
