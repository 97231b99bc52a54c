"""IMAP intake against a real Dovecot: drain throughput next to the pipeline, and IDLE latency.

    .venv/bin/python bench/imap.py [-n 2000] [--latency 100] [--json]

The workload is bench/ingest.py's: N realistic messages from the admins of 40
organisations, about 30 % of them threaded replies. Each variant gets a fresh
installation (the shipped settings, outbound transport maildir, SQLite in a
temp dir) and runs in this process:

- pipeline: the N messages handed to `process(app, raw, Envelope(source="imap"))`
  from memory, one after the other: what the IMAP source costs on top of it is
  the point of the comparison;
- imap drain: the N messages APPENDed to Dovecot's INBOX first, then one
  `Mailbox` started; timed from `start()` (connect, login, folders) until the
  processed and failed folders hold N between them;
- idle latency: with that Mailbox then idle (IDLE), `--latency` more messages
  APPENDed one at a time, 50-100 ms apart; per message the time from APPEND
  returning to its ingest record being committed (polled every 2 ms on a
  separate SQLite connection). The target: with IDLE a new mail is processed
  within 2 seconds (the exit status is 1 when the slowest took longer). About
  500 ms of it is Dovecot's: it announces a change to an IDLE session only
  NOTIFY_DELAY_MSECS (500, compiled in) after inotify reported it.

Dovecot is tests/dovecot.py's (needs dovecot-imapd), on loopback, stopped at the end.
"""

from __future__ import annotations

import argparse
import contextlib
import email
import json
import os
import random
import resource
import sqlite3
import statistics
import sys
import tempfile
import time
from pathlib import Path

import imapclient
import yaml
from imapclient.exceptions import IMAPClientError
from ingest import directory, generate  # bench/ is on sys.path
from sqlalchemy import func, select

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from mailgate.app import App  # noqa: E402
from mailgate.config import ImapIntake, load_settings  # noqa: E402
from mailgate.directory import sync_directory_if_changed  # noqa: E402
from mailgate.intake.imap import Mailbox  # noqa: E402
from mailgate.pipeline.message import Envelope  # noqa: E402
from mailgate.pipeline.process import process  # noqa: E402
from mailgate.store.models import IngestRecord  # noqa: E402
from tests.dovecot import Dovecot, start_dovecot  # noqa: E402

PROCESSED = "mailgate/processed"
FAILED = "mailgate/failed"
PASSWORD_ENV = "MAILGATE_BENCH_IMAP_PASSWORD"
TARGET_MS = 2000.0


def install(root: Path) -> App:
    """The shipped settings (maildir transport) and ingest.py's directory under `root`."""
    settings = yaml.safe_load((ROOT / "settings.yaml").read_text())
    settings["templates_dir"] = str(ROOT / "templates")
    settings["rules_dir"] = str(ROOT / "rules")
    settings["outbound"]["transport"] = "maildir"
    # 2,000 mails from 80 admins within the hour would trip the loop breaker;
    # this measures intake, so it stays out of the way (bulk imports skip it).
    loops = settings["hygiene"]["loops"]
    loops["tickets_per_sender_per_hour"] = loops["tickets_per_subject_per_hour"] = 100_000
    loops["auto_mail_per_address_per_hour"] = loops["auto_mail_per_address_per_day"] = 100_000
    root.mkdir(parents=True)
    (root / "settings.yaml").write_text(yaml.safe_dump(settings))
    (root / "directory.yaml").write_text(yaml.safe_dump(directory()))
    app = App(load_settings(root / "settings.yaml"))
    sync_directory_if_changed(app)  # migrates too: one-off costs, not per message
    app.templates, app.rules, app.signer  # noqa: B018 - loaded once, before any timing
    return app


def outcomes(app: App) -> dict[str, int]:
    with app.sessions() as session:
        rows = session.execute(
            select(IngestRecord.outcome, func.count()).group_by(IngestRecord.outcome)
        )
        return {outcome: n for outcome, n in rows}


def run_pipeline(messages: list[bytes], root: Path) -> dict[str, object]:
    app = install(root)
    # The envelope the Mailbox gives (source imap, its username as recipient): the same work.
    envelope = Envelope(source="imap", rcpt_to=("support@example.com",))
    started = time.perf_counter()
    for raw in messages:
        process(app, raw, envelope)
    seconds = time.perf_counter() - started
    result = {"seconds": seconds, "msgs_per_s": len(messages) / seconds, "outcomes": outcomes(app)}
    app.engine.dispose()
    return result


def filed(watcher: imapclient.IMAPClient) -> int:
    """Messages in the processed and failed folders (0 for one not created yet)."""
    total = 0
    for folder in (PROCESSED, FAILED):
        with contextlib.suppress(IMAPClientError):
            total += int(watcher.folder_status(folder, ["MESSAGES"])[b"MESSAGES"])
    return total


