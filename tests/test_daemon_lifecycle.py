"""How `mailgate run` talks to systemd and to operators: notify, reload, bad settings."""

from __future__ import annotations

import email.policy
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from mailgate.cli import EX_CONFIG, EX_TEMPFAIL
from tests.conftest import ROOT, Clockwork, install_at, make_mail
from tests.daemon import open_data, read_reply, start_daemon
from tests.smtp_sink import Sink, free_port


def notifications(sock: socket.socket, until: str, timeout: float = 15) -> list[str]:
    """Datagrams from the daemon until one contains `until`."""
    got: list[str] = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        sock.settimeout(max(0.1, deadline - time.monotonic()))
        try:
            got.extend(sock.recv(4096).decode().split("\n"))
        except TimeoutError:
            break
        if any(until in line for line in got):
            return got
    raise AssertionError(f"no {until!r} from the daemon; got {got}")


def test_ready_status_watchdog_and_stopping_reach_the_notify_socket(
    tmp_path: Path, sink: Sink
) -> None:
    path = tmp_path / "notify.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(str(path))
        daemon = start_daemon(
            tmp_path, sink, env={"NOTIFY_SOCKET": str(path), "WATCHDOG_USEC": "1000000"}
        )
        try:
            got = notifications(sock, "READY=1")
            got += notifications(sock, "STATUS=serving (leader); 0 message(s) via SMTP")
            got += notifications(sock, "WATCHDOG=1")
            got += notifications(sock, "WATCHDOG=1")  # again: pinged from the running loop
            asked = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
            daemon.signal(signal.SIGHUP)
            reload = notifications(sock, "RELOADING=1")
            # systemd (Type=notify-reload) matches the reload by when it started.
            started = next(int(line.split("=")[1]) for line in reload if "MONOTONIC_USEC" in line)
            assert asked <= started <= time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
            got += reload + notifications(sock, "READY=1")  # the reload is done
        finally:
            daemon.signal(signal.SIGTERM)
            got += notifications(sock, "STOPPING=1")
            assert daemon.proc.wait(30) == 0
    assert got.index("READY=1") < max(i for i, line in enumerate(got) if line == "STOPPING=1")


def test_invalid_settings_refuse_to_start_with_one_line_errors(tmp_path: Path) -> None:
    inst = install_at(tmp_path, Clockwork())
    data = yaml.safe_load(inst.settings_file.read_text())
    data["intake"]["smtp"]["port"] = "twenty-five"
    data["intake"]["smtp"]["max_recipent"] = 5
    inst.settings_file.write_text(yaml.safe_dump(data))
    proc = subprocess.run(
        [sys.executable, "-m", "mailgate", "--config", str(inst.settings_file), "run"],
        cwd=ROOT, capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    assert proc.returncode == EX_CONFIG  # systemd does not restart it (RestartPreventExitStatus)
    lines = proc.stderr.strip().splitlines()
    assert "Traceback" not in proc.stderr
    assert any("intake.smtp.port" in line and "settings.yaml" in line for line in lines)
    assert any("intake.smtp.max_recipent" in line for line in lines)


def run_briefly(settings_file: Path) -> subprocess.CompletedProcess[str]:
    """`mailgate run` expected to refuse to start (a timeout here: it started)."""
    return subprocess.run(
        [sys.executable, "-m", "mailgate", "--config", str(settings_file), "run"],
        cwd=ROOT, capture_output=True, text=True, timeout=30,
    )  # fmt: skip


def errors(proc: subprocess.CompletedProcess[str]) -> list[str]:
    """The `error:` lines of a daemon that exited 78, as ConfigError makes it (systemd:
    failed, and not restarted)."""
    assert "Traceback" not in proc.stderr, proc.stderr
    assert proc.returncode == EX_CONFIG, proc.stderr
    return [line for line in proc.stderr.splitlines() if line.startswith("error:")]


def test_a_database_not_up_yet_exits_75_so_systemd_starts_it_again(tmp_path: Path) -> None:
    """Unlike a bad setting: PostgreSQL may come up a little later than we do."""
    with socket.socket() as closed:  # a port nothing listens on
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]
    url = f"postgresql://mailgate@127.0.0.1:{port}/mailgate"
    inst = install_at(tmp_path, Clockwork())
    data = yaml.safe_load(inst.settings_file.read_text())
    data["database_url"] = url
    inst.settings_file.write_text(yaml.safe_dump(data))
    proc = run_briefly(inst.settings_file)
    assert proc.returncode == EX_TEMPFAIL, proc.stderr
    assert "Traceback" not in proc.stderr
    [line] = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert line.startswith("error: database unavailable: ") and str(port) in line, line


