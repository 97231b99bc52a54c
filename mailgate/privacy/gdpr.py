"""`mailgate gdpr export|erase EMAIL`: one person's data, handed over or removed.

Whose data is whose:

- the person's own articles (text, HTML, attachments) and the mail support
  sent them are theirs; so are the tickets they opened or were copied on;
- other customers' articles on those tickets are not: an export leaves them
  out, and names no other customer (their addresses and names are replaced
  by "someone else"); staff stay named, as the people who answered;
- raw mail is never exported: its headers name everyone on the thread.

Erasure keeps the tickets for the organisation and replaces the person in
them with a per-ticket pseudonym. It removes the person's contact record,
their attachments and HTML, the raw mail and outbound bytes of the tickets
they are on (the headers of every message on the thread carry their
address), their quarantined, rejected or ignored mail, and mail still
waiting to be sent that is to them or names them (not sent to anyone, then).
What it changed is recorded in `erasures`, without the address.
"""

from __future__ import annotations

import io
import json
import zipfile
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from sqlalchemy import Text, cast, delete, func, or_, select
from sqlalchemy.orm import Session

from mailgate.app import App
from mailgate.outbound.mailer import alert_key
from mailgate.privacy.forget import (
    Forgotten,
    delete_record,
    forget_contact,
    forget_outbox,
    forget_ticket,
    keep_addresses,
    mentions,
)
from mailgate.privacy.pseudonyms import Pseudonyms
from mailgate.store.blobs import drop_unreferenced
from mailgate.store.db import forget_old_pages
from mailgate.store.models import (
    Article,
    Contact,
    Erasure,
    IngestRecord,
    OutboxMail,
    State,
    Ticket,
)

SOMEONE_ELSE = "someone else"


class UnknownPerson(LookupError):
    """Nothing is stored about this address."""


def tickets_of(session: Session, email: str) -> list[Ticket]:
    """Tickets the person opened, was copied on or wrote to."""
    email = email.lower()
    contact_ids = select(Contact.id).where(Contact.email == email)
    wrote = select(Article.ticket_id).where(Article.author_email == email)
    query = select(Ticket).where(or_(Ticket.requester_id.in_(contact_ids), Ticket.id.in_(wrote)))
    found = {t.id: t for t in session.scalars(query)}
    # cc is a JSON list: its text narrows the search on either database, then the
    # list itself decides (the text of "xalice@…" contains "alice@…").
    mentioned = select(Ticket).where(func.lower(cast(Ticket.cc, Text)).contains(email))
    for ticket in session.scalars(mentioned):
        if email in (a.lower() for a in ticket.cc):
            found[ticket.id] = ticket
    return sorted(found.values(), key=lambda t: t.id)


def stored_about(
    session: Session, email: str
) -> tuple[Contact | None, list[Ticket], list[IngestRecord]]:
    """The contact record, the tickets and the mail received from the person."""
    contact = session.scalar(select(Contact).where(Contact.email == email))
    tickets = tickets_of(session, email)
    records = list(session.scalars(select(IngestRecord).where(IngestRecord.sender == email)))
    if contact is None and not tickets and not records:
        raise UnknownPerson(f"nothing is stored about {email}")
    return contact, tickets, records


# --- export -----------------------------------------------------------------------


def export(app: App, email: str) -> tuple[dict[str, Any], dict[str, bytes]]:
    """The person's data as JSON, and their attachments by archive path."""
    email = email.lower()
    files: dict[str, bytes] = {}
    with app.sessions() as session:
        contact, tickets, records = stored_about(session, email)
        staff = keep_addresses(session, app.settings.support_address)
        others = _others(app, session, tickets, email, staff)
        data: dict[str, Any] = {
            "address": email,
            "contact": None
            if contact is None
            else {
                "name": contact.name,
                "organisation": contact.organisation_id,
                "role": contact.role,
                "referent": contact.referent,  # told about the organisation's credit
                "active": contact.active,
            },  # fmt: skip
            "tickets": [_ticket(app, t, email, staff, others, files) for t in tickets],
            "other_mail": [
                {
                    "received_at": r.received_at.isoformat(),
                    "outcome": r.outcome,
                    "subject": others.text(r.subject),
                    "reason": others.text(r.reason),
                }
                for r in records
                if r.ticket_id is None
            ],  # fmt: skip
        }
    return data, files


