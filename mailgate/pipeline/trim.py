"""Trim a staff reply to what its author wrote: no quoted history, no signature.

Staff answer ticket mail from their own client (Outlook, Gmail, Thunderbird,
Apple Mail, phones; in English, French or Spanish), and every client marks the
start of the quoted history differently. The customer must receive only the new
words, so this module finds that start and cuts there, then removes the
signature. It is a pure function of already-decoded plain text: no I/O.

Two rules shape every heuristic here:

* Losing a staff member's words is worse than relaying a quote. A marker that
  could plausibly be prose needs corroboration (a date, an address, a second
  header line), an inline reply between quotes is never cut, and if nothing
  would be left the input is returned whole.
* The input is hostile: any customer can make a staff client quote a megabyte of
  crafted text. Regexes only ever see the first `_MAX_PROBE` characters of a
  line, have no nested or overlapping quantifiers, and every look-ahead either
  spans a constant number of lines or stops at the next unquoted line, so the
  work is linear in the size of the input.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import regex

from mailgate.pipeline.patterns import compile_pattern, found

# Regexes see at most this much of a line: no header, attribution or separator is
# longer, and it caps what a pathological line can cost.
_MAX_PROBE = 500

# Mail clients wrap a long attribution ("On …, Name <address> wrote:") over at
# most 3 lines in practice.
_MAX_ATTRIBUTION_LINES = 3

# How far below a `From:` line the rest of an Outlook header block is looked for,
# and how far below a separator the forwarded `Subject: FW:` line can be.
_HEADER_LOOKAHEAD = 3
_SUBJECT_LOOKAHEAD = 8

# A bare `--` (without the RFC 3676 trailing space) is also used as a section
# rule in prose; accept it as a signature delimiter only this close to the end.
_MAX_BARE_SIGNATURE_LINES = 20

# --- Markers that begin the quoted history -----------------------------------
# All are matched (re.match) against a line with surrounding whitespace removed
# and truncated to _MAX_PROBE characters. None can match a `>`-quoted line, so an
# attribution nested inside a quote never cuts the author's inline answers.

# Attributions, one per language. Anchored on both ends so that prose merely
# containing "wrote:" does not match; the leading word is case-sensitive because
# clients always capitalise it and "on"/"le"/"el" start many prose lines. They
# are tried on the line alone and joined (with one space) to the next one or two
# lines, because clients wrap long attributions. Each `.*` is followed by a
# literal verb and the string is pre-checked to end with ":", so matching is
# linear. A match also needs _ATTRIBUTION_HINT (see below).
_ATTRIBUTION_EN = r"^On\s.*\bwrote\s{0,2}:$"
_ATTRIBUTION_FR = r"^Le\s.*\ba\s{1,3}[ée]crit\s{0,2}:$"  # "a écrit :" / "a écrit:"
_ATTRIBUTION_ES = r"^El\s.*\bescribi[óo]\s{0,2}:$"
_ATTRIBUTION_DE = r"^Am\s.*\bschrieb\b.*:$"  # "Am 03.11.2026 um 10:02 schrieb A <a@x>:"

# Outlook / Thunderbird "original message" separators, case-insensitive. The
# forward separators are deliberately absent: a forward is content.
_SEPARATOR = (
    r"^-{2,}\s{0,3}(?:Original Message|Message d['’]origine|Message original|"
    r"Mensaje original|Ursprüngliche Nachricht|Mensagem original)\s{0,3}-{2,}$"
)

# Outlook's rule above a reply header block. On its own it is just a line of
# underscores (people draw those), so it cuts only when a From line follows.
_UNDERSCORE_RULE = r"^_{20,}$"

# First line of an Outlook header block (English, French "De :", Spanish "De:",
# German). Plain-text conversions of HTML sometimes bold it as "*From:*". It cuts
# only when more header lines follow (see _outlook_header_block): "From: …" alone
# is common in prose.
_HEADER_FROM = r"^\*{0,2}(?:From|De|Von)\s{0,2}:"

DEFAULT_MARKERS: tuple[str, ...] = (
    _ATTRIBUTION_EN,
    _ATTRIBUTION_FR,
    _ATTRIBUTION_ES,
    _ATTRIBUTION_DE,
    _SEPARATOR,
    _UNDERSCORE_RULE,
    _HEADER_FROM,
)
"""Regex sources of the quoted-history markers used by default, in this order:

0-3. attribution lines (en "On … wrote:", fr "Le … a écrit :", es "El … escribió:",
     de "Am … schrieb …:"), case-sensitive, tried on a line alone and joined with
     the next 1 or 2 lines; they must also contain a date, a time or an address;
     and one whose quote is followed by the author's own text is an inline reply,
     not a cut;
