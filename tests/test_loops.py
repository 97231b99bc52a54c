"""The loop breaker's layers behind the header screen (RELIABILITY.md §1, checklist 4 and 5).

The header screen is tested in test_pipeline.py. Here the mail gets past it,
as it does when a forwarder strips Auto-Submitted or an autoresponder writes
fresh mail: the caps and the circuit breaker must still end the loop.
"""

from __future__ import annotations

import asyncio
import email
import email.policy
import mailbox
import re
import smtplib
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import timedelta
from email.message import EmailMessage
from pathlib import Path

import pytest
from aiosmtpd.controller import Controller
from aiosmtpd.smtp import SMTP, Envelope, Session
from sqlalchemy import func, select

from mailgate.pipeline.message import Envelope as MailEnvelope
from mailgate.store.models import IngestRecord, OutboxMail, SlaClock, Ticket
from tests.conftest import Installation, make_mail, reply_to
from tests.daemon import RunningDaemon, start_daemon
from tests.smtp_sink import free_port

# -- checklist 5: one address writing fast -------------------------------------------------


def test_fifty_mails_in_ten_minutes_get_five_acks_then_the_breaker_holds_them(
    inst: Installation,
) -> None:
    results = []
    for n in range(50):
        mail = make_mail(subject=f"Problem {n}", message_id=f"burst-{n}@acme.example")
        results.append(inst.ingest(mail))
        inst.clock.now += timedelta(seconds=12)  # type: ignore[attr-defined]
    outcomes = [r.outcome for r in results]
    assert outcomes == ["created"] * 5 + ["quarantined"] * 45  # checklist 5: the rest held
    assert all("circuit breaker: 5 tickets from this sender" in r.reason for r in results[5:])
    sent = inst.sent()
    acks = [m for m in sent if m["To"] == "alice@acme.example"]
    assert len(acks) == 5
    alerts = [m for m in sent if "loop defence" in str(m["Subject"])]
    assert len(alerts) == 1
    assert alerts[0]["To"] == "bob@support.example"  # no alert_to: active staff
    assert "alice@acme.example" in alerts[0]["Subject"]
    # Nothing lost: every held mail waits in the quarantine with its bytes.
    with inst.session() as session:
        held = session.scalars(select(IngestRecord).where(IngestRecord.outcome == "quarantined"))
        assert all(inst.app.blobs.path_for(r.raw_sha256).exists() for r in held)
    # An hour later the sender is a person again.
    inst.clock.now += timedelta(hours=1)  # type: ignore[attr-defined]
    later = inst.ingest(make_mail(subject="Next day", message_id="later@acme.example"))
    assert later.outcome == "created"
    assert len([m for m in inst.sent() if m["To"] == "alice@acme.example"]) == 6


def test_tickets_an_operator_imported_do_not_count_against_the_sender(
    inst: Installation, tmp_path: Path
) -> None:
    """Six tickets of Alice's imported from an mbox, then Alice writes: a person
    writing, not a robot; the breaker counts only what came by mail on its own."""
    box = mailbox.mbox(tmp_path / "backlog.mbox")
    for n in range(6):
        box.add(make_mail(subject=f"Backlog {n}", message_id=f"b-{n}@acme.example").as_bytes())
    box.close()
    assert inst.cli("ingest", "--mbox", "--no-send", str(tmp_path / "backlog.mbox")) == 0
    assert inst.ingest(make_mail(subject="Live", message_id="live@acme.example")).outcome == (
        "created"
    )
    for n in range(4):  # four more live ones: five by mail in the hour
        inst.ingest(make_mail(subject=f"Live {n}", message_id=f"l-{n}@acme.example"))
    held = inst.ingest(make_mail(subject="One too many", message_id="over@acme.example"))
    assert held.outcome == "quarantined" and "5 tickets from this sender" in held.reason


