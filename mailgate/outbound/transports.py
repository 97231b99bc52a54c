"""Hand composed mail to the world: a local Maildir or an SMTP relay.

A transport sends one mail and classifies what happened, nothing more; the
outbox decides about retries. The contract of ``Transport.send``:

- returns a ``SendResult`` when at least one recipient accepted the mail.
  ``result.refused`` maps recipients refused with 5xx (do not retry them) and
  ``result.deferred`` those refused with 4xx while others accepted (retry
  those recipients only, or the others get the mail twice) to the server's
  reply. Iterating over a result yields the refused recipients.
- raises ``PermanentFailure`` when nobody got the mail and retrying cannot
  help: an invalid envelope address (before any connection), 5xx on MAIL or
  DATA, or every recipient refused with 5xx (``.recipients`` lists them).
- raises ``TemporaryFailure`` when nobody is known to have got the mail and a
  retry may work: 4xx, connection refused/reset/timeout, TLS or
  authentication errors. ``.maybe_delivered`` is true when the connection
  was lost after the whole message had been sent but before the server's
  reply (the "lost 250"): a resend may deliver a second copy, with the same
  Message-ID, which the outbox should allow only a bounded number of times.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import re
import smtplib
import socket
import ssl
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Protocol

from mailgate.outbound.compose import check_envelope_address
from mailgate.store.durable import make_dirs_durably, write_durably


class DeliveryError(Exception):
    """Base of the transport failures; `code` is the SMTP reply code when there was one."""

    def __init__(self, message: str, *, code: int | None = None,
                 recipients: Sequence[str] = ()) -> None:  # fmt: skip
        super().__init__(message)
        self.code = code
        self.recipients = tuple(recipients)


class TemporaryFailure(DeliveryError):
    def __init__(self, message: str, *, code: int | None = None,
                 maybe_delivered: bool = False) -> None:  # fmt: skip
        super().__init__(message, code=code)
        self.maybe_delivered = maybe_delivered


class PermanentFailure(DeliveryError):
    """`recipients`: the refused recipients when the failure is theirs, else empty."""


@dataclass(frozen=True)
class SendResult:
    refused: Mapping[str, str] = field(default_factory=dict)  # 5xx per recipient
    deferred: Mapping[str, str] = field(default_factory=dict)  # 4xx per recipient

    def __iter__(self) -> Iterator[str]:
        return iter(self.refused)


class Transport(Protocol):
    def send(self, envelope_from: str, recipients: Sequence[str], data: bytes) -> SendResult: ...

    def close(self) -> None:
        """End any session kept open between sends."""


def check_envelope(envelope_from: str, recipients: Sequence[str]) -> tuple[str, list[str]]:
    """Validated envelope, or PermanentFailure: bad directory data must never reach SMTP.

    An empty `envelope_from` is the null sender `<>`.
    """
    if not recipients:
        raise PermanentFailure("no recipients")
    bad: list[str] = []
    checked: list[str] = []
    for rcpt in recipients:
        try:
            checked.append(check_envelope_address(rcpt))
        except ValueError:
            bad.append(rcpt)
    if bad:
        raise PermanentFailure(f"invalid recipient address {', '.join(map(repr, bad))}",
                               recipients=bad)  # fmt: skip
    try:
        sender = check_envelope_address(envelope_from) if envelope_from else ""
    except ValueError as exc:
        raise PermanentFailure(f"invalid envelope sender: {exc}") from None
    return sender, checked


# --- Maildir -------------------------------------------------------------------


class MaildirTransport:
    """Writes each mail into a Maildir (for a machine without a relay, and for tests).

    Delivery follows maildir(5): write under tmp/, fsync, rename into new/,
    fsync the directory, so a reader never sees a partial file and a crash
    never loses an accepted one. Lines end in LF, as Maildir readers expect,
    and a `Return-Path` and `X-Envelope-To` record the envelope the way a
    local delivery agent would.
    """

    _counter = itertools.count()

    def __init__(self, path: Path) -> None:
        self.path = Path(path)

    def send(self, envelope_from: str, recipients: Sequence[str], data: bytes) -> SendResult:
        sender, rcpts = check_envelope(envelope_from, recipients)
        stamp = (f"Return-Path: <{sender}>\nX-Envelope-To: "
                 + ", ".join(f"<{r}>" for r in rcpts) + "\n").encode("ascii")  # fmt: skip
        body = re.sub(rb"\r\n?", b"\n", data)
        try:
            self._deliver(stamp + body)
        except OSError as exc:  # disk full, permissions: may pass once fixed
            raise TemporaryFailure(f"cannot write to Maildir {self.path}: {exc}") from exc
        return SendResult()

    def close(self) -> None:
        pass  # nothing is kept open

    def _deliver(self, content: bytes) -> None:
        for sub in ("tmp", "new", "cur"):
            make_dirs_durably(self.path / sub, mode=0o700)
        name = self._unique_name()
        tmp, new = self.path / "tmp" / name, self.path / "new" / name
        write_durably(tmp, new, content)

    def _unique_name(self) -> str:
        # time.M<usec>P<pid>Q<counter>R<random>.<host>, as Dovecot and qmail do.
        now = time.time()
        host = socket.gethostname().replace("/", r"\057").replace(":", r"\072")
        # Zero-padded microseconds keep names in delivery order when sorted.
        return (f"{int(now)}.M{int(now % 1 * 1_000_000):06d}P{os.getpid()}"
                f"Q{next(self._counter)}R{os.urandom(8).hex()}.{host}")  # fmt: skip


# --- SMTP ----------------------------------------------------------------------


TlsMode = Literal["none", "starttls", "implicit"]
MAILS_PER_SESSION = 50  # below common per-connection limits of relays


class SmtpTransport:
    """Sends through an SMTP relay with smtplib, reusing one session per sending round.

    `timeout` bounds connecting and each command; `data_timeout` bounds the
    wait for the reply to the end of data, which RFC 5321 §4.5.3.2.6 sets at
    10 minutes: giving up earlier turns a slow relay into duplicates.
    """

    def __init__(
        self,
        host: str,
        port: int,
        tls: TlsMode = "none",
        username: str | None = None,
        password: str | None = None,
        timeout: float = 30,
        local_hostname: str | None = None,
        *,
        data_timeout: float = 600,
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        if tls not in ("none", "starttls", "implicit"):
            raise ValueError(f"tls must be none, starttls or implicit, not {tls!r}")
        self.host, self.port, self.tls = host, port, tls
        self.username, self.password = username, password
        self.timeout, self.data_timeout = timeout, data_timeout
        self.local_hostname = local_hostname
        self.ssl_context = ssl_context
        self._smtp: smtplib.SMTP | None = None
        self._sent_on_session = 0

    def send(self, envelope_from: str, recipients: Sequence[str], data: bytes) -> SendResult:
        sender, rcpts = check_envelope(envelope_from, recipients)
        payload = _dot_stuffed(data)
        where = f"{self.host}:{self.port}"
        try:
            smtp = self._session()
        except smtplib.SMTPResponseException as exc:
            # A refusal of the session (greeting, EHLO, STARTTLS, AUTH) says
            # nothing about this mail: it is the relay or our settings.
            raise TemporaryFailure(f"{where}: connection setup refused: {_reply(exc)}",
                                   code=exc.smtp_code) from exc  # fmt: skip
        except (smtplib.SMTPException, OSError) as exc:  # ssl.SSLError is an OSError
            raise TemporaryFailure(f"{where}: {type(exc).__name__}: {exc}") from exc
        try:
            result = self._transaction(smtp, sender, rcpts, payload)
        except DeliveryError as exc:
            # A refusal read in full leaves the session in step: RSET and keep
            # it. Anything else (a lost reply) ends it.
            if exc.code is None or not _answers(smtp.rset):
                self._drop()
            raise
        except (smtplib.SMTPException, OSError) as exc:
            self._drop()
            raise TemporaryFailure(f"{where}: {type(exc).__name__}: {exc}") from exc
        self._sent_on_session += 1
        return result

    def _session(self) -> smtplib.SMTP:
        """The open session when it still answers and has room, else a new one.

        One session carries up to `MAILS_PER_SESSION` mails of a sending round:
        connecting, EHLO and STARTTLS cost more than the mail itself.
        """
        if self._smtp is not None:
            if self._sent_on_session < MAILS_PER_SESSION and _answers(self._smtp.noop):
                return self._smtp
            self.close()
        self._smtp = self._connect()
        self._sent_on_session = 0
        return self._smtp

    def close(self) -> None:
        """QUIT the open session, if any; call at the end of a sending round."""
        if self._smtp is not None:
            # Not `with smtp`: its QUIT raises on an odd reply, which would turn
            # a delivered mail into a failure and then a duplicate.
            _quietly(self._smtp.quit)
            self._drop()

    def _drop(self) -> None:
        if self._smtp is not None:
            self._smtp.close()
            self._smtp = None

    def _tls_context(self) -> ssl.SSLContext:
        # Built once: loading the system CA store costs tens of milliseconds.
        if self.ssl_context is None:
            self.ssl_context = ssl.create_default_context()
        return self.ssl_context

    def _connect(self) -> smtplib.SMTP:
        smtp: smtplib.SMTP
        if self.tls == "implicit":
            smtp = smtplib.SMTP_SSL(self.host, self.port, local_hostname=self.local_hostname,
                                    timeout=self.timeout, context=self._tls_context())  # fmt: skip
        else:
            smtp = smtplib.SMTP(self.host, self.port, local_hostname=self.local_hostname,
                                timeout=self.timeout)  # fmt: skip
        try:
            smtp.ehlo_or_helo_if_needed()
            if self.tls == "starttls":
                # No fallback to plain text: a relay that stops offering
                # STARTTLS (or a stripping attacker) gets nothing.
                smtp.starttls(context=self._tls_context())
                smtp.ehlo()
            if self.username:
                smtp.login(self.username, self.password or "")
        except BaseException:
            smtp.close()
            raise
        return smtp

    def _transaction(
        self, smtp: smtplib.SMTP, sender: str, rcpts: list[str], payload: bytes
    ) -> SendResult:
        options = []
        if smtp.has_extn("size"):  # lets an over-size mail fail at MAIL, before the upload
            options.append(f"SIZE={len(payload)}")
        if smtp.has_extn("8bitmime") and any(b > 0x7F for b in payload):
            options.append("BODY=8BITMIME")
        code, reply = smtp.mail(sender, options)
        if code != 250:
            raise _failure_for(code, reply, "MAIL FROM")

        accepted: list[str] = []
        refused: dict[str, str] = {}
        deferred: dict[str, str] = {}
        for rcpt in rcpts:
            code, reply = smtp.rcpt(rcpt)
            if code in (250, 251):
                accepted.append(rcpt)
            elif 500 <= code < 600:
                refused[rcpt] = _text(code, reply)
            else:
                deferred[rcpt] = _text(code, reply)
        if not accepted:
            if deferred:  # a retry asks again about the refused ones too
                raise TemporaryFailure("RCPT TO deferred: " + _listing(deferred),
                                       code=_code(deferred))  # fmt: skip
            raise PermanentFailure("every recipient refused: " + _listing(refused),
                                   code=_code(refused), recipients=list(refused))  # fmt: skip

        code, reply = smtp.docmd("DATA")
        if code != 354:
            raise _failure_for(code, reply, "DATA")
        try:
            smtp.send(payload)
        except (smtplib.SMTPServerDisconnected, OSError) as exc:
            raise TemporaryFailure(f"connection lost while sending data: {exc}") from exc
        # From here on the relay may have queued the mail: a lost reply is not
        # a failed delivery.
        try:
            if smtp.sock is not None:
                smtp.sock.settimeout(self.data_timeout)
            code, reply = smtp.getreply()
        except (smtplib.SMTPServerDisconnected, OSError) as exc:
            raise TemporaryFailure(f"no reply after end of data ({exc}); the relay may have "
                                   "accepted the mail", maybe_delivered=True) from exc  # fmt: skip
        if code != 250:
            raise _failure_for(code, reply, "end of data")
        return SendResult(refused=refused, deferred=deferred)


def _dot_stuffed(data: bytes) -> bytes:
    """CRLF line ends everywhere, dot-stuffed, with the end-of-data marker.

    Bare CR or LF are normalised rather than sent: relays disagree on them
    and that disagreement is what SMTP smuggling exploits.
    """
    body = re.sub(rb"\r\n|\r|\n", b"\r\n", data)
    body = re.sub(rb"(?m)^\.", b"..", body)
    if not body.endswith(b"\r\n"):
        body += b"\r\n"
    return body + b".\r\n"


def _failure_for(code: int, reply: bytes | str, stage: str) -> DeliveryError:
    text = f"{stage}: {_text(code, reply)}"
    if 500 <= code < 600:
        return PermanentFailure(text, code=code)
    return TemporaryFailure(text, code=code)  # 4xx, and anything unexpected


def _text(code: int, reply: bytes | str) -> str:
    if isinstance(reply, bytes):
        reply = reply.decode("utf-8", "replace")
    return f"{code} {' '.join(reply.split())}"


def _reply(exc: smtplib.SMTPResponseException) -> str:
    return _text(exc.smtp_code, exc.smtp_error)


def _listing(replies: Mapping[str, str]) -> str:
    return "; ".join(f"{rcpt}: {reply}" for rcpt, reply in replies.items())


def _code(replies: Mapping[str, str]) -> int:
    return int(next(iter(replies.values())).split(" ", 1)[0])


def _answers(command: Callable[[], tuple[int, bytes]]) -> bool:
    """True when a NOOP or RSET got 250: the session is alive and in step."""
    try:
        return command()[0] == 250
    except (smtplib.SMTPException, OSError):
        return False


def _quietly(command: Callable[[], object]) -> None:
    with contextlib.suppress(smtplib.SMTPException, OSError):
        command()
