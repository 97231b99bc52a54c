"""The pipeline end to end, as a customer and an operator see it:
the ticket that exists, the article on it, the mail that went out.
"""

from __future__ import annotations

import json
import re
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from sqlalchemy import func, select

from mailgate.pipeline.message import Envelope
from mailgate.store.models import Article, AttachmentRow, IngestRecord, OutboxMail, Ticket
from tests.conftest import ROOT, Clockwork, Installation, make_mail, reply_to, staff_answer


def count(inst: Installation, model: type) -> int:
    with inst.session() as s:
        return s.scalar(select(func.count()).select_from(model)) or 0


def ticket(inst: Installation, number: str) -> Ticket:
    with inst.session() as s:
        t = s.scalar(select(Ticket).where(Ticket.number == number))
        assert t is not None
        t.articles  # noqa: B018 - load while the session is open
        return t


def test_admin_mail_creates_ticket_and_ack_in_org_language(inst: Installation) -> None:
    result = inst.ingest(make_mail(subject="Portail inaccessible"))

    assert result.outcome == "created"
    assert result.ticket == "SUP-2026-000001"
    acks = [m for m in inst.sent() if m["To"] == "alice@acme.example"]
    assert len(acks) == 1
    ack = acks[0]
    assert "[SUP-2026-000001]" in ack["Subject"]
    assert ack["In-Reply-To"] == "<req-1@acme.example>"
    assert ack["Auto-Submitted"] == "auto-replied"
    assert ack["Precedence"] == "bulk"
    assert ack["X-Auto-Response-Suppress"] == "All"
    assert ack["Message-ID"].endswith("@example.com>")
    assert re.fullmatch(r"support\+t\d+-[0-9a-f]+@example\.com", ack["Reply-To"])
    assert ack["X-Mailgate-Loop"]
    # ACME's language is French
    body = ack.get_body(("plain",)).get_content()
    assert "SUP-2026-000001" in body and "Bonjour" in body
    assert ack.get_body(("html",)) is not None


def test_every_sent_mail_is_stamped_against_loops(inst: Installation) -> None:
    inst.ingest(make_mail())  # ack + staff notice
    inst.ingest(make_mail(sender="mallory@evil.example", message_id="x@evil.example"))
    sent = inst.sent()
    assert {m["To"] for m in sent} == {
        "alice@acme.example",
        "bob@support.example",
        "mallory@evil.example",
    }
    for mail in sent:
        assert mail["Auto-Submitted"] in ("auto-replied", "auto-generated")
        assert mail["Precedence"] == "bulk"
        assert mail["X-Auto-Response-Suppress"] == "All"
        assert re.fullmatch(r"<mg\.[^@>]+@example\.com>", mail["Message-ID"])
        assert mail["X-Mailgate-Loop"].startswith("mailgate; ")
        # the envelope sender is our signed VERP address, so bounces come back to us
        assert re.fullmatch(r"<support\+b[0-9a-f]+-[0-9a-f]+@example\.com>", mail["Return-Path"])
    # each mail has its own VERP address
    assert len({m["Return-Path"] for m in sent}) == len(sent)


def test_staff_get_a_new_ticket_notice(inst: Installation) -> None:
    inst.ingest(make_mail())
    notices = [m for m in inst.sent() if m["To"] == "bob@support.example"]
    assert len(notices) == 1
    assert notices[0]["Auto-Submitted"] == "auto-generated"


def test_tracking_numbers_are_sequential(inst: Installation) -> None:
    numbers = [inst.ingest(make_mail(message_id=f"m{i}@acme.example")).ticket for i in range(3)]
    assert numbers == ["SUP-2026-000001", "SUP-2026-000002", "SUP-2026-000003"]


def test_tracking_numbers_start_again_each_year(inst: Installation, clock: Clockwork) -> None:
    """Sequential per year (README, tickets.number_format): 1 January starts at 1."""
    clock.now = datetime(2026, 12, 31, 23, 59, tzinfo=UTC)
    numbers = [inst.ingest(make_mail(message_id=f"m{i}@acme.example")).ticket for i in range(2)]
    clock.now = datetime(2027, 1, 1, 0, 1, tzinfo=UTC)
    numbers += [inst.ingest(make_mail(message_id=f"n{i}@acme.example")).ticket for i in range(2)]
    assert numbers == ["SUP-2026-000001", "SUP-2026-000002", "SUP-2027-000001", "SUP-2027-000002"]


def test_a_conversation_stays_on_one_ticket(inst: Installation) -> None:
    original = make_mail(message_id="orig@acme.example")
    created = inst.ingest(original)
    ack = next(m for m in inst.sent() if m["To"] == "alice@acme.example")

    # the customer answers our acknowledgement, quoting it
    answer = reply_to(ack, sender="Alice Martin <alice@acme.example>", message_id="a2@acme.example")
    threaded = inst.ingest(answer)
    assert (threaded.outcome, threaded.ticket) == ("threaded", created.ticket)
    assert threaded.matched_by in ("signed-message-id", "reply-token")

    # a CC'd colleague answers the customer's original mail, not ours
    colleague = reply_to(
        original,
        sender="Carol Petit <carol@acme.example>",
        message_id="c3@acme.example",
        to="support@example.com",
    )
    result = inst.ingest(colleague)
    assert (result.outcome, result.ticket, result.matched_by) == (
        "threaded",
        created.ticket,
        "references",
    )

    # a reply with a new subject but a good In-Reply-To
    renamed = reply_to(
        original,
        sender="alice@acme.example",
        message_id="r4@acme.example",
        subject="Something completely different",
        to="support@example.com",
    )
    result = inst.ingest(renamed)
    assert (result.outcome, result.ticket) == ("threaded", created.ticket)

    t = ticket(inst, created.ticket)
    inbound = [a for a in t.articles if a.direction == "in"]
    assert len(inbound) == 4
    assert "carol@acme.example" in t.cc


