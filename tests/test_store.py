"""Storage: migrations, SQLite settings, durable blobs, concurrent numbering."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import threading
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import func, select, text

from mailgate.store.blobs import BlobStore
from mailgate.store.db import (
    HEAD_REVISION,
    MIGRATIONS,
    current_revision,
    ensure_schema,
    head_revision,
    make_engine,
)
from mailgate.store.models import Base, Blob, IngestRecord, Ticket, TicketSequence
from tests.conftest import NOW, ROOT, Installation, make_mail


def test_head_revision_is_the_newest_migration() -> None:
    """HEAD_REVISION spares the daemon reading the scripts at start; it must not lag."""
    from alembic.script import ScriptDirectory

    assert ScriptDirectory(str(MIGRATIONS)).get_current_head() == HEAD_REVISION


def test_empty_database_is_migrated_on_first_use(tmp_path: Path) -> None:
    engine = make_engine(f"sqlite:///{tmp_path}/new.db")
    ensure_schema(engine)
    assert current_revision(engine) == head_revision()


def test_models_and_migrations_agree(tmp_path: Path) -> None:
    engine = make_engine(f"sqlite:///{tmp_path}/m.db")
    ensure_schema(engine)
    with engine.connect() as conn:
        diff = compare_metadata(MigrationContext.configure(conn), Base.metadata)
    assert diff == [], f"write a migration for: {diff}"


def test_a_populated_database_goes_down_to_the_previous_revision_and_back(
    inst: Installation,
) -> None:
    """`mailgate db upgrade` on a database in use: its rows survive, the new
    columns (0009: staff groups, ticket group, referents) get their defaults."""
    from alembic import command

    from mailgate.store.db import alembic_config, upgrade
    from mailgate.store.models import Contact, Staff

    first = make_mail(message_id="old-1@acme.example")
    number = inst.ingest(first).ticket
    engine = inst.app.engine
    command.downgrade(alembic_config(engine), "0008")
    assert current_revision(engine) == "0008"
    upgrade(engine)
    assert current_revision(engine) == head_revision()
    with inst.session() as s:
        assert s.scalar(select(Ticket.group).where(Ticket.number == number)) is None
        assert s.scalars(select(Staff.groups)).all() == [[]]
        assert set(s.scalars(select(Contact.referent))) == {False}
    answer = make_mail(subject="Re: Cannot log in", message_id="old-2@acme.example",
                       headers={"In-Reply-To": "<old-1@acme.example>"})  # fmt: skip
    threaded = inst.ingest(answer)
    assert (threaded.outcome, threaded.ticket) == ("threaded", number)


@pytest.mark.sqlite_only
def test_sqlite_runs_in_wal_mode_with_foreign_keys(inst: Installation) -> None:
    with inst.app.engine.connect() as conn:
        assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
        assert conn.exec_driver_sql("PRAGMA foreign_keys").scalar() == 1


def test_db_upgrade_command(tmp_path: Path) -> None:
    (tmp_path / "settings.yaml").write_text("database_url: sqlite:///var/x.db\ndirectory: null\n")
    proc = subprocess.run(
        [sys.executable, "-m", "mailgate", "--config", "settings.yaml", "db", "upgrade"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    assert f"database at {head_revision()}" in proc.stdout


def test_raw_mail_is_stored_content_addressed(inst: Installation) -> None:
    raw = make_mail().as_bytes()
    inst.ingest(raw)
    with inst.session() as s:
        record = s.scalar(select(IngestRecord))
    assert inst.app.blobs.get(record.raw_sha256) == raw
    if inst.app.engine.dialect.name == "sqlite":  # files under data_dir
        path = inst.app.blobs.path_for(record.raw_sha256)
        assert path.read_bytes() == raw
        assert path.is_relative_to(inst.root / "var")
    else:  # the blobs table, which every instance reaches
        with inst.session() as s:
            assert s.scalar(select(Blob.data).where(Blob.sha256 == record.raw_sha256)) == raw


def test_a_blob_fsyncs_every_folder_that_gained_an_entry(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The blob's bytes are fsynced, and so is each folder that gained an entry: a
    fan-out folder made for a blob is an entry of its parent. Unsynced, a crash
    could lose the blob, or the folder and the blob in it, after the commit."""
    synced: list[str] = []
    synced_bytes: list[bytes] = []  # what the files held when they were fsynced
    real_fsync = os.fsync

    def fsync(fd: int) -> None:
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        if Path(synced[-1]).is_file():
            synced_bytes.append(Path(synced[-1]).read_bytes())
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    root = tmp_path / "blobs"
    store = BlobStore(root)
    first = store.path_for(store.put(b"first mail"))
    assert first.read_bytes() == b"first mail"
    assert synced_bytes == [b"first mail"]  # the bytes themselves, before the rename
    fan_out = [first.parent, first.parent.parent, root]
    for folder in fan_out:  # each new folder's parent, so each folder's entry is durable
        assert str(folder.parent) in synced, folder
    assert str(first.parent) in synced  # the blob's own entry

    synced.clear()
    sibling = store.path_for(store.put(b"first mail, again (other bytes)"))
    new_folders = {p for p in (sibling.parent, sibling.parent.parent) if p not in fan_out}
    expected_dirs = {str(sibling.parent)} | {str(p.parent) for p in new_folders}
    assert {s for s in synced if Path(s).is_dir()} == expected_dirs


