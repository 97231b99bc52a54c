"""Several instances and a large database: throughput, lookups at 1,000,000 articles, memory.

    .venv/bin/python bench/scale.py [-n 1000] [--articles 1000000] [--json]
    .venv/bin/python bench/scale.py --only throughput|lookups|memory

Every figure comes from this run, on a PostgreSQL cluster the bench starts in
a temp dir (tests/postgres.py: the suite's own, fsync on here) and on SQLite:

- throughput: N messages (the mix of bench/ingest.py) over SMTP, 8 parallel
  connections spread over the instances, to 1 instance on SQLite, 1 on
  PostgreSQL and 2 on PostgreSQL sharing the database; messages per second
  from the first connection to the last 250.
- lookups: the time `process()` takes for a threaded reply (In-Reply-To
  against every stored article) and for a duplicate delivery (the dedupe key),
  on an empty database and then with `--articles` articles and as many ingest
  records added; the ratio must stay within 10 % (indexes, not scans).
- memory: 10 connections each sending a 25 MB message at once to one
  instance; its peak resident memory (VmHWM) must stay under 500 MB.
"""

from __future__ import annotations

import argparse
import email
import email.policy
import json
import os
import smtplib
import statistics
import sys
import tempfile
import threading
import time
from email.message import EmailMessage
from pathlib import Path
from typing import Any

import yaml
from ingest import directory, generate  # bench/ is on sys.path
from smtp import free_port, start_daemon

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.postgres import Cluster, start_postgres  # noqa: E402

CONNECTIONS = 8


def merge(base: dict[str, Any], changes: dict[str, Any]) -> None:
    for key, value in changes.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            merge(base[key], value)
        else:
            base[key] = value


def install(work: Path, settings: dict[str, Any]) -> Path:
    data = yaml.safe_load((ROOT / "settings.yaml").read_text())
    data.update(templates_dir=str(ROOT / "templates"), rules_dir=str(ROOT / "rules"))
    data["intake"]["smtp"].update(
        max_connections_per_client=100, max_messages_per_connection=100_000
    )
    data["hygiene"] = {"loops": {k: 1_000_000 for k in (
        "auto_mail_per_address_per_hour", "auto_mail_per_address_per_day",
        "auto_mail_per_ticket_per_hour", "tickets_per_sender_per_hour",
        "tickets_per_subject_per_hour")}}  # fmt: skip
    merge(data, settings)
    work.mkdir(parents=True, exist_ok=True)
    (work / "settings.yaml").write_text(yaml.safe_dump(data))
    (work / "directory.yaml").write_text(yaml.safe_dump(directory()))
    return work / "settings.yaml"


def stop(proc: Any) -> None:
    import signal

    proc.send_signal(signal.SIGTERM)
    proc.wait(120)


def send(port: int, messages: list[bytes]) -> None:
    with smtplib.SMTP("127.0.0.1", port, timeout=300) as client:
        for raw in messages:
            msg = email.message_from_bytes(raw, policy=email.policy.compat32)
            sender = email.utils.parseaddr(msg["From"])[1]
            # smtplib leaves the line ends of bytes alone; SMTP wants CRLF.
            crlf = raw.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")
            client.sendmail(sender, ["support@example.com"], crlf)


def throughput(work: Path, messages: list[bytes], url: str | None, instances: int) -> float:
    ports = [free_port() for _ in range(instances)]
    procs = []
    for i, port in enumerate(ports):
        settings: dict[str, Any] = {
            "intake": {"smtp": {"port": port}},
            "outbound": {"transport": "maildir"},
            "tickets": {"secret_file": str(work / "secret.key")},
        }
        if url:
            settings["database_url"] = url
        procs.append(start_daemon(install(work / f"i{i}", settings).parent))
    shares = [messages[i::CONNECTIONS] for i in range(CONNECTIONS)]
    threads = [threading.Thread(target=send, args=(ports[i % instances], share))
               for i, share in enumerate(shares)]  # fmt: skip
    started = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - started
    for proc in procs:
        stop(proc)
    return len(messages) / elapsed