def test_a_reply_to_a_mail_we_never_saw_threads_by_its_references(inst: Installation) -> None:
    """Alice wrote to Carol alone about her ticket; Carol answers with support in Cc.
    Her In-Reply-To names a mail we never stored; her References still name Alice's
    first mail, and that key threads her answer."""
    original = make_mail(message_id="orig@acme.example")
    created = inst.ingest(original)
    aside = reply_to(original, sender="alice@acme.example", to="carol@acme.example",
                     body="Carol, check it?\n", message_id="aside@acme.example")  # fmt: skip
    carol = reply_to(aside, sender="carol@acme.example", to="support@example.com",
                     body="Same here since 9:00.\n", message_id="c5@acme.example")  # fmt: skip
    result = inst.ingest(carol)
    assert (result.outcome, result.ticket, result.matched_by) == (
        "threaded", created.ticket, "references"
    )  # fmt: skip


def test_our_message_id_upper_cased_by_the_customer_s_system_still_threads(
    inst: Installation,
) -> None:
    """Some gateways rewrite the Message-IDs a mail answers in capitals. The
    signature check read the nonce as written, so such an answer opened a second
    ticket (found when a mutation audit showed no test covered the case)."""
    created = inst.ingest(make_mail())
    ack = next(m for m in inst.sent() if m["To"] == "alice@acme.example")
    ours = ack["Message-ID"].upper()
    answer = make_mail(subject="new words", message_id="up@acme.example",
                       headers={"In-Reply-To": ours, "References": ours})  # fmt: skip
    result = inst.ingest(answer)
    assert (result.outcome, result.ticket, result.matched_by) == (
        "threaded", created.ticket, "signed-message-id"
    )  # fmt: skip


def test_reply_to_token_alone_threads(inst: Installation) -> None:
    created = inst.ingest(make_mail())
    ack = next(m for m in inst.sent() if m["To"] == "alice@acme.example")
    fresh = make_mail(to=ack["Reply-To"], subject="new words", message_id="x@acme.example")
    result = inst.ingest(fresh)
    assert (result.outcome, result.ticket, result.matched_by) == (
        "threaded",
        created.ticket,
        "reply-token",
    )


def test_subject_tag_threads_only_for_parties(inst: Installation) -> None:
    created = inst.ingest(make_mail())
    tagged = make_mail(subject=f"Re: [{created.ticket}] status?", message_id="t2@acme.example")
    result = inst.ingest(tagged)
    assert (result.outcome, result.matched_by) == ("threaded", "subject-tag")
    # Typed again by hand, in lower case: the same tag.
    typed = make_mail(subject=f"[{created.ticket.lower()}] any news", message_id="t4@acme.example")
    result = inst.ingest(typed)
    assert (result.outcome, result.ticket, result.matched_by) == (
        "threaded", created.ticket, "subject-tag"
    )  # fmt: skip

    # Carol is of the same organisation but not a party of the ticket: the tag
    # alone does not let her in, and as a member she cannot open a ticket.
    carol = make_mail(
        sender="carol@acme.example", subject=f"[{created.ticket}] hi", message_id="t3@acme.example"
    )
    assert inst.ingest(carol).outcome == "rejected"


def test_tag_of_another_organisations_ticket_never_threads(inst: Installation) -> None:
    acme = inst.ingest(make_mail())
    hank = make_mail(
        sender="hank@globex.example",
        subject=f"Re: [{acme.ticket}] me too",
        message_id="h1@globex.example",
    )
    result = inst.ingest(hank)
    assert result.outcome == "created"
    assert result.ticket != acme.ticket
    assert "another organisation" in result.reason
    assert len([a for a in ticket(inst, acme.ticket).articles if a.direction == "in"]) == 1


def test_references_to_another_organisations_ticket_never_thread(inst: Installation) -> None:
    original = make_mail(message_id="secret@acme.example")
    acme = inst.ingest(original)
    intruder = reply_to(
        original,
        sender="hank@globex.example",
        message_id="h2@globex.example",
        to="support@example.com",
    )
    result = inst.ingest(intruder)
    assert result.outcome == "created" and result.ticket != acme.ticket


def test_forged_token_is_refused(inst: Installation) -> None:
    acme = inst.ingest(make_mail())
    t = ticket(inst, acme.ticket)
    forged_mid = f"mg.{t.id}.0123456789abcdef.0000000000000000@example.com"
    forged = make_mail(
        sender="hank@globex.example",
        to=f"support+t{t.id}-deadbeefdeadbeef@example.com",
        message_id="f1@globex.example",
        headers={"In-Reply-To": f"<{forged_mid}>"},
    )
    result = inst.ingest(forged)
    assert result.outcome == "created"
    assert result.ticket != acme.ticket
    assert result.matched_by is None


