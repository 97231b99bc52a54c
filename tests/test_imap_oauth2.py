"""IMAP XOAUTH2 against a real Dovecot whose oauth2 passdb asks a local introspection endpoint.

The token is whatever the operator's `oauth2_token_command` prints; Dovecot
(tests/dovecot.py, `oauth2_introspection_url=...`) checks it with an RFC 7662
introspection request to the `Introspection` server below, which accepts one
token and records every token it was asked about. The password is never given
to these mailboxes, and Dovecot's passwd-file passdb serves only PLAIN and
LOGIN, so a login that succeeds here went through XOAUTH2 with that token.
"""

from __future__ import annotations

import functools
import json
import logging
import shlex
import sys
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import imapclient
import pytest
from imapclient.exceptions import LoginError

import mailgate.intake.imap as imap_module
from mailgate.checks import check_imap
from mailgate.config import ImapIntake, load_settings
from mailgate.intake.imap import Mailbox
from mailgate.store.models import IngestRecord, Ticket
from tests.conftest import Clockwork, Installation, install_at
from tests.dovecot import Dovecot, start_dovecot
from tests.test_imap import PROCESSED, Running, count, eventually, held, mail, settings_for

GOOD_TOKEN = "tok-123"
BAD_TOKEN = "tok-expired-456"


class Introspection:
    """An RFC 7662 token introspection endpoint on 127.0.0.1 that accepts one token.

    `{"active": true, "username": <user>}` for `good`, `{"active": false}` for any
    other token. The token is taken from a form body (`token=...`, what Dovecot 2.3
    sends with introspection_mode = post), a query string (mode get) or an
    `Authorization: Bearer` header (mode auth); `tokens` lists each one asked about.
    """

    def __init__(self, user: str, good: str = GOOD_TOKEN) -> None:
        self.user = user
        self.good = good
        self.tokens: list[str] = []
        self.requests: list[dict[str, Any]] = []
        self._lock = threading.Lock()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self._server.daemon_threads = True
        # A short poll interval: shutdown() returns within 0.05 s, not 0.5 s.
        serve = functools.partial(self._server.serve_forever, poll_interval=0.05)
        self._thread = threading.Thread(target=serve, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}/introspect"

    def start(self) -> Introspection:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(5)

    def answer(self, token: str | None) -> dict[str, Any]:
        if token is not None and token == self.good:
            return {"active": True, "username": self.user}
        return {"active": False}

    def _record(self, request: dict[str, Any], token: str | None) -> None:
        with self._lock:
            self.requests.append(request)
            if token is not None:
                self.tokens.append(token)

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        endpoint = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 - http.server's naming
                length = int(self.headers.get("Content-Length") or 0)
                self._reply(self.rfile.read(length) if length else b"")

            def do_GET(self) -> None:  # noqa: N802
                self._reply(b"")

            def _reply(self, body: bytes) -> None:
                token = _token_of(self.path, self.headers.get("Authorization"), body)
                endpoint._record({"method": self.command, "path": self.path,
                                  "headers": dict(self.headers), "body": body}, token)  # fmt: skip
                payload = json.dumps(endpoint.answer(token)).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
                pass  # no access log on the test's stderr

        return Handler


def _token_of(path: str, authorization: str | None, body: bytes) -> str | None:
    if authorization and authorization.lower().startswith("bearer "):
        return authorization[len("bearer ") :].strip()
    form = parse_qs(body.decode("utf-8", "replace"), keep_blank_values=True)
    if "token" in form:
        return form["token"][0]
    query = urlsplit(path).query
    if query:
        # introspection_mode = get appends the token to the URL as it is.
        return parse_qs(query).get("token", [query])[0]
    return None


def printing(token: str) -> str:
    """An `oauth2_token_command` that prints `token` (and a newline, stripped by mailgate)."""
    return shlex.join([sys.executable, "-c", f"print({token!r})"])


@pytest.fixture
def introspection() -> Iterator[Introspection]:
    endpoint = Introspection("support@example.com").start()
    yield endpoint
    endpoint.stop()


@pytest.fixture
def oauth_dovecot(tmp_path: Path, introspection: Introspection) -> Iterator[Dovecot]:
    # auth_delays=False: the refused logins below would otherwise slow every later
    # login from 127.0.0.1 (the fixture's own PLAIN helpers too) by up to 15 s.
    server = start_dovecot(tmp_path / "dovecot", oauth2_introspection_url=introspection.url,
                           auth_delays=False)  # fmt: skip
    assert server.user == introspection.user
    yield server
    server.stop()


@pytest.fixture(autouse=True)
def no_password(monkeypatch: pytest.MonkeyPatch) -> None:
    """No password anywhere: a login can only be the token's."""
    monkeypatch.delenv("MAILGATE_TEST_IMAP_PASSWORD", raising=False)


def oauth2_settings(server: Dovecot, token: str, **changes: Any) -> dict[str, Any]:
    return settings_for(server, password_env=None, oauth2_token_command=printing(token),
                        **changes)  # fmt: skip


def logins(server: Dovecot, method: str) -> int:
    """Successful logins of the test user by SASL `method`, from Dovecot's log."""
    line = f"Login: user=<{server.user}>, method={method},"
    return sum(line in entry for entry in server.log_path.read_text().splitlines())


