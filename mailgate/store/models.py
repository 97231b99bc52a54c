"""The database schema. All times are stored in UTC.

Changing a model means writing an Alembic migration in `migrations/versions/`
(`tests/test_store.py` fails when the models and the migrations disagree).
"""

from __future__ import annotations

from datetime import UTC, date, datetime
from typing import Any

from sqlalchemy import (
    JSON,
    Boolean,
    Date,
    DateTime,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Text,
    TypeDecorator,
    UniqueConstraint,
    true,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship


class UTCDateTime(TypeDecorator[datetime]):
    """Stores naive UTC, returns aware UTC; refuses naive input (a bug upstream)."""

    impl = DateTime
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Any) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime given to the database; pass an aware UTC time")
        return value.astimezone(UTC).replace(tzinfo=None)

    def process_result_value(self, value: datetime | None, dialect: Any) -> datetime | None:
        return None if value is None else value.replace(tzinfo=UTC)


class Clipped(TypeDecorator[str]):
    """A string column for text that comes from mail: cut to the column's length.

    PostgreSQL refuses a value longer than varchar(n) where SQLite stores it
    whole, so a 1,000-character Message-ID or subject would fail the unit of
    work on one and not the other. Lookups bind through the same type, so a
    clipped Message-ID still finds its clipped self.
    """

    impl = String
    cache_ok = True

    def process_bind_param(self, value: str | None, dialect: Any) -> str | None:
        length = self.impl.length  # type: ignore[attr-defined]
        return value if value is None or len(value) <= length else value[:length]


NAMING = {
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING)
    type_annotation_map = {datetime: UTCDateTime(), dict[str, Any]: JSON, list[str]: JSON}


class Organisation(Base):
    __tablename__ = "organisations"

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    name: Mapped[str] = mapped_column(String(200))
    plan: Mapped[str] = mapped_column(String(20))
    contract_from: Mapped[date | None] = mapped_column(Date)
    contract_until: Mapped[date | None] = mapped_column(Date)
    language: Mapped[str] = mapped_column(String(5), default="en")
    timezone: Mapped[str] = mapped_column(String(64), default="UTC")
    country: Mapped[str | None] = mapped_column(String(2))
    active: Mapped[bool] = mapped_column(Boolean, default=True)

    contacts: Mapped[list[Contact]] = relationship(back_populates="organisation")


class Contact(Base):
    __tablename__ = "contacts"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    email: Mapped[str] = mapped_column(String(320), unique=True)  # lower-cased
    name: Mapped[str] = mapped_column(String(200), default="")
    organisation_id: Mapped[str] = mapped_column(ForeignKey("organisations.id"))
    role: Mapped[str] = mapped_column(String(20), default="member")  # admin | member
    active: Mapped[bool] = mapped_column(Boolean, default=True)
    # In the directory file (active or not); a contact gone from it is not, and
    # retention forgets it once its tickets are anonymised.
    listed: Mapped[bool] = mapped_column(Boolean, default=True, server_default=true())
    # Named in the directory as one of its organisation's referents: told about
    # its support credit (else its admins are).
    referent: Mapped[bool] = mapped_column(Boolean, default=False)

    # Joined: a contact is always read to be authorised, which needs its contract.
    organisation: Mapped[Organisation] = relationship(back_populates="contacts", lazy="joined")


class Staff(Base):
    __tablename__ = "staff"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    email: Mapped[str] = mapped_column(String(320), unique=True)  # lower-cased
    name: Mapped[str] = mapped_column(String(200), default="")
    level: Mapped[str] = mapped_column(String(4), default="L1")
    active: Mapped[bool] = mapped_column(Boolean, default=True)
    groups: Mapped[list[str]] = mapped_column(default=list)  # staff groups rules route to


class TicketSequence(Base):
    """Last tracking number handed out per year; the row lock serialises writers."""

    __tablename__ = "ticket_sequences"

    year: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    last: Mapped[int] = mapped_column(Integer, default=0)