@pytest.mark.parametrize("forged_key", ["reply-token", "signed-message-id"])
def test_forged_key_of_a_ticket_in_ones_own_organisation_does_not_thread(
    inst: Installation, forged_key: str
) -> None:
    """Carol, a member of ACME but no party of Alice's ticket, cannot guess her way onto
    it: the id in a key counts only with our signature (a subject tag needs a party)."""
    acme = inst.ingest(make_mail())
    t = ticket(inst, acme.ticket)
    if forged_key == "reply-token":
        to, headers = f"support+t{t.id}-deadbeefdeadbeef@example.com", {}
    else:
        forged_mid = f"mg.{t.id}.0123456789abcdef.0000000000000000@example.com"
        to, headers = "support@example.com", {"In-Reply-To": f"<{forged_mid}>"}
    guess = make_mail(sender="carol@acme.example", to=to, message_id="c1@acme.example",
                      headers=headers)  # fmt: skip
    result = inst.ingest(guess)
    assert (result.outcome, result.ticket, result.matched_by) == ("rejected", None, None)
    assert len(ticket(inst, acme.ticket).articles) == 3  # Alice's mail, the ack, the notice


def test_a_reply_token_cut_short_does_not_thread(inst: Installation) -> None:
    """Only the whole signature counts: a prefix of it (one hex digit is a 1-in-16
    guess) does not let Carol, no party of Alice's ticket, onto it."""
    acme = inst.ingest(make_mail())
    ack = next(m for m in inst.sent() if m["To"] == "alice@acme.example")
    token = str(ack["Reply-To"])
    assert re.fullmatch(r"support\+t\d+-[0-9a-f]{16}@example\.com", token)
    local, _, domain = token.partition("@")
    for cut in (1, 8, 15):
        short = f"{local[: len(local) - 16 + cut]}@{domain}"
        guess = make_mail(sender="carol@acme.example", to=short, message_id=f"c{cut}@acme.example")
        result = inst.ingest(guess)
        assert (result.outcome, result.ticket, result.matched_by) == ("rejected", None, None)
    assert len([a for a in ticket(inst, acme.ticket).articles if a.direction == "in"]) == 1


def test_a_signed_message_id_edited_to_name_another_ticket_does_not_thread(
    inst: Installation,
) -> None:
    """The signature covers the ticket number: Carol, refused once, edits the
    Message-ID of the refusal she received (ticket 0) to name Alice's ticket."""
    acme = inst.ingest(make_mail())
    t = ticket(inst, acme.ticket)
    inst.ingest(make_mail(sender="carol@acme.example", message_id="c0@acme.example"))
    refusal = next(m for m in inst.sent() if m["To"] == "carol@acme.example")
    mid = str(refusal["Message-ID"]).strip("<>")
    assert re.fullmatch(r"mg\.0\.[0-9a-f]+\.[0-9a-f]{16}@example\.com", mid)
    edited = mid.replace("mg.0.", f"mg.{t.id}.", 1)
    guess = make_mail(sender="carol@acme.example", message_id="c1@acme.example",
                      subject="Re: news", headers={"In-Reply-To": f"<{edited}>"})  # fmt: skip
    result = inst.ingest(guess)
    assert (result.outcome, result.ticket, result.matched_by) == ("rejected", None, None)
    assert len([a for a in ticket(inst, acme.ticket).articles if a.direction == "in"]) == 1


def test_duplicate_delivery_gives_one_article_and_one_ack(inst: Installation) -> None:
    mail = make_mail()
    first = inst.ingest(mail)
    again = inst.ingest(mail)
    # the same mail via another route: other trace headers, same body
    mail["Received"] = "from relay.example by mx.example; Mon, 23 Nov 2026 09:16:00 +0100"
    third = inst.ingest(mail)
    assert first.outcome == "created"
    assert (again.outcome, again.ticket) == ("duplicate", first.ticket)
    assert third.outcome == "duplicate"
    assert count(inst, Article) == 3  # 1 inbound + ack + staff notice
    assert len([m for m in inst.sent() if m["To"] == "alice@acme.example"]) == 1
    assert count(inst, IngestRecord) == 3


def test_same_message_id_with_another_body_is_kept(inst: Installation, caplog) -> None:
    first = inst.ingest(make_mail(body="first body\n"))
    second = inst.ingest(make_mail(body="a different body\n"))
    assert (first.outcome, second.outcome) == ("created", "created")
    assert "Message-ID collision" in second.reason
    assert "Message-ID collision" in caplog.text
    with inst.session() as s:  # both stored, each with its own body
        texts = s.scalars(select(Article.text).where(Article.direction == "in")).all()
    assert sorted(t.strip() for t in texts) == ["a different body", "first body"]
    assert count(inst, Ticket) == 2


def test_one_mail_to_two_of_our_addresses_is_one_ticket(inst: Installation) -> None:
    mail = make_mail(to="support@example.com, sales@example.com")
    inst.ingest(mail, Envelope(source="smtp", rcpt_to=("support@example.com",)))
    second = inst.ingest(mail, Envelope(source="smtp", rcpt_to=("sales@example.com",)))
    assert second.outcome == "duplicate"
    assert count(inst, Ticket) == 1


def test_no_message_id_fetched_three_times_is_one_ticket(inst: Installation) -> None:
    mail = make_mail(message_id=None)
    results = [inst.ingest(mail).outcome for _ in range(3)]
    # ...and a copy that came by another route: other trace headers, the same mail
    mail["Received"] = "from relay.example by mx.example; Mon, 23 Nov 2026 09:16:00 +0100"
    results.append(inst.ingest(mail).outcome)
    assert results == ["created", "duplicate", "duplicate", "duplicate"]
    assert count(inst, Ticket) == 1


