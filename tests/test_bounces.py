"""Bounces of mail we sent, as staff and an operator see them (RELIABILITY §2, §8 items 7–8).

Every bounce here returns a real acknowledgement: an admin's mail is ingested,
the ack mailgate sends lands in the outbound Maildir (with the VERP envelope
sender recorded as its Return-Path), and a delivery report of that ack is
built with the standard library the way an MTA would and ingested like any
inbound mail. What is checked is what users see: the outcome and its
reason, the ack's delivery state on the ticket, the mail that goes out and
how many tickets exist.
"""

from __future__ import annotations

import email
import email.policy
import random
import time
from email.message import EmailMessage, Message
from email.mime.base import MIMEBase
from email.mime.message import MIMEMessage
from email.mime.multipart import MIMEMultipart
from email.mime.text import MIMEText

import pytest
from sqlalchemy import func, select

from mailgate.pipeline.bounces import read_bounce
from mailgate.pipeline.message import Envelope, ParseError
from mailgate.pipeline.parse import parse_message
from mailgate.pipeline.screen import ScreenContext, screen
from mailgate.store.models import Article, OutboxMail, Ticket
from tests.conftest import Installation, make_mail

STAFF = "bob@support.example"  # the one active staff member of the shipped directory.yaml
TAG = "[SUP-2026-000001]"
DAEMON = "Mail Delivery System <MAILER-DAEMON@mx.acme.example>"
EXCHANGE = "Microsoft Outlook <MicrosoftExchange329e71ec88ae4615bbc36ab6ce41109e@acme.example>"
DATE = "Mon, 23 Nov 2026 09:40:00 +0000"


# --- what users see ---------------------------------------------------------------


class Desk:
    """An installation with one ticket and its ack, and what bounces of it do."""

    def __init__(self, inst: Installation) -> None:
        self.inst = inst
        created = inst.ingest(make_mail(subject="Cannot log in"))
        assert (created.outcome, created.ticket) == ("created", "SUP-2026-000001")
        self.ack = next(m for m in inst.sent() if m["To"] == "alice@acme.example")
        self.verp = str(self.ack["Return-Path"]).strip("<>")
        self.seen = {m["Message-ID"] for m in inst.sent()}

    @property
    def ack_id(self) -> str:
        return str(self.ack["Message-ID"]).strip("<>")

    def ack_bytes(self) -> bytes:
        """The ack as the recipient's MTA got it: without the Maildir's envelope stamps."""
        copy = email.message_from_bytes(self.ack.as_bytes(), policy=email.policy.compat32)
        del copy["Return-Path"], copy["X-Envelope-To"]
        return copy.as_bytes()

    def new_mail(self) -> list[EmailMessage]:
        """Mail sent since the last call (sending the queue first)."""
        fresh = [m for m in self.inst.sent() if m["Message-ID"] not in self.seen]
        self.seen |= {m["Message-ID"] for m in fresh}
        return fresh

    def ack_article(self) -> Article:
        with self.inst.session() as s:
            article = s.scalar(select(Article).where(Article.message_id == self.ack_id))
            assert article is not None
            return article

    def ack_outbox(self) -> OutboxMail:
        with self.inst.session() as s:
            row = s.scalar(select(OutboxMail).where(OutboxMail.message_id == self.ack_id))
            assert row is not None
            return row

    def tickets(self) -> int:
        with self.inst.session() as s:
            return s.scalar(select(func.count()).select_from(Ticket)) or 0

    def customer_articles(self) -> int:
        with self.inst.session() as s:
            query = select(func.count()).select_from(Article).where(Article.direction == "in")
            return s.scalar(query) or 0


@pytest.fixture
def desk(inst: Installation) -> Desk:
    return Desk(inst)


def from_mta(verp: str) -> Envelope:
    """How a bounce reaches our SMTP listener: null sender, to the VERP address."""
    return Envelope(source="smtp", mail_from="", rcpt_to=(verp,))


def assert_one_failure_notice(desk: Desk, *expected: str) -> None:
    mails = desk.new_mail()
    assert [m["To"] for m in mails] == [STAFF]
    notice = mails[0]
    assert notice["Subject"].startswith(f"{TAG} Delivery failed")
    assert notice["Auto-Submitted"] == "auto-generated"
    with desk.inst.session() as s:
        kind = s.scalar(
            select(OutboxMail.kind).where(OutboxMail.message_id == notice["Message-ID"].strip("<>"))
        )
    assert kind == "staff_delivery_failed"
    text = notice.get_body(("plain",)).get_content()
    assert "did not reach alice@acme.example" in text
    for words in expected:
        assert words in text


