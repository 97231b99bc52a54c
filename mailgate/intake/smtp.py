"""SMTP intake: aiosmtpd in front of the pipeline, with the promises an MTA relies on.

- RCPT is accepted only for the support address and its plus-addresses: this
  listener delivers to us and relays nothing (550 5.1.1 otherwise).
- SIZE is announced; a message over the limit gets 552 5.3.4, at MAIL when
  the client declares it and after DATA otherwise; so does one that runs well
  past the SIZE it declared (budget.py). aiosmtpd stops keeping the bytes once
  the limit is passed, so the excess is never held in memory.
- 250 is written only after `process` returned, that is after the message's
  unit of work has committed; a temporary failure (database, disk, a slow
  pipeline) is 451 4.3.0 so the sender retries, and a retry of a stored
  message is recognised as a duplicate.
- Limits: recipients per message (452 4.5.3 beyond), connections in total
  and per client address (421 4.7.0 beyond), a call budget per command
  (421), and aiosmtpd's timeout, which also bounds a DATA transfer. Large
  messages take turns within `memory_budget_mb` (budget.py).
- Optional STARTTLS (the operator's certificate and key) and AUTH, only over
  TLS, for a trusted relay.

The pipeline is synchronous (SQLAlchemy); it runs in a small thread pool so a
slow commit never stalls the event loop, and at most `max_parallel_messages`
messages are processed at once.

`MAILGATE_FAULT` (tests only, see `faults.py`) kills the daemon at a chosen crash point.
"""

from __future__ import annotations

import asyncio
import errno
import functools
import hmac
import logging
import re
import socket
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from aiosmtpd.smtp import (
    SMTP,
    AuthResult,
    Envelope,
    LoginPassword,
    Session,
    TLSSetupException,
)

from mailgate.app import App
from mailgate.config import ConfigError
from mailgate.config import SmtpIntake as SmtpSettings
from mailgate.intake.budget import MemoryBudget, allowed_bytes, declared_size
from mailgate.intake.faults import Fault, in_pipeline
from mailgate.intake.smtp_files import load_users, tls_context
from mailgate.pipeline.message import Envelope as MailEnvelope
from mailgate.pipeline.parse.addresses import normalise_address
from mailgate.pipeline.process import Result, TemporaryFailure, process

log = logging.getLogger("mailgate.smtp")

# aiosmtpd's fixed replies, given the enhanced status codes of RFC 3463.
TOO_MUCH_DATA = "552 Error: Too much mail data"
_ENHANCED_REPLIES = {
    TOO_MUCH_DATA: "552 5.3.4 Message too big for this system",
    "552 Error: message size exceeds fixed maximum message size": (
        "552 5.3.4 Message size exceeds the fixed maximum message size"
    ),
}
TEMPFAIL = "451 4.3.0 Temporary failure, please try again later"


def our_recipient(address: str, support_address: str) -> str | None:
    """The support address or one of its plus-addresses (tokens, VERP), as the
    pipeline compares it (lower case, an IDN domain as A-labels); else None.

    The settings hold an IDN domain as A-labels; a client using SMTPUTF8 (which
    we announce) may name it in Unicode, `support@bücher.example`: the same
    mailbox, refused with 550 until the two were compared in one form."""
    normal = normalise_address(address)
    if normal is None:
        return None
    local, _, domain = normal.rpartition("@")
    our_local, _, our_domain = support_address.lower().rpartition("@")
    if domain != our_domain:
        return None
    return normal if local == our_local or local.startswith(our_local + "+") else None


def echoed(address: str) -> str:
    """A client's address fit to quote in a reply: aiosmtpd hands on bytes that
    are not UTF-8 as surrogates, which the reply cannot encode (the client got
    "500 Error: (UnicodeEncodeError)" instead of 550, and we a traceback)."""
    return address.encode("utf-8", "surrogateescape").decode("utf-8", "replace")


