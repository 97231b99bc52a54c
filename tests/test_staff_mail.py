"""Support staff run a ticket by email: replies relayed, internal notes, /commands, lifecycle.

The mail goes in through the daemon's SMTP listener (in this process, so the
test clock drives it) and out to an aiosmtpd relay sink; what the customer
and staff see is read from the sink.
"""

from __future__ import annotations

import html
import json
import smtplib
import subprocess
import sys
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from email.message import EmailMessage

import pytest
import yaml
from sqlalchemy import select

from mailgate.directory import sync_directory_if_changed
from mailgate.pipeline.message import Envelope
from mailgate.store.models import Article, OutboxMail, SlaClock, Ticket, TicketEvent, TimeEntry
from mailgate.tickets.changes import set_status
from tests.conftest import NOW, ROOT, Installation, make_mail, reply_to, smtp_listener
from tests.smtp_sink import Received, Sink

SUPPORT = "support@example.com"
ALICE = "Alice Martin <alice@acme.example>"  # admin of ACME (shipped directory.yaml)
CAROL = "carol@acme.example"  # a member of ACME
BOB = "Bob Durand <bob@support.example>"  # the staff member
QUOTE_AND_SIGNATURE = (
    "\n\nOn Mon, 23 Nov 2026 at 09:15, Alice Martin <alice@acme.example> wrote:\n"
    "> nobody can log in since this morning.\n"
    "\n-- \nBob Durand | Tier 2 support | +33 1 23 45 67 89\n"
)


class Desk:
    """One installation, its SMTP listener on loopback and the relay sink it sends to."""

    def __init__(self, inst: Installation, sink: Sink, port: int) -> None:
        self.inst, self.sink, self.port = inst, sink, port

    def send(self, msg: EmailMessage, rcpt: str = SUPPORT) -> None:
        with smtplib.SMTP("127.0.0.1", self.port, timeout=30) as client:
            refused = client.send_message(msg, to_addrs=[rcpt])
        assert refused == {}
        self.inst.send_outbox()

    def send_raw(self, data: bytes) -> None:
        with smtplib.SMTP("127.0.0.1", self.port, timeout=30) as client:
            client.sendmail("someone@example.net", [SUPPORT], data)
        self.inst.send_outbox()

    def mails_to(self, address: str) -> list[EmailMessage]:
        return [r.message for r in self.sink.received if address in r.rcpt_tos]

    def received_by(self, address: str) -> list[Received]:
        return [r for r in self.sink.received if address in r.rcpt_tos]

    def ticket(self) -> Ticket:
        with self.inst.session() as session:
            (ticket,) = session.scalars(select(Ticket))
            return ticket

    def rows(self, model: type, **where: object) -> list:  # type: ignore[type-arg]
        with self.inst.session() as session:
            return list(session.scalars(select(model).filter_by(**where)))

    def later(self, delta: timedelta) -> None:
        self.inst.clock.now += delta  # type: ignore[attr-defined]

    def sweep(self) -> None:
        from mailgate.tickets.sweep import sweep

        sweep(self.inst.app, self.inst.clock())
        self.inst.send_outbox()


@pytest.fixture
def desk(
    install: Callable[..., Installation], sink: Sink, request: pytest.FixtureRequest
) -> Iterator[Desk]:
    """Settings of the test's own (indirect parametrisation) on top of the relay's."""
    relay = {"host": "127.0.0.1", "port": sink.port, "tls": "none", "timeout_seconds": 5}
    inst = install(
        settings={
            "outbound": {"transport": "smtp", "smtp": relay},
            "intake": {"smtp": {"port": 0}},
            **getattr(request, "param", {}),
        }
    )
    with smtp_listener(inst) as port:
        yield Desk(inst, sink, port)


def staff_notice(desk: Desk) -> EmailMessage:
    """The latest notice staff got: what Bob replies to in his mail client."""
    return desk.mails_to("bob@support.example")[-1]


def staff_answer(desk: Desk, body: str, mid: str, **kw: object) -> EmailMessage:
    notice = staff_notice(desk)
    return reply_to(notice, sender=BOB, body=body, message_id=mid, to=SUPPORT, **kw)  # type: ignore[arg-type]


def open_ticket(desk: Desk) -> EmailMessage:
    original = make_mail(sender=ALICE, message_id="req-1@acme.example")
    desk.send(original)
    assert [m["Subject"] for m in desk.mails_to("alice@acme.example")][0].startswith(
        "[SUP-"
    )  # the acknowledgement
    return original


