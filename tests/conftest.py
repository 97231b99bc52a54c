"""Shared fixtures: a complete mailgate installation in a temp dir.

`install` writes settings.yaml and directory.yaml (from the shipped ones, with
overrides) into tmp_path and returns an App on it: SQLite under tmp_path/var,
outbound mail to a Maildir under tmp_path/var/sent.

The modules in `BOTH_DATABASES` run every test that uses `install` twice: on
SQLite and on a real PostgreSQL cluster started once per session
(tests/postgres.py), each test in a fresh database of its own.
"""

from __future__ import annotations

import asyncio
import contextlib
import email
import email.policy
import functools
import logging
import mailbox
import shutil
import tempfile
import threading
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from email.message import EmailMessage
from pathlib import Path
from typing import Any

import pytest
import yaml
from sqlalchemy import func, select

from mailgate.app import App
from mailgate.cli import main
from mailgate.clock import Clock
from mailgate.config import load_settings
from mailgate.directory import sync_directory_if_changed
from mailgate.observability import CHATTY_LOGGERS
from mailgate.pipeline.message import Envelope
from mailgate.pipeline.process import Result, process
from mailgate.store.db import make_engine, upgrade
from mailgate.store.models import IngestRecord

ROOT = Path(__file__).resolve().parents[1]
# The storage, pipeline, SLA and data-protection tests: what must behave the same on both databases.
BOTH_DATABASES = {"test_store", "test_pipeline", "test_sla", "test_privacy"}
NOW = datetime(2026, 11, 23, 9, 30, tzinfo=UTC)


class Clockwork:
    """A clock tests move by hand."""

    def __init__(self, now: datetime = NOW):
        self.now = now

    def __call__(self) -> datetime:
        return self.now


def deep_update(base: dict[str, Any], changes: dict[str, Any]) -> dict[str, Any]:
    for key, value in changes.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            deep_update(base[key], value)
        else:
            base[key] = value
    return base


# Load and race tests send hundreds of mails from one admin within minutes: to
# the loop breaker that is a robot (tests/test_loops.py). They test intake, so
# they lift its limits.
NO_LOOP_LIMITS: dict[str, Any] = {
    "hygiene": {
        "loops": {
            key: 1_000_000
            for key in (
                "auto_mail_per_address_per_hour",
                "auto_mail_per_address_per_day",
                "auto_mail_per_ticket_per_hour",
                "tickets_per_sender_per_hour",
                "tickets_per_subject_per_hour",
            )
        }
    }
}


@contextlib.contextmanager
def smtp_listener(inst: Installation) -> Iterator[int]:
    """The daemon's SMTP listener in this process (so the test's clock and DNS stub
    drive it), on the port it bound; stopped at the end."""
    from mailgate.intake.smtp import SmtpListener

    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    listener = SmtpListener(lambda: inst.app, inst.app.settings.intake.smtp, inst.root)
    ((_, port),) = asyncio.run_coroutine_threadsafe(listener.start(), loop).result(10)
    try:
        yield port
    finally:
        asyncio.run_coroutine_threadsafe(listener.stop(1), loop).result(10)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(5)


def no_dns(name: str, timeout: float = 5) -> bytes | None:
    """DNS as seen from a machine where no name has a TXT record."""
    return None


class Installation:
    def __init__(self, root: Path, clock: Clock):
        self.root = root
        self.clock = clock
        self.app = App(load_settings(root / "settings.yaml"), clock=clock)
        self.app.dns = no_dns  # tests never query the real DNS
        sync_directory_if_changed(self.app)

    @property
    def settings_file(self) -> Path:
        return self.root / "settings.yaml"

    def cli(self, *args: str) -> int:
        """`mailgate --config <this installation> ARGS…` in-process, on the installation's clock."""
        return main(["--config", str(self.settings_file), *args], clock=self.clock)

    def ingest(self, raw: bytes | str | EmailMessage, envelope: Envelope | None = None) -> Result:
        if isinstance(raw, EmailMessage):
            raw = raw.as_bytes(policy=email.policy.SMTP)
        elif isinstance(raw, str):
            raw = raw.encode()
        return process(self.app, raw, envelope)

    def send_outbox(self) -> int:
        return self.app.send_outbox()

    def sent(self) -> list[EmailMessage]:
        """Every mail delivered to the outbound Maildir, after sending the queue."""
        self.send_outbox()
        folder = self.app.settings.path(self.app.settings.outbound.maildir)
        box = mailbox.Maildir(folder, factory=None, create=True)
        msgs = [
            email.message_from_bytes(box.get_bytes(k), policy=email.policy.default)
            for k in sorted(box.iterkeys())  # names start with time and microseconds
        ]
        return msgs  # type: ignore[return-value]

    def session(self):  # noqa: ANN201 - a SQLAlchemy session context
        return self.app.sessions()

    def ingest_records(self) -> int:
        with self.session() as s:
            return s.scalar(select(func.count()).select_from(IngestRecord)) or 0


@pytest.fixture(autouse=True)
def restore_logging() -> Iterator[None]:
    """setup_logging (run by every in-process `mailgate` command) changes process-wide
    state: put it back, so that no later test's thread writes to this test's closed
    stderr ("--- Logging error ---")."""
    loggers = [logging.getLogger(name) for name in ("", "mailgate", *CHATTY_LOGGERS)]
    saved = [(logger, list(logger.handlers), logger.level) for logger in loggers]
    yield
    for logger, handlers, level in saved:
        logger.handlers[:] = handlers
        logger.setLevel(level)


@pytest.fixture
def clock() -> Clockwork:
    return Clockwork()


