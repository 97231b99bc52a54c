"""Outlook's TNEF (winmail.dat, application/ms-tnef): the body and files inside.

tnefparse decodes each attribute (``TNEFObject``) and each MAPI property table
(``decode_mapi``); this module walks the attribute stream itself and checks
every property table before tnefparse reads it, because on a crafted stream
tnefparse's own ``TNEF()``:

- copies the rest of the stream for every attribute (quadratic: a 30 MB
  stream of 12-byte attributes copies terabytes);
- loops as many times as a 32-bit count says, even past the end of the data
  (``decode_mapi``: 4 billion empty iterations, or as many objects);
- recurses into embedded messages, each of which may embed another.

Embedded messages are therefore kept as one file, never decoded. Anything
that does not read cleanly yields None: the caller keeps winmail.dat as it
is. Nothing here raises on any input.
"""

from __future__ import annotations

import codecs
import logging
import mimetypes
import re
import struct
from collections.abc import Iterator
from dataclasses import dataclass, field

from tnefparse import properties as mapi
from tnefparse.codepage import Codepage
from tnefparse.mapi import IMESSAGE_SIG, TNEFMAPI_Attribute, decode_mapi
from tnefparse.tnef import TNEF, TNEFObject

from mailgate.pipeline.message import Attachment
from mailgate.pipeline.sanitize import safe_filename

# tnefparse logs every malformed property table at ERROR. Here a stream it
# cannot read is an ordinary outcome (the mail keeps its winmail.dat), and
# attacker-made garbage must not page an operator.
logging.getLogger("tnefparse").setLevel(logging.CRITICAL)

TNEF_CONTENT_TYPES = frozenset({"application/ms-tnef", "application/vnd.ms-tnef"})
_SIGNATURE = struct.pack("<I", TNEF.TNEF_SIGNATURE)
_ATTRIBUTE_OVERHEAD = 11  # level (1), id (4), length (4) ... checksum (2)
_MIME_TYPE = re.compile(r"[a-z0-9][a-z0-9!#$&^_.+-]{0,63}/[a-z0-9][a-z0-9!#$&^_.+-]{0,63}")


def is_tnef(content_type: str, filename: str) -> bool:
    """A TNEF part, by its type or by the name Outlook gives it (many gateways
    relabel it application/octet-stream)."""
    return content_type in TNEF_CONTENT_TYPES or filename.lower() == "winmail.dat"


@dataclass(frozen=True)
class TnefContent:
    text: str  # "" when the stream carries no plain-text body
    html: str | None  # unsanitised: the caller sanitises it with the mail's own HTML
    attachments: tuple[Attachment, ...]


def decode_tnef(data: bytes) -> TnefContent | None:
    """The body and attachments of a TNEF stream; None if it cannot be read."""
    if not data.startswith(_SIGNATURE):
        return None
    try:
        reader = _Reader()
        for attribute in _attributes(data):
            reader.take(attribute)
        return reader.content()
    except _Unreadable:
        return None
    except Exception:  # noqa: BLE001 - tnefparse's value decoders are not hardened
        # (a SYSTIME past year 9999 raises OverflowError, a short GUID ValueError…):
        # whatever they raise, the stream is one we cannot read.
        return None


class _Unreadable(Exception):
    """The stream is truncated or one of its counts cannot be true."""


def _attributes(data: bytes) -> Iterator[TNEFObject]:
    """Each attribute, decoded by tnefparse from its own bytes only (linear)."""
    offset = 6  # signature (4), legacy key (2)
    while offset < len(data):
        if offset + _ATTRIBUTE_OVERHEAD > len(data):
            raise _Unreadable("truncated attribute header")
        length = struct.unpack_from("<I", data, offset + 5)[0]
        end = offset + _ATTRIBUTE_OVERHEAD + length
        if end > len(data):
            raise _Unreadable("attribute runs past the end of the stream")
        # The checksum is not verified: tnefparse only logs a mismatch, and
        # summing every byte again in Python would cost more than the decode.
        yield TNEFObject(data[offset:end], do_checksum=False)
        offset = end


@dataclass
class _File:
    title: str = ""
    long_name: str = ""
    mime_tag: str = ""
    data: bytes | None = None
    embedded: bytes | None = None  # an attached Outlook item, kept whole