def test_a_whole_conversation_by_mail(desk: Desk) -> None:
    open_ticket(desk)
    number = desk.ticket().number
    ack = desk.mails_to("alice@acme.example")[0]

    # Staff reply from Bob's own mail client: quoted history and signature trimmed, relayed once.
    answer = staff_answer(desk, "Hello Alice,\nplease clear your browser cache." +
                          QUOTE_AND_SIGNATURE, "bob-1@support.example")  # fmt: skip
    answer.add_attachment(b"%PDF-1.4 guide", maintype="application", subtype="pdf",
                          filename="cache-guide.pdf")  # fmt: skip
    desk.send(answer)
    relays = [r for r in desk.received_by("alice@acme.example") if "cache" in r.data.decode()]
    assert len(relays) == 1
    relay = relays[0].message
    assert relay["From"] == f"Bob Durand <{SUPPORT}>"
    assert f"[{number}]" in relay["Subject"]
    assert relay["In-Reply-To"] == "<req-1@acme.example>"
    assert (
        "<req-1@acme.example>" in relay["References"] and ack["Message-ID"] in relay["References"]
    )
    assert relay["Reply-To"].startswith("support+t")
    assert desk.inst.app.signer.ticket_from_message_id(relay["Message-ID"].strip("<>")) == (
        desk.ticket().id
    )
    body = relay.get_body(("plain",)).get_content()
    assert "please clear your browser cache" in body
    assert "wrote:" not in body and "nobody can log in" not in body and "Tier 2" not in body
    assert "L'équipe support" in body  # in ACME's language, as the ack
    (attachment,) = relay.iter_attachments()
    assert attachment.get_filename() == "cache-guide.pdf"
    assert attachment.get_content() == b"%PDF-1.4 guide"
    assert desk.ticket().status == "open"

    # The customer answers with a changed subject: threaded by In-Reply-To.
    answer_back = reply_to(relay, sender=ALICE, body="Still broken after clearing it.\n",
                           message_id="req-2@acme.example", subject="New error now")  # fmt: skip
    desk.send(answer_back)
    (record,) = [
        a for a in desk.rows(Article, direction="in") if a.message_id == "req-2@acme.example"
    ]
    assert record.ticket_id == desk.ticket().id

    # An internal note, sent to support+internal@: stored internal, never reaches Alice.
    before = len(desk.mails_to("alice@acme.example"))
    note = staff_answer(desk, "Looks like the SSO certificate expired.\n", "bob-2@support.example")
    desk.send(note, rcpt="support+internal@example.com")
    assert len(desk.mails_to("alice@acme.example")) == before
    (stored,) = [a for a in desk.rows(Article) if a.message_id == "bob-2@support.example"]
    assert stored.visibility == "internal" and "SSO certificate" in stored.text

    # Commands only: applied, nothing relayed; the customer is told the ticket is resolved.
    desk.send(staff_answer(desk, "/status resolved\n/spend 30m\n", "bob-3@support.example"))
    ticket = desk.ticket()
    assert ticket.status == "resolved"
    assert [(t.minutes, t.staff_email) for t in desk.rows(TimeEntry)] == [
        (30, "bob@support.example")
    ]
    staff_replies = desk.rows(OutboxMail, kind="staff_reply")
    assert len(staff_replies) == 1  # still only the first reply
    resolved = desk.mails_to("alice@acme.example")[-1]
    assert (
        f"[{number}]" in resolved["Subject"] and "14" in resolved.get_body(("plain",)).get_content()
    )
    assert len(desk.mails_to("alice@acme.example")) == before + 1

    # Alice reopens within the window.
    desk.later(timedelta(days=3))
    desk.send(reply_to(resolved, sender=ALICE, body="It happened again.\n",
                       message_id="req-3@acme.example"))  # fmt: skip
    assert desk.ticket().status == "open"

    # Resolved again, then closed automatically when the window passes without a reply.
    desk.send(staff_answer(desk, "/resolve\n", "bob-4@support.example"))
    assert desk.ticket().status == "resolved"
    desk.later(timedelta(days=13))
    desk.sweep()
    assert desk.ticket().status == "resolved"
    desk.later(timedelta(days=1, minutes=1))
    desk.sweep()
    assert desk.ticket().status == "closed"

    # Every transition with who, when and why.
    history = [(e.field, e.old, e.new, e.actor_kind) for e in desk.rows(TicketEvent)]
    assert history[1:] == [
        ("status", "new", "open", "staff"),
        ("status", "open", "resolved", "staff"),
        ("status", "resolved", "open", "customer"),
        ("status", "open", "resolved", "staff"),
        ("status", "resolved", "closed", "system"),
    ]
    # A later reply opens a new ticket that references the closed one.
    desk.send(
        reply_to(resolved, sender=ALICE, body="Back again.\n", message_id="req-4@acme.example")
    )
    with desk.inst.session() as session:
        tickets = list(session.scalars(select(Ticket).order_by(Ticket.id)))
    assert len(tickets) == 2 and tickets[1].follows_ticket_id == tickets[0].id


