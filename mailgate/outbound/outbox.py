"""The outbox: mail rendered in the transaction that caused it, sent afterwards.

Nothing is sent from inside the pipeline. A worker claims due rows, marks them
`sending`, hands the bytes to the transport and records the result. A crash
after sending but before marking leaves the row `sending`; once its lease has
expired it is retried with the same bytes and Message-ID, so a receiver can
recognise the repeat.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import or_, select
from sqlalchemy.orm import Session, sessionmaker

from mailgate.outbound.transports import PermanentFailure, TemporaryFailure, Transport
from mailgate.store.models import Article, OutboxMail

log = logging.getLogger("mailgate.outbox")

SENDING_LEASE = timedelta(minutes=10)


@dataclass(frozen=True)
class RetryPolicy:
    max_attempts: int = 12
    base_seconds: int = 60
    max_seconds: int = 3600

    def delay(self, attempts: int, rng: Callable[[], float] = random.random) -> timedelta:
        """Exponential backoff with ±20 % jitter so queued mail does not retry in step."""
        seconds = min(self.base_seconds * 2 ** max(attempts - 1, 0), self.max_seconds)
        return timedelta(seconds=seconds * (0.8 + 0.4 * rng()))


def queue_mail(
    session: Session,
    *,
    kind: str,
    data: bytes,
    message_id: str,
    nonce: str,
    envelope_from: str,
    recipients: list[str],
    now: datetime,
    ticket_id: int | None = None,
    article_id: int | None = None,
) -> OutboxMail:
    row = OutboxMail(
        kind=kind,
        ticket_id=ticket_id,
        article_id=article_id,
        nonce=nonce,
        message_id=message_id,
        envelope_from=envelope_from,
        recipient=recipients[0],
        recipients=recipients,
        data=data,
        status="queued",
        attempts=0,
        next_attempt_at=now,
        created_at=now,
    )
    session.add(row)
    return row


def _claim(session: Session, now: datetime, limit: int) -> list[OutboxMail]:
    due = or_(
        (OutboxMail.status == "queued") & (OutboxMail.next_attempt_at <= now),
        (OutboxMail.status == "sending") & (OutboxMail.next_attempt_at <= now - SENDING_LEASE),
    )
    query = select(OutboxMail).where(due).order_by(OutboxMail.id).limit(limit)
    if session.bind is not None and session.bind.dialect.name == "postgresql":
        query = query.with_for_update(skip_locked=True)
    rows = list(session.scalars(query))
    for row in rows:
        row.status = "sending"
        row.attempts += 1
        row.next_attempt_at = now
    return rows


def send_due(
    sessions: sessionmaker[Session],
    transport: Transport,
    clock: Callable[[], datetime],
    policy: RetryPolicy = RetryPolicy(),
    limit: int = 50,
) -> int:
    """Send what is due; return how many mails were handled (sent or not)."""
    with sessions.begin() as session:
        claimed = [
            (r.id, r.envelope_from, list(r.recipients), r.data)
            for r in _claim(session, clock(), limit)
        ]
    for row_id, envelope_from, recipients, data in claimed:
        error: Exception | None = None
        refused: list[str] = []
        try:
            refused = list(transport.send(envelope_from, recipients, data or b"") or ())
        except (TemporaryFailure, PermanentFailure) as exc:
            error = exc
        except OSError as exc:  # a transport bug or the disk: retry, it may pass
            error = TemporaryFailure(str(exc))
        with sessions.begin() as session:
            _record_result(session, row_id, error, refused, clock(), policy)
    return len(claimed)


def _record_result(
    session: Session,
    row_id: int,
    error: Exception | None,
    refused: list[str],
    now: datetime,
    policy: RetryPolicy,
) -> None:
    row = session.get(OutboxMail, row_id)
    assert row is not None
    article = session.get(Article, row.article_id) if row.article_id else None
    if error is None:
        row.status, row.sent_at = "sent", now
        row.last_error = f"refused: {', '.join(refused)}" if refused else None
        log.info("outbox sent id=%s kind=%s attempts=%s", row.id, row.kind, row.attempts)
        if article:
            article.delivery = "failed" if refused else "sent"
            article.delivery_error = row.last_error
        return
    row.last_error = str(error)[:2000]
    if isinstance(error, PermanentFailure) or row.attempts >= policy.max_attempts:
        row.status = "failed" if isinstance(error, PermanentFailure) else "dead"
        log.warning("outbox %s id=%s kind=%s: %s", row.status, row.id, row.kind, row.last_error)
        if article:
            article.delivery, article.delivery_error = "failed", row.last_error
        return
    row.status = "queued"
    row.next_attempt_at = now + policy.delay(row.attempts)
    log.info("outbox retry id=%s attempt=%s: %s", row.id, row.attempts, row.last_error)


def retry(session: Session, ids: list[int] | None, now: datetime) -> int:
    """Put failed or dead mail (all, or the given ids) back in the queue."""
    query = select(OutboxMail).where(OutboxMail.status.in_(("failed", "dead")))
    if ids:
        query = query.where(OutboxMail.id.in_(ids))
    rows = list(session.scalars(query))
    for row in rows:
        row.status, row.next_attempt_at, row.attempts = "queued", now, 0
    return len(rows)