class MessageRunner:
    """Runs the pipeline for one message off the event loop, with a deadline."""

    def __init__(
        self,
        app: Callable[[], App],
        workers: int,
        reply_timeout: float,
        fault: Fault | None = None,
    ) -> None:
        self._app = app
        self.fault = fault
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="pipeline")
        self._reply_timeout = reply_timeout
        self.in_flight: set[asyncio.Future[None]] = set()
        self.stopping = False
        self.outcomes: Counter[str] = Counter()  # since start, for the systemd status line

    async def run(self, raw: bytes, envelope: MailEnvelope) -> Result:
        loop = asyncio.get_running_loop()
        # In flight until our caller has the result, not only until the pipeline
        # is done: the caller writes its 250 in the same step of the event loop,
        # so `drain` resumes only after the reply is out, and the 421 at shutdown
        # cannot overtake it (the sender would deliver a stored message again).
        answered = loop.create_future()
        self.in_flight.add(answered)
        try:
            future = loop.run_in_executor(self._pool, self._process, raw, envelope)
            # shield: on timeout the commit may still finish; a retry is then a duplicate.
            return await asyncio.wait_for(asyncio.shield(future), self._reply_timeout)
        finally:
            self.in_flight.discard(answered)
            answered.set_result(None)

    def _process(self, raw: bytes, envelope: MailEnvelope) -> Result:
        # Messages still waiting for a worker when we stop are refused with
        # 451 at once; only those already in the pipeline are waited for.
        if self.stopping:
            raise TemporaryFailure("shutting down")
        with in_pipeline(self.fault, raw):
            result = process(self._app(), raw, envelope)
        self.outcomes[result.outcome] += 1
        return result

    async def drain(self, timeout: float) -> None:
        self.stopping = True
        if self.in_flight:
            await asyncio.wait(set(self.in_flight), timeout=timeout)

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)


class Handler:
    """aiosmtpd hooks: who may receive mail here, and what happens to it."""

    def __init__(self, intake: SmtpListener) -> None:
        self.intake = intake

    async def handle_RCPT(
        self, server: SMTP, session: Session, envelope: Envelope, address: str, options: list[str]
    ) -> str:
        support = self.intake.app().settings.support_address
        ours = our_recipient(address, support)
        if ours is None:
            return f"550 5.1.1 <{echoed(address)}>: recipient not accepted here (no relaying)"
        if len(envelope.rcpt_tos) >= self.intake.settings.max_recipients:
            return "452 4.5.3 Too many recipients"
        envelope.rcpt_tos.append(ours)
        return "250 2.1.5 OK"

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        raw = bytes(envelope.original_content or b"")
        peer = session.peer[0] if isinstance(session.peer, tuple) else str(session.peer)
        mail_envelope = MailEnvelope(
            source="smtp",
            mail_from=envelope.mail_from or "",
            rcpt_to=tuple(envelope.rcpt_tos),
            client_address=peer,
            helo=session.host_name,
            trusted_authserv_ids=tuple(self.intake.settings.trusted_authserv_ids),
        )
        try:
            result = await self.intake.runner.run(raw, mail_envelope)
        except TemporaryFailure as exc:
            log.warning("451 to %s: %s", peer, exc)
            return TEMPFAIL
        except TimeoutError:
            log.warning("451 to %s: the pipeline took longer than the reply timeout", peer)
            return TEMPFAIL
        except Exception:  # noqa: BLE001 - never 250 for what we could not store
            log.exception("451 to %s: unexpected error while processing a message", peer)
            return TEMPFAIL
        if self.intake.runner.fault is not None:
            self.intake.runner.fault.reached("after_commit", raw)
        ticket = f" {result.ticket}" if result.ticket else ""
        return f"250 2.0.0 Ok: {result.outcome}{ticket} (#{result.ingest_id})"


