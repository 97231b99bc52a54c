"""Delivery failures of mail we sent: recognise them and find what they return.

Recognition (`looks_like_ndr`, for screen) uses the parsed structure only:
an RFC 3464 report is recognised by screen itself; a non-standard notice
(qmail, Exim, Exchange, Gmail …) needs a robot sender (null return path,
MAILER-DAEMON, postmaster, Exchange's system mailbox) *and* evidence of a
failure: a returned message, `X-Failed-Recipients`, a failure subject or a
failure notice's wording. A person's mail never has a robot sender, so the
wording alone never turns a person's mail into a bounce.

Details (`read_bounce`, for the bounces only) are read from the raw bytes with
the standard library: action and status per recipient, the ENVID
(Original-Envelope-Id), and what identifies the mail we sent, strongest
first: our VERP address (envelope or To), the ENVID, a VERP address of ours
inside the returned copy, the returned Message-ID. Everything in a bounce is
hostile input: values are decoded with fallbacks, cleaned, capped, and read
past any error; `read_bounce` never raises.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from email import policy
from email.message import Message
from email.parser import BytesParser, HeaderParser

from mailgate.pipeline.message import Envelope, ParsedMessage, addressed_to
from mailgate.pipeline.parse import decode_bytes
from mailgate.pipeline.sanitize import clean_header_text
from mailgate.tickets.tokens import Signer

log = logging.getLogger("mailgate.pipeline")

_RETURNED_TYPES = (
    "message/rfc822",
    "text/rfc822-headers",
    "message/global",
    "message/global-headers",
)
_STATUS_TYPES = ("message/delivery-status", "message/global-delivery-status")
_ACTIONS = ("failed", "delayed", "delivered", "relayed", "expanded")  # RFC 3464 §2.3.3

_DAEMONS = re.compile(
    # Exchange and Office 365 send their notices from a fixed system mailbox.
    r"^(mailer[-_]?daemon|mail-daemon|post_?master|microsoftexchange[0-9a-f]{32})@",
    re.IGNORECASE,
)
_DAEMON_WORDS = re.compile(r"mailer[-_]?daemon|postmaster", re.IGNORECASE)
_NDR_SUBJECT = re.compile(
    r"undeliver|delivery status notification|returned mail|failure notice|"
    r"mail delivery (failed|failure|system)|delivery (failure|failed|has failed)|"
    r"mail failure|non[- ]?deliver|could not be delivered|delayed mail|delivery delay|"
    # Exchange's "Undeliverable:" in its users' languages.
    r"unzustellbar|non remis|no se puede entregar|non recapitabile|onbestelbaar|"
    r"n[ãa]o [ée] poss[íi]vel entregar|mail system error|"
    r"(error|trouble|problem) (sending|delivering) your (mail|message)",
    re.IGNORECASE,
)
# What failure notices say, and the line under which they return the mail.
_NDR_WORDING = re.compile(
    r"this is the qmail-send program|below this line is a copy of the message|"
    r"this is a copy of the message|original message (follows|headers)|"
    r"^[ \t]*-+ ?original message ?-+|delivery has failed to these recipients|"
    r"did not reach the following recipient|could ?n[o']t be delivered|"
    r"was not delivered to|wasn't able to deliver|following address(es)? had delivery errors|"
    r"delivery to the following recipients? failed|"
    r"(error|trouble|problem) (sending|delivering) your (mail|message)|"
    # Notices that only quote the server's refusal (Apache James, carriers' gateways).
    r"invalid (user|recipient) address|no such user|requested action not taken",
    re.IGNORECASE | re.MULTILINE,
)
# Where a text notice starts returning the mail; what follows is the mail, not the notice.
# The leading dashes are taken possessively, once: letting two quantifiers share
# them made a line of 200,000 dashes (from anyone who forges a bounce) cost minutes.
_COPY_MARKER = re.compile(
    r"^[ \t]*+-*+[ \t]*+(below this line is a copy of the message|"
    r"this is a copy of the message|original message (follows|headers)|"
    r"original message ?-+|the original message was)",
    re.IGNORECASE | re.MULTILINE,
)
_DELAY_SUBJECT = re.compile(
    r"delay|still being retried|will (retry|continue)|not (yet )?been delivered|"
    r"warning: (message|could not)",
    re.IGNORECASE,
)
_DELAY_TEXT = re.compile(
    r"(will|shall) (retry|continue|try again|keep trying)|still (being )?(retried|trying)",
    re.IGNORECASE,
)
_PERMANENT_TEXT = re.compile(
    r"permanent (error|failure)|given up|gave up|failed permanently", re.IGNORECASE
)
# RFC 3463 enhanced status code, not a piece of an IP address or a version.
_STATUS = re.compile(r"(?<![\d.])([245]\.\d{1,3}\.\d{1,3})(?!\.?\d)")
_MID_IN_TEXT = re.compile(r"^[ \t>]*message-id:\s*<([^<>\s]{1,998})>", re.IGNORECASE | re.MULTILINE)
_QMAIL_RECIPIENT = re.compile(r"^<([^<>\s@]{1,64}@[^<>\s@]{1,255})>:", re.MULTILINE)
# "RCPT TO: addr" in a notice that lists the refused mail's envelope (Apache James).
_RCPT_TO_LINE = re.compile(
    r"^[ \t]*rcpt to:[ \t]*<?([^<>\s@]{1,64}@[^<>\s@]{1,255})>?[ \t]*$",
    re.IGNORECASE | re.MULTILINE,
)
# A basic SMTP refusal quoted on its own line, when the notice gives no RFC 3463 code.
_SMTP_REPLY_LINE = re.compile(r"^[ \t]*[45][0-9][0-9][ -].{4,}$", re.MULTILINE)
_ADDRESS = re.compile(r"[^\s<>@;,\"']{1,64}@[^\s<>@;,\"']{1,255}")
_XTEXT = re.compile(r"\+([0-9A-Fa-f]{2})")

_MAX_PARTS = 500  # parse already refused more; this bounds our own walk too
_MAX_TEXT = 200_000  # characters of notice text searched
_MAX_KEYS = 10  # Message-IDs and VERP addresses tried per bounce
_MAX_RECIPIENTS = 20
_MAX_DIAGNOSTIC = 300

_PARSER = BytesParser(policy=policy.compat32)
_HEADERS = HeaderParser(policy=policy.compat32)


@dataclass(frozen=True)
class BounceInfo:
    # failed | delayed | delivered (a success DSN, NOTIFY=SUCCESS: recorded only)
    action: str
    status: str | None  # RFC 3463 code, e.g. 5.1.1
    recipients: tuple[str, ...]  # addresses not reached (Original- or Final-Recipient)
    returned_message_id: str | None  # the first of `returned_message_ids`
    verp_nonce: str | None  # from our VERP address the bounce was sent to
    envelope_id: str | None = None  # Original-Envelope-Id as given, decoded and cleaned
    envid_nonce: str | None = None  # that ENVID when it is our signed VERP tag
    returned_verp_nonce: str | None = None  # our VERP address inside the returned copy
    returned_message_ids: tuple[str, ...] = ()
    diagnostic: str | None = None  # the remote server's words, cleaned and capped

    @property
    def permanent(self) -> bool:
        return self.action == "failed"

    def lookup_keys(self) -> Iterator[tuple[str, str, str]]:
        """(how, "nonce" | "message-id", value) to look our mail up by, strongest first."""
        for how, nonce in (
            ("VERP address", self.verp_nonce),
            ("ENVID", self.envid_nonce),
            ("VERP address in the returned mail", self.returned_verp_nonce),
        ):
            if nonce:
                yield how, "nonce", nonce
        for message_id in self.returned_message_ids:
            yield "returned Message-ID", "message-id", message_id


# --- recognition (screen) ---------------------------------------------------------


def looks_like_ndr(msg: ParsedMessage, *, null_sender: bool) -> str | None:
    """A non-RFC 3464 failure notice: a robot sender plus evidence of a failure."""
    if not _robot_sender(msg, null_sender):
        return None
    if any(t in _RETURNED_TYPES for t in msg.part_types):
        return "robot sender returning a message"
    if msg.headers.get("x-failed-recipients"):
        return "robot sender, X-Failed-Recipients"
    if match := _NDR_SUBJECT.search(msg.subject):
        return f"robot sender, subject like {match.group(0).lower()!r}"
    if match := _NDR_WORDING.search(msg.text[:_MAX_TEXT]):
        return f"robot sender, text like {' '.join(match.group(0).lower().split())[:60]!r}"
    return None


def _robot_sender(msg: ParsedMessage, null_sender: bool) -> bool:
    if null_sender or any(_DAEMONS.match(a) for a in msg.from_addresses):
        return True
    # "From: mailer-daemon" with no domain yields no address, but says who wrote it.
    return not msg.from_addresses and bool(_DAEMON_WORDS.search(msg.header("from") or ""))


def classify_report(
    msg: ParsedMessage, signer: Signer, support_address: str, envelope: Envelope
) -> BounceInfo:
    """What screen knows of a bounce: the VERP address it came back to; never raises."""
    return BounceInfo(
        action="failed",
        status=None,
        recipients=(),
        returned_message_id=None,
        verp_nonce=verp_nonce(signer, support_address, envelope, msg),
    )


def verp_nonce(
    signer: Signer, support_address: str, envelope: Envelope, msg: ParsedMessage
) -> str | None:
    """The nonce of our VERP address this mail was sent to (envelope, To, Cc, Delivered-To…)."""
    # Cheap to try: only an address of ours with a tag reaches the HMAC check.
    for address in addressed_to(msg, envelope):
        nonce = _bounce_nonce(signer, support_address, address)
        if nonce:
            return nonce
    return None


def _bounce_nonce(signer: Signer, support_address: str, address: str) -> str | None:
    """The nonce of a genuine (signed) VERP address of ours, else None."""
    try:
        tagged = signer.parse_plus_address(support_address, address.strip().strip("<>").lower())
    except (ValueError, TypeError):
        return None
    return tagged[1] if tagged and tagged[0] == "bounce" else None


# --- details (delivery_failures) --------------------------------------------------


@dataclass
class _Reading:
    """What the walk over a bounce's parts collects."""

    actions: list[str] = field(default_factory=list)
    statuses: list[tuple[str, str]] = field(default_factory=list)  # (action, status)
    recipients: list[str] = field(default_factory=list)
    diagnostics: list[str] = field(default_factory=list)
    envelope_id: str | None = None
    message_ids: list[str] = field(default_factory=list)
    return_paths: list[str] = field(default_factory=list)
    texts: list[str] = field(default_factory=list)


