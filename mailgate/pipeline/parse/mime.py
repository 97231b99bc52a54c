"""The MIME tree, walked without recursion within the limits: text parts to
decode, attachments (winmail.dat unpacked) with safe names, within a budget
checked before anything large is decoded."""

from __future__ import annotations

import binascii
import email.utils
from collections.abc import Iterator
from dataclasses import dataclass, field
from email import policy
from email.generator import BytesGenerator
from email.message import Message
from io import BytesIO

from mailgate.pipeline.message import Attachment, ParseError
from mailgate.pipeline.parse.charsets import SURROGATES, decode_8bit, decode_bytes
from mailgate.pipeline.parse.headers import MAX_ID_CHARS, decode_header_value, header_text, unfold
from mailgate.pipeline.parse.limits import Limits
from mailgate.pipeline.sanitize import clean_header_text, safe_filename
from mailgate.pipeline.tnef import decode_tnef, is_tnef


@dataclass
class Body:
    plain: list[str] = field(default_factory=list)
    html: list[str] = field(default_factory=list)
    attachments: list[Attachment] = field(default_factory=list)
    part_types: list[str] = field(default_factory=list)
    defects: list[str] = field(default_factory=list)
    report_type: str | None = None
    charset: str | None = None  # of the first text part, a hint for 8-bit headers


@dataclass(frozen=True)
class _Node:
    part: Message
    depth: int
    # None: part of the mail itself; "attachment": inside a multipart that is
    # an attachment as a whole; "message": inside an attached message/*.
    inside: str | None


def _walk_nodes(msg: Message, limits: Limits) -> Iterator[_Node]:
    """Pre-order walk (as Message.walk) without recursion, enforcing limits."""
    stack = [_Node(msg, 1, None)]
    count = 0
    while stack:
        node = stack.pop()
        count += 1
        if count > limits.max_parts:
            raise ParseError(f"more MIME parts than the {limits.max_parts}-part limit")
        if node.depth > limits.max_depth:
            raise ParseError(f"MIME nesting deeper than the {limits.max_depth}-level nesting limit")
        _check_mime_header_size(node.part, limits)
        yield node
        payload = _stored_payload(node.part)
        if isinstance(payload, list):
            inside = _children_inside(node)
            children = [p for p in payload if isinstance(p, Message)]
            stack.extend(_Node(p, node.depth + 1, inside) for p in reversed(children))


def _children_inside(node: _Node) -> str | None:
    if node.inside == "message" or node.part.get_content_maintype() == "message":
        return "message"  # the attached message is kept whole, as one attachment
    if node.inside == "attachment" or _disposition(node.part) == "attachment":
        return "attachment"  # RFC 2183 §2.9: disposition covers the whole container
    return None


def _check_mime_header_size(part: Message, limits: Limits) -> None:
    for name in ("content-type", "content-disposition"):
        for value in part.get_all(name, ()):
            if len(str(value)) > limits.max_mime_header_chars:
                raise ParseError(f"{name} header over {limits.max_mime_header_chars} characters")


def walk(msg: Message, limits: Limits) -> Body:
    body = Body()
    budget = _AttachmentBudget(limits)
    for node in _walk_nodes(msg, limits):
        part = _readable_params(node.part)
        content_type = part_type(part)
        body.part_types.append(content_type)
        body.defects.extend(type(d).__name__ for d in part.defects)
        if node.inside == "message":
            continue
        if content_type == "multipart/report" and body.report_type is None and not node.inside:
            body.report_type = _report_type(part)
        if part.get_content_maintype() == "message":
            _add_attachment(body, budget, part, content_type)
        elif part.is_multipart():
            continue
        elif node.inside == "attachment":
            _add_attachment(body, budget, part, content_type)
        else:
            _add_leaf(body, budget, part, content_type)
    _unpack_tnef(body, budget)
    return body


@dataclass
class _AttachmentBudget:
    """What the attachments of one mail may add up to (count, decoded bytes)."""

    limits: Limits
    count: int = 0
    size: int = 0

    @property
    def room(self) -> int:
        return self.limits.max_attachment_bytes - self.size

    def admit_one(self) -> None:
        """Before decoding: the count alone may already be over."""
        if self.count >= self.limits.max_attachments:
            raise ParseError(
                f"more attachments than the {self.limits.max_attachments}-attachment limit"
            )
        self.count += 1

    def add_bytes(self, size: int) -> None:
        self.size += size
        if self.size > self.limits.max_attachment_bytes:
            raise self.too_large()

    def too_large(self) -> ParseError:
        return ParseError(
            "attachments decode to more than the "
            f"{self.limits.max_attachment_bytes}-byte attachment size limit"
        )

    def release(self, attachment: Attachment) -> None:
        """An attachment replaced by its contents (winmail.dat) stops counting."""
        self.count -= 1
        self.size -= len(attachment.payload)