# --- reports built as MTAs build them ---------------------------------------------


def _compat(data: bytes) -> Message:
    return email.message_from_bytes(data, policy=email.policy.compat32)


def _fields(**values: str) -> Message:
    block = Message()
    for name, value in values.items():
        block[name.replace("_", "-")] = value
    return block


def dsn(
    returned: bytes | None,
    *,
    to: str,
    action: str = "failed",
    status: str = "5.1.1",
    returned_as: str = "message/rfc822",
    envid: str | None = None,
    message_id: str = "<dsn-1@mx.acme.example>",
    diagnostic: str = "smtp; 550 5.1.1 <alice@acme.example>: Recipient address rejected",
) -> bytes:
    """An RFC 3464 delivery-status notification, as Postfix writes one."""
    report = MIMEMultipart("report", report_type="delivery-status")
    report["From"] = DAEMON
    report["To"] = to
    report["Subject"] = (
        "Delayed Mail (still being retried)"
        if action == "delayed"
        else "Undelivered Mail Returned to Sender"
    )
    report["Date"] = DATE
    report["Message-ID"] = message_id
    report["Auto-Submitted"] = "auto-replied"
    report.attach(
        MIMEText(
            "This is the mail system at host mx.acme.example.\n\n"
            "I'm sorry to have to inform you that your message could not\n"
            "be delivered to one or more recipients.\n"
        )
    )
    per_message = {"Reporting_MTA": "dns; mx.acme.example"}
    if envid is not None:
        per_message["Original_Envelope_Id"] = envid
    status_part = MIMEBase("message", "delivery-status")
    status_part.set_payload(
        [
            _fields(**per_message),
            _fields(
                Final_Recipient="rfc822; alice@acme.example",
                Original_Recipient="rfc822;alice@acme.example",
                Action=action,
                Status=status,
                Diagnostic_Code=diagnostic,
            ),
        ]
    )
    report.attach(status_part)
    if returned is not None and returned_as == "message/rfc822":
        report.attach(MIMEMessage(_compat(returned)))
    elif returned is not None:
        headers = returned.split(b"\n\n", 1)[0].decode("ascii")
        report.attach(MIMEText(headers + "\n", "rfc822-headers"))
    return report.as_bytes()


def qmail_ndr(returned: bytes, *, to: str, message_id: str = "<q-1@mx.acme.example>") -> bytes:
    """qmail's notice: plain text, the mail copied below a marker line, no MIME."""
    head = (
        f"Return-Path: <>\nFrom: MAILER-DAEMON@mx.acme.example\nTo: {to}\n"
        f"Subject: failure notice\nDate: {DATE}\nMessage-ID: {message_id}\n\n"
    )
    body = (
        "Hi. This is the qmail-send program at mx.acme.example.\n"
        "I'm afraid I wasn't able to deliver your message to the following addresses.\n"
        "This is a permanent error; I've given up. Sorry it didn't work out.\n\n"
        "<alice@acme.example>:\n"
        "Remote host said: 550 5.1.1 <alice@acme.example>... User unknown\n\n"
        "--- Below this line is a copy of the message.\n\n"
    )
    return head.encode() + body.encode() + returned.replace(b"\r\n", b"\n")


EXCHANGE_TEXT = (
    "Delivery has failed to these recipients or groups:\n\n"
    "alice@acme.example\n"
    "The email address you entered couldn't be found.\n\n"
    "Diagnostic information for administrators:\n\n"
    "Generating server: EX01.acme.example\n\n"
    "alice@acme.example\n"
    "Remote Server returned '550 5.1.1 RESOLVER.ADR.RecipNotFound; not found'\n\n"
)


