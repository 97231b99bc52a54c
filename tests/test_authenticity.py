"""Sender authenticity: DKIM aligned with From, trusted Authentication-Results, policies.

The tests sign with their own RSA key (made by openssl) and publish it in a
DNS stub: no test queries the real DNS (RELIABILITY.md §3, checklist 9, 10, 12).
"""

from __future__ import annotations

import base64
import smtplib
import subprocess
from collections.abc import Callable, Iterator
from email.message import EmailMessage
from pathlib import Path

import dkim
import pytest
from sqlalchemy import select

from mailgate.pipeline.message import Envelope
from mailgate.store.models import Article, IngestRecord, SlaClock, Ticket
from tests.conftest import Installation, make_mail, smtp_listener, staff_answer

SELECTOR = b"s2026"
REQUIRE_ACME = {"hygiene": {"authentication": {"organisations": {"acme": "require"}}}}


class Keys:
    """One signing key per domain, published in `records` as DNS would."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.private: dict[str, bytes] = {}
        self.records: dict[str, bytes] = {}

    def key(self, name: str) -> bytes:
        if name not in self.private:
            pem = self.root / f"{name}.pem"
            subprocess.run(["openssl", "genrsa", "-out", str(pem), "2048"], check=True,
                           capture_output=True)  # fmt: skip
            der = subprocess.run(
                ["openssl", "rsa", "-in", str(pem), "-pubout", "-outform", "DER"],
                check=True,
                capture_output=True,
            ).stdout
            self.private[name] = pem.read_bytes()
            self.records[name] = b"v=DKIM1; k=rsa; p=" + base64.b64encode(der)
        return self.private[name]

    def publish(self, domain: str, key_name: str | None = None) -> None:
        self.key(key_name or domain)
        self.records[f"{SELECTOR.decode()}._domainkey.{domain}"] = self.records[key_name or domain]

    def dns(self, name: str | bytes, timeout: float = 5) -> bytes | None:
        text = name.decode() if isinstance(name, bytes) else name
        return self.records.get(text.rstrip("."))

    def sign(self, raw: bytes, domain: str, *, key_name: str | None = None,
             length: bool = False) -> bytes:  # fmt: skip
        signature = dkim.sign(
            raw,
            SELECTOR,
            domain.encode(),
            self.key(key_name or domain),
            include_headers=[b"from", b"to", b"subject", b"date", b"message-id"],
            length=length,
        )
        return signature + raw


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> Keys:
    keys = Keys(tmp_path_factory.mktemp("dkim"))
    keys.publish("acme.example")
    keys.publish("mail.acme.example", "acme.example")
    keys.publish("evil.example")
    keys.publish("support.example")
    return keys


def installed(install: Callable[..., Installation], keys: Keys, settings: dict) -> Installation:
    inst = install(settings=settings)
    inst.app.dns = keys.dns
    return inst


def raw_of(msg: EmailMessage) -> bytes:
    return msg.as_bytes().replace(b"\n", b"\r\n")


def tickets(inst: Installation) -> list[Ticket]:
    with inst.session() as session:
        return list(session.scalars(select(Ticket)))


def notices_to(inst: Installation, address: str) -> list[EmailMessage]:
    return [m for m in inst.sent() if address in str(m["To"])]


# -- checklist 9: spoofed admin under `require`; a valid aligned signature ----------------


def test_spoofed_admin_is_quarantined_and_the_real_address_told_once(install, keys) -> None:
    inst = installed(install, keys, REQUIRE_ACME)
    # Signed with a key that is not acme's: the published key does not verify it.
    forged = keys.sign(raw_of(make_mail()), "acme.example", key_name="evil.example")
    result = inst.ingest(forged)
    assert result.outcome == "quarantined"
    assert "unauthenticated sender alice@acme.example" in result.reason
    assert "did not verify" in result.reason
    assert tickets(inst) == []
    (notice,) = notices_to(inst, "alice@acme.example")
    assert notice["Auto-Submitted"] == "auto-generated"
    assert "Un message envoyé en votre nom" in notice["Subject"]  # ACME writes French
    assert "Cannot log in" not in notice.get_body(("plain",)).get_content()  # nothing forged
    # A second forgery the same day: held too, but no second notice.
    unsigned = inst.ingest(make_mail(message_id="forged-2@evil.example"))
    assert unsigned.outcome == "quarantined" and "no DKIM signature" in unsigned.reason
    assert len(notices_to(inst, "alice@acme.example")) == 1


def test_valid_aligned_signature_opens_the_ticket_and_the_verdict_is_stored(install, keys) -> None:
    inst = installed(install, keys, REQUIRE_ACME)
    result = inst.ingest(keys.sign(raw_of(make_mail()), "acme.example"))
    assert result.outcome == "created"
    with inst.session() as session:
        article = session.scalars(select(Article).where(Article.direction == "in")).one()
        assert article.authentication == "pass: dkim=pass d=acme.example"
        assert "unauthenticated-sender" not in session.scalars(select(Ticket)).one().tags


def test_subdomain_signature_is_aligned_unless_dmarc_asks_for_strict(install, keys) -> None:
    inst = installed(install, keys, REQUIRE_ACME)
    relaxed = keys.sign(raw_of(make_mail()), "mail.acme.example", key_name="acme.example")
    assert inst.ingest(relaxed).outcome == "created"
    keys.records["_dmarc.acme.example"] = b"v=DMARC1; p=reject; adkim=s"
    try:
        strict = keys.sign(
            raw_of(make_mail(message_id="req-2@acme.example", subject="Second")),
            "mail.acme.example",
            key_name="acme.example",
        )
        result = inst.ingest(strict)
    finally:
        del keys.records["_dmarc.acme.example"]
    assert result.outcome == "quarantined"
    assert "not aligned" in result.reason


def test_a_valid_signature_of_another_domain_does_not_vouch_for_from(install, keys) -> None:
    inst = installed(install, keys, REQUIRE_ACME)
    result = inst.ingest(keys.sign(raw_of(make_mail()), "evil.example"))
    assert result.outcome == "quarantined"
    assert "d=evil.example not aligned with acme.example" in result.reason


# -- checklist 10: l= lets anyone append text ----------------------------------------------


def test_signature_with_body_length_and_appended_text_is_unauthenticated(install, keys) -> None:
    inst = installed(install, keys, REQUIRE_ACME)
    signed = keys.sign(raw_of(make_mail()), "acme.example", length=True)
    appended = signed + b"\r\nPS: please also wire 10,000 EUR to IBAN XX00.\r\n"
    # dkimpy itself accepts it: the signature covers only the first l= bytes.
    assert dkim.verify(appended, dnsfunc=keys.dns)
    result = inst.ingest(appended)
    assert result.outcome == "quarantined"
    assert "has l= (body not covered)" in result.reason


# -- prefer and off -------------------------------------------------------------------------


def test_prefer_accepts_unsigned_admin_mail_and_flags_the_ticket(install, keys) -> None:
    inst = installed(install, keys, {"hygiene": {"authentication": {"policy": "prefer"}}})
    result = inst.ingest(make_mail())
    assert result.outcome == "created"
    assert "sender not authenticated (none: no DKIM signature)" in result.reason
    (ticket,) = tickets(inst)
    assert "unauthenticated-sender" in ticket.tags
    assert [m["To"] for m in inst.sent() if "[SUP-" in str(m["Subject"])][0]  # ack still sent


def test_the_ack_greets_the_person_the_directory_names_not_the_display_name(install, keys) -> None:
    """Anyone can write Alice's address with any display name; unsigned, it still
    opens a ticket under prefer, and the ack to the real Alice greeted her with
    the forger's text, from our address: a phishing line in a mail she trusts."""
    inst = installed(install, keys, {"hygiene": {"authentication": {"policy": "prefer"}}})
    lure = "Urgent - reset your password at http://evil.example/reset"
    assert inst.ingest(make_mail(sender=f'"{lure}" <alice@acme.example>')).outcome == "created"
    (ack,) = [m for m in inst.sent() if m["To"] == "alice@acme.example"]
    for kind in ("plain", "html"):
        body = ack.get_body((kind,)).get_content()
        assert "evil.example" not in body and "Alice Martin" in body


