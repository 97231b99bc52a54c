"""A real SMTP relay for tests: aiosmtpd on an ephemeral loopback port.

It records every accepted message (envelope and bytes) and can misbehave the
ways relays do, one `mode` at a time:

- ``accept``: 250 for everything (the default);
- ``tempfail``: 451 at the end of DATA;
- ``refuse_rcpt``: 550 5.1.1 for every RCPT;
- ``drop_after_dot``: read the whole message, store it, then close the
  connection without a reply (the "lost 250").
"""

from __future__ import annotations

import email
import email.policy
import socket
import subprocess
import threading
import time
from dataclasses import dataclass, field
from email.message import EmailMessage
from pathlib import Path

from aiosmtpd.controller import Controller
from aiosmtpd.smtp import SMTP, Envelope, Session


def make_certificate(directory: Path) -> tuple[Path, Path]:
    """A self-signed certificate and key for localhost and 127.0.0.1 (needs openssl)."""
    cert, key = directory / "cert.pem", directory / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
         "-keyout", str(key), "-out", str(cert), "-subj", "/CN=localhost",
         "-addext", "subjectAltName=IP:127.0.0.1,DNS:localhost"],
        check=True, capture_output=True,
    )  # fmt: skip
    return cert, key


def free_port() -> int:
    """A loopback port nobody listens on right now (the kernel's pick)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass(frozen=True)
class Received:
    mail_from: str
    rcpt_tos: tuple[str, ...]
    data: bytes
    at: float  # time.monotonic() when the end of DATA arrived

    @property
    def message(self) -> EmailMessage:
        return email.message_from_bytes(self.data, policy=email.policy.default)  # type: ignore[return-value]


@dataclass
class _Handler:
    sink: Sink
    attempts: int = 0

    async def handle_RCPT(
        self, server: SMTP, session: Session, envelope: Envelope, address: str, options: list[str]
    ) -> str:
        if self.sink.mode == "refuse_rcpt":
            return "550 5.1.1 No such user"
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        self.attempts += 1
        mode = self.sink.mode
        if mode == "tempfail":
            return "451 4.3.0 Try again later"
        self.sink._store(envelope)
        if mode == "drop_after_dot":
            assert server.transport is not None
            server.transport.abort()  # no reply: the client cannot know it was stored
            return "250 OK"  # never written
        return "250 OK queued"


@dataclass
class Sink:
    mode: str = "accept"
    received: list[Received] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _controller: Controller | None = None
    _handler: _Handler | None = None

    def start(self, port: int | None = None) -> Sink:
        """On `port` (a relay that comes back where it was) or a free one."""
        self._handler = _Handler(self)
        # aiosmtpd's Controller checks readiness by connecting, so it needs the port up front.
        self._controller = Controller(self._handler, hostname="127.0.0.1", port=port or free_port())
        self._controller.start()
        return self

    def stop(self) -> None:
        if self._controller is not None:
            self._controller.stop()

    @property
    def port(self) -> int:
        assert self._controller is not None
        return self._controller.port

    @property
    def attempts(self) -> int:
        """End-of-DATA commands seen, whatever the answer was."""
        return self._handler.attempts if self._handler else 0

    def _store(self, envelope: Envelope) -> None:
        with self._lock:
            self.received.append(
                Received(
                    envelope.mail_from or "",
                    tuple(envelope.rcpt_tos),
                    bytes(envelope.original_content or envelope.content or b""),
                    time.monotonic(),
                )
            )

    def messages(self) -> list[EmailMessage]:
        with self._lock:
            return [r.message for r in self.received]

    def wait_for(self, count: int, timeout: float = 10.0) -> list[Received]:
        """Block until at least `count` messages arrived; AssertionError on timeout."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self._lock:
                if len(self.received) >= count:
                    return list(self.received)
            time.sleep(0.02)
        raise AssertionError(f"relay sink got {len(self.received)} of {count} messages")