def exchange_ndr(
    returned: bytes, subject: str, *, to: str, attached: bool,
    prefix: str = "Undeliverable", text: str = EXCHANGE_TEXT,
    headers_title: str = "Original message headers:",
) -> bytes:  # fmt: skip
    """Exchange / Office 365's notice: "Undeliverable:", the mail attached or its headers quoted."""
    if attached:
        ndr: Message = MIMEMultipart("mixed")
        ndr.attach(MIMEText(text))
        ndr.attach(MIMEMessage(_compat(returned)))
    else:
        quoted = returned.split(b"\n\n", 1)[0].decode("ascii")
        ndr = MIMEText(text + headers_title + "\n\n" + quoted + "\n")
    ndr["From"] = EXCHANGE
    ndr["To"] = to
    ndr["Subject"] = f"{prefix}: {subject}"
    ndr["Date"] = DATE
    ndr["Message-ID"] = "<ex-1@EX01.acme.example>"
    return ndr.as_bytes()


# --- checklist 7: RFC 3464 --------------------------------------------------------


@pytest.mark.parametrize("returned_as", ["message/rfc822", "text/rfc822-headers"])
def test_dsn_of_our_ack_marks_it_failed_and_tells_staff_once(desk: Desk, returned_as: str) -> None:
    report = dsn(desk.ack_bytes(), to=desk.verp, returned_as=returned_as)

    result = desk.inst.ingest(report, from_mta(desk.verp))

    assert result.outcome == "bounce"
    assert result.ticket == "SUP-2026-000001"
    assert "failed 5.1.1" in result.reason and "matched by VERP address" in result.reason
    assert "staff notified" in result.reason
    article = desk.ack_article()
    assert article.delivery == "failed"
    assert "5.1.1" in article.delivery_error and "alice@acme.example" in article.delivery_error
    assert desk.ack_outbox().status == "failed"
    assert_one_failure_notice(desk, "5.1.1", "Recipient address rejected")
    assert desk.tickets() == 1
    assert desk.customer_articles() == 1  # the admin's first mail, nothing from the bounce


def test_dsn_found_by_returned_message_id_alone(desk: Desk) -> None:
    # Delivered to the plain support address (an IMAP mailbox, say): no VERP.
    report = dsn(desk.ack_bytes(), to="support@example.com", returned_as="text/rfc822-headers")

    result = desk.inst.ingest(report)

    assert result.outcome == "bounce"
    assert "matched by returned Message-ID" in result.reason
    assert desk.ack_article().delivery == "failed"
    assert_one_failure_notice(desk, "5.1.1")
    assert desk.tickets() == 1


def test_dsn_found_by_envid(desk: Desk) -> None:
    # ENVID (RFC 3461) returns as Original-Envelope-Id; ours is the signed VERP
    # tag, so a report that returns nothing else still finds the mail.
    tag = desk.verp.split("@")[0].split("+", 1)[1]
    report = dsn(None, to="support@example.com", envid=tag)

    result = desk.inst.ingest(report)

    assert result.outcome == "bounce"
    assert "matched by ENVID" in result.reason
    assert desk.ack_article().delivery == "failed"
    assert_one_failure_notice(desk)


def test_forged_envid_or_verp_finds_nothing(desk: Desk) -> None:
    tag = desk.verp.split("@")[0].split("+", 1)[1]
    forged = tag[:-4] + ("0000" if not tag.endswith("0000") else "1111")
    report = dsn(None, to=f"support+{forged}@example.com", envid=forged)

    result = desk.inst.ingest(report, from_mta(f"support+{forged}@example.com"))

    assert result.outcome == "quarantined"
    assert result.reason.startswith("unmatched bounce")
    assert desk.ack_article().delivery == "sent"
    assert desk.new_mail() == []


@pytest.mark.parametrize(("action", "status"), [("delayed", "4.4.7"), ("delivered", "2.0.0")])
def test_delay_or_success_report_is_recorded_only(desk: Desk, action: str, status: str) -> None:
    report = dsn(
        desk.ack_bytes(),
        to=desk.verp,
        action=action,
        status=status,
        diagnostic="smtp; 451 4.4.7 try again later",
    )

    result = desk.inst.ingest(report, from_mta(desk.verp))

    assert result.outcome == "bounce"
    assert f"{action} {status}" in result.reason and "recorded only" in result.reason
    assert desk.ack_article().delivery == "sent"
    assert desk.ack_outbox().status == "sent"
    assert desk.new_mail() == []
    assert desk.tickets() == 1

    # The delay spent nothing: the final failure still fails the ack and tells staff.
    final = dsn(desk.ack_bytes(), to=desk.verp, message_id="<dsn-2@mx.acme.example>")
    assert desk.inst.ingest(final, from_mta(desk.verp)).outcome == "bounce"
    assert desk.ack_article().delivery == "failed"
    assert_one_failure_notice(desk)


