"""A ticket's SLA clocks follow the ticket: started, paused, stopped, re-targeted.

One entry point, `track`, is called in the same transaction as every change
that matters (creation, status, priority, the organisation's plan, the first
public staff reply); it reconciles the clock rows with the ticket, so no caller
has to know the rules below:

- a clock starts when the ticket is created and runs in business time;
- while the ticket waits on the customer every running clock is paused, and
  the business time it stayed paused extends its deadline;
- first response stops at the first public staff reply, workaround at
  `/workaround`, all three at resolution; reopening resumes resolution only
  (the time spent resolved counts as paused);
- a new priority, plan or override re-targets the running clocks: deadlines
  are always `started_at + target + paused` in business time.
"""

from __future__ import annotations

from collections.abc import Collection
from datetime import datetime, timedelta

from sqlalchemy import select
from sqlalchemy.orm import Session

from mailgate.sla.calendar import Calendar
from mailgate.sla.policy import SlaPolicy, Target, Where
from mailgate.store.models import Organisation, SlaClock, Ticket

PAUSED = frozenset({"waiting_customer"})
DONE = frozenset({"resolved", "closed"})


def where_of(org: Organisation) -> Where:
    return Where(timezone=org.timezone or "UTC", country=org.country)


def clocks_of(session: Session, ticket_id: int, *, suspended: bool = False) -> list[SlaClock]:
    """The ticket's clocks at its priority now (with `suspended`: every one it had)."""
    query = select(SlaClock).where(SlaClock.ticket_id == ticket_id).order_by(SlaClock.id)
    if not suspended:
        query = query.where(SlaClock.suspended_at.is_(None))
    return list(session.scalars(query))


def calendar_of(policy: SlaPolicy, clock: SlaClock, org: Organisation) -> Calendar:
    return policy.calendar(clock.calendar, where_of(org))


def track(
    policy: SlaPolicy,
    session: Session,
    ticket: Ticket,
    now: datetime,
    *,
    stop: Collection[str] = (),
) -> list[SlaClock]:
    """Bring the ticket's clocks in line with it; `stop` names clocks whose event happened."""
    org = ticket.organisation
    targets = {t.kind: t for t in policy.targets(org.id, org.plan, ticket.priority, where_of(org))}
    clocks = {c.kind: c for c in clocks_of(session, ticket.id, suspended=True)}
    for kind in clocks.keys() - targets.keys():
        if clocks[kind].suspended_at is None:  # no longer a target at this priority
            clocks[kind].suspended_at, clocks[kind].next_alert_at = now, None
    for kind, target in targets.items():
        clock = clocks.get(kind)
        if clock is None:
            clock = clocks[kind] = _start(session, ticket, target, clocks.get("resolution"))
        elif clock.suspended_at is not None:
            _resume(clock, clocks.get("resolution"))
        _follow(policy, clock, target, ticket.status, kind in stop, now)
    return [clocks[k] for k in targets]


def retarget(
    policy: SlaPolicy, session: Session, organisations: Collection[str], now: datetime
) -> int:
    """Track again the unclosed tickets of organisations whose plan or calendar changed."""
    if not organisations:
        return 0
    query = select(Ticket).where(
        Ticket.organisation_id.in_(organisations), Ticket.status != "closed"
    )
    tickets = list(session.scalars(query))
    for ticket in tickets:
        track(policy, session, ticket, now)
    return len(tickets)


def _start(
    session: Session, ticket: Ticket, target: Target, resolution: SlaClock | None
) -> SlaClock:
    # A clock added later (a priority with a workaround target) counts from the
    # ticket's creation, with the pauses the resolution clock has seen, and the
    # one it is in: added while the ticket waits on the customer, it is paused
    # since the wait began, not since it was added (as in `_resume`).
    clock = SlaClock(
        ticket_id=ticket.id,
        kind=target.kind,
        calendar=target.calendar_name,
        target_seconds=int(target.span.total_seconds()),
        started_at=ticket.created_at,
        due_at=ticket.created_at,
        paused_seconds=resolution.paused_seconds if resolution else 0,
        paused_at=resolution.paused_at if resolution else None,
        alerts_sent=0,
    )
    session.add(clock)
    return clock


def _resume(clock: SlaClock, resolution: SlaClock | None) -> None:
    """A target back at the ticket's priority: its deadline counts from the ticket's
    creation with the ticket's pauses, as for a clock started late (`_start`), and
    the alerts already sent about it stay sent. A stopped clock (its event
    happened) stays stopped."""
    clock.suspended_at = None
    if clock.stopped_at is None and resolution is not None and resolution is not clock:
        clock.paused_seconds, clock.paused_at = resolution.paused_seconds, resolution.paused_at


def _follow(
    policy: SlaPolicy,
    clock: SlaClock,
    target: Target,
    status: str,
    event: bool,
    now: datetime,
) -> None:
    cal = target.calendar
    clock.calendar = target.calendar_name
    clock.target_seconds = int(target.span.total_seconds())
    reopened = clock.kind == "resolution" and status not in DONE
    if clock.stopped_at is not None and reopened:
        clock.paused_seconds += _seconds(cal.between(clock.stopped_at, now))
        clock.stopped_at = clock.elapsed_seconds = None
    if clock.stopped_at is None:
        if event or status in DONE:
            _stop(clock, cal, now)
        elif status in PAUSED and clock.paused_at is None:
            clock.paused_at = now
        elif status not in PAUSED and clock.paused_at is not None:
            _unpause(clock, cal, now)
    clock.due_at = cal.add(clock.started_at, _allowed(clock, 1.0))
    clock.next_alert_at = next_alert(policy, clock, cal, sent=clock.alerts_sent)


def _stop(clock: SlaClock, cal: Calendar, now: datetime) -> None:
    if clock.paused_at is not None:
        _unpause(clock, cal, now)
    clock.stopped_at = now
    used = cal.between(clock.started_at, now) - timedelta(seconds=clock.paused_seconds)
    clock.elapsed_seconds = max(0, _seconds(used))


def _unpause(clock: SlaClock, cal: Calendar, now: datetime) -> None:
    assert clock.paused_at is not None
    clock.paused_seconds += _seconds(cal.between(clock.paused_at, now))
    clock.paused_at = None


def next_alert(policy: SlaPolicy, clock: SlaClock, cal: Calendar, *, sent: int) -> datetime | None:
    """When the sweep must next look at this clock after `sent` alerts; None if paused/stopped."""
    if clock.stopped_at is not None or clock.paused_at is not None:
        return None
    if sent >= len(policy.thresholds):
        return None
    return alert_at(clock, cal, policy.thresholds[sent])


def alert_at(clock: SlaClock, cal: Calendar, fraction: float) -> datetime:
    return cal.add(clock.started_at, _allowed(clock, fraction))


def _allowed(clock: SlaClock, fraction: float) -> timedelta:
    """Business time from the start to `fraction` of the target, pauses included."""
    return timedelta(seconds=round(clock.target_seconds * fraction) + clock.paused_seconds)


def _seconds(span: timedelta) -> int:
    return int(span.total_seconds())
