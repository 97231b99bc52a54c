"""Transports against real servers: an aiosmtpd sink on loopback and a Maildir in a temp dir."""

from __future__ import annotations

import asyncio
import email
import mailbox
import socket
import ssl
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from email import policy
from pathlib import Path
from typing import Any

import pytest
from aiosmtpd.controller import Controller
from aiosmtpd.smtp import AuthResult, LoginPassword

from mailgate.outbound.compose import build_message, format_address
from mailgate.outbound.templates import TemplateSet
from mailgate.outbound.transports import (
    MaildirTransport,
    PermanentFailure,
    SendResult,
    SmtpTransport,
    TemporaryFailure,
    Transport,
)
from tests.smtp_sink import free_port

TEMPLATES = Path(__file__).resolve().parents[1] / "templates"
BOUNCES = "bounces+t0k3n@support.example.com"


@dataclass
class Received:
    mail_from: str
    rcpt_tos: list[str]
    data: bytes


@dataclass
class Sink:
    """An aiosmtpd handler whose answers the test chooses (cf. Postfix smtp-sink)."""

    mail_reply: str | None = None  # e.g. "550 ..." to refuse MAIL FROM
    refuse: set[str] = field(default_factory=set)  # 550 on RCPT
    defer: set[str] = field(default_factory=set)  # 450 on RCPT
    data_reply: str = "250 2.0.0 Ok: queued"
    hang_up_after_data: bool = False  # the lost 250: store, then close without a reply
    data_delay: float = 0.0
    received: list[Received] = field(default_factory=list)

    async def handle_MAIL(self, server: Any, session: Any, envelope: Any,
                          address: str, mail_options: list[str]) -> str:  # fmt: skip
        if self.mail_reply:
            return self.mail_reply
        envelope.mail_from = address
        envelope.mail_options.extend(mail_options)
        return "250 2.1.0 Ok"

    async def handle_RCPT(self, server: Any, session: Any, envelope: Any,
                          address: str, rcpt_options: list[str]) -> str:  # fmt: skip
        if address in self.refuse:
            return f"550 5.1.1 <{address}>: Recipient address rejected: User unknown"
        if address in self.defer:
            return f"450 4.2.1 <{address}>: Mailbox busy, try later"
        envelope.rcpt_tos.append(address)
        return "250 2.1.5 Ok"

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        self.received.append(Received(envelope.mail_from, list(envelope.rcpt_tos),
                                      envelope.original_content))  # fmt: skip
        if self.data_delay:
            await asyncio.sleep(self.data_delay)
        if self.hang_up_after_data:
            server.transport.close()
        return self.data_reply


@pytest.fixture
def start_sink() -> Iterator[Callable[..., int]]:
    controllers: list[Controller] = []

    def start(handler: Sink, **kwargs: Any) -> int:
        port = free_port()
        controller = Controller(handler, hostname="127.0.0.1", port=port, **kwargs)
        controller.start()
        controllers.append(controller)
        return port

    yield start
    for controller in controllers:
        controller.stop()


def server_context(certificate: tuple[Path, Path]) -> ssl.SSLContext:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(*certificate)
    return context


def client_context(certificate: tuple[Path, Path]) -> ssl.SSLContext:
    return ssl.create_default_context(cafile=str(certificate[0]))


def ack_mail(**overrides: Any) -> bytes:
    rendered = TemplateSet(TEMPLATES).render("ack", "fr", {
        "ticket": {"number": "SUP-2026-000042", "subject": "Échec de l'export",
                   "priority": "P2", "status": "new", "org_name": "ACME"},
        "requester_name": "Alice Martin", "support_address": "support@example.com",
        "targets": [], "credit": None,
    })  # fmt: skip
    args: dict[str, Any] = dict(
        from_="Support <support@example.com>",
        to=[format_address("Alice Martin", "alice@acme.example")],
        subject=rendered.subject, text=rendered.text, html=rendered.html,
        message_id="sup.42.1.c0ffee@support.example.com",
        in_reply_to="CAF123@mail.acme.example", references=["CAF123@mail.acme.example"],
        reply_to="support+r3ply@example.com", auto_submitted="auto-replied",
        loop_marker=("X-Mailgate-Loop", "inst1.abcdef"),
        date=datetime(2026, 3, 4, 5, 6, 7, tzinfo=UTC),
    )  # fmt: skip
    args.update(overrides)
    return build_message(**args)


