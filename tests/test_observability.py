"""Logs (text and JSON) and the Prometheus endpoint."""

from __future__ import annotations

import json
import logging
import re
import signal
import smtplib
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from datetime import datetime, timedelta
from pathlib import Path

import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from mailgate.config import ConfigError, load_settings, settings_from_mapping
from mailgate.observability import Metrics, setup_logging
from tests.conftest import NOW, ROOT, Installation, make_mail
from tests.smtp_sink import free_port

DECIDED = {"outcome": "created", "reason": "new ticket", "ticket": "SUP-2026-000001",
           "message_id": "<req-1@acme.example>", "ingest_id": 1, "ms": 12.5}  # fmt: skip


# -- logs ----------------------------------------------------------------------


def test_json_lines_carry_the_structured_fields(capsys: pytest.CaptureFixture[str]) -> None:
    setup_logging("json")
    log = logging.getLogger("mailgate.pipeline")
    log.warning("message decided", extra={"mailgate": DECIDED})
    log.warning("two\nlines %s", "here", extra={"mailgate": {"message": "clash", "level": 1}})
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 2
    first, second = (json.loads(line) for line in lines)
    assert first == {"ts": first["ts"], "level": "WARNING", "logger": "mailgate.pipeline",
                     "message": "message decided", **DECIDED}  # fmt: skip
    ts = datetime.fromisoformat(first["ts"])
    assert ts.utcoffset() == timedelta(0)
    assert abs((datetime.now(ts.tzinfo) - ts).total_seconds()) < 60
    # A field never hides a base key; a newline never splits a record.
    assert second["message"] == "two\nlines here"
    assert (second["mailgate_message"], second["mailgate_level"]) == ("clash", 1)
    assert second["level"] == "WARNING"


def test_json_keeps_the_traceback_in_the_record(capsys: pytest.CaptureFixture[str]) -> None:
    setup_logging("json")
    try:
        raise RuntimeError("boom")
    except RuntimeError:
        logging.getLogger("mailgate").exception("failed")
    (line,) = capsys.readouterr().err.splitlines()
    record = json.loads(line)
    assert record["level"] == "ERROR" and "RuntimeError: boom" in record["exc"]


def test_text_appends_the_fields_as_key_value(capsys: pytest.CaptureFixture[str]) -> None:
    setup_logging("text")
    logging.getLogger("mailgate.pipeline").warning(
        "message decided", extra={"mailgate": {**DECIDED, "reason": "sender not in the directory",
                                               "to": ["a@x.example", "b@x.example"],
                                               "matched_by": None}},
    )  # fmt: skip
    logging.getLogger("mailgate").warning("no fields")
    first, second = capsys.readouterr().err.splitlines()
    assert " WARNING mailgate.pipeline: message decided outcome=created " in first
    assert 'reason="sender not in the directory"' in first
    assert "ticket=SUP-2026-000001 message_id=<req-1@acme.example> ingest_id=1 ms=12.5" in first
    # Addresses as keyed hashes (tests/test_privacy.py); the Message-ID as it is.
    assert re.search(r" to=addr:[0-9a-f]{12},addr:[0-9a-f]{12} matched_by=-$", first)
    assert second.endswith(" WARNING mailgate: no fields")


def test_levels_and_repeated_setup(capsys: pytest.CaptureFixture[str]) -> None:
    log = logging.getLogger("mailgate.test")
    setup_logging("text")
    log.info("hidden")
    setup_logging("text", level=logging.INFO)  # replaces the first handler
    log.info("shown once")
    log.debug("hidden too")
    assert logging.getLogger("apscheduler").getEffectiveLevel() == logging.WARNING
    setup_logging("json", verbose=True)
    log.debug("debug")
    assert logging.getLogger("apscheduler").getEffectiveLevel() == logging.DEBUG
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 2
    assert lines[0].endswith("mailgate.test: shown once")
    assert json.loads(lines[1])["message"] == "debug"
    with pytest.raises(ValueError, match="xml"):
        setup_logging("xml")


