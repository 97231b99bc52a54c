"""Who hears about what: staff groups the rules route tickets to, and the
organisations' referents, who get the credit notices."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml
from sqlalchemy import select

from mailgate.config import ConfigError
from mailgate.directory import load_directory, sync_directory_if_changed
from mailgate.sla.sweep import sweep
from mailgate.store.models import Contact, Staff, Ticket
from tests.conftest import ROOT, Installation, make_mail, reply_to

RULES = """\
rules:
  - name: invoices to billing
    when: {text: [invoice, facture]}
    then: {group: billing}
"""
ZOE = {"email": "zoe@support.example", "name": "Zoé", "level": "L1", "groups": ["billing"]}


def directory(**changes: Any) -> dict[str, Any]:
    data = yaml.safe_load((ROOT / "directory.yaml").read_text())
    data["staff"].append(dict(ZOE))
    for key, value in changes.items():
        data[key] = value
    return data


@pytest.fixture
def routed(install: Callable[..., Installation], tmp_path: Path) -> Installation:
    rules = tmp_path / "rules"
    rules.mkdir()
    (rules / "10-routing.yaml").write_text(RULES)
    return install(settings={"rules_dir": str(rules)}, directory=directory())


class StaffNotices:
    """The To of the staff notices sent since the last look."""

    def __init__(self, inst: Installation) -> None:
        self.inst, self.seen = inst, 0

    def new(self) -> list[str]:
        to = [str(m["To"]) for m in self.inst.sent() if "support.example" in str(m["To"])]
        fresh, self.seen = to[self.seen :], len(to)
        return fresh


def test_a_rule_routes_a_ticket_to_its_group_and_only_its_members_hear(
    routed: Installation, capsys: pytest.CaptureFixture[str]
) -> None:
    inst, notices = routed, StaffNotices(routed)
    request = make_mail(subject="Wrong VAT on the invoice")
    number = inst.ingest(request).ticket
    assert notices.new() == ["zoe@support.example"]  # not Bob: not in billing
    assert inst.cli("tickets", "show", number, "--json") == 0
    shown = json.loads(capsys.readouterr().out)
    assert (shown["group"], shown["priority"]) == ("billing", "P3")
    answer = reply_to(request, sender="Alice <alice@acme.example>", message_id="r1@acme.example")
    assert inst.ingest(answer).outcome == "threaded"
    assert notices.new() == ["zoe@support.example"]
    inst.clock.now = inst.clock.now.replace(hour=12)  # past half of P3's 4 h first response
    assert sweep(inst.app, inst.clock.now).reminders == 1
    assert notices.new() == ["zoe@support.example"]


def test_a_ticket_outside_any_group_reaches_every_active_staff_member(
    routed: Installation,
) -> None:
    routed.ingest(make_mail(subject="Cannot log in"))
    assert StaffNotices(routed).new() == ["bob@support.example, zoe@support.example"]


def test_a_group_with_nobody_left_falls_back_to_every_active_staff_member(
    routed: Installation,
) -> None:
    inst, notices = routed, StaffNotices(routed)
    inst.ingest(make_mail(subject="Wrong invoice", message_id="i1@acme.example"))
    assert notices.new() == ["zoe@support.example"]
    data = directory()
    data["staff"][-1]["active"] = False  # Zoé left
    (inst.root / "directory.yaml").write_text(yaml.safe_dump(data))
    sync_directory_if_changed(inst.app)
    inst.ingest(make_mail(subject="Another invoice", message_id="i2@acme.example"))
    assert notices.new() == ["bob@support.example"]  # never nobody
    with inst.session() as s:
        assert s.scalar(select(Ticket.group).order_by(Ticket.id.desc())) == "billing"


def test_the_referents_get_the_credit_notices_instead_of_the_admins(
    install: Callable[..., Installation], capsys: pytest.CaptureFixture[str]
) -> None:
    data = directory()
    data["organisations"][0]["referents"] = ["carol@acme.example"]  # a member, not an admin
    inst = install(directory=data)
    with inst.session() as s:
        referents = s.scalars(select(Contact.email).where(Contact.referent.is_(True))).all()
    assert referents == ["carol@acme.example"]
    inst.cli("credits", "add", "acme", "light", "--activated", "2026-11-01")
    number = inst.ingest(make_mail(subject="Export question", body="How?\n")).ticket
    inst.sent()
    assert inst.cli("credits", "spend", number, "3h30") == 0  # 14 of 20: 6 left, below 8
    notices = [m for m in inst.sent() if "crédit" in str(m["Subject"]).lower()]
    assert [str(m["To"]) for m in notices] == ["carol@acme.example"]


def test_a_referent_must_be_a_contact_of_its_organisation(tmp_path: Path) -> None:
    data = directory()
    data["organisations"][0]["referents"] = ["hank@globex.example"]  # Globex's, not ACME's
    path = tmp_path / "directory.yaml"
    path.write_text(yaml.safe_dump(data))
    with pytest.raises(ConfigError) as caught:
        load_directory(path)
    assert str(path) in caught.value.problems[0]
    assert "referents ['hank@globex.example'] are not contacts of acme" in caught.value.problems[0]


def test_csv_carries_referents_and_groups(tmp_path: Path) -> None:
    path = tmp_path / "directory.csv"
    path.write_text(
        "kind,email,name,role,organisation,referent,groups\n"
        "contact,alice@acme.example,Alice,admin,acme,no,\n"
        "contact,carol@acme.example,Carol,member,acme,yes,\n"
        'staff,zoe@support.example,Zoé,,,,"billing, network"\n'
    )
    loaded = load_directory(path)
    assert loaded.organisations[0].referents == ["carol@acme.example"]
    assert loaded.staff[0].groups == ["billing", "network"]
    path.write_text("kind,email,organisation,referent\ncontact,a@acme.example,acme,perhaps\n")
    with pytest.raises(ConfigError, match=r"directory.csv:2: referent: 'perhaps' is not yes or no"):
        load_directory(path)


def test_check_names_rules_that_route_to_nobody(
    install: Callable[..., Installation], tmp_path: Path
) -> None:
    rules = tmp_path / "rules"
    rules.mkdir()
    (rules / "10-routing.yaml").write_text(
        "rules:\n"
        "  - {name: to billing, when: {text: [invoice]}, then: {group: billing}}\n"
        "  - {name: to zed, when: {text: [refund]}, then: {assignee: zed@support.example}}\n"
    )
    inst = install(settings={"rules_dir": str(rules)})  # nobody in billing, no Zed
    from mailgate.checks import check_rules

    problems = check_rules(inst.app.settings)
    assert len(problems) == 2, problems
    assert "10-routing.yaml:2: group 'billing' has no active member" in problems[0]
    assert "10-routing.yaml:3: assignee 'zed@support.example' is not active staff" in problems[1]
    with inst.session() as s:
        assert s.scalar(select(Staff.groups).where(Staff.email == "bob@support.example")) == []


def test_a_group_name_is_the_same_group_whatever_its_case(tmp_path: Path) -> None:
    """Rules written before groups were routed may say `group: Billing`: they still load."""
    from mailgate.pipeline.rules import load_rules

    (tmp_path / "10.yaml").write_text(RULES.replace("group: billing", "group: Billing"))
    assert load_rules(tmp_path).rules[0].then.group == "billing"
    data = directory()
    data["staff"][-1]["groups"] = ["BILLING"]
    path = tmp_path / "directory.yaml"
    path.write_text(yaml.safe_dump(data))
    assert load_directory(path).staff[-1].groups == ["billing"]
