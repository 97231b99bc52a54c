"""`mailgate run` end to end: real SMTP clients, a real relay sink, signals."""

from __future__ import annotations

import email.policy
import re
import signal
import smtplib
import sqlite3
import subprocess
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from email.message import EmailMessage
from pathlib import Path

import pytest
import yaml
from sqlalchemy import func, select

from mailgate.store.models import IngestRecord, Ticket
from tests.conftest import NO_LOOP_LIMITS, Clockwork, install_at, make_mail
from tests.daemon import RunningDaemon, connect_raw, launch, open_data, read_reply, start_daemon
from tests.smtp_sink import Sink, free_port


@pytest.fixture
def daemon(tmp_path: Path, sink: Sink) -> Iterator[RunningDaemon]:
    running = start_daemon(tmp_path, sink)
    yield running
    running.stop()


def tickets(daemon: RunningDaemon) -> list[Ticket]:
    with daemon.inst.session() as s:
        return list(s.scalars(select(Ticket).order_by(Ticket.id)))


def send(daemon: RunningDaemon, mail: EmailMessage, **kwargs) -> tuple[int, bytes]:
    with daemon.smtp() as client:
        client.ehlo("client.example")
        code, reply = client.mail(kwargs.get("sender", "alice@acme.example"))
        assert code == 250, reply
        for rcpt in kwargs.get("rcpts", ["support@example.com"]):
            code, reply = client.rcpt(rcpt)
            assert code == 250, reply
        return client.data(mail.as_bytes(policy=email.policy.SMTP))


def test_mail_over_smtp_gets_a_ticket_and_an_ack_at_the_relay(
    daemon: RunningDaemon, sink: Sink
) -> None:
    code, reply = send(daemon, make_mail(subject="Portal down"))
    assert code == 250 and re.search(rb"created SUP-\d{4}-\d{6}", reply)  # the wall clock's year
    received = sink.wait_for(2, timeout=5)  # woken by the commit, not by a poll
    ack = next(r for r in received if r.rcpt_tos == ("alice@acme.example",))
    assert re.fullmatch(r"support\+b[0-9a-f]+-[0-9a-f]+@example\.com", ack.mail_from)
    message = ack.message
    assert message["In-Reply-To"] == "<req-1@acme.example>"
    assert message["Auto-Submitted"] == "auto-replied"
    assert re.search(r"\[SUP-\d{4}-\d{6}\]", message["Subject"])
    [ticket] = tickets(daemon)
    assert ticket.subject == "Portal down"
    # the envelope is stored with the message
    with daemon.inst.session() as s:
        record = s.scalar(select(IngestRecord))
    assert record.source == "smtp"
    assert record.envelope["mail_from"] == "alice@acme.example"
    assert record.envelope["rcpt_to"] == ["support@example.com"]
    assert record.envelope["client_address"] == "127.0.0.1"
    assert record.envelope["helo"] == "client.example"


