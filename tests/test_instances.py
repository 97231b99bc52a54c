"""Several `mailgate run` instances on one PostgreSQL: nothing lost, nothing doubled.

Each test runs real daemons (tests/daemon.py) on a fresh database of the
session's cluster (tests/postgres.py), except the PostgreSQL restart test,
which stops and starts a cluster of its own. The instances share the
database and the token key, as a deployment must (README "Several
instances"); each has its own settings folder, SMTP port and log.
"""

from __future__ import annotations

import email.policy
import os
import random
import re
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import yaml
from sqlalchemy import Engine, create_engine, func, select, text

from mailgate.directory import sync_directory_if_changed
from mailgate.intake.faults import FAULT_ENV
from mailgate.outbound.outbox import send_due
from mailgate.store.db import HEAD_REVISION, current_revision, make_engine
from mailgate.store.leadership import AdvisoryLock, FileLock
from mailgate.store.models import Contact, IngestRecord, OutboxMail, SlaClock, Ticket
from mailgate.tickets.changes import set_status
from mailgate.tickets.sweep import sweep as lifecycle_sweep
from tests.conftest import NO_LOOP_LIMITS, ROOT, Clockwork, deep_update, install_at, make_mail
from tests.daemon import launch, start_daemon
from tests.postgres import Cluster, start_postgres
from tests.smtp_sink import Sink, free_port
from tests.test_daemon_crash import (
    FAULT_LINE,
    deliver_once,
    records_per_message,
    stored_message_ids,
)
from tests.test_imap import PROCESSED, eventually, held, mail, settings_for

LOAD: dict[str, Any] = deep_update(
    {"intake": {"smtp": {"max_connections": 200, "max_connections_per_client": 200}}},
    NO_LOOP_LIMITS,
)


def instance_settings(url: str, shared: Path, **more: Any) -> dict[str, Any]:
    """One instance of a deployment: the common database and token key."""
    common = {"database_url": url, "tickets": {"secret_file": str(shared / "secret.key")}}
    return deep_update(deep_update(common, LOAD), more)


# --- migrations, by several instances at once ------------------------------------


def empty_database(postgres: Cluster, name: str) -> str:
    """A database with no schema at all (not the migrated template)."""
    postgres.admin(f'CREATE DATABASE "{name}_{os.getpid()}"')
    return postgres.url(f"{name}_{os.getpid()}")


