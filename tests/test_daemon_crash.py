"""Stopping and crashing under load: a 250 always means a stored message, once."""

from __future__ import annotations

import email.policy
import re
import signal
import smtplib
import subprocess
import threading
import time
from collections import Counter
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from sqlalchemy import func, select

from mailgate.config import ConfigError
from mailgate.intake.faults import FAULT_ENV, Fault
from mailgate.outbound.outbox import SENDING_LEASE
from mailgate.store.models import IngestRecord, OutboxMail, Ticket
from tests.conftest import NO_LOOP_LIMITS, Installation, make_mail
from tests.daemon import RunningDaemon, install_daemon, launch, start_daemon
from tests.smtp_sink import Sink

LOAD = {
    "intake": {"smtp": {"max_connections": 200, "max_connections_per_client": 200}},
    **NO_LOOP_LIMITS,
}


def stored_message_ids(daemon: RunningDaemon) -> dict[str, int]:
    """Message-ID -> number of ingest records that are not duplicates."""
    with daemon.inst.session() as s:
        rows = s.execute(
            select(IngestRecord.message_id, func.count())
            .where(IngestRecord.outcome != "duplicate")
            .group_by(IngestRecord.message_id)
        )
        return {mid: n for mid, n in rows}


def test_sigterm_with_100_sessions_in_flight(tmp_path: Path, sink: Sink) -> None:
    daemon = start_daemon(tmp_path, sink, LOAD)
    replies: dict[str, int] = {}
    lock = threading.Lock()
    go = threading.Barrier(101)

    def client(n: int) -> None:
        mid = f"inflight-{n}@acme.example"
        raw = make_mail(message_id=mid, subject=f"in flight {n}").as_bytes(policy=email.policy.SMTP)
        code = -1  # cut off: the sender retries later
        try:
            with daemon.smtp() as smtp:
                smtp.ehlo()
                smtp.mail("alice@acme.example")
                smtp.rcpt("support@example.com")
                go.wait(10)
                code, _ = smtp.data(raw)  # what counts; the QUIT may meet a closed session
        except (smtplib.SMTPException, OSError, threading.BrokenBarrierError):
            pass
        with lock:
            replies[mid] = code

    threads = [threading.Thread(target=client, args=(n,)) for n in range(100)]
    for t in threads:
        t.start()
    go.wait(30)
    time.sleep(0.3)  # some DATA transfers done, some in the pipeline, some waiting
    started = time.monotonic()
    daemon.signal(signal.SIGTERM)
    assert daemon.proc.wait(30) == 0
    # well within systemd's TimeoutStopSec: queued messages get 451, not a wait
    assert time.monotonic() - started < 10
    for t in threads:
        t.join(30)
    stored = stored_message_ids(daemon)
    acknowledged = [mid for mid, code in replies.items() if code == 250]
    assert acknowledged, "the load never reached the pipeline"
    for mid in acknowledged:
        assert stored.get(mid) == 1, mid  # never a 250 without its row
    # and a message stored before the stop got its 250 before the session was
    # closed, not a 421 that makes its sender deliver it again
    assert {mid: replies[mid] for mid in stored if replies[mid] != 250} == {}
    assert all(code in (250, -1) or 400 <= code < 500 for code in replies.values()), replies


# Checklist 13: SIGKILL at each crash point under `smtp-source -s 20 -m 500`,
# clients retrying. smtp-source (Postfix) is not installed here, so 20 smtplib
# threads play it: 20 parallel sessions over a fixed set of messages, each
# message sent again (one session per attempt) until it gets a 250, as an MTA
# retries after a dropped connection or a 4xx, only much faster.
SESSIONS = 20
MESSAGES = 500
# 20 kills at each crash point, alternating: where a lost 250 hurts (committed,
# not answered) and inside the transaction, at the n-th message since the
# (re)start: from just after a restart, amid the retries, to well into the load.
# A round stores fewer than n messages, so the 500 last all 40 rounds. A fixed
# plan: failures reproduce.
ROUNDS = [(("after_commit", "before_commit")[r % 2], 2 + (r * 7) % 19) for r in range(40)]
assert sum(n for _, n in ROUNDS) < MESSAGES
FAULT_LINE = re.compile(r"MAILGATE_FAULT: SIGKILL at (\w+):(\d+) <([^>]*)>")


def records_per_message(inst: Installation) -> Counter[str]:
    """Message-ID -> ingest records of any outcome (first deliveries and duplicates)."""
    with inst.session() as s:
        rows = s.execute(
            select(IngestRecord.message_id, func.count()).group_by(IngestRecord.message_id)
        )
        return Counter({mid: n for mid, n in rows})