def test_second_bounce_of_a_failed_mail_is_recorded_without_a_second_notice(desk: Desk) -> None:
    first = dsn(desk.ack_bytes(), to=desk.verp)
    second = qmail_ndr(desk.ack_bytes(), to=desk.verp)  # another MTA, another report

    assert desk.inst.ingest(first, from_mta(desk.verp)).outcome == "bounce"
    assert_one_failure_notice(desk)
    result = desk.inst.ingest(second, from_mta(desk.verp))

    assert result.outcome == "bounce"
    assert "already failed" in result.reason
    assert desk.ack_article().delivery == "failed"
    assert desk.new_mail() == []
    assert desk.tickets() == 1


# --- checklist 8: non-standard notices, reports -----------------------------------


@pytest.mark.parametrize(
    ("to", "matched_by"),
    [("verp", "VERP address"), ("support@example.com", "VERP address in the returned mail")],
)
def test_qmail_notice_is_a_bounce_of_our_ack(desk: Desk, to: str, matched_by: str) -> None:
    # qmail returns the mail as it was queued, its Return-Path (our VERP address) first.
    returned = f"Return-Path: <{desk.verp}>\n".encode() + desk.ack_bytes()
    address = desk.verp if to == "verp" else to

    result = desk.inst.ingest(qmail_ndr(returned, to=address))

    assert result.outcome == "bounce"
    assert f"matched by {matched_by}" in result.reason
    assert "failed 5.1.1" in result.reason
    article = desk.ack_article()
    assert article.delivery == "failed" and "User unknown" in article.delivery_error
    assert_one_failure_notice(desk, "5.1.1")
    assert desk.tickets() == 1


@pytest.mark.parametrize("attached", [True, False], ids=["attached", "quoted-headers"])
def test_exchange_notice_is_a_bounce_of_our_ack(desk: Desk, attached: bool) -> None:
    # No null sender recorded (fetched over IMAP): Exchange's system mailbox is the robot.
    to = desk.verp if attached else "support@example.com"
    ndr = exchange_ndr(desk.ack_bytes(), str(desk.ack["Subject"]), to=to, attached=attached)

    result = desk.inst.ingest(ndr, Envelope(source="imap"))

    assert result.outcome == "bounce"
    assert "failed 5.1.1" in result.reason
    assert desk.ack_article().delivery == "failed"
    assert_one_failure_notice(desk, "RESOLVER.ADR.RecipNotFound")
    assert desk.tickets() == 1
    assert desk.customer_articles() == 1


# Exchange writes the whole notice in its user's language, the server's words aside.
@pytest.mark.parametrize(
    ("prefix", "first_line", "headers_title"),
    [
        ("Non recapitabile", "Recapito non riuscito per i destinatari o i gruppi seguenti:",
         "Intestazioni del messaggio originale:"),
        ("Onbestelbaar", "Bezorging is mislukt voor deze ontvangers of groepen:",
         "Oorspronkelijke berichtkoppen:"),
        ("Não é possível entregar", "A entrega falhou para estes destinatários ou grupos:",
         "Cabeçalhos da mensagem original:"),
    ],
)  # fmt: skip
def test_exchange_notice_in_another_language_is_a_bounce_of_our_ack(
    desk: Desk, prefix: str, first_line: str, headers_title: str
) -> None:
    text = first_line + "\n\nalice@acme.example\n\n550 5.1.1 RESOLVER.ADR.RecipNotFound\n\n"
    ndr = exchange_ndr(desk.ack_bytes(), str(desk.ack["Subject"]), to="support@example.com",
                       attached=False, prefix=prefix, text=text,
                       headers_title=headers_title)  # fmt: skip

    result = desk.inst.ingest(ndr, Envelope(source="imap"))

    assert result.outcome == "bounce"
    assert desk.ack_article().delivery == "failed"
    assert_one_failure_notice(desk, "5.1.1")  # and nothing to Exchange's system mailbox
    assert desk.tickets() == 1


