"""Throughput and latency of `mailgate run` over SMTP, next to the pipe and the floor.

    .venv/bin/python bench/smtp.py [-n 500] [--json]

Each variant gets a fresh installation and the same N messages (the mix of
bench/ingest.py: 40 organisations, about 30 % threaded replies):

- floor: the parser plus one SQLite commit per message (bench/ingest.py);
- pipe: `mailgate ingest --mbox`, sending its acks to the relay afterwards,
  so it does the same total work as the daemon;
- smtp x1 and smtp x8: `mailgate run` fed by 1 and 8 parallel connections,
  as fast as they can (saturation: the outbox queue grows, so the 250->ack
  latency there measures the backlog, not the wake-up);
- smtp paced: one connection offering `--rate` messages/s (default 5), well
  below saturation: the 250->ack latency of a normal day.

Latencies: from the end of DATA to the `250` (what a sending MTA waits), and
from the `250` to the acknowledgement arriving at the relay sink (what the
customer waits). The relay is an aiosmtpd sink in this process, so both ends
are timed on the same clock.
"""

from __future__ import annotations

import argparse
import email
import email.policy
import json
import os
import signal
import smtplib
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import yaml
from aiosmtpd.controller import Controller
from ingest import ROOT, directory, floor, generate, write_mbox  # bench/ is on sys.path


class AckSink:
    """Relay sink: when did the ack answering each Message-ID arrive?"""

    def __init__(self) -> None:
        self.arrivals: dict[str, float] = {}
        self.count = 0
        self._lock = threading.Lock()

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        now = time.monotonic()
        msg = email.message_from_bytes(envelope.original_content, policy=email.policy.compat32)
        answered = (msg.get("In-Reply-To") or "").strip()
        with self._lock:
            self.count += 1
            if msg.get("Auto-Submitted") == "auto-replied" and answered:
                self.arrivals.setdefault(answered, now)
        return "250 OK"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def install(work: Path, relay_port: int, smtp_port: int) -> Path:
    settings = yaml.safe_load((ROOT / "settings.yaml").read_text())
    settings["templates_dir"] = str(ROOT / "templates")
    settings["rules_dir"] = str(ROOT / "rules")
    settings["intake"]["smtp"].update(
        {
            "port": smtp_port,
            "max_connections_per_client": 50,
            "max_messages_per_connection": 100_000,
        }  # fmt: skip
    )
    settings["outbound"]["transport"] = "smtp"
    settings["outbound"]["smtp"] = {"host": "127.0.0.1", "port": relay_port, "tls": "none"}
    work.mkdir(parents=True)
    (work / "settings.yaml").write_text(yaml.safe_dump(settings))
    (work / "directory.yaml").write_text(yaml.safe_dump(directory()))
    mailgate(work, "directory", "sync")
    return work / "settings.yaml"


def mailgate(work: Path, *args: str) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, "-m", "mailgate", "--config", str(work / "settings.yaml"), *args]
    return subprocess.run(cmd, check=True, capture_output=True, text=True, cwd=ROOT)


def run_pipe(messages: list[bytes], work: Path, relay_port: int) -> float:
    install(work, relay_port, free_port())
    write_mbox(work / "bench.mbox", messages)
    started = time.perf_counter()
    mailgate(work, "ingest", "--mbox", str(work / "bench.mbox"))  # sends its mail at the end
    return time.perf_counter() - started


def start_daemon(work: Path) -> subprocess.Popen[bytes]:
    log = (work / "daemon.log").open("wb")
    cmd = [sys.executable, "-m", "mailgate", "--config", str(work / "settings.yaml"), "run"]
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})  # fmt: skip
    deadline = time.monotonic() + 30
    while b"mailgate running" not in (work / "daemon.log").read_bytes():
        if proc.poll() is not None or time.monotonic() > deadline:
            raise SystemExit(f"daemon did not start:\n{(work / 'daemon.log').read_text()}")
        time.sleep(0.05)
    return proc


def send_all(
    port: int, messages: list[bytes], stamps: dict[str, tuple[float, float]], pace: float = 0
) -> None:
    """One connection; per message (end of DATA, 250) monotonic times by Message-ID.

    `pace`: seconds between the starts of two messages (0: as fast as possible).
    """
    with smtplib.SMTP("127.0.0.1", port, timeout=120) as client:
        client.ehlo("bench.example")
        next_start = time.monotonic()
        for raw in messages:
            time.sleep(max(0.0, next_start - time.monotonic()))
            next_start += pace
            msg = email.message_from_bytes(raw, policy=email.policy.compat32)
            sender = email.utils.parseaddr(msg["From"])[1]
            client.mail(sender)
            client.rcpt("support@example.com")
            client.putcmd("data")
            code, _ = client.getreply()
            if code != 354:
                raise SystemExit(f"DATA refused: {code}")
            payload = raw.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")
            payload = smtplib._quote_periods(payload)  # type: ignore[attr-defined]
            client.send(payload.rstrip(b"\r\n") + b"\r\n.\r\n")
            sent = time.monotonic()
            code, reply = client.getreply()
            if code != 250:
                raise SystemExit(f"unexpected reply {code} {reply!r}")
            stamps[msg["Message-ID"].strip()] = (sent, time.monotonic())