def transport(port: int, **kwargs: Any) -> SmtpTransport:
    return SmtpTransport("127.0.0.1", port, timeout=5, **kwargs)


# --- SMTP: success ------------------------------------------------------------------


def test_delivers_exact_bytes_with_stamps(start_sink: Callable[..., int]) -> None:
    sink = Sink()
    port = start_sink(sink)
    data = ack_mail()
    result = transport(port).send(BOUNCES, ["alice@acme.example"], data)

    assert result == SendResult() and list(result) == []
    [got] = sink.received
    assert got.mail_from == BOUNCES and got.rcpt_tos == ["alice@acme.example"]
    assert got.data == data  # dot-stuffing undone, nothing added or lost
    msg = email.message_from_bytes(got.data, policy=policy.default)
    assert msg["Auto-Submitted"] == "auto-replied"
    assert msg["Precedence"] == "bulk"
    assert msg["X-Auto-Response-Suppress"] == "All"
    assert msg["Message-ID"] == "<sup.42.1.c0ffee@support.example.com>"
    assert msg["In-Reply-To"] == "<CAF123@mail.acme.example>"
    assert msg["References"] == "<CAF123@mail.acme.example>"
    assert msg["Reply-To"] == "support+r3ply@example.com"
    assert msg["X-Mailgate-Loop"] == "inst1.abcdef"
    assert msg["Subject"] == "[SUP-2026-000042] Re: Échec de l'export"
    assert "Numéro de suivi : SUP-2026-000042" in msg.get_body(("plain",)).get_content()


def test_injection_attempts_reach_the_sink_as_text(start_sink: Callable[..., int]) -> None:
    sink = Sink()
    port = start_sink(sink)
    evil = "Alice\r\nBcc: victim@evil.example"
    data = ack_mail(
        subject="[SUP-2026-000042] Re: =?utf-8?q?x=0D=0ABcc:_victim@evil.example?=\r\nBcc: v@e",
        to=[format_address(evil, "alice@acme.example")],
    )
    transport(port).send(BOUNCES, ["alice@acme.example"], data)
    [got] = sink.received
    msg = email.message_from_bytes(got.data, policy=policy.default)
    assert "Bcc" not in msg
    assert len(msg.keys()) == 14
    assert [a.addr_spec for a in msg["To"].addresses] == ["alice@acme.example"]
    assert got.rcpt_tos == ["alice@acme.example"]


def test_dots_and_bare_line_ends_cannot_end_the_data_early(start_sink: Callable[..., int]) -> None:
    sink = Sink()
    port = start_sink(sink)
    data = b"Subject: smuggle\n\nline\n.\nMAIL FROM:<x@y>\r\n.\r.hidden\r\n..two\n"
    transport(port).send(BOUNCES, ["alice@acme.example"], data)
    [got] = sink.received
    assert got.data == (b"Subject: smuggle\r\n\r\nline\r\n.\r\nMAIL FROM:<x@y>\r\n.\r\n"
                        b".hidden\r\n..two\r\n")  # fmt: skip


def test_null_sender_and_several_recipients(start_sink: Callable[..., int]) -> None:
    sink = Sink()
    port = start_sink(sink)
    transport(port).send("", ["a@acme.example", "b@acme.example"], ack_mail())
    [got] = sink.received
    assert got.mail_from == "<>" or got.mail_from == ""
    assert got.rcpt_tos == ["a@acme.example", "b@acme.example"]


# --- SMTP: refusals -------------------------------------------------------------------


def test_451_at_end_of_data_is_temporary(start_sink: Callable[..., int]) -> None:
    port = start_sink(Sink(data_reply="451 4.3.0 Error: queue file write error"))
    with pytest.raises(TemporaryFailure) as caught:
        transport(port).send(BOUNCES, ["alice@acme.example"], ack_mail())
    assert caught.value.code == 451 and not caught.value.maybe_delivered
    assert "queue file write error" in str(caught.value)