@dataclass
class _Reader:
    codepage: str = "cp1252"
    text: str = ""
    html_bytes: bytes | None = None
    html_text: str | None = None
    internet_codepage: str | None = None
    files: list[_File] = field(default_factory=list)

    def take(self, attribute: TNEFObject) -> None:
        if attribute.level == TNEF.LVL_ATTACHMENT:
            self._take_attachment_attribute(attribute)
        elif attribute.name == TNEF.ATTOEMCODEPAGE and len(attribute.data) >= 4:
            self.codepage = _codec(Codepage(struct.unpack_from("<I", attribute.data)[0]).codepage())
        elif attribute.name == TNEF.ATTBODY:
            self.text = _decode(attribute.data, self.codepage)
        elif attribute.name == TNEF.ATTMAPIPROPS:
            self._take_message_properties(attribute.data)

    def _take_attachment_attribute(self, attribute: TNEFObject) -> None:
        if attribute.name == TNEF.ATTATTACHRENDDATA:
            self.files.append(_File())  # every attachment starts with its rendering data
            return
        if not self.files:
            return  # an attachment attribute before any attachment: nothing to attach it to
        current = self.files[-1]
        if attribute.name == TNEF.ATTATTACHTITLE:
            current.title = _decode(attribute.data, self.codepage).rstrip("\x00")
        elif attribute.name == TNEF.ATTATTACHDATA:
            current.data = attribute.data
        elif attribute.name == TNEF.ATTATTACHMENT:
            for prop in _properties(attribute.data, self.codepage):
                self._take_attachment_property(current, prop)

    def _take_attachment_property(self, current: _File, prop: TNEFMAPI_Attribute) -> None:
        if prop.name == mapi.MAPI_ATTACH_LONG_FILENAME:
            current.long_name = _text(prop)
        elif prop.name in (mapi.MAPI_ATTACH_FILENAME, mapi.MAPI_DISPLAY_NAME):
            current.title = current.title or _text(prop)
        elif prop.name == mapi.MAPI_ATTACH_MIME_TAG:
            current.mime_tag = _text(prop).strip().lower()
        elif prop.name == mapi.MAPI_ATTACH_DATA_OBJ:
            # tnefparse hands the value over padded to 4 bytes, its length lost.
            value = b"".join(v for v in prop.raw_data if isinstance(v, bytes))
            if value.startswith(IMESSAGE_SIG):
                current.embedded = _without_padding(value[len(IMESSAGE_SIG) :])
            elif current.data is None:
                current.data = value

    def _take_message_properties(self, data: bytes) -> None:
        for prop in _properties(data, self.codepage):
            if prop.name == mapi.MAPI_INTERNET_CODEPAGE and isinstance(prop.data, int):
                self.internet_codepage = _codec(Codepage(prop.data).codepage())
            elif prop.name in (mapi.MAPI_BODY, mapi.MAPI_UNCOMPRESSED_BODY) and not self.text:
                self.text = _text(prop, self.codepage)
            elif prop.name == mapi.MAPI_BODY_HTML:
                value = prop.data
                if isinstance(value, str):
                    self.html_text = value
                else:
                    self.html_bytes = value
            # PR_RTF_COMPRESSED is left alone: tnefparse needs compressed_rtf to
            # read it, and a plain or HTML body is what Outlook sends alongside.

    def content(self) -> TnefContent:
        html = self.html_text
        if html is None and self.html_bytes is not None:
            html = _decode(self.html_bytes, self.internet_codepage or self.codepage)
        files = tuple(_attachment(f) for f in self.files if _worth_keeping(f))
        return TnefContent(text=self.text.replace("\x00", ""), html=html, attachments=files)


def _without_padding(stream: bytes) -> bytes:
    """An embedded TNEF stream up to the end of its last whole attribute: the
    padding after it (at most 3 bytes) can be no attribute."""
    if not stream.startswith(_SIGNATURE):
        return stream
    offset = 6
    while offset + _ATTRIBUTE_OVERHEAD <= len(stream):
        end = offset + _ATTRIBUTE_OVERHEAD + struct.unpack_from("<I", stream, offset + 5)[0]
        if end > len(stream):
            return stream  # not a stream we can delimit: keep every byte
        offset = end
    return stream[:offset] if len(stream) - offset < 4 else stream


def _worth_keeping(file: _File) -> bool:
    return bool(file.data or file.embedded or file.title or file.long_name)


def _attachment(file: _File) -> Attachment:
    if file.embedded is not None and file.data is None:
        # An Outlook item (a forwarded mail, a meeting) is itself TNEF-encoded.
        name = safe_filename(file.long_name or file.title, default="item") + ".tnef"
        return Attachment(safe_filename(name), "application/vnd.ms-tnef", file.embedded)
    name = safe_filename(file.long_name or file.title, default="attachment")
    return Attachment(name, _content_type(file.mime_tag, name), file.data or b"")


