"""`mailgate check`: every problem an operator can fix, one line each."""

from __future__ import annotations

import contextlib
import os
import smtplib
import ssl
from pathlib import Path

from mailgate.config import (
    ConfigError,
    Settings,
    folder_missing,
    load_settings,
    read_secret,
    running_user,
)


def run_checks(settings_file: Path) -> list[str]:
    try:
        settings = load_settings(settings_file)
    except ConfigError as exc:
        return exc.problems  # nothing else can be checked without valid settings
    problems: list[str] = []
    checks = (check_directory, check_calendars, check_rules, check_templates, check_database,
              check_paths, check_smtp, check_relay, check_imap)  # fmt: skip
    for check in checks:
        try:
            problems += check(settings)
        except ConfigError as exc:
            problems += exc.problems
    with contextlib.suppress(ConfigError):  # a broken directory is reported above
        problems += check_organisation_keys(settings, settings_file)
    return problems


def check_directory(settings: Settings) -> list[str]:
    from mailgate.directory import load_directory

    if settings.directory is None:
        return []
    path = settings.path(settings.directory)
    if not path.exists():  # as the daemon and ingest say it
        return [f"{settings.source}: directory: {path} not found"]
    load_directory(path)
    return []


def check_calendars(settings: Settings) -> list[str]:
    """Every organisation's country must have public holidays where a calendar uses them."""
    from mailgate.directory import load_directory
    from mailgate.sla.calendar import holiday_checker

    if settings.directory is None:
        return []
    path = settings.path(settings.directory)
    try:
        organisations = load_directory(path).organisations
    except ConfigError:
        return []  # check_directory names what is wrong with it, once
    problems = []
    for org in organisations:
        for name, calendar in settings.sla.calendars.items():
            if not calendar.holidays or calendar.country is not None:
                continue
            try:
                holiday_checker(org.country, calendar.subdivision)
            except ValueError as exc:
                problems.append(
                    f"{path}: organisation {org.id}: country: {exc} (calendar {name} counts "
                    "its public holidays; fix the country or set holidays: false)"
                )
    return problems


def check_organisation_keys(settings: Settings, settings_file: Path) -> list[str]:
    """Per-organisation settings must name organisations of the directory: a typo
    would silently leave that organisation on the default policy or targets."""
    from mailgate.directory import load_directory

    if settings.directory is None:
        return []
    known = {org.id for org in load_directory(settings.path(settings.directory)).organisations}
    keyed = {
        "hygiene.authentication.organisations": settings.hygiene.authentication.organisations,
        "sla.organisations": settings.sla.organisations,
        "credits.organisations": settings.credits.organisations,
        "retention.organisations": settings.retention.organisations,
    }
    return [
        f"{settings_file}: {key}: {org_id}: no such organisation in {settings.directory} "
        "(check the id)"
        for key, mapping in keyed.items()
        for org_id in mapping
        if org_id not in known
    ]


def check_rules(settings: Settings) -> list[str]:
    """Rules must load, and route to people of the directory: an assignee who is
    active staff, a group with an active member (else everyone hears of the ticket)."""
    from mailgate.directory import load_directory
    from mailgate.pipeline.rules import RulesError, load_rules

    try:
        folder = settings.path(settings.rules_dir)
        rules = load_rules(folder, setting=f"{settings.source}: rules_dir")
    except RulesError as exc:
        return exc.problems
    if settings.directory is None:
        return []
    directory = settings.path(settings.directory)
    try:
        staff = [s for s in load_directory(directory).staff if s.active]
    except ConfigError:
        return []  # check_directory names what is wrong with it
    emails, groups = {s.email for s in staff}, {g for s in staff for g in s.groups}
    problems = []
    for rule in rules.rules:
        if rule.then.assignee is not None and rule.then.assignee.lower() not in emails:
            problems.append(f"{rule.source}: assignee {rule.then.assignee!r} is not active "
                            f"staff in {directory}")  # fmt: skip
        group = rule.then.group
        if group is not None and group not in groups:
            problems.append(f"{rule.source}: group {group!r} has no active member in "
                            f"{directory} (give some staff groups: [{group}])")  # fmt: skip
    return problems


def templates_dir_problem(settings: Settings) -> str | None:
    """The line for a `templates_dir` that is not a folder (`check` and `ingest`), or None."""
    path = settings.path(settings.templates_dir)
    problem = folder_missing(path)
    return f"{settings.source}: templates_dir: {path} {problem}" if problem else None


def check_templates(settings: Settings) -> list[str]:
    from mailgate.outbound.templates import TemplateSet

    problem = templates_dir_problem(settings)
    if problem:
        return [problem]
    return TemplateSet(settings.path(settings.templates_dir)).check()


