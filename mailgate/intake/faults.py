"""Crash points on demand, so the tests can prove a 250 always means a stored message.

RELIABILITY.md checklist 13 (RFC 5321 6.1): with `MAILGATE_FAULT=<point>:<n>`
the daemon SIGKILLs itself (no flush, no cleanup, as the OOM killer or a power
cut would) when the n-th message since start reaches <point>:

- `before_commit`: the message's transaction has written its rows, not committed;
- `after_commit`: `process` has committed, the 250 is not written yet (the
  sender retries; the retry must be stored as a duplicate);
- `imap_after_commit`: an IMAP message is committed, not yet moved out of
  the folder (fetched again after the restart, it must be a duplicate);
- `after_send_before_mark`: the relay accepted the n-th outbound mail, its
  row is not marked sent yet (resent once after the lease: at most two
  copies, with the same Message-ID).

Read once when the daemon starts; a malformed value stops the start.
Unset (production): no SQLAlchemy hook is installed, and what is left per
message is a test for None.
"""

from __future__ import annotations

import contextlib
import email.parser
import email.policy
import os
import signal
import threading
from collections.abc import Iterator

from sqlalchemy import event
from sqlalchemy.orm import Session

from mailgate.config import ConfigError

FAULT_ENV = "MAILGATE_FAULT"
FAULT_POINTS = ("before_commit", "after_commit", "imap_after_commit", "after_send_before_mark")


class Fault:
    def __init__(self, point: str, at: int) -> None:
        self.point, self.at = point, at
        self._reached = 0
        self._lock = threading.Lock()

    @classmethod
    def from_env(cls) -> Fault | None:
        spec = os.environ.get(FAULT_ENV, "")
        if not spec:
            return None
        point, _, at = spec.partition(":")
        if point not in FAULT_POINTS or not at.isdigit() or int(at) < 1:
            raise ConfigError(
                [f"{FAULT_ENV}={spec!r}: expected <point>:<n>, point one of "
                 f"{', '.join(FAULT_POINTS)}, n >= 1 (or leave it unset)"]
            )  # fmt: skip
        if point == "before_commit" and not event.contains(
            Session, "before_commit", _before_commit
        ):
            event.listen(Session, "before_commit", _before_commit)
        return cls(point, int(at))

    def reached(self, point: str, raw: bytes) -> None:
        if point != self.point:
            return
        with self._lock:
            self._reached += 1
            if self._reached != self.at:
                return
        headers = email.parser.BytesHeaderParser(policy=email.policy.compat32).parsebytes(raw)
        message_id = str(headers.get("Message-ID", "")).strip().strip("<>")
        os.write(2, f"{FAULT_ENV}: SIGKILL at {point}:{self.at} <{message_id}>\n".encode())
        os.kill(os.getpid(), signal.SIGKILL)


_in_pipeline = threading.local()  # (fault, raw) of the SMTP message this thread processes


@contextlib.contextmanager
def in_pipeline(fault: Fault | None, raw: bytes) -> Iterator[None]:
    """While this thread runs the pipeline for `raw`, its first commit may be the crash point."""
    if fault is None:
        yield
        return
    _in_pipeline.pending = (fault, raw)
    try:
        yield
    finally:
        _in_pipeline.pending = None


def _before_commit(session: Session) -> None:
    pending = getattr(_in_pipeline, "pending", None)
    if pending is not None and not session.in_nested_transaction():  # not a SAVEPOINT
        _in_pipeline.pending = None  # the message's first commit only
        session.flush()  # its rows written, the transaction still open
        fault, raw = pending
        fault.reached("before_commit", raw)
