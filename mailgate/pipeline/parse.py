"""Turn raw message bytes into a ``ParsedMessage``, defensively.

Every byte string either parses or raises ``ParseError`` (the caller then
quarantines the mail with that reason); no other exception escapes.

How: a cheap pre-scan of the raw bytes rejects what would make the stdlib
parser slow or recurse too deep (RELIABILITY.md §5), then the message is
parsed exactly once with the stdlib ``email`` package in its tolerant
``compat32`` mode, and every value is decoded by hand with charset fallbacks,
because ``policy.default`` raises on unknown charsets and is several times
slower. Address headers go through mail-parser's structural address scanner,
which never lets an RFC 2047 word or a display name become an address
(CVE-2023-27043); anything it cannot read unambiguously yields no address.
"""

from __future__ import annotations

import binascii
import codecs
import email.utils
import re
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from email import policy
from email.errors import HeaderParseError
from email.generator import BytesGenerator
from email.message import Message
from email.parser import BytesParser
from html import unescape
from io import BytesIO

from mailgate.config import Limits as LimitSettings
from mailgate.pipeline.message import Attachment, ParsedMessage, ParseError
from mailgate.pipeline.sanitize import (
    clean_header_text,
    replace_controls,
    safe_filename,
    sanitise_html,
    strip_html_tags,
)
from mailgate.pipeline.tnef import decode_tnef, is_tnef

try:  # mail-parser >= 4.8: structural scanner with ambiguity diagnostics
    from mailparser.utils import get_addresses as _mailparser_addresses

    _mailparser_addresses("a@b.example", defects=[], decode_names=True)
except (ImportError, TypeError):  # pragma: no cover - older mail-parser
    _mailparser_addresses = None


@dataclass(frozen=True)
class Limits:
    """Bounds past which a mail is quarantined instead of parsed."""

    max_header_bytes: int = 1024 * 1024  # top-level header block, Subject not counted
    max_depth: int = 50  # MIME nesting (multipart and message/* levels)
    max_parts: int = 500  # MIME parts, containers included
    max_addresses: int = 1000  # per address header (From, To, Cc, Reply-To, …)
    max_attachments: int = 100  # after TNEF (winmail.dat) is unpacked
    max_attachment_bytes: int = 50 * 1024 * 1024  # all attachments together, decoded
    # A long subject is no attack (RELIABILITY checklist 29: stored truncated),
    # so it has its own, larger bound: it is decoded once, linearly, then cut.
    max_subject_bytes: int = 1024 * 1024  # raw Subject field(s)
    max_subject_chars: int = 998  # stored subject, after decoding
    # stdlib parameter parsing (boundary, filename) grows faster than linearly
    max_mime_header_chars: int = 64 * 1024  # one Content-Type/-Disposition value


DEFAULT_LIMITS = Limits()


def limits_from(settings: LimitSettings) -> Limits:
    """The parser's bounds from `hygiene.limits` in settings.yaml."""
    return Limits(
        max_header_bytes=settings.max_header_bytes,
        max_depth=settings.max_depth,
        max_parts=settings.max_parts,
        max_addresses=settings.max_addresses,
        max_attachments=settings.max_attachments,
        max_attachment_bytes=settings.max_attachment_bytes,
    )


_MAX_NAME_CHARS = 256  # a display name longer than this is junk
_MAX_SUBJECT_HEADER_CHARS = 4 * 998  # decoded; the stored subject is cut at max_subject_chars
_MAX_ID_CHARS = 998
_MAX_REFERENCES = 200  # keeps the thread root and the most recent ancestors
_MAX_DEFECTS = 50
_ADDRESS_HEADERS = ("from", "sender", "to", "cc", "bcc", "reply-to")

_PARSER = BytesParser(policy=policy.compat32)


def parse_message(raw: bytes, limits: Limits = DEFAULT_LIMITS) -> ParsedMessage:
    """Parse one message; raise ``ParseError(reason)`` if it is unsafe or over limits."""
    if not isinstance(raw, bytes | bytearray | memoryview):
        raise TypeError(f"parse_message expects bytes, not {type(raw).__name__}")
    try:
        raw = bytes(raw).removeprefix(b"\xef\xbb\xbf")  # a BOM from a Windows editor hides From
        _prescan(raw, limits)
        return _parse(raw, limits)
    except ParseError:
        raise
    except RecursionError as exc:
        raise ParseError("MIME structure nested too deeply to parse") from exc
    except MemoryError as exc:
        raise ParseError("message too large to parse in memory") from exc
    except Exception as exc:  # a parser bug must quarantine one mail, not stop intake
        raise ParseError(
            f"message could not be parsed ({type(exc).__name__}: {exc})"[:300]
        ) from exc


