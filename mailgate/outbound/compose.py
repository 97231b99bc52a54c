"""Turn a rendered mail into the exact bytes handed to a transport.

Headers are only ever built through ``EmailMessage``, and every value that
may come from outside (a subject, a display name, a Message-ID read from an
inbound mail) is cleaned first: CPython 3.11.7 predates the generator's own
header check (CVE-2024-6923), so a CR/LF that reached a header value could
start a new header. As a last guard the generated header block is parsed back
and must hold exactly the headers that were set.
"""

from __future__ import annotations

import re
import secrets
from collections.abc import Mapping, Sequence
from datetime import datetime
from email import policy as email_policy
from email.headerregistry import Address, HeaderRegistry
from email.message import EmailMessage
from email.parser import BytesHeaderParser
from email.utils import format_datetime
from functools import lru_cache

from mailgate.pipeline.sanitize import clean_header_text


class _HeaderClasses(HeaderRegistry):
    """The standard registry, minus its cost: it builds a new header class for
    every header it parses (about 45 per mail, a tenth of composing one); the
    class depends only on the header's kind, and holds no state of its own."""

    def __init__(self) -> None:
        super().__init__()
        self._made: dict[type, type] = {}

    def __getitem__(self, name: str) -> type:
        kind = self.registry.get(name.lower(), self.default_class)
        made = self._made.get(kind)
        if made is None:
            made = self._made[kind] = super().__getitem__(name)
        return made


_HEADER_FACTORY = _HeaderClasses()
# RFC 2047 for non-ASCII, CRLF line ends.
SMTP_POLICY = email_policy.SMTP.clone(header_factory=_HEADER_FACTORY)
MAX_SUBJECT_CHARS = 200
MAX_NAME_CHARS = 100
MAX_ADDRESS_HEADER_CHARS = 500
MAX_HEADER_CHARS = 900  # under SMTP's 998-octet line limit, whatever the folding
KEEP_LAST_REFERENCES = 10

# (file name, content type, bytes); the name is already safe (no path, no controls).
Attachment = tuple[str, str, bytes]

AUTO_SUBMITTED_VALUES = frozenset({"no", "auto-generated", "auto-replied", "auto-notified"})

# Headers build_message owns; extra_headers may not set them a second time.
_RESERVED = frozenset({
    "from", "to", "cc", "bcc", "subject", "date", "message-id", "in-reply-to",
    "references", "reply-to", "auto-submitted", "precedence", "x-auto-response-suppress",
    "mime-version", "content-type", "content-transfer-encoding", "sender", "return-path",
})  # fmt: skip
_HEADER_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9-]{0,75}")
# A msg-id's id-left "@" id-right, without brackets; printable ASCII with no
# specials that would end or split it. Non-ASCII ids are dropped, not encoded.
_MSG_ID = re.compile(r"[!#-;=?-~]{1,250}@[!#-;=?-~]{1,250}")
_BARE_EOL = re.compile(rb"\r(?!\n)|(?<!\r)\n")
_SURROGATE = re.compile("[\ud800-\udfff]")


def check_envelope_address(addr: str) -> str:
    """Return `addr` fit for SMTP `MAIL FROM`/`RCPT TO`, an IDN domain as A-labels.

    Raises ValueError on anything that could smuggle an SMTP command or
    header (CR, LF, NUL, any control or space, angle brackets), on a missing
    local part or domain, and on a non-ASCII local part (that needs SMTPUTF8).
    """
    if not isinstance(addr, str):
        raise ValueError(f"envelope address must be text, not {type(addr).__name__}")
    if re.search(r"[\x00-\x20\x7f-\x9f<>\u2028\u2029]", addr) or any(c.isspace() for c in addr):
        raise ValueError(f"envelope address {addr!r} contains a control character, "
                         "space or angle bracket")  # fmt: skip
    local, at, domain = addr.rpartition("@")
    if not at or not local or not domain:
        raise ValueError(f"envelope address {addr!r} is not of the form local@domain")
    if not local.isascii():
        raise ValueError(f"envelope address {addr!r} has a non-ASCII local part (needs SMTPUTF8)")
    if not domain.isascii():
        try:
            domain = domain.encode("idna").decode("ascii")
        except UnicodeError as exc:
            raise ValueError(f"envelope address {addr!r} has an invalid domain ({exc})") from None
    if len(local) > 64 or len(local) + 1 + len(domain) > 254:
        raise ValueError(f"envelope address {addr!r} is too long")
    return f"{local}@{domain}"