def test_554_at_end_of_data_is_permanent(start_sink: Callable[..., int]) -> None:
    port = start_sink(Sink(data_reply="554 5.7.1 Message rejected as spam"))
    with pytest.raises(PermanentFailure) as caught:
        transport(port).send(BOUNCES, ["alice@acme.example"], ack_mail())
    assert caught.value.code == 554 and caught.value.recipients == ()


def test_5xx_on_mail_from_is_permanent(start_sink: Callable[..., int]) -> None:
    sink = Sink(mail_reply="553 5.7.1 Sender address rejected")
    port = start_sink(sink)
    with pytest.raises(PermanentFailure) as caught:
        transport(port).send(BOUNCES, ["alice@acme.example"], ack_mail())
    assert caught.value.code == 553
    assert sink.received == []


def test_4xx_on_mail_from_is_temporary(start_sink: Callable[..., int]) -> None:
    port = start_sink(Sink(mail_reply="421 4.3.2 Service shutting down"))
    with pytest.raises(TemporaryFailure) as caught:
        transport(port).send(BOUNCES, ["alice@acme.example"], ack_mail())
    assert caught.value.code == 421


def test_one_recipient_refused_others_get_the_mail(start_sink: Callable[..., int]) -> None:
    sink = Sink(refuse={"gone@acme.example"})
    port = start_sink(sink)
    result = transport(port).send(
        BOUNCES, ["alice@acme.example", "gone@acme.example", "carol@acme.example"], ack_mail()
    )
    assert list(result) == ["gone@acme.example"]
    assert result.refused["gone@acme.example"].startswith("550 5.1.1")
    assert result.deferred == {}
    [got] = sink.received
    assert got.rcpt_tos == ["alice@acme.example", "carol@acme.example"]


def test_every_recipient_refused_is_permanent(start_sink: Callable[..., int]) -> None:
    sink = Sink(refuse={"gone@acme.example", "left@acme.example"})
    port = start_sink(sink)
    with pytest.raises(PermanentFailure) as caught:
        transport(port).send(BOUNCES, ["gone@acme.example", "left@acme.example"], ack_mail())
    assert caught.value.recipients == ("gone@acme.example", "left@acme.example")
    assert caught.value.code == 550
    assert sink.received == []


def test_deferred_recipient_is_reported_for_a_targeted_retry(
    start_sink: Callable[..., int],
) -> None:
    sink = Sink(defer={"busy@acme.example"})
    port = start_sink(sink)
    result = transport(port).send(BOUNCES, ["alice@acme.example", "busy@acme.example"],
                                  ack_mail())  # fmt: skip
    assert list(result) == []
    assert result.deferred["busy@acme.example"].startswith("450 4.2.1")
    assert sink.received[0].rcpt_tos == ["alice@acme.example"]


def test_only_deferred_or_refused_recipients_is_temporary(start_sink: Callable[..., int]) -> None:
    sink = Sink(defer={"busy@acme.example"}, refuse={"gone@acme.example"})
    port = start_sink(sink)
    with pytest.raises(TemporaryFailure):
        transport(port).send(BOUNCES, ["busy@acme.example", "gone@acme.example"], ack_mail())
    assert sink.received == []


# --- SMTP: lost connections ---------------------------------------------------------------


def test_lost_250_after_data_is_temporary_and_flagged(start_sink: Callable[..., int]) -> None:
    sink = Sink(hang_up_after_data=True)
    port = start_sink(sink)
    data = ack_mail()
    with pytest.raises(TemporaryFailure) as caught:
        transport(port).send(BOUNCES, ["alice@acme.example"], data)
    assert caught.value.maybe_delivered
    # The sink did get it: a resend carries the same Message-ID so it can be recognised.
    [got] = sink.received
    assert got.data == data


def test_slow_reply_after_data_times_out_as_maybe_delivered(
    start_sink: Callable[..., int],
) -> None:
    sink = Sink(data_delay=2.0)
    port = start_sink(sink)
    with pytest.raises(TemporaryFailure) as caught:
        transport(port, data_timeout=0.3).send(BOUNCES, ["alice@acme.example"], ack_mail())
    assert caught.value.maybe_delivered


