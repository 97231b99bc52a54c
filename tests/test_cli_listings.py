"""Reading tickets and the outbox from the command line: a filter that cannot
match is refused with the reason, never an empty listing that looks like news."""

from __future__ import annotations

import pytest

from tests.conftest import Installation, make_mail

Capsys = pytest.CaptureFixture[str]


def test_tickets_list_names_the_statuses_it_knows(inst: Installation, capsys: Capsys) -> None:
    inst.ingest(make_mail(subject="Export broken"))
    capsys.readouterr()
    assert inst.cli("tickets", "list", "--status", "new") == 0
    assert "Export broken" in capsys.readouterr().out
    with pytest.raises(SystemExit) as refused:
        inst.cli("tickets", "list", "--status", "opened")  # a typo for "open"
    assert refused.value.code == 2
    err = capsys.readouterr().err
    assert "invalid choice: 'opened'" in err and "waiting_customer" in err


def test_tickets_list_of_an_unknown_organisation_is_an_error(
    inst: Installation, capsys: Capsys
) -> None:
    inst.ingest(make_mail())
    capsys.readouterr()
    assert inst.cli("tickets", "list", "--org", "acme") == 0
    assert inst.cli("tickets", "list", "--org", "acmee") == 1
    captured = capsys.readouterr()
    assert "no organisation 'acmee' in the directory" in captured.err
    assert "Traceback" not in captured.err


def test_outbox_list_names_the_statuses_it_knows(inst: Installation, capsys: Capsys) -> None:
    with pytest.raises(SystemExit) as refused:
        inst.cli("outbox", "list", "--status", "pending")
    assert refused.value.code == 2
    assert "invalid choice: 'pending'" in capsys.readouterr().err


def test_outbox_retry_says_which_ids_it_did_not_queue(inst: Installation, capsys: Capsys) -> None:
    inst.ingest(make_mail())  # an acknowledgement and a staff notice, both queued
    capsys.readouterr()
    assert inst.cli("outbox", "retry", "99999", "1") == 1
    captured = capsys.readouterr()
    assert "0 mail(s) queued again" in captured.out
    assert "no outbound mail #99999" in captured.err
    assert "mail #1 is queued: only failed or dead mail is queued again" in captured.err
