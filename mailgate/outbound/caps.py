"""The loop breaker's last layers: caps on the automatic mail we send.

The header screen stops well-behaved robots; these caps stop the rest (a
forwarder that strips Auto-Submitted, an autoresponder that writes fresh
mail). Counted from the outbox, so every instance on one database sees the
same counts and a restart forgets nothing.
"""

from __future__ import annotations

from datetime import datetime, timedelta

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from mailgate.config import Loops
from mailgate.store.models import OutboxMail

# Mail an inbound message causes on its own, to whoever sent it: what a loop
# between two robots multiplies.
CAUSED_BY_INBOUND = frozenset({"ack", "rejection", "spoof_notice"})
# ...and, on one ticket, the notices a robot replying onto it makes us send.
# SLA notices and delivery failures are never capped: losing one costs more.
PER_TICKET = CAUSED_BY_INBOUND | {"staff_customer_reply", "staff_command_refused"}


def over_cap(
    session: Session,
    loops: Loops,
    *,
    kind: str,
    recipient: str,
    ticket_id: int | None,
    now: datetime,
) -> str | None:
    """Why this automatic mail must not be sent, or None."""
    if kind in CAUSED_BY_INBOUND:
        for window, limit in (
            (timedelta(hours=1), loops.auto_mail_per_address_per_hour),
            (timedelta(days=1), loops.auto_mail_per_address_per_day),
        ):
            sent = session.scalar(
                select(func.count()).where(
                    OutboxMail.recipient == recipient,
                    OutboxMail.kind.in_(CAUSED_BY_INBOUND),
                    OutboxMail.created_at > now - window,
                )
            )
            if sent and sent >= limit:
                return f"{sent} automatic mails to {recipient} in the last {_span(window)}"
    if ticket_id is not None and kind in PER_TICKET:
        sent = session.scalar(
            select(func.count()).where(
                OutboxMail.ticket_id == ticket_id,
                OutboxMail.kind.in_(PER_TICKET),
                OutboxMail.created_at > now - timedelta(hours=1),
            )
        )
        if sent and sent >= loops.auto_mail_per_ticket_per_hour:
            return f"{sent} automatic mails about one ticket in the last hour"
    return None


def _span(window: timedelta) -> str:
    return "hour" if window == timedelta(hours=1) else "day"
