"""One message, one unit of work: parse → screen → identify → thread → decide → store
(the mail it causes: answers.py).

Everything a message causes (ingest record, ticket, article, attachment rows,
outbound mail) is committed in one transaction or not at all. Bytes on disk
(raw mail, attachments) are fsynced before that commit. A source reports
success only after `process` returns; `TemporaryFailure` means "try again
later" (SMTP 451, pipe exit 75, IMAP leaves the mail where it is).
"""

from __future__ import annotations

import hashlib
import logging
import re
import time
from dataclasses import asdict, dataclass, replace
from datetime import datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo

from sqlalchemy import select
from sqlalchemy.exc import DBAPIError, IntegrityError, OperationalError
from sqlalchemy.orm import Session

from mailgate.app import App
from mailgate.credits.billing import balance_now, exhausted
from mailgate.credits.ledger import Balance
from mailgate.pipeline import answers
from mailgate.pipeline.authenticity import (
    checks_anyone,
    policy_for,
    strip_forged_results,
    verify_sender,
)
from mailgate.pipeline.breaker import subject_key, tripped
from mailgate.pipeline.decide import Decision, decide
from mailgate.pipeline.delivery_failures import apply_bounce
from mailgate.pipeline.identify import Identity, describe, identify
from mailgate.pipeline.message import Envelope, ParsedMessage, ParseError
from mailgate.pipeline.parse import parse_message
from mailgate.pipeline.rules import Classification, Facts, classify, customer_importance, evaluate
from mailgate.pipeline.screen import ScreenContext, Screening, screen
from mailgate.pipeline.staff import handle_staff_mail
from mailgate.pipeline.thread import find_ticket_for
from mailgate.sla.clocks import track
from mailgate.store.blobs import keep_stored
from mailgate.store.db import unavailable
from mailgate.store.models import (
    AttachmentRow,
    Contact,
    IngestRecord,
    Organisation,
    Ticket,
    TicketEvent,
)
from mailgate.tickets import repository as repo
from mailgate.tickets.articles import store_inbound
from mailgate.tickets.changes import set_status
from mailgate.tickets.lifecycle import status_after_customer_reply
from mailgate.tickets.numbers import format_number, next_sequence

log = logging.getLogger("mailgate.pipeline")

RELEASE = "release"  # the source of mail an operator released from the quarantine
# Mail an operator chose to feed in (a bulk import, a release): no loop to break.
OPERATOR_CHOSEN = frozenset({"mbox", "maildir", RELEASE})
UNAUTHENTICATED_TAG = "unauthenticated-sender"  # on tickets accepted under `prefer`
NO_CREDIT_TAG = "credit-exhausted"  # opened with no prepaid credit left


class TemporaryFailure(Exception):
    """The message was not stored; the sender must retry (451 / EX_TEMPFAIL)."""


@dataclass(frozen=True)
class Result:
    outcome: str
    reason: str
    ticket: str | None
    message_id: str | None
    matched_by: str | None = None
    sender: str | None = None
    ingest_id: int | None = None
    sla: dict[str, str] | None = None  # a new ticket's deadlines, ISO 8601 UTC, per target
    identity: str | None = None  # who the directory says the sender is (see `describe`)
    rules: dict[str, Any] | None = None  # what the rules set on a new ticket
    # A message fetched again after it was stored (IMAP, before its move): the
    # earlier decision, told again to the caller, not a new one to log or count.
    replayed: bool = False
    # (A copy of) a mail held in the quarantine: an IMAP source files it with the
    # held mail, where the quarantine's reason says the original is.
    held: bool = False

    def as_dict(self) -> dict[str, Any]:
        shown = asdict(self)
        del shown["replayed"], shown["held"]
        return shown