def test_two_different_mails_with_nothing_to_tell_them_apart_are_both_held(
    inst: Installation,
) -> None:
    """No headers, no blank line: nothing but the bytes themselves says which is which."""
    first = inst.ingest(b"garbage line one\nmore garbage")
    second = inst.ingest(b"other junk\nline two")
    again = inst.ingest(b"other junk\nline two")
    outcomes = [r.outcome for r in (first, second, again)]
    assert outcomes == ["quarantined", "quarantined", "duplicate"]
    # A mail of headers only still has its Message-ID: by another route, the same.
    headers_only = (
        b"From: alice@acme.example\nSubject: Export broken\nMessage-ID: <h@acme.example>\n"
    )
    assert inst.ingest(headers_only).outcome == "created"
    relayed = b"Received: from relay.example by mx.example\n" + headers_only
    assert inst.ingest(relayed).outcome == "duplicate"


@pytest.mark.parametrize(
    ("sender", "reason"),
    [
        ("mallory@evil.example", "not in the directory"),
        ("carol@acme.example", "not an authorised admin"),
    ],
)
def test_unauthorised_senders_are_rejected_once_a_day(
    inst: Installation, clock, sender: str, reason: str
) -> None:
    for i in range(3):
        result = inst.ingest(make_mail(sender=sender, message_id=f"r{i}@x.example"))
        assert result.outcome == "rejected" and reason in result.reason
    sent = [m for m in inst.sent() if m["To"] == sender]
    assert len(sent) == 1
    assert sent[0]["Auto-Submitted"] == "auto-replied"
    clock.now += timedelta(hours=25)
    inst.ingest(make_mail(sender=sender, message_id="later@x.example"))
    assert len([m for m in inst.sent() if m["To"] == sender]) == 2
    assert count(inst, Ticket) == 0


def test_a_rejection_repeats_no_display_name(inst: Installation) -> None:
    """A stranger's display name is their text, sent to whatever address they forged."""
    lure = "Your account is suspended - verify now at www.evil.example/verify"
    inst.ingest(make_mail(sender=f'"{lure}" <victim@third.example>', message_id="p@x.example"))
    inst.ingest(make_mail(sender='"Boss" <carol@acme.example>', message_id="c@x.example"))
    victim, carol = (
        next(m for m in inst.sent() if m["To"] == to).get_body(("plain",)).get_content()
        for to in ("victim@third.example", "carol@acme.example")
    )
    assert "evil" not in victim and victim.startswith("Hello,")
    assert carol.startswith("Bonjour Carol Petit,")  # a contact: the directory's name


def test_expired_contract_is_rejected(install) -> None:
    inst = install(
        directory={
            "organisations": [
                {
                    "id": "old",
                    "name": "Old Co",
                    "contract_until": "2025-12-31",
                    "contacts": [{"email": "alice@acme.example", "role": "admin"}],
                }
            ]
        }
    )
    result = inst.ingest(make_mail())
    assert result.outcome == "rejected" and "no active contract" in result.reason


def test_display_name_is_never_trusted(inst: Installation) -> None:
    spoof = make_mail(sender='"alice@acme.example" <mallory@evil.example>')
    result = inst.ingest(spoof)
    assert result.outcome in ("rejected", "quarantined")
    assert count(inst, Ticket) == 0


def test_sender_matched_case_insensitively(inst: Installation) -> None:
    assert inst.ingest(make_mail(sender="Alice <ALICE@Acme.Example>")).outcome == "created"


AUTOMATED = [
    {"Auto-Submitted": "auto-replied"},
    {"Auto-Submitted": "auto-generated"},
    {"Precedence": "bulk"},
    {"Precedence": "list"},
    {"Precedence": "junk"},
    {"List-Id": "<users.lists.example>"},
    {"List-Unsubscribe": "<mailto:leave@lists.example>"},
    {"X-Autoreply": "yes"},
    {"X-Autorespond": "yes"},
    {"Return-Path": "<>"},
]


@pytest.mark.parametrize(
    "headers", AUTOMATED, ids=lambda h: next(iter(h.items()))[0] + ":" + next(iter(h.values()))
)
def test_automated_mail_is_ignored_and_never_answered(inst: Installation, headers) -> None:
    result = inst.ingest(make_mail(headers=headers))
    assert result.outcome == "ignored"
    assert count(inst, Ticket) == 0
    assert count(inst, OutboxMail) == 0


@pytest.mark.parametrize(
    "sender",
    [
        "MAILER-DAEMON@mx.example",
        "postmaster@acme.example",
        "owner-users@lists.example",
        "users-request@lists.example",
        # A notice in a language no NDR pattern knows: no rejection to Exchange.
        "MicrosoftExchange329e71ec88ae4615bbc36ab6ce41109e@acme.example",
    ],
)
def test_robot_senders_are_ignored(inst: Installation, sender: str) -> None:
    result = inst.ingest(make_mail(sender=sender))
    assert result.outcome == "ignored"
    assert count(inst, OutboxMail) == 0


def test_null_envelope_sender_is_ignored(inst: Installation) -> None:
    result = inst.ingest(make_mail(), Envelope(source="smtp", mail_from=""))
    assert result.outcome == "ignored"
    assert count(inst, OutboxMail) == 0


def test_automated_reply_on_open_ticket_adds_nothing(inst: Installation) -> None:
    created = inst.ingest(make_mail())
    ack = next(m for m in inst.sent() if m["To"] == "alice@acme.example")
    ooo = reply_to(ack, sender="alice@acme.example", message_id="ooo@acme.example")
    ooo["Auto-Submitted"] = "auto-replied"
    assert inst.ingest(ooo).outcome == "ignored"
    assert len(ticket(inst, created.ticket).articles) == 3


# Each token alone, then in a list as Exchange writes it (MS-OXCMAIL 2.1.3.2.20).
@pytest.mark.parametrize("value", ["All", "OOF", "AutoReply", "DR, NDR, OOF"])
def test_auto_response_suppress_only_suppresses_the_ack(inst: Installation, value: str) -> None:
    result = inst.ingest(make_mail(headers={"X-Auto-Response-Suppress": value}))
    assert result.outcome == "created"
    assert [m for m in inst.sent() if m["To"] == "alice@acme.example"] == []


