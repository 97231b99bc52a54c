"""Priority rules in the pipeline and for the operator: tickets, `rules test`, check, reload."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import yaml
from sqlalchemy import select

from mailgate.cli import EX_CONFIG
from mailgate.store.models import IngestRecord, Ticket, TicketEvent
from tests.conftest import ROOT, Installation, make_mail
from tests.daemon import RunningDaemon, start_daemon
from tests.smtp_sink import Sink

RULES = """\
rules:
  - name: outage
    when: {text: ["service down", "panne générale"]}
    then: {priority: P1, tags: [outage]}
  - name: urgent subject
    when: {subject_regex: "^\\\\[urgent\\\\]"}
    then: {urgent: true}
  - name: big customers to level 2
    when: {plan: [enterprise]}
    then: {level: L2, priority: P2}
"""
BROKEN = "rules:\n  - name: oops\n    when: {colour: red}\n    then: {priority: P1}\n"


@pytest.fixture
def ruled(install: Callable[..., Installation], tmp_path: Path) -> Installation:
    rules = tmp_path / "my-rules"
    rules.mkdir()
    (rules / "10-test.yaml").write_text(RULES)
    return install(settings={"rules_dir": str(rules)})


def ticket(inst: Installation) -> Ticket:
    with inst.session() as session:
        return session.scalars(select(Ticket).order_by(Ticket.id.desc())).first()  # type: ignore[return-value]


def cli(inst: Installation, *args: str, stdin: bytes | None = None) -> subprocess.CompletedProcess:  # type: ignore[type-arg]
    return subprocess.run(
        [sys.executable, "-m", "mailgate", "--config", str(inst.settings_file), *args],
        capture_output=True, input=stdin, cwd=ROOT,
    )  # fmt: skip


def test_a_rule_sets_priority_and_the_reason_is_recorded(ruled: Installation) -> None:
    result = ruled.ingest(make_mail(subject="[URGENT] Panne GENERALE du portail"))
    assert result.outcome == "created"
    assert "priority P1 by rule 'outage'" in result.reason
    t = ticket(ruled)
    assert (t.priority, t.urgent, t.tags) == ("P1", True, ["outage"])
    with ruled.session() as session:
        (event,) = session.scalars(select(TicketEvent))
    assert (event.field, event.new, event.actor_kind) == ("priority", "P1", "system")
    assert "outage" in event.reason


def test_first_rule_to_set_a_value_wins_and_later_ones_fill_the_rest(ruled: Installation) -> None:
    mail = make_mail(sender="hank@globex.example", subject="Service down since 9:00")
    assert ruled.ingest(mail).outcome == "created"
    t = ticket(ruled)
    assert (t.priority, t.level) == ("P1", "L2")  # outage set P1 first; the plan rule adds L2


@pytest.fixture
def unruled(install: Callable[..., Installation], tmp_path: Path) -> Installation:
    """No rules at all: the plan default decides (pro: P2)."""
    (tmp_path / "no-rules").mkdir()
    return install(settings={"rules_dir": str(tmp_path / "no-rules"),
                             "tickets": {"plan_priority": {"pro": "P2"}}})  # fmt: skip


def test_no_rule_gives_the_plan_default(unruled: Installation) -> None:
    inst = unruled
    inst.ingest(make_mail(subject="A question"))
    assert ticket(inst).priority == "P2"


@pytest.mark.parametrize(
    ("header", "priority", "tags"),
    [
        ({"X-Priority": "1 (Highest)"}, "P2", ["customer-high-importance"]),  # never raises
        ({"Importance": "high"}, "P2", ["customer-high-importance"]),
        ({"X-Priority": "5 (Lowest)"}, "P3", []),  # may lower what no rule set
        ({"Importance": "low"}, "P3", []),
    ],
)
def test_a_customers_importance_never_raises_the_priority(
    unruled: Installation, header: dict[str, str], priority: str, tags: list[str]
) -> None:
    inst = unruled
    inst.ingest(make_mail(subject="A question", headers=header))
    assert (ticket(inst).priority, ticket(inst).tags) == (priority, tags)


def test_importance_low_lowers_nothing_when_the_settings_ignore_it(
    install: Callable[..., Installation], tmp_path: Path
) -> None:
    (tmp_path / "no-rules").mkdir()
    inst = install(settings={"rules_dir": str(tmp_path / "no-rules"), "tickets": {
        "plan_priority": {"pro": "P2"}, "customer_priority_header": "ignore"}})  # fmt: skip
    inst.ingest(make_mail(subject="A question", headers={"Importance": "low"}))
    assert ticket(inst).priority == "P2"


def test_importance_low_does_not_lower_what_a_rule_set(ruled: Installation) -> None:
    ruled.ingest(make_mail(subject="service down", headers={"X-Priority": "5"}))
    assert ticket(ruled).priority == "P1"


def test_rules_test_prints_the_matches_in_order(ruled: Installation, tmp_path: Path) -> None:
    eml = tmp_path / "mail.eml"
    eml.write_bytes(make_mail(sender="hank@globex.example", subject="[urgent] service down")
                    .as_bytes())  # fmt: skip
    proc = cli(ruled, "rules", "test", str(eml), "--json")
    assert proc.returncode == 0, proc.stderr
    data = json.loads(proc.stdout)
    assert [m["rule"] for m in data["matched"]] == ["outage", "urgent subject",
                                                     "big customers to level 2"]  # fmt: skip
    assert data["matched"][0]["source"].endswith("10-test.yaml:2")
    assert (data["priority"], data["urgent"], data["level"]) == ("P1", True, "L2")
    text = cli(ruled, "rules", "test", str(eml)).stdout.decode()
    assert text.splitlines()[0].startswith("1. outage  (")
    assert "priority  P1" in text
    with ruled.session() as session:
        assert session.scalars(select(IngestRecord)).all() == []  # `rules test` writes nothing


def test_a_broken_rule_file_is_named_with_its_line_everywhere(
    ruled: Installation, tmp_path: Path
) -> None:
    bad = tmp_path / "my-rules" / "20-bad.yaml"
    bad.write_text(BROKEN)
    expected = f"{bad}:3: rules.0.when.colour: unknown key"
    eml = tmp_path / "mail.eml"
    eml.write_bytes(make_mail().as_bytes())

    tested = cli(ruled, "rules", "test", str(eml))
    assert tested.returncode == 1 and expected in tested.stderr.decode()
    checked = cli(ruled, "check")
    assert checked.returncode == 1 and expected in checked.stderr.decode() + checked.stdout.decode()
    # An MTA pipe gets a temporary failure: the mail is kept and retried, never lost.
    ingested = cli(ruled, "ingest", stdin=make_mail(message_id="new@acme.example").as_bytes())
    assert ingested.returncode == 75 and expected in ingested.stderr.decode()
    with ruled.session() as session:
        assert session.scalars(select(IngestRecord)).all() == []


def daemon_with_rules(tmp_path: Path, sink: Sink) -> tuple[RunningDaemon, Path]:
    """A running daemon whose rules_dir holds RULES (service down -> P1), and that folder."""
    rules = tmp_path / "my-rules"
    rules.mkdir()
    (rules / "10-test.yaml").write_text(RULES)
    (tmp_path / "inst").mkdir()
    return start_daemon(tmp_path / "inst", sink, {"rules_dir": str(rules)}), rules


def test_sighup_with_a_broken_rules_file_keeps_the_old_rules(tmp_path: Path, sink: Sink) -> None:
    daemon, rules = daemon_with_rules(tmp_path, sink)
    try:
        (rules / "10-test.yaml").write_text(BROKEN)
        daemon.signal(signal.SIGHUP)
        daemon.wait_for_log("reload refused")
        assert f"{rules / '10-test.yaml'}:3" in daemon.log()
        with daemon.smtp() as client:
            client.sendmail("alice@acme.example", ["support@example.com"],
                            make_mail(subject="service down").as_bytes())  # fmt: skip
        assert ticket(daemon.inst).priority == "P1"  # the old rules still apply

        (rules / "10-test.yaml").write_text(RULES.replace("priority: P1", "priority: P2"))
        daemon.signal(signal.SIGHUP)
        daemon.wait_for_log("reloaded settings")
        with daemon.smtp() as client:
            client.sendmail("alice@acme.example", ["support@example.com"],
                            make_mail(subject="service down", message_id="2@acme.example")
                            .as_bytes())  # fmt: skip
        assert ticket(daemon.inst).priority == "P2"  # the new rules, once they are valid
    finally:
        daemon.stop()


NO_RULES_DIR = "not found (create the folder with the rule files; an empty folder means no rules)"


def test_a_missing_rules_dir_is_named_everywhere_and_an_empty_one_means_no_rules(
    install: Callable[..., Installation], tmp_path: Path
) -> None:
    """A typo in rules_dir, or rules/ left out of a copy, gave every ticket the
    default priority without a word."""
    rules = tmp_path / "my-rules"
    inst = install(settings={"rules_dir": str(rules)})
    expected = f"error: {inst.settings_file}: rules_dir: {rules} {NO_RULES_DIR}"
    eml = tmp_path / "mail.eml"
    eml.write_bytes(make_mail(subject="service down").as_bytes())

    checked = cli(inst, "check")
    assert (checked.returncode, checked.stdout.decode().splitlines()) == (1, [expected])
    tested = cli(inst, "rules", "test", str(eml))
    assert (tested.returncode, tested.stderr.decode().splitlines()) == (1, [expected])
    ingested = cli(inst, "ingest", stdin=eml.read_bytes())  # the MTA keeps the mail
    assert (ingested.returncode, ingested.stderr.decode().splitlines()) == (75, [expected])
    with inst.session() as session:
        assert session.scalars(select(IngestRecord)).all() == []

    rules.mkdir()  # an installation without rules: the default priority decides
    assert cli(inst, "check").returncode == 0
    assert cli(inst, "ingest", stdin=eml.read_bytes()).returncode == 0
    assert ticket(inst).priority == "P3"


def test_a_missing_rules_dir_refuses_a_reload_and_a_start(tmp_path: Path, sink: Sink) -> None:
    daemon, rules = daemon_with_rules(tmp_path, sink)
    settings = daemon.inst.settings_file
    problem = f"{settings}: rules_dir: {tmp_path / 'gone'} {NO_RULES_DIR}"
    try:
        data = yaml.safe_load(settings.read_text())
        settings.write_text(yaml.safe_dump({**data, "rules_dir": str(tmp_path / "gone")}))
        daemon.signal(signal.SIGHUP)
        daemon.wait_for_log("reload refused")
        refused = "reload refused, still running the previous configuration"
        assert f"{refused}: {problem}" in daemon.log()
        with daemon.smtp() as client:
            client.sendmail("alice@acme.example", ["support@example.com"],
                            make_mail(subject="service down").as_bytes())  # fmt: skip
        assert ticket(daemon.inst).priority == "P1"  # the old rules still apply
    finally:
        assert daemon.stop() == 0

    started = subprocess.run(
        [sys.executable, "-m", "mailgate", "--config", str(settings), "run"],
        capture_output=True, text=True, cwd=ROOT, timeout=30,
    )  # fmt: skip
    assert "Traceback" not in started.stderr
    assert (started.returncode, started.stderr.splitlines()) == (EX_CONFIG, [f"error: {problem}"])


def test_the_shipped_rules_classify_mail_in_the_pipeline(inst: Installation) -> None:
    inst.ingest(make_mail(subject="Le site est en panne", body="Plus personne ne peut travailler."))
    assert ticket(inst).priority == "P1"
    inst.ingest(make_mail(subject="Question sobre facturas", message_id="2@acme.example",
                          body="¿Cómo descargo una factura?"))  # fmt: skip
    assert ticket(inst).priority == "P3"


WHO = """\
rules:
  - {name: acme, when: {organisation: [acme]}, then: {tags: [acme]}}
  - {name: admins, when: {role: [admin]}, then: {tags: [admin]}}
  - {name: french, when: {language: [fr]}, then: {tags: [french]}}
  - {name: pro plan, when: {plan: [pro]}, then: {tags: [pro]}}
  - {name: morning, when: {time: {from: "10:00", to: "11:00"}}, then: {tags: [morning]}}
  - {name: files, when: {has_attachment: true}, then: {tags: [files]}}