def test_a_missing_smtp_users_file_refuses_to_start_with_one_line(
    tmp_path: Path, certificate: tuple[Path, Path]
) -> None:
    users, (cert, key) = tmp_path / "smtp-users", certificate
    inst = install_at(tmp_path, Clockwork(), {"intake": {"smtp": {
        "port": free_port(), "auth_users_file": str(users),
        "tls_cert_file": str(cert), "tls_key_file": str(key)}}})  # fmt: skip
    assert errors(run_briefly(inst.settings_file)) == [
        f"error: {inst.settings_file}: intake.smtp.auth_users_file: {users} not found (create "
        "it with one user:password line per client, or remove the key for no AUTH)"
    ]


@pytest.mark.parametrize("key", ["intake.smtp.port", "metrics.port"])
def test_a_port_in_use_refuses_to_start_with_one_line(tmp_path: Path, key: str) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        settings: dict = {"intake": {"smtp": {"port": port}}}
        if key == "metrics.port":
            settings = {"intake": {"smtp": {"port": free_port()}},
                        "metrics": {"enabled": True, "port": port}}  # fmt: skip
        inst = install_at(tmp_path, Clockwork(), settings)
        proc = run_briefly(inst.settings_file)
    assert errors(proc) == [
        f"error: {inst.settings_file}: {key}: 127.0.0.1:{port} already in use (another "
        "mailgate or an MTA listens there: stop it, or choose another port)"
    ]


def test_sigterm_says_421_to_an_open_session(tmp_path: Path, sink: Sink) -> None:
    daemon = start_daemon(tmp_path, sink)
    sock = socket.create_connection(("127.0.0.1", daemon.port), timeout=10)
    assert read_reply(sock).startswith(b"220")
    daemon.signal(signal.SIGTERM)
    assert read_reply(sock).startswith(b"421 4.3.2")
    sock.close()
    assert daemon.proc.wait(30) == 0


def test_sighup_keeps_an_open_session_going(tmp_path: Path, sink: Sink) -> None:
    daemon = start_daemon(tmp_path, sink)
    try:
        raw = make_mail(subject="half way").as_bytes(policy=email.policy.SMTP)
        sock = open_data(daemon.port)
        sock.sendall(raw[:200])
        daemon.signal(signal.SIGHUP)
        daemon.wait_for_log("reloaded settings")
        sock.sendall(raw[200:] + b".\r\n")
        assert read_reply(sock).startswith(b"250 2.0.0 Ok: created")
        sock.close()
    finally:
        daemon.stop()


@pytest.mark.slow
def test_sighup_while_the_database_is_busy_keeps_smtp_answering(tmp_path: Path, sink: Sink) -> None:
    """A reload syncs a changed directory into the database. With its writer
    held elsewhere (a backup, a long command), the reload waited the busy
    timeout (10 s) on the event loop: no greeting, no reply to a session in
    progress, no watchdog ping; then a traceback. The listener answers at
    once, the log says in one line why the reload was refused, and a later
    SIGHUP applies the change."""
    daemon = start_daemon(tmp_path, sink)
    try:
        directory = tmp_path / "directory.yaml"
        data = yaml.safe_load(directory.read_text())
        data["organisations"][0]["contacts"].append(
            {"email": "dave@acme.example", "name": "Dave", "role": "admin"}
        )
        directory.write_text(yaml.safe_dump(data))
        db = sqlite3.connect(tmp_path / "var" / "mailgate.db", isolation_level=None)
        db.execute("BEGIN EXCLUSIVE")
        try:
            daemon.signal(signal.SIGHUP)
            time.sleep(0.5)  # the reload is waiting for the database now
            started = time.monotonic()
            with daemon.smtp() as client:
                assert client.noop()[0] == 250
            assert time.monotonic() - started < 2
            daemon.wait_for_log("reload refused")
        finally:
            db.execute("ROLLBACK")
            db.close()
        log = daemon.log()
        assert (
            "reload refused, still running the previous configuration: database unavailable: "
            "database is locked; send SIGHUP again once it is available"
        ) in log
        assert "Traceback" not in log
        daemon.signal(signal.SIGHUP)
        daemon.wait_for_log("reloaded settings")
        mail = make_mail(sender="dave@acme.example", message_id="dave@acme.example")
        with daemon.smtp() as client:  # the new admin may open tickets now
            client.ehlo()
            client.mail("dave@acme.example")
            client.rcpt("support@example.com")
            code, reply = client.data(mail.as_bytes(policy=email.policy.SMTP))
        assert code == 250 and b"created" in reply, reply
    finally:
        daemon.stop()