# Outlook's automatic replies in its users' languages, when a rule strips every header.
@pytest.mark.parametrize(
    "prefix",
    ["Automatic reply", "Automatische Antwort", "Automatisch antwoord", "Risposta automatica",
     "Resposta automática", "Automatiskt svar", "Automatyczna odpowiedź", "Réponse automatique",
     "Out of Office AutoReply", "Abwesenheitsnotiz", "Absence du bureau", "AutoReply"],
)  # fmt: skip
def test_an_autoreply_known_only_by_its_subject_gets_no_ack(
    inst: Installation, prefix: str
) -> None:
    result = inst.ingest(make_mail(subject=f"{prefix}: Cannot log in"))
    assert result.outcome == "created"
    assert "subject looks like an automatic reply" in result.reason
    alone = inst.ingest(make_mail(subject=prefix, message_id="alone@acme.example"))
    assert "subject looks like an automatic reply" in alone.reason
    assert [m for m in inst.sent() if m["To"] == "alice@acme.example"] == []


@pytest.mark.parametrize(
    "subject", ["Absence requests fail since the update", "Automatic replies to our customers",
                "Out of office hours support"],
)  # fmt: skip
def test_a_person_s_subject_that_starts_like_an_autoreply_still_gets_an_ack(
    inst: Installation, subject: str
) -> None:
    result = inst.ingest(make_mail(subject=subject))
    assert result.outcome == "created" and "automatic reply" not in result.reason
    assert [m["To"] for m in inst.sent() if m["To"] == "alice@acme.example"] != []


def test_our_own_ack_fed_back_is_ignored(inst: Installation) -> None:
    inst.ingest(make_mail())
    ack = next(m for m in inst.sent() if m["To"] == "alice@acme.example")
    del ack["Auto-Submitted"], ack["Precedence"]  # even stripped of its RFC 3834 headers
    result = inst.ingest(ack)
    assert result.outcome == "ignored"
    assert "own-message-id" in result.reason


@pytest.mark.parametrize(
    "signature", ["0123456789abcdef", "é", ""], ids=["hex", "non-ascii", "empty"]
)
def test_forged_loop_marker_still_creates_a_ticket(inst: Installation, signature: str) -> None:
    # A non-ASCII signature once made the HMAC comparison raise: 451 forever.
    forged = make_mail(headers={"X-Mailgate-Loop": f"mailgate; {signature}"})
    result = inst.ingest(forged)
    assert result.outcome == "created"
    assert [m for m in inst.sent() if m["To"] == "alice@acme.example"] == []  # no ack, though


def test_a_message_id_shaped_like_ours_without_our_hmac_is_a_persons_mail(
    inst: Installation,
) -> None:
    """Checklist 6 for the Message-ID: only our signature makes it ours, not its shape."""
    forged = make_mail(message_id="mg.1.0123456789abcdef.0000000000000000@example.com")
    result = inst.ingest(forged)
    assert result.outcome == "created"
    assert len([m for m in inst.sent() if m["To"] == "alice@acme.example"]) == 1


def test_a_file_starting_with_a_byte_order_mark_keeps_its_headers(inst: Installation) -> None:
    result = inst.ingest(b"\xef\xbb\xbf" + make_mail().as_bytes())
    assert (result.outcome, result.sender) == ("created", "alice@acme.example")


def test_mail_from_our_own_address_is_ignored(inst: Installation) -> None:
    result = inst.ingest(make_mail(sender="Support <support@example.com>"))
    assert result.outcome == "ignored"


# The same address twice is no clearer: RFC 5322 allows one From of one mailbox here.
@pytest.mark.parametrize("other", [b"mallory@evil.example", b"alice@acme.example"])
def test_two_from_headers_are_quarantined(inst: Installation, other: bytes) -> None:
    raw = make_mail().as_bytes().replace(b"From: ", b"From: " + other + b"\nFrom: ", 1)
    result = inst.ingest(raw)
    assert result.outcome == "quarantined" and "ambiguous sender" in result.reason
    assert count(inst, OutboxMail) == 0
    assert held_sender(inst) is None  # `mailgate quarantine list` names no sender


def held_sender(inst: Installation) -> str | None:
    with inst.session() as s:
        return s.scalars(select(IngestRecord.sender)).one()


@pytest.mark.parametrize("other", ["mallory@evil.example", "alice@acme.example"])
def test_two_addresses_in_from_are_quarantined(inst: Installation, other: str) -> None:
    result = inst.ingest(make_mail(sender=f"alice@acme.example, {other}"))
    assert result.outcome == "quarantined" and "ambiguous sender" in result.reason
    assert held_sender(inst) is None  # not the first of the two


def test_unparseable_mail_is_quarantined_and_kept(inst: Installation) -> None:
    raw = b"Content-Type: multipart/mixed; boundary=x\n\n" + (
        b"--x\nContent-Type: multipart/mixed; boundary=x\n\n" * 2000
    )
    result = inst.ingest(raw)
    assert result.outcome == "quarantined"
    with inst.session() as s:
        record = s.scalar(select(IngestRecord))
        assert inst.app.blobs.get(record.raw_sha256) == raw


