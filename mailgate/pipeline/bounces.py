"""Delivery failures of mail we sent: recognise them and find what they return.

Recognition uses the parsed structure (RFC 3464 report, or a robot sender
returning a message). Details are read from the raw bytes with the standard
library, only for the few messages already recognised as bounces.
"""

from __future__ import annotations

import email
import email.policy
import re
from dataclasses import dataclass

from mailgate.pipeline.message import Envelope, ParsedMessage
from mailgate.tickets.tokens import Signer

_RETURNED_TYPES = (
    "message/rfc822",
    "text/rfc822-headers",
    "message/global",
    "message/global-headers",
)
_NDR_SUBJECT = re.compile(
    r"(undeliver|delivery status notification|returned mail|failure notice|"
    r"mail delivery (failed|failure|system)|delivery failure|non[- ]?deliver|"
    r"unzustellbar|non remis|no se puede entregar|mail system error)",
    re.IGNORECASE,
)
_DAEMONS = re.compile(r"^(mailer-daemon|post_?master|mail-daemon|mailerdaemon)@", re.IGNORECASE)
_MID_IN_TEXT = re.compile(r"^message-id:\s*<([^>\s]+)>", re.IGNORECASE | re.MULTILINE)


@dataclass(frozen=True)
class BounceInfo:
    action: str  # failed | delayed
    status: str | None  # RFC 3463 code, e.g. 5.1.1
    recipients: tuple[str, ...]
    returned_message_id: str | None
    verp_nonce: str | None

    @property
    def permanent(self) -> bool:
        return self.action != "delayed"


def looks_like_ndr(msg: ParsedMessage, *, null_sender: bool) -> str | None:
    """A non-RFC 3464 failure notice: a robot sender that returns our message."""
    robot = null_sender or any(_DAEMONS.match(a) for a in msg.from_addresses)
    if not msg.from_addresses and "mailer-daemon" in (msg.header("from") or "").lower():
        robot = True
    if not robot:
        return None
    if any(t in _RETURNED_TYPES for t in msg.part_types):
        return "robot sender returning a message"
    if _NDR_SUBJECT.search(msg.subject) and _MID_IN_TEXT.search(msg.text):
        return f"robot sender, subject {msg.subject[:60]!r}"
    return None


def classify_report(
    msg: ParsedMessage, signer: Signer, support_address: str, envelope: Envelope
) -> BounceInfo:
    """Best-effort details of a bounce; never raises."""
    return BounceInfo(
        action="failed",
        status=None,
        recipients=(),
        returned_message_id=None,
        verp_nonce=_verp_nonce(signer, support_address, envelope, msg),
    )


def read_bounce(raw: bytes, base: BounceInfo, msg: ParsedMessage) -> BounceInfo:
    """Fill in action, status, recipients and the returned Message-ID from the raw mail."""
    try:
        parsed = email.message_from_bytes(raw, policy=email.policy.compat32)
    except Exception:  # noqa: BLE001 - a bounce we cannot read is still a bounce
        return base
    actions: list[str] = []
    statuses: list[str] = []
    recipients: list[str] = []
    returned: str | None = None
    for part in parsed.walk():
        ctype = part.get_content_type()
        if ctype == "message/delivery-status":
            for block in _status_blocks(part):
                action = block.get("action", "").strip().lower()
                if action:
                    actions.append(action)
                if block.get("status"):
                    statuses.append(block["status"].strip().split()[0])
                if block.get("final-recipient"):
                    recipients.append(block["final-recipient"].split(";")[-1].strip().lower())
        elif ctype in _RETURNED_TYPES and returned is None:
            returned = _message_id_of(part)
    if returned is None:
        match = _MID_IN_TEXT.search(msg.text)
        returned = match.group(1) if match else None
    # Only "delayed" everywhere is a delay; any failure makes it a failure.
    action = "delayed" if actions and all(a == "delayed" for a in actions) else "failed"
    if not actions and statuses and all(s.startswith("4") for s in statuses):
        action = "delayed"
    return BounceInfo(
        action=action,
        status=statuses[0] if statuses else None,
        recipients=tuple(recipients),
        returned_message_id=returned,
        verp_nonce=base.verp_nonce,
    )


def _status_blocks(part: email.message.Message) -> list[dict[str, str]]:
    payload = part.get_payload()
    if isinstance(payload, list):  # the stdlib splits delivery-status into header blocks
        return [{k.lower(): str(v) for k, v in block.items()} for block in payload]
    text = payload if isinstance(payload, str) else ""
    blocks = []
    for chunk in re.split(r"\r?\n\s*\r?\n", text):
        fields = dict(re.findall(r"^([A-Za-z-]+):\s*(.*)$", chunk, re.MULTILINE))
        blocks.append({k.lower(): v for k, v in fields.items()})
    return blocks


def _message_id_of(part: email.message.Message) -> str | None:
    payload = part.get_payload()
    if isinstance(payload, list) and payload:
        value = payload[0].get("message-id")
    else:
        text = payload if isinstance(payload, str) else ""
        match = _MID_IN_TEXT.search(text)
        return match.group(1) if match else None
    return str(value).strip().strip("<>") if value else None


def _verp_nonce(
    signer: Signer, support_address: str, envelope: Envelope, msg: ParsedMessage
) -> str | None:
    candidates = list(envelope.rcpt_to) + list(msg.to) + list(msg.headers.get("delivered-to", ()))
    for address in candidates:
        tagged = signer.parse_plus_address(support_address, address.strip().lower())
        if tagged and tagged[0] == "bounce":
            return tagged[1]
    return None
