"""Decide: exactly one outcome per message, with its reason and the mail it causes.

A pure function of what the earlier stages found; `store` carries it out.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from datetime import datetime, timedelta

from mailgate.pipeline.identify import Identity
from mailgate.pipeline.screen import Screening
from mailgate.pipeline.thread import ThreadMatch, TicketView


@dataclass(frozen=True)
class Decision:
    outcome: str  # created | threaded | command | rejected | ignored | bounce | quarantined
    reason: str
    ticket: TicketView | None = None  # threaded: the ticket; created: the ticket it follows
    matched_by: str | None = None
    reopen: bool = False  # threaded onto a resolved ticket within the window
    # An autoresponder's answer known only by its subject: stored for staff, but
    # no answer from the customer (a resolved ticket stays resolved).
    keeps_status: bool = False
    author_kind: str = "customer"  # customer | staff
    send_ack: bool = False
    send_rejection: bool = False
    send_spoof_notice: bool = False  # quarantined as unauthenticated: tell the real address
    unauthenticated: bool = False  # accepted under `prefer`: flag the ticket
    no_credit: bool = False  # accepted although the organisation's credit is used up
    refusal_code: str | None = None  # what the rejection notice says, when not the identity's


def decide(
    screening: Screening,
    identity: Identity | None,
    match: ThreadMatch | None,
    *,
    now: datetime,
    reopen_window: timedelta,
    rejection_recently_sent: bool,
    authentication_policy: str = "off",
) -> Decision:
    if screening.outcome is not None:
        return Decision(screening.outcome, screening.reason)
    assert identity is not None and match is not None
    decision = _decide_person(
        screening, identity, match, now, reopen_window, rejection_recently_sent
    )
    if screening.sender_authenticated is not False or authentication_policy == "off":
        return decision
    if authentication_policy == "require" and decision.outcome != "rejected":
        return Decision(
            "quarantined",
            f"unauthenticated sender {identity.address} ({screening.authentication}); "
            "authentication policy require",
            send_spoof_notice=True,
        )
    if decision.outcome in ("created", "threaded"):
        note = f"; sender not authenticated ({screening.authentication})"
        return replace(decision, reason=decision.reason + note, unauthenticated=True)
    return decision


def _decide_person(
    screening: Screening,
    identity: Identity,
    match: ThreadMatch,
    now: datetime,
    reopen_window: timedelta,
    rejection_recently_sent: bool,
) -> Decision:
    refused = f" (not threaded: {'; '.join(match.refused)})" if match.refused else ""
    ticket = match.ticket
    author = "staff" if identity.is_staff else "customer"

    if ticket is not None:
        via = f"matched by {match.matched_by}"
        if screening.autoreply and author == "customer":
            return Decision("threaded", f"{via}; status kept, {screening.reason}", ticket,
                            match.matched_by, keeps_status=True)  # fmt: skip
        if ticket.status == "resolved" and author == "customer":
            if ticket.resolved_at and now - ticket.resolved_at <= reopen_window:
                return Decision(
                    "threaded",
                    f"reopened {ticket.number}, {via}",
                    ticket,
                    match.matched_by,
                    reopen=True,
                    author_kind=author,
                )
            return _new_or_rejected(
                screening,
                identity,
                f"{ticket.number} resolved too long ago",
                ticket,
                rejection_recently_sent,
            )
        if ticket.status == "closed" and author == "customer":
            return _new_or_rejected(
                screening, identity, f"{ticket.number} is closed", ticket, rejection_recently_sent
            )
        return Decision("threaded", f"{via}{refused}", ticket, match.matched_by, author_kind=author)

    return _new_or_rejected(
        screening, identity, refused.strip(" ()") or None, None, rejection_recently_sent
    )


def _new_or_rejected(
    screening: Screening,
    identity: Identity,
    context: str | None,
    follows: TicketView | None,
    rejection_recently_sent: bool,
) -> Decision:
    suffix = f"; {context}" if context else ""
    if identity.may_open:
        ack = not screening.suppress_ack
        reason = "new ticket" + suffix + ("" if ack else f"; {screening.reason}")
        return Decision("created", reason, follows, send_ack=ack)
    send = not rejection_recently_sent and not screening.suppress_ack
    note = (
        ""
        if send
        else (
            "; rejection notice already sent recently"
            if rejection_recently_sent
            else f"; {screening.reason}"
        )
    )
    return Decision("rejected", f"{identity.refusal}{suffix}{note}", send_rejection=send)