@pytest.mark.parametrize("raw", [b"", b"\r\n", b"just a line of text\n", b"\n\nbody only\n"])
def test_mail_with_no_header_field_is_quarantined_and_kept(inst: Installation, raw: bytes) -> None:
    """An empty pipe or a text file fed to `mailgate ingest` is bad mail, not a crash."""
    result = inst.ingest(raw)
    assert result.outcome == "quarantined" and result.ticket is None
    with inst.session() as s:
        record = s.scalar(select(IngestRecord))
        assert inst.app.blobs.get(record.raw_sha256) == raw
    assert inst.sent() == []


def test_crlf_in_subject_and_name_never_reaches_a_header(inst: Installation) -> None:
    mail = make_mail(message_id="inj@acme.example")
    raw = mail.as_bytes()
    raw = raw.replace(
        b"Subject: Cannot log in", b"Subject: =?utf-8?q?a=0D=0ABcc:_victim@evil.example?="
    )
    # In a phrase RFC 2047 allows ":" and "@" only as =3A and =40.
    raw = raw.replace(
        b"From: Alice Martin <", b"From: =?utf-8?q?Alice=0D=0ABcc=3A_x=40evil.example?= <"
    )
    result = inst.ingest(raw)
    assert result.outcome == "created"
    sent = inst.sent()
    assert len(sent) == 2  # the ack and the staff notice
    for mail in sent:
        assert mail["Bcc"] is None
        assert "evil" not in str(mail.get_all("To")) and "\n" not in mail["Subject"]


def test_from_whose_encoded_name_parsers_read_differently_is_quarantined(
    inst: Installation,
) -> None:
    # A raw ":" inside the encoded word makes some readers see a group there.
    raw = (
        make_mail(message_id="inj2@acme.example")
        .as_bytes()
        .replace(b"From: Alice Martin <", b"From: =?utf-8?q?Alice=0D=0ABcc:_x@evil.example?= <")
    )
    result = inst.ingest(raw)
    assert result.outcome == "quarantined" and "ambiguous" in result.reason
    assert inst.sent() == []


def test_long_encoded_subject_is_truncated_and_ack_subject_capped(inst: Installation) -> None:
    word = "=?utf-8?b?" + "w6nDqcOp" * 10 + "?="
    raw = (
        make_mail()
        .as_bytes()
        .replace(b"Subject: Cannot log in", b"Subject: " + " ".join([word] * 4000).encode())
    )
    assert len(raw) > 300_000
    result = inst.ingest(raw)
    assert result.outcome == "created"
    t = ticket(inst, result.ticket)
    assert 0 < len(t.subject) <= 998
    ack = next(m for m in inst.sent() if m["To"] == "alice@acme.example")
    assert len(str(ack["Subject"])) <= 200


def test_unsafe_directory_address_is_refused_before_smtp(inst: Installation) -> None:
    from mailgate.outbound.compose import check_envelope_address

    for bad in ("alice@acme.example\r\nRCPT TO:<x@evil.example>", "a\nb@x.example", "a b@x"):
        with pytest.raises(ValueError):
            check_envelope_address(bad)


def test_attachments_are_stored_by_hash_with_safe_names(inst: Installation) -> None:
    mail = make_mail()
    mail.add_attachment(
        b"root:x:0:0", maintype="text", subtype="plain", filename="../../etc/passwd"
    )
    mail.add_attachment(
        b"MZ", maintype="application", subtype="octet-stream", filename="..\\..\\win.ini"
    )
    mail.add_attachment(b"x", maintype="application", subtype="octet-stream", filename="CON")
    mail.add_attachment(
        b"y", maintype="application", subtype="octet-stream", filename="a" * 600 + ".pdf"
    )
    result = inst.ingest(mail)
    assert result.outcome == "created"
    with inst.session() as s:
        rows = list(s.scalars(select(AttachmentRow)))
    names = [r.filename for r in rows]
    assert len(rows) == 4
    for name in names:
        assert "/" not in name and "\\" not in name and len(name.encode()) <= 255
        assert name.upper() != "CON"
    assert names[3].endswith(".pdf")
    for row in rows:
        assert inst.app.blobs.size(row.sha256) == row.size
    # nothing was written outside data_dir
    assert not (inst.root / "etc").exists() and not (inst.root.parent / "etc" / "passwd").exists()


def test_crlf_and_nul_in_attachment_names_never_reach_a_header(inst: Installation) -> None:
    mail = make_mail()
    mail.add_attachment(b"a", maintype="application", subtype="pdf", filename="PLACEHOLDER1")
    mail.add_attachment(b"b", maintype="application", subtype="pdf", filename="PLACEHOLDER2")
    raw = mail.as_bytes()
    # RFC 2231 and RFC 2047 encodings of names carrying CR/LF and NUL
    raw = raw.replace(
        b'filename="PLACEHOLDER1"',
        b"filename*=utf-8''report%0D%0ABcc%3A%20victim%40evil.example.pdf",
    )
    raw = raw.replace(b'filename="PLACEHOLDER2"', b'filename="=?utf-8?q?a=00b=0D=0A.pdf?="')
    result = inst.ingest(raw)
    assert result.outcome == "created"
    with inst.session() as s:
        names = [row.filename for row in s.scalars(select(AttachmentRow))]
    assert len(names) == 2
    assert all(not set(name) & {"\r", "\n", "\0"} for name in names)
    notice = next(m for m in inst.sent() if m["To"] == "bob@support.example")
    assert notice["Bcc"] is None and "victim" not in str(notice.items())
    text = notice.get_body(("plain",)).get_content()
    assert "report" in text and "Bcc: victim" not in text.replace("\n", " ")