def bench_throughput(n: int, cluster: Cluster, tmp: Path) -> dict[str, float]:
    messages = generate(n)
    results = {"sqlite_1": throughput(tmp / "sqlite", messages, None, 1)}
    for instances in (1, 2):
        url = cluster.fresh_database()
        results[f"postgresql_{instances}"] = throughput(tmp / f"pg{instances}", messages, url,
                                                        instances)  # fmt: skip
    return {k: round(v, 1) for k, v in results.items()}


# --- lookups at scale --------------------------------------------------------------


def fill(app: Any, articles: int) -> None:
    """`articles` inbound articles on 1,000 tickets, and as many ingest records,
    written by the database itself (generate_series / a recursive CTE)."""
    from sqlalchemy import text

    pg = app.engine.dialect.name == "postgresql"
    series = (
        "SELECT g AS n FROM generate_series(1, :n) g"
        if pg
        else "WITH RECURSIVE s(n) AS (SELECT 1 UNION ALL SELECT n + 1 FROM s WHERE n < :n) "
        "SELECT n FROM s"
    )
    now = "now()" if pg else "CURRENT_TIMESTAMP"
    empty = "'[]'::json" if pg else "'[]'"
    no_fields = "'{}'::json" if pg else "'{}'"
    key = "lpad(n::text, 64, '0')" if pg else f"substr('{'0' * 64}' || n, -64, 64)"
    with app.engine.begin() as conn:
        org, contact = conn.execute(
            text("SELECT organisation_id, id FROM contacts WHERE role = 'admin' LIMIT 1")
        ).one()
        conn.execute(
            text(
                "INSERT INTO tickets (number, organisation_id, requester_id, subject, status,"
                " priority, urgent, bug, level, cc, tags, language, created_at, updated_at)"
                f" SELECT 'FILL-' || n, :org, :contact, 'filler ' || n, 'open', 'P3', false,"
                f" false, 'L1', {empty}, {empty}, 'en', {now}, {now}"
                f" FROM ({series.replace(':n', '1000')}) s"
            ),
            {"org": org, "contact": contact},
        )
        first = conn.execute(text("SELECT min(id) FROM tickets WHERE number LIKE 'FILL-%'"))
        base = first.scalar()
        conn.execute(
            text(
                "INSERT INTO articles (ticket_id, direction, author_kind, author_email,"
                ' author_name, visibility, message_id, "references", subject, text,'
                " created_at)"
                f" SELECT :base + (n % 1000), 'in', 'customer', 'filler@org0.example', '',"
                f" 'public', 'fill-' || n || '@org0.example', {empty}, 'filler',"
                f" 'filler text', {now} FROM ({series}) s"
            ),
            {"base": base, "n": articles},
        )
        conn.execute(
            text(
                "INSERT INTO ingest_records (dedupe_key, message_id, source, envelope, sender,"
                " subject, outcome, reason, received_at)"
                f" SELECT {key}, 'fill-' || n || '@org0.example', 'pipe', {no_fields},"
                f" 'filler@org0.example', 'filler', 'created', 'filler', {now} FROM ({series}) s"
            ),
            {"n": articles},
        )
    if pg:
        with app.engine.connect() as conn:
            conn.execution_options(isolation_level="AUTOCOMMIT").execute(text("ANALYZE"))


def admin_mail(subject: str, local_id: str, body: str) -> EmailMessage:
    """From an admin of the bench directory (bench/ingest.py) to support."""
    msg = EmailMessage()
    msg["From"] = "Admin <admin0@org1.example>"
    msg["To"] = "support@example.com"
    msg["Subject"] = subject
    msg["Message-ID"] = f"<{local_id}@org1.example>"
    msg.set_content(body)
    return msg