KILLER = textwrap.dedent("""
    import os, sys
    from mailgate.app import App
    from mailgate.config import load_settings
    from mailgate.pipeline import process as proc

    app = App(load_settings(sys.argv[1]))
    store = type(app.blobs)  # files on SQLite, the blobs table on PostgreSQL
    real_put = store.put

    def put_then_die(self, data):
        digest = real_put(self, data)
        # the raw mail is stored durably; the transaction has not committed
        os.kill(os.getpid(), 9)
        return digest

    store.put = put_then_die
    proc.process(app, open(sys.argv[2], "rb").read())
""")


def test_killed_between_raw_write_and_commit_leaves_nothing(
    inst: Installation, tmp_path: Path
) -> None:
    mail = tmp_path / "m.eml"
    mail.write_bytes(make_mail().as_bytes())
    proc = subprocess.run(
        [sys.executable, "-c", KILLER, str(inst.settings_file), str(mail)],
        cwd=ROOT,
        capture_output=True,
        timeout=60,
    )
    assert proc.returncode == -signal.SIGKILL
    with inst.session() as s:
        assert s.scalar(select(func.count()).select_from(Ticket)) == 0
        assert s.scalar(select(func.count()).select_from(IngestRecord)) == 0
    again = inst.ingest(mail.read_bytes())
    assert again.outcome == "created"
    assert inst.ingest(mail.read_bytes()).outcome == "duplicate"


def test_two_processes_ingesting_at_once_get_unique_numbers(
    inst: Installation, tmp_path: Path
) -> None:
    for p in range(2):
        box = tmp_path / f"box{p}.mbox"
        with box.open("wb") as fh:
            for i in range(15):
                mail = make_mail(message_id=f"p{p}-{i}@acme.example", body=f"mail {p} {i}\n")
                fh.write(b"From alice@acme.example Mon Nov 23 09:00:00 2026\n")
                fh.write(mail.as_bytes().replace(b"\r\n", b"\n") + b"\n")
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "mailgate",
                "--config",
                str(inst.settings_file),
                "ingest",
                "--mbox",
                "--no-send",
                str(tmp_path / f"box{p}.mbox"),
            ],
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env={**os.environ},
        )
        for p in range(2)
    ]
    for p in procs:
        out, err = p.communicate(timeout=120)
        assert p.returncode == 0, err
    with inst.session() as s:
        numbers = list(s.scalars(select(Ticket.number)))
    assert len(numbers) == 30 and len(set(numbers)) == 30
    year = datetime.now(UTC).year  # the subprocesses run on the real clock
    with inst.app.engine.connect() as conn:
        if inst.app.engine.dialect.name == "sqlite":  # a counter row: no gaps
            assert sorted(numbers) == [f"SUP-{year}-{i:06d}" for i in range(1, 31)]
            assert conn.execute(text("SELECT last FROM ticket_sequences")).scalar() == 30
        else:
            # A sequence: nobody waits on a row, and the unit of work that lost a
            # race for the same mail (rolled back, then found it a duplicate)
            # leaves a gap (tickets/numbers.py).
            last = conn.execute(text(f"SELECT last_value FROM ticket_number_{year}")).scalar()
            assert all(n.startswith(f"SUP-{year}-") for n in numbers)
            assert max(int(n.rsplit("-", 1)[1]) for n in numbers) <= last