# --- pre-scan -------------------------------------------------------------------

# The header block as the stdlib feed parser sees it: lines that look like a
# header ("Name:"), a continuation (leading WSP) or a Unix "From " line, ended
# by CRLF, bare CR or LF (it accepts all three).
# Possessive: nothing follows that could need a line given back, and the
# engine then keeps no backtracking state (4 MB for a 20k-line header).
_HEADER_BLOCK = re.compile(
    rb"(?:(?:From |[\x21-\x39\x3b-\x7e]*:|[ \t])[^\r\n]*(?>\r\n|\r|\n|\Z))*+"
)
_DASH_LINE = re.compile(rb"(?:^|(?<=[\r\n]))--([^\r\n]*)")
_CONTAINER_TYPE = re.compile(rb"content-type[ \t]*:\s*(?:multipart|message)/", re.I)
_BOUNDARY_PARAM = re.compile(rb"boundary\s*=\s*(?:\"((?:[^\"\\\r\n]|\\.)*)\"|([^\s;\"]+))", re.I)
_BOUNDARY_2231 = re.compile(rb"boundary\*", re.I)
# One whole field (name, value and continuation lines) at the start of a line.
_FIELD_TAIL = rb"[ \t]*:[^\r\n]*+(?:(?:\r\n|\r|\n)[ \t][^\r\n]*+)*+"
_SUBJECT_FIELD = re.compile(rb"(?<![^\r\n])subject" + _FIELD_TAIL, re.I)
_ADDRESS_FIELD = re.compile(rb"(?<![^\r\n])(from|sender|to|cc|bcc|reply-to)" + _FIELD_TAIL, re.I)
_FIELD_NAMES = {"from": "From", "sender": "Sender", "to": "To", "cc": "Cc", "bcc": "Bcc",
                "reply-to": "Reply-To"}  # fmt: skip


def _prescan(raw: bytes, limits: Limits) -> None:
    """Reject, before building any tree, what the stdlib parser handles badly:
    ~970 nested levels raise RecursionError, 50k parts take 20 s and a To of
    20k addresses 9 s (RELIABILITY §5)."""
    header_match = _HEADER_BLOCK.match(raw)
    _check_header_fields(raw, header_match.end() if header_match else 0, limits)
    _check_mime_structure(raw, limits)


def _check_header_fields(raw: bytes, header_end: int, limits: Limits) -> None:
    """The header block is raw[:header_end]; read in place, never copied."""
    # Addresses first: a huge To is over the header limit too, but its own
    # limit says better what is wrong with the mail.
    for match in _ADDRESS_FIELD.finditer(raw, 0, header_end):
        count = raw.count(b"@", match.start(), match.end())
        if count > limits.max_addresses:
            name = _FIELD_NAMES[match.group(1).decode("ascii").lower()]
            raise ParseError(
                f"{name} header lists about {count} addresses, over the "
                f"{limits.max_addresses}-address limit"
            )
    subject_bytes = sum(m.end() - m.start() for m in _SUBJECT_FIELD.finditer(raw, 0, header_end))
    if subject_bytes > limits.max_subject_bytes:
        raise ParseError(
            f"Subject is {subject_bytes} bytes, over the {limits.max_subject_bytes}-byte "
            "subject limit"
        )
    other_bytes = header_end - subject_bytes
    if other_bytes > limits.max_header_bytes:
        raise ParseError(
            f"header block is {other_bytes} bytes without the Subject, over the "
            f"{limits.max_header_bytes}-byte header limit"
        )


def _check_mime_structure(raw: bytes, limits: Limits) -> None:
    # Every multipart or message/* container needs its own Content-Type line,
    # so this bounds the nesting depth from above (the real depth is checked
    # after parsing, which stays cheap while this count is small).
    containers = len(_CONTAINER_TYPE.findall(raw))
    if containers > limits.max_parts:
        depth = _nesting_estimate(raw)
        if depth > limits.max_depth:
            raise ParseError(
                f"MIME nesting about {depth} levels deep, over the {limits.max_depth}-level "
                "nesting limit"
            )
        raise ParseError(f"{containers} MIME containers, over the {limits.max_parts}-part limit")
    dash_lines = raw.count(b"--") and _DASH_LINE.findall(raw)
    if dash_lines and len(dash_lines) > limits.max_parts:
        parts = _count_delimiters(raw, dash_lines)
        if parts > limits.max_parts:
            raise ParseError(f"about {parts} MIME parts, over the {limits.max_parts}-part limit")


