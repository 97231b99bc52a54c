"""A staff member's mail on a ticket: /commands, internal notes, replies relayed to the customer.

Runs inside the message's unit of work. The commands of one mail apply as a
whole or not at all: one bad line refuses the mail, changes nothing, relays
nothing, and the staff member gets a reply saying which line and why.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from sqlalchemy.orm import Session

from mailgate.app import App
from mailgate.credits.billing import bill_time, confirm_bug
from mailgate.credits.ledger import shortfall
from mailgate.outbound.mailer import ticket_context
from mailgate.pipeline.message import Envelope, ParsedMessage, addressed_to
from mailgate.pipeline.screen import Screening
from mailgate.pipeline.trim import trim_reply
from mailgate.sla.clocks import track
from mailgate.store.models import Ticket, TicketEvent
from mailgate.tickets import repository as repo
from mailgate.tickets.articles import store_inbound
from mailgate.tickets.changes import apply_changes, record_time, set_status, state_of
from mailgate.tickets.commands import Problem, StaffMail, read_commands
from mailgate.tickets.lifecycle import Plan, plan_commands, status_after_staff_reply
from mailgate.tickets.notices import (
    latest_customer_message_id,
    public_thread,
    queue_resolution_notice,
)

INTERNAL_TAG = "internal"  # support+internal@…: a note for staff only


@dataclass(frozen=True)
class StaffOutcome:
    outcome: str  # threaded | command
    reason: str
    article_id: int | None


def handle_staff_mail(
    app: App,
    session: Session,
    ticket: Ticket,
    msg: ParsedMessage,
    raw_sha: str | None,
    envelope: Envelope,
    screening: Screening,
    now: datetime,
    *,
    dry_run: bool,
) -> StaffOutcome:
    sender = msg.sender or ""
    mail = read_commands(msg.text)
    plan = _plan(session, ticket, mail, sender)
    settings = app.settings.tickets
    body = mail.body
    if settings.trim_quoted:
        # Below commands, a mail client's quote (of our staff notice) or a
        # signature is all that is left of a commands-only mail: the staff
        # member's words are the commands, and the customer must get nothing.
        body = trim_reply(
            body,
            extra_markers=settings.reply_markers,
            strip_signature=settings.strip_signature,
            whole_if_empty=not mail.commands,
        )
    # A file is something to send too, even without a word around it; inline
    # parts are the HTML's own pictures (a signature's logo), not files.
    sends_files = any(not a.inline for a in msg.attachments)
    only_commands = not body.strip() and not sends_files
    internal = mail.internal or _sent_to_internal(msg, envelope, app.settings.support_address)
    # A staff member's autoresponder answering our notice without Auto-Submitted
    # ("Automatic reply: …", an Outlook rule): kept for staff, never sent to the
    # customer from our address, and no answer for the SLA clock.
    internal = internal or screening.autoreply
    public = not (internal or only_commands)
    problems = sorted((*mail.problems, *plan.problems), key=lambda p: p.line)
    if screening.sender_authenticated is False:
        # Not only its commands: a forged reply would reach the customer from
        # our address (a phishing link, an attachment) and stop the SLA clock.
        problems.insert(0, Problem(0, "", "the mail failed sender authentication (DKIM/DMARC)"))
    # Who it would go to, with the contacts this mail's /cc adds.
    if public and not problems and not repo.ticket_customers(session, ticket, cc=plan.state.cc):
        problems.append(Problem(0, "", _NOBODY_TO_ANSWER))
    bug = any(c.name == "bug" for c in mail.commands)
    if not problems and plan.spent_minutes:
        problems += _credit_problem(app, session, ticket, mail, plan, bug, now)
    if problems:
        _refuse(app, session, ticket, msg, problems, now)
        # Line 0 is the whole mail (its authentication, nobody to send it to), not a line of it.
        listed = "; ".join(f"line {p.line}: {p.reason}" if p.line else p.reason for p in problems)
        return StaffOutcome(
            "command", f"commands refused, nothing applied or relayed: {listed}", None
        )

    article = store_inbound(
        session,
        None if dry_run else app.blobs,
        ticket,
        msg,
        raw_sha,
        author_kind="staff",
        now=now,
        text=body if public or body.strip() else _command_lines(msg.text, mail),
        visibility="public" if public else "internal",
        authentication=screening.authentication,
    )
    reason = f"by mail {msg.message_id or ''}".strip()
    apply_changes(session, ticket, plan.changes, now=now, actor_kind="staff", actor=sender,
                  reason=reason, article_id=article.id)  # fmt: skip
    if bug:  # before the time of this mail is billed: it is free too
        confirm_bug(session, ticket, actor=sender, now=now)
    spent = record_time(session, ticket, plan.spent_minutes, staff_email=sender, now=now,
                        article_id=article.id)  # fmt: skip
    bill_time(app, session, ticket, spent, now)
    if public:
        _relay(app, session, ticket, msg, body, now)
        status = status_after_staff_reply(ticket.status, settings.status_after_staff_reply)
        if status and not any(c.field == "status" for c in plan.changes):
            set_status(session, ticket, status, now=now, actor_kind="staff", actor=sender,
                       reason="public reply", article_id=article.id)  # fmt: skip
    if any(c.field == "status" and c.new == "resolved" for c in plan.changes):
        queue_resolution_notice(app, session, ticket, now, auto_resolved=False)
    answered = {"first_response"} if public else set()
    if any(c.name == "workaround" for c in mail.commands):
        answered.add("workaround")
        # Not a field of the ticket, but a fact of its history like one.
        session.add(TicketEvent(ticket_id=ticket.id, at=now, actor_kind="staff", actor=sender,
                                field="workaround", old=None, new="given", reason=reason,
                                article_id=article.id))  # fmt: skip
    track(app.sla, session, ticket, now, stop=answered)
    why = _describe(plan, public, internal)
    if screening.autoreply:
        why += f"; {screening.reason}"
    return StaffOutcome("threaded" if not only_commands else "command", why, article.id)


def _plan(session: Session, ticket: Ticket, mail: StaffMail, sender: str) -> Plan:
    copied = [str(c.value) for c in mail.commands if c.name == "cc"]
    return plan_commands(
        state_of(ticket),
        mail.commands,
        actor=sender,
        staff={s.email for s in repo.active_staff(session)},
        contacts={c.email for c in repo.contacts_of(session, ticket.organisation_id, copied)},
    )


# A reply that reaches nobody must not count as the customer's answer (SLA first
# response, status open), and its author must know it was not sent.
_NOBODY_TO_ANSWER = (
    "nobody would receive this reply: the requester and the copied contacts are no longer "
    "active contacts of the organisation; /cc a current contact, or send it as /internal"
)


def _credit_problem(
    app: App,
    session: Session,
    ticket: Ticket,
    mail: StaffMail,
    plan: Plan,
    bug: bool,
    now: datetime,
) -> list[Problem]:
    """/spend beyond the organisation's credit (and no overdraft): the mail is refused."""
    why = shortfall(session, app.settings.credits, ticket, plan.spent_minutes,
                    urgent=plan.state.urgent, bug=ticket.bug or bug, now=now)  # fmt: skip
    if why is None:
        return []
    first = next(c for c in mail.commands if c.name == "spend")
    return [Problem(first.line, f"/spend {first.value}", why)]


