"""The outbox against a real SMTP relay (RELIABILITY §8 items 23–25, `mailgate check`).

The relay is the aiosmtpd sink of tests/smtp_sink.py on loopback; time moves
with the installation's Clockwork, never by sleeping. The send helper passes
the same `notify` the daemon needs so that failures reach staff.
"""

from __future__ import annotations

import logging
import shutil
import ssl
import subprocess
import sys
from collections.abc import Callable, Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from aiosmtpd.controller import Controller
from sqlalchemy import select

from mailgate.checks import run_checks
from mailgate.outbound.mailer import STAFF_ONLY
from mailgate.outbound.outbox import send_due
from mailgate.store.models import Article, OutboxMail, Ticket
from tests.conftest import ROOT, Installation, make_mail
from tests.smtp_sink import Sink, free_port

NOTICE = "staff_delivery_failed"
STAFF = "bob@support.example"  # the one active staff member of the shipped directory.yaml


def relay(port: int, **outbound: Any) -> dict[str, Any]:
    smtp = {"host": "127.0.0.1", "port": port, "tls": "none", "timeout_seconds": 5}
    return {"outbound": {"transport": "smtp", "smtp": smtp, **outbound}}


def send(inst: Installation) -> int:
    app = inst.app
    return send_due(app.sessions, app.transport(), inst.clock, app.retry_policy,
                    notify=app.mailer.notify_delivery_failure)  # fmt: skip


def rows(inst: Installation, kind: str | None = None) -> list[OutboxMail]:
    query = select(OutboxMail).order_by(OutboxMail.id)
    if kind:
        query = query.where(OutboxMail.kind == kind)
    with inst.session() as session:
        return list(session.scalars(query))


def row(inst: Installation, kind: str) -> OutboxMail:
    (found,) = rows(inst, kind)
    return found


def article_of(inst: Installation, mail: OutboxMail) -> Article:
    with inst.session() as session:
        article = session.get(Article, mail.article_id)
        assert article is not None
        return article


def wait_until_due(inst: Installation) -> None:
    """Move the clock to when all queued mail is due again (each has its own jitter)."""
    due = [r.next_attempt_at for r in rows(inst) if r.status == "queued"]
    if due:
        inst.clock.now = max(due)  # type: ignore[attr-defined]


def later(inst: Installation, delta: timedelta) -> None:
    inst.clock.now += delta  # type: ignore[attr-defined]


def copies(sink: Sink, message_id: str) -> list[bytes]:
    """What the relay got with this Message-ID (the outbox keeps it without angle brackets)."""
    return [r.data for r in sink.received if r.message["Message-ID"] == f"<{message_id}>"]


def attempt_logs(caplog: pytest.LogCaptureFixture, message_id: str) -> list[dict[str, Any]]:
    return [r.mailgate for r in caplog.records  # type: ignore[attr-defined]
            if r.name == "mailgate.outbox" and r.mailgate["message_id"] == message_id]  # fmt: skip


@pytest.fixture
def created(install: Callable[..., Installation], sink: Sink) -> Callable[..., Installation]:
    """An installation sending to the sink, with one new ticket: an ack and a staff notice."""

    def make(**outbound: Any) -> Installation:
        inst = install(settings=relay(sink.port, **outbound))
        assert inst.ingest(make_mail()).outcome == "created"
        assert sorted(r.kind for r in rows(inst)) == ["ack", "staff_new_ticket"]
        return inst

    return make


# --- 23. the relay answers 4xx for a long time ---------------------------------------------


