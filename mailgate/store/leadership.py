"""Which instance leads: polls IMAP and runs the scheduled sweeps.

Every instance takes SMTP and sends from the outbox (rows are claimed with
SKIP LOCKED); two instances polling one mailbox or sweeping the same due
reminders would only race, so one leads at a time.

- PostgreSQL: a session-level advisory lock, held on a connection of its own
  in autocommit (never "idle in transaction"). When the leader dies its
  connection closes and the server drops the lock at once; an instance that
  polls `acquire()` every few seconds takes over. When the leader loses its
  connection (a restart of PostgreSQL, a network cut) its next `acquire()`
  fails and it steps down; another instance may already lead by then.
- SQLite: an exclusive `flock` on a file beside the database, dropped by the
  kernel when the process dies. SQLite is one machine's database, so two
  instances on it share that machine.

Leadership alone cannot stop a sweep that started just before a leader lost
its connection from overlapping the new leader's first one. The sweeps do
not rely on it: each reminder is claimed with a compare-and-set in the
transaction that queues it (sla/sweep.py), so an overlap sends nothing twice.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import threading
from pathlib import Path
from typing import Protocol

from sqlalchemy import Connection, Engine, text
from sqlalchemy.exc import DBAPIError

from mailgate.store.db import unavailable

log = logging.getLogger("mailgate.leadership")

# pg_advisory_lock's key: any number the database's other users do not take.
LOCK_KEY = 0x6D67_6C64  # "mgld"


class Leadership(Protocol):
    def acquire(self) -> bool:
        """Lead if nobody does; True while we lead. Never blocks for long."""
        ...

    def release(self) -> None: ...


class AdvisoryLock:
    def __init__(self, engine: Engine, key: int = LOCK_KEY) -> None:
        self._engine = engine
        self._key = key
        self._conn: Connection | None = None
        self._guard = threading.Lock()
        self._unreachable = False  # said once per outage, not every few seconds

    def acquire(self) -> bool:
        with self._guard:
            try:
                if self._conn is not None:
                    self._conn.execute(text("SELECT 1"))  # still connected: still ours
                    return True
                conn = self._engine.connect().execution_options(isolation_level="AUTOCOMMIT")
                self._unreachable = False
                got = conn.execute(text("SELECT pg_try_advisory_lock(:k)"), {"k": self._key})
                if got.scalar():
                    self._conn = conn
                    return True
                conn.close()
                return False
            except DBAPIError as exc:
                if not self._unreachable:
                    log.warning("leadership: %s", unavailable(exc))
                self._unreachable = True
                self._drop()
                return False

    def release(self) -> None:
        with self._guard:
            if self._conn is not None:
                # Unlocked now, not when the server notices the closed connection
                # (its backend exits a moment later): a standby may take over at once.
                with contextlib.suppress(DBAPIError):
                    self._conn.execute(text("SELECT pg_advisory_unlock(:k)"), {"k": self._key})
            self._drop()

    def _drop(self) -> None:
        # Invalidate rather than return it to the pool: the server drops the lock
        # with the connection, and a pooled connection would keep it.
        if self._conn is not None:
            self._conn.invalidate()
            self._conn.close()
            self._conn = None


class FileLock:
    def __init__(self, path: Path) -> None:
        self._path = path
        self._fd: int | None = None

    def acquire(self) -> bool:
        if self._fd is not None:
            return True
        fd = os.open(self._path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return False
        self._fd = fd
        return True

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing drops the flock
            self._fd = None


def leadership_for(engine: Engine) -> Leadership:
    if engine.dialect.name == "postgresql":
        return AdvisoryLock(engine)
    database = engine.url.database
    if not database or database == ":memory:":
        return AlwaysLeader()
    return FileLock(Path(f"{database}.leader"))


class AlwaysLeader:
    """A private in-memory database: nobody else can share it."""

    def acquire(self) -> bool:
        return True

    def release(self) -> None:
        pass