def read_bounce(
    raw: bytes, base: BounceInfo, msg: ParsedMessage, *, signer: Signer, support_address: str
) -> BounceInfo:
    """Fill in action, status, recipients and the keys to our mail from the raw bounce."""
    try:
        return _read(raw, base, msg, signer, support_address)
    except Exception:  # noqa: BLE001 - a bounce we cannot read is still a bounce
        log.warning("could not read the details of a bounce", exc_info=True)
        return base


def _read(
    raw: bytes, base: BounceInfo, msg: ParsedMessage, signer: Signer, support_address: str
) -> BounceInfo:
    reading = _Reading()
    root = _PARSER.parsebytes(raw)
    for part in _parts(root):
        ctype = part.get_content_type()
        if ctype in _STATUS_TYPES:
            _read_status(part, reading)
        elif ctype in _RETURNED_TYPES:
            _read_returned(_returned_headers(part), reading)
            continue
        elif part is not root and part.get("message-id"):
            # A MIME part has no Message-ID: some gateways put the returned
            # headers right after the boundary, where they become the part's own.
            _read_returned(part, reading)
        if part.get_content_maintype() == "text" and ctype not in ("text/html", *_RETURNED_TYPES):
            reading.texts.append(_text_of(part))
    if not reading.texts:
        reading.texts.append(msg.text)  # an HTML-only notice: the parser's text of it
    text = "\n".join(reading.texts)[:_MAX_TEXT]
    notice, returned = _split_at_copy(text)
    message_ids = reading.message_ids + _MID_IN_TEXT.findall(returned or text)
    action, status = _action_and_status(reading, msg.subject, notice)
    recipients = reading.recipients or _text_recipients(msg, notice)
    return replace(
        base,
        action=action,
        status=status,
        recipients=tuple(dict.fromkeys(recipients))[:_MAX_RECIPIENTS],
        returned_message_id=_first(_clean_ids(message_ids)),
        envelope_id=reading.envelope_id,
        envid_nonce=_envid_nonce(signer, support_address, reading.envelope_id),
        returned_verp_nonce=_verp_in(signer, support_address, reading.return_paths, text),
        returned_message_ids=_clean_ids(message_ids),
        diagnostic=_first(reading.diagnostics) or _diagnostic_line(notice, status),
    )