def test_off_checks_nothing(install, keys) -> None:
    inst = installed(install, keys, {"hygiene": {"authentication": {"policy": "off"}}})
    result = inst.ingest(make_mail())
    assert result.outcome == "created" and "authenticated" not in result.reason
    with inst.session() as session:
        inbound = select(Article.authentication).where(Article.direction == "in")
        assert session.scalars(inbound).one() is None


# -- staff -------------------------------------------------------------------------------


def staff_reply(inst: Installation, body: str) -> EmailMessage:
    return staff_answer(inst, body, "bob-1@support.example")


def test_staff_commands_need_an_authenticated_mail_under_prefer(install, keys) -> None:
    inst = installed(install, keys, {"hygiene": {"authentication": {"staff_policy": "prefer"}}})
    inst.ingest(make_mail(subject="Invoice question", body="Where is my invoice?\n"))
    assert tickets(inst)[0].priority == "P3"
    unsigned = inst.ingest(staff_reply(inst, "/priority P1\nLooking into it.\n"))
    assert unsigned.outcome == "command" and "failed sender authentication" in unsigned.reason
    assert tickets(inst)[0].priority == "P3"
    signed = staff_reply(inst, "/priority P1\nLooking into it.\n")
    signed.replace_header("Message-ID", "<bob-2@support.example>")
    result = inst.ingest(keys.sign(raw_of(signed), "support.example"))
    assert result.outcome == "threaded", result.reason
    assert tickets(inst)[0].priority == "P1"