def test_tempfail_backs_off_then_delivers_once(
    created: Callable[..., Installation], sink: Sink, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="mailgate.outbox")
    inst = created(retry_base_seconds=60, retry_max_seconds=3600, max_attempts=12)
    start = inst.clock()
    sink.mode = "tempfail"
    delays = []
    for attempt in range(1, 8):
        assert send(inst) == 2
        ack = row(inst, "ack")
        assert (ack.status, ack.attempts) == ("queued", attempt)
        assert ack.last_error and "451 4.3.0" in ack.last_error
        delay = (ack.next_attempt_at - inst.clock()).total_seconds()
        nominal = min(60 * 2 ** (attempt - 1), 3600)
        assert 0.8 * nominal <= delay <= 1.2 * nominal  # jitter within ±20 %
        delays.append(delay)
        assert send(inst) == 0  # nothing is retried before its time
        wait_until_due(inst)
    assert delays == sorted(set(delays))  # every gap longer than the one before
    assert inst.clock() - start >= timedelta(hours=1)
    assert sink.attempts == 14 and sink.received == []

    logged = attempt_logs(caplog, ack.message_id)
    assert [e["attempt"] for e in logged] == list(range(1, 8))
    assert {e["result"] for e in logged} == {"retry"}
    assert all(e["kind"] == "ack" and e["recipients"] == ["alice@acme.example"] for e in logged)
    assert all("451" in e["error"] and e["next_attempt_at"] for e in logged)

    sink.mode = "accept"
    wait_until_due(inst)
    assert send(inst) == 2
    ack = row(inst, "ack")
    assert (ack.status, ack.attempts, ack.last_error) == ("sent", 8, None)
    assert article_of(inst, ack).delivery == "sent"
    assert len(copies(sink, ack.message_id)) == 1
    assert attempt_logs(caplog, ack.message_id)[-1] == {
        "outbox_id": ack.id, "message_id": ack.message_id, "kind": "ack",
        "recipients": ["alice@acme.example"], "attempt": 8, "result": "sent", "error": None,
        "next_attempt_at": None,
    }  # fmt: skip
    later(inst, timedelta(days=1))
    assert send(inst) == 0
    assert len(sink.received) == 2  # the ack and the staff notice, once each
    assert rows(inst, NOTICE) == []  # a delivery that only took time is nobody's problem


def test_mails_refused_together_do_not_retry_in_step(
    created: Callable[..., Installation], sink: Sink
) -> None:
    """The jitter: after a relay outage the queued mail does not come back all at once."""
    inst = created()
    sink.mode = "tempfail"
    assert send(inst) == 2
    ack, notice = row(inst, "ack"), row(inst, "staff_new_ticket")
    assert (ack.attempts, notice.attempts) == (1, 1)
    assert ack.next_attempt_at != notice.next_attempt_at


def test_the_default_retries_span_about_five_days() -> None:
    """RFC 5321 4.5.4.1 gives up after 4-5 days; so does Postfix. Not after 7 h:
    a relay down for a weekend must not leave acknowledgements dead."""
    from mailgate.config import Outbound
    from mailgate.outbound.outbox import RetryPolicy

    out = Outbound()
    policy = RetryPolicy(out.max_attempts, out.retry_base_seconds, out.retry_max_seconds)
    waited = sum((policy.delay(n, rng=lambda: 0.5) for n in range(1, policy.max_attempts)),
                 timedelta())  # fmt: skip
    assert timedelta(days=4, hours=20) <= waited <= timedelta(days=5, hours=4)
    assert RetryPolicy() == policy  # the dataclass default says the same