def _parts(root: Message) -> Iterator[Message]:
    """Every part of the notice, without descending into the mail it returns."""
    stack, seen = [root], 0
    while stack and seen < _MAX_PARTS:
        part = stack.pop()
        seen += 1
        yield part
        if part.get_content_maintype() == "message":
            continue  # the returned mail (or a status part): read whole, not walked
        payload = part.get_payload()
        if isinstance(payload, list):
            stack.extend(p for p in reversed(payload) if isinstance(p, Message))


def _read_status(part: Message, reading: _Reading) -> None:
    blocks = _status_blocks(part)
    if blocks and blocks[0].get("original-envelope-id"):
        reading.envelope_id = _decode_xtext(blocks[0]["original-envelope-id"])
    for block in blocks:
        action = _word(block.get("action", ""))
        if action:
            reading.actions.append(action)
        status = _status_code(block.get("status", ""))
        if status:
            reading.statuses.append((action, status))
        recipient = _recipient(block.get("original-recipient") or block.get("final-recipient"))
        if recipient:
            reading.recipients.append(recipient)
        if block.get("diagnostic-code"):
            reading.diagnostics.append(_diagnostic(block["diagnostic-code"]))


def _status_blocks(part: Message) -> list[dict[str, str]]:
    payload = part.get_payload()
    if isinstance(payload, list):  # the stdlib splits delivery-status into header blocks
        return [
            {str(k).lower(): _value(v) for k, v in block.items()}
            for block in payload
            if isinstance(block, Message)
        ]
    text = _text_of(part)
    blocks = []
    for chunk in re.split(r"\r?\n[ \t]*\r?\n", text)[:_MAX_PARTS]:
        fields = re.findall(r"^([A-Za-z-]{1,40}):[ \t]*(.*)$", chunk, re.MULTILINE)
        blocks.append({k.lower(): v for k, v in fields})
    return blocks


