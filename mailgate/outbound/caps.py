"""The loop breaker's last layers: caps on the automatic mail we send.

The header screen stops well-behaved robots; these caps stop the rest (a
forwarder that strips Auto-Submitted, an autoresponder that writes fresh
mail). Counted from the outbox, so every instance on one database sees the
same counts and a restart forgets nothing.
"""

from __future__ import annotations

from datetime import datetime, timedelta

from sqlalchemy import case, func, select
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
        hour, day = now - timedelta(hours=1), now - timedelta(days=1)
        last_hour, last_day = session.execute(  # both windows in one query
            select(
                func.coalesce(func.sum(case((OutboxMail.created_at > hour, 1), else_=0)), 0),
                func.count(),
            ).where(
                OutboxMail.recipient == recipient,
                OutboxMail.kind.in_(CAUSED_BY_INBOUND),
                OutboxMail.created_at > day,
            )
        ).one()
        if last_hour >= loops.auto_mail_per_address_per_hour:
            return f"{last_hour} automatic mails to {recipient} in the last hour"
        if last_day >= loops.auto_mail_per_address_per_day:
            return f"{last_day} automatic mails to {recipient} in the last day"
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