def mailbox_settings(server: Dovecot) -> ImapIntake:
    return ImapIntake.model_validate(
        {
            "enabled": True,
            "host": "127.0.0.1",
            "port": server.port,
            "tls": "none",
            "username": server.user,
            "password_env": PASSWORD_ENV,
            "processed_folder": PROCESSED,
            "failed_folder": FAILED,
            "idle": True,
            "poll_seconds": 600,  # IDLE, not the poll, must bring new mail
        }
    )


def wait_drained(watcher: imapclient.IMAPClient, n: int) -> None:
    deadline = time.monotonic() + 60 + n * 0.1
    while filed(watcher) < n:
        if time.monotonic() > deadline:
            raise SystemExit(f"drain stuck at {filed(watcher)}/{n} messages filed")
        time.sleep(0.01)


def idle_latencies(server: Dovecot, app: App, messages: list[bytes]) -> list[float]:
    """Per message, ms from APPEND returning to its ingest record being visible."""
    db = sqlite3.connect(f"file:{app.engine.url.database}?mode=ro", uri=True)
    rng = random.Random(11)
    latencies = []
    try:
        with server.session() as appender:
            for raw in messages:
                mid = email.message_from_bytes(raw)["Message-ID"].strip("<> ")
                appender.append("INBOX", raw)
                appended = time.perf_counter()
                deadline = appended + 30
                query = "SELECT 1 FROM ingest_records WHERE message_id = ?"
                while db.execute(query, (mid,)).fetchone() is None:
                    if time.perf_counter() > deadline:
                        raise SystemExit(f"{mid} not processed within 30 s")
                    time.sleep(0.002)
                latencies.append((time.perf_counter() - appended) * 1000)
                time.sleep(rng.uniform(0.05, 0.1))  # back in IDLE before the next one
    finally:
        db.close()
    return latencies


def run_imap(drain: list[bytes], idle: list[bytes], root: Path) -> dict[str, object]:
    server = start_dovecot(root / "dovecot")
    try:
        with server.session() as client:
            for start in range(0, len(drain), 500):
                client.multiappend("INBOX", drain[start : start + 500])
        app = install(root / "mailgate")
        os.environ[PASSWORD_ENV] = server.password
        mailbox = Mailbox(lambda: app, mailbox_settings(server))
        with server.session() as watcher:
            started = time.perf_counter()
            mailbox.start()
            try:
                wait_drained(watcher, len(drain))
                seconds = time.perf_counter() - started
                drained = outcomes(app)
                time.sleep(0.5)  # the drain's last search found nothing: in IDLE now
                latencies = idle_latencies(server, app, idle)
            finally:
                mailbox.stop()
        app.engine.dispose()
    finally:
        server.stop()
    return {
        "seconds": seconds,
        "msgs_per_s": len(drain) / seconds,
        "outcomes": drained,
        "idle_ms": {
            "count": len(latencies),
            "p50": percentile(latencies, 50),
            "p99": percentile(latencies, 99),
            "max": max(latencies, default=float("nan")),
        },
    }


def percentile(values: list[float], pct: int) -> float:
    if len(values) < 2:
        return values[0] if values else float("nan")
    return statistics.quantiles(values, n=100, method="inclusive")[pct - 1]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-n", type=int, default=2000, help="messages drained (default 2000)")
    parser.add_argument("--latency", type=int, default=100, help="messages sent during IDLE")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    messages = generate(args.n + args.latency)
    drain, idle = messages[: args.n], messages[args.n :]
    with tempfile.TemporaryDirectory(prefix="mailgate-bench-imap-") as tmp:
        pipeline = run_pipeline(drain, Path(tmp) / "pipeline")
        imap = run_imap(drain, idle, Path(tmp) / "imap")
    ratio = imap["msgs_per_s"] / pipeline["msgs_per_s"]
    idle_ms = imap["idle_ms"]
    rss_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    ok = idle_ms["max"] < TARGET_MS
    result = {
        "messages": args.n,
        "pipeline": pipeline,
        "imap": imap,
        "ratio": ratio,
        "target": f"idle max < {TARGET_MS:.0f} ms",
        "peak_rss_mib": rss_mib,
    }
    if args.json:
        print(json.dumps(result))
        return 0 if ok else 1
    print(f"messages                   {args.n}  outcomes {pipeline['outcomes']}")
    print(f"pipeline, process()        {pipeline['msgs_per_s']:8.1f} msg/s")
    print(
        f"imap drain, 1 mailbox      {imap['msgs_per_s']:8.1f} msg/s   = {ratio:.0%} of the "
        f"pipeline; outcomes {imap['outcomes']}"
    )
    print(
        f"idle, APPEND -> ingest record ({idle_ms['count']} messages): p50 "
        f"{idle_ms['p50']:.1f} ms, p99 {idle_ms['p99']:.1f} ms, max {idle_ms['max']:.1f} ms "
        f"(target: max < {TARGET_MS:.0f} ms)"
    )
    print(f"peak RSS                   {rss_mib:8.1f} MiB")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
