"""A cheap scan of the raw bytes, before the stdlib parser builds any tree.

It refuses what that parser handles badly (RELIABILITY.md §5): about 970
nested levels raise RecursionError, 50k parts take 20 s and a To of 20k
addresses 9 s. Linear regexes over the bytes, nothing copied.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterator

from mailgate.pipeline.message import ParseError
from mailgate.pipeline.parse.limits import Limits

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


def prescan(raw: bytes, limits: Limits) -> None:
    """Raise ParseError for a mail over the header, address or MIME limits."""
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