def _returned_headers(part: Message) -> Message | None:
    """The headers of the returned mail, whether attached whole, as headers, or encoded."""
    payload = part.get_payload()
    encoded = str(part.get("content-transfer-encoding", "")).strip().lower()
    if isinstance(payload, list) and payload and isinstance(payload[0], Message):
        inner = payload[0]
        if len(inner) or encoded not in ("base64", "quoted-printable"):
            return inner
        # A base64 message/rfc822 (not allowed, but sent): the parser saw no headers.
        body = inner.get_payload()
        encoded_part = Message()
        encoded_part["Content-Transfer-Encoding"] = encoded
        encoded_part.set_payload(body if isinstance(body, str) else "")
        return _HEADERS.parsestr(_text_of(encoded_part))
    if isinstance(payload, str):
        return _HEADERS.parsestr(_text_of(part))
    return None


def _read_returned(headers: Message | None, reading: _Reading) -> None:
    if headers is None:
        return
    reading.message_ids.extend(_value(v) for v in headers.get_all("message-id", ()))
    reading.return_paths.extend(_value(v) for v in headers.get_all("return-path", ()))


def _text_of(part: Message) -> str:
    """A part's text, transfer-decoded and charset-decoded with fallbacks."""
    data = part.get_payload(decode=True)
    if not isinstance(data, bytes):
        payload = part.get_payload()
        return payload if isinstance(payload, str) else ""
    charset = part.get_param("charset")
    return decode_bytes(data[: _MAX_TEXT * 4], charset if isinstance(charset, str) else None)


def _split_at_copy(text: str) -> tuple[str, str | None]:
    """(the notice, the returned mail) of a text notice; (text, None) without a marker."""
    match = _COPY_MARKER.search(text)
    if match is None:
        return text, None
    return text[: match.start()], text[match.end() :]


def _action_and_status(reading: _Reading, subject: str, notice: str) -> tuple[str, str | None]:
    """One action for the whole bounce: any failure makes it a failure."""
    known = [a for a in reading.actions if a in _ACTIONS]
    if known:
        if "failed" in known:
            action = "failed"
        elif "delayed" in known:
            action = "delayed"
        else:
            action = "delivered"  # relayed or expanded: nothing failed either
        statuses = [s for a, s in reading.statuses if a == action] or [
            s for _, s in reading.statuses
        ]
        return action, _first(statuses)
    statuses = [s for _, s in reading.statuses] or _STATUS.findall(notice)
    status = _first(statuses)
    return _action_from_text(status, subject, notice), status