def test_html_is_sanitised_before_storage(inst: Installation) -> None:
    mail = make_mail()
    mail.add_alternative(
        '<p onclick="x()">Hi<script>alert(1)</script><a href="javascript:x">l</a>'
        '<img src="http://tracker.example/p.gif"></p>',
        subtype="html",
    )
    result = inst.ingest(mail)
    with inst.session() as s:
        article = s.scalar(select(Article).where(Article.direction == "in"))
    html = article.html or ""
    assert result.outcome == "created"
    for bad in ("<script", "onclick", "javascript:", "tracker.example"):
        assert bad not in html


# Latin-1 bytes under labels that say nothing, or the wrong thing (us-ascii, utf-8).
@pytest.mark.parametrize(
    "charset", ["unknown-8bit", "x-unknown", "utf-8", "us-ascii", "iso-8859-1"]
)
def test_unknown_or_lying_charsets_are_stored_as_text(inst: Installation, charset: str) -> None:
    raw = (
        b"From: alice@acme.example\r\nTo: support@example.com\r\nSubject: caf\xe9\r\n"
        b"Message-ID: <cs@acme.example>\r\nContent-Type: text/plain; charset="
        + charset.encode()
        + b"\r\n\r\nCaf\xe9 cr\xe8me \xff \x80 5 \x93quoted\x94\r\n"
    )
    result = inst.ingest(raw)
    assert result.outcome == "created"
    with inst.session() as s:
        article = s.scalar(select(Article).where(Article.direction == "in"))
    assert "Café crème" in article.text  # read as the sender wrote it, not U+FFFD
    # Windows-1252's euro and quotes, which "latin-1" mail carries in practice
    # (ISO 8859-1 proper would make them C1 controls, then nothing).
    assert "€ 5 “quoted”" in article.text


# Labels that understate or say nothing of what the bytes are: the text is still
# what the sender wrote.
@pytest.mark.parametrize(
    ("charset", "body", "expected"),
    [
        # UTF-8 under a us-ascii or latin-1 label, not "CafÃ© crÃ¨me"
        ("us-ascii", "Café crème".encode(), "Café crème"),
        ("iso-8859-1", "Café crème".encode(), "Café crème"),
        # a label that says nothing: UTF-8 is tried before Windows-1252
        ("unknown-8bit", "Grüße, Zoë".encode(), "Grüße, Zoë"),
        # GBK's names past GB 2312 (朱镕基), which gb2312-labelled mail carries
        ("gb2312", "总理朱镕基".encode("gbk"), "总理朱镕基"),
    ],
)
def test_a_charset_label_narrower_than_its_bytes_still_reads_right(
    inst: Installation, charset: str, body: bytes, expected: str
) -> None:
    raw = (
        b"From: alice@acme.example\r\nTo: support@example.com\r\nSubject: label\r\n"
        b"Message-ID: <narrow@acme.example>\r\nContent-Type: text/plain; charset="
        + charset.encode()
        + b"\r\n\r\n"
        + body
        + b"\r\n"
    )
    assert inst.ingest(raw).outcome == "created"
    with inst.session() as s:
        article = s.scalar(select(Article).where(Article.direction == "in"))
    assert expected in article.text


def test_a_raw_utf8_subject_reads_as_utf8_whatever_the_body_charset(inst: Installation) -> None:
    """Clients that write 8-bit headers write UTF-8; the body's charset is only
    the guess for bytes that are not UTF-8."""
    raw = (
        b"From: alice@acme.example\r\nTo: support@example.com\r\n"
        b"Subject: Gr\xc3\xbc\xc3\x9fe aus K\xc3\xb6ln\r\nMessage-ID: <raw8@acme.example>\r\n"
        b"Content-Type: text/plain; charset=iso-8859-1\r\n\r\nGr\xfc\xdfe\r\n"
    )
    result = inst.ingest(raw)
    assert result.outcome == "created"
    assert ticket(inst, result.ticket).subject == "Grüße aus Köln"


def test_a_subject_split_over_encoded_words_reads_whole(inst: Installation) -> None:
    """A long subject comes as several RFC 2047 words on folded lines; the space
    between two words is no part of the text (RFC 2047 6.2), and some mailers
    split a character between them ("é" here)."""
    raw = (
        b"From: alice@acme.example\r\nTo: support@example.com\r\n"
        b"Subject: =?utf-8?b?SW1wcmltYW50ZSBlbiBwYW5uZSwgcsM=?=\r\n"
        b" =?utf-8?b?qXBhcsOpZSA/?=\r\nMessage-ID: <words@acme.example>\r\n\r\nbody\r\n"
    )
    result = inst.ingest(raw)
    assert result.outcome == "created"
    assert ticket(inst, result.ticket).subject == "Imprimante en panne, réparée ?"


def test_a_raw_iso_2022_jp_subject_reads_as_japanese(inst: Installation) -> None:
    """Older Japanese mailers write ISO-2022-JP into headers as it is, unencoded:
    7-bit, so only its escape sequences tell it apart."""
    raw = (
        b"From: alice@acme.example\r\nTo: support@example.com\r\n"
        b"Subject: " + "プリンターが故障".encode("iso2022_jp") + b"\r\n"
        b"Message-ID: <jis@acme.example>\r\n\r\nbody\r\n"
    )
    result = inst.ingest(raw)
    assert result.outcome == "created"
    assert ticket(inst, result.ticket).subject == "プリンターが故障"