def test_the_fixture_offers_xoauth2_and_oauthbearer_and_the_password_only_for_plain(
    oauth_dovecot: Dovecot, introspection: Introspection
) -> None:
    server = oauth_dovecot
    conf = server.oauth2_config.read_text()
    assert "introspection_mode = post" in conf and introspection.url in conf
    client = imapclient.IMAPClient("127.0.0.1", server.port, ssl=False, timeout=10)
    try:
        for mechanism in (b"AUTH=XOAUTH2", b"AUTH=OAUTHBEARER", b"AUTH=PLAIN"):
            assert mechanism in client.capabilities()
        client.oauthbearer_login(server.user, GOOD_TOKEN)
    finally:
        client.logout()
    client = imapclient.IMAPClient("127.0.0.1", server.port, ssl=False, timeout=10)
    with pytest.raises(LoginError):
        client.login(server.user, GOOD_TOKEN)  # a token is no password
    client.shutdown()
    client = imapclient.IMAPClient("127.0.0.1", server.port, ssl=False, timeout=10)
    with pytest.raises(LoginError):
        client.oauth2_login(server.user, server.password)  # nor a password a token
    client.shutdown()
    assert introspection.tokens == [GOOD_TOKEN, server.password]
    request = introspection.requests[0]
    assert request["method"] == "POST" and request["path"] == "/introspect"
    assert request["body"].startswith(f"token={GOOD_TOKEN}&".encode())
    assert "Authorization" not in request["headers"]
    assert server.uids() == []  # the fixture's helpers still log in with the password
    assert logins(server, "OAUTHBEARER") == 1 and logins(server, "PLAIN") == 1


def test_xoauth2_with_the_commands_token_files_the_mail(
    inst: Installation, oauth_dovecot: Dovecot, introspection: Introspection
) -> None:
    server = oauth_dovecot
    server.append(mail(1))
    with Running(inst, oauth2_settings(server, GOOD_TOKEN, idle=False)):
        eventually(lambda: held(server, PROCESSED) == 1, what="the mail filed")
    assert server.uids("INBOX") == []
    assert count(inst, Ticket) == 1
    assert count(inst, IngestRecord, IngestRecord.source == "imap") == 1
    # The token Dovecot had checked is the one the command printed (no newline),
    # and the mailbox logged in with XOAUTH2, not with a password.
    assert introspection.tokens and set(introspection.tokens) == {GOOD_TOKEN}
    assert logins(server, "XOAUTH2") >= 1


def test_a_refused_token_raises_login_error(
    inst: Installation, oauth_dovecot: Dovecot, introspection: Introspection
) -> None:
    box = Mailbox(lambda: inst.app, ImapIntake.model_validate(
        oauth2_settings(oauth_dovecot, BAD_TOKEN)))  # fmt: skip
    with pytest.raises(LoginError, match="AUTHENTICATIONFAILED"):
        box.connect()
    assert introspection.tokens == [BAD_TOKEN]
    assert logins(oauth_dovecot, "XOAUTH2") == 0


def test_a_refused_token_is_one_warning_over_several_retries(
    inst: Installation,
    oauth_dovecot: Dovecot,
    introspection: Introspection,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(imap_module, "backoff", lambda attempt, rng: 0.05)  # not 1, 2, 4 s...
    caplog.set_level(logging.INFO, logger="mailgate.imap")
    with Running(inst, oauth2_settings(oauth_dovecot, BAD_TOKEN)):
        # Dovecot answers a refused login within 0.5 s even with auth_delays=False.
        eventually(lambda: len(introspection.tokens) >= 3, timeout=5, what="3 attempts")
    assert set(introspection.tokens) == {BAD_TOKEN}  # the command runs for every attempt
    refused = [r for r in caplog.records if "login refused" in r.getMessage()]
    assert len(refused) == 1, [r.getMessage() for r in caplog.records]
    assert refused[0].levelno == logging.WARNING
    assert "127.0.0.1" in refused[0].getMessage()
    assert "AUTHENTICATIONFAILED" in refused[0].getMessage()  # Dovecot's words, passed on


def test_check_names_a_refused_token_and_passes_a_good_one(
    tmp_path: Path, oauth_dovecot: Dovecot, introspection: Introspection
) -> None:
    (tmp_path / "inst").mkdir()
    inst = install_at(tmp_path / "inst", Clockwork(), {"intake": {"imap": oauth2_settings(
        oauth_dovecot, BAD_TOKEN)}})  # fmt: skip
    problems = check_imap(load_settings(inst.settings_file))
    assert len(problems) == 1 and "login refused" in problems[0], problems
    assert "check the password or token" in problems[0]
    assert introspection.tokens == [BAD_TOKEN]
    install_at(tmp_path / "inst", Clockwork(), {"intake": {"imap": oauth2_settings(
        oauth_dovecot, GOOD_TOKEN)}})  # fmt: skip
    assert check_imap(load_settings(inst.settings_file)) == []
    assert introspection.tokens == [BAD_TOKEN, GOOD_TOKEN]