def test_ingest_verbose_logs_the_decision(
    inst: Installation, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    mail = tmp_path / "first.eml"
    mail.write_bytes(bytes(make_mail()))
    assert inst.cli("-v", "ingest", "--no-send", str(mail)) == 0
    out, err = capsys.readouterr()
    assert out.strip().endswith(
        "created SUP-2026-000001 new ticket; priority P1 by rule 'critical outage'"
    )
    decided = [line for line in err.splitlines() if "message decided" in line]
    assert len(decided) == 1
    assert "outcome=created" in decided[0] and "ticket=SUP-2026-000001" in decided[0]

    # Without -v a one-shot command keeps stderr for problems.
    again = tmp_path / "second.eml"
    again.write_bytes(bytes(make_mail(message_id="req-2@acme.example", body="Another.\n")))
    assert inst.cli("ingest", "--no-send", str(again)) == 0
    out, err = capsys.readouterr()
    assert "created SUP-2026-000002" in out
    assert err == ""


def test_daemon_json_log_is_one_object_per_line(inst: Installation) -> None:
    port = free_port()
    settings = yaml.safe_load(inst.settings_file.read_text())
    settings["intake"]["smtp"]["port"] = port
    inst.settings_file.write_text(yaml.safe_dump(settings))
    log = inst.root / "daemon.log"
    proc = subprocess.Popen(
        [sys.executable, "-m", "mailgate", "--config", str(inst.settings_file), "run",
         "--log-format", "json"],
        cwd=ROOT, stdout=subprocess.DEVNULL, stderr=log.open("wb"),
    )  # fmt: skip
    try:
        wait_for(lambda: "mailgate running" in log.read_text(), proc, log)
        with smtplib.SMTP("127.0.0.1", port, timeout=30) as client:
            client.sendmail("alice@acme.example", ["support@example.com"], bytes(make_mail()))
        wait_for(lambda: "message decided" in log.read_text(), proc, log)
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
    records = [json.loads(line) for line in log.read_text().splitlines()]
    assert all({"ts", "level", "logger", "message"} <= r.keys() for r in records)
    [decided] = [r for r in records if r["message"] == "message decided"]
    assert decided["outcome"] == "created" and re.fullmatch(r"SUP-\d{4}-000001", decided["ticket"])
    assert decided["level"] == "INFO" and decided["logger"] == "mailgate.pipeline"


def wait_for(condition: Callable[[], bool], proc: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + 20
    while not condition():
        if proc.poll() is not None or time.monotonic() > deadline:
            raise AssertionError(f"mailgate run (exit {proc.poll()}):\n{log.read_text()}")
        time.sleep(0.05)


# -- metrics -------------------------------------------------------------------


def scrape(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        assert response.status == 200
        text = response.read().decode()
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


@pytest.fixture
def metrics() -> Iterator[Metrics]:
    metrics = Metrics()
    yield metrics
    metrics.stop()


def test_metrics_endpoint_reports_decisions_and_the_outbox(
    inst: Installation, metrics: Metrics
) -> None:
    port = metrics.start("127.0.0.1", 0)
    values = scrape(port)
    assert values[("mailgate_messages_total", (("outcome", "created"),))] == 0
    assert values[("mailgate_outbox_depth", ())] == 0

    results = [inst.ingest(make_mail()),
               inst.ingest(make_mail(sender="stranger@elsewhere.example",
                                     message_id="x-1@elsewhere.example"))]  # fmt: skip
    assert [r.outcome for r in results] == ["created", "rejected"]
    for result in results:
        metrics.observe_decision(result.outcome)
    metrics.observe_decision("created")
    metrics.observe_send_failure("retry")
    with inst.session() as session:
        metrics.refresh(session, NOW + timedelta(seconds=90))

    values = scrape(port)
    assert values[("mailgate_messages_total", (("outcome", "created"),))] == 2
    assert values[("mailgate_messages_total", (("outcome", "rejected"),))] == 1
    assert values[("mailgate_messages_total", (("outcome", "duplicate"),))] == 0
    assert values[("mailgate_outbound_send_failures_total", (("kind", "retry"),))] == 1
    assert values[("mailgate_outbound_send_failures_total", (("kind", "dead"),))] == 0
    # ack + staff notice for the ticket, one rejection notice: all queued at NOW
    assert values[("mailgate_outbox_depth", ())] == 3
    assert values[("mailgate_outbox_oldest_queued_seconds", ())] == 90

    assert len(inst.sent()) == 3
    with inst.session() as session:
        metrics.refresh(session, NOW + timedelta(seconds=120))
    values = scrape(port)
    assert values[("mailgate_outbox_depth", ())] == 0
    assert values[("mailgate_outbox_oldest_queued_seconds", ())] == 0


def test_log_handler_counts_what_pipeline_and_outbox_log(
    install: Callable[..., Installation], metrics: Metrics
) -> None:
    # A relay that is not there: every attempt is a temporary failure.
    inst = install({"outbound": {"transport": "smtp", "smtp": {"port": free_port()}}})
    mailgate_log = logging.getLogger("mailgate")
    mailgate_log.setLevel(logging.INFO)
    mailgate_log.addHandler(metrics.log_handler())
    inst.ingest(make_mail())
    inst.ingest(make_mail())  # delivered again
    inst.ingest(make_mail(headers={"Auto-Submitted": "auto-replied"}, message_id="ooo@acme"))
    assert inst.send_outbox() == 2  # ack and staff notice, both deferred

    def value(name: str, **labels: str) -> float | None:
        return metrics.registry.get_sample_value(name, labels)

    assert value("mailgate_messages_total", outcome="created") == 1
    assert value("mailgate_messages_total", outcome="duplicate") == 1
    assert value("mailgate_messages_total", outcome="ignored") == 1
    assert value("mailgate_outbound_send_failures_total", kind="retry") == 2
    assert value("mailgate_outbound_send_failures_total", kind="failed") == 0


def test_metrics_registries_are_private(metrics: Metrics) -> None:
    import prometheus_client

    other = Metrics()  # a second instance (e.g. in a test) does not collide
    other.observe_decision("created")
    assert b'mailgate_messages_total{outcome="created"} 0.0' in metrics.render()
    # Every outcome is there from the start, staff command mails included.
    assert b'mailgate_messages_total{outcome="command"} 0.0' in metrics.render()
    assert prometheus_client.REGISTRY.get_sample_value("mailgate_outbox_depth") is None
    port = metrics.start("127.0.0.1", 0)
    with pytest.raises(RuntimeError):
        metrics.start("127.0.0.1", 0)
    with pytest.raises(OSError):
        Metrics().start("127.0.0.1", port)  # the address is taken: the daemon says so
    metrics.stop()
    metrics.stop()  # idempotent


def test_metrics_settings(tmp_path: Path) -> None:
    shipped = load_settings(Path(__file__).resolve().parents[1] / "settings.yaml")
    assert (shipped.metrics.enabled, shipped.metrics.host, shipped.metrics.port) == (
        False, "127.0.0.1", 9464)  # fmt: skip
    on = settings_from_mapping({"metrics": {"enabled": True, "port": 9100}}, source="s.yaml",
                               base_dir=tmp_path)  # fmt: skip
    assert (on.metrics.enabled, on.metrics.host, on.metrics.port) == (True, "127.0.0.1", 9100)
    with pytest.raises(ConfigError) as err:
        settings_from_mapping({"metrics": {"enable": True, "port": 70000}}, source="s.yaml",
                              base_dir=tmp_path)  # fmt: skip
    assert sorted(err.value.problems) == [
        "s.yaml: metrics.enable: unknown key (remove it or check its spelling)",
        "s.yaml: metrics.port: Input should be less than or equal to 65535",
    ]