def _declared_boundaries(raw: bytes) -> Iterator[tuple[int, bytes]]:
    for match in _BOUNDARY_PARAM.finditer(raw):
        quoted, token = match.groups()
        boundary = re.sub(rb"\\(.)", rb"\1", quoted) if quoted is not None else token
        yield match.start(), boundary.rstrip()


def _count_delimiters(raw: bytes, dash_lines: list[bytes]) -> int:
    """Lines that open a part: ``--boundary`` for a declared boundary."""
    if _BOUNDARY_2231.search(raw):
        # An RFC 2231 boundary cannot be matched cheaply: count every "--" line.
        return len(dash_lines)
    boundaries = {boundary for _, boundary in _declared_boundaries(raw)}
    count = 0
    for line in dash_lines:
        line = line.rstrip(b" \t")
        if line in boundaries:
            count += 1
    return count


def _nesting_estimate(raw: bytes) -> int:
    """How deep declared boundaries nest, following them in order of appearance.

    Only used to say which limit a mail that is over the part limit anyway
    breaks, so a rough reading is enough; it is linear (a stack plus a counter
    of what is on it), whatever the boundaries do.
    """
    events = [(pos, True, boundary) for pos, boundary in _declared_boundaries(raw)]
    events += [(m.start(), False, m.group(1).rstrip(b" \t")) for m in _DASH_LINE.finditer(raw)]
    events.sort(key=lambda event: event[0])
    stack: list[bytes] = []
    open_count: Counter[bytes] = Counter()
    deepest = 0
    for _, declares, value in events:
        if declares:
            stack.append(value)
            open_count[value] += 1
            deepest = max(deepest, len(stack))
            continue
        closing = value.endswith(b"--") and open_count[value[:-2]] > 0
        name = value[:-2] if closing else value
        if open_count[name] <= 0:
            continue  # a line that only looks like a delimiter
        while stack[-1] != name:  # an inner part left open ends with its parent
            open_count[stack.pop()] -= 1
        if closing:
            open_count[stack.pop()] -= 1
    return deepest


# --- the parse ------------------------------------------------------------------


@dataclass
class _Body:
    plain: list[str] = field(default_factory=list)
    html: list[str] = field(default_factory=list)
    attachments: list[Attachment] = field(default_factory=list)
    part_types: list[str] = field(default_factory=list)
    defects: list[str] = field(default_factory=list)
    report_type: str | None = None
    charset: str | None = None  # of the first text part, a hint for 8-bit headers


def _parse(raw: bytes, limits: Limits) -> ParsedMessage:
    msg = _PARSER.parsebytes(raw)
    defects: list[str] = []
    body = _walk(msg, limits)
    raw_headers = _raw_headers(msg)
    hint = body.charset  # 8-bit header bytes are most likely in the body's charset
    headers = _decoded_headers(raw_headers, hint, defects)
    defects.extend(body.defects)

    def plain(name: str) -> list[str]:
        return [_header_text(value, hint) for value in raw_headers.get(name, ())]

    from_addresses, from_name = _from_addresses(plain("from"), limits, defects)
    subject = clean_header_text(_first(headers, "subject"), limits.max_subject_chars)
    text, html = _body_text(body)
    message_ids = _message_ids(plain("message-id")[:1])
    return ParsedMessage(
        message_id=message_ids[0] if message_ids else None,
        in_reply_to=tuple(_message_ids(plain("in-reply-to"))),
        references=_cap_references(_message_ids(plain("references"))),
        from_addresses=from_addresses,
        from_name=from_name,
        to=_addresses(plain("to"), "To", limits, defects),
        cc=_addresses(plain("cc"), "Cc", limits, defects),
        reply_to=_addresses(plain("reply-to"), "Reply-To", limits, defects),
        subject=subject,
        date=_parse_date(_first(headers, "date"), defects),
        headers=headers,
        text=text,
        html=html,
        attachments=tuple(body.attachments),
        content_type=_content_type(msg),
        report_type=body.report_type,
        part_types=tuple(body.part_types),
        defects=tuple(dict.fromkeys(defects))[:_MAX_DEFECTS],
    )