# Codecs Python knows that are no mail charset: their label is ignored, the
# bytes read as if unlabelled. Punycode's decoder is quadratic (2 MB: a minute);
# the escape codecs would let a sender write any character in ASCII.
@pytest.mark.parametrize(
    ("charset", "body"),
    [
        ("punycode", b"bcher-kva ok"),
        ("unicode_escape", b"caf\\xe9 ok"),
        ("idna", b"xn--bcher-kva ok"),
    ],
)
def test_a_codec_that_is_no_mail_charset_is_ignored(
    inst: Installation, charset: str, body: bytes
) -> None:
    raw = (
        b"From: alice@acme.example\r\nTo: support@example.com\r\nSubject: codec\r\n"
        b"Message-ID: <codec@acme.example>\r\nContent-Type: text/plain; charset="
        + charset.encode()
        + b"\r\n\r\n"
        + body
    )
    assert inst.ingest(raw).outcome == "created"
    with inst.session() as s:
        article = s.scalar(select(Article).where(Article.direction == "in"))
    assert article.text == body.decode("ascii")


def test_follow_up_to_closed_ticket_opens_a_linked_one(inst: Installation) -> None:
    original = make_mail()
    first = inst.ingest(original)
    with inst.app.sessions.begin() as s:
        s.scalar(select(Ticket)).status = "closed"
    result = inst.ingest(
        reply_to(
            original,
            sender="alice@acme.example",
            message_id="f@acme.example",
            to="support@example.com",
        )
    )
    assert result.outcome == "created" and result.ticket != first.ticket
    assert ticket(inst, result.ticket).follows_ticket_id == ticket(inst, first.ticket).id


def test_reply_to_resolved_ticket_reopens_within_window(inst: Installation, clock) -> None:
    original = make_mail()
    first = inst.ingest(original)
    with inst.app.sessions.begin() as s:
        t = s.scalar(select(Ticket))
        t.status, t.resolved_at = "resolved", clock.now
    clock.now += timedelta(days=3)
    result = inst.ingest(
        reply_to(
            original,
            sender="alice@acme.example",
            message_id="g@acme.example",
            to="support@example.com",
        )
    )
    assert (result.outcome, result.ticket) == ("threaded", first.ticket)
    assert ticket(inst, first.ticket).status == "open"


def test_staff_reply_is_relayed_to_the_customer(inst: Installation) -> None:
    created = inst.ingest(make_mail())
    staff_reply = staff_answer(inst, "Please clear your cache and retry.\n", "b1@support.example")
    result = inst.ingest(staff_reply)
    assert (result.outcome, result.ticket) == ("threaded", created.ticket)
    relayed = [m for m in inst.sent() if m["To"] == "alice@acme.example"]
    assert len(relayed) == 2  # the ack, then the staff reply
    relay = relayed[1]
    assert "clear your cache" in relay.get_body(("plain",)).get_content()
    assert relay["In-Reply-To"] == "<req-1@acme.example>"
    assert relay["From"].addresses[0].addr_spec == "support@example.com"
    assert ticket(inst, created.ticket).status == "open"


def test_explain_writes_nothing(inst: Installation) -> None:
    from mailgate.pipeline.process import process

    raw = make_mail().as_bytes()
    for _ in range(2):
        result = process(inst.app, raw, Envelope(source="explain"), dry_run=True)
        assert (result.outcome, result.ticket) == ("created", "SUP-2026-000001")
    assert count(inst, Ticket) == 0 and count(inst, IngestRecord) == 0
    assert count(inst, OutboxMail) == 0
    # Not even a tracking number: PostgreSQL's nextval is never given back.
    assert inst.ingest(raw).ticket == "SUP-2026-000001"


def test_explain_shows_who_wrote_and_what_the_rules_set(
    inst: Installation, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    request = tmp_path / "request.eml"
    request.write_bytes(make_mail(subject="Cannot log in").as_bytes())
    assert inst.cli("explain", "--json", str(request)) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["identity"] == "alice@acme.example: admin of acme"
    assert shown["rules"]["priority"] == "P1" and "critical login" in shown["rules"]["matched"]
    assert "ingest_id" not in shown  # its record was rolled back
    stranger = tmp_path / "stranger.eml"
    stranger.write_bytes(make_mail(sender="Mallory <mallory@evil.example>").as_bytes())
    assert inst.cli("explain", str(stranger)) == 0
    out = capsys.readouterr().out
    assert re.search(r"^outcome +rejected$", out, re.M), out
    assert "mallory@evil.example: unknown; may not open tickets: sender not in the directory" in out
    assert re.search(r"^rules +-$", out, re.M), out


def test_explain_on_a_staff_answer_names_staff_and_not_a_refusal(
    inst: Installation, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Staff never open tickets; their answer threads. The identity line said
    "may not open tickets: staff mail that answers no ticket" of an answer."""
    number = inst.ingest(make_mail()).ticket
    answer = tmp_path / "answer.eml"
    answer.write_bytes(staff_answer(inst, "On it.\n", "bob-9@support.example").as_bytes())
    capsys.readouterr()
    assert inst.cli("explain", "--json", str(answer)) == 0
    shown = json.loads(capsys.readouterr().out)
    assert (shown["ticket"], shown["identity"]) == (number, "bob@support.example: staff")


def test_explain_on_a_fresh_install_knows_the_directory(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The tour's first step: nothing ingested yet, the directory never synced."""
    from mailgate.cli import main

    for name in ("settings.yaml", "directory.yaml"):
        (tmp_path / name).write_text((ROOT / name).read_text())
    for name in ("templates", "rules"):
        (tmp_path / name).symlink_to(ROOT / name)
    sample = str(ROOT / "samples" / "first-request.eml")
    assert main(["--config", str(tmp_path / "settings.yaml"), "explain", "--json", sample]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert (shown["outcome"], shown["identity"]) == ("created", "alice@acme.example: admin of acme")
