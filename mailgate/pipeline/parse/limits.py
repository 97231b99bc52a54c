"""The bounds past which a mail is quarantined instead of parsed."""

from __future__ import annotations

from dataclasses import dataclass

from mailgate.config import Limits as LimitSettings


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
