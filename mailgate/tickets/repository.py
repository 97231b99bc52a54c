"""Database reads the pipeline needs, returned as plain data."""

from __future__ import annotations

from collections.abc import Collection, Sequence
from datetime import datetime

from sqlalchemy import ColumnElement, exists, func, select
from sqlalchemy.orm import Session

from mailgate.pipeline.identify import Person
from mailgate.pipeline.thread import TicketView
from mailgate.store.models import (
    Article,
    Contact,
    IngestRecord,
    Organisation,
    OutboxMail,
    Staff,
    Ticket,
    TicketEvent,
    TimeEntry,
)


def ticket_view(ticket: Ticket) -> TicketView:
    return TicketView(
        id=ticket.id,
        number=ticket.number,
        organisation_id=ticket.organisation_id,
        status=ticket.status,
        requester=ticket.requester.email if ticket.requester else None,
        cc=tuple(ticket.cc or ()),
        resolved_at=ticket.resolved_at,
    )


class SqlTicketLookup:
    def __init__(self, session: Session):
        self.session = session

    def by_id(self, ticket_id: int) -> TicketView | None:
        ticket = self.session.get(Ticket, ticket_id)
        return ticket_view(ticket) if ticket else None

    def by_number(self, number: str) -> TicketView | None:
        ticket = self.session.scalar(select(Ticket).where(Ticket.number == number))
        return ticket_view(ticket) if ticket else None

    def by_message_ids(self, message_ids: Sequence[str]) -> list[TicketView]:
        rows = self.session.execute(
            select(Article.message_id, Article.ticket_id).where(Article.message_id.in_(message_ids))
        ).all()
        first_ticket: dict[str, int] = {}
        for mid, ticket_id in rows:
            first_ticket.setdefault(mid, ticket_id)
        views: list[TicketView] = []
        seen: set[int] = set()
        for mid in message_ids:  # keep the caller's order: most specific key first
            ticket_id = first_ticket.get(mid)
            if ticket_id is not None and ticket_id not in seen:
                seen.add(ticket_id)
                if view := self.by_id(ticket_id):
                    views.append(view)
        return views


def find_person(session: Session, address: str) -> Person | None:
    staff = session.scalar(select(Staff).where(Staff.email == address))
    if staff:
        return Person(address, "staff", staff.id, staff.name, staff.active)
    contact = session.scalar(select(Contact).where(Contact.email == address))
    if contact is None:
        return None
    org: Organisation = contact.organisation
    return Person(
        address,
        "contact",
        contact.id,
        contact.name,
        contact.active,
        role=contact.role,
        organisation_id=org.id,
        organisation_active=org.active,
        contract_from=org.contract_from,
        contract_until=org.contract_until,
        language=org.language,
    )


def first_delivery(session: Session, dedupe_key: str) -> IngestRecord | None:
    return session.scalar(select(IngestRecord).where(IngestRecord.dedupe_key == dedupe_key))


def fetched_before(session: Session, first: IngestRecord, mailbox_uid: str) -> IngestRecord | None:
    """The record of this mailbox message, if it was stored already: the first
    delivery itself, or one of its duplicates (the same mail came by SMTP too)."""
    records = [first, *session.scalars(select(IngestRecord).where(
        IngestRecord.duplicate_of_id == first.id))]  # fmt: skip
    return next((r for r in records if (r.envelope or {}).get("mailbox_uid") == mailbox_uid), None)


def message_id_seen(session: Session, message_id: str) -> bool:
    """Did another first delivery carry this Message-ID? (Duplicates point at their
    first delivery; a released mail gave its key up to its release.)"""
    query = select(func.count()).where(
        IngestRecord.message_id == message_id, IngestRecord.dedupe_key.is_not(None)
    )
    return bool(session.scalar(query))


def recent_mail_to(session: Session, address: str, kind: str, since: datetime) -> bool:
    return bool(
        session.scalar(
            select(func.count()).where(
                OutboxMail.recipient == address,
                OutboxMail.kind == kind,
                OutboxMail.created_at >= since,
            )
        )
    )


