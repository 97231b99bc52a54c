"""The real Dovecot of tests/dovecot.py works (and CI has Dovecot installed)."""

from __future__ import annotations

import ssl
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import imapclient
import pytest
from imapclient.exceptions import IMAPClientAbortError

import tests.dovecot as dovecot_module
from tests.dovecot import Dovecot, DovecotError, start_dovecot


def mail(n: int) -> bytes:
    return (
        f"From: Alice <alice@acme.example>\r\nTo: support@example.com\r\n"
        f"Subject: Request {n}\r\nMessage-ID: <req-{n}@acme.example>\r\n\r\n"
        f"Body {n}, with trailing spaces   \r\n"
    ).encode()


@pytest.fixture
def dovecot(tmp_path: Path) -> Iterator[Dovecot]:
    server = start_dovecot(tmp_path)
    yield server
    server.stop()


def test_starts_fast_on_loopback_and_greets(tmp_path: Path) -> None:
    began = time.monotonic()
    server = start_dovecot(tmp_path)
    try:
        assert time.monotonic() - began < 2  # typically ~0.05 s
        assert server.config.is_relative_to(tmp_path)
        assert "listen = 127.0.0.1" in server.config.read_text()
        assert server.tls_port is None and server.cert is None
        with server.session() as client:
            assert client.has_capability("IDLE")
            assert client.has_capability("MOVE")
            assert client.has_capability("UIDPLUS")
            client.create_folder("mailgate/processed")  # "/" is the hierarchy separator
            assert client.folder_exists("mailgate/processed")
        assert "starting up for imap" in server.log_path.read_text()
    finally:
        server.stop()
    with pytest.raises(OSError):
        imapclient.IMAPClient("127.0.0.1", server.port, ssl=False, timeout=2)


def test_append_and_fetch(dovecot: Dovecot) -> None:
    assert dovecot.uids() == []
    assert dovecot.fetch_all("INBOX") == {}
    first = dovecot.append(mail(1))
    second = dovecot.append(mail(2), flags=[imapclient.SEEN])
    assert (first, second) == (1, 2)
    assert dovecot.uids() == [1, 2]
    assert dovecot.fetch_all("INBOX") == {1: mail(1), 2: mail(2)}
    assert dovecot.append(mail(3), folder="mailgate/failed") == 1  # created on the way
    assert dovecot.fetch_all("mailgate/failed") == {1: mail(3)}
    with dovecot.session() as client:
        client.select_folder("INBOX", readonly=True)
        flags = client.get_flags([1, 2])
    assert imapclient.SEEN not in flags[1] and imapclient.SEEN in flags[2]


def test_restart_keeps_mail_ports_and_uidvalidity(dovecot: Dovecot) -> None:
    dovecot.append(mail(1))
    port, uidvalidity = dovecot.port, dovecot.uidvalidity()
    client = dovecot.client()
    client.select_folder("INBOX")
    dovecot.restart()
    with pytest.raises((IMAPClientAbortError, OSError)):  # the old session is gone
        client.noop()
    assert dovecot.port == port
    assert dovecot.uidvalidity() == uidvalidity
    assert dovecot.fetch_all("INBOX") == {1: mail(1)}
    assert dovecot.append(mail(2)) == 2


def test_tls_implicit_and_starttls_with_the_test_certificate(
    tmp_path: Path, certificate: tuple[Path, Path]
) -> None:
    server = start_dovecot(tmp_path, tls=True, certificate=certificate)
    try:
        assert server.tls_port is not None and server.cert == certificate[0]
        with server.session(tls=True) as client:  # verified against the test certificate
            assert client.has_capability("IDLE")
            client.select_folder("INBOX")
        plain = imapclient.IMAPClient("127.0.0.1", server.port, ssl=False, timeout=5)
        assert plain.has_capability("STARTTLS")
        plain.starttls(server.ssl_context())
        plain.login(server.user, server.password)
        plain.logout()
        with pytest.raises(ssl.SSLCertVerificationError):  # no trust without the test's CA
            imapclient.IMAPClient("127.0.0.1", server.tls_port, ssl=True, timeout=5,
                                  ssl_context=ssl.create_default_context())  # fmt: skip
    finally:
        server.stop()


def test_without_move_keeps_idle(tmp_path: Path) -> None:
    server = start_dovecot(tmp_path, without=("MOVE",))
    try:
        with server.session() as client:
            assert not client.has_capability("MOVE")
            assert client.has_capability("IDLE")
            assert client.has_capability("UIDPLUS")  # COPY + UID EXPUNGE still possible
        assert "MOVE" not in server.capability.split()  # type: ignore[union-attr]
    finally:
        server.stop()


def test_without_idle(tmp_path: Path) -> None:
    server = start_dovecot(tmp_path, without=("idle",))
    try:
        with server.session() as client:
            assert not client.has_capability("IDLE")
            assert client.has_capability("MOVE")
    finally:
        server.stop()


def test_without_refuses_what_it_cannot_remove(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="XYZZY"):
        start_dovecot(tmp_path, without=("XYZZY",))


def test_recreate_inbox_changes_uidvalidity_and_keeps_messages(dovecot: Dovecot) -> None:
    received = datetime(2026, 11, 20, 8, 0, tzinfo=UTC)
    with dovecot.session() as client:
        client.append("INBOX", mail(1), msg_time=received)
    dovecot.append(mail(2), flags=[imapclient.FLAGGED])
    before = dovecot.fetch_all("INBOX")
    uidvalidity = dovecot.uidvalidity()
    watching = dovecot.client()
    watching.select_folder("INBOX")

    dovecot.recreate_inbox()

    assert dovecot.uidvalidity() == uidvalidity + 1
    after = dovecot.fetch_all("INBOX")
    assert list(after.values()) == list(before.values())  # same bytes, same order
    assert min(after) > max(before)  # new UIDs: old ones now mean nothing
    first, second = sorted(after)
    with dovecot.session() as client:
        client.normalise_times = False
        client.select_folder("INBOX", readonly=True)
        data = client.fetch([first, second], ["FLAGS", "INTERNALDATE"])
    assert imapclient.FLAGGED not in data[first][b"FLAGS"]
    assert imapclient.FLAGGED in data[second][b"FLAGS"]
    assert data[first][b"INTERNALDATE"] == received
    with pytest.raises(IMAPClientAbortError):  # Dovecot drops sessions on the old UIDVALIDITY
        watching.noop()
        watching.search(["ALL"])


def test_missing_dovecot_fails_with_install_hint(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.setattr(dovecot_module, "SBIN_PATH", str(tmp_path))
    with pytest.raises(DovecotError, match="dovecot-imapd"):
        start_dovecot(tmp_path)