def test_numbers_carry_on_from_the_years_counter(inst: Installation) -> None:
    """A database that handed out 41 numbers this year goes on with 42 on either backend."""
    with inst.session() as s, s.begin():
        s.add(TicketSequence(year=NOW.year, last=41))
    first = inst.ingest(make_mail(message_id="n1@acme.example"))
    second = inst.ingest(make_mail(message_id="n2@acme.example", subject="another"))
    assert (first.ticket, second.ticket) == (f"SUP-{NOW.year}-000042", f"SUP-{NOW.year}-000043")


def test_a_failed_transaction_hands_the_database_to_the_next_writer(tmp_path: Path) -> None:
    """The in-process writer lock is released by rollback, whatever ended the transaction."""
    engine = make_engine(f"sqlite:///{tmp_path}/w.db", busy_timeout_ms=500)
    ensure_schema(engine)

    def fail_inside_a_transaction() -> None:
        with engine.begin() as conn:
            conn.exec_driver_sql("CREATE TABLE t (x INTEGER)")
            raise RuntimeError("bug in the unit of work")

    errors: list[BaseException] = []
    for _ in range(3):
        worker = threading.Thread(target=lambda: _capture(errors, fail_inside_a_transaction))
        worker.start()
        worker.join()
    assert [str(e) for e in errors] == ["bug in the unit of work"] * 3
    with engine.begin() as conn:  # would wait 0.5 s, then fail "database is locked"
        assert conn.exec_driver_sql("SELECT count(*) FROM tickets").scalar() == 0
        tables = conn.exec_driver_sql("SELECT name FROM sqlite_master WHERE name='t'")
        assert tables.all() == []  # rolled back


def test_writers_wait_for_each_other_instead_of_failing(tmp_path: Path) -> None:
    engine = make_engine(f"sqlite:///{tmp_path}/w.db", busy_timeout_ms=5000)
    with engine.begin() as conn:
        conn.exec_driver_sql("CREATE TABLE counter (n INTEGER)")
        conn.exec_driver_sql("INSERT INTO counter VALUES (0)")

    def increment() -> None:
        for _ in range(50):
            with engine.begin() as conn:
                n = conn.exec_driver_sql("SELECT n FROM counter").scalar()
                conn.exec_driver_sql("UPDATE counter SET n = ?", (n + 1,))

    errors: list[BaseException] = []
    workers = [threading.Thread(target=lambda: _capture(errors, increment)) for _ in range(8)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    assert errors == []
    with engine.begin() as conn:
        assert conn.exec_driver_sql("SELECT n FROM counter").scalar() == 400  # no lost update


def _capture(errors: list[BaseException], work: Callable[[], None]) -> None:
    try:
        work()
    except BaseException as exc:  # noqa: BLE001 - the test inspects it
        errors.append(exc)


def test_the_database_file_is_owner_only_whatever_the_umask(tmp_path: Path) -> None:
    """It holds every ticket's text and address (SQLite gives -wal and -shm its mode)."""
    old = os.umask(0o022)
    try:
        engine = make_engine(f"sqlite:///{tmp_path}/private.db")
        ensure_schema(engine)
        with engine.connect() as conn:  # open: the -wal and -shm files exist
            files = sorted(f.name for f in tmp_path.glob("private.db*"))
            modes = {f.stat().st_mode & 0o777 for f in tmp_path.glob("private.db*")}
            assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
        engine.dispose()
    finally:
        os.umask(old)
    assert files == ["private.db", "private.db-shm", "private.db-wal"]
    assert modes == {0o600}


def test_a_new_database_is_announced_an_existing_one_is_not(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A typo in database_url starts numbering tickets from 1 again: say so."""
    make_engine(f"sqlite:///{tmp_path}/new.db").dispose()
    assert f"created a new, empty database at {tmp_path}/new.db" in caplog.text
    caplog.clear()
    make_engine(f"sqlite:///{tmp_path}/new.db").dispose()
    assert "created" not in caplog.text
