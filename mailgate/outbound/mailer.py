"""Render a templated mail, stamp it, and put it in the outbox.

Every mail we send carries a signed Message-ID, the signed Reply-To of its
ticket, a VERP envelope sender (bounces find their mail), the loop marker and
RFC 3834 headers; it is rendered now, inside the caller's transaction.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from email.utils import parseaddr
from typing import Any

from sqlalchemy.orm import Session

from mailgate.config import Settings
from mailgate.outbound.caps import CAUSED_BY_INBOUND, over_cap
from mailgate.outbound.compose import (
    Attachment,
    build_message,
    cap_references,
    check_envelope_address,
    format_address,
)
from mailgate.outbound.outbox import queue_mail
from mailgate.outbound.templates import TemplateSet
from mailgate.pipeline.screen import LOOP_HEADER
from mailgate.store.models import Article, OutboxMail, Ticket
from mailgate.store.state import get_state, set_state
from mailgate.tickets import repository
from mailgate.tickets.tokens import Signer, new_nonce

log = logging.getLogger("mailgate.outbound")

FAILURE_NOTICE = "staff_delivery_failed"
ALERT = "operator_alert"
ALERT_PERIOD = timedelta(days=1)
# Customers see acks, rejections and staff replies; notices are for staff only.
STAFF_ONLY = {
    "staff_new_ticket",
    "staff_customer_reply",
    "staff_command_refused",
    "sla_reminder",
    "sla_breach",
    FAILURE_NOTICE,
    ALERT,
}
# Kinds whose failure staff are not told about: their own notices (a failing
# notice would cause another, and so on) and rejections, which go to senders
# we do not know and often to forged addresses (backscatter).
NO_FAILURE_NOTICE = STAFF_ONLY | {"rejection"}


@dataclass
class Mailer:
    settings: Settings
    templates: TemplateSet
    signer: Signer

    def queue(
        self,
        session: Session,
        *,
        kind: str,
        to: Sequence[str],
        language: str,
        context: Mapping[str, Any],
        now: datetime,
        ticket: Ticket | None = None,
        answers: str | None = None,
        references: Sequence[str] = (),
        auto_submitted: str | None = "auto-replied",
        author_kind: str = "system",
        author: tuple[str, str] | None = None,
        from_name: str | None = None,
        attachments: Sequence[Attachment] = (),
    ) -> OutboxMail | None:
        """Queue one mail; None (and a log line) when no recipient is deliverable
        or a loop cap holds this automatic mail back (operators are alerted).

        `from_name` shows a person (the staff member who wrote a relayed
        reply) in front of the support address.
        """
        recipients = []
        for address in dict.fromkeys(to):
            try:
                recipients.append(check_envelope_address(address))
            except ValueError as exc:
                log.warning("not sending %s to an unsafe address: %s", kind, exc)
        if not recipients:
            return None
        ticket_id = ticket.id if ticket else None
        loops = self.settings.hygiene.loops
        capped = over_cap(
            session, loops, kind=kind, recipient=recipients[0], ticket_id=ticket_id, now=now
        )
        if capped:
            log.warning("not sending %s: %s", kind, capped)
            about = recipients[0] if kind in CAUSED_BY_INBOUND else f"ticket {ticket.number}"  # type: ignore[union-attr]
            self.alert(session, about=about, reason=f"loop cap: {capped}", now=now)
            return None
        support = self.settings.support_address
        nonce = new_nonce()
        message_id = self.signer.message_id(
            ticket.id if ticket else None, self.settings.support_domain, nonce
        )
        rendered = self.templates.render(
            kind, language, {"support_address": support, "language": language, **context}
        )
        refs = [*references, answers] if answers and answers not in references else [*references]
        sender = self.settings.outbound.from_
        if from_name:
            sender = format_address(from_name, parseaddr(sender)[1])
        data = build_message(
            from_=sender,
            to=recipients,
            subject=rendered.subject,
            text=rendered.text,
            html=rendered.html,
            message_id=message_id,
            in_reply_to=answers,
            references=refs,
            reply_to=self.signer.reply_address(support, ticket.id) if ticket else support,
            auto_submitted=auto_submitted,
            loop_marker=(
                LOOP_HEADER,
                self.signer.loop_marker(self.settings.instance_id, message_id),
            ),
            date=now,
            attachments=attachments,
        )
        article_id = None
        if ticket is not None:
            article = Article(
                ticket=ticket,
                direction="out",
                author_kind=author_kind,
                author_email=author[0] if author else None,
                author_name=author[1] if author else "",
                visibility="internal" if kind in STAFF_ONLY else "public",
                message_id=message_id,
                in_reply_to=answers,
                references=cap_references(refs),  # as the mail carries them
                subject=rendered.subject,
                text=rendered.text,
                html=None,
                delivery="queued",
                created_at=now,
            )
            session.add(article)
            session.flush()
            article_id = article.id
        return queue_mail(
            session,
            kind=kind,
            data=data,
            message_id=message_id,
            nonce=nonce,
            envelope_from=self.signer.verp_address(support, nonce),
            recipients=recipients,
            now=now,
            ticket_id=ticket.id if ticket else None,
            article_id=article_id,
        )

    def notify_delivery_failure(
        self,
        session: Session,
        row: OutboxMail,
        undelivered: Sequence[str],
        reason: str,
        now: datetime,
    ) -> OutboxMail | None:
        """Tell active staff, once, that a customer-facing mail did not reach `undelivered`.

        The outbox calls this in the transaction that records the failure (it
        is its `notify`); the notice is an internal article on the ticket.
        None when no notice is due: staff-only mail, rejections, no ticket, no
        active staff.
        """
        ticket = session.get(Ticket, row.ticket_id) if row.ticket_id else None
        if row.kind in NO_FAILURE_NOTICE or ticket is None:
            return None
        staff = [s.email for s in repository.active_staff(session)]
        if not staff:
            log.warning("outbox #%s failed and no active staff can be told", row.id)
            return None
        article = session.get(Article, row.article_id) if row.article_id else None
        failed_mail = {
            "id": row.id,
            "kind": row.kind,
            "to": list(undelivered),
            "subject": article.subject if article else "",
            "message_id": row.message_id,
            "attempts": row.attempts,
            "reason": reason,
        }
        return self.queue(
            session,
            kind=FAILURE_NOTICE,
            to=staff,
            language="en",  # as the other staff notices
            context={"ticket": ticket_context(ticket), "failed_mail": failed_mail},
            now=now,
            ticket=ticket,
            references=[row.message_id],
            auto_submitted="auto-generated",
        )

    def alert(self, session: Session, *, about: str, reason: str, now: datetime) -> None:
        """Tell operators, once a day per address (or ticket, or subject), that a
        loop defence tripped. Later trips are only logged."""
        key = alert_key(about)
        last = get_state(session, key)
        if last and now - datetime.fromisoformat(last) < ALERT_PERIOD:
            return
        set_state(session, key, now.isoformat())
        log.warning("operator alert about %s: %s", about, reason)
        to = self.settings.hygiene.loops.alert_to or [
            s.email for s in repository.active_staff(session)
        ]
        if to:
            self.queue(
                session,
                kind=ALERT,
                to=to,
                language="en",
                context={"alert": {"about": about, "reason": reason}},
                now=now,
                auto_submitted="auto-generated",
            )


def alert_key(about: str) -> str:
    """The state row that remembers when operators last heard about `about` (an
    address, a ticket, a subject); erasure removes it with the address."""
    return "alert." + hashlib.sha256(about.encode()).hexdigest()[:32]


def ticket_context(ticket: Ticket) -> dict[str, Any]:
    """What templates may know about a ticket (see CONTEXT_KEYS in templates.py)."""
    return {
        "number": ticket.number,
        "subject": ticket.subject,
        "priority": ticket.priority,
        "status": ticket.status,
        "level": ticket.level,
        "org_name": ticket.organisation.name,
    }
