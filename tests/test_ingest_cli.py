"""`mailgate ingest` on files, mbox and Maildir: one outcome per message, exit codes."""

from __future__ import annotations

import json
import mailbox
from pathlib import Path

import pytest
from sqlalchemy import func, select

from mailgate.store.models import IngestRecord
from tests.conftest import Installation, make_mail

Capsys = pytest.CaptureFixture[str]

MAILS = [
    make_mail(message_id="one@acme.example", subject="Export broken"),
    make_mail(sender="Eve <eve@stranger.example>", message_id="two@stranger.example"),
    make_mail(message_id="one@acme.example", subject="Export broken"),  # delivered twice
]


def outcomes(capsys: Capsys) -> list[dict]:
    return [json.loads(line) for line in capsys.readouterr().out.splitlines()]


def records(inst: Installation) -> int:
    with inst.session() as s:
        return s.scalar(select(func.count()).select_from(IngestRecord)) or 0


def test_an_mbox_gives_one_json_outcome_per_message(
    inst: Installation, tmp_path: Path, capsys: Capsys
) -> None:
    box = mailbox.mbox(tmp_path / "import.mbox")
    for mail in MAILS:
        box.add(mail.as_bytes())
    box.close()
    assert inst.cli("ingest", "--mbox", "--json", "--no-send", str(tmp_path / "import.mbox")) == 0
    results = outcomes(capsys)
    assert [r["outcome"] for r in results] == ["created", "rejected", "duplicate"]
    assert [r["source"] for r in results] == [f"{tmp_path / 'import.mbox'}#{n}" for n in (1, 2, 3)]
    assert results[0]["ticket"] == results[2]["ticket"] == "SUP-2026-000001"
    assert results[1]["ticket"] is None and results[1]["reason"]
    assert [r["message_id"] for r in results] == [
        "one@acme.example", "two@stranger.example", "one@acme.example",
    ]  # fmt: skip


def test_a_maildir_is_read_new_and_cur(inst: Installation, tmp_path: Path, capsys: Capsys) -> None:
    box = mailbox.Maildir(tmp_path / "Maildir")
    for mail in MAILS[:2]:
        box.add(mail.as_bytes())
    assert inst.cli("ingest", "--maildir", "--json", "--no-send", str(tmp_path / "Maildir")) == 0
    assert sorted(r["outcome"] for r in outcomes(capsys)) == ["created", "rejected"]


def test_an_empty_mbox_is_nothing_to_do(inst: Installation, tmp_path: Path) -> None:
    (tmp_path / "empty.mbox").write_bytes(b"")
    assert inst.cli("ingest", "--mbox", str(tmp_path / "empty.mbox")) == 0
    assert records(inst) == 0


@pytest.mark.parametrize(
    ("args", "error"),
    [
        (["--mbox", "missing.mbox"], "cannot read missing.mbox: No such file or directory"),
        (["--mbox", "."], "cannot read .: Is a directory"),
        (["--maildir", "missing"], "cannot read missing: No such file or directory"),
        (["missing.eml"], "cannot read missing.eml: No such file or directory"),
        # One message given as an mbox: the mbox reader would skip all of it.
        (["--mbox", "one.eml"], "one.eml: not an mbox (it must start with a 'From ' line)"),
    ],
)
def test_unreadable_input_is_one_error_line_and_exit_75(
    inst: Installation,
    tmp_path: Path,
    capsys: Capsys,
    monkeypatch: pytest.MonkeyPatch,
    args: list[str],
    error: str,
) -> None:
    """75 (EX_TEMPFAIL): an MTA keeps the mail and retries; an operator sees why."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "one.eml").write_bytes(MAILS[0].as_bytes())
    assert inst.cli("ingest", *args) == 75
    err = capsys.readouterr().err
    assert err.startswith(f"error: {error}") and err.count("\n") == 1, err
    assert records(inst) == 0
