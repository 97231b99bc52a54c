"""Engine set-up and schema migrations.

SQLite runs in WAL mode with foreign keys on, and every transaction starts
with BEGIN IMMEDIATE: writers queue on the database lock at the start of the
unit of work instead of failing half-way when a read lock cannot be upgraded.

Within one process, writers also queue on a lock of their own before asking
SQLite. SQLite's busy handler polls with growing sleeps (up to 100 ms), so
under load a waiting writer keeps losing the lock to threads that happen to
ask at the right moment: the outbox sender, recording one sent mail, waited
seconds behind the SMTP intake threads. A thread lock hands over at once.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sqlite3
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sqlalchemy import Engine, create_engine, event, inspect, text
from sqlalchemy.exc import DBAPIError, OperationalError
from sqlalchemy.orm import Session, sessionmaker

if TYPE_CHECKING:
    from alembic.config import Config

log = logging.getLogger("mailgate.store")

MIGRATIONS = Path(__file__).parent / "migrations"
# The newest migration. Kept here so that starting the daemon does not import
# Alembic and read every migration script (a third of a second, paid at each
# restart); tests/test_store.py checks it against migrations/versions/.
HEAD_REVISION = "0011"


class SchemaError(Exception):
    """The database is not at the schema this version expects."""


def make_engine(url: str, *, busy_timeout_ms: int = 10_000, **kwargs: Any) -> Engine:
    if url.startswith("sqlite"):
        path = sqlite_file(url)
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            # Owner-only from the start, whatever the umask: it holds every
            # ticket's text and address. SQLite gives its -wal and -shm files
            # the database file's permissions.
            with contextlib.suppress(FileExistsError):
                os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
                # Said out loud: after a typo in database_url, a fresh database
                # would number tickets from 1 again, beside the real one.
                log.warning("created a new, empty database at %s", path.resolve())
        gate = _WriterGate(busy_timeout_ms / 1000)
        connect_args = {"timeout": busy_timeout_ms / 1000, "factory": gate.connection_class()}
        engine = create_engine(url, connect_args=connect_args, **kwargs)
        _configure_sqlite(engine, busy_timeout_ms, gate)
        return engine
    return create_engine(
        with_driver(url), pool_pre_ping=True, connect_args=POSTGRES_CONNECT, **kwargs
    )


def with_driver(url: str) -> str:
    """The URL SQLAlchemy is given: SQLAlchemy's default PostgreSQL driver is
    psycopg2, and we ship psycopg 3."""
    if url.startswith("postgresql://"):
        return "postgresql+psycopg://" + url.removeprefix("postgresql://")
    return url


def database_url_problem(url: str) -> str | None:
    """Why `url` cannot be mailgate's database, or None: a typo, a database it
    does not run on, or a driver that is not installed (PostgreSQL's is an extra)."""
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError, NoSuchModuleError

    try:
        parsed = make_url(with_driver(url))
        dialect = parsed.get_dialect()
    except (ArgumentError, NoSuchModuleError, ValueError):
        return f"{url!r} is not a database URL: write sqlite:///PATH or postgresql://USER@HOST/DB"
    if parsed.get_backend_name() not in ("sqlite", "postgresql"):
        return f"mailgate runs on SQLite or PostgreSQL, not {parsed.get_backend_name()}"
    try:
        dialect.import_dbapi()
    except ImportError as exc:
        driver = parsed.get_driver_name()
        if parsed.get_backend_name() == "postgresql":
            return (
                f"PostgreSQL's driver {driver} is not installed ({exc}): pip install"
                " 'mailgate[postgresql]' and write postgresql://USER@HOST/DB"
            )
        return f"the driver {driver} is not installed ({exc})"
    return None


def sqlite_file(url: str) -> Path | None:
    """The database file of a SQLite URL; None for another database or one in memory."""
    if not url.startswith("sqlite"):
        return None
    path = url.partition("///")[2].partition("?")[0]  # "" for sqlite:// (in memory)
    return Path(path) if path and path != ":memory:" else None


# libpq options: a server that vanished without closing the connection (power
# cut, network partition) is noticed within about half a minute, not after the
# kernel's 15 minutes of retransmissions. The leader's lock check relies on it.
POSTGRES_CONNECT = {
    "connect_timeout": 10,
    "keepalives": 1,
    "keepalives_idle": 10,
    "keepalives_interval": 5,
    "keepalives_count": 3,
    "tcp_user_timeout": 30_000,  # ms: unacknowledged data
}


class _WriterGate:
    """One writer at a time in this process, handed over without polling.

    Taken before BEGIN IMMEDIATE, released when the DBAPI connection commits,
    rolls back or closes (the pool rolls back every connection it gets back,
    so a transaction cannot leave the gate held).
    """

    def __init__(self, timeout: float) -> None:
        self.timeout = timeout
        self._lock = threading.Lock()

    def enter(self, connection: Any) -> None:
        if not self._lock.acquire(timeout=self.timeout):
            # Wrapped as SQLAlchemy wraps the driver's own "database is locked", so
            # that every caller treats both alike (a 451, exit 75, one log line).
            raise OperationalError(
                "BEGIN IMMEDIATE",
                None,
                sqlite3.OperationalError("database is locked (waited for another writer)"),
            )
        connection.holds_gate = True

    def leave(self, connection: Any) -> None:
        if connection.holds_gate:
            connection.holds_gate = False
            self._lock.release()

    def connection_class(self) -> type[sqlite3.Connection]:
        gate = self

        class GatedConnection(sqlite3.Connection):
            holds_gate = False

            def commit(self) -> None:
                try:
                    super().commit()
                finally:
                    gate.leave(self)

            def rollback(self) -> None:
                try:
                    super().rollback()
                finally:
                    gate.leave(self)

            def close(self) -> None:
                try:
                    super().close()
                finally:
                    gate.leave(self)

        return GatedConnection


def _configure_sqlite(engine: Engine, busy_timeout_ms: int, gate: _WriterGate) -> None:
    @event.listens_for(engine, "connect")
    def on_connect(dbapi_connection: Any, _record: Any) -> None:
        # Let us emit BEGIN ourselves (pysqlite's implicit BEGIN is deferred).
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        # FULL: a commit is on disk before we answer 250 to a sending MTA.
        cursor.execute("PRAGMA synchronous=FULL")
        cursor.execute("PRAGMA foreign_keys=ON")
        # Deleted and overwritten content is zeroed, not left in free pages: after
        # retention or an erasure the file holds no trace of it (RELIABILITY 42, 43).
        cursor.execute("PRAGMA secure_delete=ON")
        cursor.execute(f"PRAGMA busy_timeout={int(busy_timeout_ms)}")
        cursor.close()

    @event.listens_for(engine, "begin")
    def on_begin(conn: Any) -> None:
        dbapi_connection = conn.connection.dbapi_connection
        gate.enter(dbapi_connection)
        try:
            conn.exec_driver_sql("BEGIN IMMEDIATE")
        except BaseException:
            gate.leave(dbapi_connection)
            raise


def unavailable(exc: Exception) -> str:
    """One line for an operator: the driver's first line, not SQLAlchemy's wrapper."""
    orig = getattr(exc, "orig", None) or exc
    return "database unavailable: " + (str(orig).strip().splitlines() or ["?"])[0][:200]


def forget_old_pages(engine: Engine) -> None:
    """After deleting personal data: SQLite's write-ahead log still holds the old
    pages until a checkpoint; this one copies them over and empties the log. (On
    PostgreSQL, dead rows go with the next VACUUM, which autovacuum runs.)"""
    if engine.dialect.name == "sqlite":
        # On the driver's connection: not inside the BEGIN IMMEDIATE that every
        # SQLAlchemy transaction here starts with, where a checkpoint cannot run.
        raw = engine.raw_connection()
        try:
            raw.driver_connection.execute("PRAGMA wal_checkpoint(TRUNCATE)")  # type: ignore[union-attr]
        finally:
            raw.close()


def session_factory(engine: Engine) -> sessionmaker[Session]:
    return sessionmaker(engine, expire_on_commit=False)


def alembic_config(engine: Engine) -> Config:
    from alembic.config import Config

    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    config.attributes["engine"] = engine
    return config


def head_revision() -> str:
    return HEAD_REVISION


def current_revision(engine: Engine) -> str | None:
    """What Alembic recorded in `alembic_version`; None for an empty database."""
    with engine.connect() as conn:
        try:
            return conn.execute(text("SELECT version_num FROM alembic_version")).scalar()
        except DBAPIError:  # no such table: never migrated
            return None


# PostgreSQL advisory lock keys, one per purpose; any numbers the database's other
# users do not take. The leader's is in store/leadership.py.
MIGRATION_LOCK_KEY = 0x6D67_6D69  # "mgmi"
DIRECTORY_LOCK_KEY = 0x6D67_6469  # "mgdi": syncing the directory
BLOB_LOCK_SPACE = 0x6D67_626C  # "mgbl": one blob, with its digest as the second key


def transaction_lock(session: Session, *keys: int, shared: bool = False) -> None:
    """Hold a PostgreSQL advisory lock on `keys` until the session's transaction
    ends (committed or rolled back). SQLite needs none: BEGIN IMMEDIATE already
    makes its writers take turns."""
    if session.get_bind().dialect.name != "postgresql":
        return
    function = "pg_advisory_xact_lock_shared" if shared else "pg_advisory_xact_lock"
    names = ", ".join(f":k{i}" for i in range(len(keys)))
    session.execute(text(f"SELECT {function}({names})"), {f"k{i}": k for i, k in enumerate(keys)})


@contextlib.contextmanager
def migration_lock(engine: Engine) -> Iterator[None]:
    """One migrating process at a time on PostgreSQL. Two machines upgrading at
    once (configuration management runs `db upgrade` everywhere, or instances
    first started together on an empty database) both read "empty" or "0009"
    and both ran the same DDL: all but one failed with a duplicate key in
    pg_type. Waiting here, the others then find the schema at head and do
    nothing. On its own connection in autocommit: the lock outlives the
    migration's transaction, and is dropped with the connection if we die.
    SQLite needs none: BEGIN IMMEDIATE already makes migrations queue."""
    if engine.dialect.name != "postgresql":
        yield
        return
    with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
        conn.execute(text("SELECT pg_advisory_lock(:k)"), {"k": MIGRATION_LOCK_KEY})
        try:
            yield
        finally:
            conn.execute(text("SELECT pg_advisory_unlock(:k)"), {"k": MIGRATION_LOCK_KEY})


def upgrade(engine: Engine) -> None:
    with migration_lock(engine):
        _refuse_newer(current_revision(engine))
        _to_head(engine)


def _to_head(engine: Engine) -> None:
    """Alembic's upgrade; callers hold the migration lock."""
    from alembic import command

    command.upgrade(alembic_config(engine), "head")


def _refuse_newer(current: str | None) -> None:
    """A revision this version does not ship: a newer mailgate migrated the
    database. No upgrade leads from there, and Alembic's "Can't locate
    revision" would be a traceback; say what to install instead."""
    known = {path.name.split("_", 1)[0] for path in (MIGRATIONS / "versions").glob("*.py")}
    if current is not None and current not in known:
        raise SchemaError(
            f"database schema is at {current}, newer than this mailgate ({head_revision()}):"
            " a newer version upgraded it; install that version here too"
        )


def ensure_schema(engine: Engine) -> None:
    """Migrate an empty database on first use; refuse an outdated one.

    Upgrading a database that holds data is an operator decision
    (`mailgate db upgrade`), taken after a backup.
    """
    if current_revision(engine) == head_revision():
        return  # every start but the first: no lock to wait for
    with migration_lock(engine):
        _migrate_if_empty(engine)


def _migrate_if_empty(engine: Engine) -> None:
    """Read again under the migration lock: another instance may have just migrated."""
    current = current_revision(engine)
    if current == head_revision():
        return
    if current is None and not _has_tables(engine):
        _to_head(engine)
        return
    _refuse_newer(current)
    raise SchemaError(
        f"database schema is at {current or 'an unknown version'}, this mailgate needs "
        f"{head_revision()}: back it up, then run 'mailgate db upgrade'"
    )


def _has_tables(engine: Engine) -> bool:
    return bool(inspect(engine).get_table_names())