def test_connection_refused_is_temporary() -> None:
    port = free_port()  # nothing listens there
    with pytest.raises(TemporaryFailure) as caught:
        transport(port).send(BOUNCES, ["alice@acme.example"], ack_mail())
    assert not caught.value.maybe_delivered


def test_silent_server_times_out_as_temporary() -> None:
    with socket.socket() as server:  # accepts, never greets
        server.bind(("127.0.0.1", 0))
        server.listen()
        port = server.getsockname()[1]
        with pytest.raises(TemporaryFailure):
            SmtpTransport("127.0.0.1", port, timeout=0.5).send(BOUNCES, ["a@acme.example"], b"x")


# --- envelope checks ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("sender", "recipients"),
    [
        (BOUNCES, ["alice@acme.example\r\nRCPT TO:<victim@evil.example>"]),
        (BOUNCES, ["alice@acme.example", "bob@acme.example\n"]),
        (BOUNCES, ["<alice@acme.example>"]),
        (BOUNCES, ["alice @acme.example"]),
        (BOUNCES, ["no-at-sign"]),
        (BOUNCES, []),
        ("bounces@x\r\nRCPT TO:<victim@evil.example>", ["alice@acme.example"]),
        ("bounces\x00@x", ["alice@acme.example"]),
    ],
)
def test_bad_envelope_is_refused_before_connecting(
    sender: str, recipients: list[str], tmp_path: Path
) -> None:
    port = free_port()  # nothing listens: a connection attempt would be a TemporaryFailure
    transports: list[Transport] = [transport(port), MaildirTransport(tmp_path / "md")]
    for t in transports:
        with pytest.raises(PermanentFailure):
            t.send(sender, recipients, ack_mail())
    assert not (tmp_path / "md" / "new").exists() or not any((tmp_path / "md/new").iterdir())


def test_bad_recipient_is_named(tmp_path: Path) -> None:
    with pytest.raises(PermanentFailure) as caught:
        MaildirTransport(tmp_path).send(BOUNCES, ["ok@acme.example", "x\r\n@y"], b"x")
    assert caught.value.recipients == ("x\r\n@y",)


# --- TLS and authentication -------------------------------------------------------------


def test_starttls(start_sink: Callable[..., int], certificate: tuple[Path, Path]) -> None:
    sink = Sink()
    port = start_sink(sink, tls_context=server_context(certificate), require_starttls=True)
    transport(port, tls="starttls", ssl_context=client_context(certificate)).send(
        BOUNCES, ["alice@acme.example"], ack_mail()
    )
    assert len(sink.received) == 1


def test_implicit_tls(start_sink: Callable[..., int], certificate: tuple[Path, Path]) -> None:
    sink = Sink()
    port = start_sink(sink, ssl_context=server_context(certificate))
    transport(port, tls="implicit", ssl_context=client_context(certificate)).send(
        BOUNCES, ["alice@acme.example"], ack_mail()
    )
    assert len(sink.received) == 1


def test_untrusted_certificate_is_temporary(
    start_sink: Callable[..., int], certificate: tuple[Path, Path]
) -> None:
    sink = Sink()
    port = start_sink(sink, tls_context=server_context(certificate))
    with pytest.raises(TemporaryFailure, match="(?i)certificate"):
        transport(port, tls="starttls").send(BOUNCES, ["alice@acme.example"], ack_mail())
    assert sink.received == []


def test_starttls_required_but_not_offered_never_falls_back(
    start_sink: Callable[..., int],
) -> None:
    sink = Sink()
    port = start_sink(sink)
    with pytest.raises(TemporaryFailure, match="(?i)starttls"):
        transport(port, tls="starttls").send(BOUNCES, ["alice@acme.example"], ack_mail())
    assert sink.received == []


def _authenticator(server: Any, session: Any, envelope: Any, mechanism: str,
                   auth_data: Any) -> AuthResult:  # fmt: skip
    ok = isinstance(auth_data, LoginPassword) and (
        auth_data.login == b"mailgate" and auth_data.password == b"s3cret"
    )
    return AuthResult(success=ok, handled=False)


