"""Bytes to text whatever the label says: aliases, fallbacks, never an exception."""

from __future__ import annotations

import codecs
import re

# Labels that promise nothing about the bytes (RFC 1428's unknown-8bit, and the
# x-unknown of some gateways): go straight to the utf-8 / cp1252 fallbacks.
_NO_CHARSET = frozenset({"", "unknown-8bit", "x-unknown", "unknown", "x-user-defined", "8bit"})
# Text codecs Python knows but that are no mail charset: punycode decoding is
# quadratic, the escape codecs turn "\x1b" text into controls.
# Compared by codecs.lookup's own name, which spells the escape codecs with
# hyphens ("unicode-escape"): "unicode_escape" here refused nothing.
_REFUSED_CODECS = frozenset(
    codecs.lookup(name).name
    for name in ("punycode", "idna", "unicode_escape", "raw_unicode_escape", "undefined")
)
SURROGATES = re.compile("[\ud800-\udfff]")


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
    return SURROGATES.sub("\ufffd", text) if SURROGATES.search(text) else text


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


def decode_8bit(value: str, hint: str | None) -> str:
    """compat32 keeps 8-bit header bytes as surrogate escapes. Decode them as
    UTF-8 (what modern clients send), else as the body's charset (what old
    clients did), else cp1252; raw ISO-2022-JP escapes are decoded too."""
    if SURROGATES.search(value):
        data = value.encode("utf-8", "surrogateescape")
        text = _try_decode(data, "utf-8") or _try_decode(data, _codec(hint))
        return text if text is not None else data.decode("cp1252", "replace")
    if "\x1b" in value and value.isascii():
        return _try_decode(value.encode("ascii"), "iso2022_jp_2") or value
    return value