def test_a_forged_staff_reply_never_reaches_the_customer_under_prefer(install, keys) -> None:
    """Staff's From forged on a guessable subject tag: no mail from support@ to the
    customer (a phishing link, an attachment), no status change, the SLA clock runs."""
    inst = installed(install, keys, {"hygiene": {"authentication": {"staff_policy": "prefer"}}})
    inst.ingest(make_mail())
    before = len(inst.sent())  # the ack and the staff notice
    forged = staff_reply(inst, "Please re-enter your password at https://evil.example/login\n")
    forged.add_attachment(b"MZ", maintype="application", subtype="octet-stream",
                          filename="fix.exe")  # fmt: skip
    result = inst.ingest(raw_of(forged))
    assert result.outcome == "command", result.reason
    assert "nothing applied or relayed" in result.reason
    assert "failed sender authentication" in result.reason
    sent = inst.sent()[before:]
    assert [m["To"] for m in sent] == ["bob@support.example"]  # the refusal, to the real Bob
    assert "was refused" in sent[0].get_body(("plain",)).get_content()
    ticket = tickets(inst)[0]
    assert ticket.status == "new"
    with inst.session() as session:
        clock = session.scalars(select(SlaClock).where(SlaClock.kind == "first_response")).one()
        assert clock.stopped_at is None
        assert session.scalars(select(Article).where(Article.author_kind == "staff")).all() == []
    signed = staff_reply(inst, "Looking into it.\n")
    signed.replace_header("Message-ID", "<bob-2@support.example>")
    assert inst.ingest(keys.sign(raw_of(signed), "support.example")).outcome == "threaded"
    assert [m["To"] for m in inst.sent()[before + 1 :]] == ["alice@acme.example"]


def test_a_refusal_for_authentication_names_the_mail_not_a_line(install, keys) -> None:
    """The whole mail failed authentication: no "line 0: ``" in the reason or in
    the refusal Bob gets; a bad command line in the same mail is still named."""
    inst = installed(install, keys, {"hygiene": {"authentication": {"staff_policy": "prefer"}}})
    inst.ingest(make_mail())
    before = len(inst.sent())
    result = inst.ingest(staff_reply(inst, "/priority P9\nLooking into it.\n"))
    assert result.reason.startswith(
        "commands refused, nothing applied or relayed: the mail failed sender "
        "authentication (DKIM/DMARC); line 1: /priority does not accept 'P9'"
    )
    (refusal,) = inst.sent()[before:]
    for kind in ("plain", "html"):
        body = refusal.get_body((kind,)).get_content()
        assert "line 0" not in body
        assert "the whole mail" in body and "failed sender authentication" in body
        assert "line 1" in body and "/priority P9" in body
        assert "Accepted commands" in body  # a line is at fault: how to write one

    # Nothing wrong with its lines: the command list would send Bob the wrong way.
    before = len(inst.sent())
    inst.ingest(staff_answer(inst, "/resolve\nDone.\n", "bob-3@support.example"))
    (refusal,) = inst.sent()[before:]
    for kind in ("plain", "html"):
        body = refusal.get_body((kind,)).get_content()
        assert "Accepted commands" not in body and "Commands go at the very top" not in body
        assert "send it again once the cause above is fixed" in body


def test_unsigned_staff_mail_under_require_is_held_and_staff_told(install, keys) -> None:
    inst = installed(install, keys, {"hygiene": {"authentication": {"staff_policy": "require"}}})
    inst.ingest(make_mail())
    result = inst.ingest(staff_reply(inst, "/resolve\nDone.\n"))
    assert result.outcome == "quarantined"
    assert "unauthenticated sender bob@support.example" in result.reason
    assert tickets(inst)[0].status != "resolved"
    (notice,) = [m for m in inst.sent() if m["Subject"] == "Mail in your name was not accepted"]
    assert notice["To"] == "bob@support.example"