def dedupe_key(raw: bytes, msg: ParsedMessage | None) -> str:
    """Message-ID plus a hash of the body.

    The body, not the whole message: the same mail fetched over IMAP, received
    over SMTP or delivered to two of our addresses differs only in its
    trace headers. The Message-ID keeps two different mails with the same body
    ("thanks!") apart; without one, sender, date and subject stand in for it,
    and without a body either (no blank line: often not mail at all), only all
    of its bytes tell it from another.
    """
    body = _body_of(raw)
    body_hash = hashlib.sha256(body if body is not None else b"").hexdigest()
    if msg is None:
        basis = "raw\0" + hashlib.sha256(raw).hexdigest()
    elif msg.message_id:
        basis = f"mid\0{msg.message_id}\0{body_hash}"
    elif body is None:
        basis = "nobody\0" + hashlib.sha256(raw).hexdigest()
    else:
        date = msg.date.isoformat() if msg.date else ""
        basis = f"nomid\0{','.join(msg.from_addresses)}\0{date}\0{msg.subject}\0{body_hash}"
    return hashlib.sha256(basis.encode("utf-8", "replace")).hexdigest()


_HEADER_END = re.compile(rb"\r?\n\r?\n|\r\r")


def _body_of(raw: bytes) -> bytes | None:
    """The body, None when no blank line ends the headers."""
    match = _HEADER_END.search(raw)
    if match is None:
        return None
    # Line endings and trailing blank lines change in transit; content does not.
    return raw[match.end() :].replace(b"\r\n", b"\n").replace(b"\r", b"\n").rstrip()


def process(
    app: App,
    raw: bytes,
    envelope: Envelope | None = None,
    *,
    dry_run: bool = False,
    release_of: int | None = None,
) -> Result:
    """Decide and store one message. `release_of`: the quarantined ingest record
    this mail is released from (see intake/quarantine.py)."""
    envelope = envelope or Envelope()
    started = time.monotonic()
    raw = strip_forged_results(raw, app.authserv_id)
    try:
        msg: ParsedMessage | None = parse_message(raw, app.parse_limits)
        screening = screen(msg, ScreenContext(app.signer, app.settings.support_address, envelope))
    except ParseError as exc:
        msg, screening = None, Screening("quarantined", f"not parsed: {exc}")
    if envelope.held:
        if screening.outcome is not None:  # a robot's or a looping mail: never answered
            envelope = replace(envelope, held_notice=None)
        screening = Screening("quarantined", envelope.held)
    elif msg and msg.sender and screening.outcome is None:
        screening = _authenticate(app, raw, msg, screening, envelope)
    key = dedupe_key(raw, msg)
    for attempt in (1, 2):
        try:
            raw_sha = None if dry_run else app.blobs.put(raw)
            with app.sessions() as session, session.begin():
                held = _take_from_quarantine(session, release_of) if release_of else None
                result = _unit_of_work(
                    app, session, raw, raw_sha, msg, screening, envelope, key, dry_run
                )
                if raw_sha is not None:
                    keep_stored(session, app.blobs, _stored_payloads(session, raw, raw_sha, msg))
                if held is not None:
                    held.reason = f"released as ingest #{result.ingest_id}; was: {held.reason}"
                if dry_run:
                    session.rollback()
            break
        except IntegrityError:
            # Another process stored the same message between our check and our
            # insert: run again, and the duplicate check sees it.
            if attempt == 2:
                raise TemporaryFailure("conflicting concurrent delivery") from None
        except (OperationalError, DBAPIError) as exc:
            raise TemporaryFailure(unavailable(exc)) from exc
        except OSError as exc:
            raise TemporaryFailure(f"cannot write under data_dir: {exc}") from exc
    if result.replayed:  # logged once, when it was decided (the metrics count these lines)
        return result
    log.info(
        "message decided",
        extra={
            "mailgate": {
                **result.as_dict(),
                "source": envelope.source,
                "ms": round((time.monotonic() - started) * 1000, 1),
            }
        },
    )
    if not dry_run:  # most outcomes queue mail (a quarantine may too: notices, alerts)
        app.notify_outbox()
    return result


def _stored_payloads(
    session: Session, raw: bytes, raw_sha: str, msg: ParsedMessage | None
) -> dict[str, bytes]:
    """The bytes this unit of work refers to, by digest: the raw mail (its ingest
    record always does) and those of the mail's attachments that rows refer to."""
    payloads = {raw_sha: raw}
    parts = {
        hashlib.sha256(p.payload).hexdigest(): p.payload for p in (msg.attachments if msg else ())
    }
    if parts:
        session.flush()
        query = select(AttachmentRow.sha256).where(AttachmentRow.sha256.in_(parts)).distinct()
        payloads |= {sha: parts[sha] for sha in session.scalars(query)}
    return payloads


