"""Settings and directory files: precise one-line errors, never a traceback."""

from __future__ import annotations

import ctypes
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from sqlalchemy import select

from mailgate.cli import EX_CONFIG, main
from mailgate.config import ConfigError, load_settings, running_user
from mailgate.directory import load_directory, sync_directory
from mailgate.store.models import Contact, Organisation, Staff
from tests.conftest import ROOT, Installation, make_mail
from tests.smtp_sink import make_certificate


def write(path: Path, data: object) -> Path:
    path.write_text(yaml.safe_dump(data) if not isinstance(data, str) else data)
    return path


def mailgate(*args: str, cwd: Path, **kwargs: Any) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "mailgate", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=60,
        **kwargs,
    )


def test_shipped_settings_are_valid() -> None:
    settings = load_settings(ROOT / "settings.yaml")
    assert settings.intake.smtp.port == 2525
    assert settings.outbound.transport == "maildir"
    assert settings.database_url.startswith("sqlite:////")  # made absolute


def test_a_bare_off_means_off_as_the_readme_writes_it(tmp_path: Path) -> None:
    path = tmp_path / "settings.yaml"
    path.write_text("hygiene:\n  authentication:\n    staff_policy: off\n"
                    "    organisations: {acme: off}\n")  # fmt: skip
    auth = load_settings(path).hygiene.authentication
    assert (auth.staff_policy, auth.organisations) == ("off", {"acme": "off"})


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        (
            {"intake": {"smtp": {"port": "twenty"}}},
            "intake.smtp.port: Input should be a valid integer",
        ),
        (
            {"intake": {"smtp": {"prot": 25}}},
            "intake.smtp.prot: unknown key (remove it or check its spelling)",
        ),
        (
            {"support_address": "not an address"},
            "support_address: 'not an address' is not a valid email address",
        ),
        (
            {"outbound": {"transport": "carrier-pigeon"}},
            "outbound.transport: Input should be 'maildir' or 'smtp'",
        ),
        ({"outbound": {"from": "Support <bad>"}}, "outbound.from:"),
        (
            {"intake": {"smtp": {"tls_port": 4650}}},
            "intake.smtp: tls_port needs tls_cert_file and tls_key_file",
        ),
        (
            {"intake": {"smtp": {"auth_users_file": "users", "tls_cert_file": "c.pem"}}},
            "intake.smtp: auth_users_file needs tls_cert_file and tls_key_file: AUTH is "
            "offered only over TLS",
        ),
        (  # a moved message gets a new UID there: read again and again, for ever
            {"intake": {"imap": {"processed_folder": "inbox"}}},
            "intake.imap: processed_folder is the folder mailgate reads (INBOX)",
        ),
        (
            {"intake": {"imap": [{"name": "a", "folder": "Support", "failed_folder": "Support"}]}},
            "intake.imap.0: failed_folder is the folder mailgate reads (Support)",
        ),
        ({"intake": {"imap": {"port": "x"}}}, "intake.imap.port: Input should be a valid integer"),
        ({"intake": {"imap": [{"prot": 1}]}}, "intake.imap.0.prot: unknown key"),
        (  # 0 would anonymise every closed ticket at the next hourly run
            {"retention": {"closed_days": 0}},
            "retention.closed_days: Input should be greater than 0",
        ),
        (  # every new ticket was a KeyError traceback and a tempfail, for ever
            {"tickets": {"number_format": "{org}-{seq}"}},
            "tickets.number_format: '{org}-{seq}': only {year} and {seq} may be used,"
            " e.g. SUP-{year}-{seq:06d}",
        ),
        (  # the sequence starts at 1 again each January: SUP-000001 a second time
            {"tickets": {"number_format": "SUP-{seq:06d}"}},
            "tickets.number_format: 'SUP-{seq:06d}' must contain {year} and {seq} once each",
        ),
        (  # the second ticket of the year collided with the first: tempfail for ever
            {"tickets": {"number_format": "SUP-{year}"}},
            "tickets.number_format: 'SUP-{year}' must contain {year} and {seq} once each",
        ),
        (  # "2026-     7": the [NUMBER] tag in replies never matched
            {"tickets": {"number_format": "{year}-{seq:6d}"}},
            "tickets.number_format: '{year}-{seq:6d}': {seq:6d} must print digits only",
        ),
        (
            {"tickets": {"number_format": "[{year}-{seq}]"}},
            "tickets.number_format: '[{year}-{seq}]': no brackets or spaces",
        ),
        (
            {"outbound": {"max_attempts": 0}},
            "outbound.max_attempts: Input should be greater than 0",
        ),
        (
            {"outbound": {"smtp": {"host": "relay.example.net", "username": "mailgate"}}},
            "outbound.smtp: username with tls: none would send the password in"
            " clear to relay.example.net",
        ),
    ],
)
def test_bad_setting_is_named_with_file_and_key(tmp_path: Path, data: dict, expected: str) -> None:
    path = write(tmp_path / "settings.yaml", data)
    with pytest.raises(ConfigError) as err:
        load_settings(path)
    # one line, for the form that was written (one mailbox or a list of them)
    assert len(err.value.problems) == 1, err.value.problems
    assert err.value.problems[0].startswith(f"{path}: {expected}"), err.value.problems


