"""Write lifecycle decisions to a ticket: the fields, their timestamps, and one event each."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime

from sqlalchemy.orm import Session

from mailgate.store.models import Ticket, TicketEvent, TimeEntry
from mailgate.tickets import repository as repo
from mailgate.tickets.lifecycle import Change, TicketState


def state_of(ticket: Ticket) -> TicketState:
    return TicketState(
        status=ticket.status,
        priority=ticket.priority,
        urgent=ticket.urgent,
        level=ticket.level,
        assignee=ticket.assignee.email if ticket.assignee else None,
        cc=tuple(ticket.cc),
    )


def set_status(
    session: Session,
    ticket: Ticket,
    status: str,
    *,
    now: datetime,
    actor_kind: str,
    actor: str | None,
    reason: str,
    article_id: int | None = None,
) -> None:
    apply_changes(
        session,
        ticket,
        [Change("status", ticket.status, status)],
        now=now,
        actor_kind=actor_kind,
        actor=actor,
        reason=reason,
        article_id=article_id,
    )


def apply_changes(
    session: Session,
    ticket: Ticket,
    changes: Sequence[Change],
    *,
    now: datetime,
    actor_kind: str,
    actor: str | None,
    reason: str,
    article_id: int | None = None,
) -> None:
    for change in changes:
        if change.old == change.new:
            continue
        _set_field(session, ticket, change, now)
        why = f"{reason} (line {change.line})" if change.line else reason
        session.add(
            TicketEvent(
                ticket_id=ticket.id,
                at=now,
                actor_kind=actor_kind,
                actor=actor,
                field=change.field,
                old=change.old,
                new=change.new,
                reason=why,
                article_id=article_id,
            )
        )
    if changes:
        ticket.updated_at = now


def _set_field(session: Session, ticket: Ticket, change: Change, now: datetime) -> None:
    match change.field:
        case "status":
            _set_status_field(ticket, str(change.new), now)
        case "priority":
            ticket.priority = str(change.new)
        case "urgent":
            ticket.urgent = change.new == "yes"
        case "level":
            ticket.level = str(change.new)
        case "assignee":
            ticket.assignee_id = repo.staff_id(session, change.new) if change.new else None
        case "cc":
            ticket.cc = [*ticket.cc, str(change.new)]
        case _:
            raise ValueError(f"no ticket field {change.field!r}")


def _set_status_field(ticket: Ticket, status: str, now: datetime) -> None:
    ticket.status = status
    # Closing keeps the resolution time; resolving starts the reopen window now,
    # a closed ticket resolved again too; anything else clears it (a reopened ticket).
    if status == "resolved":
        ticket.resolved_at = now
    elif status == "closed":
        ticket.resolved_at = ticket.resolved_at or now
    else:
        ticket.resolved_at = None
    ticket.closed_at = now if status == "closed" else None
    waiting = status == "waiting_customer"
    ticket.waiting_since = now if waiting else None
    ticket.reminded_at = None


def record_time(
    session: Session,
    ticket: Ticket,
    minutes: Sequence[int],
    *,
    staff_email: str,
    now: datetime,
    article_id: int | None,
) -> list[TimeEntry]:
    entries = [
        TimeEntry(
            ticket_id=ticket.id,
            staff_email=staff_email,
            minutes=amount,
            urgent=ticket.urgent,
            article_id=article_id,
            created_at=now,
        )
        for amount in minutes
    ]
    session.add_all(entries)
    session.flush()
    return entries