def test_the_daily_cap_holds_acks_that_the_hourly_cap_lets_through(install) -> None:
    """Four acks an hour pass the hourly cap of 5; the tenth of the day meets the daily cap."""
    inst = install(settings={"hygiene": {"loops": {"auto_mail_per_address_per_day": 9}}})
    for n in range(12):
        mail = make_mail(subject=f"Question {n}", message_id=f"day-{n}@acme.example")
        assert inst.ingest(mail).outcome == "created"
        inst.clock.now += timedelta(minutes=15)  # type: ignore[attr-defined]
    acks = [m for m in inst.sent() if m["To"] == "alice@acme.example"]
    assert len(acks) == 9
    alerts = [m for m in inst.sent() if "loop defence" in str(m["Subject"])]
    assert len(alerts) == 1
    assert "9 automatic mails to" in alerts[0].get_body(("plain",)).get_content()
    # A day after the first ack, the window has room again.
    inst.clock.now += timedelta(hours=21)  # type: ignore[attr-defined]
    assert (
        inst.ingest(make_mail(subject="Later", message_id="day-later@acme.example")).outcome
        == "created"
    )
    assert len([m for m in inst.sent() if m["To"] == "alice@acme.example"]) == 10


def test_the_hourly_cap_holds_the_sixth_ack_when_the_breaker_lets_tickets_through(
    install,
) -> None:
    """Layer 2 on its own: with the breaker lifted, eight tickets in ten minutes get
    five acks (hygiene.loops.auto_mail_per_address_per_hour) and one alert."""
    inst = install(settings={"hygiene": {"loops": {"tickets_per_sender_per_hour": 100}}})
    for n in range(8):
        mail = make_mail(subject=f"Issue {n}", message_id=f"hour-{n}@acme.example")
        assert inst.ingest(mail).outcome == "created"
        inst.clock.now += timedelta(seconds=75)  # type: ignore[attr-defined]
    sent = inst.sent()
    assert len([m for m in sent if m["To"] == "alice@acme.example"]) == 5
    alerts = [m for m in sent if "loop defence" in str(m["Subject"])]
    assert len(alerts) == 1
    assert "5 automatic mails to" in alerts[0].get_body(("plain",)).get_content()


def test_one_subject_from_one_organisation_trips_the_breaker(install) -> None:
    inst = install(settings={"hygiene": {"loops": {"tickets_per_subject_per_hour": 3}}})
    senders = ["alice@acme.example"] * 3
    subjects = ["Disk full", "Re: DISK  full", "[ext-42] Fwd: disk full"]
    for n, (sender, subject) in enumerate(zip(senders, subjects, strict=True)):
        result = inst.ingest(make_mail(sender=sender, subject=subject, message_id=f"s{n}@x"))
        assert result.outcome == "created"
    held = inst.ingest(make_mail(subject="RE: Disk full", message_id="s4@x"))
    assert held.outcome == "quarantined"
    assert held.reason == "circuit breaker: 3 tickets with this subject in the last hour"
    # Another organisation with the same subject is not held back by ACME's.
    other = inst.ingest(make_mail(sender="hank@globex.example", subject="Disk full",
                                  message_id="g1@x"))  # fmt: skip
    assert other.outcome == "created"


def test_per_ticket_cap_stops_notices_for_a_robot_replying_on_one_ticket(install) -> None:
    inst = install(settings={"hygiene": {"loops": {"auto_mail_per_ticket_per_hour": 4}}})
    first = make_mail()
    inst.ingest(first)  # the ack counts; the one new-ticket notice to staff does not
    for n in range(5):
        reply = make_mail(subject="Re: Cannot log in", message_id=f"robot-{n}@acme.example",
                          headers={"In-Reply-To": "<req-1@acme.example>"})  # fmt: skip
        assert inst.ingest(reply).outcome == "threaded"
    with inst.session() as session:
        kinds = session.scalars(select(OutboxMail.kind).order_by(OutboxMail.id)).all()
    assert kinds.count("staff_customer_reply") == 3  # ack + 3 notices = the cap of 4
    assert kinds.count("operator_alert") == 1


