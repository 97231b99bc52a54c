"""Credits in the life of a ticket: charging staff time, confirmed bugs, what the
customer is told (balance in acks, low-balance and expiry notices).

The ledger (ledger.py) keeps the books; this module decides when to touch them
and who hears about it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import date, datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo

from sqlalchemy import select
from sqlalchemy.orm import Session

from mailgate.app import App
from mailgate.credits.ledger import (
    Balance,
    Charge,
    balance,
    charge,
    reverse_ticket,
    settle,
    settled_balance,
)
from mailgate.outbound.dates import format_day
from mailgate.store.models import (
    Contact,
    CreditPackRow,
    Organisation,
    Ticket,
    TicketEvent,
    TimeEntry,
)
from mailgate.store.state import get_state, set_state


def bill_time(
    app: App, session: Session, ticket: Ticket, entries: Sequence[TimeEntry], now: datetime
) -> list[Charge]:
    """Charge time entries; tell the referents once when the balance drops below the threshold."""
    settings = app.settings.credits
    if not settings.enabled or not entries:
        return []
    charges = [charge(session, settings, ticket, entry, now) for entry in entries]
    before, after = charges[0].balance_before, charges[-1].balance_after
    if before >= settings.low_balance > after:
        org = ticket.organisation
        _notify_referents(app, session, org, "credit_low", now, {
            "balance": after, "threshold": settings.low_balance,
            "expires": _expiry(balance(session, org.id, now), org),
        })  # fmt: skip
    return charges


def confirm_bug(session: Session, ticket: Ticket, *, actor: str, now: datetime) -> None:
    """/bug: the ticket is a confirmed bug; what was charged on it is given back,
    unless the customer asked for urgent handling."""
    if ticket.bug:
        return
    ticket.bug = True
    event = TicketEvent(ticket_id=ticket.id, at=now, actor_kind="staff", actor=actor,
                        field="bug", old="no", new="yes", reason="/bug")  # fmt: skip
    session.add(event)
    if not ticket.urgent:
        reverse_ticket(session, ticket, now, "confirmed bug: not charged")


def balance_now(app: App, session: Session, org_id: str, now: datetime) -> Balance | None:
    """The organisation's balance at `now`, expiries booked; None when credits are off."""
    if not app.settings.credits.enabled:
        return None
    return settled_balance(session, app.settings.credits, org_id, now)


def exhausted(current: Balance | None) -> bool:
    """On prepaid credit, with nothing left to spend?"""
    return current is not None and current.on_credit and current.spendable <= 0


def credit_context(
    current: Balance | None, org: Organisation, *, flagged: bool = False
) -> dict[str, Any] | None:
    """`credit` for acks and resolution mails; None when the organisation is not on credit."""
    if current is None or not current.on_credit:
        return None
    return {"balance": current.total, "expires": _expiry(current, org), "flagged": flagged}


@dataclass(frozen=True)
class CreditSweepReport:
    settled: int  # ledger entries booked (expiries, rollovers, overdraft repayments)
    notices: int

    def __str__(self) -> str:
        booked = f"{self.settled} expiry, rollover or repayment entries"
        return f"{booked}, {self.notices} expiry notices"


def sweep(app: App, now: datetime) -> CreditSweepReport:
    """Book expiries at their dates and warn the referents before credits expire unused."""
    settings = app.settings.credits
    settled = notices = 0
    if not settings.enabled:
        return CreditSweepReport(0, 0)
    with app.sessions.begin() as session:
        orgs = session.scalars(select(CreditPackRow.organisation_id).distinct()).all()
        for org_id in orgs:
            settled += len(settle(session, settings, org_id, now))
            notices += _expiry_notices(app, session, org_id, now)
    return CreditSweepReport(settled, notices)


def _expiry_notices(app: App, session: Session, org_id: str, now: datetime) -> int:
    settings = app.settings.credits
    horizon = now + timedelta(days=settings.expiry_notice_days)
    sent = 0
    org = session.get(Organisation, org_id)
    assert org is not None
    for pack in balance(session, org_id, now).packs:
        key = f"credits.expiry_notice.{pack.id}"
        if pack.expires_at > horizon or get_state(session, key):
            continue
        set_state(session, key, now.isoformat())
        _notify_referents(app, session, org, "credit_expiry", now, {
            "credits": pack.remaining,
            "expires": format_day(_last_day(pack.expires_at), org.timezone, org.language),
            "rollover": settings.rollover,
        })  # fmt: skip
        sent += 1
    return sent


def _last_day(expires_at: datetime) -> datetime:
    """Credits ending at midnight are valid through the day before."""
    return expires_at - timedelta(seconds=1)


def last_valid_day(expires_at: datetime, timezone: str) -> date:
    """The organisation's last day to use credits ending at `expires_at`: the day
    its mails name (what `format_day(_last_day(...))` writes out)."""
    return _last_day(expires_at).astimezone(ZoneInfo(timezone)).date()


def first_valid_day(activated_at: datetime, timezone: str) -> date:
    """The organisation's day a pack becomes usable."""
    return activated_at.astimezone(ZoneInfo(timezone)).date()


def _expiry(current: Balance, org: Organisation) -> str | None:
    if current.next_expiry is None:
        return None
    return format_day(_last_day(current.next_expiry), org.timezone, org.language)


def _notify_referents(
    app: App, session: Session, org: Organisation, kind: str, now: datetime,
    context: dict[str, Any],
) -> None:  # fmt: skip
    """One notice each to the organisation's referents named in the directory;
    without any, to its admins."""
    active = select(Contact).where(Contact.organisation_id == org.id, Contact.active.is_(True))
    referents = (
        session.scalars(active.where(Contact.referent.is_(True))).all()
        or session.scalars(active.where(Contact.role == "admin")).all()
    )
    for person in referents:
        app.mailer.queue(
            session,
            kind=kind,
            to=[person.email],
            language=org.language,
            context={"person_name": person.name, "org_name": org.name, **context},
            now=now,
            auto_submitted="auto-generated",
        )
