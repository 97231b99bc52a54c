"""`mailgate run` as a real subprocess on loopback, for the daemon tests."""

from __future__ import annotations

import os
import signal
import smtplib
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from tests.conftest import ROOT, Clockwork, Installation, deep_update, install_at
from tests.smtp_sink import Sink, free_port


class RunningDaemon:
    def __init__(self, inst: Installation, port: int, log: Path, proc: subprocess.Popen[bytes]):
        self.inst = inst
        self.port = port
        self.log_file = log
        self.proc = proc

    def smtp(self, **kwargs: Any) -> smtplib.SMTP:
        return smtplib.SMTP("127.0.0.1", self.port, timeout=30, **kwargs)

    def log(self) -> str:
        return self.log_file.read_text(errors="replace")

    def signal(self, signum: int) -> None:
        self.proc.send_signal(signum)

    def stop(self, timeout: float = 30) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout)

    def wait_for_log(self, text: str, timeout: float = 20) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if text in self.log():
                return
            time.sleep(0.05)
        raise AssertionError(f"{text!r} not in the daemon's log:\n{self.log()}")


def start_daemon(
    root: Path,
    sink: Sink | None,
    settings: dict[str, Any] | None = None,
    directory: dict[str, Any] | None = None,
    env: dict[str, str] | None = None,
    args: tuple[str, ...] = (),
) -> RunningDaemon:
    """Install under `root` (relay: `sink`), start `mailgate run`, wait until it listens."""
    inst, port = install_daemon(root, sink, settings, directory)
    return launch(inst, port, env, args)


def install_daemon(
    root: Path,
    sink: Sink | None,
    settings: dict[str, Any] | None = None,
    directory: dict[str, Any] | None = None,
) -> tuple[Installation, int]:
    """An installation for `mailgate run` (relay: `sink`) and its SMTP port, not started."""
    port = free_port()
    base: dict[str, Any] = {"intake": {"smtp": {"port": port}}}
    if sink is not None:
        base["outbound"] = {
            "transport": "smtp",
            "smtp": {"host": "127.0.0.1", "port": sink.port, "tls": "none"},
        }
    return install_at(root, Clockwork(), deep_update(base, settings or {}), directory), port


def launch(
    inst: Installation,
    port: int,
    env: dict[str, str] | None = None,
    args: tuple[str, ...] = (),
) -> RunningDaemon:
    """Start `mailgate run [args]` on an installation (again, after a crash) and wait for it."""
    log = inst.root / "daemon.log"
    proc = subprocess.Popen(
        [sys.executable, "-m", "mailgate", "--config", str(inst.settings_file), "run", *args],
        cwd=ROOT,
        stdout=log.open("wb"),
        stderr=subprocess.STDOUT,
        env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})},
    )
    daemon = RunningDaemon(inst, port, log, proc)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        # The log first: a daemon may start and be killed (a crash point) at once.
        if "mailgate running" in daemon.log():
            return daemon
        if proc.poll() is not None:
            raise AssertionError(f"mailgate run exited {proc.returncode}:\n{daemon.log()}")
        time.sleep(0.05)
    proc.kill()
    raise AssertionError(f"mailgate run did not start:\n{daemon.log()}")


def connect_raw(port: int) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    return sock


def read_reply(sock: socket.socket) -> bytes:
    """One complete (possibly multi-line) SMTP reply, or b'' when the server closed."""
    data = b""
    while True:
        chunk = sock.recv(4096)
        if not chunk:
            return data
        data += chunk
        lines = data.split(b"\r\n")
        complete = [line for line in lines[:-1]]
        if complete and len(complete[-1]) >= 4 and complete[-1][3:4] == b" ":
            return data


def open_data(port: int) -> socket.socket:
    """A raw session from alice to support, after `354`: the test writes the DATA."""
    sock = connect_raw(port)
    assert read_reply(sock).startswith(b"220")
    steps = [
        (b"EHLO c.example", b"250"),
        (b"MAIL FROM:<alice@acme.example>", b"250"),
        (b"RCPT TO:<support@example.com>", b"250"),
        (b"DATA", b"354"),
    ]
    for command, code in steps:
        sock.sendall(command + b"\r\n")
        reply = read_reply(sock)
        assert reply.startswith(code), (command, reply)
    return sock