def james_ndr(desk: Desk, *, to: str) -> bytes:
    """Apache James' notice (as a carrier's gateway sends it): no report, no copy of the
    mail, just the server's reply and the mail's details, answering the mail it returns."""
    ndr = MIMEText(
        "Error: Invalid user address\n\n"
        "Error message below:\n"
        "550 - Requested action not taken: no such user here\n\n"
        "Message details:\n"
        f"  Subject: {desk.ack['Subject']}\n"
        f"  MAIL FROM: {desk.verp}\n"
        "  RCPT TO: alice@acme.example\n"
        "  From: support@example.com\n"
        "  Size (in bytes): 1939\n"
    )
    ndr["From"] = "post_master@mx.acme.example"
    ndr["To"] = to
    ndr["Subject"] = f"Re:{desk.ack['Subject']}"
    ndr["Date"] = DATE
    ndr["Message-ID"] = "<00000000.000000.1.JavaMail.c@mx.acme.example>"
    ndr["In-Reply-To"] = f"<{desk.ack_id}>"
    return ndr.as_bytes()


@pytest.mark.parametrize("delivered", ["smtp", "imap"])
def test_a_notice_that_only_quotes_the_server_s_reply_is_a_bounce_of_our_ack(
    desk: Desk, delivered: str
) -> None:
    # Over SMTP it comes from the null sender to our VERP address; fetched over
    # IMAP, the envelope it lists (MAIL FROM: our VERP address) finds our mail.
    if delivered == "smtp":
        result = desk.inst.ingest(james_ndr(desk, to=desk.verp), from_mta(desk.verp))
    else:
        result = desk.inst.ingest(
            james_ndr(desk, to="support@example.com"), Envelope(source="imap")
        )

    assert result.outcome == "bounce"
    article = desk.ack_article()
    assert article.delivery == "failed"
    assert "for alice@acme.example: 550 - Requested action not taken" in article.delivery_error
    assert_one_failure_notice(desk, "no such user here")
    assert desk.tickets() == 1
    assert desk.customer_articles() == 1


def test_notice_for_mail_we_never_sent_is_quarantined(desk: Desk) -> None:
    stranger = make_mail(
        sender="support@example.com",
        to="nobody@elsewhere.example",
        message_id="never-ours@elsewhere.example",
    ).as_bytes()

    result = desk.inst.ingest(qmail_ndr(stranger, to="support@example.com"))

    assert result.outcome == "quarantined"
    assert result.reason.startswith("unmatched bounce")
    assert result.ticket is None
    assert desk.ack_article().delivery == "sent"
    assert desk.new_mail() == []
    assert desk.tickets() == 1


def mdn(desk: Desk) -> bytes:
    """Alice's client confirms she read the ack (RFC 8098)."""
    receipt = MIMEMultipart("report", report_type="disposition-notification")
    receipt["From"] = "Alice Martin <alice@acme.example>"
    receipt["To"] = "support@example.com"
    receipt["Subject"] = f"Read: {desk.ack['Subject']}"
    receipt["Date"] = DATE
    receipt["Message-ID"] = "<mdn-1@acme.example>"
    receipt["In-Reply-To"] = f"<{desk.ack_id}>"
    receipt["References"] = f"<{desk.ack_id}>"
    receipt.attach(MIMEText("Your message was displayed.\n"))
    fields = MIMEBase("message", "disposition-notification")
    fields.set_payload(
        "Reporting-UA: acme.example; Thunderbird\n"
        "Final-Recipient: rfc822;alice@acme.example\n"
        f"Original-Message-ID: <{desk.ack_id}>\n"
        "Disposition: manual-action/MDN-sent-manually; displayed\n"
    )
    receipt.attach(fields)
    return receipt.as_bytes()


def arf(desk: Desk) -> bytes:
    """The customer's provider reports our ack as abuse (RFC 5965)."""
    report = MIMEMultipart("report", report_type="feedback-report")
    report["From"] = "abuse@acme.example"
    report["To"] = "support@example.com"
    report["Subject"] = f"FW: {desk.ack['Subject']}"
    report["Date"] = DATE
    report["Message-ID"] = "<arf-1@acme.example>"
    report.attach(MIMEText("This is an email abuse report.\n"))
    fields = MIMEBase("message", "feedback-report")
    fields.set_payload("Feedback-Type: abuse\nUser-Agent: AcmeFBL/1.0\nVersion: 1\n")
    report.attach(fields)
    report.attach(MIMEMessage(_compat(desk.ack_bytes())))
    return report.as_bytes()