# --- charsets -----------------------------------------------------------------------

# Labels that promise nothing about the bytes (RFC 1428's unknown-8bit, and the
# x-unknown of some gateways): go straight to the utf-8 / cp1252 fallbacks.
_NO_CHARSET = frozenset({"", "unknown-8bit", "x-unknown", "unknown", "x-user-defined", "8bit"})
# Text codecs Python knows but that are no mail charset: punycode decoding is
# quadratic, the escape codecs turn "\x1b" text into controls.
_REFUSED_CODECS = frozenset(
    {"punycode", "idna", "unicode_escape", "raw_unicode_escape", "undefined"}
)
_SURROGATES = re.compile("[\ud800-\udfff]")


# Labels Python does not know, or whose superset is what senders really use.
_CHARSET_ALIASES = {
    "iso-8859-8-i": "iso-8859-8",
    "iso-8859-8-e": "iso-8859-8",
    "iso-8859-6-i": "iso-8859-6",
    "iso-8859-6-e": "iso-8859-6",
    "gb2312": "gb18030",
    "gbk": "gb18030",
    "x-gbk": "gb18030",
    "ks_c_5601-1987": "cp949",
    "euc-kr": "cp949",
    "big5": "cp950",
    "x-sjis": "cp932",
    "shift_jis": "cp932",
    "windows-874": "cp874",
    "iso-8859-1": "cp1252",  # what "latin-1" mail means in practice (HTML5 does the same)
    "us-ascii": "cp1252",  # 8-bit bytes under a us-ascii label: see decode order
}


def _codec(charset: str | None) -> str | None:
    label = (charset or "").strip().strip("\"'").lower()
    if label in _NO_CHARSET or len(label) > 40:
        return None
    label = _CHARSET_ALIASES.get(label, label)
    try:
        name = codecs.lookup(label).name
    except (LookupError, ValueError):
        return None
    return None if name in _REFUSED_CODECS else name


def _try_decode(data: bytes, codec: str | None) -> str | None:
    if codec is None:
        return None
    try:
        text = data.decode(codec)
    except (UnicodeError, LookupError, ValueError, TypeError):
        return None
    # UTF-7 and friends can yield lone surrogates, which no database takes.
    return _SURROGATES.sub("\ufffd", text) if _SURROGATES.search(text) else text


def decode_bytes(data: bytes, charset: str | None) -> str:
    """Declared charset, then UTF-8, then cp1252 with replacement: never raises."""
    codec = _codec(charset)
    if codec == "cp1252" and not data.isascii():
        # A us-ascii/latin-1 label on UTF-8 bytes is a common lie; UTF-8 that
        # validates is almost never an accident.
        return _try_decode(data, "utf-8") or data.decode("cp1252", "replace")
    text = _try_decode(data, codec)
    if text is None and codec is not None and codec.startswith("iso2022"):
        # 7-bit, so UTF-8 would "succeed" on it; vendor extensions (NEC row 13)
        # are what breaks strict decoding, and only they need replacing.
        text = data.decode(codec, "replace")
    if text is None:
        text = _try_decode(data, "utf-8")
    return text if text is not None else data.decode("cp1252", "replace")


def _decode_8bit(value: str, hint: str | None) -> str:
    """compat32 keeps 8-bit header bytes as surrogate escapes. Decode them as
    UTF-8 (what modern clients send), else as the body's charset (what old
    clients did), else cp1252; raw ISO-2022-JP escapes are decoded too."""
    if _SURROGATES.search(value):
        data = value.encode("utf-8", "surrogateescape")
        text = _try_decode(data, "utf-8") or _try_decode(data, _codec(hint))
        return text if text is not None else data.decode("cp1252", "replace")
    if "\x1b" in value and value.isascii():
        return _try_decode(value.encode("ascii"), "iso2022_jp_2") or value
    return value


# --- headers -------------------------------------------------------------------------

_FOLD = re.compile(r"(?:\r\n|\r|\n)(?=[ \t])")
# Lenient about whitespace inside the encoded text (some mailers fold there),
# strict about "?" so that a scan never runs past the next question mark.
_ENCODED_WORD = re.compile(r"=\?([^?\s]{1,64})\?([bBqQ])\?([^?]*)\?=")