def deliver_once(port: int, raw: bytes) -> str | None:
    """One SMTP transaction: the outcome named in the 250, or None (retry later)."""
    try:
        smtp = smtplib.SMTP("127.0.0.1", port, timeout=30)
    except OSError:
        return None  # down, being restarted
    try:
        smtp.ehlo()
        if smtp.mail("alice@acme.example")[0] != 250:
            return None
        if smtp.rcpt("support@example.com")[0] != 250:
            return None
        code, reply = smtp.data(raw)
    except (smtplib.SMTPException, OSError):
        return None  # cut off: no 250, so not delivered as far as we know
    finally:
        smtp.close()  # no QUIT: a 250 already received stays received
    if code != 250:
        return None
    match = re.search(rb"Ok: (\w+)", reply)
    assert match, reply
    return match.group(1).decode()


@pytest.mark.slow
def test_sigkill_at_each_crash_point_stores_every_acknowledged_message_once(
    tmp_path: Path, sink: Sink
) -> None:
    """20 SIGKILLs, before the commit or between commit and 250, under 20 retrying sessions."""

    def fault(point: str, n: int) -> dict[str, str]:
        return {FAULT_ENV: f"{point}:{n}"}

    daemon = start_daemon(tmp_path, sink, LOAD, env=fault(*ROUNDS[0]))
    inst, port = daemon.inst, daemon.port
    mids = [f"crash-{i}@acme.example" for i in range(MESSAGES)]
    raws = {
        mid: make_mail(message_id=mid, subject=f"crash {i}").as_bytes(policy=email.policy.SMTP)
        for i, mid in enumerate(mids)
    }
    todo = list(reversed(mids))
    outcome: dict[str, str] = {}  # Message-ID -> what the 250 said (created | duplicate)
    lock = threading.Lock()
    deadline = time.monotonic() + 180
    given_up = threading.Event()  # the test failed: sessions stop retrying

    def session() -> None:
        while True:
            with lock:
                if not todo:
                    return
                mid = todo.pop()
            while (result := deliver_once(port, raws[mid])) is None:
                if given_up.is_set() or time.monotonic() > deadline:
                    return
                time.sleep(0.05)
            with lock:
                outcome[mid] = result

    threads = [threading.Thread(target=session, daemon=True) for _ in range(SESSIONS)]
    for t in threads:
        t.start()
    crashes: list[tuple[str, str, int]] = []  # point, message in flight, its new records
    before: Counter[str] = Counter()  # records per message when the round started
    started = time.monotonic()
    try:
        for r, (point, n) in enumerate(ROUNDS):
            if r > 0:
                daemon = launch(inst, port, env=fault(point, n))
            try:
                returncode = daemon.proc.wait(30)
            except subprocess.TimeoutExpired:
                daemon.stop()
                raise AssertionError(f"{point}:{n} never reached") from None
            assert returncode == -signal.SIGKILL, daemon.log()
            found = FAULT_LINE.search(daemon.log())
            assert found and found.group(1, 2) == (point, str(n)), daemon.log()
            mid = found.group(3)
            after = records_per_message(inst)
            crashes.append((point, mid, after[mid] - before[mid]))
            before = after
        rounds_took = time.monotonic() - started

        daemon = launch(inst, port)  # no fault: the sessions finish
        try:
            for t in threads:
                t.join(max(1, deadline - time.monotonic()))
        finally:
            daemon.stop()
    finally:
        given_up.set()

    # Every message got its 250 in the end, and is stored exactly once.
    assert sorted(outcome) == sorted(mids), f"{len(outcome)} of {MESSAGES} acknowledged"
    records = records_per_message(inst)
    stored = stored_message_ids(daemon)
    assert {mid for mid in mids if stored.get(mid) != 1} == set()
    # "created" in the 250: nothing had been committed before that attempt;
    # "duplicate": an earlier attempt committed and lost its 250 to a kill.
    assert set(outcome.values()) <= {"created", "duplicate"}, Counter(outcome.values())
    assert {mid for mid, o in outcome.items() if o == "created" and records[mid] != 1} == set()
    assert {mid for mid, o in outcome.items() if o == "duplicate" and records[mid] < 2} == set()
    # The crash points did what they say: the message in flight was committed
    # (once) at after_commit, and its retry was a duplicate; nothing of it was
    # committed at before_commit.
    for point, mid, new_records in crashes:
        if point == "after_commit":
            assert (new_records, outcome[mid]) == (1, "duplicate"), (point, mid)
        else:
            assert new_records == 0, (point, mid)
    # One ticket and one ack per message, whatever the retries.
    with inst.session() as s:
        assert s.scalar(select(func.count()).select_from(Ticket)) == MESSAGES
        acks = s.execute(
            select(OutboxMail.ticket_id, func.count())
            .where(OutboxMail.kind == "ack")
            .group_by(OutboxMail.ticket_id)
        ).all()
    assert len(acks) == MESSAGES and {n for _, n in acks} == {1}
    # What reached the relay: at most one ack Message-ID per customer message
    # (the same ack resent after a kill keeps its Message-ID).
    ack_ids: dict[str, set[str]] = {}
    for msg in sink.messages():
        if msg["In-Reply-To"] is None or "alice@acme.example" not in str(msg["To"]):
            continue  # not mail to the customer (staff notices)
        ack_ids.setdefault(str(msg["In-Reply-To"]), set()).add(str(msg["Message-ID"]))
    assert ack_ids, "no ack reached the relay"
    assert {irt for irt, ids in ack_ids.items() if len(ids) > 1} == set()
    duplicates = sum(records.values()) - MESSAGES
    print(
        f"{len(ROUNDS)} kills in {rounds_took:.1f} s; {duplicates} duplicate deliveries, "
        f"{Counter(outcome.values())['duplicate']} of them answered"
    )


