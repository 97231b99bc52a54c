"""The SLA sweep: reminders before a deadline, a breach notice and an escalation at it.

It reads only the clocks that are due, through the index on `next_alert_at`,
so its cost follows the number of due clocks, not of open tickets. Each alert
is claimed with a compare-and-set on `alerts_sent` in the transaction that
queues its mail: two sweeps racing (two daemons, a daemon and
`mailgate sla sweep`) or a sweep re-run after a crash send it once.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from mailgate.app import App
from mailgate.outbound.dates import format_when
from mailgate.outbound.mailer import ticket_context
from mailgate.sla.clocks import alert_at, calendar_of, next_alert
from mailgate.store.models import SlaClock, Ticket
from mailgate.tickets import repository as repo
from mailgate.tickets.changes import apply_changes
from mailgate.tickets.lifecycle import Change
from mailgate.tickets.notices import latest_customer_message_id, public_thread

log = logging.getLogger("mailgate.sla")

BATCH = 200  # clocks per transaction: a long backlog drains without one huge commit
LEVELS = ("L1", "L2", "L3")


@dataclass(frozen=True)
class SlaSweepReport:
    reminders: int = 0
    breaches: int = 0

    def __str__(self) -> str:
        return f"{self.reminders} reminders, {self.breaches} breaches"


def sweep(app: App, now: datetime) -> SlaSweepReport:
    reminders = breaches = 0
    while True:
        with app.sessions() as session, session.begin():
            due = select(SlaClock).where(SlaClock.next_alert_at <= now)
            clocks = list(session.scalars(due.order_by(SlaClock.next_alert_at).limit(BATCH)))
            for clock in clocks:
                sent = _alert(app, session, clock, now)
                reminders += sent == "reminder"
                breaches += sent == "breach"
        if len(clocks) < BATCH:
            break
    report = SlaSweepReport(reminders, breaches)
    if reminders or breaches:
        log.info("sla sweep: %s", report)
        app.notify_outbox()
    return report


def _alert(app: App, session: Session, clock: SlaClock, now: datetime) -> str | None:
    policy = app.sla
    ticket = session.get_one(Ticket, clock.ticket_id)
    cal = calendar_of(policy, clock, ticket.organisation)
    before = clock.alerts_sent
    # After a long downtime or a priority raised past several thresholds, only
    # the most serious one is sent: three mails about one deadline are noise.
    reached = before
    thresholds = policy.thresholds
    while reached < len(thresholds) and alert_at(clock, cal, thresholds[reached]) <= now:
        reached += 1
    breach = reached == len(thresholds)
    claimed = session.execute(
        update(SlaClock)
        .where(
            SlaClock.id == clock.id,
            SlaClock.alerts_sent == before,  # the claim: a racing sweep finds it taken
            SlaClock.stopped_at.is_(None),
            SlaClock.paused_at.is_(None),
            SlaClock.suspended_at.is_(None),
        )
        .values(
            alerts_sent=reached,
            next_alert_at=next_alert(policy, clock, cal, sent=reached),
            breached_at=now if breach else None,
        )
        .execution_options(synchronize_session=False)
    )
    session.expire(clock)
    if claimed.rowcount != 1 or reached == before:
        return None  # another sweep sent it, or nothing was due after all
    if breach:
        _escalate(session, ticket, clock, now)
    kind = "sla_breach" if breach else "sla_reminder"
    _notify(app, session, ticket, clock, kind, thresholds[reached - 1], now)
    return "breach" if breach else "reminder"


def _escalate(session: Session, ticket: Ticket, clock: SlaClock, now: datetime) -> None:
    """One level up (L3 stays L3), in the ticket's history with the reason."""
    if ticket.level not in LEVELS:
        return
    level = LEVELS[min(LEVELS.index(ticket.level) + 1, len(LEVELS) - 1)]
    why = f"SLA breach: {clock.kind.replace('_', ' ')} was due {clock.due_at:%Y-%m-%d %H:%M} UTC"
    apply_changes(session, ticket, [Change("level", ticket.level, level)], now=now,
                  actor_kind="system", actor=None, reason=why)  # fmt: skip


def _notify(
    app: App,
    session: Session,
    ticket: Ticket,
    clock: SlaClock,
    kind: str,
    fraction: float,
    now: datetime,
) -> None:
    to = repo.ticket_staff(session, ticket)
    if kind == "sla_breach":
        to += app.settings.sla.escalation_to
    if not to:
        log.warning("%s for %s: no active staff to tell", kind, ticket.number)
        return
    zone = ticket.organisation.timezone or "UTC"
    app.mailer.queue(
        session,
        kind=kind,
        to=to,
        language="en",  # as the other staff notices
        context={
            "ticket": ticket_context(ticket),
            "clock": {
                "kind": clock.kind,
                "percent": round(fraction * 100),
                "due": f"{format_when(clock.due_at, zone, 'en')} ({zone})",
                "target_minutes": clock.target_seconds // 60,
            },
        },
        now=now,
        ticket=ticket,
        # In the ticket's thread in staff's mail client, under the customer's
        # mail as the new-ticket notice is.
        answers=latest_customer_message_id(ticket),
        references=public_thread(ticket),
        auto_submitted="auto-generated",
    )
