"""Make untrusted mail content safe to store, show and copy into headers.

Everything here is pure and cheap; the parser calls it on every message and
the outbound code reuses ``clean_header_text`` for values it copies from an
inbound mail into a header it builds.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Callable

import nh3

# --- HTML -------------------------------------------------------------------

# An explicit allowlist: nh3's defaults keep <img src="http://…">, which is a
# read-receipt beacon as soon as a staff member opens the ticket.
_ALLOWED_TAGS = frozenset(
    {
        "a", "abbr", "acronym", "address", "b", "bdi", "bdo", "big", "blockquote", "br",
        "caption", "center", "cite", "code", "col", "colgroup", "dd", "del", "dfn", "div",
        "dl", "dt", "em", "font", "h1", "h2", "h3", "h4", "h5", "h6", "hr", "i", "img",
        "ins", "kbd", "li", "mark", "ol", "p", "pre", "q", "rp", "rt", "ruby", "s", "samp",
        "small", "span", "strike", "strong", "sub", "sup", "table", "tbody", "td", "tfoot",
        "th", "thead", "time", "tr", "tt", "u", "ul", "var", "wbr",
    }
)  # fmt: skip
# Removed together with their content: their text is never what the sender meant
# a reader to see (and <style> content would otherwise leak in as text).
_DROPPED_WITH_CONTENT = frozenset({"script", "style", "title", "template", "noscript"})
# No "style" and no "background": CSS url() and background= fetch remote content too.
_ALLOWED_ATTRIBUTES: dict[str, set[str]] = {
    "*": {"title", "lang", "dir", "align", "valign"},
    "a": {"href", "name"},
    "img": {"src", "alt", "width", "height"},
    "font": {"color", "size", "face"},
    "table": {"border", "cellpadding", "cellspacing", "width", "summary"},
    "td": {"colspan", "rowspan", "width", "nowrap"},
    "th": {"colspan", "rowspan", "width", "nowrap", "scope"},
    "col": {"span", "width"},
    "colgroup": {"span", "width"},
    "ol": {"start", "type", "reversed"},
    "li": {"value"},
    "q": {"cite"},
    "blockquote": {"cite"},
    "del": {"cite", "datetime"},
    "ins": {"cite", "datetime"},
    "time": {"datetime"},
    "abbr": {"title"},
}
_URL_SCHEMES = frozenset({"http", "https", "mailto", "cid"})
_LINK_PREFIXES = ("http://", "https://", "mailto:", "#")
_URL_ATTRIBUTES = frozenset({"href", "src", "cite"})


def _filter_attribute(tag: str, attribute: str, value: str) -> str | None:
    """Second line of defence after url_schemes, and the only place that knows
    that an image may come from the message itself (cid:) and nowhere else."""
    if attribute not in _URL_ATTRIBUTES:
        return value
    # Browsers ignore leading whitespace and controls in URLs; so must we.
    probe = value.lstrip("\x00\t\n\x0c\r ").lower()
    if tag == "img":
        return value if probe.startswith("cid:") else None
    return value if probe.startswith(_LINK_PREFIXES) else None


def _make_cleaner(**options: object) -> Callable[[str], str]:
    # nh3.Cleaner (0.3+) compiles the policy once; older nh3 only has clean().
    cleaner_class = getattr(nh3, "Cleaner", None)
    if cleaner_class is not None:
        return cleaner_class(**options).clean
    options.pop("url_relative", None)
    return lambda html: nh3.clean(html, **options)


_sanitise = _make_cleaner(
    tags=set(_ALLOWED_TAGS),
    clean_content_tags=set(_DROPPED_WITH_CONTENT),
    attributes={tag: set(names) for tag, names in _ALLOWED_ATTRIBUTES.items()},
    attribute_filter=_filter_attribute,
    url_schemes=set(_URL_SCHEMES),
    url_relative="deny",
    link_rel="noopener noreferrer nofollow",
    strip_comments=True,
)

_strip_all_tags = _make_cleaner(
    tags=set(),
    clean_content_tags=set(_DROPPED_WITH_CONTENT),
    attributes={},
    strip_comments=True,
)


def sanitise_html(html: str) -> str:
    """Return ``html`` reduced to a fixed set of harmless tags and attributes.

    Scripts, styles, event handlers, ``javascript:`` links and every image
    that is not a ``cid:`` reference to a part of the same message are removed,
    so rendering the result never runs code nor fetches anything.
    """
    return _sanitise(_strip_nul_and_surrogates(html))


def strip_html_tags(html: str) -> str:
    """Remove every tag (and script/style content); entities stay escaped.

    The parser uses it to derive a text body from an HTML-only mail.
    """
    return _strip_all_tags(_strip_nul_and_surrogates(html))


# --- header text ---------------------------------------------------------------

# C0, DEL, C1 and the Unicode line/paragraph separators: anything a terminal,
# a header serialiser or a log line could read as a break or an escape.
_CONTROLS = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029]")
_SURROGATES = re.compile("[\ud800-\udfff]")


def _strip_nul_and_surrogates(text: str) -> str:
    # Lone surrogates (from surrogateescape or UTF-7) cannot be encoded to
    # UTF-8, and PostgreSQL refuses NUL in text columns.
    text = text.replace("\x00", "")
    return _SURROGATES.sub("\ufffd", text) if _SURROGATES.search(text) else text


def replace_controls(value: str) -> str:
    """Every control character (CR and LF included) becomes a space."""
    value = _CONTROLS.sub(" ", value)
    return _SURROGATES.sub("\ufffd", value) if _SURROGATES.search(value) else value


def clean_header_text(value: str, max_chars: int) -> str:
    """One line of text safe to put in a header: no controls, single spaces, capped.

    CR/LF from RFC 2047 words (``=?utf-8?q?a=0D=0ABcc:_x?=``) become spaces,
    so a value copied into ``Re: …`` cannot start a new header.
    """
    collapsed = " ".join(replace_controls(value).split())
    if len(collapsed) <= max_chars:
        return collapsed
    return collapsed[: max(max_chars, 0)].rstrip()


# --- file names -------------------------------------------------------------------

_MAX_FILENAME_BYTES = 255
_MAX_EXTENSION_CHARS = 16
# Bidi overrides and other invisible format characters let "invoice\u202efdp.exe"
# display as "invoiceexe.pdf".
_INVISIBLE = re.compile("[\u200b-\u200f\u202a-\u202e\u2060-\u2064\u2066-\u206f\ufeff]")
# Characters Windows refuses in names; ':' also opens NTFS alternate streams.
_WINDOWS_FORBIDDEN = re.compile(r'[<>:"|?*]')
_RESERVED_STEMS = frozenset(
    {"con", "prn", "aux", "nul"}
    | {f"com{i}" for i in range(1, 10)}
    | {f"lpt{i}" for i in range(1, 10)}
    | {"com¹", "com²", "com³", "lpt¹", "lpt²", "lpt³"}
)


def safe_filename(name: str | None, default: str = "attachment") -> str:
    """A display name for an attachment that is harmless wherever it is shown
    or offered for download: no directories, controls, leading dots, reserved
    Windows device names, and at most 255 UTF-8 bytes with its extension kept.

    It is still never used as a path: files are stored under their hash.
    """
    cleaned = _clean_filename(name or "")
    return cleaned or _clean_filename(default) or "attachment"


def _clean_filename(name: str) -> str:
    name = unicodedata.normalize("NFC", _strip_nul_and_surrogates(name))
    name = _INVISIBLE.sub("", _CONTROLS.sub("", name))
    # Only the last path component: "../../etc/x" and "..\\win.ini" name no directory.
    name = re.split(r"[/\\]", name)[-1]
    name = _WINDOWS_FORBIDDEN.sub("_", name)
    name = " ".join(name.split())
    # Leading dots hide files and make "..", trailing dots/spaces are dropped by
    # Windows (so "CON." is CON).
    name = name.lstrip(". ").rstrip(". ")
    if not name:
        return ""
    if name.split(".", 1)[0].rstrip().lower() in _RESERVED_STEMS:
        name = "_" + name
    return _cap_utf8(name, _MAX_FILENAME_BYTES)


def _cap_utf8(name: str, limit: int) -> str:
    if len(name.encode("utf-8")) <= limit:
        return name
    stem, dot, extension = name.rpartition(".")
    if not dot or not stem or len(extension) > _MAX_EXTENSION_CHARS:
        stem, extension = name, ""
    suffix = f".{extension}" if extension else ""
    budget = limit - len(suffix.encode("utf-8"))
    # Cut on a character boundary: a torn multi-byte sequence is dropped.
    stem = stem.encode("utf-8")[:budget].decode("utf-8", "ignore").rstrip(". ")
    return (stem or "attachment") + suffix