@functools.cache
def _migrated_sqlite() -> bytes:
    """An empty database at the current schema, migrated once per test process:
    each installation starts from a copy instead of running every migration."""
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "template.db"
        engine = make_engine(f"sqlite:///{path}")
        upgrade(engine)
        engine.dispose()  # checkpoints the WAL into the file
        return path.read_bytes()


def install_at(
    root: Path,
    clock: Clock,
    settings: dict[str, Any] | None = None,
    directory: dict[str, Any] | None = None,
) -> Installation:
    """The shipped settings and directory (or the given ones) under `root`."""
    root.mkdir(parents=True, exist_ok=True)
    data = yaml.load((ROOT / "settings.yaml").read_text(), Loader=yaml.CSafeLoader)
    data = deep_update(
        data, {"templates_dir": str(ROOT / "templates"), "rules_dir": str(ROOT / "rules")}
    )
    # Test mail is not DKIM-signed: under the shipped `prefer` every ticket would
    # be flagged and staff /commands refused. tests/test_authenticity.py sets
    # and exercises every policy.
    deep_update(data, {"hygiene": {"authentication": {"policy": "off", "staff_policy": "off"}}})
    deep_update(data, settings or {})
    (root / "settings.yaml").write_text(yaml.dump(data, Dumper=yaml.CSafeDumper))
    if data["database_url"] == "sqlite:///var/mailgate.db":
        (root / "var").mkdir(exist_ok=True)
        (root / "var" / "mailgate.db").write_bytes(_migrated_sqlite())
    if directory is None:
        shutil.copy(ROOT / "directory.yaml", root / "directory.yaml")
    else:
        (root / "directory.yaml").write_text(yaml.safe_dump(directory))
    return Installation(root, clock)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """The long load tests first: with several workers (pytest-xdist, see the
    Makefile) they start at once and the short tests fill in around them,
    instead of one long test running alone at the end."""
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    module = metafunc.module.__name__.rsplit(".", 1)[-1]
    only_sqlite = metafunc.definition.get_closest_marker("sqlite_only")
    if "database" in metafunc.fixturenames and module in BOTH_DATABASES and not only_sqlite:
        metafunc.parametrize("database", ["sqlite", "postgresql"], indirect=True)


@pytest.fixture(scope="session")
def postgres() -> Iterator[Any]:
    """One PostgreSQL cluster for the whole session; CI installs postgresql, so no skip."""
    from tests.postgres import start_postgres

    cluster = start_postgres()
    yield cluster
    cluster.destroy()


@pytest.fixture
def database(request: pytest.FixtureRequest) -> str:
    """`sqlite` unless the module runs on both databases (see BOTH_DATABASES)."""
    return getattr(request, "param", "sqlite")


@pytest.fixture
def database_url(database: str, request: pytest.FixtureRequest) -> str | None:
    """A fresh PostgreSQL database, or None for the installation's own SQLite file."""
    if database == "postgresql":
        return request.getfixturevalue("postgres").fresh_database()
    return None


@pytest.fixture
def install(
    tmp_path: Path, clock: Clockwork, database_url: str | None
) -> Callable[..., Installation]:
    def make(
        settings: dict[str, Any] | None = None, directory: dict[str, Any] | None = None
    ) -> Installation:
        if database_url is not None:
            settings = deep_update({"database_url": database_url}, settings or {})
        return install_at(tmp_path, clock, settings, directory)

    return make


@pytest.fixture
def inst(install: Callable[..., Installation]) -> Installation:
    return install()


def make_mail(
    *,
    sender: str = "Alice Martin <alice@acme.example>",
    to: str = "support@example.com",
    subject: str = "Cannot log in",
    body: str = "Hello,\nnobody can log in since this morning.\n",
    message_id: str | None = "req-1@acme.example",
    headers: dict[str, str] | None = None,
) -> EmailMessage:
    msg = EmailMessage()
    msg["From"] = sender
    msg["To"] = to
    msg["Subject"] = subject
    msg["Date"] = "Mon, 23 Nov 2026 09:15:00 +0100"
    if message_id:
        msg["Message-ID"] = f"<{message_id}>"
    for name, value in (headers or {}).items():
        msg[name] = value
    msg.set_content(body)
    return msg


def staff_answer(
    inst: Installation, body: str, message_id: str, *, ticket: str | None = None
) -> EmailMessage:
    """Bob answering, from his mail client, the first staff notice (about `ticket`)."""
    notice = next(m for m in inst.sent() if "bob@support.example" in str(m["To"])
                  and (ticket is None or ticket in str(m["Subject"])))  # fmt: skip
    return reply_to(notice, sender="Bob Durand <bob@support.example>", body=body,
                    message_id=message_id)  # fmt: skip


def reply_to(
    original: EmailMessage, *, sender: str, body: str = "More details.\n",
    message_id: str, subject: str | None = None, to: str | None = None,
) -> EmailMessage:  # fmt: skip
    """A reply as a mail client writes it: In-Reply-To and References."""
    mid = original["Message-ID"]
    refs = (original.get("References", "") + " " + mid).strip()
    headers = {"In-Reply-To": mid, "References": refs}
    return make_mail(sender=sender, to=to or str(original["Reply-To"] or original["From"]),
                     subject=subject or f"Re: {original['Subject']}", body=body,
                     message_id=message_id, headers=headers)  # fmt: skip


@pytest.fixture
def sink():
    """A real SMTP relay on loopback that records what it receives."""
    from tests.smtp_sink import Sink

    relay = Sink().start()
    yield relay
    relay.stop()


@pytest.fixture(scope="session")
def certificate(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A self-signed certificate for 127.0.0.1; CI installs openssl, so no skip."""
    from tests.smtp_sink import make_certificate

    return make_certificate(tmp_path_factory.mktemp("tls"))