def test_swaks_delivers_a_first_mail(daemon: RunningDaemon, sink: Sink) -> None:
    proc = subprocess.run(
        ["swaks", "--server", f"127.0.0.1:{daemon.port}", "--from", "alice@acme.example",
         "--to", "support@example.com", "--header", "Subject: Export fails",
         "--body", "The nightly export fails."],
        capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert re.search(r"<-  250 2\.0\.0 Ok: created SUP-\d{4}-\d+", proc.stdout)
    assert sink.wait_for(2, timeout=5)
    assert [t.subject for t in tickets(daemon)] == ["Export fails"]


@pytest.mark.parametrize(
    "rcpt",
    ["victim@other.example", "support@example.com.evil.example", "postmaster@example.com"],
)
def test_foreign_recipients_are_refused_no_open_relay(daemon: RunningDaemon, rcpt: str) -> None:
    with daemon.smtp() as client:
        client.ehlo()
        client.mail("alice@acme.example")
        code, reply = client.rcpt(rcpt)
    assert code == 550 and reply.startswith(b"5.1.1")


def test_a_foreign_recipient_in_bytes_that_are_not_utf8_gets_550(daemon: RunningDaemon) -> None:
    """The 550 quotes the address; bytes that are not UTF-8 (a hostile or broken
    client) could not be encoded into it: "500 Error: (UnicodeEncodeError)"
    and a traceback in our log, per RCPT."""
    sock = connect_raw(daemon.port)
    assert read_reply(sock).startswith(b"220")
    for command in (b"EHLO c.example\r\n", b"MAIL FROM:<alice@acme.example>\r\n"):
        sock.sendall(command)
        assert read_reply(sock).startswith(b"250")
    sock.sendall(b"RCPT TO:<victim\xff@other.example>\r\n")
    assert (
        read_reply(sock)
        == (
            "550 5.1.1 <victim\ufffd@other.example>: recipient not accepted here (no relaying)\r\n"
        ).encode()
    )
    sock.close()
    assert "Traceback" not in daemon.log()


def test_plus_addresses_are_accepted(daemon: RunningDaemon) -> None:
    with daemon.smtp() as client:
        client.ehlo()
        client.mail("alice@acme.example")
        assert client.rcpt("support+t1-abc@example.com")[0] == 250
        assert client.rcpt("Support@EXAMPLE.com")[0] == 250


def test_an_idn_support_domain_is_accepted_in_unicode_too(tmp_path: Path, sink: Sink) -> None:
    """We announce SMTPUTF8, so a client may write our IDN domain in Unicode. The
    settings keep it as A-labels and the two were compared as strings: mail to
    support@bücher.example got 550 "no relaying" and bounced."""
    daemon = start_daemon(tmp_path, sink, {"support_address": "support@bücher.example"})
    try:
        with daemon.smtp() as client:
            client.ehlo()
            client.mail("alice@acme.example", ["SMTPUTF8"])
            assert client.rcpt("support@bücher.example")[0] == 250
            assert client.rcpt("Support+x@BÜCHER.example")[0] == 250
            assert client.rcpt("support@xn--bcher-kva.example")[0] == 250
            assert client.rcpt("support@bucher.example")[0] == 550  # another domain
            assert client.rcpt("support@bücher.example.evil.example")[0] == 550
            code, reply = client.data(make_mail(subject="IDN").as_bytes(policy=email.policy.SMTP))
        assert code == 250 and b"created" in reply, reply
        with daemon.inst.session() as s:
            record = s.scalar(select(IngestRecord))
        assert record.envelope["rcpt_to"] == [  # compared and stored as the pipeline does
            "support@xn--bcher-kva.example",
            "support+x@xn--bcher-kva.example",
            "support@xn--bcher-kva.example",
        ]
    finally:
        daemon.stop()


def test_too_many_recipients_get_452(daemon: RunningDaemon) -> None:
    with daemon.smtp() as client:
        client.ehlo()
        client.mail("alice@acme.example")
        codes = [client.rcpt(f"support+{i}@example.com")[0] for i in range(60)]
    assert codes[:50] == [250] * 50
    assert codes[50:] == [452] * 10


def test_unauthorised_sender_gets_no_ticket_and_one_rejection(
    daemon: RunningDaemon, sink: Sink
) -> None:
    for n in range(2):
        mail = make_mail(sender="mallory@evil.example", message_id=f"m{n}@evil.example")
        code, reply = send(daemon, mail, sender="mallory@evil.example")
        assert code == 250 and b"rejected" in reply
    received = sink.wait_for(1, timeout=5)
    assert tickets(daemon) == []
    assert [r.rcpt_tos for r in received] == [("mallory@evil.example",)]


def test_same_bytes_same_outcome_as_ingest(daemon: RunningDaemon, tmp_path: Path) -> None:
    mail = make_mail(message_id="same@acme.example")
    code, reply = send(daemon, mail)
    eml = tmp_path / "same.eml"
    eml.write_bytes(mail.as_bytes())
    again = subprocess.run(
        [*_mailgate(daemon), "ingest", "--no-send", "--json", str(eml)],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    assert b"created" in reply and '"outcome": "duplicate"' in again.stdout


def _mailgate(daemon: RunningDaemon) -> list[str]:
    import sys

    return [sys.executable, "-m", "mailgate", "--config", str(daemon.inst.settings_file)]


# -- size ----------------------------------------------------------------------


@pytest.fixture
def small_daemon(tmp_path: Path, sink: Sink) -> Iterator[RunningDaemon]:
    running = start_daemon(tmp_path, sink, {"intake": {"smtp": {"max_message_bytes": 20_000}}})
    yield running
    running.stop()


def test_size_is_announced_and_declared_oversize_refused_at_mail(
    small_daemon: RunningDaemon,
) -> None:
    with small_daemon.smtp() as client:
        code, _ = client.ehlo()
        assert client.esmtp_features["size"] == "20000"
        code, reply = client.mail("alice@acme.example", ["SIZE=50000"])
    assert code == 552 and reply.startswith(b"5.3.4")


def test_oversize_data_is_refused_with_552_and_nothing_stored(
    small_daemon: RunningDaemon,
) -> None:
    mail = make_mail(body="x" * 70 + "\n" * 1 + ("y" * 70 + "\n") * 1000)
    with small_daemon.smtp() as client:
        client.ehlo()
        client.mail("alice@acme.example")
        client.rcpt("support@example.com")
        code, reply = client.data(mail.as_bytes(policy=email.policy.SMTP))
        assert code == 552 and reply.startswith(b"5.3.4")
        # the session is still usable after the refusal
        assert client.noop()[0] == 250
    assert tickets(small_daemon) == []


# -- failures ------------------------------------------------------------------


@pytest.mark.slow
def test_locked_database_gets_451_and_the_retry_lands_once(
    daemon: RunningDaemon, sink: Sink
) -> None:
    db = sqlite3.connect(daemon.inst.root / "var" / "mailgate.db", isolation_level=None)
    db.execute("BEGIN EXCLUSIVE")  # checklist 15: locked for 30 s, 3x the busy timeout
    locked = time.monotonic()
    mails = [make_mail(message_id=f"locked{n}@acme.example", subject=f"locked {n}") for n in (1, 2)]
    try:
        replies = []
        with ThreadPoolExecutor(2) as pool:  # two at once: one waits for SQLite, one for it
            while time.monotonic() - locked < 30:
                # each waits the busy timeout, then 451
                replies += pool.map(lambda mail: send(daemon, mail), mails)
        assert len(replies) >= 4
        assert all(code == 451 and reply.startswith(b"4.3.0") for code, reply in replies)
    finally:
        db.execute("ROLLBACK")
        db.close()
    assert [send(daemon, mail)[0] for mail in mails] == [250, 250]  # the sending MTA retries
    assert len(tickets(daemon)) == 2
    assert daemon.proc.poll() is None  # the daemon survived
    # An operator reads one line per refused mail, not a traceback.
    assert "database unavailable: database is locked" in daemon.log()
    assert "Traceback" not in daemon.log()


def test_sigterm_during_data_never_acknowledges_a_lost_message(
    daemon: RunningDaemon,
) -> None:
    sock = open_data(daemon.port)
    raw = make_mail(subject="cut short", message_id="cut@acme.example").as_bytes()
    sock.sendall(raw[: len(raw) // 2])
    daemon.signal(signal.SIGTERM)
    try:
        sock.sendall(raw[len(raw) // 2 :] + b"\r\n.\r\n")
        reply = read_reply(sock)
    except OSError:
        reply = b""
    sock.close()
    assert daemon.proc.wait(30) == 0
    stored = [t.subject for t in tickets(daemon)]
    if reply.startswith(b"250"):
        assert stored == ["cut short"]
    else:
        assert reply == b"" or reply[:1] == b"4", reply
        assert stored == []


@pytest.mark.slow
def test_concurrent_clients_each_get_one_outcome_and_one_ack(tmp_path: Path, sink: Sink) -> None:
    clients, per_client = 50, 20
    directory = yaml.safe_load((Path(__file__).parents[1] / "directory.yaml").read_text())
    directory["staff"] = []  # acks only, to count them
    daemon = start_daemon(
        tmp_path,
        sink,
        {"intake": {"smtp": {"max_connections_per_client": clients}}, **NO_LOOP_LIMITS},
        directory,
    )
    replies: list[int] = []
    errors: list[BaseException] = []
    lock = threading.Lock()

    def client(n: int) -> None:
        try:
            with daemon.smtp() as smtp:
                for i in range(per_client):
                    mail = make_mail(message_id=f"c{n}-{i}@acme.example", subject=f"c{n} m{i}")
                    smtp.send_message(mail)
                    with lock:
                        replies.append(250)
        except BaseException as exc:  # noqa: BLE001 - collected and asserted below
            with lock:
                errors.append(exc)

    try:
        threads = [threading.Thread(target=client, args=(n,)) for n in range(clients)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(300)
        assert errors == []
        assert len(replies) == clients * per_client
        with daemon.inst.session() as s:
            outcomes = s.scalar(select(func.count()).select_from(IngestRecord))
            created = s.scalar(select(func.count()).select_from(Ticket))
        assert outcomes == created == clients * per_client
        received = sink.wait_for(clients * per_client, timeout=120)
        subjects = [r.message["Subject"] for r in received]
        assert len(received) == len(set(subjects)) == clients * per_client
    finally:
        daemon.stop()


def test_sighup_with_a_broken_file_keeps_serving(daemon: RunningDaemon, sink: Sink) -> None:
    directory = daemon.inst.root / "directory.yaml"
    good = directory.read_text()
    directory.write_text("organisations: [ {id: acme, nonsense: yes} ]\n")
    daemon.signal(signal.SIGHUP)
    daemon.wait_for_log("reload refused")
    code, reply = send(daemon, make_mail(message_id="after-bad@acme.example"))
    assert code == 250 and b"created" in reply

    # a good reload takes effect: a new admin may now open tickets
    data = yaml.safe_load(good)
    data["organisations"][0]["contacts"].append(
        {"email": "dave@acme.example", "name": "Dave", "role": "admin"}
    )
    directory.write_text(yaml.safe_dump(data))
    daemon.signal(signal.SIGHUP)
    daemon.wait_for_log("reloaded settings")
    code, reply = send(
        daemon,
        make_mail(sender="dave@acme.example", message_id="dave@acme.example"),
        sender="dave@acme.example",
    )
    assert code == 250 and b"created" in reply


def test_noop_flood_is_cut_off_with_421(daemon: RunningDaemon) -> None:
    with daemon.smtp() as client:
        client.ehlo()
        codes = []
        for _ in range(30):
            try:
                codes.append(client.noop()[0])
            except smtplib.SMTPServerDisconnected:
                break
    assert 421 in codes and codes.index(421) <= 20


def test_metrics_endpoint_counts_decisions(tmp_path: Path, sink: Sink) -> None:
    import urllib.request

    from tests.smtp_sink import free_port

    port = free_port()
    daemon = start_daemon(tmp_path, sink, {"metrics": {"enabled": True, "port": port}})
    try:
        send(daemon, make_mail(message_id="m1@acme.example"))
        send(daemon, make_mail(sender="mallory@evil.example", message_id="m2@evil.example"),
             sender="mallory@evil.example")  # fmt: skip
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
            text = response.read().decode()
    finally:
        daemon.stop()
    assert 'mailgate_messages_total{outcome="created"} 1.0' in text
    assert 'mailgate_messages_total{outcome="rejected"} 1.0' in text


def test_the_daemon_sweeps_the_lifecycle_on_start(tmp_path: Path, sink: Sink) -> None:
    """A resolved ticket whose reopen window passed while the daemon was down gets closed."""
    port = free_port()
    relay = {"transport": "smtp", "smtp": {"host": "127.0.0.1", "port": sink.port, "tls": "none"}}
    inst = install_at(tmp_path, Clockwork(), {"intake": {"smtp": {"port": port}},
                                              "outbound": relay})  # fmt: skip
    assert inst.ingest(make_mail()).outcome == "created"
    with inst.session() as session, session.begin():
        ticket = session.scalars(select(Ticket)).one()
        ticket.status, ticket.resolved_at = "resolved", datetime.now(UTC) - timedelta(days=15)
    running = launch(inst, port)
    try:
        deadline = time.monotonic() + 15
        while tickets(running)[0].status != "closed" and time.monotonic() < deadline:
            time.sleep(0.1)
        assert tickets(running)[0].status == "closed"
        running.wait_for_log("lifecycle sweep: 0 reminded, 0 resolved, 1 closed")
    finally:
        running.stop()


def test_the_daemon_sends_sla_reminders_that_fell_due_while_it_was_down(
    tmp_path: Path, sink: Sink
) -> None:
    """The SLA sweep runs at start and then every sla.sweep_seconds, on the real clock."""
    port = free_port()
    relay = {"transport": "smtp", "smtp": {"host": "127.0.0.1", "port": sink.port, "tls": "none"}}
    around_the_clock = {"organisations": {"acme": {"calendar": "24/7"}}}  # any hour of the day
    created = Clockwork(datetime.now(UTC) - timedelta(minutes=40))  # 1 h target: past 50 %
    inst = install_at(tmp_path, created, {"intake": {"smtp": {"port": port}},
                                          "outbound": relay, "sla": around_the_clock})  # fmt: skip
    number = inst.ingest(make_mail()).ticket
    running = launch(inst, port)
    try:
        running.wait_for_log("sla sweep:")
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            reminders = [m for m in sink.messages() if "SLA" in str(m["Subject"])]
            if reminders:
                break
            time.sleep(0.1)
        # one reminder: the first response at 50 % (80 % is 48 min)
        assert len(reminders) == 1, [m["Subject"] for m in sink.messages()]
        assert number in str(reminders[0]["Subject"]) and "50" in str(reminders[0]["Subject"])
        assert reminders[0]["To"] == "bob@support.example"
    finally:
        running.stop()
