"""The body as text: plain parts joined, or readable text made from the HTML."""

from __future__ import annotations

import re
from html import escape, unescape

from mailgate.pipeline.parse.mime import Body
from mailgate.pipeline.sanitize import sanitise_html, strip_html_tags

_NEWLINES = re.compile(r"\r\n?")
_TEXT_CONTROLS = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f]")
_HTML_WHITESPACE = re.compile(r"\s+")
_HTML_BREAK = re.compile(
    r"<\s*(?:br|hr|/p|/div|/tr|/li|/h[1-6]|/table|/blockquote|/pre|/dd|/dt)\b[^>]{0,1024}>",
    re.I,
)
# The tags around a link's label, found on their own: one pass, whatever the
# nesting or a tag never closed (matching "<a …>(.*?)</a>" rescanned the rest of
# the body for every "<a" left open: quadratic).
_LINK_TAG = re.compile(
    r"""<a\b[^>]{0,2048}?\bhref\s*=\s*(?:"([^"]{0,2048})"|'([^']{0,2048})'|([^\s>]{1,2048}))"""
    r"[^>]{0,2048}>|<(/)a\s*>",
    re.I,
)
_LINK_SCHEMES = ("http://", "https://", "mailto:")
_SPACES = re.compile(r"[ \t\u00a0]+")
_BLANK_LINES = re.compile(r"\n{3,}")


def _clean_text(text: str) -> str:
    """Newlines as \\n; no controls but tab and newline (no terminal escapes)."""
    return _TEXT_CONTROLS.sub("", _NEWLINES.sub("\n", text))


def html_to_text(html: str) -> str:
    """Readable text from HTML, simply: block ends become newlines, tags go, and
    a link keeps its address after its label ("here <https://…>"): made from
    staff's HTML-only mail, this text is what the customer receives."""
    marked = _HTML_BREAK.sub("\n", _HTML_WHITESPACE.sub(" ", _with_link_targets(html)))
    text = _clean_text(unescape(strip_html_tags(marked)))
    lines = (_SPACES.sub(" ", line).strip() for line in text.split("\n"))
    return _BLANK_LINES.sub("\n\n", "\n".join(lines)).strip()


def _with_link_targets(html: str) -> str:
    """The HTML with each link's address written after its label, escaped (the
    tags are stripped and entities decoded afterwards). Only addresses a reader
    can follow: not a script, nor a place in the page."""
    out: list[str] = []
    done = 0
    target: str | None = None  # of the link open at `label_from`
    label_from = 0
    for tag in _LINK_TAG.finditer(html):
        if target is not None:  # its label ends here, at its end tag or the next link
            label = html[label_from : tag.start()]
            shown = unescape(strip_html_tags(label)).strip()
            if target not in shown:  # else the label is the address already
                out.append(html[done : tag.start()])
                out.append(f" &lt;{escape(target)}&gt;" if shown else escape(target))
                done = tag.start()
            target = None
        if tag.group(4) is None:  # an opening tag
            url = unescape(next(g for g in tag.groups()[:3] if g is not None)).strip()
            if url.lower().startswith(_LINK_SCHEMES):
                target = url[len("mailto:") :] if url.lower().startswith("mailto:") else url
                label_from = tag.end()
    out.append(html[done:])
    return "".join(out)


def body_text(body: Body) -> tuple[str, str | None]:
    html = sanitise_html("\n".join(body.html)) if body.html else None
    plain = "\n\n".join(t for t in (_clean_text(p) for p in body.plain) if t.strip())
    if not plain.strip() and body.html:
        plain = html_to_text("\n".join(body.html))
    return plain, html
