"""A bounce of mail we sent: find that mail, mark it failed, tell staff.

Never a ticket and never an answer. A permanent failure marks the outbound
mail and its article failed and queues one notice to staff, in this
message's transaction; a later bounce of the same mail is recorded only, so
staff hear about each failed mail once. A delay (or a success report) is
recorded only: the mail may still arrive. An unmatched bounce is quarantined
so an operator sees it.
"""

from __future__ import annotations

import logging
from datetime import datetime

from sqlalchemy.orm import Session

from mailgate.app import App
from mailgate.pipeline.bounces import BounceInfo, read_bounce
from mailgate.pipeline.decide import Decision
from mailgate.pipeline.message import ParsedMessage
from mailgate.pipeline.screen import Screening
from mailgate.store.models import Article, OutboxMail
from mailgate.tickets import repository as repo

log = logging.getLogger("mailgate.pipeline")

# Outbox states in which staff have already been told the mail did not arrive.
_TOLD = ("failed", "dead")


def apply_bounce(
    app: App, session: Session, raw: bytes, msg: ParsedMessage, screening: Screening
) -> tuple[Decision, int | None]:
    """The decision for a recognised bounce, and the ticket of the mail it returns."""
    base = screening.bounce or BounceInfo("failed", None, (), None, None)
    info = read_bounce(
        raw, base, msg, signer=app.signer, support_address=app.settings.support_address
    )
    found = find_returned_mail(session, info)
    if found is None:
        why = f"unmatched bounce: {_summary(info)}, no mail of ours found by VERP address, ENVID"
        return Decision("quarantined", f"{why} or returned Message-ID ({screening.reason})"), None
    outbox, matched_by = found
    what = f"{_summary(info)} of outbox #{outbox.id} ({outbox.kind}), matched by {matched_by}"
    if not info.permanent:
        # A delay may still end in delivery; a success report is good news.
        outcome = "recorded only" + (", it may still arrive" if info.action == "delayed" else "")
    elif _already_failed(session, outbox):
        outcome = "already failed, staff were told before"
    else:
        reason = failure_reason(info)
        _mark_failed(session, outbox, reason)
        outcome = "marked failed; " + _notify_staff(app, session, outbox, info, reason)
    decision = Decision("bounce", f"{what}: {outcome} ({screening.reason})", matched_by=matched_by)
    return decision, outbox.ticket_id


def find_returned_mail(session: Session, info: BounceInfo) -> tuple[OutboxMail, str] | None:
    """The outbox row a bounce returns, and which key found it."""
    for how, kind, value in info.lookup_keys():
        if kind == "nonce":
            row = repo.outbox_for_bounce(session, value, None)
        else:
            row = repo.outbox_for_bounce(session, None, value)
        if row is not None:
            return row, how
    return None


def failure_reason(info: BounceInfo) -> str:
    """What staff read on the article and in the notice: status, who, the server's words."""
    reason = f"bounce: {info.action} {info.status or '(no status code)'}"
    if info.recipients:
        reason += f" for {', '.join(info.recipients)}"
    if info.diagnostic:
        reason += f": {info.diagnostic}"
    return reason


def _summary(info: BounceInfo) -> str:
    return f"{info.action} {info.status}" if info.status else info.action


def _already_failed(session: Session, outbox: OutboxMail) -> bool:
    if outbox.status in _TOLD:
        return True
    article = session.get(Article, outbox.article_id) if outbox.article_id else None
    return article is not None and article.delivery == "failed"


def _mark_failed(session: Session, outbox: OutboxMail, reason: str) -> None:
    outbox.status, outbox.last_error = "failed", reason
    if outbox.article_id and (article := session.get(Article, outbox.article_id)):
        article.delivery, article.delivery_error = "failed", reason


def _notify_staff(
    app: App, session: Session, outbox: OutboxMail, info: BounceInfo, reason: str
) -> str:
    """Queue the staff notice; a broken template must not lose the bounce's record."""
    now: datetime = app.clock()
    undelivered = list(info.recipients) or list(outbox.recipients)
    try:
        with session.begin_nested():
            notice = app.mailer.notify_delivery_failure(session, outbox, undelivered, reason, now)
    except Exception:  # noqa: BLE001 - e.g. an edited template; the failure is still recorded
        log.exception("outbox #%s bounced: could not queue the staff notice", outbox.id)
        return "the staff notice could not be queued (see the log)"
    if notice is None:
        # A staff-only or rejection mail, no ticket, no active staff, or a loop cap.
        return f"no staff notice for {outbox.kind} mail (see the log)"
    return f"staff notified (outbox #{notice.id})"