def _add_attachment(body: Body, budget: _AttachmentBudget, part: Message, ctype: str) -> None:
    budget.admit_one()
    attachment = _attachment(part, ctype, budget)
    budget.add_bytes(len(attachment.payload))
    body.attachments.append(attachment)


def _unpack_tnef(body: Body, budget: _AttachmentBudget) -> None:
    """winmail.dat gives way to the files inside it; its body fills in a mail
    with none of its own (Outlook sends the same text as text/plain otherwise)."""
    unpacked: list[Attachment] = []
    for attachment in body.attachments:
        content = None
        if is_tnef(attachment.content_type, attachment.filename):
            content = decode_tnef(attachment.payload)
        if content is None:
            unpacked.append(attachment)
            continue
        budget.release(attachment)
        for inner in content.attachments:
            budget.admit_one()
            budget.add_bytes(len(inner.payload))
            unpacked.append(inner)
        if not any(t.strip() for t in body.plain) and not body.html:
            body.plain.extend([content.text] if content.text.strip() else [])
            body.html.extend([content.html] if content.html else [])
    body.attachments = unpacked


def _readable_params(part: Message) -> Message:
    """compat32 turns 8-bit bytes in a header into U+FFFD when parameters are
    read; give it the decoded text instead (raw UTF-8 file names are common)."""
    raw = [(n, v) for n, v in part.raw_items() if n.lower().startswith("content-")]
    if not any(isinstance(v, str) and SURROGATES.search(v) for _, v in raw):
        return part
    view = Message()
    for name, value in raw:
        view[name] = decode_8bit(value, None)
    view.set_payload(_stored_payload(part))
    view.set_default_type(part.get_default_type())  # message/rfc822 inside a digest
    view.defects = part.defects
    return view


def _add_leaf(body: Body, budget: _AttachmentBudget, part: Message, content_type: str) -> None:
    disposition = _disposition(part)
    is_text = content_type in ("text/plain", "text/html") or (
        # A multipart whose boundary never shows is just text (broken multipart).
        part.get_content_maintype() == "multipart"
    )
    if not is_text or disposition == "attachment" or _filename(part) is not None:
        _add_attachment(body, budget, part, content_type)
        return
    charset = _charset(part)
    body.charset = body.charset or charset
    text = decode_bytes(_payload_bytes(part), charset)
    if content_type == "text/html":
        body.html.append(text)
    else:
        body.plain.append(text)


def part_type(part: Message) -> str:
    """compat32's type, minus what a missing ";" leaves in it ("multipart/mixed\n\tboundary=")."""
    ctype = part.get_content_type()
    if ctype.isascii() and ctype.isprintable() and " " not in ctype:
        return ctype
    words = header_text(ctype).split()
    return words[0] if words else "text/plain"


def _disposition(part: Message) -> str | None:
    value = part.get("content-disposition")
    if value is None:
        return None
    return str(value).split(";", 1)[0].strip().lower() or None


def _report_type(part: Message) -> str | None:
    value = part.get_param("report-type")
    if isinstance(value, tuple):  # RFC 2231 form
        value = value[2]
    if not value:
        return None
    return clean_header_text(decode_8bit(str(value), None), 100).lower() or None


def _stored_payload(part: Message) -> str | list[Message] | None:
    """The payload as the parser stored it: text with 8-bit bytes as surrogate
    escapes, or the list of subparts. compat32's get_payload() without
    decode=True first decodes 8-bit bytes with the part's declared charset,
    which raises for labels such as "idna" and loses bytes for the others."""
    return part._payload  # the attribute email.generator itself reads


def _payload_bytes(part: Message) -> bytes:
    try:
        data = part.get_payload(decode=True)
    except Exception:  # noqa: BLE001 - a broken encoding still leaves the raw bytes
        data = None
    if isinstance(data, bytes):
        return data
    payload = _stored_payload(part)
    if isinstance(payload, str):
        return payload.encode("utf-8", "surrogateescape")
    return b""


_BASE64_ALPHABET = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"
_NOT_BASE64 = bytes(b for b in range(256) if b not in _BASE64_ALPHABET)
_SIZE_WINDOW = 1024 * 1024  # encoded bytes looked at at once while measuring