def test_quarantine_release_bypasses_the_breaker_and_delete_keeps_the_record(
    inst: Installation, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SUDO_USER", "olivia")  # `sudo -u mailgate mailgate quarantine …`
    for n in range(7):
        inst.ingest(make_mail(subject=f"Problem {n}", message_id=f"q-{n}@acme.example"))
    with inst.session() as session:
        held = session.scalars(
            select(IngestRecord.id).where(IngestRecord.outcome == "quarantined")
        ).all()
    assert len(held) == 2
    assert inst.cli("quarantine", "list") == 0
    listing = capsys.readouterr().out
    assert listing.count("circuit breaker") == 2 and "Problem 6" in listing
    assert "RECEIVED (UTC)" in listing
    assert inst.cli("quarantine", "show", str(held[0])) == 0
    shown = capsys.readouterr().out
    assert "reason:" in shown and "Message-ID: <q-5@acme.example>" in shown

    assert inst.cli("quarantine", "release", "--no-send", str(held[0])) == 0
    released = capsys.readouterr().out
    assert re.match(rf"#{held[0]}: created SUP-2026-000006 ", released), released
    assert inst.cli("quarantine", "release", str(held[0])) == 1  # only once
    assert f"no quarantined mail #{held[0]}" in capsys.readouterr().err
    with inst.session() as session:
        new = session.scalars(select(IngestRecord).order_by(IngestRecord.id.desc())).first()
        assert new.source == "release" and "collision" not in new.reason

    with inst.session() as session:
        sha = session.get(IngestRecord, held[1]).raw_sha256
    assert inst.cli("quarantine", "delete", str(held[1])) == 0
    assert capsys.readouterr().out == f"#{held[1]}: deleted\n"
    assert not inst.app.blobs.path_for(sha).exists()
    with inst.session() as session:
        old = session.get(IngestRecord, held[0])
        assert old.outcome == "released" and old.reason.startswith("released as ingest #")
        gone = session.get(IngestRecord, held[1])
        assert gone.outcome == "deleted" and "circuit breaker" in gone.reason
        assert gone.reason.startswith("deleted by olivia on 2026-11-23 ")
        assert session.scalar(select(func.count()).select_from(Ticket)) == 6
    assert inst.cli("quarantine", "list") == 0
    assert capsys.readouterr().out.strip() == "quarantine empty"


def test_released_spoof_is_accepted_and_flagged(install) -> None:
    from mailgate.intake.quarantine import release

    inst = install(settings={"hygiene": {"authentication": {"policy": "require"}}})
    held = inst.ingest(make_mail())
    assert held.outcome == "quarantined"
    result = release(inst.app, held.ingest_id)  # the operator checked with Alice
    assert result.outcome == "created"
    assert "sender not authenticated" in result.reason
    with inst.session() as session:
        assert "unauthenticated-sender" in session.scalars(select(Ticket)).one().tags


# -- autoresponders that mark nothing: only their subject says what they are -----------------


def test_a_staff_autoreply_without_headers_is_kept_from_the_customer(inst: Installation) -> None:
    """Bob's Outlook rule answers our new-ticket notice, Auto-Submitted and all
    else missing: the customer must not get "I am out of the office" from our
    address, and the ticket is still unanswered."""
    created = inst.ingest(make_mail())
    notice = next(m for m in inst.sent() if m["To"] == "bob@support.example")
    away = reply_to(notice, sender="Bob Durand <bob@support.example>",
                    body="I am out of the office until Monday.\n",
                    message_id="away@support.example",
                    subject=f"Automatic reply: {notice['Subject']}")  # fmt: skip
    mails_before = len(inst.sent())

    result = inst.ingest(away)

    assert result.outcome == "threaded"
    assert "internal note" in result.reason and "automatic reply" in result.reason
    assert len(inst.sent()) == mails_before  # nothing to Alice, nothing to anyone
    with inst.session() as session:
        ticket = session.scalars(select(Ticket).filter_by(number=created.ticket)).one()
        assert ticket.status == "new"
        assert [a.visibility for a in ticket.articles if a.author_kind == "staff"] == ["internal"]
        first_response = session.scalars(select(SlaClock).filter_by(kind="first_response")).one()
        assert first_response.stopped_at is None


def test_a_customer_autoreply_without_headers_does_not_reopen_a_resolved_ticket(
    inst: Installation,
) -> None:
    """Alice's autoresponder answers our resolution notice ("Automatic reply: …",
    nothing else marks it): staff may read it, but Alice has not answered."""
    created = inst.ingest(make_mail())
    notice = next(m for m in inst.sent() if m["To"] == "bob@support.example")
    fix = reply_to(notice, sender="Bob Durand <bob@support.example>",
                   body="/resolve\nFixed, please retry.\n",
                   message_id="fix@support.example")  # fmt: skip
    assert inst.ingest(fix).outcome == "threaded"
    resolved = [m for m in inst.sent() if m["To"] == "alice@acme.example"][-1]
    away = reply_to(resolved, sender="Alice Martin <alice@acme.example>",
                    body="I am on holiday until Monday.\n", message_id="away@acme.example",
                    subject=f"Automatic reply: {resolved['Subject']}")  # fmt: skip

    result = inst.ingest(away)

    assert result.outcome == "threaded"
    assert "status kept" in result.reason
    with inst.session() as session:
        ticket = session.scalars(select(Ticket).filter_by(number=created.ticket)).one()
        assert ticket.status == "resolved"
        assert session.scalar(select(func.count()).select_from(Ticket)) == 1


def test_a_ticket_system_answering_our_envelope_sender_gets_one_ack_and_opens_nothing(
    inst: Installation,
) -> None:
    """ACME's own helpdesk behind alice@ answers every mail's envelope sender (our
    VERP address, as RFC 3834 says) with its own ack, no Auto-Submitted, a subject
    of its own and no reference to ours: count the mails and the tickets."""
    inst.ingest(make_mail())
    answered = 0
    for n in range(10):  # what the helpdesk would do with each of our mails to Alice
        ours = [m for m in inst.sent() if m["To"] == "alice@acme.example"]
        if answered == len(ours):
            break
        verp = str(ours[answered]["Return-Path"]).strip("<>")
        answered += 1
        their_ack = make_mail(to=verp, subject=f"[ACME#{n}] We received your message",
                              body="Our team will answer shortly.\n",
                              message_id=f"acme-{n}@acme.example")  # fmt: skip
        result = inst.ingest(their_ack, MailEnvelope(source="smtp", mail_from="alice@acme.example",
                                                     rcpt_to=(verp,)))  # fmt: skip
        assert result.outcome == "quarantined"
        assert "bounce-address" in result.reason
        inst.clock.now += timedelta(minutes=1)  # type: ignore[attr-defined]
    assert answered == 1  # our one ack; their answer to it got nothing back
    with inst.session() as session:
        assert session.scalar(select(func.count()).select_from(Ticket)) == 1


# -- checklist 4: two instances acknowledging each other ------------------------------------

# What a careless forwarder or autoresponder does: every loop marker gone.
STRIPPED = ("auto-submitted", "precedence", "x-auto-response-suppress", "x-mailgate-loop",
            "in-reply-to", "references", "message-id", "reply-to", "list-id")  # fmt: skip


@dataclass
class Forwarder:
    """The relay of both instances: strips loop markers and hands each mail to the
    instance it is addressed to; anything else (alerts to staff) is kept here."""

    routes: dict[str, int] = field(default_factory=dict)  # address -> SMTP port
    forwarded: list[tuple[str, str]] = field(default_factory=list)  # (from, to)
    kept: list[EmailMessage] = field(default_factory=list)
    last: float = field(default_factory=time.monotonic)
    count: int = 0

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        msg = email.message_from_bytes(envelope.original_content, policy=email.policy.default)
        self.last = time.monotonic()
        to = envelope.rcpt_tos[0]
        if to not in self.routes:
            self.kept.append(msg)  # type: ignore[arg-type]
            return "250 kept"
        self.count += 1
        for name in STRIPPED:
            del msg[name]
        msg["Message-ID"] = f"<fresh-{self.count}@forwarder.example>"
        subject = re.sub(r"\[[^\]]*\]|^\s*(re|aw|fwd?)\s*:", "", str(msg["Subject"]), flags=re.I)
        del msg["Subject"]
        msg["Subject"] = " ".join(subject.split()) or "Hello"
        sender = email.utils.parseaddr(str(msg["From"]))[1]
        self.forwarded.append((sender, to))
        data = msg.as_bytes(policy=email.policy.SMTP)
        await asyncio.get_running_loop().run_in_executor(None, self._deliver, sender, to, data)
        return "250 forwarded"

    def _deliver(self, sender: str, to: str, data: bytes) -> None:
        with smtplib.SMTP("127.0.0.1", self.routes[to], timeout=30) as client:
            client.sendmail(sender, [to], data)

    def wait_quiet(self, seconds: float, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() - self.last < seconds:
            assert time.monotonic() < deadline, "the mail never stopped"
            time.sleep(0.2)


def instance(root: Path, name: str, peer: str, relay_port: int) -> RunningDaemon:
    settings = {
        "support_address": f"support@{name}.example",
        "instance_id": name,
        "outbound": {
            "from": f"Support {name.upper()} <support@{name}.example>",
            "transport": "smtp",
            "smtp": {"host": "127.0.0.1", "port": relay_port, "tls": "none"},
        },
        "tickets": {"number_format": name.upper() + "-{year}-{seq:04d}"},
    }
    directory = {
        "organisations": [
            {"id": "peer", "name": "Peer desk", "plan": "pro", "contract_until": "2030-12-31",
             "language": "en", "timezone": "UTC", "country": "BE",
             "contacts": [{"email": f"support@{peer}.example", "name": "Peer", "role": "admin"}]}
        ],
        "staff": [{"email": f"ops@{name}.example", "name": "Ops", "level": "L1"}],
    }  # fmt: skip
    (root / name).mkdir()
    return start_daemon(root / name, None, settings, directory)


@pytest.fixture
def two_desks(tmp_path: Path) -> Iterator[tuple[Forwarder, RunningDaemon, RunningDaemon]]:
    forwarder = Forwarder()
    controller = Controller(forwarder, hostname="127.0.0.1", port=free_port())
    controller.start()
    a = instance(tmp_path, "a", "b", controller.port)
    b = instance(tmp_path, "b", "a", controller.port)
    forwarder.routes = {"support@a.example": a.port, "support@b.example": b.port}
    yield forwarder, a, b
    for desk in (a, b):
        desk.stop()
    controller.stop()


def test_two_instances_acknowledging_each_other_stop_within_five_mails_each(two_desks) -> None:
    forwarder, a, b = two_desks
    first = make_mail(sender="Peer <support@b.example>", to="support@a.example",
                      subject="Hello", message_id="start@b.example")  # fmt: skip
    forwarder.last = time.monotonic()
    with a.smtp() as client:
        client.send_message(first)
    forwarder.wait_quiet(seconds=4, timeout=90)
    a_to_b = forwarder.forwarded.count(("support@a.example", "support@b.example"))
    b_to_a = forwarder.forwarded.count(("support@b.example", "support@a.example"))
    assert 1 <= a_to_b <= 5 and 1 <= b_to_a <= 5, forwarder.forwarded
    alerts = [m for m in forwarder.kept if "loop defence" in str(m["Subject"])]
    assert len(alerts) == 1, [m["Subject"] for m in forwarder.kept]
    # The breaker holds the sixth mail before the ack cap would hold a sixth ack.
    assert "circuit breaker" in alerts[0].get_body(("plain",)).get_content()
    assert "circuit breaker" in a.log() + b.log()