def _unfold(value: object) -> str:
    if not isinstance(value, str):
        value = str(value)  # a Header object set by code, never by the parser
    return _FOLD.sub("", value)


def _header_text(value: str, hint: str | None = None) -> str:
    """Unfolded value with 8-bit bytes decoded and controls turned to spaces;
    RFC 2047 words left alone (addresses and IDs must be read before decoding)."""
    return replace_controls(_decode_8bit(value, hint)).strip()


def decode_header_value(value: object, hint: str | None = None) -> str:
    """Unfolded, RFC 2047 decoded, with every control character as a space."""
    value = _unfold(value)
    if "=?" not in value:
        return _header_text(value, hint)
    return replace_controls(_decode_encoded_words(value, hint)).strip()


def _decode_encoded_words(value: str, hint: str | None) -> str:
    out: list[str] = []
    pending = bytearray()
    pending_charset: str | None = None
    position = 0

    def flush() -> None:
        nonlocal pending, pending_charset
        if pending_charset is not None:
            out.append(decode_bytes(bytes(pending), pending_charset))
        pending, pending_charset = bytearray(), None

    for match in _ENCODED_WORD.finditer(value):
        data = _encoded_word_bytes(match)
        if data is None:
            continue  # left in place as literal text
        gap = value[position : match.start()]
        charset = match.group(1).split("*", 1)[0].lower()
        # RFC 2047 §6.2: whitespace between adjacent encoded words is dropped;
        # joining their bytes first keeps a character split across words whole.
        if pending_charset is not None and not gap.strip(" \t"):
            if charset != pending_charset:
                flush()
        else:
            flush()
            out.append(_decode_8bit(gap, hint))
        pending_charset = charset
        pending += data
        position = match.end()
    flush()
    out.append(_decode_8bit(value[position:], hint))
    return "".join(out)


def _encoded_word_bytes(match: re.Match[str]) -> bytes | None:
    encoding, text = match.group(2).lower(), match.group(3)
    try:
        if encoding == "q":
            # surrogateescape: raw 8-bit bytes inside a word are what was meant
            return binascii.a2b_qp(text.encode("utf-8", "surrogateescape"), header=True)
        data = "".join(text.split()).rstrip("=").encode("ascii")
        if len(data) % 4 == 1:  # one stray character: drop it rather than the word
            data = data[:-1]
        return binascii.a2b_base64(data + b"=" * (-len(data) % 4))
    except (binascii.Error, UnicodeError, ValueError):
        return None


def _raw_headers(msg: Message) -> dict[str, list[str]]:
    """Lower-cased name -> unfolded values, still holding 8-bit surrogate escapes.

    Read from raw_items(): compat32's get() would replace 8-bit bytes by U+FFFD.
    """
    collected: dict[str, list[str]] = {}
    for name, value in msg.raw_items():
        key = " ".join(_header_text(str(name)).lower().split())
        collected.setdefault(key, []).append(_unfold(value))
    return collected


def _decoded_headers(
    raw_headers: dict[str, list[str]], hint: str | None, defects: list[str]
) -> dict[str, tuple[str, ...]]:
    if len(raw_headers.get("from", ())) > 1:
        defects.append("multiple From headers")
    headers = {
        name: tuple(decode_header_value(value, hint) for value in values)
        for name, values in raw_headers.items()
    }
    if "subject" in headers:
        # It may be a megabyte (checklist 29): what the rules and the article
        # see is what the ticket keeps.
        headers["subject"] = tuple(v[:_MAX_SUBJECT_HEADER_CHARS] for v in headers["subject"])
    return headers


def _first(headers: dict[str, tuple[str, ...]], name: str) -> str:
    values = headers.get(name)
    return values[0] if values else ""


# --- addresses --------------------------------------------------------------------

_LABEL = r"[a-z0-9_](?:[a-z0-9_-]{0,61}[a-z0-9_])?"
_HOSTNAME = re.compile(rf"{_LABEL}(?:\.{_LABEL})*")
_DOMAIN_LITERAL = re.compile(r"\[[^\[\]\\\s]{1,253}\]")


