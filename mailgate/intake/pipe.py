"""The MTA pipe and bulk import source: files, standard input, mbox, Maildir.

Only turns the outside world into (raw bytes, envelope); the pipeline decides.
"""

from __future__ import annotations

import mailbox
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
            yield from _mailbox_items(mailbox.mbox(path, create=False), path, envelope)
        elif maildir:
            yield from _mailbox_items(
                mailbox.Maildir(path, factory=None, create=False), path, envelope
            )
        else:
            yield Item(path, Path(path).read_bytes(), envelope)


def _mailbox_items(box: mailbox.Mailbox, path: str, envelope: Envelope) -> Iterator[Item]:
    for index, key in enumerate(box.iterkeys(), start=1):
        yield Item(f"{path}#{index}", box.get_bytes(key), envelope)
