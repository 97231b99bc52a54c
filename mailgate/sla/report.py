"""`mailgate sla report`: per priority, targets met and breached, median business times."""

from __future__ import annotations

from collections import defaultdict
from dataclasses import asdict, dataclass, field
from datetime import datetime
from statistics import median

from sqlalchemy import and_, select
from sqlalchemy.orm import Session

from mailgate.store.models import SlaClock, Ticket

REPORTED = ("first_response", "resolution")


@dataclass
class ClockFigures:
    met: int = 0
    breached: int = 0
    running: int = 0  # neither yet: still within its target, or paused
    median_minutes: float | None = None  # business minutes used, of the stopped clocks


@dataclass
class PriorityFigures:
    priority: str
    tickets: int = 0
    first_response: ClockFigures = field(default_factory=ClockFigures)
    resolution: ClockFigures = field(default_factory=ClockFigures)

    def as_dict(self) -> dict[str, object]:
        return asdict(self)


def outcome(clock: SlaClock, now: datetime) -> str:
    """met, breached or running, as of `now`."""
    if clock.breached_at is not None:
        return "breached"
    if clock.stopped_at is not None:
        return "met" if (clock.elapsed_seconds or 0) <= clock.target_seconds else "breached"
    if clock.paused_at is None and clock.due_at <= now:
        return "breached"  # the sweep has not told anyone yet, but it is late
    return "running"


def sla_report(
    session: Session,
    now: datetime,
    *,
    organisation: str | None = None,
    start: datetime | None = None,
    end: datetime | None = None,
) -> list[PriorityFigures]:
    """Tickets created in [start, end), per priority P1..P3."""
    query = (
        select(Ticket.id, Ticket.priority, SlaClock)
        .join(
            SlaClock,
            and_(
                SlaClock.ticket_id == Ticket.id,
                SlaClock.kind.in_(REPORTED),
                SlaClock.suspended_at.is_(None),
            ),
            isouter=True,
        )
        .order_by(Ticket.id)
    )
    if organisation:
        query = query.where(Ticket.organisation_id == organisation)
    if start:
        query = query.where(Ticket.created_at >= start)
    if end:
        query = query.where(Ticket.created_at < end)
    figures = {p: PriorityFigures(p) for p in ("P1", "P2", "P3")}
    seen: dict[str, set[int]] = defaultdict(set)
    used: dict[tuple[str, str], list[int]] = defaultdict(list)  # business seconds, stopped clocks
    for ticket_id, priority, clock in session.execute(query):
        row = figures.setdefault(priority, PriorityFigures(priority))
        seen[priority].add(ticket_id)
        if clock is None:
            continue
        counts: ClockFigures = getattr(row, clock.kind)
        result = outcome(clock, now)
        setattr(counts, result, getattr(counts, result) + 1)
        if clock.elapsed_seconds is not None:
            used[priority, clock.kind].append(clock.elapsed_seconds)
    for priority, row in figures.items():
        row.tickets = len(seen[priority])
        for kind in REPORTED:
            if used[priority, kind]:
                getattr(row, kind).median_minutes = round(median(used[priority, kind]) / 60, 1)
    return [figures[p] for p in sorted(figures)]
