"""Thread: which ticket does this mail answer?

Independent keys, strongest first; the first that names a ticket the sender
may write to wins, and its name is recorded:

1. our signed keys: a Message-ID we generated (In-Reply-To/References) or a
   signed plus-address (`support+t<id>-<sig>@`) among the recipients;
2. In-Reply-To/References against the Message-IDs of every stored article;
3. the tracking tag in the subject, trusted only from a party of the ticket.

A key pointing at another organisation's ticket never threads there.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Protocol

from mailgate.pipeline.identify import Identity
from mailgate.pipeline.message import ParsedMessage
from mailgate.tickets.tokens import Signer


@dataclass(frozen=True)
class TicketView:
    id: int
    number: str
    organisation_id: str
    status: str
    requester: str | None
    cc: tuple[str, ...] = ()
    resolved_at: datetime | None = None


class TicketLookup(Protocol):
    def by_id(self, ticket_id: int) -> TicketView | None: ...
    def by_message_ids(self, message_ids: Sequence[str]) -> list[TicketView]: ...
    def by_number(self, number: str) -> TicketView | None: ...


@dataclass(frozen=True)
class ThreadMatch:
    ticket: TicketView | None
    matched_by: str | None  # signed-message-id | reply-token | references | subject-tag
    refused: tuple[str, ...] = field(default=())  # keys found but not trusted, and why


def tag_pattern(number_format: str) -> re.Pattern[str]:
    """A regex for `[NUMBER]` in a subject, built from tickets.number_format."""
    parts = re.split(r"(\{[^}]*\})", number_format)
    regex = ""
    for part in parts:
        if part.startswith("{year"):
            regex += r"\d{4}"
        elif part.startswith("{"):
            regex += r"\d+"
        else:
            regex += re.escape(part)
    return re.compile(r"\[(" + regex + r")\]", re.IGNORECASE)


def may_write(identity: Identity, ticket: TicketView, *, strict: bool) -> str | None:
    """None when the sender may write to the ticket, else why not.

    strict (subject tag alone): only parties of the ticket; otherwise any active
    contact of the ticket's organisation.
    """
    if identity.is_staff:
        return None
    contact = identity.contact
    if contact is None:
        return "sender is not an active contact"
    if contact.organisation_id != ticket.organisation_id:
        return "ticket belongs to another organisation"
    if strict and identity.address not in (ticket.requester, *ticket.cc):
        return "sender is not a party of the ticket"
    return None


def _signed_candidates(
    msg: ParsedMessage, signer: Signer, support_address: str, rcpts: Sequence[str]
) -> list[tuple[str, int]]:
    found: list[tuple[str, int]] = []
    for mid in (*msg.in_reply_to, *reversed(msg.references)):
        ticket_id = signer.ticket_from_message_id(mid)
        if ticket_id:
            found.append(("signed-message-id", ticket_id))
    for address in (*rcpts, *msg.to, *msg.cc):
        tagged = signer.parse_plus_address(support_address, address)
        if tagged and tagged[0] == "ticket":
            found.append(("reply-token", int(tagged[1])))
    return found


def find_ticket_for(
    msg: ParsedMessage,
    identity: Identity,
    lookup: TicketLookup,
    *,
    signer: Signer,
    support_address: str,
    tag: re.Pattern[str],
    rcpts: Sequence[str] = (),
) -> ThreadMatch:
    refused: list[str] = []

    def accept(key: str, ticket: TicketView | None, *, strict: bool = False) -> bool:
        if ticket is None:
            return False
        why = may_write(identity, ticket, strict=strict)
        if why:
            refused.append(f"{key} {ticket.number}: {why}")
        return why is None

    for key, ticket_id in _signed_candidates(msg, signer, support_address, rcpts):
        ticket = lookup.by_id(ticket_id)
        if accept(key, ticket):
            return ThreadMatch(ticket, key, tuple(refused))

    ids = [*msg.in_reply_to, *reversed(msg.references)]
    if ids:
        for ticket in lookup.by_message_ids(ids[:100]):
            if accept("references", ticket):
                return ThreadMatch(ticket, "references", tuple(refused))

    for number in tag.findall(msg.subject)[:5]:
        ticket = lookup.by_number(number.upper())
        if accept("subject-tag", ticket, strict=True):
            return ThreadMatch(ticket, "subject-tag", tuple(refused))

    return ThreadMatch(None, None, tuple(refused))
