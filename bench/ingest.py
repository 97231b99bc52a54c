"""Throughput of `mailgate ingest --mbox` against its cost floor, measured in one run.

    .venv/bin/python bench/ingest.py [-n 2000] [--json] [--breakdown]

The workload: N realistic messages from the admins of 40 organisations, about
30 % of them replies (In-Reply-To/References) to earlier messages, so they
thread. The floor is the least any durable intake must do per message: the
same parser plus one SQLite commit (WAL, synchronous=FULL) per message,
nothing else. A second floor adds the fsynced, content-addressed raw mail
that every mailgate intake writes before it commits. The ratios say what
identification, threading, numbering, SLA clocks and outbound rendering cost
on top.
"""

from __future__ import annotations

import argparse
import json
import mailbox
import random
import sqlite3
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime, timedelta
from email.message import EmailMessage
from email.utils import format_datetime
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
ORGS = 40
LINES = [
    "Since this morning our users cannot log in to the portal.",
    "The nightly export failed again with error 500.",
    "Could you tell us how to configure single sign-on?",
    "Invoices generated yesterday show the wrong VAT rate.",
    "The mobile application crashes when opening a report.",
    "We would like to add two administrators to our account.",
]


def directory() -> dict:
    orgs = []
    for o in range(ORGS):
        orgs.append(
            {
                "id": f"org{o}",
                "name": f"Organisation {o}",
                "plan": "pro",
                "contract_until": "2099-12-31",
                "language": ["fr", "en", "es"][o % 3],
                "timezone": "Europe/Brussels",
                "contacts": [
                    {"email": f"admin{c}@org{o}.example", "name": f"Admin {c}", "role": "admin"}
                    for c in range(3)
                ],
            }
        )
    return {"organisations": orgs, "staff": [{"email": "bob@support.example", "name": "Bob"}]}


def generate(n: int, seed: int = 7) -> list[bytes]:
    rng = random.Random(seed)
    start = datetime(2026, 11, 23, 8, 0, tzinfo=UTC)
    sent: list[tuple[str, str, str]] = []  # (message-id, sender, subject)
    out = []
    for i in range(n):
        msg = EmailMessage()
        if sent and rng.random() < 0.3:
            parent_id, sender, subject = rng.choice(sent)
            msg["Subject"] = f"Re: {subject}"
            msg["In-Reply-To"] = parent_id
            msg["References"] = parent_id
        else:
            o, c = rng.randrange(ORGS), rng.randrange(3)
            sender = f"admin{c}@org{o}.example"
            subject = f"{rng.choice(LINES)[:40]} #{i}"
            msg["Subject"] = subject
        mid = f"<bench-{i}@{sender.split('@')[1]}>"
        msg["From"] = f"Admin <{sender}>"
        msg["To"] = "support@example.com"
        msg["Date"] = format_datetime(start + timedelta(seconds=17 * i))
        msg["Message-ID"] = mid
        body = "\n\n".join(rng.choice(LINES) for _ in range(rng.randint(2, 8)))
        msg.set_content(f"Hello,\n\n{body}\n\nRegards,\n{sender}\n")
        if rng.random() < 0.2:
            msg.add_alternative(f"<p>Hello,</p><p>{body}</p>", subtype="html")
        sent.append((mid, sender, subject))
        out.append(msg.as_bytes())
    return out


def write_mbox(path: Path, messages: list[bytes]) -> None:
    box = mailbox.mbox(path)
    box.lock()
    for raw in messages:
        box.add(raw)
    box.flush()
    box.unlock()


def floor(messages: list[bytes], db: Path, blobs: Path | None = None) -> float:
    """Same parser, one durable SQLite commit per message, nothing else.

    With `blobs`, the durable floor: also what issue item 3 requires of every
    intake, the raw mail written there and fsynced (content-addressed, as
    mailgate stores it) before the commit that refers to it.
    """
    from mailgate.pipeline.parse import parse_message
    from mailgate.store.blobs import BlobStore

    store = BlobStore(blobs) if blobs else None
    conn = sqlite3.connect(db, isolation_level=None)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=FULL")
    conn.execute("CREATE TABLE m (id INTEGER PRIMARY KEY, message_id TEXT, raw BLOB)")
    started = time.perf_counter()
    for raw in messages:
        parsed = parse_message(raw)
        kept = store.put(raw).encode() if store else raw  # the digest, or the bytes themselves
        conn.execute("BEGIN IMMEDIATE")
        conn.execute("INSERT INTO m (message_id, raw) VALUES (?, ?)", (parsed.message_id, kept))
        conn.execute("COMMIT")
    return time.perf_counter() - started


def ingest_settings(workdir: Path) -> Path:
    """The shipped settings, with this benchmark's directory, in `workdir`."""
    settings = yaml.safe_load((ROOT / "settings.yaml").read_text())
    settings["templates_dir"] = str(ROOT / "templates")
    settings["rules_dir"] = str(ROOT / "rules")
    (workdir / "settings.yaml").write_text(yaml.safe_dump(settings))
    (workdir / "directory.yaml").write_text(yaml.safe_dump(directory()))
    return workdir / "settings.yaml"