def format_address(name: str | None, addr: str) -> str:
    """`Name <addr>` with the name cleaned and quoted as needed; `addr` alone without a name."""
    return str(_address(name, addr))


def cap_references(ids: Sequence[str]) -> list[str]:
    """The first id (the thread's root) and the last ten: what threading needs."""
    ids = list(ids)
    if len(ids) <= 1 + KEEP_LAST_REFERENCES:
        return ids
    return ids[:1] + ids[-KEEP_LAST_REFERENCES:]


def build_message(
    *,
    from_: str,
    to: Sequence[str],
    subject: str,
    text: str,
    html: str | None,
    message_id: str,
    in_reply_to: str | None,
    references: Sequence[str],
    reply_to: str | None,
    auto_submitted: str | None,
    loop_marker: tuple[str, str] | None,
    date: datetime,
    extra_headers: Mapping[str, str] | None = None,
    attachments: Sequence[Attachment] = (),
) -> bytes:
    """The mail as CRLF bytes: multipart/alternative when `html` is given, else text/plain.

    `from_`, `to` and `reply_to` are addresses, bare or formatted (see
    `format_address`). Message-IDs are passed without angle brackets.
    `message_id` is ours and must be valid (ValueError otherwise); ids in
    `in_reply_to`/`references` come from inbound mail, so unusable ones are
    dropped rather than failing the mail. `in_reply_to` is appended to
    `references` when missing (RFC 5322 §3.6.4). `date` must be aware.
    """
    if not to:
        raise ValueError("a mail needs at least one To address")
    if date.tzinfo is None or date.utcoffset() is None:
        raise ValueError("date must be timezone-aware")
    if not _MSG_ID.fullmatch(message_id):
        raise ValueError(f"invalid Message-ID {message_id!r} (give it without angle brackets)")
    if auto_submitted is not None and auto_submitted not in AUTO_SUBMITTED_VALUES:
        raise ValueError(f"invalid Auto-Submitted value {auto_submitted!r}")

    msg = EmailMessage(policy=SMTP_POLICY)
    _set_address_header(msg, "From", [from_])
    _set_address_header(msg, "To", to)
    msg["Subject"] = header_text(subject, MAX_SUBJECT_CHARS)
    msg["Date"] = format_datetime(date)
    msg["Message-ID"] = _IdListHeader("Message-ID", [message_id])

    parent = _usable_ids([in_reply_to] if in_reply_to else [])
    refs = _usable_ids(references)
    if parent and parent[0] not in refs:
        refs.append(parent[0])
    if parent:
        msg["In-Reply-To"] = _IdListHeader("In-Reply-To", parent)
    if refs:
        msg["References"] = _IdListHeader("References", cap_references(refs))
    if reply_to:
        _set_address_header(msg, "Reply-To", [reply_to])

    # RFC 3834 and the de-facto stamps that keep auto-responders (ours and
    # theirs) from answering each other; see RELIABILITY §1.
    if auto_submitted is not None:
        msg["Auto-Submitted"] = auto_submitted
    msg["Precedence"] = "bulk"
    msg["X-Auto-Response-Suppress"] = "All"
    if loop_marker is not None:
        _set_extra_header(msg, *loop_marker)
    for name, value in (extra_headers or {}).items():
        _set_extra_header(msg, name, value)

    # QP keeps the body 7-bit: no dependency on the relay's 8BITMIME.
    msg.set_content(_lf(text), subtype="plain", charset="utf-8", cte="quoted-printable")
    if html is not None:
        msg.add_alternative(_lf(html), subtype="html", charset="utf-8", cte="quoted-printable")
    for filename, content_type, payload in attachments:
        maintype, _, subtype = content_type.partition("/")
        if not (maintype and subtype) or maintype in ("multipart", "message"):
            maintype, subtype = "application", "octet-stream"  # never a structure we did not build
        msg.add_attachment(payload, maintype=maintype, subtype=subtype,
                           filename=header_text(filename, 255) or "attachment")  # fmt: skip
    for part in msg.walk():
        if part is not msg:
            del part["MIME-Version"]  # belongs on the top level only
        if part.is_multipart():
            # "=_" cannot occur in quoted-printable or base64 text, so no part
            # can hold this line; the generator's own choice compiles a
            # regular expression for every mail to check that.
            part.set_boundary(f"=_{secrets.token_hex(12)}")
    data = msg.as_bytes(policy=SMTP_POLICY)
    _verify_header_block(msg, data)
    return data


