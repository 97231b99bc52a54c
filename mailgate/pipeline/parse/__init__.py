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

In the order a mail meets them: `prescan`, `mime` (the tree: text parts and
attachments), `charsets`, `headers`, `addresses`, `text` (the body as text);
`limits` holds the bounds.
"""

from __future__ import annotations

from email import policy
from email.parser import BytesParser

from mailgate.pipeline.message import ParsedMessage, ParseError
from mailgate.pipeline.parse.addresses import normalise_address, read_addresses, read_from
from mailgate.pipeline.parse.charsets import decode_bytes
from mailgate.pipeline.parse.headers import (
    cap_references,
    decode_header_value,
    decoded_headers,
    first_value,
    header_text,
    header_values,
    message_ids,
    parse_date,
)
from mailgate.pipeline.parse.limits import DEFAULT_LIMITS, Limits, limits_from
from mailgate.pipeline.parse.mime import part_type, walk
from mailgate.pipeline.parse.prescan import prescan
from mailgate.pipeline.parse.text import body_text, html_to_text
from mailgate.pipeline.sanitize import clean_header_text

__all__ = [
    "DEFAULT_LIMITS",
    "Limits",
    "decode_bytes",
    "decode_header_value",
    "html_to_text",
    "limits_from",
    "normalise_address",
    "parse_message",
]

_MAX_DEFECTS = 50
_PARSER = BytesParser(policy=policy.compat32)


def parse_message(raw: bytes, limits: Limits = DEFAULT_LIMITS) -> ParsedMessage:
    """Parse one message; raise ``ParseError(reason)`` if it is unsafe or over limits."""
    if not isinstance(raw, bytes | bytearray | memoryview):
        raise TypeError(f"parse_message expects bytes, not {type(raw).__name__}")
    try:
        raw = bytes(raw).removeprefix(b"\xef\xbb\xbf")  # a BOM from a Windows editor hides From
        prescan(raw, limits)
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


def _parse(raw: bytes, limits: Limits) -> ParsedMessage:
    msg = _PARSER.parsebytes(raw)
    defects: list[str] = []
    body = walk(msg, limits)
    raw_headers = header_values(msg)
    hint = body.charset  # 8-bit header bytes are most likely in the body's charset
    headers = decoded_headers(raw_headers, hint, defects)
    defects.extend(body.defects)

    def plain(name: str) -> list[str]:
        return [header_text(value, hint) for value in raw_headers.get(name, ())]

    from_addresses, from_name = read_from(plain("from"), limits, defects)
    subject = clean_header_text(first_value(headers, "subject"), limits.max_subject_chars)
    text, html = body_text(body)
    ids = message_ids(plain("message-id")[:1])
    return ParsedMessage(
        message_id=ids[0] if ids else None,
        in_reply_to=tuple(message_ids(plain("in-reply-to"))),
        references=cap_references(message_ids(plain("references"))),
        from_addresses=from_addresses,
        from_name=from_name,
        to=read_addresses(plain("to"), "To", limits, defects),
        cc=read_addresses(plain("cc"), "Cc", limits, defects),
        reply_to=read_addresses(plain("reply-to"), "Reply-To", limits, defects),
        subject=subject,
        date=parse_date(first_value(headers, "date"), defects),
        headers=headers,
        text=text,
        html=html,
        attachments=tuple(body.attachments),
        content_type=part_type(msg),
        report_type=body.report_type,
        part_types=tuple(body.part_types),
        defects=tuple(dict.fromkeys(defects))[:_MAX_DEFECTS],
    )