def test_a_relay_password_in_clear_only_to_loopback_or_when_forced(tmp_path: Path) -> None:
    for smtp in (
        {"host": "127.0.0.1", "username": "mailgate"},  # a local MTA
        {"host": "relay.example.net"},  # no password: a relay that trusts our address
        {"host": "relay.example.net", "username": "mailgate", "tls": "starttls"},
        {"host": "relay.example.net", "username": "mailgate", "allow_plaintext": True},
    ):
        load_settings(write(tmp_path / "settings.yaml", {"outbound": {"smtp": smtp}}))


def test_every_problem_is_listed(tmp_path: Path) -> None:
    path = write(
        tmp_path / "settings.yaml",
        {"support_address": "x", "intake": {"smtp": {"port": -1}}, "nonsense": 1},
    )
    with pytest.raises(ConfigError) as err:
        load_settings(path)
    assert len(err.value.problems) == 3


def test_missing_file_and_bad_yaml(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="file not found"):
        load_settings(tmp_path / "nope.yaml")
    path = write(tmp_path / "settings.yaml", "intake:\n  smtp: [\n")
    with pytest.raises(ConfigError, match=r"settings.yaml:\d+: invalid YAML"):
        load_settings(path)
    # The line an editor shows for the mistake: counted from 1.
    path = write(tmp_path / "settings.yaml", "intake:\n  smtp:\n    port: 25\n   tls: none\n")
    with pytest.raises(ConfigError, match=r"settings.yaml:4: invalid YAML"):
        load_settings(path)


def test_check_command_lists_problems_and_exits_1(tmp_path: Path) -> None:
    write(tmp_path / "settings.yaml", {"intake": {"smtp": {"port": "x"}}, "colour": "blue"})
    proc = mailgate("--config", "settings.yaml", "check", cwd=tmp_path)
    assert proc.returncode == 1
    lines = proc.stdout.strip().splitlines()
    assert len(lines) == 2 and all(line.startswith("error: settings.yaml: ") for line in lines)
    assert "Traceback" not in proc.stderr