def test_gives_up_after_max_attempts_and_cli_retry_requeues(
    created: Callable[..., Installation], sink: Sink, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="mailgate.outbox")
    inst = created(max_attempts=3)
    sink.mode = "tempfail"
    for _ in range(3):
        send(inst)
        wait_until_due(inst)
    ack = row(inst, "ack")
    assert (ack.status, ack.attempts) == ("dead", 3)
    assert ack.last_error and ack.last_error.startswith("gave up after 3 attempts")
    assert article_of(inst, ack).delivery == "failed"
    assert attempt_logs(caplog, ack.message_id)[-1]["result"] == "dead"
    assert row(inst, "staff_new_ticket").status == "dead"
    notice = row(inst, NOTICE)  # one, for the customer's ack; none for the staff notice

    seen = sink.attempts
    later(inst, timedelta(days=1))
    while send(inst):  # only the notice is still tried
        wait_until_due(inst)
    assert row(inst, "ack").attempts == 3 and row(inst, "ack").status == "dead"
    assert sink.attempts == seen + 3 and row(inst, NOTICE).status == "dead"

    sink.mode = "accept"
    done = subprocess.run(
        [sys.executable, "-m", "mailgate", "--config", str(inst.settings_file),
         "outbox", "retry", str(ack.id)],
        capture_output=True, text=True, timeout=60, cwd=ROOT,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "1 mail(s) queued again" in done.stdout
    ack = row(inst, "ack")
    assert (ack.status, ack.attempts) == ("sent", 1)
    assert article_of(inst, ack).delivery == "sent"
    assert len(copies(sink, ack.message_id)) == 1
    assert len(sink.received) == 1  # the staff notices stay dead until asked for
    assert {r.id for r in rows(inst) if r.status == "dead"} == {
        row(inst, "staff_new_ticket").id,
        notice.id,
    }


# --- 24. the relay drops the connection after the final dot --------------------------------


def test_lost_reply_is_resent_at_most_once(
    created: Callable[..., Installation], sink: Sink, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="mailgate.outbox")
    inst = created()
    sink.mode = "drop_after_dot"
    send(inst)
    ack = row(inst, "ack")
    assert ack.status == "queued" and "may have accepted" in (ack.last_error or "")
    for _ in range(5):  # days of trying: nothing more reaches the relay
        wait_until_due(inst)
        send(inst)
        later(inst, timedelta(days=1))
    ack = row(inst, "ack")
    assert (ack.status, ack.attempts) == ("dead", 2)
    assert ack.last_error and ack.last_error.startswith("delivery uncertain")
    assert f"mailgate outbox retry {ack.id}" in ack.last_error
    first, second = copies(sink, ack.message_id)
    assert first == second  # the same bytes, the same Message-ID: receivers can dedupe
    for mail in rows(inst):
        assert len(copies(sink, mail.message_id)) <= 2, mail.kind
    assert [e["result"] for e in attempt_logs(caplog, ack.message_id)] == ["retry", "dead"]
    article = article_of(inst, ack)
    assert article.delivery == "failed"
    assert article.delivery_error and article.delivery_error.startswith("delivery uncertain")
    notice = row(inst, NOTICE)
    assert notice.recipients == [STAFF]
    assert b"delivery uncertain" in (notice.data or b"")


def test_lost_reply_then_success_is_sent(created: Callable[..., Installation], sink: Sink) -> None:
    inst = created()
    sink.mode = "drop_after_dot"
    send(inst)
    sink.mode = "accept"
    wait_until_due(inst)
    send(inst)
    ack = row(inst, "ack")
    assert (ack.status, ack.attempts) == ("sent", 2)
    assert len(copies(sink, ack.message_id)) == 2
    assert article_of(inst, ack).delivery == "sent"
    assert rows(inst, NOTICE) == []


def test_tempfail_between_lost_replies_spends_no_copy(
    created: Callable[..., Installation], sink: Sink
) -> None:
    inst = created()
    for mode in ("drop_after_dot", "tempfail", "drop_after_dot"):
        sink.mode = mode
        send(inst)
        if row(inst, "ack").status == "queued":
            wait_until_due(inst)
    ack = row(inst, "ack")
    assert (ack.status, ack.attempts) == ("dead", 3)
    assert len(copies(sink, ack.message_id)) == 2


# --- 25. the relay refuses the recipient --------------------------------------------------


def test_refused_recipient_fails_without_retry_and_tells_staff_once(
    created: Callable[..., Installation], sink: Sink, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="mailgate.outbox")
    inst = created()
    sink.mode = "refuse_rcpt"
    assert send(inst) == 2
    ack = row(inst, "ack")
    assert (ack.status, ack.attempts) == ("failed", 1)
    assert ack.last_error and "550 5.1.1 No such user" in ack.last_error
    article = article_of(inst, ack)
    assert (article.delivery, article.delivery_error) == ("failed", ack.last_error)
    assert row(inst, "staff_new_ticket").status == "failed"
    assert attempt_logs(caplog, ack.message_id)[-1]["result"] == "failed"
    assert row(inst, NOTICE).status == "queued"  # staff_new_ticket failing adds none

    # The relay would take everything now: only the notice goes, a day later too.
    sink.mode = "accept"
    later(inst, timedelta(days=1))
    assert send(inst) == 1
    assert send(inst) == 0
    assert row(inst, "ack").attempts == 1 and row(inst, "ack").status == "failed"
    (received,) = sink.received
    notice = received.message
    assert received.rcpt_tos == (STAFF,)
    assert notice["Message-ID"] == f"<{row(inst, NOTICE).message_id}>"
    with inst.session() as session:
        number = session.get(Ticket, ack.ticket_id).number  # type: ignore[union-attr]
    assert notice["Subject"].startswith(f"[{number}] Delivery failed")
    assert notice["Auto-Submitted"] == "auto-generated"
    body = notice.get_body(("plain",)).get_content()  # type: ignore[union-attr]
    assert "did not reach alice@acme.example" in body and "acknowledgement" in body
    assert ack.message_id in body and "550 5.1.1 No such user" in body
    assert f"mailgate outbox retry {ack.id}" in body
    with inst.session() as session:
        notes = session.scalars(select(Article).where(Article.subject == notice["Subject"]))
        assert [(a.visibility, a.delivery) for a in notes] == [("internal", "sent")]


def test_a_failing_staff_notice_causes_no_other(
    created: Callable[..., Installation], sink: Sink
) -> None:
    inst = created()
    sink.mode = "refuse_rcpt"
    assert send(inst) == 2  # the ack and the staff notice fail; one notice is queued
    assert send(inst) == 1  # the notice fails too
    later(inst, timedelta(days=2))
    assert send(inst) == 0
    assert [(r.kind, r.status) for r in rows(inst)] == [
        ("ack", "failed"), ("staff_new_ticket", "failed"), (NOTICE, "failed")
    ]  # fmt: skip


def test_broken_notice_template_still_records_the_failure(
    install: Callable[..., Installation], sink: Sink, tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:  # fmt: skip
    templates = tmp_path / "templates"
    shutil.copytree(ROOT / "templates", templates)
    (templates / "en" / f"{NOTICE}.txt.j2").write_text("{{ failed_mail.nope }}\n")
    inst = install(settings={**relay(sink.port), "templates_dir": str(templates)})
    inst.ingest(make_mail())
    sink.mode = "refuse_rcpt"
    assert send(inst) == 2
    assert row(inst, "ack").status == "failed"  # else it would be sent again: a duplicate
    assert rows(inst, NOTICE) == []
    assert "could not queue the staff notice" in caplog.text
    later(inst, timedelta(days=1))
    assert send(inst) == 0


# --- partial answers: some recipients deferred ---------------------------------------------


class DeferOnce:
    """Answers 450 to `address` the first time it is named, 250 to everything else."""

    def __init__(self, address: str) -> None:
        self.address, self.deferred, self.received = address, False, []

    async def handle_RCPT(self, server: Any, session: Any, envelope: Any, address: str,
                          options: list[str]) -> str:  # fmt: skip
        if address == self.address and not self.deferred:
            self.deferred = True
            return "450 4.2.1 Mailbox busy, try later"
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        self.received.append(tuple(envelope.rcpt_tos))
        return "250 OK"


@pytest.fixture
def defer_carol() -> Iterator[tuple[DeferOnce, int]]:
    handler = DeferOnce("carol@acme.example")
    controller = Controller(handler, hostname="127.0.0.1", port=free_port())
    controller.start()
    yield handler, controller.port
    controller.stop()


def test_deferred_recipient_alone_is_retried(
    install: Callable[..., Installation], defer_carol: tuple[DeferOnce, int]
) -> None:
    handler, port = defer_carol
    inst = install(settings=relay(port))
    # A staff member's reply goes to the requester and the colleague she copied.
    number = inst.ingest(make_mail(headers={"Cc": "carol@acme.example"})).ticket
    staff = make_mail(sender="Bob Durand <bob@support.example>", message_id="bob-1@support",
                      subject=f"Re: [{number}] Cannot log in")  # fmt: skip
    assert inst.ingest(staff).outcome == "threaded"
    send(inst)
    reply = row(inst, "staff_reply")
    assert reply.status == "queued" and reply.recipients == ["carol@acme.example"]
    assert reply.last_error and reply.last_error.startswith("accepted for alice@acme.example")
    wait_until_due(inst)
    send(inst)
    assert row(inst, "staff_reply").status == "sent"
    assert article_of(inst, reply).delivery == "sent"
    to_customers = [r for r in handler.received if STAFF not in r]
    # The ack, then the reply to Alice alone (Carol deferred), then to Carol alone.
    assert to_customers == [("alice@acme.example",), ("alice@acme.example",),
                            ("carol@acme.example",)]  # fmt: skip


class DeferAliceOnceCarolAlways(DeferOnce):
    """Once armed: 450 to Alice once, to Carol every time."""

    def __init__(self) -> None:
        super().__init__("alice@acme.example")
        self.armed = False

    async def handle_RCPT(self, server: Any, session: Any, envelope: Any, address: str,
                          options: list[str]) -> str:  # fmt: skip
        if self.armed and address == "carol@acme.example":
            return "450 4.2.1 Mailbox busy, try later"
        if not self.armed:
            envelope.rcpt_tos.append(address)
            return "250 OK"
        return await super().handle_RCPT(server, session, envelope, address, options)


def test_a_recipient_still_deferred_at_the_last_attempt_is_given_up_and_staff_are_told(
    install: Callable[..., Installation],
) -> None:
    """The last of max_attempts tries reaches Alice but Carol's server still says
    450: the mail is done (no further try), and staff learn Carol never got it."""
    handler = DeferAliceOnceCarolAlways()
    controller = Controller(handler, hostname="127.0.0.1", port=free_port())
    controller.start()
    try:
        inst = install(settings=relay(controller.port, max_attempts=2))
        number = inst.ingest(make_mail(headers={"Cc": "carol@acme.example"})).ticket
        send(inst)  # the ack and the staff notice, before the relay's trouble
        handler.armed = True
        staff = make_mail(sender="Bob Durand <bob@support.example>", message_id="bob-1@support",
                          subject=f"Re: [{number}] Cannot log in")  # fmt: skip
        assert inst.ingest(staff).outcome == "threaded"
        for _ in range(3):  # more rounds than attempts: the count is the outbox's
            send(inst)
            wait_until_due(inst)
        reply = row(inst, "staff_reply")
        assert (reply.status, reply.attempts) == ("sent", 2)
        assert reply.last_error and "deferred, gave up after 2 attempts: carol" in reply.last_error
        assert article_of(inst, reply).delivery == "failed"
        (notice,) = rows(inst, NOTICE)
        assert b"carol@acme.example" in (notice.data or b"")
        replies = [r for r in handler.received if STAFF not in r]
        assert replies == [("alice@acme.example",), ("alice@acme.example",)]  # ack, reply
    finally:
        controller.stop()


# --- mailgate check: the relay is reachable ------------------------------------------------


def test_check_talks_to_the_relay(install: Callable[..., Installation], sink: Sink) -> None:
    inst = install(settings=relay(sink.port))
    assert run_checks(inst.settings_file) == []
    assert sink.attempts == 0 and sink.received == []  # a session, no mail


def test_check_names_an_unreachable_relay(install: Callable[..., Installation]) -> None:
    port = free_port()
    inst = install(settings=relay(port))
    problems = run_checks(inst.settings_file)
    assert len(problems) == 1
    assert problems[0].startswith(
        f"{inst.settings_file}: outbound.smtp: cannot talk to relay 127.0.0.1:{port}"
    )
    assert "refused" in problems[0]
    done = subprocess.run(
        [sys.executable, "-m", "mailgate", "--config", str(inst.settings_file), "check"],
        capture_output=True, text=True, timeout=60, cwd=ROOT,
    )  # fmt: skip
    assert done.returncode == 1
    assert done.stdout.splitlines() == [f"error: {problems[0]}"]


def test_check_without_starttls_at_the_relay(
    install: Callable[..., Installation], sink: Sink
) -> None:
    settings = relay(sink.port)
    settings["outbound"]["smtp"]["tls"] = "starttls"
    settings_file = install(settings=settings).settings_file
    (problem,) = run_checks(settings_file)
    assert problem.startswith(f"{settings_file}: outbound.smtp:") and "STARTTLS" in problem


@pytest.fixture
def tls_relay(certificate: tuple[Path, Path]) -> Iterator[int]:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(*certificate)
    handler = DeferOnce("nobody@example.com")
    controller = Controller(handler, hostname="127.0.0.1", port=free_port(),
                            tls_context=context, require_starttls=True)  # fmt: skip
    controller.start()
    yield controller.port
    controller.stop()


def test_check_starttls(
    install: Callable[..., Installation], tls_relay: int, certificate: tuple[Path, Path],
    monkeypatch: pytest.MonkeyPatch,
) -> None:  # fmt: skip
    settings = relay(tls_relay)
    settings["outbound"]["smtp"]["tls"] = "starttls"
    inst = install(settings=settings)
    (problem,) = run_checks(inst.settings_file)  # a certificate nobody vouches for
    assert problem.startswith(f"{inst.settings_file}: outbound.smtp:") and "certificate" in problem
    monkeypatch.setenv("SSL_CERT_FILE", str(certificate[0]))  # now the system trusts it
    assert run_checks(inst.settings_file) == []


def test_under_a_backlog_customers_acks_go_before_staff_notices(
    install: Callable[..., Installation], sink: Sink
) -> None:
    inst = install(settings=relay(sink.port))
    for n in range(3):
        mail = make_mail(message_id=f"backlog-{n}@acme.example", subject=f"Problem {n}")
        assert inst.ingest(mail).outcome == "created"
    # Six mails are due, queued ack, notice, ack, notice...; a round of three takes the acks.
    app = inst.app
    handled = send_due(app.sessions, app.transport(), inst.clock, limit=3, later=STAFF_ONLY)
    assert handled == 3
    assert [r.message["To"] for r in sink.received] == ["alice@acme.example"] * 3
    assert {r.kind for r in rows(inst) if r.status == "queued"} == {"staff_new_ticket"}