def run_smtp(
    messages: list[bytes],
    work: Path,
    sink: AckSink,
    relay_port: int,
    connections: int,
    pace: float = 0,
) -> dict[str, float]:
    port = free_port()
    install(work, relay_port, port)
    proc = start_daemon(work)
    stamps: dict[str, tuple[float, float]] = {}
    shares = [messages[i::connections] for i in range(connections)]
    threads = [
        threading.Thread(target=send_all, args=(port, share, stamps, pace)) for share in shares
    ]
    started = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - started
    expected = [mid for mid in stamps if mid in _created(work)]
    deadline = time.monotonic() + 120
    while any(mid not in sink.arrivals for mid in expected) and time.monotonic() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    proc.wait(60)
    reply_ms = [(done - sent) * 1000 for sent, done in stamps.values()]
    ack_ms = [(sink.arrivals[mid] - stamps[mid][1]) * 1000 for mid in expected
              if mid in sink.arrivals]  # fmt: skip
    return {
        "msgs_per_s": len(messages) / elapsed,
        "reply_p50_ms": _pct(reply_ms, 50),
        "reply_p99_ms": _pct(reply_ms, 99),
        "ack_p50_ms": _pct(ack_ms, 50),
        "ack_p99_ms": _pct(ack_ms, 99),
        "acks_missing": len(expected) - len(ack_ms),
    }


def _created(work: Path) -> set[str]:
    """Message-IDs (with brackets) of the mails that opened a ticket."""
    import sqlite3

    db = sqlite3.connect(work / "var" / "mailgate.db")
    rows = db.execute("SELECT message_id FROM ingest_records WHERE outcome = 'created'")
    return {f"<{mid}>" for (mid,) in rows}


def _pct(values: list[float], pct: int) -> float:
    if not values:
        return float("nan")
    if len(values) == 1:
        return values[0]
    return statistics.quantiles(values, n=100, method="inclusive")[pct - 1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-n", type=int, default=500, help="messages per variant (default 500)")
    parser.add_argument("--paced", type=int, default=100, help="messages in the paced run")
    parser.add_argument("--rate", type=float, default=5, help="paced run: messages/s offered")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    messages = generate(args.n)
    sink = AckSink()
    relay = Controller(sink, hostname="127.0.0.1", port=free_port())
    relay.start()
    try:
        with tempfile.TemporaryDirectory() as tmp:
            work = Path(tmp)
            floor_rate = args.n / floor(messages, work / "floor.db")
            pipe_rate = args.n / run_pipe(messages, work / "pipe", relay.port)
            sink.arrivals.clear()  # the pipe's acks answered the same Message-IDs
            one = run_smtp(messages, work / "smtp1", sink, relay.port, 1)
            sink.arrivals.clear()
            eight = run_smtp(messages, work / "smtp8", sink, relay.port, 8)
            sink.arrivals.clear()
            paced_messages = messages[: args.paced]
            paced = run_smtp(paced_messages, work / "paced", sink, relay.port, 1, 1 / args.rate)
    finally:
        relay.stop()
    result = {"messages": args.n, "floor_msgs_per_s": floor_rate, "pipe_msgs_per_s": pipe_rate,
              "smtp_1": one, "smtp_8": eight, "paced": paced}  # fmt: skip
    if args.json:
        print(json.dumps(result))
        return
    print(f"messages per variant     {args.n}")
    print(f"floor (parse + commit)   {floor_rate:8.1f} msg/s")
    print(f"pipe (ingest --mbox)     {pipe_rate:8.1f} msg/s   (acks sent to the relay)")
    variants = (
        ("smtp, 1 connection ", one),
        ("smtp, 8 connections", eight),
        (f"smtp, {args.rate:g} msg/s offered", paced),
    )
    for label, r in variants:
        print(
            f"{label}      {r['msgs_per_s']:8.1f} msg/s   = {r['msgs_per_s'] / pipe_rate:.0%}"
            f" of pipe; end of DATA->250 p50 {r['reply_p50_ms']:.1f} ms p99"
            f" {r['reply_p99_ms']:.1f} ms; 250->ack at relay p50 {r['ack_p50_ms']:.1f} ms"
            f" p99 {r['ack_p99_ms']:.1f} ms; acks missing {r['acks_missing']:.0f}"
        )


if __name__ == "__main__":
    main()