def test_a_closed_ticket_resolved_again_gets_a_whole_reopen_window(desk: Desk) -> None:
    """Bob resolves a closed ticket again: Alice is told a reply within 14 days
    reopens it, so the 14 days count from now, not from the first resolution."""
    open_ticket(desk)
    desk.send(staff_answer(desk, "/resolve\n", "bob-1@support.example"))
    desk.later(timedelta(days=15))
    desk.sweep()
    assert desk.ticket().status == "closed"
    desk.later(timedelta(days=2))
    desk.send(staff_answer(desk, "/status resolved\n", "bob-2@support.example"))
    notice = desk.mails_to("alice@acme.example")[-1]
    assert "14" in notice.get_body(("plain",)).get_content()
    desk.sweep()
    assert desk.ticket().status == "resolved"  # not closed again at once
    desk.later(timedelta(days=1))
    desk.send(reply_to(notice, sender=ALICE, body="It happened again.\n",
                       message_id="req-2@acme.example"))  # fmt: skip
    assert desk.ticket().status == "open"  # reopened, no second ticket


def test_an_invalid_command_is_refused_whole_with_an_explanation(desk: Desk) -> None:
    open_ticket(desk)
    to_alice = len(desk.mails_to("alice@acme.example"))
    mail = staff_answer(desk, "/priority P3\n/status done\n\nI will look at it.\n",
                        "bob-1@support.example")  # fmt: skip
    desk.send(mail)
    ticket = desk.ticket()
    assert (ticket.priority, ticket.status) == ("P1", "new")  # /priority P3 not applied either
    assert [e.field for e in desk.rows(TicketEvent)] == ["priority"]  # set at creation only
    assert len(desk.mails_to("alice@acme.example")) == to_alice  # nothing relayed
    refusal = staff_notice(desk)
    assert refusal["In-Reply-To"] == "<bob-1@support.example>"
    text = refusal.get_body(("plain",)).get_content()
    assert "line 2" in text and "/status done" in text
    assert [a.message_id for a in desk.rows(Article, direction="in")] == ["req-1@acme.example"]


def test_commands_change_the_ticket_and_are_listed_in_its_history(desk: Desk) -> None:
    open_ticket(desk)
    commands = f"/priority P2\n/urgent\n/level L2\n/assign me\n/cc {CAROL}\n/status waiting\n"
    desk.send(staff_answer(desk, commands, "bob-1@support.example"))
    ticket = desk.ticket()
    assert (ticket.priority, ticket.urgent, ticket.level, ticket.status) == (
        "P2", True, "L2", "waiting_customer"
    )  # fmt: skip
    assert ticket.cc == [CAROL]
    assert {e.field for e in desk.rows(TicketEvent, actor_kind="staff")} == {
        "priority", "urgent", "level", "assignee", "cc", "status"
    }  # fmt: skip
    assert all(e.actor == "bob@support.example" for e in desk.rows(TicketEvent, actor_kind="staff"))


@pytest.mark.parametrize("command", ["/close", "/status closed"])
def test_closing_by_command_sends_the_customer_no_reopen_notice(desk: Desk, command: str) -> None:
    """Only `resolved` mails the customer how to reopen (README): a closed ticket
    never reopens, so telling them a reply would reopen it is false."""
    open_ticket(desk)
    to_alice = len(desk.mails_to("alice@acme.example"))
    desk.send(staff_answer(desk, command + "\n", "bob-1@support.example"))
    ticket = desk.ticket()
    assert ticket.status == "closed" and ticket.closed_at is not None
    assert len(desk.mails_to("alice@acme.example")) == to_alice
    assert desk.rows(OutboxMail, kind="resolved") == []


def test_cc_of_a_stranger_is_refused(desk: Desk) -> None:
    """Copying someone outside the organisation would show them the ticket."""
    open_ticket(desk)
    desk.send(staff_answer(desk, "/cc hank@globex.example\n", "bob-1@support.example"))
    assert desk.ticket().cc == []
    assert "not an active contact" in staff_notice(desk).get_body(("plain",)).get_content()


def test_a_contact_who_left_the_organisation_no_longer_gets_its_mail(desk: Desk) -> None:
    """Recipients are checked when a mail is written: copied once is not copied forever."""
    open_ticket(desk)
    desk.send(staff_answer(desk, f"/cc {CAROL}\n", "bob-1@support.example"))
    assert desk.ticket().cc == [CAROL]
    # Carol moves to another customer of ours.
    path = desk.inst.root / "directory.yaml"
    directory = yaml.safe_load(path.read_text())
    acme, globex = directory["organisations"][:2]
    carol = next(c for c in acme["contacts"] if c["email"] == CAROL)
    acme["contacts"].remove(carol)
    globex["contacts"].append(carol)
    path.write_text(yaml.safe_dump(directory))
    sync_directory_if_changed(desk.inst.app)
    answers = [staff_answer(desk, "Fixed on our side.\n", "bob-2@support.example"),
               staff_answer(desk, "/resolve\n", "bob-3@support.example")]  # fmt: skip
    desk.sink.received.clear()
    for answer in answers:
        desk.send(answer)
    desk.inst.send_outbox()
    customers = [r.rcpt_tos for r in desk.sink.received if "bob@support.example" not in r.rcpt_tos]
    assert customers == [("alice@acme.example",), ("alice@acme.example",)]  # reply, resolution