def active_staff(session: Session) -> list[Staff]:
    return list(session.scalars(select(Staff).where(Staff.active.is_(True)).order_by(Staff.id)))


def ticket_staff(session: Session, ticket: Ticket) -> list[str]:
    """Who hears about a ticket: its assignee while active, else the active members
    of its group, else every active staff member (mail about a ticket always
    reaches someone, whatever the directory became since)."""
    staff = active_staff(session)
    if ticket.assignee is not None and ticket.assignee.active:
        return [ticket.assignee.email]
    group = [s.email for s in staff if ticket.group in s.groups]
    return group or [s.email for s in staff]


def contacts_of(session: Session, organisation_id: str, addresses: Sequence[str]) -> list[Contact]:
    """Active contacts of one organisation among `addresses` (strangers are never copied)."""
    if not addresses:
        return []
    return list(
        session.scalars(
            select(Contact).where(
                Contact.organisation_id == organisation_id,
                Contact.active.is_(True),
                Contact.email.in_(addresses),
            )
        )
    )


def ticket_customers(
    session: Session, ticket: Ticket, *, cc: Sequence[str] | None = None
) -> list[str]:
    """Who on the customer's side hears from a ticket: its requester and copied
    contacts (`cc`: the ticket's, or those it is about to have) that are still
    active contacts of its organisation. Checked when the mail is written, not
    when they were copied: the directory may since have deactivated someone or
    moved them to another organisation."""
    wanted = [ticket.requester.email] if ticket.requester else []
    wanted += [a for a in (ticket.cc if cc is None else cc) if a not in wanted]
    allowed = {c.email for c in contacts_of(session, ticket.organisation_id, wanted)}
    return [a for a in wanted if a in allowed]


def staff_id(session: Session, address: str) -> int | None:
    """An active staff member's id (a rule may name someone who has left: None)."""
    query = select(Staff.id).where(Staff.email == address.lower(), Staff.active.is_(True))
    return session.scalar(query)


def staff_name(session: Session, address: str) -> str:
    return session.scalar(select(Staff.name).where(Staff.email == address)) or address


def outbox_for_bounce(
    session: Session, verp_nonce: str | None, returned_message_id: str | None
) -> OutboxMail | None:
    """The mail a bounce returns: by VERP token first, then by returned Message-ID."""
    if verp_nonce:
        row = session.scalar(select(OutboxMail).where(OutboxMail.nonce == verp_nonce))
        if row:
            return row
    if returned_message_id:
        return session.scalar(
            select(OutboxMail).where(OutboxMail.message_id == returned_message_id)
        )
    return None


def events_of(session: Session, ticket_id: int) -> list[TicketEvent]:
    query = select(TicketEvent).where(TicketEvent.ticket_id == ticket_id)
    return list(session.scalars(query.order_by(TicketEvent.id)))


def time_entries_of(session: Session, ticket_id: int) -> list[TimeEntry]:
    query = select(TimeEntry).where(TimeEntry.ticket_id == ticket_id)
    return list(session.scalars(query.order_by(TimeEntry.id)))


def _not_opened_from(sources: Collection[str]) -> ColumnElement[bool]:
    """Tickets that no mail from `sources` opened (a bulk import, a release)."""
    opened = select(IngestRecord.id).where(
        IngestRecord.ticket_id == Ticket.id,
        IngestRecord.outcome == "created",
        IngestRecord.source.in_(sources),
    )
    return ~exists(opened)


def tickets_opened_since(
    session: Session, requester_id: int, since: datetime, *, not_from: Collection[str] = ()
) -> int:
    query = select(func.count()).where(
        Ticket.requester_id == requester_id, Ticket.created_at > since, _not_opened_from(not_from)
    )
    return session.scalar(query) or 0


def tickets_with_subject_since(
    session: Session,
    organisation_id: str,
    subject_key: str,
    since: datetime,
    *,
    not_from: Collection[str] = (),
) -> int:
    query = select(func.count()).where(
        Ticket.organisation_id == organisation_id,
        Ticket.subject_key == subject_key,
        Ticket.created_at > since,
        _not_opened_from(not_from),
    )
    return session.scalar(query) or 0