@pytest.mark.parametrize("kind", ["mdn", "arf"])
def test_read_receipt_and_abuse_report_are_ignored(desk: Desk, kind: str) -> None:
    # From an admin and answering our ack: a person's mail would thread.
    report = mdn(desk) if kind == "mdn" else arf(desk)

    result = desk.inst.ingest(report)

    assert result.outcome == "ignored"
    assert ("read receipt" if kind == "mdn" else "abuse report") in result.reason
    assert desk.new_mail() == []
    assert desk.tickets() == 1
    assert desk.customer_articles() == 1
    assert desk.ack_article().delivery == "sent"


def text_receipt(desk: Desk, prefix: str, body: str) -> bytes:
    """Outlook's read receipt as plain text: no report, only its subject and wording."""
    receipt = MIMEText(
        f"{body[0]}\n\n    To: support@example.com\n    Subject: {desk.ack['Subject']}\n"
        f"    Sent: 23/11/2026 09:31\n\n{body[1]}\n"
    )
    receipt["From"] = "Alice Martin <alice@acme.example>"
    receipt["To"] = "support@example.com"
    receipt["Subject"] = f"{prefix}: {desk.ack['Subject']}"
    receipt["Date"] = DATE
    receipt["Message-ID"] = "<receipt-1@acme.example>"
    receipt["In-Reply-To"] = f"<{desk.ack_id}>"
    return receipt.as_bytes()


@pytest.mark.parametrize(
    ("prefix", "body"),
    [
        ("Read", ("Your message", "was read on 23/11/2026 10:02.")),
        ("Lu", ("Votre message", "a été lu le 23/11/2026 10:02.")),
        ("Leído", ("Su mensaje", "ha sido leído el 23/11/2026 10:02.")),
        ("Gelesen", ("Ihre Nachricht", "wurde am 23.11.2026 10:02 gelesen.")),
        ("Not read", ("Your message", "was deleted without being read on 23/11/2026 10:02.")),
    ],
)
def test_a_plain_text_read_receipt_is_ignored(
    desk: Desk, prefix: str, body: tuple[str, str]
) -> None:
    # Threaded, it would be Alice's answer: staff told, the SLA clock stopped.
    result = desk.inst.ingest(text_receipt(desk, prefix, body))

    assert result.outcome == "ignored"
    assert "read receipt" in result.reason
    assert desk.new_mail() == []
    assert desk.customer_articles() == 1


def test_a_person_s_answer_whose_subject_starts_with_read_still_threads(desk: Desk) -> None:
    answer = text_receipt(desk, "Read", ("I have read your answer", "It works since 10:02."))

    result = desk.inst.ingest(answer)

    assert (result.outcome, result.ticket) == ("threaded", "SUP-2026-000001")
    assert desk.customer_articles() == 2


# --- the ticket tag inside a bounce -----------------------------------------------


@pytest.mark.parametrize("shape", ["matched-dsn", "unmatched-ndr", "no-evidence"])
def test_bounce_quoting_a_ticket_tag_never_adds_a_customer_article(desk: Desk, shape: str) -> None:
    # MAILER-DAEMON of the customer's own domain, the tag in every subject it quotes.
    if shape == "matched-dsn":
        report, expected = dsn(desk.ack_bytes(), to=desk.verp), "bounce"
    elif shape == "unmatched-ndr":
        forwarded = make_mail(
            sender="support@example.com",
            subject=f"Re: {TAG} Cannot log in",
            message_id="lost@example.com",
        ).as_bytes()
        report, expected = qmail_ndr(forwarded, to="support@example.com"), "quarantined"
    else:  # a robot with nothing of a failure notice: never a person's mail either
        robot = make_mail(
            sender="MAILER-DAEMON@acme.example",
            subject=f"Re: {TAG} Cannot log in",
            message_id="robot@acme.example",
        )
        report, expected = robot.as_bytes(), "ignored"
    report = report.replace(b"MAILER-DAEMON@mx.acme.example", b"MAILER-DAEMON@acme.example")

    result = desk.inst.ingest(report)

    assert result.outcome == expected
    assert desk.customer_articles() == 1
    assert desk.tickets() == 1
    with desk.inst.session() as s:
        ticket = s.scalar(select(Ticket))
        assert ticket is not None and ticket.status == "new"
    sent = desk.new_mail()
    assert all(m["To"] == STAFF for m in sent)  # at most the failure notice, never to a customer
    assert len(sent) == (1 if shape == "matched-dsn" else 0)