def time_lookups(app: Any, rounds: int, tag: str) -> dict[str, float]:
    """Median ms for a threaded reply and for a duplicate delivery."""
    from mailgate.pipeline.process import process

    reply_ms, duplicate_ms = [], []
    for i in range(rounds):
        first = admin_mail(f"lookup {tag} {i}", f"lk-{tag}-{i}", "Hello,\nthe export fails.\n")
        process(app, first.as_bytes())
        # No tag in the subject: found by In-Reply-To only.
        reply = admin_mail("more details", f"lk-{tag}-{i}-r", "It fails at 80 %.\n")
        reply["In-Reply-To"] = first["Message-ID"]
        t = time.perf_counter()
        result = process(app, reply.as_bytes())
        reply_ms.append((time.perf_counter() - t) * 1000)
        assert result.outcome == "threaded", result
        t = time.perf_counter()
        result = process(app, reply.as_bytes())
        duplicate_ms.append((time.perf_counter() - t) * 1000)
        assert result.outcome == "duplicate", result
    return {
        "reply_ms": round(statistics.median(reply_ms), 2),
        "duplicate_ms": round(statistics.median(duplicate_ms), 2),
    }


def bench_lookups(articles: int, cluster: Cluster, tmp: Path) -> dict[str, Any]:
    from mailgate.app import App
    from mailgate.config import load_settings
    from mailgate.directory import sync_directory_if_changed

    out: dict[str, Any] = {}
    for backend in ("postgresql", "sqlite"):
        settings: dict[str, Any] = {"outbound": {"transport": "maildir"}}
        if backend == "postgresql":
            settings["database_url"] = cluster.fresh_database()
        app = App(load_settings(install(tmp / f"lookups-{backend}", settings)))
        sync_directory_if_changed(app)
        empty = time_lookups(app, 50, "empty")
        started = time.perf_counter()
        fill(app, articles)
        filled_s = time.perf_counter() - started
        full = time_lookups(app, 50, "full")
        app.engine.dispose()
        out[backend] = {
            "empty": empty,
            f"with_{articles}": full,
            "fill_s": round(filled_s, 1),
            "reply_ratio": round(full["reply_ms"] / empty["reply_ms"], 3),
            "duplicate_ratio": round(full["duplicate_ms"] / empty["duplicate_ms"], 3),
        }
    return out


# --- memory -----------------------------------------------------------------------


def big_message(i: int, size: int) -> bytes:
    msg = admin_mail(f"big attachment {i}", f"big-{i}", "The logs are attached.\n")
    # Base64 grows the payload by a third: the whole message is `size` bytes.
    msg.add_attachment(os.urandom(size * 3 // 4 - 4096), maintype="application",
                       subtype="octet-stream", filename=f"logs-{i}.bin")  # fmt: skip
    return msg.as_bytes()


def peak_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM")


def bench_memory(cluster: Cluster, tmp: Path, size: int = 25_000_000) -> dict[str, Any]:
    out: dict[str, Any] = {}
    messages = [big_message(i, size) for i in range(10)]
    for backend in ("postgresql", "sqlite"):
        port = free_port()
        settings: dict[str, Any] = {
            "intake": {"smtp": {"port": port, "max_message_bytes": 26_214_400}},
            "outbound": {"transport": "maildir"},
        }
        if backend == "postgresql":
            settings["database_url"] = cluster.fresh_database()
        proc = start_daemon(install(tmp / f"memory-{backend}", settings).parent)
        idle = peak_rss_mb(proc.pid)
        threads = [threading.Thread(target=send, args=(port, [raw])) for raw in messages]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        peak = peak_rss_mb(proc.pid)
        stop(proc)
        out[backend] = {"idle_mb": round(idle, 1), "peak_mb": round(peak, 1)}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-n", type=int, default=1000, help="messages for throughput")
    parser.add_argument("--articles", type=int, default=1_000_000)
    parser.add_argument("--only", choices=("throughput", "lookups", "memory"))
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    cluster = start_postgres(fsync=True)
    result: dict[str, Any] = {}
    try:
        with tempfile.TemporaryDirectory() as folder:
            tmp = Path(folder)
            for name, part in (
                ("throughput_msgs_per_s", lambda: bench_throughput(args.n, cluster, tmp)),
                ("lookups", lambda: bench_lookups(args.articles, cluster, tmp)),
                ("memory", lambda: bench_memory(cluster, tmp)),
            ):
                if args.only in (None, name.split("_")[0]):
                    result[name] = part()
                    print(f"{name}: {json.dumps(result[name])}", file=sys.stderr, flush=True)
    finally:
        cluster.destroy()
    print(json.dumps(result, indent=None if args.json else 2))


if __name__ == "__main__":
    main()