def check_database(settings: Settings) -> list[str]:
    from sqlalchemy.exc import SQLAlchemyError

    from mailgate.store.db import current_revision, head_revision, make_engine, sqlite_file

    if problems := sqlite_file_problems(settings):
        return problems  # connecting would fail, or work read-only and say nothing
    sqlite = sqlite_file(settings.database_url)
    if sqlite is not None and not sqlite.exists():
        return []  # the first start creates and migrates it; `check` creates nothing
    try:
        engine = make_engine(settings.database_url)
        current = current_revision(engine)
    except SQLAlchemyError as exc:
        first = str(exc).splitlines()[0]
        return [f"{settings.source}: database_url: cannot connect ({first})"]
    if current is None:
        return []  # an empty database is migrated on first use
    if current != head_revision():
        return [f"{settings.source}: database_url: schema at {current}, expected "
                f"{head_revision()}: run 'mailgate db upgrade' after a backup"]  # fmt: skip
    return []


def sqlite_file_problems(settings: Settings) -> list[str]:
    """A SQLite database the daemon can open but not write answers 451 to every
    mail: the file, its -wal and -shm files, and its folder (where SQLite creates
    them) must be writable by the user running mailgate."""
    from mailgate.store.db import sqlite_file

    path = sqlite_file(settings.database_url)
    if path is None:
        return []
    key, user = f"{settings.source}: database_url", running_user()
    fix = "every mail would get 451; give it to the user that runs mailgate"
    if not path.exists():
        problem = folder_problem(path.parent)  # make_engine creates the file and its folders
        return [f"{key}: cannot create {path}: {problem}"] if problem else []
    if not path.is_file():
        return [f"{key}: {path} is not a file"]
    problems = [
        f"{key}: {file} is not writable by user {user} ({fix})"
        for file in (path, path.with_name(path.name + "-wal"), path.with_name(path.name + "-shm"))
        if file.exists() and not _access(file, os.R_OK | os.W_OK)
    ]
    if not _access(path.parent, os.W_OK | os.X_OK):
        problems.append(f"{key}: folder {path.parent} is not writable by user {user}, so SQLite "
                        f"cannot create the database's -wal and -shm files ({fix})")  # fmt: skip
    return problems


def _access(path: Path, mode: int) -> bool:
    """May this process (its effective user) do `mode` on `path`? Root may do anything
    (CAP_DAC_OVERRIDE), except on a read-only file system."""
    if os.access in os.supports_effective_ids:
        return os.access(path, mode, effective_ids=True)
    return os.access(path, mode)


def folder_problem(path: Path) -> str | None:
    """Why this process could not create files in `path` (made with its parents
    when missing), or None."""
    user = running_user()
    if path.exists():
        if not path.is_dir():
            return f"{path} is not a folder"
        if not _access(path, os.W_OK | os.X_OK):
            return f"{path} is not writable by user {user}"
        return None
    parent = path.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent  # under a regular file nothing "exists"
    if not parent.is_dir():
        return f"{parent} is a file, not a folder"
    if not _access(parent, os.W_OK | os.X_OK):
        return f"{parent} is not writable by user {user}, so {path} cannot be created"
    return None


def check_paths(settings: Settings) -> list[str]:
    """Where the daemon writes files: data_dir (and its blob folders), the outbound Maildir."""
    return _data_dir_problems(settings) + _maildir_problems(settings)


def _data_dir_problems(settings: Settings) -> list[str]:
    source, data_dir = settings.source, settings.path(settings.data_dir)
    fix = "raw mail and attachments are stored there, give it to the user that runs mailgate"
    if not data_dir.exists():
        # The first start makes it. `check` creates nothing: run as root before
        # that start, it would leave folders the service's user cannot write.
        problem = folder_problem(data_dir)
        return [f"{source}: data_dir: {problem} ({fix})"] if problem else []
    try:
        probe = data_dir / ".mailgate-check"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        return [f"{source}: data_dir: {data_dir} is not writable by user {running_user()} "
                f"({exc.strerror}; {fix})"]  # fmt: skip
    return _blob_folder_problems(source, data_dir / "blobs") if _blobs_in_files(settings) else []


def _maildir_problems(settings: Settings) -> list[str]:
    out = settings.outbound
    if out.transport != "maildir":
        return []
    maildir = settings.path(out.maildir)
    for folder in (maildir, maildir / "tmp", maildir / "new", maildir / "cur"):
        if (problem := folder_problem(folder)) is not None:
            fix = "the mail we send goes there; give it to the user that runs mailgate"
            # The first folder in the way is enough to name.
            return [f"{settings.source}: outbound.maildir: {problem} ({fix})"]
    return []