class Connection(SMTP):
    """One SMTP session; admitted only within the connection limits."""

    # RFC 5321 asks for lines of 1000 octets, and aiosmtpd answers a longer one
    # with a 500, which bounces the mail. Generators of HTML mail write single
    # lines of tens of kilobytes, and Postfix and Exim take them: so do we, up
    # to a bound that keeps one line's buffer small beside the memory budget
    # (aiosmtpd reads command lines under the same limit, before any DATA).
    line_length_limit = 256 * 1024

    def __init__(self, intake: SmtpListener, **kwargs: Any) -> None:
        super().__init__(intake.handler, **kwargs)
        self.intake = intake
        self.client: str | None = None
        self.held_to_declared_size = False  # the DATA being read is limited by a declared SIZE

    async def push(self, status: Any) -> None:
        if status == TOO_MUCH_DATA and self.held_to_declared_size:
            status = "552 5.3.4 Message larger than the SIZE its client declared"
        elif isinstance(status, str):
            status = _ENHANCED_REPLIES.get(status, status)
        await super().push(status)

    async def handle_exception(self, error: Exception) -> str:
        # A client whose TLS handshake fails after STARTTLS (an old TLS version,
        # a scanner, plain text after the 220) is everyday traffic on an MX:
        # one line, not an ERROR traceback per connection. aiosmtpd closes it.
        if isinstance(error, TLSSetupException):
            log.warning("STARTTLS with %s failed: %s", self.client, tls_failure(error))
            return "454 4.7.0 TLS handshake failed"  # not sent: the connection is closed
        return await super().handle_exception(error)

    async def smtp_STARTTLS(self, arg: str) -> None:
        # RFC 3207 4.2: no STARTTLS once TLS is active. aiosmtpd answered 220 and
        # layered a second TLS inside the first, which asyncio cannot do: the
        # client was cut off and the log got an ERROR traceback. Postfix and Exim
        # answer 554 and keep the session.
        if self._tls_protocol is not None:
            await self.push("554 5.5.1 Error: TLS already active")
            return
        await super().smtp_STARTTLS(arg)

    async def smtp_MAIL(self, arg: str | None) -> None:
        if arg and not declared_size_readable(arg):
            await self.push("501 5.5.4 Syntax: MAIL FROM: <address> [SP <mail-parameters>]")
            return
        await super().smtp_MAIL(arg)

    async def smtp_DATA(self, arg: str) -> None:
        # Before the 354: a large message waits here for its share of memory,
        # and may then send no more than it reserved (aiosmtpd stops keeping
        # the bytes past data_size_limit and answers 552 after the dot).
        options = self.envelope.mail_options if self.envelope else []
        most = self.data_size_limit or 0
        allowed = allowed_bytes(declared_size(options), most)
        cost = self.intake.budget.cost(allowed)
        await self.intake.budget.reserve(cost)
        self.data_size_limit, self.held_to_declared_size = allowed, allowed < most
        try:
            await super().smtp_DATA(arg)
        finally:
            self.data_size_limit, self.held_to_declared_size = most, False
            await self.intake.budget.release(cost)

    async def _handle_client(self) -> None:
        # aiosmtpd's per-session coroutine (private, but the one place that
        # runs once per connection before the greeting): admit or refuse here.
        if self in self.intake.connections:  # implicit TLS: admitted before its handshake
            await super()._handle_client()
            return
        peer = self.session.peer if self.session else None
        self.client = peer[0] if isinstance(peer, tuple) else str(peer)
        refusal = self.intake.admit(self)
        if refusal:
            log.warning("refused connection from %s: %s", self.client, refusal)
            await self.push(f"421 4.7.0 {refusal}, try again later")
            assert self.transport is not None
            self.transport.close()
            return
        await super()._handle_client()

    def connection_lost(self, error: Exception | None) -> None:
        self.intake.release(self)
        if self.session is None:  # implicit TLS whose handshake failed: no session began
            return
        super().connection_lost(error)


class ImplicitTlsGate(asyncio.Protocol):
    """Accepts a connection on `tls_port` and counts it at once, before its handshake.

    With `create_server(ssl=...)` a connection reached the limits only after
    its handshake: TCP connections that never sent a ClientHello were held
    (60 s each) uncounted, and a thousand of them from one address took every
    file descriptor, so that the plain port stopped accepting mail too.
    """

    def __init__(self, intake: SmtpListener) -> None:
        self.intake = intake

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        transport.pause_reading()  # the ClientHello is for the TLS layer start_tls adds
        connection = self.intake.new_connection(implicit_tls=True)
        peer = transport.get_extra_info("peername")
        connection.client = peer[0] if isinstance(peer, tuple) else str(peer)
        refusal = self.intake.admit(connection)
        if refusal:  # no reply: the client expects TLS, not a plain 421
            log.warning("refused connection from %s: %s", connection.client, refusal)
            transport.abort()
            return
        handshake = asyncio.ensure_future(self.intake.start_tls(transport, connection))
        self.intake.handshakes.add(handshake)
        handshake.add_done_callback(self.intake.handshakes.discard)

    def data_received(self, data: bytes) -> None:  # reading is paused until TLS is on
        pass