def _take_from_quarantine(session: Session, record_id: int) -> IngestRecord:
    """The held record, marked released, its dedupe key given up for the new one,
    and its bytes too: the new record refers to the same content-addressed raw
    mail, so retention and erasure find it with the ticket it became."""
    held = session.get(IngestRecord, record_id)
    if held is None or held.outcome != "quarantined":
        raise LookupError(f"no quarantined mail #{record_id}")
    held.dedupe_key, held.outcome, held.raw_sha256 = None, "released", None
    session.flush()
    return held


def _authenticate(
    app: App, raw: bytes, msg: ParsedMessage, screening: Screening, envelope: Envelope
) -> Screening:
    """Verify the sender's domain (DNS: outside the transaction)."""
    settings = app.settings.hygiene.authentication
    if not checks_anyone(settings) or msg.sender is None:
        return screening
    verdict = verify_sender(
        raw,
        msg.headers,
        msg.sender.rpartition("@")[2],
        envelope.trusted_authserv_ids,
        dnsfunc=app.dns,
        timeout=settings.dns_timeout_seconds,
    )
    detail = f"{'pass' if verdict.authenticated else 'none'}: {verdict.detail}"
    return replace(screening, sender_authenticated=verdict.authenticated, authentication=detail)


def _unit_of_work(
    app: App,
    session: Session,
    raw: bytes,
    raw_sha: str | None,
    msg: ParsedMessage | None,
    screening: Screening,
    envelope: Envelope,
    key: str,
    dry_run: bool,
) -> Result:
    now = app.clock()
    message_id = msg.message_id if msg else None
    sender = msg.sender if msg else None
    record = IngestRecord(
        dedupe_key=key,
        message_id=message_id,
        source=envelope.source,
        envelope=_envelope_json(envelope),
        sender=sender,
        subject=msg.subject if msg else "",
        raw_sha256=raw_sha,
        received_at=now,
        outcome="",
        reason="",
    )

    first = repo.first_delivery(session, key)
    if first is not None and envelope.mailbox_uid is not None:
        fetched = repo.fetched_before(session, first, envelope.mailbox_uid)
        if fetched is not None:
            # Stored before its MOVE, and fetched again: only the move is left
            # to do (RELIABILITY.md checklist 19), no new row.
            log.info("%s: already stored as ingest #%s", envelope.mailbox_uid, fetched.id)
            number = _ticket_number(session, fetched.ticket_id)
            return Result(fetched.outcome, fetched.reason, number, message_id,
                          fetched.matched_by, sender, fetched.id, replayed=True,
                          held=first.outcome == "quarantined")  # fmt: skip
    if first is not None:
        record.dedupe_key, record.duplicate_of_id = None, first.id
        record.ticket_id = first.ticket_id
        decision = Decision("duplicate", f"same message as ingest #{first.id} ({first.outcome})")
        result = _record(session, record, decision, _ticket_number(session, first.ticket_id))
        return replace(result, held=first.outcome == "quarantined")

    # Same Message-ID, another body: not a duplicate (a broken client, or a
    # forgery); processed on its own, and the reason says so.
    if not (message_id and repo.message_id_seen(session, message_id)):
        return _decide_and_apply(app, session, record, raw, raw_sha, msg, screening, envelope,
                                 dry_run)  # fmt: skip
    log.warning("Message-ID collision: %s seen before with a different body", message_id)
    result = _decide_and_apply(app, session, record, raw, raw_sha, msg, screening, envelope,
                               dry_run)  # fmt: skip
    record.reason += "; Message-ID collision"
    return replace(result, reason=record.reason)


