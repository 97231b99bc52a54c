"""The outbox: mail rendered in the transaction that caused it, sent afterwards.

Nothing is sent from inside the pipeline. A worker claims due rows, marks them
`sending`, hands the bytes to the transport and records the result. A crash
after sending but before marking leaves the row `sending`; once its lease has
expired it is retried with the same bytes and Message-ID, so a receiver can
recognise the repeat.

A live worker must never see its lease expire: another instance (or `mailgate
ingest` sending what it queued) would take the mail and send it a second
time. So the lease outlasts the slowest single send the SMTP transport allows
(its 10-minute wait for the end-of-data reply plus command timeouts), and a
worker whose batch runs long renews the lease of the rows it still holds
before each send, dropping any that another worker took meanwhile.

Each attempt ends in one result, logged as one line on ``mailgate.outbox``
with its fields in ``extra["mailgate"]`` (outbox_id, message_id, kind,
recipients, attempt, result, error, next_attempt_at):

- ``sent``: the relay took it. Recipients it refused with 5xx are reported
  to staff; recipients it deferred with 4xx while others accepted are
  retried alone (the row's recipients shrink to them), so nobody gets the
  mail twice.
- ``retry``: a temporary failure (4xx, connection or TLS trouble); the row
  goes back to ``queued`` with exponential backoff and jitter
  (`RetryPolicy`).
- ``failed``: a permanent failure (5xx on MAIL, every RCPT or DATA). Never
  retried by itself; ``mailgate outbox retry`` requeues it.
- ``dead``: we gave up: ``max_attempts`` temporary failures, or an uncertain
  delivery (below). Also requeued only by ``mailgate outbox retry``.

A lost reply after the end of data (``TemporaryFailure.maybe_delivered``)
means the relay may have queued the mail. It is resent with the same
Message-ID, but the relay must never get more than two copies: after a
second maybe-delivered failure the row is ``dead`` with a reason starting
"delivery uncertain". Not ``sent``, because nobody confirmed it, and staff
must be able to check with the customer; not ``failed``, which means the
relay refused it. A plain temporary failure in between (4xx: the relay
kept no copy) does not spend that budget. ``mailgate outbox retry`` starts
a fresh budget: the operator asks for one more copy on purpose.

When a mail ends ``failed`` or ``dead``, or some recipients were refused,
the `notify` callback given to `send_due` queues one staff notice in the
same transaction (`Mailer.notify_delivery_failure`: never for staff-only
mail, so a failing notice cannot cause another). A broken notice template
is logged and does not stop the result from being recorded: an unrecorded
send would be sent again.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import case, func, or_, select, tuple_, update
from sqlalchemy.orm import Session, sessionmaker

from mailgate.outbound.transports import (
    DeliveryError,
    PermanentFailure,
    SendResult,
    TemporaryFailure,
    Transport,
)
from mailgate.store.models import Article, OutboxMail

log = logging.getLogger("mailgate.outbox")

# An outbound mail's life: queued -> sending -> sent, or back to queued for a
# retry, or failed (refused) / dead (given up); `retry` queues those two again.
STATUSES = ("queued", "sending", "sent", "failed", "dead")

# Longer than one send can take (transports.SmtpTransport: 600 s for the reply to
# the end of data, plus connecting and each command); a batch renews it.
SENDING_LEASE = timedelta(minutes=30)
RENEW_AFTER = SENDING_LEASE / 6
MAX_ERROR_CHARS = 2000
# Marks `last_error` while the relay may already hold one copy of the mail.
MAYBE_DELIVERED = "[maybe delivered] "

# Called in the transaction that records a failure: (session, row, recipients
# that did not get the mail, reason, now).
Notifier = Callable[[Session, OutboxMail, list[str], str, datetime], object]


@dataclass(frozen=True)
class RetryPolicy:
    max_attempts: int = 126  # about 5 days (see config.Outbound)
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


def _claim(session: Session, now: datetime, limit: int, later: Collection[str]) -> list[OutboxMail]:
    due = or_(
        (OutboxMail.status == "queued") & (OutboxMail.next_attempt_at <= now),
        (OutboxMail.status == "sending") & (OutboxMail.next_attempt_at <= now - SENDING_LEASE),
    )
    order = [case((OutboxMail.kind.in_(later), 1), else_=0)] if later else []
    query = select(OutboxMail).where(due).order_by(*order, OutboxMail.id).limit(limit)
    if session.bind is not None and session.bind.dialect.name == "postgresql":
        query = query.with_for_update(skip_locked=True)
    rows = list(session.scalars(query))
    for row in rows:
        row.status = "sending"
        row.attempts += 1
        row.next_attempt_at = now
    return rows


@dataclass(frozen=True)
class _Claimed:
    id: int
    envelope_from: str
    recipients: list[str]
    data: bytes
    attempt: int  # the row's `attempts` after our claim: another claim changes it


@dataclass(frozen=True)
class _Attempt:
    """What the transport said about one send."""

    error: DeliveryError | None = None
    refused: Mapping[str, str] = field(default_factory=dict)
    deferred: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class _Outcome:
    result: str  # sent | retry | failed | dead
    error: str | None = None
    undelivered: tuple[str, ...] = ()  # recipients staff must hear about


def send_due(
    sessions: sessionmaker[Session],
    transport: Transport,
    clock: Callable[[], datetime],
    policy: RetryPolicy = RetryPolicy(),
    limit: int = 20,
    notify: Notifier | None = None,
    later: Collection[str] = (),
    after_send: Callable[[bytes], object] | None = None,
) -> int:
    """Send what is due; return how many mails were handled (sent or not).

    Kinds in `later` wait behind the others when both are due: under a
    backlog, customers' acknowledgements go before staff notices.
    `after_send` sees each mail the relay accepted, before its row is
    marked (the tests' crash point, see intake/faults.py).
    """
    leased_at = clock()
    with sessions.begin() as session:
        claimed = [
            _Claimed(r.id, r.envelope_from, list(r.recipients), r.data or b"", r.attempts)
            for r in _claim(session, leased_at, limit, later)
        ]
    # One transaction records the whole batch: under load each write waits its
    # turn behind the intake, and one wait per mail made the sender fall
    # behind. A crash before it commits leaves the batch `sending`, to be sent
    # once more after the lease: still within "at most two copies".
    attempts: list[tuple[_Claimed, _Attempt]] = []
    held = claimed
    for mail in claimed:
        if lease_to_renew(leased_at, clock()):
            leased_at = clock()
            held = _renew(sessions, held, leased_at)
        if mail.id not in {other.id for other in held}:
            log.warning("outbox #%s: lease lost to another sender; not sent here", mail.id)
            continue
        attempt = _attempt(transport, mail)
        if attempt.error is None and after_send is not None:
            after_send(mail.data)
        attempts.append((mail, attempt))
    if attempts:
        with sessions.begin() as session:
            for mail, attempt in attempts:
                _record_result(session, mail, attempt, clock(), policy, notify)
    return len(claimed)


def lease_to_renew(leased_at: datetime, now: datetime) -> bool:
    """Renew well before the lease ends: a batch of slow sends (a relay that
    takes minutes per mail) outlasted it, and another sender took the rest."""
    return now - leased_at >= RENEW_AFTER


def _renew(sessions: sessionmaker[Session], held: list[_Claimed], now: datetime) -> list[_Claimed]:
    """Extend the lease of the rows still ours; those that are. A row another
    sender claimed after our lease expired counts one more attempt (or is no
    longer `sending`): it is theirs to send now."""
    if not held:
        return held
    with sessions.begin() as session:
        ours = set(
            session.scalars(
                update(OutboxMail)
                .where(
                    tuple_(OutboxMail.id, OutboxMail.attempts).in_(
                        [(mail.id, mail.attempt) for mail in held]
                    ),
                    OutboxMail.status == "sending",
                )
                .values(next_attempt_at=now)
                .returning(OutboxMail.id)
            )
        )
    return [mail for mail in held if mail.id in ours]


def _attempt(transport: Transport, mail: _Claimed) -> _Attempt:
    try:
        result = transport.send(mail.envelope_from, mail.recipients, mail.data)
    except DeliveryError as exc:
        return _Attempt(error=exc)
    except OSError as exc:  # a transport bug or the disk: retry, it may pass
        return _Attempt(error=TemporaryFailure(str(exc)))
    if not isinstance(result, SendResult):  # a transport that only lists refused recipients
        return _Attempt(refused={rcpt: "refused" for rcpt in result or ()})
    return _Attempt(refused=dict(result.refused), deferred=dict(result.deferred))


def _record_result(
    session: Session,
    mail: _Claimed,
    attempt: _Attempt,
    now: datetime,
    policy: RetryPolicy,
    notify: Notifier | None,
) -> None:
    row = session.get(OutboxMail, mail.id)
    assert row is not None
    if attempt.error is None:
        outcome = _accepted(row, attempt, policy)
    else:
        outcome = _not_accepted(row, attempt.error, policy)
    _apply(session, row, outcome, now, policy)
    _log_attempt(row, mail.recipients, outcome)
    if outcome.undelivered and notify is not None:
        _notify_staff(session, notify, row, outcome, now)


def _accepted(row: OutboxMail, attempt: _Attempt, policy: RetryPolicy) -> _Outcome:
    undelivered = list(attempt.refused)
    notes = [f"refused: {_listing(attempt.refused)}"] if attempt.refused else []
    if attempt.deferred and row.attempts < policy.max_attempts:
        # Those who accepted have it: resending to everyone would give them a second copy.
        accepted = [r for r in row.recipients
                    if r not in attempt.deferred and r not in attempt.refused]  # fmt: skip
        row.recipients = list(attempt.deferred)
        notes.insert(0, f"accepted for {', '.join(accepted)}; "
                        f"deferred: {_listing(attempt.deferred)}")  # fmt: skip
        return _Outcome("retry", "; ".join(notes), tuple(undelivered))
    if attempt.deferred:
        undelivered += attempt.deferred
        notes.append(f"deferred, gave up after {row.attempts} attempts: "
                     f"{_listing(attempt.deferred)}")  # fmt: skip
    return _Outcome("sent", "; ".join(notes) or None, tuple(undelivered))


def _not_accepted(row: OutboxMail, error: DeliveryError, policy: RetryPolicy) -> _Outcome:
    text = str(error)
    if isinstance(error, PermanentFailure):
        return _Outcome("failed", text, tuple(error.recipients or row.recipients))
    maybe = isinstance(error, TemporaryFailure) and error.maybe_delivered
    # `attempts > 1`: a marker left before `mailgate outbox retry` reset the count is stale.
    held = row.attempts > 1 and (row.last_error or "").startswith(MAYBE_DELIVERED)
    if maybe and held:
        return _Outcome("dead", _uncertain(row, text), tuple(row.recipients))
    if maybe or held:
        text = MAYBE_DELIVERED + text
    if row.attempts >= policy.max_attempts:
        return _Outcome("dead", f"gave up after {row.attempts} attempts; last error: {text}",
                        tuple(row.recipients))  # fmt: skip
    return _Outcome("retry", text)


def _uncertain(row: OutboxMail, text: str) -> str:
    return (
        "delivery uncertain: the relay received the whole message but did not confirm it, "
        "twice; it may hold up to 2 copies (same Message-ID), so it is not sent again "
        f"('mailgate outbox retry {row.id}' sends one more); last error: {text}"
    )


def _apply(
    session: Session, row: OutboxMail, outcome: _Outcome, now: datetime, policy: RetryPolicy
) -> None:
    row.last_error = outcome.error[:MAX_ERROR_CHARS] if outcome.error else None
    if outcome.result == "retry":
        row.status, row.next_attempt_at = "queued", now + policy.delay(row.attempts)
    elif outcome.result == "sent":
        row.status, row.sent_at = "sent", now
    else:
        row.status = outcome.result
    article = session.get(Article, row.article_id) if row.article_id else None
    if article is None:
        return
    if outcome.undelivered or outcome.result in ("failed", "dead"):
        article.delivery, article.delivery_error = "failed", row.last_error
    elif outcome.result == "sent" and article.delivery != "failed":
        # A refusal of some recipients at an earlier attempt stays visible.
        article.delivery, article.delivery_error = "sent", None


_LEVELS = {"sent": logging.INFO, "retry": logging.WARNING}


def _log_attempt(row: OutboxMail, recipients: Sequence[str], outcome: _Outcome) -> None:
    fields: dict[str, Any] = {
        "outbox_id": row.id,
        "message_id": row.message_id,
        "kind": row.kind,
        "recipients": list(recipients),
        "attempt": row.attempts,
        "result": outcome.result,
        "error": outcome.error,
        "next_attempt_at": row.next_attempt_at.isoformat() if outcome.result == "retry" else None,
    }
    # Short: the formatters of mailgate.observability append the fields.
    log.log(
        _LEVELS.get(outcome.result, logging.ERROR),
        "outbox #%s %s attempt %s: %s",
        row.id,
        row.kind,
        row.attempts,
        outcome.result,
        extra={"mailgate": fields},
    )


def _notify_staff(
    session: Session, notify: Notifier, row: OutboxMail, outcome: _Outcome, now: datetime
) -> None:
    try:
        with session.begin_nested():
            notify(session, row, list(outcome.undelivered), row.last_error or "", now)
    except Exception:  # noqa: BLE001 - e.g. an edited template; the result must still commit
        log.exception("outbox #%s: could not queue the staff notice about its failure", row.id)


def _listing(replies: Mapping[str, str]) -> str:
    return "; ".join(f"{rcpt}: {reply}" for rcpt, reply in replies.items())


def next_attempt(session: Session) -> datetime | None:
    """When the earliest queued mail falls due (a retry after its backoff), if any."""
    return session.scalar(
        select(func.min(OutboxMail.next_attempt_at)).where(OutboxMail.status == "queued")
    )


def retry(session: Session, ids: list[int] | None, now: datetime) -> list[int]:
    """Put failed or dead mail (all, or the given ids) back in the queue; their ids."""
    query = select(OutboxMail).where(OutboxMail.status.in_(("failed", "dead")))
    if ids:
        query = query.where(OutboxMail.id.in_(ids))
    rows = list(session.scalars(query))
    for row in rows:
        row.status, row.next_attempt_at, row.attempts = "queued", now, 0
        article = session.get(Article, row.article_id) if row.article_id else None
        if article is not None:  # staff see it is on its way again
            article.delivery, article.delivery_error = "queued", None
    return [row.id for row in rows]