def ingest(messages: list[bytes], workdir: Path) -> tuple[float, dict[str, int]]:
    settings = ingest_settings(workdir)
    box = workdir / "bench.mbox"
    write_mbox(box, messages)
    mailgate = [sys.executable, "-m", "mailgate", "--config", str(settings)]
    # Migrate and sync the directory first: a one-off cost, not per message.
    subprocess.run([*mailgate, "directory", "sync"], check=True, capture_output=True)
    started = time.perf_counter()
    proc = subprocess.run(
        [*mailgate, "ingest", "--mbox", "--no-send", "--json", str(box)],
        check=True,
        capture_output=True,
        text=True,
    )
    elapsed = time.perf_counter() - started
    outcomes: dict[str, int] = {}
    for line in proc.stdout.splitlines():
        outcome = json.loads(line)["outcome"]
        outcomes[outcome] = outcomes.get(outcome, 0) + 1
    return elapsed, outcomes


def breakdown(messages: list[bytes], workdir: Path) -> dict[str, float]:
    """The same ingest in this process, with two costs timed: parsing, and
    composing the outbound MIME mail that DESIGN.md renders at enqueue time.
    In milliseconds per message, next to the whole."""
    import contextlib
    import io

    import mailgate.outbound.mailer as mailer
    import mailgate.pipeline.process as process
    from mailgate.cli import main as mailgate_main

    spent = {"parse": 0.0, "compose": 0.0}

    def timed(module: object, name: str, key: str) -> None:
        original = getattr(module, name)

        def wrapper(*args: object, **kwargs: object) -> object:
            started = time.perf_counter()
            try:
                return original(*args, **kwargs)
            finally:
                spent[key] += time.perf_counter() - started

        setattr(module, name, wrapper)

    timed(process, "parse_message", "parse")
    timed(mailer, "build_message", "compose")
    settings = ingest_settings(workdir)
    box = workdir / "bench.mbox"
    write_mbox(box, messages)
    config = ["--config", str(settings)]
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        mailgate_main([*config, "directory", "sync"])
        started = time.perf_counter()
        mailgate_main([*config, "ingest", "--mbox", "--no-send", "--json", str(box)])
        whole = time.perf_counter() - started
    per_message = {key: 1000 * value / len(messages) for key, value in spent.items()}
    return {"whole": 1000 * whole / len(messages), **per_message}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-n", type=int, default=2000, help="messages (default 2000)")
    parser.add_argument("--json", action="store_true")
    parser.add_argument(
        "--breakdown",
        action="store_true",
        help="then ingest again in this process, timing parsing and MIME composing",
    )
    args = parser.parse_args()
    messages = generate(args.n)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        floor_s = floor(messages, work / "floor.db")
        durable_s = floor(messages, work / "durable.db", blobs=work / "blobs")
        ingest_s, outcomes = ingest(messages, work)
        if args.breakdown:
            (work / "again").mkdir()
            costs = breakdown(messages, work / "again")
    result = {
        "messages": args.n,
        "floor_msgs_per_s": round(args.n / floor_s, 1),
        "durable_floor_msgs_per_s": round(args.n / durable_s, 1),
        "ingest_msgs_per_s": round(args.n / ingest_s, 1),
        "ratio": round(floor_s / ingest_s, 3),
        "ratio_to_durable_floor": round(durable_s / ingest_s, 3),
        "outcomes": outcomes,
    }
    if args.breakdown:
        # What half the floor leaves per message, against what two costs take.
        result["half_floor_ms_per_msg"] = round(2000 * floor_s / args.n, 2)
        result["breakdown_ms_per_msg"] = {key: round(ms, 2) for key, ms in costs.items()}
    if args.json:
        print(json.dumps(result))
        return
    print(f"messages                 {args.n}  outcomes {outcomes}")
    print(f"floor (parse + commit)   {result['floor_msgs_per_s']:8.1f} msg/s")
    print(f"  + fsynced raw blob     {result['durable_floor_msgs_per_s']:8.1f} msg/s")
    print(
        f"mailgate ingest --mbox   {result['ingest_msgs_per_s']:8.1f} msg/s"
        f"   = {result['ratio']:.0%} of the floor (target >= 50 %),"
        f" {result['ratio_to_durable_floor']:.0%} of the durable floor"
    )
    if args.breakdown:
        ms = result["breakdown_ms_per_msg"]
        print(
            f"per message: half the floor allows {result['half_floor_ms_per_msg']:.2f} ms;"
            f" in-process ingest takes {ms['whole']:.2f} ms, of which parsing"
            f" {ms['parse']:.2f} ms and composing the outbound MIME mail {ms['compose']:.2f} ms"
        )


if __name__ == "__main__":
    main()