def _decide_and_apply(
    app: App,
    session: Session,
    record: IngestRecord,
    raw: bytes,
    raw_sha: str | None,
    msg: ParsedMessage | None,
    screening: Screening,
    envelope: Envelope,
    dry_run: bool,
) -> Result:
    """Everything after the duplicate check: decide, then write what was decided."""
    now = app.clock()
    sender = record.sender
    if screening.outcome is not None or msg is None:
        if screening.outcome == "bounce" and msg is not None:
            decision, record.ticket_id = apply_bounce(app, session, raw, msg, screening)
            return _record(session, record, decision, _ticket_number(session, record.ticket_id))
        decision = decide(
            screening,
            None,
            None,
            now=now,
            reopen_window=timedelta(0),
            rejection_recently_sent=False,
        )
        if (
            envelope.held_notice
            and msg
            and answers.tell_held_sender(app, session, msg, envelope.held_notice, now)
        ):
            decision = replace(decision, reason=f"{decision.reason}; the sender was told")
        return _record(session, record, decision, None)

    assert sender is not None
    identity = identify(sender, repo.find_person(session, sender), now.date())
    result = _apply_for_sender(app, session, record, identity, raw_sha, msg, screening,
                               envelope, now, dry_run)  # fmt: skip
    return replace(result, identity=describe(identity))


def _apply_for_sender(
    app: App,
    session: Session,
    record: IngestRecord,
    identity: Identity,
    raw_sha: str | None,
    msg: ParsedMessage,
    screening: Screening,
    envelope: Envelope,
    now: datetime,
    dry_run: bool,
) -> Result:
    """A mail that passed the screen, from a sender the directory was asked about."""
    sender = identity.address
    match = find_ticket_for(
        msg,
        identity,
        repo.SqlTicketLookup(session),
        signer=app.signer,
        support_address=app.settings.support_address,
        tag=app.tag_pattern,
        rcpts=envelope.rcpt_to,
    )
    tickets = app.settings.tickets
    recently = repo.recent_mail_to(
        session, sender, "rejection", now - timedelta(hours=tickets.reject_notice_hours)
    )
    policy = policy_for(app.settings.hygiene.authentication, identity)
    if policy == "require" and envelope.source == RELEASE:
        policy = "prefer"  # an operator vouched for it: flagged, not held again
    if policy == "off":  # not checked for this sender: staff commands are not refused
        screening = replace(screening, sender_authenticated=None, authentication=None)
    decision = decide(
        screening,
        identity,
        match,
        now=now,
        reopen_window=timedelta(days=tickets.reopen_days),
        rejection_recently_sent=recently,
        authentication_policy=policy,
    )
    if decision.send_spoof_notice:
        answers.queue_spoof_notice(app, session, identity, now)
    if decision.outcome == "created" and envelope.source not in OPERATOR_CHOSEN:
        decision = _circuit_breaker(app, session, identity, msg, decision, now)

    if decision.outcome == "created":
        contact = session.get(Contact, identity.contact.id)  # type: ignore[union-attr]
        assert contact is not None
        found = classify_mail(app, msg, contact.organisation, contact.role, now)
        credit = balance_now(app, session, contact.organisation_id, now)
        decision = _credit_check(app, contact.organisation_id, found, decision, credit, recently)
    if decision.outcome == "created":
        ticket = _create_ticket(app, session, msg, contact, found, decision, now, dry_run)
        if found.why:
            decision = replace(decision, reason=f"{decision.reason}; {found.why}")
        article = store_inbound(session, None if dry_run else app.blobs, ticket, msg, raw_sha,
                                author_kind="customer", now=now,
                                authentication=screening.authentication)  # fmt: skip
        record.ticket_id, record.article_id = ticket.id, article.id
        clocks = track(app.sla, session, ticket, now)
        answers.queue_created_mail(app, session, ticket, msg, decision, clocks, credit, now)
        deadlines = {c.kind: c.due_at.isoformat() for c in clocks}
        result = _record(session, record, decision, ticket.number)
        return replace(result, sla=deadlines, rules=found.as_dict())
    if decision.outcome == "threaded":
        assert decision.ticket is not None
        ticket = session.get(Ticket, decision.ticket.id)
        assert ticket is not None
        record.ticket_id = ticket.id
        if decision.author_kind == "staff":
            staff = handle_staff_mail(app, session, ticket, msg, raw_sha, envelope, screening,
                                      now, dry_run=dry_run)  # fmt: skip
            record.article_id = staff.article_id
            decision = replace(decision, outcome=staff.outcome,
                               reason=f"{staff.reason}, {decision.reason}")  # fmt: skip
            return _record(session, record, decision, ticket.number, decision.matched_by)
        article = store_inbound(session, None if dry_run else app.blobs, ticket, msg, raw_sha,
                                author_kind="customer", now=now,
                                authentication=screening.authentication)  # fmt: skip
        record.article_id = article.id
        _flag(ticket, decision)
        _after_customer_reply(app, session, ticket, msg, decision, article.id, now)
        return _record(session, record, decision, ticket.number, decision.matched_by)
    if decision.outcome == "rejected" and decision.send_rejection:
        reason = decision.refusal_code or _public_reason(identity.refusal)
        answers.queue_rejection(app, session, msg, identity.person, reason, now)
    return _record(session, record, decision, None)


