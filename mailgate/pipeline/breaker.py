"""Circuit breaker: a sender or a subject opening tickets faster than a person would.

Past `hygiene.loops.tickets_per_sender_per_hour` new tickets from one address,
or `tickets_per_subject_per_hour` with one subject from one organisation,
further new tickets are quarantined (an operator may release them) and
operators are alerted once. The subject is counted within one organisation:
when an outage makes ten customers write "site down", none of them is held.
"""

from __future__ import annotations

import hashlib
import re

from mailgate.config import Loops

# Reply and forward prefixes, in the languages our customers write in.
_PREFIX = re.compile(r"^\s*((re|fwd?|tr|rv|aw|wg|sv|antw|enc|r)\s*(\[\d+\])?\s*:\s*)+", re.I)
_TAG = re.compile(r"\[[^\]]{1,80}\]")


def subject_key(subject: str) -> str:
    """The same for "Re: [SUP-1] Disk full" and "disk  FULL"."""
    text = _TAG.sub(" ", subject)
    while (stripped := _PREFIX.sub("", text)) != text:
        text = _TAG.sub(" ", stripped)
    text = " ".join(text.lower().split())
    return hashlib.sha256(text.encode("utf-8", "replace")).hexdigest()


def tripped(by_sender: int, by_subject: int, loops: Loops) -> tuple[str, str] | None:
    """("sender" | "subject", why) when the next new ticket must be held, given the
    tickets opened in the last hour; None otherwise."""
    if by_sender >= loops.tickets_per_sender_per_hour:
        return "sender", f"{by_sender} tickets from this sender in the last hour"
    if by_subject >= loops.tickets_per_subject_per_hour:
        return "subject", f"{by_subject} tickets with this subject in the last hour"
    return None
