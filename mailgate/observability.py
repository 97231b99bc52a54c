"""Logs and metrics: what an operator reads in the journal and scrapes with Prometheus.

Logs go to stderr (journald captures it), as text for a terminal or as one
JSON object per line (`mailgate run --log-format json`). A log call may carry
structured fields as `extra={"mailgate": {...}}`, as the pipeline does for
every message it decides; JSON output merges them into the object, text
output appends them as `key=value`.

Addresses in log lines are replaced by a keyed hash (`addr:1f0c9a…`) unless
debug logging is on (-v): the journal is kept longer and read by more people
than the database, and holds no personal data this way. The key derives
from the token secret, so a hash is stable across restarts and instances;
`mailgate gdpr log-hash EMAIL` prints the one that stands for an address.

Metrics are off unless `metrics.enabled`; then `Metrics.start` serves them on
`metrics.host:metrics.port` from a private registry, so nothing else that
imports prometheus_client adds series to ours.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import os
import sys
import threading
from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from mailgate.privacy.pseudonyms import ADDRESS
from mailgate.store.models import OutboxMail

FIELDS_ATTR = "mailgate"  # the key of the structured fields in `extra=`
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
# Libraries that log every connection, job run or database connection at INFO:
# quiet unless -v.
CHATTY_LOGGERS = ("apscheduler", "mail.log", "alembic")


# -- logs --------------------------------------------------------------------


def address_hasher(key: bytes) -> Callable[[str], str]:
    def hashed(address: str) -> str:
        digest = hmac.new(key, address.strip().lower().encode(), hashlib.sha256)
        return "addr:" + digest.hexdigest()[:12]

    return hashed


class _Masking:
    """What the formatters do to addresses: hash them, or (debug) leave them."""

    def __init__(self) -> None:
        # Until the settings are read, a key of this process's own: still no address.
        self.hashed: Callable[[str], str] = address_hasher(os.urandom(32))
        self.enabled = True

    def __call__(self, line: str) -> str:
        if not self.enabled:
            return line
        return ADDRESS.sub(lambda m: self.hashed(m.group(0)), line)


_masking = _Masking()
# Message-IDs look like addresses but name a message, and they are how an operator
# follows one mail through the logs: these fields keep them.
MESSAGE_ID_FIELDS = frozenset({"message_id", "in_reply_to", "duplicate_of"})


def _masked_field(key: str, value: Any) -> Any:
    if key in MESSAGE_ID_FIELDS or not _masking.enabled:
        return value
    return json.loads(_masking(json.dumps(value, ensure_ascii=False, default=str)))


def set_log_key(key: bytes) -> None:
    """The installation's key, once known (cli.load_app, daemon.build_app)."""
    _masking.hashed = address_hasher(key)


def _fields(record: logging.LogRecord) -> Mapping[str, Any]:
    fields = getattr(record, FIELDS_ATTR, None)
    return fields if isinstance(fields, Mapping) else {}


def _logfmt_value(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, str):
        text = value
    elif isinstance(value, list | tuple):
        text = ",".join(str(item) for item in value)
    else:
        text = json.dumps(value, ensure_ascii=False, default=str)
    if text == "" or any(c.isspace() or c in '"=\\' for c in text):
        return json.dumps(text, ensure_ascii=False)
    return text