class Ticket(Base):
    __tablename__ = "tickets"
    __table_args__ = (
        # The circuit breaker counts recent tickets per sender and per subject.
        Index("ix_tickets_org_subject_created", "organisation_id", "subject_key", "created_at"),
        Index("ix_tickets_requester_created", "requester_id", "created_at"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    number: Mapped[str] = mapped_column(String(64), unique=True)
    organisation_id: Mapped[str] = mapped_column(ForeignKey("organisations.id"), index=True)
    requester_id: Mapped[int | None] = mapped_column(ForeignKey("contacts.id"))
    subject: Mapped[str] = mapped_column(Clipped(998))
    subject_key: Mapped[str | None] = mapped_column(String(64))  # see pipeline/breaker.py
    status: Mapped[str] = mapped_column(String(20), default="new", index=True)
    priority: Mapped[str] = mapped_column(String(2), default="P3")
    urgent: Mapped[bool] = mapped_column(Boolean, default=False)
    bug: Mapped[bool] = mapped_column(Boolean, default=False)  # confirmed by staff (/bug)
    level: Mapped[str] = mapped_column(String(4), default="L1")
    assignee_id: Mapped[int | None] = mapped_column(ForeignKey("staff.id"))
    # Lower-cased addresses of the organisation's contacts copied on the ticket.
    cc: Mapped[list[str]] = mapped_column(default=list)
    tags: Mapped[list[str]] = mapped_column(default=list)  # from the rules
    # The staff group a rule routed it to: its members hear about it while
    # nobody is assigned.
    group: Mapped[str | None] = mapped_column(String(64))
    language: Mapped[str] = mapped_column(String(5), default="en")
    # A follow-up to a closed ticket opens a new one that links back here.
    follows_ticket_id: Mapped[int | None] = mapped_column(ForeignKey("tickets.id"))
    created_at: Mapped[datetime]
    updated_at: Mapped[datetime]
    resolved_at: Mapped[datetime | None]
    closed_at: Mapped[datetime | None]
    # waiting_customer: since when, and when the customer was last reminded.
    # When retention removed its bytes and replaced its people (privacy/retention.py).
    anonymised_at: Mapped[datetime | None]
    waiting_since: Mapped[datetime | None]
    reminded_at: Mapped[datetime | None]

    organisation: Mapped[Organisation] = relationship()
    requester: Mapped[Contact | None] = relationship()
    assignee: Mapped[Staff | None] = relationship()
    articles: Mapped[list[Article]] = relationship(
        back_populates="ticket", order_by="Article.id", foreign_keys="Article.ticket_id"
    )


class Article(Base):
    """One inbound or outbound mail on a ticket."""

    __tablename__ = "articles"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    ticket_id: Mapped[int] = mapped_column(ForeignKey("tickets.id"), index=True)
    direction: Mapped[str] = mapped_column(String(3))  # in | out
    author_kind: Mapped[str] = mapped_column(String(10))  # customer | staff | system
    author_email: Mapped[str | None] = mapped_column(Clipped(320))
    author_name: Mapped[str] = mapped_column(Clipped(200), default="")
    visibility: Mapped[str] = mapped_column(String(10), default="public")  # public | internal
    message_id: Mapped[str | None] = mapped_column(Clipped(998), index=True)
    in_reply_to: Mapped[str | None] = mapped_column(Text)
    references: Mapped[list[str]] = mapped_column(default=list)
    subject: Mapped[str] = mapped_column(Clipped(998), default="")
    text: Mapped[str] = mapped_column(Text, default="")
    html: Mapped[str | None] = mapped_column(Text)
    raw_sha256: Mapped[str | None] = mapped_column(String(64))
    # Outbound delivery as staff see it: queued | sent | failed
    delivery: Mapped[str | None] = mapped_column(String(10))
    delivery_error: Mapped[str | None] = mapped_column(Text)
    # Inbound: the sender-authentication verdict at intake ("pass: dkim=pass
    # d=…", "none: no DKIM signature"); None when not checked (policy off).
    authentication: Mapped[str | None] = mapped_column(Clipped(300))
    created_at: Mapped[datetime]

    ticket: Mapped[Ticket] = relationship(back_populates="articles", foreign_keys=[ticket_id])
    attachments: Mapped[list[AttachmentRow]] = relationship(back_populates="article")


class TicketEvent(Base):
    """One change to a ticket: who, when, what and why (`tickets show` lists them)."""

    __tablename__ = "ticket_events"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    ticket_id: Mapped[int] = mapped_column(ForeignKey("tickets.id"), index=True)
    at: Mapped[datetime]
    actor_kind: Mapped[str] = mapped_column(String(10))  # customer | staff | system
    actor: Mapped[str | None] = mapped_column(Clipped(320))  # the address; None for system
    field: Mapped[str] = mapped_column(String(20))  # status | priority | urgent | level | ...
    old: Mapped[str | None] = mapped_column(Clipped(320))
    new: Mapped[str | None] = mapped_column(Clipped(320))
    reason: Mapped[str] = mapped_column(Text, default="")
    article_id: Mapped[int | None] = mapped_column(ForeignKey("articles.id"))


class SlaClock(Base):
    """One SLA target of a ticket and where its clock stands (see `mailgate/sla/clocks.py`).

    Running: `next_alert_at` is the next reminder or the breach; paused (the
    ticket waits on the customer) or stopped: NULL, so the sweep's indexed
    `next_alert_at <= now` reads only what is due.
    """

    __tablename__ = "sla_clocks"
    __table_args__ = (UniqueConstraint("ticket_id", "kind"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    ticket_id: Mapped[int] = mapped_column(ForeignKey("tickets.id"))
    kind: Mapped[str] = mapped_column(String(20))  # first_response | workaround | resolution
    calendar: Mapped[str] = mapped_column(String(64))  # a name in settings sla.calendars
    target_seconds: Mapped[int] = mapped_column(Integer)  # business time allowed
    started_at: Mapped[datetime]
    due_at: Mapped[datetime]
    paused_at: Mapped[datetime | None]
    paused_seconds: Mapped[int] = mapped_column(Integer, default=0)  # business time paused
    stopped_at: Mapped[datetime | None]
    elapsed_seconds: Mapped[int | None] = mapped_column(Integer)  # business time used, once stopped
    alerts_sent: Mapped[int] = mapped_column(Integer, default=0)  # reminders and breach so far
    next_alert_at: Mapped[datetime | None] = mapped_column(index=True)
    breached_at: Mapped[datetime | None]
    # No longer a target at the ticket's priority (P2 -> P3 drops the workaround):
    # kept with its alerts, so that P3 -> P2 does not send them again.
    suspended_at: Mapped[datetime | None]


class TimeEntry(Base):
    """Time a staff member spent on a ticket (`/spend`), as written: minutes, not credits."""

    __tablename__ = "time_entries"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    ticket_id: Mapped[int] = mapped_column(ForeignKey("tickets.id"), index=True)
    staff_email: Mapped[str] = mapped_column(String(320))
    minutes: Mapped[int] = mapped_column(Integer)
    urgent: Mapped[bool] = mapped_column(Boolean, default=False)  # the ticket's, when spent
    article_id: Mapped[int | None] = mapped_column(ForeignKey("articles.id"))
    created_at: Mapped[datetime]


class AttachmentRow(Base):
    __tablename__ = "attachments"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    article_id: Mapped[int] = mapped_column(ForeignKey("articles.id"), index=True)
    filename: Mapped[str] = mapped_column(Clipped(255))  # sanitised display name only
    content_type: Mapped[str] = mapped_column(Clipped(255))
    size: Mapped[int] = mapped_column(Integer)
    sha256: Mapped[str] = mapped_column(String(64))  # the file under data_dir
    content_id: Mapped[str | None] = mapped_column(Clipped(998))
    inline: Mapped[bool] = mapped_column(Boolean, default=False)

    article: Mapped[Article] = relationship(back_populates="attachments")


class IngestRecord(Base):
    """Every inbound message and what was decided about it, with the reason."""

    __tablename__ = "ingest_records"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    # Unique for the first delivery; NULL on duplicates, which point at the first.
    dedupe_key: Mapped[str | None] = mapped_column(String(64), unique=True)
    # Indexed: an IMAP re-fetch looks among a first delivery's duplicates.
    duplicate_of_id: Mapped[int | None] = mapped_column(ForeignKey("ingest_records.id"), index=True)
    message_id: Mapped[str | None] = mapped_column(Clipped(998), index=True)
    source: Mapped[str] = mapped_column(String(20))
    envelope: Mapped[dict[str, Any]] = mapped_column(default=dict)
    sender: Mapped[str | None] = mapped_column(Clipped(320))
    subject: Mapped[str] = mapped_column(Clipped(998), default="")
    outcome: Mapped[str] = mapped_column(String(20), index=True)
    reason: Mapped[str] = mapped_column(Text)
    matched_by: Mapped[str | None] = mapped_column(String(40))
    ticket_id: Mapped[int | None] = mapped_column(ForeignKey("tickets.id"), index=True)
    article_id: Mapped[int | None] = mapped_column(ForeignKey("articles.id"))
    raw_sha256: Mapped[str | None] = mapped_column(String(64))
    received_at: Mapped[datetime] = mapped_column(index=True)


class OutboxMail(Base):
    """A rendered outbound mail, written in the transaction that caused it."""

    __tablename__ = "outbox"
    __table_args__ = (
        Index("ix_outbox_due", "status", "next_attempt_at"),
        Index("ix_outbox_recipient_kind", "recipient", "kind", "created_at"),
        UniqueConstraint("nonce"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    kind: Mapped[str] = mapped_column(String(40))  # ack | rejection | staff_new_ticket | ...
    ticket_id: Mapped[int | None] = mapped_column(ForeignKey("tickets.id"), index=True)
    article_id: Mapped[int | None] = mapped_column(ForeignKey("articles.id"))
    nonce: Mapped[str] = mapped_column(String(32))  # in our Message-ID and VERP sender
    message_id: Mapped[str] = mapped_column(Clipped(998), index=True)
    envelope_from: Mapped[str] = mapped_column(String(320))
    recipient: Mapped[str] = mapped_column(String(320))  # first recipient, for rate limits
    recipients: Mapped[list[str]] = mapped_column()
    data: Mapped[bytes | None] = mapped_column(LargeBinary)
    # queued | sending | sent | failed (permanent) | dead (gave up retrying)
    status: Mapped[str] = mapped_column(String(10), default="queued")
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    next_attempt_at: Mapped[datetime]
    last_error: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime]
    sent_at: Mapped[datetime | None]


class Blob(Base):
    """Raw mail and attachments, by content, when they live in the database
    (the default on PostgreSQL: every instance reaches them; see store/blobs.py)."""

    __tablename__ = "blobs"

    sha256: Mapped[str] = mapped_column(String(64), primary_key=True)
    data: Mapped[bytes] = mapped_column(LargeBinary)
    size: Mapped[int] = mapped_column(Integer)


class Erasure(Base):
    """`mailgate gdpr erase` was run: when and what it changed, never whose data."""

    __tablename__ = "erasures"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    at: Mapped[datetime]
    tickets: Mapped[int] = mapped_column(Integer)
    articles: Mapped[int] = mapped_column(Integer)
    records: Mapped[int] = mapped_column(Integer)
    outbox: Mapped[int] = mapped_column(Integer)


class State(Base):
    """Small facts the daemon remembers: the directory file last synced, IMAP UIDs."""

    __tablename__ = "state"

    key: Mapped[str] = mapped_column(String(200), primary_key=True)
    value: Mapped[str] = mapped_column(Text)


class CreditPackRow(Base):
    """A pack an organisation bought: its size and when it is valid."""

    __tablename__ = "credit_packs"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    organisation_id: Mapped[str] = mapped_column(ForeignKey("organisations.id"), index=True)
    pack: Mapped[str] = mapped_column(String(40))  # its name in settings, when bought
    credits: Mapped[int] = mapped_column(Integer)
    activated_at: Mapped[datetime]
    expires_at: Mapped[datetime]
    reference: Mapped[str] = mapped_column(String(200), default="")  # an order or invoice
    created_at: Mapped[datetime]


class CreditEntry(Base):
    """One line of an organisation's credit ledger. Append-only: a correction is a
    reversing entry; a balance is a sum."""

    __tablename__ = "credit_entries"
    __table_args__ = (Index("ix_credit_entries_org_at", "organisation_id", "at"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    organisation_id: Mapped[str] = mapped_column(ForeignKey("organisations.id"))
    # purchase | spend | expiry | rollover_out | rollover_in | reversal | overdraft
    kind: Mapped[str] = mapped_column(String(20))
    credits: Mapped[int] = mapped_column(Integer)  # signed: + in, - out
    pack_id: Mapped[int | None] = mapped_column(ForeignKey("credit_packs.id"), index=True)
    ticket_id: Mapped[int | None] = mapped_column(ForeignKey("tickets.id"), index=True)
    time_entry_id: Mapped[int | None] = mapped_column(ForeignKey("time_entries.id"))
    reverses_id: Mapped[int | None] = mapped_column(ForeignKey("credit_entries.id"))
    note: Mapped[str] = mapped_column(Clipped(300), default="")
    at: Mapped[datetime]  # when it takes effect (an expiry: the pack's end)
    created_at: Mapped[datetime]
