"""Store an inbound mail as an article of a ticket, its attachments content-addressed."""

from __future__ import annotations

import hashlib
from datetime import datetime

from sqlalchemy.orm import Session

from mailgate.pipeline.message import ParsedMessage
from mailgate.store.blobs import Blobs
from mailgate.store.models import Article, AttachmentRow, Ticket


def store_inbound(
    session: Session,
    blobs: Blobs | None,
    ticket: Ticket,
    msg: ParsedMessage,
    raw_sha: str | None,
    *,
    author_kind: str,
    now: datetime,
    text: str | None = None,
    visibility: str = "public",
    authentication: str | None = None,
) -> Article:
    """`blobs` None: a dry run, attachments are hashed but not written.

    `text` replaces the mail's text (a staff reply without its quoted history).
    """
    article = Article(
        ticket=ticket,
        direction="in",
        author_kind=author_kind,
        author_email=msg.sender,
        author_name=msg.from_name[:200],
        visibility=visibility,
        message_id=msg.message_id,
        in_reply_to=msg.in_reply_to[0] if msg.in_reply_to else None,
        references=list(msg.references[-50:]),
        subject=msg.subject,
        text=msg.text if text is None else text,
        html=msg.html if text is None else None,
        raw_sha256=raw_sha,
        authentication=authentication,
        created_at=now,
    )
    session.add(article)
    for part in msg.attachments:
        payload = part.payload
        sha = blobs.put(payload) if blobs else hashlib.sha256(payload).hexdigest()
        article.attachments.append(
            AttachmentRow(
                filename=part.filename,
                content_type=part.content_type[:255],
                size=len(payload),
                sha256=sha,
                content_id=part.content_id,
                inline=part.inline,
            )
        )
    ticket.updated_at = now
    session.flush()
    return article
