"""The IMAP source against a real Dovecot on loopback, started by the tests.

In-process mailboxes (the test clock, the test's database) for the source's
own behaviour; `mailgate run` as a subprocess for crashes and load.
"""

from __future__ import annotations

import contextlib
import logging
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import func, select

from mailgate.config import ImapIntake
from mailgate.intake.imap import Mailbox, backoff, destination, on_server
from mailgate.store.models import Article, IngestRecord, OutboxMail, Ticket
from mailgate.store.state import set_state
from tests.conftest import NO_LOOP_LIMITS, Clockwork, Installation, install_at, make_mail
from tests.daemon import launch
from tests.dovecot import Dovecot, start_dovecot
from tests.smtp_sink import free_port

PROCESSED = "mailgate/processed"
FAILED = "mailgate/failed"


@pytest.fixture
def dovecot(tmp_path: Path) -> Iterator[Dovecot]:
    server = start_dovecot(tmp_path / "dovecot")
    yield server
    server.stop()


def settings_for(server: Dovecot, **changes: Any) -> dict[str, Any]:
    return {
        "enabled": True,
        "host": "127.0.0.1",
        "port": server.port,
        "tls": "none",
        "username": server.user,
        "password_env": "MAILGATE_TEST_IMAP_PASSWORD",
        "poll_seconds": 1,
        **changes,
    }


@pytest.fixture
def password(monkeypatch: pytest.MonkeyPatch, dovecot: Dovecot) -> None:
    monkeypatch.setenv("MAILGATE_TEST_IMAP_PASSWORD", dovecot.password)


def exists(server: Dovecot, folder: str) -> bool:
    with server.session() as client:
        return bool(client.folder_exists(folder))


def held(server: Dovecot, folder: str) -> int:
    """Messages in `folder`; 0 while it does not exist yet."""
    return len(server.uids(folder)) if exists(server, folder) else 0


def seen(server: Dovecot, folder: str) -> int:
    """Messages in `folder` flagged \\Seen: what a person reading the mailbox sees as read."""
    with server.session() as client:
        client.select_folder(folder, readonly=True)
        return len(client.search(["SEEN"]))


def eventually(check: Callable[[], bool], timeout: float = 20.0, what: str = "") -> float:
    started = time.monotonic()
    while time.monotonic() - started < timeout:
        if check():
            return time.monotonic() - started
        time.sleep(0.05)
    raise AssertionError(f"not within {timeout} s: {what}")


def count(inst: Installation, model: type, *where: Any) -> int:
    with inst.session() as s:
        return s.scalar(select(func.count()).select_from(model).where(*where)) or 0


def imap_log(caplog: pytest.LogCaptureFixture) -> list[str]:
    """What the IMAP source logged so far, as an operator reads it."""
    return [r.getMessage() for r in caplog.records if r.name == "mailgate.imap"]


def mail(n: int, body: str = "") -> bytes:
    return make_mail(message_id=f"imap-{n}@acme.example", subject=f"Export fails {n}",
                     body=body or f"The export fails ({n}).\n").as_bytes()  # fmt: skip


def quarantined_mail() -> bytes:
    """Mail the pipeline holds: two From fields, so nobody can tell who sent it."""
    return mail(1).replace(b"From: ", b"From: Mallory <mallory@x.example>\nFrom: ", 1)


class Running:
    """A Mailbox thread on the test installation, stopped at the end."""

    def __init__(self, inst: Installation, settings: dict[str, Any]) -> None:
        self.mailbox = Mailbox(lambda: inst.app, ImapIntake.model_validate(settings))
        self.mailbox.start()

    def __enter__(self) -> Mailbox:
        return self.mailbox

    def __exit__(self, *exc: object) -> None:
        self.mailbox.stop()


def test_polling_files_every_message_and_creates_the_folders(
    inst: Installation, dovecot: Dovecot, password: None
) -> None:
    assert not exists(dovecot, PROCESSED)
    for n in range(3):
        dovecot.append(mail(n), flags=[b"\\Seen"] if n == 1 else [])  # \Seen hides nothing
    with Running(inst, settings_for(dovecot, idle=False)):
        eventually(lambda: held(dovecot, PROCESSED) == 3, what="3 messages filed")
    assert dovecot.uids("INBOX") == []
    assert seen(dovecot, PROCESSED) == 1  # read by a person before; ours fetched unread
    assert exists(dovecot, FAILED)
    assert count(inst, Ticket) == 3
    with inst.session() as s:
        sources = set(s.scalars(select(IngestRecord.source)))
    assert sources == {"imap"}


@pytest.mark.parametrize(
    ("namespace", "processed", "failed"),
    [
        (("", "."), "mailgate.processed", "mailgate.failed"),  # Dovecot's default for Maildir
        (("INBOX.", "."), "INBOX.mailgate.processed", "INBOX.mailgate.failed"),  # Courier
    ],
)
def test_the_folders_are_named_as_the_server_names_its_own(
    inst: Installation, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
    namespace: tuple[str, str], processed: str, failed: str,
) -> None:  # fmt: skip
    """The default mailgate/processed, on a server whose hierarchy delimiter is "."
    (or whose folders are all below INBOX.): its CREATE was refused at every retry
    ("Name must not have '/' characters", "Client tried to access nonexistent
    namespace"), and not one mail was taken."""
    server = start_dovecot(tmp_path / "dots", namespace=namespace)
    monkeypatch.setenv("MAILGATE_TEST_IMAP_PASSWORD", server.password)
    try:
        server.append(mail(1))
        server.append(quarantined_mail().replace(b"imap-1@", b"imap-2@"))
        with Running(inst, settings_for(server, idle=False)):
            eventually(lambda: held(server, processed) == 1 and held(server, failed) == 1)
        assert count(inst, Ticket) == 1
    finally:
        server.stop()


