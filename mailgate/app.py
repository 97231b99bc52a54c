"""Everything a unit of work needs, built once from the settings."""

from __future__ import annotations

import hashlib
import hmac
import re
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from functools import cached_property

from sqlalchemy import Engine
from sqlalchemy.orm import Session, sessionmaker

from mailgate.clock import Clock, system_clock
from mailgate.config import Settings, read_secret
from mailgate.outbound.mailer import STAFF_ONLY, Mailer
from mailgate.outbound.outbox import RetryPolicy
from mailgate.outbound.templates import TemplateSet
from mailgate.outbound.transports import MaildirTransport, SmtpTransport, Transport
from mailgate.pipeline.authenticity import DnsFunc
from mailgate.pipeline.parse import Limits, limits_from
from mailgate.pipeline.rules import RuleSet, load_rules
from mailgate.pipeline.thread import tag_pattern
from mailgate.sla.policy import SlaPolicy
from mailgate.store.blobs import Blobs, BlobStore, DatabaseBlobStore
from mailgate.store.db import ensure_schema, make_engine, session_factory
from mailgate.tickets.tokens import Signer, load_or_create_secret


@dataclass
class App:
    settings: Settings
    clock: Clock = system_clock
    migrate: bool = True
    # Called after a commit that queued mail, so the daemon's sender wakes at once.
    on_outbox: list[Callable[[], None]] = field(default_factory=list)
    # DNS TXT lookups for DKIM and DMARC (dkimpy's signature); None: the system resolver.
    dns: DnsFunc | None = None
    _lock: threading.Lock = field(default_factory=threading.Lock)

    @cached_property
    def engine(self) -> Engine:
        engine = make_engine(self.settings.database_url)
        if self.migrate:
            ensure_schema(engine)
        return engine

    @cached_property
    def sessions(self) -> sessionmaker[Session]:
        return session_factory(self.engine)

    @cached_property
    def blobs(self) -> Blobs:
        choice = self.settings.blob_store
        if choice == "auto":
            choice = "database" if self.engine.dialect.name == "postgresql" else "directory"
        if choice == "database":
            return DatabaseBlobStore(self.sessions)
        return BlobStore(self.settings.path(self.settings.data_dir) / "blobs")

    @cached_property
    def signer(self) -> Signer:
        return Signer(load_or_create_secret(self.settings.path(self.settings.tickets.secret_file)))

    @cached_property
    def log_key(self) -> bytes:
        """Keys the hashes that stand for addresses in the logs (observability.py)."""
        return hmac.new(self.signer.secret, b"mailgate log addresses", hashlib.sha256).digest()

    @cached_property
    def templates(self) -> TemplateSet:
        return TemplateSet(self.settings.path(self.settings.templates_dir))

    @cached_property
    def rules(self) -> RuleSet:
        """The priority rules; RulesError (file:line problems) when a file is broken."""
        folder, source = self.settings.path(self.settings.rules_dir), self.settings.source
        return load_rules(folder, setting=f"{source}: rules_dir")

    @cached_property
    def parse_limits(self) -> Limits:
        return limits_from(self.settings.hygiene.limits)

    @property
    def authserv_id(self) -> str:
        """Ours, in the Authentication-Results we store; forged copies are removed."""
        return self.settings.hygiene.authentication.authserv_id or self.settings.support_domain

    @cached_property
    def sla(self) -> SlaPolicy:
        return SlaPolicy(self.settings.sla)

    @cached_property
    def mailer(self) -> Mailer:
        return Mailer(self.settings, self.templates, self.signer)

    @cached_property
    def tag_pattern(self) -> re.Pattern[str]:
        return tag_pattern(self.settings.tickets.number_format)

    @cached_property
    def retry_policy(self) -> RetryPolicy:
        out = self.settings.outbound
        return RetryPolicy(out.max_attempts, out.retry_base_seconds, out.retry_max_seconds)

    def transport(self) -> Transport:
        out = self.settings.outbound
        if out.transport == "maildir":
            return MaildirTransport(self.settings.path(out.maildir))
        password = read_secret(
            file=out.smtp.password_file,
            env=out.smtp.password_env,
            settings=self.settings,
            key="outbound.smtp.password",
        )
        return SmtpTransport(
            out.smtp.host,
            out.smtp.port,
            out.smtp.tls,
            username=out.smtp.username,
            password=password,
            timeout=out.smtp.timeout_seconds,
        )

    def now(self) -> datetime:
        return self.clock()

    def send_outbox(self, after_send: Callable[[bytes], object] | None = None) -> int:
        """One sending round: everything due now, over one relay session; mails handled."""
        from mailgate.outbound.outbox import send_due

        transport, total = self.transport(), 0
        try:
            while handled := send_due(
                self.sessions,
                transport,
                self.clock,
                self.retry_policy,
                notify=self.mailer.notify_delivery_failure,
                later=STAFF_ONLY,
                after_send=after_send,
            ):
                total += handled
        finally:
            transport.close()
        return total

    def notify_outbox(self) -> None:
        for callback in self.on_outbox:
            callback()
