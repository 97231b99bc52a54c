"""Mail to the customer about their ticket's state: resolved, waiting for them."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy.orm import Session

from mailgate.app import App
from mailgate.credits.billing import balance_now, credit_context
from mailgate.outbound.mailer import ticket_context
from mailgate.store.models import Article, Ticket
from mailgate.tickets import repository


def queue_resolution_notice(
    app: App, session: Session, ticket: Ticket, now: datetime, *, auto_resolved: bool
) -> None:
    """Tell the customer the ticket is resolved, how long a reply reopens it, and
    the credit left when the organisation is on prepaid credit."""
    context = {
        "reopen_days": app.settings.tickets.reopen_days,
        "auto_resolved": auto_resolved,
        "credit": credit_context(
            balance_now(app, session, ticket.organisation_id, now), ticket.organisation
        ),
    }
    _to_customer(app, session, ticket, "resolved", context, now)


def latest_customer_message_id(ticket: Ticket) -> str | None:
    """The customer's latest mail, so their client threads our mail under it."""
    for article in reversed(ticket.articles):
        if article.direction == "in" and article.author_kind == "customer" and article.message_id:
            return article.message_id
    return None


def public_thread(ticket: Ticket) -> list[str]:
    """Message-IDs the customer has seen, oldest first; internal notes never appear."""
    return [a.message_id for a in ticket.articles if _customer_saw(a) and a.message_id]


def _customer_saw(article: Article) -> bool:
    return article.visibility == "public" and (
        article.direction == "out" or article.author_kind == "customer"
    )


def queue_waiting_reminder(app: App, session: Session, ticket: Ticket, now: datetime) -> None:
    """Remind the customer that we wait for their answer, and when we stop waiting."""
    context = {"resolve_after_days": app.settings.tickets.waiting_resolve_days}
    _to_customer(app, session, ticket, "waiting_reminder", context, now)


def _to_customer(
    app: App,
    session: Session,
    ticket: Ticket,
    kind: str,
    context: dict[str, Any],
    now: datetime,
) -> None:
    """An automatic mail to the requester and copied contacts, threaded under their mail."""
    recipients = repository.ticket_customers(session, ticket)
    if not recipients:
        return
    app.mailer.queue(
        session,
        kind=kind,
        to=recipients,
        language=ticket.language,
        context={
            "ticket": ticket_context(ticket),
            "requester_name": ticket.requester.name if ticket.requester else None,
            **context,
        },
        now=now,
        ticket=ticket,
        answers=latest_customer_message_id(ticket),
        references=public_thread(ticket),
        auto_submitted="auto-generated",
    )
