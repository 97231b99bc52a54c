"""The quarantine: held mail an operator lists, reads, releases or deletes.

Quarantined mail is an ingest record with outcome `quarantined` and its raw
bytes in the blob store, so nothing is lost. Releasing is a source like the
others: the raw mail goes through the pipeline again (after a configuration
fix, a raised limit, or the operator's word that a sender is genuine), as
`source="release"`; the circuit breaker and the `require` authentication
policy do not hold it a second time, because an operator chose it. The old
record stays, marked `released`, pointing at the new one.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from mailgate.app import App
from mailgate.pipeline.message import Envelope
from mailgate.pipeline.process import RELEASE, Result, process
from mailgate.store.blobs import drop_unreferenced
from mailgate.store.models import IngestRecord


class NotQuarantined(Exception):
    """No such quarantined mail (never held, already released or deleted)."""


@dataclass(frozen=True)
class Held:
    id: int
    received_at: datetime
    source: str
    sender: str | None
    subject: str
    reason: str
    message_id: str | None
    size: int | None  # bytes of the raw mail; None when its file is gone

    def as_dict(self) -> dict[str, Any]:
        return {**self.__dict__, "received_at": self.received_at.isoformat()}


def held(app: App, *, limit: int = 100) -> list[Held]:
    with app.sessions() as session:
        query = (
            select(IngestRecord)
            .where(IngestRecord.outcome == "quarantined")
            .order_by(IngestRecord.id.desc())
            .limit(limit)
        )
        return [_held(app, r) for r in session.scalars(query)]


def one(app: App, record_id: int) -> tuple[Held, bytes | None]:
    """The held mail and its raw bytes (None if the file is missing)."""
    with app.sessions() as session:
        record = _quarantined(session, record_id)
        return _held(app, record), _raw(app, record)


def release(app: App, record_id: int) -> Result:
    """Run the held mail through the pipeline again; its new outcome."""
    with app.sessions() as session:
        record = _quarantined(session, record_id)
        raw = _raw(app, record)
        envelope = _envelope(record.envelope)
    if raw is None:
        raise NotQuarantined(f"quarantined mail #{record_id} has lost its raw file")
    try:
        return process(app, raw, envelope, release_of=record_id)
    except LookupError as exc:  # released or deleted meanwhile by someone else
        raise NotQuarantined(str(exc)) from None


def delete(app: App, record_id: int, *, now: datetime, by: str) -> None:
    """Drop the held mail's bytes; the record stays, saying who decided what when."""
    with app.sessions.begin() as session:
        record = _quarantined(session, record_id)
        sha = record.raw_sha256
        record.outcome = "deleted"
        record.reason = f"deleted by {by} on {now:%Y-%m-%d %H:%M} UTC; was: {record.reason}"
        record.raw_sha256 = None
        # The same bytes may also be another record's or an article's.
        drop_unreferenced(session, app.blobs, [sha] if sha else [])


def _quarantined(session: Session, record_id: int) -> IngestRecord:
    record = session.get(IngestRecord, record_id)
    if record is None or record.outcome != "quarantined":
        raise NotQuarantined(f"no quarantined mail #{record_id} (see 'mailgate quarantine list')")
    return record


def _held(app: App, record: IngestRecord) -> Held:
    size = app.blobs.size(record.raw_sha256) if record.raw_sha256 else None
    return Held(
        record.id,
        record.received_at,
        record.source,
        record.sender,
        record.subject,
        record.reason,
        record.message_id,
        size,
    )


def _raw(app: App, record: IngestRecord) -> bytes | None:
    if not record.raw_sha256:
        return None
    try:
        return app.blobs.get(record.raw_sha256)
    except FileNotFoundError:
        return None


def _envelope(stored: dict[str, Any]) -> Envelope:
    return Envelope(
        source=RELEASE,
        mail_from=stored.get("mail_from"),
        rcpt_to=tuple(stored.get("rcpt_to") or ()),
        client_address=stored.get("client_address"),
        helo=stored.get("helo"),
    )