def test_commands_in_a_customers_mail_are_plain_text(desk: Desk) -> None:
    original = open_ticket(desk)
    desk.send(reply_to(original, sender=ALICE, body="/status closed\n/priority P1\nplease\n",
                       message_id="req-2@acme.example"))  # fmt: skip
    ticket = desk.ticket()
    assert (ticket.status, ticket.priority) == ("new", "P1")  # as the rules set it


def test_a_mail_claiming_a_staff_name_is_a_customer_mail(desk: Desk) -> None:
    """Identity is the address, never the display name."""
    original = open_ticket(desk)
    forged = reply_to(original, sender="Bob Durand <alice@acme.example>",
                      body="/status resolved\n", message_id="req-2@acme.example")  # fmt: skip
    desk.send(forged)
    assert desk.ticket().status == "new"
    (article,) = [a for a in desk.rows(Article) if a.message_id == "req-2@acme.example"]
    assert article.author_kind == "customer"


def test_waiting_ticket_reminds_then_resolves_in_business_days(desk: Desk) -> None:
    open_ticket(desk)
    desk.send(staff_answer(desk, "/status waiting\nCould you send us the log file?\n",
                           "bob-1@support.example"))  # fmt: skip
    assert desk.ticket().status == "waiting_customer"
    count = len(desk.mails_to("alice@acme.example"))
    # NOW is Monday 23 Nov 2026: 3 business days later is Thursday.
    desk.later(timedelta(days=2, hours=23))
    desk.sweep()
    assert len(desk.mails_to("alice@acme.example")) == count
    desk.later(timedelta(hours=2))
    desk.sweep()
    desk.sweep()  # once only
    reminder = desk.mails_to("alice@acme.example")[-1]
    assert len(desk.mails_to("alice@acme.example")) == count + 1
    assert reminder["Auto-Submitted"] == "auto-generated"
    # 4 more business days from Thursday: Wednesday of the next week (the weekend skipped).
    desk.later(timedelta(days=6, hours=-1))
    desk.sweep()
    assert desk.ticket().status == "waiting_customer"
    desk.later(timedelta(hours=2))
    desk.sweep()
    assert desk.ticket().status == "resolved"
    assert len(desk.mails_to("alice@acme.example")) == count + 2
    resolved = desk.mails_to("alice@acme.example")[-1].get_body(("plain",)).get_content()
    assert "n'avons pas reçu de réponse de votre part" in resolved  # why it was resolved
    # Resolved is resolved for the SLA too: its resolution clock stops then.
    (resolution,) = desk.rows(SlaClock, kind="resolution")
    resolved_at = desk.ticket().resolved_at
    assert resolved_at is not None
    assert (resolution.stopped_at, resolution.paused_at) == (resolved_at, None)