@pytest.mark.parametrize(("password", "delivered"), [("s3cret", True), ("wrong", False)])
def test_authentication(
    start_sink: Callable[..., int], certificate: tuple[Path, Path], password: str,
    delivered: bool,
) -> None:  # fmt: skip
    sink = Sink()
    port = start_sink(sink, tls_context=server_context(certificate),
                      authenticator=_authenticator, auth_require_tls=True)  # fmt: skip
    smtp = transport(port, tls="starttls", username="mailgate", password=password,
                     ssl_context=client_context(certificate))  # fmt: skip
    if delivered:
        smtp.send(BOUNCES, ["alice@acme.example"], ack_mail())
    else:
        # A wrong password is a setting to fix: the mail waits instead of failing.
        with pytest.raises(TemporaryFailure) as caught:
            smtp.send(BOUNCES, ["alice@acme.example"], ack_mail())
        assert caught.value.code == 535
    assert len(sink.received) == int(delivered)


def test_invalid_tls_mode() -> None:
    with pytest.raises(ValueError):
        SmtpTransport("127.0.0.1", 25, tls="ssl")  # type: ignore[arg-type]


# --- Maildir -------------------------------------------------------------------------


def test_maildir_delivery(tmp_path: Path) -> None:
    root = tmp_path / "var" / "sent"
    data = ack_mail()
    result = MaildirTransport(root).send(BOUNCES, ["alice@acme.example", "b@acme.example"], data)
    assert result == SendResult()
    assert sorted(p.name for p in root.iterdir()) == ["cur", "new", "tmp"]
    assert list((root / "tmp").iterdir()) == []
    [path] = list((root / "new").iterdir())
    content = path.read_bytes()
    assert b"\r" not in content  # Maildir files use LF
    envelope = f"Return-Path: <{BOUNCES}>\nX-Envelope-To: <alice@acme.example>, <b@acme.example>\n"
    assert content.startswith(envelope.encode())
    assert content.endswith(data.replace(b"\r\n", b"\n"))
    assert path.stat().st_mode & 0o777 == 0o600
    assert all((root / sub).stat().st_mode & 0o077 == 0 for sub in ("cur", "new", "tmp"))

    [msg] = list(mailbox.Maildir(root, create=False))
    assert msg["Message-ID"] == "<sup.42.1.c0ffee@support.example.com>"


def test_maildir_names_are_unique(tmp_path: Path) -> None:
    transport_ = MaildirTransport(tmp_path)
    for _ in range(20):
        transport_.send(BOUNCES, ["alice@acme.example"], b"Subject: x\r\n\r\nx\r\n")
    assert len(list((tmp_path / "new").iterdir())) == 20


def test_maildir_write_error_is_temporary(tmp_path: Path) -> None:
    blocker = tmp_path / "sent"
    blocker.write_text("a file where the Maildir should be")
    with pytest.raises(TemporaryFailure):
        MaildirTransport(blocker).send(BOUNCES, ["alice@acme.example"], b"x")


def test_one_session_carries_a_round_and_survives_a_refusal(sink) -> None:  # noqa: ANN001
    relay = SmtpTransport("127.0.0.1", sink.port, "none", timeout=5)
    relay.send("support+b1-x@example.com", ["alice@acme.example"], ack_mail())
    session = relay._smtp
    sink.mode = "refuse_rcpt"
    with pytest.raises(PermanentFailure):
        relay.send("support+b2-x@example.com", ["nobody@acme.example"], ack_mail())
    sink.mode = "accept"
    relay.send("support+b3-x@example.com", ["alice@acme.example"], ack_mail())
    assert relay._smtp is session  # RSET kept it in step: no reconnect
    relay.close()
    assert relay._smtp is None
    assert [r.mail_from for r in sink.received] == [
        "support+b1-x@example.com",
        "support+b3-x@example.com",
    ]


def test_a_session_the_relay_dropped_is_replaced(sink) -> None:  # noqa: ANN001
    relay = SmtpTransport("127.0.0.1", sink.port, "none", timeout=5)
    relay.send("support+b1-x@example.com", ["alice@acme.example"], ack_mail())
    assert relay._smtp is not None and relay._smtp.sock is not None
    relay._smtp.sock.close()  # as if the relay timed the idle session out
    relay.send("support+b2-x@example.com", ["alice@acme.example"], ack_mail())
    relay.close()
    assert len(sink.received) == 2