def _check_decoded_size(part: Message, budget: _AttachmentBudget) -> None:
    """Raise before decoding a payload that would take the attachments over
    their byte limit: decoded data is never larger than its encoding, so only
    a payload whose encoding is already larger than the room left is measured,
    a window at a time, stopping as soon as it is over."""
    payload = _stored_payload(part)
    if not isinstance(payload, str) or len(payload) <= budget.room:
        return
    encoded = payload.encode("ascii", "surrogateescape")
    cte = str(part.get("content-transfer-encoding", "")).strip().lower()
    if cte == "base64":
        size = _base64_size_within(encoded, budget.room)
    elif cte == "quoted-printable":
        size = _qp_size_within(encoded, budget.room)
    else:
        # identity encodings; uuencode is 45 bytes a 61-character line, and
        # compat32 decodes it in one go: an encoding this large is over.
        size = (
            len(encoded)
            if cte not in ("x-uuencode", "uuencode", "uue", "x-uue")
            else (len(encoded) * 45 // 61)
        )
    if size > budget.room:
        raise budget.too_large()


def _base64_size_within(encoded: bytes, room: int) -> int:
    """Decoded size of base64 text (stray characters skipped, as the decoder
    does), counted up to just past `room`."""
    symbols = 0
    for start in range(0, len(encoded), _SIZE_WINDOW):
        window = encoded[start : start + _SIZE_WINDOW]
        symbols += len(window.translate(None, _NOT_BASE64))
        if symbols * 3 // 4 > room:
            break
    return symbols * 3 // 4


def _qp_size_within(encoded: bytes, room: int) -> int:
    """Decoded size of quoted-printable text, decoded a window of whole lines
    at a time (soft breaks and escapes never span lines), up to past `room`."""
    size, start = 0, 0
    while start < len(encoded) and size <= room:
        end = encoded.find(b"\n", start + _SIZE_WINDOW)
        end = len(encoded) if end < 0 else end + 1
        size += len(binascii.a2b_qp(encoded[start:end]))
        start = end
    return size


def _charset(part: Message) -> str | None:
    try:
        return part.get_content_charset()
    except Exception:  # noqa: BLE001 - an unreadable charset label is no label
        return None


def _message_bytes(part: Message) -> bytes:
    """An attached message/* part as bytes: the message(s) it carries."""
    payload = _stored_payload(part)
    if not isinstance(payload, list):
        return _payload_bytes(part)
    chunks = []
    for sub in payload:
        buffer = BytesIO()
        try:
            BytesGenerator(buffer, mangle_from_=False, policy=policy.compat32).flatten(sub)
            chunks.append(buffer.getvalue())
        except Exception:  # noqa: BLE001 - keep what can be kept
            chunks.append(_plain_bytes(sub))
    return b"\n".join(chunks)


def _plain_bytes(part: Message) -> bytes:
    """Headers and the payload as stored, for a part the generator cannot write
    (str() of it would run the same generator again)."""
    head = "".join(f"{name}: {value}\n" for name, value in part.raw_items())
    payload = _stored_payload(part)
    body = payload if isinstance(payload, str) else ""
    return (head + "\n" + body).encode("utf-8", "surrogateescape")


_DEFAULT_EXTENSIONS = {
    "message/rfc822": ".eml",
    "message/global": ".eml",
    "message/delivery-status": ".txt",
    "message/disposition-notification": ".txt",
    "text/rfc822-headers": ".txt",
    "text/plain": ".txt",
    "text/html": ".html",
    "text/calendar": ".ics",
    "application/pdf": ".pdf",
    "image/png": ".png",
    "image/jpeg": ".jpg",
    "image/gif": ".gif",
}


def _attachment(part: Message, content_type: str, budget: _AttachmentBudget) -> Attachment:
    is_message = part.get_content_maintype() == "message"
    if is_message:
        payload = _message_bytes(part)  # no larger than the raw mail already is
    else:
        _check_decoded_size(part, budget)
        payload = _payload_bytes(part)
    content_id = _content_id(part)
    disposition = _disposition(part)
    default = "attachment" + _DEFAULT_EXTENSIONS.get(content_type, "")
    return Attachment(
        filename=safe_filename(_filename(part), default=default),
        content_type=content_type,
        payload=payload,
        content_id=content_id,
        inline=disposition == "inline" or (disposition is None and content_id is not None),
    )


def _filename(part: Message) -> str | None:
    try:
        name = part.get_filename() or part.get_param("name")
    except Exception:  # noqa: BLE001 - unreadable RFC 2231 parameters: no name
        return None
    if isinstance(name, tuple):
        name = email.utils.collapse_rfc2231_value(name)
    if not name:
        return None
    # Many mailers put RFC 2047 words in parameters although RFC 2231 is the rule.
    return decode_header_value(str(name))


def _content_id(part: Message) -> str | None:
    value = part.get("content-id")
    if value is None:
        return None
    cleaned = "".join(header_text(unfold(value)).split()).strip("<>")[:MAX_ID_CHARS]
    return cleaned or None