def _others(
    app: App, session: Session, tickets: list[Ticket], email: str, staff: frozenset[str]
) -> Pseudonyms:
    """Every other customer's address and name (any part of it) reads "someone else"."""
    others = Pseudonyms(keep=staff | {email}, keep_domain=app.settings.support_domain,
                        anonymous=SOMEONE_ELSE)  # fmt: skip
    for ticket in tickets:
        for contact in session.scalars(
            select(Contact).where(Contact.organisation_id == ticket.organisation_id)
        ):
            if contact.email != email:
                others.forget(contact.email, contact.name)
        for article in ticket.articles:
            author = (article.author_email or "").lower()
            if author and others.applies_to(author):
                others.forget(author, article.author_name)
    return others


def _ticket(
    app: App, ticket: Ticket, email: str, staff: frozenset[str], others: Pseudonyms,
    files: dict[str, bytes],
) -> dict[str, Any]:  # fmt: skip
    articles = []
    for article in ticket.articles:
        author = (article.author_email or "").lower()
        mine = author == email
        sent_to_them = article.direction == "out" and article.visibility == "public"
        if not (mine or sent_to_them):
            continue  # another customer's mail, or staff's internal notes
        attachments = []
        for attachment in article.attachments if mine else []:
            path = f"attachments/{ticket.number}/{attachment.id}-{attachment.filename}"
            try:
                files[path] = app.blobs.get(attachment.sha256)
            except FileNotFoundError:
                path = None  # removed by retention
            attachments.append(
                {
                    "filename": attachment.filename,
                    "size": attachment.size,
                    "content_type": attachment.content_type,
                    "file": path,
                }
            )
        articles.append({
            "at": article.created_at.isoformat(),
            "direction": article.direction,
            "from": article.author_email if mine or not author or author in staff
            else SOMEONE_ELSE,
            "subject": others.text(article.subject),
            "text": others.text(article.text),
            "html": others.text(article.html) if mine else None,
            "attachments": attachments,
        })  # fmt: skip
    return {
        "number": ticket.number,
        "subject": others.text(ticket.subject),
        "status": ticket.status,
        "priority": ticket.priority,
        "created_at": ticket.created_at.isoformat(),
        "closed_at": ticket.closed_at.isoformat() if ticket.closed_at else None,
        "role": "copied" if email in (a.lower() for a in ticket.cc) else "requester",
        "articles": articles,
    }


