"""The body as text: plain parts joined, or readable text made from the HTML."""

from __future__ import annotations

import re
from html import unescape

from mailgate.pipeline.parse.mime import Body
from mailgate.pipeline.sanitize import sanitise_html, strip_html_tags

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


def body_text(body: Body) -> tuple[str, str | None]:
    html = sanitise_html("\n".join(body.html)) if body.html else None
    plain = "\n\n".join(t for t in (_clean_text(p) for p in body.plain) if t.strip())
    if not plain.strip() and body.html:
        plain = html_to_text("\n".join(body.html))
    return plain, html