class TextFormatter(logging.Formatter):
    """The classic one-line format, then the structured fields as key=value."""

    def __init__(self) -> None:
        super().__init__(TEXT_FORMAT)

    def format(self, record: logging.LogRecord) -> str:
        line = _masking(super().format(record))
        fields = _fields(record)
        if not fields:
            return line
        pairs = " ".join(
            f"{key}={_logfmt_value(_masked_field(key, value))}" for key, value in fields.items()
        )
        head, sep, tail = line.partition("\n")  # keep a traceback below the fields
        return f"{head} {pairs}{sep}{tail}"


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ts, level, logger, message, then the structured fields.

    A field named like one of the four base keys is written as `mailgate_<key>`
    so that it can never hide the base key. A traceback goes in `exc`.
    """

    BASE = ("ts", "level", "logger", "message")

    def format(self, record: logging.LogRecord) -> str:
        data: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": _masking(record.getMessage()),
        }
        for key, value in _fields(record).items():
            data[f"mailgate_{key}" if key in self.BASE else str(key)] = _masked_field(key, value)
        if record.exc_info:
            data["exc"] = _masking(self.formatException(record.exc_info))
        elif record.exc_text:
            data["exc"] = _masking(record.exc_text)
        if record.stack_info:
            data["stack"] = self.formatStack(record.stack_info)
        return json.dumps(data, ensure_ascii=False, default=str)


def setup_logging(
    fmt: str = "text", verbose: bool = False, *, level: int = logging.WARNING
) -> logging.Handler:
    """Send logs to stderr in `fmt` ("text" or "json"); `verbose` means DEBUG.

    Replaces the handler an earlier call installed (so calling it again, e.g.
    in tests, does not duplicate lines) and leaves any other handler alone.
    """
    if fmt not in ("text", "json"):
        raise ValueError(f"log format {fmt!r}: expected 'text' or 'json'")
    root = logging.getLogger()
    for old in [h for h in root.handlers if getattr(h, "_mailgate", False)]:
        root.removeHandler(old)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    handler._mailgate = True  # type: ignore[attr-defined]
    root.addHandler(handler)
    root.setLevel(logging.DEBUG if verbose else level)
    _masking.enabled = not verbose  # debugging: the addresses as they are
    for name in CHATTY_LOGGERS:
        logging.getLogger(name).setLevel(logging.NOTSET if verbose else logging.WARNING)
    return handler


# -- metrics -----------------------------------------------------------------

# Label values created at zero, so that a rate() or an alert sees the series
# before the first event; other values are accepted as they come.
OUTCOMES = ("created", "threaded", "command", "rejected", "ignored", "bounce", "duplicate",
            "quarantined", "tempfail")  # fmt: skip
# The outbox's results of an attempt that did not deliver (see mailgate/outbound/outbox.py):
# retry (temporary failure, queued again), failed (refused), dead (gave up).
SEND_FAILURE_KINDS = ("retry", "failed", "dead")
WAITING = ("queued", "sending")


class Metrics:
    """mailgate's Prometheus metrics, on a registry of their own.

    The counters are fed either by calls (`observe_decision` for every message,
    `observe_send_failure` for every send attempt that did not deliver) or by
    `log_handler()`, which reads the same facts from the structured fields the
    pipeline and the outbox already log. `refresh` sets the outbox gauges from
    the database (call it every few seconds); `start` serves /metrics in a
    background thread.
    """

    def __init__(self) -> None:
        # Imported here: every `mailgate ingest` from an MTA pipe would pay for it.
        from prometheus_client import CollectorRegistry, Counter, Gauge

        self.registry = CollectorRegistry(auto_describe=True)
        self.messages = Counter(
            "mailgate_messages", "Inbound messages decided, by outcome",
            ["outcome"], registry=self.registry,
        )  # fmt: skip
        self.send_failures = Counter(
            "mailgate_outbound_send_failures",
            "Send attempts of outbound mail that did not deliver, by result: "
            "retry (temporary failure), failed (refused), dead (gave up)",
            ["kind"], registry=self.registry,
        )  # fmt: skip
        self.outbox_depth = Gauge(
            "mailgate_outbox_depth", "Outbound mails not sent yet (queued or sending)",
            registry=self.registry,
        )  # fmt: skip
        self.outbox_oldest = Gauge(
            "mailgate_outbox_oldest_queued_seconds",
            "Age of the oldest outbound mail not sent yet (queued or sending); 0 when none",
            registry=self.registry,
        )  # fmt: skip
        for outcome in OUTCOMES:
            self.messages.labels(outcome)
        for kind in SEND_FAILURE_KINDS:
            self.send_failures.labels(kind)
        self._server: Any = None
        self._thread: threading.Thread | None = None

    def observe_decision(self, outcome: str) -> None:
        self.messages.labels(outcome).inc()

    def observe_send_failure(self, kind: str) -> None:
        self.send_failures.labels(kind).inc()

    def log_handler(self) -> logging.Handler:
        """A handler that counts what the "mailgate" loggers report, for
        `logging.getLogger("mailgate").addHandler(...)`:

        - "mailgate.pipeline" records with an `outcome` field ("message
          decided", INFO) feed `observe_decision`;
        - "mailgate.outbox" records whose `result` is retry, failed or dead
          feed `observe_send_failure`.

        Records below the loggers' level are never made: keep "mailgate" at
        INFO or lower (as `mailgate run` does). A message that could not be
        stored logs no decision; count it with `observe_decision("tempfail")`.
        """
        return _CountingHandler(self)

    def refresh(self, session: Session, now: datetime) -> None:
        """Set the outbox gauges from the database (one query)."""
        count, oldest = session.execute(
            select(func.count(OutboxMail.id), func.min(OutboxMail.created_at)).where(
                OutboxMail.status.in_(WAITING)
            )
        ).one()
        self.outbox_depth.set(count)
        if oldest is None:
            self.outbox_oldest.set(0)
            return
        if isinstance(oldest, str):  # SQLite may hand an aggregate back untyped
            oldest = datetime.fromisoformat(oldest)
        if oldest.tzinfo is None:
            oldest = oldest.replace(tzinfo=UTC)  # stored as naive UTC
        self.outbox_oldest.set(max((now - oldest).total_seconds(), 0.0))

    def render(self) -> bytes:
        """The text exposition format, as served on /metrics."""
        from prometheus_client import generate_latest

        return generate_latest(self.registry)

    def start(self, host: str = "127.0.0.1", port: int = 9464) -> int:
        """Serve /metrics on host:port in a daemon thread; return the bound port.

        Port 0 picks a free one. Raises OSError when the address is taken.
        """
        from prometheus_client import start_http_server

        if self._server is not None:
            raise RuntimeError("metrics endpoint already started")
        self._server, self._thread = start_http_server(port, addr=host, registry=self.registry)
        return int(self._server.server_port)

    def stop(self) -> None:
        if self._server is None:
            return
        self._server.shutdown()
        self._server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)
        self._server = self._thread = None


class _CountingHandler(logging.Handler):
    def __init__(self, metrics: Metrics):
        super().__init__(logging.NOTSET)
        self.metrics = metrics

    def emit(self, record: logging.LogRecord) -> None:
        try:
            fields = _fields(record)
            if record.name == "mailgate.pipeline" and fields.get("outcome"):
                self.metrics.observe_decision(str(fields["outcome"]))
            elif record.name == "mailgate.outbox" and fields.get("result") in SEND_FAILURE_KINDS:
                self.metrics.observe_send_failure(str(fields["result"]))
        except Exception:  # noqa: BLE001 - metrics must never break logging
            self.handleError(record)
