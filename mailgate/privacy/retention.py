"""Retention: support data kept only as long as needed (GDPR Art. 5(1)(e)).

Two rules, run hourly by the leader and by `mailgate retention run`:

1. A ticket closed `retention.closed_days` ago (per organisation) loses its
   raw mail, attachments, HTML and outbound bytes, and its people are replaced
   by per-ticket pseudonyms (privacy/forget.py). What accounting and reporting
   need stays: tracking number, organisation, priority, timestamps, SLA clocks,
   time and credit ledger rows, staff. The ticket is marked `anonymised_at`.
   A contact gone from the directory file (not one it lists as inactive)
   whose tickets are all anonymised loses its address and name too.
2. Mail that never became part of a ticket (quarantined, rejected, ignored
   auto-replies, later deliveries of those) and the mail we sent on no ticket
   (rejection notices to strangers, operator alerts) is deleted, with its raw
   bytes, `retention.quarantine_days` after it was received or queued.

One transaction per ticket (its row locked), on a live system: a run that is killed leaves
every ticket either done (marked) or untouched, and the next run does the
rest, nothing twice. Blobs are deleted just before the commit that drops the
last reference, never after it (see forget.py).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from datetime import datetime, timedelta

from sqlalchemy import select
from sqlalchemy.orm import Session

from mailgate.app import App
from mailgate.privacy.forget import (
    ERASED_DOMAIN,
    Forgotten,
    delete_record,
    forget_contact,
    forget_ticket,
    pseudonyms_for_ticket,
    ticket_people,
)
from mailgate.store.blobs import drop_unreferenced
from mailgate.store.db import forget_old_pages
from mailgate.store.models import Contact, IngestRecord, OutboxMail, Ticket, TicketEvent

log = logging.getLogger("mailgate.retention")

FINISHED = ("sent", "failed", "dead")  # outbound mail nothing will send again


@dataclass
class RetentionReport:
    tickets: list[str] = field(default_factory=list)  # tracking numbers anonymised
    records: int = 0  # received mails on no ticket deleted
    outbox: int = 0  # mails sent on no ticket deleted
    blobs: int = 0  # raw mails and attachments deleted
    contacts: int = 0  # former contacts whose record no longer names them

    def __str__(self) -> str:
        return (
            f"{len(self.tickets)} ticket(s) anonymised, {self.records} received and "
            f"{self.outbox} sent mail(s) on no ticket deleted, {self.blobs} stored file(s) "
            f"removed, {self.contacts} former contact(s) anonymised"
        )


def due_tickets(app: App, session: Session, now: datetime) -> list[tuple[int, str]]:
    """(id, tracking number) of closed tickets past their organisation's retention."""
    retention = app.settings.retention
    shortest = min([retention.closed_days, *(o.closed_days for o in
                                             retention.organisations.values())])  # fmt: skip
    query = (
        select(Ticket.id, Ticket.number, Ticket.organisation_id, Ticket.closed_at)
        .where(
            Ticket.status == "closed",
            Ticket.anonymised_at.is_(None),
            Ticket.closed_at <= now - timedelta(days=shortest),
        )
        .order_by(Ticket.closed_at, Ticket.id)
    )
    return [
        (ticket_id, number)
        for ticket_id, number, org_id, closed_at in session.execute(query)
        if closed_at <= now - timedelta(days=retention.closed_days_for(org_id))
    ]


def expired_records(
    app: App, session: Session, now: datetime, limit: int | None = None, *, claim: bool = False
) -> list[IngestRecord]:
    """Received mail on no ticket, `quarantine_days` old, whatever was decided
    about it. Only quarantined and rejected mail went: an ignored auto-reply (an
    out-of-office naming its author, a phone number) and a second delivery of
    held mail (a duplicate holding the same bytes) were kept for ever.

    `claim`: lock the rows, passing over those another run holds (PostgreSQL;
    SQLite has one writer anyway). Without it, two runs at once (the leader's and
    an operator's) both read a row, one deleted it, and the other waited, then
    deleted nothing yet counted it, with a warning from SQLAlchemy."""
    cutoff = now - timedelta(days=app.settings.retention.quarantine_days)
    query = (
        select(IngestRecord)
        .where(IngestRecord.ticket_id.is_(None), IngestRecord.received_at <= cutoff)
        .order_by(IngestRecord.id)
        .limit(limit)
    )
    if claim:
        query = query.with_for_update(skip_locked=True)
    return list(session.scalars(query))