# The outbox's crash point (RELIABILITY.md §7, after_send_before_mark): the
# relay holds the mail, its row is not marked sent. 20 kills, each at the n-th
# mail the relay accepted since the (re)start, amid a backlog of 500 mails.
SEND_ROUNDS = [2 + (r * 5) % 17 for r in range(20)]
BACKLOG = 250  # customer mails: an ack and a staff notice each


@pytest.mark.slow
def test_sigkill_between_send_and_mark_sends_each_mail_at_most_twice(
    tmp_path: Path, sink: Sink
) -> None:
    inst, port = install_daemon(tmp_path, sink, {**LOAD, "sla": {"enabled": False}})
    for i in range(BACKLOG):
        inst.ingest(make_mail(message_id=f"backlog-{i}@acme.example", subject=f"backlog {i}"))
    killed = []  # the Message-ID the relay had accepted when each kill came
    for n in SEND_ROUNDS:
        daemon = launch(inst, port, env={FAULT_ENV: f"after_send_before_mark:{n}"})
        try:
            assert daemon.proc.wait(30) == -signal.SIGKILL, daemon.log()
        except subprocess.TimeoutExpired:
            daemon.stop()
            raise AssertionError(f"after_send_before_mark:{n} never reached") from None
        found = FAULT_LINE.search(daemon.log())
        assert found and found.group(1, 2) == ("after_send_before_mark", str(n)), daemon.log()
        killed.append(found.group(3))
    with inst.session() as s:
        stuck = s.scalar(select(func.count()).where(OutboxMail.status == "sending"))
    assert stuck == 20 * len(SEND_ROUNDS)  # each round's batch: claimed, never marked

    # Once the lease is over, the next sender sends the stuck mail again.
    inst.clock.now = datetime.now(UTC) + SENDING_LEASE + timedelta(minutes=1)
    assert inst.cli("outbox", "send") == 0
    with inst.session() as s:
        rows = list(s.scalars(select(OutboxMail)))
    assert len(rows) == 2 * BACKLOG and {r.status for r in rows} == {"sent"}
    copies = Counter(str(m["Message-ID"]).strip("<>") for m in sink.messages())
    assert set(copies) == {r.message_id for r in rows}  # every mail reached the relay...
    assert max(copies.values()) == 2  # ...at most twice, with the same Message-ID
    twice = {mid for mid, n in copies.items() if n == 2}
    # Exactly the mails the relay had accepted in the rounds, none other.
    assert len(twice) == sum(SEND_ROUNDS) and set(killed) <= twice


@pytest.mark.parametrize("spec", ["after_commit", "after_commit:0", "after_commit:x", "boom:1"])
def test_malformed_fault_injection_is_refused(spec: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(FAULT_ENV, spec)
    with pytest.raises(ConfigError, match=FAULT_ENV):
        Fault.from_env()


def test_daemon_does_not_start_with_a_malformed_fault(tmp_path: Path) -> None:
    with pytest.raises(AssertionError, match="error: MAILGATE_FAULT='before_commit:'"):
        start_daemon(tmp_path, None, env={FAULT_ENV: "before_commit:"})