def test_a_ticket_waiting_longer_is_reminded_whatever_its_number(
    desk: Desk, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The sweep read the first waiting tickets by number (2000 of them): with
    more waiting, a later ticket that was due never got its reminder. The batch
    is made 1 here (4 tickets read) instead of opening 2001 tickets."""
    from mailgate.tickets import sweep

    monkeypatch.setattr(sweep, "BATCH", 1)
    numbers = [desk.inst.ingest(make_mail(sender=ALICE, message_id=f"w{i}@acme.example",
                                          subject=f"Question {i}")).ticket
               for i in range(5)]  # fmt: skip
    with desk.inst.session() as s, s.begin():
        for number in numbers:
            ticket = s.scalar(select(Ticket).where(Ticket.number == number))
            # The last one waits since Monday; the others only since Saturday.
            at = NOW if number == numbers[-1] else NOW + timedelta(days=5)
            set_status(s, ticket, "waiting_customer", now=at, actor_kind="staff",
                       actor="bob@support.example", reason="asked for logs")  # fmt: skip
    desk.later(timedelta(days=5, hours=1))  # Saturday: Monday's is 3 business days old
    desk.sweep()
    ids = {m.ticket_id for m in desk.rows(OutboxMail, kind="waiting_reminder")}
    assert [t.number for t in desk.rows(Ticket) if t.id in ids] == [numbers[-1]]
    assert any(numbers[-1] in m["Subject"] and m["Auto-Submitted"] == "auto-generated"
               for m in desk.mails_to("alice@acme.example"))  # fmt: skip


def wait_on_customer(inst: Installation, number: str, since: datetime) -> None:
    """Ticket `number` has waited on the customer since `since`, as /status waiting does."""
    with inst.session() as s, s.begin():
        ticket = s.scalar(select(Ticket).where(Ticket.number == number))
        set_status(s, ticket, "waiting_customer", now=since, actor_kind="staff",
                   actor="bob@support.example", reason="asked for logs")  # fmt: skip


def test_waiting_days_are_the_organisations_business_days(desk: Desk) -> None:
    """Waiting since 00:30 on Saturday in Brussels (still Friday in UTC): the three
    business days count from Monday there, and end at Thursday's midnight there."""
    number = desk.inst.ingest(make_mail(sender=ALICE, message_id="w@acme.example",
                                        subject="Question")).ticket  # fmt: skip
    wait_on_customer(desk.inst, number, datetime(2026, 11, 27, 23, 30, tzinfo=UTC))
    desk.inst.clock.now = datetime(2026, 12, 2, 22, 59, tzinfo=UTC)  # type: ignore[attr-defined]
    desk.sweep()
    assert desk.rows(OutboxMail, kind="waiting_reminder") == []
    desk.later(timedelta(minutes=1))  # Thursday 00:00 in Brussels
    desk.sweep()
    assert len(desk.rows(OutboxMail, kind="waiting_reminder")) == 1


def test_a_customer_is_reminded_before_the_ticket_is_resolved_whatever_the_backlog(
    desk: Desk, monkeypatch: pytest.MonkeyPatch
) -> None:
    """After a long downtime more reminders are due than a sweep sends (a batch of
    1 here): a waiting ticket not reminded yet waits for its reminder, and its
    four more business days, before it is resolved."""
    from mailgate.tickets import sweep

    monkeypatch.setattr(sweep, "BATCH", 1)
    numbers = [desk.inst.ingest(make_mail(sender=ALICE, message_id=f"w{i}@acme.example",
                                          subject=f"Question {i}")).ticket
               for i in range(2)]  # fmt: skip
    for number in numbers:
        wait_on_customer(desk.inst, number, NOW)
    desk.later(timedelta(days=16))  # both long past 3 + 4 business days
    desk.sweep()
    reminded = {t.number: (t.status, t.reminded_at is not None) for t in desk.rows(Ticket)}
    assert reminded == {
        numbers[0]: ("waiting_customer", True),  # the first in line: reminded
        numbers[1]: ("waiting_customer", False),  # its turn comes at the next sweep
    }
    assert desk.rows(OutboxMail, kind="resolved") == []


@pytest.mark.parametrize(
    ("remind", "resolve", "reminders", "status"),
    [(0, 4, 0, "resolved"), (3, 0, 1, "waiting_customer")],
    ids=["no-reminder", "no-resolution"],
)
def test_zero_waiting_days_mean_never(
    install: Callable[..., Installation], remind: int, resolve: int, reminders: int, status: str
) -> None:
    """README: 0 business days before a reminder, or before resolving, means never."""
    from mailgate.tickets.sweep import sweep

    days = {"waiting_reminder_days": remind, "waiting_resolve_days": resolve}
    inst = install(settings={"tickets": days})
    number = inst.ingest(make_mail(sender=ALICE, subject="Question")).ticket
    wait_on_customer(inst, number, NOW)
    for day in range(1, 15):  # two weeks of daily sweeps
        sweep(inst.app, NOW + timedelta(days=day))
    with inst.session() as s:
        sent = s.scalars(select(OutboxMail).where(OutboxMail.kind == "waiting_reminder")).all()
        assert (len(sent), s.scalar(select(Ticket.status))) == (reminders, status)


WAIT_AFTER_A_REPLY = {"tickets": {"status_after_staff_reply": "waiting_customer"}}


@pytest.mark.parametrize("desk", [WAIT_AFTER_A_REPLY], indirect=True)
def test_a_status_command_wins_over_the_status_a_reply_would_set(desk: Desk) -> None:
    """With status_after_staff_reply: waiting_customer, a reply waits on the customer;
    one that says /status open (Bob is still on it) stays open, as he wrote."""
    open_ticket(desk)
    desk.send(staff_answer(desk, "Which browser do you use?\n", "bob-1@support.example"))
    assert desk.ticket().status == "waiting_customer"
    desk.send(staff_answer(desk, "/status open\nI am still looking into it.\n",
                           "bob-2@support.example"))  # fmt: skip
    assert desk.ticket().status == "open"
    assert [(e.old, e.new) for e in desk.rows(TicketEvent, field="status")][-1] == (
        "waiting_customer", "open"
    )  # fmt: skip


def test_customer_reply_to_a_waiting_ticket_opens_it(desk: Desk) -> None:
    original = open_ticket(desk)
    desk.send(staff_answer(desk, "/status waiting\nWhich browser?\n", "bob-1@support.example"))
    desk.send(reply_to(original, sender=ALICE, body="Firefox.\n", message_id="req-2@acme.example"))
    assert desk.ticket().status == "open"
    assert desk.ticket().waiting_since is None


@pytest.mark.parametrize(
    "filename",
    ["=?utf-8?q?guide=0D=0ABcc:_evil@example.net?=.pdf", "guide.pdf\r\nBcc: evil@example.net"],
)
def test_relayed_mail_headers_cannot_be_injected(desk: Desk, filename: str) -> None:
    """Checklist 30 and 3 for a relayed reply: CR/LF in a name never makes a header."""
    desk.send_raw(
        b"From: Alice Martin <alice@acme.example>\r\n"
        b"To: support@example.com\r\nSubject: =?utf-8?q?Login=0D=0ABcc:_evil@example.net?=\r\n"
        b"Message-ID: <req-1@acme.example>\r\nDate: Mon, 23 Nov 2026 09:15:00 +0100\r\n\r\n"
        b"Nobody can log in.\r\n"
    )
    notice = staff_notice(desk)["Message-ID"]
    desk.send_raw(
        f"From: {BOB}\r\nTo: {SUPPORT}\r\nSubject: Re: login\r\nIn-Reply-To: {notice}\r\n"
        "Message-ID: <bob-1@support.example>\r\nMIME-Version: 1.0\r\n"
        'Content-Type: multipart/mixed; boundary="b"\r\n\r\n'
        "--b\r\nContent-Type: text/plain\r\n\r\nFixed.\r\n--b\r\n"
        f'Content-Type: application/pdf\r\nContent-Disposition: attachment; filename="{filename}"'
        "\r\nContent-Transfer-Encoding: base64\r\n\r\nZGF0YQ==\r\n--b--\r\n".encode()
    )
    (relayed,) = [r for r in desk.received_by("alice@acme.example") if b"Fixed." in r.data]
    assert b"\nBcc" not in relayed.data
    assert "evil@example.net" not in relayed.rcpt_tos
    assert [p.get_content() for p in relayed.message.iter_attachments()] == [b"data"]
    # Checklist 3: every relayed mail is marked, ours, and has the VERP sender.
    message = relayed.message
    assert message["Auto-Submitted"] == "no"
    assert message["Precedence"] == "bulk" and message["X-Auto-Response-Suppress"] == "All"
    assert message["Message-ID"].endswith("@example.com>")
    assert relayed.mail_from.startswith("support+b")


def test_internal_first_line_keeps_the_note_from_the_customer(desk: Desk) -> None:
    open_ticket(desk)
    before = len(desk.mails_to("alice@acme.example"))
    desk.send(
        staff_answer(desk, "/internal\nCustomer is on the legacy SSO.\n", "bob-1@support.example")
    )
    assert len(desk.mails_to("alice@acme.example")) == before
    (note,) = [a for a in desk.rows(Article) if a.message_id == "bob-1@support.example"]
    assert note.visibility == "internal" and note.text == "Customer is on the legacy SSO."
    assert desk.ticket().status == "new"  # a note is not an answer to the customer


def test_customer_replies_go_to_the_assignee_only(
    install: Callable[..., Installation], sink: Sink
) -> None:
    directory = yaml.safe_load((ROOT / "directory.yaml").read_text())
    directory["staff"].append({"email": "zoe@support.example", "name": "Zoé Dupré"})
    inst = install(settings={"outbound": {"transport": "smtp", "smtp": {
        "host": "127.0.0.1", "port": sink.port, "tls": "none"}}}, directory=directory)  # fmt: skip
    original = make_mail(sender=ALICE)
    inst.ingest(original)
    inst.send_outbox()
    notice = next(r.message for r in sink.received if "zoe@support.example" in r.rcpt_tos)
    zoe = "Zoé Dupré <zoe@support.example>"
    inst.ingest(reply_to(notice, sender=zoe, body="/assign me\n", message_id="zoe-1@support"))
    sink.received.clear()
    inst.ingest(reply_to(original, sender=ALICE, body="Any news?\n", message_id="req-2@acme"))
    inst.send_outbox()
    assert [r.rcpt_tos for r in sink.received] == [("zoe@support.example",)]


def test_tickets_show_lists_history_and_time_and_sweep_runs_by_hand(
    desk: Desk, capsys: pytest.CaptureFixture[str]
) -> None:
    open_ticket(desk)
    desk.send(staff_answer(desk, "/status resolved\n/spend 1h\n", "bob-1@support.example"))
    number = desk.ticket().number
    config = ["--config", str(desk.inst.settings_file)]

    def cli(*args: str) -> str:
        proc = subprocess.run([sys.executable, "-m", "mailgate", *config, *args],
                              capture_output=True, text=True, check=True, cwd=ROOT)  # fmt: skip
        return proc.stdout

    shown = json.loads(cli("tickets", "show", number, "--json"))
    assert [(e["field"], e["old"], e["new"], e["actor"]) for e in shown["history"]][1:] == [
        ("status", "new", "resolved", "bob@support.example")
    ]
    assert [t["minutes"] for t in shown["time_spent"]] == [60]
    text = cli("tickets", "show", number)
    assert "status: new -> resolved  by bob@support.example" in text
    assert "60 min in 1 entry\n" in text
    # By hand, as the daemon's sweep does it (in-process: on the installation's clock).
    desk.inst.clock.now += timedelta(days=15)
    capsys.readouterr()
    assert desk.inst.cli("tickets", "sweep") == 0
    assert capsys.readouterr().out.startswith("0 reminded, 0 resolved, 1 closed")
    assert desk.ticket().status == "closed"
    # The list says when the ticket last changed: the sweep that closed it.
    assert desk.inst.cli("tickets", "list", "--json") == 0
    (listed,) = json.loads(capsys.readouterr().out)
    assert (listed["status"], listed["updated_at"]) == ("closed", desk.inst.clock().isoformat())


# Every mail client quotes the mail it answers; under a commands-only reply, that
# quote is our own staff notice (organisation, priority, the request's first lines).
NOTICE_QUOTED = {
    "attribution": (
        "\n\nOn Mon, 23 Nov 2026 at 09:30, Support <support@example.com> wrote:\n"
        "> New ticket SUP-2026-000001\n>   Organisation: ACME Corp\n>   Priority: P1\n"
    ),
    "outlook": (
        "\n\n________________________________\nFrom: Support <support@example.com>\n"
        "Sent: Monday, November 23, 2026 10:30\nTo: Bob Durand <bob@support.example>\n"
        "Subject: [SUP-2026-000001] New P1 ticket\n\nNew ticket SUP-2026-000001\n"
    ),
    "signature": "\n\n-- \nBob Durand | Tier 2 support | +33 1 23 45 67 89\n",
}


@pytest.mark.parametrize("below", NOTICE_QUOTED.values(), ids=NOTICE_QUOTED.keys())
def test_commands_above_a_quote_relay_nothing_to_the_customer(desk: Desk, below: str) -> None:
    """A reply holding only commands is commands only, whatever the client quoted
    or signed under them: nothing reaches the customer, no first response."""
    open_ticket(desk)
    to_alice = len(desk.mails_to("alice@acme.example"))
    desk.send(staff_answer(desk, "/status waiting" + below, "bob-1@support.example"))
    assert len(desk.mails_to("alice@acme.example")) == to_alice
    assert desk.rows(OutboxMail, kind="staff_reply") == []
    assert desk.ticket().status == "waiting_customer"
    (note,) = [a for a in desk.rows(Article) if a.message_id == "bob-1@support.example"]
    assert (note.visibility, note.text) == ("internal", "/status waiting")
    with desk.inst.session() as session:
        clock = session.scalars(select(SlaClock).filter_by(kind="first_response")).one()
        assert clock.stopped_at is None


def test_a_reply_nobody_would_receive_is_refused(desk: Desk) -> None:
    """The requester left the directory and nobody is copied: the reply would reach
    nobody, so it is refused as a whole rather than counted as the first response."""
    open_ticket(desk)
    path = desk.inst.root / "directory.yaml"
    directory = yaml.safe_load(path.read_text())
    acme = directory["organisations"][0]
    acme["contacts"] = [c for c in acme["contacts"] if c["email"] != "alice@acme.example"]
    path.write_text(yaml.safe_dump(directory))
    sync_directory_if_changed(desk.inst.app)
    desk.send(staff_answer(desk, "/priority P2\nHere is the fix.\n", "bob-1@support.example"))
    assert desk.rows(OutboxMail, kind="staff_reply") == []
    ticket = desk.ticket()
    assert (ticket.status, ticket.priority) == ("new", "P1")  # nothing applied
    refusal = staff_notice(desk)
    assert refusal["In-Reply-To"] == "<bob-1@support.example>"
    assert "nobody" in refusal.get_body(("plain",)).get_content()
    # Copying a current contact in the same mail gives the reply someone to go to.
    desk.send(staff_answer(desk, f"/cc {CAROL}\nHere is the fix.\n", "bob-2@support.example"))
    (relayed,) = desk.received_by(CAROL)
    assert "Here is the fix." in relayed.message.get_body(("plain",)).get_content()


@pytest.mark.parametrize("body", ["", "/status waiting\n"], ids=["no text", "a command"])
def test_a_file_sent_without_text_reaches_the_customer(desk: Desk, body: str) -> None:
    """An attachment is something to send: a mail with no words of its own but a
    file is relayed, not filed away as a commands-only note."""
    open_ticket(desk)
    answer = staff_answer(desk, body, "bob-1@support.example")
    answer.add_attachment(b"%PDF-1.4 fix", maintype="application", subtype="pdf",
                          filename="fix.pdf")  # fmt: skip
    desk.send(answer)
    (relayed,) = desk.received_by("alice@acme.example")[1:]  # after the acknowledgement
    assert [a.get_filename() for a in relayed.message.iter_attachments()] == ["fix.pdf"]
    (article,) = [a for a in desk.rows(Article) if a.message_id == "bob-1@support.example"]
    assert article.visibility == "public"
    assert desk.ticket().status == ("waiting_customer" if body else "open")


def test_a_signature_logo_under_commands_is_no_file_to_send(desk: Desk) -> None:
    """An HTML mail client puts the signature's logo in the mail as an inline part:
    the commands-only mail stays a note, no empty mail with a logo goes to Alice."""
    open_ticket(desk)
    to_alice = len(desk.mails_to("alice@acme.example"))
    answer = staff_answer(desk, "/status waiting\n\n-- \nBob Durand\n", "bob-1@support.example")
    answer.add_alternative('<p>/status waiting</p><p>-- <br>Bob Durand '
                           '<img src="cid:logo@support.example"></p>', subtype="html")  # fmt: skip
    answer.get_body(("html",)).add_related(b"\x89PNG logo", maintype="image", subtype="png",
                                            cid="<logo@support.example>")  # fmt: skip
    desk.send(answer)
    assert len(desk.mails_to("alice@acme.example")) == to_alice
    assert desk.rows(OutboxMail, kind="staff_reply") == []
    assert desk.ticket().status == "waiting_customer"
    (note,) = [a for a in desk.rows(Article) if a.message_id == "bob-1@support.example"]
    assert (note.visibility, note.text) == ("internal", "/status waiting")


def test_an_html_only_answer_keeps_its_links_for_the_customer(desk: Desk) -> None:
    """A mail client that sends HTML alone: the customer gets text made from it,
    where "click here" lost the address it pointed to. A script's link is no address."""
    open_ticket(desk)
    answer = staff_answer(desk, "unused", "bob-1@support.example")
    answer.set_content(
        '<p>Please <a href="https://status.example.com/reset?user=alice&amp;step=2">click '
        '<b>here</b></a>, or see <a href="https://docs.example.com/">https://docs.example.com/</a>'
        ' and <a href="javascript:steal()">this</a>.</p>',
        subtype="html",
    )
    desk.send(answer)
    (relayed,) = desk.mails_to("alice@acme.example")[1:]  # after the acknowledgement
    for kind in ("plain", "html"):
        text = relayed.get_body((kind,)).get_content()
        if kind == "html":
            text = html.unescape(text)
        assert "click here <https://status.example.com/reset?user=alice&step=2>" in text
        assert "https://docs.example.com/ and this." in text  # no address written twice
        assert "javascript" not in text


def test_a_reply_bob_wrote_to_the_customer_himself_is_not_sent_to_them_again(
    desk: Desk,
) -> None:
    """Bob answers Alice from his own mail client, support in Cc: Alice has his
    mail; relayed too, she got it twice. Carol, copied on the ticket but not
    on Bob's mail, still gets it from the support address."""
    original = make_mail(sender=ALICE, message_id="req-1@acme.example",
                         to=f"{SUPPORT}, {CAROL}")  # fmt: skip
    desk.send(original)
    direct = reply_to(original, sender=BOB, to=ALICE, body="Fixed on our side.\n",
                      message_id="bob-1@support.example")  # fmt: skip
    direct["Cc"] = SUPPORT
    before = len(desk.mails_to("alice@acme.example"))
    desk.send(direct)
    assert len(desk.mails_to("alice@acme.example")) == before
    (relayed,) = [m for m in desk.mails_to(CAROL) if "Fixed on our side." in m.as_string()]
    assert relayed["From"] == f"Bob Durand <{SUPPORT}>" and relayed["To"] == CAROL
    (article,) = [a for a in desk.rows(Article) if a.message_id == "bob-1@support.example"]
    assert article.visibility == "public"


@pytest.mark.parametrize("header", ["Delivered-To", "X-Original-To"])
def test_a_note_bcc_to_internal_fetched_by_imap_stays_internal(desk: Desk, header: str) -> None:
    """Over IMAP there is no envelope: a Bcc to support+internal@ shows only in the
    header the provider's delivery added. The note was relayed to the customer."""
    open_ticket(desk)
    note = staff_answer(desk, "Customer is on the legacy SSO.\n", "bob-1@support.example")
    note[header] = "support+internal@example.com"
    before = len(desk.mails_to("alice@acme.example"))
    imap = Envelope(source="imap", rcpt_to=(SUPPORT,), mailbox_uid="support/INBOX/1/7")
    assert desk.inst.ingest(note, imap).outcome == "threaded"
    desk.inst.send_outbox()
    assert len(desk.mails_to("alice@acme.example")) == before
    (stored,) = [a for a in desk.rows(Article) if a.message_id == "bob-1@support.example"]
    assert stored.visibility == "internal"


def test_a_long_thread_stores_the_references_the_mail_carried(desk: Desk) -> None:
    """The headers keep the root and the last ten; the article stored with each
    outbound mail kept the whole thread, so a thread's rows grew with its square."""
    original = open_ticket(desk)
    for n in range(12):
        desk.inst.ingest(reply_to(original, sender=ALICE, body=f"Detail {n}.\n",
                                  message_id=f"more-{n}@acme.example"))  # fmt: skip
    desk.send(staff_answer(desk, "Here is the fix.\n", "bob-1@support.example"))
    (relayed,) = [m for m in desk.mails_to("alice@acme.example") if "the fix" in m.as_string()]
    sent = [r.strip("<>") for r in relayed["References"].split()]
    assert len(sent) == 11 and sent[0] == "req-1@acme.example"
    (article,) = desk.rows(Article, direction="out", author_kind="staff")
    assert [r.strip("<>") for r in article.references] == sent