class SmtpListener:
    """The listening socket and the sessions it admitted."""

    def __init__(
        self,
        app: Callable[[], App],
        settings: SmtpSettings,
        base_dir: Path,
        fault: Fault | None = None,
    ) -> None:
        self.app = app
        self.settings = settings
        self.handler = Handler(self)
        self.runner = MessageRunner(
            app, settings.max_parallel_messages, settings.reply_timeout_seconds, fault
        )
        self.connections: set[Connection] = set()
        self.handshakes: set[asyncio.Future[None]] = set()  # implicit TLS, being negotiated
        self.per_client: Counter[str] = Counter()
        # build_app checked these files already; read again here, a problem is still one line.
        source = app().settings.source
        self.tls_context = tls_context(settings, base_dir, source)
        self.users = load_users(settings.auth_users_file, base_dir, source)
        self.servers: list[asyncio.Server] = []
        self.closing = False
        self.budget = MemoryBudget(settings.memory_budget_mb * 1024 * 1024)

    async def start(self) -> list[tuple[str, int]]:
        """Listen on `port`, and with implicit TLS on `tls_port` when set; the addresses."""
        s = self.settings
        try:
            await self._listen("port", s.port, self.new_connection)
            if s.tls_port is not None and self.tls_context is not None:
                await self._listen("tls_port", s.tls_port, functools.partial(ImplicitTlsGate, self))
        except ConfigError:
            for server in self.servers:
                server.close()
            self.servers = []
            raise
        return [server.sockets[0].getsockname()[:2] for server in self.servers]

    async def _listen(self, key: str, port: int, factory: Callable[[], asyncio.Protocol],
                      **kwargs: Any) -> None:  # fmt: skip
        """Bind host:port, or ConfigError: one line naming the key and why (a port taken)."""
        host = self.settings.host
        try:
            server = await asyncio.get_running_loop().create_server(factory, host, port, **kwargs)
        except OSError as exc:
            source = self.app().settings.source
            problem = listen_problem(source, f"intake.smtp.{key}", host, port, exc)
            raise ConfigError([problem]) from None
        self.servers.append(server)

    def new_connection(self, implicit_tls: bool = False) -> Connection:
        s = self.settings
        limits = {
            "MAIL": s.max_messages_per_connection,
            "DATA": s.max_messages_per_connection,
            "RCPT": s.max_messages_per_connection * s.max_recipients,
            "RSET": s.max_messages_per_connection,
            "*": s.command_call_limit,
        }
        return Connection(
            self,
            data_size_limit=s.max_message_bytes,
            enable_SMTPUTF8=True,
            hostname=self.app().settings.support_domain,
            ident="mailgate",
            # Over implicit TLS the session is already encrypted: no STARTTLS.
            tls_context=None if implicit_tls else self.tls_context,
            timeout=s.timeout_seconds,
            auth_require_tls=not implicit_tls,  # implicit TLS is TLS already
            authenticator=self._authenticate if self.users else None,
            command_call_limit=limits,
        )

    async def start_tls(self, transport: asyncio.Transport, connection: Connection) -> None:
        """The handshake of an admitted implicit-TLS connection, then its SMTP session."""
        loop = asyncio.get_running_loop()
        try:
            tls = await loop.start_tls(
                transport,
                connection,
                self.tls_context,  # type: ignore[arg-type] - tls_port needs a certificate
                server_side=True,
                ssl_handshake_timeout=min(self.settings.timeout_seconds, 60),
            )
        except OSError as exc:  # SSLError, a reset, the handshake timeout
            self.release(connection)
            transport.abort()
            log.warning("TLS handshake with %s failed: %s", connection.client, ssl_reason(exc))
            return
        connection.connection_made(tls)

    def admit(self, connection: Connection) -> str | None:
        client = connection.client or "?"
        if self.closing:
            return "shutting down"
        if len(self.connections) >= self.settings.max_connections:
            return "too many connections"
        if self.per_client[client] >= self.settings.max_connections_per_client:
            return "too many connections from your address"
        self.connections.add(connection)
        self.per_client[client] += 1
        return None

    def release(self, connection: Connection) -> None:
        if connection in self.connections:
            self.connections.discard(connection)
            self.per_client[connection.client or "?"] -= 1
            if self.per_client[connection.client or "?"] <= 0:
                del self.per_client[connection.client or "?"]

    def _authenticate(
        self, server: SMTP, session: Session, envelope: Envelope, mechanism: str, data: Any
    ) -> AuthResult:
        if isinstance(data, LoginPassword):
            user = data.login.decode("utf-8", "replace")
            expected = self.users.get(user)
            if expected is not None and _same(expected, data.password.decode("utf-8", "replace")):
                return AuthResult(success=True, auth_data=user)
        return AuthResult(success=False, handled=False)

    async def stop(self, grace: float) -> None:
        """Stop listening; let messages being processed finish, then close every session.

        A session cut in the middle of DATA never got a 250, so its sender retries.
        """
        self.closing = True
        for server in self.servers:
            server.close()
        for handshake in list(self.handshakes):  # no session yet: nothing to finish
            handshake.cancel()
        await self.runner.drain(grace)
        for connection in list(self.connections):
            if connection.transport is not None:
                # RFC 5321 3.8: a server may announce 421 at any time before closing.
                connection.transport.write(b"421 4.3.2 Service shutting down\r\n")
                connection.transport.close()
        self.runner.close()


