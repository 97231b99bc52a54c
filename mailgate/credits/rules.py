"""What work costs and when credits end: pure functions, no database, no clock."""

from __future__ import annotations

import calendar
from collections.abc import Sequence
from datetime import datetime, time, timedelta, tzinfo

PERIOD_MINUTES = 15


def periods(minutes: int) -> int:
    """Started quarter-hours: 1 min → 1, 15 → 1, 16 → 2, 90 → 6."""
    if minutes <= 0:
        return 0
    return -(-minutes // PERIOD_MINUTES)


def cost(minutes: int, *, urgent: bool, bug: bool, urgent_multiplier: int) -> int:
    """Credits for one time entry. A confirmed bug is ours to fix: free, unless the
    request was urgent (the customer asked for, and got, urgent handling)."""
    if bug and not urgent:
        return 0
    return periods(minutes) * (urgent_multiplier if urgent else 1)


def add_months(moment: datetime, months: int) -> datetime:
    """The same day `months` later, clamped to the month's last day (31 Jan + 1 → 28/29 Feb)."""
    index = moment.month - 1 + months
    year, month = moment.year + index // 12, index % 12 + 1
    day = min(moment.day, calendar.monthrange(year, month)[1])
    return moment.replace(year=year, month=month, day=day)


def pack_end(activated: datetime, months: int, zone: tzinfo) -> datetime:
    """When a pack activated at `activated` ends: `months` later where the organisation
    is, at the midnight that closes that day. Balances and mails name the last valid
    day, so a pack bought at 16:03 must not end at 16:03 on it; one activated at a
    midnight (`--activated DATE`) ends at a midnight as it is."""
    local = add_months(activated.astimezone(zone), months)
    midnight = datetime.combine(local.date(), time(), tzinfo=zone)
    if local == midnight:
        return midnight
    return datetime.combine(local.date() + timedelta(days=1), time(), tzinfo=zone)


def allocate(
    needed: int, available: Sequence[tuple[int, int]]
) -> tuple[list[tuple[int, int]], int]:
    """Take `needed` credits from (pack id, remaining) pairs in the order given
    (oldest expiry first): the amounts taken per pack, and what is still missing."""
    taken = []
    for pack_id, remaining in available:
        if needed <= 0:
            break
        amount = min(needed, remaining)
        if amount > 0:
            taken.append((pack_id, amount))
            needed -= amount
    return taken, max(needed, 0)