def _action_from_text(status: str | None, subject: str, notice: str) -> str:
    """A notice without Action fields: its status code, else its wording."""
    if (status and status[0] == "5") or _PERMANENT_TEXT.search(notice):
        return "failed"
    if status and status[0] == "4":
        return "delayed"
    if status and status[0] == "2":
        return "delivered"
    if _DELAY_SUBJECT.search(subject) or _DELAY_TEXT.search(notice):
        return "delayed"
    return "failed"  # a recognised failure notice that says nothing more is a failure


def _text_recipients(msg: ParsedMessage, notice: str) -> list[str]:
    """Who was not reached, from a notice without delivery-status fields."""
    found = [
        address
        for value in msg.headers.get("x-failed-recipients", ())
        for address in _ADDRESS.findall(value)
    ]
    found += _QMAIL_RECIPIENT.findall(notice) + _RCPT_TO_LINE.findall(notice)
    return [r for r in (_recipient(a) for a in found[:_MAX_RECIPIENTS]) if r]


def _envid_nonce(signer: Signer, support_address: str, envelope_id: str | None) -> str | None:
    """The ENVID is ours when it is our signed VERP tag (`b<nonce>-<sig>`) or address."""
    if not envelope_id:
        return None
    if "@" in envelope_id:
        return _bounce_nonce(signer, support_address, envelope_id)
    local, _, domain = support_address.partition("@")
    return _bounce_nonce(signer, support_address, f"{local}+{envelope_id}@{domain}")


def _verp_in(
    signer: Signer, support_address: str, return_paths: list[str], text: str
) -> str | None:
    """Our VERP address in the returned copy (its Return-Path, quoted headers)."""
    local, _, domain = support_address.partition("@")
    pattern = re.compile(
        rf"(?<![\w.+-]){re.escape(local)}\+b[0-9a-z]{{8,32}}-[0-9a-f]{{1,64}}@{re.escape(domain)}",
        re.IGNORECASE,
    )
    candidates = [m for value in return_paths for m in pattern.findall(value)]
    candidates += pattern.findall(text)
    for address in candidates[:_MAX_KEYS]:
        nonce = _bounce_nonce(signer, support_address, address)
        if nonce:
            return nonce
    return None


def _diagnostic_line(notice: str, status: str | None) -> str | None:
    """The line of a text notice that holds the status code: the remote server's reply."""
    if not status:
        reply = _SMTP_REPLY_LINE.search(notice)
        return _diagnostic(reply.group(0)) if reply else None
    for line in notice.splitlines():
        if status in line:
            return _diagnostic(line)
    return None


# --- defensive readers of single values ------------------------------------------


def _value(value: object) -> str:
    """A header or field value as one clean line, whatever the parser handed over."""
    try:
        text = str(value)
    except Exception:  # noqa: BLE001 - a Header object over undecodable bytes
        return ""
    return clean_header_text(text, 998)


def _word(value: str) -> str:
    """The keyword of an Action field: "failed (bad mailbox)" is "failed"."""
    words = re.findall(r"[a-z]+", value.lower())
    return words[0] if words else ""


def _status_code(value: str) -> str | None:
    match = _STATUS.search(value)
    return match.group(1) if match else None


def _recipient(value: str | None) -> str | None:
    """`rfc822; <a@b>` → `a@b`; anything that is not one plain address → None."""
    if not value:
        return None
    address = value.rpartition(";")[2]
    match = _ADDRESS.search(address)
    return match.group(0).lower()[:320] if match else None


def _diagnostic(value: str) -> str:
    return clean_header_text(value, _MAX_DIAGNOSTIC)


def _decode_xtext(value: str) -> str | None:
    """RFC 3461 xtext: `+XX` is a hex-escaped byte."""
    decoded = _XTEXT.sub(lambda m: chr(int(m.group(1), 16)), value.strip())
    cleaned = clean_header_text(decoded, 100)
    return cleaned or None


def _clean_ids(values: list[str]) -> tuple[str, ...]:
    ids = []
    for value in values:
        cleaned = clean_header_text(value, 998).strip().strip("<>").strip()
        if cleaned and " " not in cleaned:
            ids.append(cleaned)
    return tuple(dict.fromkeys(ids))[:_MAX_KEYS]


def _first(values: list[str] | tuple[str, ...]) -> str | None:
    return values[0] if values else None
