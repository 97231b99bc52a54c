"""Plain data passed between pipeline stages.

Stages are pure functions over these types; nothing here touches the network,
the database or the clock.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from email.utils import getaddresses


@dataclass(frozen=True)
class Envelope:
    """What the transport knew about a message before its bytes were read."""

    source: str = "pipe"  # pipe | mbox | maildir | smtp | imap
    mail_from: str | None = None  # None: unknown (pipe); "": the null sender <>
    rcpt_to: tuple[str, ...] = ()
    client_address: str | None = None
    helo: str | None = None
    # Authentication-Results from these authserv-ids are believed (the MTA or
    # provider in front of this source); every other one is ignored.
    trusted_authserv_ids: tuple[str, ...] = ()
    # IMAP: "source/folder/UIDVALIDITY/UID". The same message fetched again
    # (the source stopped between its commit and its MOVE) is no new delivery.
    mailbox_uid: str | None = None
    # The source kept the message back and passes on a stand-in (IMAP: over
    # max_message_bytes, or too slow to fetch): quarantined, for this reason.
    held: str | None = None
    # ...and, when the sender should hear of it, the rejection reason code they
    # are told (too_large); never sent to automated mail or a stranger.
    held_notice: str | None = None


@dataclass(frozen=True)
class Attachment:
    filename: str  # sanitised display name, never used as a path
    content_type: str
    payload: bytes
    content_id: str | None = None  # without angle brackets
    inline: bool = False


@dataclass(frozen=True)
class ParsedMessage:
    """One inbound mail, decoded defensively.

    Addresses are bare addr-specs (``local@domain``), domain lower-cased.
    Message-IDs are stored without angle brackets.
    """

    message_id: str | None
    in_reply_to: tuple[str, ...]
    references: tuple[str, ...]
    from_addresses: tuple[str, ...]  # every addr-spec found in From (ambiguity check)
    from_name: str  # display name, controls stripped; never trusted
    to: tuple[str, ...]
    cc: tuple[str, ...]
    reply_to: tuple[str, ...]
    subject: str  # RFC 2047 decoded, controls stripped, capped
    date: datetime | None  # aware, UTC
    # lower-cased header name -> every value, unfolded and decoded
    headers: dict[str, tuple[str, ...]]
    text: str
    html: str | None  # sanitised
    attachments: tuple[Attachment, ...] = ()
    content_type: str = "text/plain"
    report_type: str | None = None  # multipart/report report-type, lower-cased
    # content types of every MIME part, in walk order (bounce/report detection)
    part_types: tuple[str, ...] = ()
    defects: tuple[str, ...] = field(default=())

    @property
    def sender(self) -> str | None:
        """The single From address, or None when From is missing or ambiguous."""
        return self.from_addresses[0] if len(self.from_addresses) == 1 else None

    def header(self, name: str) -> str | None:
        values = self.headers.get(name.lower())
        return values[0] if values else None


# Where the receiving MTA or the mailbox provider writes the envelope recipient.
# Over IMAP they are all there is of the envelope: a Bcc shows nowhere else.
DELIVERY_HEADERS = ("delivered-to", "x-original-to", "envelope-to", "x-envelope-to")


def addressed_to(msg: ParsedMessage, envelope: Envelope) -> list[str]:
    """Every address the mail was sent to, as far as can be told: the envelope's
    recipients, To, Cc, and the delivery headers."""
    delivered = [a for name in DELIVERY_HEADERS for _, a in getaddresses(msg.headers.get(name, ()))]
    return [*envelope.rcpt_to, *msg.to, *msg.cc, *delivered]


class ParseError(Exception):
    """The message cannot be parsed safely; it is quarantined with this reason."""