@pytest.mark.parametrize(
    "command",
    [
        ("db", "upgrade"),  # configuration management runs it on every machine
        ("tickets", "list"),  # any first start migrates an empty database (ensure_schema)
    ],
    ids=["db-upgrade", "first-start"],
)
def test_several_machines_migrating_one_database_at_once_all_succeed(
    tmp_path: Path, postgres: Cluster, command: tuple[str, ...]
) -> None:
    url = empty_database(postgres, command[0])
    rules = ROOT / "rules"
    (tmp_path / "settings.yaml").write_text(
        f"database_url: {url}\ndirectory: null\nrules_dir: {rules}\n"
    )
    argv = [sys.executable, "-m", "mailgate", "--config", "settings.yaml", *command]
    procs = [subprocess.Popen(argv, cwd=tmp_path, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(4)]  # fmt: skip
    results = [(*p.communicate(timeout=120), p.returncode) for p in procs]
    assert [code for _, _, code in results] == [0, 0, 0, 0], results
    engine = make_engine(url)
    try:
        assert current_revision(engine) == HEAD_REVISION
    finally:
        engine.dispose()


# --- leadership, unit by unit -------------------------------------------------


def test_one_advisory_lock_holder_at_a_time_and_a_lost_connection_steps_down(
    postgres: Cluster,
) -> None:
    url = postgres.fresh_database()
    engines = [create_engine(url) for _ in range(2)]
    first, second = (AdvisoryLock(e) for e in engines)
    try:
        assert first.acquire() and first.acquire()  # leading, and still
        assert not second.acquire()
        first.release()
        assert second.acquire() and not first.acquire()
        # The leader's connection is cut (a restart, a network failure): its next
        # check fails, it steps down, and the lock is free for another instance.
        with engines[0].connect() as conn:
            conn.execute(text(
                "SELECT pg_terminate_backend(pid) FROM pg_locks"
                " WHERE locktype = 'advisory' AND granted"
            ))  # fmt: skip
        assert not second.acquire()
        # The terminated backend drops its locks as it exits, a moment later: the
        # standby's next polls (every 5 s in the daemon) find the lock free.
        eventually(first.acquire, timeout=10, what="the lock freed by the terminated leader")
    finally:
        first.release()
        second.release()
        for engine in engines:
            engine.dispose()


def test_one_file_lock_holder_at_a_time(tmp_path: Path) -> None:
    first, second = FileLock(tmp_path / "db.leader"), FileLock(tmp_path / "db.leader")
    assert first.acquire() and not second.acquire()
    first.release()
    assert second.acquire() and not first.acquire()
    second.release()


# --- checklist 27: due reminders, two instances, a leader killed ---------------


def clone_tickets(inst: Any, total: int) -> None:
    """`total` tickets like the one stored, with their SLA clocks: 1,000 ingests
    would take half a minute and test nothing more."""
    with inst.session() as s, s.begin():
        ticket = s.scalar(select(Ticket))
        clocks = list(s.scalars(select(SlaClock).where(SlaClock.ticket_id == ticket.id)))
        columns = [c.key for c in Ticket.__table__.columns if c.key not in ("id", "number")]
        clock_columns = [c.key for c in SlaClock.__table__.columns if c.key not in ("id",)]
        for n in range(2, total + 1):
            copy = Ticket(number=f"SUP-CLONE-{n:06d}", **{c: getattr(ticket, c) for c in columns})
            s.add(copy)
            s.flush()
            for clock in clocks:
                values = {c: getattr(clock, c) for c in clock_columns}
                s.add(SlaClock(**{**values, "ticket_id": copy.id}))


TICKETS = 334


@pytest.mark.slow
def test_two_instances_send_each_of_1000_due_reminders_once_across_a_leader_kill(
    tmp_path: Path, postgres: Cluster, sink: Sink
) -> None:
    """Checklist 27. Only the leader sweeps; killed mid-sweep, the standby takes
    over within 30 s and sends the rest; no reminder is queued twice. 334 tickets
    with three overdue clocks each: 1,002 due reminders."""
    url = postgres.fresh_database()
    # Three days ago: every ticket's first-response clock is past its reminders.
    created = Clockwork(datetime.now(UTC).replace(microsecond=0) - timedelta(days=3))
    seed = install_at(tmp_path / "seed", created, instance_settings(url, tmp_path))
    seed.ingest(make_mail(message_id="sla-0@acme.example", subject="Cannot log in"))
    clone_tickets(seed, TICKETS)
    daemons = [
        start_daemon(tmp_path / name, sink, instance_settings(url, tmp_path), args=("-v",))
        for name in ("a", "b")
    ]
    leader, standby = (d for d in sorted(daemons, key=lambda d: "leading:" not in d.log()))
    assert "leading:" in leader.log() and "leading:" not in standby.log()

    def queued() -> int:
        with seed.session() as s:
            kinds = OutboxMail.kind.in_(("sla_reminder", "sla_breach"))
            return s.scalar(select(func.count()).where(kinds)) or 0

    eventually(lambda: queued() > 0, timeout=60, what="the leader's sweep queues reminders")
    leader.proc.kill()
    killed_at = queued()
    assert "leading:" not in standby.log()  # it never led while the other lived
    took_over = time.monotonic()
    standby.wait_for_log("leading:", timeout=30)
    print(f"takeover after {time.monotonic() - took_over:.1f} s; {killed_at} queued by then")
    eventually(lambda: "sla sweep done" in standby.log(), timeout=60, what="the new leader sweeps")
    standby.stop()
    # Its sweeps all began after it took the lead, i.e. after the leader died.
    log = standby.log()
    assert log.index("leading:") < log.index("sla sweep starting")

    with seed.session() as s:
        sla_kinds = OutboxMail.kind.in_(("sla_reminder", "sla_breach"))
        notices = Counter(s.scalars(select(OutboxMail.ticket_id).where(sla_kinds)))
        # Every clock was overdue once, by several thresholds: one notice for the most
        # serious (sla/sweep.py), claimed by the compare-and-set on alerts_sent.
        alerted = Counter(s.scalars(select(SlaClock.ticket_id).where(SlaClock.alerts_sent > 0)))
        left_due = s.scalar(select(func.count()).where(SlaClock.next_alert_at <= datetime.now(UTC)))
    assert len(alerted) == TICKETS and notices.total() >= 1000
    assert {t for t in alerted if notices[t] != alerted[t]} == set(), "a reminder queued twice"
    assert left_due == 0


# --- checklist 13 with two instances --------------------------------------------

MESSAGES = 1000
SESSIONS = 20
# 20 kills of instance A, alternating the crash points, at the n-th message since
# its (re)start; B serves throughout. A message's first attempt goes to either,
# its retries alternate (an MTA trying the other MX), so a message committed by
# A just before its death is retried on B. New messages wait while A restarts:
# otherwise B alone would carry the load through before the 20th kill.
ROUNDS = [(("after_commit", "before_commit")[r % 2], 3 + (r * 7) % 19) for r in range(20)]


@pytest.mark.slow
def test_sigkill_one_of_two_instances_20_times_under_1000_messages(
    tmp_path: Path, postgres: Cluster, sink: Sink
) -> None:
    url = postgres.fresh_database()
    settings = instance_settings(url, tmp_path)
    a = start_daemon(tmp_path / "a", sink, settings, env={FAULT_ENV: "{}:{}".format(*ROUNDS[0])})
    b = start_daemon(tmp_path / "b", sink, settings)
    inst = b.inst
    mids = [f"pg-crash-{i}@acme.example" for i in range(MESSAGES)]
    raws = {
        mid: make_mail(message_id=mid, subject=f"crash {i}").as_bytes(policy=email.policy.SMTP)
        for i, mid in enumerate(mids)
    }
    todo = list(reversed(mids))
    outcome: dict[str, str] = {}
    lock = threading.Lock()
    deadline = time.monotonic() + 240
    given_up = threading.Event()
    a_up = threading.Event()
    a_up.set()
    rng = random.Random(27)

    def session() -> None:
        while True:
            a_up.wait(60)
            with lock:
                if not todo:
                    return
                mid = todo.pop()
                first = rng.choice((a.port, b.port))
            port = first
            while (result := deliver_once(port, raws[mid])) is None:
                if given_up.is_set() or time.monotonic() > deadline:
                    return
                port = b.port if port == a.port else a.port  # the other MX
                time.sleep(0.02)
            with lock:
                outcome[mid] = result

    threads = [threading.Thread(target=session, daemon=True) for _ in range(SESSIONS)]
    for t in threads:
        t.start()
    crashes: list[tuple[str, str, int]] = []
    before: Counter[str] = Counter()
    try:
        for r, (point, n) in enumerate(ROUNDS):
            if r > 0:
                a = launch(a.inst, a.port, env={FAULT_ENV: f"{point}:{n}"})
                a_up.set()
            returncode = a.proc.wait(60)
            a_up.clear()
            assert returncode == -signal.SIGKILL, a.log()
            found = FAULT_LINE.search(a.log())
            assert found and found.group(1, 2) == (point, str(n)), a.log()
            after = records_per_message(inst)
            crashes.append((point, found.group(3), after[found.group(3)] - before[found.group(3)]))
            before = after
        a = launch(a.inst, a.port)
        a_up.set()
        for t in threads:
            t.join(max(1, deadline - time.monotonic()))
    finally:
        given_up.set()
        a.stop()
        b.stop()

    assert sorted(outcome) == sorted(mids), f"{len(outcome)} of {MESSAGES} acknowledged"
    records = records_per_message(inst)
    stored = Counter(stored_message_ids(b))
    with inst.session() as s:
        tickets = s.scalar(select(func.count()).select_from(Ticket))
        acks = Counter(
            dict(
                s.execute(
                    select(OutboxMail.ticket_id, func.count())
                    .where(OutboxMail.kind == "ack")
                    .group_by(OutboxMail.ticket_id)
                ).all()
            )
        )
    assert {mid for mid in mids if stored[mid] != 1} == set()
    assert tickets == MESSAGES
    duplicate_acks = sum(n - 1 for n in acks.values())
    assert len(acks) == MESSAGES and duplicate_acks == 0
    for point, mid, new_records in crashes:
        if point == "after_commit":
            assert (new_records, outcome[mid]) == (1, "duplicate"), (point, mid)
        else:
            assert new_records == 0, (point, mid)
    ack_ids: dict[str, set[str]] = {}
    for msg in sink.messages():
        if msg["In-Reply-To"] and "alice@acme.example" in str(msg["To"]):
            ack_ids.setdefault(str(msg["In-Reply-To"]), set()).add(str(msg["Message-ID"]))
    assert {irt for irt, ids in ack_ids.items() if len(ids) > 1} == set()
    print(
        f"{len(ROUNDS)} kills; {sum(records.values()) - MESSAGES} duplicate deliveries; "
        f"{duplicate_acks} duplicate acknowledgements"
    )


# --- checklist 14: PostgreSQL stopped with -m immediate ---------------------------


@pytest.fixture
def own_cluster() -> Any:
    cluster = start_postgres()
    yield cluster
    cluster.destroy()


@pytest.mark.slow
def test_postgres_stopped_mid_intake_answers_451_and_stores_once_after_restart(
    tmp_path: Path, own_cluster: Cluster, sink: Sink
) -> None:
    daemon = start_daemon(tmp_path / "a", sink, instance_settings(own_cluster.fresh_database(),
                                                                   tmp_path))  # fmt: skip
    mids = [f"pgdown-{i}@acme.example" for i in range(200)]
    raws = [make_mail(message_id=m, subject=f"down {i}").as_bytes() for i, m in enumerate(mids)]
    replies: list[tuple[int, bytes]] = []
    stored: dict[str, int] = {}
    lock = threading.Lock()
    todo = list(range(len(mids)))

    def deliver(i: int) -> tuple[int, bytes]:
        import smtplib

        try:
            with smtplib.SMTP("127.0.0.1", daemon.port, timeout=30) as smtp:
                smtp.ehlo()
                smtp.mail("alice@acme.example")
                smtp.rcpt("support@example.com")
                return smtp.data(raws[i])
        except smtplib.SMTPResponseException as exc:
            return exc.smtp_code, exc.smtp_error
        except (smtplib.SMTPException, OSError):
            return 0, b"cut off"

    def session() -> None:
        while True:
            with lock:
                if not todo:
                    return
                i = todo.pop(0)
            while True:
                code, reply = deliver(i)
                with lock:
                    replies.append((code, reply))
                if code == 250:
                    with lock:
                        stored[mids[i]] = stored.get(mids[i], 0) + 1
                    break
                time.sleep(0.2)

    threads = [threading.Thread(target=session, daemon=True) for _ in range(10)]
    for t in threads:
        t.start()
    eventually(lambda: len(stored) >= 30, timeout=60, what="the first messages stored")
    own_cluster.stop(mode="immediate")
    eventually(
        lambda: any(code == 451 for code, _ in replies), timeout=30, what="a 451 while it is down"
    )
    time.sleep(2)
    own_cluster.start()
    for t in threads:
        t.join(120)
    daemon.stop()

    codes = Counter(code for code, _ in replies)
    assert not [c for c in codes if c >= 500], codes
    tempfails = [reply for code, reply in replies if code == 451]
    assert tempfails and all(re.match(rb"4\.3\.\d", r) for r in tempfails), tempfails[:3]
    assert "Traceback" not in daemon.log()
    assert sorted(stored) == sorted(mids)
    counts = stored_message_ids(daemon)
    assert {m for m in mids if counts.get(m) != 1} == set()
    print(f"replies: {dict(codes)}")


# --- the relay down for a while ---------------------------------------------------


@pytest.mark.slow
def test_relay_down_then_both_instances_drain_the_outbox_once(
    tmp_path: Path, postgres: Cluster
) -> None:
    relay_port = free_port()
    settings = instance_settings(
        postgres.fresh_database(),
        tmp_path,
        outbound={
            "transport": "smtp",
            "smtp": {"host": "127.0.0.1", "port": relay_port, "tls": "none"},
            "retry_base_seconds": 1,
            "retry_max_seconds": 2,
        },
    )
    daemons = [start_daemon(tmp_path / n, None, settings) for n in ("a", "b")]
    for i in range(40):
        daemon = daemons[i % 2]
        with daemon.smtp() as smtp:
            raw = make_mail(message_id=f"relay-{i}@acme.example", subject=f"relay {i}")
            smtp.sendmail("alice@acme.example", ["support@example.com"], raw.as_bytes())
    inst = daemons[0].inst

    def count(*where: Any) -> int:
        with inst.session() as s:
            return s.scalar(select(func.count()).select_from(OutboxMail).where(*where)) or 0

    def unsent() -> int:
        return count(OutboxMail.status != "sent")

    time.sleep(3)  # both senders try and fail
    total = count()
    assert total >= 80 and unsent() == total  # acknowledgements and staff notices
    sink = Sink().start(relay_port)
    try:
        eventually(lambda: unsent() == 0, timeout=60, what="the outbox drains")
        for daemon in daemons:
            daemon.stop()
        ids = Counter(str(m["Message-ID"]) for m in sink.messages())
    finally:
        sink.stop()
    assert len(ids) == total and set(ids.values()) == {1}, "a mail delivered twice"
    logs = "".join(d.log() for d in daemons)
    assert "retry" in logs


# --- IMAP: polled by the leader only, taken over when it dies ----------------------


@pytest.mark.slow
def test_only_the_leader_polls_imap_and_a_standby_takes_over(
    tmp_path: Path, postgres: Cluster
) -> None:
    from tests.dovecot import start_dovecot

    server = start_dovecot(tmp_path / "dovecot")
    try:
        imap = settings_for(server, password_env=None, password_file=str(tmp_path / "imap.pw"))
        (tmp_path / "imap.pw").write_text(server.password)
        settings = instance_settings(postgres.fresh_database(), tmp_path, intake={"imap": imap})
        daemons = [start_daemon(tmp_path / n, None, settings) for n in ("a", "b")]
        leader, standby = sorted(daemons, key=lambda d: "leading:" not in d.log())
        for n in range(3):
            server.append(mail(n))
        eventually(
            lambda: held(server, PROCESSED) == 3, timeout=30, what="the leader files 3 mails"
        )
        assert "imap " in leader.log() and "imap " not in standby.log()
        leader.proc.kill()
        died = time.monotonic()
        for n in range(3, 6):
            server.append(mail(n))
        eventually(lambda: held(server, PROCESSED) == 6, timeout=30, what="the standby takes over")
        print(f"IMAP taken over and 3 mails filed {time.monotonic() - died:.1f} s after the kill")
        standby.stop()
        with standby.inst.session() as s:
            assert s.scalar(select(func.count()).select_from(Ticket)) == 6
            per_message = Counter(s.scalars(select(IngestRecord.message_id)))
        assert set(per_message.values()) == {1}
    finally:
        server.stop()


# --- the outbox lease: a slow relay, two senders ------------------------------------


def test_a_batch_slower_than_the_lease_is_not_sent_again_by_the_other_instance(
    tmp_path: Path, postgres: Cluster, sink: Sink
) -> None:
    """A relay that takes minutes per mail (content scanning, a stalled end of data)
    made one sender's batch outlast its lease: the other instance took the rows
    still `sending`, the ones already delivered included, and customers got their
    acknowledgements twice. The clock is passed in: each send takes 6 minutes, and
    the other instance looks for due mail after each one."""
    relay = {"transport": "smtp", "smtp": {"host": "127.0.0.1", "port": sink.port,
                                           "tls": "none"}}  # fmt: skip
    settings = instance_settings(postgres.fresh_database(), tmp_path, outbound=relay)
    clock = Clockwork(datetime(2026, 11, 23, 9, 0, tzinfo=UTC))
    a, b = (install_at(tmp_path / name, clock, settings) for name in ("a", "b"))
    for n in range(3):
        a.ingest(make_mail(message_id=f"slow-{n}@acme.example", subject=f"slow relay {n}"))
    with a.session() as s:
        queued = s.scalar(select(func.count()).select_from(OutboxMail)) or 0
    assert queued >= 6  # an acknowledgement and a staff notice each

    def slow_relay_then_the_other_instance_looks(_data: bytes) -> None:
        clock.now += timedelta(minutes=6)
        send_due(b.app.sessions, b.app.transport(), clock)

    send_due(a.app.sessions, a.app.transport(), clock,
             after_send=slow_relay_then_the_other_instance_looks)  # fmt: skip
    delivered = Counter(str(m["Message-ID"]) for m in sink.messages())
    assert len(delivered) == queued and set(delivered.values()) == {1}, delivered
    with a.session() as s:
        assert set(s.scalars(select(OutboxMail.status))) == {"sent"}


# --- the directory, synced by several instances at once -----------------------------


def waiting_on_locks(engine: Engine) -> int:
    """Sessions of the test database waiting for a lock now."""
    with engine.connect() as conn:
        return conn.scalar(text(
            "SELECT count(*) FROM pg_stat_activity"
            " WHERE datname = current_database() AND wait_event_type = 'Lock'"
        ))  # fmt: skip


def test_instances_syncing_a_changed_directory_at_once_all_succeed(
    tmp_path: Path, postgres: Cluster
) -> None:
    """Configuration management pushes directory.yaml and reloads every machine at
    once: each instance syncs it. They all read the old checksum and inserted the
    same new contact; all but one failed on the duplicate key ("reload refused …
    database unavailable: duplicate key value"). A third session holds the
    checksum's row while both sync, so both are certain to overlap."""
    url = postgres.fresh_database()
    clock = Clockwork()
    a, b = (install_at(tmp_path / name, clock, instance_settings(url, tmp_path))
            for name in ("a", "b"))  # fmt: skip
    listing = yaml.safe_load((tmp_path / "a" / "directory.yaml").read_text())
    acme = next(org for org in listing["organisations"] if org["id"] == "acme")
    acme["contacts"].append({"email": "dave@acme.example", "name": "Dave", "role": "admin"})
    for inst in (a, b):
        (inst.root / "directory.yaml").write_text(yaml.safe_dump(listing))

    engine = create_engine(url)
    results: dict[str, object] = {}
    try:
        with engine.connect() as holder:
            holder.execute(
                text("SELECT value FROM state WHERE key = 'directory.sha256' FOR UPDATE")
            )

            def sync(name: str, inst: Any) -> None:
                try:
                    results[name] = sync_directory_if_changed(inst.app)
                except Exception as exc:  # noqa: BLE001 - the test reports it
                    results[name] = exc

            threads = [threading.Thread(target=sync, args=item) for item in (("a", a), ("b", b))]
            for thread in threads:
                thread.start()

            def both_waiting() -> bool:
                return waiting_on_locks(engine) == 2

            eventually(both_waiting, timeout=10, what="both instances inside their sync")
            holder.rollback()
            for thread in threads:
                thread.join(10)
    finally:
        engine.dispose()
    assert not [r for r in results.values() if isinstance(r, Exception)], results
    assert sorted(r is None for r in results.values()) == [False, True]  # one synced it
    with a.session() as s:
        assert s.scalar(select(func.count()).where(Contact.email == "dave@acme.example")) == 1


# --- the lifecycle sweep, overlapping at a change of leader --------------------------


def test_overlapping_lifecycle_sweeps_remind_the_customer_once(
    tmp_path: Path, postgres: Cluster
) -> None:
    """A leader that lost its lock's connection finishes the sweep in hand while
    the new leader starts its own (store/leadership.py): both read the same ticket
    waiting on the customer and both queued the reminder, so the customer got it
    twice. A third session holds the ticket's row while both sweep, so they are
    certain to overlap; the next scheduled sweep then runs alone."""
    url = postgres.fresh_database()
    clock = Clockwork()
    old, new = (install_at(tmp_path / name, clock, instance_settings(url, tmp_path))
                for name in ("old", "new"))  # fmt: skip
    number = old.ingest(make_mail(message_id="wait@acme.example", subject="Question")).ticket
    with old.session() as s, s.begin():
        ticket = s.scalar(select(Ticket).where(Ticket.number == number))
        set_status(s, ticket, "waiting_customer", now=clock(), actor_kind="staff",
                   actor="bob@support.example", reason="asked for logs")  # fmt: skip
    due = clock() + timedelta(days=7)  # past 3 business days

    engine = create_engine(url)
    errors: list[BaseException] = []

    def lifecycle(inst: Any) -> None:
        try:
            lifecycle_sweep(inst.app, due)
        except BaseException as exc:  # noqa: BLE001 - the test reports it
            errors.append(exc)

    try:
        with engine.connect() as holder:
            holder.execute(text("SELECT id FROM tickets WHERE number = :n FOR UPDATE"),
                           {"n": number})  # fmt: skip
            threads = [threading.Thread(target=lifecycle, args=(i,)) for i in (old, new)]
            for thread in threads:
                thread.start()

            def both_waiting_or_done() -> bool:
                return waiting_on_locks(engine) == 2 or not any(t.is_alive() for t in threads)

            eventually(both_waiting_or_done, timeout=10, what="both sweeps under way")
            holder.rollback()
            for thread in threads:
                thread.join(10)
    finally:
        engine.dispose()
    lifecycle_sweep(new.app, due + timedelta(minutes=5))  # the next scheduled run
    assert errors == []
    with new.session() as s:
        reminders = s.scalar(select(func.count()).where(OutboxMail.kind == "waiting_reminder"))
    assert reminders == 1