def _circuit_breaker(
    app: App,
    session: Session,
    identity: Identity,
    msg: ParsedMessage,
    decision: Decision,
    now: datetime,
) -> Decision:
    """Hold a new ticket when its sender or subject opens them faster than a person."""
    contact = identity.contact
    assert contact is not None and contact.organisation_id is not None
    since = now - timedelta(hours=1)
    trip = tripped(
        # What an operator chose to feed in is no robot writing fast.
        repo.tickets_opened_since(session, contact.id, since, not_from=OPERATOR_CHOSEN),
        repo.tickets_with_subject_since(
            session,
            contact.organisation_id,
            subject_key(msg.subject),
            since,
            not_from=OPERATOR_CHOSEN,
        ),  # fmt: skip
        app.settings.hygiene.loops,
    )
    if trip is None:
        return decision
    kind, why = trip
    about = identity.address if kind == "sender" else f"subject {msg.subject[:80]!r}"
    app.mailer.alert(session, about=about, reason=f"circuit breaker: {why}", now=now)
    return Decision("quarantined", f"circuit breaker: {why}")


def _flag(ticket: Ticket, decision: Decision) -> None:
    """What staff should see on the ticket: accepted under the `prefer` policy, or
    with the organisation's credit used up."""
    for tag, applies in ((UNAUTHENTICATED_TAG, decision.unauthenticated),
                         (NO_CREDIT_TAG, decision.no_credit)):  # fmt: skip
        if applies and tag not in ticket.tags:
            ticket.tags = [*ticket.tags, tag]


def _record(
    session: Session,
    record: IngestRecord,
    decision: Decision,
    number: str | None,
    matched_by: str | None = None,
) -> Result:
    record.outcome, record.reason, record.matched_by = decision.outcome, decision.reason, matched_by
    session.add(record)
    session.flush()  # the unique dedupe key is checked here, inside the transaction
    return Result(
        decision.outcome,
        decision.reason,
        number,
        record.message_id,
        matched_by,
        record.sender,
        record.id,
    )


def _ticket_number(session: Session, ticket_id: int | None) -> str | None:
    ticket = session.get(Ticket, ticket_id) if ticket_id else None
    return ticket.number if ticket else None


def _envelope_json(envelope: Envelope) -> dict[str, Any]:
    return {
        "mail_from": envelope.mail_from,
        "rcpt_to": list(envelope.rcpt_to),
        "client_address": envelope.client_address,
        "helo": envelope.helo,
        "mailbox_uid": envelope.mailbox_uid,
    }


def _public_reason(refusal: str | None) -> str:
    """What a rejected sender is told: enough to act on, nothing about our directory."""
    if refusal and "contract" in refusal:
        return "no_contract"
    if refusal and "admin" in refusal:
        return "not_admin"
    return "unknown_sender"


def _credit_check(
    app: App,
    org_id: str,
    found: Classification,
    decision: Decision,
    credit: Balance | None,
    rejection_recently_sent: bool,
) -> Decision:
    """An organisation on prepaid credit with none left: a P1 is always taken; other
    new tickets are flagged or, when the organisation's policy says so, refused."""
    if found.priority == "P1" or not exhausted(credit):
        return decision
    if app.settings.credits.when_exhausted_for(org_id) == "reject":
        why = f"no support credit left for {org_id} ({found.priority})"
        send = not rejection_recently_sent
        return Decision("rejected", why, send_rejection=send, refusal_code="no_credit")
    return replace(decision, reason=f"{decision.reason}; no support credit left", no_credit=True)