def expired_outbox(
    app: App, session: Session, now: datetime, limit: int | None = None, *, claim: bool = False
) -> list[OutboxMail]:
    """Mail we sent on no ticket (a rejection notice to a stranger, an operator
    alert naming a sender), `quarantine_days` old and done with: it named a
    person for ever while the mail it answered was deleted. Rate limits and
    bounce matching look back a day or two, never this far."""
    cutoff = now - timedelta(days=app.settings.retention.quarantine_days)
    query = (
        select(OutboxMail)
        .where(
            OutboxMail.ticket_id.is_(None),
            OutboxMail.status.in_(FINISHED),
            OutboxMail.created_at <= cutoff,
        )
        .order_by(OutboxMail.id)
        .limit(limit)
    )
    if claim:
        query = query.with_for_update(skip_locked=True)
    return list(session.scalars(query))


def run(app: App, now: datetime, *, dry_run: bool = False) -> RetentionReport:
    report = RetentionReport()
    batch = app.settings.retention.batch
    with app.sessions() as session:
        due = due_tickets(app, session, now)
        if dry_run:
            report.tickets = [number for _, number in due]
            report.records = len(expired_records(app, session, now))
            report.outbox = len(expired_outbox(app, session, now))
            return report
    for ticket_id, number in due:
        with app.sessions() as session, session.begin():
            ticket = session.get_one(Ticket, ticket_id, with_for_update=True)
            if not _still_due(app, ticket, now):
                continue
            report.blobs += _anonymise(app, session, ticket, now)
            report.tickets.append(number)
    while True:
        with app.sessions() as session, session.begin():
            records = expired_records(app, session, now, batch, claim=True)
            done = Forgotten()
            for record in records:
                delete_record(session, record, done)
            report.blobs += drop_unreferenced(session, app.blobs, done.blobs)
            report.records += len(records)
        if len(records) < batch:
            break
    while True:
        with app.sessions() as session, session.begin():
            sent = expired_outbox(app, session, now, batch, claim=True)
            for mail in sent:
                session.delete(mail)
            report.outbox += len(sent)
        if len(sent) < batch:
            break
    with app.sessions() as session, session.begin():
        report.contacts = _former_contacts(session)
    if report.tickets or report.records or report.outbox or report.contacts:
        forget_old_pages(app.engine)
        log.info("retention: %s", report)
    return report


def _still_due(app: App, ticket: Ticket, now: datetime) -> bool:
    """The ticket as it is once its row is locked, not as it was listed: another
    run may have anonymised it, and staff on another instance may have reopened
    it (or reopened and closed it again) since the list was read."""
    if ticket.anonymised_at is not None or ticket.status != "closed" or ticket.closed_at is None:
        return False
    return ticket.closed_at <= now - timedelta(days=app.settings.retention.closed_days_for(
        ticket.organisation_id))  # fmt: skip


def _former_contacts(session: Session) -> int:
    """Contacts gone from the directory with no ticket left to anonymise: nothing
    needs their address any more. One it lists as inactive stays: the next sync
    would only write them in again, as a new contact."""
    unfinished = select(Ticket.requester_id).where(Ticket.anonymised_at.is_(None),
                                                   Ticket.requester_id.is_not(None))  # fmt: skip
    former = select(Contact).where(
        Contact.listed.is_(False),
        Contact.id.not_in(unfinished),
        Contact.email.not_like(f"%@{ERASED_DOMAIN}"),
    )
    contacts = list(session.scalars(former))
    for contact in contacts:
        forget_contact(contact)
    return len(contacts)


def _anonymise(app: App, session: Session, ticket: Ticket, now: datetime) -> int:
    names = pseudonyms_for_ticket(session, app.settings.support_address)
    ticket_people(session, ticket, names)
    done = forget_ticket(session, ticket, names)
    # A customer still in the directory keeps their contact row: the ticket must
    # not point at it any more, or it would still say who opened it.
    ticket.requester_id = None
    ticket.anonymised_at = now
    why = f"retention: closed on {ticket.closed_at:%Y-%m-%d}"
    session.add(TicketEvent(ticket_id=ticket.id, at=now, actor_kind="system", actor=None,
                            field="anonymised", old=None, new=None, reason=why))  # fmt: skip
    return drop_unreferenced(session, app.blobs, done.blobs)