_SIZE_PARAMETER = re.compile(r"(?<!\S)SIZE=(\S+)", re.IGNORECASE)


def declared_size_readable(arg: str) -> bool:
    """False for a SIZE= that aiosmtpd takes for digits but cannot read as a number.

    It tests `str.isdigit()`, true for "²" or "①", then calls int(): a ValueError,
    answered "500 Error: (ValueError) ..." with a traceback in our log each time.
    """
    return all(not value.isdigit() or value.isdecimal() for value in _SIZE_PARAMETER.findall(arg))


def ssl_reason(error: BaseException | None) -> str:
    """What went wrong in a handshake, for one log line."""
    reason = getattr(error, "reason", None)  # an SSLError's short name, e.g. UNSUPPORTED_PROTOCOL
    if reason:
        return str(reason).lower().replace("_", " ")
    return str(error or "") or "the client closed the connection"


def tls_failure(error: TLSSetupException) -> str:
    """What went wrong in a STARTTLS handshake, from the SSL error aiosmtpd wraps."""
    return ssl_reason(error.__cause__)


def _same(a: str, b: str) -> bool:
    return hmac.compare_digest(a.encode(), b.encode())  # no timing hint about the password


def listen_problem(source: str, key: str, host: str, port: int, exc: OSError) -> str:
    """Why a listening socket could not be opened, for an operator: one line."""
    where = f"{source}: {key}: cannot listen on {host}:{port}"
    if exc.errno == errno.EADDRINUSE:
        return (f"{source}: {key}: {host}:{port} already in use (another mailgate or an MTA "
                "listens there: stop it, or choose another port)")  # fmt: skip
    if exc.errno == errno.EACCES:
        return (f"{where}: permission denied (a port below 1024 needs CAP_NET_BIND_SERVICE, "
                "see systemd/mailgate.service; or choose a port of 1024 or above)")  # fmt: skip
    if exc.errno == errno.EADDRNOTAVAIL or isinstance(exc, socket.gaierror):
        host_key = key.rpartition(".")[0] + ".host"
        return f"{where}: {exc.strerror or exc} ({host_key} must be an address of this machine)"
    return f"{where}: {exc.strerror or exc}"