def _blobs_in_files(settings: Settings) -> bool:
    """Are raw mail and attachments kept under data_dir? (as App.blobs decides)"""
    if settings.blob_store == "auto":
        return not settings.database_url.startswith("postgresql")
    return settings.blob_store == "directory"


def _blob_folder_problems(source: str, blobs: Path) -> list[str]:
    """blobs/ and its two levels of folders (blobs/ab/cd/): one made by a command run
    as root refuses every mail whose hash falls in it. One line, however many."""
    folders = [blobs]
    if blobs.is_dir():
        level = [p for p in blobs.iterdir() if p.is_dir()]
        folders += level + [q for p in level for q in p.iterdir() if q.is_dir()]
    bad = [problem for folder in folders if (problem := folder_problem(folder)) is not None]
    if not bad:
        return []
    more = f" (and {len(bad) - 1} more under {blobs})" if len(bad) > 1 else ""
    return [f"{source}: data_dir: {bad[0]}{more}: raw mail and attachments are stored there, "
            "every mail would get 451; give them to the user that runs mailgate"]  # fmt: skip


def check_smtp(settings: Settings) -> list[str]:
    """The listener's certificate, key and AUTH users file, read as `mailgate run` reads them."""
    from mailgate.intake.smtp_files import file_problems

    return file_problems(settings)


# `check` must answer quickly even when the relay host drops packets.
RELAY_CHECK_TIMEOUT = 10.0


def check_relay(settings: Settings) -> list[str]:
    """Open a session with the relay as the sender would: EHLO, STARTTLS, AUTH; send nothing."""
    out = settings.outbound
    if out.transport != "smtp":
        return []
    relay = out.smtp
    password = read_secret(file=relay.password_file, env=relay.password_env,
                           settings=settings, key="outbound.smtp.password")  # fmt: skip
    key, where = f"{settings.source}: outbound.smtp", f"{relay.host}:{relay.port}"
    try:
        _relay_session(relay.host, relay.port, relay.tls, relay.username, password,
                       min(float(relay.timeout_seconds), RELAY_CHECK_TIMEOUT))  # fmt: skip
    except smtplib.SMTPResponseException as exc:
        reply = " ".join(exc.smtp_error.decode("utf-8", "replace").split())
        return [f"{key}: relay {where} refused the session: {exc.smtp_code} {reply}"]
    except (smtplib.SMTPException, OSError) as exc:  # ssl.SSLError is an OSError
        hint = " (check host, port and tls)" if relay.tls != "none" else " (check host and port)"
        return [f"{key}: cannot talk to relay {where}: {exc or type(exc).__name__}"
                + hint]  # fmt: skip
    return []


def _relay_session(host: str, port: int, tls: str, username: str | None,
                   password: str | None, timeout: float) -> None:  # fmt: skip
    context = ssl.create_default_context()
    smtp: smtplib.SMTP
    if tls == "implicit":
        smtp = smtplib.SMTP_SSL(host, port, timeout=timeout, context=context)
    else:
        smtp = smtplib.SMTP(host, port, timeout=timeout)
    try:
        smtp.ehlo_or_helo_if_needed()  # the transport falls back to HELO too
        if tls == "starttls":
            smtp.starttls(context=context)  # raises when the relay does not offer it
            smtp.ehlo()
        if username:
            smtp.login(username, password or "")
        with contextlib.suppress(smtplib.SMTPException, OSError):
            smtp.quit()  # the relay answered all we asked; a rude goodbye is no problem
    finally:
        smtp.close()


def check_imap(settings: Settings) -> list[str]:
    """Log in to every enabled mailbox, as the daemon will."""
    from imapclient.exceptions import IMAPClientError, LoginError

    from mailgate.app import App
    from mailgate.intake.imap import CannotFile, Mailbox, error_text, select

    app = App(settings, migrate=False)
    problems = []
    for box in settings.intake.mailboxes:
        where = (
            f"{settings.source}: intake.imap {box.name}: {box.username} at {box.host}:{box.port}"
        )
        try:
            client = Mailbox(lambda: app, box).connect()
        except LoginError as exc:
            problems.append(f"{where}: login refused ({error_text(exc)}); check the password "
                            "or token")  # fmt: skip
            continue
        except (OSError, IMAPClientError) as exc:
            problems.append(f"{where}: cannot connect ({exc})")
            continue
        except ConfigError as exc:
            problems += exc.problems
            continue
        # The folder too: the daemon would log in, then fail at each retry.
        try:
            select(client, box)
        except CannotFile as exc:
            problems.append(f"{where}: {exc}")
        except (OSError, IMAPClientError) as exc:
            problems.append(f"{where}: cannot open {box.folder} ({error_text(exc)})")
        finally:
            with contextlib.suppress(OSError, IMAPClientError):
                client.logout()
    return problems