4.   "-----Original Message-----" separators (en, fr, es, de, pt), any case;
5.   Outlook's underscore rule, a cut only when a From/De/Von line follows;
6.   Outlook's From/De/Von header line, a cut only when Sent/Date/Envoyé/Enviado
     (el)/Fecha/Gesendet/Datum follows within 3 lines, or To/À/Para/An/Cc/Subject
     does and the From line holds an address.

All are matched against the line stripped of surrounding whitespace and cut to
its first 500 characters. `trim_reply(extra_markers=...)` adds plain per-line
markers on top of these.
"""

_ATTRIBUTIONS: tuple[re.Pattern[str], ...] = tuple(
    re.compile(source)
    for source in (_ATTRIBUTION_EN, _ATTRIBUTION_FR, _ATTRIBUTION_ES, _ATTRIBUTION_DE)
)
# Cheap gate before joining lines: only these can start an attribution.
_ATTRIBUTION_START = re.compile(r"^(?:On|Le|El|Am)\s")
# What distinguishes "On Mon, 3 Nov 2026 at 10:02, Alice <a@x> wrote:" from prose
# such as "On the ticket you wrote:": every client puts a year, a time or an
# address in it.
_ATTRIBUTION_HINT = re.compile(r"@|\d:\d\d|\b(?:19|20)\d\d\b")
# The verb of an attribution at the end of a line, in any wording, for the line
# just above a trailing quote ("Alice Martin <alice@example.com> wrote:").
_ATTRIBUTION_VERB = re.compile(
    r"\b(?:wrote|writes|a\s{1,3}[ée]crit|escribi[óo]|schrieb)\s{0,2}:$", re.IGNORECASE
)

_SEPARATOR_RE = re.compile(_SEPARATOR, re.IGNORECASE)
_UNDERSCORE_RULE_RE = re.compile(_UNDERSCORE_RULE)
_HEADER_FROM_RE = re.compile(_HEADER_FROM)
# Header lines that only a mail client writes under "From:" (the date of the
# quoted mail): one of them is enough.
_HEADER_DATE_RE = re.compile(
    r"^\*{0,2}(?:Sent|Date|Envoy[ée]|Enviado(?: el)?|Fecha|Gesendet|Datum)\s{0,2}:"
)
# Header lines that also occur in prose ("From: 22:00 / To: 23:00"): they
# confirm a header block only together with an address or with each other.
_HEADER_OTHER_RE = re.compile(r"^\*{0,2}(?:To|À|Para|An|Cc|Subject|Objet|Asunto|Betreff)\s{0,2}:")
# Outlook uses the same separators and header blocks for forwards; the subject
# prefix tells them apart (FW/Fwd en, TR fr, RV es, WG de, ENC pt).
_FORWARD_SUBJECT_RE = re.compile(
    r"^\*{0,2}(?:Subject|Objet|Asunto|Betreff)\s{0,2}:\*{0,2}\s{0,4}(?:FWD?|TR|RV|WG|ENC)\s{0,2}:",
    re.IGNORECASE,
)
# Forward markers end the part to trim but what follows is kept: a forwarded
# mail is content the author chose to send, not quoted history.
_FORWARD_RE = re.compile(
    r"^(?:-{2,}\s{0,3}(?:Forwarded message|Message transféré|Mensaje reenviado|"
    r"Weitergeleitete Nachricht|Mensagem encaminhada)\s{0,3}-{2,}"
    r"|(?:Begin forwarded message|Début du message (?:réexpédié|transféré)|"
    r"Inicio del mensaje reenviado|Anfang der weitergeleiteten Nachricht)\s{0,2}:)$",
    re.IGNORECASE,
)

# RFC 3676 §4.3 signature delimiter "-- ", plus the bare "--" many clients and
# people type. Matched on the raw line: an indented "--" is not a delimiter.
_SIGNATURE_DELIMITER_RE = re.compile(r"^--[ \t]*$")
# Footers phones and mail apps append. Only ever removed as the last non-blank
# line, so a sentence like "Sent from my laptop, the logs show…" mid-text stays.
_MOBILE_FOOTER_RE = re.compile(
    r"^(?:"
    r"Sent from my \S.{0,60}"
    r"|Sent from (?:Outlook|Mail|Yahoo Mail|Gmail|AOL|Proton ?Mail|Samsung)\b.{0,80}"
    r"|Sent with Proton ?Mail\b.{0,80}"
    r"|Get Outlook for (?:iOS|Android)\b.{0,80}"
    r"|Envoy[ée] (?:de|depuis) mon \S.{0,60}"
    r"|Envoy[ée] [àa] partir de \S.{0,80}"
    r"|Obtenir Outlook pour (?:iOS|Android)\b.{0,80}"
    r"|Enviado desde (?:mi )?\S.{0,60}"
    r"|Obtener Outlook para (?:iOS|Android)\b.{0,80}"
    r"|Von meinem \S.{0,40} gesendet"
    r"|Gesendet von (?:meinem )?\S.{0,60}"
    r"|Enviado do meu \S.{0,60}"
    r")$",
    re.IGNORECASE,
)
# Some apps stack two footers (a mail app's own under the device's); more than
# that is no longer a footer but text, so stop there.
_MAX_FOOTERS = 2


def trim_reply(
    text: str,
    *,
    extra_markers: Sequence[str] = (),
    strip_signature: bool = True,
    whole_if_empty: bool = True,
) -> str:
    """The new part of a reply: text above the first quote marker, without the signature.

    `extra_markers` are regex sources (e.g. the "reply above this line" rule of
    our own notifications), searched case-insensitively in every line stripped of
    surrounding whitespace and cut to its first 500 characters; the first line
    matching any of them, or a DEFAULT_MARKERS rule, starts the quoted history
    and is dropped with everything below it. A trailing run of `>`-quoted lines
    is dropped too; quoted lines followed by the author's text are kept. With
    `strip_signature`, the signature ("-- " delimiter, phone footer) goes too.

    A forward ("---------- Forwarded message ---------") ends the part trimmed,
    and is kept. Line endings become "\\n" and trailing whitespace is removed. If
    nothing would be left, the whole (normalised) input is returned instead, or
    "" without `whole_if_empty` (the author's words are elsewhere: the staff
    /commands above the quote).
    Raises ValueError if an extra marker is not a valid regex.
    """
    lines = text.replace("\r\n", "\n").replace("\r", "\n").split("\n")
    probes = [line[:_MAX_PROBE].strip() for line in lines]
    extra = [compile_pattern(source) for source in extra_markers]

    end, forward = _find_history(probes, extra)
    own = _trim_own_part(lines[:end], probes[:end], strip_signature)
    if forward and len(own) == end:
        # Nothing trimmed above the forward: keep the text byte for byte.
        result = _tidy(lines)
    elif forward:
        result = "\n\n".join(part for part in (_tidy(own), _tidy(lines[end:])) if part)
    else:
        result = _tidy(own)
    # Only whitespace left means a heuristic misfired (the mail is all quote, or
    # starts with an attribution): relay everything rather than nothing.
    return result or (_tidy(lines) if whole_if_empty else "")


def _find_history(probes: list[str], extra: list[regex.Pattern[str]]) -> tuple[int, bool]:
    """Index of the first line of quoted history (len if none), and whether it is a forward."""
    count = len(probes)
    for i, probe in enumerate(probes):
        if not probe:
            continue
        # The operator's markers are checked even on quoted lines: they know
        # their own notification best.
        if any(found(pattern, probe) for pattern in extra):
            return i, False
        if probe.startswith(">"):
            continue
        if _FORWARD_RE.match(probe):
            return i, True
        if _SEPARATOR_RE.match(probe) or (
            _UNDERSCORE_RULE_RE.match(probe) and _from_line_follows(probes, i)
        ):
            return i, _forwarded_subject(probes, i)
        if _HEADER_FROM_RE.match(probe) and _outlook_header_block(probes, i):
            return i, _forwarded_subject(probes, i)
        span = _attribution_span(probes, i)
        if span and not _inline_reply_follows(probes, i + span):
            return i, False
    return count, False


def _from_line_follows(probes: list[str], i: int) -> bool:
    """Whether the next non-blank line (within 2) below line i is a From header."""
    for probe in probes[i + 1 : i + 3]:
        if probe:
            return _HEADER_FROM_RE.match(probe) is not None
    return False


def _outlook_header_block(probes: list[str], i: int) -> bool:
    """Whether the From line at i heads a header block rather than a line of prose."""
    others = 0
    for probe in probes[i + 1 : i + 1 + _HEADER_LOOKAHEAD]:
        if _HEADER_DATE_RE.match(probe):
            return True
        if _HEADER_OTHER_RE.match(probe):
            others += 1
    return others >= 2 or (others == 1 and "@" in probes[i])


def _forwarded_subject(probes: list[str], i: int) -> bool:
    """Whether the header block starting near line i has a forward subject (FW:, TR:, …)."""
    return any(_FORWARD_SUBJECT_RE.match(probe) for probe in probes[i : i + 1 + _SUBJECT_LOOKAHEAD])


def _attribution_span(probes: list[str], i: int) -> int:
    """How many lines (1 to 3) the attribution starting at line i takes; 0 if none."""
    joined = probes[i]
    if not _ATTRIBUTION_START.match(joined):
        return 0
    for span in range(1, _MAX_ATTRIBUTION_LINES + 1):
        if span > 1:
            # A wrapped attribution continues on the very next line; a blank or
            # quoted line ends it, and so does a colon (the sentence ended there).
            following = i + span - 1
            if following >= len(probes) or joined.endswith(":"):
                return 0
            nxt = probes[following]
            if not nxt or nxt.startswith(">"):
                return 0
            joined = f"{joined} {nxt}"
        if _is_attribution(joined):
            return span
    return 0


def _is_attribution(candidate: str) -> bool:
    # endswith first: it is O(1), and it is what keeps the `.*`s linear.
    return (
        candidate.endswith(":")
        and any(pattern.match(candidate) for pattern in _ATTRIBUTIONS)
        and _ATTRIBUTION_HINT.search(candidate) is not None
    )


def _inline_reply_follows(probes: list[str], start: int) -> bool:
    """Whether, from line `start`, a quote is followed by more of the author's text.

    Bottom-posters and inline repliers keep the attribution on top of the quote
    and write between or below its lines; cutting at the attribution would lose
    all of that. Top-posted history, by contrast, is quoted down to the end.
    """
    count = len(probes)
    j = start
    while j < count and not probes[j]:
        j += 1
    if j == count or not probes[j].startswith(">"):
        return False
    while j < count and (not probes[j] or probes[j].startswith(">")):
        j += 1
    return j < count


def _trim_own_part(lines: list[str], probes: list[str], strip_signature: bool) -> list[str]:
    """The author's part without a trailing quote and (optionally) the signature."""
    lines = _drop_trailing_quote(lines, probes)
    if strip_signature:
        kept = _drop_signature(lines, probes)
        # A footer or signature can sit below a quote (iPhone quotes the
        # attribution too); with it gone, that quote is now trailing.
        if len(kept) != len(lines):
            lines = _drop_trailing_quote(kept, probes)
    return lines