def _describe(plan: Plan, public: bool, internal: bool) -> str:
    parts = ["staff reply relayed" if public else "internal note" if internal else "commands"]
    parts += [f"{c.field} {c.old or '-'} -> {c.new}" for c in plan.changes]
    parts += [f"spent {m} min" for m in plan.spent_minutes]
    return "; ".join(parts)


def _sent_to_internal(msg: ParsedMessage, envelope: Envelope, support: str) -> bool:
    # Trusting the delivery headers too (over IMAP, a Bcc shows only there) can
    # only keep a mail from the customer, never send one to them.
    local, domain = support.split("@", 1)
    internal = f"{local}+{INTERNAL_TAG}@{domain}".lower()
    return internal in {a.lower() for a in addressed_to(msg, envelope)}


def _command_lines(text: str, mail: StaffMail) -> str:
    """What a commands-only mail said, kept on its internal article."""
    lines = text.replace("\r\n", "\n").replace("\r", "\n").split("\n")
    return "\n".join(lines[c.line - 1].strip() for c in mail.commands if c.line <= len(lines))


def _refuse(
    app: App,
    session: Session,
    ticket: Ticket,
    msg: ParsedMessage,
    problems: list[Problem],
    now: datetime,
) -> None:
    app.mailer.queue(
        session,
        kind="staff_command_refused",
        to=[msg.sender or ""],
        language="en",  # as the other staff notices
        context={
            "ticket": ticket_context(ticket),
            "problems": [{"line": p.line, "text": p.text, "reason": p.reason} for p in problems],
        },
        now=now,
        ticket=ticket,
        answers=msg.message_id,
        references=msg.references,
    )


def _relay(
    app: App, session: Session, ticket: Ticket, msg: ParsedMessage, body: str, now: datetime
) -> None:
    """The staff member's words to the requester and copied contacts, from the
    support address; not to those the staff member wrote to directly (support
    in Cc): they have the mail already, and relayed too they got it twice."""
    already = {a.lower() for a in (*msg.to, *msg.cc)}
    recipients = [r for r in repo.ticket_customers(session, ticket) if r.lower() not in already]
    if not recipients:
        return
    staff_name = repo.staff_name(session, msg.sender or "") or (msg.sender or "")
    app.mailer.queue(
        session,
        kind="staff_reply",
        to=recipients,
        language=ticket.language,
        context={
            "ticket": ticket_context(ticket),
            "requester_name": ticket.requester.name if ticket.requester else None,
            "staff_name": staff_name,
            "text": body,
        },
        now=now,
        ticket=ticket,
        answers=latest_customer_message_id(ticket),
        references=public_thread(ticket),
        auto_submitted="no",  # a person wrote it; RFC 3834 says so explicitly
        author_kind="staff",
        author=(msg.sender or "", staff_name),
        from_name=staff_name,
        attachments=[(a.filename, a.content_type, a.payload) for a in msg.attachments],
    )
