"""Settings and directory files: precise one-line errors, never a traceback."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from sqlalchemy import select

from mailgate.cli import main
from mailgate.config import ConfigError, load_settings
from mailgate.directory import load_directory, sync_directory
from mailgate.store.models import Contact, Staff
from tests.conftest import ROOT, Installation, make_mail


def write(path: Path, data: object) -> Path:
    path.write_text(yaml.safe_dump(data) if not isinstance(data, str) else data)
    return path


def mailgate(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "mailgate", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=60,
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
    assert any(line.startswith(f"{path}: ") and expected in line for line in err.value.problems), (
        err.value.problems
    )


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