# --- hostile bounces --------------------------------------------------------------


def test_hostile_fields_are_cleaned_and_never_raise(desk: Desk) -> None:
    report = dsn(
        desk.ack_bytes(),
        to=desk.verp,
        status="5.1.1\x00<script>",
        diagnostic="smtp; 550 5.1.1 " + "A" * 50_000,
        envid="+0D+0ABcc:+20victim@evil.example",  # xtext for CR LF "Bcc: victim@…"
    )
    # 8-bit junk and a header-injection attempt in the per-recipient fields
    report = report.replace(
        b"Final-Recipient: rfc822; alice@acme.example",
        b"Final-Recipient: rfc822; \xff\xfe<alice@acme.example>\r\n\tBcc: victim@evil.example",
    )

    result = desk.inst.ingest(report, from_mta(desk.verp))

    assert result.outcome == "bounce"
    error = desk.ack_article().delivery_error
    assert "\r" not in error and "\n" not in error and "\x00" not in error
    assert len(error) < 1000
    notice = desk.new_mail()
    assert [m["To"] for m in notice] == [STAFF]
    assert notice[0]["Bcc"] is None


def test_base64_returned_message_still_gives_its_message_id(desk: Desk) -> None:
    # message/rfc822 may not be base64 (RFC 2046 §5.2.1); some gateways do it anyway.
    report = _compat(dsn(desk.ack_bytes(), to="support@example.com"))
    returned = report.get_payload()[2]
    encoded = MIMEBase("message", "rfc822")
    encoded.set_payload(desk.ack_bytes())
    email.encoders.encode_base64(encoded)
    report.get_payload()[2] = encoded
    assert returned.get_content_type() == "message/rfc822"

    result = desk.inst.ingest(report.as_bytes())

    assert result.outcome == "bounce"
    assert "matched by returned Message-ID" in result.reason


def test_mangled_bounces_never_raise(desk: Desk) -> None:
    """Random byte damage to real reports: parse, screen and read_bounce always answer."""
    app = desk.inst.app
    ctx = ScreenContext(app.signer, app.settings.support_address, Envelope())
    seeds = [
        dsn(desk.ack_bytes(), to=desk.verp),
        dsn(desk.ack_bytes(), to=desk.verp, returned_as="text/rfc822-headers", envid="x+2By"),
        qmail_ndr(desk.ack_bytes(), to=desk.verp),
        exchange_ndr(desk.ack_bytes(), "Undeliverable", to=desk.verp, attached=True),
    ]
    rng = random.Random(7)
    read = 0
    for _ in range(300):
        data = bytearray(rng.choice(seeds))
        for _ in range(rng.randint(1, 40)):
            at = rng.randrange(len(data))
            data[at : at + rng.randint(0, 8)] = rng.randbytes(rng.randint(0, 8))
        try:
            msg = parse_message(bytes(data), app.parse_limits)
        except ParseError:
            continue
        screening = screen(msg, ctx)
        if screening.bounce is not None:
            info = read_bounce(
                bytes(data),
                screening.bounce,
                msg,
                signer=app.signer,
                support_address=app.settings.support_address,
            )
            assert info.action in ("failed", "delayed", "delivered")
            read += 1
    assert read > 100  # most mangled reports are still read as bounces


@pytest.mark.parametrize("line", ["-" * 200_000, " -" * 100_000, "-" * 100_000 + " original"])
def test_a_forged_notice_built_to_backtrack_is_decided_in_time(desk: Desk, line: str) -> None:
    """Anyone can send a "bounce": a 200,000-character line of dashes where the copy
    marker is looked for took minutes (two quantifiers sharing the dashes)."""
    notice = qmail_ndr(desk.ack_bytes(), to=desk.verp).replace(
        b"--- Below this line", line.encode() + b"\n--- Below this line"
    )
    started = time.monotonic()
    result = desk.inst.ingest(notice)
    assert time.monotonic() - started < 2  # checklist 28's budget for hostile mail
    assert result.outcome == "bounce" and desk.ack_article().delivery == "failed"