def normalise_address(address: str) -> str | None:
    """``local@domain`` lower-cased, IDN domain as A-labels; None if not an address.

    Exposed so the directory can store addresses the way they are compared.
    """
    address = address.strip()
    local, at, domain = address.rpartition("@")
    if not at or not local or not domain or len(address) > 320:
        return None
    if replace_controls(address) != address:
        return None
    if not local.startswith('"') and any(ch.isspace() for ch in address):
        return None
    domain = domain.rstrip(".").lower()
    if _DOMAIN_LITERAL.fullmatch(domain):
        return f"{local.lower()}@{domain}"
    if not domain.isascii():
        try:
            domain = domain.encode("idna").decode("ascii")
        except UnicodeError:
            return None
    if not _HOSTNAME.fullmatch(domain) or len(domain) > 253:
        return None
    return f"{local.lower()}@{domain}"


def _scan_addresses(value: str) -> tuple[list[tuple[str, str]], bool]:
    """(name, address) pairs and whether any item was unreadable or ambiguous."""
    if _mailparser_addresses is not None:
        diagnostics: list[dict] = []
        try:
            pairs = _mailparser_addresses(value, defects=diagnostics, decode_names=True)
        except HeaderParseError:
            # mail-parser 4.8 lets the stdlib's error on a broken base64 word in
            # a display name escape. Read the structure again with the names
            # left as they are (the addresses never depended on them), and
            # decode the names with our own tolerant decoder.
            diagnostics = []
            pairs = _mailparser_addresses(value, defects=diagnostics, decode_names=False)
            pairs = [(decode_header_value(name), address) for name, address in pairs]
        unclear = any(not d.get("recovered") for d in diagnostics)
        for diagnostic in diagnostics:
            if not diagnostic.get("recovered"):
                # Surface what a lenient reader could have seen, so that the
                # sender is never one arbitrary pick among several.
                pairs.extend(("", c.get("address", "")) for c in diagnostic.get("candidates", ()))
        return [(n, a) for n, a in pairs if a], unclear
    return _stdlib_scan_addresses(value)  # pragma: no cover - older mail-parser


def _stdlib_scan_addresses(value: str) -> tuple[list[tuple[str, str]], bool]:
    # Without mail-parser's scanner: stdlib parse, and distrust anything an
    # attacker could use to make parsers disagree.
    risky = "=?" in value or value.count('"') % 2 or value.count("<") != value.count(">")
    pairs = [(n, a) for n, a in email.utils.getaddresses([value]) if a]
    if len(pairs) != value.count("@") - sum(n.count("@") for n, _ in pairs):
        risky = True
    return pairs, bool(risky)


def _check_address_count(name: str, value: str, limits: Limits) -> None:
    if value.count("@") > limits.max_addresses:
        raise ParseError(
            f"{name} header lists more addresses than the {limits.max_addresses}-address limit"
        )


def _from_addresses(
    values: list[str], limits: Limits, defects: list[str]
) -> tuple[tuple[str, ...], str]:
    """Every addr-spec in every From header; ambiguity yields several or none."""
    addresses: list[str] = []
    names: list[str] = []
    unclear = False
    for value in values:
        _check_address_count("From", value, limits)
        pairs, item_unclear = _scan_addresses(value)
        unclear = unclear or item_unclear
        for name, address in pairs:
            normalised = normalise_address(address)
            if normalised is None:
                unclear = True
                continue
            addresses.append(normalised)
            names.append(name)
    unique = tuple(dict.fromkeys(addresses))
    if unclear:
        defects.append("From header is ambiguous or unreadable")
        if len(unique) == 1:
            # One address read from a header that also held something we could
            # not read: another reader may see a different sender.
            return (), ""
    if len(addresses) > 1 and len(unique) == 1:
        # "a@x, a@x" or the same From twice: still not one clear mailbox.
        unique = tuple(addresses)
    from_name = clean_header_text(names[0], _MAX_NAME_CHARS) if names else ""
    return unique, from_name


def _addresses(
    values: list[str], header: str, limits: Limits, defects: list[str]
) -> tuple[str, ...]:
    found: list[str] = []
    for value in values:
        _check_address_count(header, value, limits)
        pairs, unclear = _scan_addresses(value)
        if unclear:
            defects.append(f"{header} header is ambiguous or unreadable")
        for _name, address in pairs:
            normalised = normalise_address(address)
            if normalised is not None:
                found.append(normalised)
    return tuple(dict.fromkeys(found))


# --- ids and dates -----------------------------------------------------------------

_ANGLE_ID = re.compile(r"<([^<>]*)>")