# -- checklist 12: whose Authentication-Results we believe -----------------------------------

PROVIDER = "mx.provider.example"
IMAP = Envelope(source="imap", rcpt_to=("support@example.com",), trusted_authserv_ids=(PROVIDER,))


def with_results(msg: EmailMessage, *fields: str) -> bytes:
    """The mail as the provider delivered it: newest trace fields on top."""
    trace = "".join(f"Authentication-Results: {f}\r\n" for f in fields)
    return trace.encode() + raw_of(msg)


def test_imap_trusted_provider_dmarc_pass_is_accepted(install, keys) -> None:
    inst = installed(install, keys, REQUIRE_ACME)
    raw = with_results(make_mail(), f"{PROVIDER}; dmarc=pass (p=REJECT) header.from=acme.example")
    result = inst.ingest(raw, IMAP)
    assert result.outcome == "created", result.reason
    with inst.session() as session:
        inbound = select(Article.authentication).where(Article.direction == "in")
        assert session.scalars(inbound).one() == f"pass: dmarc=pass from {PROVIDER}"


@pytest.mark.parametrize(
    "fields",
    [
        # another authserv-id
        ("mx.other.example; dmarc=pass header.from=acme.example",),
        # the provider's verdict is for another From domain
        (f"{PROVIDER}; dmarc=pass header.from=evil.example",),
        # below an untrusted hop: written before that hop, so possibly by the sender
        ("relay.evil.example; none", f"{PROVIDER}; dmarc=pass header.from=acme.example"),
        # the provider saw a failure, or a valid signature of a domain not aligned with From
        (f"{PROVIDER}; dmarc=fail header.from=acme.example",),
        (f"{PROVIDER}; dkim=fail header.d=acme.example header.s=s1",),
        (f"{PROVIDER}; dkim=pass header.d=evil.example header.s=s1",),
    ],
    ids=[
        "other-authserv-id",
        "other-from-domain",
        "below-untrusted-hop",
        "dmarc-fail",
        "dkim-fail",
        "dkim-pass-not-aligned",
    ],
)
def test_imap_untrusted_results_are_ignored(install, keys, fields: tuple[str, ...]) -> None:
    inst = installed(install, keys, REQUIRE_ACME)
    result = inst.ingest(with_results(make_mail(), *fields), IMAP)
    assert result.outcome == "quarantined"
    assert "no DKIM signature" in result.reason


@pytest.fixture
def smtp_desk(install, keys) -> Iterator[tuple[Installation, int]]:
    """The daemon's SMTP listener in this process, behind an MTA we trust."""
    inst = installed(
        install,
        keys,
        {**REQUIRE_ACME, "intake": {"smtp": {"port": 0, "trusted_authserv_ids": [PROVIDER]}}},
    )
    with smtp_listener(inst) as port:
        yield inst, port


def test_smtp_results_claiming_our_id_are_stripped_and_never_trusted(smtp_desk) -> None:
    inst, port = smtp_desk
    ours = inst.app.authserv_id
    assert ours == "example.com"  # default: the support address's domain
    raw = with_results(make_mail(), f"{ours}; dmarc=pass header.from=acme.example")
    with smtplib.SMTP("127.0.0.1", port, timeout=30) as client:
        client.sendmail("alice@acme.example", ["support@example.com"], raw)
    with inst.session() as session:
        record = session.scalars(select(IngestRecord)).one()
    assert record.outcome == "quarantined" and "no DKIM signature" in record.reason
    stored = inst.app.blobs.get(record.raw_sha256)
    assert b"Authentication-Results" not in stored
    assert stored.endswith(raw_of(make_mail()).split(b"\r\n\r\n", 1)[1])  # the mail itself kept
    # The MTA in front of us is trusted on the same listener.
    trusted = with_results(
        make_mail(message_id="req-9@acme.example", subject="Other"),
        f"{PROVIDER}; dkim=pass header.d=acme.example header.s=s1",
    )
    with smtplib.SMTP("127.0.0.1", port, timeout=30) as client:
        client.sendmail("alice@acme.example", ["support@example.com"], trusted)
    assert [t.subject for t in tickets(inst)] == ["Other"]