def test_a_processed_folder_that_is_the_watched_one_on_the_server_is_refused(
    inst: Installation, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:  # fmt: skip
    """Written apart (the settings check passes), one folder on a server whose
    folders are all below INBOX.: each mail would be moved where it is read again."""
    server = start_dovecot(tmp_path / "courier", namespace=("INBOX.", "."))
    monkeypatch.setenv("MAILGATE_TEST_IMAP_PASSWORD", server.password)
    caplog.set_level(logging.WARNING, logger="mailgate.imap")
    try:
        server.append(mail(1), folder="INBOX.mailgate")
        box = settings_for(server, idle=False, folder="INBOX.mailgate", processed_folder="mailgate")
        with Running(inst, box):
            eventually(lambda: len(imap_log(caplog)) >= 1, what="a warning")
        assert imap_log(caplog) == [
            "imap imap: cannot file mail: processed_folder mailgate is INBOX.mailgate on "
            "127.0.0.1: the folder mailgate reads; give it a folder of its own"
        ]
        assert count(inst, IngestRecord) == 0
    finally:
        server.stop()


def test_idle_picks_up_a_new_mail_within_two_seconds(
    inst: Installation, dovecot: Dovecot, password: None
) -> None:
    with Running(inst, settings_for(dovecot, poll_seconds=600)):  # IDLE, not the poll
        eventually(lambda: exists(dovecot, PROCESSED), what="connected")
        time.sleep(0.5)  # in IDLE now
        dovecot.append(mail(1))
        took = eventually(lambda: count(inst, Ticket) == 1, timeout=5, what="the ticket")
    assert took < 2.0, took


def test_without_move_only_our_message_is_expunged(
    inst: Installation, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    server = start_dovecot(tmp_path / "nomove", without=("MOVE",))
    monkeypatch.setenv("MAILGATE_TEST_IMAP_PASSWORD", server.password)
    try:
        theirs = server.append(mail(99), flags=[b"\\Deleted"])  # someone else's, not expunged
        server.append(mail(1))
        with Running(inst, settings_for(server, idle=False)):
            eventually(lambda: held(server, PROCESSED) == 1, what="filed by COPY")
        assert server.uids("INBOX") == [theirs]
        assert count(inst, Ticket) == 1
    finally:
        server.stop()


def test_a_bug_met_at_every_reconnect_logs_its_traceback_once(
    inst: Installation, dovecot: Dovecot, password: None, caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:  # fmt: skip
    """An internal error (a bug: nothing outside can cause one on purpose, hence the
    patched drain) is met again after each backoff: one traceback, not one per retry."""
    tries: list[int] = []

    def broken(self: Mailbox, client: Any) -> int:
        tries.append(1)
        raise RuntimeError("a bug")

    monkeypatch.setattr(Mailbox, "drain", broken)
    monkeypatch.setattr("mailgate.intake.imap.backoff", lambda attempt, rng: 0.05)
    caplog.set_level(logging.INFO, logger="mailgate.imap")
    with Running(inst, settings_for(dovecot, idle=False)):
        eventually(lambda: len(tries) >= 4, what="four tries")
    logged = [r for r in caplog.records if "unexpected error" in r.getMessage()]
    assert len(logged) == 1 and logged[0].exc_info is not None


def test_a_message_the_server_cannot_return_goes_to_the_failed_folder_and_the_rest_goes_on(
    inst: Installation, dovecot: Dovecot, password: None, caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:  # fmt: skip
    """Its file unreadable on the server, Dovecot answers its FETCH with a BYE (other
    servers: NO, e.g. Exchange's "could not be converted to an RFC-822 compatible
    format"). Fetched oldest first, it once held back every later mail, forever:
    a reconnect a second, not one ticket."""
    monkeypatch.setattr("mailgate.intake.imap.backoff", lambda attempt, rng: 0.05)
    caplog.set_level(logging.WARNING, logger="mailgate.imap")
    dovecot.append(mail(1))
    for path in (dovecot.maildir / "new").iterdir():
        path.chmod(0)  # Dovecot reads mail as another user than root, or as its owner
    dovecot.append(mail(2))
    dovecot.append(mail(3))
    with Running(inst, settings_for(dovecot, idle=False)):
        eventually(lambda: held(dovecot, FAILED) == 1, what="the broken mail held")
        eventually(lambda: held(dovecot, PROCESSED) == 2, what="the rest filed")
    assert count(inst, Ticket) == 2
    with inst.session() as s:
        (reason,) = s.scalars(select(IngestRecord.reason).where(
            IngestRecord.outcome == "quarantined")).all()  # fmt: skip
    assert reason.startswith("not fetched: the server failed to return it 3 times (last: ")
    assert "FETCH failed" in reason
    assert f"the original is in IMAP folder {FAILED}" in reason
    assert len([line for line in imap_log(caplog) if "failed to return it" in line]) == 1


def test_too_large_mail_goes_to_the_failed_folder_and_the_rest_goes_on(
    inst: Installation, dovecot: Dovecot, password: None, capsys: pytest.CaptureFixture[str]
) -> None:
    dovecot.append(mail(1, body="x" * 50_000))
    dovecot.append(mail(2))
    with Running(inst, settings_for(dovecot, idle=False, max_message_bytes=20_000)):
        eventually(lambda: held(dovecot, PROCESSED) == 1 and held(dovecot, FAILED) == 1)
    assert count(inst, Ticket) == 1
    # Not filed in silence: held with its header and why, where held mail is listed.
    with inst.session() as s:
        record = s.scalar(select(IngestRecord).where(IngestRecord.outcome == "quarantined"))
        assert record is not None
        assert (record.message_id, record.sender) == ("imap-1@acme.example", "alice@acme.example")
        assert record.reason.startswith("not fetched: ")
        assert "over intake.imap.max_message_bytes (20000)" in record.reason
        assert f"the original is in IMAP folder {FAILED}" in record.reason
    capsys.readouterr()
    assert inst.cli("quarantine", "list") == 0
    listed = capsys.readouterr().out
    assert "alice@acme.example  Export fails 1  not fetched: 52" in listed
    # Released, it becomes a ticket whose text tells staff where the original is.
    assert inst.cli("quarantine", "release", str(record.id)) == 0
    with inst.session() as s:
        text = s.scalar(select(Article.text).where(Article.direction == "in").order_by(
            Article.id.desc()))  # fmt: skip
    assert text is not None and f"the original is in IMAP folder {FAILED}" in text
    assert count(inst, Ticket) == 2


def test_a_known_sender_of_too_large_mail_is_told_once_robots_and_strangers_never(
    inst: Installation, dovecot: Dovecot, password: None
) -> None:
    """Over SMTP the sender's own server tells them (our 552); over IMAP the
    provider took the mail, so without a word from us they would wait for an
    ack that never comes."""
    big = "x" * 50_000
    dovecot.append(mail(1, body=big))
    dovecot.append(mail(2, body=big))  # the same person again the same day: told once
    dovecot.append(make_mail(sender="Eve <eve@elsewhere.example>", message_id="imap-3@x.example",
                             body=big).as_bytes())  # fmt: skip
    dovecot.append(make_mail(message_id="imap-4@acme.example", body=big,
                             headers={"Auto-Submitted": "auto-replied"}).as_bytes())  # fmt: skip
    with Running(inst, settings_for(dovecot, idle=False, max_message_bytes=20_000)):
        eventually(lambda: held(dovecot, FAILED) == 4)
    assert count(inst, IngestRecord, IngestRecord.outcome == "quarantined") == 4
    (notice,) = [m for m in inst.sent() if m["To"] is not None]
    assert notice["To"] == "alice@acme.example"
    assert notice["In-Reply-To"] == "<imap-1@acme.example>"
    assert notice["Auto-Submitted"] == "auto-replied"
    text = " ".join(notice.get_body(("plain",)).get_content().split())
    assert "votre message dépasse la taille que notre service support peut recevoir" in text
    assert "référent" not in text  # sending it again, smaller, is what to do
    with inst.session() as s:
        told = s.scalars(select(IngestRecord.message_id).where(
            IngestRecord.reason.endswith("; the sender was told"))).all()  # fmt: skip
    assert told == ["imap-1@acme.example"]


def test_a_dovecot_restart_is_survived_with_nothing_lost_or_doubled(
    inst: Installation, dovecot: Dovecot, password: None, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="mailgate.imap")
    dovecot.append(mail(1))
    with Running(inst, settings_for(dovecot)):
        # Filed, not only stored: stopped between its commit and its move, the
        # mail would rightly come back as one more duplicate.
        eventually(lambda: held(dovecot, PROCESSED) == 1, what="the first mail filed")
        dovecot.stop()
        time.sleep(1.5)  # the source notices and retries with backoff
        dovecot.start()
        dovecot.append(mail(2))
        dovecot.append(mail(1))  # the same mail again: a duplicate, filed
        eventually(lambda: held(dovecot, PROCESSED) == 3, timeout=20, what="after restart")
    assert count(inst, Ticket) == 2
    assert count(inst, IngestRecord, IngestRecord.outcome == "duplicate") == 1
    disconnects = [r for r in caplog.records if "disconnected" in r.getMessage()]
    assert 1 <= len(disconnects) <= 2, [r.getMessage() for r in disconnects]  # not one per retry


def test_a_changed_uidvalidity_doubles_nothing(
    inst: Installation, dovecot: Dovecot, password: None, caplog: pytest.LogCaptureFixture
) -> None:
    for n in range(3):
        dovecot.append(mail(n))
    with Running(inst, settings_for(dovecot, idle=False)):
        eventually(lambda: held(dovecot, PROCESSED) == 3)
    # The mailbox is recreated with the same mail in it: new UIDVALIDITY, new UIDs.
    for raw in dovecot.fetch_all(PROCESSED).values():
        dovecot.append(raw)
    dovecot.recreate_inbox()
    caplog.set_level(logging.WARNING, logger="mailgate.imap")
    with Running(inst, settings_for(dovecot, idle=False)):
        eventually(lambda: dovecot.uids("INBOX") == [], what="re-filed")
    assert count(inst, Ticket) == 3
    assert count(inst, IngestRecord, IngestRecord.outcome == "duplicate") == 3
    assert len([r for r in caplog.records if "UIDVALIDITY" in r.getMessage()]) == 1


def test_watching_another_folder_is_no_changed_uidvalidity(
    inst: Installation, dovecot: Dovecot, password: None, caplog: pytest.LogCaptureFixture
) -> None:
    """UIDVALIDITY is remembered per folder: changing `folder:` (or upgrading from
    a version that remembered one value per mailbox) is no change; a folder that
    really was recreated still is, though another folder was watched meanwhile."""
    with inst.app.sessions.begin() as session:  # left by a version without the folder
        set_state(session, "imap.imap.uidvalidity", "4242")
    with dovecot.session() as client:
        client.create_folder("Support")
        client.append("Support", mail(2))
    dovecot.append(mail(1))
    caplog.set_level(logging.WARNING, logger="mailgate.imap")
    with Running(inst, settings_for(dovecot, idle=False)):
        eventually(lambda: held(dovecot, PROCESSED) == 1)
    with Running(inst, settings_for(dovecot, idle=False, folder="Support")):
        eventually(lambda: held(dovecot, PROCESSED) == 2)
    assert count(inst, Ticket) == 2
    assert imap_log(caplog) == []
    dovecot.append(mail(3))
    old = dovecot.uidvalidity()
    dovecot.recreate_inbox()  # the old UIDVALIDITY + 1
    with Running(inst, settings_for(dovecot, idle=False)):
        eventually(lambda: held(dovecot, PROCESSED) == 3)
    assert imap_log(caplog) == [
        f"imap imap: UIDVALIDITY of INBOX changed ({old} -> {old + 1}): every message in it is "
        "checked again; those already stored are recognised as duplicates"
    ]


@pytest.mark.parametrize("database", ["postgresql"], indirect=True)
def test_a_folder_with_a_long_name_is_watched_on_postgresql(
    inst: Installation, dovecot: Dovecot, password: None, caplog: pytest.LogCaptureFixture
) -> None:
    """The UIDVALIDITY remembered for a folder of 196 characters (a deep hierarchy)
    once made PostgreSQL refuse the state key (varchar 200): 'unexpected error' on
    every reconnect, and not one message ingested."""
    folder = ("Support/" + "Kundenanfragen-Oesterreich/" * 7).rstrip("/")
    dovecot.append(mail(1), folder=folder)
    caplog.set_level(logging.WARNING, logger="mailgate.imap")
    with Running(inst, settings_for(dovecot, idle=False, folder=folder)):
        eventually(lambda: held(dovecot, PROCESSED) == 1, what="filed")
    assert count(inst, Ticket) == 1
    assert imap_log(caplog) == []


@pytest.mark.parametrize("database", ["postgresql"], indirect=True)
def test_a_database_down_at_connect_is_an_outage_not_a_bug(
    inst: Installation, database_url: str, postgres: Any, dovecot: Dovecot, password: None,
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch,
) -> None:  # fmt: skip
    """The UIDVALIDITY is remembered at each (re)connect: with the database down then
    (a PostgreSQL restart, SQLite locked past its busy timeout) the source logged
    "unexpected error" with a traceback, as for a bug."""
    name = database_url.rsplit("/", 1)[1]
    monkeypatch.setattr("mailgate.intake.imap.BACKOFF_FIRST", 0.1)
    caplog.set_level(logging.INFO, logger="mailgate.imap")
    dovecot.append(mail(1))
    postgres.admin(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS false')
    postgres.admin(f"SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                   f"WHERE datname = '{name}'")  # fmt: skip
    try:
        with Running(inst, settings_for(dovecot, idle=False)):
            eventually(lambda: len(imap_log(caplog)) >= 1, what="a warning")
            postgres.admin(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS true')
            eventually(lambda: held(dovecot, PROCESSED) == 1, what="filed once it is back")
    finally:
        postgres.admin(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS true')
    assert count(inst, Ticket) == 1
    assert not [r for r in caplog.records if r.name == "mailgate.imap" and r.exc_info]
    down, connected, stopped = imap_log(caplog)
    assert down.startswith("imap imap: disconnected: database unavailable: "), down
    assert connected.startswith("imap imap: connected") and stopped == "imap imap: stopped"


def test_held_mail_found_again_after_a_changed_uidvalidity_joins_the_held_mail(
    inst: Installation, dovecot: Dovecot, password: None
) -> None:
    """A crash between the commit and the move leaves a quarantined mail in the
    folder; fetched again under a new UIDVALIDITY it is a duplicate, and was filed
    as handled, away from the held mail an operator looks for."""
    ambiguous = quarantined_mail()
    dovecot.append(ambiguous)
    dovecot.append(mail(2))
    with Running(inst, settings_for(dovecot, idle=False)):
        eventually(lambda: held(dovecot, FAILED) == 1 and held(dovecot, PROCESSED) == 1)
    dovecot.append(ambiguous)  # as if never moved
    dovecot.append(mail(2))
    dovecot.recreate_inbox()
    with Running(inst, settings_for(dovecot, idle=False)):
        eventually(lambda: dovecot.uids("INBOX") == [], what="re-filed")
    assert (held(dovecot, FAILED), held(dovecot, PROCESSED)) == (2, 2)
    assert all(b"mallory@x.example" in raw for raw in dovecot.fetch_all(FAILED).values())
    assert count(inst, IngestRecord, IngestRecord.outcome == "duplicate") == 2


def test_a_second_copy_of_held_mail_cut_off_before_its_move_joins_the_held_mail(
    inst: Installation, dovecot: Dovecot, password: None
) -> None:
    """The same held mail delivered twice: the second copy is stored as a duplicate
    of it, then the link is cut on its MOVE. Fetched again (the same UID: only
    the move is left to do), it goes to failed_folder too, as it would have."""
    dovecot.append(quarantined_mail())
    with Running(inst, settings_for(dovecot, idle=False)):
        eventually(lambda: held(dovecot, FAILED) == 1, what="the first copy held")
    dovecot.append(quarantined_mail())
    proxy = Proxy(dovecot.port)
    proxy.cut_on = b"UID MOVE"
    try:
        with Running(inst, settings_for(dovecot, port=proxy.port, idle=False)):
            eventually(lambda: proxy.cut_on is None, what="the cut")
            eventually(lambda: dovecot.uids("INBOX") == [], what="moved after the cut")
    finally:
        proxy.close()
    assert (held(dovecot, FAILED), held(dovecot, PROCESSED)) == (2, 0)
    with inst.session() as s:
        outcomes = s.scalars(select(IngestRecord.outcome).order_by(IngestRecord.id)).all()
    assert outcomes == ["quarantined", "duplicate"]  # the refetch only moved it


def test_implicit_tls_and_starttls_with_the_operators_ca(
    inst: Installation, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    server = start_dovecot(tmp_path / "tls", tls=True)
    monkeypatch.setenv("MAILGATE_TEST_IMAP_PASSWORD", server.password)
    try:
        server.append(mail(1))
        implicit = settings_for(server, tls="implicit", port=server.tls_port,
                                tls_ca_file=str(server.cert), idle=False)  # fmt: skip
        with Running(inst, implicit):
            eventually(lambda: count(inst, Ticket) == 1, what="over implicit TLS")
        server.append(mail(2))
        starttls = settings_for(server, tls="starttls", tls_ca_file=str(server.cert), idle=False)
        with Running(inst, starttls):
            eventually(lambda: count(inst, Ticket) == 2, what="over STARTTLS")
    finally:
        server.stop()


def test_plaintext_to_another_host_is_refused_unless_forced(inst: Installation) -> None:
    box = Mailbox(lambda: inst.app, ImapIntake(enabled=True, host="imap.example.com",
                                               tls="none", password_env="X"))  # fmt: skip
    with pytest.raises(Exception, match="tls: none only to loopback"):
        box.connect()


def test_one_failing_mailbox_does_not_stop_another(
    inst: Installation, dovecot: Dovecot, password: None, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="mailgate.imap")
    dovecot.append(mail(1))
    unset = "MAILGATE_TEST_NO_SUCH_VARIABLE"
    broken = Mailbox(lambda: inst.app, ImapIntake.model_validate(
        settings_for(dovecot, name="broken", password_env=unset)))  # fmt: skip
    broken.start()
    try:
        with Running(inst, settings_for(dovecot, name="good", idle=False)):
            eventually(lambda: count(inst, Ticket) == 1, what="the good mailbox works")
    finally:
        broken.stop()
    assert any("broken" in r.getMessage() for r in caplog.records)


def test_check_names_a_refused_login(tmp_path: Path, dovecot: Dovecot) -> None:
    from mailgate.checks import check_imap
    from mailgate.config import load_settings

    (tmp_path / "inst").mkdir()
    inst = install_at(tmp_path / "inst", Clockwork(), {"intake": {"imap": settings_for(
        dovecot, password_env=None, password_file="imap.secret")}})  # fmt: skip
    (inst.root / "imap.secret").write_text("wrong\n")
    problems = check_imap(load_settings(inst.settings_file))
    assert len(problems) == 1 and "login refused" in problems[0], problems
    assert "(Authentication failed.)" in problems[0] or "([AUTHENTICATIONFAILED]" in problems[0]
    assert "b'" not in problems[0]  # the server's words, not a Python repr of them
    (inst.root / "imap.secret").write_text(dovecot.password + "\n")
    assert check_imap(load_settings(inst.settings_file)) == []


def test_check_names_a_missing_or_read_only_folder(tmp_path: Path) -> None:
    from mailgate.checks import check_imap
    from mailgate.config import load_settings

    server = start_dovecot(tmp_path / "acl", acl="INBOX owner lrs\n")
    try:
        (tmp_path / "inst").mkdir()
        boxes = [settings_for(server, name=name, folder=folder, password_env=None,
                              password_file="imap.secret")
                 for name, folder in (("typo", "Suport"), ("shared", "INBOX"))]  # fmt: skip
        inst = install_at(tmp_path / "inst", Clockwork(), {"intake": {"imap": boxes}})
        (inst.root / "imap.secret").write_text(server.password)
        problems = check_imap(load_settings(inst.settings_file))
        assert len(problems) == 2, problems  # both passed: the login was all it tried
        typo, shared = problems
        where = f"{inst.settings_file}: intake.imap"
        assert typo.startswith(f"{where} typo: support@example.com at 127.0.0.1:")
        assert ": cannot open Suport (select failed: Mailbox doesn't exist: Suport" in typo
        assert shared.startswith(f"{where} shared: ")
        assert ": INBOX is read-only for support@example.com: " in shared
    finally:
        server.stop()


def test_folder_names_follow_the_servers_delimiter_and_prefix() -> None:
    assert on_server("mailgate/processed", "", "/") == "mailgate/processed"
    assert on_server("mailgate/processed", "", None) == "mailgate/processed"
    assert on_server("mailgate/processed", "", ".") == "mailgate.processed"
    assert on_server("mailgate/failed", "INBOX.", ".") == "INBOX.mailgate.failed"
    assert on_server("INBOX.Done", "INBOX.", ".") == "INBOX.Done"  # written as the server does
    assert on_server("inbox/Done", "INBOX.", ".") == "inbox.Done"


def test_backoff_doubles_with_jitter_and_a_ceiling() -> None:
    import random

    rng = random.Random(1)
    waits = [backoff(n, rng) for n in range(12)]
    assert all(0.5 * min(300, 2**n) <= w <= min(300, 2**n) for n, w in enumerate(waits))
    assert waits[-1] <= 300


def test_quarantined_mail_is_filed_as_failed() -> None:
    box = ImapIntake()
    assert destination(box, "quarantined") == box.failed_folder
    for outcome in ("created", "threaded", "duplicate", "ignored", "rejected", "bounce"):
        assert destination(box, outcome) == box.processed_folder
    assert destination(box, "duplicate", held=True) == box.failed_folder


# -- the daemon ---------------------------------------------------------------------------


def daemon_with_imap(tmp_path: Path, server: Dovecot, env: dict[str, str] | None = None):  # noqa: ANN201
    tmp_path.mkdir()
    port = free_port()
    imap = settings_for(server, password_env=None, password_file="imap.secret")
    settings = {"intake": {"smtp": {"port": port}, "imap": imap}, **NO_LOOP_LIMITS}
    inst = install_at(tmp_path, Clockwork(), settings)
    (inst.root / "imap.secret").write_text(server.password)
    return inst, port


def test_killed_between_commit_and_move_one_ticket_one_ack(
    tmp_path: Path, dovecot: Dovecot
) -> None:
    inst, port = daemon_with_imap(tmp_path / "inst", dovecot)
    dovecot.append(mail(1))
    crashing = launch(inst, port, env={"MAILGATE_FAULT": "imap_after_commit:1"})
    assert crashing.proc.wait(20) == -9  # SIGKILL, after the commit
    assert count(inst, Ticket) == 1 and len(dovecot.uids("INBOX")) == 1  # not moved
    running = launch(inst, port)
    try:
        eventually(lambda: held(dovecot, PROCESSED) == 1, what="moved after the restart")
    finally:
        running.stop()
    assert count(inst, Ticket) == 1
    assert count(inst, OutboxMail, OutboxMail.kind == "ack") == 1
    assert count(inst, IngestRecord) == 1  # only the MOVE: the same message, no new row
    assert "already stored as ingest #1" in running.log()
    assert "message decided" not in running.log()  # nor counted in the metrics again


@pytest.mark.slow
def test_killed_20_times_between_commit_and_move_under_load_stores_each_message_once(
    tmp_path: Path, dovecot: Dovecot
) -> None:
    """Checklist 13 at the IMAP crash point (after_commit_before_move), 20 times
    amid 200 messages: after the restarts each message is one ticket, one ack,
    one ingest record (checklist 19: the re-fetch only moves it) and filed once."""
    inst, port = daemon_with_imap(tmp_path / "inst", dovecot)
    with dovecot.session() as client:
        for n in range(200):
            client.append("INBOX", mail(n))
    for r in range(20):
        at = 1 + (r * 3) % 7  # the n-th message since the (re)start
        crashing = launch(inst, port, env={"MAILGATE_FAULT": f"imap_after_commit:{at}"})
        try:
            assert crashing.proc.wait(30) == -9, crashing.log()
        except subprocess.TimeoutExpired:
            crashing.stop()
            raise AssertionError(f"imap_after_commit:{at} never reached") from None
    running = launch(inst, port)
    try:
        eventually(lambda: held(dovecot, PROCESSED) == 200, timeout=120, what="all filed")
    finally:
        running.stop()
    assert dovecot.uids("INBOX") == []
    assert count(inst, Ticket) == 200 and count(inst, IngestRecord) == 200
    assert count(inst, OutboxMail, OutboxMail.kind == "ack") == 200


@pytest.mark.slow
def test_500_messages_appended_while_the_daemon_runs(tmp_path: Path, dovecot: Dovecot) -> None:
    inst, port = daemon_with_imap(tmp_path / "inst", dovecot)
    running = launch(inst, port)
    try:
        client = dovecot.client()
        for n in range(500):
            client.append("INBOX", mail(n))
        client.logout()
        eventually(lambda: held(dovecot, PROCESSED) == 500, timeout=120, what="500 filed")
    finally:
        running.stop()
    with inst.session() as s:
        per_message = s.execute(
            select(IngestRecord.message_id, func.count()).group_by(IngestRecord.message_id)
        ).all()
    assert len(per_message) == 500 and {n for _, n in per_message} == {1}
    assert count(inst, Ticket) == 500


class Proxy:
    """A TCP relay to Dovecot that can misbehave as networks do: go silent (a NAT or
    proxy dropping a link: no FIN, no RST, bytes simply stop flowing), or trickle;
    or as other servers do: refuse a command Dovecot would carry out."""

    def __init__(self, target_port: int) -> None:
        import socket
        import threading

        self.target = target_port
        self.frozen = threading.Event()
        self.rate: float | None = None  # bytes per second from the server, when trickling
        self.cut_on: bytes | None = None  # a client command cut before it reaches the server, once
        self.said = bytearray()  # everything the client sent
        # A command answered NO here, never passed on: what a server without the
        # extension it belongs to does (Dovecot runs it whatever it advertises).
        self.refuse: bytes | None = None
        self.server = socket.create_server(("127.0.0.1", 0))
        self.port = self.server.getsockname()[1]
        self.links: list[tuple[Any, Any]] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        import socket
        import threading

        while True:
            try:
                client, _ = self.server.accept()
            except OSError:
                return
            upstream = socket.create_connection(("127.0.0.1", self.target))
            self.links.append((client, upstream))
            frozen_now = self.frozen.is_set()
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(a, b, frozen_now, a is upstream),
                                 daemon=True).start()  # fmt: skip

    def _pump(self, src: Any, dst: Any, born_frozen: bool, from_server: bool) -> None:
        while True:
            try:
                data = src.recv(4096 if self.rate and from_server else 65536)
            except OSError:
                return
            if not data:
                return
            if self.frozen.is_set() and not born_frozen:
                continue  # swallowed: the old link is dead but nobody says so
            if self.rate and from_server:
                time.sleep(len(data) / self.rate)
            if not from_server:
                self.said += data
                if self.refuse and self.refuse in data.upper():
                    tag = data.split(b" ", 1)[0]
                    with contextlib.suppress(OSError):
                        src.sendall(tag + b" NO " + self.refuse + b" is not supported\r\n")
                    continue
                if self.cut_on and self.cut_on in data:
                    self.cut_on = None
                    src.close()
                    dst.close()
                    return
            try:
                dst.sendall(data)
            except OSError:
                return

    def freeze_existing(self) -> None:
        """Existing links go silent; connections made afterwards flow normally."""
        self.frozen.set()

    def close(self) -> None:
        self.server.close()
        for a, b in self.links:
            a.close()
            b.close()


def test_without_move_a_message_left_deleted_by_a_cut_is_expunged_at_the_next_session(
    inst: Installation, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Copied and flagged \\Deleted, then the link cut before the EXPUNGE: the next
    session expunges it (searches skip \\Deleted mail, so nothing else would), and
    still never someone else's \\Deleted mail."""
    server = start_dovecot(tmp_path / "nomove", without=("MOVE",))
    monkeypatch.setenv("MAILGATE_TEST_IMAP_PASSWORD", server.password)
    proxy = Proxy(server.port)
    proxy.cut_on = b"EXPUNGE"
    try:
        theirs = server.append(mail(99), flags=[b"\\Deleted"])
        server.append(mail(1))
        with Running(inst, settings_for(server, port=proxy.port, idle=False, poll_seconds=1)):
            eventually(lambda: proxy.cut_on is None, what="the cut")
            eventually(lambda: server.uids("INBOX") == [theirs], what="ours expunged")
        assert held(server, PROCESSED) == 1
        assert count(inst, Ticket) == 1
    finally:
        proxy.close()
        server.stop()


def test_without_uidplus_no_uid_expunge_and_never_someone_elses_deleted_mail(
    inst: Installation, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:  # fmt: skip
    """UID EXPUNGE is UIDPLUS's: a server without it refuses the command. A plain
    EXPUNGE removes every \\Deleted message, so it waits until all of them are ours,
    with one warning that says why, not one log line per drain meanwhile."""
    # Dovecot advertises neither MOVE nor UIDPLUS (untagged CAPABILITY and the
    # [CAPABILITY] of its LOGIN answer); the proxy refuses UID EXPUNGE, as such a server.
    server = start_dovecot(tmp_path / "plain", without=("MOVE", "UIDPLUS"))
    monkeypatch.setenv("MAILGATE_TEST_IMAP_PASSWORD", server.password)
    proxy = Proxy(server.port)
    proxy.refuse = b"UID EXPUNGE"
    caplog.set_level(logging.INFO, logger="mailgate.imap")
    try:
        theirs = server.append(mail(99), flags=[b"\\Deleted"])  # someone else's
        ours = server.append(mail(1))
        with Running(inst, settings_for(server, port=proxy.port, idle=False)):
            eventually(lambda: held(server, PROCESSED) == 1, what="copied")
            # Two drains more, each finding ours filed: not processed again, not expunged.
            drains = proxy.said.count(b"DELETED KEYWORD")
            eventually(lambda: proxy.said.count(b"DELETED KEYWORD") >= drains + 2, what="drains")
            assert server.uids("INBOX") == [theirs, ours]
            waiting = imap_log(caplog)
            with server.session() as client:  # its owner expunges it, by UID
                client.select_folder("INBOX")
                client.expunge([theirs])
            eventually(lambda: server.uids("INBOX") == [], what="ours expunged")
        assert b"UID EXPUNGE" not in bytes(proxy.said).upper()
        assert (held(server, PROCESSED), count(inst, IngestRecord)) == (1, 1)
        assert len(waiting) == 2 and waiting[0].startswith("imap imap: connected"), waiting
        assert "has no UIDPLUS" in waiting[1]
        assert "1 message(s) another client deleted" in waiting[1]
        assert imap_log(caplog)[2:] == [
            "imap imap: filed mail expunged: 1 message(s) left in INBOX after they were filed",
            "imap imap: stopped",
        ]
    finally:
        proxy.close()
        server.stop()


def test_a_silently_cut_idle_link_is_noticed_and_mail_meanwhile_ingested(
    inst: Installation, dovecot: Dovecot, password: None
) -> None:
    """Checklist 22: detected within the IDLE period + the command timeout (+ a backoff)."""
    proxy = Proxy(dovecot.port)
    try:
        box = settings_for(dovecot, port=proxy.port, idle_seconds=3, timeout_seconds=3)
        with Running(inst, box):
            dovecot.append(mail(1))
            eventually(lambda: count(inst, Ticket) == 1, what="the first mail")
            time.sleep(0.5)  # in IDLE again
            proxy.freeze_existing()
            dovecot.append(mail(2))  # its EXISTS never reaches us
            took = eventually(lambda: count(inst, Ticket) == 2, timeout=20, what="after the cut")
        assert took < 3 + 3 + 2 + 1, took  # idle + timeout + first backoff + slack
    finally:
        proxy.close()


def test_a_message_without_message_id_fetched_three_times_is_one_ticket(
    inst: Installation, dovecot: Dovecot, password: None
) -> None:
    """Checklist 18: the same bytes back in the folder after each reconnect."""
    raw = make_mail(message_id=None, subject="No id here").as_bytes()
    for attempt in range(3):
        dovecot.append(raw)
        with Running(inst, settings_for(dovecot, idle=False)):
            eventually(lambda n=attempt: held(dovecot, PROCESSED) == n + 1)
    assert count(inst, Ticket) == 1
    assert count(inst, IngestRecord, IngestRecord.outcome == "duplicate") == 2


def test_the_same_bytes_over_smtp_then_imap_are_one_ticket(
    tmp_path: Path, dovecot: Dovecot
) -> None:
    """Checklist 16, through the daemon's SMTP listener and its IMAP source."""
    inst, port = daemon_with_imap(tmp_path / "inst", dovecot)
    raw = mail(7)
    running = launch(inst, port)
    try:
        with running.smtp() as smtp:
            code, _ = smtp.sendmail("alice@acme.example", ["support@example.com"], raw) or (
                250,
                b"",
            )
        dovecot.append(raw)
        # A daemon starting beside other tests' load: login and first poll take a while.
        eventually(lambda: held(dovecot, PROCESSED) == 1, timeout=30, what="the IMAP copy filed")
    finally:
        running.stop()
    assert count(inst, Ticket) == 1
    with inst.session() as s:
        outcomes = sorted(s.scalars(select(IngestRecord.source + ":" + IngestRecord.outcome)))
    assert outcomes == ["imap:duplicate", "smtp:created"]


def test_a_refused_password_is_one_log_line_not_one_per_retry(
    inst: Installation, dovecot: Dovecot, monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:  # fmt: skip
    caplog.set_level(logging.INFO, logger="mailgate.imap")
    monkeypatch.setenv("MAILGATE_TEST_IMAP_PASSWORD", "not the password")
    with Running(inst, settings_for(dovecot)):
        # Dovecot answers a failed login after 2 s; with the backoff, a retry at ~3 s.
        eventually(lambda: dovecot.log_path.read_text().count("auth failed") >= 2, timeout=15,
                   what="a second refused login")  # fmt: skip
    refused = [r for r in caplog.records if "login refused" in r.getMessage()]
    assert len(refused) == 1, [r.getMessage() for r in caplog.records]
    assert refused[0].levelno == logging.WARNING


def test_a_folder_that_does_not_exist_is_retried_with_a_growing_backoff(
    inst: Installation, dovecot: Dovecot, password: None, caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:  # fmt: skip
    """The login works, the SELECT fails (a typo in `folder:`): the backoff once
    started again at each login, so the provider saw a login a second, for ever,
    which providers answer by blocking the account."""
    monkeypatch.setattr("mailgate.intake.imap.BACKOFF_FIRST", 0.1)  # 0.1, 0.2, 0.4 ... s
    caplog.set_level(logging.INFO, logger="mailgate.imap")
    with Running(inst, settings_for(dovecot, idle=False, folder="Suport")):
        time.sleep(2)
    logins = dovecot.log_path.read_text().count("imap-login: Info: Login:")
    assert 2 <= logins <= 7, logins  # at most 0 + .05 + .1 + .2 + .4 + .8 s; 25 before
    failure, stopped = imap_log(caplog)  # one line for the failure, not one per retry
    assert failure.startswith("imap imap: disconnected: select failed: Mailbox doesn't exist: ")
    assert stopped == "imap imap: stopped"


def test_a_read_only_folder_is_named_as_such_and_nothing_is_taken_until_it_is_writable(
    inst: Installation, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:  # fmt: skip
    """A shared or ACL-restricted folder: reading works, moving out is refused. The
    first mail became a ticket, then its MOVE failed at every retry ("move failed:
    [NOPERM]" twice per retry), holding back all later mail without saying why."""
    server = start_dovecot(tmp_path / "acl", acl="")
    monkeypatch.setenv("MAILGATE_TEST_IMAP_PASSWORD", server.password)
    monkeypatch.setattr("mailgate.intake.imap.BACKOFF_FIRST", 0.1)
    caplog.set_level(logging.INFO, logger="mailgate.imap")
    try:
        for n in range(3):
            server.append(mail(n))
        server.set_acl("INBOX owner lrs\n")  # lookup, read, keep \Seen: no delete, no expunge
        with Running(inst, settings_for(server, idle=False)):
            eventually(lambda: len(imap_log(caplog)) >= 1, what="a warning")
            time.sleep(1)  # retries meanwhile: a few
            assert count(inst, IngestRecord) == 0
            server.set_acl("")  # the operator grants the rights
            eventually(lambda: held(server, PROCESSED) == 3, what="all filed")
        assert count(inst, Ticket) == 3
        warning, connected, stopped = imap_log(caplog)
        assert warning == (
            "imap imap: cannot file mail: INBOX is read-only for support@example.com: the "
            "server keeps no \\Deleted flag there (PERMANENTFLAGS: \\Seen); each message is "
            "moved out once stored, so none is taken. Let the account delete and expunge "
            "there (IMAP ACL rights t and e)"
        )
        assert connected.startswith("imap imap: connected") and stopped == "imap imap: stopped"
    finally:
        server.stop()


def test_a_message_too_slow_to_fetch_goes_to_the_failed_folder(
    inst: Installation, dovecot: Dovecot, password: None, caplog: pytest.LogCaptureFixture
) -> None:
    """A server trickling bytes holds no mailbox: the whole fetch has a deadline."""
    caplog.set_level(logging.WARNING, logger="mailgate.imap")
    dovecot.append(mail(1, body="slow " * 60_000))  # 300 KB: 7 s at 40 KB/s
    dovecot.append(mail(2))
    proxy = Proxy(dovecot.port)
    proxy.rate = 40_000
    try:
        box = settings_for(dovecot, port=proxy.port, idle=False, fetch_timeout_seconds=2)
        with Running(inst, box):
            eventually(lambda: held(dovecot, FAILED) == 1, timeout=30, what="filed as failed")
            eventually(lambda: count(inst, Ticket) == 1, what="the next message")
    finally:
        proxy.close()
    assert held(dovecot, PROCESSED) == 1
    assert any("fetch_timeout_seconds" in r.getMessage() for r in caplog.records)
    with inst.session() as s:
        reasons = list(s.scalars(select(IngestRecord.reason).where(
            IngestRecord.outcome == "quarantined")))  # fmt: skip
    assert len(reasons) == 1 and "fetch took over fetch_timeout_seconds (2 s)" in reasons[0]


def test_idle_is_reissued_within_idle_seconds(
    inst: Installation, dovecot: Dovecot, password: None
) -> None:
    """Servers drop an IDLE after 30 minutes (RFC 2177): it is renewed before that."""
    proxy = Proxy(dovecot.port)
    try:
        with Running(inst, settings_for(dovecot, port=proxy.port, idle_seconds=1)):
            eventually(lambda: proxy.said.count(b" IDLE\r\n") >= 3, timeout=10,
                       what="three IDLE commands")  # fmt: skip
            assert proxy.said.count(b"DONE\r\n") >= 2
            dovecot.append(mail(1))  # still watching
            eventually(lambda: count(inst, Ticket) == 1, timeout=5)
    finally:
        proxy.close()


def test_the_daemon_rides_out_a_dovecot_restart_and_smtp_serves_meanwhile(
    tmp_path: Path, dovecot: Dovecot
) -> None:
    inst, port = daemon_with_imap(tmp_path / "inst", dovecot)
    dovecot.append(mail(1))
    running = launch(inst, port)
    try:
        eventually(lambda: held(dovecot, PROCESSED) == 1, what="the first mail")
        dovecot.stop()
        with running.smtp() as smtp:  # IMAP down: SMTP intake is not affected
            assert smtp.sendmail("alice@acme.example", ["support@example.com"], mail(2)) == {}
        time.sleep(1)
        dovecot.start()
        dovecot.append(mail(3))
        dovecot.append(mail(1))  # delivered again: a duplicate, filed
        eventually(lambda: held(dovecot, PROCESSED) == 3, timeout=20, what="after the restart")
        running.wait_for_log("imap imap: connected")
    finally:
        running.stop()
    assert count(inst, Ticket) == 3
    log = running.log()
    assert log.count("imap imap: disconnected") == 1, log  # one line, not one per retry


@pytest.mark.parametrize(
    ("command", "says"),
    [
        ("false", "failed with status 1: no message"),
        ("sh -c 'echo token service down >&2; exit 3'", "failed with status 3: token service down"),
        ("true", "printed no token"),
        ("/no/such/token-command", "failed:"),
    ],
)
def test_a_failing_token_command_says_why_without_connecting(
    inst: Installation, command: str, says: str
) -> None:
    from mailgate.config import ConfigError

    box = ImapIntake(
        enabled=True, host="127.0.0.1", port=1, tls="none", oauth2_token_command=command
    )  # fmt: skip (port 1: nothing listens)
    with pytest.raises(ConfigError) as caught:
        Mailbox(lambda: inst.app, box).connect()
    assert says in caught.value.problems[0], caught.value.problems


def test_a_server_without_xoauth2_is_named_as_such(inst: Installation, dovecot: Dovecot) -> None:
    from mailgate.config import ConfigError

    box = ImapIntake.model_validate(
        settings_for(dovecot, password_env=None, oauth2_token_command="echo tok-123")
    )
    with pytest.raises(ConfigError, match="does not offer XOAUTH2"):
        Mailbox(lambda: inst.app, box).connect()


def test_only_the_trusted_providers_authentication_results_vouch_for_the_sender(
    install: Callable[..., Installation], dovecot: Dovecot, password: None
) -> None:
    """Checklist 12 over IMAP: the mailbox trusts its provider's authserv-id only."""
    inst = install(settings={"hygiene": {"authentication": {"policy": "require"}}})
    provider = "mx.provider.example"
    verdict = "dmarc=pass (p=REJECT) header.from=acme.example"
    dovecot.append(f"Authentication-Results: {provider}; {verdict}\r\n".encode() + mail(1))
    dovecot.append(f"Authentication-Results: mx.other.example; {verdict}\r\n".encode() + mail(2))
    box = settings_for(dovecot, idle=False, trusted_authserv_ids=[provider])
    with Running(inst, box):
        eventually(lambda: held(dovecot, PROCESSED) + held(dovecot, FAILED) == 2, what="filed")
    with inst.session() as s:
        tickets = s.scalars(select(Ticket.subject)).all()
        held_reason = s.scalars(
            select(IngestRecord.reason).where(IngestRecord.outcome == "quarantined")
        ).one()
    assert tickets == ["Export fails 1"]
    assert held(dovecot, FAILED) == 1
    assert "unauthenticated sender alice@acme.example" in held_reason
