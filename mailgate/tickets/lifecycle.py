"""The ticket lifecycle as decisions over plain data: commands, transitions, business days.

    new ──first public staff reply──► open ◄──customer replies── waiting_customer
                                       │  ▲                            ▲
                                       │  └── customer replies ─┐      │ /status waiting
                                       ▼                        │      │
                                   resolved ── N days, no reply ──► closed

Nothing here touches the database; `mailgate.tickets.changes` writes what
these functions decide.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from dataclasses import dataclass, replace
from datetime import datetime, timedelta
from zoneinfo import ZoneInfo

from mailgate.tickets.commands import Command, Problem

STATUSES = ("new", "open", "waiting_customer", "resolved", "closed")


@dataclass(frozen=True)
class TicketState:
    """What staff commands can change on a ticket."""

    status: str
    priority: str
    urgent: bool
    level: str
    assignee: str | None  # a staff address
    cc: tuple[str, ...]


@dataclass(frozen=True)
class Change:
    field: str
    old: str | None
    new: str | None
    line: int | None = None  # the command line that asked for it


@dataclass(frozen=True)
class Plan:
    """What one staff mail's commands do; applied as a whole or not at all."""

    state: TicketState
    changes: tuple[Change, ...] = ()
    spent_minutes: tuple[int, ...] = ()
    problems: tuple[Problem, ...] = ()


def plan_commands(
    state: TicketState,
    commands: Sequence[Command],
    *,
    actor: str,
    staff: Collection[str],
    contacts: Collection[str],
) -> Plan:
    """The ticket after `commands`, or the problems that refuse them.

    `staff` are the active staff addresses (for /assign), `contacts` the
    active contacts of the ticket's organisation (for /cc: copying anyone else
    would show them another organisation's ticket).
    """
    before = state
    changes: list[Change] = []
    spent: list[int] = []
    problems: list[Problem] = []
    for command in commands:
        new, problem = _apply(state, command, actor=actor, staff=staff, contacts=contacts)
        if problem:
            problems.append(Problem(command.line, _as_written(command), problem))
            continue
        if command.name == "spend":
            spent.append(int(command.value))  # type: ignore[arg-type]
        changes += [replace(c, line=command.line) for c in diff(state, new)]
        state = new
    if problems:
        return Plan(before, problems=tuple(problems))
    return Plan(state, tuple(changes), tuple(spent))


def _apply(
    state: TicketState,
    command: Command,
    *,
    actor: str,
    staff: Collection[str],
    contacts: Collection[str],
) -> tuple[TicketState, str | None]:
    value = command.value
    match command.name:
        case "status":
            return replace(state, status=str(value)), None
        case "priority":
            return replace(state, priority=str(value)), None
        case "urgent":
            return replace(state, urgent=bool(value)), None
        case "level":
            return replace(state, level=str(value)), None
        case "assign":
            who = actor if value == "me" else str(value)
            if who not in staff:
                return state, f"{who} is not an active member of the support staff"
            return replace(state, assignee=who), None
        case "cc":
            address = str(value)
            if address not in contacts:
                return state, (
                    f"{address} is not an active contact of this ticket's organisation; "
                    "only its contacts may be copied"
                )
            if address in state.cc:
                return state, None
            return replace(state, cc=(*state.cc, address)), None
        case _:  # spend, internal, bug, workaround: no field of the ticket changes
            return state, None


def _as_written(command: Command) -> str:
    return (
        f"/{command.name} {command.value}"
        if command.value not in (None, True)
        else (f"/{command.name}")
    )


def diff(old: TicketState, new: TicketState) -> list[Change]:
    out = []
    for name in ("status", "priority", "urgent", "level", "assignee"):
        before, after = getattr(old, name), getattr(new, name)
        if before != after:
            out.append(Change(name, _text(before), _text(after)))
    for address in new.cc:
        if address not in old.cc:
            out.append(Change("cc", None, address))
    return out


def _text(value: object) -> str | None:
    if value is None:
        return None
    if isinstance(value, bool):
        return "yes" if value else "no"
    return str(value)


def status_after_customer_reply(status: str) -> str | None:
    """A customer's answer puts the ticket back in front of staff (None: no change).

    Reopening a resolved ticket is decided earlier, with the reopen window
    (`decide`); a closed ticket never reopens (the mail opens a new ticket).
    """
    return "open" if status in ("waiting_customer", "resolved") else None


def status_after_staff_reply(status: str, configured: str) -> str | None:
    """A public staff reply answers the customer: a new ticket is now open."""
    if status in ("new", "open") and configured != status:
        return configured
    return None


def add_business_days(start: datetime, days: int, timezone: str) -> datetime:
    """`start` plus `days` working days (Monday to Friday) in the organisation's time zone.

    The time of day is kept; a start on a weekend counts from the next
    Monday. Public holidays and opening hours come with the SLA calendars.
    """
    try:
        zone = ZoneInfo(timezone)
    except (KeyError, ValueError):  # a bad directory entry: weekdays in UTC still hold
        zone = ZoneInfo("UTC")
    local = start.astimezone(zone)
    while local.weekday() >= 5:
        local = (local + timedelta(days=1)).replace(hour=0, minute=0, second=0, microsecond=0)
    for _ in range(days):
        local += timedelta(days=1)
        while local.weekday() >= 5:
            local += timedelta(days=1)
    return local.astimezone(start.tzinfo)
