"""`mailgate ingest` on files, mbox and Maildir: one outcome per message, exit codes."""

from __future__ import annotations

import json
import mailbox
import os
import re
import resource
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ROOT, Installation, make_mail

Capsys = pytest.CaptureFixture[str]

MAILS = [
    make_mail(message_id="one@acme.example", subject="Export broken"),
    make_mail(sender="Eve <eve@stranger.example>", message_id="two@stranger.example"),
    make_mail(message_id="one@acme.example", subject="Export broken"),  # delivered twice
]


def outcomes(capsys: Capsys) -> list[dict]:
    return [json.loads(line) for line in capsys.readouterr().out.splitlines()]


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
    assert inst.ingest_records() == 0


def test_output_closed_early_says_so_and_the_rest_is_left_for_later(
    inst: Installation, tmp_path: Path
) -> None:
    """`ingest --mbox big.mbox | head -1`: the mail after the break was not read, so
    75 stays right, but the line blamed the input ("cannot read input")."""
    box = mailbox.mbox(tmp_path / "big.mbox")
    for n in range(200):
        box.add(make_mail(message_id=f"pipe-{n}@acme.example", subject=f"Export {n}").as_bytes())
    box.flush()
    reader, writer = os.pipe()
    os.close(reader)  # the consumer is gone before the first line
    proc = subprocess.run(
        [sys.executable, "-m", "mailgate", "--config", str(inst.settings_file), "ingest",
         "--no-send", "--mbox", str(tmp_path / "big.mbox")],
        cwd=ROOT, stdout=writer, stderr=subprocess.PIPE, text=True, timeout=120,
    )  # fmt: skip
    os.close(writer)
    assert proc.returncode == 75
    assert proc.stderr.strip().splitlines() == [
        "error: output closed (broken pipe): stopped, the rest of the input was not processed"
    ]
    assert inst.ingest_records() == 1  # the one decided before its line could not be written


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
    assert inst.ingest_records() == 0


def ingest_on_a_full_disk(inst: Installation, mail: Path, max_file_bytes: int | None) -> tuple:
    """`mailgate ingest` as an MTA runs it, where no file may grow past `max_file_bytes`:
    a write past it fails (EFBIG) as it would on a full disk (ENOSPC)."""

    def full_disk() -> None:
        if max_file_bytes is not None:
            signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # fail the write, do not kill
            resource.setrlimit(resource.RLIMIT_FSIZE, (max_file_bytes, max_file_bytes))

    proc = subprocess.run(
        [sys.executable, "-m", "mailgate", "--config", str(inst.settings_file), "ingest",
         "--no-send", str(mail)],
        cwd=ROOT, preexec_fn=full_disk, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    return proc.returncode, proc.stdout, proc.stderr


@pytest.mark.parametrize(
    ("limit", "lines", "reopen", "said"),
    [
        (100_000, 10_000, False, "tempfail - cannot write under data_dir: [Errno 27] File too"),
        (12_000, 5, False, "tempfail - database unavailable: "),  # the raw mail fits, rows do not
        (12_000, 5, True, "error: database unavailable: disk I/O error"),  # cannot open it at all
    ],
)
def test_a_full_disk_is_exit_75_and_the_retry_stores_the_mail_once(
    inst: Installation, tmp_path: Path, limit: int, lines: int, reopen: bool, said: str
) -> None:
    mail = tmp_path / "mail.eml"
    mail.write_bytes(make_mail(body="A line of a long log excerpt.\n" * lines).as_bytes())
    if reopen:  # the last connection gone, SQLite must create its shared-memory file again
        inst.app.engine.dispose()
    code, out, err = ingest_on_a_full_disk(inst, mail, limit)
    assert code == 75, (out, err)
    assert said in out + err and "Traceback" not in err, (out, err)
    assert inst.ingest_records() == 0

    code, out, err = ingest_on_a_full_disk(inst, mail, None)  # space again: the MTA retries
    assert code == 0, err
    assert re.fullmatch(r"\S+: created SUP-\d{4}-000001 new ticket.*\n", out)
    assert inst.ingest_records() == 1


def test_an_internal_error_is_exit_75_not_a_bounce(install, tmp_path: Path) -> None:
    """A template that fails at render time is our fault, not the mail's: the MTA
    must keep the mail (75) rather than bounce it (any other code)."""
    templates = tmp_path / "templates"
    shutil.copytree(ROOT / "templates", templates)
    for ack in templates.glob("*/ack.txt.j2"):
        ack.write_text("{{ 1 // 0 }}\n" + ack.read_text())
    inst = install(settings={"templates_dir": str(templates)})
    mail = tmp_path / "mail.eml"
    mail.write_bytes(make_mail().as_bytes())
    assert inst.cli("ingest", "--no-send", str(mail)) == 75
    assert inst.ingest_records() == 0


def test_a_missing_templates_folder_is_one_error_line_and_exit_75(
    install, tmp_path: Path, capsys: Capsys
) -> None:
    """No mail could be answered: the MTA keeps it (75), the operator reads which
    setting points where, as for any other configuration error; `check` says the same."""
    inst = install(settings={"templates_dir": str(tmp_path / "gone")})
    mail = tmp_path / "mail.eml"
    mail.write_bytes(make_mail().as_bytes())
    problem = f"{inst.settings_file}: templates_dir: {tmp_path / 'gone'} not found"
    assert inst.cli("ingest", "--no-send", str(mail)) == 75
    assert capsys.readouterr().err == f"error: {problem}\n"  # one line, no traceback
    assert inst.ingest_records() == 0
    assert inst.cli("check") == 1
    assert f"error: {problem}\n" in capsys.readouterr().out