def _drop_trailing_quote(lines: list[str], probes: list[str]) -> list[str]:
    """Lines without a final run of `>`-quoted lines and the attribution above it."""
    i = len(lines)
    start = None
    while i > 0:
        probe = probes[i - 1]
        if probe.startswith(">"):
            start = i - 1
        elif probe:
            break
        i -= 1
    if start is None:
        return lines
    return lines[: start - _attribution_above(probes, start)]


def _attribution_above(probes: list[str], start: int) -> int:
    """How many lines just above line `start` (blank ones between) are its attribution."""
    j = start
    while j > 0 and not probes[j - 1]:
        j -= 1
    for span in range(1, _MAX_ATTRIBUTION_LINES + 1):
        if j - span < 0:
            break
        if _attribution_span(probes, j - span) == span:
            return start - (j - span)
    # Clients with a custom attribution ("Alice <alice@example.com> wrote:"): the
    # verb and an address or date are enough here, since a quote follows.
    last = probes[j - 1] if j > 0 else ""
    if _ATTRIBUTION_VERB.search(last) and _ATTRIBUTION_HINT.search(last):
        return start - (j - 1)
    return 0


def _drop_signature(lines: list[str], probes: list[str]) -> list[str]:
    """Lines without the signature: from the first delimiter, or the phone footers."""
    for i, line in enumerate(lines):
        if _SIGNATURE_DELIMITER_RE.match(line[:_MAX_PROBE]) and (
            line.startswith("-- ") or len(lines) - i - 1 <= _MAX_BARE_SIGNATURE_LINES
        ):
            return lines[:i]
    end = len(lines)
    for _ in range(_MAX_FOOTERS):
        while end > 0 and not probes[end - 1]:
            end -= 1
        if end == 0 or not _MOBILE_FOOTER_RE.match(probes[end - 1]):
            break
        end -= 1
    return lines[:end]


def _tidy(lines: list[str]) -> str:
    """Lines joined with "\\n", without leading blank lines or trailing whitespace."""
    first = 0
    while first < len(lines) and not lines[first].strip():
        first += 1
    return "\n".join(lines[first:]).rstrip()