def test_check_command_passes_on_shipped_files(tmp_path: Path) -> None:
    for name in ("settings.yaml", "directory.yaml"):
        (tmp_path / name).write_text((ROOT / name).read_text())
    (tmp_path / "templates").symlink_to(ROOT / "templates")
    (tmp_path / "rules").symlink_to(ROOT / "rules")
    proc = mailgate("--config", "settings.yaml", "check", cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    # `check` writes nothing: run as root before the first start, a database it
    # created would be root's, and the service's user could not write it.
    assert not (tmp_path / "var").exists(), list((tmp_path / "var").iterdir())
    assert "created a new, empty database" not in proc.stderr


def test_an_impossible_date_is_a_line_with_file_and_key_not_a_traceback(tmp_path: Path) -> None:
    # YAML reads 2027-02-30 as a date and Python refuses to build it: `check`,
    # `run` (systemd must not restart a bad setting every 5 s) and `ingest`
    # used to die with a ValueError traceback and exit 1.
    shipped = (ROOT / "settings.yaml").read_text()
    dates = "      dates: [2026-12-24, 2027-02-30]"
    settings = shipped.replace("      holidays: true ", f"{dates}\n      holidays: true ", 1)
    (tmp_path / "settings.yaml").write_text(settings)
    (tmp_path / "directory.yaml").write_text((ROOT / "directory.yaml").read_text())
    (tmp_path / "templates").symlink_to(ROOT / "templates")
    (tmp_path / "rules").symlink_to(ROOT / "rules")
    line = settings.splitlines().index(dates) + 1
    expected = (
        f"error: settings.yaml:{line}: sla.calendars.business.dates.1: '2027-02-30' is not a"
        " date (day is out of range for month): write a real one as YYYY-MM-DD"
    )
    check = mailgate("--config", "settings.yaml", "check", cwd=tmp_path)
    assert (check.returncode, check.stdout.strip(), check.stderr) == (1, expected, "")
    run = mailgate("--config", "settings.yaml", "run", cwd=tmp_path)
    assert (run.returncode, run.stderr.strip()) == (EX_CONFIG, expected)
    ingest = mailgate("--config", "settings.yaml", "ingest", "-", cwd=tmp_path, input="x")
    assert (ingest.returncode, ingest.stderr.strip()) == (75, expected)

    (tmp_path / "settings.yaml").write_text(shipped)
    directory = (ROOT / "directory.yaml").read_text().replace("2099-12-31", "2099-13-31")
    (tmp_path / "directory.yaml").write_text(directory)
    line = directory.splitlines().index("    contract_until: 2099-13-31") + 1
    check = mailgate("--config", "settings.yaml", "check", cwd=tmp_path)
    assert check.returncode == 1 and "Traceback" not in check.stderr
    assert check.stdout.strip() == (
        f"error: {tmp_path}/directory.yaml:{line}: organisations.0.contract_until: '2099-13-31'"
        " is not a date (month must be in 1..12): write a real one as YYYY-MM-DD"
    )


def without_psycopg(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    """`mailgate ARGS` on an installation made without the [postgresql] extra:
    a None in sys.modules is how Python spells "this module cannot be imported"."""
    code = (
        "import sys; sys.modules['psycopg'] = None; from mailgate.cli import main; sys.exit(main())"
    )
    return subprocess.run([sys.executable, "-c", code, *args], cwd=cwd, capture_output=True,
                          text=True, timeout=60)  # fmt: skip


@pytest.mark.parametrize(
    ("url", "problem"),
    [
        (
            "postgresql://mailgate@db.internal/mailgate",
            "PostgreSQL's driver psycopg is not installed (import of psycopg halted; None in"
            " sys.modules): pip install 'mailgate[postgresql]' and write postgresql://USER@HOST/DB",
        ),
        (
            "mysql://mailgate@db.internal/mailgate",
            "mailgate runs on SQLite or PostgreSQL, not mysql",
        ),
        (
            "postgres://mailgate@db.internal/mailgate",
            "'postgres://mailgate@db.internal/mailgate' is not a database URL:"
            " write sqlite:///PATH or postgresql://USER@HOST/DB",
        ),
    ],
)
def test_a_database_url_mailgate_cannot_use_is_a_setting_error(
    tmp_path: Path, url: str, problem: str
) -> None:
    # Was a ModuleNotFoundError or ArgumentError traceback from `check`, and an
    # exit 1 from `run`, which systemd restarts every 5 s instead of leaving the
    # unit failed (78) with the reason in the journal.
    write(tmp_path / "settings.yaml", {"database_url": url})
    expected = f"error: settings.yaml: database_url: {problem}"
    check = without_psycopg("--config", "settings.yaml", "check", cwd=tmp_path)
    assert (check.returncode, check.stdout.strip(), check.stderr) == (1, expected, "")
    run = without_psycopg("--config", "settings.yaml", "run", cwd=tmp_path)
    assert (run.returncode, run.stderr.strip()) == (EX_CONFIG, expected)


def test_ingest_with_a_number_format_without_seq_keeps_the_mail_and_says_why(
    tmp_path: Path,
) -> None:
    # Was: the first mail of the year a ticket, every later one "tempfail -
    # conflicting concurrent delivery" (the same number twice), with no hint.
    shipped = (ROOT / "settings.yaml").read_text()
    settings = shipped.replace(
        'number_format: "SUP-{year}-{seq:06d}"', 'number_format: "SUP-{year}"'
    )
    assert settings != shipped
    (tmp_path / "settings.yaml").write_text(settings)
    (tmp_path / "directory.yaml").write_text((ROOT / "directory.yaml").read_text())
    (tmp_path / "templates").symlink_to(ROOT / "templates")
    (tmp_path / "rules").symlink_to(ROOT / "rules")
    mail = (ROOT / "samples" / "first-request.eml").read_text()
    ingest = mailgate("--config", "settings.yaml", "ingest", "-", cwd=tmp_path, input=mail)
    assert ingest.returncode == 75 and "Traceback" not in ingest.stderr
    assert "tickets.number_format: 'SUP-{year}' must contain {year} and {seq}" in ingest.stderr


def test_check_names_a_per_organisation_key_the_directory_lacks(tmp_path: Path) -> None:
    settings = yaml.safe_load((ROOT / "settings.yaml").read_text())
    settings["hygiene"]["authentication"]["organisations"] = {"acme": "require", "acne": "off"}
    write(tmp_path / "settings.yaml", settings)
    (tmp_path / "directory.yaml").write_text((ROOT / "directory.yaml").read_text())
    (tmp_path / "templates").symlink_to(ROOT / "templates")
    (tmp_path / "rules").symlink_to(ROOT / "rules")
    proc = mailgate("--config", "settings.yaml", "check", cwd=tmp_path)
    assert proc.returncode == 1
    assert proc.stdout.strip().splitlines() == [
        "error: settings.yaml: hygiene.authentication.organisations: acne: no such organisation "
        "in directory.yaml (check the id)"
    ]


def test_check_reports_a_bad_directory(tmp_path: Path) -> None:
    (tmp_path / "settings.yaml").write_text((ROOT / "settings.yaml").read_text())
    (tmp_path / "templates").symlink_to(ROOT / "templates")
    write(
        tmp_path / "directory.yaml",
        {
            "organisations": [
                {"id": "acme", "name": "A", "plan": "gold", "contacts": [{"email": "nope"}]}
            ]
        },
    )
    proc = mailgate("--config", "settings.yaml", "check", cwd=tmp_path)
    assert proc.returncode == 1
    assert (
        "organisations.0.plan" in proc.stdout and "organisations.0.contacts.0.email" in proc.stdout
    )


def test_secret_from_environment_and_file(tmp_path: Path, monkeypatch) -> None:
    from mailgate.config import read_secret

    settings = load_settings(ROOT / "settings.yaml")
    monkeypatch.setenv("MG_PASS", "s3cret")
    assert read_secret(file=None, env="MG_PASS", settings=settings, key="k") == "s3cret"
    (tmp_path / "pw").write_text("from-file\n")
    assert read_secret(file=tmp_path / "pw", env=None, settings=settings, key="k") == "from-file"
    with pytest.raises(ConfigError, match="k_env: environment variable NOPE is not set"):
        read_secret(file=None, env="NOPE", settings=settings, key="k")


def test_directory_sync_is_idempotent_and_deactivates(inst: Installation, tmp_path: Path) -> None:
    path = tmp_path / "dir2.yaml"
    write(
        path,
        {
            "organisations": [
                {
                    "id": "acme",
                    "name": "ACME",
                    "contacts": [{"email": "Alice@ACME.example", "role": "admin"}],
                }
            ],
            "staff": [{"email": "bob@support.example", "level": "L3"}],
        },
    )
    for _ in range(2):
        with inst.app.sessions.begin() as s:
            report = sync_directory(s, load_directory(path))
    assert report.deactivated == 0  # the second run changes nothing
    with inst.session() as s:
        carol = s.scalar(select(Contact).where(Contact.email == "carol@acme.example"))
        alice = s.scalar(select(Contact).where(Contact.email == "alice@acme.example"))
        bob = s.scalar(select(Staff))
    assert carol is not None and not carol.active  # kept, never deleted
    assert alice.active and bob.level == "L3"
    # Listed again (the shipped file): the organisations and people left out are back.
    with inst.app.sessions.begin() as s:
        assert sync_directory(s, load_directory(ROOT / "directory.yaml")).deactivated == 0
    with inst.session() as s:
        assert all(o.active for o in s.scalars(select(Organisation)))
        assert "carol@acme.example" in s.scalars(select(Contact.email).where(Contact.active))


def test_referents_listed_in_the_directory_are_marked(inst: Installation, tmp_path: Path) -> None:
    directory = yaml.safe_load((ROOT / "directory.yaml").read_text())
    directory["organisations"][0]["referents"] = ["carol@acme.example"]
    path = write(tmp_path / "dir3.yaml", directory)
    with inst.app.sessions.begin() as s:
        sync_directory(s, load_directory(path))
    with inst.session() as s:
        marked = list(s.scalars(select(Contact.email).where(Contact.referent.is_(True))))
    assert marked == ["carol@acme.example"]


def active_contacts(inst: Installation) -> list[str]:
    with inst.session() as s:
        return sorted(s.scalars(select(Contact.email).where(Contact.active.is_(True))))


@pytest.mark.parametrize("empty", ["", "organisations: []\n", "kind,email,organisation\n"])
def test_a_directory_listing_nobody_is_refused_unless_forced(
    inst: Installation, tmp_path: Path, capsys: pytest.CaptureFixture[str], empty: str
) -> None:
    """A truncated export must not lock every customer out."""
    before = active_contacts(inst)
    path = tmp_path / ("dir.csv" if empty.startswith("kind") else "dir.yaml")
    path.write_text(empty)
    assert inst.cli("directory", "sync", str(path)) == 1
    err = capsys.readouterr().err
    assert f"{path}: lists no organisation and no staff" in err and "nothing was changed" in err
    assert f"mailgate directory sync --force {path}" in err
    assert active_contacts(inst) == before

    assert inst.cli("directory", "sync", "--force", str(path)) == 0
    assert active_contacts(inst) == []


def test_a_sync_deactivating_more_than_the_limit_is_refused(
    install, capsys: pytest.CaptureFixture[str]
) -> None:
    """The settings' own directory, synced by every command and the daemon, is
    guarded too: mail waits (exit 75 for the MTA) instead of being rejected."""
    inst = install(settings={"directory_max_deactivations": 2})
    directory = yaml.safe_load(inst.root.joinpath("directory.yaml").read_text())
    directory["organisations"] = [o for o in directory["organisations"] if o["id"] == "acme"]
    directory["organisations"][0]["contacts"] = directory["organisations"][0]["contacts"][:1]
    inst.root.joinpath("directory.yaml").write_text(yaml.safe_dump(directory))  # 3 fewer rows
    mail = inst.root / "mail.eml"
    mail.write_bytes(make_mail().as_bytes())

    assert inst.cli("ingest", "--no-send", str(mail)) == 75
    err = capsys.readouterr().err
    assert "would deactivate 3 organisations, contacts and staff" in err
    assert "more than directory_max_deactivations: 2" in err
    assert "carol@acme.example" in active_contacts(inst)

    assert inst.cli("directory", "sync", "--force") == 0
    assert active_contacts(inst) == ["alice@acme.example"]
    assert inst.cli("ingest", "--no-send", str(mail)) == 0  # the file is the directory now


def test_directory_from_csv(inst: Installation, tmp_path: Path) -> None:
    path = tmp_path / "dir.csv"
    path.write_text(
        "kind,email,name,role,level,organisation,organisation_name,plan,contract_until,language\n"
        "contact,dan@initech.example,Dan,admin,,initech,Initech,basic,2027-01-31,es\n"
        "staff,eve@support.example,Eve,,L1,,,,,\n"
    )
    with inst.app.sessions.begin() as s:
        report = sync_directory(s, load_directory(path))
    assert (report.organisations, report.contacts, report.staff) == (1, 1, 1)
    with inst.session() as s:
        dan = s.scalar(select(Contact).where(Contact.email == "dan@initech.example"))
        assert dan.organisation.language == "es" and dan.role == "admin"


def test_every_bad_row_of_a_directory_csv_is_named_by_its_line(
    inst: Installation, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """An operator fixes a spreadsheet export row by row: all of them at once, by line
    (they were named one per run, or as `organisations.1.contacts.0.role`)."""
    path = tmp_path / "dir.csv"
    path.write_text(
        "kind,email,name,role,organisation,plan,contract_from,contract_until,language,referent\n"
        "contact,alice@acme.example,Alice,admin,acme,pro,,,fr,maybe\n"
        "contact,bob@acme.example,Bob,admin,acme,gold,,,,\n"
        "boss,x@acme.example,,,,,,,,\n"
        "contact,carol@beta.example,Carol,chief,beta,pro,,,de,\n"
        "staff,eve@example,Eve,,,,,,,\n"
        "contact,dan@beta.example,Dan,admin,,,,,,\n"
        "contact,fay@gamma.example,Fay,admin,gamma,pro,2027-01-01,2026-12-31,en,\n"
    )
    assert inst.cli("directory", "sync", str(path)) == 1
    assert capsys.readouterr().err.splitlines() == [
        f"error: {path}:2: referent: 'maybe' is not yes or no",
        f"error: {path}:3: plan: Input should be 'basic', 'pro' or 'enterprise'",
        f"error: {path}:4: kind: 'boss' is not 'contact' or 'staff'",
        f"error: {path}:5: language: Input should be 'fr', 'en' or 'es'",
        f"error: {path}:5: role: Input should be 'admin' or 'member'",
        f"error: {path}:6: email: 'eve@example' is not a valid email address (The part after "
        "the @-sign is not valid. It should have a period.)",
        f"error: {path}:7: organisation: missing for a contact row",
        f"error: {path}:8: organisation: contract_until 2026-12-31 is before contract_from "
        "2027-01-01",
    ]
    with inst.session() as s:  # nothing was synced
        assert s.scalar(select(Contact).where(Contact.email == "bob@acme.example")) is None


def test_duplicate_address_in_directory_is_an_error(tmp_path: Path) -> None:
    path = write(
        tmp_path / "d.yaml",
        {
            "organisations": [{"id": "a", "name": "A", "contacts": [{"email": "x@a.example"}]}],
            "staff": [{"email": "x@a.example"}],
        },
    )
    with pytest.raises(ConfigError, match="listed twice"):
        load_directory(path)


@pytest.mark.parametrize(
    "argv",
    [
        ["--config", "{}", "tickets", "list"],
        ["tickets", "--config", "{}", "list"],
        ["tickets", "list", "--config", "{}"],
    ],
    ids=["before", "between", "after"],
)
def test_config_is_taken_anywhere_on_the_line(
    inst: Installation, argv: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    from mailgate.cli import main

    inst.ingest(make_mail())
    assert main([a.format(inst.settings_file) for a in argv], clock=inst.clock) == 0
    assert "SUP-2026-000001" in capsys.readouterr().out


def test_a_directory_csv_not_in_utf8_is_one_line(
    inst: Installation, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A spreadsheet saved in its local code page, as Excel does by default."""
    path = tmp_path / "dir.csv"
    path.write_bytes(
        "kind,email,name,role,organisation,organisation_name\n"
        "contact,helene@initech.example,Hélène,admin,initech,Initech\n".encode("latin-1")
    )
    assert inst.cli("directory", "sync", str(path)) == 1
    assert capsys.readouterr().err == f"error: {path}: not UTF-8 (byte 84); save it as CSV UTF-8\n"


def test_a_missing_directory_file_is_named_with_the_settings_file_given(
    install, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:  # noqa: ANN001
    inst = install()
    other = tmp_path / "other.yaml"
    data = yaml.safe_load(inst.settings_file.read_text())
    other.write_text(yaml.safe_dump({**data, "directory": "nodir.yaml"}))
    assert main(["--config", str(other), "ingest", "-"]) == 75
    assert (
        f"error: {other}: directory: {tmp_path / 'nodir.yaml'} not found" in capsys.readouterr().err
    )


# --- `mailgate check` names what would stop the daemon, not only bad settings ---------------

PR_CAPBSET_DROP, CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH = 24, 1, 2


def _give_up_root_file_access() -> None:
    """In the child, before exec: root without these capabilities is held to file
    modes like any user (and stays the owner of the files the test made)."""
    libc = ctypes.CDLL(None, use_errno=True)
    for cap in (CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH):
        if libc.prctl(PR_CAPBSET_DROP, cap, 0, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), "prctl(PR_CAPBSET_DROP)")


@pytest.fixture
def modes_bind(tmp_path: Path) -> dict[str, Any]:
    """Arguments for subprocess.run under which a chmod binds the `mailgate` it runs.
    A user is bound anyway; root (CI containers) is not, so its child drops
    CAP_DAC_OVERRIDE and CAP_DAC_READ_SEARCH, and is bound like the `mailgate`
    user of a real installation. A probe proves it before the test relies on it."""
    if os.geteuid() != 0:
        return {}
    kwargs: dict[str, Any] = {"preexec_fn": _give_up_root_file_access}
    probe = tmp_path / "read-only-probe"
    probe.write_text("")
    probe.chmod(0o444)
    try:
        wrote = subprocess.run([sys.executable, "-c", f"open({str(probe)!r}, 'a')"],
                               capture_output=True, **kwargs).returncode == 0  # fmt: skip
    except subprocess.SubprocessError as exc:
        pytest.skip(f"running as root, and this root cannot drop CAP_DAC_OVERRIDE ({exc}): "
                    "a chmod binds no process here")  # fmt: skip
    finally:
        probe.unlink()
    if wrote:
        pytest.skip("running as root, and without CAP_DAC_OVERRIDE it still wrote a read-only "
                    "file: a chmod binds no process here")  # fmt: skip
    return kwargs


def check(inst: Installation, **kwargs: Any) -> list[str]:
    """What `mailgate check` prints on this installation, after it exited 1."""
    proc = mailgate("--config", str(inst.settings_file), "check", cwd=inst.root, **kwargs)
    assert "Traceback" not in proc.stdout + proc.stderr
    assert proc.returncode == 1, proc.stdout + proc.stderr
    return proc.stdout.splitlines()


GIVE_IT = "give it to the user that runs mailgate"


@pytest.mark.parametrize("read_only", ["file", "folder"])
def test_check_names_a_database_the_daemon_could_not_write(
    install, modes_bind: dict[str, Any], read_only: str
) -> None:  # noqa: ANN001
    """SQLite opens a read-only file, or one in a folder where it cannot create its
    -wal and -shm files, and the daemon answers 451 to every mail: not ok."""
    inst = install(settings={"database_url": "sqlite:///db/mailgate.db"})
    inst.app.engine.dispose()  # the last connection gone, SQLite removes -wal and -shm
    db = inst.root / "db" / "mailgate.db"
    settings, user = inst.settings_file, running_user()
    target, mode, expected = {
        "file": (db, 0o400, f"error: {settings}: database_url: {db} is not writable by user "
                            f"{user} (every mail would get 451; {GIVE_IT})"),
        "folder": (db.parent, 0o500, f"error: {settings}: database_url: folder {db.parent} is "
                                     f"not writable by user {user}, so SQLite cannot create the "
                                     f"database's -wal and -shm files (every mail would get 451; "
                                     f"{GIVE_IT})"),
    }[read_only]  # fmt: skip
    before = target.stat().st_mode
    target.chmod(mode)
    try:
        assert check(inst, **modes_bind) == [expected]
        # and the daemon does not start to answer 451 to every mail: it says why
        run = mailgate("--config", str(settings), "run", cwd=inst.root, **modes_bind)
        assert run.returncode == EX_CONFIG
        assert expected in run.stderr and "Traceback" not in run.stderr
    finally:
        target.chmod(before)
    assert mailgate("--config", str(settings), "check", cwd=inst.root).returncode == 0


@pytest.mark.parametrize("where", ["blobs", "maildir"])
def test_check_names_a_blob_or_maildir_folder_the_daemon_could_not_write(
    inst: Installation, modes_bind: dict[str, Any], where: str
) -> None:
    """A folder left to root by a command run as root refuses every mail stored or sent there."""
    inst.ingest(make_mail())
    inst.send_outbox()  # the raw mail under var/blobs/ab/cd/; the ack and notice in var/sent/new
    settings, user = inst.settings_file, running_user()
    if where == "blobs":
        folder = next((inst.root / "var" / "blobs").glob("*/*"))
        expected = (f"error: {settings}: data_dir: {folder} is not writable by user {user}: raw "
                    "mail and attachments are stored there, every mail would get 451; give "
                    "them to the user that runs mailgate")  # fmt: skip
    else:
        folder = inst.root / "var" / "sent" / "new"
        expected = (f"error: {settings}: outbound.maildir: {folder} is not writable by user "
                    f"{user} (the mail we send goes there; {GIVE_IT})")  # fmt: skip
    folder.chmod(0o500)
    try:
        assert check(inst, **modes_bind) == [expected]
    finally:
        folder.chmod(0o700)


def test_check_names_a_data_folder_that_is_a_file(inst: Installation) -> None:
    """The same check without chmod, so it binds root too: nothing can be created there."""
    blobs, sent = inst.root / "var" / "blobs", inst.root / "var" / "sent"
    blobs.write_text("")
    sent.write_text("")
    settings = inst.settings_file
    assert check(inst) == [
        f"error: {settings}: data_dir: {blobs} is not a folder: raw mail and attachments are "
        "stored there, every mail would get 451; give them to the user that runs mailgate",
        f"error: {settings}: outbound.maildir: {sent} is not a folder (the mail we send goes "
        f"there; {GIVE_IT})",
    ]


NO_TLS = "give the PEM file's path, or remove tls_cert_file and tls_key_file for no STARTTLS"


@pytest.mark.parametrize("broken", ["missing", "not a certificate", "not the certificate's key"])
def test_check_names_a_broken_smtp_certificate_or_key(
    install, certificate: tuple[Path, Path], tmp_path: Path, broken: str
) -> None:  # noqa: ANN001
    cert, key = certificate
    other = tmp_path / "other"
    other.mkdir()
    other_key = make_certificate(other)[1]
    cert_file, key_file = {
        "missing": (tmp_path / "missing.pem", key),
        "not a certificate": (key, key),
        "not the certificate's key": (cert, other_key),
    }[broken]
    inst = install(settings={"intake": {"smtp": {"tls_cert_file": str(cert_file),
                                                 "tls_key_file": str(key_file)}}})  # fmt: skip
    prefix = f"error: {inst.settings_file}: intake.smtp"
    assert check(inst) == [{
        "missing": f"{prefix}.tls_cert_file: {cert_file} not found ({NO_TLS})",
        "not a certificate": f"{prefix}.tls_cert_file: {key} holds no PEM certificate (give the "
                             "certificate chain, -----BEGIN CERTIFICATE-----)",
        "not the certificate's key": f"{prefix}.tls_key_file: {other_key} is not the private key "
                                     f"of the certificate in {cert} (give the key the "
                                     "certificate was made for)",
    }[broken]]  # fmt: skip


NO_AUTH = "create it with one user:password line per client, or remove the key for no AUTH"


def test_check_names_a_missing_or_broken_smtp_users_file(
    install, tmp_path: Path, certificate: tuple[Path, Path]
) -> None:  # noqa: ANN001
    users, (cert, key) = tmp_path / "smtp-users", certificate
    smtp = {"auth_users_file": str(users), "tls_cert_file": str(cert), "tls_key_file": str(key)}
    inst = install(settings={"intake": {"smtp": smtp}})
    where = f"error: {inst.settings_file}: intake.smtp.auth_users_file"
    assert check(inst) == [f"{where}: {users} not found ({NO_AUTH})"]

    users.write_text("# relays\nrelay:s3cret\n\nbackup-relay\nrelay:0th3r\n:n0body\n")
    lines = check(inst)
    assert lines == [
        f"{where}: {users}:4: not a user:password line with a user and a password (# starts a "
        "comment)",
        f"{where}: {users}:5: user 'relay' is already on line 2; keep one",
        f"{where}: {users}:6: not a user:password line with a user and a password (# starts a "
        "comment)",
    ]
    assert not any(secret in "\n".join(lines) for secret in ("s3cret", "0th3r", "n0body"))

    users.write_text("relay:s3cret\n")
    assert mailgate("--config", str(inst.settings_file), "check", cwd=inst.root).returncode == 0


@pytest.mark.parametrize("unreadable", ["tls_key_file", "auth_users_file"])
def test_check_names_an_smtp_file_the_daemon_could_not_read(
    install, certificate: tuple[Path, Path], tmp_path: Path, modes_bind: dict[str, Any],
    unreadable: str,
) -> None:  # fmt: skip  # noqa: ANN001
    cert, key = certificate
    shutil.copy(key, tmp_path / "key.pem")
    (tmp_path / "smtp-users").write_text("relay:s3cret\n")
    smtp = {"tls_cert_file": str(cert), "tls_key_file": str(tmp_path / "key.pem"),
            "auth_users_file": str(tmp_path / "smtp-users")}  # fmt: skip
    inst = install(settings={"intake": {"smtp": smtp}})
    path = Path(smtp[unreadable])
    path.chmod(0o000)
    assert check(inst, **modes_bind) == [
        f"error: {inst.settings_file}: intake.smtp.{unreadable}: cannot read {path} (Permission "
        f"denied; it must be readable by user {running_user()}, who runs mailgate)"
    ]


def test_check_says_a_missing_directory_file_once(inst: Installation) -> None:
    (inst.root / "directory.yaml").unlink()
    assert check(inst) == [
        f"error: {inst.settings_file}: directory: {inst.root / 'directory.yaml'} not found"
    ]