class _IdListHeader(str):
    """A header of msg-ids, folded one id per line.

    The generic folder RFC 2047-encodes an unstructured header whose token
    is longer than a line, which turns a long id into a string nobody can
    match and breaks threading. Ids are validated, so they need no encoding.
    """

    name: str
    defects: tuple[object, ...] = ()

    def __new__(cls, name: str, ids: Sequence[str]) -> _IdListHeader:
        self = super().__new__(cls, " ".join(f"<{i}>" for i in ids))
        self.name = name
        return self

    def fold(self, *, policy: email_policy.Policy) -> str:
        return f"{self.name}: " + f"{policy.linesep} ".join(self.split()) + policy.linesep


def _usable_ids(ids: Sequence[str]) -> list[str]:
    seen: list[str] = []
    for raw in ids:
        candidate = (raw or "").strip().removeprefix("<").removesuffix(">")
        if _MSG_ID.fullmatch(candidate) and candidate not in seen:
            seen.append(candidate)
    return seen


def header_text(value: str, max_chars: int) -> str:
    """`clean_header_text`, repeated until the header parser leaves the text unchanged.

    EmailMessage decodes RFC 2047 words inside any value it is given, so a
    subject that merely *contains* ``=?utf-8?q?a=0D=0ABcc:_x?=`` (double-encoded
    in the inbound mail) would come out of it with a CR/LF, and on 3.11.7 the
    generator writes that as a new header. The text kept is what a mail
    client would have displayed anyway.
    """
    text = clean_header_text(value, max_chars)
    for _ in range(5):
        if "=?" not in text:  # no encoded word: the parser gives the text back as it is
            return text
        decoded = str(_HEADER_FACTORY("Subject", text))
        if decoded == text:
            return text
        text = clean_header_text(decoded, max_chars)
    # Still decoding after five rounds: break the encoded-word syntax instead.
    return clean_header_text(text.replace("=?", "= ?"), max_chars)


def _address(name: str | None, addr: str) -> Address:
    local, _, domain = check_envelope_address(addr).rpartition("@")
    display = header_text(name or "", MAX_NAME_CHARS)
    return Address(display_name=display, username=local, domain=domain)


def _set_address_header(msg: EmailMessage, name: str, values: Sequence[str]) -> None:
    """One address per value, each rebuilt from its parts so its name is cleaned too."""
    msg[name] = [_one_address(name, value) for value in values]


@lru_cache(maxsize=1024)  # the same few senders, support and ticket addresses again and again
def _one_address(name: str, value: str) -> Address:
    text = clean_header_text(value, MAX_ADDRESS_HEADER_CHARS)
    parsed = _HEADER_FACTORY(name, text)  # ValueError when a decoded name holds CR/LF
    if len(parsed.addresses) != 1 or parsed.defects:
        raise ValueError(f"{name}: {text!r} is not exactly one valid address")
    address = parsed.addresses[0]
    return _address(address.display_name, address.addr_spec)


def _set_extra_header(msg: EmailMessage, name: str, value: str) -> None:
    if not _HEADER_NAME.fullmatch(name) or name.lower() in _RESERVED or name in msg:
        raise ValueError(f"header name {name!r} is invalid, reserved or already set")
    msg[name] = header_text(value, MAX_HEADER_CHARS)


def _lf(body: str) -> str:
    # The policy writes CRLF; a stray CR in the input would become a bare CR.
    # A lone surrogate (undecodable inbound bytes) would make UTF-8 encoding
    # raise and fail the whole transaction: it becomes U+FFFD instead.
    body = _SURROGATE.sub("\ufffd", body)
    return body.replace("\r\n", "\n").replace("\r", "\n")


def _verify_header_block(msg: EmailMessage, data: bytes) -> None:
    """Refuse to return a mail whose serialised headers differ from those set."""
    head, sep, _ = data.partition(b"\r\n\r\n")
    if not sep or _BARE_EOL.search(head) or any(len(line) > 998 for line in head.split(b"\r\n")):
        raise ValueError("generated header block is malformed")
    parsed = BytesHeaderParser(policy=email_policy.compat32).parsebytes(head + b"\r\n\r\n")
    if [k.lower() for k in parsed] != [k.lower() for k in msg]:
        raise ValueError("generated headers differ from those set (header injection?)")