def _message_ids(values: str | Iterable[str]) -> list[str]:
    """IDs without brackets; junk between them (comments, phrases) is ignored."""
    if isinstance(values, str):
        values = [values]
    ids: list[str] = []
    for value in values:
        bracketed = _ANGLE_ID.findall(value)
        # Folding can split a long ID: whitespace is never part of one.
        tokens = ["".join(t.split()) for t in bracketed] if bracketed else value.split()
        for token in tokens:
            token = token.strip("<>,;")[:_MAX_ID_CHARS]
            if token:
                ids.append(token)
    return list(dict.fromkeys(ids))


def _cap_references(ids: list[str]) -> tuple[str, ...]:
    if len(ids) <= _MAX_REFERENCES:
        return tuple(ids)
    return (ids[0], *ids[-(_MAX_REFERENCES - 1) :])


def _parse_date(value: str, defects: list[str]) -> datetime | None:
    if not value:
        return None
    try:
        parsed = email.utils.parsedate_to_datetime(value[:200])
        if parsed.tzinfo is None:  # "-0000": UTC, origin unknown (RFC 5322 §3.3)
            return parsed.replace(tzinfo=UTC)
        return parsed.astimezone(UTC)
    except (TypeError, ValueError, IndexError, OverflowError):
        defects.append("unparseable Date header")
        return None


# --- MIME tree ------------------------------------------------------------------------


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


def _walk(msg: Message, limits: Limits) -> _Body:
    body = _Body()
    budget = _AttachmentBudget(limits)
    for node in _walk_nodes(msg, limits):
        part = _readable_params(node.part)
        content_type = _content_type(part)
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


def _add_attachment(body: _Body, budget: _AttachmentBudget, part: Message, ctype: str) -> None:
    budget.admit_one()
    attachment = _attachment(part, ctype, budget)
    budget.add_bytes(len(attachment.payload))
    body.attachments.append(attachment)


def _unpack_tnef(body: _Body, budget: _AttachmentBudget) -> None:
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
    if not any(isinstance(v, str) and _SURROGATES.search(v) for _, v in raw):
        return part
    view = Message()
    for name, value in raw:
        view[name] = _decode_8bit(value, None)
    view.set_payload(_stored_payload(part))
    view.set_default_type(part.get_default_type())  # message/rfc822 inside a digest
    view.defects = part.defects
    return view


def _add_leaf(body: _Body, budget: _AttachmentBudget, part: Message, content_type: str) -> None:
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


def _content_type(part: Message) -> str:
    """compat32's type, minus what a missing ";" leaves in it ("multipart/mixed\n\tboundary=")."""
    ctype = part.get_content_type()
    if ctype.isascii() and ctype.isprintable() and " " not in ctype:
        return ctype
    words = _header_text(ctype).split()
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
    return clean_header_text(_decode_8bit(str(value), None), 100).lower() or None


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
    cleaned = "".join(_header_text(_unfold(value)).split()).strip("<>")[:_MAX_ID_CHARS]
    return cleaned or None


# --- body text ---------------------------------------------------------------------

_NEWLINES = re.compile(r"\r\n?")
_TEXT_CONTROLS = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f]")
_HTML_WHITESPACE = re.compile(r"\s+")
_HTML_BREAK = re.compile(
    r"<\s*(?:br|hr|/p|/div|/tr|/li|/h[1-6]|/table|/blockquote|/pre|/dd|/dt)\b[^>]{0,1024}>",
    re.I,
)
_SPACES = re.compile(r"[ \t\u00a0]+")
_BLANK_LINES = re.compile(r"\n{3,}")


def _clean_text(text: str) -> str:
    """Newlines as \\n; no controls but tab and newline (no terminal escapes)."""
    return _TEXT_CONTROLS.sub("", _NEWLINES.sub("\n", text))


def html_to_text(html: str) -> str:
    """Readable text from HTML, simply: block ends become newlines, tags go."""
    marked = _HTML_BREAK.sub("\n", _HTML_WHITESPACE.sub(" ", html))
    text = _clean_text(unescape(strip_html_tags(marked)))
    lines = (_SPACES.sub(" ", line).strip() for line in text.split("\n"))
    return _BLANK_LINES.sub("\n\n", "\n".join(lines)).strip()


def _body_text(body: _Body) -> tuple[str, str | None]:
    html = sanitise_html("\n".join(body.html)) if body.html else None
    plain = "\n\n".join(t for t in (_clean_text(p) for p in body.plain) if t.strip())
    if not plain.strip() and body.html:
        plain = html_to_text("\n".join(body.html))
    return plain, html