def export_zip(data: dict[str, Any], files: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("export.json", json.dumps(data, indent=2, ensure_ascii=False))
        for path, content in sorted(files.items()):
            archive.writestr(path, content)
    return buffer.getvalue()


# --- erasure ----------------------------------------------------------------------


@dataclass
class ErasureReport:
    tickets: list[str] = field(default_factory=list)
    articles: int = 0
    records: int = 0
    outbox: int = 0
    blobs: int = 0
    contact: bool = False

    def __str__(self) -> str:
        return (
            f"{len(self.tickets)} ticket(s) kept with the person replaced, {self.articles} "
            f"article(s) rewritten, {self.records} received mail(s) rewritten or deleted, "
            f"{self.outbox} outbound mail(s) emptied or dropped, {self.blobs} stored "
            f"file(s) removed, contact record {'removed' if self.contact else 'not found'}"
        )


def erase(app: App, email: str, now: datetime, *, dry_run: bool = False) -> ErasureReport:
    email = email.lower()
    report = ErasureReport()
    with app.sessions() as session:
        contact, tickets, records = stored_about(session, email)
        if email in keep_addresses(session, app.settings.support_address):
            raise UnknownPerson(f"{email} is staff: remove them from the directory instead")
        tickets = _locked(session, tickets)
        report.contact = contact is not None
        report.tickets = [t.number for t in tickets]
        done = Forgotten()
        for ticket in tickets:
            names = Pseudonyms(forget_everyone=False)  # one per ticket, then dropped
            names.forget(email, contact.name if contact else _name_on(ticket, email))
            forgot = forget_ticket(session, ticket, names, drop_attachments_of={email})
            done.articles += forgot.articles
            done.outbox += forgot.outbox
            done.blobs |= forgot.blobs
        names = Pseudonyms(forget_everyone=False)
        names.forget(email, contact.name if contact else None)
        gone: set[int] = set()
        for record in records:
            if record.ticket_id is None:  # those on a ticket were rewritten with it
                gone.add(record.id)
                delete_record(session, record, done)
        # Mail on no ticket to them (a rejection notice) or about them (an operator
        # alert naming them, to staff).
        for mail in session.scalars(select(OutboxMail).where(OutboxMail.ticket_id.is_(None))):
            if any(names.applies_to(r) for r in mail.recipients) or mentions(mail.data, names):
                forget_outbox(session, mail, names)
                done.outbox += 1
        # The once-a-day mark of an operator alert about them: a plain hash of the address.
        session.execute(delete(State).where(State.key == alert_key(email)))
        for record in _held_naming(app, session, email):
            if record.id not in gone:
                delete_record(session, record, done)
        if contact is not None:
            forget_contact(contact)
        report.articles, report.records, report.outbox = done.articles, done.records, done.outbox
        report.blobs = drop_unreferenced(session, app.blobs, done.blobs, dry_run=dry_run)
        if dry_run:
            session.rollback()  # what it would change, counted; nothing written
            return report
        session.add(Erasure(at=now, tickets=len(tickets), articles=done.articles,
                            records=done.records, outbox=done.outbox))  # fmt: skip
        session.commit()
    forget_old_pages(app.engine)
    return report


def _locked(session: Session, tickets: list[Ticket]) -> list[Ticket]:
    """The tickets locked and read again as they are now. Rewritten from the
    unlocked read, a change staff made meanwhile on another instance (a /cc
    added) was overwritten by the list read before it. PostgreSQL: FOR UPDATE
    waits for their transaction; SQLite: BEGIN IMMEDIATE already excluded it."""
    if not tickets:
        return tickets
    query = (
        select(Ticket)
        .where(Ticket.id.in_([t.id for t in tickets]))
        .order_by(Ticket.id)
        .with_for_update()
        .execution_options(populate_existing=True)
    )
    return list(session.scalars(query))


def _held_naming(app: App, session: Session, email: str) -> list[IngestRecord]:
    """Mail on no ticket whose raw bytes name the person, whoever the sender was
    (a mail held as "ambiguous sender", or too broken to parse, has none
    recorded). Any outcome: a second delivery of held mail is a duplicate with
    the same bytes, a bounce of mail sent to them names them, and so does an
    auto-reply quoting them; only quarantined mail was searched, so their
    bytes stayed."""
    needle = email.encode()
    held = select(IngestRecord).where(IngestRecord.ticket_id.is_(None),
                                      IngestRecord.raw_sha256.is_not(None))  # fmt: skip
    found = []
    for record in session.scalars(held):
        if record.raw_sha256 is None:
            continue
        try:
            raw = app.blobs.get(record.raw_sha256)
        except FileNotFoundError:
            continue
        if needle in raw.lower():
            found.append(record)
    return found


def _name_on(ticket: Ticket, email: str) -> str | None:
    for article in ticket.articles:
        if (article.author_email or "").lower() == email and article.author_name:
            return article.author_name
    return None
