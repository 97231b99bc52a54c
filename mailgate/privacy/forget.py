"""Removing people from a ticket: the one operation retention and erasure share.

`forget_ticket` rewrites every row of one ticket inside the caller's
transaction: addresses and names through a `Pseudonyms`, the bytes that
cannot be rewritten (raw mail, outbound mail as sent, some attachments)
dropped. It returns the blobs that may have lost their last reference; the
caller deletes them with `store.blobs.drop_unreferenced` before committing, so that a run
killed in between finds the ticket unfinished and does it again, instead of
leaving bytes nobody refers to.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from email import policy
from email.parser import BytesParser
from typing import Any

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from mailgate.privacy.pseudonyms import ADDRESS, Pseudonyms
from mailgate.store.models import (
    Contact,
    IngestRecord,
    OutboxMail,
    Staff,
    Ticket,
    TicketEvent,
)

UNSENT = ("queued", "sending")
ERASED_DOMAIN = "erased.invalid"


@dataclass
class Forgotten:
    articles: int = 0
    records: int = 0
    outbox: int = 0
    blobs: set[str] = field(default_factory=set)  # to delete once unreferenced


def keep_addresses(session: Session, support_address: str) -> frozenset[str]:
    """Ours and staff's: employees, whose names the time and credit reports need."""
    staff = session.scalars(select(Staff.email))
    return frozenset({support_address.lower(), *(s.lower() for s in staff)})


def pseudonyms_for_ticket(session: Session, support_address: str) -> Pseudonyms:
    """Everyone but us and staff, on one ticket (retention)."""
    return Pseudonyms(keep=keep_addresses(session, support_address),
                      keep_domain=support_address.rsplit("@", 1)[1].lower())  # fmt: skip


def ticket_people(session: Session, ticket: Ticket, names: Pseudonyms) -> None:
    """Register everyone the ticket names, with their display names, before rewriting."""
    known = {c.email: c.name for c in session.scalars(select(Contact).where(
        Contact.organisation_id == ticket.organisation_id))}  # fmt: skip
    if ticket.requester is not None:
        names.forget(ticket.requester.email, ticket.requester.name)
    for address in ticket.cc:
        names.forget(address, known.get(address.lower()))
    for article in ticket.articles:
        if article.author_kind != "staff" and article.author_email:
            names.forget(article.author_email, article.author_name or known.get(
                article.author_email.lower()))  # fmt: skip


def forget_ticket(
    session: Session,
    ticket: Ticket,
    names: Pseudonyms,
    *,
    drop_attachments_of: set[str] | None = None,
) -> Forgotten:
    """Rewrite the ticket's rows. `drop_attachments_of`: whose attachments go
    (lower-cased addresses; None: everyone's, as retention does)."""
    done = Forgotten()
    ticket.subject = names.text(ticket.subject) or ""
    ticket.cc = [names.address(a) if names.applies_to(a) else a for a in ticket.cc]
    for article in ticket.articles:
        done.articles += 1
        author = (article.author_email or "").lower()
        if article.raw_sha256:
            done.blobs.add(article.raw_sha256)
            article.raw_sha256 = None
        if drop_attachments_of is None or author in drop_attachments_of:
            article.html = None
            for attachment in list(article.attachments):
                done.blobs.add(attachment.sha256)
                session.delete(attachment)
        else:
            article.html = names.text(article.html)
        if names.applies_to(article.author_email):
            article.author_email = names.address(article.author_email or "")
        article.author_name = names.name(article.author_name)
        article.subject = names.text(article.subject) or ""
        article.text = names.text(article.text) or ""
        article.message_id = names.text(article.message_id)
        article.in_reply_to = names.text(article.in_reply_to)
        article.references = [names.text(r) or "" for r in article.references]
    for event in session.scalars(select(TicketEvent).where(TicketEvent.ticket_id == ticket.id)):
        event.actor = names.text(event.actor)
        event.old, event.new = names.text(event.old), names.text(event.new)
    for record in session.scalars(select(IngestRecord).where(IngestRecord.ticket_id == ticket.id)):
        done.records += 1
        forget_record(record, names, done)
    for mail in session.scalars(select(OutboxMail).where(OutboxMail.ticket_id == ticket.id)):
        done.outbox += 1
        forget_outbox(session, mail, names)
    return done


def forget_record(record: IngestRecord, names: Pseudonyms, done: Forgotten) -> None:
    if record.raw_sha256:
        done.blobs.add(record.raw_sha256)
        record.raw_sha256 = None
    if names.applies_to(record.sender):
        record.sender = names.address(record.sender or "")
    record.subject = names.text(record.subject) or ""
    record.message_id = names.text(record.message_id)
    record.reason = names.text(record.reason) or ""
    # The sending host's address and name can point at a person too (a home server).
    envelope = _json_text(record.envelope, names)
    if isinstance(envelope, dict):
        envelope = {k: v for k, v in envelope.items() if k not in ("client_address", "helo")}
    record.envelope = envelope


def forget_outbox(session: Session, mail: OutboxMail, names: Pseudonyms) -> None:
    """Sent mail loses its bytes; unsent mail to or about a forgotten person is
    not sent at all. Sending it to the others only would still carry the person
    (in To, in the quoted text) to them after the erasure, and the bytes cannot
    be rewritten: the ticket's history says what was answered."""
    if mail.status in UNSENT:
        if any(names.applies_to(r) for r in mail.recipients) or mentions(mail.data, names):
            session.delete(mail)
        return  # to others, naming nobody forgotten: it goes out as it is
    mail.data = None
    mail.recipients = [names.address(r) if names.applies_to(r) else r for r in mail.recipients]
    if names.applies_to(mail.recipient):
        mail.recipient = names.address(mail.recipient)
    mail.last_error = names.text(mail.last_error)


def mentions(data: bytes | None, names: Pseudonyms) -> bool:
    """Do the bytes of a mail we wrote give the address of someone forgotten, in a
    header or, once decoded (quoted-printable, base64), in a text part? Addresses
    only: a name part ("Martin") also matches other people's mail. Only our own
    mail is parsed: it is small and well formed, unlike what the quarantine holds."""
    if not data:
        return False
    message = BytesParser(policy=policy.default).parsebytes(data)
    texts = [str(value) for value in message.values()]
    for part in message.walk():
        payload = part.get_payload(decode=True) if part.get_content_maintype() == "text" else None
        if isinstance(payload, bytes):
            texts.append(payload.decode(part.get_content_charset() or "utf-8", "replace"))
    return any(names.applies_to(found) for text in texts for found in ADDRESS.findall(text))


def _json_text(value: Any, names: Pseudonyms) -> Any:
    return json.loads(names.text(json.dumps(value, ensure_ascii=False)) or "null")


def forget_contact(contact: Contact) -> None:
    """Tickets keep pointing at the row; the person is no longer in it."""
    contact.email = f"erased-{contact.id}@{ERASED_DOMAIN}"
    contact.name, contact.active = "", False


def delete_record(session: Session, record: IngestRecord, done: Forgotten) -> None:
    """A record with no ticket (quarantined, rejected, ignored) goes entirely."""
    if record.raw_sha256:
        done.blobs.add(record.raw_sha256)
    # Later deliveries of the same mail point at it; they stay, on their own.
    session.execute(
        update(IngestRecord)
        .where(IngestRecord.duplicate_of_id == record.id)
        .values(duplicate_of_id=None)
        .execution_options(synchronize_session=False)
    )
    session.delete(record)
    done.records += 1
