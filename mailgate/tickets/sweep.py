"""The scheduled lifecycle sweep: remind customers, resolve and close tickets nobody answers.

The database is the clock's memory: due times are computed from the ticket's
own timestamps (`waiting_since`, `reminded_at`, `resolved_at`), so a daemon
that was down sends what became due meanwhile, once.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import Select, func, select
from sqlalchemy.orm import Session

from mailgate.app import App
from mailgate.sla.clocks import track
from mailgate.store.models import Ticket
from mailgate.tickets.changes import set_status
from mailgate.tickets.lifecycle import add_business_days
from mailgate.tickets.notices import queue_resolution_notice, queue_waiting_reminder

log = logging.getLogger("mailgate.lifecycle")

BATCH = 500  # tickets per kind and run: a long backlog drains over several runs


@dataclass(frozen=True)
class SweepReport:
    reminded: int = 0
    auto_resolved: int = 0
    closed: int = 0

    def __str__(self) -> str:
        return f"{self.reminded} reminded, {self.auto_resolved} resolved, {self.closed} closed"


def sweep(app: App, now: datetime) -> SweepReport:
    with app.sessions() as session, session.begin():
        reminded, resolved = _waiting(app, session, now)
        closed = _close_resolved(app, session, now)
    report = SweepReport(reminded, resolved, closed)
    if reminded or resolved or closed:
        log.info("lifecycle sweep: %s", report)
        app.notify_outbox()
    return report


def claimed(query: Select[tuple[Ticket]]) -> Select[tuple[Ticket]]:
    """The due tickets, locked until the sweep commits; those another sweep holds
    are skipped. Two sweeps overlap when a leader that lost its lock finishes
    the one in hand while the new leader starts (store/leadership.py): both read
    the same due ticket and queued its reminder or resolution notice twice. A
    ticket the other sweep already handled no longer matches once its lock is
    free. (SQLite renders no FOR UPDATE: its writers take turns.)"""
    return query.with_for_update(skip_locked=True, of=Ticket)


def _close_resolved(app: App, session: Session, now: datetime) -> int:
    days = app.settings.tickets.reopen_days
    cutoff = now - timedelta(days=days)
    due = select(Ticket).where(Ticket.status == "resolved", Ticket.resolved_at <= cutoff)
    tickets = list(session.scalars(claimed(due.order_by(Ticket.id).limit(BATCH))))
    for ticket in tickets:
        set_status(session, ticket, "closed", now=now, actor_kind="system", actor=None,
                   reason=f"no reply within {days} days of resolution")  # fmt: skip
        track(app.sla, session, ticket, now)
    return len(tickets)


def _waiting(app: App, session: Session, now: datetime) -> tuple[int, int]:
    """Remind the customer, then resolve, `waiting_reminder_days` and then
    `waiting_resolve_days` business days after the ticket began to wait.

    Only tickets past the same number of calendar days are read (business days
    are never shorter), oldest first: reading the first tickets by number, a
    desk with more than a batch waiting on customers never reached the later
    ones, and their reminders were never sent."""
    settings = app.settings.tickets
    remind, resolve = settings.waiting_reminder_days, settings.waiting_resolve_days
    waiting = select(Ticket).where(Ticket.status == "waiting_customer")
    since = func.coalesce(Ticket.waiting_since, Ticket.updated_at)
    reminded = resolved = 0
    if remind:
        due = waiting.where(Ticket.reminded_at.is_(None), since <= now - timedelta(days=remind))
        for ticket in session.scalars(claimed(due.order_by(since, Ticket.id).limit(BATCH))):
            zone = ticket.organisation.timezone
            if add_business_days(ticket.waiting_since or ticket.updated_at, remind, zone) <= now:
                queue_waiting_reminder(app, session, ticket, now)
                ticket.reminded_at = now
                reminded += 1
    if resolve:
        # Reminded first, unless there are no reminders.
        start = func.coalesce(Ticket.reminded_at, since)
        due = waiting.where(start <= now - timedelta(days=resolve))
        if remind:
            due = due.where(Ticket.reminded_at.is_not(None))
        for ticket in session.scalars(claimed(due.order_by(start, Ticket.id).limit(BATCH))):
            began = ticket.reminded_at or ticket.waiting_since or ticket.updated_at
            if add_business_days(began, resolve, ticket.organisation.timezone) <= now:
                why = f"no answer from the customer for {remind + resolve} business days"
                set_status(session, ticket, "resolved", now=now, actor_kind="system", actor=None,
                           reason=why)  # fmt: skip
                track(app.sla, session, ticket, now)
                queue_resolution_notice(app, session, ticket, now, auto_resolved=True)
                resolved += 1
    return reminded, resolved
