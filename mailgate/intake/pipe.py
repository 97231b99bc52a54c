"""The MTA pipe and bulk import source: files, standard input, mbox, Maildir.

Only turns the outside world into (raw bytes, envelope); the pipeline decides.
"""

from __future__ import annotations

import errno
import mailbox
import os
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from mailgate.pipeline.message import Envelope


@dataclass(frozen=True)
class Item:
    label: str  # where the message came from, for the per-message output line
    raw: bytes
    envelope: Envelope


def read_messages(
    paths: Sequence[str],
    *,
    mbox: bool = False,
    maildir: bool = False,
    sender: str | None = None,
    recipients: Sequence[str] = (),
) -> Iterator[Item]:
    source = "mbox" if mbox else "maildir" if maildir else "pipe"
    envelope = Envelope(
        source=source, mail_from=sender, rcpt_to=tuple(r.lower() for r in recipients)
    )
    for path in paths or ["-"]:
        if path == "-":
            yield Item("-", sys.stdin.buffer.read(), envelope)
        elif mbox:
            yield from _mailbox_items(_open_mbox(path), path, envelope)
        elif maildir:
            yield from _mailbox_items(_open_maildir(path), path, envelope)
        else:
            yield Item(path, Path(path).read_bytes(), envelope)


class NotAMailbox(ValueError):
    """A file given as an mbox that is not one: refused whole, so no mail in it is skipped."""


def _open_mbox(path: str) -> mailbox.mbox:
    # The mbox reader skips whatever comes before the first "From " line: a
    # single message passed with --mbox would be ingested as nothing at all.
    with open(path, "rb") as fh:  # missing, a directory: OSError, for the caller to report
        start = fh.read(5)
    if start and start != b"From ":
        raise NotAMailbox(f"{path}: not an mbox (it must start with a 'From ' line); "
                          "for a single message, leave out --mbox")  # fmt: skip
    return mailbox.mbox(path, create=False)


def _open_maildir(path: str) -> mailbox.Maildir:
    try:
        return mailbox.Maildir(path, factory=None, create=False)
    except mailbox.NoSuchMailboxError:  # an OSError, so it is reported as any unreadable input
        raise FileNotFoundError(errno.ENOENT, os.strerror(errno.ENOENT), path) from None


def _mailbox_items(box: mailbox.Mailbox, path: str, envelope: Envelope) -> Iterator[Item]:
    for index, key in enumerate(box.iterkeys(), start=1):
        yield Item(f"{path}#{index}", box.get_bytes(key), envelope)