"""


def test_the_pipeline_gives_the_rules_who_sent_the_mail_and_when(
    install: Callable[..., Installation], tmp_path: Path
) -> None:
    """Alice is an admin of ACME (plan pro, French, Brussels), writing at 10:30 there
    (09:30 UTC, outside the window), with a file attached."""
    rules = tmp_path / "who-rules"
    rules.mkdir()
    (rules / "10-who.yaml").write_text(WHO)
    inst = install(settings={"rules_dir": str(rules)})
    mail = make_mail()
    mail.add_attachment(b"log", maintype="text", subtype="plain", filename="app.log")
    inst.ingest(mail)
    assert ticket(inst).tags == ["acme", "admin", "french", "pro", "morning", "files"]


def test_a_catastrophic_rule_regex_cannot_hold_up_intake(
    install: Callable[..., Installation], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """An operator's regex with nested repetition meets a stranger's text built to
    make it backtrack: the search gives up, the rule does not match, the mail is
    decided in time (checklist 28's 2 s) and the operator is told which regex."""
    rules = tmp_path / "slow-rules"
    rules.mkdir()
    (rules / "10-slow.yaml").write_text(
        "rules:\n"
        "  - {name: slow, when: {body_regex: '(a|aa)+$'}, then: {priority: P1}}\n"
        "  - {name: slow header, when: {header: {X-Ref: '(x+x+)+y'}}, then: {priority: P1}}\n"
    )
    inst = install(settings={"rules_dir": str(rules), "tickets": {"plan_priority": {"pro": "P3"}}})
    mail = make_mail(body="a" * 5000 + "!\n", headers={"X-Ref": "x" * 5000})
    started = time.monotonic()
    result = inst.ingest(mail)
    assert time.monotonic() - started < 2
    assert result.outcome == "created" and ticket(inst).priority == "P3"
    gave_up = [r.getMessage() for r in caplog.records if "gave up" in r.getMessage()]
    assert len(gave_up) == 2 and "'(a|aa)+$'" in gave_up[0] and "'(x+x+)+y'" in gave_up[1]