def test_sigterm_during_scheduled_jobs_lets_them_finish(tmp_path: Path, sink: Sink) -> None:
    """Jobs in progress when the daemon stops (a sweep, the status line's count)
    wait for the database and then finish; the scheduler's shutdown must not cancel
    them into a traceback (seen twice in CI: a sweep, then housekeeping)."""
    daemon = start_daemon(tmp_path, sink, {"sla": {"sweep_seconds": 1}})
    db = sqlite3.connect(tmp_path / "var" / "mailgate.db", timeout=10)
    db.execute("BEGIN IMMEDIATE")  # every sweep now waits for the database
    time.sleep(2.5)  # the next SLA sweep has started and waits
    daemon.signal(signal.SIGTERM)
    time.sleep(1)
    assert daemon.proc.poll() is None, "stopped while its sweep was still running"
    db.rollback()
    db.close()
    assert daemon.proc.wait(30) == 0
    log = daemon.log()
    assert "Traceback" not in log and "stopped" in log, log


def test_sighup_keeps_the_checked_templates_until_a_good_edit(tmp_path: Path, sink: Sink) -> None:
    """The daemon sends what it checked at start or at the last reload: a template
    broken on disk changes nothing (no 451 for new mail), a reload refuses it and
    the old templates keep serving, and a good edit takes effect at the reload."""
    templates = tmp_path / "templates"
    shutil.copytree(ROOT / "templates", templates)
    ack = templates / "fr" / "ack.txt.j2"
    shipped = ack.read_text(encoding="utf-8")
    daemon = start_daemon(tmp_path / "inst", sink, {"templates_dir": str(templates)})

    def acknowledgement(subject: str) -> str:
        """The text of the ack that a new mail with this subject gets at the relay."""
        mail = make_mail(subject=subject, message_id=f"{subject}@acme.example")
        with daemon.smtp() as client:  # a 451 would raise SMTPDataError
            client.sendmail("alice@acme.example", ["support@example.com"], mail.as_bytes())
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            for received in list(sink.received):
                message = received.message
                if received.rcpt_tos == ("alice@acme.example",) and subject in message["Subject"]:
                    return message.get_body(("plain",)).get_content()
            time.sleep(0.05)
        raise AssertionError(f"no ack for {subject!r} at the relay")

    try:
        ack.write_text("Bonjour {{ requester_name }\n", encoding="utf-8")  # broken, no reload yet
        assert "Merci de nous avoir contactés." in acknowledgement("first")

        daemon.signal(signal.SIGHUP)
        daemon.wait_for_log("reload refused")
        assert f"{ack}:1: unexpected '}}'" in daemon.log()
        assert "Merci de nous avoir contactés." in acknowledgement("second")

        edited = shipped.replace("Merci de nous avoir contactés.", "Merci de votre mail.")
        ack.write_text(edited, encoding="utf-8")
        daemon.signal(signal.SIGHUP)
        daemon.wait_for_log("reloaded settings")
        assert "Merci de votre mail." in acknowledgement("third")
    finally:
        daemon.stop()


def test_a_reload_turns_the_retention_sweep_on_and_off(tmp_path: Path, sink: Sink) -> None:
    """The sweeps follow the settings at a reload. `retention.enabled` was read
    once at start: an operator who set it to false (a legal hold) and reloaded
    still had the hourly run deleting, until a restart."""
    from datetime import UTC, datetime, timedelta

    from sqlalchemy import func, select

    from mailgate.store.models import IngestRecord

    daemon = start_daemon(tmp_path, sink, {"retention": {"enabled": False}})
    settings_file = daemon.inst.settings_file
    try:
        # A stranger's mail rejected 40 days ago: past retention.quarantine_days (30).
        daemon.inst.clock.now = datetime.now(UTC) - timedelta(days=40)
        stranger = make_mail(sender="Mallory <mallory@evil.example>", message_id="m@evil.example")
        assert daemon.inst.ingest(stranger).outcome == "rejected"

        def records() -> int:
            with daemon.inst.session() as s:
                return s.scalar(select(func.count()).select_from(IngestRecord)) or 0

        assert records() == 1
        settings = yaml.safe_load(settings_file.read_text())
        settings["retention"]["enabled"] = True
        settings_file.write_text(yaml.safe_dump(settings))
        daemon.signal(signal.SIGHUP)
        daemon.wait_for_log("sweeps: retention every 3600 s")
        deadline = time.monotonic() + 15
        while records() and time.monotonic() < deadline:
            time.sleep(0.1)
        assert records() == 0  # the run a reload turned on, at once

        settings["retention"]["enabled"] = False
        settings_file.write_text(yaml.safe_dump(settings))
        daemon.signal(signal.SIGHUP)
        daemon.wait_for_log("sweeps: retention off")
    finally:
        daemon.stop()