def _content_type(mime_tag: str, name: str) -> str:
    if _MIME_TYPE.fullmatch(mime_tag):
        return mime_tag
    guessed, _ = mimetypes.guess_type(name, strict=False)
    return guessed or "application/octet-stream"


# --- MAPI property tables ---------------------------------------------------------

_FIXED_SIZES = {
    0x0002: 2, 0x000B: 2,  # short, boolean
    0x0003: 4, 0x0004: 4, 0x000A: 4,  # int, float, error
    0x0005: 8, 0x0006: 8, 0x0007: 8, 0x0014: 8, 0x0040: 8,  # double, currency, apptime, i8, time
    0x0048: 16,  # CLSID
}  # fmt: skip
_VARIABLE_TYPES = frozenset({0x0000, 0x000D, 0x001E, 0x001F, 0x0102})
_MULTI_VALUE = 0x1000
_NAMED = 0x8000


def _properties(data: bytes, codepage: str) -> list[TNEFMAPI_Attribute]:
    """tnefparse's decoding of a property table, once its counts are known sane."""
    _check_property_table(data)
    return decode_mapi(data, codepage)


def _check_property_table(data: bytes) -> None:
    """Walk the table as decode_mapi will, without building anything, and refuse
    a count that would make decode_mapi loop beyond the data."""
    size = len(data)
    count, offset = _u32(data, 0), 4
    if count > (size - offset) // 6:  # the smallest property is 6 bytes
        raise _Unreadable("MAPI property count larger than the table")
    for _ in range(count):
        if offset + 4 > size:
            raise _Unreadable("MAPI property table truncated")
        kind, name = struct.unpack_from("<HH", data, offset)
        offset += 4
        if name >= _NAMED:
            offset = _skip_property_name(data, offset)
        values, multi = 1, bool(kind & _MULTI_VALUE)
        if multi:
            kind ^= _MULTI_VALUE
            values, offset = _u32(data, offset), offset + 4
            smallest = _FIXED_SIZES.get(kind, 4)
            if values > (size - offset) // smallest:
                raise _Unreadable("MAPI multi-value count larger than the table")
        if kind in _FIXED_SIZES:
            offset += _FIXED_SIZES[kind] * values
            if values % 2 and kind in (0x0002, 0x000B):
                offset += 2  # padding to 4 bytes, as decode_mapi skips it
        elif kind in _VARIABLE_TYPES:
            offset = _skip_variable_values(data, offset, values if multi else None)
        else:
            return  # decode_mapi stops at an unknown type too (it raises and catches)
        if offset > size:
            raise _Unreadable("MAPI property runs past the table")


def _skip_property_name(data: bytes, offset: int) -> int:
    offset += 16  # the property set GUID
    kind, offset = _u32(data, offset), offset + 4
    if kind == 0:
        return offset + 4
    length, offset = _u32(data, offset), offset + 4
    return offset + length + (-length % 4)


def _skip_variable_values(data: bytes, offset: int, multi: int | None) -> int:
    count = 1
    if multi is None:
        count, offset = _u32(data, offset), offset + 4
    if count > (len(data) - offset) // 4:
        raise _Unreadable("MAPI value count larger than the table")
    for _ in range(count):
        length, offset = _u32(data, offset), offset + 4
        offset += length + (-length % 4)
    return offset


def _u32(data: bytes, offset: int) -> int:
    if offset + 4 > len(data):
        raise _Unreadable("MAPI property table truncated")
    return struct.unpack_from("<I", data, offset)[0]


# --- text ----------------------------------------------------------------------------


def _codec(name: str | None) -> str:
    try:
        return codecs.lookup(name or "").name
    except LookupError:
        return "cp1252"


def _decode(data: bytes, codec: str) -> str:
    """The declared code page, then UTF-8, then cp1252 with replacement: never raises."""
    for candidate in (codec, "utf-8"):
        try:
            return data.decode(candidate)
        except (UnicodeError, LookupError):
            continue
    return data.decode("cp1252", "replace")


def _text(prop: TNEFMAPI_Attribute, codepage: str = "cp1252") -> str:
    value = prop.data
    if isinstance(value, bytes):
        value = _decode(value, codepage)
    return str(value).replace("\x00", "")
