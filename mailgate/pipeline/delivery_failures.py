"""A bounce of mail we sent: find that mail, mark it failed, tell staff.

Never a ticket and never an answer; an unmatched bounce is quarantined so an
operator sees it.
"""

from __future__ import annotations

from sqlalchemy.orm import Session

from mailgate.app import App
from mailgate.pipeline.bounces import read_bounce
from mailgate.pipeline.decide import Decision
from mailgate.pipeline.message import ParsedMessage
from mailgate.pipeline.screen import Screening
from mailgate.store.models import Article, OutboxMail
from mailgate.tickets import repository as repo


def apply_bounce(
    app: App, session: Session, raw: bytes, msg: ParsedMessage, screening: Screening
) -> tuple[Decision, int | None]:
    """The decision for a recognised bounce, and the ticket of the mail it returns."""
    assert screening.bounce is not None
    info = read_bounce(raw, screening.bounce, msg)
    outbox = repo.outbox_for_bounce(session, info.verp_nonce, info.returned_message_id)
    if outbox is None:
        return Decision("quarantined", f"unmatched bounce ({screening.reason})"), None
    detail = f"{info.action} {info.status or ''}".strip()
    if info.permanent:
        _mark_failed(session, outbox, f"bounce: {detail}")
    decision = Decision("bounce", f"{detail} for outbox #{outbox.id} ({screening.reason})")
    return decision, outbox.ticket_id


def _mark_failed(session: Session, outbox: OutboxMail, reason: str) -> None:
    outbox.status, outbox.last_error = "failed", reason
    if outbox.article_id and (article := session.get(Article, outbox.article_id)):
        article.delivery, article.delivery_error = "failed", reason
