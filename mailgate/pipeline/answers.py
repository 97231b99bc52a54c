"""The mail one inbound message causes: to its sender (acknowledgement,
rejection, held-mail and spoof notices) and to staff (new ticket, customer
reply). Queued in the message's own transaction (outbound/mailer.py), so it is
sent if and only if what it reports was stored."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime, timedelta

from sqlalchemy.orm import Session

from mailgate.app import App
from mailgate.credits.billing import credit_context
from mailgate.credits.ledger import Balance
from mailgate.outbound.dates import format_when
from mailgate.outbound.mailer import ticket_context
from mailgate.pipeline.decide import Decision
from mailgate.pipeline.identify import Identity, Person
from mailgate.pipeline.message import ParsedMessage
from mailgate.store.models import OutboxMail, SlaClock, Ticket
from mailgate.tickets import repository as repo


def queue_rejection(
    app: App, session: Session, msg: ParsedMessage, person: Person | None, reason: str,
    now: datetime,
) -> OutboxMail | None:  # fmt: skip
    """The rejection template to the sender, `reason` one of its codes."""
    assert msg.sender is not None
    return app.mailer.queue(
        session,
        kind="rejection",
        to=[msg.sender],
        language=person.language if person else "en",
        context={
            "reason": reason,
            "ticket": None,
            # The directory's name or none: the display name is the sender's
            # to choose, and the address may be forged, so it would carry a
            # stranger's words (a phishing line) to a victim.
            "requester_name": person.name if person else None,
        },
        now=now,
        answers=msg.message_id,
        references=msg.references,
    )


def tell_held_sender(
    app: App, session: Session, msg: ParsedMessage, code: str, now: datetime
) -> bool:
    """Tell a person of the directory that their mail was held (`code`: a rejection
    reason), at most once per reject_notice_hours, as a rejection is. Strangers are
    not told: the address may be forged, and the mail is often spam."""
    sender = msg.sender
    person = repo.find_person(session, sender) if sender else None
    if sender is None or person is None or not person.active:
        return False
    since = now - timedelta(hours=app.settings.tickets.reject_notice_hours)
    if repo.recent_mail_to(session, sender, "rejection", since):
        return False
    return queue_rejection(app, session, msg, person, code, now) is not None


def queue_spoof_notice(app: App, session: Session, identity: Identity, now: datetime) -> None:
    """Tell the real owner of the address, at most once per period, that mail
    claiming to be from them was held. Nothing from the held mail is repeated:
    its text is the forger's."""
    auth = app.settings.hygiene.authentication
    since = now - timedelta(hours=auth.notice_hours)
    if repo.recent_mail_to(session, identity.address, "spoof_notice", since):
        return
    person = identity.person
    app.mailer.queue(
        session,
        kind="spoof_notice",
        to=[identity.address],
        language=person.language if person else "en",
        context={"person_name": person.name if person else ""},
        now=now,
        auto_submitted="auto-generated",
    )


def queue_created_mail(
    app: App,
    session: Session,
    ticket: Ticket,
    msg: ParsedMessage,
    decision: Decision,
    clocks: Sequence[SlaClock],
    credit: Balance | None,
    now: datetime,
) -> None:
    """A new ticket: the acknowledgement to its requester (unless the decision
    holds it back) and the notice to its staff."""
    # The directory's name for the person: the display name is whatever the
    # sender wrote (unsigned mail under `prefer` too), and greeting Alice with a
    # forger's "reset your password at http://…" puts it in mail from us.
    known = ticket.requester.name if ticket.requester else ""
    context = {
        "ticket": ticket_context(ticket),
        "requester_name": known or msg.from_name,  # staff see what was written
        "text": msg.text[:2000],
        "attachments": [{"name": a.filename, "size": len(a.payload)} for a in msg.attachments],
    }
    if decision.send_ack and ticket.requester is not None:
        zone = ticket.organisation.timezone or "UTC"
        deadlines = [
            {"kind": c.kind, "due": format_when(c.due_at, zone, ticket.language)} for c in clocks
        ]
        app.mailer.queue(
            session,
            kind="ack",
            to=[ticket.requester.email],
            language=ticket.language,
            context={
                **context,
                "requester_name": known or None,
                "targets": deadlines,
                "credit": credit_context(credit, ticket.organisation, flagged=decision.no_credit),
            },
            now=now,
            ticket=ticket,
            answers=msg.message_id,
            references=msg.references,
        )
    staff = repo.ticket_staff(session, ticket)
    if staff:
        app.mailer.queue(
            session,
            kind="staff_new_ticket",
            to=staff,
            language="en",
            context=context,
            now=now,
            ticket=ticket,
            answers=msg.message_id,
            auto_submitted="auto-generated",
        )


def queue_reply_notice(
    app: App, session: Session, ticket: Ticket, msg: ParsedMessage, now: datetime
) -> None:
    """Staff are told of the customer's answer."""
    staff = repo.ticket_staff(session, ticket)
    if staff:
        app.mailer.queue(
            session,
            kind="staff_customer_reply",
            to=staff,
            language="en",
            context={
                "ticket": ticket_context(ticket),
                "requester_name": msg.from_name,
                "text": msg.text[:20000],
            },
            now=now,
            ticket=ticket,
            answers=msg.message_id,
            auto_submitted="auto-generated",
        )