def _create_ticket(
    app: App,
    session: Session,
    msg: ParsedMessage,
    contact: Contact,
    found: Classification,
    decision: Decision,
    now: datetime,
    dry_run: bool,
) -> Ticket:
    org = contact.organisation
    ours = {contact.email, app.settings.support_address}
    copied = [a for a in (*msg.to, *msg.cc) if a not in ours]
    cc_contacts = [c.email for c in repo.contacts_of(session, org.id, copied)]
    tickets = app.settings.tickets
    seq = next_sequence(session, now.year, peek=dry_run)
    ticket = Ticket(
        number=format_number(tickets.number_format, now.year, seq),
        organisation=org,
        requester=contact,
        subject=msg.subject or "(no subject)",
        subject_key=subject_key(msg.subject),
        status="new",
        priority=found.priority,
        urgent=found.urgent,
        level=found.level,
        assignee_id=repo.staff_id(session, found.assignee) if found.assignee else None,
        group=found.group,
        cc=cc_contacts,
        tags=list(found.tags),
        language=org.language,
        follows_ticket_id=decision.ticket.id if decision.ticket else None,
        created_at=now,
        updated_at=now,
    )
    _flag(ticket, decision)
    session.add(ticket)
    session.flush()
    # The rules' decision, in the ticket's history from the start.
    event = TicketEvent(
        ticket_id=ticket.id, at=now, actor_kind="system", field="priority",
        old=None, new=found.priority, reason=found.why or "no rule set it: the default",
    )  # fmt: skip
    session.add(event)
    return ticket


def classify_mail(
    app: App, msg: ParsedMessage, org: Organisation | None, role: str | None, now: datetime
) -> Classification:
    """Priority, urgency, level, assignee and tags of the ticket this mail opens.

    `org` None (a stranger, for `rules test`): the rules see the text only.
    """
    tickets = app.settings.tickets
    plan = org.plan if org else ""
    return classify(
        evaluate(app.rules, _facts(msg, org, role, now)),
        default_priority=tickets.plan_priority.get(plan, tickets.default_priority),
        customer_importance=customer_importance(msg.headers),
        header_policy=tickets.customer_priority_header,
    )


def _facts(msg: ParsedMessage, org: Organisation | None, role: str | None, now: datetime) -> Facts:
    """What the rules may look at: the mail, and who sent it from which organisation when."""
    if org is None:
        return Facts(subject=msg.subject, body=msg.text, headers=msg.headers)
    try:
        local = now.astimezone(ZoneInfo(org.timezone))
    except (KeyError, ValueError):
        local = now
    return Facts(
        subject=msg.subject,
        body=msg.text,
        organisation=org.id,
        plan=org.plan,
        role=role,
        language=org.language,
        has_attachment=any(not a.inline for a in msg.attachments),
        headers=msg.headers,
        local_time=local,
    )


def _after_customer_reply(
    app: App,
    session: Session,
    ticket: Ticket,
    msg: ParsedMessage,
    decision: Decision,
    article_id: int,
    now: datetime,
) -> None:
    """Back in front of staff: reopened or no longer waiting, and staff are told."""
    status = None if decision.keeps_status else status_after_customer_reply(ticket.status)
    if status:
        why = "customer replied within the reopen window" if decision.reopen else "customer replied"
        set_status(session, ticket, status, now=now, actor_kind="customer", actor=msg.sender,
                   reason=why, article_id=article_id)  # fmt: skip
    track(app.sla, session, ticket, now)  # the clock runs again
    requester = ticket.requester.email if ticket.requester else None
    if msg.sender and msg.sender != requester and msg.sender not in ticket.cc:
        ticket.cc = [*ticket.cc, msg.sender]  # a colleague joined the conversation
    answers.queue_reply_notice(app, session, ticket, msg, now)
